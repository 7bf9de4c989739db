"""Two-process CPU DDP (gloo): one run directory, and metrics gathered across ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
pytestmark = pytest.mark.slow


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    # Lightning's DDP launcher re-runs sys.argv for rank 1, so run a real script, not this process.
    return subprocess.run([sys.executable, "-m", "vision_tl.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def even_folder(tmp_path_factory) -> Path:
    """10 images per class: the 20 % validation split has 8 images, an even share per rank."""
    from vision_tl.data.synthetic import make_inspection_dataset

    root = tmp_path_factory.mktemp("ddp_data")
    make_inspection_dataset(root, 10, size=32, seed=3, overwrite=True)
    return root


def _common(data: Path, save_dir: Path) -> list[str]:
    return ["--config", str(CONFIGS / "frozen.yaml"), "--data.root", str(data),
            "--model.backbone", "test_efficientnet", "--model.pretrained", "false", "--model.image_size", "32",
            "--model.feature_cache", str(save_dir / "cache"), "--data.batch_size", "8",
            "--data.num_workers", "0", "--trainer.enable_progress_bar", "false", "--trainer.accelerator", "cpu",
            "--trainer.logger.init_args.save_dir", str(save_dir)]


def _validate_metrics(result: subprocess.CompletedProcess, run: Path) -> dict:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads((run / "metrics.json").read_text())


@pytest.fixture(scope="module")
def odd_folder(even_folder, tmp_path_factory) -> Path:
    """One class has 7 images: the validation split (0.3) has an odd count, uneven shares."""
    import shutil

    root = tmp_path_factory.mktemp("ddp_odd") / "data"
    shutil.copytree(even_folder, root)
    for path in sorted((root / "crack").glob("*.png"))[:3]:
        path.unlink()
    return root


def test_ddp_fit_writes_one_run_and_gathers_metrics_like_one_process(odd_folder, even_folder, tmp_path):
    odd = [*_common(odd_folder, tmp_path), "--data.val_fraction", "0.3", "--data.good_class", "good"]
    fit = _cli("fit", *odd, "--trainer.max_epochs", "3", "--model.threshold_target", "false_reject:0.2",
               "--trainer.devices", "2", "--trainer.strategy", "ddp", cwd=tmp_path)
    assert fit.returncode == 0, fit.stdout[-3000:] + fit.stderr[-3000:]
    runs = sorted((tmp_path / "frozen").iterdir())
    assert [r.name for r in runs] == ["version_0"]  # one run directory, not one per rank
    ckpt = runs[0] / "checkpoints" / "best.ckpt"
    assert ckpt.is_file() and (runs[0] / "metrics.json").is_file()

    n_val = len(json.loads((runs[0] / "split.json").read_text())["val"])
    assert n_val % 2 == 1  # the case where a padded sampler repeats an image
    fitted = json.loads((runs[0] / "metrics.json").read_text())["val"]
    assert sum(map(sum, fitted["confusion_matrix"])) == n_val

    # The same checkpoint tested by 2 ranks and by 1 process gives the same figures, report and
    # threshold choice: every image counted once, all ranks' outputs gathered in order.
    # The 2-rank run reads through the decoded-image cache (one process per machine builds it,
    # the other waits at a barrier): the figures must not change.
    two = _cli("test", *odd, "--ckpt_path", str(ckpt), "--trainer.devices", "2", "--trainer.strategy", "ddp",
               "--data.decoded_cache", str(tmp_path / "decoded"), cwd=tmp_path)
    assert len(list((tmp_path / "decoded").glob("*.npy"))) == 1  # the val split, decoded once
    one = _cli("test", *odd, "--ckpt_path", str(ckpt), "--trainer.devices", "1", cwd=tmp_path)
    a = _validate_metrics(two, tmp_path / "frozen" / "version_1")["test"]
    b = _validate_metrics(one, tmp_path / "frozen" / "version_2")["test"]
    for key in ("acc", "balanced_acc", "f1_macro", "loss"):
        if key in b:
            assert a[key] == pytest.approx(b[key], abs=1e-5), key
    assert a["confusion_matrix"] == b["confusion_matrix"]
    assert sum(map(sum, a["confusion_matrix"])) == n_val  # every validation image counted once
    csv_two, csv_one = ((tmp_path / "frozen" / v / "predictions_test.csv").read_text() for v in ("version_1",
                                                                                                  "version_2"))
    assert csv_two == csv_one and len(csv_one.splitlines()) == n_val + 1

    # Predicting 7 new images (uneven shares) on 2 ranks writes the same rows as 1 process.
    new = tmp_path / "new"
    new.mkdir()
    for i, src in enumerate(sorted(even_folder.glob("*/*.png"))[:7]):
        (new / f"img_{i}.png").write_bytes(src.read_bytes())
    tables = []
    for devices in ("2", "1"):
        pred = _cli("predict", *odd, "--ckpt_path", str(ckpt), "--data.predict_root",
                    str(new), "--trainer.devices", devices, *(["--trainer.strategy", "ddp"] * (devices == "2")),
                    cwd=tmp_path)
        assert pred.returncode == 0, pred.stdout[-3000:] + pred.stderr[-3000:]
        (path,) = [p for p in (tmp_path / "frozen").glob("version_*/predictions.csv") if p not in tables]
        tables.append(path)
    two_rows, one_rows = (p.read_text().splitlines() for p in tables)
    assert len(one_rows) == 8 and two_rows == one_rows


def test_two_process_extract_writes_the_same_file_as_one_process(even_folder, tmp_path):
    import numpy as np
    import torch

    from vision_tl.backbones import create_backbone

    torch.manual_seed(0)
    torch.save(create_backbone("test_efficientnet", pretrained=False).state_dict(), tmp_path / "w.pth")
    common = ["extract", str(even_folder), "--backbone", "test_efficientnet", "--weights", str(tmp_path / "w.pth"),
              "--image-size", "32", "--batch-size", "4", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", "29533", "-m", "vision_tl.cli", *common,
                          "--out", str(tmp_path / "two.npz"), "--cache-dir", str(tmp_path / "cache2")],
                         env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    one = _cli(*common, "--out", str(tmp_path / "one.npz"), "--cache-dir", str(tmp_path / "cache1"), cwd=tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    a, b = np.load(tmp_path / "two.npz"), np.load(tmp_path / "one.npz")
    assert sorted(a.files) == sorted(b.files)
    for key in a.files:
        if a[key].dtype.kind == "U" and a[key].ndim == 0:  # the metadata: equal but for the speed
            meta_a, meta_b = json.loads(str(a[key])), json.loads(str(b[key]))
            for timing in ("images_per_second", "seconds", "seconds_to_first_batch"):
                meta_a.pop(timing), meta_b.pop(timing)
            assert meta_a == meta_b
        elif a[key].dtype.kind == "f":
            assert np.allclose(a[key], b[key], atol=1e-5), key
        else:
            assert (a[key] == b[key]).all(), key
    # Both ranks really worked: the shared cache holds shards written by two processes.
    assert len(list((tmp_path / "cache2").rglob("*.keys.npy"))) >= 2


def test_a_decoded_cache_the_first_rank_cannot_build_stops_every_rank(even_folder, tmp_path):
    """The other ranks wait at a barrier while the first builds the cache; when it fails they
    are stopped too, and the user reads the one-line error, not a hang or a traceback."""
    (tmp_path / "a_file").write_text("not a folder")
    fit = _cli("fit", *_common(even_folder, tmp_path), "--data.decoded_cache", str(tmp_path / "a_file" / "cache"),
               "--model.feature_cache", "null",  # images, through the decoded cache, not cached features
               "--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.max_epochs", "1", cwd=tmp_path)
    assert fit.returncode == 2, fit.stderr[-3000:]
    assert "decoded-image cache" in fit.stderr and "cannot be created (Not a directory)" in fit.stderr
    assert "Traceback" not in fit.stderr, fit.stderr[-3000:]


def test_an_image_one_rank_cannot_decode_mid_training_stops_every_rank_in_one_line_each(even_folder, tmp_path):
    """A file that passes the scan but not decoding fails one rank in the middle of an epoch; the
    other loses its connection in the next collective. Each says why in one line, no traceback."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(even_folder, data)
    victim = sorted((data / "crack").glob("*.png"))[0]
    from PIL import Image

    Image.open(victim).convert("RGB").resize((64, 64)).save(victim.with_suffix(".jpg"), quality=95)
    victim.unlink()
    jpeg = victim.with_suffix(".jpg")
    jpeg.write_bytes(jpeg.read_bytes()[:-300])  # its header is fine; its pixels stop half-way
    common = _common(data, tmp_path)
    common[1] = str(CONFIGS / "partial.yaml")  # images through the backbone, not cached features
    fit = _cli("fit", *common, "--model.feature_cache", "null", "--trainer.devices", "2", "--trainer.strategy", "ddp",
               "--trainer.max_epochs", "1", cwd=tmp_path)
    assert fit.returncode == 2, fit.stderr[-3000:]
    assert f"{jpeg.name}: corrupt or truncated image" in fit.stderr, fit.stderr[-3000:]
    assert "Traceback" not in fit.stderr, fit.stderr[-3000:]


