"""Folk tunes that scan: the ABC reader against music21, the bar check's fixed leniencies,
the error tables, the music-aware tokeniser (lossless on the whole corpus), bits per tune,
and the metre constraint checked against the bar check by brute force."""

import math
import random
import warnings
from fractions import Fraction

import numpy as np
import pytest
import torch

from genart_utils import music, sampling, text


@pytest.fixture(scope="module")
def folk():
    return music.load_folk_tunes()


# ------------------------------------------------------------------------ the reader = music21

def music21_view(abc: str):
    """What music21's own tokenizer makes of a tune: the (source, length) of every note,
    rest and chord outside grace groups, and the bar symbols, for the text bars() reads."""
    music._music21()
    from music21 import abcFormat

    marked, _ = music._mark_line_breaks(abc)
    handler = abcFormat.ABCHandler()
    with warnings.catch_warnings(), music._quiet_and_limited(None):
        warnings.simplefilter("ignore")
        handler.process("X:1\n" + marked)
    notes, bar_lines = [], []
    for token in handler.tokens:
        if isinstance(token, abcFormat.ABCNote):
            if token.inGrace:
                continue
            length = Fraction(token.quarterLength)
            if token.activeTuplet is not None:
                length *= Fraction(token.activeTuplet.tupletMultiplier())
            notes.append((token.src, length))
        elif isinstance(token, abcFormat.ABCBar):
            bar_lines.append(token.src)
    return notes, bar_lines


def our_view(abc: str):
    marked, _ = music._mark_line_breaks(abc)
    tokens, _ = music._tokenize("X:1\n" + marked)
    notes: list = []
    music._read(tokens, music._ReadState(), None, notes, check_fields=False)
    return [(src, Fraction(length)) for src, length, _ in notes], [t.src for t in tokens if t.kind == "bar"]


def same_reading(abc: str) -> bool:
    """Both readers fail, or both give the same notes (to 1e-9) and bar symbols."""
    try:
        theirs = music21_view(abc)
    except Exception:
        theirs = None
    try:
        ours = our_view(abc)
    except music.AbcParseError:
        ours = None
    if theirs is None or ours is None:
        return theirs is None and ours is None
    return (theirs[1] == ours[1] and len(theirs[0]) == len(ours[0])
            and all(a[0] == b[0] and abs(float(a[1] - b[1])) < 1e-9 for a, b in zip(theirs[0], ours[0])))


def test_reader_reads_corpus_tunes_exactly_as_music21(folk):
    # A sample here (music21 takes milliseconds a tune); the whole corpus agrees except the
    # two tunes with inline [L:...] / [K:...] fields, which music21 reads as empty chords.
    sample = [t.abc for t in folk.tunes[::97]]
    assert len(sample) > 100
    assert all(same_reading(abc) for abc in sample)


def test_reader_reads_random_text_exactly_as_music21():
    # Random ABC-like text: quirks included (a note with H or an invisible rest x takes no
    # time, "^" alone is a note, "|1" is a bar line, tuplets count grace notes, errors).
    rng = random.Random(0)
    alphabet = list("ABCabcz xyHTu~.^=_,'/2348|:[]{}()<>-\"!\\MKkLZwn1\n") + \
        ["A2", "|:", ":|", "(3", "[1", "::", "K:D", "M:3/4", "L:1/16"]
    for _ in range(400):
        body = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 25)))
        head = rng.choice(["M:4/4\nL:1/8\nK:G\n", "M:6/8\nK:D\n", "M:2/4\nL:1/16\nK:C\n"])
        assert same_reading(head + body + rng.choice(["", "\n"])), head + body


# ------------------------------------------------------------------------ the bar check

HEAD = "M:4/4\nL:1/8\nK:G\n"


def test_fields_in_the_music_must_be_valid_or_the_tune_fails():
    # Before: "K:G2|ABC..." was read as a key field (music21 keeps "G" and drops the rest of
    # the line), so the music on that line was never heard nor bar-checked; the tune passed.
    for line, why in [("K:G2|ABCDEFGABCDE|", "not a key"), ("T:a title", "only M:, L: and K:"),
                      ("w:some lyrics", "only M:, L: and K:"), ("L:1/3", "not valid"),
                      ("M:abc", "could not parse")]:
        check = music.check_tune(HEAD + "GABc dedB | GABc d4 |\n" + line + "\nA8 |\n")
        assert not check.parsed and why in check.error, (line, check)
    for line in ("K:D", "K:Ador", "L:1/16", "M:3/4"):
        assert music.check_tune(HEAD + "GABc dedB | GABc d4 |\n" + line + "\nA8 |\n").parsed


