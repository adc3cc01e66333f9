r"""Decoding: turning next-token logits into text.

Two different kinds of procedure live here.

* **Sampling** draws the next token at random from a (possibly reshaped) distribution:
  plain ancestral sampling, temperature, top-k sampling (Fan et al., 2018) and top-p
  (nucleus) sampling (Holtzman et al., 2020). Every function that draws takes a
  ``torch.Generator``.
* **Search** looks for a high-probability sequence and involves no randomness at all:
  greedy decoding (the most likely token at every step) and :func:`beam_search`.

The filters are pure functions on logits of shape ``(..., |𝒱|)`` (one entry per token of
the vocabulary 𝒱): they return new logits in which the excluded tokens are ``-inf``, so
they compose (temperature, then top-k, then top-p) and a softmax of the result is the
distribution actually sampled from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from .runtime import is_int, is_real


# ------------------------------------------------------------------------ argument checks
# Each check accepts Python and NumPy numbers (``np.float64(0.9)``, ``np.int64(5)``), refuses
# ``True``/``False`` (flags, not numbers), and returns the value as a plain Python number.

def check_temperature(temperature: float) -> float:
    """A temperature is a finite number >= 0 (0 means greedy decoding)."""
    if not is_real(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0 (0 means greedy, 1 leaves "
                         f"the distribution as it is), got {temperature!r}")
    return float(temperature)


def check_top_k(k: int) -> int:
    """``top_k`` is an int >= 1."""
    if not is_int(k) or k < 1:
        raise ValueError(f"top_k must be an int >= 1 (the number of tokens kept), got {k!r}")
    return int(k)


def check_top_p(p: float) -> float:
    """``top_p`` is a number in (0, 1]."""
    if not is_real(p) or not 0.0 < p <= 1.0:
        raise ValueError(f"top_p must be a number in (0, 1] (the probability mass kept), got {p!r}")
    return float(p)


def check_beam_width(beam_width: int) -> int:
    """``beam_width`` is an int >= 1."""
    if not is_int(beam_width) or beam_width < 1:
        raise ValueError(f"beam_width must be an int >= 1 (the number of hypotheses kept), "
                         f"got {beam_width!r}")
    return int(beam_width)


# ------------------------------------------------------------------------ filters

def greedy(logits: torch.Tensor) -> torch.Tensor:
    """The most likely token: ``(..., |𝒱|) -> (...)``; ties go to the lowest token id."""
    return logits.argmax(dim=-1)


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    r"""Divide the logits by ``temperature`` > 0: :math:`p_T(w) \propto p(w)^{1/T}`.

    ``T < 1`` sharpens the distribution, ``T > 1`` flattens it, ``T = 1`` leaves it as is.
    The limit ``T -> 0`` is greedy decoding, which :func:`sample` does for ``T = 0``.

    The largest logit of each row is subtracted first (the softmax does not change), so
    every result is ``<= 0``: a tiny temperature such as ``1e-30`` turns the other logits
    into large negative numbers or ``-inf`` and the softmax into the greedy choice (shared
    equally between tied maxima), instead of overflowing to ``inf - inf = nan``.
    """
    temperature = check_temperature(temperature)
    if temperature == 0:
        raise ValueError("temperature 0 is greedy decoding; call greedy() (or sample(), "
                         "which handles it) instead of dividing by zero")
    shifted = logits - logits.amax(dim=-1, keepdim=True)                 # (..., |𝒱|), <= 0
    scaled = shifted / temperature
    # A temperature outside the dtype's range (1e-300 or 1e300 in float32) becomes 0 or inf,
    # and 0 / 0 or -inf / inf would be nan: a maximum stays 0 and a banned token -inf.
    scaled = torch.where(shifted == 0, torch.zeros_like(scaled), scaled)
    return torch.where(shifted == -math.inf, shifted, scaled)


def _sorted_desc(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # A stable sort keeps equal logits in token order, so ties are broken the same way
    # every time: the lower token id counts as the larger.
    return torch.sort(logits, dim=-1, descending=True, stable=True)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep exactly the ``k`` largest logits (all of them if ``k >= |𝒱|``), set the rest to
    ``-inf``. Among equal logits the lower token ids are kept first."""
    check_top_k(k)
    V = logits.shape[-1]
    if k >= V:
        return logits.clone()
    _, order = _sorted_desc(logits)
    drop = order[..., k:]                                       # (..., V - k)
    return logits.scatter(-1, drop, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    r"""Nucleus filtering: keep the smallest set of most likely tokens whose probability
    mass reaches ``p``, set the rest to ``-inf``.

    With the probabilities sorted in decreasing order, :math:`p_{(1)} \ge p_{(2)} \ge \dots`,
    token :math:`(j)` is kept when the mass before it, :math:`\sum_{i<j} p_{(i)}`, is still
    below ``p``. The most likely token is therefore always kept (for any ``p > 0``), and
    ``p = 1`` keeps every token with non-zero probability (every finite logit: the
    cumulative sum can round to 1 before the smallest probabilities are added, so that
    case is not left to it).
    """
    if check_top_p(p) == 1.0:
        return logits.clone()
    sorted_logits, order = _sorted_desc(logits)
    probs = torch.softmax(sorted_logits.double(), dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    drop_sorted = mass_before >= p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def filter_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None) -> torch.Tensor:
    """Temperature (> 0), then top-k, then top-p; ``None`` skips a filter."""
    out = apply_temperature(logits, temperature)
    if top_k is not None:
        out = top_k_filter(out, top_k)
    if top_p is not None:
        out = top_p_filter(out, top_p)
    return out


def sample(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
           top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw one token per row: ``(..., |𝒱|) -> (...)`` int64.

    ``temperature = 0`` returns :func:`greedy` (no randomness); otherwise the token is drawn
    from ``softmax(filter_logits(...))`` with ``generator``.
    """
    temperature = check_temperature(temperature)
    if top_k is not None:
        check_top_k(top_k)
    if top_p is not None:
        check_top_p(top_p)
    if temperature == 0:
        return greedy(logits)
    filtered = filter_logits(logits.float(), temperature, top_k, top_p)
    probs = torch.softmax(filtered, dim=-1)
    flat = probs.reshape(-1, probs.shape[-1])
    draws = torch.multinomial(flat.cpu(), 1, generator=generator).to(logits.device)
    return draws.reshape(probs.shape[:-1])


# ------------------------------------------------------------------------ strategies

@dataclass(frozen=True)
class Decoding:
    """A decoding strategy, for comparisons: sampling settings or a beam width."""

    name: str                      # label for tables and plots
    temperature: float = 1.0       # 0 = greedy; ignored by beam search
    top_k: int | None = None       # keep the k most likely tokens (None: all)
    top_p: float | None = None     # keep the smallest set with this mass (None: all)
    beam_width: int | None = None  # set for beam search (a deterministic search)

    def __post_init__(self) -> None:
        # NumPy numbers are accepted and stored as Python numbers (like runtime.check_fields).
        object.__setattr__(self, "temperature", check_temperature(self.temperature))
        for name, check in (("top_k", check_top_k), ("top_p", check_top_p),
                            ("beam_width", check_beam_width)):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, check(getattr(self, name)))

    @property
    def is_search(self) -> bool:
        """True for greedy decoding and beam search, which involve no randomness."""
        return self.beam_width is not None or self.temperature == 0


# ------------------------------------------------------------------------ beam search

@dataclass(frozen=True)
class BeamResult:
    sequences: torch.Tensor  # (b, T0 + steps) the surviving beams, best first
    scores: torch.Tensor     # (b,) their total log-probabilities of the generated part (float64)


def beam_search(next_log_probs: Callable[[torch.Tensor], torch.Tensor], prefix: torch.Tensor,
                steps: int, beam_width: int) -> BeamResult:
    r"""Beam search: a deterministic search for a likely continuation. NOT a sampling method.

    It approximately solves :math:`\arg\max_{y_{1:S}} \sum_{s=1}^{S} \log p(y_s \mid x, y_{<s})`
    over continuations of ``steps`` tokens of the prefix ``x``. After each step it keeps the
    ``beam_width`` partial sequences with the highest total log-probability among all
    one-token extensions of the current beams. Width 1 is greedy decoding. A width of at
    least ``|𝒱| ** (steps - 1)`` keeps every prefix, so the search is exhaustive and returns
    the most likely sequence exactly; narrower beams can miss it. There is no randomness:
    the same model and prefix always give the same result (ties are broken towards the
    earlier beam, then the lower token id).

    Args:
        next_log_probs: maps token sequences ``(N, t)`` to next-token log-probabilities
            ``(N, |𝒱|)`` (e.g. a model's log-softmax at the last position).
        prefix: ``(T0,)`` int64, the prompt (at least one token).
        steps: number of tokens to add.
        beam_width: the beam width b, the number of hypotheses kept after each step.

    Returns:
        A :class:`BeamResult` with the final beams sorted from best to worst.
    """
    beam_width = check_beam_width(beam_width)
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if prefix.ndim != 1 or len(prefix) < 1:
        raise ValueError(f"prefix must be a non-empty 1-D tensor of token ids, got shape {tuple(prefix.shape)}")
    beams = prefix[None].long()                                   # (1, T0)
    scores = torch.zeros(1, dtype=torch.float64)                  # (1,)
    for _ in range(steps):
        log_p = next_log_probs(beams).double().cpu()              # (N, V)
        V = log_p.shape[-1]
        candidates = (scores[:, None] + log_p).reshape(-1)        # (N * V,) beam-major
        best = torch.sort(candidates, descending=True, stable=True).indices[:beam_width]
        beam_idx, token = best // V, best % V
        beams = torch.cat([beams[beam_idx.to(beams.device)], token[:, None].to(beams.device)], dim=1)
        scores = candidates[best]
    return BeamResult(beams, scores)
