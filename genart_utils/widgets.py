"""Interactive explorers built on pure plot functions.

The pattern: a chapter writes ``plot_fn(**params) -> Figure`` (pure, testable, usable in
the static book) and calls :func:`explore`, which first *displays the static figure for
the default parameters* (so the published book and nbval see a real figure) and then
returns a panel of controls that redraws the figure, below it, whenever a control moves.

The co-creation panels (:func:`sketch_panel`, :func:`mask_panel`, :func:`favourites_panel`)
follow the same idea: the notebook shows a static figure first, the panel takes callbacks
that return figures, and pure helpers (:func:`cells_to_image`, :func:`check_mask`, ...)
hold everything that can be tested without a browser. Bad input is shown to the reader as
a one-line message that says what to do, never as a traceback.

Works with ipywidgets 7 (Colab) and 8.
"""

from __future__ import annotations

import io
from typing import Any, Callable, Mapping, Sequence

import ipywidgets
import numpy as np
import torch
from IPython import display as ipython_display
from IPython import get_ipython
from matplotlib.figure import Figure

from . import plotting


class ExplorerPanel(ipywidgets.VBox):
    """The controls and output area of :func:`explore`.

    Its plain-text form is what a page without a kernel (the static book) shows in place
    of the widget: a note rather than sliders that could not redraw anything.
    """

    def __repr__(self) -> str:
        return ("[interactive controls: run this notebook (Colab or locally) to move them; "
                "the figure above shows the default values]")


def static_figure(plot_fn: Callable[..., Figure], controls: Mapping[str, Any]) -> Figure:
    """The figure for the controls' current values: what a reader without a kernel sees."""
    return plot_fn(**{name: widget.value for name, widget in controls.items()})


def explore(plot_fn: Callable[..., Figure], controls: Mapping[str, Any], *,
            show_static: bool = True, columns: int = 2) -> ExplorerPanel:
    """Display the static figure, then return controls that redraw ``plot_fn`` below it.

    Args:
        plot_fn: a pure function of the controls' values returning a Figure.
        controls: ``{parameter name: ipywidgets control}``, e.g. ``FloatSlider``.
        show_static: display the figure for the initial values first.
        columns: controls per row.

    Returns:
        The panel (controls over an output area); make it the last expression of the
        cell so that Jupyter renders it.
    """
    if not controls:
        raise ValueError("explore() needs at least one control")
    if show_static:
        ipython_display.display(static_figure(plot_fn, controls))
    output = ipywidgets.Output()

    def redraw(_change=None) -> None:
        with output:
            output.clear_output(wait=True)
            ipython_display.display(static_figure(plot_fn, controls))

    for widget in controls.values():
        widget.observe(redraw, names="value")
    items = list(controls.values())
    rows = [ipywidgets.HBox(items[i:i + columns]) for i in range(0, len(items), columns)]
    return ExplorerPanel([*rows, output])


# --------------------------------------------------------------------------------------
# Co-creation panels: sketch, mask, favourites.
#
# The panels know nothing about models. Each takes callbacks that do the work and return a
# Figure (or raise ValueError with a message for the reader); the panel shows the figure,
# or the message, in its output area. The pure helpers below turn the panels' state (a
# grid of palette indices, a grid of on/off cells, ticked boxes) into tensors and check
# them, so that they can be tested without a browser.
# --------------------------------------------------------------------------------------

#: Paint colours in [0, 1] RGB: OpenMoji's emoji palette. Index 0 (white) is the background.
PALETTE: dict[str, tuple[float, float, float]] = {
    name: tuple(int(code[i:i + 2], 16) / 255 for i in (0, 2, 4))
    for name, code in [("white", "FFFFFF"), ("black", "000000"), ("red", "D22F27"),
                       ("orange", "F4AA41"), ("yellow", "FCEA2B"), ("green", "B1CC33"),
                       ("blue", "1E50A0"), ("brown", "A57939")]
}


def _hex(rgb: Sequence[float]) -> str:
    """``(1.0, 0.5, 0.0) -> '#ff8000'``: the colour as a CSS string for ``button_color``."""
    return "#" + "".join(f"{round(255 * min(max(float(v), 0.0), 1.0)):02x}" for v in rgb)


