"""Plots are drawn without pyplot: a notebook's matplotlib backend and open figures stay as they were."""

from __future__ import annotations

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


def test_confusion_matrix_shows_no_recall_for_a_class_without_images(tmp_path, monkeypatch):
    """A class absent from the split has no recall (null in metrics.json); 0.00 would read as
    'every such image missed'."""
    from matplotlib.axes import Axes

    written = []
    real = Axes.text
    monkeypatch.setattr(Axes, "text", lambda self, x, y, s, *a, **k: written.append(s) or real(self, x, y, s, *a, **k))
    plots.plot_confusion_matrix([[3, 1], [0, 0]], ["good", "crack"], tmp_path / "cm.png")
    shares = written[4:]  # the counts panel first, then the shares
    assert shares == ["0.75", "0.25", "n/a", "n/a"]
    assert Image.open(tmp_path / "cm.png").size[0] > 100


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
