"""Plots people would rather look at than read (matplotlib, headless)."""

from __future__ import annotations

import dataclasses
import functools
import textwrap
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np


def _legend(ax, **kwargs) -> None:
    """A legend where something is labelled (an empty one only draws matplotlib's warning)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**kwargs)


def literal_text(plot):
    """Draw ``plot``'s text as written: matplotlib reads ``$...$`` as a formula by default, so a
    class named ``cost $5 vs $10`` came out garbled and ``dent $^$`` stopped fit with a parse error.

    Names with characters the default font lacks (a class folder named ``傷`` or ``キズ``) are drawn
    with an installed font that has them (see :func:`font_fallbacks`); where none has, one warning
    names them instead of matplotlib's warning per character, figure and draw."""
    @functools.wraps(plot)
    def draw(*args, **kwargs):
        import matplotlib

        families = list(matplotlib.rcParams["font.family"])
        families += font_fallbacks(_texts((args, kwargs)), tuple(families))
        with matplotlib.rc_context({"text.parse_math": False, "font.family": families}), \
                warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"Glyph \d+ .* missing from font")  # warned above
            return plot(*args, **kwargs)
    return draw


# Fonts tried first, in this order, for characters the default font (DejaVu Sans) lacks: class
# names in Chinese, Japanese or Korean mostly. Any other installed font that has them comes after.
PREFERRED_FALLBACKS = ("Noto Sans CJK JP", "Noto Sans CJK SC", "Noto Sans CJK TC", "Noto Sans CJK KR",
                       "Source Han Sans", "Droid Sans Fallback", "WenQuanYi Zen Hei", "WenQuanYi Micro Hei",
                       "IPAexGothic", "IPAGothic", "Noto Sans JP", "Noto Sans SC", "Yu Gothic", "Meiryo",
                       "MS Gothic", "Microsoft YaHei", "SimHei", "Malgun Gothic", "Hiragino Sans",
                       "PingFang SC", "Apple SD Gothic Neo", "Arial Unicode MS")
_UNDRAWABLE_WARNED: set[str] = set()  # names already warned about: once per process, not per figure


def _texts(value, depth: int = 4) -> Iterator[str]:
    """The non-ASCII strings in a plot's arguments (class names, titles, file names), the ones a
    font may lack; arrays and numbers are not looked into."""
    if isinstance(value, str):
        if not value.isascii():
            yield value
    elif isinstance(value, Path):
        yield from _texts(value.name, depth)
    elif depth and isinstance(value, dict):
        for v in value.values():
            yield from _texts(v, depth - 1)
    elif depth and isinstance(value, (list, tuple)):
        for v in value:
            yield from _texts(v, depth - 1)
    elif depth and dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            yield from _texts(getattr(value, f.name), depth - 1)


@functools.cache
def _charmap(path: str) -> frozenset[int]:
    from matplotlib.ft2font import FT2Font

    return frozenset(FT2Font(path).get_charmap())


def _installed_fonts() -> list[tuple[str, str]]:
    """(family, file) of each font matplotlib knows, the preferred fallbacks first. matplotlib's
    own Last Resort font is left out: it has every character, each drawn as a box."""
    from matplotlib import font_manager

    fonts = {f.name: f.fname for f in font_manager.fontManager.ttflist if not f.name.startswith("Last Resort")}
    rank = {name: i for i, name in enumerate(PREFERRED_FALLBACKS)}
    return sorted(fonts.items(), key=lambda item: (rank.get(item[0], len(rank)), item[0]))


@functools.cache
def _fallbacks_for(missing: frozenset[str]) -> tuple[tuple[str, ...], frozenset[str]]:
    """The installed families that together have the ``missing`` characters, and those none has."""
    chosen, left = [], set(missing)
    for name, path in _installed_fonts():
        try:
            has = {c for c in left if ord(c) in _charmap(path)}
        except (OSError, RuntimeError):  # a font file matplotlib listed but FreeType cannot open
            continue
        if has:
            chosen.append(name)
            left -= has
        if not left:
            break
    return tuple(chosen), frozenset(left)


