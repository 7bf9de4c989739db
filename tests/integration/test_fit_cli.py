"""End-to-end `vision-tl` runs on a synthetic folder with a tiny model."""

from __future__ import annotations

import collections
import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vision_tl.cli import main
from vision_tl.tasks import CheckpointError, load_classifier

TINY_ARGS = ["--model.backbone", "test_efficientnet", "--model.pretrained", "false", "--model.image_size", "32",
             "--data.batch_size", "8", "--data.num_workers", "0", "--trainer.max_epochs", "2",
             "--trainer.enable_progress_bar", "false"]
CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _fit(run_root: Path, data: Path, *extra: str, config: str = "partial.yaml") -> Path:
    code = main(["fit", "--config", str(CONFIGS / config), "--data.root", str(data), *TINY_ARGS,
                 "--trainer.logger.init_args.save_dir", str(run_root), *extra])
    assert code == 0
    return run_root / Path(config).stem / "version_0"


@pytest.fixture(scope="module")
def trained_run(inspection_folder, tmp_path_factory) -> Path:
    return _fit(tmp_path_factory.mktemp("runs"), inspection_folder, "--data.good_class", "good")


def test_fit_writes_a_complete_run_directory(trained_run, inspection_folder):
    for name in ("config.yaml", "labels.json", "split.json", "metrics.json", "confusion_matrix_val.png",
                 "training_curves.png", "checkpoints/best.ckpt", "checkpoints/last.ckpt"):
        assert (trained_run / name).is_file(), name
    labels = json.loads((trained_run / "labels.json").read_text())
    assert labels == ["crack", "good", "scratch", "spot"]
    metrics = json.loads((trained_run / "metrics.json").read_text())
    assert 0.0 <= metrics["val"]["balanced_acc"] <= 1.0 and len(metrics["history"]) == 2
    assert sum(map(sum, metrics["val"]["confusion_matrix"])) == len(json.loads(
        (trained_run / "split.json").read_text())["val"])


def test_fit_draws_its_curves_with_the_training_loss_and_survives_a_failing_figure(inspection_folder, tmp_path,
                                                                                   monkeypatch):
    """Fit draws its history with each epoch's training loss from metrics.csv; a figure that fails
    warns, and the trained run stays complete."""
    from vision_tl.reports import plots

    drawn = []

    def broken(history, path, **kwargs):
        drawn.append((history, kwargs))
        raise RuntimeError("no fonts here")

    monkeypatch.setattr(plots, "plot_training_curves", broken)
    with pytest.warns(UserWarning, match="training_curves.png.*no fonts here.*the run itself is complete"):
        run = _fit(tmp_path, inspection_folder, "--trainer.log_every_n_steps", "50")
    (history, kwargs), = drawn
    assert [r["epoch"] for r in history] == [0, 1] and kwargs["best"]["epoch"] in (0, 1)
    # both epochs' mean training loss, from metrics.csv, though no step of these short epochs was logged
    assert sorted(kwargs["train_loss"]) == [0, 1] and all(v > 0 for v in kwargs["train_loss"].values())
    assert not (run / "training_curves.png").exists() and (run / "checkpoints" / "best.ckpt").is_file()


def test_checkpoint_loads_with_weights_only_and_predicts(trained_run):
    model, meta = load_classifier(trained_run / "checkpoints" / "best.ckpt")
    assert meta["classes"] == ["crack", "good", "scratch", "spot"] and meta["good_class"] == "good"
    assert meta["preprocessing"]["input_size"] == [32, 32]
    with torch.no_grad():
        assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 4)


def test_test_and_predict_commands_use_the_run(trained_run, tmp_path):
    args = ["--config", str(trained_run / "config.yaml"), "--ckpt_path", str(trained_run / "checkpoints/best.ckpt"),
            "--trainer.logger.init_args.save_dir", str(tmp_path)]
    assert main(["test", *args]) == 0
    assert "test" in json.loads((tmp_path / "partial" / "version_0" / "metrics.json").read_text())
    assert main(["predict", *args]) == 0
    lines = (tmp_path / "partial" / "version_1" / "predictions.csv").read_text().splitlines()
    assert lines[0].startswith("path,true,predicted,probability,p_crack")


def test_commands_and_loading_leave_the_callers_random_generators_and_settings_alone(trained_run, tmp_path):
    """In a notebook, test or predict reseeded the process with the run's seed (every later draw
    repeated the same numbers, and Lightning's seed variables stayed set), and loading a model
    drew the random weights its checkpoint replaces from the caller's torch generator."""
    import os
    import random

    import numpy as np

    def draws() -> tuple:
        return random.random(), float(np.random.rand()), float(torch.rand(1))

    def seeded() -> None:
        random.seed(12345)
        np.random.seed(12345)
        torch.manual_seed(12345)

    seeded()
    expected = draws()
    args = ["--config", str(trained_run / "config.yaml"), "--ckpt_path", str(trained_run / "checkpoints/best.ckpt"),
            "--trainer.logger.init_args.save_dir", str(tmp_path)]
    variables = {k: os.environ.get(k) for k in ("PL_GLOBAL_SEED", "PL_SEED_WORKERS")}
    for command in ("predict", "test"):
        seeded()
        assert main([command, *args]) == 0
        assert draws() == expected, command
        assert {k: os.environ.get(k) for k in variables} == variables
    seeded()
    load_classifier(trained_run / "checkpoints" / "best.ckpt")
    assert draws() == expected


