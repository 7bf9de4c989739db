"""A real SIGTERM mid-training leaves a resumable run that ends exactly like an uninterrupted one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from vision_tl.cli import main

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
EPOCHS = 4


def _args(data: Path, save_dir: Path) -> list[str]:
    return ["fit", "--config", str(CONFIGS / "partial.yaml"), "--data.root", str(data),
            "--model.backbone", "test_efficientnet", "--model.pretrained", "false", "--model.image_size", "32",
            "--data.batch_size", "4", "--data.num_workers", "0", "--data.augment", "inspection",
            "--trainer.max_epochs", str(EPOCHS), "--trainer.enable_progress_bar", "false",
            "--trainer.logger.init_args.save_dir", str(save_dir)]


def _final_state(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]


@pytest.mark.slow
def test_sigterm_then_resume_matches_uninterrupted_run(inspection_folder, tmp_path, capsys):
    assert main(_args(inspection_folder, tmp_path / "a")) == 0
    reference = tmp_path / "a" / "partial" / "version_0"

    run = tmp_path / "b" / "partial" / "version_0"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "vision_tl.cli", *_args(inspection_folder, tmp_path / "b")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    deadline = time.time() + 300
    while not (run / "checkpoints" / "last.ckpt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=300)
    interrupted_at = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["epoch"]
    assert interrupted_at < EPOCHS - 1, f"training finished before the signal arrived:\n{output}"
    assert "resume" in output, output
    assert proc.returncode == 143, output  # stopped, not finished: a job script must see it failed
    # the finished epochs' metrics are there already (compare and report read them)
    stopped = json.loads((run / "metrics.json").read_text())
    assert len(stopped["history"]) >= interrupted_at + 1 and stopped["val"]["epoch"] in range(len(stopped["history"]))

    # A newer run beside it: `--ckpt_path last` with this run's config still means this run.
    newer = tmp_path / "b" / "partial" / "version_5" / "checkpoints"
    newer.mkdir(parents=True)
    (newer / "last.ckpt").write_bytes((reference / "checkpoints" / "last.ckpt").read_bytes())
    capsys.readouterr()
    assert main(["fit", "--config", str(run / "config.yaml"), "--ckpt_path", "last"]) == 0
    assert f"resuming {run}" in capsys.readouterr().out
    assert not (tmp_path / "b" / "partial" / "version_1").exists()  # resumed into the same run
    # The resumed run's config still serves the evaluation commands (it must not pin the run directory).
    assert main(["validate", "--config", str(run / "config.yaml"),
                 "--ckpt_path", str(run / "checkpoints" / "best.ckpt")]) == 0
    # ... nor the checkpoint it resumed from: `fit --config RUN/config.yaml` starts a new run
    assert yaml.safe_load((run / "config.yaml").read_text()).get("ckpt_path") is None
    # without a checkpoint, evaluating would score an untrained head: refused, naming the file
    capsys.readouterr()
    info = main(["validate", "--config", str(run / "config.yaml")])
    assert info == 2
    assert f"--ckpt_path {run / 'checkpoints' / 'best.ckpt'}" in capsys.readouterr().err
    assert main(["validate", "--config", str(run / "config.yaml"), "--ckpt_path", "last"]) == 0  # this run's
    resumed, expected = _final_state(run), _final_state(reference)
    for key, value in expected.items():
        assert torch.allclose(resumed[key].float(), value.float(), atol=1e-5), key
    a = json.loads((reference / "metrics.json").read_text())
    b = json.loads((run / "metrics.json").read_text())
    assert a["val_last"]["acc"] == pytest.approx(b["val_last"]["acc"])
    assert a["val_last"]["confusion_matrix"] == b["val_last"]["confusion_matrix"]
    assert a["history"] == b["history"]  # the epochs before the stop are kept too
    assert (run / "metrics.before_resume_1.csv").is_file()  # the step log is not lost


def test_full_disk_while_checkpointing_keeps_the_previous_checkpoint(inspection_folder, tmp_path, monkeypatch):
    import errno

    import lightning.fabric.plugins.io.torch_io as torch_io

    assert main(_args(inspection_folder, tmp_path)[:-4] + ["--trainer.max_epochs", "1",
                                                           "--trainer.logger.init_args.save_dir", str(tmp_path)]) == 0
    run = tmp_path / "partial" / "version_0"
    before = (run / "checkpoints" / "last.ckpt").read_bytes()

    def full_disk(checkpoint, path, *args, **kwargs):
        with open(path, "wb") as fh:
            fh.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch_io, "_atomic_save", full_disk)
    info = main(["fit", "--config", str(run / "config.yaml"), "--ckpt_path", "last", "--trainer.max_epochs", "2"])
    assert info == 2
    assert (run / "checkpoints" / "last.ckpt").read_bytes() == before
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]


def test_same_seed_gives_identical_split_and_frozen_metrics(inspection_folder, tmp_path):
    runs = []
    for name in ("one", "two"):
        args = _args(inspection_folder, tmp_path / name)
        args[args.index(str(CONFIGS / "partial.yaml"))] = str(CONFIGS / "frozen.yaml")
        args += ["--model.feature_cache", str(tmp_path / name / "cache"), "--trainer.max_epochs", "3"]
        assert main(args) == 0
        runs.append(tmp_path / name / "frozen" / "version_0")
    a, b = (json.loads((r / "metrics.json").read_text()) for r in runs)
    assert a["history"] == b["history"] and a["val"] == b["val"]
    split_a, split_b = (json.loads((r / "split.json").read_text()) for r in runs)
    assert split_a["train"] == split_b["train"] and split_a["val"] == split_b["val"]


def _snapshot(run: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}


@pytest.mark.slow
def test_resume_refuses_other_data_before_touching_the_run(inspection_folder, tmp_path, capsys):
    """Resuming on other classes or other images fails, and the run's files stay as they were."""
    import shutil

    args = [*_args(inspection_folder, tmp_path), "--trainer.max_epochs", "1"]
    assert main(args) == 0
    run = tmp_path / "partial" / "version_0"
    config = (run / "config.yaml").read_text()
    assert f"root: {inspection_folder.resolve()}" in config and f"save_dir: {tmp_path.resolve()}" in config
    assert json.loads((run / "split.json").read_text())["root"] == str(inspection_folder.resolve())
    before = _snapshot(run)

    more = tmp_path / "more"  # the same classes, plus new images
    shutil.copytree(inspection_folder, more)
    for i, src in enumerate(sorted(more.glob("good/*.png"))[:3]):
        shutil.copy(src, src.with_name(f"new_{i}.png"))
    changed = tmp_path / "changed"  # one image re-shot under its old name
    shutil.copytree(inspection_folder, changed)
    retaken = sorted(changed.glob("good/*.png"))[0]
    from PIL import Image

    Image.new("RGB", (40, 40), (1, 2, 3)).save(retaken)
    (tmp_path / "other").mkdir()  # other classes
    for name in ("dent", "good"):
        shutil.copytree(inspection_folder / "good", tmp_path / "other" / name)
    cases = ((more, [], "(3 new, e.g. good/new_0.png)"),  # the added files, not ones a new split moved
             (changed, [], f"(1 changed (other content or class), e.g. good/{retaken.name})"),
             (tmp_path / "other", [], "it was trained on the classes"),
             (inspection_folder, ["--data.seed", "7"], "split into train and val differently"),
             (inspection_folder, ["--model.image_size", "48"], "model settings differ: image_size 48"),
             (inspection_folder, ["--data.batch_size", "8"], "it trained with --data.batch_size 4, and this command gives 8"))
    for data, extra, expected in cases:
        capsys.readouterr()
        info = main(["fit", "--config", str(run / "config.yaml"), "--ckpt_path", "last", "--data.root", str(data),
              "--trainer.max_epochs", "2", *extra])
        assert info == 2
        err = capsys.readouterr().err
        assert expected in err and "start a new run" in err and "resume from the end" not in err
        assert _snapshot(run) == before