def test_metre_changes_in_the_music_apply_from_where_they_are_written():
    # Before: music21's measure splitting dropped a field right after a bar line, so every
    # bar after "M:3/4" was measured against 4/4.
    tune = HEAD + "GABc dedB | GABc d4 |\nM:3/4\nABC DEF | A6 |\n"
    assert [(b.length, b.expected) for b in music.bars(tune)] == [(4, 4), (4, 4), (3, 3), (3, 3)]
    assert music.check_tune(tune).ok
    inline = HEAD + "GABc dedB | GABc d4 | [M:3/4] ABC DEF | A6 |\n"
    assert [b.expected for b in music.bars(inline)] == [4, 4, 3, 3]
    assert music.count_bad_bars(music.bars(HEAD + "A8 |\nM:3/4\nA8 |\n")) == 1   # now too long


def test_a_repeat_start_in_the_middle_of_a_tune_starts_a_section():
    # Before: "|:" counted as a plain bar line on both sides (music21 files a start repeat
    # only as the next measure's left bar line), so the upbeat after it was a bad bar.
    tune = HEAD + "A8 | A8 |: A2 | A8 | A6 :|\n"
    assert [(b.left, b.right) for b in music.bars(tune)][1:3] == [("|", "|:"), ("|:", "|")]
    assert music.check_tune(tune).ok
    assert music.count_bad_bars(music.bars(HEAD + "A8 | A8 | A2 | A8 | A6 :|\n")) == 1


def test_a_short_last_bar_without_a_bar_line_is_reported():
    # Before: a short bar at the very end without a bar line was dropped, so the bar before
    # it was judged as the last one and could be short.
    tune = "M:3/4\nL:1/8\nK:G\nG | BBG2zB | AAF2z\nA | GGE2zA | FED2z\nB | cBAG | A2G2z\n"
    tune_bars = music.bars(tune)
    assert tune_bars[-1].notes == ("A2", "G2", "z") and tune_bars[-1].right is None
    assert music.bar_verdicts(tune_bars)[-2:] == ["too short", "short, allowed"]


def test_bars_carry_their_notes_lengths_units_and_places():
    tune = "M:6/8\nL:1/8\nK:D\nA>B c (3def | d3 [FA]3 |\n"
    first, second = music.bars(tune)
    assert first.notes == ("A", "B", "c", "d", "e", "f") and first.unit == 0.5
    assert np.allclose(first.durations, (0.75, 0.25, 0.5, 1 / 3, 1 / 3, 1 / 3))      # > and (3
    assert tune[first.start:first.end] == "A>B c (3def"
    assert second.notes == ("d3", "[FA]3") and second.length == 3.0
    assert tune[second.start:second.end] == "d3 [FA]3"


def test_bar_table_and_error_rates():
    tunes = ["M:2/4\nL:1/8\nK:G\nAB cd | e2 f>g | a6 |\n",           # a bar too long
             "M:2/4\nL:1/16\nK:G\nA4 B4 | c8 | (3ABc d6 |]\n",       # fits
             "not a tune at all: X:"]                                 # unreadable: no rows
    rows = music.bar_table(tunes)
    assert [r["tune"] for r in rows] == [0, 0, 0, 1, 1, 1]
    r = rows[1]
    assert (r["unit"], r["expected"], r["length"], r["excess"], r["verdict"]) == ("1/8", 4.0, 4.0, 0.0, "fits")
    assert r["written"] == ("2", "", "") and r["rhythm"] == ("", "broken", "broken") and r["has_broken"]
    assert r["durations"] == (2.0, 1.5, 0.5) and r["position"] == 0.5 and r["music_line"] == 0
    bad = rows[2]
    assert bad["verdict"] == "too long" and bad["bad"] and bad["excess"] == 2.0
    assert rows[5]["rhythm"][:3] == ("tuplet",) * 3 and rows[5]["unit"] == "1/16"
    by_unit = {g["key"]: g for g in music.bar_error_rates(rows, "unit")}
    assert by_unit["1/8"]["bars"] == 3 and by_unit["1/8"]["bad"] == 1 and by_unit["1/8"]["too_long"] == 1
    assert by_unit["1/16"]["rate"] == 0.0
    by_length = {g["key"]: g["bars"] for g in music.bar_error_rates(rows, lambda r: set(r["written"]))}
    assert by_length["6"] == 2 and by_length[""] == 3 and by_length["2"] == 1
    with pytest.raises(KeyError, match="no field"):
        music.bar_error_rates(rows, "no such field")
    with pytest.raises(music.AbcParseError):
        music.bar_table(tunes, skip_unreadable=False)


