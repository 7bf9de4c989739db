"""Plots are drawn without pyplot: a notebook's matplotlib backend and open figures stay as they were."""

from __future__ import annotations

import warnings
from pathlib import Path

import matplotlib
import numpy as np
import pytest
from PIL import Image

from vision_tl.features.probe import pca_scatter
from vision_tl.reports import metrics as M
from vision_tl.reports import plots
from vision_tl.reports.explain import Explanation, save_explanation
from vision_tl.reports.report import _figures

CLASSES = ["crack", "good", "spot"]


@pytest.fixture
def svg_backend():
    """A backend other than Agg (headless-safe), as a notebook's inline backend would be; restored after."""
    import matplotlib.pyplot as plt

    before = matplotlib.get_backend()
    plt.switch_backend("svg")
    fignums = plt.get_fignums()
    yield plt, fignums
    plt.switch_backend(before)


def _is_png(path: Path) -> bool:
    return Path(path).read_bytes()[:4] == b"\x89PNG"


def test_plots_leave_the_backend_and_pyplot_figures_alone(tmp_path, svg_backend) -> None:
    plt, fignums = svg_backend
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], 6)
    probs = rng.dirichlet((1, 1, 1), len(labels))
    probs[np.arange(len(labels)), labels] += 1.0
    probs /= probs.sum(1, keepdims=True)
    result = M.evaluate(probs, labels, CLASSES, good_class="good", threshold=0.5)
    written = list(_figures(result, probs, labels, CLASSES, tmp_path, "val").values())
    assert len(written) == 6  # confusion, per class, ROC/PR, reliability, threshold, operating curve
    image = tmp_path / "crack_0.png"
    Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(image)
    written.append(plots.plot_error_gallery(
        [{"path": str(image), "true": "crack", "predicted": "good", "probability": 0.9}], tmp_path / "g.png"))
    written.append(plots.plot_comparison(["a", "b"], {"acc": [0.9, None]}, tmp_path / "cmp.png"))
    written.append(save_explanation(Explanation(image, rng.integers(0, 255, (24, 24, 3), dtype=np.uint8),
                                                rng.random((8, 8)), "good", 0.9, "crack", 0.1),
                                    tmp_path / "cam.png"))
    written.append(pca_scatter(rng.normal(size=(18, 5)), labels, CLASSES, tmp_path / "pca.png"))
    assert all(_is_png(p) for p in written)
    assert matplotlib.get_backend() == "svg"  # matplotlib.use("Agg") used to switch it for good
    assert plt.get_fignums() == fignums  # no figure left open in pyplot


def test_class_names_with_dollar_signs_are_drawn_as_written(tmp_path) -> None:
    """Matplotlib reads $...$ as a formula: 'dent $^$ x' stopped fit (the confusion matrix) with a
    parse error, and 'cost $5 vs $10' was drawn as an italic formula in every figure."""
    from matplotlib.text import Text

    classes = ["good", "dent $^$ x", "cost $5 vs $10"]
    drawn = []
    real_draw = Text.draw

    def spy(self, renderer):
        drawn.append(self.get_text())
        return real_draw(self, renderer)

    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], 6)
    probs = rng.dirichlet((1, 1, 1), len(labels))
    result = M.evaluate(probs, labels, classes, good_class="good", threshold=0.5)
    Text.draw = spy
    try:
        written = list(_figures(result, probs, labels, classes, tmp_path, "val").values())
        written.append(pca_scatter(rng.normal(size=(18, 5)), labels, classes, tmp_path / "pca.png"))
    finally:
        Text.draw = real_draw
    assert all(_is_png(p) for p in written)
    assert "dent $^$ x" in drawn and "cost $5 vs $10" in drawn


@pytest.fixture
def fresh_font_warnings(monkeypatch):
    """Each test starts with no name warned about yet (the warning is once per process)."""
    monkeypatch.setattr(plots, "_UNDRAWABLE_WARNED", set(), raising=False)


def test_names_no_font_has_are_warned_about_once_not_per_glyph(tmp_path, monkeypatch, fresh_font_warnings):
    """Class folders named in Japanese: every figure warned once per missing character (dozens
    of 'Glyph ... missing from font(s) DejaVu Sans'); one warning names the classes instead."""
    # as on a machine without CJK fonts: no installed font has the characters
    monkeypatch.setattr(plots, "_fallbacks_for", lambda missing: ((), missing), raising=False)
    classes = ["good", "傷", "キズ"]
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], 6)
    probs = rng.dirichlet((1, 1, 1), len(labels))
    result = M.evaluate(probs, labels, classes, good_class="good", threshold=0.5)
    with pytest.warns(UserWarning) as caught:
        written = list(_figures(result, probs, labels, classes, tmp_path, "val").values())
        written.append(pca_scatter(rng.normal(size=(18, 5)), labels, classes, tmp_path / "pca.png"))
    assert all(_is_png(p) for p in written)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1, messages
    assert "'傷', 'キズ'" in messages[0] and "boxes" in messages[0] and "predictions.csv" in messages[0]


def test_names_an_installed_font_has_are_drawn_with_it(tmp_path, fresh_font_warnings):
    """A character DejaVu Sans lacks but STIX (shipped with matplotlib) has is drawn with STIX,
    as a CJK name is with Noto Sans CJK where that is installed: no glyph goes missing."""
    @plots.literal_text
    def draw_class(name: str, path: Path) -> list[str]:
        fig, ax = plots._subplots(figsize=(2, 1))
        ax.set_title(name)
        with warnings.catch_warnings(record=True) as caught:  # matplotlib's own warnings, as drawn
            warnings.simplefilter("always")
            plots._save(fig, path)
        return [str(w.message) for w in caught if "missing from font" in str(w.message)]

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nor a warning of ours: the font has the character
        missing = draw_class("dent \u1d81", tmp_path / "t.png")
    assert missing == []
    assert plots.font_fallbacks(["dent \u1d81"])  # STIX here; another font that has it elsewhere


