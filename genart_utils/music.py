"""Folk tunes in ABC notation: extraction from the music21 corpus, parsing, checks, sound.

The embedded corpus is the ABC files that ship inside the ``music21`` package:

* ``essenFolksong``: the Essen folksong collection (German, other European and over a
  thousand Chinese folk songs), ABC encodings by Seymour Shlien of the EsAC database.
  music21's ``corpus/essenFolksong/license.txt`` says that the legal status of the database
  is unclear (many people entered it), that the project's later director gave permission
  for non-commercial distribution and use of the files in music21, and that the ABC files
  are distributed with music21 by their encoder's permission. Whether that restriction
  extends to models trained on the files or to their outputs is a question of ethics and
  law that this package does not settle.
* ``oneills1850``: the tunes of O'Neill's *Music of Ireland* (1903), transcribed by Norbert
  Paap and others and distributed with music21 (without a licence file).

:func:`extract_tunes` reads those files as plain text, which takes well under a second for
the whole corpus; parsing whole collections with music21 would take minutes. Only one tune
at a time is ever given to music21's ABC parser (:func:`parse_abc`), to turn generated text
into notes.

Bars: :func:`bars` measures every bar as written, with the rules of music21's ABC tokenizer
re-implemented here (checked against music21 in tests/test_tunes.py; a whole-corpus pass
takes seconds instead of more than a minute); :func:`bar_verdicts` and :func:`check_tune`
judge them; :func:`bar_table` and :func:`bar_error_rates` tabulate where bars go wrong; and
:class:`BarTracker` follows a tune while it is written, which is what
:class:`genart_utils.sampling.MetreConstraint` builds on.

What a tune keeps (see :func:`extract_tunes`): the metre ``M:``, the unit note length ``L:``
and the key ``K:`` (in that order, in a normalised form) followed by the lines of music.
Everything else is dropped: the reference number ``X:``, titles, notes, origins, sources,
transcriber names, tempo marks, lyrics and ``%`` comments. They are metadata that a model
of the music has no use for (or, like lyrics, a different language).
"""

from __future__ import annotations

import contextlib
import functools
import io
import math
import re
import signal
import threading
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Iterable, NamedTuple, Sequence

import numpy as np

from .runtime import is_int, is_real


def _music21():
    """Import music21 once, without its notebook magic, and return it.

    Imported inside a notebook, music21 starts a timer that loads its IPython extension a
    second later, in whichever cell happens to be running then; with Colab's IPython 7.34
    that extension fails and prints a traceback into that cell. The book uses none of
    music21's magics, so the timer is cancelled before it fires.
    """
    import music21

    timer = getattr(getattr(music21, "ipython21", None), "t", None)
    if isinstance(timer, threading.Timer):
        timer.cancel()
    return music21


MUSIC21_COLLECTIONS: dict[str, str] = {
    "essen": "essenFolksong",
    "oneills": "oneills1850",
}
"""Short name -> folder under ``music21/corpus`` of the collections used by the book."""

_FIELD = re.compile(r"^([A-Za-z]):(.*)$")
_METER = re.compile(r"^(\d+/\d+|C\|?|none)$")
_UNIT = re.compile(r"^1/(1|2|4|8|16|32|64)$")
_BODY_FIELDS = ("K", "M", "L")  # inline changes of key, metre or unit length are music


@dataclass(frozen=True)
class AbcTune:
    """One tune: the header fields a model needs and the lines of music.

    ``abc`` is the text the models read: ``M:``, ``L:`` and ``K:`` lines, then the body,
    ending with a newline. ``title`` and ``source`` (``folder/file.abc#X``) are kept for
    reference only.
    """

    meter: str   # e.g. "6/8", "C" (common time), "C|" (cut time) or "none" (free)
    unit: str    # the unit note length, e.g. "1/8"
    key: str     # e.g. "G", "Gm", "Ddor"
    body: str    # the music, one line per line of the source, without a final newline
    title: str = ""
    source: str = ""

    @property
    def header(self) -> str:
        return f"M:{self.meter}\nL:{self.unit}\nK:{self.key}\n"

    @property
    def abc(self) -> str:
        return f"{self.header}{self.body}\n"


def default_unit(meter: str) -> str:
    """The unit note length ABC implies when ``L:`` is missing: 1/16 for metres below 3/4
    (as a fraction), else 1/8; 1/8 for free metre (``none``)."""
    if meter == "C":
        value = Fraction(1)
    elif meter == "C|":
        value = Fraction(1)
    elif "/" in meter:
        num, den = meter.split("/")
        value = Fraction(int(num), int(den))
    else:
        return "1/8"
    return "1/16" if value < Fraction(3, 4) else "1/8"


def _clean_music_line(line: str) -> str:
    line = line.split("%", 1)[0]            # a trailing comment
    line = line.replace("\t", " ")
    return re.sub(r" {2,}", " ", line).strip()


def extract_tunes(text: str, source: str = "") -> tuple[list[AbcTune], int]:
    """Split the text of an ABC file into tunes.

    A tune starts at an ``X:`` line and ends at the next blank line (the ABC standard's
    tune separator), the next ``X:`` line or the end of the text. Its header runs up to
    the ``K:`` line; of the header only ``M:``, ``L:`` and ``K:`` are kept (the first
    value of each, with spaces removed). A missing ``L:`` is replaced by the default the
    standard implies (:func:`default_unit`). In the body, comment lines and ``%``
    comments, lyrics (``w:``/``W:``) and all other field lines are dropped, except inline
    ``K:``, ``M:`` and ``L:`` changes, which are part of the music; runs of spaces become
    one space and empty lines are removed.

    Tunes without ``K:`` or ``M:``, with an unusual metre (e.g. ``FREI4/4``) or unit
    length, or with no music are skipped.

    Returns:
        The tunes, and the number of skipped tunes.
    """
    tunes: list[AbcTune] = []
    skipped = 0
    blocks: list[list[str]] = []
    current: list[str] | None = None
    for raw in text.splitlines():
        line = raw.rstrip()
        if line.startswith("X:"):
            current = [line]
            blocks.append(current)
        elif current is not None:
            if line.strip() == "":
                current = None                       # a blank line ends the tune
            else:
                current.append(line)
    for block in blocks:
        number = block[0][2:].strip()
        fields: dict[str, str] = {}
        body: list[str] = []
        in_header = True
        for line in block[1:]:
            match = _FIELD.match(line)
            if in_header:
                if match:
                    name, value = match.group(1), match.group(2).split("%", 1)[0]
                    fields.setdefault(name, re.sub(r"\s+", "", value) if name != "T"
                                      else value.strip())
                    if name == "K":
                        in_header = False
                continue
            if line.lstrip().startswith("%"):
                continue
            if match:
                if match.group(1) in _BODY_FIELDS:
                    value = re.sub(r"\s+", "", match.group(2).split("%", 1)[0])
                    body.append(f"{match.group(1)}:{value}")
                continue                             # lyrics and other fields
            cleaned = _clean_music_line(line)
            if cleaned:
                body.append(cleaned)
        meter, key = fields.get("M"), fields.get("K")
        unit = fields.get("L") or (default_unit(meter) if meter else None)
        if (not key or not meter or not _METER.match(meter) or not unit
                or not _UNIT.match(unit) or not body):
            skipped += 1
            continue
        tunes.append(AbcTune(meter=meter, unit=unit, key=key, body="\n".join(body),
                             title=fields.get("T", ""), source=f"{source}#{number}"))
    return tunes, skipped


def corpus_folder() -> Path:
    """The ``corpus`` folder of the installed music21 package."""
    folder = Path(_music21().__file__).parent / "corpus"
    if not folder.is_dir():
        raise FileNotFoundError(
            f"music21 is installed without its corpus (no folder {folder}); reinstall it with "
            "`pip install --force-reinstall music21`")
    return folder


def abc_files(collections: Iterable[str] = ("essen", "oneills")) -> list[Path]:
    """The ABC files of the named collections (keys of :data:`MUSIC21_COLLECTIONS`),
    sorted by path so that the corpus is always read in the same order."""
    files: list[Path] = []
    for name in collections:
        if name not in MUSIC21_COLLECTIONS:
            raise KeyError(f"unknown collection {name!r}; choose from {sorted(MUSIC21_COLLECTIONS)}")
        files.extend(sorted((corpus_folder() / MUSIC21_COLLECTIONS[name]).glob("*.abc")))
    return files


@dataclass(frozen=True)
class FolkCorpus:
    """The tunes extracted from the music21 ABC files, without duplicates."""

    tunes: tuple[AbcTune, ...]
    per_collection: dict            # collection name -> number of tunes kept
    duplicates: int                 # tunes dropped because an identical one came earlier
    skipped: int                    # tunes dropped by extract_tunes (no K:/M:, no music)


