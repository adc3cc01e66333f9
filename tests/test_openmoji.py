"""The OpenMoji loader: catalogue, family split, rendering in colour, labels and the cache."""

import numpy as np
import pytest
import torch

from genart_utils import data

SIZE = 8  # the smallest size renders the whole set in seconds


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("genart_data")


@pytest.fixture(scope="module")
def splits(root):
    return {split: data.load_dataset("openmoji", split, size=SIZE, root=root)
            for split in data.SPLITS}


def test_catalogue_keeps_every_rgi_emoji_and_counts_what_it_drops():
    entries, dropped = data.openmoji_catalogue()
    table = data.parse_emoji_test(data._emoji_test_lines())
    rgi = {key for key, row in table.items()
           if row[3] == "fully-qualified" and row[0] != "Component"}
    kept = {tuple(p for p in data._code_points(e.code) if p != 0xFE0F) for e in entries}
    assert kept == rgi  # OpenMoji 17 draws every fully-qualified Unicode 17 emoji
    n_files = len({item.name.split(".")[0]
                   for item in data._openmoji_package().get_openmoji_svg_data().iterdir()})
    assert len(entries) + sum(dropped.values()) == n_files
    assert dropped["component"] == 9  # 5 skin tones + 4 hair styles
    assert not any(0xE000 <= p <= 0xF8FF for e in entries for p in data._code_points(e.code))


def test_split_is_disjoint_covers_everything_and_is_about_a_tenth(splits):
    train, test = splits["train"], splits["test"]
    entries, _ = data.openmoji_catalogue()
    assert set(train.codes).isdisjoint(test.codes)
    assert len(train.codes) == len(set(train.codes))
    assert set(train.codes) | set(test.codes) == {e.code for e in entries}
    assert (len(train), len(test)) == (3550, 394)  # the numbers in data.py's docstring table
    for g in range(len(data.OPENMOJI_GROUPS)):
        n_test = int((test.labels == g).sum())
        n_all = n_test + int((train.labels == g).sum())
        assert 0 < n_test <= round(0.1 * n_all)
        assert n_test >= 0.6 * 0.1 * n_all


def test_variants_of_one_emoji_fall_on_the_same_side(splits):
    train, test = splits["train"], splits["test"]
    train_families = {data.emoji_family(c) for c in train.codes}
    test_families = {data.emoji_family(c) for c in test.codes}
    assert train_families.isdisjoint(test_families)
    # the skin-tone rule, checked directly from the codes: a toned emoji sits with its base
    side = {c: "train" for c in train.codes} | {c: "test" for c in test.codes}
    toned = [c for c in side if any(0x1F3FB <= p <= 0x1F3FF for p in data._code_points(c))]
    assert len(toned) > 1000
    for code in toned:
        base = "-".join(p for p in code.split("-")
                        if p not in {"1F3FB", "1F3FC", "1F3FD", "1F3FE", "1F3FF"})
        if base in side:
            assert side[base] == side[code], code
    assert data.emoji_family("1F468-1F3FB-200D-1F33E") == data.emoji_family("1F9D1-200D-1F33E")
    assert data.emoji_family("1F44B-1F3FD") == data.emoji_family("1F44B") != data.emoji_family("1F600")


def test_split_is_deterministic_and_depends_on_the_seed():
    entries, _ = data.openmoji_catalogue()
    first = data.openmoji_split(entries, 0.1, seed=0)[1]
    assert np.array_equal(first, data.openmoji_split(entries, 0.1, seed=0)[1])
    assert not np.array_equal(first, data.openmoji_split(entries, 0.1, seed=1)[1])
    shuffled = [entries[i] for i in np.random.default_rng(3).permutation(len(entries))]
    test_codes = {shuffled[i].code for i in data.openmoji_split(shuffled, 0.1, seed=0)[1]}
    assert test_codes == {entries[i].code for i in first}