@pytest.mark.slow
def test_continuing_into_a_new_run_refuses_another_batch_size(inspection_folder, tmp_path, capsys):
    """A checkpoint continued in a new run directory (another save_dir, or the file moved out of
    its run) goes on step by step like a resume: another batch size is refused there too."""
    import shutil

    assert main([*_args(inspection_folder, tmp_path / "a"), "--trainer.max_epochs", "1"]) == 0
    last = tmp_path / "a" / "partial" / "version_0" / "checkpoints" / "last.ckpt"
    moved = tmp_path / "kept.ckpt"
    shutil.copy(last, moved)
    for ckpt, named in ((last, last.parent.parent), (moved, moved)):
        info = main([*_args(inspection_folder, tmp_path / "b"), "--trainer.max_epochs", "2", "--ckpt_path", str(ckpt),
              "--data.batch_size", "8"])
        assert info == 2
        err = capsys.readouterr().err
        assert f"resuming {named}: it trained with --data.batch_size 4, and this command gives 8" in err
    assert not (tmp_path / "b" / "partial").exists() or not any((tmp_path / "b" / "partial").iterdir())


def test_a_batch_size_edited_into_the_runs_config_is_refused_on_resume(inspection_folder, tmp_path, capsys):
    """The check read the run's own config.yaml, which the README has users pass back: an edited
    batch size resumed, and the original one was then refused as the 'other' one."""
    assert main([*_args(inspection_folder, tmp_path), "--trainer.max_epochs", "1"]) == 0
    run = tmp_path / "partial" / "version_0"
    config = run / "config.yaml"
    config.write_text(config.read_text().replace("batch_size: 4", "batch_size: 8"))
    info = main(["fit", "--config", str(config), "--ckpt_path", "last", "--trainer.max_epochs", "2"])
    assert info == 2
    assert f"resuming {run}: it trained with --data.batch_size 4, and this command gives 8" in capsys.readouterr().err


