r"""Decoding: turning next-token logits into text.

Two different kinds of procedure live here.

* **Sampling** draws the next token at random from a (possibly reshaped) distribution:
  plain ancestral sampling, temperature, top-k and top-p (nucleus) sampling
  (Holtzman et al., 2020). Every function that draws takes a ``torch.Generator``.
* **Search** looks for a high-probability sequence and involves no randomness at all:
  greedy decoding (the most likely token at every step) and :func:`beam_search`.

The filters are pure functions on logits of shape ``(..., V)``: they return new logits in
which the excluded tokens are ``-inf``, so they compose (temperature, then top-k, then
top-p) and a softmax of the result is the distribution actually sampled from.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


# ------------------------------------------------------------------------ argument checks

def check_temperature(temperature: float) -> None:
    if not isinstance(temperature, (int, float)) or temperature != temperature or temperature < 0:
        raise ValueError(f"temperature must be a number >= 0 (0 means greedy), got {temperature!r}")


def check_top_k(k: int) -> None:
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"top_k must be an int >= 1 (the number of tokens kept), got {k!r}")


def check_top_p(p: float) -> None:
    if not isinstance(p, (int, float)) or not 0.0 < p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] (the probability mass kept), got {p!r}")


# ------------------------------------------------------------------------ filters

def greedy(logits: torch.Tensor) -> torch.Tensor:
    """The most likely token: ``(..., V) -> (...)``; ties go to the lowest token id."""
    return logits.argmax(dim=-1)


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    r"""Divide the logits by ``temperature`` > 0: :math:`p_T(w) \propto p(w)^{1/T}`.

    ``T < 1`` sharpens the distribution, ``T > 1`` flattens it, ``T = 1`` leaves it as is.
    The limit ``T -> 0`` is greedy decoding, which :func:`sample` does for ``T = 0``.
    """
    check_temperature(temperature)
    if temperature == 0:
        raise ValueError("temperature 0 is greedy decoding; call greedy() (or sample(), "
                         "which handles it) instead of dividing by zero")
    return logits / temperature


def _sorted_desc(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # A stable sort keeps equal logits in token order, so ties are broken the same way
    # every time: the lower token id counts as the larger.
    return torch.sort(logits, dim=-1, descending=True, stable=True)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep exactly the ``k`` largest logits (all of them if ``k >= V``), set the rest to
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
    ``p = 1`` keeps every token with non-zero probability.
    """
    check_top_p(p)
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
    """Draw one token per row: ``(..., V) -> (...)`` int64.

    ``temperature = 0`` returns :func:`greedy` (no randomness); otherwise the token is drawn
    from ``softmax(filter_logits(...))`` with ``generator``.
    """
    check_temperature(temperature)
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
        check_temperature(self.temperature)
        if self.top_k is not None:
            check_top_k(self.top_k)
        if self.top_p is not None:
            check_top_p(self.top_p)
        if self.beam_width is not None and (not isinstance(self.beam_width, int) or self.beam_width < 1):
            raise ValueError(f"beam_width must be an int >= 1, got {self.beam_width!r}")

    @property
    def is_search(self) -> bool:
        """True for greedy decoding and beam search, which involve no randomness."""
        return self.beam_width is not None or self.temperature == 0


# ------------------------------------------------------------------------ beam search

@dataclass(frozen=True)
class BeamResult:
    sequences: torch.Tensor  # (W, T0 + steps) the surviving beams, best first
    scores: torch.Tensor     # (W,) their total log-probabilities of the generated part (float64)


def beam_search(next_log_probs: Callable[[torch.Tensor], torch.Tensor], prefix: torch.Tensor,
                steps: int, beam_width: int) -> BeamResult:
    r"""Beam search: a deterministic search for a likely continuation. NOT a sampling method.

    It approximately solves :math:`\arg\max_{y_{1:S}} \sum_{s=1}^{S} \log p(y_s \mid x, y_{<s})`
    over continuations of ``steps`` tokens of the prefix ``x``. After each step it keeps the
    ``beam_width`` partial sequences with the highest total log-probability among all
    one-token extensions of the current beams. Width 1 is greedy decoding. A width of at
    least ``V ** (steps - 1)`` keeps every prefix, so the search is exhaustive and returns
    the most likely sequence exactly; narrower beams can miss it. There is no randomness:
    the same model and prefix always give the same result (ties are broken towards the
    earlier beam, then the lower token id).

    Args:
        next_log_probs: maps token sequences ``(N, t)`` to next-token log-probabilities
            ``(N, V)`` (e.g. a model's log-softmax at the last position).
        prefix: ``(T0,)`` int64, the prompt (at least one token).
        steps: number of tokens to add.
        beam_width: number of hypotheses kept after each step.

    Returns:
        A :class:`BeamResult` with the final beams sorted from best to worst.
    """
    if not isinstance(beam_width, int) or beam_width < 1:
        raise ValueError(f"beam_width must be an int >= 1, got {beam_width!r}")
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
