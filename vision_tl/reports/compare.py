"""``vision-tl compare``: runs side by side, from their ``metrics.json`` and ``config.yaml``.

A run that has a report (``vision-tl report RUN``) contributes AUC, ECE and the
good/defect rates too; otherwise only the validation metrics written by ``fit``.
"""

from __future__ import annotations

import glob
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from vision_tl.reports.report import ReportError
from vision_tl.utils import DamagedMetricsError, read_run_config, read_run_metrics
from vision_tl.utils.files import refuse_empty_path

COLUMNS = (("acc", "accuracy"), ("balanced_acc", "balanced acc."), ("f1_macro", "macro F1"),
           ("roc_auc_macro", "macro AUC"), ("ece", "ECE"), ("escape_rate", "escape"),
           ("false_reject_rate", "false reject"), ("threshold", "threshold"))


@dataclass
class RunSummary:
    """One row of the comparison."""

    name: str
    path: Path
    backbone: str | None
    mode: str | None
    classes: list[str]
    values: dict[str, float | None]
    recall: dict[str, float | None]
    val_hashes: frozenset[str] | None
    has_report: bool
    checkpoint: str | None = None  # the file the report evaluated (None: fit's own metrics)
    stale_report: bool = False  # a report older than its checkpoint was set aside for fit's metrics
    images_split: str | None = None  # where its report's images are of another split (test of val)


@dataclass
class Comparison:
    runs: list[RunSummary]
    notes: list[str] = field(default_factory=list)
    split: str = "val"  # whose metrics: said in the figure's and the page's titles

    def to_dict(self) -> dict:
        return {"split": self.split,
                "runs": [{"name": r.name, "path": str(r.path), "backbone": r.backbone, "mode": r.mode,
                          "has_report": r.has_report, **r.values, "recall": r.recall} for r in self.runs],
                "notes": self.notes}


def _label(run: Path) -> str:
    run = run.resolve()  # `compare .` or ../version_0: the run's own names, not "." and ".."
    return f"{run.parent.name}/{run.name}"


def _has_split(run: str | Path, split: str) -> bool:
    """Whether ``run``'s metrics.json holds ``split`` metrics (a report's, or test's own)."""
    try:
        metrics = read_run_metrics(Path(run).expanduser() / "metrics.json", on_damage="raise")
    except (OSError, ValueError):  # (DamagedMetricsError: summarise_run names it)
        return False
    report = metrics.get("report")
    return split in metrics or isinstance(report, dict) and split in report


def _section(metrics: dict, name: str, path: Path) -> dict:
    """``metrics[name]`` ({} without it), which must be an object as fit and report write it."""
    section = metrics.get(name, {})
    if not isinstance(section, dict):
        raise ReportError(f"{path}: its {name!r} entry is a JSON {type(section).__name__}, not the object "
                          "vision-tl fit and vision-tl report write; repair it or move the file aside and run "
                          "`vision-tl report` again")
    return section