def test_evaluating_a_run_never_scores_its_training_images_as_held_out_unnamed(inspection_folder, tmp_path, capsys):
    """A checkpoint kept outside RUN/checkpoints/ is evaluated on the split of the run whose
    config.yaml is given (a new split of a grown folder scored training images); a folder
    reorganised into train/ + val/ since, its val/ holding the run's training images, is named."""
    data = tmp_path / "data"
    shutil.copytree(inspection_folder, data)
    run = _fit(tmp_path / "runs", data)
    kept = tmp_path / "models" / "kept.ckpt"
    kept.parent.mkdir()
    shutil.copy(run / "checkpoints" / "best.ckpt", kept)
    args = ["--config", str(run / "config.yaml"), "--trainer.logger.init_args.save_dir", str(tmp_path / "eval")]
    capsys.readouterr()
    assert main(["test", *args, "--ckpt_path", str(kept)]) == 0
    assert f"train/val split from {run / 'split.json'}" in capsys.readouterr().out
    # a class folder added since: the checkpoint's class check speaks, not advice about a split
    # file the user never gave
    shutil.copytree(data / "good", data / "zzz")
    assert main(["validate", *args, "--ckpt_path", str(run / "checkpoints" / "best.ckpt")]) == 2
    err = capsys.readouterr().err
    assert "was trained on 4 classes" in err and "split_file" not in err
    shutil.rmtree(data / "zzz")
    record = json.loads((run / "split.json").read_text())
    for part, folder in (("train", "val"), ("val", "train")):  # the run's training images become val/
        for entry in record[part]:
            (data / folder / entry["path"]).parent.mkdir(parents=True, exist_ok=True)
            shutil.move(data / entry["path"], data / folder / entry["path"])
    with pytest.warns(UserWarning, match=rf"{len(record['train'])} of the {len(record['train'])} val images are images "
                                         "the checkpoint's run trained on"):
        assert main(["test", *args, "--ckpt_path", str(run / "checkpoints" / "best.ckpt")]) == 0
    # and a split file handed to a folder with its own val/ is refused, not silently ignored
    assert main(["fit", "--config", str(CONFIGS / "partial.yaml"), "--data.root", str(data), *TINY_ARGS,
                 "--trainer.logger.init_args.save_dir", str(tmp_path / "again"),
                 "--data.split_file", str(run / "split.json")]) == 2
    assert "has its own val/ folder" in capsys.readouterr().err


def test_a_fit_stopped_by_max_steps_before_a_validation_says_it_has_no_best_checkpoint(inspection_folder, tmp_path):
    """It printed 'best epoch 0 ...' and exited 0 with no best.ckpt, which report and export then missed."""
    with pytest.warns(UserWarning, match=r"training ended before an epoch was validated, so run .* has no "
                                         r"checkpoints/best\.ckpt"):
        run = _fit(tmp_path, inspection_folder, "--trainer.max_steps", "1", "--model.mode", "full")
    assert not (run / "checkpoints" / "best.ckpt").exists()


