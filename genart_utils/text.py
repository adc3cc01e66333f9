"""Text for autoregressive models: corpora, a character tokeniser, n-gram baselines, metrics.

* :func:`load_corpus` returns a :class:`Corpus`: documents (tunes, poems, paragraphs) split
  into training and validation sets *by document* with a fixed seed, and the character
  vocabulary. The default corpus is the folk tunes in ABC notation that ship with music21
  (:mod:`genart_utils.music`); any UTF-8 text file can be used instead.
* :class:`CharVocab` maps characters to token ids and back; :class:`MusicVocab` is a lossless
  music-aware tokeniser for ABC (whole notes, bar lines and header fields as tokens).
* :class:`NGramModel` is a count-based character n-gram model with either additive
  (Laplace/Lidstone) smoothing or interpolated Kneser-Ney smoothing: the first
  autoregressive models, and the baselines every neural model must beat.
* :func:`bits_per_char`, :func:`distinct_ngrams` and :func:`repetition_rate` measure
  likelihood and diversity; :func:`bits_per_document` scores whole documents (tunes) so that
  two tokenisations of the same text compare fairly.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from . import runtime

LN2 = math.log(2.0)


# ------------------------------------------------------------------------ vocabulary

def _checked_ids(ids, size: int, what: str) -> list[int]:
    """Token ids (a 1-D tensor or array, or a sequence of ints) as a list of Python ints.

    Raises:
        ValueError: for an id outside ``0 .. size - 1`` (a negative id is not counted from
            the end) or one that is not an integer, naming the vocabulary size.
    """
    if isinstance(ids, (torch.Tensor, np.ndarray)):
        if ids.ndim != 1:
            raise ValueError(f"decode takes a 1-D sequence of token ids, got shape {tuple(ids.shape)}; "
                             "decode each row of a batch separately")
        integral = not ids.dtype.is_floating_point and ids.dtype not in (torch.bool, torch.complex64) \
            if isinstance(ids, torch.Tensor) else np.issubdtype(ids.dtype, np.integer)
        values = ids.tolist()
        if integral and (not values or (min(values) >= 0 and max(values) < size)):
            return values
    else:
        values = list(ids)
    bad = [i for i in values if isinstance(i, (bool, np.bool_)) or not isinstance(i, (int, np.integer))
           or not 0 <= i < size]
    if bad:
        shown = ", ".join(map(repr, bad[:5])) + (", ..." if len(bad) > 5 else "")
        raise ValueError(
            f"token ids must be ints in 0..{size - 1} (this vocabulary has {size} {what}), got "
            f"{shown}; were they produced with another vocabulary?")
    return [int(i) for i in values]


@dataclass(frozen=True)
class CharVocab:
    """A character-level tokeniser: token ``i`` is the character ``chars[i]``."""

    chars: str  # the distinct characters, sorted by code point; position = token id
    _index: dict = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.chars:
            raise ValueError("a vocabulary needs at least one character")
        if len(set(self.chars)) != len(self.chars):
            raise ValueError("the characters of a vocabulary must be distinct")
        object.__setattr__(self, "_index", {c: i for i, c in enumerate(self.chars)})

    @classmethod
    def from_texts(cls, *texts: str) -> "CharVocab":
        """The vocabulary of every character that occurs in ``texts``."""
        return cls("".join(sorted(set().union(*map(set, texts)))))

    @property
    def size(self) -> int:
        return len(self.chars)

    def __len__(self) -> int:
        return len(self.chars)

    @property
    def token_texts(self) -> tuple[str, ...]:
        """The text of every token id: its character."""
        return tuple(self.chars)

    def encode(self, text: str) -> torch.Tensor:
        """``text`` as a ``(len(text),)`` int64 tensor of token ids.

        Raises:
            ValueError: naming the characters that are not in the vocabulary.
        """
        try:
            return torch.tensor([self._index[c] for c in text], dtype=torch.long)
        except KeyError:
            unknown = sorted(set(text) - set(self._index))
            raise ValueError(
                f"characters not in the vocabulary: {''.join(unknown)!r}; the model can only "
                f"read the {self.size} characters of its training corpus") from None

    def decode(self, ids: torch.Tensor | Sequence[int]) -> str:
        """Token ids (a 1-D tensor or array, or a list of ints) back to text.

        Raises:
            ValueError: for an id outside ``0 .. size - 1`` (a negative id is not counted
                from the end) or one that is not an integer, naming the vocabulary size.
        """
        return "".join(self.chars[i] for i in _checked_ids(ids, self.size, "characters"))


# ------------------------------------------------------------------------ music-aware tokens

_ABC_LEXEME = re.compile(r"""
      ^[A-Za-z]:[^\n]*                              # a field line: M:6/8, L:1/8, K:G
    | (?:\^\^|__|[\^_=])?[A-Ga-g][,']*\d*(?:/+\d*)?  # a note: accidental, pitch, octave marks, length
    | [ \n]                                         # (spaces and line breaks are frequent: early)
    | \|[\]|:12]? | :\|[12]? | \[\| | \[[12] | ::   # bar lines: | |] || |: |1 :| :|2 [| [1 ::
    | [zx]\d*(?:/+\d*)? | Z\d*                      # rests
    | \(\d(?::\d?){0,2}                             # a tuplet sign: (3, (3:2:3
    | [<>]{1,3}                                     # a broken rhythm
    | "[^"\n]*"                                     # a chord symbol or annotation
    | \[[A-Za-z]:[^\]\n]*\]                         # an inline field: [K:D]
    | ![^!\n]*!                                     # a decoration
    | .                                             # any other character
    """, re.VERBOSE | re.MULTILINE | re.DOTALL)


def abc_lexemes(text: str) -> list[str]:
    """Split ABC text into the pieces a music-aware tokeniser works with (lossless:
    ``"".join(abc_lexemes(text)) == text`` for every text).

    A piece is a whole field line without its newline (``M:6/8``), an inline field
    (``[K:D]``), a bar line (``|``, ``||``, ``|]``, ``|:``, ``:|``, ``::``, ``[|``, ``[1``,
    ``|1``, ``:|2``, ...), a note with its accidental, octave marks and length (``^c'3/2``),
    a rest (``z2``), a tuplet sign (``(3``), a broken rhythm (``>``), a chord symbol or
    annotation in quotes, a ``!decoration!``, or else a single character (spaces, line
    breaks, ``[``/``]`` around chords, ``{``/``}`` around grace notes, decorations such as
    ``~``, ties and slurs, and anything unusual). Notes inside chords and grace groups are
    notes too.
    """
    return _ABC_LEXEME.findall(text)


@dataclass(frozen=True)
class MusicVocab:
    r"""A lossless music-aware tokeniser for ABC: whole notes, bar lines, fields, characters.

    The text is split with :func:`abc_lexemes`. A piece that is in the vocabulary is one
    token; any other piece is written with its characters, and a character that is not in
    the vocabulary either (with ``byte_fallback``) with the bytes of its UTF-8 encoding, one
    token per byte. So every text can be encoded, and ``decode(encode(text)) == text``.

    Header fields are one token per whole line (``M:6/8``, ``L:1/8``, ``K:Dm``): each is one
    choice among a few dozen values, which the model then reads as one symbol, as it reads a
    note; a rare value (``K:Dmixm``) falls back to characters.

    ``tokens[i]`` is the text of token ``i``: first the single characters (sorted), then the
    longer pieces (most frequent first); with ``byte_fallback`` the 256 byte tokens follow,
    ids ``len(tokens) .. len(tokens) + 255`` (their text is ``None`` in :attr:`token_texts`).
    """

    tokens: tuple[str, ...]          # the text of each token; position = id
    byte_fallback: bool = True       # 256 extra tokens that spell any other character in UTF-8
    _index: dict = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        tokens = tuple(self.tokens)
        if not tokens or any(not isinstance(t, str) or t == "" for t in tokens):
            raise ValueError("a MusicVocab needs at least one token, each a non-empty string")
        if len(set(tokens)) != len(tokens):
            raise ValueError("the tokens of a vocabulary must be distinct")
        object.__setattr__(self, "tokens", tokens)
        object.__setattr__(self, "_index", {t: i for i, t in enumerate(tokens)})

    @classmethod
    def from_texts(cls, texts: Sequence[str], min_count: int = 2, max_pieces: int | None = None,
                   byte_fallback: bool = True) -> "MusicVocab":
        """The vocabulary of ``texts`` (the training tunes): every character in them, and
        every longer piece (:func:`abc_lexemes`) that occurs at least ``min_count`` times
        (at most ``max_pieces`` of them, the most frequent; ties broken by the text)."""
        if isinstance(texts, str):
            raise TypeError("from_texts takes a sequence of texts (the training tunes), not one string")
        if not runtime.is_int(min_count) or min_count < 1:
            raise ValueError(f"min_count must be an int >= 1, got {min_count!r}")
        if max_pieces is not None and (not runtime.is_int(max_pieces) or max_pieces < 0):
            raise ValueError(f"max_pieces must be an int >= 0 or None, got {max_pieces!r}")
        chars: set[str] = set()
        counts: dict[str, int] = {}
        for t in texts:
            chars.update(t)
            for piece in abc_lexemes(t):
                if len(piece) > 1:
                    counts[piece] = counts.get(piece, 0) + 1
        pieces = sorted((p for p, c in counts.items() if c >= min_count), key=lambda p: (-counts[p], p))
        if max_pieces is not None:
            pieces = pieces[:max_pieces]
        if not chars:
            raise ValueError("the texts are empty: there is nothing to build a vocabulary from")
        return cls(tuple(sorted(chars)) + tuple(pieces), byte_fallback=byte_fallback)

    @property
    def size(self) -> int:
        return len(self.tokens) + (256 if self.byte_fallback else 0)

    def __len__(self) -> int:
        return self.size

    @property
    def token_texts(self) -> tuple[str | None, ...]:
        """The text of every token id (``None`` for a byte token, which is part of a character)."""
        return self.tokens + ((None,) * 256 if self.byte_fallback else ())

    def _piece_ids(self, piece: str) -> list[int]:
        i = self._index.get(piece)
        if i is not None:
            return [i]
        ids = []
        for c in piece:
            j = self._index.get(c)
            if j is not None:
                ids.append(j)
            elif self.byte_fallback:
                ids.extend(len(self.tokens) + b for b in c.encode("utf-8"))
            else:
                raise ValueError(f"the character {c!r} is not in the vocabulary and byte_fallback "
                                 "is off; build the vocabulary with byte_fallback=True")
        return ids

    def encode_with_offsets(self, text: str) -> tuple[torch.Tensor, np.ndarray]:
        """``(ids, offsets)``: the ``(n,)`` int64 token ids of ``text`` and, for each token,
        the offset in ``text`` of the character it belongs to (the first character of a
        piece; the same character for all bytes of one character)."""
        ids: list[int] = []
        offsets: list[int] = []
        at = 0
        for piece in abc_lexemes(text):
            piece_ids = self._piece_ids(piece)
            if len(piece_ids) == 1:
                offsets.append(at)
            else:
                for k, c in enumerate(piece):
                    n = 1 if c in self._index else len(c.encode("utf-8"))
                    offsets.extend([at + k] * n)
            ids.extend(piece_ids)
            at += len(piece)
        return torch.tensor(ids, dtype=torch.long), np.asarray(offsets, dtype=np.int64)

    def encode(self, text: str) -> torch.Tensor:
        """``text`` as a ``(n,)`` int64 tensor of token ids (see the class description)."""
        if not isinstance(text, str):
            raise TypeError(f"encode takes a string, got {type(text).__name__}")
        index, ids = self._index, []
        for piece in _ABC_LEXEME.findall(text):
            i = index.get(piece)
            if i is None:
                ids.extend(self._piece_ids(piece))
            else:
                ids.append(i)
        return torch.tensor(ids, dtype=torch.long)

    def split(self, text: str) -> list[str]:
        """The text of each token of ``encode(text)`` (a byte token as ``<0xNN>``)."""
        n = len(self.tokens)
        return [self.tokens[i] if i < n else f"<0x{i - n:02X}>" for i in self.encode(text).tolist()]

    def decode(self, ids: torch.Tensor | Sequence[int]) -> str:
        """Token ids back to text: exactly the encoded text for ids from :meth:`encode`.
        Byte tokens that do not form valid UTF-8 (a model can write them in any order)
        become U+FFFD.

        Raises:
            ValueError: for an id outside ``0 .. size - 1`` or one that is not an integer.
        """
        values = _checked_ids(ids, self.size, "tokens")
        n = len(self.tokens)
        out: list[str] = []
        pending = bytearray()
        for i in values:
            if i >= n:
                pending.append(i - n)
                continue
            if pending:
                out.append(pending.decode("utf-8", errors="replace"))
                pending = bytearray()
            out.append(self.tokens[i])
        if pending:
            out.append(pending.decode("utf-8", errors="replace"))
        return "".join(out)


def token_offsets(vocab: "CharVocab | MusicVocab", text: str) -> tuple[torch.Tensor, np.ndarray]:
    """``(ids, offsets)`` of ``text`` under either tokeniser: the token ids and, for each
    token, the offset of its first character in ``text``."""
    if isinstance(vocab, MusicVocab):
        return vocab.encode_with_offsets(text)
    ids = vocab.encode(text)
    return ids, np.arange(len(text), dtype=np.int64)


# ------------------------------------------------------------------------ bits per document

def scoring_stream(documents: Sequence[str], separator: str = "\n") -> tuple[str, np.ndarray]:
    """The text on which documents are scored, and where each document's share begins.

    The stream is ``separator + separator.join(documents)``: it starts with the separator
    so that the first token, which has no context and is not scored, is the same (one
    separator character) for every tokeniser; every character of every document is then
    scored. Document ``i`` owns the characters from the separator before it up to the next
    document's separator; ``starts[i]`` is the offset of that separator.
    """
    if isinstance(documents, str) or not len(documents):
        raise ValueError("scoring_stream takes a non-empty sequence of documents (e.g. the validation tunes)")
    starts = []
    at = 0
    for doc in documents:
        starts.append(at)
        at += len(separator) + len(doc)
    return separator + separator.join(documents), np.asarray(starts, dtype=np.int64)


def document_bits(log_probs: torch.Tensor | np.ndarray, offsets: np.ndarray,
                  starts: np.ndarray) -> np.ndarray:
    r"""Bits per document: the sum of the token log-losses that fall in each document.

    .. math:: \text{bits}(d) = -\frac{1}{\ln 2} \sum_{i \ge 1,\ \text{token } i \in d} \log p(x_i \mid x_{<i})

    Args:
        log_probs: ``(N - 1,)`` log-probabilities in nats of tokens ``1 .. N-1`` of the
            stream (e.g. from ``gpt.token_log_probs`` or ``NGramModel.log_probs``).
        offsets: ``(N,)`` the character offset of each token (:func:`token_offsets`).
        starts: ``(D,)`` where each document's share begins (:func:`scoring_stream`).

    Returns:
        ``(D,)`` float64 bits. Their sum is the total cost of the stream, whatever the
        tokeniser, so two tokenisations of the same documents compare fairly (a token is
        counted in the document where its first character lies; tokens never cross the
        separator, which is a token of its own).
    """
    lp = np.asarray(log_probs.detach().cpu() if isinstance(log_probs, torch.Tensor) else log_probs,
                    dtype=np.float64)
    offsets = np.asarray(offsets, dtype=np.int64)
    starts = np.asarray(starts, dtype=np.int64)
    if lp.ndim != 1 or offsets.ndim != 1 or len(lp) != len(offsets) - 1:
        raise ValueError(f"need log_probs of shape (N - 1,) for offsets of shape (N,), got "
                         f"{lp.shape} and {offsets.shape}")
    if len(starts) == 0 or np.any(np.diff(starts) < 0) or starts[0] != 0:
        raise ValueError("starts must be increasing document offsets beginning at 0 (from scoring_stream)")
    doc = np.searchsorted(starts, offsets[1:], side="right") - 1
    return -np.bincount(doc, weights=lp, minlength=len(starts)) / LN2


def bits_per_document(log_prob_fn, vocab: "CharVocab | MusicVocab", documents: Sequence[str]) -> np.ndarray:
    """Score documents with a model and return the bits each costs (:func:`document_bits`).

    ``log_prob_fn(ids)`` maps the ``(N,)`` token ids of the :func:`scoring_stream` to the
    ``(N - 1,)`` log-probabilities in nats of tokens ``1 .. N-1``, e.g.
    ``lambda ids: gpt.token_log_probs(model, ids)`` or ``ngram.log_probs``. Dividing the
    sum by the number of characters gives bits per character on the same footing for
    any tokeniser.
    """
    stream, starts = scoring_stream(documents)
    ids, offsets = token_offsets(vocab, stream)
    return document_bits(log_prob_fn(ids), offsets, starts)


def continuation_bits(log_prob_fn, vocab: "CharVocab | MusicVocab", prompt: str,
                      continuation: str) -> float:
    r"""The bits a model spends on ``continuation`` after ``prompt``:
    :math:`-\log_2 p(\text{continuation} \mid \text{prompt})`, summed over the tokens of
    ``continuation`` (tokenised with the prompt, so a token may not straddle the two: the
    prompt should end at a token boundary, e.g. after a newline).

    ``log_prob_fn`` is as in :func:`bits_per_document`. Divide by ``len(continuation)`` for
    bits per character; for samples drawn under a constraint this measures what the
    constraint costs in the unconstrained model's eyes.
    """
    ids = vocab.encode(prompt + continuation)
    n_prompt = len(vocab.encode(prompt))
    if vocab.decode(ids[:n_prompt]) != prompt:
        raise ValueError("the prompt does not end at a token boundary of prompt + continuation; "
                         "end it with a newline")
    if n_prompt < 1:
        raise ValueError("the prompt must hold at least one token (the first token is not scored)")
    lp = log_prob_fn(ids)
    lp = np.asarray(lp.detach().cpu() if isinstance(lp, torch.Tensor) else lp, dtype=np.float64)
    return float(-lp[n_prompt - 1:].sum() / LN2)


# ------------------------------------------------------------------------ corpora

@dataclass(frozen=True)
class Corpus:
    """Documents split by document into training and validation sets, and their vocabulary.

    Each document ends with a newline; :meth:`text` joins a split's documents with one
    more newline, so a blank line separates documents (for ABC, the standard separator
    between tunes).
    """

    name: str
    train: tuple[str, ...]
    valid: tuple[str, ...]
    vocab: CharVocab

    def text(self, split: str) -> str:
        """One split as a single string (documents separated by blank lines)."""
        if split not in ("train", "valid"):
            raise ValueError(f"split must be 'train' or 'valid', got {split!r}")
        return "\n".join(self.train if split == "train" else self.valid)

    def ids(self, split: str) -> torch.Tensor:
        """One split as a ``(n_chars,)`` int64 tensor of token ids."""
        return self.vocab.encode(self.text(split))

    def __repr__(self) -> str:
        return (f"Corpus({self.name!r}, train={len(self.train)} documents / "
                f"{sum(map(len, self.train)):,} chars, valid={len(self.valid)} documents / "
                f"{sum(map(len, self.valid)):,} chars, vocab={self.vocab.size})")


def read_text_file(path: str | Path) -> str:
    """Read a UTF-8 text file, with clear errors for the usual problems.

    Raises:
        FileNotFoundError: no such file.
        IsADirectoryError: the path is a folder.
        ValueError: the file is not UTF-8 (or is binary) or holds no text.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; pass one UTF-8 text file")
    if not path.is_file():
        raise FileNotFoundError(f"no file at {path}; pass the path of a UTF-8 text file, "
                                "or 'folk' for the embedded folk-tune corpus")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"could not read {path}: {exc}") from exc
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"{path} is not UTF-8 text (invalid byte at position {exc.start}); convert it, "
            f"e.g. `iconv -f GB18030 -t UTF-8 {path.name} > out.txt` for a Chinese text in "
            "GB18030, and pass the converted file") from None
    if "\x00" in text:
        raise ValueError(f"{path} contains NUL bytes: it looks like a binary file, not text")
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if not text.strip():
        raise ValueError(f"{path} is empty (or only whitespace): there is nothing to learn from")
    return text


def split_documents(text: str) -> list[str]:
    """Documents of a plain text: blocks separated by blank lines (poems, paragraphs).

    If that gives fewer than 10 documents, each non-empty line is a document instead.
    Every document is stripped of surrounding blank lines and ends with one newline.
    """
    blocks = [b.strip("\n") for b in text.split("\n\n")]
    docs = [b.rstrip() + "\n" for b in blocks if b.strip()]
    if len(docs) < 10:
        docs = [line.rstrip() + "\n" for line in text.split("\n") if line.strip()]
    return docs


def split_by_document(documents: Sequence[str], valid_fraction: float, seed: int
                      ) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """A seeded random split of whole documents: ``(train, valid)``, each in corpus order.

    The validation set has ``max(1, round(valid_fraction * n))`` documents.
    """
    n = len(documents)
    if n < 2:
        raise ValueError(f"need at least 2 documents to split into training and validation, got {n}")
    if not 0.0 < valid_fraction < 1.0:
        raise ValueError(f"valid_fraction must be strictly between 0 and 1, got {valid_fraction}")
    n_valid = min(n - 1, max(1, round(valid_fraction * n)))
    order = np.random.default_rng(seed).permutation(n)
    valid_idx = set(order[:n_valid].tolist())
    train = tuple(d for i, d in enumerate(documents) if i not in valid_idx)
    valid = tuple(d for i, d in enumerate(documents) if i in valid_idx)
    return train, valid


def load_corpus(source: str | Path = "folk", valid_fraction: float = 0.05, seed: int = 0,
                max_documents: int | None = None,
                collections: Sequence[str] = ("essen", "oneills")) -> Corpus:
    """Load a corpus and split it into training and validation documents.

    Args:
        source: ``"folk"`` for the folk tunes in ABC notation that ship with music21 (each
            tune is a document; see :mod:`genart_utils.music` for what is kept), or the
            path of any UTF-8 text file (documents: :func:`split_documents`).
        valid_fraction: fraction of the documents held out for validation.
        seed: seed of the split; the same seed always gives the same split.
        max_documents: keep only this many documents, a seeded random subset chosen before
            the split (for fast smoke runs); ``None`` keeps all.
        collections: for ``"folk"``, which music21 collections to read.

    The vocabulary holds every character of the whole corpus (both splits), so validation
    text can always be encoded; a character seen only in validation gets its probability
    from smoothing (n-grams) or from training (a neural model learns to give it little).
    """
    if str(source) == "folk":
        from .music import load_folk_tunes

        documents = [t.abc for t in load_folk_tunes(collections).tunes]
        name = "folk tunes (" + ", ".join(collections) + ")"
    else:
        documents = split_documents(read_text_file(source))
        name = Path(source).name
    if max_documents is not None:
        if max_documents < 2:
            raise ValueError(f"max_documents must be at least 2, got {max_documents}")
        if max_documents < len(documents):
            keep = np.sort(np.random.default_rng([seed, 1]).permutation(len(documents))[:max_documents])
            documents = [documents[i] for i in keep]
    train, valid = split_by_document(documents, valid_fraction, seed)
    return Corpus(name, train, valid, CharVocab.from_texts(*documents))


def random_windows(ids: torch.Tensor, block_size: int, batch_size: int, seed: int = 0,
                   start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless batches of random windows of a token stream, for next-token training.

    Yields ``(x, y)``, both ``(batch_size, block_size)`` int64, with ``y`` the window
    shifted by one: ``y[b, t] = ids[o_b + t + 1]`` is the token that follows
    ``x[b, : t + 1]``. The offsets ``o_b`` of step ``s`` are drawn from ``(seed, s)``
    only, so ``start`` resumes a run with exactly the batches it would have seen.
    """
    n = len(ids)
    if n < block_size + 2:
        raise ValueError(f"the stream has {n} tokens, too few for windows of {block_size} + 1")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    arange = torch.arange(block_size + 1)
    step = start
    while True:
        offsets = np.random.default_rng([seed, step]).integers(0, n - block_size, size=batch_size)
        windows = ids[torch.from_numpy(offsets)[:, None] + arange]   # (B, T + 1)
        yield windows[:, :-1], windows[:, 1:]
        step += 1


# ------------------------------------------------------------------------ n-grams

@dataclass(frozen=True)
class NGramConfig:
    """A character n-gram model: each character is predicted from the ``order - 1`` before it."""

    order: int = 3                   # n; 1 is a unigram model (no context)
    smoothing: str = "kneser-ney"    # "kneser-ney" (interpolated) or "additive"
    alpha: float = 1.0               # additive pseudo-count per character (1 = Laplace)
    discount: float | None = None    # Kneser-Ney discount δ in (0, 1]; None: n1 / (n1 + 2 n2) per order

    def __post_init__(self) -> None:
        # alpha > 0: a zero pseudo-count would give unseen text probability 0
        runtime.check_fields(self, positive_ints=("order",), positive_floats=("alpha",),
                             choices={"smoothing": ("kneser-ney", "additive")})
        if self.discount is not None:
            d = self.discount
            if isinstance(d, (bool, np.bool_)) or not isinstance(d, (int, float, np.integer, np.floating)) \
                    or not 0.0 < d <= 1.0:
                raise ValueError(f"NGramConfig.discount must be a number in (0, 1] or None (estimated "
                                 f"from the counts), got {d!r}")
            object.__setattr__(self, "discount", float(d))


class _Table:
    """Sorted int64 keys with values, looked up in bulk with ``searchsorted``."""

    def __init__(self, keys: np.ndarray, *values: np.ndarray):
        self.keys = keys
        self.values = values

    def lookup(self, query: np.ndarray) -> tuple[np.ndarray, ...]:
        pos = np.searchsorted(self.keys, query)
        pos_c = np.minimum(pos, max(len(self.keys) - 1, 0))
        found = (pos < len(self.keys)) & (self.keys[pos_c] == query) if len(self.keys) else \
            np.zeros(query.shape, bool)
        return tuple(np.where(found, v[pos_c], 0) if len(v) else np.zeros(query.shape, v.dtype)
                     for v in self.values)


class NGramModel:
    r"""A count-based character n-gram model.

    With ``h`` the ``n - 1`` characters before ``w``, :math:`c(\cdot)` counts in the
    training text and :math:`|\mathcal V|` the vocabulary size (``vocab_size``):

    * **additive** (Lidstone; Laplace for ``alpha = 1``):
      :math:`p(w \mid h) = \frac{c(h w) + \alpha}{c(h) + \alpha |\mathcal V|}`, with
      :math:`c(h) = \sum_{w'} c(h w')`. Unseen contexts get the uniform distribution.
    * **interpolated Kneser-Ney** (Chen and Goodman's formulation, one discount
      :math:`\delta_m` per order :math:`m`):

      .. math:: p_m(w \mid h) = \frac{\max(c_m(h w) - \delta_m, 0)}{\sum_{w'} c_m(h w')}
                + \frac{\delta_m\, N_{1+}(h\,\bullet)}{\sum_{w'} c_m(h w')}\, p_{m-1}(w \mid h')

      where :math:`h'` drops the oldest character of :math:`h`, :math:`N_{1+}(h\,\bullet)`
      is the number of distinct characters :math:`w'` with :math:`c_m(h w') > 0`, and
      :math:`c_m` is the raw count at the highest order :math:`m = n` but the
      *continuation count* :math:`N_{1+}(\bullet\, h w)` at lower orders: the number of
      distinct characters seen right before :math:`h w` anywhere in the training text. The
      recursion ends in the uniform distribution :math:`p_0 = 1/|\mathcal V|`, so every
      character has non-zero probability; a context with no counts at order ``m`` uses
      :math:`p_{m-1}` directly. Each :math:`p_m(\cdot \mid h)` sums to 1. Default
      discounts: :math:`\delta_m = n_1 / (n_1 + 2 n_2)`, with :math:`n_1` and :math:`n_2`
      the numbers of ``m``-grams whose :math:`c_m` is 1 and 2 (0.5 if there are none),
      clipped to ``[0.001, 1]``; ``NGramConfig.discount`` sets one value for every order.

    Interpolation always mixes in the lower orders, also for a familiar context; a
    *back-off* model would consult them only for unseen continuations.

    At the start of a text, where fewer than ``n - 1`` characters precede a position, the
    model uses the longest context available: the same :math:`p_k` with :math:`k - 1`
    characters of context. The training text is not padded.
    """

    def __init__(self, config: NGramConfig, vocab_size: int):
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
        if max(vocab_size, 2) ** config.order >= 2**63:
            highest = int(math.log(2**63 - 1) / math.log(max(vocab_size, 2)))
            raise ValueError(
                f"order {config.order} is too high for {vocab_size} characters: n-gram keys "
                f"would overflow 64-bit integers; use order <= {highest}")
        self.config = config
        self.V = vocab_size
        self.tables: list[_Table] = []       # per order k: k-gram -> count used at order k
        self.contexts: list[_Table] = []     # per order k: (k-1)-gram context -> (total, types)
        self.discounts: list[float] = []
        self.n_train = 0

    # -- fitting
    def fit(self, ids: torch.Tensor | np.ndarray) -> "NGramModel":
        """Count the n-grams of a ``(N,)`` stream of token ids in ``0 .. |𝒱| - 1``."""
        x = np.asarray(ids.cpu() if isinstance(ids, torch.Tensor) else ids, dtype=np.int64)
        if x.ndim != 1 or len(x) < self.config.order:
            raise ValueError(f"need a 1-D stream of at least {self.config.order} tokens, got shape {x.shape}")
        if x.min() < 0 or x.max() >= self.V:
            raise ValueError(f"token ids must be in 0..{self.V - 1}")
        n, V = self.config.order, self.V
        keys = [x]                                    # keys[k-1]: k-grams ending at i = k-1..N-1
        for k in range(2, n + 1):
            keys.append(keys[-1][:-1] * V + x[k - 1:])
        uniq: list[np.ndarray] = [np.empty(0, np.int64)] * n
        counts: list[np.ndarray] = [np.empty(0, np.int64)] * n
        kn = self.config.smoothing == "kneser-ney"
        for k in range(1, n + 1):
            if kn and k < n:
                # continuation counts N1+(. h w): each distinct (k+1)-gram anywhere in the
                # stream counts once for the k-gram it ends with
                uniq[k - 1], counts[k - 1] = np.unique(np.unique(keys[k]) % V ** k, return_counts=True)
            else:
                uniq[k - 1], counts[k - 1] = np.unique(keys[k - 1], return_counts=True)
        self.tables, self.contexts, self.discounts = [], [], []
        for k in range(1, n + 1):
            c = counts[k - 1].astype(np.float64)
            self.tables.append(_Table(uniq[k - 1], c))
            ctx_keys, inverse = np.unique(uniq[k - 1] // V, return_inverse=True)
            totals = np.bincount(inverse, weights=c)
            types = np.bincount(inverse).astype(np.float64)
            self.contexts.append(_Table(ctx_keys, totals, types))
            if self.config.discount is not None:
                d = self.config.discount
            else:
                n1, n2 = np.sum(counts[k - 1] == 1), np.sum(counts[k - 1] == 2)
                d = n1 / (n1 + 2 * n2) if n1 + 2 * n2 > 0 else 0.5
            self.discounts.append(float(min(max(d, 1e-3), 1.0)))
        self.n_train = len(x)
        return self

    # -- probabilities
    def _probs(self, context: np.ndarray, target: np.ndarray) -> np.ndarray:
        """p(target | context) for rows of ``context`` ``(M, n-1)`` (most recent last;
        -1 = no character there) and ``target`` ``(M,)``."""
        if not self.tables:
            raise RuntimeError("fit() the model before asking for probabilities")
        n, V = self.config.order, self.V
        M = len(target)
        ctx_key = np.zeros(M, np.int64)
        valid = np.ones(M, bool)
        additive = self.config.smoothing == "additive"
        p = np.full(M, 1.0 / V)
        for k in range(1, n + 1):
            if k > 1:  # extend the context key by one more character back
                prev = context[:, -(k - 1)]
                valid &= prev >= 0
                ctx_key = ctx_key + np.where(prev >= 0, prev, 0) * V ** (k - 2)
            (c,) = self.tables[k - 1].lookup(ctx_key * V + target)
            total, types = self.contexts[k - 1].lookup(ctx_key)
            if additive:
                p_k = (c + self.config.alpha) / (total + self.config.alpha * V)
                p = np.where(valid, p_k, p)
            else:  # interpolated Kneser-Ney: discounted counts plus back-off mass times p
                d = self.discounts[k - 1]
                seen = valid & (total > 0)
                safe = np.where(seen, total, 1.0)
                p_k = np.maximum(c - d, 0.0) / safe + d * types / safe * p
                p = np.where(seen, p_k, p)
        return p

    def _contexts_of(self, x: np.ndarray) -> np.ndarray:
        """``(N, n-1)`` contexts of every position of ``x`` (-1 before the start)."""
        w = self.config.order - 1
        padded = np.concatenate([np.full(w, -1, np.int64), x])
        if w == 0:
            return np.zeros((len(x), 0), np.int64)
        return np.lib.stride_tricks.sliding_window_view(padded[:-1], w)

    def log_probs(self, ids: torch.Tensor | np.ndarray) -> np.ndarray:
        """``log p(x_i | x_<i)`` in nats for positions ``i = 1 .. N-1`` of a stream ``(N,)``
        (the first token, which has no context, is not scored): shape ``(N - 1,)``."""
        x = np.asarray(ids.cpu() if isinstance(ids, torch.Tensor) else ids, dtype=np.int64)
        if x.ndim != 1 or len(x) < 2:
            raise ValueError("need a 1-D stream of at least 2 tokens")
        if x.min() < 0 or x.max() >= self.V:
            raise ValueError(f"token ids must be in 0..{self.V - 1}")
        out = np.empty(len(x) - 1)
        chunk = 1 << 18
        contexts = self._contexts_of(x)
        for a in range(1, len(x), chunk):
            b = min(len(x), a + chunk)
            out[a - 1:b - 1] = np.log(self._probs(np.ascontiguousarray(contexts[a:b]), x[a:b]))
        return out

    def nll(self, ids: torch.Tensor | np.ndarray) -> float:
        """Average negative log-likelihood in nats per token (positions 1..N-1)."""
        return float(-self.log_probs(ids).mean())

    def next_probs(self, context: Sequence[int] | torch.Tensor) -> np.ndarray:
        """The distribution ``(|𝒱|,)`` of the next token after ``context`` (its last
        ``n - 1`` tokens are used)."""
        ctx = np.asarray(context.cpu() if isinstance(context, torch.Tensor) else list(context),
                         dtype=np.int64)
        if ctx.ndim != 1 or (len(ctx) and (ctx.min() < 0 or ctx.max() >= self.V)):
            raise ValueError(f"context must be a 1-D sequence of token ids in 0..{self.V - 1} "
                             f"(the model has {self.V} tokens), got {ctx.tolist()}")
        w = self.config.order - 1
        row = np.full(w, -1, np.int64)
        if w and len(ctx):
            tail = ctx[-w:]
            row[w - len(tail):] = tail
        rows = np.broadcast_to(row, (self.V, w))
        return self._probs(np.ascontiguousarray(rows), np.arange(self.V))

    def sample(self, prompt: Sequence[int], max_new_tokens: int, temperature: float = 1.0,
               generator: torch.Generator | None = None, stop: Sequence[int] | None = None
               ) -> list[int]:
        """Sample a continuation of ``prompt`` token by token (``temperature`` rescales the
        log-probabilities; 0 is greedy). Stops after ``stop`` (a token sequence) appears."""
        from . import sampling

        sampling.check_temperature(temperature)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) \
                or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        out = list(prompt)
        self.next_probs(out)                               # checks the prompt's token ids
        stop = list(stop or [])
        for _ in range(max_new_tokens):
            logits = torch.from_numpy(np.log(self.next_probs(out)))
            out.append(int(sampling.sample(logits, temperature=temperature, generator=generator)))
            if stop and len(out) - len(prompt) >= len(stop) and out[-len(stop):] == stop:
                break
        return out


# ------------------------------------------------------------------------ metrics

def bits_per_char(nats_per_char: float) -> float:
    """Convert an average negative log-likelihood from nats to bits: divide by ``log 2``."""
    return nats_per_char / LN2


def ngrams(text: str, n: int) -> list[str]:
    """The overlapping character n-grams of ``text``."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return [text[i:i + n] for i in range(len(text) - n + 1)]


def distinct_ngrams(texts: Sequence[str], n: int = 4) -> float:
    """Distinct-n: the number of different n-grams across all ``texts`` divided by the
    number of n-grams. 1 when nothing repeats; small when the texts are alike."""
    grams = [g for t in texts for g in ngrams(t, n)]
    if not grams:
        raise ValueError(f"the texts hold no {n}-grams")
    return len(set(grams)) / len(grams)


def repetition_rate(text: str, n: int = 8) -> float:
    """The fraction of a text's n-grams that already occurred earlier in the same text.

    Real tunes repeat phrases, so this is not zero for good music; a decoder stuck in a
    loop drives it towards 1.
    """
    grams = ngrams(text, n)
    if not grams:
        return 0.0
    seen: set[str] = set()
    repeats = 0
    for g in grams:
        repeats += g in seen
        seen.add(g)
    return repeats / len(grams)
