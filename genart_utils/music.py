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

What a tune keeps (see :func:`extract_tunes`): the metre ``M:``, the unit note length ``L:``
and the key ``K:`` (in that order, in a normalised form) followed by the lines of music.
Everything else is dropped: the reference number ``X:``, titles, notes, origins, sources,
transcriber names, tempo marks, lyrics and ``%`` comments. They are metadata that a model
of the music has no use for (or, like lyrics, a different language).
"""

from __future__ import annotations

import contextlib
import io
import math
import re
import signal
import threading
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Iterable, Sequence

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

    parsed: bool        # music21 read the tune and found notes
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
_PLAIN_BARS = (None, "|")
_LINE_BREAK = "[|"   # marks a line break without a bar line (a bar symbol rare in the corpus)


@dataclass(frozen=True)
class Bar:
    """One bar of a tune as written: its length and the length its metre asks for."""

    length: float               # in quarter notes (tuplets, broken rhythms applied; grace notes 0)
    expected: float | None      # the metre's bar length in quarter notes; None for free metre
    left: str | None            # the bar line before it, as written ("|", "|:", "||", ...)
    right: str | None           # the bar line after it (None at the end of the text)


def _mark_line_breaks(abc: str) -> str:
    """Put a marker at the end of every line of music that has no bar line there (and does
    not continue with a backslash), so that the tokenizer reports where lines break."""
    out = []
    for line in abc.split("\n"):
        body = line.rstrip()
        if body and not _FIELD.match(body) and not body.endswith("\\") and not _BAR_AT_END.search(body):
            body += " " + _LINE_BREAK
        out.append(body)
    return "\n".join(out)


def bars(abc: str) -> list[Bar]:
    """The bars of a tune with their lengths, from music21's ABC tokenizer.

    Bars end at the bar lines as written. A line break without a bar line (common in the
    Essen encodings, where each line is a phrase) ends a bar only if the bar is complete
    there; otherwise the bar continues on the next line, as phrases often start with an
    upbeat in the middle of a bar. Bars without notes (e.g. the header) are left out.

    Raises:
        AbcParseError: when music21's tokenizer rejects the text.
    """
    _music21()
    from music21 import abcFormat

    text = _mark_line_breaks(abc)
    text = text if text.lstrip().startswith("X:") else "X:1\n" + text
    try:
        with _quiet_and_limited(None):
            handler = abcFormat.ABCHandler()
            handler.process(text)
            pieces = handler.splitByMeasure()
    except Exception as exc:
        raise AbcParseError(f"music21 could not tokenize the tune: {type(exc).__name__}: {exc}") from exc
    result: list[Bar] = []
    expected: float | None = None
    length, n_notes, left = 0.0, 0, None
    for piece in pieces:
        for token in piece.tokens:
            if isinstance(token, abcFormat.ABCMetadata) and token.isMeter():
                ts = token.getTimeSignatureObject()
                expected = float(ts.barDuration.quarterLength) if ts is not None else None
            elif isinstance(token, abcFormat.ABCNote) and not token.inGrace:
                ql = float(token.quarterLength)
                if token.activeTuplet is not None:
                    ql *= float(token.activeTuplet.tupletMultiplier())
                length += ql
                n_notes += 1
        if n_notes == 0:
            left = piece.rightBarToken.src.strip() if piece.rightBarToken is not None else left
            continue
        if n_notes and left is None and piece.leftBarToken is not None and not result:
            left = piece.leftBarToken.src.strip()
        right = piece.rightBarToken.src.strip() if piece.rightBarToken is not None else None
        if right == _LINE_BREAK:
            if expected is not None and length < expected - 1e-9:
                continue                                     # the bar goes on after the break
            right = "|"
        result.append(Bar(length, expected, left if left != _LINE_BREAK else "|", right))
        length, n_notes, left = 0.0, 0, right
    return result


def count_bad_bars(tune_bars: Sequence[Bar]) -> int:
    """The number of bars whose length does not fit the metre.

    A bar fits when it is exactly as long as its metre says. Two kinds of short bar are
    allowed, as in real tunes: an upbeat (anacrusis) at the start of the tune or of a
    section, and the short bar that ends the tune or a section (before a repeat sign or a
    double bar line) and makes up for that upbeat. A bar that is too long never fits,
    nor does a short bar in the middle of a section. Bars in free metre always fit.
    """
    n_bad = 0
    for i, bar in enumerate(tune_bars):
        if bar.expected is None or math.isclose(bar.length, bar.expected, abs_tol=1e-6):
            continue
        if bar.length > bar.expected:
            n_bad += 1
            continue
        first, last = i == 0, i == len(tune_bars) - 1
        ends_section = bar.right not in _PLAIN_BARS
        starts_section = bar.left not in _PLAIN_BARS or (i > 0 and tune_bars[i - 1].right not in _PLAIN_BARS)
        if not (first or last or ends_section or starts_section):
            n_bad += 1
    return n_bad


def check_tune(abc: str, time_limit: float | None = 3.0) -> BarCheck:
    """Does a tune parse, and do its bars fit its metre?

    ``parsed``: music21 builds a score with notes from the text within ``time_limit``
    seconds (:func:`parse_abc`).
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
