"""Decoding strategies: the filters keep exactly what they promise, greedy is the limit of
sampling, and beam search is an exact search when its beam is wide enough."""

import itertools
import math

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
    model = tiny_model(vocab=3)
    fn = gpt.next_log_probs_fn(model)
    prefix = torch.tensor([1])
    steps = 4
    # brute force: score all 3**4 continuations by the sum of their log-conditionals
    conts = torch.tensor(list(itertools.product(range(3), repeat=steps)))      # (81, 4)
    seqs = torch.cat([prefix.expand(len(conts), 1), conts], dim=1)             # (81, 5)
    with torch.no_grad():
        logp = torch.log_softmax(model(seqs[:, :-1]).double(), -1)             # (81, 4, 3)
    scores = logp[:, -steps:].gather(-1, conts[..., None])[..., 0].sum(-1)    # (81,)
    best = int(scores.argmax())
    result = sampling.beam_search(fn, prefix, steps, beam_width=3 ** (steps - 1))
    assert torch.equal(result.sequences[0], seqs[best])
    assert math.isclose(float(result.scores[0]), float(scores[best]), abs_tol=1e-9)
    # the search matters on this model: greedy decoding (width 1) ends on a less likely sequence
    narrow = sampling.beam_search(fn, prefix, steps, beam_width=1)
    assert float(narrow.scores[0]) < float(scores[best]) - 0.1


def test_cached_beam_search_equals_uncached():
    model = tiny_model(vocab=5)
    prefix = torch.tensor([1, 4, 2])
    plain = sampling.beam_search(gpt.next_log_probs_fn(model), prefix, steps=5, beam_width=4)
    cached = sampling.beam_search(gpt.cached_next_log_probs_fn(model), prefix, steps=5, beam_width=4)
    assert torch.equal(plain.sequences, cached.sequences)
    assert torch.allclose(plain.scores, cached.scores, atol=1e-9)