# ------------------------------------------------------------------------ music-aware tokens

def test_every_corpus_tune_round_trips_through_the_music_tokens():
    # The GPT chapter's corpus (text.load_corpus("folk")), vocabulary from the training tunes.
    corpus = text.load_corpus("folk", valid_fraction=0.05, seed=0)
    vocab = text.MusicVocab.from_texts(corpus.train)
    tunes = corpus.train + corpus.valid
    assert len(tunes) > 10_000
    for tune in tunes:
        assert vocab.decode(vocab.encode(tune)) == tune
    stream = corpus.text("valid")
    ids, offsets = vocab.encode_with_offsets(stream)
    assert vocab.decode(ids) == stream and len(ids) < 0.8 * len(stream)       # fewer tokens
    assert all(stream.startswith(piece, at) or piece.startswith("<0x")     # a character unseen in
               for piece, at in zip(vocab.split(stream), offsets))            # training, as bytes


def test_music_tokens_are_whole_notes_bar_lines_and_fields():
    vocab = text.MusicVocab.from_texts(["M:6/8\nL:1/8\nK:G\n|: ^c'3/2 z2 [CE]2 (3ABc :|]\n"] * 2)
    assert vocab.split("M:6/8\nL:1/8\nK:G\n|: ^c'3/2 z2 [CE]2 (3ABc :|]\n") == [
        "M:6/8", "\n", "L:1/8", "\n", "K:G", "\n", "|:", " ", "^c'3/2", " ", "z2", " ", "[", "C",
        "E", "]", "2", " ", "(3", "A", "B", "c", " ", ":|", "]", "\n"]
    assert text.abc_lexemes('"Am"A>B !trill!c [K:D] |1 :|2 ::') == [
        '"Am"', "A", ">", "B", " ", "!trill!", "c", " ", "[K:D]", " ", "|1", " ", ":|2", " ", "::"]
    # unseen pieces fall back to characters, unseen characters to UTF-8 bytes
    odd = "K:Bphr\nG,,8 é€ ü|"
    assert vocab.decode(vocab.encode(odd)) == odd
    assert "<0xC3>" in vocab.split(odd) and vocab.token_texts[vocab.size - 1] is None
    strict = text.MusicVocab.from_texts(["A2 B2 |\n"] * 3, byte_fallback=False)
    assert strict.size == len(strict.tokens)
    with pytest.raises(ValueError, match="not in the vocabulary"):
        strict.encode("é")
    with pytest.raises(ValueError, match="ints in 0.."):
        strict.decode([strict.size])
    for piece in ("", "\n\n\n", "!!!", "[[[", '"""', "::::", "|]|]"):
        assert "".join(text.abc_lexemes(piece)) == piece
    with pytest.raises(TypeError, match="sequence of texts"):
        text.MusicVocab.from_texts("A2 B2")