def load_folk_tunes(collections: Sequence[str] = ("essen", "oneills")) -> FolkCorpus:
    """Every tune of the chosen collections, read directly from the ABC files.

    Several files overlap (O'Neill's collection has a few tune ranges in two versions),
    so a tune whose ``abc`` text equals that of an earlier one is dropped: otherwise the
    same tune could land in both the training and the validation split.
    """
    seen: set[str] = set()
    kept: list[AbcTune] = []
    per_collection: dict[str, int] = {}
    duplicates = skipped = 0
    for name in collections:
        count = 0
        for path in abc_files([name]):
            text = path.read_text(encoding="utf-8", errors="replace")
            tunes, n_skipped = extract_tunes(text, f"{path.parent.name}/{path.name}")
            skipped += n_skipped
            for tune in tunes:
                if tune.abc in seen:
                    duplicates += 1
                    continue
                seen.add(tune.abc)
                kept.append(tune)
                count += 1
        per_collection[name] = count
    return FolkCorpus(tuple(kept), per_collection, duplicates, skipped)


def split_header(abc: str) -> tuple[dict[str, str], str]:
    """Read the leading ``M:``/``L:``/``K:`` lines of a tune: ``({"M": ..}, body)``."""
    fields: dict[str, str] = {}
    lines = abc.split("\n")
    i = 0
    while i < len(lines) and len(fields) < 3:
        match = _FIELD.match(lines[i])
        if not match or match.group(1) not in ("M", "L", "K") or match.group(1) in fields:
            break
        fields[match.group(1)] = match.group(2).strip()
        i += 1
    return fields, "\n".join(lines[i:])


# ------------------------------------------------------------------------ parsing

class AbcParseError(ValueError):
    """music21 could not read a tune (or took too long trying)."""


class _TimeLimit(Exception):
    pass


@contextlib.contextmanager
def _quiet_and_limited(seconds: float | None):
    """Silence music21's warnings on stderr and, where the platform allows (a Unix main
    thread), stop the block with :class:`_TimeLimit` after ``seconds``."""
    use_alarm = (seconds is not None and hasattr(signal, "setitimer")
                 and threading.current_thread() is threading.main_thread())
    previous = None
    if use_alarm:
        def on_alarm(signum, frame):
            raise _TimeLimit()
        previous = signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        if use_alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)


def parse_abc(abc: str, time_limit: float | None = 3.0):
    """Parse ONE tune with music21's ABC parser and return the ``music21`` Score.

    ``abc`` is a tune as the models write it (``M:``, ``L:``, ``K:``, then music); an
    ``X:`` line is added in front because music21 expects one. music21 can take minutes on
    some malformed text, so parsing stops after ``time_limit`` seconds (on Unix, in the main
    thread; ``None``: no limit). music21's warnings are not printed.

    Raises:
        AbcParseError: with music21's message, for text it cannot read, that holds no
            notes, that has a note outside the MIDI range 0..127 (too many octave marks),
            or that takes longer than ``time_limit``; also for an odd number of ``"`` or
            unbalanced ``{}``, which music21 would accept by dropping music.
    """
    import warnings

    _music21()
    from music21 import converter

    # music21 reads everything after an unclosed quote as one chord symbol (or after an
    # unclosed brace as grace notes) and silently drops that music; no real tune has either.
    if abc.count('"') % 2:
        raise AbcParseError('an unclosed " (chord symbol or annotation) would swallow the rest of the tune')
    if abc.count("{") != abc.count("}"):
        raise AbcParseError("unbalanced { } (grace notes)")
    text = abc if abc.lstrip().startswith("X:") else "X:1\n" + abc
    try:
        with warnings.catch_warnings(), _quiet_and_limited(time_limit):
            warnings.simplefilter("ignore")
            score = converter.parse(text, format="abc")
            pitches = [p.ps for n in score.flatten().notes for p in n.pitches]
    except _TimeLimit:
        raise AbcParseError(f"music21 took longer than {time_limit} s to parse the tune") from None
    except Exception as exc:  # music21 raises many kinds of errors on bad input
        raise AbcParseError(f"music21 could not parse the tune: {type(exc).__name__}: {exc}") from exc
    if not pitches:
        raise AbcParseError("the tune parsed but contains no notes")
    if not 0 <= min(pitches) <= max(pitches) <= 127:
        raise AbcParseError(f"the tune has a note outside the MIDI range 0..127 (MIDI pitch "
                            f"{min(pitches) if min(pitches) < 0 else max(pitches):g}): too many octave marks")
    return score


@dataclass(frozen=True)
class BarCheck:
    """The result of :func:`check_tune`."""

    parsed: bool        # music21 read the tune and found notes, and every field in the music is valid
    n_bars: int         # measures found
    n_bad: int          # measures whose length does not fit the metre
    free: bool = False  # free metre (M:none): there is no bar length to check
    error: str = ""     # why parsing failed, if it did

    @property
    def ok(self) -> bool:
        """Parsed and every bar of the right length (at least two bars, unless the metre
        is free)."""
        return self.parsed and self.n_bad == 0 and (self.free or self.n_bars >= 2)


_BAR_AT_END = re.compile(r"(\||\|\]|\|:|::)\s*$")
_PLAIN_BARS = (None, "|")   # bar lines that neither end nor start a section
_LINE_BREAK = "[|"   # marks a line break without a bar line (a bar symbol rare in the corpus)


@dataclass(frozen=True)
class Bar:
    """One bar of a tune as written: its length and the length its metre asks for."""

    length: float               # in quarter notes (tuplets, broken rhythms applied; grace notes 0)
    expected: float | None      # the metre's bar length in quarter notes; None for free metre
    left: str | None            # the bar line before it, as written ("|", "|:", "||", ...)
    right: str | None           # the bar line after it (None at the end of the text)
    notes: tuple[str, ...] = ()         # its notes, rests and chords as written ("A2", "^c/", "[CE]2", "z4")
    durations: tuple[float, ...] = ()   # their lengths in quarter notes, in the same order
    unit: float | None = None   # the unit note length L: in quarter notes (0.5 for L:1/8)
    start: int = -1             # offset in the tune text of its first note
    end: int = -1               # offset just after its last note


# ------------------------------------------------------------------------ reading ABC as music21 does
# music21's ABC tokenizer (abcFormat.ABCHandler) decides what is a note, a bar line or a field,
# and how long each note is. check_tune uses music21 to parse, so the bars must be read the same
# way; music21 itself is too slow to ask at every step of constrained sampling (milliseconds per
# call). What follows re-implements the rules of music21 9.x's tokenizer that decide durations
# and bar lines (including its quirks: a note written with the fermata "H" or an invisible rest
# "x" has no duration, a single ":" is a bar line, "|1" is a bar line and a first ending, ...).
# tests/test_tunes.py checks it token by token against music21 on the corpus and on random text.

_DECORATION_OR_ACCIDENTAL = ".~^=_HLMOPSTuv"     # may precede the pitch letter of a note
_NOT_A_PITCH = "~wuvhHLTSN"                      # letters not taken as the pitch after those
_BAR_SYMBOLS = (":|1", ":|2", "|]", "||", "[|", "[1", "[2", "|1", "|2", ":|", "|:", "::", "|", ":")
_BAR_STARTS = {c: tuple(b for b in _BAR_SYMBOLS if b[0] == c) for c in ":|["}   # longest first
_BAR_PARTS = {"::": (":|", "|:"), "|1": ("|", "[1"), "|2": ("|", "[2"), ":|1": (":|", "[1"),
              ":|2": (":|", "[2")}
_IGNORED_WORDS = frozenset({
    "w", "u", "v", "v.", "h", "H", "vk", "uk", "U", "~", ".", "=", "V", "S", "s", "i", "I", "ui",
    "u.", "Q", "Hy", "Hx", "r", "m", "M", "n", "N", "o", "O", "P", "l", "L", "R", "y", "T", "t",
    "x", "Z"})
_IGNORED_AFTER_CHORD_SYMBOL = "uvkKQ.yTwhx"
_DYNAMICS = frozenset({"!crescendo(!", "!crescendo)!", "!diminuendo(!", "!diminuendo)!"})
_SINGLE_MARKS = {".": "other", "u": "other", "v": "other", "K": "other", "k": "other", "M": "other",
                 "{": "grace_start", "}": "grace_stop"}
_CHORD_SYMBOL = re.compile(r'"[^"]*"')
_LENGTH_RUN = re.compile(r"[0-9,/']*")   # after a pitch: octave marks and length (str.isdigit: see below)
_PITCH_LETTER = re.compile("[a-gA-Gz]")
_INLINE_FIELD = re.compile(r"^\[([A-Za-z]):([^\]]*)\]$")
_KEY = re.compile(r"^(?:none|HP|Hp|[A-Ha-h][#b]?[A-Za-z]*)$")
_BROKEN = {">": (Fraction(3, 2), Fraction(1, 2)), "<": (Fraction(1, 2), Fraction(3, 2)),
           ">>": (Fraction(7, 4), Fraction(1, 4)), "<<": (Fraction(1, 4), Fraction(7, 4)),
           ">>>": (Fraction(15, 8), Fraction(1, 8)), "<<<": (Fraction(1, 8), Fraction(15, 8))}
_TUPLET_NORMAL = {1: 1, 2: 3, 3: 2, 4: 3, 5: None, 6: 2, 7: None, 8: 3, 9: None}  # None: 3 if compound else 2


