import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from genart_utils import plotting, training, widgets


def test_make_grid_places_each_image():
    images = torch.arange(6, dtype=torch.float32).view(6, 1, 1, 1).expand(6, 1, 2, 3)
    grid = plotting.make_grid(images, nrow=4, padding=1, pad_value=-1)
    assert grid.shape == (2 * 3 + 1, 4 * 4 + 1, 1)
    assert grid[1, 1, 0] == 0 and grid[1, 5, 0] == 1 and grid[4, 5, 0] == 5  # row 2, column 2
    assert grid[0, 0, 0] == -1


def test_image_grid_and_history_return_figures():
    fig = plotting.image_grid(torch.rand(10, 1, 8, 8), nrow=5, title="t", labels=list("abcdefghij"))
    assert isinstance(fig, Figure) and len(fig.axes) == 1
    h = training.History()
    for s in range(1, 50):
        h.log(s, {"a": 1 / s, "b": s})
    fig = plotting.plot_history(h, panels=[["a"], ["b"]], smooth=5)
    assert isinstance(fig, Figure) and len(fig.axes) == 2
    with pytest.raises(KeyError, match="nothing logged under 'c'"):
        plotting.plot_history(h, keys=["c"])
    with pytest.raises(ValueError, match="shape"):
        plotting.image_grid(torch.rand(3, 8, 8))


def test_history_legends_and_axis_labels_in_words():
    h = training.History()
    for s in range(1, 20):
        h.log(s, {"loss_d": 1 / s, "loss_g": s, "d_real": 0.5})
    fig = plotting.plot_history(h, panels=[["loss_d", "loss_g"], ["d_real"]],
                                labels={"loss_d": "discriminator loss", "loss_g": "generator loss"},
                                ylabel=["loss (nats)", "D(x) on real images"])
    left, right = fig.axes
    assert [t.get_text() for t in left.get_legend().get_texts()] == ["discriminator loss", "generator loss"]
    assert [t.get_text() for t in right.get_legend().get_texts()] == ["d_real"]      # no label given
    assert (left.get_xlabel(), left.get_ylabel(), right.get_ylabel()) == \
        ("training step", "loss (nats)", "D(x) on real images")
    assert plotting.plot_history(h, keys=["loss_g"], ylabel="nats").axes[0].get_ylabel() == "nats"
    with pytest.raises(ValueError, match="ylabel"):
        plotting.plot_history(h, panels=[["loss_d"], ["loss_g"]], ylabel=["only one"])


def test_smoothing_is_a_running_mean():
    values = np.array([1.0, 3.0, 5.0, 7.0])
    np.testing.assert_allclose(plotting._smooth(values, 2), [1.0, 2.0, 4.0, 6.0])


def test_explore_draws_static_figure_first_and_redraws_on_change(monkeypatch):
    import ipywidgets
    shown = []
    monkeypatch.setattr(widgets.ipython_display, "display", lambda obj: shown.append(obj))
    calls = []

    def plot(a, b):
        calls.append((a, b))
        fig, ax = plotting.new_figure()
        ax.plot([0, 1], [a, b])
        return fig

    controls = {"a": ipywidgets.FloatSlider(value=1.0), "b": ipywidgets.IntSlider(value=2)}
    panel = widgets.explore(plot, controls)
    assert calls == [(1.0, 2)] and isinstance(shown[0], Figure)
    controls["a"].value = 3.0
    assert calls[-1] == (3.0, 2)
    assert isinstance(panel, ipywidgets.VBox) and "run this notebook" in repr(panel)
    with pytest.raises(ValueError, match="at least one control"):
        widgets.explore(plot, {})


def test_labelled_grid_labels_every_row_and_column():
    rows = {"first": torch.rand(3, 3, 8, 8), "second": torch.rand(5, 3, 8, 8)}
    fig = plotting.labelled_grid(rows, title="t", footer="made with care")
    (ax,) = fig.axes
    assert [t.get_text() for t in ax.get_yticklabels()] == ["first", "second"]
    assert ax.get_xticks().size == 0 and ax.get_title() == "t"
    assert [t.get_text() for t in fig.texts] == ["made with care"]
    image = ax.get_images()[0].get_array()
    assert image.shape == (2 * 9 + 1, 5 * 9 + 1, 3)                 # 2 rows, the longest row's 5 columns
    assert np.all(image[1:9, 28:45] == 1.0)                          # the short first row is padded with white
    assert not np.all(image[10:18, 28:45] == 1.0)                    # the second row is not
    np.testing.assert_allclose(image[1:9, 1:9], rows["first"][0].permute(1, 2, 0).numpy())
    # Row label ticks sit at the centres of the rows.
    np.testing.assert_allclose(ax.get_yticks(), [1 + 3.5, 10 + 3.5])

    blocks = torch.rand(2, 4, 1, 6, 6)                                # (rows, columns, C, H, W), grey
    fig = plotting.labelled_grid(blocks, ["a", "b"], column_labels=["w", "x", "", "z"], ncols=4)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["w", "x", "", "z"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["a", "b"]
    assert plotting.labelled_grid([torch.rand(6, 3, 4, 4)], ["cut"], ncols=2).axes[0].get_images()[0] \
        .get_array().shape == (1 * 5 + 1, 2 * 5 + 1, 3)


def test_labelled_grid_refuses_mismatched_labels_and_shapes():
    two_rows = [torch.rand(2, 3, 4, 4), torch.rand(2, 3, 4, 4)]
    with pytest.raises(ValueError, match="one row label per row: 2 rows, 1 labels"):
        plotting.labelled_grid(two_rows, ["only one"])
    with pytest.raises(ValueError, match="one row label per row: 2 rows, none"):
        plotting.labelled_grid(two_rows)
    with pytest.raises(ValueError, match="one column label per column.*2 columns, 3 labels"):
        plotting.labelled_grid(two_rows, ["a", "b"], column_labels=["x", "y", "z"])
    with pytest.raises(ValueError, match="keys are the row labels"):
        plotting.labelled_grid({"a": two_rows[0]}, ["a"])
    with pytest.raises(ValueError, match="row 1 has \\(1, 4, 4\\)"):
        plotting.labelled_grid([torch.rand(2, 3, 4, 4), torch.rand(2, 1, 4, 4)], ["a", "b"])
    with pytest.raises(ValueError, match="row 0 must be a non-empty"):
        plotting.labelled_grid([torch.rand(3, 4, 4)], ["a"])
    with pytest.raises(ValueError, match="rows, columns, C, H, W"):
        plotting.labelled_grid(torch.rand(2, 3, 4, 4), ["a", "b"])
    with pytest.raises(ValueError, match="no rows"):
        plotting.labelled_grid({})