def test_a_fast_dev_run_writes_nothing(inspection_folder, tmp_path, monkeypatch, capsys):
    """Lightning runs it without loggers, so the run's files (metrics.json, split.json, a
    last.ckpt Lightning saves at the end anyway) went to ./runs of the working directory, over
    the previous smoke test's, whatever --trainer.logger.init_args.save_dir said."""
    monkeypatch.chdir(tmp_path)
    assert main(["fit", "--config", str(CONFIGS / "partial.yaml"), "--data.root", str(inspection_folder),
                 *TINY_ARGS, "--trainer.fast_dev_run", "true",
                 "--trainer.logger.init_args.save_dir", str(tmp_path / "dev")]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "a smoke test wrote files"
    out = capsys.readouterr().out
    assert "a smoke test of one batch per loop; nothing is written" in out and "fast_dev_run passed" in out


def test_a_fast_dev_run_of_n_batches_says_so_and_evaluates_without_writing(trained_run, tmp_path, monkeypatch,
                                                                            capsys):
    """--trainer.fast_dev_run N runs N batches of each loop, which the notes called one batch;
    validate, test and predict write nothing either."""
    monkeypatch.chdir(tmp_path)
    args = ["--config", str(trained_run / "config.yaml"), "--ckpt_path", str(trained_run / "checkpoints/best.ckpt"),
            "--trainer.fast_dev_run", "2", "--trainer.logger.init_args.save_dir", str(tmp_path / "dev")]
    for command in ("validate", "test", "predict"):
        assert main([command, *args]) == 0
        assert "a smoke test of 2 batches per loop; nothing is written" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "a smoke test wrote files"


def test_true_half_precision_trains(inspection_folder, tmp_path):
    """--trainer.precision bf16-true cast the class-weight buffer to bf16 and stopped in the first
    validation (cross_entropy: expected Float but found BFloat16)."""
    run = _fit(tmp_path, inspection_folder, "--trainer.precision", "bf16-true", "--trainer.max_epochs", "1",
               "--model.class_weights", "inverse")
    assert (run / "checkpoints" / "best.ckpt").is_file()


def test_evaluating_a_checkpoint_needs_no_pretrained_weights_file(inspection_folder, tmp_path):
    """test/predict built the model from the config's --model.weights before loading the checkpoint,
    which holds every weight: a weights file removed since (or a timm cache another machine has)
    stopped them, where report and export worked."""
    from vision_tl.backbones import create_backbone

    weights = tmp_path / "backbone.pth"
    torch.save(create_backbone("test_efficientnet", pretrained=False).state_dict(), weights)
    run = _fit(tmp_path / "runs", inspection_folder, "--model.weights", str(weights), "--model.pretrained", "true",
               "--trainer.max_epochs", "1")
    weights.unlink()
    args = ["--config", str(run / "config.yaml"), "--ckpt_path", str(run / "checkpoints" / "best.ckpt"),
            "--trainer.logger.init_args.save_dir", str(tmp_path / "eval")]
    assert main(["test", *args]) == 0
    saved = (tmp_path / "eval" / "partial" / "version_0" / "config.yaml").read_text()
    assert str(weights) in saved  # the config as given, not the settings it was built with


def test_a_runs_checkpoint_starts_a_new_run_as_its_backbone_weights(trained_run, tmp_path):
    """--model.weights RUN/checkpoints/best.ckpt listed net.backbone.* keys as missing/unexpected;
    its backbone now starts another run (its own classes and head)."""
    from vision_tl.backbones import BackboneWeightsError, create_backbone

    best = trained_run / "checkpoints" / "best.ckpt"
    net = create_backbone("test_efficientnet", weights=best)
    trained = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
    for key, value in net.state_dict().items():
        assert torch.equal(value, trained[f"net.backbone.{key}"]), key
    with pytest.raises(BackboneWeightsError, match=r"a vision_tl checkpoint of backbone test_efficientnet, not "
                                                   r"resnet18; pass --model.backbone test_efficientnet"):
        create_backbone("resnet18", weights=best)


def test_sigterm_stops_predict_at_the_next_batch_without_a_csv(trained_run, tmp_path, monkeypatch):
    """Lightning's predict loop never checks for SIGTERM: predict ran to the end and exited 0."""
    import os
    import signal

    from vision_tl.tasks import ImageClassifier

    real = ImageClassifier.predict_step

    def step(self, batch, batch_idx):
        if batch_idx == 0:
            os.kill(os.getpid(), signal.SIGTERM)  # Lightning's handler only marks it
        return real(self, batch, batch_idx)

    monkeypatch.setattr(ImageClassifier, "predict_step", step)
    args = ["--config", str(trained_run / "config.yaml"), "--ckpt_path", str(trained_run / "checkpoints/best.ckpt"),
            "--trainer.logger.init_args.save_dir", str(tmp_path), "--data.batch_size", "2"]
    assert main(["predict", *args]) == 143
    assert not list(tmp_path.rglob("predictions.csv"))


def test_predict_new_images_from_a_folder_without_classes(trained_run, inspection_folder, tmp_path, capsys):
    """`--data.predict_root` predicts any folder (nested, unlabelled); an unreadable image gets a
    row with its error, every other row keeps its own file's prediction; the counts per predicted
    class are printed (as predict-onnx prints them)."""
    new = tmp_path / "line3" / "today"
    new.mkdir(parents=True)
    originals = sorted(inspection_folder.glob("*/*.png"))[::6]
    for i, src in enumerate(originals):
        shutil.copy(src, new / f"part_{i:02d}.png")
    (new / "part_99.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    args = ["--config", str(trained_run / "config.yaml"), "--ckpt_path", str(trained_run / "checkpoints/best.ckpt"),
            "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"), "--data.predict_root", str(tmp_path / "line3")]
    info = main(["predict", *args])
    assert info == 2
    assert not (tmp_path / "runs" / "partial").exists() or not any((tmp_path / "runs" / "partial").iterdir())
    assert main(["predict", *args, "--data.skip_bad_images", "true"]) == 3  # written, with an error row
    (csv_path,) = (tmp_path / "runs").glob("partial/version_*/predictions.csv")
    rows = list(csv.DictReader(csv_path.open()))
    assert [Path(r["path"]).name for r in rows] == [f"part_{i:02d}.png" for i in range(len(originals))] + ["part_99.png"]
    counts = collections.Counter(r["predicted"] for r in rows)
    classes = json.loads((trained_run / "labels.json").read_text())
    assert "vision_tl: predicted " + ", ".join(f"{c} {counts[c]}" for c in classes) in capsys.readouterr().out
    assert rows[-1]["error"] and rows[-1]["predicted"] == ""
    # an image the loader processes skip gets the reason too, not just "could not be decoded"
    from vision_tl.imaging import decode_error

    assert decode_error(new / "part_99.png").startswith(f"{new / 'part_99.png'}: ")
    model, _ = load_classifier(trained_run / "checkpoints" / "best.ckpt")
    for row, src in zip(rows, originals):  # each row is its own image's prediction
        assert row["true"] == "" and row["error"] == ""
        with torch.no_grad():
            expected = model(_eval_tensor(src, model))[0].softmax(-1)
        assert row["predicted"] == classes[int(expected.argmax())]
        assert float(row[f"p_{classes[0]}"]) == pytest.approx(float(expected[0]), abs=1e-4)