def test_bits_per_document_count_every_character_once_for_any_tokeniser():
    docs = ["M:2/4\nL:1/8\nK:G\nAB cd | e4 |\n", "M:3/4\nL:1/8\nK:D\nd2 f2 a2 | g6 |]\n", "K:C\nz8\n"]
    stream, starts = text.scoring_stream(docs)
    assert stream == "\n" + "\n".join(docs) and starts.tolist() == [0, len(docs[0]) + 1,
                                                                     len(docs[0]) + len(docs[1]) + 2]
    char_vocab = text.CharVocab.from_texts(stream)
    music_vocab = text.MusicVocab.from_texts(docs * 2)
    for vocab in (char_vocab, music_vocab):
        ids, offsets = text.token_offsets(vocab, stream)
        # one nat per token: each document costs its number of scored tokens / ln 2
        bits = text.document_bits(-torch.ones(len(ids) - 1, dtype=torch.float64), offsets, starts)
        doc_of = np.searchsorted(starts, offsets[1:], side="right") - 1
        assert np.allclose(bits * math.log(2), np.bincount(doc_of, minlength=3))
    # characters: every character of every document is scored, plus the separator before it
    bits = text.document_bits(-np.ones(len(stream) - 1), np.arange(len(stream)), starts) * math.log(2)
    assert np.allclose(bits, [len(docs[0]), len(docs[1]) + 1, len(docs[2]) + 1])
    # with a real model the documents' bits add up to the stream's
    model = text.NGramModel(text.NGramConfig(order=2), music_vocab.size)
    model.fit(music_vocab.encode(stream * 3))
    per_doc = text.bits_per_document(model.log_probs, music_vocab, docs)
    assert per_doc.shape == (3,) and (per_doc > 0).all()
    assert np.isclose(per_doc.sum(), -model.log_probs(music_vocab.encode(stream)).sum() / math.log(2))
    with pytest.raises(ValueError, match="shape"):
        text.document_bits(np.zeros(3), np.arange(3), starts)


# ------------------------------------------------------------------------ the constraint

def as_it_stands(t: str) -> str:
    """The documented reading of unfinished text: close an open "..." or [...], judge a
    trailing accidental by its shortest note, ignore a trailing "[" (a chord or a bar line)."""
    line = t.rsplit("\n", 1)[-1]
    opened, dangling = None, False
    for i, c in enumerate(line):
        if opened:
            if c == {'"': '"', "[": "]", "{": "}"}[opened]:
                opened = None
        elif c in '"{':
            opened = c
        elif c == "[":
            dangling = i + 1 == len(line)
            if not dangling and line[i + 1] not in "|12":
                opened = "["
    if dangling:
        return t[:-1]
    if opened != '"' and t.endswith(("^", "_", "=")):
        t += "C"
    return t + {'"': '"', "[": "]"}.get(opened, "")


def in_time(t: str) -> bool:
    """The bar check on text as it stands: readable, no bar too long, and no finished bar
    short where bar_verdicts would not allow it (the last finished bar is not the tune's last)."""
    try:
        tune_bars = music.bars(as_it_stands(t))
    except music.AbcParseError:
        return False
    if any(b.expected is not None and b.length > b.expected + 1e-9 for b in tune_bars):
        return False
    finished = [b for b in tune_bars if b.right is not None]
    return "too short" not in music.bar_verdicts(finished + [music.Bar(0.0, None, None, None)])


def may_follow(prefix: str, piece: str) -> bool:
    t = prefix + piece
    return in_time(t) or (t.endswith("|") and any(in_time(t + x) for x in "|]:"))


PIECES = list("ABc234/ |:]([>z-.\n^=") + ["A2", "|]", "||", ":|", "|:", "(3", "z4", "[CE]", "[1",
                                         '"G"', "{g}", "^A", "=c/", "A>", "B3/2"]


def documented_refusal(prefix: str, piece: str) -> bool:
    """Pieces the constraint refuses outright (BarTracker's list), for PIECES."""
    line = prefix.rsplit("\n", 1)[-1]
    for i, c in enumerate(piece):
        opened, dangling, start = None, False, 0
        for j, d in enumerate(line):
            if opened:
                if d == {'"': '"', "[": "]", "{": "}"}[opened]:
                    opened = None
            elif d in '"{':
                opened, start = d, j
            elif d == "[":
                dangling = j + 1 == len(line)
                if not dangling and line[j + 1] not in "|12":
                    opened, start = "[", j
        close = {'"': '"', "[": "]", "{": "}"}.get(opened)
        full = opened is not None and len(line) - start >= {'"': 24, "[": 16, "{": 16}[opened]
        if opened != '"' and line.endswith(("^", "_", "=")):
            if not (c in "ABCDEFGabcdefg" or (c in "^_" and line[-1] == c and line[-2:-1] != c and not full)):
                return True                                       # a pitch after an accidental
        elif full and c != close:
            return True                                           # too long a construct
        elif opened in ("[", "{") and c != close and c not in music._NOTE_CHARS:
            return True                                           # only notes in [...] and {...}
        elif opened == '"' and c == "\n":
            return True
        elif dangling and c not in music._NOTE_CHARS and c not in "|]":
            return True
        elif c == ":" and line and line[-1].isupper() and piece[i + 1:i + 2] != "|":
            return True                                           # a field in mid-line
        line = "" if c == "\n" else line + c
    return False


