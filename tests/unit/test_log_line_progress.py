"""Progress as plain lines (stdout to a log file or a pipe): what the lines say."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from vision_tl.tasks import callbacks
from vision_tl.tasks.callbacks import LogLineProgress


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> _Clock:
    clock = _Clock()
    monkeypatch.setattr(callbacks.time, "monotonic", clock)
    return clock


def _trainer(epoch: int = 0, max_epochs: int = 10) -> SimpleNamespace:
    return SimpleNamespace(current_epoch=epoch, max_epochs=max_epochs, sanity_checking=False,
                           state=SimpleNamespace(fn="fit"), num_training_batches=10, num_val_batches=[10],
                           callback_metrics={"val/acc": 0.5}, is_global_zero=True)


def test_an_epoch_is_numbered_as_the_best_epoch_line_and_metrics_json_number_it(clock, capsys):
    """A resumed fit's sixth epoch (index 5): 'epoch 5 (6 of 10)'. The lines counted from 1 ('epoch 6/10')
    while 'vision_tl: best epoch 5', metrics.json and the milestones count from 0: the best epoch
    named the line before the one that held its scores."""
    bar, trainer = LogLineProgress(interval=0.0), _trainer(epoch=5)
    bar._trainer = trainer
    bar.on_train_epoch_start(trainer, None)
    clock.now = 12.0
    bar.on_train_batch_end(trainer, None, None, None, 0)
    bar.on_validation_start(trainer, None)
    bar.on_validation_end(trainer, None)
    bar.on_train_epoch_end(trainer, SimpleNamespace(epoch_train_loss=0.25))
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("epoch 5 (6 of 10): batch 1/10")
    assert lines[1] == "epoch 5 (6 of 10) done in 12 s: train loss 0.2500, val acc 0.5000"


def test_the_time_left_of_a_validation_is_its_own_not_the_training_epochs(clock, capsys):
    """Validation inside a fit counted its time from the epoch's start: after 100 s of training, one
    validation batch of ten done 1 s in said 'about 15 min 09 s left' (909 s) instead of 9 s."""
    bar, trainer = LogLineProgress(interval=0.0), _trainer()
    bar._trainer = trainer
    bar.on_train_epoch_start(trainer, None)
    clock.now = 100.0
    bar.on_train_batch_end(trainer, None, None, None, 9)
    bar.on_validation_start(trainer, None)
    clock.now = 101.0
    bar.on_validation_batch_end(trainer, None, None, None, 0)
    clock.now = 103.0
    bar.on_validation_end(trainer, None)
    bar.on_train_epoch_end(trainer, SimpleNamespace(epoch_train_loss=None))
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == "validation: batch 1/10, 1.0 s so far, about 9.0 s left"
    assert lines[2].startswith("epoch 0 (1 of 10) done in 1 min 43 s")  # the epoch's time: training and validation


def test_the_time_left_of_an_epoch_resumed_midway_counts_only_this_processs_batches(clock, capsys):
    """Resumed from a checkpoint taken at batch 6 of 10, the epoch's first batch here is index 6:
    2 batches in 20 s leave 2 more, about 20 s, not the 5 s that 8 batches in 20 s would give."""
    bar, trainer = LogLineProgress(interval=0.0), _trainer()
    bar._trainer = trainer
    bar.on_train_epoch_start(trainer, None)
    clock.now = 10.0
    bar.on_train_batch_end(trainer, None, None, None, 6)
    clock.now = 20.0
    bar.on_train_batch_end(trainer, None, None, None, 7)
    assert capsys.readouterr().out.splitlines()[-1] == "epoch 0 (1 of 10): batch 8/10, 20 s so far, about 20 s left"


def test_the_kits_own_bars_leave_a_short_job_out_of_a_log(monkeypatch):
    """extract, the decoded cache, report and predict-onnx draw tqdm bars: in a log file a job
    shorter than the interval writes nothing (no "0%" and "100%" pair per call), a longer one
    a whole line every interval, never carriage-return redraws."""
    import io

    import tqdm.std

    from vision_tl.utils import LOG_INTERVAL, progress_bar

    clock = _Clock()
    monkeypatch.setattr(tqdm.std, "time", clock)
    log = io.StringIO()
    with progress_bar(total=4, desc="short", file=log) as bar:
        for _ in range(4):
            clock.now += 1.0
            bar.update(1)
    assert log.getvalue() == ""

    with progress_bar(total=4, desc="long", file=log) as bar:
        for _ in range(4):
            clock.now += LOG_INTERVAL
            bar.update(1)
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and log.getvalue().endswith("\n")
    assert len(lines) == 4 and all(line.startswith("long:") for line in lines)  # closing repeats none
    assert [line.split("|")[2].split()[0] for line in lines] == ["1/4", "2/4", "3/4", "4/4"]


def test_a_finished_bar_in_a_log_is_one_line_though_its_closing_rate_differs(monkeypatch):
    """tqdm redraws a bar on closing with the run's average rate instead of its smoothed one: a
    log showed "100% 239/239" twice, at 4.19 and 3.83 img/s. A bar still counting keeps its line
    every interval, however little it moved."""
    import io

    import tqdm.std

    from vision_tl.utils import LOG_INTERVAL, progress_bar

    clock = _Clock()
    monkeypatch.setattr(tqdm.std, "time", clock)
    log = io.StringIO()
    with progress_bar(total=4, desc="uneven", file=log) as bar:
        for step in (1, 1, 4, 1):  # (uneven steps: the smoothed rate is not the average)
            clock.now += step * LOG_INTERVAL
            bar.update(1)
    lines = log.getvalue().splitlines()
    assert [line.split("|")[2].split()[0] for line in lines] == ["1/4", "2/4", "3/4", "4/4"]
    log = io.StringIO()
    with progress_bar(total=4, desc="stalled", file=log) as bar:
        clock.now += LOG_INTERVAL
        bar.update(1)
        for _ in range(2):  # nothing done: the line again, a later time on it
            clock.now += LOG_INTERVAL
            bar.refresh()
    # (and the unfinished bar's closing line)
    assert [line.split("|")[2].split()[0] for line in log.getvalue().splitlines()] == ["1/4"] * 4


def test_a_fast_loops_bar_in_a_log_is_not_redrawn_by_tqdms_monitor_between_intervals(monkeypatch):
    """A loop of many iterations a second raises the bar's ``miniters``; tqdm's monitor thread then
    redraws the bar once ``maxinterval`` (10 s by default) has passed since its last line: a log got
    lines at 30, 40, 60 and 70 s instead of one every interval."""
    import io

    import tqdm.std

    from vision_tl.utils import LOG_INTERVAL, progress_bar

    clock = _Clock()
    monkeypatch.setattr(tqdm.std, "time", clock)
    with progress_bar(total=10**6, desc="fast", file=io.StringIO()) as bar:
        for _ in range(int(LOG_INTERVAL) * 200 + 200):  # 200 iterations a second, past the first line
            clock.now += 0.005
            bar.update(1)
        assert bar.miniters > 1 and bar.last_print_t > 0
        clock.now = bar.last_print_t + LOG_INTERVAL / 2
        # what tqdm's monitor checks (tqdm._monitor.TMonitor.run) before it redraws a bar
        assert not (bar.miniters > 1 and clock.now - bar.last_print_t >= bar.maxinterval)


def test_a_warning_between_two_lines_of_a_bar_in_a_log_is_a_line_of_its_own(monkeypatch):
    """The bar's line was left open until its next redraw: a warning written to the same stream
    meanwhile (a dim image, a failed decode) was glued to the end of the progress line, and the
    next redraw left an empty line after it."""
    import io

    import tqdm.std

    from vision_tl.utils import LOG_INTERVAL, progress_bar

    clock = _Clock()
    monkeypatch.setattr(tqdm.std, "time", clock)
    log = io.StringIO()
    with progress_bar(total=3, desc="bar", file=log) as bar:
        for _ in range(3):
            clock.now += LOG_INTERVAL
            bar.update(1)
            log.write("x.py:1: UserWarning: a warning\n")
    lines = log.getvalue().splitlines()
    assert [line.split(":")[0] for line in lines] == ["bar", "x.py", "bar", "x.py", "bar", "x.py"]