def test_confusion_matrix_shows_no_recall_for_a_class_without_images(tmp_path, monkeypatch):
    """A class absent from the split has no recall (null in metrics.json); 0.00 would read as
    'every such image missed'."""
    from matplotlib.axes import Axes

    written = []
    real = Axes.text
    monkeypatch.setattr(Axes, "text", lambda self, x, y, s, *a, **k: written.append(s) or real(self, x, y, s, *a, **k))
    plots.plot_confusion_matrix([[3, 1], [0, 0]], ["good", "crack"], tmp_path / "cm.png")
    # the counts panel first (an off-diagonal 0 blank, a diagonal 0 shown), then the shares
    assert written[:4] == ["3", "1", "", "0"]
    shares = written[4:]
    assert shares == ["0.75", "0.25", "n/a", "n/a"]
    assert Image.open(tmp_path / "cm.png").size[0] > 100


def test_confusion_matrix_share_short_of_one_is_not_written_as_one(tmp_path, monkeypatch):
    """200 of 201 'ok' images right: the diagonal read 1.00, as if none were missed (the one missed
    beside it read <0.01)."""
    from matplotlib.axes import Axes

    written = []
    real = Axes.text
    monkeypatch.setattr(Axes, "text", lambda self, x, y, s, *a, **k: written.append(s) or real(self, x, y, s, *a, **k))
    plots.plot_confusion_matrix([[200, 1], [0, 30]], ["ok", "dent"], tmp_path / "cm.png")
    assert written[4:] == [">0.99", "<0.01", "", "1.00"]


def test_precision_recall_curve_drawn_encloses_the_average_precision_in_its_legend(tmp_path, monkeypatch):
    """AP sums each recall step times the precision reached at its end; the staircase drawn
    must hold that precision over the step, or the curve sits below the AP it is labelled with."""
    from matplotlib.axes import Axes

    rng = np.random.default_rng(0)
    labels = np.r_[np.zeros(12, int), np.ones(9, int)]
    probs = rng.dirichlet([1, 1], size=len(labels))  # overlapping scores: AP well below 1
    curves = M.one_vs_rest_curves(probs, labels, ["good", "dent"])
    drawn = []
    real = Axes.step
    monkeypatch.setattr(Axes, "step", lambda self, x, y, *a, **k: drawn.append((x, y, k)) or real(self, x, y, *a, **k))
    plots.plot_roc_pr(curves, tmp_path / "roc_pr.png")
    assert len(drawn) == 2
    for (x, y, kwargs), curve in zip(drawn, curves):
        recall, precision = np.asarray(x), np.asarray(y)
        # area under the staircase as matplotlib draws it: "pre" holds y[i] over (x[i-1], x[i]]
        held = precision[1:] if kwargs.get("where", "pre") == "pre" else precision[:-1]
        assert np.sum(np.diff(recall) * held) == pytest.approx(curve["average_precision"])
        assert curve["average_precision"] < 0.95


# --- layout: what a reader sees ------------------------------------------------------------

LONG_CLASSES = ["rolled-in_scale", "pitted_surface", "crazing", "inclusion", "patches", "scratches",
                "edge_crack_longitudinal", "oil_stain", "weld_spatter_large", "dent", "burr_on_edge_of_part",
                "discolouration_heat_tint", "ok", "lamination", "scale_pit_deep", "porosity_cluster", "chip",
                "rust_spot"]
REPORT_WIDTH_PX = 1100  # the HTML report's column: a wider figure is shrunk to it, and its text with it


@pytest.fixture
def saved_figures(monkeypatch):
    """The Figure objects the plot functions save, to inspect their layout after the fact."""
    from matplotlib.figure import Figure

    figures = []
    real = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: figures.append(self) or real(self, *a, **k))
    return figures


def _texts_outside(fig) -> list[str]:
    """Non-empty texts drawn on ``fig`` (tick labels, cell numbers, titles, legends) whose box
    leaves the figure: cut off in the PNG."""
    from matplotlib.text import Text

    drawn = []
    real = Text.draw

    def spy(self, renderer):
        real(self, renderer)
        if self.get_visible() and self.get_text().strip():
            drawn.append((self.get_text(), self.get_window_extent(renderer)))

    Text.draw = spy
    try:
        fig.draw(fig.canvas.get_renderer())
    finally:
        Text.draw = real
    box = fig.bbox
    return [text for text, ext in drawn
            if ext.x0 < box.x0 - 1 or ext.y0 < box.y0 - 1 or ext.x1 > box.x1 + 1 or ext.y1 > box.y1 + 1]


def _many_class_result():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(len(LONG_CLASSES)), 4)
    probs = rng.dirichlet(np.ones(len(LONG_CLASSES)), len(labels))
    probs[np.arange(len(labels)), labels] += 1.5
    probs /= probs.sum(1, keepdims=True)
    return M.evaluate(probs, labels, LONG_CLASSES)