def font_fallbacks(texts: Iterable[str], families: tuple[str, ...] = ("sans-serif",)) -> list[str]:
    """The installed font families to draw after ``families`` so that ``texts`` come out as
    written (matplotlib falls back from one family to the next per character). Names that no font
    here can draw are warned about once: the figures show them as boxes, while predictions.csv and
    the HTML report, which are text, keep them as they are.

    Example:
        >>> font_fallbacks(["scratch"])
        []
    """
    from matplotlib import font_manager

    texts = list(dict.fromkeys(texts))
    if not texts:
        return []
    drawn = frozenset().union(*(_charmap(font_manager.findfont(font_manager.FontProperties(family=[f])))
                                for f in families))
    missing = frozenset(c for t in texts for c in t if ord(c) not in drawn and c.isprintable())
    if not missing:
        return []
    chosen, none_has = _fallbacks_for(missing)
    boxes = [t for t in texts if none_has.intersection(t) and t not in _UNDRAWABLE_WARNED]
    if boxes:
        _UNDRAWABLE_WARNED.update(boxes)
        warnings.warn(f"no font here has all the characters of {', '.join(map(repr, boxes))}: the figures "
                      "draw those as empty boxes (predictions.csv and the HTML report keep the names as "
                      "written); install a font that has them, such as Noto Sans CJK, to draw them", stacklevel=3)
    return list(chosen)


