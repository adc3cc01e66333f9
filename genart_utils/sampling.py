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

A **constraint** removes tokens before the filters: :class:`MetreConstraint` follows folk
tunes as they are written and masks every token that would make a bar longer than its
metre (or end a bar before it is full); :func:`generate` samples under it and records how
much probability the mask removed at each step.
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
           top_p: float | None = None, generator: torch.Generator | None = None,
           allowed: torch.Tensor | None = None) -> torch.Tensor:
    """Draw one token per row: ``(..., |𝒱|) -> (...)`` int64.

    ``temperature = 0`` returns :func:`greedy` (no randomness); otherwise the token is drawn
    from ``softmax(filter_logits(...))`` with ``generator``. ``allowed`` (bool, the shape
    of ``logits``; e.g. from :class:`MetreConstraint`) first removes the tokens it marks
    False (:func:`mask_logits`), so temperature, top-k and top-p act on the renormalised
    distribution; ``allowed=None`` leaves the computation exactly as without it.
    """
    temperature = check_temperature(temperature)
    if top_k is not None:
        check_top_k(top_k)
    if top_p is not None:
        check_top_p(top_p)
    if allowed is not None:
        logits = mask_logits(logits, allowed)
    if temperature == 0:
        return greedy(logits)
    filtered = filter_logits(logits.float(), temperature, top_k, top_p)
    probs = torch.softmax(filtered, dim=-1)
    flat = probs.reshape(-1, probs.shape[-1])
    draws = torch.multinomial(flat.cpu(), 1, generator=generator).to(logits.device)
    return draws.reshape(probs.shape[:-1])


# ------------------------------------------------------------------------ constraints

