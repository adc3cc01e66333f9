"""The GPT: causality, attention against PyTorch's reference, caching, loss, overfitting."""

import dataclasses
import math

import numpy as np
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
    with pytest.raises(ValueError, match="GPTConfig.dropout"):
        gpt.GPTConfig(dropout=1.0)
    with pytest.raises(ValueError, match="TrainConfig.min_lr"):
        gpt.TrainConfig(lr=1e-3, min_lr=1e-2)
    with pytest.raises(ValueError, match="TrainConfig.warmup_steps"):
        gpt.TrainConfig(warmup_steps=-1)


def test_configs_accept_numpy_numbers_and_store_python_ones(tmp_path):
    cfg = gpt.GPTConfig(vocab_size=np.int64(7), block_size=16, n_layer=np.int32(2), n_head=2,
                        n_embd=16, dropout=np.float64(0.1))
    assert cfg == dataclasses.replace(TINY, dropout=0.1)
    assert type(cfg.vocab_size) is int and type(cfg.n_layer) is int and type(cfg.dropout) is float
    path = training.save_checkpoint(tmp_path / "m.pt", {"model": gpt.GPT(cfg)}, config=cfg)
    assert training.load_checkpoint(path, config_type=gpt.GPTConfig).config == cfg
    tc = gpt.TrainConfig(steps=np.int64(10), lr=np.float32(0.5), min_lr=0.25)
    assert type(tc.steps) is int and tc.lr == 0.5


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
    torch.manual_seed(5)
    before = torch.rand(1)
    torch.manual_seed(5)
    a = gpt.GPT(TINY)
    assert torch.equal(torch.rand(1), before)          # building a model leaves the global RNG alone
    b = gpt.GPT(TINY)
    assert a.lm_head.weight is a.tok_emb.weight
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    c = gpt.GPT(dataclasses.replace(TINY, seed=1))
    assert not torch.equal(a.tok_emb.weight, c.tok_emb.weight)
    assert abs(float(a.tok_emb.weight.detach().std()) - 0.02) < 0.005
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



@pytest.mark.parametrize("stride", [1, 4, 8, 16, None])
def test_token_log_probs_of_a_long_stream_equal_one_pass_over_each_positions_context(stride):
    # Brute force: position i (1 <= i < N) is scored with the context ids[s:i], where s = 0
    # while i <= T, and otherwise the first window start (a multiple of the stride) that
    # leaves it at least T - stride + 1 tokens of context.
    model = gpt.GPT(TINY).double().eval()
    T, N = TINY.block_size, 100
    step = stride or T // 2
    ids = torch.randint(0, 7, (N,), generator=torch.Generator().manual_seed(5))
    expected = []
    with torch.no_grad():
        for i in range(1, N):
            s = 0 if i <= T else step * math.ceil((i - T) / step)
            assert 1 <= i - s <= T
            expected.append(torch.log_softmax(model(ids[None, s:i])[0, -1], -1)[ids[i]])
    lp = gpt.token_log_probs(model, ids, stride=stride, batch_size=3)
    torch.testing.assert_close(lp, torch.stack(expected), rtol=0, atol=1e-12)


def test_token_log_probs_and_generate_refuse_bad_arguments():
    model = gpt.GPT(TINY)
    ids = torch.randint(0, 7, (40,), generator=torch.Generator().manual_seed(0))
    for stride in (0, -1, 17, 2.5, True):
        with pytest.raises(ValueError, match="stride must be an int in 1..block_size"):
            gpt.token_log_probs(model, ids, stride=stride)    # stride=0 used to mean the default
    torch.testing.assert_close(gpt.token_log_probs(model, ids, stride=np.int64(4)),
                               gpt.token_log_probs(model, ids, stride=4))
    prompt = torch.tensor([1, 2])
    for bad in (-1, 2.5, True, None):
        with pytest.raises(ValueError, match="max_new_tokens must be an int >= 0"):
            gpt.generate(model, prompt, bad)                # -1 used to return the prompt
    assert torch.equal(gpt.generate(model, prompt, 0), prompt)
    assert gpt.generate(model, prompt, np.int64(3), temperature=0).shape == (5,)


