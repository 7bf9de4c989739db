"""benchmarks/gpu_throughput.py runs only when a GPU is lent, for a few minutes: a row that
fails there (or the time limit) must not cost the rows measured before and after it. The script
runs here on the CPU at a tiny size (its smoke-test settings)."""

from __future__ import annotations

import importlib
import signal
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture
def script(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    module = importlib.import_module("gpu_throughput")
    yield module
    sys.modules.pop("gpu_throughput", None)


def test_a_failing_row_and_the_time_limit_leave_the_other_rows_in_the_table(script, tmp_path, monkeypatch, capsys):
    real = script.kit_rate

    def kit_rate(args, root, mode, *rest):
        if mode == "partial":
            raise SystemExit("fit failed (exit 1): vision-tl fit ...")
        if mode == "full":
            raise script.Stopped("stopped by the time limit (SIGTERM) before this")
        return real(args, root, mode, *rest)

    monkeypatch.setattr(script, "kit_rate", kit_rate)
    monkeypatch.setattr(sys, "argv", [
        "gpu_throughput.py", "--device", "cpu", "--images", "96", "--size", "32", "--batch", "16", "--epochs", "2",
        "--steps", "2", "--backbone", "test_efficientnet", "--modes", "frozen,partial,full",
        "--data", str(tmp_path / "jpegs"), "--cache", str(tmp_path / "decoded"), "--workers", "0"])
    before = signal.getsignal(signal.SIGTERM)
    script.main()
    assert signal.getsignal(signal.SIGTERM) is before  # its handler goes with it
    out = capsys.readouterr().out
    table = out[out.index("### GPU pipeline throughput"):]
    rows = [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows == ["mode", "frozen"]  # measured before the failure, kept
    assert "**Not as planned**" in table
    assert "- kit partial failed: fit failed (exit 1)" in table
    assert "stopped by the time limit (SIGTERM) before this" in table
