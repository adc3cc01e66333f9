"""Figures for the book. Every function returns a :class:`matplotlib.figure.Figure` and
none calls ``plt.show()``: the notebook decides when to show (end a cell with ``fig``).

Figures are built with :class:`~matplotlib.figure.Figure` directly rather than through
``pyplot``, so no global figure list grows and nothing is displayed twice.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
import torch
from matplotlib.figure import Figure

from .training import History


def new_figure(ncols: int = 1, nrows: int = 1, size: tuple[float, float] = (4.0, 3.0), **kwargs):
    """A figure with a grid of axes, each panel ``size`` inches: ``fig, axes = new_figure(2)``."""
    fig = Figure(figsize=(size[0] * ncols, size[1] * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=True, **kwargs)
    return fig, axes


def make_grid(images: torch.Tensor, nrow: int = 8, padding: int = 1, pad_value: float = 1.0) -> np.ndarray:
    """Tile ``(N, C, H, W)`` images into one ``(rows*H', nrow*W', C)`` array."""
    if images.ndim != 4:
        raise ValueError(f"images must have shape (N, C, H, W), got {tuple(images.shape)}")
    x = images.detach().float().cpu().numpy()
    n, c, h, w = x.shape
    rows = math.ceil(n / nrow)
    grid = np.full((rows * (h + padding) + padding, nrow * (w + padding) + padding, c), pad_value,
                   dtype=np.float32)
    for i in range(n):
        r, col = divmod(i, nrow)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        grid[top:top + h, left:left + w] = x[i].transpose(1, 2, 0)
    return grid


def image_grid(images: torch.Tensor, nrow: int = 8, title: str | None = None,
               value_range: tuple[float, float] = (0.0, 1.0), scale: float = 0.6,
               labels: Sequence[str] | None = None) -> Figure:
    """Show ``(N, C, H, W)`` images in a grid; values are clipped to ``value_range``.

    Single-channel images are drawn in grey with ink dark on a white page (``gray_r``
    shows high values as dark: MNIST's strokes are 1 and its background 0).
    """
    lo, hi = value_range
    x = ((images.detach().float().cpu() - lo) / (hi - lo)).clamp(0, 1)
    n = len(x)
    ncols = min(nrow, n)
    nrows = math.ceil(n / nrow)
    h, w = x.shape[-2:]
    cell = scale * max(h, w) / 28 + 0.35
    fig = Figure(figsize=(ncols * cell, nrows * cell + (0.3 if title else 0)), layout="constrained")
    ax = fig.add_subplot()
    grid = make_grid(x, nrow=ncols, pad_value=0.0 if x.shape[1] == 1 else 1.0)
    if grid.shape[-1] == 1:
        ax.imshow(grid[..., 0], cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
    else:
        ax.imshow(grid, interpolation="nearest")
    if labels is not None:
        for i, label in enumerate(labels[:n]):
            r, c = divmod(i, ncols)
            ax.text(1 + c * (w + 1), 1 + r * (h + 1), str(label), color="tab:red",
                    fontsize=8, va="top", ha="left")
    ax.set_axis_off()
    if title:
        ax.set_title(title)
    return fig


def labelled_grid(rows, row_labels: Sequence[str] | None = None, *,
                  column_labels: Sequence[str] | None = None, title: str | None = None,
                  footer: str | None = None, ncols: int | None = None, cell: float = 0.5,
                  value_range: tuple[float, float] = (0.0, 1.0)) -> Figure:
    """Rows of images with a label beside each row and, optionally, under each column.

    Args:
        rows: ``{label: (k, C, H, W) images}`` (the keys are the row labels), a sequence of
            ``(k, C, H, W)`` tensors, or one ``(rows, columns, C, H, W)`` tensor. Rows may
            hold different numbers of images; shorter rows are padded with blank cells.
        row_labels: one label per row; required unless ``rows`` is a mapping.
        column_labels: one label per column (``""`` for none), written under the grid.
        title: drawn above the grid; ``footer`` (say an attribution) small, below it.
        ncols: the number of columns; by default the longest row's length, and longer rows
            are cut to it.
        cell: inches per image.

    Values are clipped to ``value_range``; single-channel images are drawn in grey as in
    :func:`image_grid`. Returns a figure with one axes whose y tick labels are the row
    labels and whose x tick labels are the column labels.
    """
    if isinstance(rows, Mapping):
        if row_labels is not None:
            raise ValueError("rows is a mapping, whose keys are the row labels: leave row_labels out")
        row_labels, rows = [str(k) for k in rows], list(rows.values())
    elif isinstance(rows, torch.Tensor):
        if rows.ndim != 5:
            raise ValueError(f"a tensor of rows must have shape (rows, columns, C, H, W), got {tuple(rows.shape)}")
        rows = list(rows)
    else:
        rows = list(rows)
    if not rows:
        raise ValueError("no rows to draw: pass at least one row of images")
    for i, images in enumerate(rows):
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or len(images) == 0:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"row {i} must be a non-empty (k, C, H, W) tensor of images, got {shape}")
        if images.shape[1:] != rows[0].shape[1:]:
            raise ValueError(f"every row must have images of one shape: row 0 has {tuple(rows[0].shape[1:])}, "
                             f"row {i} has {tuple(images.shape[1:])}")
    if row_labels is None or len(row_labels) != len(rows):
        got = "none" if row_labels is None else len(row_labels)
        raise ValueError(f"give one row label per row: {len(rows)} rows, {got} labels")
    ncols = ncols or max(len(images) for images in rows)
    if column_labels is not None and len(column_labels) != ncols:
        raise ValueError(f"give one column label per column (\"\" for none): {ncols} columns, "
                         f"{len(column_labels)} labels")
    lo, hi = value_range
    c, h, w = rows[0].shape[1:]
    blank = lo if c == 1 else hi                                     # white in either colour map
    padded = [torch.cat([images[:ncols].detach().float().cpu(),
                         torch.full((max(0, ncols - len(images)), c, h, w), float(blank))]) for images in rows]
    x = ((torch.cat(padded) - lo) / (hi - lo)).clamp(0, 1)         # (rows * ncols, C, H, W)
    below = 0.0 if column_labels is None else 0.6
    fig = Figure(figsize=(ncols * cell + 1.8, len(rows) * cell + below + (0.4 if title else 0.1)),
                 layout="constrained")
    ax = fig.add_subplot()
    grid = make_grid(x, nrow=ncols, pad_value=0.0 if c == 1 else 1.0)
    if c == 1:
        ax.imshow(grid[..., 0], cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
    else:
        ax.imshow(grid, interpolation="nearest")
    pitch_y, pitch_x = h + 1, w + 1                                  # one pixel of padding per image
    ax.set_yticks([1 + pitch_y * i + h / 2 - 0.5 for i in range(len(rows))], list(row_labels), fontsize=8)
    if column_labels is not None:
        ax.set_xticks([1 + pitch_x * j + w / 2 - 0.5 for j in range(ncols)], list(column_labels), fontsize=7,
                      rotation=40, ha="right")
    else:
        ax.set_xticks([])
    ax.tick_params(length=0)
    for side in ax.spines.values():
        side.set_visible(False)
    if title:
        ax.set_title(title, fontsize=9)
    if footer:
        fig.text(0.5, 0.0, footer, ha="center", va="top", fontsize=7)
    return fig


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    if window <= 1 or len(values) < window:
        return values
    kernel = np.ones(window) / window
    # Average over the available points at the start instead of padding with zeros.
    return np.convolve(values, kernel, mode="full")[: len(values)] / np.convolve(
        np.ones_like(values), kernel, mode="full")[: len(values)]


def plot_history(history: History, keys: Sequence[str] | None = None, smooth: int = 1,
                 logy: bool = False, title: str | None = None,
                 panels: Sequence[Sequence[str]] | None = None,
                 labels: Mapping[str, str] | None = None,
                 ylabel: str | Sequence[str | None] | None = None) -> Figure:
    """Training curves from a :class:`~genart_utils.training.History`.

    Args:
        keys: the series to draw on one panel (default: all). ``panels`` instead draws a
            panel per group of keys, e.g. ``[["loss_d", "loss_g"], ["d_real", "d_fake"]]``.
        smooth: a running-mean window; the raw values are drawn faintly behind.
        labels: legend entries in words for some keys, e.g.
            ``{"loss_d": "discriminator loss J_D"}``; other keys are shown as they are.
        ylabel: the y-axis label, one for all panels or one per panel.
    """
    groups = [list(p) for p in panels] if panels else [list(keys or history.keys())]
    labels = dict(labels or {})
    ylabels = [ylabel] * len(groups) if ylabel is None or isinstance(ylabel, str) else list(ylabel)
    if len(ylabels) != len(groups):
        raise ValueError(f"ylabel: give one label, or one per panel ({len(groups)}), got {len(ylabels)}")
    fig, axes = new_figure(len(groups), size=(4.5, 3.0))
    axes = np.atleast_1d(axes)
    for ax, group, y_text in zip(axes, groups, ylabels):
        for key in group:
            steps, values = history.series(key)
            label = labels.get(key, key)
            if smooth > 1:
                line, = ax.plot(steps, values, alpha=0.25)
                ax.plot(steps, _smooth(values, smooth), color=line.get_color(), label=label)
            else:
                ax.plot(steps, values, label=label, marker="." if len(steps) < 30 else None)
        ax.set_xlabel("training step")
        if y_text:
            ax.set_ylabel(y_text)
        if logy:
            ax.set_yscale("log")
        ax.legend()
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    return fig


def text_panel(ax, text: str, title: str | None = None, fontsize: float = 8.0) -> None:
    """Write ``text`` in a monospace font on ``ax`` (its frame hidden), for generated text."""
    ax.set_axis_off()
    ax.text(0.0, 1.0, text, family="monospace", fontsize=fontsize, va="top", ha="left",
            transform=ax.transAxes)
    if title:
        ax.set_title(title, fontsize=fontsize + 1, loc="left")


_NOTE_NAMES = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")


def piano_roll(events: Sequence, ax=None, title: str | None = None,
               bar_times: Sequence[float] | None = None) -> Figure:
    """Draw notes as a piano roll: one bar per note, pitch upwards, time in quarter notes.

    ``events`` are :class:`genart_utils.music.NoteEvent` (``pitch``, ``start``,
    ``duration``), e.g. from :func:`genart_utils.music.abc_to_events`. Each note is its own
    rectangle with a white outline, so repeated notes of one pitch (C C) stay two notes
    rather than one long one. ``bar_times`` (in quarter notes) are drawn as faint bar lines.
    """
    if isinstance(events, (np.ndarray, torch.Tensor)):
        raise TypeError("piano_roll draws note events (music.abc_to_events(tune)), not an array; "
                        "music.piano_roll_matrix computes the array form")
    events = list(events)
    if not events:
        raise ValueError("no notes to draw: the piano roll needs at least one NoteEvent")
    pitches = np.array([e.pitch for e in events])
    starts = np.array([e.start for e in events], dtype=float)
    durations = np.array([e.duration for e in events], dtype=float)
    lowest, highest = int(pitches.min()), int(pitches.max())
    end = float((starts + durations).max())
    if ax is None:
        fig, ax = new_figure(size=(min(12.0, 2.0 + end / 3), 2.8))
    else:
        fig = ax.figure
    ax.bar(starts, 0.8, width=durations, bottom=pitches - 0.4, align="edge", color="tab:blue",
           edgecolor="white", linewidth=0.8)
    ax.set_xlim(0, end)
    ax.set_ylim(lowest - 0.7, highest + 0.7)
    # Every natural note for a narrow range, else only the Cs and Gs.
    labelled = (0, 2, 4, 5, 7, 9, 11) if highest - lowest < 24 else (0, 7)
    ticks = [p for p in range(lowest, highest + 1) if p % 12 in labelled] or [lowest]
    ax.set_yticks(ticks, [f"{_NOTE_NAMES[p % 12]}{p // 12 - 1}" for p in ticks])
    for x in bar_times if bar_times is not None else ():
        ax.axvline(x, color="0.4", lw=0.6, alpha=0.5)
    ax.set_xlabel("time (quarter notes)")
    ax.set_ylabel("pitch")
    if title:
        ax.set_title(title, fontsize=9)
    return fig


def attention_map(weights: torch.Tensor, labels: Sequence[str], titles: Sequence[str] | None = None,
                  ncols: int = 4, cell: float = 3.0) -> Figure:
    """Heat maps of attention weights ``(H, T, T)`` (one panel per head; row = query
    position, column = key position), with the tokens as tick labels."""
    w = weights.detach().float().cpu()
    if w.ndim == 2:
        w = w[None]
    heads, T, _ = w.shape
    ncols = min(ncols, heads)
    nrows = math.ceil(heads / ncols)
    fig, axes = new_figure(ncols, nrows, size=(cell, cell))
    axes = np.atleast_1d(axes).ravel()
    shown = [("\\n" if c == "\n" else ("\u2423" if c == " " else c)) for c in labels]
    for h, ax in enumerate(axes):
        if h >= heads:
            ax.set_axis_off()
            continue
        ax.imshow(w[h].numpy(), cmap="magma", vmin=0, vmax=float(w[h].max()), interpolation="nearest")
        ax.set_xticks(range(T), shown, fontsize=5, family="monospace")
        ax.set_yticks(range(T), shown, fontsize=5, family="monospace")
        ax.tick_params(length=0, pad=1)
        if titles is not None:
            ax.set_title(titles[h], fontsize=9)
        ax.set_xlabel("key (attended to)", fontsize=7)
        ax.set_ylabel("query", fontsize=7)
    return fig
