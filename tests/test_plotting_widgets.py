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


# --- co-creation panels: pure helpers ------------------------------------------------------

def _png(colour, size=(64, 64), mode="RGB") -> bytes:
    import io

    from PIL import Image
    buffer = io.BytesIO()
    Image.new(mode, size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def test_palette_starts_with_white_and_holds_rgb_in_unit_range():
    names = list(widgets.PALETTE)
    assert names[0] == "white" and widgets.PALETTE["white"] == (1.0, 1.0, 1.0)
    assert {"black", "red", "orange", "yellow", "green", "blue", "brown"} <= set(names)
    assert all(len(rgb) == 3 and all(0 <= v <= 1 for v in rgb) for rgb in widgets.PALETTE.values())


def test_cells_to_image_paints_each_block_in_its_colour():
    colours = list(widgets.PALETTE.values())
    cells = np.arange(16).reshape(4, 4) % len(colours)
    image = widgets.cells_to_image(cells, size=8)
    assert image.shape == (3, 8, 8) and image.dtype == torch.float32
    for y in range(8):                                        # brute force: every pixel
        for x in range(8):
            expected = colours[cells[y // 2, x // 2]]
            np.testing.assert_allclose(image[:, y, x].numpy(), expected, atol=1e-6)
    assert torch.equal(widgets.cells_to_image([[0, 1], [1, 0]], size=4),
                       widgets.cells_to_image(np.array([[0, 1], [1, 0]]), size=4))


def test_cells_to_image_refuses_bad_grids_with_a_hint():
    with pytest.raises(ValueError, match="square grid.*n x n"):
        widgets.cells_to_image(np.zeros((2, 4), dtype=int))
    with pytest.raises(ValueError, match="does not divide.*side divides 32"):
        widgets.cells_to_image(np.zeros((5, 5), dtype=int))
    with pytest.raises(ValueError, match=r"cell \(1, 0\) holds colour 8.*indices 0..7"):
        widgets.cells_to_image([[0, 0], [8, 0]])
    with pytest.raises(ValueError, match="outside the palette"):
        widgets.cells_to_image([[0, -1], [0, 0]])


def test_image_from_upload_round_trips_a_png_and_refuses_garbage():
    red = widgets.image_from_upload(_png((255, 0, 0)), size=32)
    assert red.shape == (3, 32, 32)
    np.testing.assert_allclose(red.numpy(), np.broadcast_to(np.array([1.0, 0, 0])[:, None, None],
                                                            (3, 32, 32)), atol=1e-6)
    clear = widgets.image_from_upload(_png((0, 0, 0, 0), mode="RGBA"), size=8)
    assert torch.allclose(clear, torch.ones(3, 8, 8))        # transparent lies on white
    wide = widgets.image_from_upload(_png((0, 0, 255), size=(40, 20)), size=8)
    assert torch.allclose(wide[:, 0], torch.ones(3, 8))       # padded to a square with white
    assert torch.allclose(wide[:, 4], torch.tensor([0.0, 0, 1])[:, None].expand(3, 8), atol=1e-6)
    with pytest.raises(ValueError, match="could not read the upload as an image.*PNG or JPEG"):
        widgets.image_from_upload(b"certainly not an image")


def test_upload_contents_reads_ipywidgets_7_and_8_values():
    png = _png((0, 255, 0))
    v7 = {"a.png": {"content": b"first", "metadata": {"name": "a.png"}},
          "b.png": {"content": png, "metadata": {"name": "b.png"}}}
    v8 = ({"name": "a.png", "type": "image/png", "size": 5, "content": memoryview(b"first")},
          {"name": "b.png", "type": "image/png", "size": len(png), "content": memoryview(png)})
    assert widgets.upload_contents(v7) == widgets.upload_contents(v8) == [b"first", png]
    assert all(type(c) is bytes for c in widgets.upload_contents(v8))
    assert widgets.upload_contents({}) == widgets.upload_contents(()) == []
    assert widgets.upload_contents(None) == []


def test_checks_refuse_blank_sketches_empty_or_full_masks_and_no_favourites():
    with pytest.raises(ValueError, match="the sketch is blank: paint a few cells"):
        widgets.check_sketch(torch.ones(3, 8, 8))
    with pytest.raises(ValueError, match="sketch is blank"):
        widgets.check_sketch(torch.full((3, 8, 8), 0.3) + 1e-4 * torch.rand(3, 8, 8))
    sketch = torch.ones(3, 8, 8)
    sketch[0, 2, 3] = 0.0
    widgets.check_sketch(sketch)

    mask = widgets.cells_to_mask([[0, 1], [0, 0]], size=4)
    assert mask.shape == (1, 4, 4) and mask.dtype == torch.float32
    assert torch.equal(mask[0], torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 0, 0], [0, 0, 0, 0.]]))
    widgets.check_mask(mask)
    with pytest.raises(ValueError, match="nothing to fill in: toggle at least one cell"):
        widgets.check_mask(widgets.cells_to_mask(np.zeros((4, 4), dtype=bool)))
    with pytest.raises(ValueError, match="covers the whole image: leave some cells unmasked"):
        widgets.check_mask(widgets.cells_to_mask(np.ones((4, 4), dtype=int)))
    with pytest.raises(ValueError, match="0 \\(keep\\) or 1 \\(fill in\\)"):
        widgets.cells_to_mask([[0, 2], [0, 0]])
    with pytest.raises(ValueError, match="does not divide"):
        widgets.cells_to_mask(np.zeros((3, 3), dtype=int))

    widgets.check_favourites([0, 3], 4)
    with pytest.raises(ValueError, match="pick at least one favourite .*Next generation"):
        widgets.check_favourites([], 4)
    with pytest.raises(ValueError, match=r"favourites \[4\] are not among the images #0..#3"):
        widgets.check_favourites([1, 4], 4)