@pytest.mark.parametrize("prompt", ["M:2/4\nL:1/8\nK:G\n", "M:6/8\nL:1/8\nK:C\n",
                                    "M:3/8\nL:1/16\nK:C\n", "M:none\nL:1/8\nK:C\n"])
def test_constraint_allows_exactly_what_keeps_the_bars_in_time(prompt):
    # Random walks under the constraint; at every step every piece is judged by the
    # constraint (incremental, windowed, its masks cached across walks and prompts by the
    # trackers' keys) and by the bar check on the whole text (bars(), brute force).
    rng = random.Random(len(prompt))
    for _ in range(2):
        constraint = sampling.MetreConstraint(PIECES, [prompt])
        tracker = constraint.trackers[0]
        for _ in range(25):
            mask = constraint.row_allowed(0).tolist()
            for piece, ours in zip(PIECES, mask):
                reference = may_follow(tracker.text, piece)
                assert not ours or reference, (tracker.text, piece)         # never out of time
                assert ours or not reference or documented_refusal(tracker.text, piece), (tracker.text, piece)
            constraint.advance([rng.choice([i for i, ok in enumerate(mask) if ok])])


def test_no_short_continuation_under_the_constraint_breaks_a_bar():
    # Every continuation of up to 4 pieces that the constraint allows step by step is in
    # time at every step (a dangling "|" waits for "||", "|]" or "|:"), and the constraint
    # is not vacuous: it cuts the tree of all 7**4 continuations.
    prompt = "M:3/4\nL:1/8\nK:G\nB2 |"
    alphabet = ["B", "2", "4", " ", "|", "\n", "z2"]
    frontier = [""]
    for _ in range(4):
        grown = []
        for seq in frontier:
            tracker = music.BarTracker(prompt)
            tracker.append(seq)
            grown += [seq + piece for piece in alphabet if tracker.allows(piece)]
        assert all(in_time(prompt + seq) or seq.endswith("|") for seq in grown)
        frontier = grown
    assert 0 < len(frontier) < len(alphabet) ** 4
    assert any(seq.endswith("4") for seq in frontier) and not any("B4 B4" in seq for seq in frontier)


def test_sampled_tunes_under_the_constraint_pass_the_bar_check():
    # A random-logits stand-in for a model: unconstrained it breaks most bars.
    prompts = ["M:2/4\nL:1/8\nK:G\n", "M:6/8\nL:1/8\nK:D\n", "M:3/4\nL:1/16\nK:C\n"] * 3
    vocab = text.CharVocab.from_texts("ABCDEFGabcdefgz234/ |:\n>(", *prompts)
    generator = torch.Generator().manual_seed(0)
    bias = torch.zeros(vocab.size)
    bias[vocab.encode("\n")] = -1.5                                 # tunes of a few lines

    def next_logits(seqs):
        return torch.randn(seqs.shape[0], vocab.size, generator=generator) + bias

    results = {}
    for constrain in (False, True):
        tunes, kept = sampling.generate_texts(next_logits, vocab, prompts, 120, constrain=constrain, seed=1)
        checks = []
        for p, t in zip(prompts, tunes):
            try:
                checks.append(music.count_bad_bars(music.bars(p + t)) == 0)
            except music.AbcParseError:
                checks.append(False)
        results[constrain] = (checks, kept)
    assert all(results[True][0]) and sum(results[False][0]) < len(prompts) // 2
    assert all(k < 0 for k in results[True][1]) and all(k == 0 for k in results[False][1])