def test_eighteen_long_class_names_fit_the_report_and_stay_inside_the_figure(tmp_path, saved_figures) -> None:
    """With 18 classes the confusion matrices (side by side) and per-class bars (one group per
    class) were 2,600-2,900 px wide: shrunk into the report's 1,100 px their numbers were 3 px
    tall. The ROC/PR legends, 18 lines each, covered the curves."""
    result = _many_class_result()
    plots.plot_confusion_matrix(result["confusion_matrix"], LONG_CLASSES, tmp_path / "cm.png", title="val")
    plots.plot_per_class(result["per_class"], tmp_path / "per_class.png", title="val: per class")
    plots.plot_roc_pr(result["curves"], tmp_path / "roc.png", title="val")
    for fig, name in zip(saved_figures, ("confusion matrix", "per class", "ROC/PR")):
        width_px = fig.get_figwidth() * 110
        assert width_px <= 1.3 * REPORT_WIDTH_PX, f"{name}: {width_px:.0f} px wide"
        assert _texts_outside(fig) == [], name
    roc_fig = saved_figures[2]
    renderer = roc_fig.canvas.get_renderer()
    for ax in roc_fig.axes:
        legend = ax.get_legend().get_window_extent(renderer)
        assert not legend.overlaps(ax.get_window_extent(renderer)), "the legend covers the curves"


def test_roc_pr_legends_of_many_classes_with_longer_names_stay_inside_the_figure(tmp_path, saved_figures) -> None:
    """Two legend columns of 35-character names were wider than their panel: the left legend ran
    off the figure's edge, the two legends overlapped in the middle and the curves shrank to slivers."""
    classes = [f"{name}_on_painted_surface_left_side" for name in ("scratch", "dent", "pit", "stain", "burr",
                                                                   "chip", "crack", "smear", "blister", "rust")]
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(len(classes)), 3)
    result = M.evaluate(rng.dirichlet(np.ones(len(classes)), len(labels)), labels, classes)
    plots.plot_roc_pr(result["curves"], tmp_path / "roc.png", title="val")
    fig = saved_figures[0]
    assert _texts_outside(fig) == []
    renderer = fig.canvas.get_renderer()
    roc, pr = (ax.get_legend().get_window_extent(renderer) for ax in fig.axes)
    assert not roc.overlaps(pr)
    assert all(ax.get_window_extent(renderer).width > 0.3 * fig.bbox.width for ax in fig.axes)


def test_a_few_classes_keep_their_layout_inside_the_figure(tmp_path, saved_figures) -> None:
    result = M.evaluate(np.eye(3)[[0, 1, 2, 0, 1, 2]] * 0.8 + 0.2 / 3, np.array([0, 1, 2, 0, 1, 1]),
                        ["rolled-in_scale", "pitted_surface", "ok"], good_class="ok", threshold=0.5)
    plots.plot_confusion_matrix(result["confusion_matrix"], ["rolled-in_scale", "pitted_surface", "ok"],
                                tmp_path / "cm.png", title="val (epoch 3)")
    plots.plot_per_class(result["per_class"], tmp_path / "per_class.png")
    fig_cm, fig_pc = saved_figures
    assert [ax.get_title() for ax in fig_cm.axes[:2]] == [  # not "val (epoch 3) (count)"
        "val (epoch 3): counts", "val (epoch 3): share of true class (recall on the diagonal)"]
    assert _texts_outside(fig_cm) == [] and _texts_outside(fig_pc) == []


def _tick_labels_overlapping(fig) -> list[tuple[str, str]]:
    """Pairs of tick labels drawn on top of each other on one axis of ``fig``."""
    renderer = fig.canvas.get_renderer()
    pairs = []
    for ax in fig.axes:
        for ticks in (ax.get_xticklabels(), ax.get_yticklabels()):
            boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in ticks if t.get_text().strip()]
            pairs += [(a, b) for i, (a, box) in enumerate(boxes) for b, other in boxes[i + 1:] if box.overlaps(other)]
    return pairs


def test_per_class_bars_of_a_few_long_class_names_keep_the_names_apart(tmp_path, saved_figures) -> None:
    """With up to 8 classes the names stood side by side under their bars, 1.2 inches apart: names
    longer than about 15 characters ran into each other and could not be read."""
    classes = ["ok", "edge_crack_longitudinal", "burr_on_edge_of_part", "discolouration_heat_tint"]
    result = M.evaluate(np.eye(4)[[0, 1, 2, 3, 0, 1]] * 0.7 + 0.3 / 4, np.array([0, 1, 2, 3, 0, 2]), classes)
    plots.plot_per_class(result["per_class"], tmp_path / "per_class.png")
    fig = saved_figures[0]
    assert _tick_labels_overlapping(fig) == [] and _texts_outside(fig) == []


def test_confusion_matrix_of_two_or_three_long_class_names_keeps_the_names_apart(tmp_path, saved_figures) -> None:
    """Up to 3 classes the predicted-class names stood level under their columns, a cell apart:
    names of 20 characters or more ran into each other."""
    classes = ["ok", "edge_crack_longitudinal", "discolouration_heat_tint"]
    for n in (2, 3):
        plots.plot_confusion_matrix(np.eye(n, dtype=int) * 3, classes[-n:], tmp_path / f"cm{n}.png", title="val")
    for fig in saved_figures:
        renderer = fig.canvas.get_renderer()
        for ax in fig.axes[::2]:  # (the matrices, not their colour bars)
            labels = [t for t in ax.get_xticklabels() if t.get_text()]
            level = [t.get_window_extent(renderer) for t in labels if t.get_rotation() == 0]
            assert not any(a.overlaps(b) for i, a in enumerate(level) for b in level[i + 1:])
        assert _texts_outside(fig) == []