def _subplots(nrows: int = 1, ncols: int = 1, *, figsize: tuple[float, float], constrained_layout: bool = False,
              **kwargs):
    """``pyplot.subplots`` without pyplot: an Agg-rendered figure that never touches the global
    backend (a notebook's inline plots keep working) nor pyplot's list of open figures."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, constrained_layout=constrained_layout)
    FigureCanvasAgg(fig)
    return fig, fig.subplots(nrows, ncols, **kwargs)


# Colour-blind-safe colours (Okabe & Ito): blue for good images, vermillion for defects; never
# red against green, which about 1 man in 12 cannot tell apart.
GOOD_COLOUR, DEFECT_COLOUR = "#0072B2", "#D55E00"
# Up to this many classes the two confusion matrices sit side by side; beyond, one above the other,
# so each keeps a page's width and its numbers stay readable in the HTML report.
SIDE_BY_SIDE_CLASSES = 8


def _cell_text(count: float, share: float, diagonal: bool, fmt: str) -> str:
    """A confusion-matrix cell's label: blank for an off-diagonal zero (the white cell says it;
    a wall of 0.00 hides the mistakes), a share 'n/a' where the true class has no images."""
    if fmt == "{:.0f}":  # the counts panel
        return "" if count == 0 and not diagonal else fmt.format(count)
    if np.isnan(share):
        return "n/a"
    if count == 0 and not diagonal:
        return ""
    if 0.995 <= share < 1:
        return ">0.99"  # 1.00 would read as all
    return "<0.01" if 0 < share < 0.005 else fmt.format(share)  # 0.00 would read as none


@literal_text
def plot_confusion_matrix(matrix: list[list[int]], classes: list[str], path: str | Path,
                          title: str = "Confusion matrix") -> Path:
    """Save counts and row-normalised recall as PNG, atomically: side by side for a few classes,
    one above the other for many (numbers shrink to fit the cells, long names wrap to the left)."""
    from vision_tl.utils.files import atomic_path

    counts = np.asarray(matrix, dtype=float)
    rows = counts.sum(axis=1, keepdims=True)
    # a class without images in this split has no recall: "n/a", never 0.00
    normalised = np.divide(counts, rows, out=np.full_like(counts, np.nan), where=rows > 0)
    n = len(classes)
    stacked = n > SIDE_BY_SIDE_CLASSES
    cell = 0.55 if n <= 12 else 0.42  # inches per cell
    label_room = 0.35 + 0.075 * max((len(c) for c in classes), default=1)  # tick labels, in inches
    side = max(2.5, cell * n) + label_room + 1.4  # + axis label, colour bar
    fig, axes = _subplots(2 if stacked else 1, 1 if stacked else 2,
                          figsize=(side, 2 * side - 0.6) if stacked else (2 * side, side - 0.5),
                          constrained_layout=True)
    fontsize = 8 if n <= 12 else 6.5 if n <= 20 else 5
    # names turn beyond 3 classes, or where one is wider than a column (they would run together)
    turn = n > 3 or _text_inches(list(map(str, classes)), min(9, fontsize + 1)) > 0.9 * max(2.5, cell * n) / max(1, n)
    for ax, data, fmt, label in ((axes[0], counts, "{:.0f}", "counts"),
                                 (axes[1], normalised, "{:.2f}", "share of true class (recall on the diagonal)")):
        im = ax.imshow(data, cmap="Blues", vmin=0, vmax=1 if data is normalised else max(1, data.max(initial=0)))
        ax.set_xticks(range(n), classes, rotation=45 if turn else 0, ha="right" if turn else "center",
                      rotation_mode="anchor", fontsize=min(9, fontsize + 1))
        ax.set_yticks(range(n), classes, fontsize=min(9, fontsize + 1))
        ax.set_xlabel("predicted class")
        ax.set_ylabel("true class")
        ax.set_title(f"{title}: {label}", fontsize=10)
        top = 1.0 if data is normalised else (data.max() if data.size else 0)
        for (i, j), v in np.ndenumerate(data):
            ax.text(j, i, _cell_text(counts[i, j], normalised[i, j], i == j, fmt), ha="center", va="center",
                    color="white" if top and v > top / 2 else "black", fontsize=fontsize)
        bar = fig.colorbar(im, ax=ax, shrink=0.8, label="images" if data is counts else "share of the row")
        if data is counts:  # whole images, not 0.25 of one
            from matplotlib.ticker import MaxNLocator

            bar.locator = MaxNLocator(integer=True)
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
    many = len(curves) > 6  # the legend would cover the curves: it goes below them, two columns
    labels = [f"{c['class']}: n/a ({c['undefined']['roc_auc']})" if c["roc_auc"] is None else
              f"{c['class']}: AUC {c['roc_auc']:.3f}" for c in curves]
    # ... or one, where two columns of the longest entry are wider than a panel
    ncols = 2 if max(map(len, labels), default=0) <= 33 else 1
    rows = -(-len(curves) // ncols)
    fig, (roc, pr) = _subplots(1, 2, figsize=(10, 4.6 + (0.17 * rows + 0.3 if many else 0)), constrained_layout=True)
    roc.plot([0, 1], [0, 1], color="0.7", lw=1, ls=":")
    styles = ("-", "--", "-.", (0, (1, 1)))  # identical curves stay visible
    for i, c in enumerate(curves):
        style = {"lw": 1.8, "ls": styles[i % len(styles)], "alpha": 0.9}
        if c["roc_auc"] is None:
            roc.plot([], [], " ", label=labels[i])
            continue
        line, = roc.plot(c["roc"]["fpr"], c["roc"]["tpr"], **style, label=labels[i])
        pr.step(c["pr"]["recall"], c["pr"]["precision"], where="pre", **style, color=line.get_color(),
                label=f"{c['class']}: AP {c['average_precision']:.3f}")
    for ax, (x, y), name in ((roc, ("false positive rate", "true positive rate"), "ROC"),
                             (pr, ("recall", "precision"), "precision-recall")):
        ax.set(xlim=(-0.02, 1.02), ylim=(-0.02, 1.02), xlabel=x, ylabel=y, title=f"{title}: {name}")
        ax.grid(alpha=0.3)
        if many:
            _legend(ax, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncols=ncols, fontsize=7)
        else:
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


def _text_inches(texts: list[str], fontsize: float | str = "medium") -> float:
    """The width of the widest of ``texts`` in inches, as matplotlib draws it (tick labels: medium)."""
    from matplotlib.backends.backend_agg import RendererAgg
    from matplotlib.font_manager import FontProperties

    renderer, font = RendererAgg(1, 1, 72), FontProperties(size=fontsize)  # (72 dpi: pixels are points)
    with warnings.catch_warnings():  # (a glyph the font lacks is warned about where it is drawn)
        warnings.simplefilter("ignore")
        return max((renderer.get_text_width_height_descent(t, font, ismath=False)[0] / 72 for t in texts),
                   default=0.0)


SCORE_COLOURS = (("precision", "#0072B2"), ("recall", "#E69F00"), ("f1", "#009E73"))  # Okabe & Ito


@literal_text
def plot_per_class(per_class: list[dict], path: str | Path, title: str = "Per class") -> Path:
    """Grouped bars of precision, recall and F1 per class; undefined values marked 'n/a'. Beyond
    a few classes, or where the names are too long to stand side by side, the bars lie down, one
    row per class, so long names need neither turning nor a figure wider than a page."""
    names = [f"{r['class']} (n={r['support']})" for r in per_class]
    # standing, each class has about (width - 1) / n inches for its name under its bars
    room = (max(5.5, 1.2 * len(names) + 2) - 1) / max(1, len(names))
    lying = len(names) > SIDE_BY_SIDE_CLASSES or _text_inches([str(r["class"]) for r in per_class]) > 0.9 * room
    x = np.arange(len(names))
    figsize = (9, 1.2 + 0.5 * len(names)) if lying else (max(5.5, 1.2 * len(names) + 2), 4)
    fig, ax = _subplots(figsize=figsize, constrained_layout=True)
    for i, (key, color) in enumerate(SCORE_COLOURS):
        values = [r[key] for r in per_class]
        pos = x + (i - 1) * 0.27
        bar = ax.barh if lying else ax.bar
        bar(pos, [v or 0.0 for v in values], 0.25, color=color, label=key)
        for p, v in zip(pos, values):
            text = "n/a" if v is None else f"{v:.2f}"
            if lying:
                ax.text((v or 0.0) + 0.01, p, text, ha="left", va="center", fontsize=7)
            else:
                ax.text(p, (v or 0.0) + 0.01, text, ha="center", va="bottom", fontsize=7)
    if lying:
        ax.set_yticks(x, names)
        ax.invert_yaxis()  # the first class on top, as in the table
        ax.set(xlim=(0, 1.12), xlabel="score")
        ax.set_title(title, pad=24)  # room for the legend between title and bars
        _legend(ax, ncols=3, fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0))
        ax.grid(axis="x", alpha=0.3)
    else:
        ax.set_xticks(x, [n.replace(" (n=", "\n(n=") for n in names])
        ax.set(ylim=(0, 1.15), ylabel="score", title=title)
        _legend(ax, ncols=3, fontsize=8, loc="upper right")
        ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def _wrap(text: str, width: int) -> str:
    """``text`` in lines of at most ``width`` characters: a long good-class name stays in its panel."""
    return "\n".join(textwrap.wrap(text, width)) or text


def _rates_at(sweep: dict, threshold: float) -> tuple[int, float | None, float | None]:
    """The sweep's index at ``threshold`` (the sweep holds the threshold itself) and both rates there."""
    k = int(np.argmin(np.abs(np.asarray(sweep["threshold"]) - threshold)))
    escape, false_reject = sweep.get("escape_rate"), sweep.get("false_reject_rate")
    return k, None if escape is None else escape[k], None if false_reject is None else false_reject[k]


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


