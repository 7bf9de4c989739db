"""``vision-tl report``: evaluate a run's checkpoint and write an HTML report.

The pieces, usable from Python:

* :func:`write_report` turns probabilities and labels into ``predictions.csv``,
  PNG figures, ``report.html`` and a ``report`` section in ``metrics.json``;
* :func:`report_run` does it for a run directory: it loads
  ``checkpoints/best.ckpt``, rebuilds the validation (or test) images from
  ``split.json`` / the data root, predicts them on CPU with the evaluation
  transform, optionally chooses the good/defect threshold and saves it into a
  copy of the checkpoint.

Example:
    >>> from vision_tl.reports.report import report_run
    >>> result = report_run("runs/partial/version_0", target="false_reject:0.01")  # doctest: +SKIP
    >>> result.html  # doctest: +SKIP
    PosixPath('runs/partial/version_0/report.html')
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from vision_tl.deploy.predictor import prediction_columns, probability_text
from vision_tl.reports import metrics as M
from vision_tl.utils import DamagedMetricsError, progress_bar, read_run_config, read_run_metrics
from vision_tl.utils.files import (
    already_there,
    atomic_write_text,
    path_lock,
    path_text,
    refuse_empty_path,
    unwritable,
)

SPLITS = ("val", "test")


class ReportError(ValueError):
    """A run directory, split or option the report cannot use; the message says what to fix."""


@dataclass
class ReportResult:
    """What a report wrote, and its metrics (JSON-ready)."""

    html: Path
    predictions: Path
    figures: dict[str, Path]
    metrics: dict
    threshold: dict | None = None
    checkpoint: Path | None = None
    notes: list[str] = field(default_factory=list)


# the figures a report draws besides the confusion matrix (``<name>_<split>.png``)
REPORT_FIGURES = ("per_class", "roc_pr", "reliability", "threshold", "operating_curve", "error_gallery")


def output_name(stem: str, split: str, suffix: str) -> str:
    """``report.html`` / ``predictions.csv`` for val, ``report_test.html`` etc. otherwise."""
    return f"{stem}{suffix}" if split == "val" else f"{stem}_{split}{suffix}"


def _predictions_csv(probs: np.ndarray, labels: np.ndarray, classes: list[str], paths: list[str] | None,
                     good_class: str | None, threshold: float | None) -> str:
    """The report's predictions.csv. ``is_defect`` follows the rule the report's escape and
    false-reject counts use: ``P(good) < threshold``, or without a threshold the most probable
    class not being the good one (it was left empty, while the report counted escapes by argmax);
    empty without a good class."""
    out = io.StringIO()
    writer = csv.writer(out)
    good = None if good_class is None else classes.index(good_class)
    writer.writerow(prediction_columns(classes, error=False))
    for i, (p, y) in enumerate(zip(probs, labels)):
        k = int(p.argmax())
        defect = ("" if good is None else str(bool(k != good if threshold is None else p[good] < threshold)).lower())
        writer.writerow([path_text(paths[i]) if paths else "", classes[y], classes[k], probability_text(p[k]),
                         *map(probability_text, p), defect])
    return out.getvalue()


def _figures(result: dict, probs: np.ndarray, labels: np.ndarray, classes: list[str], out_dir: Path,
             split: str) -> dict[str, Path]:
    from vision_tl.reports import plots

    figures = {
        "confusion_matrix": plots.plot_confusion_matrix(
            result["confusion_matrix"], classes, out_dir / f"confusion_matrix_{split}.png", title=split),
        "per_class": plots.plot_per_class(result["per_class"], out_dir / f"per_class_{split}.png",
                                          title=f"{split}: precision, recall, F1 per class"),
        "roc_pr": plots.plot_roc_pr(result["curves"], out_dir / f"roc_pr_{split}.png", title=split),
        "reliability": plots.plot_reliability(result["calibration"], out_dir / f"reliability_{split}.png",
                                              title=f"{split}: calibration"),
    }
    gvd = result.get("good_vs_defect")
    if gvd is not None:
        k = classes.index(gvd["good_class"])
        figures["threshold"] = plots.plot_threshold(
            probs[:, k], labels == k, gvd["sweep"], out_dir / f"threshold_{split}.png",
            threshold=gvd["threshold"], good_class=gvd["good_class"])
        figures["operating_curve"] = plots.plot_operating_curve(
            gvd["sweep"], out_dir / f"operating_curve_{split}.png", threshold=gvd["threshold"],
            good_class=gvd["good_class"], title=f"{split}: operating curve")
    return figures


def _training_curves(out_dir: Path) -> Path | None:
    """The run's training curves, drawn again from its history (metrics.json, metrics.csv) as it
    is now; None where ``out_dir`` holds no history. A figure that fails warns and is left out:
    the evaluation does not depend on it."""
    from vision_tl.reports.training import TRAINING_CURVES, write_training_curves

    try:
        return write_training_curves(out_dir, out_dir / TRAINING_CURVES)
    except Exception as exc:  # noqa: BLE001 - the report stands without the training picture
        warnings.warn(f"the report leaves out the training curves: {type(exc).__name__}: {exc}", stacklevel=2)
        return None


def _compact(result: dict) -> dict:
    """The report's metrics without curves and sweeps (those are in the figures)."""
    out = {k: v for k, v in result.items() if k not in ("curves", "good_vs_defect")}
    out["calibration"] = {k: v for k, v in result["calibration"].items()}
    if "good_vs_defect" in result:
        out["good_vs_defect"] = {k: v for k, v in result["good_vs_defect"].items() if k != "sweep"}
    return out


