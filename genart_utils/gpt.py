r"""A small GPT: a decoder-only transformer that models text one token at a time.

The model, from the bottom up (``B`` sequences of ``T`` tokens, width ``C``, ``H`` heads
of size :math:`d_h = C / H`, a vocabulary :math:`\mathcal V` of ``vocab_size`` =
:math:`|\mathcal V|` tokens):

1. token embedding plus a learned position embedding: ``(B, T) -> (B, T, C)``;
2. ``n_layer`` pre-norm residual blocks, each ``x = x + attn(ln_1(x))`` then
   ``x = x + mlp(ln_2(x))``, where ``attn`` is causal multi-head self-attention
   (:func:`causal_attention`) and ``mlp`` a two-layer perceptron with a GELU;
3. a final layer norm and a linear read-out to ``(B, T, vocab_size)`` logits whose weight matrix is
   the token embedding matrix (weight tying).

The causal mask makes the logits at position ``t`` depend on tokens ``0..t`` only, so one
forward pass over a sequence gives the next-token distribution at every position: that is
what makes training with teacher forcing (:func:`lm_loss`) one pass per batch.

Mixed precision goes through :func:`genart_utils.runtime.autocast` (a no-op on CPU), and
:func:`maybe_compile` uses ``torch.compile`` only on CUDA, so one code path serves every
device.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import operator
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import runtime, sampling, training


def _compiling() -> bool:
    """True while ``torch.compile`` traces the model (checks with data-dependent branches
    are skipped there: they would split the compiled graph)."""
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and getattr(compiler, "is_compiling", lambda: False)())


def _check_int(name: str, value: Any, minimum: int) -> None:
    """``value`` must be an int (Python or NumPy, not a bool) of at least ``minimum``."""
    if not runtime.is_int(value) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """Half-precision logits (from autocast) to float32; float64 stays float64."""
    return x if x.dtype == torch.float64 else x.float()


@dataclass(frozen=True)
class GPTConfig:
    """The shape of a :class:`GPT`. Change one field with ``dataclasses.replace``."""

    vocab_size: int = 96        # |V|: number of distinct tokens (characters)
    block_size: int = 256       # T_max: the longest context, in tokens (size of the position table)
    n_layer: int = 4            # number of transformer blocks
    n_head: int = 4             # H: attention heads per block
    n_embd: int = 128           # C: width of the residual stream (a multiple of n_head)
    dropout: float = 0.0        # dropout on attention weights and residual branches (0: none)
    bias: bool = True           # biases in the Linear and LayerNorm layers
    tie_weights: bool = True    # the read-out reuses the token embedding matrix
    attention: str = "manual"   # "manual": written out (can return weights); "sdpa": fused kernel
    seed: int = 0               # seed of the weight initialisation

    def __post_init__(self) -> None:
        runtime.check_fields(self, positive_ints=("vocab_size", "block_size", "n_layer", "n_head",
                                                  "n_embd"),
                             nonneg_ints=("seed",), half_open_unit=("dropout",),
                             choices={"attention": ("manual", "sdpa"), "bias": (True, False),
                                      "tie_weights": (True, False)})
        if self.n_embd % self.n_head:
            raise ValueError(f"GPTConfig.n_embd ({self.n_embd}) must be a multiple of n_head "
                             f"({self.n_head}), so that each head gets n_embd / n_head channels")


@dataclass(frozen=True)
class TrainConfig:
    """How a :class:`GPT` is trained (see :func:`lr_at` for the schedule)."""

    steps: int = 2_000           # optimisation steps
    batch_size: int = 32         # sequences per step, each block_size tokens long
    lr: float = 2e-3             # peak learning rate, reached at the end of the warm-up
    min_lr: float = 2e-4         # learning rate at the end of the cosine decay
    warmup_steps: int = 100      # linear warm-up from lr / warmup_steps to lr
    weight_decay: float = 0.1    # AdamW decay, applied to weight matrices only
    beta1: float = 0.9           # AdamW first-moment decay
    beta2: float = 0.99          # AdamW second-moment decay (0.99: tolerant of small batches)
    grad_clip: float = 1.0       # clip the global gradient norm to this (0: no clipping)
    seed: int = 0                # seed of the batch sampler

    def __post_init__(self) -> None:
        runtime.check_fields(self, positive_ints=("steps", "batch_size"),
                             nonneg_ints=("warmup_steps", "seed"), positive_floats=("lr", "min_lr"),
                             nonneg_floats=("weight_decay", "grad_clip"),
                             half_open_unit=("beta1", "beta2"))
        if self.min_lr > self.lr:
            raise ValueError(f"TrainConfig.min_lr must be at most lr (the decay ends below the "
                             f"peak), got min_lr={self.min_lr}, lr={self.lr}")


FOLK_SIZES = {
    "smoke": dict(max_tunes=500, n_layer=2, n_head=4, n_embd=64, block_size=128, batch_size=16,
                  steps=40, eval_every=20, monitor_every=1, max_order=5, n_prompts=4, max_new=100,
                  beam_width=2, n_real_checked=8),
    "cpu": dict(max_tunes=None, n_layer=3, n_head=4, n_embd=96, block_size=128, batch_size=8,
                steps=6_000, eval_every=1_000, monitor_every=4, max_order=10, n_prompts=32,
                max_new=300, beam_width=4, n_real_checked=100),
    "gpu": dict(max_tunes=None, n_layer=6, n_head=8, n_embd=256, block_size=256, batch_size=64,
                steps=3_000, eval_every=250, monitor_every=1, max_order=10, n_prompts=64, max_new=500,
                beam_width=8, n_real_checked=400),
}
"""The sizes of notebooks/07_gpt_folk_tunes.ipynb for each execution profile (the only thing
that changes between profiles): ``cfg = runtime.profile_config(**gpt.FOLK_SIZES)``; the
benchmarks import the same dict."""

SCAN_SIZES = {
    "smoke": dict(music_n_embd=56, n_tunes=6, max_new_chars=120, max_new_tokens=90),
    "cpu": dict(music_n_embd=88, n_tunes=100, max_new_chars=300, max_new_tokens=216),
    "gpu": dict(music_n_embd=248, n_tunes=200, max_new_chars=500, max_new_tokens=360),
}
"""The extra sizes of notebooks/07b_tunes_that_scan.ipynb for each profile; the models
themselves use :data:`FOLK_SIZES` (the character model is notebook 07's recipe), the model
on music tokens the width ``music_n_embd`` (chosen so that the two models have about the
same number of parameters). ``n_tunes`` prompts are sampled per condition, each continued by
up to ``max_new_chars`` characters (character model) or ``max_new_tokens`` tokens (music
tokens, about as many characters)."""


# ------------------------------------------------------------------------ attention

def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0,
                     training: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Causal scaled dot-product attention, written out.

    .. math:: \mathrm{Attn}(Q, K, V) = \mathrm{softmax}\!\left(\frac{Q K^\top}{\sqrt{d_h}} + M\right) V,
              \qquad M_{ij} = \begin{cases} 0 & j \le i + (T_k - T_q) \\ -\infty & \text{otherwise} \end{cases}

    Query ``i`` sees keys up to its own position. The mask is aligned to the bottom-right,
    so with ``T_q < T_k`` (new queries after cached keys) query ``i`` is position
    ``T_k - T_q + i``; with ``T_q = T_k`` it is the usual lower-triangular mask.

    Args:
        q: ``(B, H, T_q, d_h)``; k, v: ``(B, H, T_k, d_h)`` with ``T_k >= T_q``.

    Returns:
        The output ``(B, H, T_q, d_h)`` and the attention weights ``(B, H, T_q, T_k)``
        (before dropout; each row sums to 1).
    """
    T_q, T_k, d_h = q.shape[-2], k.shape[-2], q.shape[-1]
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(d_h)                   # (B, H, T_q, T_k)
    mask = torch.ones(T_q, T_k, dtype=torch.bool, device=q.device).tril(diagonal=T_k - T_q)
    scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1)                              # (B, H, T_q, T_k)
    dropped = F.dropout(weights, dropout_p, training) if dropout_p > 0 else weights
    return dropped @ v, weights                                          # (B, H, T_q, d_h)