def mask_logits(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    r"""Logits with every token outside ``allowed`` set to ``-inf``: ``(..., |𝒱|)``.

    A softmax of the result is the model's distribution renormalised over the allowed
    set, :math:`q(w) = p(w)\,[w \in A] / \sum_{v \in A} p(v)`. Allowed logits are
    returned unchanged (bit for bit), so an all-true mask changes nothing.

    Raises:
        ValueError: when the shapes differ, the mask is not boolean, or a row allows no token.
    """
    if not isinstance(allowed, torch.Tensor) or allowed.dtype != torch.bool:
        raise ValueError("allowed must be a boolean tensor (True = the token may be drawn)")
    if allowed.shape != logits.shape:
        raise ValueError(f"allowed has shape {tuple(allowed.shape)} but the logits have shape "
                         f"{tuple(logits.shape)}; give one flag per token of every row")
    if not bool(allowed.any(dim=-1).all()):
        raise ValueError("a row allows no token at all: the constraint has nothing left to sample from")
    return logits.masked_fill(~allowed.to(logits.device), float("-inf"))


def log_mass_allowed(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    r""":math:`\log Z = \log \sum_{w \in A} p(w)` per row, in nats, with :math:`p` the
    softmax of ``logits`` (temperature 1, no filters): ``(..., |𝒱|) -> (...)`` float64.
    Renormalising over ``A`` multiplies every allowed probability by :math:`1 / Z`."""
    logp = torch.log_softmax(logits.double(), dim=-1)
    return torch.logsumexp(logp.masked_fill(~allowed.to(logp.device), float("-inf")), dim=-1)


_MASK_CACHES: dict[tuple, dict] = {}     # token texts -> {tracker key: mask}
_MASK_CACHE_SIZE = 200_000


class MetreConstraint:
    r"""A metre-aware logits processor: masks every token that would break the bar arithmetic.

    One :class:`genart_utils.music.BarTracker` per row follows the tune being written (the
    prompt must hold the header with ``M:`` and, unless ABC's default applies, ``L:``; an
    ``M:`` or ``L:`` line written later, or ``[M:...]``, changes them from there). At each
    step :meth:`allowed` returns, for every token, whether the text with that token still
    has no bar longer than its metre and no finished short bar outside the places where
    :func:`genart_utils.music.bar_verdicts` allows one (an upbeat, a section's first or last
    bar); a bar line is therefore only allowed once its bar is full. See ``BarTracker`` for
    what a character model can and cannot be judged on at each character.

    It composes with the filters: the mask is applied first, then temperature, top-k and
    top-p reshape the renormalised distribution (:func:`sample` with ``allowed=``).

    Masks are cached by the trackers' states (:meth:`BarTracker.key`), so rows and steps
    in the same situation are judged once; tokens whose texts differ only by the pitch
    letter (``A2`` and ``G2``) are judged together.

    Args:
        token_texts: the text of every token id (``vocab.token_texts`` of a
            :class:`~genart_utils.text.CharVocab` or :class:`~genart_utils.text.MusicVocab`);
            ``None`` for a token that is never allowed (a byte token).
        prompts: the text before the first generated token, one per row.

    Raises:
        ValueError: from ``BarTracker`` for a prompt without ``M:``, with a malformed metre
            (``M:7/0``, ``M:abc``) or unit length, or with bars that already do not fit.
    """

    def __init__(self, token_texts: Sequence[str | None], prompts: Sequence[str]):
        from . import music

        if isinstance(prompts, str):
            raise ValueError("prompts is a sequence with one prompt per row, not one string")
        self.token_texts = tuple(token_texts)
        if not self.token_texts:
            raise ValueError("token_texts is empty: pass vocab.token_texts")
        self.trackers = [music.BarTracker(p) for p in prompts]
        groups: dict[str, list[int]] = {}
        for i, t in enumerate(self.token_texts):
            if t is not None and t != "":
                groups.setdefault(t.translate(music._NORMALIZE), []).append(i)
        self._groups = [(self.token_texts[ids[0]], ids) for ids in groups.values()]
        # Masks are shared by every constraint over the same tokens (bounded, then cleared).
        self._cache = _MASK_CACHES.setdefault(self.token_texts, {})
        self.hits = self.misses = 0

    @property
    def vocab_size(self) -> int:
        return len(self.token_texts)

    def row_allowed(self, row: int) -> torch.Tensor:
        """``(|𝒱|,)`` bool: the tokens that may come next in row ``row``."""
        tracker = self.trackers[row]
        key = tracker.key()
        mask = self._cache.get(key)
        if mask is not None:
            self.hits += 1
            return mask
        self.misses += 1
        flags = [False] * self.vocab_size
        for text, ids in self._groups:
            if tracker.allows(text):
                for i in ids:
                    flags[i] = True
        if not any(flags):
            raise ValueError(f"no token can follow {tracker.text[-40:]!r} in time; was text that the "
                             "constraint did not allow appended?")
        mask = torch.tensor(flags)
        if len(self._cache) >= _MASK_CACHE_SIZE:
            self._cache.clear()
        self._cache[key] = mask
        return mask

    def allowed(self, rows: Sequence[int] | None = None) -> torch.Tensor:
        """``(B, |𝒱|)`` bool for all rows (or those in ``rows``; the others allow everything)."""
        out = torch.ones(len(self.trackers), self.vocab_size, dtype=torch.bool)
        for b in range(len(self.trackers)) if rows is None else rows:
            out[b] = self.row_allowed(b)
        return out

    def advance(self, tokens: Sequence[int] | torch.Tensor, rows: Sequence[int] | None = None) -> None:
        """Append the drawn token of every row (or of those in ``rows``) to its tune."""
        tokens = tokens.tolist() if isinstance(tokens, torch.Tensor) else list(tokens)
        if len(tokens) != len(self.trackers):
            raise ValueError(f"one token per row: got {len(tokens)} for {len(self.trackers)} rows")
        for b in range(len(self.trackers)) if rows is None else rows:
            text = self.token_texts[tokens[b]]
            if text is None:
                raise ValueError(f"token {tokens[b]} has no text of its own (a byte token); the "
                                 "constraint never allows it")
            self.trackers[b].append(text)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """``(B, |𝒱|)`` logits with the tokens that break the metre set to ``-inf``."""
        return mask_logits(logits, self.allowed().to(logits.device))


@dataclass(frozen=True)
class Generation:
    """What :func:`generate` returns."""

    sequences: torch.Tensor   # (B, T0 + n_new) the prompts and their continuations
    log_kept: torch.Tensor    # (B,) float64 nats: sum over the steps of log Z_t (0 unconstrained)
    n_steps: torch.Tensor     # (B,) int64: generated tokens up to and including the stop sequence


@torch.no_grad()
def generate(next_logits: Callable[[torch.Tensor], torch.Tensor], prompt: torch.Tensor,
             max_new_tokens: int, *, temperature: float = 1.0, top_k: int | None = None,
             top_p: float | None = None, generator: torch.Generator | None = None,
             stop: Sequence[int] | None = None, constraint: MetreConstraint | None = None
             ) -> Generation:
    r"""Sample continuations of a batch of prompts, optionally under a constraint.

    At every step the next-token logits of all rows are read from ``next_logits(seqs)``
    (``(B, t) -> (B, |𝒱|)``: the interface of :func:`beam_search`, e.g.
    ``gpt.cached_next_log_probs_fn(model)``), and one token per row is drawn with
    :func:`sample`. With a ``constraint``, its mask is applied first
    (``sample(..., allowed=...)``), and ``log_kept`` adds up, per row,
    :math:`\log Z_t = \log \sum_{w \in A_t} p(w \mid x_{<t})` under the model's own
    distribution (temperature 1, no filters): the log-probability that the unconstrained
    model would have stayed in time at that step. Without a constraint, the draws are those
    of :func:`sample` (same generator, same results).

    Rows stop being followed once their continuation ends with ``stop`` (they keep being
    sampled, like :func:`genart_utils.gpt.generate`, until all have stopped; cut them there).

    Args:
        prompt: ``(B, T0)`` int64 token ids (all rows of one length).
    """
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    check_temperature(temperature)
    if prompt.ndim != 2 or prompt.shape[1] < 1:
        raise ValueError(f"the prompt must be (B, T0) token ids with T0 >= 1, got shape {tuple(prompt.shape)}")
    if constraint is not None and len(constraint.trackers) != prompt.shape[0]:
        raise ValueError(f"the constraint follows {len(constraint.trackers)} rows but the prompt has "
                         f"{prompt.shape[0]}; build it with one prompt per row")
    seqs = prompt.long()
    B, T0 = seqs.shape
    stop = list(stop) if stop else []
    active = [True] * B
    log_kept = torch.zeros(B, dtype=torch.float64)
    n_steps = torch.zeros(B, dtype=torch.long)
    for _ in range(max_new_tokens):
        if not any(active):
            break
        logits = next_logits(seqs)                                        # (B, V)
        allowed = None
        if constraint is not None:
            rows = [b for b in range(B) if active[b]]
            allowed = constraint.allowed(rows).to(logits.device)
            log_kept[rows] += log_mass_allowed(logits[rows], allowed[rows]).cpu()
        nxt = sample(logits, temperature, top_k, top_p, generator, allowed=allowed)   # (B,)
        seqs = torch.cat([seqs, nxt[:, None].to(seqs.device)], dim=1)
        rows = [b for b in range(B) if active[b]]
        n_steps[rows] += 1
        if constraint is not None:
            constraint.advance(nxt.cpu(), rows)
        if stop:
            for b in rows:
                if seqs.shape[1] - T0 >= len(stop) and seqs[b, -len(stop):].tolist() == stop:
                    active[b] = False
    return Generation(seqs, log_kept, n_steps)


def generate_texts(next_logits: Callable[[torch.Tensor], torch.Tensor], vocab, prompts: Sequence[str],
                   max_new_tokens: int, *, constrain: bool = False, stop: str | None = "\n\n",
                   temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                   seed: int = 0) -> tuple[list[str], list[float]]:
    """Continue each prompt with :func:`generate` (under a :class:`MetreConstraint` with
    ``constrain``) and return the continuations, each cut just after the first ``stop``,
    with the ``log_kept`` of each (nats; 0 without the constraint).

    ``vocab`` is a :class:`~genart_utils.text.CharVocab` or
    :class:`~genart_utils.text.MusicVocab`. Prompts with the same number of tokens are
    generated together; all draws come from one generator seeded with ``seed``.
    """
    generator = torch.Generator().manual_seed(int(seed))
    encoded = [vocab.encode(p) for p in prompts]
    by_length: dict[int, list[int]] = {}
    for i, ids in enumerate(encoded):
        by_length.setdefault(len(ids), []).append(i)
    stop_ids = vocab.encode(stop).tolist() if stop else None
    texts: list[str] = [""] * len(prompts)
    kept: list[float] = [0.0] * len(prompts)
    for length in sorted(by_length):
        rows = by_length[length]
        batch = torch.stack([encoded[i] for i in rows])
        constraint = MetreConstraint(vocab.token_texts, [prompts[i] for i in rows]) if constrain else None
        out = generate(next_logits, batch, max_new_tokens, temperature=temperature, top_k=top_k,
                       top_p=top_p, generator=generator, stop=stop_ids, constraint=constraint)
        for r, i in enumerate(rows):
            text = vocab.decode(out.sequences[r, length:length + int(out.n_steps[r])])
            texts[i] = text[:text.index(stop) + len(stop)] if stop and stop in text else text
            kept[i] = float(out.log_kept[r])
    return texts, kept


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