class _Token(NamedTuple):
    kind: str      # meta, bar, note, chord, tuplet, broken, grace_start, grace_stop or other
    src: str       # as music21 collects it (a chord symbol in quotes is prepended to its note)
    pos: int       # offset of its first character in the scanned text
    pending: str   # the chord symbol read before it and not yet attached to a note


def _tokenize(s: str, chord_symbol: str = "") -> tuple[list[_Token], str]:
    """Split ABC text into tokens exactly as music21's ``ABCHandler.tokenize`` does.

    ``chord_symbol`` is a chord symbol (``"Am"``) read before ``s`` and not yet attached to
    a note. Returns the tokens and the chord symbol still pending at the end.

    Raises:
        AbcParseError: where music21's tokenizer fails (it indexes past the end of the text).
    """
    tokens: list[_Token] = []
    n = len(s)
    pos, skip = -1, 0
    while pos < n - 1:
        pos += 1 + skip
        skip = 0
        if pos > n - 1:
            break
        c = s[pos]
        c1 = s[pos + 1] if pos + 1 < n else None
        c2 = s[pos + 2] if pos + 2 < n else None
        if c == "%":                                          # a comment, to the end of the line
            j = s.find("\n", pos + 1)
            skip = (n if j < 0 else j) - (pos + 1)
            continue
        if c1 == ":" and c2 is not None and c2 != "|" and (c == "w" or (c.isalpha() and c.isupper())):
            j = s.find("\n", pos + 1)                         # a field, to the end of the line
            j = n if j < 0 else j
            tokens.append(_Token("meta", s[pos:j].strip(), pos, chord_symbol))
            skip = j - (pos + 1)
            continue
        if c in _BAR_STARTS:                                  # the longest bar symbol that matches
            bar = None
            for symbol in _BAR_STARTS[c]:
                if s.startswith(symbol, pos):
                    bar = symbol
                    break
            if bar is not None:
                skip = len(bar) - 1
                tokens.extend(_Token("bar", part, pos, chord_symbol) for part in _BAR_PARTS.get(bar, (bar,)))
                continue
        if c == "(" and c1 is not None and c1.isdigit():      # a tuplet: (p, (p:q, (p:q:r
            j = pos + 2
            if j > n - 1:
                raise AbcParseError("music21 could not tokenize the tune: a tuplet at the very end")
            if s[j] == ":":
                q = s[j + 1] if j + 1 < n else None
                j += 1
                if q is not None and q.isdigit():
                    j += 1
                if j > n - 1:
                    raise AbcParseError("music21 could not tokenize the tune: a tuplet at the very end")
                if s[j] == ":":
                    r = s[j + 1] if j + 1 < n else None
                    j += 1
                    if r is not None and r.isdigit():
                        j += 1
            tokens.append(_Token("tuplet", s[pos:j], pos, chord_symbol))
            skip = j - (pos + 1)
            continue
        if c in "<>":
            j = pos + 1
            while j < n - 1 and s[j] in "<>":
                j += 1
            tokens.append(_Token("broken", s[pos:j], pos, chord_symbol))
            skip = j - (pos + 1)
            continue
        if c == "!":                                          # !decoration!, within 20 characters
            j = pos + 1
            while j < pos + 20 and j < n:
                if s[j] == "!":
                    if s[pos:j + 1] in _DYNAMICS:
                        tokens.append(_Token("other", s[pos:j + 1], pos, chord_symbol))
                    skip = j - pos
                    break
                j += 1
            continue
        if c == "(" and c1 is not None:                       # a slur (c1 is not a digit here)
            tokens.append(_Token("other", c, pos, chord_symbol))
            continue
        if c in ")-":
            tokens.append(_Token("other", c, pos, chord_symbol))
            continue
        if c == '"':                                          # a chord symbol or annotation
            j = pos + 1
            while j < n - 1 and s[j] != '"':
                j += 1
            j += 1
            chord_symbol += s[pos:j]
            skip = j - (pos + 1)
            continue
        if c == "[":                                          # a chord, with its length after "]"
            j = pos + 1
            while j < n - 1 and s[j] != "]":
                j += 1
            j += 1
            while j < n and (s[j].isdigit() or s[j] == "/"):
                j += 1
            tokens.append(_Token("chord", chord_symbol + s[pos:j], pos, chord_symbol))
            chord_symbol = ""
            skip = j - (pos + 1)
            continue
        if c in _SINGLE_MARKS:
            tokens.append(_Token(_SINGLE_MARKS[c], c, pos, chord_symbol))
            continue
        if c.isalpha() or c in "~^=_":                        # a note, rest or stray letter
            found = c.isalpha() and c not in _DECORATION_OR_ACCIDENTAL
            j = pos + 1
            while j <= n - 1:
                cj = s[j]
                if not found and cj in _DECORATION_OR_ACCIDENTAL:
                    j += 1
                    if j > n - 1:
                        raise AbcParseError("music21 could not tokenize the tune: a decoration or "
                                            "accidental at the very end")
                    continue
                if not found and cj.isalpha() and cj not in _NOT_A_PITCH:
                    found = True
                    j += 1
                    continue
                if cj.isdigit() or cj in ",/'":
                    j = max(j + 1, _LENGTH_RUN.match(s, j).end())
                    continue
                break
            pending, src = chord_symbol, chord_symbol + s[pos:j]
            chord_symbol = ""
            skip = j - (pos + 1)
            if (src in _IGNORED_WORDS
                    or (src.startswith('"') and (src[-1] in _IGNORED_AFTER_CHORD_SYMBOL or src.endswith("v.")))
                    or src.startswith(("x", "H", "Z"))
                    or (len(src) > 1 and src[0] == "=" and src[1].isdigit())):
                continue                                      # music21 drops these
            tokens.append(_Token("note", src, pos, pending))
    return tokens, chord_symbol


@functools.lru_cache(maxsize=8192)
def _note_length(src: str, unit: Fraction | None) -> Fraction:
    """The length in quarter notes of a note written ``src`` (without a chord symbol), as
    music21's ``ABCNote.getQuarterLength`` computes it from the digits and slashes in it."""
    if unit is None:
        raise AbcParseError("music21 could not tokenize the tune: a note before any L: or M: field")
    digits = "".join(ch for ch in src if ch.isdigit() or ch == "/")
    try:
        if digits == "":
            return unit
        if digits in ("/", "//", "///"):
            return unit / (2 ** len(digits))
        if digits.startswith("/"):
            return unit / int(digits.split("/")[1])
        if digits.endswith("/"):
            return unit * int(digits.split("/", 1)[0]) / 2
        if digits.count("/") == 2:
            return Fraction(1)                                # music21: "unparsable", one quarter
        if "/" in digits:
            num, den = digits.split("/")
            return unit * int(num) / int(den)
        return unit * int(digits)
    except (ValueError, ZeroDivisionError) as exc:
        raise AbcParseError(f"music21 could not read the length of the note {src!r}: {exc}") from None


def _strip_chord_symbols(src: str) -> str:
    if '"' not in src:
        return src
    matches = list(_CHORD_SYMBOL.finditer(src))
    if not matches:
        raise AbcParseError(f"music21 could not read {src!r}: an unclosed chord symbol")
    return src[matches[-1].end():]


def _is_rest(src: str) -> bool:
    """music21's rest test for a note inside a chord: its first pitch letter is ``z``."""
    if len(src) > 1 and src[0] in "uT":
        src = src[1:]
    found = _PITCH_LETTER.findall(src.replace("T", ""))
    return bool(found) and found[0] == "z"


def _chord_length(src: str, unit: Fraction | None, broken: Fraction) -> Fraction:
    """music21's ``ABCChord`` length: the first sounding note inside times the length after ``]``."""
    body = _strip_chord_symbols(src)
    close = body.find("]")
    if close < 0:
        raise AbcParseError(f"music21 could not read the chord {src!r}: no closing bracket")
    outer = _note_length(body[close + 1:], Fraction(1)) * broken
    inner_tokens, _ = _tokenize(body[1:close])
    inner = Fraction(0)
    for token in inner_tokens:
        if token.kind == "note":
            if _is_rest(_strip_chord_symbols(token.src)):
                continue
            length = _note_length(_strip_chord_symbols(token.src), unit)
        elif token.kind == "chord":                           # music21 gives a nested chord no unit
            length = _chord_length(token.src, None, Fraction(1))
        else:
            continue
        if not inner:
            inner = length
    return outer * inner


@functools.lru_cache(maxsize=256)
def _music21_metre(value: str) -> tuple[Fraction | None, bool]:
    """``(bar length in quarter notes or None, compound?)`` for an ``M:`` value, read as
    music21 reads it (``none`` is free metre; ``FREI4/4`` is 4/4)."""
    if value.lower() == "none":
        return None, False
    if value in ("C", "C|"):
        return Fraction(4), False
    _music21()
    from music21 import common, meter

    try:
        num, den = value.split("/")
        n = int(common.getNumFromStr(num.strip())[0])
        d = int(common.getNumFromStr(den.strip())[0])
        ts = meter.TimeSignature(f"{n}/{d}")
        return Fraction(ts.barDuration.quarterLength), ts.beatDivisionCount == 3
    except Exception as exc:
        raise AbcParseError(f"music21 could not read the metre M:{value}: {type(exc).__name__}: {exc}") from None