def _square_grid(cells, size: int, what: str) -> np.ndarray:
    """``cells`` as an ``(n, n)`` integer array with ``n`` dividing ``size``, or ValueError."""
    grid = np.asarray(cells)
    if grid.ndim != 2 or grid.shape[0] != grid.shape[1] or grid.shape[0] == 0:
        raise ValueError(f"the {what} must be a square grid of cells (n, n), got shape "
                         f"{grid.shape}: pass an n x n array, e.g. 8 x 8")
    if not isinstance(size, (int, np.integer)) or size < 1:
        raise ValueError(f"size must be a positive number of pixels, got {size!r}")
    n = grid.shape[0]
    if size % n:
        raise ValueError(f"a {n} x {n} {what} does not divide a {size} x {size} image into "
                         f"equal blocks: use a grid whose side divides {size} (e.g. 8)")
    if grid.dtype == bool:
        grid = grid.astype(np.int64)
    if not np.issubdtype(grid.dtype, np.number) or not np.all(np.isfinite(grid)) \
            or not np.all(grid == np.round(grid)):
        raise ValueError(f"the {what} must hold whole numbers, got dtype {grid.dtype}")
    return grid.astype(np.int64)


def _upsample(grid: np.ndarray, size: int) -> np.ndarray:
    """Nearest upsampling: each cell of an ``(n, n, ...)`` grid becomes a ``size/n`` block."""
    block = size // grid.shape[0]
    return grid.repeat(block, axis=0).repeat(block, axis=1)


def cells_to_image(cells, size: int = 32,
                   palette: Mapping[str, Sequence[float]] = PALETTE) -> torch.Tensor:
    """Paint an ``(n, n)`` grid of palette indices as a ``(3, size, size)`` image in [0, 1].

    Cell ``(r, c)`` fills the block of pixels ``[r*b, (r+1)*b) x [c*b, (c+1)*b)`` with
    ``b = size / n`` in the colour ``list(palette.values())[cells[r][c]]``.
    """
    grid = _square_grid(cells, size, "sketch")
    colours = np.asarray(list(palette.values()), dtype=np.float32).reshape(-1, 3)
    bad = (grid < 0) | (grid >= len(colours))
    if bad.any():
        r, c = map(int, np.argwhere(bad)[0])
        raise ValueError(f"cell ({r}, {c}) holds colour {grid[r, c]}, outside the palette's "
                         f"{len(colours)} colours: use indices 0..{len(colours) - 1}")
    pixels = _upsample(colours[grid], size)                        # (size, size, 3)
    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))


def image_from_upload(content: bytes, size: int = 32) -> torch.Tensor:
    """Decode an uploaded image file as a ``(3, size, size)`` tensor in [0, 1].

    Transparent pixels are laid on white (the sketches' background); a non-square image
    is centred on a white square first, so that the whole drawing is kept, undistorted.
    """
    from PIL import Image

    try:
        with Image.open(io.BytesIO(bytes(content))) as upload:
            upload.load()
            rgba = upload.convert("RGBA")
    except Exception as error:                  # Pillow raises many types for bad bytes
        raise ValueError(f"could not read the upload as an image ({type(error).__name__}: "
                         f"{error}): upload a PNG or JPEG") from error
    side = max(rgba.size)
    page = Image.new("RGBA", (side, side), (255, 255, 255, 255))
    page.alpha_composite(rgba, ((side - rgba.width) // 2, (side - rgba.height) // 2))
    small = page.convert("RGB").resize((size, size), Image.LANCZOS)
    pixels = np.asarray(small, dtype=np.float32) / 255.0           # (size, size, 3)
    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))


def upload_contents(value) -> list[bytes]:
    """The files' bytes in a ``FileUpload.value``, in upload order.

    ipywidgets 7 gives a dict ``{name: {"content": bytes, "metadata": {...}}}``;
    ipywidgets 8 a tuple of dicts ``{"name": ..., "content": memoryview, ...}``.
    """
    if not value:
        return []
    files = value.values() if isinstance(value, Mapping) else value
    try:
        return [bytes(f["content"]) for f in files]
    except (TypeError, KeyError) as error:
        raise ValueError(f"not a FileUpload value ({type(error).__name__}: {error}): "
                         "pass upload.value") from error