def summarise_run(run: str | Path, split: str = "val") -> RunSummary:
    """Read a run directory's metrics (report section first) and its backbone / mode."""
    run = Path(run).expanduser()
    path = run / "metrics.json"
    metrics = _run_metrics(run, path)
    report = _section(metrics, "report", path).get(split)
    if report is not None and not (isinstance(report, dict) and isinstance(report.get("summary"), dict)
                                   and isinstance(report.get("per_class"), list)
                                   and all(isinstance(r, dict) and "class" in r for r in report["per_class"])
                                   and isinstance(report.get("good_vs_defect", {}), dict)):
        raise ReportError(f"{path}: its report section for {split} is not one vision-tl report writes; run "
                          f"`vision-tl report {run}` again to rewrite it")
    if split in metrics:
        _section(metrics, split, path)
    stale = report is not None and split in metrics and _predates_checkpoint(metrics, report, split)
    if stale:  # trained on (resumed) after it was reported: fit's metrics describe today's checkpoint
        report = None
    if report is not None:
        values = dict(report["summary"])
        values.update({k: report.get("good_vs_defect", {}).get(k)
                       for k in ("escape_rate", "false_reject_rate", "threshold")})
        recall = {r["class"]: r.get("recall") for r in report["per_class"]}
    elif split in metrics:
        values = dict(metrics[split])
        recall = metrics[split].get("recall_per_class", {})
        if not isinstance(recall, dict):
            raise ReportError(f"{path}: its {split} recall_per_class is a JSON {type(recall).__name__}, not the "
                              "object (class -> recall) vision-tl fit writes; repair it or run `vision-tl report "
                              f"{run}` to write a report section, which compare reads first")
        recall = dict(recall)
    else:
        raise ReportError(f"{path} has no {split} metrics; run `vision-tl report {run}"
                          + ("` first" if split == "val" else
                             f" --split {split}` first (when its data has a {split}/ folder), or compare the run "
                             f"directory `vision-tl test` wrote, which holds the {split} metrics"))
    _check_numbers(path, split, {k: values.get(k) for k, _ in COLUMNS}, recall)
    config = read_run_config(run)
    model = config.get("model") or {}
    hashes = _split_hashes(run, split)
    return RunSummary(name=_label(run), path=run, backbone=model.get("backbone"),
                      mode=model.get("mode"), classes=list(metrics.get("classes", [])),
                      values={k: values.get(k) for k, _ in COLUMNS}, recall=recall,
                      val_hashes=hashes or None, has_report=report is not None,
                      checkpoint=(report or {}).get("checkpoint"), stale_report=stale,
                      images_split=(report or {}).get("images_split"))


def _run_metrics(run: Path, path: Path) -> dict:
    """The metrics.json (``path``) of the run directory ``run``, refused with what is wrong where
    the run or its file is missing or damaged."""
    if not os.path.lexists(run):  # (a mistyped run: say so, not that a folder lacks a file)
        siblings = sorted(p.name for p in run.parent.glob("version_*")) if run.parent.is_dir() else []
        raise ReportError(f"run directory {run} does not exist" + (f" (in {run.parent}: {', '.join(siblings[:8])})"
                                                                     if siblings else ""))
    if not path.is_file():
        raise ReportError(f"{run} has no metrics.json; expected a run directory written by vision-tl fit "
                          "(runs/<name>/version_N)")
    try:
        return read_run_metrics(path, on_damage="raise")
    except DamagedMetricsError as exc:
        raise ReportError(f"{exc}; compare reads the metrics vision-tl fit and vision-tl report write there: "
                          f"run `vision-tl report {run}` again once it is repaired or moved aside") from exc


def _split_hashes(run: Path, split: str) -> frozenset[str] | None:
    """The content hashes of the run's ``split`` images, as its split.json lists them, or None
    without one (a run that brought its own val/ folder)."""
    if not (run / "split.json").is_file():
        return None
    from vision_tl.data.folder import (  # imports torch: only when needed
        DatasetError,
        read_split,
    )

    try:
        record = read_split(run / "split.json")
    except DatasetError as exc:
        raise ReportError(str(exc)) from exc
    return frozenset(item["sha256"] for item in record.get(split, []))


def _check_numbers(path: Path, split: str, values: dict, recall: dict) -> None:
    """Refuse a value compare would print or rank that is not a number or null (a hand edit,
    another tool's file), naming it, rather than failing inside the table's formatting."""
    named = [(k, v) for k, v in values.items()] + [(f"recall of {c!r}", v) for c, v in recall.items()]
    for key, value in named:
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ReportError(f"{path}: its {split} {key} is {value!r}, not a number or null as vision-tl fit "
                              f"and vision-tl report write it; run `vision-tl report {path.parent}` again to "
                              "rewrite the report section")


def _predates_checkpoint(metrics: dict, report: dict, split: str) -> bool:
    """Whether the run trained on after its report (a resume replaces best.ckpt): the report
    evaluated best.ckpt of one epoch, and fit's metrics now name another best epoch. (By the
    epochs, not file times, which a copy of the run resets.) Reports that recorded no epoch
    are taken as they are."""
    evaluated = report.get("checkpoint_epoch")
    best = metrics[split].get("epoch") if isinstance(metrics.get(split), dict) else None
    named = Path(str(report.get("checkpoint") or "")).name
    return named == "best.ckpt" and isinstance(evaluated, int) and isinstance(best, int) and evaluated != best


