"""The mini-CLIP (genart_utils.clip): InfoNCE against brute force and its mutual-information
bound on Gaussians, the caption tokenizer and its handling of bad prompts, the text encoder's
causality and indifference to padding, retrieval ranks, overfitting one batch, resuming a run,
and clear errors for bad configs.

Every model here is tiny; each test runs in about a second on one CPU thread (the first one
that loads OpenMoji renders it once if it is not cached).
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from genart_utils import clip, data, training
from genart_utils.clip import (BOS, EOS, PAD, CLIP, CaptionTokenizer, CLIPConfig, CLIPRecipe,
                               ImageEncoderConfig, TextEncoder, TextEncoderConfig)

TINY_TEXT = TextEncoderConfig(n_layer=1, n_head=2, n_embd=16, seed=0)
TINY_IMAGE = ImageEncoderConfig(widths=(8, 16), groups=4, seed=0)
TINY_CLIP = CLIPConfig(text=TINY_TEXT, image=TINY_IMAGE, embed_dim=16, seed=0)


@pytest.fixture(scope="module")
def openmoji():
    return data.load_dataset("openmoji", "train", size=32), data.load_dataset("openmoji", "test", size=32)


# ------------------------------------------------------------------------ InfoNCE

def brute_force_info_nce(logits: torch.Tensor) -> float:
    n = len(logits)
    rows = cols = 0.0
    for i in range(n):
        rows += -(logits[i][i] - math.log(sum(math.exp(logits[i][j]) for j in range(n))))
        cols += -(logits[i][i] - math.log(sum(math.exp(logits[j][i]) for j in range(n))))
    return 0.5 * (rows / n + cols / n)


@pytest.mark.parametrize("n", [1, 2, 7])
def test_info_nce_matches_brute_force_and_is_symmetric(n):
    logits = torch.randn(n, n, generator=torch.Generator().manual_seed(n), dtype=torch.float64) * 3
    loss = clip.info_nce(logits)
    assert loss.item() == pytest.approx(brute_force_info_nce(logits.tolist()), abs=1e-12)
    assert clip.info_nce(logits.T).item() == pytest.approx(loss.item(), abs=1e-12)


def test_info_nce_of_uniform_logits_is_log_n_and_rejects_non_square():
    assert clip.info_nce(torch.zeros(10, 10)).item() == pytest.approx(math.log(10), abs=1e-6)
    with pytest.raises(ValueError, match="square"):
        clip.info_nce(torch.zeros(3, 4))


@pytest.mark.parametrize("rho, dim, n", [(0.3, 1, 64), (0.5, 2, 128), (0.8, 4, 64), (0.9, 8, 64),
                                         (0.99, 10, 32)])
def test_gaussian_bound_lies_below_the_mutual_information(rho, dim, n):
    r = clip.gaussian_infonce(rho, dim, n, batches=40, generator=torch.Generator().manual_seed(1))
    assert r["mi"] == pytest.approx(-dim / 2 * math.log(1 - rho**2))
    assert r["bound"] <= r["mi"] + 3 * r["se"] + 1e-9
    assert r["bound"] <= r["log_n"] + 1e-9            # every batch's loss is >= 0
    assert r["bound"] + r["loss"] == pytest.approx(r["log_n"])


@pytest.mark.parametrize("rho, dim, n", [(0.3, 1, 64), (0.5, 2, 128), (0.7, 2, 256)])
def test_gaussian_bound_is_tight_when_the_information_is_small(rho, dim, n):
    r = clip.gaussian_infonce(rho, dim, n, batches=40, generator=torch.Generator().manual_seed(2))
    assert r["mi"] < 0.2 * r["log_n"]
    assert abs(r["bound"] - r["mi"]) < 4 * r["se"] + 0.02


@pytest.mark.parametrize("rho, dim, n", [(0.99, 10, 32), (0.999, 20, 64)])
def test_gaussian_bound_saturates_at_log_n(rho, dim, n):
    r = clip.gaussian_infonce(rho, dim, n, batches=10, generator=torch.Generator().manual_seed(3))
    assert r["mi"] > 4 * r["log_n"]
    assert r["log_n"] - 0.01 < r["bound"] <= r["log_n"] + 1e-9


def test_gaussian_infonce_rejects_bad_arguments():
    with pytest.raises(ValueError, match="rho"):
        clip.gaussian_infonce(1.0, 2, 16, 4)
    with pytest.raises(ValueError, match="batches"):
        clip.gaussian_infonce(0.5, 2, 16, 1)


# ------------------------------------------------------------------------ tokenizer

def test_alphabet_and_longest_caption_match_openmoji(openmoji):
    captions = openmoji[0].captions + openmoji[1].captions
    assert clip.caption_alphabet(captions) == clip.OPENMOJI_ALPHABET
    assert max(map(len, captions)) == clip.OPENMOJI_MAX_CHARS


def test_tokenizer_round_trips_every_openmoji_caption(openmoji):
    captions = openmoji[0].captions + openmoji[1].captions
    tok = CaptionTokenizer()
    ids = tok.encode(captions)
    assert ids.shape == (len(captions), clip.OPENMOJI_MAX_CHARS + 2) and ids.dtype == torch.long
    assert tok.decode(ids) == list(captions)
    lengths = (ids != PAD).sum(1)
    assert (ids[:, 0] == BOS).all()
    assert (ids[torch.arange(len(ids)), lengths - 1] == EOS).all()
    assert lengths.tolist() == [len(c) + 2 for c in captions]


def test_tokenizer_normalises_case_and_surrounding_space():
    tok = CaptionTokenizer("abc ", max_chars=5)
    assert torch.equal(tok.encode(["  AbC \n"]), tok.encode(["abc"]))
    assert tok.encode(["ab"]).tolist() == [[BOS, 3, 4, EOS, PAD, PAD, PAD]]


def test_empty_prompt_is_the_null_caption():
    tok = CaptionTokenizer("ab", max_chars=4)
    null = [BOS, EOS, PAD, PAD, PAD, PAD]
    assert tok.encode(["", "   "]).tolist() == [null, null]
    assert tok.decode(tok.encode([""])) == [""]


def test_bad_prompts_raise_clear_errors():
    tok = CaptionTokenizer("ab ", max_chars=4)
    with pytest.raises(ValueError, match=r"outside the tokenizer's alphabet: '!z'.*allowed"):
        tok.encode(["a z!"])
    with pytest.raises(ValueError, match=r"5 characters, more than the limit max_chars=4"):
        tok.encode(["ababa"])
    with pytest.raises(TypeError, match="must be a str"):
        tok.encode([3])
    with pytest.raises(TypeError, match=r"list of prompts.*\[prompt\]"):
        tok.encode("ab")
    with pytest.raises(ValueError, match="more than once"):
        CaptionTokenizer("aba")


# ------------------------------------------------------------------------ text encoder

def test_pooled_text_ignores_padding_and_batching():
    enc = TextEncoder(TINY_TEXT).eval()
    tokens = enc.tokenizer.encode(["grinning face", "red apple", "", "flag: st. barthélemy"])
    with torch.no_grad():
        full = enc(tokens)
        trimmed = enc(tokens[:, :int((tokens != PAD).sum(1).max())])   # fewer PAD columns
        alone = torch.cat([enc(tokens[i:i + 1]) for i in range(len(tokens))])
        # the EOS state read directly from one padded pass, no length groups
        states, mask = enc.states(tokens)
        direct = states[torch.arange(len(tokens)), mask.sum(1) - 1]
    assert full.shape == (4, 16)
    torch.testing.assert_close(trimmed, full, rtol=0, atol=1e-6)
    torch.testing.assert_close(alone, full, rtol=0, atol=1e-6)
    torch.testing.assert_close(direct, full, rtol=0, atol=1e-6)
    assert torch.equal(mask, tokens != PAD)


def test_text_states_are_causal():
    enc = TextEncoder(TINY_TEXT).eval()
    a = enc.tokenizer.encode(["red apple"])
    b = enc.tokenizer.encode(["red grape"])
    with torch.no_grad():
        sa, _ = enc.states(a)
        sb, _ = enc.states(b)
    same = 1 + len("red ")                                   # BOS and the shared prefix
    torch.testing.assert_close(sa[:, :same], sb[:, :same], rtol=0, atol=1e-6)
    assert (sa[:, same] - sb[:, same]).abs().max() > 1e-3
    assert not torch.allclose(enc(a), enc(b))


def test_text_encoder_rejects_rows_not_from_the_tokenizer():
    enc = TextEncoder(TINY_TEXT)
    good = enc.tokenizer.encode(["abc"])
    bad = good.clone()
    bad[0, 0] = 5                                            # no BOS
    with pytest.raises(ValueError, match="BOS characters EOS"):
        enc(bad)
    with pytest.raises(ValueError, match="integer tensor"):
        enc(good.float())


def test_bag_of_words_ignores_order_and_maps_unknown_words_to_unk():
    config = TextEncoderConfig(kind="bow", n_embd=8, words=clip.vocabulary(["red apple", "green apple"]))
    enc = TextEncoder(config).eval()
    assert config.words == ("apple", "green", "red")
    with torch.no_grad():
        out = enc(enc.tokenizer.encode(["red apple", "apple red", "red, apple!", "blue apple",
                                        "purple apple"]))
        states, mask = enc.states(enc.tokenizer.encode(["red apple"]))
    torch.testing.assert_close(out[1], out[0])
    torch.testing.assert_close(out[2], out[0])
    torch.testing.assert_close(out[3], out[4])               # blue, purple: both UNK
    assert states.shape == (1, 1, 8) and mask.all()


# ------------------------------------------------------------------------ CLIP and retrieval

def test_clip_logits_are_scaled_cosines():
    model = CLIP(TINY_CLIP).eval()
    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    tokens = model.tokenizer.encode(["a", "b c", ""])
    with torch.no_grad():
        logits = model(images, tokens)
        u, v = model.encode_image(images), model.encode_text(tokens)
    torch.testing.assert_close(u.norm(dim=1), torch.ones(3))
    torch.testing.assert_close(logits, (u @ v.T) / 0.07)
    assert model.temperature == pytest.approx(0.07)
    with torch.no_grad():
        model.log_scale.fill_(10.0)                          # e^10 is clamped at 100
    assert model.temperature == pytest.approx(0.01)


def test_retrieval_ranks_match_brute_force_and_count_ties_pessimistically():
    g = torch.Generator().manual_seed(0)
    image, text = torch.randn(6, 4, generator=g), torch.randn(9, 4, generator=g)
    targets = torch.tensor([0, 3, 3, 8, 1, 5])
    ranks = clip.retrieval_ranks(image, text, targets)
    sims = image @ text.T
    expected = [1 + sum(float(sims[i, j]) > float(sims[i, targets[i]]) for j in range(9))
                for i in range(6)]
    assert ranks.tolist() == expected
    assert clip.retrieval_ranks(image, torch.zeros(9, 4), targets).tolist() == [9] * 6   # all tied
    assert clip.top_k(torch.tensor([1, 2, 5, 9]), 2) == 0.5
    assert clip.chance_top_k(5, 394) == pytest.approx(5 / 394)
    assert clip.chance_top_k(5, 3) == 1.0


def test_unique_captions_share_one_candidate():
    candidates, targets = clip.unique_captions(["b", "a", "b"])
    assert candidates == ["b", "a"] and targets.tolist() == [0, 1, 0]


def test_openmoji_captions_are_distinct(openmoji):
    captions = openmoji[0].captions + openmoji[1].captions
    assert len(set(captions)) == len(captions)


def test_tiny_clip_overfits_one_batch(openmoji):
    test = openmoji[1]
    images, captions = test.images[:8], test.captions[:8]
    model = CLIP(TINY_CLIP)
    tokens = model.tokenizer.encode(captions)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    loss_fn = clip.clip_loss_fn(model)
    g = torch.Generator().manual_seed(0)
    for _ in range(100):
        loss, logged = loss_fn((images, tokens), g)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert logged["accuracy"] == 1.0
    assert loss.item() < 0.1
    result = clip.evaluate_retrieval(model, images, captions)
    assert result["top1"] == 1.0 and result["n_candidates"] == 8
    assert result["chance1"] == pytest.approx(1 / 8)


def test_random_shift_moves_whole_pixels_and_fills_with_white():
    images = torch.zeros(4, 3, 8, 8)
    shifted = clip.random_shift(images, 2, torch.Generator().manual_seed(0))
    assert shifted.shape == images.shape
    assert ((shifted == 0) | (shifted == 1)).all()
    assert ((shifted == 0).flatten(1).sum(1) >= 3 * 6 * 6).all()   # at most 2 rows/cols lost
    assert clip.random_shift(images, 0, torch.Generator()) is images


# ------------------------------------------------------------------------ recipe

def tiny_recipe(steps: int) -> CLIPRecipe:
    optim = training.Optimisation(steps=steps, batch_size=8, lr=1e-3, warmup=2, ema_decay=0.9, seed=3)
    return CLIPRecipe(clip=TINY_CLIP, optim=optim, image_size=16, shift=1)


def test_resumed_training_equals_an_uninterrupted_run(tmp_path):
    straight, _, h1 = clip.train_clip(tiny_recipe(6), checkpoint=tmp_path / "a.pt", progress=False)
    clip.train_clip(tiny_recipe(3), checkpoint=tmp_path / "b.pt", progress=False)
    resumed, ema, h2 = clip.train_clip(tiny_recipe(6), checkpoint=tmp_path / "b.pt", progress=False)
    assert h2.step == 6 and h1.records == h2.records
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert set(h1.keys()) == {"loss", "temperature", "accuracy"}
    stored = training.load_checkpoint(tmp_path / "b.pt", config_type=CLIPRecipe)
    assert stored.config == tiny_recipe(6)


def test_bow_recipe_survives_a_checkpoint(tmp_path):
    recipe = clip.clip_preset("bow", steps=10, words=("apple", "red"))
    model = clip.build_clip(recipe)
    training.save_checkpoint(tmp_path / "bow.pt", {"model": model}, config=recipe)
    stored = training.load_checkpoint(tmp_path / "bow.pt", {"model": clip.build_clip(recipe)},
                                      config_type=CLIPRecipe)
    assert stored.config == recipe and stored.config.clip.text.words == ("apple", "red")


def test_presets_differ_where_they_must():
    guide, evaluator = clip.clip_preset("guide"), clip.clip_preset("evaluator")
    assert guide.clip.text.kind == "transformer"
    assert evaluator.clip.text.seed != guide.clip.text.seed
    assert evaluator.clip.image.seed != guide.clip.image.seed
    assert evaluator.optim.seed != guide.optim.seed
    assert evaluator.clip.text != dataclasses.replace(guide.clip.text, seed=evaluator.clip.text.seed)
    assert evaluator.clip.image.widths != guide.clip.image.widths
    assert clip.CLIP_RECIPE == guide and clip.EVALUATOR_RECIPE == evaluator
    with pytest.raises(ValueError, match="unknown CLIP preset"):
        clip.clip_preset("teacher")


def test_configs_reject_bad_values():
    with pytest.raises(ValueError, match="kind must be one of"):
        TextEncoderConfig(kind="lstm")
    with pytest.raises(ValueError, match="multiple of n_head"):
        TextEncoderConfig(n_embd=30, n_head=4)
    with pytest.raises(ValueError, match="needs words"):
        TextEncoderConfig(kind="bow")
    with pytest.raises(ValueError, match="leave it empty"):
        TextEncoderConfig(words=("a",))
    with pytest.raises(ValueError, match="more than once"):
        TextEncoderConfig(alphabet="aa")
    with pytest.raises(ValueError, match="divisible by groups"):
        ImageEncoderConfig(widths=(12,), groups=8)
    with pytest.raises(ValueError, match="widths"):
        ImageEncoderConfig(widths=())
    with pytest.raises(ValueError, match="max_logit_scale"):
        CLIPConfig(init_temperature=0.001)
    with pytest.raises(TypeError, match="CLIPConfig.text must be a TextEncoderConfig"):
        CLIPConfig(text=ImageEncoderConfig())
    with pytest.raises(ValueError, match="image_size"):
        CLIPRecipe(image_size=30)
    with pytest.raises(ValueError, match="shift"):
        CLIPRecipe(shift=16)
    with pytest.raises(ValueError, match="dataset"):
        CLIPRecipe(dataset="mnist5k")