def test_predict_refuses_a_missing_predict_root_before_loading_the_checkpoint(trained_run, tmp_path, monkeypatch,
                                                                           capsys):
    """A --data.predict_root that is not there was refused only at set-up, after the checkpoint had
    loaded (a long wait with a large model); it is refused up front, as a missing data.root is, with
    the message set-up gives, and no run directory is made."""
    loads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(a[0]) or real_load(*a, **k))
    missing = tmp_path / "line3"
    code = main(["predict", "--config", str(trained_run / "config.yaml"), "--ckpt_path",
                 str(trained_run / "checkpoints" / "best.ckpt"), "--data.predict_root", str(missing),
                 "--trainer.logger.init_args.save_dir", str(tmp_path / "runs")])
    assert code == 2
    err = capsys.readouterr().err
    assert f"image folder {missing} does not exist; give a folder of images (any nesting) or one image" in err
    assert loads == [] and not (tmp_path / "runs").exists()


def test_predicting_new_images_needs_no_training_folder_and_names_the_checkpoints_classes(inspection_folder,
                                                                                          tmp_path, capsys):
    """On a line PC only the run is there: predict with --data.predict_root failed with 'data root
    ... does not exist', because the data module listed its classes from data.root. The classes
    are the checkpoint's; a training folder present with other classes is named in a warning
    (predict), and still refused where its labels are scored (validate)."""
    data = tmp_path / "data"
    shutil.copytree(inspection_folder, data)
    run = _fit(tmp_path / "runs", data, "--trainer.max_epochs", "1")
    new = tmp_path / "line3"
    new.mkdir()
    for i, src in enumerate(sorted(data.glob("*/*.png"))[::12]):
        shutil.copy(src, new / f"part_{i}.png")
    shutil.rmtree(data)
    args = ["--config", str(run / "config.yaml"), "--ckpt_path", str(run / "checkpoints" / "best.ckpt"),
            "--data.predict_root", str(new)]

    def predictions(out: Path) -> tuple[list[str], list[dict]]:
        (csv_path,) = out.glob("partial/version_*/predictions.csv")
        with csv_path.open(newline="") as f:
            return next(csv.reader(f)), list(csv.DictReader(csv_path.open(newline="")))

    classes = ["crack", "good", "scratch", "spot"]
    assert main(["predict", *args, "--trainer.logger.init_args.save_dir", str(tmp_path / "p1")]) == 0
    header, rows = predictions(tmp_path / "p1")
    assert [c for c in header if c.startswith("p_")] == [f"p_{c}" for c in classes]
    assert sorted(Path(r["path"]).name for r in rows) == [f"part_{i}.png" for i in range(4)]
    assert all(r["predicted"] in classes and r["error"] == "" for r in rows)
    # the training folder back, with other classes: predict warns and keeps the checkpoint's
    for name, source in (("alpha", "crack"), ("beta", "good")):
        shutil.copytree(inspection_folder / source, data / name)
    with pytest.warns(UserWarning, match=r"now has the classes \['alpha', 'beta'\], the model was trained on"):
        assert main(["predict", *args, "--trainer.logger.init_args.save_dir", str(tmp_path / "p2")]) == 0
    header, rows = predictions(tmp_path / "p2")
    assert [c for c in header if c.startswith("p_")] == [f"p_{c}" for c in classes] and len(rows) == 4
    # a class list already in the config (a predict run's config.yaml, made with another checkpoint)
    with pytest.warns(UserWarning, match=r"data.classes \['a', 'b', 'c', 'd'\] is not the class list"):
        assert main(["predict", *args, "--data.classes", "[a, b, c, d]",
                     "--trainer.logger.init_args.save_dir", str(tmp_path / "p3")]) == 0
    header, rows = predictions(tmp_path / "p3")
    assert [c for c in header if c.startswith("p_")] == [f"p_{c}" for c in classes] and len(rows) == 4
    capsys.readouterr()
    assert main(["validate", *args[:4], "--trainer.logger.init_args.save_dir", str(tmp_path / "v")]) == 2
    assert "was trained on 4 classes" in capsys.readouterr().err


def _eval_tensor(path: Path, model) -> torch.Tensor:
    from vision_tl.data.transforms import ImageTransform
    from vision_tl.imaging import load_rgb

    return ImageTransform(model.preprocessing, "none")(load_rgb(path))[None]


def test_existing_run_directory_is_never_overwritten(trained_run, inspection_folder):
    before = (trained_run / "config.yaml").read_bytes()
    assert main(["fit", "--config", str(CONFIGS / "partial.yaml"), "--data.root", str(inspection_folder), *TINY_ARGS,
                 "--trainer.logger.init_args.save_dir", str(trained_run.parents[1]),
                 "--trainer.logger.init_args.version", "0"]) == 2
    assert (trained_run / "config.yaml").read_bytes() == before