# --- co-creation panels: the widgets, driven without a browser ------------------------------

def _stub(record):
    def run(*args):
        record.append(args)
        fig, ax = plotting.new_figure()
        ax.plot([0, 1], [0, 1])
        return fig
    return run


def _v8_upload(name, content):
    """What a reader's upload sets ``FileUpload.value`` to (ipywidgets 8: a tuple of dicts;
    ipywidgets 7: a dict name -> {"content", "metadata"})."""
    import datetime

    import ipywidgets
    if ipywidgets.__version__.startswith("7"):
        return {name: {"content": content, "metadata": {"name": name, "type": "image/png"}}}
    return ({"name": name, "type": "image/png", "size": len(content), "content": memoryview(content),
             "last_modified": datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc)},)


def _printed(output) -> str:
    return "".join(o.get("text", "") for o in output.outputs if o["output_type"] == "stream")


def test_sketch_panel_refuses_a_blank_sketch_then_draws_the_painted_one():
    calls = []
    panel = widgets.sketch_panel(_stub(calls), grid=4, size=8, prompt="a cat", strengths=(0, 1, 0.5))
    assert "run this notebook" in repr(panel) and isinstance(panel, widgets.ExplorerPanel)
    assert panel.draw() is None and calls == []
    assert panel.message.startswith("the sketch is blank")
    assert "the sketch is blank: paint a few cells" in _printed(panel.output)

    panel.colour.value = "red"
    panel.buttons[1][2].click()                               # as the reader's click does
    assert panel.cells[1, 2] == list(widgets.PALETTE).index("red")
    assert panel.buttons[1][2].style.button_color == "#d22f27"
    panel.strength.value = 0.7
    figure = panel.draw()
    assert isinstance(figure, Figure) and panel.message == "" and _printed(panel.output) == ""
    (image, prompt, strength), = calls
    assert torch.equal(image, widgets.cells_to_image(panel.cells, size=8))
    assert torch.allclose(image[:, 2:4, 4:6], torch.tensor(widgets.PALETTE["red"])[:, None, None])
    assert prompt == "a cat" and strength == pytest.approx(0.7)

    with pytest.raises(ValueError, match="unknown colour 'pink': pick one of white, black"):
        panel.paint(0, 0, "pink")
    panel.clear()
    assert not panel.cells.any() and panel.buttons[1][2].style.button_color == "#ffffff"
    assert panel.draw() is None and len(calls) == 1