def test_out_of_vocabulary_ids_give_a_clear_error():
    model = gpt.GPT(TINY)
    for bad in (torch.tensor([[1, 7]]), torch.tensor([[-1, 2]])):
        with pytest.raises(ValueError, match=r"outside the vocabulary.*vocab_size=7.*0\.\.6"):
            model(bad)                                       # used to be a raw IndexError
        with pytest.raises(ValueError, match="vocab_size=7"):
            gpt.generate(model, bad[0], 3)
        with pytest.raises(ValueError, match="vocab_size=7"):
            gpt.token_log_probs(model, torch.cat([torch.tensor([1, 2, 3]), bad[0]]))
    assert model.training                                   # a refused call changes no mode
    with pytest.raises(ValueError, match=r"\(B, T\) integer tensor"):
        model(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=r"\(B, T\) integer tensor"):
        model(torch.zeros(1, 3))


@pytest.mark.parametrize("attention", ["manual", "sdpa"])
def test_cached_logits_equal_a_full_forward_pass(attention):
    model = gpt.GPT(dataclasses.replace(TINY, attention=attention)).double().eval()
    ids = torch.randint(0, 7, (3, 16), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        full = model(ids)                                    # (3, 16, 7)
        cache = gpt.KVCache(TINY.n_layer)
        pieces = [model(ids[:, :5], cache)]                  # a prompt, then one token at a time
        pieces += [model(ids[:, t:t + 1], cache) for t in range(5, 16)]
    assert cache.length == 16
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=0, atol=1e-12)


