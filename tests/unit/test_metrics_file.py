"""A run's metrics.json, read by fit (at every epoch's end) and by report: one reader, two policies.

Fit must go on training past a damaged file without losing what it held; report must stop,
naming the file and what to do, before it writes anything.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from vision_tl.reports.report import ReportError, _read_metrics_json, write_report
from vision_tl.tasks.callbacks import RunArtifacts

CLASSES = ["good", "scratch"]
RESULT = {"epoch": 1, "acc": 0.5, "balanced_acc": 0.5, "confusion_matrix": [[1, 0], [1, 0]]}
DAMAGED = {
    "invalid JSON": '{"classes": [',  # cut off by a crash or a full disk
    "a list": '[{"epoch": 0}]',  # JSON, but not the object fit writes
}


def _fit_writes_metrics(run: Path) -> RunArtifacts:
    """What RunArtifacts does at the end of a validated epoch, on a stand-in trainer."""
    artifacts = RunArtifacts()
    artifacts._run_dir = run
    artifacts.history = [{"epoch": 0, "acc": 0.25}, {"epoch": 1, "acc": 0.5}]
    artifacts._write_metrics(SimpleNamespace(), SimpleNamespace(classes=CLASSES), "val", RESULT, plot=False)
    return artifacts


def _fit_history(run: Path) -> list[int]:
    return [r["epoch"] for r in json.loads((run / "metrics.json").read_text())["history"]]


def test_fit_writes_a_missing_metrics_json(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _fit_writes_metrics(tmp_path)
    assert _fit_history(tmp_path) == [0, 1] and not list(tmp_path.glob("metrics.damaged*"))


def test_fit_keeps_the_other_sections_of_a_valid_metrics_json(tmp_path):
    (tmp_path / "metrics.json").write_text(json.dumps({"report": {"val": {"summary": {"acc": 0.5}}}, "history": []}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _fit_writes_metrics(tmp_path)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["report"] == {"val": {"summary": {"acc": 0.5}}} and _fit_history(tmp_path) == [0, 1]


@pytest.mark.parametrize("text", DAMAGED.values(), ids=DAMAGED.keys())
def test_fit_sets_a_damaged_metrics_json_aside_and_never_replaces_an_earlier_copy(tmp_path, text):
    """A second damaged file replaced the copy kept of the first (both sets of sections lost)."""
    (tmp_path / "metrics.json").write_text(text)
    (tmp_path / "metrics.damaged.json").write_text("kept from an earlier damage")
    with pytest.warns(UserWarning, match=r"metrics\.json is .*kept as .*metrics\.damaged_2\.json"):
        _fit_writes_metrics(tmp_path)
    assert (tmp_path / "metrics.damaged.json").read_text() == "kept from an earlier damage"
    assert (tmp_path / "metrics.damaged_2.json").read_text() == text
    assert _fit_history(tmp_path) == [0, 1]


def test_fit_writes_an_empty_metrics_json_anew_without_a_copy(tmp_path):
    (tmp_path / "metrics.json").write_text("\n")
    with pytest.warns(UserWarning, match=r"metrics\.json was empty"):
        _fit_writes_metrics(tmp_path)
    assert _fit_history(tmp_path) == [0, 1] and not list(tmp_path.glob("metrics.damaged*"))


def test_fit_goes_on_when_a_damaged_metrics_json_cannot_be_set_aside(tmp_path, monkeypatch):
    """The move failing (a file the user may not rename, a network share) crashed the epoch's end."""
    (tmp_path / "metrics.json").write_text('{"classes": [')

    def refuse(*args):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.warns(UserWarning, match=r"cannot be set aside .*left as it is"):
        _fit_writes_metrics(tmp_path)
    assert (tmp_path / "metrics.json").read_text() == '{"classes": ['  # as it was: nothing lost


def test_report_reads_a_missing_or_valid_metrics_json(tmp_path):
    assert _read_metrics_json(tmp_path) == {}
    (tmp_path / "metrics.json").write_text(json.dumps({"history": [{"epoch": 0}]}))
    assert _read_metrics_json(tmp_path) == {"history": [{"epoch": 0}]}


@pytest.mark.parametrize(("text", "problem"), [("", "empty"), (DAMAGED["invalid JSON"], "not valid JSON"),
                                               (DAMAGED["a list"], "a JSON list"),
                                               ('{"report": [1]}', "damaged: its 'report' entry is a JSON list")],
                         ids=["empty", *DAMAGED, "report section a list"])
def test_report_refuses_a_damaged_metrics_json_naming_it_and_what_to_do(tmp_path, text, problem):
    path = tmp_path / "metrics.json"
    path.write_text(text)
    with pytest.raises(ReportError) as info:
        _read_metrics_json(tmp_path)
    message = str(info.value)
    assert message.startswith(f"{path} is {problem}")
    assert "nothing was written" in message and f"move it aside (e.g. to {tmp_path / 'metrics.damaged.json'})" in message
    # and the report writes nothing: no predictions, figures or HTML beside the damaged file
    with pytest.raises(ReportError):
        write_report(tmp_path, np.array([[0.9, 0.1]]), np.array([0]), CLASSES)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"] and path.read_text() == text


@pytest.mark.parametrize(("text", "problem"), [(DAMAGED["a list"], "is a JSON list"),
                                               ('{"report": "x"}', "its 'report' entry is a JSON str"),
                                               ('{"val": [0.5]}', "its 'val' entry is a JSON list"),
                                               ('{"report": {"val": {"summary": 1}}}', "report section for val"),
                                               ('{"val": {"acc": "0.9"}}', "its val acc is '0.9', not a number"),
                                               ('{"val": {"acc": 0.9, "balanced_acc": true}}',
                                                "its val balanced_acc is True"),
                                               ('{"val": {"acc": 0.9, "recall_per_class": [0.9]}}',
                                                "its val recall_per_class is a JSON list"),
                                               ('{"val": {"acc": 0.9, "recall_per_class": {"ok": "all"}}}',
                                                "its val recall of 'ok' is 'all'"),
                                               ('{"report": {"val": {"summary": {}, "per_class": [1]}}}',
                                                "report section for val"),
                                               ('{"report": {"val": {"summary": {"ece": [0.1]}, "per_class": []}}}',
                                                "its val ece is [0.1]")],
                         ids=["a list", "report a string", "val a list", "report without summary", "a string value",
                              "a boolean value", "recall a list", "a recall string", "per_class not objects",
                              "a report value a list"])
def test_compare_names_a_damaged_metrics_json_instead_of_a_traceback(tmp_path, text, problem):
    from vision_tl.reports.compare import summarise_run

    (tmp_path / "metrics.json").write_text(text)
    with pytest.raises(ReportError) as info:
        summarise_run(tmp_path)
    assert str(tmp_path / "metrics.json") in str(info.value) and problem in str(info.value)