def _music21_unit(value: str) -> Fraction:
    """The unit note length of an ``L:`` value in quarter notes, as music21 reads it."""
    try:
        if "/" not in value:
            raise ValueError("no '/'")
        num, den = value.split("/")
        return Fraction(int(num.strip()) * 4, 4 if den == "G" else int(den.strip()))
    except (ValueError, ZeroDivisionError) as exc:
        raise AbcParseError(f"music21 could not read the unit length L:{value}: {exc}") from None


def _field_parts(src: str) -> tuple[str, str]:
    """``(letter, value)`` of a field token as music21 splits it (a ``%`` comment removed)."""
    return src[0], src.split("%", 1)[0][2:].strip()


def _check_music_field(letter: str, value: str) -> None:
    """A field inside the music must be a valid metre, unit length or key.

    Raises:
        AbcParseError: saying what is wrong; such text would otherwise be dropped unheard.
    """
    if letter not in ("M", "L", "K"):
        raise AbcParseError(
            f"{letter}:{value} in the music is read as a field (a letter and a colon start a field "
            "that runs to the end of the line), but only M:, L: and K: fields may stand in the "
            "music: ABC readers, music21 too, drop any other field with the music written in it")
    try:
        if letter == "M":
            parse_metre(value)
        elif letter == "L":
            parse_unit(value)
    except ValueError as exc:
        raise AbcParseError(f"the field {letter}:{value} in the music is not valid: {exc}") from None
    if letter == "K" and not _KEY.match(value):
        raise AbcParseError(
            f"K:{value} in the music is not a key (write e.g. K:G, K:Dm or K:Ador); music21 would "
            "take what it can of it as a key and drop the rest of the line, with any music in it")


class _ReadState:
    """Everything the reading of the rest of a tune depends on (see :class:`BarTracker`)."""

    __slots__ = ("unit", "expected", "compound", "tuplet", "grace", "chord_symbol", "header_done",
                 "length", "n_notes", "left", "n_bars", "prev_right")

    def __init__(self) -> None:
        self.unit: Fraction | None = None       # the active unit length in quarter notes
        self.expected: Fraction | None = None   # the metre's bar length in quarter notes (None: free)
        self.compound = False                   # the metre divides its beats in three (tuplet rule)
        self.tuplet: tuple | None = None        # (length multiplier, notes still to be counted)
        self.grace = False                      # inside { } (grace notes take no time)
        self.chord_symbol = ""                  # a chord symbol waiting for its note
        self.header_done = False                # the K: field that ends the header has been read
        self.length = Fraction(0)               # the current bar so far
        self.n_notes = 0                        # its notes (grace notes not counted)
        self.left: str | None = None            # the bar line before it
        self.n_bars = 0                         # bars completed
        self.prev_right: str | None = None      # the bar line that ended the previous bar

    def key(self) -> tuple:
        return (self.unit, self.expected, self.compound, self.tuplet, self.grace,
                bool(self.chord_symbol), self.header_done, self.length, self.n_notes > 0,
                self.left, self.n_bars > 0, self.prev_right)

    def copy(self) -> "_ReadState":
        other = _ReadState.__new__(_ReadState)
        for name in _ReadState.__slots__:
            setattr(other, name, getattr(self, name))
        return other


def _read(tokens: Sequence[_Token], state: _ReadState, bars_out: list | None = None,
          notes_out: list | None = None, check_fields: bool = True) -> _ReadState:
    """Read tokens (from :func:`_tokenize`) into ``state`` (changed in place and returned).

    Completed bars are appended to ``bars_out`` as ``(length, expected, left, right,
    unit)`` (lengths as fractions); with ``notes_out``, the notes of the current bar are
    collected there as ``(src, length, pos)`` and handed over with each bar.

    The lengths follow music21's ``ABCHandler.tokenProcess`` (broken rhythms between two
    adjacent note tokens, tuplets counting notes, grace notes, unit length from ``L:`` or
    from the first ``M:``). The bars follow :func:`bars`. With ``check_fields`` (as
    :func:`bars` reads), a field after the header must be a valid ``M:``, ``L:`` or ``K:``.
    """
    broken: dict[int, Fraction] = {}
    for i in range(1, len(tokens) - 1):
        if tokens[i].kind == "broken" and tokens[i - 1].kind in ("note", "chord") \
                and tokens[i + 1].kind in ("note", "chord"):
            left_factor, right_factor = _BROKEN.get(tokens[i].src, (Fraction(1), Fraction(1)))
            broken[i - 1] = left_factor
            broken[i + 1] = right_factor
    st = state
    for i, token in enumerate(tokens):
        kind = token.kind
        if kind == "chord":
            match = _INLINE_FIELD.match(_strip_chord_symbols(token.src)) if check_fields else None
            if match:                                         # [M:3/4], [L:1/16], [K:D]
                letter, value = match.group(1), match.group(2).strip()
                _check_music_field(letter, value)
                if letter == "M":
                    st.expected = parse_metre(value) * 4 if parse_metre(value) is not None else None
                elif letter == "L":
                    st.unit = parse_unit(value) * 4
                continue
        if kind == "meta":
            letter, value = _field_parts(token.src)
            if st.header_done and check_fields:
                _check_music_field(letter, value)
            if letter == "M":
                st.expected, st.compound = _music21_metre(value)
                if st.unit is None:
                    free_or_long = st.expected is None or st.expected >= 3
                    st.unit = Fraction(1, 2) if free_or_long else Fraction(1, 4)
            elif letter == "L":
                st.unit = _music21_unit(value)
            elif letter == "K":
                st.header_done = True
            continue
        if kind == "tuplet":
            parts = token.src.split(":")
            p = int(parts[0][1:])
            if p not in _TUPLET_NORMAL:
                raise AbcParseError(f"music21 cannot read the tuplet {token.src!r}")
            q = int(parts[1]) if len(parts) >= 2 and parts[1] != "" else \
                (_TUPLET_NORMAL[p] or (3 if st.compound else 2))
            r = int(parts[2]) if len(parts) >= 3 and parts[2] != "" else p
            if q == 0:
                raise AbcParseError(f"music21 cannot read the tuplet {token.src!r}")
            st.tuplet = (Fraction(q, p), r)
            continue
        if kind == "grace_start":
            st.grace = True
            continue
        if kind == "grace_stop":
            st.grace = False
            continue
        if kind in ("note", "chord"):
            factor = broken.get(i)
            if kind == "note":
                length = _note_length(_strip_chord_symbols(token.src), st.unit)
                if factor is not None:
                    length = length * factor
            else:
                length = _chord_length(token.src, st.unit, Fraction(1) if factor is None else factor)
            if st.tuplet is not None:
                multiplier, remaining = st.tuplet
                if remaining == 0:
                    st.tuplet = None
                else:
                    st.tuplet = (multiplier, remaining - 1)
                    length = length * multiplier
            if st.grace:
                continue
            st.length += length
            st.n_notes += 1
            if notes_out is not None:
                notes_out.append((token.src, length, token.pos))
            continue
        if kind == "bar":
            if st.n_notes == 0:
                st.left = token.src                           # bar lines between bars
                continue
            right = token.src
            if right == _LINE_BREAK:
                if st.expected is not None and st.length < st.expected:
                    continue                                  # the bar goes on after the break
                right = "|"
            if bars_out is not None:
                bars_out.append((st.length, st.expected, "|" if st.left == _LINE_BREAK else st.left,
                                 right, st.unit, tuple(notes_out) if notes_out is not None else (),
                                 token.pos))
                if notes_out is not None:
                    notes_out.clear()
            st.n_bars += 1
            st.prev_right = right
            st.left = right
            st.length, st.n_notes = Fraction(0), 0
    return st


def parse_metre(value: str) -> Fraction | None:
    """The bar length that an ``M:`` value asks for, in whole notes (``None``: free metre).

    Accepts ``p/q`` with ``p`` an integer >= 1 and ``q`` a power of two (1 to 64), ``C``
    (common time, 4/4), ``C|`` (cut time, 2/2) and ``none`` (free metre, no bars to check).

    Raises:
        ValueError: naming what is wrong, e.g. for ``7/0`` or ``abc``.
    """
    if not isinstance(value, str):
        raise ValueError(f"a metre is text such as '6/8', 'C' or 'none', got {value!r}")
    text = value.strip()
    if text == "none":
        return None
    if text == "C":
        return Fraction(1)
    if text == "C|":
        return Fraction(1)
    match = re.fullmatch(r"(\d+)/(\d+)", text)
    if not match:
        raise ValueError(f"M:{value} is not a metre: write p/q such as 3/4 or 6/8, C, C| or none")
    num, den = int(match.group(1)), int(match.group(2))
    if num < 1:
        raise ValueError(f"M:{value} has no beats: the upper number must be at least 1")
    if den not in (1, 2, 4, 8, 16, 32, 64):
        raise ValueError(f"M:{value}: the lower number of a metre is a note value, a power of two "
                         f"from 1 to 64 (4 for quarter notes, 8 for eighths), got {den}")
    return Fraction(num, den)


