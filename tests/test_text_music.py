"""Corpora, the tokeniser, n-gram models, and the ABC / MIDI / audio helpers."""

import itertools
import math
from collections import Counter

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
    roll, low = music.piano_roll_matrix(events, steps_per_quarter=2)
    assert low == 60 and roll.shape == (8, 8) and (roll > 0).sum() == 2 + 2 + 4
    assert (roll == 2).sum() == 3                                     # one onset per note
    audio = music.synthesize(events, tempo_qpm=120, sample_rate=8000)
    assert audio.dtype == np.float32 and np.abs(audio).max() <= 0.9 + 1e-6
    assert len(audio) == pytest.approx(2.05 * 8000, abs=2)           # 4 quarters at 120 qpm + tail
    spectrum = np.abs(np.fft.rfft(audio[:4000]))                      # the first note: middle C
    assert abs(np.argmax(spectrum) * 8000 / 4000 - 261.6) < 3
    with pytest.raises(ValueError, match="no notes"):
        music.synthesize([])


def test_piano_roll_matrix_keeps_repeated_notes_apart():
    repeated = music.abc_to_events("M:2/4\nL:1/4\nK:C\nC C | C2 |]\n")
    assert [(e.start, e.duration) for e in repeated] == [(0.0, 1.0), (1.0, 1.0), (2.0, 2.0)]
    roll, low = music.piano_roll_matrix(repeated, steps_per_quarter=2)
    assert low == 60 and roll.tolist() == [[2, 1, 2, 1, 2, 1, 1, 1]]
    held = music.piano_roll_matrix([music.NoteEvent(60, 0, 2)], steps_per_quarter=2)[0]
    assert held.tolist() == [[2, 1, 1, 1]]                            # one half note: one onset


def read_midi(data: bytes) -> tuple[list[tuple[int, float, float, int]], set[int], float]:
    """The notes (pitch, start, duration, velocity; times in quarter notes), programs and
    tempo (quarter notes per minute) of a MIDI file, from its raw events."""
    from music21 import midi

    mf = midi.MidiFile()
    mf.readstr(data)
    notes, programs, tempo = [], set(), None
    for track in mf.tracks:
        now, sounding = 0, {}
        for e in track.events:
            if isinstance(e, midi.DeltaTime):
                now += e.time
            elif e.type == midi.ChannelVoiceMessages.NOTE_ON and e.velocity > 0:
                sounding.setdefault(e.pitch, []).append((now, e.velocity))
            elif e.type in (midi.ChannelVoiceMessages.NOTE_OFF, midi.ChannelVoiceMessages.NOTE_ON):
                start, velocity = sounding[e.pitch].pop(0)
                notes.append((e.pitch, start, now - start, velocity))
            elif e.type == midi.ChannelVoiceMessages.PROGRAM_CHANGE:
                programs.add(e.data)
            elif e.type == midi.MetaEvents.SET_TEMPO:
                tempo = 60e6 / int.from_bytes(e.data, "big")
        assert not any(sounding.values()), "a note is never switched off"
    tpq = mf.ticksPerQuarterNote
    return sorted((p, s / tpq, d / tpq, v) for p, s, d, v in notes), programs, tempo


def test_midi_round_trip_keeps_every_note_tempo_and_instrument():
    events = [music.NoteEvent(60, 0.0, 1.0), music.NoteEvent(60, 1.0, 1.0),      # C C, not one C2
              music.NoteEvent(64, 1.0, 0.5), music.NoteEvent(67, 2.0, 2.0),      # overlapping notes
              music.NoteEvent(72, 4.0, 1 / 3), music.NoteEvent(76, 4.0, 1 / 3)]  # a chord of triplets
    notes, programs, tempo = read_midi(music.midi_bytes(events, tempo_qpm=90, velocity=70, program=40))
    expected = sorted((e.pitch, e.start, e.duration, 70) for e in events)
    assert [(p, v) for p, _, _, v in notes] == [(p, v) for p, _, _, v in expected]
    assert np.allclose([n[1:3] for n in notes], [e[1:3] for e in expected], atol=1e-3)
    assert programs == {40} and tempo == pytest.approx(90)


class _Hang(Exception):
    pass


def _with_alarm(seconds: float, call):
    """Run ``call()``; raise _Hang if it has not returned after ``seconds`` (the old MIDI
    writer looped forever on a negative time)."""
    import signal

    def on_alarm(signum, frame):
        raise _Hang()

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        return call()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("pitch, start, duration, field", [
    (60, -1.0, 1.0, "start"), (60, 0.0, 0.0, "duration"), (60, 0.0, -2.0, "duration"),
    (128, 0.0, 1.0, "pitch"), (-1, 0.0, 1.0, "pitch"), (60.5, 0.0, 1.0, "pitch"),
    (60, float("nan"), 1.0, "start"), (60, 0.0, float("inf"), "duration"),
])
def test_invalid_notes_raise_clear_errors_instead_of_hanging(pitch, start, duration, field):
    def make_midi():
        return music.midi_bytes([music.NoteEvent(pitch, start, duration)])

    try:
        with pytest.raises(ValueError, match=field):
            _with_alarm(1.0, make_midi)
    except _Hang:
        pytest.fail(f"midi_bytes did not return within 1 s for NoteEvent({pitch}, {start}, {duration})")


