"""``vision-tl extract`` / ``vision-tl probe`` end to end, through the top-level dispatcher."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vision_tl.cli import main
from vision_tl.features.store import read_features

NEU = Path(__file__).resolve().parents[2].parent / "shared" / "datasets" / "neu"
TINY = ["--backbone", "test_efficientnet", "--random-init", "--image-size", "32", "--no-progress"]


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    rng = np.random.default_rng(0)
    for k, name in enumerate(("ok", "scratch")):
        (root / name).mkdir(parents=True)
        for i in range(5):
            pixels = rng.integers(0, 100, (36, 36, 3), dtype=np.uint8)
            pixels[..., k] += 150
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


def _error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    return capsys.readouterr().err


def test_extract_cli_writes_and_refuses_overwrite(tmp_path, folder, capsys) -> None:
    out = tmp_path / "f.parquet"
    argv = ["extract", str(folder), *TINY, "--out", str(out), "--cache-dir", str(tmp_path / "c")]
    assert main(argv) == 0
    assert read_features(out).features.shape[0] == 10
    err = _error(capsys, argv)
    assert err.startswith("error: ") and str(out) in err and "--overwrite" in err
    assert main([*argv, "--overwrite"]) == 0


def test_extract_cli_keeps_a_class_folder_only_val_has(tmp_path, folder, capsys) -> None:
    root = tmp_path / "extra2"
    for split in ("train", "val"):
        for name in ("ok", "scratch"):
            (root / split / name).mkdir(parents=True)
            for src in sorted((folder / name).iterdir())[:3]:
                (root / split / name / src.name).write_bytes(src.read_bytes())
    (root / "val" / "dent").mkdir()
    for src in sorted((folder / "ok").iterdir()):
        (root / "val" / "dent" / f"d{src.name}").write_bytes(src.read_bytes())
    out = tmp_path / "f.parquet"
    with pytest.warns(UserWarning, match="val/ has dent, which train/ lacks"):
        assert main(["extract", str(root), *TINY, "--out", str(out), "--cache-dir", str(tmp_path / "c")]) == 0
    back = read_features(out)
    assert back.features.shape[0] == 17 and back.classes == ["ok", "scratch", "dent"]
    assert sum(p.startswith("val/dent/") for p in back.paths) == 5
    assert back.labels[[p.startswith("val/dent/") for p in back.paths]].tolist() == [2] * 5


def test_extract_cli_bad_inputs_are_named(tmp_path, folder, capsys) -> None:
    missing = tmp_path / "nope" / "f.npz"
    err = _error(capsys, ["extract", str(folder), *TINY, "--out", str(missing)])
    assert str(missing.parent) in err and "does not exist" in err
    (folder / "ok" / "broken.png").write_bytes(b"garbage")
    err = _error(capsys, ["extract", str(folder), *TINY, "--out", str(tmp_path / "f.npz"),
                          "--cache-dir", str(tmp_path / "c")])
    assert "broken.png" in err and "--skip-bad" in err
    assert not (tmp_path / "f.npz").exists()
    (folder / "ok" / "broken.png").unlink()
    # one image instead of its folder; a device that is no device; a weights file that is not one
    err = _error(capsys, ["extract", str(folder / "ok" / "0.png"), *TINY, "--out", str(tmp_path / "f.npz")])
    assert "0.png is a file; give the folder" in err
    err = _error(capsys, ["extract", str(folder), *TINY, "--out", str(tmp_path / "f.npz"), "--device", "gpu"])
    assert "--device 'gpu' is not a device; expected cpu, cuda or cuda:N" in err
    (tmp_path / "w.pth").write_text("hello")
    err = _error(capsys, ["extract", str(folder), *TINY, "--out", str(tmp_path / "f.npz"), "--weights",
                          str(tmp_path / "w.pth")])
    assert "w.pth is not a PyTorch file" in err
    assert not (tmp_path / "f.npz").exists()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_extract_on_a_gpu_the_machine_lacks_is_one_line(tmp_path, folder, capsys) -> None:
    err = _error(capsys, ["extract", str(folder), *TINY, "--out", str(tmp_path / "f.npz"), "--device", "cuda"])
    assert "--device cuda: no CUDA GPU is usable on this machine" in err and "Traceback" not in err


def test_extract_skip_bad_names_every_image_it_leaves_out(tmp_path, folder, capsys) -> None:
    """Images refused by the scan (not an image) and by the decoder (truncated) are both named;
    the count is theirs together, and no path is printed twice."""
    (folder / "ok" / "fake.png").write_text("not an image")
    data = (folder / "ok" / "0.png").read_bytes()
    (folder / "scratch" / "cut.png").write_bytes(data[: len(data) // 2])
    out = tmp_path / "f.npz"
    with pytest.warns(UserWarning) as caught:
        assert main(["extract", str(folder), *TINY, "--out", str(out), "--cache-dir", str(tmp_path / "c"),
                     "--skip-bad"]) == 0
    said = "\n".join(str(w.message) for w in caught)
    assert "fake.png" in said and "cut.png" in said and said.count(str(folder / "scratch" / "cut.png")) == 1
    assert read_features(out).features.shape[0] == 10


def test_probe_refuses_settings_that_evaluate_nothing(tmp_path, folder, capsys) -> None:
    base = ["probe", str(folder), *TINY, "--cache-dir", str(tmp_path / "c")]
    assert "--heads is empty" in _error(capsys, [*base, "--heads", ""])
    assert "nothing to evaluate" in _error(capsys, [*base, "--folds", "0"])
    assert "--draws 0" in _error(capsys, [*base, "--shots", "2", "--draws", "0"])
    # a backbone without offline weights stops the probe before the first backbone is embedded
    err = _error(capsys, ["probe", str(folder), "--backbone", "tf_efficientnet_lite0", "--backbone", "resnet18",
                          "--image-size", "32", "--no-progress", "--cache-dir", str(tmp_path / "c2")])
    assert "no pretrained weights for backbone 'resnet18'" in err and not (tmp_path / "c2").exists()


def test_extract_cli_refuses_cache_of_another_backbone(tmp_path, folder, capsys) -> None:
    cache = tmp_path / "c"
    main(["extract", str(folder), *TINY, "--out", str(tmp_path / "a.npz"), "--cache-dir", str(cache)])
    (store,) = (cache / "test_efficientnet").iterdir()
    err = _error(capsys, ["extract", str(folder), "--backbone", "resnet10t", "--random-init",
                          "--image-size", "32", "--no-progress", "--out", str(tmp_path / "b.npz"),
                          "--cache-dir", str(store)])
    assert str(store) in err and "resnet10t" in err and "test_efficientnet" in err


def test_probe_cli_prints_table_and_scatter(tmp_path, folder, capsys) -> None:
    argv = ["probe", str(folder), *TINY, "--folds", "2", "--shots", "1", "2", "--draws", "2",
            "--cache-dir", str(tmp_path / "c"), "--plot-dir", str(tmp_path / "plots" / "probe")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "2-fold acc" in out and "2-shot bal. acc" in out and "extract img/s" in out
    assert out.count("test_efficientnet") >= 2  # one row per head
    # the plot folder is made when missing, as in the README's example
    assert (tmp_path / "plots" / "probe" / "pca_test_efficientnet.png").stat().st_size > 1000
    err = _error(capsys, ["probe", str(folder), *TINY, "--shots", "5"])
    assert "--shots 5" in err


def test_help_has_examples(capsys) -> None:
    for command in ("extract", "probe"):
        assert main([command, "--help"]) == 0
        out = capsys.readouterr().out
        assert "examples:" in out
        if command == "extract":  # (probe needs --backbone)
            assert "timm model name (default: tf_efficientnet_lite0)" in " ".join(out.split())


@pytest.mark.realdata
@pytest.mark.slow
def test_probe_on_neu_subset(tmp_path, capsys) -> None:
    if not NEU.is_dir():
        pytest.skip(f"NEU surface-defect set not found at {NEU}")
    subset = tmp_path / "neu"
    for cls in sorted(p for p in NEU.iterdir() if p.is_dir()):
        (subset / cls.name).mkdir(parents=True)
        for src in sorted(cls.glob("*.jpg"))[:5]:
            (subset / cls.name / src.name).symlink_to(src)  # read-only data: link, never copy
    argv = ["probe", str(subset), "--backbone", "tf_efficientnet_lite0", "--image-size", "128",
            "--folds", "5", "--heads", "logreg", "--cache-dir", str(tmp_path / "c"), "--no-progress"]
    assert main(argv) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if "tf_efficientnet_lite0" in line)
    acc = float(row.split()[3].rstrip("%")) / 100
    assert acc > 0.5  # 6 classes from 4 images each: chance is 1/6


@pytest.mark.skipif(not hasattr(__import__("os"), "killpg"), reason="POSIX process groups")
def test_sigterm_to_the_process_group_stops_extract_on_loader_processes_cleanly(tmp_path) -> None:
    """Slurm's scancel, systemd and `kill -- -PGID` signal every process of the job: the decoding
    processes as well as extract. It stops as on a plain SIGTERM (143, one line), not with the
    loader's "worker killed by signal" traceback; the finished shards stay for a resume."""
    import os
    import signal
    import subprocess
    import sys
    import time

    root = tmp_path / "many"
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(150):
            Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    cache = tmp_path / "cache"
    script = ("import sys; import vision_tl.data.decode_threads as dt; import vision_tl.features.cache as fc\n"
              "dt.usable_cores = lambda: 16; dt._start_method = lambda: 'fork'; fc.SHARD_ROWS = 4\n"
              "from vision_tl.cli import console_main; sys.argv = ['vision-tl', *sys.argv[1:]]; "
              "sys.exit(console_main())")
    argv = [sys.executable, "-c", script, "extract", str(root), "--backbone", "test_efficientnet", "--random-init",
            "--image-size", "64", "--batch-size", "2", "--num-workers", "2", "--no-progress",
            "--cache-dir", str(cache), "--out", str(tmp_path / "f.npz")]
    job = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 120
    while not list(cache.rglob("*.keys.npy")) and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert job.poll() is None, f"extract ended before it could be stopped: {job.stderr.read()[-2000:]}"
    os.killpg(job.pid, signal.SIGTERM)
    err = job.communicate(timeout=120)[1]
    assert job.returncode == 143, err[-2000:]
    assert "stopped (SIGTERM)" in err and "Traceback" not in err and "killed by signal" not in err, err[-2000:]
    assert list(cache.rglob("*.keys.npy"))  # finished shards kept for the next run