def test_confusion_matrix_counts_scale_shows_whole_images(tmp_path, saved_figures) -> None:
    """The counts' colour bar of a small val split read 0.25, 0.5, 0.75 ... images."""
    plots.plot_confusion_matrix([[2, 1], [0, 3]], ["ok", "dent"], tmp_path / "cm.png", title="val")
    fig = saved_figures[0]
    fig.canvas.draw()
    counts_bar = fig.axes[2]  # (the two matrices, then their colour bars)
    ticks = [t for t in counts_bar.get_yticks() if 0 <= t <= 3]
    assert ticks and all(float(t).is_integer() for t in ticks), ticks


def _threshold_case():
    rng = np.random.default_rng(1)
    is_good = np.r_[np.ones(10, bool), np.zeros(40, bool)]
    p_good = np.where(is_good, rng.uniform(0.3, 1.0, 50), rng.uniform(0.0, 0.6, 50))
    sweep = M.threshold_sweep(p_good, is_good, threshold=0.45)
    rates = M.good_defect_rates(p_good, is_good, 0.45)
    return p_good, is_good, sweep, rates


def test_the_chosen_threshold_is_labelled_with_the_rates_it_gives(tmp_path, saved_figures) -> None:
    """The threshold plots drew a dashed line labelled 'threshold 0.450': what it costs (escape and
    false-reject rates there) had to be read off the curves by eye."""
    p_good, is_good, sweep, rates = _threshold_case()
    escape, false_reject = f"{rates['escape_rate']:.1%}", f"{rates['false_reject_rate']:.1%}"
    plots.plot_threshold(p_good, is_good, sweep, tmp_path / "t.png", threshold=0.45, good_class="ok")
    plots.plot_operating_curve(sweep, tmp_path / "o.png", threshold=0.45, good_class="ok")
    threshold_fig, operating_fig = saved_figures
    labels = [t.get_text() for ax in threshold_fig.axes for t in ax.get_legend().get_texts()]
    assert any(escape in t and false_reject in t for t in labels), labels
    annotations = [t.get_text() for t in operating_fig.axes[0].texts]
    assert any(escape in t and false_reject in t for t in annotations), annotations
    # good and defective images are not drawn red against green (the pair colour-blind eyes confuse)
    colours = {matplotlib.colors.to_hex(line.get_color()) for line in threshold_fig.axes[1].get_lines()[:2]}
    assert colours == {plots.GOOD_COLOUR.lower(), plots.DEFECT_COLOUR.lower()}
    assert _texts_outside(threshold_fig) == [] and _texts_outside(operating_fig) == []


def test_threshold_figures_of_a_long_good_class_name_stay_inside(tmp_path, saved_figures) -> None:
    """Titles and axis labels that name the good class ran off the figure for a name of 40+ characters."""
    good = "good_part_without_any_visible_surface_defect"
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 5)
    probs = rng.dirichlet([1, 1], 10)
    result = M.evaluate(probs, labels, [good, "dent"], good_class=good, threshold=0.4)
    sweep = result["good_vs_defect"]["sweep"]
    plots.plot_threshold(probs[:, 0], labels == 0, sweep, tmp_path / "t.png", threshold=0.4, good_class=good)
    plots.plot_operating_curve(sweep, tmp_path / "o.png", threshold=0.4, good_class=good)
    assert [_texts_outside(fig) for fig in saved_figures] == [[], []]


def test_error_gallery_keeps_a_long_part_long(tmp_path, monkeypatch) -> None:
    """Thumbnails were squeezed to squares: a 1:4 strip was shown 4x too tall."""
    from matplotlib.axes import Axes

    shown = []
    real = Axes.imshow
    monkeypatch.setattr(Axes, "imshow", lambda self, x, *a, **k: shown.append(np.asarray(x).shape)
                        or real(self, x, *a, **k))
    image = tmp_path / "strip_0001.png"
    Image.fromarray(np.zeros((40, 160, 3), np.uint8)).save(image)
    plots.plot_error_gallery([{"path": str(image), "true": "ok", "predicted": "dent", "probability": 0.9}],
                             tmp_path / "g.png")
    assert shown[0][1] == pytest.approx(4 * shown[0][0], abs=1)


def test_error_gallery_titles_of_long_class_names_stay_apart_and_inside(tmp_path, saved_figures) -> None:
    """Titles ran into their neighbours' (and off the figure's edge) once a class name was longer
    than about 30 characters; the file name below them was shortened, the class names not."""
    from matplotlib.text import Text

    image = tmp_path / "part_0001.png"
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(image)
    long = ["scratch_on_painted_surface_left_side", "dent_near_the_mounting_hole_of_bracket"]
    errors = [{"path": str(image), "true": long[i % 2], "predicted": long[(i + 1) % 2], "probability": 0.9}
              for i in range(8)]
    plots.plot_error_gallery(errors, tmp_path / "g.png")
    fig = saved_figures[0]
    assert _texts_outside(fig) == []
    renderer = fig.canvas.get_renderer()
    titles = [t.get_window_extent(renderer) for ax in fig.axes for t in ax.findobj(Text)
              if t is ax.title and t.get_text()]
    assert len(titles) == 8
    assert not any(a.overlaps(b) for i, a in enumerate(titles) for b in titles[i + 1:])


def test_grad_cam_overlay_leaves_cold_regions_untinted(tmp_path, monkeypatch) -> None:
    """The overlay laid the 'jet' map at alpha 0.45 over every pixel: the whole surface turned blue
    and the defect under a hot spot was hard to see. Now the tint follows the relevance."""
    from matplotlib.axes import Axes

    layers = []
    real = Axes.imshow
    monkeypatch.setattr(Axes, "imshow", lambda self, x, *a, **k: layers.append((np.asarray(x), k))
                        or real(self, x, *a, **k))
    cam = np.zeros((8, 8))
    cam[2:4, 2:4] = 1.0
    item = Explanation(tmp_path / "wide.png", np.full((50, 200, 3), 128, np.uint8), cam, "dent", 0.9, "dent", 0.9)
    save_explanation(item, tmp_path / "cam.png")
    heat_kwargs = layers[1][1]
    assert heat_kwargs["cmap"] != "jet"
    overlay = layers[-1][0]
    assert overlay.shape[:2] == (64, 256)  # the image's 1:4 shape, not the model's square input
    assert overlay.shape[2] == 4 and overlay[..., 3].min() == 0.0 and overlay[..., 3].max() > 0.5