def test_resume_of_a_run_it_cannot_write_is_refused_before_touching_it(inspection_folder, tmp_path, capsys,
                                                                         monkeypatch):
    import tempfile

    assert main([*_args(inspection_folder, tmp_path), "--trainer.max_epochs", "1", "--model.mode", "frozen"]) == 0
    run = tmp_path / "partial" / "version_0"
    before = sorted(p.name for p in run.iterdir())
    real = tempfile.mkstemp
    monkeypatch.setattr(tempfile, "mkstemp", lambda *a, dir=None, **k: (_ for _ in ()).throw(
        PermissionError(13, "Permission denied")) if dir is not None and Path(dir) == run else real(*a, dir=dir, **k))
    info = main(["fit", "--config", str(run / "config.yaml"), "--ckpt_path", "last", "--trainer.max_epochs", "2"])
    assert info == 2
    assert f"resuming {run}: cannot write in it (Permission denied)" in capsys.readouterr().err
    assert sorted(p.name for p in run.iterdir()) == before


def test_a_fast_dev_run_of_a_resume_is_refused_before_touching_the_run(inspection_folder, tmp_path, capsys):
    """A smoke test writes nothing, but its resume renamed the run's metrics.csv to
    metrics.before_resume_1.csv, then failed on the learning-rate schedule of one step."""
    assert main([*_args(inspection_folder, tmp_path), "--trainer.max_epochs", "1", "--model.mode", "frozen"]) == 0
    run = tmp_path / "partial" / "version_0"
    before = sorted(p.name for p in run.iterdir())
    info = main(["fit", "--config", str(run / "config.yaml"), "--ckpt_path", "last", "--trainer.max_epochs", "2",
                 "--trainer.fast_dev_run", "true"])
    assert sorted(p.name for p in run.iterdir()) == before
    assert info == 2 and "--trainer.fast_dev_run with --ckpt_path" in capsys.readouterr().err


def test_an_interrupted_fast_dev_run_names_no_checkpoint_to_resume(inspection_folder, tmp_path, monkeypatch, capsys):
    """A smoke test has no run directory (Lightning gives it no logger): the hint looked for
    ./checkpoints/last.ckpt, and in a run's folder told to resume that run, which it never touched."""
    from vision_tl.tasks.classifier import ImageClassifier

    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"another run's")
    monkeypatch.chdir(tmp_path)

    def interrupted(self, batch, batch_idx):
        raise KeyboardInterrupt
    monkeypatch.setattr(ImageClassifier, "training_step", interrupted)
    main([*_args(inspection_folder, tmp_path / "runs"), "--trainer.fast_dev_run", "true"])
    out = capsys.readouterr().out
    assert "vision_tl: interrupted; nothing was written: run the same command again" in out
    assert "--ckpt_path" not in out


def test_a_frozen_resume_takes_its_features_from_the_checkpoints_backbone(inspection_folder, tmp_path):
    """The feature cache was filled before Lightning restored the checkpoint: with the weights file
    the config names changed since, the head trained on features of weights the run never had."""
    import shutil

    from vision_tl.backbones import create_backbone

    weights = tmp_path / "backbone.pth"
    original = create_backbone("test_efficientnet", pretrained=False).state_dict()
    torch.save(original, weights)
    args = [*_args(inspection_folder, tmp_path / "runs"), "--model.mode", "frozen", "--model.pretrained", "true",
            "--model.weights", str(weights), "--data.augment", "none", "--model.feature_cache", str(tmp_path / "cache"),
            "--trainer.max_epochs", "1"]
    assert main(args) == 0
    run = tmp_path / "runs" / "partial" / "version_0"
    copy = tmp_path / "runs" / "partial" / "copy"
    shutil.copytree(run, copy)
    losses = []
    for folder, scale in ((run, 1.0), (copy, 1.5)):
        torch.save({k: v * scale if v.is_floating_point() else v for k, v in original.items()}, weights)
        assert main(["fit", "--config", str(folder / "config.yaml"), "--ckpt_path", "last",
                     "--trainer.max_epochs", "2"]) == 0
        losses.append(json.loads((folder / "metrics.json").read_text())["history"][-1]["tie_break"])  # val/loss
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_resume_of_a_non_square_run(inspection_folder, tmp_path, capsys):
    """image_size [32, 48] as the command line parses it (a tuple) is the list the checkpoint
    holds: the resume goes on instead of reporting a change of model settings."""
    args = [*_args(inspection_folder, tmp_path), "--model.image_size", "[32, 48]", "--data.augment", "light",
            "--trainer.max_epochs", "1"]
    assert main(args) == 0
    run = tmp_path / "partial" / "version_0"
    capsys.readouterr()
    with warnings.catch_warnings(record=True) as shown:  # (the filters as the kit left them)
        assert main(["fit", "--config", str(run / "config.yaml"), "--ckpt_path", "last",
                     "--trainer.max_epochs", "2"]) == 0
    assert f"resuming {run}" in capsys.readouterr().out
    assert torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["epoch"] == 1
    # Lightning's alarm about the run's own, non-empty checkpoints/ folder: expected on every resume
    assert not [w for w in shown if "exists and is not empty" in str(w.message)]


