"""Corpora, the tokeniser, n-gram models, and the ABC / MIDI / audio helpers."""

import math

import numpy as np
import pytest
import torch

from genart_utils import music, text

ABC_FILE = """%abc-2.1 a comment line
X:1
T: First tune
N: a note that is dropped
M: 3/4
L: 1/8
K: G
GAB c2d | e2d B2G %a trailing comment
w: some lyrics
A4 z2 |]

X:2
T: Second tune, no L: field
M:2/4
K:D
d2 fd | A2 F2 |

X:3
T: No key, skipped
M:2/4
abc |
"""




def test_extract_tunes_keeps_header_and_music_only():
    tunes, skipped = music.extract_tunes(ABC_FILE, "file.abc")
    assert skipped == 1 and len(tunes) == 2
    assert tunes[0].abc == "M:3/4\nL:1/8\nK:G\nGAB c2d | e2d B2G\nA4 z2 |]\n"
    assert tunes[0].title == "First tune" and tunes[0].source == "file.abc#1"
    assert tunes[1].unit == "1/16"                   # 2/4 < 3/4: the ABC default unit
    assert music.split_header(tunes[1].abc) == ({"M": "2/4", "L": "1/16", "K": "D"}, "d2 fd | A2 F2 |\n")


def test_bar_check_accepts_upbeats_and_rejects_wrong_bars():
    good = "M:3/4\nL:1/8\nK:G\nD2 | G2 B2 d2 | c4 B2 | A6 |]\n"
    assert music.check_tune(good).ok
    wrong = "M:3/4\nL:1/8\nK:G\nG2 B2 d2 | c4 B2 c2 | A6 | G6 |]\n"   # a 4/4 bar in 3/4
    result = music.check_tune(wrong)
    assert result.parsed and result.n_bad == 1 and not result.ok
    assert not music.check_tune("M:3/4\nL:1/8\nK:G\n").parsed        # no notes
    assert "unclosed" in music.check_tune('M:3/4\nL:1/8\nK:G\nG2 "Am B2 d2 | c6 |]\n').error
    # Essen style: a line break inside a bar continues the bar on the next line
    assert music.check_tune("M:2/4\nL:1/8\nK:C\nAB cd | e2\nf2 | g4 |]\n").ok
    assert [b.length for b in music.bars("M:2/4\nL:1/8\nK:C\nAB cd | e2\nf2 | g4 |]\n")] == [2.0, 2.0, 2.0]


def test_parsing_time_limit_stops_a_slow_block():
    import time
    start = time.perf_counter()
    with pytest.raises(music._TimeLimit):
        with music._quiet_and_limited(0.2):
            while True:
                pass
    assert time.perf_counter() - start < 2.0


def test_notes_piano_roll_midi_and_audio():
    events = music.abc_to_events("M:2/4\nL:1/8\nK:C\nC2 E2 | G4 |]\n")
    assert [(e.pitch, e.start, e.duration) for e in events] == [(60, 0.0, 1.0), (64, 1.0, 1.0), (67, 2.0, 2.0)]
    roll, low = music.piano_roll(events, steps_per_quarter=2)
    assert low == 60 and roll.shape == (8, 8) and roll.sum() == 2 + 2 + 4
    # the MIDI file reads back with music21's own MIDI parser
    from music21 import midi
    mf = midi.MidiFile()
    mf.readstr(music.midi_bytes(events, tempo_qpm=90))
    ons = [e for e in mf.tracks[0].events if e.type == midi.ChannelVoiceMessages.NOTE_ON and e.velocity > 0]
    assert [e.pitch for e in ons] == [60, 64, 67]
    audio = music.synthesize(events, tempo_qpm=120, sample_rate=8000)
    assert audio.dtype == np.float32 and np.abs(audio).max() <= 0.9 + 1e-6
    assert len(audio) == pytest.approx(2.05 * 8000, abs=2)           # 4 quarters at 120 qpm + tail
    spectrum = np.abs(np.fft.rfft(audio[:4000]))                      # the first note: middle C
    assert abs(np.argmax(spectrum) * 8000 / 4000 - 261.6) < 3
    with pytest.raises(ValueError, match="no notes"):
        music.synthesize([])


def test_vocab_round_trip_and_unknown_characters():
    vocab = text.CharVocab.from_texts("abc", "cab\n")
    assert vocab.chars == "\nabc"
    assert vocab.decode(vocab.encode("cab\nab")) == "cab\nab"
    with pytest.raises(ValueError, match="not in the vocabulary: 'xz'"):
        vocab.encode("axz")


def test_load_corpus_from_a_text_file_and_clear_errors(tmp_path):
    poems = "\n\n".join(f"poem {i}\nline two of {i}" for i in range(40))
    path = tmp_path / "poems.txt"
    path.write_text(poems, encoding="utf-8")
    corpus = text.load_corpus(path, valid_fraction=0.1, seed=0)
    assert len(corpus.train) == 36 and len(corpus.valid) == 4
    assert set(corpus.train).isdisjoint(corpus.valid)
    assert corpus.valid == text.load_corpus(path, valid_fraction=0.1, seed=0).valid   # seeded
    assert corpus.text("train").count("\n\n") == 35                   # blank line between documents
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match="not UTF-8"):
        text.load_corpus(bad)
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(ValueError, match="empty"):
        text.load_corpus(empty)
    with pytest.raises(FileNotFoundError, match="no file"):
        text.load_corpus(tmp_path / "missing.txt")
    with pytest.raises(IsADirectoryError):
        text.load_corpus(tmp_path)