def test_explain_writes_each_heat_map_before_decoding_the_next_image(tmp_path, monkeypatch) -> None:
    """A folder was explained whole before the first PNG was written: every decoded image stayed in
    memory until the last one was done (about 36 MB per 12-megapixel image, gigabytes for a folder)."""
    from vision_tl import imaging
    from vision_tl.reports import explain
    from vision_tl.tasks import ImageClassifier, checkpoint

    model = ImageClassifier(["ok", "dent"], backbone="test_efficientnet", pretrained=False, image_size=32)
    monkeypatch.setattr(checkpoint, "load_classifier", lambda path: (model, {}))
    events = []
    real_load, real_save = imaging.load_rgb, explain.save_explanation
    monkeypatch.setattr(imaging, "load_rgb", lambda path, *a, **k: events.append(("load", Path(path).name))
                        or real_load(path, *a, **k))
    monkeypatch.setattr(explain, "save_explanation", lambda item, path, **k: events.append(("save", item.path.name))
                        or real_save(item, path, **k))
    for name in ("a.png", "b.png"):
        Image.fromarray(np.full((40, 48, 3), 90, np.uint8)).save(tmp_path / name)
    written = [path.name for _, path in explain.iter_explain_checkpoint("best.ckpt", [tmp_path], tmp_path / "out")]
    assert written == ["a.gradcam.png", "b.gradcam.png"]
    assert events == [("load", "a.png"), ("save", "a.png"), ("load", "b.png"), ("save", "b.png")]


def test_explain_of_a_folder_leaves_out_the_heat_maps_an_earlier_run_wrote_into_it(tmp_path, monkeypatch) -> None:
    """`vision-tl explain CKPT . --overwrite` (the default --out, ./explain, inside the folder) explained
    the heat maps the first run had written there: x.gradcam.gradcam.png beside x.gradcam.png."""
    from vision_tl.reports import explain
    from vision_tl.tasks import ImageClassifier, checkpoint

    model = ImageClassifier(["ok", "dent"], backbone="test_efficientnet", pretrained=False, image_size=32)
    monkeypatch.setattr(checkpoint, "load_classifier", lambda path: (model, {}))
    Image.fromarray(np.full((40, 48, 3), 90, np.uint8)).save(tmp_path / "a.png")
    first = [p.name for p in explain.explain_checkpoint("best.ckpt", [tmp_path], tmp_path / "explain")]
    again = [p.name for p in explain.explain_checkpoint("best.ckpt", [tmp_path], tmp_path / "explain", overwrite=True)]
    assert first == again == ["a.gradcam.png"]
    assert sorted(p.name for p in (tmp_path / "explain").iterdir()) == ["a.gradcam.png"]


def test_explain_writes_the_heat_maps_beside_the_images_when_out_is_their_folder(tmp_path, monkeypatch) -> None:
    """`vision-tl explain CKPT photos --out photos` left out every image under --out, not only the
    heat maps there: "folder photos holds no images" instead of a heat map beside each photo."""
    from vision_tl.reports import explain
    from vision_tl.tasks import ImageClassifier, checkpoint

    model = ImageClassifier(["ok", "dent"], backbone="test_efficientnet", pretrained=False, image_size=32)
    monkeypatch.setattr(checkpoint, "load_classifier", lambda path: (model, {}))
    Image.fromarray(np.full((40, 48, 3), 90, np.uint8)).save(tmp_path / "a.png")
    first = [p.name for p in explain.explain_checkpoint("best.ckpt", [tmp_path], tmp_path)]
    again = [p.name for p in explain.explain_checkpoint("best.ckpt", [tmp_path], tmp_path, overwrite=True)]
    assert first == again == ["a.gradcam.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.gradcam.png", "a.png"]


def test_html_report_opens_with_the_verdict_on_named_images(tmp_path) -> None:
    """The report opened with plain accuracy and the escape rate as 0.008, without its threshold
    or what it was counted on; the weakest class had to be found in the table."""
    from vision_tl.reports.html import render_report

    labels = np.array([0] * 8 + [1] * 4 + [2] * 4)
    probs = np.full((16, 3), 0.1)
    probs[np.arange(16), labels] = 0.8
    probs[12:14] = [0.8, 0.1, 0.1]  # two 'spot' images called 'crack': spot's recall 0.5
    result = M.evaluate(probs, labels, CLASSES, good_class="good", threshold=0.5)
    page = render_report(result, {}, split="test", info={"kit_version": "1"}, errors=[])
    headline = page[page.index('<p class="headline">'):page.index("</p>", page.index('<p class="headline">'))]
    assert page.index('class="headline"') < page.index('id="per-class"')
    assert "held-out test images" in headline and "balanced accuracy" in headline
    assert "lowest recall <b>spot</b> 0.500 (2 of 4, 95 % interval 0.15–0.85)" in headline
    assert "threshold 0.500 on P(good)" in headline and "escape rate" in headline
    assert "false-reject rate <b>0.0%</b> (0 of 4 good images rejected)" in headline
    cards = page[page.index('<div class="cards">'):]
    assert cards.index("balanced accuracy") < cards.index("escape rate") < cards.index(">accuracy<")
    assert "kit_version" not in page and "None" not in page and "nan" not in page.lower()