def _update_metrics_json(out_dir: Path, split: str, compact: dict, figures: dict[str, Path], extra: dict) -> None:
    """Add this report to ``metrics.json``, atomically; its other keys are kept as they are. Read
    again here, under the lock its writers share: a fit training the run, or a report of the
    other split, may have written it since this report began."""
    with path_lock(out_dir / "metrics.json"):
        data = _read_metrics_json(out_dir)
        data.setdefault("report", {})[split] = {**compact, **extra}
        data.setdefault("figures", {}).update({f"{name}_{split}": p.name for name, p in figures.items()})
        data["figures"][f"report_{split}"] = output_name("report", split, ".html")
        atomic_write_text(out_dir / "metrics.json", json.dumps(data, indent=1, allow_nan=False))


def _read_metrics_json(out_dir: Path) -> dict:
    """The run's ``metrics.json`` ({} without one). A damaged one stops the report before it writes
    anything: the report adds its section to that file, and replacing it would lose the fit's
    history it may still hold."""
    try:
        data = read_run_metrics(out_dir / "metrics.json", on_damage="raise")
        for name in ("report", "figures"):  # the sections a report adds to
            if not isinstance(data.get(name, {}), dict):
                raise DamagedMetricsError(out_dir / "metrics.json", f"damaged: its {name!r} entry is a JSON "
                                          f"{type(data[name]).__name__}, not an object")
        return data
    except DamagedMetricsError as exc:
        raise ReportError(
            f"{exc}; the report adds its section to that file, so nothing was written. Repair it (its training "
            f"history, best epoch and scores are written by vision-tl fit), or move it aside (e.g. to "
            f"{exc.path.with_name('metrics.damaged.json')}) and run the report again: it then writes a new "
            "metrics.json with the report's section only") from exc