@literal_text
def plot_threshold(p_good: np.ndarray, is_good: np.ndarray, sweep: dict, path: str | Path,
                   threshold: float | None = None, good_class: str = "good") -> Path:
    """P(good) histograms of good vs defective images (left) and both error rates vs threshold
    (right), the chosen threshold marked with the two rates it gives."""
    fig, (hist, rates) = _subplots(1, 2, figsize=(10, 4.2), constrained_layout=True)
    edges = np.linspace(0, 1, 26)
    p_good, is_good = np.asarray(p_good), np.asarray(is_good, dtype=bool)
    # each group as a share of its own images: 25 good beside 125 defective images stay visible
    for values, color, name in ((p_good[is_good], GOOD_COLOUR, f"{good_class} images"),
                                (p_good[~is_good], DEFECT_COLOUR, "defective images")):
        if len(values):
            hist.hist(values, bins=edges, weights=np.full(len(values), 1 / len(values)), alpha=0.6, color=color,
                      edgecolor=color, label=f"{name} (n={len(values)})")
    hist.set(xlabel=_wrap(f"P({good_class})", 60), ylabel="share of the group's images", xlim=(0, 1),
             title=_wrap(f"P({good_class}) by true condition", 44))
    for name, values, color in (("escape rate (defects passed)", sweep["escape_rate"], DEFECT_COLOUR),
                                ("false-reject rate (good rejected)", sweep["false_reject_rate"], GOOD_COLOUR)):
        if values is not None:
            rates.plot(sweep["threshold"], values, color=color, lw=2, label=name)
    rates.set(xlabel=_wrap(f"threshold on P({good_class})", 60), ylabel="rate", xlim=(0, 1), ylim=(-0.02, 1.02),
              title="error rates vs threshold (good iff P ≥ threshold)" if threshold is not None else
              "error rates vs threshold (none set: argmax decides)")
    if threshold is not None:
        k, escape, false_reject = _rates_at(sweep, threshold)
        for value, color in ((escape, DEFECT_COLOUR), (false_reject, GOOD_COLOUR)):
            if value is not None:
                rates.plot([sweep["threshold"][k]], [value], "o", color=color, ms=7, mec="black", zorder=5)
        for ax in (hist, rates):
            ax.axvline(threshold, color="black", ls="--", lw=1.2,
                       label=f"threshold {threshold:.3f}: escape {_pct(escape)}, false reject {_pct(false_reject)}")
    for ax in (hist, rates):
        ax.grid(alpha=0.3)
        _legend(ax, fontsize=8, loc="best")
    return _save(fig, path)


