"""Decoding strategies: the filters keep exactly what they promise, greedy is the limit of
sampling, and beam search is an exact search when its beam is wide enough."""

import itertools
import math

import numpy as np
import pytest
import torch

from genart_utils import gpt, sampling




def kept(logits: torch.Tensor) -> set[int]:
    return set(torch.nonzero(torch.isfinite(logits)).flatten().tolist())


def test_top_k_keeps_exactly_k_and_breaks_ties_by_token_id():
    logits = torch.tensor([1.0, 3.0, 3.0, 2.0, 3.0, -1.0])
    assert kept(sampling.top_k_filter(logits, 1)) == {1}
    assert kept(sampling.top_k_filter(logits, 2)) == {1, 2}
    assert kept(sampling.top_k_filter(logits, 4)) == {1, 2, 3, 4}
    assert kept(sampling.top_k_filter(logits, 99)) == set(range(6))
    # kept values are unchanged, and every row of a batch keeps exactly k
    out = sampling.top_k_filter(logits, 3)
    assert torch.equal(out[[1, 2, 4]], logits[[1, 2, 4]])
    batch = torch.randint(0, 3, (50, 7)).float()          # many ties
    for k in range(1, 8):
        assert (torch.isfinite(sampling.top_k_filter(batch, k)).sum(-1) == k).all()


def test_top_p_keeps_the_smallest_set_that_reaches_p():
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        logits = torch.randn(6, generator=g, dtype=torch.float64) * 2
        probs = torch.softmax(logits, -1)
        p = float(torch.rand((), generator=g, dtype=torch.float64).clamp(min=1e-3))
        keep = kept(sampling.top_p_filter(logits, p))
        mass = float(probs[list(keep)].sum())
        assert len(keep) >= 1 and mass >= p - 1e-12
        # brute force: no set with one token fewer reaches p
        smaller = [s for s in itertools.combinations(range(6), len(keep) - 1)
                   if float(probs[list(s)].sum()) >= p]
        assert not smaller
    # a tiny p keeps only the most likely token; p = 1 keeps all
    logits = torch.tensor([0.1, 2.0, 0.3])
    assert kept(sampling.top_p_filter(logits, 1e-9)) == {1}
    assert kept(sampling.top_p_filter(logits, 1.0)) == {0, 1, 2}


def test_top_p_one_keeps_every_token_with_nonzero_probability():
    # In float64 the head's probability rounds to 1, so the cumulative mass reaches 1
    # before the tail is added; the tail's probabilities (about 4e-18) are still non-zero.
    logits = torch.tensor([0.0, -40.0, -45.0, float("-inf")], dtype=torch.float64)
    probs = torch.softmax(logits, -1)
    assert (probs[:3] > 0).all() and probs[0] == 1.0
    assert kept(sampling.top_p_filter(logits, 1.0)) == {0, 1, 2}
    assert torch.equal(sampling.top_p_filter(logits, 1.0), logits)     # nothing changes
    g = torch.Generator().manual_seed(0)
    batch = torch.randn(100, 50, generator=g) * 15                     # very uneven rows
    assert torch.isfinite(sampling.top_p_filter(batch, 1.0)).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("temperature", [1e-30, 1e-40, 1e-300, 5e-324])
def test_tiny_temperatures_are_greedy_without_overflow(temperature, dtype):
    g = torch.Generator().manual_seed(2)
    logits = (torch.randn(16, 7, generator=g) * 3).to(dtype)
    logits[:, 0] = float("-inf")                                       # a banned token
    probs = torch.softmax(sampling.apply_temperature(logits, temperature), -1)
    assert torch.isfinite(probs).all()
    assert torch.equal(probs, torch.nn.functional.one_hot(sampling.greedy(logits), 7).to(dtype))
    draws = sampling.sample(logits, temperature=temperature, top_p=0.9, generator=g)
    assert torch.equal(draws, sampling.greedy(logits))
    # tied maxima share the probability equally: the limit of softmax(logits / T)
    tied = torch.tensor([2.0, 5.0, 5.0, 1.0], dtype=dtype)
    assert torch.equal(torch.softmax(sampling.apply_temperature(tied, temperature), -1),
                       torch.tensor([0.0, 0.5, 0.5, 0.0], dtype=dtype))


def test_huge_temperature_is_uniform_over_allowed_tokens():
    logits = torch.tensor([3.0, -2.0, float("-inf"), 0.5])
    probs = torch.softmax(sampling.apply_temperature(logits, 1e300), -1)
    assert torch.allclose(probs, torch.tensor([1 / 3, 1 / 3, 0.0, 1 / 3]))


@pytest.mark.parametrize("temperature", [float("inf"), float("nan"), -1e-9, "1.0", None])
def test_temperatures_outside_the_valid_range_are_refused(temperature):
    for call in (lambda: sampling.sample(torch.zeros(3), temperature=temperature),
                 lambda: sampling.Decoding("t", temperature=temperature)):
        with pytest.raises(ValueError, match=r"temperature must be a finite number >= 0"):
            call()


@pytest.mark.parametrize("field", ["temperature", "top_k", "top_p", "beam_width"])
def test_booleans_are_refused_for_every_decoding_setting(field):
    with pytest.raises(ValueError, match=field):
        sampling.Decoding("flag", **{field: True})
    with pytest.raises(ValueError, match=field):
        sampling.Decoding("flag", **{field: np.True_})