def test_html_report_without_a_threshold_states_the_rule_that_decided(tmp_path) -> None:
    """Without a threshold the good-vs-defect section still said an image passes iff P(good) is at
    least the threshold, next to 'argmax decision': the rates were counted by the most probable class."""
    from vision_tl.reports.html import render_report

    labels = np.array([0, 0, 1, 1])
    probs = np.array([[0.45, 0.3, 0.25], [0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.3, 0.3, 0.4]])
    result = M.evaluate(probs, labels, ["good", "dent", "pit"], good_class="good")
    page = render_report(result, {}, split="val", info={}, errors=[])
    section = page[page.index("<h2>Good vs defect</h2>"):page.index('<table id="good-vs-defect"')]
    assert "≥ threshold" not in section
    assert "most probable class" in section


def test_html_report_shows_how_little_a_rare_class_or_a_few_defects_pin_down(tmp_path) -> None:
    """One val image of a class gave recall 1.000 and one defective image an escape rate of
    0.0%, in the same type as the rates of 40 images: each now carries its 95 % interval."""
    from vision_tl.reports.html import render_report

    labels = np.array([0] + [1] * 40 + [2] * 2)  # crack: 1 image, good: 40, spot: 2
    probs = np.full((43, 3), 0.1)
    probs[np.arange(43), labels] = 0.8
    result = M.evaluate(probs, labels, CLASSES, good_class="good", threshold=0.5)
    crack = next(r for r in result["per_class"] if r["class"] == "crack")
    assert crack["recall"] == 1.0 and crack["recall_interval"] == [pytest.approx(0.2065, abs=1e-4), 1.0]
    gvd = result["good_vs_defect"]
    assert (gvd["escapes"], gvd["defect_images"]) == (0, 3)
    assert gvd["escape_rate_interval"] == [0.0, pytest.approx(0.5615, abs=1e-4)]
    assert gvd["false_reject_rate_interval"] == [0.0, pytest.approx(0.0876, abs=1e-4)]
    page = render_report(result, {}, split="val", info={}, errors=[])
    table = page[page.index('id="per-class"'):page.index("</table>", page.index('id="per-class"'))]
    assert "recall 95 % interval" in table and "<td>0.21–1.00</td>" in table
    rates = page[page.index('id="good-vs-defect"'):]
    assert "<td>0 of 3</td><td>0%–56%</td>" in rates and "<td>0 of 40</td><td>0%–9%</td>" in rates
    assert "0 of 3 defective images; 95 % interval 0%–56%" in page  # the card


def test_html_report_interval_of_a_rare_error_rate_does_not_read_zero_to_zero(tmp_path) -> None:
    """2 false rejects among 2,000 good images and no escape among 1,000 defective ones: their
    95 % intervals rounded to whole percents read "0%–0%", as if the rates were pinned at zero."""
    from vision_tl.reports.html import render_report

    labels = np.array([1] * 2000 + [0] * 1000)
    probs = np.full((3000, 3), 0.1)
    probs[np.arange(3000), labels] = 0.8
    probs[:2] = [0.8, 0.1, 0.1]  # two good images rejected
    result = M.evaluate(probs, labels, CLASSES, good_class="good", threshold=0.5)
    rates = render_report(result, {}, split="val", info={}, errors=[])
    rates = rates[rates.index('id="good-vs-defect"'):]
    assert "<td>0 of 1000</td><td>0%–0.38%</td>" in rates
    assert "<td>2 of 2000</td><td>0.027%–0.36%</td>" in rates
    assert "0%–0%" not in rates


def test_html_report_interval_near_one_does_not_read_a_hundred_percent(tmp_path) -> None:
    """1,999 of 2,000 good images recognised and 1,999 of 2,000 defective ones passed: the ends of
    their 95 % intervals below 1 rounded to "1.00–1.00" and "100%–100%", as if certain; each now
    keeps two significant digits of what it lacks of 1, as an end near 0 keeps two of its own."""
    from vision_tl.reports.html import _interval, render_report

    assert _interval([0.9, 0.9987], pct=True) == "90%–99.87%"
    assert _interval([0.000088, 0.3]) == "0.000088–0.30"  # (not "8.8e-05")
    assert _interval([0.21, 0.9987]) == "0.21–0.9987" and _interval([0.21, 1.0]) == "0.21–1.00"
    labels = np.array([1] * 2000 + [0] * 2000)
    probs = np.tile([0.1, 0.8, 0.1], (4000, 1))  # every image passed as good...
    probs[[0, 2000]] = [0.8, 0.1, 0.1]  # ...but one good image rejected and one crack caught
    result = M.evaluate(probs, labels, CLASSES, good_class="good", threshold=0.5)
    good = next(r for r in result["per_class"] if r["class"] == "good")
    assert good["recall_interval"] == [pytest.approx(0.99717, abs=1e-5), pytest.approx(0.999912, abs=1e-6)]
    assert result["good_vs_defect"]["escape_rate_interval"] == good["recall_interval"]
    page = render_report(result, {}, split="val", info={}, errors=[])
    assert "<td>0.9972–0.999912</td>" in page  # the good class's recall
    assert "<td>1999 of 2000</td><td>99.72%–99.9912%</td>" in page  # the escape rate
    assert "1.00–1.00" not in page and "100%–100%" not in page