def test_bad_input_is_one_line_not_a_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "vision_tl.cli", "fit", "--config", str(CONFIGS / "frozen.yaml"),
         "--data.root", str(tmp_path / "missing"), *TINY_ARGS],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert "error:" in result.stderr and "missing" in result.stderr and "Traceback" not in result.stderr


def test_foreign_checkpoint_is_refused(tmp_path):
    path = tmp_path / "other.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}}, path)
    with pytest.raises(CheckpointError, match="not written by vision_tl"):
        load_classifier(path)


def test_demo_runs_and_learns(tmp_path):
    from vision_tl import demo

    args = demo._parser().parse_args(["--data", str(tmp_path / "demo"), "--runs", str(tmp_path / "runs"),
                                      "--epochs", "3", "--size", "64", "--mode", "frozen"])
    best = demo.run(args)
    assert best["balanced_acc"] > 0.5  # chance is 0.25 for 4 classes
    assert (tmp_path / "runs" / "demo" / "version_0" / "checkpoints" / "best.ckpt").is_file()


def test_fit_draws_its_progress_bar_by_time(inspection_folder, tmp_path, monkeypatch, capsys):
    """`vision-tl fit` swaps Lightning's every-batch progress bar (each redraw waits for the
    GPU) for the time-throttled one; with the bar on, the closing line still names the run."""
    from vision_tl.tasks.callbacks import ThrottledProgressBar

    seen = []
    original = ThrottledProgressBar.on_train_batch_end

    def spy(self, *args):
        seen.append(self.min_interval)
        return original(self, *args)

    monkeypatch.setattr(ThrottledProgressBar, "on_train_batch_end", spy)
    monkeypatch.setattr("vision_tl.tasks.lightning_cli.interactive", lambda stream: True)  # a terminal
    capsys.readouterr()
    _fit(tmp_path, inspection_folder, "--trainer.enable_progress_bar", "true", "--trainer.max_epochs", "1")
    assert seen and set(seen) == {0.5}
    assert "vision_tl: best epoch 0:" in capsys.readouterr().out  # the bar used to swallow it


def test_fit_throttles_the_rich_default_bar_too(inspection_folder, tmp_path, monkeypatch):
    """Where ``rich`` is installed (most GPU images), Lightning's default bar is RichProgressBar,
    which reads the loss back after every batch; `vision-tl fit` swaps that one as well."""
    from lightning.pytorch.callbacks import RichProgressBar
    from lightning.pytorch.callbacks.progress.progress_bar import ProgressBar
    from lightning.pytorch.trainer.connectors import callback_connector

    from vision_tl.tasks.callbacks import ThrottledProgressBar

    def rich_default():  # what Lightning builds with rich installed (rich itself need not be)
        bar = RichProgressBar.__new__(RichProgressBar)
        ProgressBar.__init__(bar)
        return bar

    monkeypatch.setattr(callback_connector, "_RICH_AVAILABLE", True)
    monkeypatch.setattr(callback_connector, "RichProgressBar", rich_default)
    seen = []
    original = ThrottledProgressBar.on_train_batch_end

    def spy(self, *args):
        seen.append(type(self))
        return original(self, *args)

    monkeypatch.setattr(ThrottledProgressBar, "on_train_batch_end", spy)
    monkeypatch.setattr("vision_tl.tasks.lightning_cli.interactive", lambda stream: True)  # a terminal
    _fit(tmp_path, inspection_folder, "--trainer.enable_progress_bar", "true", "--trainer.max_epochs", "1",
         "--trainer.enable_model_summary", "false")  # its rich variant would need rich
    assert seen and set(seen) == {ThrottledProgressBar}


def test_fit_into_a_log_file_prints_a_line_per_epoch_instead_of_redrawing_a_bar(inspection_folder, tmp_path,
                                                                               monkeypatch, capfd):
    """Standard output to a file or a pipe (a batch job's log, `| tee`): a bar's carriage-return
    redraws piled up hundreds of half-lines there. Now a line per finished epoch, with its
    scores, and lines inside a long epoch (every 30 s; here every batch)."""
    from vision_tl.tasks import callbacks

    monkeypatch.setattr(callbacks.LogLineProgress.__init__, "__defaults__", (0.0,))
    capfd.readouterr()
    _fit(tmp_path, inspection_folder, "--trainer.enable_progress_bar", "true", "--trainer.max_epochs", "2",
         "--data.batch_size", "8")
    out, err = capfd.readouterr()
    lines = out.splitlines()
    done = [line for line in lines if " done in " in line]
    assert [line.split(" done in ")[0] for line in done] == ["epoch 0 (1 of 2)", "epoch 1 (2 of 2)"]
    assert all("train loss" in line and "val acc" in line and "balanced acc" in line for line in done)
    assert any(line.startswith("epoch 0 (1 of 2): batch 1/") for line in lines)
    assert "\r" not in out and "\r" not in err
    # the best epoch is named as its line names it (it read "best epoch 0" after "epoch 1/2" and "epoch 2/2")
    (best,) = [line for line in lines if line.startswith("vision_tl: best epoch ")]
    assert any(line.startswith(f"epoch {best.split()[3].rstrip(':')} (") for line in done)