def check_sketch(image: torch.Tensor) -> None:
    """ValueError when the ``(3, H, W)`` sketch is blank: every pixel within 1e-3 of one colour."""
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"a sketch is a (3, H, W) image, got shape {tuple(image.shape)}")
    if (image - image[:, :1, :1]).abs().max() <= 1e-3:
        raise ValueError("the sketch is blank: paint a few cells (or upload an image) first")


def cells_to_mask(cells, size: int = 32) -> torch.Tensor:
    """An ``(n, n)`` grid of on/off cells as a ``(1, size, size)`` mask of 0/1 (1 = fill in)."""
    grid = _square_grid(cells, size, "mask")
    if not np.isin(grid, (0, 1)).all():
        raise ValueError("the mask's cells must be 0 (keep) or 1 (fill in), got values "
                         f"{sorted(set(np.unique(grid).tolist()) - {0, 1})[:5]}")
    return torch.from_numpy(_upsample(grid.astype(np.float32), size)[None].copy())


def check_mask(mask: torch.Tensor) -> None:
    """ValueError when the mask selects nothing, or everything, to fill in."""
    fill = mask > 0.5
    if not fill.any():
        raise ValueError("nothing to fill in: toggle at least one cell of the mask")
    if fill.all():
        raise ValueError("the mask covers the whole image: leave some cells unmasked, "
                         "or generate from scratch instead")


def check_favourites(picked: Sequence[int], n: int) -> None:
    """ValueError unless ``picked`` names at least one of the images ``0..n-1``."""
    if len(picked) == 0:
        raise ValueError("pick at least one favourite (tick the boxes under the images), "
                         "then press Next generation")
    outside = [i for i in picked if not 0 <= int(i) < n]
    if outside:
        raise ValueError(f"favourites {outside} are not among the images #0..#{n - 1}: "
                         "pick from the images shown")


def _in_kernel() -> bool:
    """True inside a running Jupyter/Colab kernel (not in tests or a plain script)."""
    shell = get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None


class _Panel(ExplorerPanel):
    """An :class:`ExplorerPanel` whose handlers show a figure, or a message, in ``output``.

    In a kernel, a handler runs inside ``with output:`` so that the frontend captures what
    it prints and displays, and an unexpected error shows its traceback there (instead of
    vanishing into the log). Without a kernel (tests) ``with output:`` captures nothing,
    so what is shown is written into ``output.outputs`` directly.
    """

    _note = "[interactive panel: run this notebook (Colab or locally) to use it]"

    def __init__(self) -> None:
        super().__init__()
        self.output = ipywidgets.Output()
        self.message = ""                  # the last message shown ("" after a figure)
        self.figure: Figure | None = None  # the last figure shown

    def __repr__(self) -> str:
        return self._note

    def _show(self, *items) -> None:
        """Replace the output's contents by ``items``: message strings and Figures."""
        if _in_kernel():
            ipython_display.clear_output(wait=True)
            for item in items:
                if isinstance(item, str):
                    print(item)
                else:
                    ipython_display.display(item)
        else:
            self.output.outputs = tuple(
                {"output_type": "stream", "name": "stdout", "text": item + "\n"}
                if isinstance(item, str) else
                {"output_type": "display_data", "data": {"text/plain": repr(item)}, "metadata": {}}
                for item in items)

    def _attempt(self, work: Callable[[], Figure], keep: Figure | None = None) -> Figure | None:
        """Show ``work()``'s figure (and the text under it, when ``work`` returns
        ``(figure, text)``), or its ValueError as a message (above ``keep``, if given)."""
        with self.output:
            try:
                result = work()
            except ValueError as error:
                self.message = str(error)
                self._show(self.message, *([keep] if keep is not None else []))
                return None
            figure, text = result if isinstance(result, tuple) else (result, None)
            if not isinstance(figure, Figure):
                raise TypeError(f"the panel's callback must return a matplotlib Figure, "
                                f"got {type(figure).__name__}")
            self.message, self.figure = "", figure
            self._show(figure, *([text] if text else []))
            return figure

    def _say(self, message: str) -> None:
        with self.output:
            self.message = message
            self._show(message)