def parse_unit(value: str) -> Fraction:
    """The unit note length of an ``L:`` value, in whole notes: ``1/q`` with ``q`` a power
    of two from 1 to 64 (``L:1/8`` gives 1/8).

    Raises:
        ValueError: naming what is wrong.
    """
    if not isinstance(value, str) or not _UNIT.match(value.strip()):
        raise ValueError(f"L:{value} is not a unit note length: write 1/q with q a power of two "
                         "from 1 to 64, such as 1/8 or 1/16")
    return Fraction(1, int(value.strip()[2:]))


def _mark_line_breaks(abc: str) -> tuple[str, list[int]]:
    """Put a marker at the end of every line of music that has no bar line there (and does
    not continue with a backslash), so that the tokenizer reports where lines break.

    Returns the marked text and, for each of its characters, the offset in ``abc`` of the
    character it came from (that of the line's end for an inserted marker).
    """
    out: list[str] = []
    origin: list[int] = []
    offset = 0
    for line in abc.split("\n"):
        body = line.rstrip()
        origin.extend(range(offset, offset + len(body)))
        if body and not _FIELD.match(body) and not body.endswith("\\") and not _BAR_AT_END.search(body):
            body += " " + _LINE_BREAK
            origin.extend([offset + len(line)] * 3)
        out.append(body)
        offset += len(line) + 1
        origin.append(offset - 1)                             # the newline
    return "\n".join(out), origin[:-1]


def bars(abc: str) -> list[Bar]:
    """The bars of a tune with their lengths, read as music21's ABC tokenizer reads the text.

    Bars end at the bar lines as written. A line break without a bar line (common in the
    Essen encodings, where each line is a phrase) ends a bar only if the bar is complete
    there; otherwise the bar continues on the next line, as phrases often start with an
    upbeat in the middle of a bar. Bars without notes (e.g. the header) are left out; a bar
    that the text ends without a bar line is the last one. A metre or unit length changed
    in the music (an ``M:`` or ``L:`` line, or ``[M:3/4]``) applies from where it is written.

    The note lengths and bar lines are those of music21's tokenizer (its rules are
    re-implemented here, about ten times faster; tests/test_tunes.py checks them against
    music21), including what it ignores: for example a note marked with ``H`` (fermata) or
    an invisible rest ``x`` takes no time. An inline field (``[L:1/16]``) is read as a
    field; music21 reads it as an empty chord and ignores it.

    Raises:
        AbcParseError: when music21's tokenizer would reject the text, or when a field
            inside the music (after the header's ``K:``) is not a valid ``M:``, ``L:`` or
            ``K:`` field (ABC readers take a letter and a colon as a field that runs to the
            end of the line, and drop any other field with the music written in it).
    """
    marked, origin = _mark_line_breaks(abc)
    prefix = "" if marked.lstrip().startswith("X:") else "X:1\n"
    tokens, _ = _tokenize(prefix + marked)
    shift = len(prefix)
    raw: list = []
    notes: list = []
    state = _read(tokens, _ReadState(), raw, notes)
    if state.n_notes:                                        # the text ends inside a bar
        raw.append((state.length, state.expected, "|" if state.left == _LINE_BREAK else state.left,
                    None, state.unit, tuple(notes), len(prefix) + len(marked)))
    result = []
    for length, expected, left, right, unit, bar_notes, _ in raw:
        first = bar_notes[0][2] - shift if bar_notes else -1
        last = bar_notes[-1][2] - shift if bar_notes else -1
        end = origin[last] + len(_strip_chord_symbols(bar_notes[-1][0])) if bar_notes else -1
        result.append(Bar(float(length), None if expected is None else float(expected), left, right,
                          notes=tuple(_strip_chord_symbols(src) for src, _, _ in bar_notes),
                          durations=tuple(float(d) for _, d, _ in bar_notes),
                          unit=None if unit is None else float(unit),
                          start=origin[first] if bar_notes else -1, end=end))
    return result


def count_bad_bars(tune_bars: Sequence[Bar]) -> int:
    """The number of bars whose length does not fit the metre (see :func:`bar_verdicts`)."""
    return sum(v in ("too long", "too short") for v in bar_verdicts(tune_bars))


def bar_verdicts(tune_bars: Sequence[Bar]) -> list[str]:
    """Judge each bar: ``"fits"``, ``"free"`` (free metre), ``"short, allowed"``,
    ``"too long"`` or ``"too short"``.

    A bar fits when it is exactly as long as its metre says. Two kinds of short bar are
    allowed, as in real tunes: an upbeat (anacrusis) at the start of the tune or of a
    section, and the short bar that ends the tune or a section and makes up for that
    upbeat. A section starts and ends at any bar line but the plain ``|`` (so at ``||``,
    ``|]``, ``|:``, ``:|``, ``::`` and at the endings ``[1``, ``[2``). A bar that is too
    long never fits, nor does a short bar in the middle of a section.
    """
    verdicts = []
    for i, bar in enumerate(tune_bars):
        if bar.expected is None:
            verdicts.append("free")
        elif math.isclose(bar.length, bar.expected, abs_tol=1e-6):
            verdicts.append("fits")
        elif bar.length > bar.expected:
            verdicts.append("too long")
        else:
            first, last = i == 0, i == len(tune_bars) - 1
            ends_section = bar.right not in _PLAIN_BARS
            starts_section = bar.left not in _PLAIN_BARS or (i > 0 and tune_bars[i - 1].right not in _PLAIN_BARS)
            allowed = first or last or ends_section or starts_section
            verdicts.append("short, allowed" if allowed else "too short")
    return verdicts


def check_tune(abc: str, time_limit: float | None = 3.0) -> BarCheck:
    """Does a tune parse, and do its bars fit its metre?

    ``parsed``: music21 builds a score with notes from the text within ``time_limit``
    seconds (:func:`parse_abc`), and every field in the music is a valid ``M:``, ``L:``
    or ``K:`` field (any other text after a letter and a colon would be dropped unheard).
    The bars are then measured as written (:func:`bars`) and judged by
    :func:`count_bad_bars`. (music21's own measures are not used for this: its ABC import
    silently splits an over-long bar into a full one plus a bar with a new time signature.)
    """
    try:
        parse_abc(abc, time_limit)
        tune_bars = bars(abc)
    except AbcParseError as exc:
        return BarCheck(False, 0, 0, error=str(exc))
    free = bool(tune_bars) and all(b.expected is None for b in tune_bars)
    return BarCheck(True, len(tune_bars), count_bad_bars(tune_bars), free=free)


# ------------------------------------------------------------------------ where bars go wrong

_BROKEN_FACTORS = frozenset(f for pair in _BROKEN.values() for f in pair)
_WRITTEN_LENGTH = re.compile(r"[\d/]*$")


def _unit_text(unit: float | None) -> str | None:
    if unit is None:
        return None
    fraction = Fraction(unit).limit_denominator(1 << 12) / 4     # quarter notes -> whole notes
    return f"{fraction.numerator}/{fraction.denominator}"


def bar_table(tunes: Sequence[str], skip_unreadable: bool = True) -> list[dict]:
    """One row per bar of every tune, for tabulating where bar errors happen.

    Each row (a dict) holds:

    * ``tune``: the tune's index in ``tunes``; ``bar``: the bar's index in the tune;
      ``n_bars``; ``position``: ``bar / (n_bars - 1)``, from 0 (first) to 1 (last);
    * ``line``: the line of the tune text where the bar starts (0 = the first line),
      ``music_line``: the same counted from the first line of music, ``crosses_line``:
      whether the bar goes on over a line break, ``char``: the offset of its first note;
    * ``metre`` (the header's ``M:``), ``unit`` (the ``L:`` in force, e.g. ``"1/8"``);
    * ``expected`` and ``length``: the metre's bar length and the bar's, in units of L
      (``expected`` is None in free metre), ``excess = length - expected``;
    * ``verdict`` (from :func:`bar_verdicts`) and ``bad`` (``"too long"`` or ``"too short"``);
    * ``notes``: the notes, rests and chords as written; ``durations``: their lengths in
      units of L; ``written``: the length as written after each (``""``, ``"2"``, ``"/"``,
      ``"3/2"``); ``rhythm``: for each, ``""``, ``"broken"`` (changed by ``>``/``<``) or
      ``"tuplet"``; ``has_broken``, ``has_tuplet``, ``has_chord``.

    A tune that :func:`bars` cannot read gives no rows (or raises, with
    ``skip_unreadable=False``).
    """
    rows: list[dict] = []
    for index, tune in enumerate(tunes):
        try:
            tune_bars = bars(tune)
        except AbcParseError:
            if skip_unreadable:
                continue
            raise
        verdicts = bar_verdicts(tune_bars)
        fields, body = split_header(tune)
        first_music_line = tune[:len(tune) - len(body)].count("\n")
        n = len(tune_bars)
        for i, (bar, verdict) in enumerate(zip(tune_bars, verdicts)):
            unit = bar.unit or 1.0
            written = tuple(_WRITTEN_LENGTH.search(note).group() for note in bar.notes)
            rhythm = []
            for note, duration in zip(bar.notes, bar.durations):
                try:
                    if note.startswith("["):
                        nominal = _chord_length(note, Fraction(unit).limit_denominator(1 << 12), Fraction(1))
                    else:
                        nominal = _note_length(note, Fraction(unit).limit_denominator(1 << 12))
                    ratio = Fraction(duration).limit_denominator(1 << 12) / nominal if nominal else Fraction(1)
                except (AbcParseError, ZeroDivisionError):
                    ratio = Fraction(1)
                rhythm.append("" if ratio == 1 else "broken" if ratio in _BROKEN_FACTORS else "tuplet")
            line = tune.count("\n", 0, max(bar.start, 0))
            rows.append({
                "tune": index, "bar": i, "n_bars": n, "position": i / (n - 1) if n > 1 else 0.0,
                "line": line, "music_line": line - first_music_line,
                "crosses_line": "\n" in tune[max(bar.start, 0):max(bar.end, 0)], "char": bar.start,
                "metre": fields.get("M"), "unit": _unit_text(bar.unit),
                "expected": None if bar.expected is None else bar.expected / unit,
                "length": bar.length / unit,
                "excess": None if bar.expected is None else (bar.length - bar.expected) / unit,
                "verdict": verdict, "bad": verdict in ("too long", "too short"),
                "notes": bar.notes, "durations": tuple(d / unit for d in bar.durations),
                "written": written, "rhythm": tuple(rhythm),
                "has_broken": "broken" in rhythm, "has_tuplet": "tuplet" in rhythm,
                "has_chord": any(note.startswith("[") for note in bar.notes),
            })
    return rows


