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


# ------------------------------------------------------------------------ constraints

SETTINGS = [(1.0, None, None), (0.7, 5, None), (1.3, None, 0.9), (0.8, 10, 0.8), (0.0, None, None)]


@pytest.mark.parametrize("temperature, top_k, top_p", SETTINGS)
def test_without_a_constraint_sampling_is_exactly_as_before(temperature, top_k, top_p):
    # "Before" is the computation sample() always did: multinomial over
    # softmax(filter_logits(...)) (greedy at temperature 0), with the same generator.
    logits = torch.randn(64, 30, generator=torch.Generator().manual_seed(4)) * 3
    everything = torch.ones_like(logits, dtype=torch.bool)
    for seed in range(3):
        if temperature == 0:
            reference = sampling.greedy(logits)
        else:
            probs = torch.softmax(sampling.filter_logits(logits.float(), temperature, top_k, top_p), -1)
            reference = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(seed))[:, 0]
        plain = sampling.sample(logits, temperature, top_k, top_p, torch.Generator().manual_seed(seed))
        masked = sampling.sample(logits, temperature, top_k, top_p, torch.Generator().manual_seed(seed),
                                 allowed=everything)
        assert torch.equal(plain, reference) and torch.equal(masked, reference)
    # an all-true mask leaves logits and probabilities bit for bit
    assert torch.equal(sampling.mask_logits(logits, everything), logits)
    if temperature:
        assert torch.equal(torch.softmax(sampling.filter_logits(sampling.mask_logits(logits, everything),
                                                                temperature, top_k, top_p), -1),
                           torch.softmax(sampling.filter_logits(logits, temperature, top_k, top_p), -1))


def test_a_mask_renormalises_and_the_filters_act_on_what_it_keeps():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, generator=g, dtype=torch.float64)
    allowed = torch.tensor([True, False, True, True, False, True])
    draws = sampling.sample(logits.expand(40_000, 6), allowed=allowed.expand(40_000, 6), generator=g)
    assert set(draws.tolist()) <= {0, 2, 3, 5}
    # the renormalised model, p(w) [w in A] / Z
    p = torch.softmax(logits, -1)
    expected = torch.where(allowed, p, torch.zeros_like(p)) / p[allowed].sum()
    observed = torch.bincount(draws, minlength=6).double() / len(draws)
    assert (observed - expected).abs().max() < 0.01
    assert math.isclose(float(sampling.log_mass_allowed(logits, allowed)), math.log(float(p[allowed].sum())),
                        rel_tol=1e-12)
    # top-k = 1 after the mask: the most likely allowed token, even if a banned one is likelier
    best_allowed = int(torch.where(allowed, logits, torch.tensor(-math.inf, dtype=torch.float64)).argmax())
    assert int(sampling.sample(logits, top_k=1, allowed=allowed, generator=g)) == best_allowed
    assert int(sampling.sample(logits, temperature=0, allowed=allowed)) == best_allowed


@pytest.mark.parametrize("allowed, message", [
    (torch.ones(3, dtype=torch.bool), "shape"),
    (torch.ones(4), "boolean"),
    (torch.zeros(4, dtype=torch.bool), "allows no token"),
])
def test_bad_masks_are_refused(allowed, message):
    with pytest.raises(ValueError, match=message):
        sampling.sample(torch.zeros(4), allowed=allowed)


def abc_model(seed: int = 0):
    from genart_utils import text

    prompts = ["M:2/4\nL:1/8\nK:G\n", "M:6/8\nL:1/8\nK:D\n", "M:3/4\nL:1/16\nK:C\n", "M:C|\nL:1/8\nK:F\n"]
    vocab = text.CharVocab.from_texts("ABCDEFGabcdefgz2346/ |:]\n>(", *prompts)
    config = gpt.GPTConfig(vocab_size=vocab.size, block_size=32, n_layer=1, n_head=2, n_embd=16, seed=seed)
    return gpt.GPT(config).double().eval(), vocab, prompts


def test_generate_without_a_constraint_is_step_by_step_sampling():
    model, vocab, prompts = abc_model()
    batch = torch.stack([vocab.encode(p) for p in prompts[:2]] * 3)            # same lengths
    fn = gpt.next_log_probs_fn(model)
    out = sampling.generate(fn, batch, 20, temperature=0.9, top_k=8,
                            generator=torch.Generator().manual_seed(7))
    g, seqs = torch.Generator().manual_seed(7), batch
    for _ in range(20):
        seqs = torch.cat([seqs, sampling.sample(fn(seqs), 0.9, 8, None, g)[:, None]], 1)
    assert torch.equal(out.sequences, seqs)
    assert (out.log_kept == 0).all() and (out.n_steps == 20).all()


def test_a_tiny_gpt_under_the_constraint_writes_tunes_whose_bars_fit():
    from genart_utils import music, text

    model, vocab, prompts = abc_model(seed=3)
    fn = gpt.cached_next_log_probs_fn(model)
    tunes, kept = sampling.generate_texts(fn, vocab, prompts, 60, constrain=True, temperature=1.2,
                                          top_p=0.95, seed=0)
    for prompt, tune in zip(prompts, tunes):
        assert music.count_bad_bars(music.bars(prompt + tune)) == 0, tune
    # log_kept is the sum over the steps of log Z: replay the masks and the model's log-probs
    for prompt, tune, k in zip(prompts, tunes, kept):
        replay, ids, total = sampling.MetreConstraint(vocab.token_texts, [prompt]), vocab.encode(prompt + tune), 0.0
        for t in range(len(vocab.encode(prompt)), len(ids)):
            total += float(sampling.log_mass_allowed(fn(ids[None, :t])[0], replay.row_allowed(0)))
            replay.advance([int(ids[t])])
        assert math.isclose(total, k, rel_tol=1e-9, abs_tol=1e-9) and k < 0
    # what the samples cost under the unconstrained model, in bits
    bits = [text.continuation_bits(lambda ids: gpt.token_log_probs(model, ids), vocab, p, t)
            for p, t in zip(prompts, tunes)]
    assert all(b > 0 for b in bits)


def test_constraint_arguments_are_checked():
    model, vocab, prompts = abc_model()
    with pytest.raises(ValueError, match="one prompt per row"):
        sampling.MetreConstraint(vocab.token_texts, prompts[0])
    constraint = sampling.MetreConstraint(vocab.token_texts, prompts[:2])
    with pytest.raises(ValueError, match="follows 2 rows"):
        sampling.generate(gpt.next_log_probs_fn(model), torch.stack([vocab.encode(prompts[0])] * 3), 2,
                          constraint=constraint)
    with pytest.raises(ValueError, match="one token per row"):
        constraint.advance([0])