def test_invalid_events_are_refused_by_every_consumer():
    class Fake:                               # looks like a NoteEvent, but was never checked
        pitch, start, duration = 60, -1.0, 1.0

    for call in (music.midi_bytes, music.synthesize, music.piano_roll_matrix):
        with pytest.raises(ValueError, match="start must be >= 0"):
            call([music.NoteEvent(60, 0.0, 1.0), Fake()])
        with pytest.raises(ValueError, match="no notes"):
            call([])
    with pytest.raises(ValueError, match="tempo_qpm"):
        music.midi_bytes([music.NoteEvent(60, 0, 1)], tempo_qpm=0)
    with pytest.raises(ValueError, match="velocity"):
        music.midi_bytes([music.NoteEvent(60, 0, 1)], velocity=128)
    with pytest.raises(music.AbcParseError, match="MIDI range"):
        music.parse_abc("M:2/4\nL:1/8\nK:C\nc" + "'" * 7 + " c |]\n")         # MIDI pitch 156
    assert music.NoteEvent(np.int64(60), np.float32(0.5), 1) == music.NoteEvent(60, 0.5, 1.0)


def test_vocab_round_trip_and_unknown_characters():
    vocab = text.CharVocab.from_texts("abc", "cab\n")
    assert vocab.chars == "\nabc"
    assert vocab.decode(vocab.encode("cab\nab")) == "cab\nab"
    with pytest.raises(ValueError, match="not in the vocabulary: 'xz'"):
        vocab.encode("axz")


@pytest.mark.parametrize("ids", [[-1], [0, 4], torch.tensor([1, -2]), np.array([9]), [1.0], [True]])
def test_decode_refuses_ids_outside_the_vocabulary(ids):
    vocab = text.CharVocab("\nabc")
    with pytest.raises(ValueError, match=r"ints in 0\.\.3 \(this vocabulary has 4 characters\)"):
        vocab.decode(ids)
    with pytest.raises(ValueError, match="1-D"):
        vocab.decode(torch.zeros(2, 3, dtype=torch.long))
    assert vocab.decode(np.array([3, 1])) == "ca" and vocab.decode([np.int64(2)]) == "b"


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


def kneser_ney_reference(stream: list[int], order: int, vocab_size: int, discount: float | None = None):
    """Interpolated Kneser-Ney written out from its definition, one probability at a time.

    c_k(g) for a k-gram g is its number of occurrences at the highest order k = n and its
    continuation count |{v : v g occurs}| below; the discount of order k is
    n1 / (n1 + 2 n2) over the c_k (clipped to [0.001, 1], 0.5 when n1 + 2 n2 = 0);
    p_0 = 1 / |V|; a context with no counts at order k passes p_{k-1} through; a context
    shorter than n - 1 (the start of a text) is used as it is.
    """
    def occurrences(k):
        return [tuple(stream[i:i + k]) for i in range(len(stream) - k + 1)]

    counts = {}
    for k in range(1, order + 1):
        if k == order:
            counts[k] = Counter(occurrences(k))
        else:
            counts[k] = Counter(g[1:] for g in set(occurrences(k + 1)))
    discounts = {}
    for k, c in counts.items():
        n1 = sum(v == 1 for v in c.values())
        n2 = sum(v == 2 for v in c.values())
        d = discount if discount is not None else (n1 / (n1 + 2 * n2) if n1 + 2 * n2 else 0.5)
        discounts[k] = min(max(d, 1e-3), 1.0)

    def p(w, h):
        k = len(h) + 1
        lower = 1 / vocab_size if k == 1 else p(w, h[1:])
        following = {g[-1]: v for g, v in counts[k].items() if g[:-1] == h}
        total = sum(following.values())
        if total == 0:
            return lower
        d = discounts[k]
        return max(following.get(w, 0) - d, 0) / total + d * len(following) / total * lower

    return p


KN_STREAMS = {
    # 0 1 occurs only at the very start (no character before it); 3 never occurs
    "hand-made": [0, 1, 2, 0, 2, 2, 1, 0, 0, 2, 1, 2, 0, 2, 1, 1, 2, 0],
    "random": np.random.default_rng(4).integers(0, 4, 40).tolist(),
}