def bar_error_rates(rows: Sequence[dict], by) -> list[dict]:
    """How often bars go wrong, grouped: one dict per group with ``key``, ``bars`` (how
    many), ``bad``, ``rate`` (``bad / bars``), ``too_long`` and ``too_short``.

    ``by`` is a field of :func:`bar_table`'s rows (``"unit"``) or a function of a row that
    returns its key (``lambda r: round(r["position"], 1)``) or a list, tuple or set of keys;
    a bar then counts once under each of them (``lambda r: set(r["written"])``: the bars
    that contain a note written with each length). Groups are sorted by key (None last).
    """
    if isinstance(by, str):
        field_name = by
        if rows and field_name not in rows[0]:
            raise KeyError(f"no field {field_name!r} in the rows; choose from {sorted(rows[0])}")
        by = lambda row: row[field_name]                      # noqa: E731
    groups: dict = {}
    for row in rows:
        keys = by(row)
        for key in (keys if isinstance(keys, (list, tuple, set, frozenset)) else (keys,)):
            g = groups.setdefault(key, [0, 0, 0, 0])
            g[0] += 1
            g[1] += row["bad"]
            g[2] += row["verdict"] == "too long"
            g[3] += row["verdict"] == "too short"
    order = sorted(groups, key=lambda k: (k is None, str(type(k)), k if k is not None else 0))
    return [{"key": k, "bars": groups[k][0], "bad": groups[k][1], "rate": groups[k][1] / groups[k][0],
             "too_long": groups[k][2], "too_short": groups[k][3]} for k in order]


# ------------------------------------------------------------------------ following a tune as it is written

_NORMALIZE = str.maketrans("ABDEFGabdefg", "CCCCCCcccccc")   # pitch letters that read alike
_NOTE_CHARS = frozenset("^_=ABCDEFGabcdefg,'0123456789/ ")    # what may stand inside [ ] or { }
_CLOSERS = {'"': '"', "[": "]", "{": "}"}
_LONGEST = {'"': 24, "[": 16, "{": 16}   # the longest "...", [...], {...} written (corpus: 19, 12, 10)
_FIELD_START = re.compile(r"^([A-Za-z]):")
_KEY_PREFIX = re.compile(r"^(?:|n|no|non|none|HP?|Hp|[A-Ha-h][#b]?[A-Za-z]*)$")
_METRE_PREFIX = re.compile(r"^(?:|[1-9]\d?|[1-9]\d?/|[1-9]\d?/(?:1|2|4|8|16|32|64|3|6)|C\|?|n|no|non|none)$")
_UNIT_PREFIX = re.compile(r"^(?:|1|1/|1/(?:1|2|4|8|16|32|64|3|6))$")


def _field_prefix_ok(letter: str, value: str, complete: bool) -> bool:
    """Can ``value`` (typed so far) still become a valid ``M:``, ``L:`` or ``K:`` value?
    With ``complete``, is it one already?"""
    value = value.lstrip()
    if complete:
        try:
            if letter == "M":
                parse_metre(value)
            elif letter == "L":
                parse_unit(value)
            else:
                return bool(_KEY.match(value))
            return True
        except ValueError:
            return False
    pattern = {"M": _METRE_PREFIX, "L": _UNIT_PREFIX, "K": _KEY_PREFIX}[letter]
    return bool(pattern.match(value))


def _needs_marker(line: str) -> bool:
    """Does a line of music end without a bar line (see :func:`_mark_line_breaks`)?"""
    body = line.rstrip()
    return bool(body) and not _FIELD.match(body) and not body.endswith("\\") \
        and not _BAR_AT_END.search(body)