def test_images_are_rgb_on_white_in_colour(splits):
    for ds in splits.values():
        assert ds.images.dtype == torch.float32 and ds.image_shape == (3, SIZE, SIZE)
        assert ds.labels.dtype == torch.int64
        assert 0.0 <= ds.images.min() and ds.images.max() <= 1.0
    images = splits["train"].images
    corners = images[:, :, [0, 0, -1, -1], [0, -1, 0, -1]]
    assert (corners > 0.9).float().mean() > 0.9  # mostly white around the emoji
    channel_spread = (images.max(dim=1).values - images.min(dim=1).values).amax(dim=(1, 2))
    assert (channel_spread > 0.3).float().mean() > 0.5  # not greyscale: strong colour in most
    assert (channel_spread < 0.05).float().mean() < 0.1  # grey-only (fog, new moon...): about 8%


def test_labels_captions_and_codes(splits):
    for ds in splits.values():
        assert len(ds.captions) == len(ds.codes) == len(ds)
        assert all(c and c == c.lower() for c in ds.captions)
        assert set(ds.labels.tolist()) == set(range(len(data.OPENMOJI_GROUPS)))
    everything = {c: (cap, int(g)) for ds in splits.values()
                  for c, cap, g in zip(ds.codes, ds.captions, ds.labels)}
    people = data.OPENMOJI_GROUPS.index("People & Body")
    assert everything["1F44B-1F3FE"] == ("waving hand: medium-dark skin tone", people)
    assert everything["1F600"] == ("grinning face", data.OPENMOJI_GROUPS.index("Smileys & Emotion"))
    assert everything["1F1EB-1F1F7"] == ("flag: france", data.OPENMOJI_GROUPS.index("Flags"))
    assert "Component" not in data.OPENMOJI_GROUPS
    assert "OpenMoji" in data.openmoji_attribution() and "CC BY-SA 4.0" in data.openmoji_attribution()


def test_cache_round_trip(root, splits):
    path = data.openmoji_cache_path(SIZE, root)
    assert path.exists() and not list(path.parent.glob("*.part"))
    images, entries = data._openmoji_arrays.__wrapped__(SIZE, str(root))  # read from the file
    by_code = dict(zip(splits["train"].codes + splits["test"].codes,
                       torch.cat([splits["train"].images, splits["test"].images])))
    assert len(entries) == len(by_code)
    for image, entry in zip(images[::97], entries[::97]):
        assert torch.equal(torch.from_numpy(image.astype(np.float32) / 255.0), by_code[entry.code])


@pytest.mark.parametrize("size", [0, 4, 12, 33, 256, 32.0, "32", True])
def test_bad_sizes_fail_clearly(size):
    with pytest.raises(ValueError, match="power of two"):
        data.load_dataset("openmoji", "train", size=size)


def test_bad_split_and_fraction_fail_clearly():
    with pytest.raises(ValueError, match="split must be one of"):
        data.load_dataset("openmoji", "validation")
    with pytest.raises(ValueError, match="test_fraction"):
        data.openmoji_split(data.openmoji_catalogue()[0], 1.5)


def test_image_dataset_stays_backward_compatible():
    ds = data.ImageDataset(torch.zeros(2, 1, 4, 4), torch.zeros(2, dtype=torch.int64), "x", "train")
    assert ds.captions is None and ds.codes is None
    with pytest.raises(ValueError, match="3 captions for 2 images"):
        data.ImageDataset(torch.zeros(2, 1, 4, 4), torch.zeros(2, dtype=torch.int64), "x",
                          "train", captions=("a", "b", "c"))


def test_identical_drawings_never_straddle_the_split():
    """Some codes share one SVG (a territory's flag drawn as its country's, "family" and
    "family: man, woman, boy"): the held-out set must not contain pixel copies of training
    images, or the memorisation check could never see a copy."""
    entries, _ = data.openmoji_catalogue()
    pairs = data.openmoji_identical_drawings(entries)
    assert ("1F46A", "1F468-200D-1F469-200D-1F466") in pairs or ("1F468-200D-1F469-200D-1F466", "1F46A") in pairs
    train_idx, test_idx = data.openmoji_split(entries, same_drawing=pairs)
    codes = [e.code for e in entries]
    test_codes = {codes[i] for i in test_idx}
    assert all((a in test_codes) == (b in test_codes) for a, b in pairs)
    # without the rule the default seed does put such a pair on both sides
    _, plain_test = data.openmoji_split(entries)
    plain = {codes[i] for i in plain_test}
    assert any((a in plain) != (b in plain) for a, b in pairs)