def test_random_windows_are_shifted_by_one_and_resumable():
    ids = torch.arange(100)
    batches = text.random_windows(ids, block_size=8, batch_size=4, seed=1)
    x, y = next(batches)
    assert x.shape == y.shape == (4, 8) and torch.equal(y, x + 1)
    second = next(batches)[0]
    assert torch.equal(next(text.random_windows(ids, 8, 4, seed=1, start=1))[0], second)


@pytest.mark.parametrize("smoothing", ["kneser-ney", "additive"])
@pytest.mark.parametrize("order", [1, 2, 3, 5])
def test_ngram_probabilities_sum_to_one(order, smoothing):
    g = np.random.default_rng(order)
    train = g.integers(0, 5, 500)
    train[::3] = 2                                   # some structure; token 5 never occurs
    model = text.NGramModel(text.NGramConfig(order=order, smoothing=smoothing), vocab_size=6).fit(train)
    for context in ([], [2], [0, 1], [5, 5, 5, 5], list(train[:10]), [4, 2, 0, 3]):
        p = model.next_probs(context)
        assert p.shape == (6,) and (p > 0).all()
        assert math.isclose(p.sum(), 1.0, abs_tol=1e-12)
    # log_probs agrees with next_probs position by position
    seq = g.integers(0, 6, 30)
    lp = model.log_probs(seq)
    for i in (1, 2, 7, 29):
        assert math.isclose(lp[i - 1], math.log(model.next_probs(seq[:i])[seq[i]]), rel_tol=1e-12)


def test_ngram_additive_matches_the_formula_and_unigram_counts():
    train = np.array([0, 1, 1, 2, 1, 0])
    bigram = text.NGramModel(text.NGramConfig(order=2, smoothing="additive", alpha=0.5), 3).fit(train)
    # after token 1 the training text has 1 -> 1, 1 -> 2, 1 -> 0
    assert np.allclose(bigram.next_probs([1]), [(1 + 0.5) / (3 + 1.5)] * 3)
    assert np.allclose(bigram.next_probs([0]), [0.5 / 2.5, 1.5 / 2.5, 0.5 / 2.5])


def test_kneser_ney_beats_additive_on_held_out_text():
    corpus = text.load_corpus("folk", max_documents=400, seed=0)
    tr, va = corpus.ids("train"), corpus.ids("valid")
    kn = text.NGramModel(text.NGramConfig(order=4), corpus.vocab.size).fit(tr)
    add = text.NGramModel(text.NGramConfig(order=4, smoothing="additive"), corpus.vocab.size).fit(tr)
    assert kn.nll(va) < add.nll(va) < math.log(corpus.vocab.size)


def test_invalid_ngram_and_metric_arguments_raise():
    with pytest.raises(ValueError, match="order"):
        text.NGramConfig(order=0)
    with pytest.raises(ValueError, match="smoothing"):
        text.NGramConfig(smoothing="good-turing")
    with pytest.raises(ValueError, match="alpha"):
        text.NGramConfig(smoothing="additive", alpha=0)
    with pytest.raises(ValueError, match="discount"):
        text.NGramConfig(discount=1.5)
    with pytest.raises(ValueError, match="overflow"):
        text.NGramModel(text.NGramConfig(order=20), vocab_size=100)
    with pytest.raises(RuntimeError, match="fit"):
        text.NGramModel(text.NGramConfig(), 5).next_probs([1])


def test_diversity_metrics():
    assert text.distinct_ngrams(["abcd", "abcd"], n=2) == 0.5
    assert text.repetition_rate("abababab", n=2) == pytest.approx(5 / 7)
    assert text.repetition_rate("abcdefg", n=2) == 0.0
    assert text.bits_per_char(math.log(2)) == pytest.approx(1.0)


def test_music_and_attention_figures():
    from matplotlib.figure import Figure

    from genart_utils import plotting

    events = music.abc_to_events("M:2/4\nL:1/8\nK:C\nC2 E2 | G4 |]\n")
    roll, low = music.piano_roll(events)
    fig = plotting.piano_roll(roll, low, bar_times=[2.0])
    assert isinstance(fig, Figure) and len(fig.axes) == 1 and len(fig.axes[0].lines) == 1
    weights = torch.softmax(torch.randn(3, 5, 5), -1).tril()
    fig = plotting.attention_map(weights, list("ab c\n"), titles=["h1", "h2", "h3"], ncols=2)
    assert isinstance(fig, Figure) and sum(len(ax.images) for ax in fig.axes) == 3
    fig, ax = plotting.new_figure()
    plotting.text_panel(ax, "M:2/4\nabc", title="t")
    assert ax.texts[0].get_text() == "M:2/4\nabc"