@pytest.mark.slow
def test_a_run_started_without_a_config_resumes_in_place_from_another_directory(inspection_folder, tmp_path,
                                                                               monkeypatch, capsys):
    """`vision-tl fit --data.root DIR` (no --config) gets an explicit logger with an absolute
    folder in its config.yaml, so `--config RUN/config.yaml --ckpt_path last` continues that run
    wherever it is typed, instead of a new run under the current directory."""
    (tmp_path / "here").mkdir()
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    assert main(["fit", "--data.root", str(inspection_folder), "--model.backbone", "test_efficientnet",
                 "--model.pretrained", "false", "--model.image_size", "32", "--data.batch_size", "8",
                 "--data.num_workers", "0", "--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false"]) == 0
    run = tmp_path / "here" / "runs" / "lightning_logs" / "version_0"
    assert (run / "checkpoints" / "last.ckpt").is_file()
    monkeypatch.chdir(tmp_path / "elsewhere")
    capsys.readouterr()
    assert main(["fit", "--config", str(run / "config.yaml"), "--ckpt_path", "last", "--trainer.max_epochs", "2"]) == 0
    assert f"resuming {run}" in capsys.readouterr().out
    assert not any((tmp_path / "elsewhere").iterdir())
    assert torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["epoch"] == 1
    # --trainer.default_root_dir still says where such runs go
    assert main(["fit", "--data.root", str(inspection_folder), "--model.backbone", "test_efficientnet",
                 "--model.pretrained", "false", "--model.image_size", "32", "--data.batch_size", "8",
                 "--data.num_workers", "0", "--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false",
                 "--trainer.default_root_dir", str(tmp_path / "chosen")]) == 0
    assert (tmp_path / "chosen" / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt").is_file()
    assert not any((tmp_path / "elsewhere").iterdir())


@pytest.mark.slow
def test_a_run_being_trained_is_neither_resumed_nor_shared(inspection_folder, tmp_path, monkeypatch, capsys):
    """A resume of a run that another process is training (a scheduler's retry, a second shell)
    is refused before anything in the run changes; two fits that picked the same new version
    (started at the same moment) do not both write into it. The other process is stood in for
    by a lock taken here, on another descriptor."""
    import fcntl

    from lightning.pytorch.loggers import CSVLogger

    assert main([*_args(inspection_folder, tmp_path), "--trainer.max_epochs", "1"]) == 0
    run = tmp_path / "partial" / "version_0"
    before = _snapshot(run)
    other, second = os.open(run, os.O_RDONLY), None
    try:
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        capsys.readouterr()
        info = main(["fit", "--config", str(run / "config.yaml"), "--ckpt_path", "last", "--trainer.max_epochs", "2"])
        assert info == 2
        assert "another process is training that run right now" in capsys.readouterr().err
        assert _snapshot(run) == before
        taken = tmp_path / "partial" / "version_1"  # made by the other command, which picked it first
        taken.mkdir()
        second = os.open(taken, os.O_RDONLY)
        fcntl.flock(second, fcntl.LOCK_EX | fcntl.LOCK_NB)
        monkeypatch.setattr(CSVLogger, "_get_next_version", lambda self: 1)
        info = main([*_args(inspection_folder, tmp_path), "--trainer.max_epochs", "1"])
        assert info == 2
        assert f"run directory {taken} is in use by another command" in capsys.readouterr().err
        assert list(taken.iterdir()) == []  # nothing written into the other command's run
    finally:
        for fd in filter(None, (other, second)):
            os.close(fd)
    monkeypatch.undo()
    assert main(["fit", "--config", str(run / "config.yaml"), "--ckpt_path", "last", "--trainer.max_epochs", "2"]) == 0


def _train_val_copy(source: Path, dest: Path) -> Path:
    """``dest/train/<class>/`` and ``dest/val/<class>/`` from a class-folder layout."""
    import shutil

    for folder in sorted(p for p in source.iterdir() if p.is_dir()):
        files = sorted(folder.iterdir())
        for part, chosen in (("train", files[3:]), ("val", files[:3])):
            (dest / part / folder.name).mkdir(parents=True)
            for src in chosen:
                shutil.copy(src, dest / part / folder.name / src.name)
    return dest


@pytest.mark.slow
def test_resume_of_a_train_val_run_on_another_folder_is_refused(inspection_folder, tmp_path, capsys):
    """A train/ + val/ run has no split.json to check images by: resuming it with another folder
    of the same classes (--ckpt_path last picks the newest run of the recipe) must not train it
    on those images."""
    first = _train_val_copy(inspection_folder, tmp_path / "line1")
    other = _train_val_copy(inspection_folder, tmp_path / "line2")
    assert main([*_args(first, tmp_path), "--trainer.max_epochs", "1"]) == 0
    run = tmp_path / "partial" / "version_0"
    before = _snapshot(run)
    info = main([*_args(other, tmp_path), "--trainer.max_epochs", "2", "--ckpt_path", "last"])
    err = capsys.readouterr().err
    assert info == 2
    assert f"it was trained on {first.resolve()}, but this command's data is {other}" in err
    assert f"--config {run / 'config.yaml'} --ckpt_path last" in err
    assert _snapshot(run) == before


def test_ckpt_path_last_of_a_run_without_checkpoints_is_refused(inspection_folder, tmp_path, capsys):
    """A run killed before its first epoch ended has nothing to resume; `last` must not fall back
    to another run's checkpoint."""
    args = [*_args(inspection_folder, tmp_path), "--trainer.max_epochs", "1", "--model.mode", "frozen"]
    assert main(args) == 0
    finished = tmp_path / "partial" / "version_0"
    killed = tmp_path / "partial" / "version_1"
    killed.mkdir()
    for name in ("config.yaml", "labels.json", "hparams.yaml"):
        shutil_copy = (finished / name).read_bytes()
        (killed / name).write_bytes(shutil_copy)
    before = _snapshot(finished)
    info = main(["fit", "--config", str(killed / "config.yaml"), "--ckpt_path", "last"])
    assert info == 2
    err = capsys.readouterr().err
    assert f"run {killed} has no checkpoints/last.ckpt" in err
    assert _snapshot(finished) == before


def test_resume_of_a_run_started_with_a_relative_runs_folder_updates_best_and_last(inspection_folder, tmp_path,
                                                                                   monkeypatch):
    """Runs started before run folders were recorded absolute have relative checkpoint paths;
    resuming them must still rewrite best.ckpt/last.ckpt, not add best-v1.ckpt beside stale ones."""
    monkeypatch.chdir(tmp_path)
    args = [*_args(inspection_folder, Path("runs")), "--trainer.max_epochs", "1", "--model.mode", "frozen"]
    assert main(args) == 0
    run = tmp_path / "runs" / "partial" / "version_0"
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    for key, state in ckpt["callbacks"].items():
        if key.startswith("RunCheckpoint"):
            for name in ("dirpath", "best_model_path", "last_model_path", "kth_best_model_path"):
                if isinstance(state.get(name), str):
                    state[name] = state[name].replace(str(tmp_path) + os.sep, "")
            state["best_k_models"] = {k.replace(str(tmp_path) + os.sep, ""): v
                                      for k, v in state["best_k_models"].items()}
            assert not state["dirpath"].startswith("/")
    torch.save(ckpt, run / "checkpoints" / "last.ckpt")
    assert main(["fit", "--config", str(run / "config.yaml"), "--ckpt_path", "last",
                 "--trainer.max_epochs", "3"]) == 0
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 2


def test_fit_ckpt_path_best_names_the_runs_best_checkpoint_file(inspection_folder, tmp_path, capsys):
    """`best` means a file of the run for validate/test/predict only: fit says what it takes and
    which file to give, instead of 'checkpoint best does not exist'."""
    assert main([*_args(inspection_folder, tmp_path), "--trainer.max_epochs", "1", "--model.mode", "frozen"]) == 0
    run = tmp_path / "partial" / "version_0"
    before = _snapshot(run)
    capsys.readouterr()
    info = main(["fit", "--config", str(run / "config.yaml"), "--ckpt_path", "best", "--trainer.max_epochs", "2"])
    err = capsys.readouterr().err
    assert info == 2
    assert "fit resumes from 'last'" in err and f"--ckpt_path {run / 'checkpoints' / 'best.ckpt'}" in err
    assert _snapshot(run) == before
    assert main(["fit", "--config", str(run / "config.yaml"), "--ckpt_path", str(run / "checkpoints" / "best.ckpt"),
                 "--trainer.max_epochs", "2"]) == 0  # the file it names resumes


def test_resume_survives_a_damaged_metrics_json_and_names_best_without_last(inspection_folder, tmp_path, capsys):
    """A cut-off metrics.json must not fail a resume after an epoch of training: it is set aside
    and rewritten from the checkpoint's history. A run killed while writing its first last.ckpt
    (best.ckpt already written) is pointed at best.ckpt, not told to start again."""
    args = [*_args(inspection_folder, tmp_path), "--trainer.max_epochs", "1", "--model.mode", "frozen"]
    assert main(args) == 0
    run = tmp_path / "partial" / "version_0"
    (run / "metrics.json").write_text('{"classes": [')
    with pytest.warns(UserWarning, match="metrics.json is not valid JSON"):
        assert main(["fit", "--config", str(run / "config.yaml"), "--ckpt_path", "last",
                     "--trainer.max_epochs", "2"]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert [r["epoch"] for r in metrics["history"]] == [0, 1]
    assert (run / "metrics.damaged.json").read_text() == '{"classes": ['
    (run / "checkpoints" / "last.ckpt").unlink()
    capsys.readouterr()
    info = main(["fit", "--config", str(run / "config.yaml"), "--ckpt_path", "last", "--trainer.max_epochs", "3"])
    assert info == 2
    assert f"resume from that epoch with --ckpt_path {run / 'checkpoints' / 'best.ckpt'}" in capsys.readouterr().err
    (run / "labels.json").write_text('["crack", "good"')  # cut off: named, not a bare JSON error
    info = main(["fit", "--config", str(run / "config.yaml"), "--ckpt_path", str(run / "checkpoints" / "best.ckpt"),
          "--trainer.max_epochs", "3"])
    assert info == 2
    assert f"resuming {run}: its labels.json (the class names in index order) cannot be read" in capsys.readouterr().err


@pytest.mark.slow
def test_a_run_trained_on_another_runs_split_file_resumes(inspection_folder, tmp_path, capsys):
    """Its config names that split file; the resume check splits the folder the same way, also
    after images were added to it (they are in neither split)."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(inspection_folder, data)
    first = [*_args(data, tmp_path / "a"), "--trainer.max_epochs", "1"]
    assert main(first) == 0
    split = tmp_path / "a" / "partial" / "version_0" / "split.json"
    for i, src in enumerate(sorted(data.glob("good/*.png"))[:3]):
        shutil.copy(src, src.with_name(f"new_{i}.png"))
    with pytest.warns(UserWarning, match="does not list"):
        assert main([*_args(data, tmp_path / "b"), "--trainer.max_epochs", "1", "--data.split_file", str(split)]) == 0
    run = tmp_path / "b" / "partial" / "version_0"
    capsys.readouterr()
    assert main(["fit", "--config", str(run / "config.yaml"), "--ckpt_path", "last", "--trainer.max_epochs", "2"]) == 0
    assert "not the split of the checkpoint's run" not in capsys.readouterr().err
    assert torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["epoch"] == 1


@pytest.mark.slow
def test_a_run_continued_after_its_folder_moved_gets_its_own_best_checkpoint(inspection_folder, tmp_path):
    """The new run folder sits where the old one was: the best score the checkpoint carries
    belongs to a best.ckpt this folder does not have, and must not stop it from writing its own."""
    assert main([*_args(inspection_folder, tmp_path / "runs"), "--trainer.max_epochs", "1"]) == 0
    (tmp_path / "runs").rename(tmp_path / "archived")
    moved = tmp_path / "archived" / "partial" / "version_0"
    assert main(["fit", "--config", str(moved / "config.yaml"), "--ckpt_path", "last", "--trainer.max_epochs", "2"]) == 0
    run = tmp_path / "runs" / "partial" / "version_0"
    best = torch.load(run / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)
    assert best["epoch"] == 1 == json.loads((run / "metrics.json").read_text())["val"]["epoch"]


def test_a_renamed_run_resumes_in_place_without_versioned_checkpoints(inspection_folder, tmp_path):
    """A run folder renamed (version_0 -> baseline) and resumed wrote best-v1.ckpt/last-v1.ckpt
    beside stale best.ckpt/last.ckpt, and metrics.json named an epoch best.ckpt did not hold."""
    assert main([*_args(inspection_folder, tmp_path / "runs"), "--trainer.max_epochs", "1"]) == 0
    run = tmp_path / "runs" / "partial" / "baseline"
    (tmp_path / "runs" / "partial" / "version_0").rename(run)
    assert main(["fit", "--config", str(run / "config.yaml"), "--ckpt_path", "last", "--trainer.max_epochs", "3"]) == 0
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 2
    best = torch.load(run / "checkpoints" / "best.ckpt", weights_only=True)["epoch"]
    assert json.loads((run / "metrics.json").read_text())["val"]["epoch"] == best


@pytest.mark.slow
def test_a_loss_monitored_run_names_the_epoch_of_its_best_checkpoint(inspection_folder, tmp_path):
    assert main([*_args(inspection_folder, tmp_path), "--trainer.max_epochs", "3", "--checkpoint.monitor", "val/loss",
                 "--checkpoint.mode", "min"]) == 0
    run = tmp_path / "partial" / "version_0"
    metrics = json.loads((run / "metrics.json").read_text())
    best = torch.load(run / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)
    losses = {r["epoch"]: r["monitored"] for r in metrics["history"]}
    assert metrics["val"]["epoch"] == best["epoch"] == min(losses, key=losses.get)


@pytest.mark.slow
def test_a_run_continued_into_a_new_folder_names_a_best_epoch_of_its_own(inspection_folder, tmp_path):
    assert main([*_args(inspection_folder, tmp_path), "--trainer.max_epochs", "1"]) == 0
    first = tmp_path / "partial" / "version_0"
    assert main(["fit", "--config", str(first / "config.yaml"), "--ckpt_path", str(first / "checkpoints" / "last.ckpt"),
                 "--trainer.logger.init_args.name", "cont", "--trainer.max_epochs", "2"]) == 0
    run = tmp_path / "cont" / "version_0"
    best = torch.load(run / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)
    assert best["epoch"] == 1 == json.loads((run / "metrics.json").read_text())["val"]["epoch"]


@pytest.mark.slow
def test_a_partial_run_from_before_the_last_stage_took_the_final_norm_resumes(inspection_folder, tmp_path, monkeypatch,
                                                                              capsys):
    """A partial ConvNeXt run checkpointed while its final norm was a stage of its own (so
    trainable_stages=2 trained one real stage and that norm) resumes training what it trained
    (it failed with the optimizer's "parameter group that doesn't match the size"); where no
    number of stages trains that (trainable_stages=1: the norm alone) the refusal says why."""
    import vision_tl.backbones._stages as stages_module

    def args(save_dir, stages):
        return [*_args(inspection_folder, save_dir), "--model.backbone", "test_convnext", "--trainer.max_epochs", "1",
                "--model.trainable_stages", str(stages), "--data.augment", "none"]

    for stages in (2, 1):
        with monkeypatch.context() as old_grouping:
            old_grouping.setattr(stages_module, "_matched", lambda matcher, name: True)  # nothing left to merge
            assert main(args(tmp_path / str(stages), stages)) == 0
    capsys.readouterr()
    with pytest.warns(UserWarning, match=r"trains the last 1 stage\(s\), as the checkpoint did \([\d,]+ of [\d,]+ parameters train"):
        info = main(["fit", "--config", str(tmp_path / "2" / "partial" / "version_0" / "config.yaml"),
                     "--ckpt_path", "last", "--trainer.max_epochs", "2"])
    assert info == 0, capsys.readouterr().err
    capsys.readouterr()
    assert main(["fit", "--config", str(tmp_path / "1" / "partial" / "version_0" / "config.yaml"),
                 "--ckpt_path", "last", "--trainer.max_epochs", "2"]) == 2
    err = capsys.readouterr().err
    assert "counts the stages of test_convnext differently" in err and "start a new run" in err
    assert "doesn't match the size" not in err


def test_a_run_started_from_relative_weights_resumes_from_another_directory(inspection_folder, tmp_path,
                                                                            monkeypatch, capsys):
    """`--model.weights FILE` given relative to the working directory is recorded absolute, as the data
    root is: `fit --config RUN/config.yaml --ckpt_path last` typed elsewhere continues the run instead
    of stopping at 'weights file ... does not exist'."""
    import timm

    (tmp_path / "here").mkdir()
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    torch.save(timm.create_model("test_efficientnet").state_dict(), "start.pth")
    assert main([*_args(inspection_folder, tmp_path / "runs"), "--model.pretrained", "true",
                 "--model.weights", "start.pth", "--trainer.max_epochs", "1", "--model.mode", "frozen"]) == 0
    run = tmp_path / "runs" / "partial" / "version_0"
    assert yaml.safe_load((run / "config.yaml").read_text())["model"]["weights"] == str(tmp_path / "here" / "start.pth")
    monkeypatch.chdir(tmp_path / "elsewhere")
    capsys.readouterr()
    assert main(["fit", "--config", str(run / "config.yaml"), "--ckpt_path", "last", "--trainer.max_epochs", "2"]) == 0
    assert f"resuming {run}" in capsys.readouterr().out
    assert torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["epoch"] == 1


def test_cache_folders_given_relative_are_recorded_absolute(inspection_folder, tmp_path, monkeypatch):
    """`--model.feature_cache DIR` / `--data.decoded_cache DIR` typed relative were saved as typed: a
    resume from another folder then started a new, empty cache there without a word. Switch words
    (auto, true) stay as they are, for the model and data module to read."""
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    monkeypatch.setenv("VISION_TL_CACHE", str(tmp_path / "default-features"))  # (auto, true: not the user's)
    monkeypatch.setenv("VISION_TL_DECODED_CACHE", str(tmp_path / "default-decoded"))
    assert main([*_args(inspection_folder, tmp_path / "runs"), "--trainer.max_epochs", "1", "--model.mode", "frozen",
                 "--model.feature_cache", "feats", "--data.decoded_cache", "pixels"]) == 0
    config = yaml.safe_load((tmp_path / "runs" / "partial" / "version_0" / "config.yaml").read_text())
    assert config["model"]["feature_cache"] == str(tmp_path / "here" / "feats")
    assert config["data"]["decoded_cache"] == str(tmp_path / "here" / "pixels")
    assert main([*_args(inspection_folder, tmp_path / "runs2"), "--trainer.max_epochs", "1", "--model.mode", "frozen",
                 "--model.feature_cache", "auto", "--data.decoded_cache", "true"]) == 0
    config = yaml.safe_load((tmp_path / "runs2" / "partial" / "version_0" / "config.yaml").read_text())
    assert config["model"]["feature_cache"] == "auto" and config["data"]["decoded_cache"] is True
    assert (tmp_path / "default-features").is_dir()  # (the decoded cache: unused by a cached frozen fit)


def test_a_resume_that_fails_before_training_leaves_the_runs_step_log_in_place(inspection_folder, tmp_path,
                                                                              monkeypatch, capsys):
    """A resume renames metrics.csv aside (Lightning's logger would delete it) before the model is
    built; one that then failed (its weights file gone) left the run with the file renamed."""
    import timm

    monkeypatch.chdir(tmp_path)
    torch.save(timm.create_model("test_efficientnet").state_dict(), "start.pth")
    assert main([*_args(inspection_folder, tmp_path / "runs"), "--model.pretrained", "true",
                 "--model.weights", "start.pth", "--trainer.max_epochs", "1", "--model.mode", "frozen"]) == 0
    run = tmp_path / "runs" / "partial" / "version_0"
    log = (run / "metrics.csv").read_bytes()
    (tmp_path / "start.pth").unlink()
    capsys.readouterr()
    assert main(["fit", "--config", str(run / "config.yaml"), "--ckpt_path", "last", "--trainer.max_epochs", "2"]) != 0
    assert "start.pth" in capsys.readouterr().err
    assert (run / "metrics.csv").read_bytes() == log and not list(run.glob("metrics.before_resume_*"))


def test_a_run_that_recorded_its_feature_cache_relative_still_resumes(inspection_folder, tmp_path, monkeypatch,
                                                                       capsys):
    """A run from before cache folders were recorded absolute holds `feature_cache: feats` in its
    config.yaml and checkpoints; made absolute before the resume's settings check, the path no longer
    matched the checkpoint's and `fit --config RUN/config.yaml --ckpt_path last` stopped with 'the model
    settings differ: feature_cache ...', an option the user never gave."""
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    assert main([*_args(inspection_folder, tmp_path / "runs"), "--trainer.max_epochs", "1", "--model.mode", "frozen",
                 "--model.feature_cache", "feats"]) == 0
    run = tmp_path / "runs" / "partial" / "version_0"
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["model"]["feature_cache"] = "feats"  # as the run's files spelled it then
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    for ckpt in (run / "checkpoints").glob("*.ckpt"):
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        state["hyper_parameters"]["feature_cache"] = "feats"
        torch.save(state, ckpt)
    capsys.readouterr()
    assert main(["fit", "--config", str(run / "config.yaml"), "--ckpt_path", "last", "--trainer.max_epochs", "2"]) == 0
    assert f"resuming {run}" in capsys.readouterr().out
    assert torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["epoch"] == 1