def test_comparison_says_which_split_it_compares(tmp_path) -> None:
    from vision_tl.reports.compare import COLUMNS, Comparison, RunSummary
    from vision_tl.reports.html import render_comparison

    run = RunSummary("a/version_0", tmp_path, "resnet10t", "frozen", ["good"], {k: None for k, _ in COLUMNS},
                     {"good": 1.0}, None, has_report=False)
    data = Comparison([run], [], "test").to_dict()
    png = plots.plot_comparison(["a"], {"acc": [0.9]}, tmp_path / "c.png", title="runs compared on their test images")
    page = render_comparison(data, COLUMNS, ["good"], png)
    assert data["split"] == "test" and "<h1>Runs compared on their test images</h1>" in page
    assert 'title="no report of this run yet' in page


def test_comparison_of_runs_sharing_no_class_says_so_instead_of_an_empty_recall_table(tmp_path) -> None:
    from vision_tl.reports.compare import COLUMNS, Comparison, RunSummary
    from vision_tl.reports.html import render_comparison

    runs = [RunSummary(f"{name}/version_0", tmp_path, "resnet10t", "frozen", classes, {k: None for k, _ in COLUMNS},
                       dict.fromkeys(classes, 1.0), None, has_report=False)
            for name, classes in (("steel", ["crazing", "pitted"]), ("wood", ["knot", "ok"]))]
    png = plots.plot_comparison(["a", "b"], {"acc": [0.9, 0.8]}, tmp_path / "c.png")
    page = render_comparison(Comparison(runs, []).to_dict(), COLUMNS, [], png)
    recall = page[page.index("<h2>Recall per class</h2>"):page.index('<img class="fig"')]
    assert 'id="recall"' not in recall and "no class in common" in recall


def test_comparison_of_ten_runs_keeps_its_legend_and_scores_off_the_bars(tmp_path, saved_figures) -> None:
    """`vision-tl compare runs/*/version_*` of 10 runs: the legend (4 rows inside the plot) covered the
    bars of two metrics near 0.9 and their scores, and the scores of neighbouring bars ran together."""
    runs = [f"partial_lite{i % 3}/version_{i}" for i in range(10)]
    rng = np.random.default_rng(0)
    metrics = {m: list(rng.uniform(0.85, 0.99, len(runs))) for m in ("accuracy", "balanced acc.", "macro F1",
                                                                      "macro AUC")}
    plots.plot_comparison(runs, metrics, tmp_path / "c.png")
    fig = saved_figures[0]
    renderer = fig.canvas.get_renderer()
    (ax,) = fig.axes
    assert not ax.get_legend().get_window_extent(renderer).overlaps(ax.get_window_extent(renderer))
    scores = [t.get_window_extent(renderer) for t in ax.texts]
    assert len(scores) == 40
    assert not any(a.overlaps(b) for i, a in enumerate(scores) for b in scores[i + 1:])
    assert _texts_outside(fig) == []


# --- training curves ------------------------------------------------------------------------

def _history(n: int, **holes) -> list[dict]:
    """``n`` validated epochs, loss falling and scores rising; ``holes`` maps a key to the epochs
    whose value is NaN (or, for ``missing_<key>``, absent)."""
    rows = []
    for e in range(n):
        row = {"epoch": e, "acc": 0.6 + 0.3 * e / max(1, n), "balanced_acc": 0.55 + 0.35 * e / max(1, n),
               "f1_macro": 0.5, "tie_break": 1.2 / (1 + e)}
        for key, epochs in holes.items():
            if e in epochs:
                if key.startswith("missing_"):
                    row.pop(key.removeprefix("missing_"))
                else:
                    row[key] = float("nan")
        rows.append(row)
    return rows


def _drawn_lines(ax) -> list:
    return [line for line in ax.get_lines() if len(line.get_xdata())]


def test_training_curves_of_one_epoch_show_points_and_the_kept_score(tmp_path, saved_figures) -> None:
    """One validated epoch drawn as lines only is an empty plot: each value needs its marker."""
    history = _history(1)
    png = plots.plot_training_curves(history, tmp_path / "t.png", best=history[0], train_loss={0: 1.5})
    assert _is_png(png)
    fig, = saved_figures
    loss_ax, score_ax = fig.axes[:2]
    for ax in (loss_ax, score_ax):
        points = [line for line in _drawn_lines(ax) if len(line.get_xdata()) == 1]
        assert points and all(line.get_marker() not in ("None", None, "") for line in points)
        low, high = ax.get_xlim()
        assert low < 0 < high  # the single epoch is inside the axis, not on its edge
        assert [t.get_text() for t in ax.get_xticklabels() if low <= t.get_position()[0] <= high] == ["0"]
    labels = [t.get_text() for t in score_ax.texts]
    assert any("epoch 0" in t and f"{history[0]['balanced_acc']:.3f}" in t for t in labels), labels
    assert _texts_outside(fig) == []


