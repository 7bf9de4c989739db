"""Evaluation metrics from per-image probabilities, in plain numpy (no torch).

Everything here returns JSON-ready Python types. A metric that is undefined on
the given data (precision of a class never predicted, recall of a class absent
from the split, AUC when only one class is present) is ``None`` together with a
reason string, never NaN.

Good vs defect: an image is *good* iff ``P(good) >= threshold``. Two rates
describe that decision, each in [0, 1]:

* **escape rate**: share of defective images passed as good (missed defects);
* **false-reject rate**: share of good images rejected as defective.

Example:
    >>> import numpy as np
    >>> probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    >>> per_class_metrics(confusion_matrix([0, 1, 1], probs.argmax(1), 2), ["good", "dent"])[1]["recall"]
    0.5
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from vision_tl.deploy.metadata import REJECT_ALL

THRESHOLD_TARGETS = ("false_reject", "escape")


class ThresholdError(ValueError):
    """A threshold target that cannot be parsed or met on the given data."""


def _ratio(num: float, den: float) -> float | None:
    return float(num) / float(den) if den else None


def confusion_matrix(y_true: Sequence[int], y_pred: Sequence[int], num_classes: int) -> np.ndarray:
    """Counts ``[true, predicted]`` as an ``int64`` array of shape ``(C, C)``."""
    y_true, y_pred = np.asarray(y_true, np.int64), np.asarray(y_pred, np.int64)
    for name, y in (("y_true", y_true), ("y_pred", y_pred)):
        if y.size and (y.min() < 0 or y.max() >= num_classes):
            raise ValueError(f"{name} holds labels outside 0..{num_classes - 1}: {sorted(set(y.tolist()))}")
    matrix = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(matrix, (y_true, y_pred), 1)
    return matrix


def wilson_interval(successes: int, n: int, z: float = 1.96) -> list[float] | None:
    """The 95 % (``z`` 1.96) Wilson score interval ``[low, high]`` of the share ``successes / n``;
    None where ``n`` is 0. A rare class's recall of 1 of 1 is anywhere from 0.21 to 1, and no
    escapes among 9 defective images still allows up to 30 %: the interval says so next to it."""
    if n <= 0:
        return None
    share, z2 = successes / n, z * z
    centre = (share + z2 / (2 * n)) / (1 + z2 / n)
    half = z * np.sqrt(share * (1 - share) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return [float(max(0.0, centre - half)), float(min(1.0, centre + half))]


def per_class_metrics(matrix: np.ndarray, classes: Sequence[str]) -> list[dict]:
    """Precision, recall (with its 95 % Wilson interval), F1, support and predicted count per class.

    F1 is ``2 TP / (2 TP + FP + FN)``: 0 when the class is missed or only
    wrongly predicted, undefined only when the class neither occurs nor is predicted.
    Undefined values are ``None``; ``undefined`` maps each to its reason.
    """
    matrix = np.asarray(matrix)
    rows = []
    for k, name in enumerate(classes):
        tp = int(matrix[k, k])
        support, predicted = int(matrix[k].sum()), int(matrix[:, k].sum())
        fp, fn = predicted - tp, support - tp
        undefined = {}
        precision = _ratio(tp, predicted)
        if precision is None:
            undefined["precision"] = "class never predicted"
        recall = _ratio(tp, support)
        if recall is None:
            undefined["recall"] = "class absent from these images"
        f1 = _ratio(2 * tp, 2 * tp + fp + fn)
        if f1 is None:
            undefined["f1"] = "class neither present nor predicted"
        rows.append({"class": name, "precision": precision, "recall": recall,
                     "recall_interval": wilson_interval(tp, support), "f1": f1,
                     "support": support, "predicted": predicted, "undefined": undefined})
    return rows


def _mean_defined(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return float(np.mean(kept)) if kept else None


def summary_metrics(matrix: np.ndarray, per_class: list[dict]) -> dict:
    """Accuracy, balanced accuracy (mean recall of present classes) and macro F1."""
    total = int(np.asarray(matrix).sum())
    absent = [r["class"] for r in per_class if r["recall"] is None]
    out = {
        "images": total,
        "acc": _ratio(np.trace(matrix), total),
        "balanced_acc": _mean_defined([r["recall"] for r in per_class]),
        "f1_macro": _mean_defined([r["f1"] for r in per_class]),
        "notes": [],
    }
    if absent:
        out["notes"].append(f"balanced_acc averages the classes present only; absent: {', '.join(absent)}")
    return out


def binary_roc(scores: np.ndarray, positive: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC curve ``(fpr, tpr, thresholds)``, starting at (0, 0); both classes must be present."""
    order = np.argsort(-np.asarray(scores, np.float64), kind="mergesort")
    s, y = np.asarray(scores, np.float64)[order], np.asarray(positive, bool)[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # last index of each distinct score
    tps, fps = np.cumsum(y)[last], np.cumsum(~y)[last]
    fpr = np.r_[0.0, fps / max(1, fps[-1])]
    tpr = np.r_[0.0, tps / max(1, tps[-1])]
    return fpr, tpr, np.r_[np.inf, s[last]]


def binary_pr(scores: np.ndarray, positive: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Precision-recall curve ``(precision, recall, average_precision)``; recall starts at 0."""
    order = np.argsort(-np.asarray(scores, np.float64), kind="mergesort")
    s, y = np.asarray(scores, np.float64)[order], np.asarray(positive, bool)[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]
    tps, fps = np.cumsum(y)[last], np.cumsum(~y)[last]
    precision, recall = tps / (tps + fps), tps / max(1, tps[-1])
    # step-wise, as in sklearn, but over the hit counts and divided once: the steps of recall
    # (k / n) summed to 0.9999999999999999 for a class ranked perfectly, which the report shows as >0.999
    ap = float(np.sum(np.diff(np.r_[0, tps]) * precision) / max(1, tps[-1]))
    return np.r_[1.0, precision], np.r_[0.0, recall], ap


def one_vs_rest_curves(probs: np.ndarray, labels: np.ndarray, classes: Sequence[str]) -> list[dict]:
    """Per class: ROC and PR curves with ROC AUC and average precision (or None + reason)."""
    out = []
    for k, name in enumerate(classes):
        positive = labels == k
        n_pos, n_neg = int(positive.sum()), int((~positive).sum())
        entry = {"class": name, "positives": n_pos, "negatives": n_neg, "roc_auc": None,
                 "average_precision": None, "undefined": {}}
        if n_pos == 0 or n_neg == 0:
            why = "class absent from these images" if n_pos == 0 else "no images of other classes"
            entry["undefined"] = {"roc_auc": why, "average_precision": why}
            out.append(entry)
            continue
        fpr, tpr, _ = binary_roc(probs[:, k], positive)
        precision, recall, ap = binary_pr(probs[:, k], positive)
        # trapezoids over the counts (integers, exact), divided once: summed over the rates
        # (k / n) a perfect ranking came to 0.9999999999999999, shown as >0.999 instead of 1.000
        fps, tps = np.rint(fpr * n_neg), np.rint(tpr * n_pos)
        auc = float(np.sum(np.diff(fps) * (tps[1:] + tps[:-1])) / (2 * n_pos * n_neg))
        entry.update(roc_auc=auc, average_precision=ap,
                     roc={"fpr": fpr.tolist(), "tpr": tpr.tolist()},
                     pr={"precision": precision.tolist(), "recall": recall.tolist()})
        out.append(entry)
    return out


def calibration(probs: np.ndarray, labels: np.ndarray, bins: int = 10) -> dict:
    """Expected calibration error of the top-1 confidence, with equal-width reliability bins."""
    if bins < 1:
        raise ValueError(f"bins must be at least 1, got {bins}")
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    rows, ece = [], 0.0
    for b in range(bins):
        members = which == b
        n = int(members.sum())
        conf = float(confidence[members].mean()) if n else None
        acc = float(correct[members].mean()) if n else None
        if n:
            ece += n / len(labels) * abs(acc - conf)
        rows.append({"lo": float(edges[b]), "hi": float(edges[b + 1]), "count": n,
                     "confidence": conf, "accuracy": acc})
    if not len(labels):
        return {"ece": None, "bins": rows, "undefined": {"ece": "no images"}}
    return {"ece": float(ece), "bins": rows, "undefined": {}}


# ---------------------------------------------------------------- good vs defect


@dataclass(frozen=True)
class ThresholdTarget:
    """What the good/defect threshold must meet on validation.

    ``false_reject``: at most this share of good images rejected (fewest escapes under that);
    ``escape``: at most this share of defective images passed (fewest false rejects under that).
    """

    kind: str
    rate: float

    def __str__(self) -> str:
        return f"{self.kind}:{self.rate:g}"


def parse_threshold_target(text: str | ThresholdTarget) -> ThresholdTarget:
    """``"false_reject:0.01"`` or ``"escape:0.005"`` -> :class:`ThresholdTarget`."""
    if isinstance(text, ThresholdTarget):
        return text
    kind, sep, value = str(text).partition(":")
    kind = kind.strip().replace("-", "_")
    if not sep or kind not in THRESHOLD_TARGETS:
        raise ThresholdError(
            f"bad threshold target {text!r}; expected KIND:RATE with KIND one of "
            f"{', '.join(THRESHOLD_TARGETS)}, e.g. 'false_reject:0.01' or 'escape:0.005'")
    try:
        rate = float(value)
    except ValueError:
        raise ThresholdError(f"bad rate {value!r} in threshold target {text!r}; expected a number in [0, 1)") from None
    if not 0.0 <= rate < 1.0:
        raise ThresholdError(f"rate in threshold target {text!r} must be in [0, 1), got {rate}")
    return ThresholdTarget(kind, rate)


def good_defect_rates(p_good: np.ndarray, is_good: np.ndarray, threshold: float) -> dict:
    """Escape and false-reject rates (with counts) when good iff ``p_good >= threshold``."""
    p_good, is_good = np.asarray(p_good, np.float64), np.asarray(is_good, bool)
    passed = p_good >= threshold
    n_good, n_defect = int(is_good.sum()), int((~is_good).sum())
    escapes, rejects = int((passed & ~is_good).sum()), int((~passed & is_good).sum())
    out = {"threshold": float(threshold), "good_images": n_good, "defect_images": n_defect,
           "escapes": escapes, "false_rejects": rejects,
           "escape_rate": _ratio(escapes, n_defect), "false_reject_rate": _ratio(rejects, n_good),
           "escape_rate_interval": wilson_interval(escapes, n_defect),
           "false_reject_rate_interval": wilson_interval(rejects, n_good), "undefined": {}}
    if n_defect == 0:
        out["undefined"]["escape_rate"] = "no defective images"
    if n_good == 0:
        out["undefined"]["false_reject_rate"] = "no good images"
    return out


def select_threshold(p_good: np.ndarray, is_good: np.ndarray, target: str | ThresholdTarget) -> dict:
    """The threshold on ``P(good)`` that meets ``target`` on these images, and its rates.

    ``false_reject:R`` rejects at most ``R`` of the good images with the fewest defects
    escaping, and then the fewest good images rejected; ``escape:E`` passes at most ``E`` of
    the defective images with the fewest good images rejected, and then the fewest defects
    escaping. (Without the second rule a target spends its whole allowance even where the
    classes separate cleanly: ``false_reject:0.3`` would reject 3 of 11 good images that a
    lower threshold passes with no more escapes.) The threshold is placed midway between the
    two observed scores around it (same counts, a margin on both sides), so no image sits on it:
    ONNX Runtime's probabilities differ from PyTorch's in the 7th decimal.

    Raises:
        ThresholdError: the target is malformed, or the images lack the class it is about.
    """
    target = parse_threshold_target(target)
    flags = np.asarray(is_good)
    if flags.dtype != bool and not np.isin(flags, (0, 1)).all():  # ("good"/"scratch" all read as True)
        raise ThresholdError(f"is_good must be True/False (or 1/0) per image, got values such as {flags.flat[0]!r}; "
                             "pass labels == good_index")
    p_good, is_good = np.asarray(p_good, np.float64), flags.astype(bool)
    if p_good.shape != is_good.shape or p_good.ndim != 1:
        raise ThresholdError(f"p_good and is_good must be 1-D and of one length, got shapes {p_good.shape} and "
                             f"{is_good.shape}")
    if not np.isfinite(p_good).all():
        raise ThresholdError("p_good holds NaN or infinite values: no threshold can be placed among them")
    good, defect = p_good[is_good], p_good[~is_good]
    if target.kind == "false_reject":
        if not good.size:
            raise ThresholdError("cannot meet a false-reject target: no good images in this split")
        if not defect.size:  # any threshold meets it; the escapes it should keep few are not seen
            raise ThresholdError("cannot choose a threshold for a false-reject target: no defective images in "
                                 "this split, so the escapes it would let through cannot be counted")
        last_kept = np.sort(good)[int(np.floor(target.rate * good.size + 1e-9))]  # at most R below it
        # The fewest escapes: every defect scored from last_kept up passes, the rest are blocked.
        # Then the fewest rejects: go down to just above the highest of the blocked defects.
        blocked = defect[defect < last_kept]
        threshold = _midway_above(p_good, blocked.max()) if blocked.size else _below_all(p_good)
    else:
        if not defect.size:
            raise ThresholdError("cannot meet an escape target: no defective images in this split")
        first_blocked = np.sort(defect)[::-1][int(np.floor(target.rate * defect.size + 1e-9))]
        # The fewest rejects: every good image scored above first_blocked passes. Then the fewest
        # escapes: go up to just below the lowest of those good images.
        kept = good[good > first_blocked]
        threshold = _midway_below(p_good, kept.min()) if kept.size else _above_all(p_good)
    return {"target": str(target), **good_defect_rates(p_good, is_good, threshold)}


def _midway_above(scores: np.ndarray, low: float) -> float:
    """Midway between ``low`` (blocked) and the next observed score above it (which passes)."""
    above = scores[scores > low]
    return float((low + above.min()) / 2) if above.size else _above_all(scores)


def _midway_below(scores: np.ndarray, high: float) -> float:
    """Midway between the observed score below ``high`` (blocked) and ``high`` (which passes)."""
    below = scores[scores < high]
    return float((below.max() + high) / 2) if below.size else _below_all(scores)


# ONNX Runtime's probabilities differ from PyTorch's in the 7th decimal: a threshold beyond the
# highest score keeps more than this from it, or the exported model could pass that image
_EDGE_MARGIN = 1e-5


def _below_all(scores: np.ndarray) -> float:
    """Every image passes: midway between 0 and the lowest score (0 if that is 0: a probability
    of 0 passes a threshold of 0), not one float step below it, which rounding would cross."""
    return float(scores.min()) / 2


def _above_all(scores: np.ndarray) -> float:
    """Every image is rejected: midway between the highest score and 1, or where that is within
    rounding of 1 (a float32 softmax gives exactly 1.0), one step of a double above 1, which no
    probability reaches; exported models accept that value."""
    high = float(scores.max())
    return (high + 1.0) / 2 if high < 1.0 - 2 * _EDGE_MARGIN else REJECT_ALL


def threshold_sweep(p_good: np.ndarray, is_good: np.ndarray, points: int = 201,
                    threshold: float | None = None, max_scores: int = 2000) -> dict:
    """Escape and false-reject rates over thresholds in [0, 1] (for the trade-off plots): an even
    grid, the observed scores (where the rates change: an operating point between two close
    scores is on the curve; beyond ``max_scores`` of them, that many spread over their range) and
    ``threshold``, whose rates are then the reported ones exactly. O(n log n) in the images."""
    p_good, is_good = np.asarray(p_good, np.float64), np.asarray(is_good, bool)
    scores = np.unique(p_good[(p_good >= 0) & (p_good <= 1)])
    if len(scores) > max_scores:
        scores = scores[np.linspace(0, len(scores) - 1, max_scores).round().astype(int)]
    extra = [threshold] if threshold is not None else []
    grid = np.unique(np.concatenate([np.linspace(0.0, 1.0, points), scores, extra]))
    good, defect = np.sort(p_good[is_good]), np.sort(p_good[~is_good])
    n_good, n_defect = len(good), len(defect)
    # good iff p >= t: defects passed are those >= t, good rejected those < t
    escape = (n_defect - np.searchsorted(defect, grid, "left")) / n_defect if n_defect else None
    reject = np.searchsorted(good, grid, "left") / n_good if n_good else None
    return {"threshold": grid.tolist(),
            "escape_rate": None if escape is None else escape.tolist(),
            "false_reject_rate": None if reject is None else reject.tolist()}


def evaluate(probs: np.ndarray, labels: np.ndarray, classes: Sequence[str], *,
             good_class: str | None = None, threshold: float | None = None, bins: int = 10) -> dict:
    """Every metric of a report, JSON-ready (curves included).

    Args:
        probs: ``[N, C]`` class probabilities.
        labels: ``[N]`` true class indices.
        classes: class names in index order.
        good_class: the defect-free class; adds the ``good_vs_defect`` section.
        threshold: threshold on ``P(good)``; without it, the argmax decision is reported.
        bins: reliability-diagram bins.
    """
    probs, labels = np.asarray(probs, np.float64), np.asarray(labels, np.int64)
    if probs.ndim != 2 or probs.shape != (len(labels), len(classes)):
        raise ValueError(f"probabilities must be [N={len(labels)}, C={len(classes)}], got {list(probs.shape)}")
    if not np.isfinite(probs).all():  # (argmax reads a NaN row as class 0; every metric would be NaN or wrong)
        rows = np.flatnonzero(~np.isfinite(probs).all(1))
        raise ValueError(f"probabilities of {len(rows)} image(s) are NaN or infinite (first: row {rows[0]}); a model "
                         "that outputs them diverged or is damaged, so nothing can be measured from it")
    if len(labels) and (labels.min() < 0 or labels.max() >= len(classes)):
        raise ValueError(f"labels must be class indices 0..{len(classes) - 1}, got {labels.min()}..{labels.max()}")
    matrix = confusion_matrix(labels, probs.argmax(1), len(classes))
    per_class = per_class_metrics(matrix, classes)
    curves = one_vs_rest_curves(probs, labels, classes)
    for row, curve in zip(per_class, curves):
        row.update(roc_auc=curve["roc_auc"], average_precision=curve["average_precision"])
        row["undefined"].update(curve["undefined"])
    result = {"summary": summary_metrics(matrix, per_class), "per_class": per_class,
              "confusion_matrix": matrix.tolist(), "curves": curves, "calibration": calibration(probs, labels, bins)}
    result["summary"].update(roc_auc_macro=_mean_defined([c["roc_auc"] for c in curves]),
                             ece=result["calibration"]["ece"])
    if good_class is not None:
        result["good_vs_defect"] = good_vs_defect(probs, labels, classes, good_class, threshold)
    return result


def good_vs_defect(probs: np.ndarray, labels: np.ndarray, classes: Sequence[str], good_class: str,
                   threshold: float | None) -> dict:
    """Escape/false-reject rates at ``threshold`` (or of the argmax decision), plus the sweep."""
    if good_class not in classes:
        raise ValueError(f"good_class {good_class!r} is not a class; classes are {list(classes)}")
    k = list(classes).index(good_class)
    p_good, is_good = probs[:, k], labels == k
    if threshold is None:
        passed = probs.argmax(1) == k
        rates = good_defect_rates(passed.astype(float), is_good, 0.5)
        rates.update(threshold=None, decision="argmax (no threshold set)")
    else:
        rates = {**good_defect_rates(p_good, is_good, threshold), "decision": f"P({good_class}) >= threshold"}
    return {"good_class": good_class, **rates, "sweep": threshold_sweep(p_good, is_good, threshold=threshold)}