def test_sketch_panel_shows_a_value_error_from_run_and_uses_an_upload():
    def run(image, prompt, strength):
        raise ValueError(f"the tokenizer has no '{prompt[-1]}': use letters and spaces")

    panel = widgets.sketch_panel(run, grid=4, size=8, prompt="a cat ☃")
    panel.paint(0, 0, "black")
    assert panel.draw() is None                               # shown, not raised
    assert "the tokenizer has no '☃'" in panel.message and "use letters" in _printed(panel.output)

    calls = []
    panel = widgets.sketch_panel(_stub(calls), grid=4, size=8)
    png = _png((0, 0, 255), size=(40, 20))                  # blue on a white square: not blank
    panel.upload.set_trait("value", _v8_upload("b.png", png))
    assert "using the uploaded image" in panel.message
    panel.draw()
    assert torch.equal(calls[0][0], widgets.image_from_upload(png, 8))
    panel.upload.set_trait("value", _v8_upload("x.png", b"junk"))
    assert panel.message.startswith("could not read the upload") and panel.uploaded is None
    panel.clear()
    assert panel.uploaded is None and widgets.upload_contents(panel.upload.value) == []


def test_mask_panel_refuses_an_empty_mask_then_fills_the_toggled_cells():
    calls = []
    panel = widgets.mask_panel(_stub(calls), grid=4, size=8)
    assert panel.fill() is None and calls == []
    assert "nothing to fill in" in panel.message and "toggle at least one cell" in _printed(panel.output)
    panel.buttons[3][0].value = True
    assert panel.cells[3, 0] == 1 and panel.buttons[3][0].button_style == "warning"
    assert isinstance(panel.fill(), Figure)
    (mask,), = calls
    assert torch.equal(mask, widgets.cells_to_mask(panel.cells, 8)) and mask.sum() == 4
    assert mask[0, 6:8, 0:2].eq(1).all()
    for row in panel.buttons:
        for button in row:
            button.value = True
    assert panel.fill() is None and "covers the whole image" in panel.message and len(calls) == 1
    panel.clear()
    assert not panel.cells.any()


def test_favourites_panel_needs_a_pick_then_breeds_from_the_picks():
    population = {"images": torch.rand(6, 3, 8, 8)}
    bred = []

    def next_fn(picked):
        bred.append(picked)
        population["images"] = torch.rand(4, 3, 8, 8)

    panel = widgets.favourites_panel(lambda: population["images"], next_fn, columns=3)
    assert isinstance(panel.figure, Figure) and len(panel.checkboxes) == 6
    assert [b.description for b in panel.checkboxes][:2] == ["#0", "#1"]
    assert panel.picked() == [] and panel.next() is None and bred == []
    assert "pick at least one favourite" in panel.message
    assert "pick at least one favourite" in _printed(panel.output)
    assert panel.output.outputs[-1]["output_type"] == "display_data"   # the population stays
    panel.checkboxes[1].value = panel.checkboxes[4].value = True
    assert panel.picked() == [1, 4]
    assert isinstance(panel.next(), Figure) and bred == [[1, 4]] and panel.message == ""
    assert len(panel.checkboxes) == 4 and panel.picked() == [] and panel.generation == 1


def test_favourites_panel_shows_the_description_of_each_population_under_it():
    population = {"images": torch.rand(2, 3, 8, 8)}
    panel = widgets.favourites_panel(lambda: population["images"], lambda picked: None,
                                     describe=lambda images: f"{len(images)} images, nearest: none")
    assert "2 images, nearest: none" in _printed(panel.output)
    assert panel.output.outputs[0]["output_type"] == "display_data"     # the figure, then its text
    population["images"] = torch.rand(3, 3, 8, 8)
    panel.checkboxes[0].value = True
    assert isinstance(panel.next(), Figure) and "3 images" in _printed(panel.output)
