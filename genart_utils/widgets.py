"""Interactive explorers built on pure plot functions.

The pattern: a chapter writes ``plot_fn(**params) -> Figure`` (pure, testable, usable in
the static book) and calls :func:`explore`, which first *displays the static figure for
the default parameters* (so the published book and nbval see a real figure) and then
returns a panel of controls that redraws the figure, below it, whenever a control moves.
Works with ipywidgets 7 (Colab) and 8.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import ipywidgets
from IPython import display as ipython_display
from matplotlib.figure import Figure


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