@literal_text
def plot_comparison(runs: list[str], metrics: dict[str, list[float | None]], path: str | Path,
                    title: str = "runs compared") -> Path:
    """Grouped bars: one group per metric, one bar per run (missing values left out)."""
    names = list(metrics)
    x = np.arange(len(names))
    width = 0.8 / max(1, len(runs))
    # a legend of several rows (beyond 3 runs, or long names one a row: runs told apart by their
    # paths) would cover the bars: it goes below them; beyond 6 runs, the scores of the narrower bars
    # stand upright so that neighbours do not run together
    ncols = min(3, len(runs)) if max(map(len, runs), default=0) <= 30 else 1
    rows = -(-len(runs) // max(1, ncols))
    below, upright = rows > 1 or ncols == 1, len(runs) > 6
    fig, ax = _subplots(figsize=(max(6, 1.6 * len(names) + 0.4 * len(runs)), 4 + (0.2 * rows if below else 0)),
                        constrained_layout=True)
    for i, run in enumerate(runs):
        values = [metrics[m][i] for m in names]
        pos = x - 0.4 + width * (i + 0.5)
        ax.bar(pos, [v or 0.0 for v in values], width=width * 0.95, label=run)
        for p, v in zip(pos, values):
            ax.text(p, (v or 0.0) + 0.01, "n/a" if v is None else f"{v:.2f}", ha="center", va="bottom", fontsize=7,
                    rotation=90 if upright else 0)
    ax.set_xticks(x, names)
    ax.set(ylim=(0, 1.15), ylabel="score", title=title)
    if below:
        _legend(ax, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.08), ncols=ncols)
    else:
        _legend(ax, fontsize=8, loc="upper right", ncols=ncols)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


