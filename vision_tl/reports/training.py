"""A run's training curves, read back from its files: validation scores and loss from
``metrics.json``'s history, the training loss from the step log (``metrics.csv``, and the
``metrics.before_resume_N.csv`` a resume kept aside).

Example:
    >>> from vision_tl.reports.training import write_training_curves
    >>> write_training_curves("runs/partial/version_0")  # doctest: +SKIP
    PosixPath('runs/partial/version_0/training_curves.png')
"""

from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from vision_tl.utils import read_run_config, read_run_metrics

TRAINING_CURVES = "training_curves.png"


@dataclass
class TrainingHistory:
    """What :func:`~vision_tl.reports.plots.plot_training_curves` draws for one run."""

    history: list[dict]
    best: dict | None = None
    train_loss: dict[int, float] | None = None  # None: the run has no step log
    val_loss: dict[int, float] = field(default_factory=dict)
    since_epoch: int = 0
    milestones: dict[int, int] = field(default_factory=dict)


def _step_logs(run_dir: Path) -> list[Path]:
    """The run's step logs, oldest first: those a resume kept aside, then the current one."""
    kept = [(int(m.group(1)), p) for p in run_dir.glob("metrics.before_resume_*.csv")
            if (m := re.fullmatch(r"metrics\.before_resume_(\d+)\.csv", p.name))]
    current = run_dir / "metrics.csv"
    return [p for _, p in sorted(kept)] + ([current] if current.is_file() else [])


def _float(text: str | None) -> float | None:
    try:
        value = float(text) if text not in (None, "") else None
    except ValueError:
        return None
    return value if value is not None and math.isfinite(value) else None


def _epoch_values(path: Path) -> dict[str, dict[int, list[float]]]:
    """``train/loss`` (each epoch's mean, ``train/epoch_loss``, where logged; else the logged
    steps') and ``val/loss`` of one step log, per epoch (rows without a number skipped)."""
    out: dict[str, dict[int, list[float]]] = {"train/loss": {}, "val/loss": {}, "train/epoch_loss": {}}
    with open(path, newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            epoch = _float(row.get("epoch"))
            if epoch is None:
                continue
            for key, values in out.items():
                value = _float(row.get(key))
                if value is not None:
                    values.setdefault(int(epoch), []).append(value)
    means = out.pop("train/epoch_loss")
    if means:  # (a log of an older kit has only the sampled steps)
        out["train/loss"] = means
    return out


def read_step_losses(run_dir: str | Path) -> tuple[dict[int, float], dict[int, float]] | None:
    """The mean training loss and the (last) validation loss per epoch from the run's step logs;
    None without any. A resume starts a new log: from its first epoch on it replaces the older
    logs (an epoch cut off by the stop is trained again from its start)."""
    logs = _step_logs(Path(run_dir))
    if not logs:
        return None
    train: dict[int, list[float]] = {}
    val: dict[int, list[float]] = {}
    for path in logs:
        try:
            values = _epoch_values(path)
        except (OSError, UnicodeDecodeError, csv.Error):
            continue  # a damaged log loses its own epochs, not the plot
        epochs = [*values["train/loss"], *values["val/loss"]]
        if epochs:
            start = min(epochs)
            for held in (train, val):
                for epoch in [e for e in held if e >= start]:
                    del held[epoch]
        train.update(values["train/loss"])
        val.update(values["val/loss"])
    return ({e: sum(v) / len(v) for e, v in sorted(train.items())},
            {e: v[-1] for e, v in sorted(val.items())})


def _milestones(run_dir: Path) -> dict[int, int]:
    """GradualUnfreezing's milestones from the run's ``config.yaml`` ({} without)."""
    try:
        callbacks = (read_run_config(run_dir).get("trainer") or {}).get("callbacks") or []
    except (OSError, ValueError):
        return {}
    for callback in callbacks if isinstance(callbacks, list) else [callbacks]:
        if isinstance(callback, dict) and str(callback.get("class_path", "")).endswith("GradualUnfreezing"):
            try:
                return {int(k): int(v) for k, v in ((callback.get("init_args") or {}).get("milestones") or {}).items()}
            except (AttributeError, TypeError, ValueError):
                return {}
    return {}


def read_training_history(run_dir: str | Path) -> TrainingHistory | None:
    """The run's training history (None where ``metrics.json`` holds none: nothing was validated,
    or the folder is not a fit's run directory).

    Raises:
        DamagedMetricsError: ``metrics.json`` is there but holds no JSON object.
    """
    run_dir = Path(run_dir)
    metrics = read_run_metrics(run_dir / "metrics.json")
    history = metrics.get("history")
    if not isinstance(history, list) or not any(isinstance(r, dict) for r in history):
        return None
    losses = read_step_losses(run_dir)
    best = metrics.get("val")
    return TrainingHistory(history=[r for r in history if isinstance(r, dict)],
                           best=best if isinstance(best, dict) else None,
                           train_loss=losses[0] if losses else None, val_loss=losses[1] if losses else {},
                           since_epoch=int(metrics.get("since_epoch") or 0), milestones=_milestones(run_dir))


def write_training_curves(run_dir: str | Path, path: str | Path | None = None) -> Path | None:
    """Draw the run's training curves into ``path`` (default ``RUN_DIR/training_curves.png``);
    None, drawing nothing, where the run has no history yet."""
    from vision_tl.reports.plots import plot_training_curves

    run_dir = Path(run_dir)
    data = read_training_history(run_dir)
    if data is None:
        return None
    named = run_dir.resolve()  # (a run given as "." has a name too)
    return plot_training_curves(data.history, path or run_dir / TRAINING_CURVES, best=data.best,
                                train_loss=data.train_loss, val_loss=data.val_loss, since_epoch=data.since_epoch,
                                milestones=data.milestones, title=f"Training: {named.parent.name}/{named.name}")