def test_fit_keeps_a_progress_bar_the_user_names(inspection_folder, tmp_path, monkeypatch):
    from lightning.pytorch.callbacks import TQDMProgressBar

    rates = []
    original = TQDMProgressBar.on_train_batch_end

    def spy(self, *args):
        rates.append((type(self), self.refresh_rate))
        return original(self, *args)

    monkeypatch.setattr(TQDMProgressBar, "on_train_batch_end", spy)
    bar = '{"class_path": "lightning.pytorch.callbacks.TQDMProgressBar", "init_args": {"refresh_rate": 1}}'
    _fit(tmp_path, inspection_folder, "--trainer.enable_progress_bar", "true", "--trainer.max_epochs", "1",
         f"--trainer.callbacks+={bar}")
    assert rates and set(rates) == {(TQDMProgressBar, 1)}


def test_failed_fit_leaves_no_empty_run_directory(inspection_folder, tmp_path):
    (tmp_path / "partial" / "version_0").mkdir(parents=True)  # the user's own empty folder stays
    info = main(["fit", "--config", str(CONFIGS / "partial.yaml"), "--data.root", str(inspection_folder), *TINY_ARGS,
          "--data.val_fraction", "1.5", "--trainer.logger.init_args.save_dir", str(tmp_path)])
    assert info == 2
    assert sorted(p.name for p in (tmp_path / "partial").iterdir()) == ["version_0"]


def test_a_failed_fit_removes_its_own_run_directory_only(inspection_folder, tmp_path, monkeypatch):
    """Another fit may start beside this one (same runs folder) and still hold only its
    settings when this one fails: its run directory must survive this one's clean-up."""
    from vision_tl.data import ImageFolderDataModule

    other = tmp_path / "frozen" / "version_7"
    real_setup = ImageFolderDataModule.setup

    def setup_while_another_fit_starts(self, stage=None):
        other.mkdir(parents=True, exist_ok=True)
        (other / "config.yaml").write_text("another fit's settings\n")
        return real_setup(self, stage)

    monkeypatch.setattr(ImageFolderDataModule, "setup", setup_while_another_fit_starts)
    blocked = tmp_path / "not_a_folder"
    blocked.write_text("a file where the feature cache should go")
    info = main(["fit", "--config", str(CONFIGS / "frozen.yaml"), "--data.root", str(inspection_folder), *TINY_ARGS,
          "--model.feature_cache", str(blocked / "cache"), "--trainer.logger.init_args.save_dir", str(tmp_path)])
    assert info != 0
    assert sorted(p.name for p in (tmp_path / "frozen").iterdir()) == ["version_7"]
    assert (other / "config.yaml").read_text() == "another fit's settings\n"


def test_a_fit_refused_a_run_directory_another_fit_took_leaves_it_alone(inspection_folder, tmp_path, monkeypatch):
    """Two fits starting at once can both be given version_0; the one that finds the other's
    config.yaml there stops, and its clean-up must not remove the other's run directory."""
    from vision_tl.data import ImageFolderDataModule

    run = tmp_path / "partial" / "version_0"
    real_setup = ImageFolderDataModule.setup

    def other_fit_writes_its_config(self, stage=None):
        (run / "config.yaml").write_text("the other fit's settings\n")  # the logger made run/ already
        return real_setup(self, stage)

    monkeypatch.setattr(ImageFolderDataModule, "setup", other_fit_writes_its_config)
    info = main(["fit", "--config", str(CONFIGS / "partial.yaml"), "--data.root", str(inspection_folder), *TINY_ARGS,
          "--trainer.logger.init_args.save_dir", str(tmp_path)])
    assert info == 2
    assert (run / "config.yaml").read_text() == "the other fit's settings\n"