def _expand(run: str | Path) -> list[str | Path]:
    """``run``, or the directories a pattern such as ``runs/*/version_*`` matches where no shell
    expanded it (Windows' shells, a quoted argument); a pattern that matches none is refused."""
    text = os.path.expanduser(str(run))
    if os.path.exists(text) or not any(c in text for c in "*?["):
        return [run]
    found = sorted((path for path in glob.glob(text) if os.path.isdir(path)), key=_version_order)
    if not found:
        raise ReportError(f"{run} matches no run directory")
    return found


def _version_order(path: str) -> tuple:
    """Natural order: ``version_2`` before ``version_10`` (which sorts first by name)."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path))


def compare_runs(runs: list[str | Path], split: str = "val") -> Comparison:
    """Summaries of several runs, with notes when they are not strictly comparable."""
    if len(runs) < 1:
        raise ReportError("give at least one run directory")
    for run in runs:
        refuse_empty_path(run, "run directory")
    runs = [found for run in runs for found in _expand(run)]
    runs, notes = _runs_to_compare(runs, split)
    summaries = [summarise_run(r, split) for r in runs]
    labels = [s.name for s in summaries]
    for s in summaries:  # runs of the same name in other folders: their paths tell them apart
        if labels.count(s.name) > 1:
            s.name = str(s.path)
    notes += _comparability_notes(summaries, split)
    return Comparison(summaries, notes, split)


def _runs_to_compare(runs: list[str | Path], split: str) -> tuple[list[str | Path], list[str]]:
    """Of several runs (``compare runs/partial/version_*`` also matches the folders test and
    predict wrote), those with ``split`` metrics to compare, and a note on each left out."""
    notes = []
    if len(runs) < 2:
        return runs, notes
    # With --split test, those of `vision-tl test` are the ones that hold test metrics, and the
    # training runs without a test report are left out instead.
    if split == "test":
        outputs = [r for r in runs if not _has_split(r, split)]
    else:
        outputs = [r for r in runs if not (Path(r).expanduser() / "checkpoints").is_dir()
                   and (Path(r).expanduser() / "config.yaml").is_file()]
    if outputs and len(outputs) < len(runs):
        why = (f"no {split} metrics" if split == "test" else
               "no checkpoints/: the output of vision-tl test or predict, or a fit stopped before its first "
               "epoch ended")
        notes.append(f"left out {', '.join(_label(Path(r).expanduser()) for r in outputs)}: {why}")
        runs = [r for r in runs if r not in outputs]
    unfinished = [r for r in runs if not (Path(r).expanduser() / "metrics.json").is_file()
                  and (Path(r).expanduser() / "config.yaml").is_file()]  # (not a run: an error below)
    if unfinished and len(unfinished) < len(runs):  # e.g. a fit killed during its first epoch
        notes.append(f"left out {', '.join(_label(Path(r).expanduser()) for r in unfinished)}: no metrics.json "
                     "(stopped before its first validation ended)")
        runs = [r for r in runs if r not in unfinished]
    return runs, notes


def _comparability_notes(summaries: list[RunSummary], split: str) -> list[str]:
    """What keeps the runs' metrics from being strictly comparable, or incomplete."""
    notes = []
    if len({tuple(s.classes) for s in summaries}) > 1:
        notes.append("the runs have different classes; per-class recall is shown for shared classes only")
    hashes = {s.val_hashes for s in summaries if s.val_hashes is not None}
    if len(hashes) > 1:
        notes.append(f"the runs were evaluated on different {split} images; differences may reflect the split")
    unchecked = [s.name for s in summaries if s.val_hashes is None]
    if split == "val" and unchecked and len(summaries) > 1:
        notes.append(f"{', '.join(unchecked)} brought {'its' if len(unchecked) == 1 else 'their'} own val/ "
                     "folder (no split.json): whether all runs were evaluated on the same images is not checked")
    other = [f"{s.name} ({Path(s.checkpoint).name})" for s in summaries
             if s.checkpoint and Path(s.checkpoint).name != "best.ckpt"]
    if other:
        notes.append(f"not the best checkpoint: {', '.join(other)} (its report evaluated that file)")
    of_val = [s.name for s in summaries if s.images_split not in (None, split)]
    if of_val:  # `vision-tl test` of a folder without test/
        notes.append(f"{', '.join(of_val)}: the {split} metrics are of the val images (no test/ split), which chose "
                     "the checkpoint: optimistic, not an independent estimate")
    stale = [s.name for s in summaries if s.stale_report]
    if stale:
        notes.append(f"{', '.join(stale)}: the report is older than the checkpoint it evaluated (trained on since), "
                     f"so fit's {split} metrics are shown; run `vision-tl report RUN` again")
    missing = [s for s in summaries if not s.has_report and not s.stale_report]
    if missing:  # (a fit with --model.threshold_target has measured the escape rates already)
        needed = ("AUC, ECE and escape rates" if any(s.values.get("escape_rate") is None for s in missing)
                  else "AUC and ECE")
        notes.append(f"no report yet for {', '.join(s.name for s in missing)}: {needed} need "
                     "`vision-tl report RUN`")
    return notes


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def format_table(comparison: Comparison) -> str:
    """A plain-text table for the terminal."""
    header = ["run", "backbone", "mode", *[label for _, label in COLUMNS]]
    rows = [[r.name, r.backbone or "?", r.mode or "?", *[_fmt(r.values[k]) for k, _ in COLUMNS]]
            for r in comparison.runs]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines + [f"note: {n}" for n in comparison.notes])