def test_numpy_numbers_are_accepted_and_stored_as_python_numbers():
    d = sampling.Decoding("np", temperature=np.float32(0.5), top_k=np.int64(3), top_p=np.float64(0.9))
    assert (d.temperature, d.top_k, d.top_p) == (0.5, 3, 0.9)
    assert type(d.temperature) is float and type(d.top_k) is int and type(d.top_p) is float
    beam = sampling.Decoding("beam", beam_width=np.int32(4))
    assert beam.beam_width == 4 and type(beam.beam_width) is int and beam.is_search
    logits = torch.tensor([0.0, 3.0, 2.0, 1.0])
    assert kept(sampling.top_k_filter(logits, np.int64(2))) == {1, 2}
    assert kept(sampling.top_p_filter(logits, np.float64(1e-6))) == {1}
    draws = sampling.sample(logits.expand(200, 4), temperature=np.float64(1.0), top_k=np.int64(2),
                            generator=torch.Generator().manual_seed(0))
    assert set(draws.tolist()) == {1, 2}


def test_temperature_to_zero_is_greedy():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(64, 10, generator=g)
    best = sampling.greedy(logits)
    assert torch.equal(sampling.sample(logits, temperature=0), best)
    for seed in range(5):
        draws = sampling.sample(logits, temperature=1e-4, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(draws, best)
    # and at temperature 1 the draws do differ from greedy somewhere
    draws = sampling.sample(logits, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(draws, best)


def test_sampling_with_the_same_generator_seed_is_reproducible():
    logits = torch.randn(8, 5)
    a = sampling.sample(logits, top_p=0.9, generator=torch.Generator().manual_seed(3))
    b = sampling.sample(logits, top_p=0.9, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


@pytest.mark.parametrize("call, message", [
    (lambda l: sampling.top_p_filter(l, 0.0), "top_p"),
    (lambda l: sampling.top_p_filter(l, 1.5), "top_p"),
    (lambda l: sampling.top_k_filter(l, 0), "top_k"),
    (lambda l: sampling.sample(l, temperature=-0.5), "temperature"),
    (lambda l: sampling.sample(l, top_k=0), "top_k"),
    (lambda l: sampling.sample(l, top_p=-0.1), "top_p"),
    (lambda l: sampling.apply_temperature(l, 0.0), "greedy"),
    (lambda l: sampling.Decoding("bad", beam_width=0), "beam_width"),
    (lambda l: sampling.beam_search(lambda x: l, torch.tensor([0]), 2, beam_width=True), "beam_width"),
    (lambda l: sampling.sample(l, top_p=True), "top_p"),
])
def test_invalid_arguments_raise_clear_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call(torch.zeros(4))


def tiny_model(vocab: int = 3, seed: int = 5) -> gpt.GPT:
    config = gpt.GPTConfig(vocab_size=vocab, block_size=8, n_layer=1, n_head=2, n_embd=8, seed=seed)
    model = gpt.GPT(config).double().eval()
    with torch.no_grad():                       # larger weights: conditionals far from uniform
        for p in model.parameters():
            p.mul_(5.0)
    return model


def test_beam_width_one_is_greedy_decoding():
    model = tiny_model(vocab=5)
    prefix = torch.tensor([2, 0])
    result = sampling.beam_search(gpt.next_log_probs_fn(model), prefix, steps=6, beam_width=1)
    greedy = gpt.generate(model, prefix, 6, temperature=0)
    assert torch.equal(result.sequences[0], greedy)


def test_wide_beam_finds_the_brute_force_best_sequence():
    prefix = torch.tensor([1])
    steps = 4
    conts = torch.tensor(list(itertools.product(range(3), repeat=steps)))      # (81, 4)
    seqs = torch.cat([prefix.expand(len(conts), 1), conts], dim=1)             # (81, 5)
    greedy_gaps = []
    for seed in range(8):
        model = tiny_model(vocab=3, seed=seed)
        fn = gpt.next_log_probs_fn(model)
        # brute force: score all 3**4 continuations by the sum of their log-conditionals
        with torch.no_grad():
            logp = torch.log_softmax(model(seqs[:, :-1]).double(), -1)         # (81, 4, 3)
        scores = logp[:, -steps:].gather(-1, conts[..., None])[..., 0].sum(-1)  # (81,)
        best = int(scores.argmax())
        result = sampling.beam_search(fn, prefix, steps, beam_width=3 ** (steps - 1))
        assert torch.equal(result.sequences[0], seqs[best])
        assert math.isclose(float(result.scores[0]), float(scores[best]), abs_tol=1e-9)
        narrow = sampling.beam_search(fn, prefix, steps, beam_width=1)
        assert float(narrow.scores[0]) <= float(scores[best]) + 1e-9
        greedy_gaps.append(float(scores[best]) - float(narrow.scores[0]))
    # the search matters: on some of these models greedy decoding (width 1) ends on a
    # clearly less likely sequence than the exhaustive beam
    assert max(greedy_gaps) > 0.1, greedy_gaps


def test_cached_beam_search_equals_uncached():
    model = tiny_model(vocab=5)
    prefix = torch.tensor([1, 4, 2])
    plain = sampling.beam_search(gpt.next_log_probs_fn(model), prefix, steps=5, beam_width=4)
    cached = sampling.beam_search(gpt.cached_next_log_probs_fn(model), prefix, steps=5, beam_width=4)
    assert torch.equal(plain.sequences, cached.sequences)
    assert torch.allclose(plain.scores, cached.scores, atol=1e-9)