def test_two_extractions_into_one_output_with_the_cache_never_duplicate_or_replace(tmp_path, folder) -> None:
    """Two `vision-tl extract` processes, one --out and one feature cache: both embedded every
    image (each cache row twice), and the second, given --overwrite, replaced the first's output
    without a word. The second is now refused while the first holds the output, before it
    computes anything; the first writes every image once."""
    import os
    import subprocess
    import sys
    import time

    from vision_tl.utils import files

    if files.fcntl is None:
        pytest.skip("no flock here (Windows): extractions are not locked against each other")
    hold = tmp_path / "hold"
    # the first process stops at its first batch, holding the output, until told to go on
    script = ("import os, sys, time\n"
              "from vision_tl.features.extractor import FeatureExtractor\n"
              "real = FeatureExtractor.embed\n"
              "def embed(self, x):\n"
              "    hold = os.environ.get('VISION_TL_TEST_HOLD')\n"
              "    if hold:\n"
              "        open(hold + '.started', 'w').close()\n"
              "        deadline = time.monotonic() + 120\n"
              "        while not os.path.exists(hold + '.go') and time.monotonic() < deadline:\n"
              "            time.sleep(0.05)\n"
              "    return real(self, x)\n"
              "FeatureExtractor.embed = embed\n"
              "from vision_tl.cli import console_main; sys.argv = ['vision-tl', *sys.argv[1:]]; sys.exit(console_main())")
    out, cache = tmp_path / "f.npz", tmp_path / "cache"
    argv = [sys.executable, "-c", script, "extract", str(folder), *TINY, "--batch-size", "2", "--num-workers", "0",
            "--cache-dir", str(cache), "--out", str(out), "--overwrite"]
    first = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "VISION_TL_TEST_HOLD": str(hold)})
    try:
        deadline = time.monotonic() + 120
        while not hold.with_suffix(".started").exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert first.poll() is None, first.communicate()[1][-2000:]
        second = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    finally:
        hold.with_suffix(".go").touch()
        stdout, stderr = first.communicate(timeout=120)
    assert second.returncode == 2, second.stderr[-2000:]
    assert f"another extraction is writing {out} now" in second.stderr and "Traceback" not in second.stderr
    assert first.returncode == 0, stderr[-2000:]
    features = read_features(out)
    assert sorted(features.paths) == sorted(p.relative_to(folder).as_posix() for p in folder.glob("*/*.png"))
    (store,) = {p.parent for p in cache.rglob("meta.json")}
    keys = [k for shard in store.glob("*.keys.npy") for k in np.load(shard).tolist()]
    assert sorted(keys) == sorted(features.sha256)  # each image once in the cache too
    # the output is free again once the first is done
    assert main(["extract", str(folder), *TINY, "--cache-dir", str(cache), "--out", str(out), "--overwrite"]) == 0