def comparison_paths(out_dir: str | Path, overwrite: bool = False) -> dict[str, Path]:
    """The files :func:`write_comparison` writes into ``out_dir``; checked first (before any
    run is read), so a comparison never ends in a refusal to write it.

    Raises:
        ReportError: ``out_dir`` is a file.
        FileExistsError: one of them exists and ``overwrite`` is False.
    """
    out_dir = Path(out_dir).expanduser()
    if out_dir.exists() and not out_dir.is_dir():
        raise ReportError(f"--out {out_dir} is a file; --out is the folder that receives compare.json, compare.png "
                          "and compare.html")
    paths = {"json": out_dir / "compare.json", "png": out_dir / "compare.png", "html": out_dir / "compare.html"}
    existing = [p.name for p in paths.values() if os.path.lexists(p)]
    if existing and not overwrite:
        raise FileExistsError(f"--out {out_dir}: {', '.join(existing)} {'exists' if len(existing) == 1 else 'exist'} "
                              "from an earlier comparison; pass --overwrite to replace them or choose another --out")
    return paths


def write_comparison(comparison: Comparison, out_dir: str | Path, overwrite: bool = False) -> dict[str, Path]:
    """Write ``compare.json``, ``compare.png`` and a self-contained ``compare.html`` into ``out_dir``.

    Raises:
        FileExistsError: one of them exists and ``overwrite`` is False (nothing is written).
    """
    from vision_tl.reports.html import render_comparison
    from vision_tl.reports.plots import plot_comparison
    from vision_tl.utils.files import atomic_write_text

    paths = comparison_paths(out_dir, overwrite)
    out_dir = paths["html"].parent
    out_dir.mkdir(parents=True, exist_ok=True)
    data = comparison.to_dict()
    # overwrite=False also keeps another comparison's files, written there meanwhile
    atomic_write_text(paths["json"], json.dumps(data, indent=1), overwrite=overwrite)
    keys = [k for k, _ in COLUMNS[:4]]
    plot_comparison([r.name for r in comparison.runs], {label: [r.values[k] for r in comparison.runs]
                                                        for k, label in COLUMNS if k in keys}, paths["png"],
                    title=f"runs compared on their {comparison.split} images")
    shared = [c for c in comparison.runs[0].classes if all(c in r.classes for r in comparison.runs)]
    atomic_write_text(paths["html"], render_comparison(data, COLUMNS, shared, paths["png"]), overwrite=overwrite)
    return paths