class KVCache:
    """Keys and values of the tokens seen so far, per layer, for fast generation."""

    def __init__(self, n_layer: int):
        self.keys: list[torch.Tensor | None] = [None] * n_layer
        self.values: list[torch.Tensor | None] = [None] * n_layer

    @property
    def length(self) -> int:
        return 0 if self.keys[0] is None else self.keys[0].shape[2]


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention: ``(B, T, C) -> (B, T, C)``."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.use_sdpa = config.attention == "sdpa"
        self.dropout = config.dropout
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0,
                need_weights: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, T, C = x.shape
        H = self.n_head
        q, k, v = self.qkv(x).split(C, dim=2)                          # each (B, T, C)
        q = q.view(B, T, H, C // H).transpose(1, 2)                    # (B, H, T, d_h)
        k = k.view(B, T, H, C // H).transpose(1, 2)                    # (B, H, T, d_h)
        v = v.view(B, T, H, C // H).transpose(1, 2)                    # (B, H, T, d_h)
        if cache is not None:
            if cache.keys[layer] is not None:
                if T != 1:
                    raise ValueError("with a non-empty cache, feed one token at a time")
                k = torch.cat([cache.keys[layer], k], dim=2)            # (B, H, T_k, d_h)
                v = torch.cat([cache.values[layer], v], dim=2)
            cache.keys[layer], cache.values[layer] = k, v
        dropout_p = self.dropout if self.training else 0.0
        if self.use_sdpa and not need_weights:
            # A single new query after cached keys may look at all of them: no mask needed.
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p,
                                               is_causal=q.shape[2] == k.shape[2])
            weights = None
        else:
            y, weights = causal_attention(q, k, v, dropout_p, self.training)
        y = y.transpose(1, 2).reshape(B, T, C)                          # (B, T, C)
        return self.resid_drop(self.proj(y)), weights


class MLP(nn.Module):
    """Position-wise feed-forward network: ``(B, T, C) -> (B, T, 4C) -> (B, T, C)``."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    """A pre-norm residual block: ``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))``."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0,
                need_weights: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        a, weights = self.attn(self.ln_1(x), cache, layer, need_weights)
        x = x + a                                                       # (B, T, C)
        x = x + self.mlp(self.ln_2(x))                                  # (B, T, C)
        return x, weights