class BarTracker:
    """Follows a tune while it is written and says which continuations keep its bars in time.

    The tune is read exactly as :func:`bars` reads it (music21's rules). After the text
    written so far, :meth:`allows` says whether a piece of text (a character or a token of
    any length) may come next: it may if, with it, the text read *as it stands* has

    * no bar longer than its metre (the current, unfinished bar included), and
    * no finished bar shorter than its metre, except where :func:`bar_verdicts` allows a
      short bar: the first bar (an upbeat), and a bar that starts or ends a section. A
      plain ``|`` that would end a short bar is allowed when one more ``|``, ``]`` or ``:``
      turns it into a section bar line (``||``, ``|]``, ``|:``); only those may follow it.

    What can be decided at each step. "As it stands" is exact for a token that holds a
    whole note with its length (a :class:`~genart_utils.text.MusicVocab` note): the bar
    arithmetic of that choice is known when it is made. A character model writes a note over
    several steps (``A``, then ``3``, then ``/``, then ``2``), and only the text so far can be
    judged: ``A3`` is refused when fewer than three units are left in the bar, although
    ``A3/2`` would fit, so that spelling of a dotted note is then unavailable (the broken
    rhythm ``A>B`` is not). Judging the text as it stands guarantees that no prefix of what is
    written has a bar too long, even where sampling stops in the middle of a note. Two things
    are only settled by later text, in either tokenisation: a broken rhythm ``A>B`` lengthens
    ``A`` when ``B`` is written (so ``B`` is refused if ``A`` would then overflow), and a
    tuplet sign ``(3`` shortens the notes after it. Two characters are judged by what must
    follow them: an accidental at the very end counts as its shortest note (``^`` as ``^C``:
    one unit, as music21 reads a lone ``^``) and must be followed by its pitch; a ``[`` at
    the very end counts for nothing until the next character makes it a chord or a bar line.

    To keep that reading exact, a few things are refused outright (they are rare in the
    corpus, and each would let later text change how earlier text reads): ``!decorations!``
    (music21 looks up to 20 characters ahead for the closing ``!``), ``%`` comments, an
    upper-case letter and a colon in the middle of a line unless a ``|`` follows (music21
    reads the rest of the line as a field), fields other than valid ``M:``, ``L:`` and
    ``K:`` lines, fields in the middle of a bar, inline fields such as ``[M:3/4]``, a line
    break inside ``"..."``, ``[...]`` or ``{...}``, anything but notes inside ``[...]`` and
    ``{...}``, constructs longer than the corpus's (24, 16 and 16 characters), a ``}``
    that closes nothing, a ``{`` inside ``{...}`` and a brace inside ``"..."`` (the check
    counts braces), a ``"`` that opens a chord symbol or annotation unless the same piece
    closes it (so a music token such as ``"G"`` may be written, a character model writes
    none, and a tune cut off by a length limit never has one open), and non-ASCII text. Text cut inside an open ``"...`` or ``[...`` is unreadable, not out of
    time.

    Args:
        prompt: the start of the tune, normally its header ``M:...\\nL:...\\nK:...\\n``.

    Raises:
        ValueError: when the prompt has no ``M:`` field (without ``L:``, ABC's default unit
            length for the metre applies), an ``M:`` or ``L:`` value that is not valid
            (``M:7/0``, ``L:1/3``, ``M:abc``), text music21 cannot read, or bars that
            already do not fit.
    """

    def __init__(self, prompt: str = ""):
        if not isinstance(prompt, str):
            raise TypeError(f"the prompt is the text of the tune so far, got {type(prompt).__name__}")
        fields: dict[str, str] = {}
        for line in prompt.split("\n"):
            match = _FIELD.match(line.strip())
            if match and match.group(1) in "ML":
                fields.setdefault(match.group(1), match.group(2).split("%", 1)[0].strip())
        if "M" not in fields:
            raise ValueError(
                "the prompt has no M: field: the constraint needs the metre to know how long a bar "
                "is; start the prompt with a header such as 'M:6/8\\nL:1/8\\nK:G\\n'")
        metre = parse_metre(fields["M"])                    # ValueError naming what is wrong
        if "L" in fields:
            parse_unit(fields["L"])
        self.metre = fields["M"]
        self.unit = fields.get("L") or default_unit(fields["M"])   # the ABC default without L:
        self.free = metre is None
        self.text = ""
        self._state = _ReadState()
        self._window = ""        # the text since the last settled token, line breaks marked
        self._line = ""          # the current line as written
        try:
            self._extend(prompt)
        except AbcParseError as exc:
            raise ValueError(f"the prompt cannot be read as ABC: {exc}") from None
        verdict = self._evaluate(self._window, self._line)
        if verdict != "ok":
            raise ValueError(f"the prompt cannot be continued in time ({verdict}): the constraint keeps "
                             "bars in time from where it starts, so give it a prompt whose bars fit "
                             "(a header such as 'M:6/8\nL:1/8\nK:G\n' always does)")

    # -- writing
    def append(self, piece: str) -> None:
        """Add text that was written (whether or not :meth:`allows` allowed it)."""
        try:
            self._extend(piece)
        except AbcParseError as exc:
            raise ValueError(f"the text cannot be read as ABC: {exc}") from None

    def _extend(self, piece: str) -> None:
        self._window, self._line = self._append_to(self._window, self._line, piece)
        self.text += piece
        self._settle()

    @staticmethod
    def _append_to(window: str, line: str, piece: str) -> tuple[str, str]:
        for part in piece.split("\n")[:-1]:
            line += part
            window += part + (" " + _LINE_BREAK if _needs_marker(line) else "") + "\n"
            line = ""
        last = piece.rsplit("\n", 1)[-1]
        return window + last, line + last

    def _settle(self) -> None:
        """Read the tokens that no later text can change into the state; keep the rest."""
        try:
            tokens, _ = _tokenize(self._window, self._state.chord_symbol)
        except AbcParseError:
            return                                            # e.g. a tuplet sign at the very end
        # Keep the last token if it is a note, chord or bar line (it may still grow: "A" -> "A2",
        # "|" -> "|:"), else from the last note, chord or bar line before it (a note before a
        # broken-rhythm sign ">" changes length with the note after it).
        marks = [i for i, t in enumerate(tokens) if t.kind in ("note", "chord", "bar")]
        if not marks:
            return
        k = marks[-1]
        while k >= 2 and tokens[k - 1].kind == "broken":     # "A > B": the marker changes both
            k -= 2
        while k >= 1 and tokens[k - 1].pos == tokens[k].pos:  # "::" is read as ":|" and "|:"
            k -= 1
        if k <= 0:
            return
        self._state = _read(tokens[:k], self._state.copy())
        self._state.chord_symbol = tokens[k].pending
        self._window = self._window[tokens[k].pos:]

    # -- judging
    def key(self) -> tuple:
        """A hashable summary: two trackers with equal keys allow exactly the same pieces."""
        line = self._line
        in_window = self._window.rsplit("\n", 1)[-1]         # the part of the line in the window
        before = line[:len(line) - len(in_window)] if len(in_window) <= len(line) else ""
        return (self._state.key(), self._window.translate(_NORMALIZE),
                line[:2].translate(_NORMALIZE) if _FIELD_START.match(line) else None,
                line.translate(_NORMALIZE) if len(line) <= 1 else None,
                bool(before.strip()), self._open_constructs(line))

    @staticmethod
    @functools.lru_cache(maxsize=4096)
    def _open_constructs(line: str) -> tuple[str | None, bool, int]:
        """``(open, dangling, length)``: the construct open at the end of ``line`` (``'"'``,
        ``"["``, ``"{"`` or ``None``), whether the line ends with a ``[`` that the next
        character turns into a chord or a bar line, and how many characters the open
        construct has so far."""
        opened, start = None, 0
        n = len(line)
        for i, c in enumerate(line):
            if opened is not None:
                if c == _CLOSERS[opened]:
                    opened = None
            elif c in '"{':
                opened, start = c, i
            elif c == "[":
                if i + 1 == n:
                    return None, True, 0
                if line[i + 1] not in "|12":
                    opened, start = c, i
        return opened, False, (n - start if opened else 0)

    def allows(self, piece: str | None) -> bool:
        """May ``piece`` come next? (See the class description for the rules.)"""
        if piece is None or piece == "" or not piece.isascii() or "!" in piece or "%" in piece:
            return False
        if '"' in piece and (piece.count('"') % 2 == 1) != (self._open_constructs(self._line)[0] == '"'):
            return False                  # quotes only in whole pairs: a cut tune has none left open
        if not self._grammar_allows(piece):
            return False
        window, line = self._append_to(self._window, self._line, piece)
        verdict = self._evaluate(window, line)
        if verdict == "short bar" and window.endswith("|"):
            return any(self._evaluate(window + extra, line + extra) == "ok" for extra in "|]:")
        return verdict == "ok"

    def _grammar_allows(self, piece: str) -> bool:
        """The refusals that do not depend on bar lengths (see the class description)."""
        line = self._line
        bar_empty = None
        for i, c in enumerate(piece):
            opened, dangling, size = self._open_constructs(line)
            field = _FIELD_START.match(line)
            after_accidental = opened != '"' and not field and line.endswith(("^", "_", "="))
            if c in "{}" and not field and (opened == '"' or (c == "}") != (opened == "{")):
                return False                                  # braces must pair up (check_tune counts them)
            if after_accidental:                              # a pitch must follow (or ^^, __)
                if not (c in "ABCDEFGabcdefg" or (c in "^_" and line[-1] == c and line[-2:-1] != c
                                                  and not (opened and size >= _LONGEST[opened]))):
                    return False
            elif opened and size >= _LONGEST[opened]:         # long enough: only its end may come
                if c != _CLOSERS[opened]:
                    return False
            elif field and line[0] in "MLK":                  # inside a field line
                value = line[2:]
                if c == "\n":
                    if not _field_prefix_ok(field.group(1), value, complete=True):
                        return False
                elif not _field_prefix_ok(field.group(1), value + c, complete=False):
                    return False
            elif c == ":" and line in ("M", "L", "K"):       # a field starts here
                if bar_empty is None:                         # only between bars
                    bar_empty = self._bar_is_empty()
                if not bar_empty:
                    return False
            elif opened == '"':
                if c == "\n":
                    return False
            elif opened in ("[", "{"):
                if c != _CLOSERS[opened] and c not in _NOTE_CHARS:
                    return False
            elif dangling and c not in _NOTE_CHARS and c not in "|]":
                return False
            elif c == ":" and line and (line[-1] == "w" or (line[-1].isalpha() and line[-1].isupper())) \
                    and piece[i + 1:i + 2] != "|":
                return False                                  # music21 would read a field from here
            line = "" if c == "\n" else line + c
        return True

    def _bar_is_empty(self) -> bool:
        """Has the current bar no notes yet (so that a field may be written here)?"""
        state = self._read_through(self._window, self._line)
        return state is not None and state.n_notes == 0

    def _read_through(self, window: str, line: str) -> _ReadState | None:
        """The state after reading ``window`` as it stands (None if it cannot be read)."""
        text = self._as_it_stands(window, line)
        try:
            tokens, _ = _tokenize(text, self._state.chord_symbol)
            return _read(tokens, self._state.copy())
        except AbcParseError:
            return None

    def _as_it_stands(self, window: str, line: str) -> str:
        """The window completed as the text would read if it ended here."""
        if _FIELD_START.match(line) and line[0] in "MLK":     # a field still being written
            return window[:len(window) - len(line)]
        opened, dangling, _ = self._open_constructs(line)
        text = window
        if dangling:
            text = text[:-1]                                  # "[": chord or bar line, not yet known
        elif opened != '"' and text.endswith(("^", "_", "=")):
            text += "C"                                       # an accidental: judge its shortest note
        if opened == '"':
            text += '"'
        elif opened == "[":
            text += "]"
        if _needs_marker(line):
            text += " " + _LINE_BREAK
        return text

    def _evaluate(self, window: str, line: str) -> str:
        """``"ok"``, ``"too long"``, ``"short bar"`` or ``"unreadable"`` for ``window``."""
        text = self._as_it_stands(window, line)
        try:
            tokens, _ = _tokenize(text, self._state.chord_symbol)
            completed: list = []
            state = _read(tokens, self._state.copy(), completed)
        except AbcParseError:
            return "unreadable"
        verdict = "ok"
        n_before, prev_right = self._state.n_bars, self._state.prev_right
        for length, expected, left, right, *_ in completed:
            if expected is not None and length > expected:
                return "too long"
            if expected is not None and length < expected:
                first = n_before == 0
                starts = left not in _PLAIN_BARS or (n_before > 0 and prev_right not in _PLAIN_BARS)
                if not (first or starts or right not in _PLAIN_BARS):
                    verdict = "short bar"
            n_before, prev_right = n_before + 1, right
        if state.expected is not None and state.length > state.expected:
            return "too long"
        return verdict


