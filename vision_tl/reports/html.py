"""A self-contained HTML report: one file, images inlined as base64, no scripts or network."""

from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1f2328;margin:0;background:#f6f8fa}
main{max-width:1100px;margin:0 auto;padding:24px 28px 48px;background:#fff}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:32px 0 10px;border-bottom:1px solid #d0d7de;padding-bottom:4px}
.meta{color:#57606a;font-size:13px}.meta b{color:#1f2328;font-weight:600}
.cards{display:flex;flex-wrap:wrap;gap:10px;margin:16px 0}
.card{border:1px solid #d0d7de;border-radius:6px;padding:8px 14px;min-width:110px}
.card .v{font-size:20px;font-weight:600}.card .k{color:#57606a;font-size:12px}
table{border-collapse:collapse;margin:6px 0 12px;font-size:13px}
th,td{border:1px solid #d0d7de;padding:4px 10px;text-align:right}
th{background:#f6f8fa}td.l,th.l{text-align:left}
td.na{color:#8c959f;font-style:italic}
img.fig{max-width:100%;border:1px solid #eaeef2;margin:6px 0}
img.thumb{width:72px;height:72px;object-fit:contain;image-rendering:pixelated;background:#000}
.note{background:#fff8c5;border:1px solid #d4a72c;border-radius:6px;padding:6px 10px;margin:8px 0;font-size:13px}
.small{color:#57606a;font-size:12px}
.headline{font-size:15px;margin:10px 0 4px}
"""

FIGURE_TITLES = {
    "confusion_matrix": "Confusion matrix",
    "per_class": "Precision, recall and F1 per class",
    "roc_pr": "ROC and precision-recall curves (one class vs the rest)",
    "reliability": "Calibration: is a 90 % confidence right 90 % of the time?",
    "threshold": "Good vs defect: the threshold trade-off",
    "operating_curve": "Operating curve: escape rate vs false-reject rate",
    "error_gallery": "Gallery of the most confident mistakes",
    "training_curves": "Training: loss and validation scores per epoch",
}
# figures after the mistakes table, in a section of their own: how the run got here
TRAINING_FIGURES = ("training_curves",)
TRAINING_CAPTION = ("From the run's history (metrics.json; the training loss from metrics.csv): the dashed line marks "
                    "the epoch whose checkpoint the run keeps (checkpoints/best.ckpt).")


def _esc(value) -> str:
    return html.escape(str(value), quote=True)


def _num(value: float | None, reason: str | None = None, pct: bool = False) -> str:
    """A table cell: the number, or 'n/a' with the reason as tooltip. A value that rounds to the
    end of the scale without being there reads ``>0.999`` / ``<0.1%`` (as the confusion matrix's
    ``>0.99``): 1 error in 2,000 is not "1.000", 1 escape in 20,000 not "0.0%"."""
    if value is None:
        return f'<td class="na" title="{_esc(reason or "undefined")}">n/a</td>'
    if pct:
        text = "<0.1%" if 0 < value < 0.0005 else ">99.9%" if 0.9995 <= value < 1 else f"{value:.1%}"
    else:
        text = ">0.999" if 0.9995 <= value < 1 else "<0.001" if 0 < value < 0.0005 else f"{value:.3f}"
    return f'<td title="{value:.6g}">{_esc(text)}</td>'


def _interval(bounds: list[float] | None, pct: bool = False) -> str:
    """``0.21–1.00`` (or ``0–79 %``): a 95 % interval as text; ``n/a`` without one."""
    if not bounds:
        return "n/a"
    low, high = bounds
    return f"{_bound(low, pct)}–{_bound(high, pct)}"


def _bound(value: float, pct: bool) -> str:
    """One end of an interval; one above 0 that would round to 0 keeps two significant digits
    (2 false rejects in 2,000 good images lie in 0.027%–0.36%, not "0%–0%"), and one below 1 that
    would round to 1 keeps two of what it lacks of 1 (99.87%, not "100%": not a certainty either)."""
    scale = 100 if pct else 1
    if 0 < value < 0.005 or 0.995 <= value < 1:  # (0% / 0.00 or 100% / 1.00 once rounded)
        small = min(value, 1 - value) * scale  # what is shown to its second significant digit
        decimals = 1 - math.floor(math.log10(small))  # (as decimals: no "8.8e-05")
        text = f"{value * scale:.{decimals}f}".rstrip("0")  # (99.6%, not 99.60%)
        return f"{text}%" if pct else text
    return f"{value:.0%}" if pct else f"{value:.2f}"


def png_data_uri(path: str | Path) -> str:
    """``data:image/png;base64,...`` for a PNG file."""
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def _thumbnail(path: str | None, size: int = 96) -> str:
    if not path:
        return ""
    from PIL import Image

    from vision_tl.imaging import ImageLoadError, load_rgb

    try:
        image = Image.fromarray(load_rgb(path))
    except ImageLoadError:
        return ""
    image.thumbnail((size, size))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    uri = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<img class="thumb" alt="{_esc(Path(path).name)}" src="{uri}">'


def _cards(summary: dict, gvd: dict | None) -> str:
    """The numbers a reader looks for first: balanced accuracy, then the line's two error rates
    (as shares, with their counts), then the rest."""
    def card(label: str, value: float | None, pct: bool = False, detail: str = "") -> str:
        shown = "n/a" if value is None else f"{value:.1%}" if pct else f"{value:.3f}"
        sub = f'<div class="k">{_esc(detail)}</div>' if detail else ""
        return f'<div class="card"><div class="v">{shown}</div><div class="k">{_esc(label)}</div>{sub}</div>'

    cells = [card("balanced accuracy", summary["balanced_acc"])]
    if gvd is not None:
        cells += [card("escape rate (defects passed)", gvd["escape_rate"], True,
                       f"{gvd['escapes']} of {gvd['defect_images']} defective images"
                       + _card_interval(gvd.get("escape_rate_interval"))),
                  card("false-reject rate (good rejected)", gvd["false_reject_rate"], True,
                       f"{gvd['false_rejects']} of {gvd['good_images']} {gvd['good_class']} images"
                       + _card_interval(gvd.get("false_reject_rate_interval")))]
    cells += [card("accuracy", summary["acc"]), card("macro F1", summary["f1_macro"]),
              card("macro ROC AUC", summary["roc_auc_macro"]), card("ECE (lower is better)", summary["ece"])]
    return f'<div class="cards">{"".join(cells)}</div>'


def _card_interval(bounds: list[float] | None) -> str:
    return f"; 95 % interval {_interval(bounds, pct=True)}" if bounds else ""


def _headline(result: dict, split: str) -> str:
    """One sentence with the verdict: on which images, balanced accuracy, the weakest class,
    and the good/defect rates at the threshold in use."""
    summary, gvd = result["summary"], result.get("good_vs_defect")
    which = {"test": "held-out test images", "val": "validation images"}.get(split, f"{split} images")
    parts = [f"On <b>{summary['images']}</b> {_esc(which)}: balanced accuracy "
             f"<b>{'n/a' if summary['balanced_acc'] is None else format(summary['balanced_acc'], '.3f')}</b>"]
    measured = [r for r in result["per_class"] if r["recall"] is not None]
    if measured:
        worst = min(measured, key=lambda r: r["recall"])
        parts.append(f"lowest recall <b>{_esc(worst['class'])}</b> {worst['recall']:.3f} "
                     f"({round(worst['recall'] * worst['support'])} of {worst['support']}"
                     + (f", 95 % interval {_interval(worst['recall_interval'])}" if worst.get("recall_interval")
                        else "") + ")")
    if gvd is not None:
        at = ("the most probable class (no threshold set)" if gvd["threshold"] is None
              else f"threshold {gvd['threshold']:.3f} on P({_esc(gvd['good_class'])})")
        parts.append(f"at {at}: escape rate <b>{_pct(gvd['escape_rate'])}</b> ({gvd['escapes']} of "
                     f"{gvd['defect_images']} defective images passed), false-reject rate "
                     f"<b>{_pct(gvd['false_reject_rate'])}</b> ({gvd['false_rejects']} of {gvd['good_images']} "
                     f"{_esc(gvd['good_class'])} images rejected)")
    return f'<p class="headline">{"; ".join(parts)}.</p>'


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def _per_class_table(rows: list[dict]) -> str:
    head = ("<tr><th class=l>class</th><th>images</th><th>predicted</th><th>precision</th><th>recall</th>"
            '<th title="95 % Wilson score interval of the recall: how far it may move on other images">'
            "recall 95 % interval</th><th>F1</th><th>ROC AUC</th><th>avg. precision</th></tr>")
    body = []
    for r in rows:
        why = r["undefined"]
        body.append(f'<tr><td class="l">{_esc(r["class"])}</td><td>{r["support"]}</td><td>{r["predicted"]}</td>'
                    + "".join(_num(r[k], why.get(k)) for k in ("precision", "recall"))
                    + _interval_cell(r.get("recall_interval"), why.get("recall"))
                    + "".join(_num(r[k], why.get(k)) for k in ("f1", "roc_auc", "average_precision")) + "</tr>")
    return f'<table id="per-class">{head}{"".join(body)}</table>'


def _interval_cell(bounds: list[float] | None, reason: str | None = None, pct: bool = False) -> str:
    if not bounds:
        return f'<td class="na" title="{_esc(reason or "undefined")}">n/a</td>'
    return f"<td>{_interval(bounds, pct)}</td>"


def _undefined_notes(result: dict) -> str:
    items = [f"{_esc(r['class'])}: {_esc(k)} — {_esc(v)}" for r in result["per_class"]
             for k, v in r["undefined"].items()]
    items += [_esc(n) for n in result["summary"].get("notes", [])]
    if not items:
        return ""
    return '<div class="note"><b>Undefined metrics</b> (n/a above, null in metrics.json):<br>' + \
        "<br>".join(items) + "</div>"


def _good_vs_defect(gvd: dict | None, choice: dict | None) -> str:
    if gvd is None:
        return ('<h2>Good vs defect</h2><p class="small">No good class set for this run; train with '
                "<code>--data.good_class NAME</code> to get escape and false-reject rates.</p>")
    how = f" — chosen for target <b>{_esc(choice['target'])}</b>" if choice and choice.get("target") else ""
    good = _esc(gvd["good_class"])
    rule = (f"iff P({good}) ≥ threshold. Threshold: <b>{gvd['threshold']:.4f}</b>{how}." if gvd["threshold"] is not None
            else f"iff {good} is its most probable class: no threshold is set (choose one with "
                 "<code>vision-tl report RUN --target-false-reject R</code> or <code>--target-escape E</code>).")
    why = gvd["undefined"]
    return (f"<h2>Good vs defect</h2><p>An image passes as <b>{good}</b> {rule} The <code>is_defect</code> "
            "column of the predictions CSV follows the same rule.</p>"
            '<table id="good-vs-defect"><tr><th class=l>rate</th><th>value</th><th>count</th>'
            "<th>95 % interval</th></tr>"
            f'<tr><td class="l">escape rate (defective images passed as good)</td>'
            f'{_num(gvd["escape_rate"], why.get("escape_rate"), pct=True)}'
            f'<td>{gvd["escapes"]} of {gvd["defect_images"]}</td>'
            f'{_interval_cell(gvd.get("escape_rate_interval"), why.get("escape_rate"), pct=True)}</tr>'
            f'<tr><td class="l">false-reject rate (good images rejected)</td>'
            f'{_num(gvd["false_reject_rate"], why.get("false_reject_rate"), pct=True)}'
            f'<td>{gvd["false_rejects"]} of {gvd["good_images"]}</td>'
            f'{_interval_cell(gvd.get("false_reject_rate_interval"), why.get("false_reject_rate"), pct=True)}</tr>'
            "</table>")


def _errors_table(errors: list[dict]) -> str:
    if not errors:
        return "<h2>Most confident mistakes</h2><p>No mistakes: every image was classified correctly.</p>"
    rows = "".join(
        f'<tr><td class="l">{_thumbnail(e["path"])}</td><td class="l">{_esc(Path(e["path"]).name if e["path"] else "")}'
        f'</td><td class="l">{_esc(e["true"])}</td><td class="l">{_esc(e["predicted"])}</td>'
        f'<td>{e["probability"]:.3f}</td><td>{e["p_true"]:.3f}</td></tr>' for e in errors)
    return ("<h2>Most confident mistakes</h2>"
            '<table id="errors"><tr><th class=l>image</th><th class=l>file</th><th class=l>true</th>'
            f"<th class=l>predicted</th><th>P(predicted)</th><th>P(true)</th></tr>{rows}</table>")


def render_report(result: dict, figures: dict[str, Path], *, split: str, info: dict,
                  errors: list[dict], threshold_choice: dict | None = None) -> str:
    """The whole report as one HTML string (figures embedded)."""
    notes = "".join(f'<div class="note">{_esc(n)}</div>' for n in info.get("notes", []))
    meta = " · ".join(f"<b>{_esc(k.replace('_', ' '))}</b> {_esc(v)}" for k, v in info.items()
                      if k != "notes" and v is not None)
    def figure(name: str, path: Path, caption: str = "") -> str:
        caption = f'<p class="small">{_esc(caption)}</p>' if caption else ""
        return (f"<h2>{_esc(FIGURE_TITLES.get(name, name))}</h2>{caption}"
                f'<img class="fig" alt="{_esc(name)}" src="{png_data_uri(path)}">')

    figs = "".join(figure(name, path) for name, path in figures.items() if name not in TRAINING_FIGURES)
    training = "".join(figure(name, figures[name], TRAINING_CAPTION) for name in TRAINING_FIGURES if name in figures)
    summary = result["summary"]
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<title>vision_tl report ({_esc(split)})</title><style>{CSS}</style></head>
<body><main>
<h1>Evaluation report: {_esc(split)} split, {summary["images"]} images</h1>
{_headline(result, split)}
{_cards(summary, result.get("good_vs_defect"))}{notes}
<div class="meta">{meta}</div>
<h2>Per class</h2>{_per_class_table(result["per_class"])}{_undefined_notes(result)}
{_good_vs_defect(result.get("good_vs_defect"), threshold_choice)}
{figs}
{_errors_table(errors)}
{training}
<p class="small">ECE: expected calibration error of the top-1 confidence over 10 equal-width bins.
Escape and false-reject rates are measured on these images only; expect them to move on new data (the 95 %
Wilson intervals say how far, from the counts alone).</p>
</main></body></html>
"""


def _why_missing(key: str, run: dict) -> str:
    """The tooltip of a comparison cell shown as n/a."""
    if not run.get("has_report") and key in ("roc_auc_macro", "ece", "escape_rate", "false_reject_rate", "threshold"):
        return "no report of this run yet: vision-tl report RUN"
    if key == "threshold":
        return "no threshold set: the most probable class decides good vs defect"
    return "undefined on these images"


def render_comparison(data: dict, columns: tuple, shared_classes: list[str], figure: Path) -> str:
    """The comparison table, per-class recall and the bar chart as one HTML page."""
    head = "".join(f"<th>{_esc(label)}</th>" for _, label in columns)
    rows = "".join(
        f'<tr><td class="l">{_esc(r["name"])}</td><td class="l">{_esc(r["backbone"])}</td>'
        f'<td class="l">{_esc(r["mode"])}</td>' + "".join(_num(r[k], _why_missing(k, r)) for k, _ in columns) + "</tr>"
        for r in data["runs"])
    recall_head = "".join(f"<th>{_esc(c)}</th>" for c in shared_classes)
    recall_rows = "".join(f'<tr><td class="l">{_esc(r["name"])}</td>'
                          + "".join(_num(r["recall"].get(c), "class absent") for c in shared_classes) + "</tr>"
                          for r in data["runs"])
    recall = (f'<table id="recall"><tr><th class=l>run</th>{recall_head}</tr>{recall_rows}</table>' if shared_classes
              else '<p class="small">The runs have no class in common, so no recall can be set side by side.</p>')
    notes = "".join(f'<div class="note">{_esc(n)}</div>' for n in data["notes"])
    split = _esc(data.get("split", "val"))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<title>vision_tl: runs compared ({split})</title><style>{CSS}</style></head>
<body><main><h1>Runs compared on their {split} images</h1>{notes}
<table id="compare"><tr><th class=l>run</th><th class=l>backbone</th><th class=l>mode</th>{head}</tr>{rows}</table>
<h2>Recall per class</h2>{recall}
<img class="fig" alt="comparison" src="{png_data_uri(figure)}">
</main></body></html>
"""
