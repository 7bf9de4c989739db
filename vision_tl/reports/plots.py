"""Plots people would rather look at than read (matplotlib, headless)."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np


def _legend(ax, **kwargs) -> None:
    """A legend where something is labelled (an empty one only draws matplotlib's warning)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**kwargs)


def literal_text(plot):
    """Draw ``plot``'s text as written: matplotlib reads ``$...$`` as a formula by default, so a
    class named ``cost $5 vs $10`` came out garbled and ``dent $^$`` stopped fit with a parse error."""
    @functools.wraps(plot)
    def draw(*args, **kwargs):
        import matplotlib

        with matplotlib.rc_context({"text.parse_math": False}):
            return plot(*args, **kwargs)
    return draw


def _subplots(nrows: int = 1, ncols: int = 1, *, figsize: tuple[float, float], constrained_layout: bool = False,
              **kwargs):
    """``pyplot.subplots`` without pyplot: an Agg-rendered figure that never touches the global
    backend (a notebook's inline plots keep working) nor pyplot's list of open figures."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, constrained_layout=constrained_layout)
    FigureCanvasAgg(fig)
    return fig, fig.subplots(nrows, ncols, **kwargs)


@literal_text
def plot_confusion_matrix(matrix: list[list[int]], classes: list[str], path: str | Path,
                          title: str = "Confusion matrix") -> Path:
    """Save counts (left) and row-normalised recall (right) side by side as PNG, atomically."""
    from vision_tl.utils.files import atomic_path

    counts = np.asarray(matrix, dtype=float)
    rows = counts.sum(axis=1, keepdims=True)
    # a class without images in this split has no recall: blank ("n/a"), never 0.00
    normalised = np.divide(counts, rows, out=np.full_like(counts, np.nan), where=rows > 0)
    size = max(4.0, 0.6 * len(classes) + 2.5)
    fig, axes = _subplots(1, 2, figsize=(2 * size, size), constrained_layout=True)
    for ax, data, fmt, label in ((axes[0], counts, "{:.0f}", "count"),
                                 (axes[1], normalised, "{:.2f}", "share of true class")):
        im = ax.imshow(data, cmap="Blues", vmin=0, vmax=1 if data is normalised else None)
        ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
        ax.set_yticks(range(len(classes)), classes)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"{title} ({label})")
        top = 1.0 if data is normalised else (data.max() if data.size else 0)
        for (i, j), v in np.ndenumerate(data):
            ax.text(j, i, "n/a" if np.isnan(v) else fmt.format(v), ha="center", va="center",
                    color="white" if top and v > top / 2 else "black", fontsize=8)
        fig.colorbar(im, ax=ax, shrink=0.8)
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    return path


def _save(fig, path: str | Path, dpi: int = 110, overwrite: bool = True) -> Path:
    """Write ``fig`` as PNG through a temporary file (``overwrite=False``: never over a file
    that exists by then)."""
    from vision_tl.utils.files import atomic_path

    path = Path(path)
    with atomic_path(path, overwrite=overwrite) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    return path


@literal_text
def plot_roc_pr(curves: list[dict], path: str | Path, title: str = "One-vs-rest") -> Path:
    """ROC (left) and precision-recall (right) curves per class, AUC / AP in the legend."""
    fig, (roc, pr) = _subplots(1, 2, figsize=(10, 4.6), constrained_layout=True)
    roc.plot([0, 1], [0, 1], color="0.7", lw=1, ls=":")
    styles = ("-", "--", "-.", (0, (1, 1)))  # identical curves stay visible
    for i, c in enumerate(curves):
        style = {"lw": 1.8, "ls": styles[i % len(styles)], "alpha": 0.9}
        if c["roc_auc"] is None:
            roc.plot([], [], " ", label=f"{c['class']}: n/a ({c['undefined']['roc_auc']})")
            continue
        line, = roc.plot(c["roc"]["fpr"], c["roc"]["tpr"], **style, label=f"{c['class']}: AUC {c['roc_auc']:.3f}")
        pr.step(c["pr"]["recall"], c["pr"]["precision"], where="pre", **style, color=line.get_color(),
                label=f"{c['class']}: AP {c['average_precision']:.3f}")
    for ax, (x, y), name in ((roc, ("false positive rate", "true positive rate"), "ROC"),
                             (pr, ("recall", "precision"), "precision-recall")):
        ax.set(xlim=(-0.02, 1.02), ylim=(-0.02, 1.02), xlabel=x, ylabel=y, title=f"{title}: {name}")
        ax.grid(alpha=0.3)
        _legend(ax, loc="lower right" if ax is roc else "lower left", fontsize=8)
    return _save(fig, path)


@literal_text
def plot_reliability(calibration: dict, path: str | Path, title: str = "Calibration") -> Path:
    """Reliability diagram: accuracy vs confidence per bin, with image counts below."""
    bins = calibration["bins"]
    fig, (ax, hist) = _subplots(2, 1, figsize=(5.2, 6), height_ratios=(3, 1), sharex=True,
                                   constrained_layout=True)
    centres = [(b["lo"] + b["hi"]) / 2 for b in bins]
    width = bins[0]["hi"] - bins[0]["lo"]
    filled = [(c, b) for c, b in zip(centres, bins) if b["count"]]
    ax.plot([0, 1], [0, 1], color="0.6", ls="--", lw=1, label="perfectly calibrated")
    ax.bar([c for c, _ in filled], [b["accuracy"] for _, b in filled], width=width * 0.9,
           color="#4c72b0", alpha=0.85, label="accuracy in bin")
    ax.plot([b["confidence"] for _, b in filled], [b["accuracy"] for _, b in filled], "o", color="#dd8452",
            ms=4, label="mean confidence")
    ece = calibration["ece"]
    ax.set(xlim=(0, 1), ylim=(0, 1.02), ylabel="accuracy",
           title=f"{title} (ECE {ece:.3f})" if ece is not None else f"{title} (ECE n/a)")
    _legend(ax, loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    hist.bar(centres, [b["count"] for b in bins], width=width * 0.9, color="0.55")
    hist.set(xlabel="top-1 confidence", ylabel="images")
    return _save(fig, path)


@literal_text
def plot_per_class(per_class: list[dict], path: str | Path, title: str = "Per class") -> Path:
    """Grouped bars of precision, recall and F1 per class; undefined values marked 'n/a'."""
    names = [r["class"] for r in per_class]
    x = np.arange(len(names))
    fig, ax = _subplots(figsize=(max(5.5, 1.2 * len(names) + 2), 4), constrained_layout=True)
    for i, (key, color) in enumerate((("precision", "#4c72b0"), ("recall", "#55a868"), ("f1", "#c44e52"))):
        values = [r[key] for r in per_class]
        pos = x + (i - 1) * 0.27
        ax.bar(pos, [v or 0.0 for v in values], width=0.25, color=color, label=key)
        for p, v in zip(pos, values):
            ax.text(p, (v or 0.0) + 0.01, "n/a" if v is None else f"{v:.2f}", ha="center", va="bottom",
                    fontsize=7, rotation=90 if len(names) > 6 else 0)
    ax.set_xticks(x, [f"{r['class']}\n(n={r['support']})" for r in per_class],
                  rotation=30 if len(names) > 6 else 0)
    ax.set(ylim=(0, 1.15), ylabel="score", title=title)
    _legend(ax, ncols=3, fontsize=8, loc="upper right")
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


@literal_text
def plot_threshold(p_good: np.ndarray, is_good: np.ndarray, sweep: dict, path: str | Path,
                   threshold: float | None = None, good_class: str = "good") -> Path:
    """P(good) histograms of good vs defective images (left) and both error rates vs threshold (right)."""
    fig, (hist, rates) = _subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    edges = np.linspace(0, 1, 26)
    hist.hist(np.asarray(p_good)[is_good], bins=edges, alpha=0.65, color="#55a868", label=f"{good_class} images")
    hist.hist(np.asarray(p_good)[~is_good], bins=edges, alpha=0.65, color="#c44e52", label="defective images")
    hist.set(xlabel=f"P({good_class})", ylabel="images", title=f"P({good_class}) by true condition")
    for name, values, color in (("escape rate (defects passed)", sweep["escape_rate"], "#c44e52"),
                                ("false-reject rate (good rejected)", sweep["false_reject_rate"], "#55a868")):
        if values is not None:
            rates.plot(sweep["threshold"], values, color=color, lw=2, label=name)
    rates.set(xlabel=f"threshold on P({good_class})", ylabel="rate", xlim=(0, 1), ylim=(-0.02, 1.02),
              title="error rates vs threshold (good iff P ≥ threshold)")
    for ax in (hist, rates):
        if threshold is not None:
            ax.axvline(threshold, color="black", ls="--", lw=1, label=f"threshold {threshold:.3f}")
        ax.grid(alpha=0.3)
        _legend(ax, fontsize=8, loc="upper center")
    return _save(fig, path)


@literal_text
def plot_comparison(runs: list[str], metrics: dict[str, list[float | None]], path: str | Path) -> Path:
    """Grouped bars: one group per metric, one bar per run (missing values left out)."""
    names = list(metrics)
    x = np.arange(len(names))
    width = 0.8 / max(1, len(runs))
    fig, ax = _subplots(figsize=(max(6, 1.6 * len(names) + 0.4 * len(runs)), 4), constrained_layout=True)
    for i, run in enumerate(runs):
        values = [metrics[m][i] for m in names]
        pos = x - 0.4 + width * (i + 0.5)
        ax.bar(pos, [v or 0.0 for v in values], width=width * 0.95, label=run)
        for p, v in zip(pos, values):
            ax.text(p, (v or 0.0) + 0.01, "n/a" if v is None else f"{v:.2f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x, names)
    ax.set(ylim=(0, 1.15), ylabel="score", title="runs compared")
    _legend(ax, fontsize=8, loc="upper right", ncols=min(3, len(runs)))
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


@literal_text
def plot_operating_curve(sweep: dict, path: str | Path, threshold: float | None = None,
                         good_class: str = "good") -> Path:
    """Escape rate vs false-reject rate over every threshold on P(good): the line's trade-off."""
    fig, ax = _subplots(figsize=(5.5, 4.5), constrained_layout=True)
    fr, esc = sweep.get("false_reject_rate"), sweep.get("escape_rate")
    if fr is None or esc is None:
        ax.text(0.5, 0.5, "undefined: needs both good and defective images", ha="center", va="center")
    else:
        ax.plot(fr, esc, color="#4c72b0", lw=2, drawstyle="steps-post")
        if threshold is not None:  # the sweep holds the threshold itself (metrics.threshold_sweep)
            k = int(np.argmin(np.abs(np.asarray(sweep["threshold"]) - threshold)))
            ax.plot([fr[k]], [esc[k]], "o", color="black", label=f"threshold {threshold:.3f}")
            _legend(ax, fontsize=8)
    ax.set(xlabel=f"false-reject rate ({good_class} images rejected)", ylabel="escape rate (defects passed)",
           xlim=(-0.02, 1.02), ylim=(-0.02, 1.02), title="Operating curve")
    ax.grid(alpha=0.3)
    return _save(fig, path)


@literal_text
def plot_error_gallery(errors: list[dict], path: str | Path, columns: int = 4, thumb: int = 160) -> Path:
    """The most confident mistakes as a picture grid, each titled true / predicted (probability)."""
    from vision_tl.imaging import ImageLoadError, load_rgb, resize

    shown = [e for e in errors if e.get("path")]
    rows = max(1, -(-len(shown) // columns))
    fig, axes = _subplots(rows, columns, figsize=(2.6 * columns, 2.9 * rows), squeeze=False,
                             constrained_layout=True)
    for ax in axes.flat:
        ax.axis("off")
    if not shown:
        axes[0, 0].text(0, 0.5, "no misclassified images", fontsize=12)
    for ax, err in zip(axes.flat, shown):
        try:
            ax.imshow(resize(load_rgb(err["path"]), (thumb, thumb), "bilinear"))
        except ImageLoadError:
            ax.text(0.5, 0.5, "image unreadable", ha="center", va="center")
        ax.set_title(f"true {err['true']}\npred {err['predicted']} ({err['probability']:.2f})", fontsize=9,
                     color="#c44e52")
    fig.suptitle("Most confident mistakes", fontsize=11)
    return _save(fig, path)