def write_report(out_dir: str | Path, probs: np.ndarray, labels: np.ndarray, classes: list[str], *,
                 paths: list[str] | None = None, good_class: str | None = None,
                 threshold: float | None = None, split: str = "val", info: dict | None = None,
                 threshold_choice: dict | None = None, images_split: str | None = None) -> ReportResult:
    """Write predictions, figures, ``metrics.json`` (``report`` section) and the HTML report.

    Args:
        out_dir: the run directory (must exist).
        probs: ``[N, C]`` probabilities; ``labels``: ``[N]`` true class indices.
        classes: class names in index order.
        paths: image paths, one per row (optional; shown in the CSV and the error table).
        good_class: the defect-free class (adds escape / false-reject rates).
        threshold: threshold on ``P(good)``; ``None`` reports the argmax decision.
        split: ``val`` or ``test``; names the outputs.
        info: header facts for the HTML (checkpoint, backbone ...).
        threshold_choice: how ``threshold`` was chosen (shown and stored).
        images_split: the split the images are of, where it is not ``split`` (``vision-tl test``
            of a folder without ``test/`` evaluates the val images): the report's heading says it.
    """
    from vision_tl.reports.html import render_report

    out_dir = Path(out_dir)
    probs, labels = np.asarray(probs, np.float64), np.asarray(labels, np.int64)
    if not len(labels):
        raise ReportError(f"no images to report on in the {split} split")
    bad = np.flatnonzero(~np.isfinite(probs).all(axis=1)) if probs.ndim == 2 else []
    if len(bad):
        names = ", ".join(str(paths[i]) if paths else f"row {i}" for i in bad[:5])
        raise ReportError(f"the model gave non-finite probabilities (NaN or inf) for {len(bad)} image(s): {names}; "
                          "its weights have diverged (train again, with a lower learning rate)")
    _read_metrics_json(out_dir)  # checked before anything is written
    result = M.evaluate(probs, labels, classes, good_class=good_class, threshold=threshold)
    predictions = out_dir / output_name("predictions", split, ".csv")
    atomic_write_text(predictions, _predictions_csv(probs, labels, classes, paths, good_class, threshold))
    figures = _figures(result, probs, labels, classes, out_dir, split)
    errors = _worst_errors(probs, labels, classes, paths)
    if paths:
        from vision_tl.reports.plots import plot_error_gallery

        figures["error_gallery"] = plot_error_gallery(errors, out_dir / f"error_gallery_{split}.png")
    training = _training_curves(out_dir)
    if training is not None:
        figures["training_curves"] = training
    extra = {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
             "threshold_choice": threshold_choice, "predictions": predictions.name,
             "checkpoint": (info or {}).get("checkpoint"),  # which one was evaluated (compare says so)
             "checkpoint_epoch": (info or {}).get("checkpoint epoch"),  # its epoch: a later resume changes it
             **({"images_split": images_split} if images_split else {})}  # (compare says so)
    _update_metrics_json(out_dir, split, _compact(result), figures, extra)
    html = out_dir / output_name("report", split, ".html")
    atomic_write_text(html, render_report(result, figures, split=images_split or split, info=info or {},
                                          errors=errors, threshold_choice=threshold_choice))
    return ReportResult(html=html, predictions=predictions, figures=figures, metrics=_compact(result),
                        threshold=threshold_choice)


def _worst_errors(probs: np.ndarray, labels: np.ndarray, classes: list[str], paths: list[str] | None,
                  limit: int = 12) -> list[dict]:
    """The most confident mistakes first."""
    predicted = probs.argmax(1)
    wrong = np.flatnonzero(predicted != labels)
    wrong = wrong[np.argsort(-probs[wrong, predicted[wrong]], kind="mergesort")][:limit]
    return [{"path": paths[i] if paths else None, "true": classes[labels[i]], "predicted": classes[predicted[i]],
             "probability": float(probs[i, predicted[i]]),
             "p_true": float(probs[i, labels[i]])} for i in wrong]


# ------------------------------------------------------------------ run directories


def config_data_root(run_dir: Path) -> Path | None:
    """The ``data.root`` in a run's ``config.yaml`` (None without one)."""
    root = (read_run_config(run_dir).get("data") or {}).get("root")
    return Path(root).expanduser() if root else None