def _cell_layout(px: int = 26) -> ipywidgets.Layout:
    return ipywidgets.Layout(width=f"{px}px", height=f"{px}px", padding="0px", margin="1px")


def _grid_box(children, columns: int, width: str = "28px") -> ipywidgets.GridBox:
    return ipywidgets.GridBox(children, layout=ipywidgets.Layout(
        grid_template_columns=f"repeat({columns}, {width})", grid_gap="0px"))


class SketchPanel(_Panel):
    """The panel of :func:`sketch_panel`. State: ``cells`` (grid x grid palette indices),
    ``uploaded`` (the last uploaded image, or None); ``draw()`` is the Draw button."""

    _note = ("[interactive sketch pad: run this notebook (Colab or locally) to paint a sketch "
             "or upload one; the figure above shows an example]")

    def __init__(self, run: Callable[[torch.Tensor, str, float], Figure], *, grid: int = 8,
                 size: int = 32, strengths: tuple[float, float, float] = (0.0, 1.0, 0.6),
                 prompt: str = "", palette: Mapping[str, Sequence[float]] = PALETTE) -> None:
        super().__init__()
        lo, hi, value = strengths
        if not lo < hi or not lo <= value <= hi:
            raise ValueError(f"strengths must be (min, max, default) with min < max and the "
                             f"default between them, got {strengths}")
        _square_grid(np.zeros((grid, grid), dtype=np.int64), size, "sketch")  # grid divides size
        self._run, self.size, self.palette = run, size, dict(palette)
        self.cells = np.zeros((grid, grid), dtype=np.int64)   # palette indices; 0 = background
        self.uploaded: torch.Tensor | None = None
        names = list(self.palette)
        self.colour = ipywidgets.ToggleButtons(options=names, value=names[min(1, len(names) - 1)],
                                               description="paint",
                                               style={"button_width": "56px"})
        self.buttons = [[ipywidgets.Button(description="", tooltip=f"row {r}, column {c}",
                                           layout=_cell_layout())
                         for c in range(grid)] for r in range(grid)]
        for r, row in enumerate(self.buttons):
            for c, button in enumerate(row):
                button.on_click(lambda _b, r=r, c=c: self.paint(r, c))
        self.upload = ipywidgets.FileUpload(accept="image/*", multiple=False,
                                            description="Upload a sketch")
        self.upload.observe(self._on_upload, names="value")
        self.strength = ipywidgets.FloatSlider(value=value, min=lo, max=hi, step=0.05,
                                               description="strength")
        self.prompt = ipywidgets.Text(value=prompt, description="prompt",
                                      placeholder="what to draw, e.g. a red apple")
        clear = ipywidgets.Button(description="Clear", tooltip="blank the grid, forget the upload")
        clear.on_click(lambda _b: self.clear())
        draw = ipywidgets.Button(description="Draw", button_style="primary")
        draw.on_click(self.draw)
        self._repaint()
        self.children = [self.colour, _grid_box(sum(self.buttons, []), grid), self.upload,
                         ipywidgets.HBox([self.prompt, self.strength]),
                         ipywidgets.HBox([clear, draw]), self.output]

    def _repaint(self) -> None:
        colours = list(self.palette.values())
        for r, row in enumerate(self.buttons):
            for c, button in enumerate(row):
                button.style.button_color = _hex(colours[self.cells[r, c]])

    def paint(self, r: int, c: int, colour: str | None = None) -> None:
        """Paint cell ``(r, c)`` in ``colour`` (default: the selected one), as a click does."""
        name = self.colour.value if colour is None else colour
        if name not in self.palette:
            raise ValueError(f"unknown colour {name!r}: pick one of {', '.join(self.palette)}")
        self.cells[r, c] = list(self.palette).index(name)
        self.buttons[r][c].style.button_color = _hex(self.palette[name])

    def clear(self) -> None:
        """Blank the grid and forget the upload."""
        self.cells[:] = 0
        self._repaint()
        self.uploaded = None
        try:  # FileUpload.value is read-only in ipywidgets 7 (a dict), a tuple in 8
            self.upload.set_trait("value", type(self.upload.value)())
        except Exception:
            pass
        self._say("cleared: paint a few cells (or upload an image), then press Draw")

    def _on_upload(self, change) -> None:
        contents = upload_contents(change["new"])
        if not contents:          # the upload was reset (Clear)
            return
        with self.output:
            try:
                self.uploaded = image_from_upload(contents[-1], self.size)
            except ValueError as error:
                self.uploaded = None
                self.message = str(error)
                self._show(self.message)
                return
        self._say("using the uploaded image: press Draw (Clear goes back to painting the grid)")

    def sketch(self) -> torch.Tensor:
        """The ``(3, size, size)`` image that Draw sends: the upload if any, else the grid."""
        if self.uploaded is not None:
            return self.uploaded
        return cells_to_image(self.cells, self.size, self.palette)

    def draw(self, _button=None) -> Figure | None:
        """Check the sketch, call ``run(image, prompt, strength)`` and show its figure."""
        def work() -> Figure:
            image = self.sketch()
            check_sketch(image)
            return self._run(image, self.prompt.value, float(self.strength.value))
        return self._attempt(work)


