"""benchmarks/gpu_throughput.py runs only when a GPU is lent, for a few minutes: a row that
fails there (or the time limit) must not cost the rows measured before and after it. The script
runs here on the CPU at a tiny size (its smoke-test settings)."""

from __future__ import annotations

import importlib
import signal
import sys
import time
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture
def script(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    module = importlib.import_module("gpu_throughput")
    yield module
    sys.modules.pop("gpu_throughput", None)


def _run(script, tmp_path, monkeypatch, capsys, modes: str) -> tuple[list[str], str]:
    """Run the script at its smoke size; the table's rows (header first) and the table."""
    monkeypatch.setattr(sys, "argv", [
        "gpu_throughput.py", "--device", "cpu", "--images", "96", "--size", "32", "--batch", "16", "--epochs", "2",
        "--steps", "2", "--backbone", "test_efficientnet", "--modes", modes,
        "--data", str(tmp_path / "jpegs"), "--cache", str(tmp_path / "decoded"), "--workers", "0"])
    before = signal.getsignal(signal.SIGTERM)
    script.main()
    assert signal.getsignal(signal.SIGTERM) is before  # its handler goes with it
    out = capsys.readouterr().out
    table = out[out.index("### GPU pipeline throughput"):]
    rows = [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    return rows, table


def _time_limit(*_, **__):
    """What ``timeout`` sends: the script's own handler turns it into ``Stopped``."""
    signal.raise_signal(signal.SIGTERM)
    time.sleep(30)  # (the handler raises before this ends)
    raise AssertionError("SIGTERM did not stop the script")


def test_a_failing_row_and_the_time_limit_leave_the_other_rows_in_the_table(script, tmp_path, monkeypatch, capsys):
    real = script.kit_rate

    def kit_rate(args, root, mode, *rest):
        if mode == "partial":
            raise SystemExit("fit failed (exit 1): vision-tl fit ...")
        if mode == "full":
            _time_limit()
        return real(args, root, mode, *rest)

    monkeypatch.setattr(script, "kit_rate", kit_rate)
    rows, table = _run(script, tmp_path, monkeypatch, capsys, "frozen,partial,full")
    assert rows == ["mode", "frozen"]  # measured before the failure, kept
    assert "**Not as planned**" in table
    assert "- kit partial failed: fit failed (exit 1)" in table
    assert "- stopped by the time limit during kit full (SIGTERM, " in table


@pytest.mark.parametrize("phase", ["prepare", "checks", "bounds"])
def test_the_time_limit_before_the_rows_still_writes_the_table(script, tmp_path, monkeypatch, capsys, phase):
    """The time limit while the JPEGs are made, the checks run or the bounds are measured ended
    the script with a traceback: no table, and the bounds measured by then were lost."""
    if phase == "prepare":
        monkeypatch.setattr(script, "prepare", _time_limit)
    elif phase == "checks":
        monkeypatch.setattr(script, "checks", _time_limit)
    else:  # the training bounds measured, then the limit during the inference bound
        monkeypatch.setattr(script, "checks", lambda args, root: None)
        monkeypatch.setattr(script, "plain_inference_rate", _time_limit)
    rows, table = _run(script, tmp_path, monkeypatch, capsys, "frozen,partial")
    assert rows == ["mode"]
    assert f"- stopped by the time limit during {phase}" in table
    if phase == "bounds":
        (kept,) = [line for line in table.splitlines() if line.startswith("Plain-loop bounds without a row")]
        assert "partial" in kept and "full" in kept and "frozen" not in kept


def test_the_time_limit_between_rounds_keeps_the_rounds_measured(script, tmp_path, monkeypatch, capsys):
    """extract's steady-state rows alternate over several rounds: the time limit in the second
    round cost the first round's rates, which were only stored after the last round."""
    seen = []

    def steady_rate(args, root, skip=3, decode="cpu", cuda_graphs=True):
        run = (decode, cuda_graphs, script.imaging._fast_jpeg)
        if run in seen:  # the second round begins
            _time_limit()
        seen.append(run)
        return 1000.0 + len(seen), float("nan")

    monkeypatch.setattr(script, "checks", lambda args, root: None)
    monkeypatch.setattr(script, "extract_rate", lambda *a: (500.0, 1.0, 0.5, 3.0))
    monkeypatch.setattr(script, "extract_steady_rate", steady_rate)
    rows, table = _run(script, tmp_path, monkeypatch, capsys, "extract")
    assert "extract, steady state" in rows and "extract, steady state, eager (BatchNorm folded, no CUDA graph)" in rows
    assert "- stopped by the time limit during extract, steady state (SIGTERM, " in table