def split_images(run_dir: Path, classes: list[str], split: str = "val",
                 data_root: str | Path | None = None) -> tuple[list[Path], list[int], list[str]]:
    """Image paths and labels of a run's ``val`` or ``test`` split, and notes about them.

    ``val`` comes from ``split.json`` when the run made its own split, otherwise from
    ``<root>/val/``; ``test`` from ``<root>/test/``. ``data_root`` overrides the root
    recorded in the run (for data that moved).

    Raises:
        ReportError: images listed in ``split.json`` are missing or their content (sha256)
            changed since training, a split folder has a class folder the model does not
            know, or the split is not there; nothing is skipped silently.
    """
    from vision_tl.data.folder import DatasetError, foreign_class_folders, read_split, scan_folder

    if split not in SPLITS:
        raise ReportError(f"unknown split {split!r}; expected one of: {', '.join(SPLITS)}")
    record_path = run_dir / "split.json"
    try:
        record = read_split(record_path) if record_path.is_file() else None
    except DatasetError as exc:
        raise ReportError(str(exc)) from exc
    root = Path(data_root).expanduser() if data_root else (
        Path(record["root"]) if record else config_data_root(run_dir))
    if record is not None and Path(record["root"]).name == "train":
        # ROOT had train/ (and test/) but no val/: train/ is what was split, so the recorded
        # paths start there, and test/ sits beside it under the folder fit was given
        given = root if data_root else (config_data_root(run_dir) or root.parent)
        first = (record.get("val") or [{"path": ""}])[0]["path"]
        if split == "val" and (given / "train").is_dir() and not (first and (given / first).exists()):
            root = given / "train"
        elif split == "test" and not (root / "test").is_dir() and (root.parent / "test").is_dir():
            root = root.parent
    if root is None or not root.is_dir():
        raise ReportError(f"data root {root} of run {run_dir} not found; pass --data ROOT "
                          "(the folder given to fit as --data.root)")
    if split == "val" and record is not None and record.get("val"):
        return _recorded_val(record, record_path, root, classes)
    folder = root / split
    if not folder.is_dir():
        raise ReportError(_no_split_folder(root, split, recorded_val=bool(record and record.get("val"))))
    try:
        unknown = foreign_class_folders(folder, classes)  # accents encoded either way name one class
    except DatasetError as exc:
        raise ReportError(str(exc)) from exc
    if unknown:
        raise ReportError(f"{folder} has class folder(s) {', '.join(unknown)} that the model does not know "
                          f"(its classes: {', '.join(classes)}); move them out of {folder} or pass --data ROOT "
                          "whose split folders hold only the model's classes")
    skip = _run_skips_bad_images(run_dir)  # as the run was trained: its test/ and validate did the same
    # a held-out split may lack a rare class, as in fit
    index = scan_folder(folder, classes, skip_bad=skip, partial=True)
    if not index.samples:
        raise ReportError(f"{folder} holds no images of the model's classes ({', '.join(classes)})")
    absent = index.absent_classes()
    notes = [f"{split}/ has no images of {', '.join(absent)}: their recall is not measured"] if absent else []
    if index.bad_files:
        notes.append(f"{len(index.bad_files)} unreadable image(s) of {split}/ left out (the run's skip_bad_images), "
                     f"e.g. {index.bad_files[0][0]}")
    return [s.path for s in index.samples], [s.label for s in index.samples], notes


def _run_skips_bad_images(run_dir: Path) -> bool:
    try:
        return bool(((read_run_config(run_dir) or {}).get("data") or {}).get("skip_bad_images"))
    except (OSError, ValueError):
        return False


def _recorded_val(record: dict, record_path: Path, root: Path,
                  classes: list[str]) -> tuple[list[Path], list[int], list[str]]:
    """The ``val`` images listed in ``split.json``, refused unless they are the ones trained with."""
    from vision_tl.data.folder import recorded_mismatches

    unknown = sorted({item["label"] for item in record["val"]} - set(classes))
    if unknown:
        raise ReportError(f"{record_path} lists validation images of class(es) {', '.join(unknown)} that the "
                          f"checkpoint does not know (its classes: {', '.join(classes)}); use the run's own "
                          "checkpoint")
    missing, changed = recorded_mismatches(root, record["val"])
    paths = [root / item["path"] for item in record["val"]]
    if missing:
        raise ReportError(f"{len(missing)} validation image(s) listed in {record_path} are missing under "
                          f"{root}, e.g. {missing[0]}; pass --data ROOT if the data moved")
    if changed:
        raise ReportError(f"{len(changed)} of {len(paths)} validation image(s) under {root} differ from the ones "
                          f"recorded in {record_path} (sha256), e.g. {changed[0]}: these are not the images the "
                          "run was validated on; pass --data ROOT pointing at the run's images")
    return paths, [classes.index(item["label"]) for item in record["val"]], []