def sketch_panel(run: Callable[[torch.Tensor, str, float], Figure], *, grid: int = 8,
                 size: int = 32, strengths: tuple[float, float, float] = (0.0, 1.0, 0.6),
                 prompt: str = "", palette: Mapping[str, Sequence[float]] = PALETTE) -> SketchPanel:
    """A sketch pad: paint a ``grid`` x ``grid`` picture (or upload one), then Draw.

    Draw calls ``run(image, prompt, strength)`` with the ``(3, size, size)`` sketch in
    [0, 1], the prompt text and the strength slider's value (``strengths`` is its
    ``(min, max, default)``), and shows the returned figure. A blank sketch, an unreadable
    upload, or a ValueError raised by ``run`` is shown as a message instead. ``palette``
    gives the paint colours (its first one is the background).
    """
    return SketchPanel(run, grid=grid, size=size, strengths=strengths, prompt=prompt,
                       palette=palette)


class MaskPanel(_Panel):
    """The panel of :func:`mask_panel`. State: ``cells`` (grid x grid of 0/1, 1 = fill in);
    ``fill()`` is the Fill in button."""

    _note = ("[interactive mask: run this notebook (Colab or locally) to choose the cells to "
             "fill in; the figure above shows an example]")

    def __init__(self, run: Callable[[torch.Tensor], Figure], *, grid: int = 8,
                 size: int = 32) -> None:
        super().__init__()
        _square_grid(np.zeros((grid, grid), dtype=np.int64), size, "mask")
        self._run, self.size = run, size
        self.cells = np.zeros((grid, grid), dtype=np.int64)
        self.buttons = [[ipywidgets.ToggleButton(value=False, description="",
                                                 tooltip=f"row {r}, column {c}",
                                                 layout=_cell_layout())
                         for c in range(grid)] for r in range(grid)]
        for r, row in enumerate(self.buttons):
            for c, button in enumerate(row):
                button.observe(lambda change, r=r, c=c: self._on_toggle(r, c, change["new"]),
                               names="value")
        clear = ipywidgets.Button(description="Clear", tooltip="unmask every cell")
        clear.on_click(lambda _b: self.clear())
        fill = ipywidgets.Button(description="Fill in", button_style="primary")
        fill.on_click(self.fill)
        self.children = [ipywidgets.HTML("Toggle the cells to fill in (orange), then press "
                                         "<b>Fill in</b>."),
                         _grid_box(sum(self.buttons, []), grid), ipywidgets.HBox([clear, fill]),
                         self.output]

    def _on_toggle(self, r: int, c: int, on: bool) -> None:
        self.cells[r, c] = int(on)
        # button_style, not style.button_color: ipywidgets 7's ToggleButton has no colour style
        self.buttons[r][c].button_style = "warning" if on else ""

    def clear(self) -> None:
        """Unmask every cell."""
        for row in self.buttons:
            for button in row:
                button.value = False

    def fill(self, _button=None) -> Figure | None:
        """Check the mask, call ``run(mask)`` and show its figure."""
        def work() -> Figure:
            mask = cells_to_mask(self.cells, self.size)
            check_mask(mask)
            return self._run(mask)
        return self._attempt(work)