class GPT(nn.Module):
    """The model: token ids ``(B, T)`` -> next-token logits ``(B, T, vocab_size)``.

    Weights depend only on ``config.seed`` (drawn inside
    :func:`genart_utils.runtime.seeded`, which leaves the global RNG as it was): normal
    with standard deviation 0.02, biases zero, and the two projections that write into the
    residual stream in each block scaled down by ``1 / sqrt(2 n_layer)``, so that the
    stream's variance does not grow with depth at initialisation (as in GPT-2).
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        with runtime.seeded(config.seed):
            self.tok_emb = nn.Embedding(config.vocab_size, config.n_embd)
            self.pos_emb = nn.Embedding(config.block_size, config.n_embd)
            self.drop = nn.Dropout(config.dropout)
            self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
            self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
            self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
            if config.tie_weights:
                self.lm_head.weight = self.tok_emb.weight              # one (vocab_size, C) matrix
            self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif ".ln_" in name or name.startswith("ln_f"):
                p.fill_(1.0)
            elif name.endswith("attn.proj.weight") or name.endswith("mlp.proj.weight"):
                p.normal_(0.0, residual_std)
            else:
                p.normal_(0.0, 0.02)

    def _check_ids(self, idx: torch.Tensor) -> None:
        """Token ids must be a ``(B, T)`` integer tensor of ids in ``0 .. vocab_size - 1``
        (an id outside would index past the embedding table)."""
        if idx.ndim != 2 or idx.dtype.is_floating_point or idx.dtype.is_complex \
                or idx.dtype == torch.bool:
            raise ValueError(f"token ids must be a (B, T) integer tensor, got shape "
                             f"{tuple(idx.shape)} and dtype {idx.dtype}; add the batch axis "
                             "with ids[None] for one sequence")
        V = self.config.vocab_size
        if idx.numel() and bool(((idx < 0) | (idx >= V)).any()):
            bad = idx[(idx < 0) | (idx >= V)][0].item()
            raise ValueError(f"token id {bad} is outside the vocabulary: this model has "
                             f"vocab_size={V}, so ids must be in 0..{V - 1}; encode the text with "
                             "the vocabulary the model was trained with")

    def _forward(self, idx: torch.Tensor, cache: KVCache | None, need_weights: bool
                 ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        if not _compiling():
            self._check_ids(idx)
        B, T = idx.shape
        start = cache.length if cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens is longer than block_size "
                             f"{self.config.block_size}; crop the context")
        pos = torch.arange(start, start + T, device=idx.device)        # (T,)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))           # (B, T, C)
        maps = []
        for layer, block in enumerate(self.blocks):
            x, weights = block(x, cache, layer, need_weights)          # (B, T, C)
            if need_weights:
                maps.append(weights)
        return self.lm_head(self.ln_f(x)), maps                         # (B, T, vocab_size)

    def forward(self, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Logits ``(B, T, vocab_size)`` for token ids ``(B, T)``; with a ``cache``, ``idx`` are the
        tokens after those already cached (one at a time once the cache is filled)."""
        return self._forward(idx, cache, need_weights=False)[0]

    @torch.no_grad()
    def attention_maps(self, idx: torch.Tensor) -> list[torch.Tensor]:
        """The attention weights of every layer, each ``(B, H, T, T)``, for ``idx`` ``(B, T)``."""
        return self._forward(idx, None, need_weights=True)[1]


def num_parameters(model: nn.Module) -> int:
    """The number of distinct trainable numbers (a tied matrix counts once)."""
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------ loss

def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    r"""Teacher-forced next-token cross-entropy, in nats per token:

    .. math:: J_\text{LM} = -\frac{1}{B T} \sum_{b=1}^{B} \sum_{t=1}^{T}
              \log \mathrm{softmax}(z_{b,t})_{y_{b,t}}

    where ``z_{b,t}`` are the logits at position ``t`` (computed from the true tokens up
    to ``t``) and ``y_{b,t}`` the true next token. Computed in float32 even under autocast.

    Args:
        logits: ``(B, T, vocab_size)``; targets: ``(B, T)`` int64.
    """
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match targets {tuple(targets.shape)}")
    return F.cross_entropy(_at_least_fp32(logits.reshape(-1, logits.shape[-1])), targets.reshape(-1))


# ------------------------------------------------------------------------ training