def _no_split_folder(root: Path, split: str, recorded_val: bool) -> str:
    """Why ``root/split`` cannot be evaluated, listing what ``root`` does hold."""
    entries = sorted(p for p in root.iterdir() if not p.name.startswith("."))
    shown = ", ".join(p.name + ("/" if p.is_dir() else "") for p in entries[:10])
    held = (f"it holds {shown}" + (f" and {len(entries) - 10} more" if len(entries) > 10 else "")
            if entries else "it is empty")
    if split == "test" and (recorded_val or (root / "val").is_dir()):
        return f"{root} has no test/ folder ({held}); report on the val split (drop --split test)"
    return f"{root} has no {split}/ folder ({held}); pass --data ROOT, the folder that holds {split}/"


def predict_probabilities(model, paths: list[Path], batch_size: int = 32) -> np.ndarray:
    """``[N, C]`` probabilities of ``model`` (an ImageClassifier) on CPU, evaluation transform."""
    import torch

    from vision_tl.data.transforms import eval_transform
    from vision_tl.imaging import load_rgb

    transform = eval_transform(model.preprocessing)
    model = model.to("cpu").eval()
    chunks = []
    starts = range(0, len(paths), batch_size)
    bar = progress_bar(total=len(paths), desc="predicting", unit="img", disable=len(starts) < 2)
    with torch.inference_mode(), bar:
        for start in starts:
            batch = torch.stack([transform(load_rgb(p)) for p in paths[start:start + batch_size]])
            chunks.append(model(batch).float().softmax(-1).numpy())
            bar.update(len(batch))
    return np.concatenate(chunks) if chunks else np.zeros((0, len(model.classes)))