def mask_panel(run: Callable[[torch.Tensor], Figure], *, grid: int = 8,
               size: int = 32) -> MaskPanel:
    """Choose cells to fill in: Fill in calls ``run(mask)`` with the ``(1, size, size)``
    mask (1 = fill in) and shows the returned figure; an empty or full mask, or a
    ValueError raised by ``run``, is shown as a message instead."""
    return MaskPanel(run, grid=grid, size=size)


class FavouritesPanel(_Panel):
    """The panel of :func:`favourites_panel`: the population, one box per image, and a
    Next generation button (``next()``); ``picked()`` lists the ticked images."""

    _note = ("[interactive selection: run this notebook (Colab or locally) to pick favourites "
             "and breed the next generation; the figure above shows the first population]")

    def __init__(self, images_fn: Callable[[], torch.Tensor],
                 next_fn: Callable[[list[int]], None], *, columns: int = 4,
                 describe: Callable[[torch.Tensor], str] | None = None) -> None:
        super().__init__()
        if columns < 1:
            raise ValueError(f"columns must be at least 1, got {columns}")
        self._images_fn, self._next_fn, self.columns = images_fn, next_fn, columns
        self._describe = describe
        self.generation = 0
        self.checkboxes: list[ipywidgets.Checkbox] = []
        self._boxes = _grid_box([], columns, "1fr")
        button = ipywidgets.Button(description="Next generation", button_style="primary")
        button.on_click(self.next)
        self.redraw()
        self.children = [self.output, self._boxes, button]

    def _population_figure(self) -> tuple[Figure, str | None]:
        images = self._images_fn()
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or len(images) == 0:
            raise ValueError("images_fn must return a non-empty (P, C, H, W) tensor, got "
                             f"{getattr(images, 'shape', type(images).__name__)}")
        n = len(images)
        if len(self.checkboxes) != n:
            self.checkboxes = [ipywidgets.Checkbox(value=False, description=f"#{i}", indent=False)
                               for i in range(n)]
            self._boxes.children = self.checkboxes
        for box in self.checkboxes:
            box.value = False
        figure = plotting.image_grid(images, nrow=self.columns, labels=[f"#{i}" for i in range(n)],
                                     title=f"generation {self.generation}: tick your favourites")
        return figure, (self._describe(images) if self._describe is not None else None)

    def redraw(self) -> Figure | None:
        """Draw the current population and untick every box."""
        return self._attempt(self._population_figure)

    def picked(self) -> list[int]:
        """The indices of the ticked images."""
        return [i for i, box in enumerate(self.checkboxes) if box.value]

    def next(self, _button=None) -> Figure | None:
        """Check the picks, call ``next_fn(picked)``, then draw the new population."""
        def work() -> Figure:
            picked = self.picked()
            check_favourites(picked, len(self.checkboxes))
            self._next_fn(picked)
            self.generation += 1
            return self._population_figure()
        return self._attempt(work, keep=self.figure)


def favourites_panel(images_fn: Callable[[], torch.Tensor],
                     next_fn: Callable[[list[int]], None], *, columns: int = 4,
                     describe: Callable[[torch.Tensor], str] | None = None) -> FavouritesPanel:
    """Interactive selection: tick favourites among the population, press Next generation.

    ``images_fn()`` returns the current population ``(P, 3, H, W)`` in [0, 1], drawn in a
    grid of ``columns`` with numbered images ``#0..#P-1``; Next generation calls
    ``next_fn(picked)`` with the ticked indices and redraws. Picking none (or a ValueError
    from a callback) is shown as a message above the population. ``describe(images)``, if
    given, is a text shown under each population (say, each image's provenance).
    """
    return FavouritesPanel(images_fn, next_fn, columns=columns, describe=describe)