def lr_at(step: int, config: TrainConfig) -> float:
    r"""The learning rate at optimisation step ``step`` (0-based): a linear warm-up to
    ``lr`` over ``warmup_steps``, then a cosine decay to ``min_lr`` at ``steps``:

    .. math:: \eta_s = \eta_{\min} + \tfrac12 (\eta - \eta_{\min})
              \left(1 + \cos \frac{\pi (s - s_w)}{S - s_w}\right), \quad s_w \le s \le S.
    """
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    span = max(1, config.steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    return config.min_lr + 0.5 * (config.lr - config.min_lr) * (1 + math.cos(math.pi * progress))


def configure_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on the matrices (linear weights, embeddings) only; biases
    and layer-norm gains are not decayed."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2))


def make_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig
                   ) -> torch.optim.lr_scheduler.LambdaLR:
    """A scheduler that sets the learning rate of :func:`lr_at` before every step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(s, config) / config.lr)



def make_train_step(model: nn.Module, optimizer: torch.optim.Optimizer, *,
                    device: torch.device | str = "cpu", generator: torch.Generator | None = None,
                    amp: bool = True, scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
                    grad_clip: float = 1.0):
    r"""A step function for :func:`genart_utils.training.train`.

    It takes a batch ``(x, y)`` of ``(B, T)`` token ids, does one optimisation step on
    :math:`J_\text{LM}` (:func:`lm_loss`, under :func:`runtime.autocast` when ``amp``, with
    a gradient scaler for fp16), clips the global gradient norm to ``grad_clip`` (0: no
    clipping), then advances ``scheduler`` (e.g. :func:`make_scheduler`) if given. It
    returns ``{"loss": nats per token, "lr": learning rate used}``.

    Dropout is a step's only randomness: with ``config.dropout > 0`` and a ``generator``,
    each step's masks are drawn from a seed taken from ``generator`` (the global RNG is left
    as it was), so saving ``generator.get_state()`` with the model, optimiser, scheduler and
    history resumes a run exactly. The batches are the caller's (for example
    :func:`genart_utils.text.random_windows` with ``start=history.step``).
    """
    device = torch.device(device)
    scaler = runtime.grad_scaler(device, enabled=amp)
    config = getattr(model, "config", None)
    dropout = getattr(config, "dropout", 0.0)

    def step(batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, float]:
        x, y = (t.to(device, non_blocking=True) for t in batch)
        model.train()
        lr = optimizer.param_groups[0]["lr"]
        # the dropout masks' seed comes from ``generator``, so they depend on nothing else
        noise = (runtime.seeded(int(torch.randint(0, 2**62, (), generator=generator,
                                                  device=generator.device)), device)
                 if generator is not None and dropout > 0 else contextlib.nullcontext())
        with noise, runtime.autocast(device, enabled=amp):
            logits = model(x)                                          # (B, T, vocab_size)
        loss = lm_loss(logits, y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if grad_clip > 0:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        scaler.step(optimizer)
        scaler.update()
        if scheduler is not None:
            scheduler.step()
        return {"loss": loss.item(), "lr": lr}

    return step


def maybe_compile(model: nn.Module, device: torch.device, enabled: bool = True) -> nn.Module:
    """``torch.compile(model)`` on CUDA (where it pays off), the model itself elsewhere.

    The compiled module shares its parameters with ``model``; keep using ``model`` for
    generation, checkpoints and attention maps.
    """
    if enabled and device.type == "cuda" and hasattr(torch, "compile"):
        return torch.compile(model)
    return model


# ------------------------------------------------------------------------ evaluation


@torch.no_grad()
def token_log_probs(model: GPT, ids: torch.Tensor, stride: int | None = None,
                    batch_size: int = 32, amp: bool = True) -> torch.Tensor:
    """``log p(x_i | x_<i)`` in nats for positions ``i = 1 .. N-1`` of a stream ``(N,)``.

    Streams longer than the context are read in windows of ``block_size`` tokens that
    start every ``stride`` tokens (default ``block_size // 2``); each position is scored
    once, in the first window where it has at least ``block_size - stride`` tokens of
    context (fewer only at the very start). Returns float64 ``(N - 1,)``.
    """
    T = model.config.block_size
    if stride is None:
        stride = max(1, T // 2)
    if not runtime.is_int(stride) or not 1 <= stride <= T:
        raise ValueError(f"stride must be an int in 1..block_size ({T}) or None for "
                         f"block_size // 2, got {stride!r}")
    _check_int("batch_size", batch_size, 1)
    if ids.ndim != 1 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ValueError(f"ids must be one stream of integer token ids, shape (N,), got shape "
                         f"{tuple(ids.shape)} and dtype {ids.dtype}")
    device = next(model.parameters()).device
    ids = ids.to(torch.long)
    N = len(ids)
    if N < 2:
        raise ValueError("need at least 2 tokens to score")
    model._check_ids(ids[None])          # before any window: a clear error, not a partial result
    was_training = model.training
    model.eval()
    out = torch.empty(N - 1, dtype=torch.float64)
    # Window starts: 0, stride, 2 stride, ... until a window reaches the last token.
    starts = [0]
    while starts[-1] + T < N - 1:
        starts.append(starts[-1] + stride)
    jobs = []                       # (start, length, first position to keep)
    done = 0                        # positions 1..done are scored
    for s in starts:
        length = min(T, N - 1 - s)
        jobs.append((s, length, done + 1))
        done = s + length
    for same_length in (True, False):
        group = [j for j in jobs if (j[1] == T) == same_length]
        for a in range(0, len(group), batch_size):
            chunk = group[a:a + batch_size]
            L = chunk[0][1]
            x = torch.stack([ids[s:s + L] for s, _, _ in chunk]).to(device)       # (b, L)
            y = torch.stack([ids[s + 1:s + L + 1] for s, _, _ in chunk]).to(device)
            with runtime.autocast(device, enabled=amp):
                logits = model(x)                                                  # (b, L, vocab_size)
            logp = torch.log_softmax(_at_least_fp32(logits), -1).gather(-1, y[..., None])[..., 0]
            logp = logp.double().cpu()
            for row, (s, _, keep) in zip(logp, chunk):
                # position i = s + 1 + j; keep those with i >= keep
                j0 = keep - (s + 1)
                out[keep - 1:s + L] = row[j0:]
    model.train(was_training)
    return out


def evaluate_nll(model: GPT, ids: torch.Tensor, **kwargs) -> float:
    """Average negative log-likelihood in nats per token over positions ``1 .. N-1``."""
    return float(-token_log_probs(model, ids, **kwargs).mean())


# ------------------------------------------------------------------------ generation

@torch.no_grad()
def generate(model: GPT, prompt: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None,
             generator: torch.Generator | None = None, stop: Sequence[int] | None = None,
             amp: bool = True) -> torch.Tensor:
    """Continue ``prompt`` ``(B, T0)`` (or ``(T0,)``) by up to ``max_new_tokens`` tokens.

    Each new token comes from :func:`genart_utils.sampling.sample` (``temperature = 0`` is
    greedy decoding). Keys and values are cached, so each step costs one token's forward
    pass; when the context fills ``block_size``, generation continues from the last
    ``block_size // 2`` tokens. With ``stop`` (a token sequence), generation ends early once
    every row has produced it after the prompt.

    Returns:
        ``(B, T0 + n_new)`` token ids (or ``(T0 + n_new,)`` for a 1-D prompt), where
        ``n_new <= max_new_tokens``; rows that stopped early keep going until all have
        stopped, so cut each row at its stop sequence.
    """
    _check_int("max_new_tokens", max_new_tokens, 0)
    sampling.check_temperature(temperature)
    if top_k is not None:
        sampling.check_top_k(top_k)
    if top_p is not None:
        sampling.check_top_p(top_p)
    squeeze = prompt.ndim == 1
    idx = prompt[None] if squeeze else prompt
    if idx.ndim != 2 or idx.shape[1] < 1:
        raise ValueError(f"the prompt must be token ids of shape (T0,) or (B, T0) with T0 >= 1, "
                         f"got shape {tuple(prompt.shape)}")
    model._check_ids(idx)
    device = next(model.parameters()).device
    idx = idx.to(device)
    T = model.config.block_size
    was_training = model.training
    model.eval()
    stop_t = torch.tensor(list(stop), device=device) if stop else None
    finished = torch.zeros(idx.shape[0], dtype=torch.bool, device=device)

    def prime(context: torch.Tensor) -> tuple[KVCache, torch.Tensor]:
        cache = KVCache(model.config.n_layer)
        with runtime.autocast(device, enabled=amp):
            logits = model(context[:, -T:], cache)
        return cache, _at_least_fp32(logits[:, -1])

    cache, logits = prime(idx)
    T0 = idx.shape[1]
    for _ in range(max_new_tokens):
        nxt = sampling.sample(logits, temperature, top_k, top_p, generator)   # (B,)
        idx = torch.cat([idx, nxt[:, None]], dim=1)
        if stop_t is not None and idx.shape[1] - T0 >= len(stop_t):
            finished |= (idx[:, -len(stop_t):] == stop_t).all(dim=1)
            if bool(finished.all()):
                break
        if cache.length + 1 > T:
            cache, logits = prime(idx[:, -(T // 2):])
        else:
            with runtime.autocast(device, enabled=amp):
                logits = _at_least_fp32(model(nxt[:, None], cache)[:, -1])
    model.train(was_training)
    return idx[0] if squeeze else idx


def next_log_probs_fn(model: GPT, amp: bool = True):
    """``seqs (N, t) -> (N, vocab_size)`` next-token log-probabilities of ``model`` (the last
    ``block_size`` tokens are used): the interface of :func:`sampling.beam_search`."""
    device = next(model.parameters()).device
    T = model.config.block_size

    @torch.no_grad()
    def fn(seqs: torch.Tensor) -> torch.Tensor:
        model.eval()
        with runtime.autocast(device, enabled=amp):
            logits = model(seqs[:, -T:].to(device))[:, -1]
        return torch.log_softmax(_at_least_fp32(logits), dim=-1)

    return fn


def cached_next_log_probs_fn(model: GPT, amp: bool = True):
    """:func:`next_log_probs_fn` with a key/value cache, for :func:`sampling.beam_search`.

    When every sequence of a call extends a sequence of the previous call by one token
    (as the beams of a beam search do), the cached keys and values are reordered to follow
    each sequence's parent and only the new token is run through the model; otherwise the
    cache is rebuilt from the sequences. As in :func:`generate`, once the context is full
    the cache restarts from the last ``block_size // 2`` tokens.
    """
    device = next(model.parameters()).device
    T = model.config.block_size
    state: dict = {"seqs": None, "cache": None}

    @torch.no_grad()
    def fn(seqs: torch.Tensor) -> torch.Tensor:
        model.eval()
        seqs = seqs.to(device)
        prev, cache = state["seqs"], state["cache"]
        parents = None
        if (prev is not None and seqs.shape[1] == prev.shape[1] + 1
                and cache.length + 1 <= T):
            match = (seqs[:, None, :-1] == prev[None]).all(-1)           # (N, N_prev)
            if bool(match.any(dim=1).all()):
                parents = match.float().argmax(dim=1)                     # (N,)
        with runtime.autocast(device, enabled=amp):
            if parents is None:
                cache = KVCache(model.config.n_layer)
                context = seqs if seqs.shape[1] <= T else seqs[:, -(T // 2):]
                logits = model(context, cache)[:, -1]
            else:
                cache.keys = [k[parents] for k in cache.keys]
                cache.values = [v[parents] for v in cache.values]
                logits = model(seqs[:, -1:], cache)[:, -1]
        state["seqs"], state["cache"] = seqs, cache
        return torch.log_softmax(_at_least_fp32(logits), dim=-1)

    return fn


# ------------------------------------------------------------------------ text in, text out

def generate_texts(model: GPT, vocab, prompts: Sequence[str], max_new_tokens: int, *,
                   stop: str | None = "\n\n", temperature: float = 1.0, top_k: int | None = None,
                   top_p: float | None = None, seed: int = 0, amp: bool = True, constrain: bool = False,
                   return_log_kept: bool = False) -> list[str] | tuple[list[str], list[float]]:
    """Continue each prompt with :func:`generate`; return the continuations (without the
    prompt), each cut just after the first ``stop`` (for ABC, the blank line ending a tune).

    ``vocab`` is a :class:`genart_utils.text.CharVocab` or
    :class:`genart_utils.text.MusicVocab`. Prompts that encode to the same number of tokens
    are generated together as one batch; all draws come from one ``torch.Generator`` seeded
    with ``seed``, so the same call always returns the same texts.

    With ``constrain``, every step is drawn under a
    :class:`genart_utils.sampling.MetreConstraint` (each prompt must then hold an ``M:``
    header line), through :func:`genart_utils.sampling.generate` with this model's cached
    next-token function; without it, the draws are exactly those of :func:`generate`.
    With ``return_log_kept``, the result is ``(texts, log_kept)``, where ``log_kept[i]`` is
    the sum over the steps of the log of the probability mass the constraint kept, in nats
    (0.0 without the constraint).
    """
    generator = torch.Generator().manual_seed(operator.index(seed))   # NumPy ints too
    encoded = [vocab.encode(p) for p in prompts]
    by_length: dict[int, list[int]] = {}
    for i, ids in enumerate(encoded):
        by_length.setdefault(len(ids), []).append(i)
    stop_ids = vocab.encode(stop).tolist() if stop else None
    out: list[str] = [""] * len(prompts)
    kept: list[float] = [0.0] * len(prompts)
    for length in sorted(by_length):
        rows = by_length[length]
        batch = torch.stack([encoded[i] for i in rows])                           # (b, T0)
        if constrain:
            _check_int("max_new_tokens", max_new_tokens, 0)
            constraint = sampling.MetreConstraint(vocab.token_texts, [prompts[i] for i in rows])
            result = sampling.generate(cached_next_log_probs_fn(model, amp), batch, max_new_tokens,
                                       temperature=temperature, top_k=top_k, top_p=top_p,
                                       generator=generator, stop=stop_ids, constraint=constraint)
            for r, i in enumerate(rows):
                n = int(result.n_steps[r])
                out[i] = _cut(vocab.decode(result.sequences[r, length:length + n]), stop)
                kept[i] = float(result.log_kept[r])
        else:
            seqs = generate(model, batch, max_new_tokens, temperature, top_k, top_p, generator,
                            stop=stop_ids, amp=amp)
            for i, seq in zip(rows, seqs):
                out[i] = _cut(vocab.decode(seq[length:]), stop)
    return (out, kept) if return_log_kept else out


def beam_search_texts(model: GPT, vocab, prompts: Sequence[str], steps: int, beam_width: int, *,
                      stop: str | None = "\n\n", amp: bool = True) -> list[str]:
    """The best beam of :func:`sampling.beam_search` (``steps`` tokens, cached model calls)
    after each prompt, cut just after the first ``stop``. Deterministic: no seed."""
    out = []
    for prompt in prompts:
        result = sampling.beam_search(cached_next_log_probs_fn(model, amp), vocab.encode(prompt),
                                      steps, beam_width)
        out.append(_cut(vocab.decode(result.sequences[0, len(prompt):]), stop))
    return out


def _cut(text: str, stop: str | None) -> str:
    if stop and stop in text:
        return text[:text.index(stop) + len(stop)]
    return text


# ------------------------------------------------------------------------ train once, then load


def folk_train_config(sizes: dict, width: int, seed: int = 0) -> TrainConfig:
    """Notebook 07's training recipe for a model of width ``width`` (``C``): ``sizes["steps"]``
    steps of ``sizes["batch_size"]`` windows, peak learning rate ``0.75 / C`` (the book's
    choice, not tuned), decaying to a tenth of it, warm-up over the first 5% of the steps."""
    peak_lr = 0.75 / width
    return TrainConfig(steps=sizes["steps"], batch_size=sizes["batch_size"], lr=peak_lr, min_lr=peak_lr / 10,
                       warmup_steps=max(1, sizes["steps"] // 20), seed=seed)


def matched_music_vocab(train_texts: Sequence[str], reference: GPTConfig, width: int,
                        min_count: int = 2):
    """A :class:`~genart_utils.text.MusicVocab` of ``train_texts`` and a config of width
    ``width`` (otherwise ``reference``'s shape) whose parameter count is as close as the
    vocabulary allows to that of ``reference``.

    A GPT has ``n_layer (12 C^2 + 13 C) + (|V| + T_max) C + 2C`` parameters, so each token
    costs ``C``; the vocabulary keeps every character and the 256 byte tokens, and as many of
    the most frequent longer pieces (seen at least ``min_count`` times) as the budget allows.

    Returns:
        ``(vocab, config)``.
    """
    from . import text as text_module

    _check_int("width", width, 1)
    full = text_module.MusicVocab.from_texts(train_texts, min_count=min_count)
    n_single = sum(len(t) == 1 for t in full.tokens)
    shape = dataclasses.replace(reference, vocab_size=1, n_embd=width)
    body = num_parameters(GPT(shape)) - width                   # everything but the token table
    target = round((num_parameters(GPT(reference)) - body) / width)
    n_pieces = min(len(full.tokens) - n_single, max(0, target - n_single - 256))
    vocab = text_module.MusicVocab.from_texts(train_texts, min_count=min_count, max_pieces=n_pieces)
    return vocab, dataclasses.replace(shape, vocab_size=vocab.size)



@dataclass(frozen=True)
class FolkModel:
    """What :func:`train_folk_model` returns."""

    model: GPT                   # the best weights by monitored validation, in eval mode
    history: Any                 # training.History: batch losses and monitored valid_bits
    seconds: float               # wall time of the training run (as measured when it ran)
    path: Any                    # pathlib.Path of the checkpoint
    loaded: bool                 # True when the checkpoint was loaded instead of trained


def _fingerprint(*texts: str) -> str:
    import hashlib

    digest = hashlib.sha256()
    for t in texts:
        digest.update(t.encode("utf-8"))
        digest.update(b"\0")
    return digest.hexdigest()


def chars_scored(vocab, text_: str) -> int:
    """The characters whose tokens :func:`token_log_probs` scores in ``text_``: all but those
    of the first token (which has no context)."""
    first = vocab.decode(vocab.encode(text_)[:1])
    return len(text_) - len(first)


def bits_per_char(model: GPT, vocab, text_: str, batch_size: int = 64) -> float:
    r"""Bits per character of ``text_`` under ``model`` for either tokeniser:
    :math:`-\sum_i \log_2 p(x_i \mid x_{<i}) / n_\text{chars}`, the total cost of the tokens
    (all but the first) divided by the characters they spell (:func:`chars_scored`)."""
    lp = token_log_probs(model, vocab.encode(text_), batch_size=batch_size)
    return float(-lp.sum() / math.log(2) / chars_scored(vocab, text_))


def train_folk_model(vocab, train_text: str, monitor_text: str, model_config: GPTConfig,
                     train_config: TrainConfig, *, name: str, eval_every: int,
                     device: torch.device | str | None = None, progress: bool = True,
                     retrain: bool = False, path: str | os.PathLike | None = None) -> FolkModel:
    """Train a GPT on ``train_text`` with notebook 07's recipe, or load it if it was trained.

    The recipe: AdamW (:func:`configure_optimizer`), the warm-up and cosine schedule of
    :func:`make_scheduler`, gradient clipping, batches of random windows of the token
    stream (:func:`genart_utils.text.random_windows` with ``train_config.seed``); every
    ``eval_every`` steps the bits per character of ``monitor_text`` (:func:`bits_per_char`)
    are logged as ``valid_bits`` and :func:`genart_utils.training.keep_best` saves the
    weights when they are the best so far. At the end the best weights are reloaded and
    saved again, atomically, with the history, the training time and what they were trained
    on, in the checkpoint ``name`` (:func:`genart_utils.training.checkpoint_path`), or at
    ``path`` when it is given (``name`` then only labels the progress bar).

    If that checkpoint exists, finished, and was trained with the same model config, train
    config, ``eval_every``, vocabulary and texts, it is loaded (``weights_only=True``)
    instead, unless ``retrain``. ``vocab`` is a :class:`~genart_utils.text.CharVocab` or a
    :class:`~genart_utils.text.MusicVocab`; its size must be ``model_config.vocab_size``.
    """
    from . import text as text_module

    if model_config.vocab_size != vocab.size:
        raise ValueError(f"model_config.vocab_size ({model_config.vocab_size}) is not the size of the "
                         f"vocabulary ({vocab.size}); build the config with vocab_size=vocab.size")
    _check_int("eval_every", eval_every, 1)
    device = runtime.get_device() if device is None else torch.device(device)
    path = training.checkpoint_path(name) if path is None else Path(path)
    key = {"train_config": dataclasses.asdict(train_config), "eval_every": int(eval_every),
           "vocab": list(vocab.token_texts), "data": _fingerprint(train_text, monitor_text)}
    model = GPT(model_config).to(device)
    if path.is_file() and not retrain:
        try:
            checkpoint = training.load_checkpoint(path, {"model": model}, config_type=GPTConfig,
                                                  map_location=device)
            if checkpoint.config == model_config and checkpoint.extra.get("complete") \
                    and all(checkpoint.extra.get(k) == v for k, v in key.items()):
                return FolkModel(model.eval(), checkpoint.history, float(checkpoint.extra["seconds"]),
                                 path, True)
        except (training.CheckpointError, TypeError, KeyError):
            pass                                  # another run's file: train and replace it
        model = GPT(model_config).to(device)      # fresh weights, as if nothing had been loaded
    train_ids = vocab.encode(train_text)
    monitor = monitor_text

    optimizer = configure_optimizer(model, train_config)
    step = make_train_step(maybe_compile(model, device), optimizer, device=device,
                           scheduler=make_scheduler(optimizer, train_config),
                           grad_clip=train_config.grad_clip)

    def validate(step_number: int, history) -> None:
        history.log(step_number, {"valid_bits": bits_per_char(model, vocab, monitor)})

    callbacks = [training.every(eval_every, validate),
                 training.keep_best(path, {"model": model}, "valid_bits", config=model_config,
                                    extra={**key, "complete": False})]
    batches = text_module.random_windows(train_ids, model_config.block_size, train_config.batch_size,
                                         seed=train_config.seed)
    with runtime.timer() as clock:
        history = training.train(step, batches, train_config.steps, callbacks=callbacks,
                                 progress=progress, desc=f"GPT {name}")
    if "valid_bits" not in history.records:     # fewer steps than eval_every: keep the last weights
        validate(history.step, history)
        training.save_checkpoint(path, {"model": model}, config=model_config, history=history,
                                 extra={**key, "complete": False, "step": history.step})
    best = GPT(model_config).to(device)
    saved = training.load_checkpoint(path, {"model": best}, config_type=GPTConfig, map_location=device)
    training.save_checkpoint(path, {"model": best}, config=model_config, history=history,
                             extra={**key, "complete": True, "seconds": float(clock["seconds"]),
                                    "step": int(saved.extra["step"])})
    return FolkModel(best.eval(), history, float(clock["seconds"]), path, False)


# ------------------------------------------------------------------------ the recipe, for shipping

@dataclass(frozen=True)
class FolkRecipe:
    """Everything that decides notebook 07's folk-tune model: the data (which tunes, the
    split, the monitored validation tunes, the tokeniser), the network and its training.
    :func:`train_recipe` turns it into weights with :func:`train_folk_model`, the notebook's
    own code, and :mod:`genart_utils.shipped` ships the weights of the cpu profile's recipe
    (:func:`folk_recipe`).

    ``steps`` is ``train.steps``: left out (``None``) it is read from ``train``; given (as in
    ``dataclasses.replace(recipe, steps=n)``) it sets ``train.steps``. The warm-up and the
    cosine decay stay as ``train`` says, so, unlike a diffusion recipe, a shorter run is not
    the start of a longer one. The weights a run keeps are the best by monitored validation,
    which may come from an earlier step than the last (``extra["best_step"]`` of the
    checkpoint that :func:`train_recipe` writes).
    """

    model: GPTConfig                 # the network; vocab_size is the size of the corpus vocabulary
    train: TrainConfig               # optimisation (folk_train_config: peak lr 0.75 / C)
    eval_every: int                  # steps between validations (each may keep the best weights)
    max_tunes: int | None = None     # a seeded random subset of the tunes (smoke runs); None: all
    monitor_every: int = 1           # validation is monitored on every n-th validation tune
    valid_fraction: float = 0.05     # share of the tunes held out for validation
    split_seed: int = 0              # seed of the subset and of the split (text.load_corpus's seed)
    vocabulary: str = "chars"        # the tokeniser: "chars", every character of the corpus (text.CharVocab)
    steps: int | None = None         # optimisation steps; None: train.steps (see above)

    def __post_init__(self) -> None:
        runtime.check_parts(self, model=GPTConfig, train=TrainConfig)
        if self.steps is None:
            object.__setattr__(self, "steps", self.train.steps)
        runtime.check_fields(self, positive_ints=("eval_every", "monitor_every", "steps"),
                             nonneg_ints=("split_seed",), positive_floats=("valid_fraction",),
                             half_open_unit=("valid_fraction",), choices={"vocabulary": ("chars",)})
        if self.max_tunes is not None:
            _check_int("FolkRecipe.max_tunes (or None: all tunes)", self.max_tunes, 2)
            object.__setattr__(self, "max_tunes", int(self.max_tunes))
        if self.train.steps != self.steps:
            object.__setattr__(self, "train", dataclasses.replace(self.train, steps=self.steps))


def folk_recipe(sizes: dict, vocab_size: int) -> FolkRecipe:
    """Notebook 07's recipe for one profile's sizes (a value of :data:`FOLK_SIZES`) and the
    size of the corpus vocabulary (``corpus.vocab.size``): a GPT with fused attention and
    weight seed 0, trained with :func:`folk_train_config`, validated every
    ``sizes["eval_every"]`` steps on every ``sizes["monitor_every"]``-th validation tune."""
    model = GPTConfig(vocab_size=vocab_size, block_size=sizes["block_size"], n_layer=sizes["n_layer"],
                      n_head=sizes["n_head"], n_embd=sizes["n_embd"], attention="sdpa", seed=0)
    return FolkRecipe(model, folk_train_config(sizes, model.n_embd), eval_every=sizes["eval_every"],
                      max_tunes=sizes["max_tunes"], monitor_every=sizes["monitor_every"])


def folk_data(recipe: FolkRecipe):
    """The recipe's data: ``(corpus, monitor_text)``, the folk tunes split into training and
    validation (:func:`genart_utils.text.load_corpus`) and the validation tunes that are
    monitored during training, as one text (every ``monitor_every``-th, blank-line separated)."""
    from . import text as text_module

    corpus = text_module.load_corpus("folk", valid_fraction=recipe.valid_fraction, seed=recipe.split_seed,
                                     max_documents=recipe.max_tunes)
    return corpus, "\n".join(corpus.valid[:: recipe.monitor_every])


def train_recipe(recipe: FolkRecipe, checkpoint: str | os.PathLike, *, device: torch.device | str | None = None,
                 progress: bool = True) -> FolkModel:
    """Train ``recipe`` on its own data (:func:`folk_data`) with :func:`train_folk_model` and
    save the kept weights (the best by monitored validation) at ``checkpoint``, as a
    checkpoint of the recipe: config ``recipe``, the weights under ``"model"``, the whole
    training history, and in ``extra`` the step of the weights (``best_step``), the training
    time (``seconds``), the vocabulary and a fingerprint of the texts.

    While it trains, :func:`train_folk_model` keeps its own checkpoint beside it (the name
    with ``-run`` before the suffix; removed at the end). A finished run found there is
    loaded rather than trained again; :func:`genart_utils.shipped.load_or_train` is the way
    to reuse a finished checkpoint of the recipe.
    """
    if not isinstance(recipe, FolkRecipe):
        raise TypeError(f"recipe must be a gpt.FolkRecipe, got {type(recipe).__name__}")
    checkpoint = Path(checkpoint)
    run_path = checkpoint.with_name(f"{checkpoint.stem}-run{checkpoint.suffix}")
    corpus, monitor_text = folk_data(recipe)
    train_text = corpus.text("train")
    folk = train_folk_model(corpus.vocab, train_text, monitor_text, recipe.model, recipe.train, name=checkpoint.name,
                            eval_every=recipe.eval_every, device=device, progress=progress, path=run_path)
    run = training.load_checkpoint(run_path)
    training.save_checkpoint(checkpoint, {"model": folk.model}, config=recipe, history=folk.history,
                             extra={"best_step": int(run.extra["step"]), "seconds": folk.seconds,
                                    "vocab": list(corpus.vocab.token_texts),
                                    "data": _fingerprint(train_text, monitor_text)})
    run_path.unlink()
    return dataclasses.replace(folk, path=checkpoint)