def thresholded_path(checkpoint: str | Path) -> Path:
    """Where :func:`save_threshold` writes a copy: ``best.ckpt`` -> ``best.thresholded.ckpt``."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(f"{checkpoint.stem}.thresholded.ckpt")


def save_threshold(checkpoint: str | Path, choice: dict, in_place: bool = False, overwrite: bool = True) -> Path:
    """Store ``choice["threshold"]`` in the checkpoint's ``vision_tl`` section.

    Writes ``<name>.thresholded.ckpt`` beside the original, or with ``in_place`` rewrites
    the original atomically. Only plain types are added, so ``weights_only=True`` still loads it.

    Raises:
        FileExistsError: ``overwrite`` is False and the copy exists (another process wrote it
            since the caller checked).
    """


    with _threshold_saved(checkpoint, choice, in_place, overwrite) as target:
        return target


@contextlib.contextmanager
def _threshold_saved(checkpoint: str | Path, choice: dict, in_place: bool, overwrite: bool) -> Iterator[Path]:
    """:func:`save_threshold` around the caller's block: the checkpoint is written (beside its
    final name) before the block, and takes its name only once the block has succeeded."""
    import torch

    from vision_tl.tasks.checkpoint import read_checkpoint
    from vision_tl.utils.files import atomic_path

    checkpoint = Path(checkpoint)
    ckpt = read_checkpoint(checkpoint)
    meta = ckpt["vision_tl"]
    meta["threshold"] = float(choice["threshold"])
    meta["threshold_choice"] = {k: v for k, v in choice.items() if isinstance(v, (str, int, float, type(None)))}
    # The validation figures fit stored (and export copies into the ONNX metadata) describe
    # fit's threshold: they now describe this one, or leave it out where the choice lacks them.
    if choice.get("target") is not None:
        meta["threshold_target"] = str(choice["target"])
    val = (meta.get("metrics") or {}).get("val")
    if isinstance(val, dict):
        val["threshold"] = meta["threshold"]
        for key in ("escape_rate", "false_reject_rate"):
            val.pop(key, None)
            if key in choice:
                val[key] = choice[key]
    target = checkpoint if in_place else thresholded_path(checkpoint)
    with atomic_path(target, overwrite=overwrite or in_place) as tmp:
        torch.save(ckpt, tmp)
        yield target


def _run_checkpoint(run_dir: Path, checkpoint: str | Path | None) -> Path:
    path = Path(checkpoint).expanduser() if checkpoint else run_dir / "checkpoints" / "best.ckpt"
    if not path.is_file():
        found = sorted(p.name for p in (run_dir / "checkpoints").glob("*.ckpt")) if (run_dir / "checkpoints").is_dir() else []
        if found:
            named = path.name if checkpoint and path.name in found else found[0]
            raise ReportError(f"checkpoint {path} not found; the run has: {', '.join(found)} (pick one by its path, "
                              f"e.g. --checkpoint {run_dir / 'checkpoints' / named})")
        evaluated = _evaluated_checkpoint(run_dir)
        if checkpoint is None and evaluated:
            raise ReportError(f"{run_dir} holds the output of `vision-tl validate`, `test` or `predict` (of {evaluated}), "
                              f"not a training run; report on the run that trained it: vision-tl report "
                              f"{Path(evaluated).parent.parent}")
        if checkpoint is None and (run_dir / "config.yaml").is_file():
            raise ReportError(f"run {run_dir} has no checkpoint yet (still training, or stopped before its first "
                              f"epoch ended); train it again with `vision-tl fit --config {run_dir / 'config.yaml'}` "
                              "(a new run directory)")
        raise ReportError(f"checkpoint {path} not found; is this a run directory written by vision-tl fit?")
    return path


def _check_checkpoint_in_run(run_dir: Path, ckpt_path: Path) -> None:
    """A report scores a run's own checkpoint on the run's held-out images and writes into the
    run: another run's model may have trained on those images, and its numbers would stand
    under this run's name, its threshold beside the other run's checkpoint."""
    inside = (Path(os.path.abspath(ckpt_path)), ckpt_path.resolve())
    if not any(path.is_relative_to(root) for path in inside for root in (Path(os.path.abspath(run_dir)),
                                                                          run_dir.resolve())):
        raise ReportError(f"checkpoint {ckpt_path} is not in run {run_dir}: a report scores a run's own checkpoint "
                          "on the run's held-out images (another run's model may have trained on them) and saves "
                          f"its threshold beside it; report on the checkpoint's own run, or copy the checkpoint "
                          f"into {run_dir / 'checkpoints'} if it is this run's")


def _check_run_classes(run_dir: Path, ckpt_path: Path, classes: list[str]) -> None:
    """The checkpoint's classes are the run's (``labels.json``, written by fit)."""
    labels = run_dir / "labels.json"
    try:
        run_classes = json.loads(labels.read_text(encoding="utf-8")) if labels.is_file() else None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ReportError(f"{labels} is not readable JSON ({exc}); it is the run's class list, written by "
                          "vision-tl fit") from exc
    if run_classes is not None and list(run_classes) != list(classes):
        raise ReportError(f"checkpoint {ckpt_path} was trained on the classes {list(classes)}, but run {run_dir} "
                          f"on {list(run_classes)} ({labels}); report on the checkpoint's own run")


def _evaluated_checkpoint(run_dir: Path) -> str | None:
    """The checkpoint a ``validate``/``test``/``predict`` output directory evaluated (its saved
    config keeps ``ckpt_path``; a training run's has none), or None."""
    if (run_dir / "checkpoints").exists():
        return None
    try:
        ckpt = read_run_config(run_dir).get("ckpt_path")
    except ValueError:
        return None
    return str(ckpt) if ckpt else None


def _check_target(meta: dict | None, split: str, target: str | None) -> None:
    """A threshold target is chosen on validation images of a run with a good class: checked
    before any image is predicted."""
    if target is None:
        return
    if split != "val":
        raise ReportError("thresholds are chosen on validation images; drop --split test or the target")
    if meta is not None and meta.get("good_class") is None:
        raise ReportError("a threshold target needs a good class, but this run has none; train with "
                          "--data.good_class NAME")


def _choose_threshold(probs, labels, meta, split, target) -> dict | None:
    if target is None:
        return None
    k = meta["classes"].index(meta["good_class"])  # (target checked by report_run before predicting)
    return M.select_threshold(probs[:, k], labels == k, target)


def _what_val_chose(ckpt_path: Path, meta: dict, target: str | None) -> str | None:
    """What the validation images decided about the checkpoint a val report evaluates: the best
    epoch (``best.ckpt`` and its thresholded copy) and a threshold (always chosen on val, during
    fit or by a report). ``vision-tl test`` says the same of a val split it falls back to."""
    chose = ["the best epoch"] if ckpt_path.name.split(".")[0] == "best" else []
    if target is not None or meta.get("threshold") is not None:
        chose.append("the good/defect threshold")
    return " and ".join(chose) or None


def _stored_choice(meta: dict) -> dict | None:
    """How the checkpoint's threshold was chosen: by an earlier report, or during fit."""
    if meta.get("threshold_choice"):
        return meta["threshold_choice"]
    if meta.get("threshold") is not None and meta.get("threshold_target"):
        return {"target": meta["threshold_target"], "threshold": meta["threshold"], "chosen_on": "val during fit"}
    return None


def report_run(run_dir: str | Path, *, split: str = "val", checkpoint: str | Path | None = None,
               data_root: str | Path | None = None, target: str | None = None, in_place: bool = False,
               batch_size: int = 32, overwrite: bool = False) -> ReportResult:
    """Evaluate a run's checkpoint on its validation (or test) images and write the report.

    Args:
        run_dir: a directory written by ``vision-tl fit`` (``runs/<name>/version_N``).
        split: ``val`` (default) or ``test``.
        checkpoint: defaults to ``RUN_DIR/checkpoints/best.ckpt``.
        data_root: the image folder, when it moved since training.
        target: choose the good/defect threshold on validation, e.g. ``"false_reject:0.01"``
            or ``"escape:0.005"`` (see :func:`vision_tl.reports.metrics.select_threshold`).
        in_place: store the chosen threshold in the checkpoint itself instead of
            ``<name>.thresholded.ckpt``.
        batch_size: images per forward pass.
        overwrite: replace an earlier report of the split (HTML, predictions, figures) and a
            ``<name>.thresholded.ckpt`` an earlier report wrote.

    Raises:
        ReportError: another report of the run is being written (one at a time), or the run, its
            checkpoint, images or ``metrics.json`` cannot be used (the message says which).
    """
    for value, what in ((run_dir, "run directory"), (checkpoint, "checkpoint"), (data_root, "data root")):
        refuse_empty_path(value, what)
    run_dir = Path(run_dir).expanduser()
    if not run_dir.is_dir():
        raise ReportError(f"run directory {run_dir} does not exist")
    # one report of a run at a time: two at once wrote the HTML, metrics.json and the thresholded
    # checkpoint of different thresholds, each checking for the other's files before either wrote
    with path_lock(run_dir / "report", wait=False) as alone:
        if not alone:
            raise ReportError(f"another vision-tl report is writing into {run_dir} now; wait for it to finish, "
                              "then run this one (with --overwrite to replace what it wrote)")
        return _report_run(run_dir, split, checkpoint, data_root, target, in_place, batch_size, overwrite)


def _report_run(run_dir: Path, split: str, checkpoint: str | Path | None, data_root: str | Path | None,
                target: str | None, in_place: bool, batch_size: int, overwrite: bool) -> ReportResult:
    from vision_tl.tasks.checkpoint import load_classifier

    if target is not None:
        M.parse_threshold_target(target)  # fail before the slow part
    _check_target(None, split, target)
    ckpt_path = _run_checkpoint(run_dir, checkpoint)
    if checkpoint is not None:  # (the default is the run's own, wherever checkpoints/ links to)
        _check_checkpoint_in_run(run_dir, ckpt_path)
    thresholded = thresholded_path(ckpt_path)
    there = already_there(thresholded) if target is not None and not in_place else ""
    if there and not overwrite:
        held = ", with the threshold an earlier report chose" if there == "already exists" else ""
        raise ReportError(f"{thresholded} {there}{held}; pass --overwrite (Python: overwrite=True) to replace it, "
                          "or move it away first")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # version notes; the report states the version itself
        model, meta = load_classifier(ckpt_path)
    _check_target(meta, split, target)
    classes = list(meta["classes"])
    _check_run_classes(run_dir, ckpt_path, classes)
    _read_metrics_json(run_dir)  # a damaged metrics.json stops the report before anything is written
    reason = unwritable(run_dir)
    if reason:  # (before predicting every image, not after)
        raise ReportError(f"cannot write the report into {run_dir} ({reason}); make the run directory writable, "
                          "or copy the run elsewhere and report on the copy")
    paths, labels, notes = split_images(run_dir, classes, split, data_root)
    notes = [*notes, *_checkpoint_notes(ckpt_path, thresholded, meta, split, target)]
    _refuse_earlier_report(run_dir, split, overwrite)
    probs = predict_probabilities(model, paths, batch_size)
    labels = np.asarray(labels, np.int64)
    choice = _choose_threshold(probs, labels, meta, split, target)
    threshold = choice["threshold"] if choice else meta.get("threshold")
    info = {"run": str(run_dir), "checkpoint": str(ckpt_path), "checkpoint epoch": getattr(model, "checkpoint_epoch", None),
            "backbone": meta.get("backbone"),
            "mode": model.hparams.get("mode"), "kit_version": meta.get("kit_version"),
            "images": f"{len(paths)} ({split})", "notes": notes}
    if choice:
        info["threshold saved to"] = str(ckpt_path if in_place else thresholded)
    # The thresholded checkpoint is written first and named last: a report that fails on the way
    # leaves no checkpoint that blocks its rerun, and one that says "saved to" has it saved.
    with (_threshold_saved(ckpt_path, choice, in_place, overwrite) if choice
          else contextlib.nullcontext()) as saved:
        result = write_report(run_dir, probs, labels, classes, paths=[str(p) for p in paths],
                              good_class=meta.get("good_class"), threshold=threshold, split=split,
                              info=info, threshold_choice=choice or _stored_choice(meta))
    result.checkpoint, result.notes = saved, notes
    return result


def _checkpoint_notes(ckpt_path: Path, thresholded: Path, meta: dict, split: str, target: str | None) -> list[str]:
    """What the report should say of the checkpoint it evaluates: that the val images chose it,
    or that an earlier report's thresholded copy of it is at hand."""
    notes = []
    chose = _what_val_chose(ckpt_path, meta, target) if split == "val" else None
    if chose:
        notes.append(f"these val images chose {chose}, so their scores are not an independent estimate (the "
                     "best of several tries on them; with one or two images of a class, also a noisy one): hold "
                     "out ROOT/test/<class>/ and run `vision-tl report RUN --split test` for one")
    if target is None and meta.get("threshold") is None and thresholded.exists():
        notes.append(f"{ckpt_path.name} has no threshold, but {thresholded} carries the one an earlier report "
                     f"chose; to evaluate with it: --checkpoint {thresholded}")
    return notes


def _refuse_earlier_report(run_dir: Path, split: str, overwrite: bool) -> None:
    """An earlier report's files (its HTML may state the threshold a thresholded checkpoint
    carries) are replaced only with ``overwrite``; fit's own confusion matrix of the same
    checkpoint is drawn again without asking."""
    earlier = [run_dir / name for name in (output_name("report", split, ".html"),
                                           output_name("predictions", split, ".csv"),
                                           *(f"{figure}_{split}.png" for figure in REPORT_FIGURES))]
    earlier = [path for path in earlier if os.path.lexists(path)]
    if earlier and not overwrite:
        raise ReportError(f"{earlier[0]} already exists (an earlier report of this run); pass --overwrite "
                          "(Python: overwrite=True) to replace it and its predictions and figures, or move it away first")