def test_music_tokens_under_the_constraint_make_tunes_whose_bars_fit(folk):
    vocab = text.MusicVocab.from_texts([t.abc for t in folk.tunes[:400]], min_count=3)
    generator = torch.Generator().manual_seed(1)
    bias = torch.zeros(vocab.size)
    bias[vocab.encode("\n")] = 2.0

    def next_logits(seqs):
        return torch.randn(seqs.shape[0], vocab.size, generator=generator) + bias

    prompts = ["M:2/4\nL:1/16\nK:G\n", "M:6/8\nL:1/8\nK:D\n", "M:4/4\nL:1/8\nK:C\n"]
    tunes, kept = sampling.generate_texts(next_logits, vocab, prompts, 60, constrain=True, seed=0)
    for prompt, tune in zip(prompts, tunes):
        assert music.count_bad_bars(music.bars(prompt + tune)) == 0, tune
        assert sum(b.length for b in music.bars(prompt + tune)) > 0


def test_constraint_refuses_what_it_cannot_read_exactly():
    tracker = music.BarTracker("M:4/4\nL:1/8\nK:G\nAB")
    for piece in ("!", "!trill!", "%", "é", None, "", "T:", "G:x"):
        assert not tracker.allows(piece), piece
    assert tracker.allows(":|") and tracker.allows("2")
    assert not tracker.allows("\nM:3/4\n")                          # a field in mid-bar
    bar_end = music.BarTracker("M:4/4\nL:1/8\nK:G\nA8 |\n")
    assert bar_end.allows("M:3/4\n") and bar_end.allows("K:Dm\n") and bar_end.allows("L:1/16\n")
    assert not bar_end.allows("M:7/0\n") and not bar_end.allows("T:title\n") and not bar_end.allows("M:3/4 A|")
    quoted = music.BarTracker('M:4/4\nL:1/8\nK:G\n"Am')
    assert quoted.allows('"') and quoted.allows(" x") and not quoted.allows("\n")


@pytest.mark.parametrize("prompt, message", [
    ("L:1/8\nK:G\n", "no M: field"),
    ("M:7/0\nL:1/8\nK:G\n", "power of two"),
    ("M:abc\nK:G\n", "not a metre"),
    ("M:\nK:G\n", "not a metre"),
    ("M:6/8\nL:1/3\nK:G\n", "not a unit note length"),
    ("M:6/8\nL:x\nK:G\n", "not a unit note length"),
    ("M:2/4\nL:1/8\nK:G\nA8 B2 |", "cannot be continued in time"),
])
def test_malformed_metres_fail_with_clear_errors(prompt, message):
    with pytest.raises(ValueError, match=message):
        music.BarTracker(prompt)
    with pytest.raises(ValueError, match=message):
        sampling.MetreConstraint(list("AB2 |\n"), [prompt])


def test_metre_and_unit_values():
    assert music.parse_metre("6/8") == Fraction(3, 4) and music.parse_metre("C|") == 1
    assert music.parse_metre("none") is None and music.parse_unit("1/16") == Fraction(1, 16)
    for bad in ("7/0", "0/4", "3/5", "6/8/2", "", 6):
        with pytest.raises(ValueError):
            music.parse_metre(bad)
    # without L:, ABC's default unit: 1/16 below 3/4, else 1/8
    assert music.BarTracker("M:2/4\nK:G\n").unit == "1/16" and music.BarTracker("M:6/8\nK:G\n").unit == "1/8"


def test_constraint_keeps_grace_braces_paired():
    """check_tune fails a tune whose braces do not pair up, so the constraint never writes one."""
    tracker = music.BarTracker("M:2/4\nL:1/8\nK:G\n")
    assert not tracker.allows("}") and tracker.allows("{")
    tracker.append("{")
    assert not tracker.allows("{") and tracker.allows("g") and tracker.allows("}")
    tracker.append("g}")
    assert not tracker.allows("}") and tracker.allows('"G"')
    assert not tracker.allows('"{"') and not tracker.allows('"}"')        # a brace inside a chord symbol


def test_constraint_writes_quotes_only_in_whole_pairs():
    tracker = music.BarTracker("M:2/4\nL:1/8\nK:G\n")
    assert not tracker.allows('"') and tracker.allows('"G"') and not tracker.allows('"G"A"')
