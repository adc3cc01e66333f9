"""The GPT: causality, attention against PyTorch's reference, caching, loss, overfitting."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from genart_utils import gpt, text, training





TINY = gpt.GPTConfig(vocab_size=7, block_size=16, n_layer=2, n_head=2, n_embd=16, seed=0)


def test_config_rejects_bad_shapes():
    with pytest.raises(ValueError, match="multiple of n_head"):
        gpt.GPTConfig(n_embd=10, n_head=3)
    with pytest.raises(ValueError, match="attention"):
        gpt.GPTConfig(attention="flash")
    with pytest.raises(ValueError, match="vocab_size"):
        gpt.GPTConfig(vocab_size=0)


@pytest.mark.parametrize("attention", ["manual", "sdpa"])
def test_changing_a_future_token_never_changes_earlier_logits(attention):
    model = gpt.GPT(dataclasses.replace(TINY, attention=attention)).double().eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 7, (3, 12), generator=g)
    with torch.no_grad():
        base = model(x)
        for t in range(12):
            y = x.clone()
            y[:, t] = (y[:, t] + 1 + torch.randint(0, 6, (3,), generator=g)) % 7   # a different token
            out = model(y)
            assert torch.equal(out[:, :t], base[:, :t])           # positions before t: bit-identical
            assert (out[:, t:] - base[:, t:]).abs().max() > 0     # from t on, the change is seen


def test_written_out_attention_equals_scaled_dot_product_reference():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 3, 10, 8, generator=g, dtype=torch.float64) for _ in range(3))
    ours, weights = gpt.causal_attention(q, k, v)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert torch.allclose(ours, ref, atol=1e-12, rtol=0)
    assert torch.allclose(weights.sum(-1), torch.ones(2, 3, 10, dtype=torch.float64))
    assert (weights.triu(1) == 0).all()                          # nothing from the future
    # one new query after cached keys sees every key
    last, _ = gpt.causal_attention(q[:, :, -1:], k, v)
    assert torch.allclose(last, ref[:, :, -1:], atol=1e-12, rtol=0)


def test_both_attention_paths_give_the_same_model_output():
    x = torch.randint(0, 7, (2, 16), generator=torch.Generator().manual_seed(2))
    manual = gpt.GPT(TINY).double().eval()
    fused = gpt.GPT(dataclasses.replace(TINY, attention="sdpa")).double().eval()
    fused.load_state_dict(manual.state_dict())
    with torch.no_grad():
        assert torch.allclose(manual(x), fused(x), atol=1e-10, rtol=0)


def test_weights_are_tied_and_initialisation_is_seeded():
    a, b = gpt.GPT(TINY), gpt.GPT(TINY)
    assert a.lm_head.weight is a.tok_emb.weight
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    untied = gpt.GPT(dataclasses.replace(TINY, tie_weights=False))
    assert gpt.num_parameters(untied) - gpt.num_parameters(a) == TINY.vocab_size * TINY.n_embd


def test_cached_generation_matches_full_forward_passes():
    model = gpt.GPT(TINY).double().eval()
    prompt = torch.tensor([[1, 2, 3], [4, 5, 6]])
    out = gpt.generate(model, prompt, max_new_tokens=13, temperature=0)    # fills the context
    seq = prompt.clone()
    with torch.no_grad():                          # greedy decoding without a cache
        for _ in range(13):
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)
    longer = gpt.generate(model, prompt, max_new_tokens=40, temperature=0)  # past block_size
    assert longer.shape == (2, 43) and torch.equal(longer[:, :16], seq)


def test_lm_loss_is_the_mean_negative_log_likelihood():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 5, 7, generator=g, dtype=torch.float64)
    y = torch.randint(0, 7, (2, 5), generator=g)
    by_hand = -torch.log_softmax(logits, -1).gather(-1, y[..., None]).mean()
    assert math.isclose(float(gpt.lm_loss(logits, y)), float(by_hand), rel_tol=1e-6)
    with pytest.raises(ValueError, match="do not match"):
        gpt.lm_loss(logits, y[:, :4])


def test_token_log_probs_with_windows_equals_one_pass_within_the_context():
    model = gpt.GPT(TINY).double()
    ids = torch.randint(0, 7, (16,), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        direct = torch.log_softmax(model(ids[None, :-1]), -1)[0].gather(-1, ids[1:, None])[:, 0]
    assert torch.allclose(gpt.token_log_probs(model, ids), direct, atol=1e-12)
    long = torch.randint(0, 7, (100,), generator=torch.Generator().manual_seed(5))
    lp = gpt.token_log_probs(model, long, stride=4)
    assert lp.shape == (99,) and torch.isfinite(lp).all()


def test_learning_rate_schedule_warms_up_then_decays_to_min_lr():
    cfg = gpt.TrainConfig(steps=100, warmup_steps=10, lr=1e-3, min_lr=1e-4)
    lrs = [gpt.lr_at(s, cfg) for s in range(101)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[100] == pytest.approx(1e-4)


def test_tiny_gpt_overfits_a_short_sequence():
    vocab = text.CharVocab.from_texts("la la land, la la la\n")
    ids = vocab.encode("la la land, la la la\n" * 4)
    config = gpt.GPTConfig(vocab_size=vocab.size, block_size=24, n_layer=1, n_head=2, n_embd=32, seed=0)
    model = gpt.GPT(config)
    tc = gpt.TrainConfig(steps=100, batch_size=8, lr=1e-2, min_lr=1e-3, warmup_steps=10, weight_decay=0.0)
    opt = gpt.configure_optimizer(model, tc)
    step = gpt.make_train_step(model, opt, gpt.make_scheduler(opt, tc), torch.device("cpu"))
    history = training.train(step, text.random_windows(ids, 24, 8, seed=0), tc.steps, progress=False)
    first, last = history.records["loss"][1][0], history.last("loss")
    assert first > math.log(vocab.size) - 0.3          # starts near the uniform guess
    assert last < 0.2                                    # memorised the repeated line
    out = gpt.generate(model, vocab.encode("la la land, "), 9, temperature=0)
    assert vocab.decode(out) == "la la land, la la la\n"


def test_generate_texts_batches_by_prompt_length_and_cuts_at_stop():
    vocab = text.CharVocab.from_texts("ab\n")
    model = gpt.GPT(dataclasses.replace(TINY, vocab_size=vocab.size)).double()
    prompts = ["a", "ab", "b", "ba\n"]
    out = gpt.generate_texts(model, vocab, prompts, 12, temperature=0, stop="\n")
    for prompt, continuation in zip(prompts, out):
        full = vocab.decode(gpt.generate(model, vocab.encode(prompt), 12, temperature=0))[len(prompt):]
        expected = full[: full.index("\n") + 1] if "\n" in full else full
        assert continuation == expected
    sampled = gpt.generate_texts(model, vocab, prompts, 12, seed=3)
    assert sampled == gpt.generate_texts(model, vocab, prompts, 12, seed=3)      # seeded