def test_console_shows_the_kits_warnings_on_one_line(inspection_folder, tmp_path):
    """`vision-tl` prints its own warnings as `warning: ...`, not with Python's file:line and
    source line."""
    data = tmp_path / "data"
    shutil.copytree(inspection_folder, data)
    (data / "good" / "notes.txt").write_text("lot 7")
    result = subprocess.run(
        [sys.executable, "-m", "vision_tl.cli", "extract", str(data), "--backbone", "test_efficientnet",
         "--random-init", "--image-size", "32", "--out", str(tmp_path / "e.npz"), "--cache-dir",
         str(tmp_path / "cache"), "--no-progress"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    line = next(x for x in result.stderr.splitlines() if "non-image file" in x)
    assert line.startswith("warning: ignoring 1 non-image file(s)") and "UserWarning" not in result.stderr


def test_evaluating_a_run_scores_the_images_it_held_out_even_after_the_folder_grew(inspection_folder, tmp_path,
                                                                                   capsys):
    """A new split of a folder that gained images (or under another seed) would move training
    images into val: validate/test/predict of a run's checkpoint use its split.json, as report does."""
    data = tmp_path / "grow"
    shutil.copytree(inspection_folder, data)
    run = _fit(tmp_path / "runs", data, "--trainer.max_epochs", "1")
    record = json.loads((run / "split.json").read_text())
    for i, src in enumerate(sorted((data / "scratch").iterdir())[:4]):  # new images, after training
        shutil.copy(src, data / "scratch" / f"new_{i}.png")
    args = ["--config", str(run / "config.yaml"), "--ckpt_path", str(run / "checkpoints" / "best.ckpt"),
            "--trainer.logger.init_args.save_dir", str(tmp_path / "eval")]
    for extra in ([], ["--data.seed", "5"]):
        capsys.readouterr()
        with pytest.warns(UserWarning, match=r"holds 4 image\(s\) that .*split\.json does not list"):
            assert main(["predict", *args, *extra]) == 0
        assert f"split from {run / 'split.json'}" in capsys.readouterr().out
        (csv_path,) = [p for p in (tmp_path / "eval").glob("partial/version_*/predictions.csv")
                       if p.stat().st_mtime >= (run / "split.json").stat().st_mtime]
        rows = list(csv.DictReader(csv_path.open()))
        assert sorted(str(Path(r["path"]).relative_to(data)) for r in rows) == sorted(e["path"] for e in record["val"])
        csv_path.unlink()


def test_a_run_on_train_and_test_folders_is_evaluated_on_its_recorded_split(inspection_folder, tmp_path, capsys):
    """Without val/, train/ is what was split (split.json's root is ROOT/train): validate of the
    run must still use that split, also under another seed, and from another working directory."""
    data = tmp_path / "tt"
    shutil.copytree(inspection_folder, data / "train")
    shutil.copytree(inspection_folder / "good", data / "test" / "good")
    run = _fit(tmp_path / "runs", data, "--trainer.max_epochs", "1")
    assert json.loads((run / "split.json").read_text())["root"] == str((data / "train").resolve())
    capsys.readouterr()
    assert main(["validate", "--config", str(run / "config.yaml"), "--ckpt_path", str(run / "checkpoints" / "best.ckpt"),
                 "--trainer.logger.init_args.save_dir", str(tmp_path / "eval"), "--data.seed", "5"]) == 0
    assert f"split from {run / 'split.json'}" in capsys.readouterr().out
    (config,) = (tmp_path / "eval").glob("partial/version_*/config.yaml")
    assert f"split_file: {run / 'split.json'}" in config.read_text()  # absolute: found from anywhere
    assert main(["report", str(run), "--split", "test"]) == 0  # test/ beside train/, the folder fit was given
    assert main(["report", str(run), "--data", str(data), "--overwrite"]) == 0  # val: recorded under train/


def test_evaluating_a_run_on_a_moved_copy_of_its_folder_uses_its_split(inspection_folder, tmp_path, capsys):
    run = _fit(tmp_path / "runs", inspection_folder, "--trainer.max_epochs", "1")
    moved = tmp_path / "moved"
    shutil.copytree(inspection_folder, moved)
    args = ["--config", str(run / "config.yaml"), "--ckpt_path", str(run / "checkpoints" / "best.ckpt"),
            "--trainer.logger.init_args.save_dir", str(tmp_path / "eval"), "--data.seed", "7"]
    capsys.readouterr()
    assert main(["validate", *args, "--data.root", str(moved)]) == 0
    assert f"split from {run / 'split.json'}" in capsys.readouterr().out
    other = tmp_path / "other"  # other images of the same classes: a new split, said out loud
    for folder in sorted(p for p in inspection_folder.iterdir() if p.is_dir()):
        (other / folder.name).mkdir(parents=True)
        for src in sorted(folder.iterdir())[:6]:
            shutil.copy(src, other / folder.name / f"x_{src.name}")
    with pytest.warns(UserWarning, match="does not hold the images .*a new train/val split is made"):
        assert main(["validate", *args, "--data.root", str(other)]) == 0


def test_a_relative_split_file_is_recorded_absolute(inspection_folder, tmp_path, monkeypatch):
    """Run directories record absolute paths, so a resume or evaluation works from any directory."""
    first = _fit(tmp_path / "runs", inspection_folder, "--trainer.max_epochs", "1")
    monkeypatch.chdir(tmp_path)
    code = main(["fit", "--config", str(CONFIGS / "frozen.yaml"), "--data.root", str(inspection_folder), *TINY_ARGS,
                 "--trainer.max_epochs", "1", "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
                 "--data.split_file", str((first / "split.json").relative_to(tmp_path))])
    assert code == 0
    config = (tmp_path / "runs" / "frozen" / "version_0" / "config.yaml").read_text()
    assert f"split_file: {(first / 'split.json').resolve()}" in config


def test_a_folder_with_train_and_test_but_no_val_trains_and_the_sanity_check_picks_no_threshold(tmp_path, recwarn):
    from PIL import Image

    data = tmp_path / "data"
    for split, n in (("train", 10), ("test", 2)):
        for c, name in enumerate(("good", "scratch")):  # val is carved out of train/
            (data / split / name).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (32, 32), (40 + 150 * c, 10 * i, 90)).save(data / split / name / f"{i}.png")
    run = _fit(tmp_path / "runs", data, "--data.good_class", "good", "--model.threshold_target", "false_reject:0.5",
               "--data.batch_size", "1", "--data.val_fraction", "0.4")  # sanity check's 2 batches: good images only
    assert not [w for w in recwarn if "no threshold this epoch" in str(w.message)]
    assert json.loads((run / "metrics.json").read_text())["val"]["threshold"] is not None


def test_validate_logs_the_loss_fit_logged_on_a_balanced_draw(tmp_path, inspection_folder, capsys):
    data = tmp_path / "skewed"
    for name in ("good", "crack"):  # 4x: the sampler balances, the loss is not weighted on top
        (data / name).mkdir(parents=True)
        for path in sorted((inspection_folder / name).iterdir())[: 20 if name == "good" else 3]:
            shutil.copy(path, data / name / path.name)
    run = _fit(tmp_path / "runs", data, "--trainer.max_epochs", "1")
    assert "the balanced sampler draws every class equally often" in capsys.readouterr().out
    fitted = json.loads((run / "metrics.json").read_text())["history"][-1]
    logged = [*csv.DictReader(open(run / "metrics.csv"))]
    fit_loss = float(next(r["val/loss"] for r in logged if r.get("val/loss")))
    assert main(["validate", "--config", str(run / "config.yaml"), "--ckpt_path", str(run / "checkpoints/best.ckpt"),
                 "--trainer.logger.init_args.save_dir", str(tmp_path / "eval")]) == 0
    again = [*csv.DictReader(open(tmp_path / "eval" / "partial" / "version_0" / "metrics.csv"))]
    assert float(next(r["val/loss"] for r in again if r.get("val/loss"))) == pytest.approx(fit_loss, rel=1e-5)
    assert fitted["epoch"] == 0


def test_start_up_lines_are_shown_with_the_progress_bar_on(inspection_folder, tmp_path, capsys):
    # Lightning's print hands a line to the bar, which drops it while no bar is on screen yet
    _fit(tmp_path / "runs", inspection_folder, "--trainer.enable_progress_bar", "true", "--trainer.max_epochs", "1",
         "--data.decoded_cache", str(tmp_path / "decoded"), config="frozen.yaml")
    out = capsys.readouterr().out
    assert "vision_tl: mode=frozen" in out and "vision_tl: training the head on cached features" in out
    assert "--data.decoded_cache is not used for training (the features are cached)" in out


def test_a_flag_given_before_the_recipe_is_warned_about(tmp_path, monkeypatch):
    """`fit --data.root DIR --trainer.max_epochs 2 --config configs/partial.yaml`: the recipe, read
    last, set both back without a word; the run then failed on the recipe's data/demo (or trained
    on it, and for 12 epochs). A flag set again after the file, or equal to it, is not warned about."""
    import warnings

    monkeypatch.chdir(tmp_path)  # no data/demo here: the run stops before any work
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code = main(["fit", "--data.root", str(tmp_path / "mine"), "--trainer.max_epochs", "2",
                     "--model.mode", "partial", "--seed_everything", "1",
                     "--config", str(CONFIGS / "partial.yaml"), "--seed_everything", "1"])
    assert code == 2
    said = [str(w.message) for w in caught if "comes before --config" in str(w.message)]
    assert len(said) == 2, [str(w.message) for w in caught]
    assert said[0].startswith(f"--data.root {tmp_path / 'mine'} comes before --config ")
    assert "sets data.root data/demo" in said[0] and said[0].endswith("give --data.root after --config")
    assert "sets trainer.max_epochs 12" in said[1] and "this run uses 12" in said[1]


def test_default_root_dir_places_a_recipes_runs(inspection_folder, tmp_path, monkeypatch):
    """`fit --config configs/frozen.yaml --trainer.default_root_dir DIR` wrote runs/frozen/ under
    the working directory: the recipe's logger (save_dir: runs) ignored DIR, as Lightning's does not."""
    monkeypatch.chdir(tmp_path)
    assert main(["fit", "--config", str(CONFIGS / "frozen.yaml"), "--data.root", str(inspection_folder),
                 *TINY_ARGS, "--trainer.max_epochs", "1", "--trainer.default_root_dir", "chosen"]) == 0
    assert (tmp_path / "chosen" / "frozen" / "version_0" / "checkpoints" / "best.ckpt").is_file()
    assert not (tmp_path / "runs").exists()


def test_gpu_overlay_given_before_the_recipe_is_warned_about(inspection_folder, tmp_path):
    """`--config gpu.yaml --config frozen.yaml`: the recipe, read last, set accelerator auto and
    precision 32-true back, and the run trained (on the CPU, without a GPU) as if gpu.yaml was
    not given; its config.yaml still said pipeline: device."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code = main(["fit", "--config", str(CONFIGS / "gpu.yaml"), "--config", str(CONFIGS / "frozen.yaml"),
                     "--data.root", str(inspection_folder), *TINY_ARGS, "--trainer.max_epochs", "1",
                     "--trainer.logger.init_args.save_dir", str(tmp_path)])
    assert code == 0
    said = [str(w.message) for w in caught if "comes after" in str(w.message)]
    assert len(said) == 1, [str(w.message) for w in caught]
    assert "frozen.yaml comes after" in said[0] and "trainer.precision 32-true" in said[0]
    assert said[0].endswith("gpu.yaml last, after the recipe")