@pytest.mark.skipif(sys.platform == "win32", reason="process groups and SIGTERM are POSIX")
def test_sigterm_stops_a_two_process_fit_like_one_process(even_folder, tmp_path):
    """A job scheduler's SIGTERM to both ranks: exit 143 with a resumable last.ckpt. (Lightning's
    own handler broadcasts from inside the signal handler, which hung or aborted gloo when the
    signal landed during another collective; that timing is not forced here, the outcome is.)"""
    import glob
    import signal
    import time

    import torch

    args = [sys.executable, "-m", "vision_tl.cli", "fit", "--config", str(CONFIGS / "partial.yaml"),
            "--data.root", str(even_folder), "--model.backbone", "test_efficientnet", "--model.pretrained", "false",
            "--model.image_size", "32", "--data.batch_size", "2", "--data.num_workers", "0",
            "--trainer.enable_progress_bar", "false", "--trainer.accelerator", "cpu", "--trainer.max_epochs", "40",
            "--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.logger.init_args.save_dir", str(tmp_path)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        deadline = time.time() + 300
        while not glob.glob(str(tmp_path / "partial" / "version_*" / "checkpoints" / "last.ckpt")):
            assert proc.poll() is None and time.time() < deadline, "the fit ended before its first checkpoint"
            time.sleep(0.2)
        time.sleep(0.7)
        os.killpg(proc.pid, signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 143, out[-3000:]
    assert "resume from the end of the last finished epoch" in out and "EnforceNotMet" not in out
    last = glob.glob(str(tmp_path / "partial" / "version_*" / "checkpoints" / "last.ckpt"))[0]
    assert torch.load(last, weights_only=True)["epoch"] >= 0