# ------------------------------------------------------------------------ notes

def _check_note(pitch, start, duration, where: str = "NoteEvent") -> tuple[int, float, float]:
    """Validate one note's fields and return them as ``(int, float, float)``."""
    if not is_int(pitch) or not 0 <= pitch <= 127:
        raise ValueError(f"{where}: pitch must be a MIDI note number, an int in 0..127 "
                         f"(60 is middle C), got {pitch!r}")
    for name, value in (("start", start), ("duration", duration)):
        if not is_real(value):
            raise ValueError(f"{where}: {name} must be a finite number of quarter notes, got {value!r}")
    if start < 0:
        raise ValueError(f"{where}: start must be >= 0 (quarter notes from the beginning), got {start!r}")
    if duration <= 0:
        raise ValueError(f"{where}: duration must be > 0 quarter notes, got {duration!r}")
    return int(pitch), float(start), float(duration)


def _check_events(events: Sequence["NoteEvent"], purpose: str) -> list["NoteEvent"]:
    """The events as a list, each checked (also objects that only look like a NoteEvent)."""
    events = list(events)
    if not events:
        raise ValueError(f"no notes to {purpose}: pass at least one NoteEvent")
    for i, e in enumerate(events):
        try:
            _check_note(e.pitch, e.start, e.duration, where=f"note {i} ({e!r})")
        except AttributeError:
            raise TypeError(f"note {i} is a {type(e).__name__}, "
                            "not a NoteEvent(pitch, start, duration)") from None
    return events


@dataclass(frozen=True)
class NoteEvent:
    """A sounding note: MIDI pitch (an int in 0..127), and start (>= 0) and duration (> 0)
    in quarter notes. Invalid values raise :class:`ValueError` when the note is made."""

    pitch: int
    start: float
    duration: float

    def __post_init__(self) -> None:
        pitch, start, duration = _check_note(self.pitch, self.start, self.duration)
        object.__setattr__(self, "pitch", pitch)        # NumPy numbers become Python numbers
        object.__setattr__(self, "start", start)
        object.__setattr__(self, "duration", duration)


def note_events(score) -> list[NoteEvent]:
    """The notes of a music21 score in time order, tied notes merged, chords split into
    their pitches, grace notes (no duration) dropped. Repeats are not expanded."""
    flat = score.stripTies().flatten()
    events: list[NoteEvent] = []
    for element in flat.notes:
        duration = float(element.duration.quarterLength)
        if duration <= 0:
            continue
        start = float(element.offset)
        for pitch in element.pitches:
            events.append(NoteEvent(int(round(pitch.ps)), start, duration))
    events.sort(key=lambda e: (e.start, e.pitch))
    return events


def abc_to_events(abc: str, time_limit: float | None = 3.0) -> list[NoteEvent]:
    """Parse a tune (:func:`parse_abc`) and return its :func:`note_events`."""
    return note_events(parse_abc(abc, time_limit))


def piano_roll_matrix(events: Sequence[NoteEvent], steps_per_quarter: int = 4
                      ) -> tuple[np.ndarray, int]:
    """A piano roll as an array (to draw one, use :func:`genart_utils.plotting.piano_roll`).

    Returns ``(roll, lowest)``: ``roll`` is ``(n_pitches, n_steps)`` uint8 with row 0 the
    MIDI pitch ``lowest``, ``steps_per_quarter`` time steps per quarter note, and values
    0 (silence), 2 (the first step of a note) and 1 (the note goes on). Marking the onsets
    keeps repeated notes of one pitch apart: two quarter notes C C are ``2 1 1 1 2 1 1 1``
    at four steps per quarter, a half note C is ``2 1 1 1 1 1 1 1``. A note shorter than one
    step still fills one; notes that start in the same step on the same pitch merge.
    """
    events = _check_events(events, "put in a piano roll")
    if not is_int(steps_per_quarter) or steps_per_quarter < 1:
        raise ValueError(f"steps_per_quarter must be an int >= 1, got {steps_per_quarter!r}")
    low = min(e.pitch for e in events)
    high = max(e.pitch for e in events)
    end = max(e.start + e.duration for e in events)
    roll = np.zeros((high - low + 1, int(math.ceil(end * steps_per_quarter - 1e-9))), dtype=np.uint8)
    for e in events:
        a = int(round(e.start * steps_per_quarter))
        b = max(a + 1, int(round((e.start + e.duration) * steps_per_quarter)))
        roll[e.pitch - low, a:b] = np.maximum(roll[e.pitch - low, a:b], 1)
        roll[e.pitch - low, a] = 2
    return roll, low


# ------------------------------------------------------------------------ MIDI

def events_to_stream(events: Sequence[NoteEvent], tempo_qpm: float = 120.0, velocity: int = 80,
                     program: int = 0):
    """A ``music21`` Stream of the notes, with a tempo mark and a General MIDI instrument
    (``program``, 0 = acoustic grand piano); ``tempo_qpm`` is in quarter notes per minute
    and ``velocity`` (1..127) is how hard every note is struck."""
    _music21()
    from music21 import instrument, note, stream, tempo

    events = _check_events(events, "write")
    if not is_real(tempo_qpm) or tempo_qpm <= 0:
        raise ValueError(f"tempo_qpm must be a positive number of quarter notes per minute, "
                         f"got {tempo_qpm!r}")
    for name, value, low in (("program", program, 0), ("velocity", velocity, 1)):
        if not is_int(value) or not low <= value <= 127:
            raise ValueError(f"{name} must be an int in {low}..127, got {value!r}")
    part = stream.Stream()
    part.insert(0, tempo.MetronomeMark(number=float(tempo_qpm)))
    player = instrument.Instrument()
    player.midiProgram = int(program)
    part.insert(0, player)
    for e in events:
        n = note.Note(midi=e.pitch, quarterLength=e.duration)
        n.volume.velocity = int(velocity)
        part.insert(e.start, n)
    return part


def midi_bytes(events: Sequence[NoteEvent], tempo_qpm: float = 120.0, velocity: int = 80,
               program: int = 0) -> bytes:
    """A Standard MIDI File playing ``events``, written by music21 (see
    :func:`events_to_stream` for the options).

    Raises:
        ValueError: for no notes, a note with a pitch outside 0..127, a negative start, a
            duration that is not positive or a time that is not finite, or a bad option.
    """
    _music21()
    from music21 import midi

    part = events_to_stream(events, tempo_qpm=tempo_qpm, velocity=velocity, program=program)
    return midi.translate.streamToMidiFile(part).writestr()


def write_midi(events: Sequence[NoteEvent], path: str | Path, **kwargs) -> Path:
    """Write ``events`` as a MIDI file (see :func:`midi_bytes` for the options)."""
    data = midi_bytes(events, **kwargs)           # check everything before touching the disk
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


# ------------------------------------------------------------------------ audio

def synthesize(events: Sequence[NoteEvent], tempo_qpm: float = 120.0, sample_rate: int = 8000,
               max_seconds: float | None = None, harmonics: Sequence[float] = (1.0, 0.5, 0.25),
               decay: float = 3.0) -> np.ndarray:
    """Render notes as audio with NumPy: a plucked-string-like tone per note.

    Each note of MIDI pitch ``p`` is a sum of harmonics of ``f = 440 * 2**((p - 69) / 12)``
    Hz with the given amplitudes, shaped by a 5 ms attack, an exponential decay
    ``exp(-decay * t)`` and a 20 ms release at its end. The mix is scaled so that its peak
    is 0.9.

    Returns:
        float32 samples in ``[-1, 1]``, shape ``(n_samples,)``.
    """
    events = _check_events(events, "synthesise")
    if tempo_qpm <= 0 or sample_rate <= 0:
        raise ValueError(f"tempo_qpm and sample_rate must be positive, got {tempo_qpm}, {sample_rate}")
    seconds_per_quarter = 60.0 / tempo_qpm
    end = max(e.start + e.duration for e in events) * seconds_per_quarter + 0.05
    if max_seconds is not None:
        end = min(end, max_seconds)
    out = np.zeros(int(end * sample_rate) + 1, dtype=np.float64)
    attack, release = int(0.005 * sample_rate), int(0.02 * sample_rate)
    for e in events:
        start = int(e.start * seconds_per_quarter * sample_rate)
        if start >= len(out):
            continue
        length = min(max(int(e.duration * seconds_per_quarter * sample_rate), 1), len(out) - start)
        t = np.arange(length) / sample_rate
        freq = 440.0 * 2.0 ** ((e.pitch - 69) / 12)
        tone = sum(a * np.sin(2 * np.pi * (k + 1) * freq * t)
                   for k, a in enumerate(harmonics) if (k + 1) * freq < sample_rate / 2)
        envelope = np.exp(-decay * t)
        envelope[:attack] *= np.linspace(0.0, 1.0, min(attack, length))
        r = min(release, length)
        envelope[length - r:] *= np.linspace(1.0, 0.0, r)
        out[start:start + length] += tone * envelope
    peak = np.abs(out).max()
    if peak > 0:
        out *= 0.9 / peak
    return out.astype(np.float32)