@literal_text
def plot_operating_curve(sweep: dict, path: str | Path, threshold: float | None = None,
                         good_class: str = "good", title: str = "Operating curve") -> Path:
    """Escape rate vs false-reject rate over every threshold on P(good): the line's trade-off,
    the chosen threshold marked and labelled with its two rates."""
    fig, ax = _subplots(figsize=(5.5, 4.5), constrained_layout=True)
    fr, esc = sweep.get("false_reject_rate"), sweep.get("escape_rate")
    if fr is None or esc is None:
        ax.text(0.5, 0.5, "undefined: needs both good and defective images", ha="center", va="center")
    else:
        ax.plot(fr, esc, color="#4c72b0", lw=2, drawstyle="steps-post")
        if threshold is not None:
            k, escape, false_reject = _rates_at(sweep, threshold)
            ax.plot([fr[k]], [esc[k]], "o", color=DEFECT_COLOUR, mec="black", ms=9, zorder=5,
                    label=f"threshold {threshold:.3f}")
            ax.annotate(f"threshold {threshold:.3f}\nescape {_pct(escape)}\nfalse reject {_pct(false_reject)}",
                        (fr[k], esc[k]), xytext=(0.45, 0.6), textcoords="axes fraction", fontsize=9,
                        arrowprops={"arrowstyle": "->", "color": "black", "lw": 1},
                        bbox={"boxstyle": "round", "fc": "white", "ec": "0.6"})
    ax.set(xlabel=_wrap(f"false-reject rate ({good_class} images rejected)", 60), ylabel="escape rate (defects passed)",
           xlim=(-0.02, 1.02), ylim=(-0.02, 1.02), title=title)
    ax.grid(alpha=0.3)
    return _save(fig, path)