@pytest.mark.parametrize("stream", KN_STREAMS)
@pytest.mark.parametrize("order", [1, 2, 3, 4])
@pytest.mark.parametrize("discount", [None, 0.75])
def test_kneser_ney_matches_a_brute_force_reference(stream, order, discount):
    stream = KN_STREAMS[stream]
    V = 4
    model = text.NGramModel(text.NGramConfig(order=order, discount=discount), V).fit(stream)
    reference = kneser_ney_reference(stream, order, V, discount)
    for length in range(order):
        for h in itertools.product(range(V), repeat=length):
            expected = [reference(w, h) for w in range(V)]
            assert np.allclose(model.next_probs(list(h)), expected, rtol=1e-12, atol=0), h
    # scoring a text uses the same probabilities, with shorter contexts at its start
    test_text = [1, 0, 2, 3, 1, 1, 0, 2, 2]
    expected = [math.log(reference(test_text[i], tuple(test_text[max(0, i - order + 1):i])))
                for i in range(1, len(test_text))]
    assert np.allclose(model.log_probs(test_text), expected, rtol=1e-12, atol=0)


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
    for kwargs in ({"order": True}, {"discount": True}, {"alpha": float("inf")}):
        with pytest.raises(ValueError, match=f"NGramConfig.{next(iter(kwargs))}"):
            text.NGramConfig(**kwargs)
    assert text.NGramConfig(order=np.int64(4)).order == 4             # NumPy ints are ints
    with pytest.raises(ValueError, match="overflow"):
        text.NGramModel(text.NGramConfig(order=20), vocab_size=100)
    with pytest.raises(RuntimeError, match="fit"):
        text.NGramModel(text.NGramConfig(), 5).next_probs([1])
    model = text.NGramModel(text.NGramConfig(order=2), 3).fit([0, 1, 2, 1, 0])
    for context in ([3], [0, -1]):        # 3 would be read as another context's key
        with pytest.raises(ValueError, match=r"token ids in 0\.\.2 \(the model has 3 tokens\)"):
            model.next_probs(context)
    with pytest.raises(ValueError, match="token ids"):
        model.sample([5], max_new_tokens=3)
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.sample([0], max_new_tokens=-1)


def test_diversity_metrics():
    assert text.distinct_ngrams(["abcd", "abcd"], n=2) == 0.5
    assert text.repetition_rate("abababab", n=2) == pytest.approx(5 / 7)
    assert text.repetition_rate("abcdefg", n=2) == 0.0
    assert text.bits_per_char(math.log(2)) == pytest.approx(1.0)


def test_music_and_attention_figures():
    from matplotlib.figure import Figure

    from genart_utils import plotting

    events = music.abc_to_events("M:2/4\nL:1/4\nK:C\nC C | E G |]\n")
    fig = plotting.piano_roll(events, bar_times=[2.0])
    assert isinstance(fig, Figure) and len(fig.axes) == 1 and len(fig.axes[0].lines) == 1
    ax = fig.axes[0]
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("time (quarter notes)", "pitch")
    # one rectangle per note: the two Cs are drawn as two notes, not one half note
    boxes = sorted((p.get_x(), p.get_width(), p.get_y() + p.get_height() / 2) for p in ax.patches)
    assert boxes == [(0.0, 1.0, 60.0), (1.0, 1.0, 60.0), (2.0, 1.0, 64.0), (3.0, 1.0, 67.0)]
    assert all(p.get_linewidth() > 0 for p in ax.patches)            # outlined: touching notes stay apart
    assert [t.get_text() for t in ax.get_yticklabels()][:3] == ["C4", "D4", "E4"]
    with pytest.raises(TypeError, match="note events"):
        plotting.piano_roll(np.ones((3, 4)))
    weights = torch.softmax(torch.randn(3, 5, 5), -1).tril()
    fig = plotting.attention_map(weights, list("ab c\n"), titles=["h1", "h2", "h3"], ncols=2)
    assert isinstance(fig, Figure) and sum(len(ax.images) for ax in fig.axes) == 3
    fig, ax = plotting.new_figure()
    plotting.text_panel(ax, "M:2/4\nabc", title="t")
    assert ax.texts[0].get_text() == "M:2/4\nabc"


def test_music21_notebook_magic_timer_is_cancelled():
    # Imported in a notebook (music21 recognises one by sys.stderr's class name), music21 starts
    # a timer that loads its IPython extension a second later, in whatever cell is running;
    # under Colab's IPython 7.34 that prints a traceback. A fresh interpreter shows the timer
    # is cancelled by the package's single music21 import.
    import subprocess
    import sys

    code = (
        "import sys\n"
        "class OutStream:\n"
        "    def __init__(self, s): self.s = s\n"
        "    def write(self, x): return self.s.write(x)\n"
        "    def flush(self): self.s.flush()\n"
        "sys.stderr = OutStream(sys.__stderr__)\n"
        "from genart_utils import music\n"
        "music.corpus_folder()\n"
        "import music21.ipython21 as ip\n"
        "print(type(ip.t).__name__, ip.t.finished.is_set())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["Timer", "True"]