def test_generate_with_top_k_top_p_and_stop():
    model = gpt.GPT(TINY).double()                       # near-uniform: no two logits tie
    prompt = torch.tensor([[1, 2, 3], [4, 5, 6]])
    greedy = gpt.generate(model, prompt, 12, temperature=0)     # 15 tokens: within the context
    for options in (dict(top_k=1), dict(top_p=1e-6), dict(top_k=1, temperature=2.0)):
        sampled = gpt.generate(model, prompt, 12, generator=torch.Generator().manual_seed(0), **options)
        assert torch.equal(sampled, greedy), options        # one token left: the greedy one
    # top-k draws only among the k most likely tokens at every step (checked by hand).
    seq = gpt.generate(model, prompt, 12, top_k=2, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(seq[:, :-1])[:, 2:]                   # the distributions the 12 draws came from
    ranks = (logits > logits.gather(-1, seq[:, 3:, None])).sum(-1)
    assert ranks.max() <= 1 and ranks.float().mean() > 0    # second-best tokens were drawn too
    # stop only cuts: the same draws, ended once every row has produced the stop sequence.
    full = gpt.generate(model, prompt[0], 12, top_k=3, generator=torch.Generator().manual_seed(2))
    stop = full[3 + 6:3 + 8].tolist()                        # two tokens the run produces
    cut = gpt.generate(model, prompt[0], 12, top_k=3, stop=stop, generator=torch.Generator().manual_seed(2))
    new = full[3:].tolist()
    end = next(i + 2 for i in range(len(new) - 1) if new[i:i + 2] == stop)
    assert torch.equal(cut, full[:3 + end]) and cut[-2:].tolist() == stop


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
    step = gpt.make_train_step(model, opt, scheduler=gpt.make_scheduler(opt, tc))
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
    assert sampled == gpt.generate_texts(model, vocab, prompts, np.int64(12), seed=np.int64(3))


def test_dropout_noise_comes_from_the_generator():
    config = dataclasses.replace(TINY, dropout=0.2)
    ids = torch.randint(0, 7, (200,), generator=torch.Generator().manual_seed(0))

    def losses(seed: int) -> list[float]:
        model = gpt.GPT(config)
        tc = gpt.TrainConfig(steps=5, batch_size=4, lr=1e-2, min_lr=1e-3, warmup_steps=1)
        opt = gpt.configure_optimizer(model, tc)
        step = gpt.make_train_step(model, opt, generator=torch.Generator().manual_seed(seed),
                                   scheduler=gpt.make_scheduler(opt, tc), grad_clip=tc.grad_clip)
        history = training.train(step, text.random_windows(ids, 16, 4, seed=0), tc.steps, progress=False)
        return history.series("loss")[1].tolist()

    torch.manual_seed(0)
    before = torch.rand(1)
    torch.manual_seed(0)
    a = losses(1)
    assert torch.equal(torch.rand(1), before)            # the masks did not come from the global RNG
    torch.manual_seed(99)
    assert losses(1) == a                                # same generator, same masks, same losses
    assert losses(2) != a


# ------------------------------------------------------------------------ train once, then load

FOLK_TEXTS = ["M:2/4\nL:1/8\nK:G\nB2 A2|G4|d2 B2|A4|]\n", "M:3/4\nL:1/8\nK:D\nA2 F2 D2|E6|]\n"] * 6


def _folk_setup(vocab):
    train_text = "\n".join(FOLK_TEXTS)
    config = gpt.GPTConfig(vocab_size=vocab.size, block_size=16, n_layer=1, n_head=2, n_embd=8, seed=3)
    train_config = gpt.TrainConfig(steps=12, batch_size=4, lr=0.02, min_lr=0.002, warmup_steps=2, seed=1)
    return train_text, FOLK_TEXTS[0], config, train_config


@pytest.mark.parametrize("tokeniser", ["chars", "music"])
def test_train_folk_model_trains_once_then_loads_the_same_weights(tmp_path, monkeypatch, tokeniser):
    monkeypatch.setenv("GENART_CHECKPOINTS", str(tmp_path))
    vocab = (text.CharVocab.from_texts(*FOLK_TEXTS) if tokeniser == "chars"
             else text.MusicVocab.from_texts(FOLK_TEXTS, min_count=2))
    train_text, monitor, config, train_config = _folk_setup(vocab)
    first = gpt.train_folk_model(vocab, train_text, monitor, config, train_config, name="folk.pt",
                                 eval_every=4, device="cpu", progress=False)
    assert not first.loaded and first.history.step == 12 and first.seconds > 0
    steps, bits = first.history.series("valid_bits")
    assert list(steps) == [4, 8, 12]
    # the returned weights are the best monitored ones: their bits per character are the minimum
    assert gpt.bits_per_char(first.model, vocab, monitor) == pytest.approx(min(bits), rel=1e-6)
    second = gpt.train_folk_model(vocab, train_text, monitor, config, train_config, name="folk.pt",
                                  eval_every=4, device="cpu", progress=False)
    assert second.loaded and second.seconds == first.seconds
    assert second.history.to_dict() == first.history.to_dict()
    for (k, a), (_, b) in zip(first.model.state_dict().items(), second.model.state_dict().items()):
        assert torch.equal(a, b), k
    # training again from scratch gives exactly the same weights (seeded init and batches)
    third = gpt.train_folk_model(vocab, train_text, monitor, config, train_config, name="folk.pt",
                                 eval_every=4, device="cpu", progress=False, retrain=True)
    assert not third.loaded
    for a, b in zip(first.model.state_dict().values(), third.model.state_dict().values()):
        assert torch.equal(a, b)


def test_train_folk_model_retrains_when_anything_it_was_trained_with_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("GENART_CHECKPOINTS", str(tmp_path))
    vocab = text.CharVocab.from_texts(*FOLK_TEXTS)
    train_text, monitor, config, train_config = _folk_setup(vocab)
    kwargs = dict(name="folk.pt", eval_every=4, device="cpu", progress=False)
    gpt.train_folk_model(vocab, train_text, monitor, config, train_config, **kwargs)
    changed = [
        (train_text, monitor, config, dataclasses.replace(train_config, seed=2)),
        (train_text, monitor, dataclasses.replace(config, seed=4), train_config),
        (train_text + "\nM:2/4\nL:1/8\nK:G\nB2 A2|G4|]\n", monitor, config, train_config),
    ]
    for args in changed:
        result = gpt.train_folk_model(vocab, *args, **kwargs)
        assert not result.loaded
        gpt.train_folk_model(vocab, train_text, monitor, config, train_config, **kwargs)   # back to the original
    with pytest.raises(ValueError, match="vocab_size"):
        gpt.train_folk_model(vocab, train_text, monitor, dataclasses.replace(config, vocab_size=3), train_config,
                             **kwargs)


def test_bits_per_char_is_the_same_measure_for_both_tokenisers():
    """For characters it is evaluate_nll in bits; for music tokens the total cost over the characters."""
    chars = text.CharVocab.from_texts(*FOLK_TEXTS)
    model = gpt.GPT(dataclasses.replace(TINY, vocab_size=chars.size, block_size=64)).eval()
    sample = FOLK_TEXTS[0] + FOLK_TEXTS[1]
    assert gpt.bits_per_char(model, chars, sample) == pytest.approx(
        text.bits_per_char(gpt.evaluate_nll(model, chars.encode(sample))), rel=1e-9)
    notes = text.MusicVocab.from_texts(FOLK_TEXTS, min_count=2)
    music_model = gpt.GPT(dataclasses.replace(TINY, vocab_size=notes.size, block_size=64)).eval()
    lp = gpt.token_log_probs(music_model, notes.encode(sample))
    first = notes.decode(notes.encode(sample)[:1])
    assert gpt.bits_per_char(music_model, notes, sample) == pytest.approx(
        float(-lp.sum()) / math.log(2) / (len(sample) - len(first)), rel=1e-9)


def test_generate_texts_with_music_tokens_and_the_constraint():
    notes = text.MusicVocab.from_texts(FOLK_TEXTS, min_count=2)
    model = gpt.GPT(dataclasses.replace(TINY, vocab_size=notes.size, block_size=64)).eval()
    prompts = ["M:2/4\nL:1/8\nK:G\n", "M:3/4\nL:1/8\nK:D\n", "M:2/4\nL:1/8\nK:Dmix\n"]   # the last: 2 more tokens
    assert len({len(notes.encode(p)) for p in prompts}) == 2
    free = gpt.generate_texts(model, notes, prompts, 20, seed=0)
    again, kept = gpt.generate_texts(model, notes, prompts, 20, seed=0, return_log_kept=True)
    assert free == again and kept == [0.0, 0.0, 0.0]
    from genart_utils import music
    texts, kept = gpt.generate_texts(model, notes, prompts, 40, seed=0, constrain=True, return_log_kept=True)
    assert all(k <= 0 for k in kept) and any(k < 0 for k in kept)
    for prompt, body in zip(prompts, texts):
        tracker = music.BarTracker(prompt)
        for piece in notes.split(body):      # every token the constraint let through keeps the bars in time
            assert tracker.allows(piece), (prompt, body)
            tracker.append(piece)


def test_matched_music_vocab_matches_the_parameter_count_to_one_token():
    reference = gpt.GPTConfig(vocab_size=103, block_size=16, n_layer=1, n_head=2, n_embd=12, seed=0)
    texts = [f"M:2/4\nL:1/8\nK:G\n{a}2 {b}2|{c}4|]\n" for a in "ABCDEFG" for b in "abcdefg" for c in "GAB"] * 2
    vocab, config = gpt.matched_music_vocab(texts, reference, width=8)
    assert config.n_embd == 8 and config.vocab_size == vocab.size and config.n_layer == reference.n_layer
    full = text.MusicVocab.from_texts(texts, min_count=2)
    assert vocab.tokens == full.tokens[:len(vocab.tokens)]                # the most frequent pieces
    n_ref, n_new = gpt.num_parameters(gpt.GPT(reference)), gpt.num_parameters(gpt.GPT(config))
    n_single = sum(len(t) == 1 for t in full.tokens)
    assert n_single < len(vocab.tokens) < len(full.tokens)                # some pieces kept, not all
    assert abs(n_new - n_ref) <= config.n_embd / 2                        # the nearest count a token allows
    tc = gpt.folk_train_config(gpt.FOLK_SIZES["cpu"], 96)
    assert tc.lr == 0.75 / 96 and tc.min_lr == tc.lr / 10 and tc.warmup_steps == tc.steps // 20