def test_training_curves_break_at_missing_values_and_mark_what_stands_alone(tmp_path, saved_figures) -> None:
    """A NaN validation loss (a diverged epoch) or a score missing from a resumed history leaves a gap,
    not a line drawn through a made-up value; a value between two gaps keeps a visible point."""
    history = _history(120, tie_break=[50, 52], missing_balanced_acc=[80])
    best = history[100]
    plots.plot_training_curves(history, tmp_path / "t.png", best=best, train_loss={e: 2.0 / (1 + e) for e in range(60)},
                               milestones={40: 2, 500: 4}, since_epoch=10)
    fig, = saved_figures
    loss_ax, score_ax = fig.axes[:2]
    val = next(line for line in loss_ax.get_lines() if line.get_label() == "validation loss")
    y = np.asarray(val.get_ydata(), float)
    assert np.isnan(y[50]) and np.isnan(y[52]) and np.isfinite(y[51])
    assert val.get_marker() in ("None", None, "")  # 120 epochs: no markers, no smear
    alone = [line for line in _drawn_lines(loss_ax)
             if len(line.get_xdata()) == 1 and list(line.get_xdata()) == [51.0]]
    assert alone and alone[0].get_marker() == "o"
    balanced = next(line for line in score_ax.get_lines() if line.get_label() == "balanced accuracy")
    assert np.isnan(np.asarray(balanced.get_ydata(), float)[80])
    assert loss_ax.get_yscale() == "log"  # 2.0 down to 0.03: the first epochs would flatten the rest
    legend = [t.get_text() for t in score_ax.get_legend().get_texts()]
    assert "earlier run folder" in legend and "stages unfrozen" in legend
    ticks = [t.get_text() for t in loss_ax.get_yticklabels()]
    assert "1" in ticks and "0.1" in ticks and not any("$" in t for t in ticks)  # not \mathdefault{10^{0}}
    renderer = fig.canvas.get_renderer()
    assert not loss_ax.get_legend().get_window_extent(renderer).overlaps(
        score_ax.get_legend().get_window_extent(renderer))
    assert sum("last 2 train" in t.get_text() for t in loss_ax.texts) == 1  # the milestone past the end: left out
    assert any(f"{best['balanced_acc']:.3f}" in t.get_text() and "epoch 100" in t.get_text() for t in score_ax.texts)
    assert fig.get_figwidth() * 110 <= 1.3 * REPORT_WIDTH_PX
    assert _texts_outside(fig) == []


def test_training_curves_without_a_step_log_or_any_score(tmp_path, saved_figures) -> None:
    history = [{"epoch": 0, "acc": None, "balanced_acc": float("nan")}, {"epoch": 1}]
    plots.plot_training_curves(history, tmp_path / "t.png", train_loss=None, val_loss={0: 0.9, 1: 0.7})
    fig, = saved_figures
    loss_ax, score_ax = fig.axes[:2]
    val = next(line for line in loss_ax.get_lines() if line.get_label() == "validation loss")
    assert list(val.get_ydata()) == [0.9, 0.7]  # from the step log where the history lacks it
    legend = [t.get_text() for t in score_ax.get_legend().get_texts()]
    assert "balanced accuracy: none logged" in legend and score_ax.get_ylim() == (-0.02, 1.02)
    assert _texts_outside(fig) == []


def test_training_curves_of_a_run_read_its_resumed_step_logs(tmp_path) -> None:
    """A resume keeps the old step log aside and starts a new one at the epoch it resumes: the epoch
    cut off by the stop counts from the new log only, the epochs before from the old one."""
    import json

    from vision_tl.reports.training import (
        read_step_losses,
        read_training_history,
        write_training_curves,
    )

    header = "epoch,step,train/loss,val/acc,val/balanced_acc,val/f1_macro,val/loss\n"
    (tmp_path / "metrics.before_resume_1.csv").write_text(
        header + "0,3,1.0,,,,\n0,4,,0.5,0.5,0.5,0.9\n1,8,0.8,,,,\n1,9,,0.6,0.6,0.6,0.7\n2,12,5.0,,,,\n")
    (tmp_path / "metrics.csv").write_text(header + "2,12,0.4,,,,\n2,13,0.6,,,,\n2,14,,0.7,0.7,0.7,0.5\n")
    train, val = read_step_losses(tmp_path)
    assert train == {0: 1.0, 1: 0.8, 2: pytest.approx(0.5)} and val == {0: 0.9, 1: 0.7, 2: 0.5}
    assert read_training_history(tmp_path) is None  # no metrics.json history: nothing to draw
    assert write_training_curves(tmp_path) is None and not (tmp_path / "training_curves.png").exists()
    history = _history(3, tie_break=[1])
    (tmp_path / "metrics.json").write_text(json.dumps({"history": history, "val": history[2], "since_epoch": 1}))
    data = read_training_history(tmp_path)
    assert data.best == history[2] and data.since_epoch == 1 and data.train_loss[2] == pytest.approx(0.5)
    assert _is_png(write_training_curves(tmp_path))


def test_html_report_shows_the_training_curves_after_the_mistakes(tmp_path) -> None:
    from vision_tl.reports.html import render_report

    labels = np.array([0, 1, 2, 0])
    result = M.evaluate(np.eye(3)[[0, 1, 2, 1]] * 0.7 + 0.1, labels, CLASSES)
    png = plots.plot_training_curves(_history(3), tmp_path / "t.png", best=_history(3)[2])
    page = render_report(result, {"training_curves": png}, split="val", info={}, errors=[])
    assert 'alt="training_curves"' in page
    assert page.index('id="per-class"') < page.index("Most confident mistakes") < page.index('alt="training_curves"')
    assert "Training: loss and validation scores per epoch" in page


def test_html_numbers_never_round_to_the_end_of_their_scale() -> None:
    """A recall of 1999 of 2000 showed as "1.000", one escape in 20,000 as "0.0%": a reader takes
    them for all and none. The exact value is the cell's tooltip."""
    from vision_tl.reports.html import _num

    assert "&gt;0.999<" in _num(1999 / 2000) and 'title="0.9995"' in _num(1999 / 2000)
    assert "<td title=\"1\">1.000</td>" == _num(1.0) and ">0.950<" in _num(0.95)
    assert "&lt;0.1%" in _num(1 / 20000, pct=True) and ">0.0%<" in _num(0.0, pct=True)
    assert "&gt;99.9%" in _num(0.9996, pct=True) and ">12.5%<" in _num(0.125, pct=True)