@literal_text
def plot_error_gallery(errors: list[dict], path: str | Path, columns: int = 4, thumb: int = 160) -> Path:
    """The most confident mistakes as a picture grid, each titled true / predicted (probability)."""
    from vision_tl.imaging import ImageLoadError, load_rgb, resize

    shown = [e for e in errors if e.get("path")]
    rows = max(1, -(-len(shown) // columns))
    fig, axes = _subplots(rows, columns, figsize=(2.6 * columns, 3.1 * rows), squeeze=False,
                             constrained_layout=True)
    for ax in axes.flat:
        ax.axis("off")
    if not shown:
        axes[0, 0].text(0, 0.5, "no misclassified images", fontsize=12)
    for ax, err in zip(axes.flat, shown):
        try:
            image = load_rgb(err["path"])
            scale = thumb / max(image.shape[:2])  # a long part stays long, not squeezed to a square
            ax.imshow(resize(image, (max(1, round(image.shape[0] * scale)), max(1, round(image.shape[1] * scale))),
                             "bilinear"))
        except ImageLoadError:
            ax.text(0.5, 0.5, "image unreadable", ha="center", va="center")
        name = Path(err["path"]).name
        name = name if len(name) <= 32 else f"{name[:14]}…{name[-17:]}"
        # a long class name wraps within its panel (about 32 characters wide), not into the next one
        lines = [f"true {err['true']}", f"pred {err['predicted']} ({err['probability']:.2f})"]
        ax.set_title("\n".join([*(part for line in lines for part in textwrap.wrap(line, 32)), name]),
                     fontsize=8.5, color=DEFECT_COLOUR)
    fig.suptitle("Most confident mistakes", fontsize=11)
    return _save(fig, path)


# Okabe & Ito: train loss orange, validation blue; the lighter sky blue for plain accuracy
TRAIN_COLOUR, VAL_COLOUR, ACC_COLOUR, MILESTONE_COLOUR = "#E69F00", "#0072B2", "#56B4E9", "#CC79A7"
# beyond this many points a curve is a line without markers (100 epochs of dots are a smear)
MARKED_POINTS = 30


def _history_positions(history: list[dict]) -> np.ndarray:
    """Where each validation sits on the epoch axis: at its epoch, or spread over the epoch where
    it validated several times (``val_check_interval`` < 1), the last at the epoch itself."""
    epochs = [int(r["epoch"]) for r in history]
    counts = {e: epochs.count(e) for e in epochs}
    seen: dict[int, int] = {}
    x = []
    for e in epochs:
        seen[e] = seen.get(e, 0) + 1
        x.append(e - 1 + seen[e] / counts[e])
    return np.asarray(x, dtype=float)


def _values(rows: list[dict], key: str) -> np.ndarray:
    """``key`` of each row as floats, NaN where missing, null or not finite."""
    out = []
    for r in rows:
        v = r.get(key)
        out.append(float(v) if isinstance(v, (int, float)) and np.isfinite(v) else np.nan)
    return np.asarray(out, dtype=float)


def _curve(ax, x: np.ndarray, y: np.ndarray, label: str, **style) -> bool:
    """A line through ``y`` (broken where it is NaN), markers on every point when there are few
    and on the points no line reaches (one epoch, a value between two missing ones); an entry
    saying 'none' in the legend where every value is missing. Whether anything was drawn."""
    finite = np.isfinite(y)
    if not finite.any():
        ax.plot([], [], " ", label=f"{label}: none logged")
        return False
    few = len(x) <= MARKED_POINTS
    line, = ax.plot(x, y, marker="o" if few else None, ms=5 if len(x) <= 3 else 3.5, lw=1.8 if few else 1.3,
                    label=label, **style)
    left, right = np.r_[False, finite[:-1]], np.r_[finite[1:], False]
    alone = finite & ~left & ~right
    if alone.any() and not few:
        ax.plot(x[alone], y[alone], "o", ms=3.5, color=line.get_color(), alpha=style.get("alpha", 1.0))
    return True


def _score_limits(values: np.ndarray) -> tuple[float, float]:
    """0..1, or zoomed to the scores' range when all of them are above 0.5 (ticks show where)."""
    finite = values[np.isfinite(values)]
    if not finite.size or finite.min() < 0.5:
        return -0.02, 1.02
    return max(0.0, np.floor(finite.min() * 20) / 20 - 0.05), 1.01


def _mark_milestones(axes, milestones: dict[int, int]) -> None:
    """GradualUnfreezing's milestones: a dotted line before the epoch that first trains more stages."""
    for i, (epoch, stages) in enumerate(sorted(milestones.items())):
        for ax in axes:
            ax.axvline(epoch - 0.5, color=MILESTONE_COLOUR, ls=":", lw=1.2,
                       label="stages unfrozen" if i == 0 and ax is axes[-1] else None)
        axes[0].annotate(f"last {stages} train", (epoch - 0.5, 1), xycoords=("data", "axes fraction"),
                         xytext=(2, -3), textcoords="offset points", rotation=90, ha="left", va="top",
                         fontsize=7, color=MILESTONE_COLOUR)


def _mark_best(ax, loss_ax, x: float, score: float | None, epoch: int, x_mid: float) -> None:
    """The epoch whose checkpoint the run keeps: a line on both panels, the score written beside it."""
    loss_ax.axvline(x, color="black", ls="--", lw=1, alpha=0.6)
    ax.axvline(x, color="black", ls="--", lw=1.2, label="kept (best.ckpt)")
    if score is None:
        text, y = f"kept: epoch {epoch}", 0.5
    else:
        ax.plot([x], [score], "o", ms=8, mfc="none", mec="black", mew=1.5, zorder=5)
        low, high = ax.get_ylim()
        y = 0.06 if (score - low) / (high - low) > 0.5 else 0.94  # away from the point
        text = f"kept: epoch {epoch}\nbalanced acc {score:.3f}"
    right = x > x_mid
    ax.annotate(text, (x, y), xycoords=("data", "axes fraction"), xytext=(-5 if right else 5, 0),
                textcoords="offset points", ha="right" if right else "left", va="bottom" if y < 0.5 else "top",
                fontsize=8.5, bbox={"boxstyle": "round", "fc": "white", "ec": "0.6"})


@literal_text
def plot_training_curves(history: list[dict], path: str | Path, *, best: dict | None = None,
                         train_loss: dict[int, float] | None = None, val_loss: dict[int, float] | None = None,
                         since_epoch: int = 0, milestones: dict[int, int] | None = None,
                         title: str = "Training") -> Path:
    """Loss per epoch (left: validation loss, and the mean training loss of each epoch where the
    step log has it) and validation balanced accuracy and accuracy (right), the epoch whose
    checkpoint the run keeps marked and labelled with its score.

    Args:
        history: ``metrics.json``'s ``history``: one entry per validation, with ``epoch``,
            ``balanced_acc``, ``acc`` and ``tie_break`` (the validation loss); missing or NaN
            values leave a gap.
        best: ``metrics.json``'s ``val`` (the kept epoch); None: nothing marked.
        train_loss: mean training loss per epoch (from ``metrics.csv``); None: not shown.
        val_loss: validation loss per epoch, for entries without ``tie_break``.
        since_epoch: the first epoch trained in this run folder (a run continued from another's
            checkpoint): the earlier ones are shaded.
        milestones: GradualUnfreezing's ``{epoch: stages}``, drawn as dotted lines.
    """
    history = sorted((r for r in history if isinstance(r.get("epoch"), int)), key=lambda r: r["epoch"])
    x = _history_positions(history)
    val = _values(history, "tie_break")
    if val_loss:
        val = np.where(np.isfinite(val), val, [val_loss.get(r["epoch"], np.nan) for r in history])
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    fig, (loss_ax, score_ax) = _subplots(1, 2, figsize=(10, 4.4), constrained_layout=True)
    epochs = sorted(train_loss or {})
    if train_loss is not None:
        _curve(loss_ax, np.asarray(epochs, float), np.asarray([train_loss[e] for e in epochs], float),
               "training loss (epoch mean)", color=TRAIN_COLOUR)
    _curve(loss_ax, x, val, "validation loss", color=VAL_COLOUR)
    balanced = _values(history, "balanced_acc")
    _curve(score_ax, x, balanced, "balanced accuracy", color=VAL_COLOUR, zorder=3)  # on top where they agree
    _curve(score_ax, x, _values(history, "acc"), "accuracy", color=ACC_COLOUR, ls="--", alpha=0.8)
    loss_ax.set(xlabel="epoch", ylabel="loss", title="loss per epoch")
    score_ax.set(xlabel="epoch", ylabel="score", ylim=_score_limits(np.r_[balanced, _values(history, "acc")]),
                 title="validation scores per epoch")
    shown = np.r_[x, epochs] if len(x) or epochs else np.zeros(1)
    lo, hi = float(np.min(shown)), float(np.max(shown))
    positive = np.r_[val, [train_loss[e] for e in epochs]]
    positive = positive[np.isfinite(positive) & (positive > 0)]
    if positive.size and positive.max() / positive.min() > 30:  # a first epoch's loss would flatten the rest
        loss_ax.set_yscale("log")
        # (matplotlib writes 10^k as a formula, which literal_text turns off: plain numbers instead)
        loss_ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    for ax in (loss_ax, score_ax):
        ax.set_xlim(lo - 0.5, hi + 0.5)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1, steps=[1, 2, 5, 10]))  # epochs, never epoch 0.2
        ax.grid(alpha=0.3)
        if since_epoch > lo:
            ax.axvspan(lo - 0.5, since_epoch - 0.5, color="0.9", zorder=0,
                       label="earlier run folder" if ax is score_ax else None)
    _mark_milestones((loss_ax, score_ax), {e: n for e, n in (milestones or {}).items() if lo - 0.5 < e <= hi})
    if best is not None and isinstance(best.get("epoch"), int):
        at = [i for i, r in enumerate(history) if r["epoch"] == best["epoch"]]
        same = [i for i in at if history[i].get("balanced_acc") == best.get("balanced_acc")]
        score = _values([best], "balanced_acc")[0]
        _mark_best(score_ax, loss_ax, x[(same or at)[-1]] if at else best["epoch"],
                   None if np.isnan(score) else float(score), best["epoch"], (lo + hi) / 2)
    for ax in (loss_ax, score_ax):
        _legend(ax, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncols=2, fontsize=8)
    fig.suptitle(title, fontsize=11)
    return _save(fig, path)
