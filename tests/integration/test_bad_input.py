"""Bad input through the CLI and the Python API: each kind gets a clear message or works.

Every case builds its input under ``tmp_path``, runs it, and checks that the outcome is
one of three things:

- **clear error**: exit status 2 (CLI) or the kit's own exception type (API), the
  message names the bad path or value, and no traceback reaches the user;
- **works**: inputs that are unusual but valid (CMYK, 16-bit, float TIFF, class names
  with spaces or accents, hidden files) are read correctly;
- **protected**: nothing in an existing run directory, feature cache or export changes.

One trained run (tiny timm model, 32 px) is shared by all cases, and an autouse fixture
hashes its run directory, feature cache and ONNX export before and after every case.
Set ``VISION_TL_RELIABILITY_TABLE=FILE.md`` to write the outcome table
(``benchmarks/reliability_table.py`` does that for ``benchmarks/RELIABILITY.md``).
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import hashlib
import io
import os
import pickle
import re
import shutil
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vision_tl.backbones import BackboneWeightsError, create_backbone
from vision_tl.cli import main
from vision_tl.data import DatasetError, ImageFolderDataModule, scan_folder
from vision_tl.data.synthetic import make_inspection_dataset
from vision_tl.deploy import DeployError, Predictor
from vision_tl.export import ExportError, ExportOptions, export_onnx
from vision_tl.features import FeatureCache, FeatureCacheError, FeatureStoreError, read_features
from vision_tl.imaging import ImageLoadError, load_rgb, set_max_image_pixels
from vision_tl.tasks.checkpoint import CheckpointError, load_classifier

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
TABLE_ENV = "VISION_TL_RELIABILITY_TABLE"
# Class folder names with a space and non-ASCII letters: the shared run trains on them.
CLASSES = ["crack", "good", "surface scratch", "tache été"]
TINY = ["--model.backbone", "test_efficientnet", "--model.pretrained", "false", "--model.image_size", "32",
        "--data.num_workers", "0", "--data.batch_size", "8", "--data.augment", "none",
        "--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false"]


# ------------------------------------------------------------------ helpers


@dataclass
class Result:
    outcome: str  # "clear error", "works" or "protected"
    message: str


@dataclass
class World:
    """The shared trained run and everything a case may need."""

    data: Path
    save_dir: Path
    run: Path
    cache: Path
    onnx: Path

    @property
    def best(self) -> Path:
        return self.run / "checkpoints" / "best.ckpt"

    def fit_args(self, data: Path, save_dir: Path, *extra: str) -> list[str]:
        return ["fit", "--config", str(CONFIGS / "frozen.yaml"), "--data.root", str(data), *TINY,
                "--model.feature_cache", str(self.cache),
                "--trainer.logger.init_args.save_dir", str(save_dir), *extra]


def run_cli(argv: list[str]) -> tuple[int, str]:
    """Run ``vision-tl ARGV`` in-process; (exit status, stderr). An escaped exception is a traceback."""
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except Exception:  # noqa: BLE001 - what a user would see as a traceback
            traceback.print_exc(file=err)
            code = 1
    return code, err.getvalue()


def last_error_line(text: str) -> str:
    """The last ``error: ...`` message (with its continuation lines), for the table."""
    start = text.rfind("error:")
    return text[start:].strip() if start >= 0 else text.strip()


def cli_error(argv: list[str], *names: str) -> Result:
    """The command exits with 2, prints no traceback, and its error names every one of ``names``."""
    code, err = run_cli(argv)
    assert "Traceback" not in err, err
    assert code == 2, f"exit status {code}, expected 2:\n{err}"
    for name in names:
        assert name in err, f"{name!r} not named in:\n{err}"
    return Result("clear error", last_error_line(err))


def api_error(call: Callable[[], object], kind: type[BaseException], *names: str) -> Result:
    """``call`` raises ``kind`` (the kit's own type) whose message names every one of ``names``."""
    with pytest.raises(kind) as info:
        call()
    message = str(info.value)
    for name in names:
        assert name in message, f"{name!r} not named in: {message}"
    return Result("clear error", f"{type(info.value).__name__}: {message}")


def tree_digest(*roots: Path) -> dict[str, str]:
    """sha256 of every file under ``roots`` (the things no bad input may damage)."""
    digest = {}
    for root in roots:
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            digest[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digest


def rgb(size: int = 40, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).random((size, size, 3)) * 255).astype(np.uint8)


def works(path: Path) -> Result:
    arr = load_rgb(path)
    assert arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] == 3, arr.shape
    assert arr.max() > arr.min(), "decoded to a constant image"
    return Result("works", f"{arr.shape[1]}x{arr.shape[0]} RGB uint8")


def foreign_onnx(path: Path) -> Path:
    """A valid ONNX classifier made by 'another tool': no vision_tl metadata at all."""
    from onnx import TensorProto, helper, save

    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 8, 8])
    y = helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", 3])
    nodes = [helper.make_node("GlobalAveragePool", ["input"], ["pooled"]),
             helper.make_node("Flatten", ["pooled"], ["flat"]),
             helper.make_node("Softmax", ["flat"], ["scores"], axis=1)]
    model = helper.make_model(helper.make_graph(nodes, "other_tool", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 17)], producer_name="other-tool")
    model.ir_version = 8
    save(model, path)
    return path


def small_dataset(root: Path, drop: str | None = None) -> Path:
    make_inspection_dataset(root, 6, size=32, seed=0, overwrite=True)
    if drop:
        shutil.rmtree(root / drop)
    return root


# -------------------------------------------------------------------- cases: images (API)


def truncated_jpeg(w: World, tmp: Path) -> Result:
    Image.fromarray(rgb()).save(tmp / "full.jpg")
    data = (tmp / "full.jpg").read_bytes()
    bad = tmp / "cut.jpg"
    bad.write_bytes(data[: len(data) // 2])
    return api_error(lambda: load_rgb(bad), ImageLoadError, str(bad), "truncated")


def damaged_jpeg(w: World, tmp: Path) -> Result:
    ramp = np.linspace(0, 220, 80)[None, :, None] + np.random.default_rng(3).normal(0, 15, (48, 80, 3))
    Image.fromarray(np.clip(ramp, 0, 255).astype(np.uint8)).save(tmp / "full.jpg", quality=92)
    data = bytearray((tmp / "full.jpg").read_bytes())
    middle = (data.find(b"\xff\xda") + len(data)) // 2  # in the compressed pixel data
    data[middle:middle + 8] = bytes(b ^ 0x5A for b in data[middle:middle + 8])
    bad = tmp / "damaged.jpg"
    bad.write_bytes(bytes(data))
    return api_error(lambda: load_rgb(bad), ImageLoadError, str(bad), "damaged JPEG data")


def zero_byte_file(w: World, tmp: Path) -> Result:
    bad = tmp / "empty.png"
    bad.write_bytes(b"")
    return api_error(lambda: load_rgb(bad), ImageLoadError, str(bad), "0 bytes")


def text_named_png(w: World, tmp: Path) -> Result:
    bad = tmp / "notes.png"
    bad.write_text("this is a text file, not a PNG")
    return api_error(lambda: load_rgb(bad), ImageLoadError, str(bad), "not a recognised image", ".png")


def png_named_jpg(w: World, tmp: Path) -> Result:
    path = tmp / "really_a_png.jpg"
    Image.fromarray(rgb()).save(path, format="PNG")
    return works(path)  # the content decides, not the extension


def image_with_unknown_extension(w: World, tmp: Path) -> Result:
    data = small_dataset(tmp / "data")
    odd = data / "good" / "scan_0001.raw"
    Image.fromarray(rgb()).save(odd, format="PNG")
    with pytest.warns(UserWarning, match="ignoring 1 non-image file") as record:
        index = scan_folder(data)
    message = str(record[0].message)
    assert str(odd) in message
    assert all(s.path != odd for s in index.samples)
    return Result("works", f"warning: {message}")


def cmyk_jpeg(w: World, tmp: Path) -> Result:
    path = tmp / "cmyk.jpg"
    Image.fromarray(rgb()).convert("CMYK").save(path)
    assert Image.open(path).mode == "CMYK"
    return works(path)


def tiff_16bit_gray(w: World, tmp: Path) -> Result:
    path = tmp / "gray16.tif"
    Image.fromarray((np.arange(1600).reshape(40, 40) * 40).astype(np.uint16)).save(path)
    return works(path)


def tiff_16bit_rgb(w: World, tmp: Path) -> Result:
    tifffile = pytest.importorskip("tifffile")
    path = tmp / "rgb16.tif"
    tifffile.imwrite(path, (np.random.default_rng(0).random((40, 40, 3)) * 65535).astype(np.uint16))
    return works(path)


def tiff_float_gray(w: World, tmp: Path) -> Result:
    path = tmp / "float.tif"
    Image.fromarray(np.random.default_rng(0).random((40, 40)).astype(np.float32)).save(path)
    return works(path)


def tiff_float_rgb(w: World, tmp: Path) -> Result:
    tifffile = pytest.importorskip("tifffile")
    path = tmp / "float_rgb.tif"
    tifffile.imwrite(path, np.random.default_rng(0).random((40, 40, 3)).astype(np.float32))
    result = works(path)
    data = small_dataset(tmp / "data")  # and a dataset scan accepts it too
    shutil.copy(path, data / "good" / "float_rgb.tif")
    assert any(s.path.name == "float_rgb.tif" for s in scan_folder(data).samples)
    return result


def png_16bit(w: World, tmp: Path) -> Result:
    path = tmp / "gray16.png"
    Image.fromarray((np.arange(1600).reshape(40, 40) * 40).astype(np.uint16)).save(path)
    return works(path)


def tiff_32bit_int(w: World, tmp: Path) -> Result:
    tifffile = pytest.importorskip("tifffile")
    path = tmp / "int32.tif"
    tifffile.imwrite(path, (np.arange(1600).reshape(40, 40) * 2_000_000).astype(np.uint32))
    return api_error(lambda: load_rgb(path), ImageLoadError, str(path), "outside 0..65535", "16-bit")


def tiff_signed_16bit(w: World, tmp: Path) -> Result:
    tifffile = pytest.importorskip("tifffile")
    path = tmp / "signed16.tif"
    tifffile.imwrite(path, (np.arange(1600).reshape(40, 40) - 800).astype(np.int16))
    return api_error(lambda: load_rgb(path), ImageLoadError, str(path), "outside 0..65535", "unsigned")


def multi_page_tiff(w: World, tmp: Path) -> Result:
    from vision_tl import imaging

    path = tmp / "pages.tif"
    Image.fromarray(rgb(seed=1)).save(path, save_all=True, append_images=[Image.fromarray(rgb(seed=2))])
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(imaging, "_warned_frames", False)
        with pytest.warns(imaging.MultiFrameWarning) as record:
            result = works(path)
    return Result("works", f"{result.message}; warning: {record[0].message}")


def truncated_bmp_at_scan(w: World, tmp: Path) -> Result:
    data = small_dataset(tmp / "data")
    buf = io.BytesIO()
    Image.fromarray(rgb()).save(buf, "BMP")
    bad = data / "crack" / "cut.bmp"
    bad.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return api_error(lambda: scan_folder(data), DatasetError, str(bad), "1 unreadable image")


def _big_png(tmp: Path) -> Path:
    path = tmp / "huge.png"
    Image.new("1", (20_000, 20_000)).save(path)  # ~50 kB on disk, 400 Mpx when decoded
    return path


def decompression_bomb(w: World, tmp: Path) -> Result:
    path = _big_png(tmp)
    return api_error(lambda: load_rgb(path), ImageLoadError, str(path), "400,000,000 pixels",
                     "decompression-bomb", "VISION_TL_MAX_IMAGE_PIXELS", "set_max_image_pixels")


def decompression_bomb_limit_raised(w: World, tmp: Path, monkeypatch: pytest.MonkeyPatch) -> Result:
    # Raising the limit must let the 20k x 20k header through. Decoding 400 Mpx would need
    # 1.2 GB, so the file is cut short: past the guard it fails as truncated, not as a bomb.
    path = _big_png(tmp)
    path.write_bytes(path.read_bytes()[:4000])
    monkeypatch.setenv("VISION_TL_MAX_IMAGE_PIXELS", str(400_000_000))
    pillow_limit = Image.MAX_IMAGE_PIXELS
    with pytest.raises(ImageLoadError) as info:
        load_rgb(path)
    assert "decompression-bomb" not in str(info.value) and "truncated" in str(info.value), info.value
    assert Image.MAX_IMAGE_PIXELS == pillow_limit  # the caller's own Pillow guard stays where it was
    # ... and the same with set_max_image_pixels on an image that is merely over a low limit.
    small = tmp / "small.png"
    Image.fromarray(rgb()).save(small)
    monkeypatch.setenv("VISION_TL_MAX_IMAGE_PIXELS", "1000")
    api_error(lambda: load_rgb(small), ImageLoadError, "40x40", "1,000")
    monkeypatch.setattr("vision_tl.imaging._max_pixels", None)
    set_max_image_pixels(10_000)
    works(small)
    return Result("works", "VISION_TL_MAX_IMAGE_PIXELS=400000000 / set_max_image_pixels() lift the guard")


def bad_max_pixels_setting(w: World, tmp: Path, monkeypatch: pytest.MonkeyPatch) -> Result:
    path = tmp / "ok.png"
    Image.fromarray(rgb()).save(path)
    monkeypatch.setenv("VISION_TL_MAX_IMAGE_PIXELS", "lots")
    result = api_error(lambda: load_rgb(path), ValueError, "VISION_TL_MAX_IMAGE_PIXELS", "'lots'",
                       "positive integer")
    api_error(lambda: set_max_image_pixels(-5), ValueError, "-5", "positive integer")
    return result


def bad_jpeg_decoder_setting(w: World, tmp: Path, monkeypatch: pytest.MonkeyPatch) -> Result:
    path = tmp / "ok.jpg"
    Image.fromarray(rgb()).save(path)
    monkeypatch.setattr("vision_tl.imaging._fast_jpeg", None)  # chosen once per process: choose again
    monkeypatch.setenv("VISION_TL_JPEG_DECODER", "turbo")
    result = api_error(lambda: load_rgb(path), ValueError, "VISION_TL_JPEG_DECODER", "'turbo'", "pillow")
    # the commands say so in one line before any work, not with a traceback at their first JPEG
    cli_error(["predict-onnx", str(w.onnx), str(path), "--out", str(tmp / "p.csv")], "VISION_TL_JPEG_DECODER")
    cli_error(["export", str(w.best), "--out", str(tmp / "m.onnx")], "VISION_TL_JPEG_DECODER")
    assert not (tmp / "p.csv").exists() and not (tmp / "m.onnx").exists()
    return result


def symlink_loop(w: World, tmp: Path) -> Result:
    data = small_dataset(tmp / "data")
    a, b = data / "good" / "a.png", data / "good" / "b.png"
    os.symlink(b.name, a)
    os.symlink(a.name, b)
    api_error(lambda: load_rgb(a), ImageLoadError, str(a), "symbolic link loop")
    return api_error(lambda: scan_folder(data), DatasetError, str(a), str(b), "symbolic link loop",
                     "skip_bad_images")


def broken_symlink(w: World, tmp: Path) -> Result:
    data = small_dataset(tmp / "data")
    link = data / "crack" / "moved.png"
    os.symlink("/nonexistent/moved.png", link)
    return api_error(lambda: scan_folder(data), DatasetError, str(link), "broken symbolic link")


def unreadable_folder(w: World, tmp: Path, monkeypatch: pytest.MonkeyPatch) -> Result:
    data = small_dataset(tmp / "data")
    locked = data / "crack" / "batch2"
    locked.mkdir()
    Image.fromarray(rgb()).save(locked / "x.png")
    real_scandir = os.scandir

    def guarded_scandir(path="."):  # (root reads mode-000 folders anyway: the error is simulated)
        if str(path) == str(locked):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", guarded_scandir)
    return api_error(lambda: scan_folder(data), OSError, str(locked), "Permission denied", "left out")


def huge_image_header(w: World, tmp: Path) -> Result:
    """A JPEG header claiming 30000x30000 (over twice the limit, where Pillow's own guard fires)."""
    buffer = io.BytesIO()
    Image.fromarray(rgb(16)).save(buffer, "JPEG")
    data = bytearray(buffer.getvalue())
    at = data.find(b"\xff\xc0")
    data[at + 5:at + 9] = (30000).to_bytes(2, "big") * 2
    root = small_dataset(tmp / "data")
    bomb = root / "good" / "bomb.jpg"
    bomb.write_bytes(bytes(data))
    return api_error(lambda: scan_folder(root), DatasetError, str(bomb), "900,000,000 pixels",
                     "limit of 100,000,000", "VISION_TL_MAX_IMAGE_PIXELS")


def split_folder_spellings(w: World, tmp: Path) -> Result:
    """train/ valid/ test/ (a labelling tool's export) and Train/ Val/ would be misread."""
    exported = tmp / "export"
    for part in ("train", "valid", "test"):
        small_dataset(exported / part)
    capitalised = tmp / "capitalised"
    for part in ("Train", "Val"):
        small_dataset(capitalised / part)
    api_error(lambda: ImageFolderDataModule(capitalised), DatasetError, "Train/", "rename Val/ to val/")
    from vision_tl.features import scan_images

    api_error(lambda: scan_images(exported), DatasetError, "valid/", "rename valid/ to val/")
    return api_error(lambda: ImageFolderDataModule(exported), DatasetError, "valid/", "rename valid/ to val/")


def non_utf8_names(w: World, tmp: Path) -> Result:
    """A file name that is not valid UTF-8 (written on another system) is predicted and named
    (its odd byte escaped); a class folder so named is refused, since it would be a class name."""
    import csv

    folder = tmp / "line"
    folder.mkdir()
    Image.fromarray(rgb()).save(folder / "ok.png")
    odd = os.fsdecode(os.fsencode(str(folder)) + b"/bad\xffname.png")
    Image.fromarray(rgb(seed=1)).save(odd)
    code, err = run_cli(["predict-onnx", str(w.onnx), str(folder), "--out", str(tmp / "p.csv")])
    assert code == 0, err
    with open(tmp / "p.csv", encoding="utf-8", newline="") as fh:  # valid UTF-8 throughout
        rows = {Path(r["path"]).name: r for r in csv.DictReader(fh)}
    assert set(rows) == {"ok.png", "bad\\xffname.png"} and not any(r["error"] for r in rows.values()), rows
    data = small_dataset(tmp / "data")
    os.rename(data / "crack", os.fsdecode(os.fsencode(str(data)) + b"/cr\xffck"))
    return api_error(lambda: ImageFolderDataModule(data, backbone="test_efficientnet", image_size=32).setup("fit"),
                     DatasetError, "cr\\xffck", "not valid UTF-8", "rename the folder")


def linked_image_in_folder(w: World, tmp: Path) -> Result:
    """b.png -> a.png in a folder given to predict-onnx: a row for each name, as predict writes."""
    import csv

    folder = tmp / "line"
    folder.mkdir()
    Image.fromarray(rgb()).save(folder / "a.png")
    os.symlink("a.png", folder / "b.png")
    code, err = run_cli(["predict-onnx", str(w.onnx), str(folder), str(folder / "a.png"), "--out", str(tmp / "p.csv")])
    assert code == 0, err
    with open(tmp / "p.csv", encoding="utf-8", newline="") as fh:
        names = [Path(r["path"]).name for r in csv.DictReader(fh)]
    assert sorted(names) == ["a.png", "b.png"], names  # a.png given twice: one row
    return Result("works", "one row per file name (a.png, b.png -> a.png); a.png given twice is predicted once")


def composed_and_decomposed_names(w: World, tmp: Path) -> Result:
    """"é.png" twice in one class, composed and decomposed (copied from macOS beside Linux files):
    the run's recorded split is rebuilt image for image, not reported as changed."""
    import unicodedata

    from vision_tl.data.folder import read_split, recorded_parts, stratified_split, write_split

    data = small_dataset(tmp / "data")
    Image.fromarray(rgb(seed=3)).save(data / "good" / unicodedata.normalize("NFC", "é.png"))
    Image.fromarray(rgb(seed=4)).save(data / "good" / unicodedata.normalize("NFD", "é.png"))
    index = scan_folder(data)
    train, val = stratified_split(index, 0.34, seed=0)
    write_split(tmp / "split.json", index, {"train": train, "val": val})
    parts, unlisted = recorded_parts(scan_folder(data), read_split(tmp / "split.json"), tmp / "split.json")
    assert sorted(parts["train"]) == sorted(train) and sorted(parts["val"]) == sorted(val) and unlisted == 0
    return Result("works", "two names that differ only in Unicode form are two images; the split is rebuilt exactly")


def same_image_two_classes_in_val(w: World, tmp: Path) -> Result:
    data = tmp / "data"
    small_dataset(data / "train")
    small_dataset(data / "val")
    shutil.copy(data / "val" / "good" / "good_0000.png", data / "val" / "crack" / "copy_of_good_0000.png")
    with pytest.warns(UserWarning, match="filed under more than one class") as caught:
        ImageFolderDataModule(data, backbone="test_efficientnet", image_size=32).setup("fit")
    message = next(str(c.message) for c in caught if "more than one class" in str(c.message))
    assert "copy_of_good_0000.png" in message and "side of the split" not in message
    return Result("works", "warning: " + message[:message.index(":")])


def flat_folder_broken_link(w: World, tmp: Path) -> Result:
    """extract/probe on a flat folder report a dangling image link like fit does, not drop it."""
    from vision_tl.features import scan_images

    flat = tmp / "flat"
    flat.mkdir()
    for seed in range(3):
        Image.fromarray(rgb(seed=seed)).save(flat / f"{seed}.png")
    os.symlink("/nonexistent/moved.png", flat / "moved.png")
    return api_error(lambda: scan_images(flat), DatasetError, str(flat / "moved.png"), "broken symbolic link")


def unreadable_file(w: World, tmp: Path, monkeypatch: pytest.MonkeyPatch) -> Result:
    path = tmp / "locked.png"
    Image.fromarray(rgb()).save(path)
    if os.geteuid() != 0:
        path.chmod(0)
    else:  # root reads mode-000 files anyway: simulate the permission error at open()
        real_open = builtins.open

        def guarded_open(file, *args, **kwargs):
            if str(file) == str(path):
                raise PermissionError(errno.EACCES, "Permission denied", str(file))
            return real_open(file, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", guarded_open)
    try:
        return api_error(lambda: load_rgb(path), ImageLoadError, str(path), "permission denied")
    finally:
        path.chmod(0o644)


def directory_as_image(w: World, tmp: Path) -> Result:
    folder = tmp / "shot.png"
    folder.mkdir()
    return api_error(lambda: load_rgb(folder), ImageLoadError, str(folder), "is a directory")


def hidden_files_ignored(w: World, tmp: Path) -> Result:
    data = small_dataset(tmp / "data")
    before = len(scan_folder(data).samples)
    (data / "good" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1" + bytes(64))
    (data / "good" / "._good_0000.png").write_bytes(b"\x00\x05\x16\x07AppleDouble")
    (data / "scratch" / ".ipynb_checkpoints").mkdir()
    (data / "scratch" / ".ipynb_checkpoints" / "x-checkpoint.png").write_bytes(b"not an image")
    (data / ".Trash-0").mkdir()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not even a warning
        index = scan_folder(data)
    assert len(index.samples) == before and not index.bad_files
    assert ".Trash-0" not in ImageFolderDataModule(str(data), backbone="test_efficientnet").classes
    return Result("works", "ignored: .DS_Store, ._*, .ipynb_checkpoints/, .Trash-0/")


def same_image_in_two_classes(w: World, tmp: Path) -> Result:
    from vision_tl.data import stratified_split

    data = small_dataset(tmp / "data")
    shutil.copy(data / "good" / "good_0000.png", data / "scratch" / "copy_of_good_0000.png")
    index = scan_folder(data)
    with pytest.warns(UserWarning, match="filed under more than one class") as caught:
        train, val = stratified_split(index, 0.34, seed=0)
    copies = [i for i, s in enumerate(index.samples) if s.path.name in ("good_0000.png", "copy_of_good_0000.png")]
    assert len({i in val for i in copies}) == 1  # both on one side of the split
    message = str(caught[0].message)
    return Result("works", "split kept the copies together; warning: " + message[:message.index(":")])


def class_names_spaces_non_ascii(w: World, tmp: Path) -> Result:
    labels = (w.run / "labels.json").read_text(encoding="utf-8")
    import json

    assert json.loads(labels) == CLASSES
    predictor = Predictor(w.onnx)
    assert predictor.classes == CLASSES
    image = next((w.data / "tache été").iterdir())
    assert predictor.predict_paths([image])[0].error is None
    return Result("works", "fit, labels.json, export and ONNX prediction keep 'surface scratch', 'tache été'")


# -------------------------------------------------------------------- cases: folders (API)


def empty_class_folder(w: World, tmp: Path) -> Result:
    data = small_dataset(tmp / "data")
    for f in (data / "spot").iterdir():
        f.unlink()
    return api_error(lambda: scan_folder(data), DatasetError, str(data / "spot"), "no images", ".png")


def single_class(w: World, tmp: Path) -> Result:
    data = tmp / "data"
    (data / "good").mkdir(parents=True)
    Image.fromarray(rgb()).save(data / "good" / "a.png")
    return api_error(lambda: ImageFolderDataModule(str(data)), DatasetError, "'good'", "at least two classes")


def missing_data_root(w: World, tmp: Path) -> Result:
    return api_error(lambda: ImageFolderDataModule(str(tmp / "nope")), DatasetError, str(tmp / "nope"),
                     "does not exist")


# -------------------------------------------------------------------- cases: files (API)


def foreign_checkpoint(w: World, tmp: Path) -> Result:
    path = tmp / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(2, 3, 3, 3)}, path)
    return api_error(lambda: load_classifier(path), CheckpointError, str(path), "not a Lightning checkpoint")


def truncated_checkpoint(w: World, tmp: Path) -> Result:
    path = tmp / "cut.ckpt"
    path.write_bytes(w.best.read_bytes()[:2048])
    return api_error(lambda: load_classifier(path), CheckpointError, str(path), "not a readable PyTorch checkpoint")


class Payload:  # a pickled object that is not plain data: could run code when unpickled
    pass


def unsafe_checkpoint(w: World, tmp: Path) -> Result:
    path = tmp / "pickled.ckpt"
    with open(path, "wb") as fh:
        pickle.dump({"state_dict": {}, "payload": Payload()}, fh)
    return api_error(lambda: load_classifier(path), CheckpointError, str(path), "refusing to load")


def foreign_onnx_model(w: World, tmp: Path) -> Result:
    path = foreign_onnx(tmp / "other.onnx")
    result = api_error(lambda: Predictor(path), DeployError, str(path), "classes", "--classes")
    # With the missing facts supplied, another tool's model runs.
    predictor = Predictor(path, classes=["a", "b", "c"], input_size=(8, 8),
                          mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    image = tmp / "x.png"
    Image.fromarray(rgb()).save(image)
    assert predictor.predict_paths([image])[0].predicted in ("a", "b", "c")
    return result


def truncated_onnx(w: World, tmp: Path) -> Result:
    path = tmp / "cut.onnx"
    path.write_bytes(w.onnx.read_bytes()[:3000])
    return api_error(lambda: Predictor(path), DeployError, str(path), "not a loadable ONNX model")


def directory_as_model(w: World, tmp: Path) -> Result:
    return api_error(lambda: Predictor(w.run), DeployError, str(w.run), "directory")


def garbage_backbone_weights(w: World, tmp: Path) -> Result:
    path = tmp / "weights.safetensors"
    path.write_bytes(b"\x00" * 100)
    return api_error(lambda: create_backbone("test_efficientnet", weights=path), BackboneWeightsError, str(path))


def feature_cache_is_file(w: World, tmp: Path) -> Result:
    path = tmp / "cache"
    path.write_text("oops")
    return api_error(lambda: FeatureCache(path), FeatureCacheError, str(path), "expected a directory")


def garbage_feature_file(w: World, tmp: Path) -> Result:
    path = tmp / "features.npz"
    path.write_bytes(b"PK\x03\x04 not really a zip")
    return api_error(lambda: read_features(path), FeatureStoreError, str(path), "not a vision-tl feature file")


def export_over_existing(w: World, tmp: Path) -> Result:
    result = api_error(lambda: export_onnx(w.best, w.onnx, ExportOptions(parity_images="none")), ExportError,
                       str(w.onnx), "--overwrite")
    return Result("protected", result.message)


def cli_damaged_feature_shard(w: World, tmp: Path) -> Result:
    """Bytes overwritten in the middle of a cached feature shard (same size, header intact)."""
    cache = tmp / "cache"
    shutil.copytree(w.cache, cache)
    shards = sorted(cache.rglob("*.feats.npy"))
    for shard in shards:
        with shard.open("r+b") as fh:
            fh.seek(shard.stat().st_size // 2)
            fh.write(np.full(64, np.nan, np.float32).tobytes())
    argv = w.fit_args(w.data, tmp / "runs", "--model.feature_cache", str(cache))
    with pytest.warns(UserWarning, match="is damaged") as warned:
        code, err = run_cli(argv)
    assert code == 0, err
    (best,) = (tmp / "runs").glob("frozen/version_0/checkpoints/best.ckpt")
    state = torch.load(best, weights_only=True)["state_dict"]
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    message = str(next(x.message for x in warned if "is damaged" in str(x.message)))
    assert any(str(p) in message for p in shards)
    return Result("works", f"warning: {message.splitlines()[0]} (then trained on recomputed features)")


def cli_damaged_decoded_cache(w: World, tmp: Path) -> Result:
    """Pixels zeroed in the decoded-image cache: detected by its checksum and rebuilt."""
    cache = tmp / "decoded"
    args = ("--model.mode", "partial", "--data.decoded_cache", str(cache))
    code, err = run_cli(w.fit_args(w.data, tmp / "runs", *args))
    assert code == 0, err
    files = sorted(cache.rglob("*.npy"))  # one per split
    for pixels in files:
        pixels.write_bytes(pixels.read_bytes()[:128] + bytes(pixels.stat().st_size - 128))  # header kept
    with pytest.warns(UserWarning, match="rebuild") as warned:
        code, err = run_cli(w.fit_args(w.data, tmp / "runs", *args))
    assert code == 0, err
    messages = [str(x.message) for x in warned if "rebuild" in str(x.message)]
    assert all(any(p.name in m for m in messages) for p in files)
    message = messages[0]
    return Result("works", f"warning: {message.splitlines()[0]}")


# -------------------------------------------------------------------- cases: CLI


def cli_unknown_config_key(w: World, tmp: Path) -> Result:
    config = tmp / "typo.yaml"
    config.write_text("model:\n  learning_rate: 0.01\n")
    # names the key, the file it is in, the likely intended key, and what the valid keys are
    return cli_error(w.fit_args(w.data, tmp / "runs", "--config", str(config)), "model.learning_rate",
                     str(config), "did you mean 'model.lr'", "valid keys under 'model'", " lr,", "trainable_stages")


def cli_evaluation_config_for_fit(w: World, tmp: Path) -> Result:
    # what `vision-tl test` saves in its output folder: the training config plus its own keys
    config = tmp / "runs" / "frozen" / "version_1" / "config.yaml"
    config.parent.mkdir(parents=True)
    config.write_text((w.run / "config.yaml").read_text() + f"verbose: true\nckpt_path: {w.best}\n")
    return cli_error(["fit", "--config", str(config)], f"{config} is the config of a `vision-tl validate`, `test` "
                     "or `predict` output", "not of a training run", f"--config {w.run / 'config.yaml'}")


def cli_mistyped_option(w: World, tmp: Path) -> Result:
    return cli_error(w.fit_args(w.data, tmp / "runs", "--model.lrr", "0.1"), "model.lrr",
                     "did you mean 'model.lr'")


def cli_wrong_type(w: World, tmp: Path) -> Result:
    return cli_error(w.fit_args(w.data, tmp / "runs", "--model.lr", "fast"), "model.lr", "float", "fast")


def cli_negative_learning_rate(w: World, tmp: Path) -> Result:
    return cli_error(w.fit_args(w.data, tmp / "runs", "--model.lr", "-0.01"), "lr=-0.01", "lr must be > 0")


def cli_negative_epochs(w: World, tmp: Path) -> Result:
    return cli_error(w.fit_args(w.data, tmp / "runs", "--trainer.max_epochs", "-3"), "max_epochs", "-3")


def cli_linked_option(w: World, tmp: Path) -> Result:
    # (a link applied at instantiation, data.backbone, was reported as ~95 lines of usage)
    for option, source in (("--artifacts.monitor", "--checkpoint.monitor"), ("--data.backbone", "--model.backbone")):
        code, err = run_cli(w.fit_args(w.data, tmp / "runs", option, "val/loss"))
        assert code == 2 and f"pass {source} instead of {option}" in err and len(err.splitlines()) <= 3, err
    return cli_error(w.fit_args(w.data, tmp / "runs", "--data.image_size", "48"), "--model.image_size")


def cli_config_not_a_mapping(w: World, tmp: Path) -> Result:
    results = []
    for name, text, expected in (("empty.yaml", "", "is empty"), ("broken.yaml", "model: [\n", "not valid YAML"),
                                 ("three.yaml", "model: 3\n", "'model:' must be a mapping")):
        (tmp / name).write_text(text)
        results.append(cli_error(w.fit_args(w.data, tmp / "runs", "--config", str(tmp / name)),
                                 f"--config {tmp / name}", expected))
    assert not (tmp / "runs").exists()
    return results[-1]


def cli_negative_workers(w: World, tmp: Path) -> Result:
    result = cli_error(w.fit_args(w.data, tmp / "runs", "--data.num_workers", "-1"), "num_workers", "-1")
    assert not (tmp / "runs").exists()  # refused at start, not when the saved config is used later
    return result


def cli_zero_epochs(w: World, tmp: Path) -> Result:
    result = cli_error(w.fit_args(w.data, tmp / "runs", "--trainer.max_epochs", "0"), "max_epochs 0", "at least 1")
    # no limit of epochs and none of steps: the schedule's length would be infinite (a traceback)
    cli_error(w.fit_args(w.data, tmp / "runs", "--trainer.max_epochs", "-1", "--trainer.max_time", "00:00:00:15"),
              "max_epochs -1", "--trainer.max_steps")
    cli_error(w.fit_args(w.data, tmp / "runs", "--trainer.max_epochs", "null", "--trainer.max_time", "00:00:00:15"),
              "max_time without max_epochs", "--trainer.max_steps")  # (Lightning then sets max_epochs -1)
    assert not (tmp / "runs").exists()  # refused before a run directory was made
    return result


def _cli_fit_refused(*option: str, named: str, valid: str) -> Callable[[World, Path], Result]:
    """A fit setting that would train nothing, or end without best.ckpt: refused before a run starts."""
    def case(w: World, tmp: Path) -> Result:
        result = cli_error(w.fit_args(w.data, tmp / "runs", *option), named, valid)
        assert not (tmp / "runs").exists()
        return result
    return case


def cli_image_too_small_for_the_backbone(w: World, tmp: Path) -> Result:
    """torch's 'Kernel size can't be greater than actual input size' traceback, as one line."""
    return cli_error(["extract", str(w.data), "--backbone", "convnext_atto", "--random-init", "--image-size", "16",
                      "--out", str(tmp / "f.npz"), "--cache-dir", str(tmp / "cache"), "--no-progress"],
                     "too small for this backbone", "--image-size")


def cli_gpu_config_without_gpu(w: World, tmp: Path) -> Result:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    return cli_error(w.fit_args(w.data, tmp / "runs", "--config", str(CONFIGS / "gpu.yaml")),
                     "--trainer.accelerator gpu", "sees none", "leave out configs/gpu.yaml")


def cli_pixels_on_device_with_cpu_pipeline(w: World, tmp: Path) -> Result:
    result = cli_error(w.fit_args(w.data, tmp / "runs", "--data.pipeline", "cpu", "--data.pixels_on_device", "true"),
                       "pixels_on_device", "pipeline 'device' or 'auto'", "decoded_cache")
    assert not (tmp / "runs").exists()
    return result


def cli_file_as_data_root(w: World, tmp: Path) -> Result:
    image = next((w.data / "good").iterdir())
    return cli_error(w.fit_args(image, tmp / "runs"), str(image), "one sub-folder per class")


def cli_truncated_image_in_data(w: World, tmp: Path) -> Result:
    data = small_dataset(tmp / "data")
    bad = data / "crack" / "crack_0000.png"
    bad.write_bytes(bad.read_bytes()[:60])
    result = cli_error(w.fit_args(data, tmp / "runs"), str(bad), "skip_bad_images")
    assert not (tmp / "runs" / "frozen" / "version_0" / "checkpoints").exists()
    return result


def cli_checkpoint_other_classes(w: World, tmp: Path) -> Result:
    data = small_dataset(tmp / "three", drop="spot")
    return cli_error(["test", "--config", str(w.run / "config.yaml"), "--ckpt_path", str(w.best),
                      "--data.root", str(data), "--trainer.logger.init_args.save_dir", str(tmp / "runs")],
                     str(w.best), "4 classes", "3 classes")


def cli_checkpoint_from_other_tool(w: World, tmp: Path) -> Result:
    path = tmp / "other.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(3)}, "epoch": 3, "pytorch-lightning_version": "2.1.0"}, path)
    return cli_error(["test", "--config", str(w.run / "config.yaml"), "--ckpt_path", str(path),
                      "--trainer.logger.init_args.save_dir", str(tmp / "runs")], str(path), "not written by vision_tl")


def cli_resume_from_truncated_checkpoint(w: World, tmp: Path) -> Result:
    path = tmp / "last.ckpt"
    path.write_bytes(w.best.read_bytes()[:1500])
    return cli_error(w.fit_args(w.data, tmp / "runs", "--ckpt_path", str(path)), str(path),
                     "not a readable PyTorch checkpoint")


def cli_directory_as_checkpoint(w: World, tmp: Path) -> Result:
    return cli_error(["export", str(w.run), "--out", str(tmp / "m.onnx")], str(w.run), "is a directory",
                     "best.ckpt")


def cli_evaluate_without_checkpoint(w: World, tmp: Path) -> Result:
    """Lightning would score the freshly built model (an untrained head) and exit 0."""
    return cli_error(["test", "--config", str(w.run / "config.yaml")], "--ckpt_path", str(w.best))


def cli_option_the_checkpoint_overrides(w: World, tmp: Path) -> Result:
    """The checkpoint's image_size wins (its weights need it): the user's 48 would be ignored."""
    return cli_error(["test", "--config", str(w.run / "config.yaml"), "--ckpt_path", str(w.best),
                      "--model.image_size", "48"], "--model.image_size 48", "the checkpoint has 32")


def cli_torchrun_with_one_device(w: World, tmp: Path, monkeypatch: pytest.MonkeyPatch) -> Result:
    """torchrun starts 2 processes, the shipped configs say devices: 1: each would train alone."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    result = cli_error(w.fit_args(w.data, tmp / "runs"), "WORLD_SIZE=2", "--trainer.devices 2 --trainer.strategy ddp")
    assert not (tmp / "runs").exists()
    return result


def cli_export_over_existing(w: World, tmp: Path) -> Result:
    result = cli_error(["export", str(w.best), "--out", str(w.onnx), "--parity-images", "none"],
                       str(w.onnx), "--overwrite")
    return Result("protected", result.message)


def cli_onnx_as_checkpoint(w: World, tmp: Path) -> Result:
    return cli_error(["export", str(w.onnx), "--out", str(tmp / "again.onnx")], str(w.onnx),
                     "not a PyTorch checkpoint (an ONNX model")


def cli_foreign_onnx(w: World, tmp: Path) -> Result:
    path = foreign_onnx(tmp / "other.onnx")
    return cli_error(["predict-onnx", str(path), str(w.data), "--out", str(tmp / "p.csv")], str(path), "--classes")


def cli_predict_out_is_directory(w: World, tmp: Path) -> Result:
    return cli_error(["predict-onnx", str(w.onnx), str(w.data), "--out", str(tmp)], str(tmp), "folder")


def cli_empty_path(w: World, tmp: Path) -> Result:
    """A script's "$DIR" with DIR unset: each command refuses it instead of reading the working
    directory (which holds images here), before any work."""
    shutil.copytree(w.data, tmp / "here")
    cases = [["predict-onnx", str(w.onnx), "", "--out", str(tmp / "p.csv")],
             ["export", str(w.best), "--out", str(tmp / "m.onnx"), "--parity-images", ""],
             ["extract", "", "--out", str(tmp / "f.npz")],
             w.fit_args("", tmp / "runs")]
    results = [cli_error(argv, "empty path") for argv in cases]
    assert not any((tmp / name).exists() for name in ("p.csv", "m.onnx", "f.npz", "runs"))
    return results[0]


def api_empty_path(w: World, tmp: Path) -> Result:
    shutil.copytree(w.data, tmp / "here")
    api_error(lambda: ImageFolderDataModule(""), ValueError, "root", "empty path")
    from vision_tl.reports.compare import compare_runs
    from vision_tl.reports.explain import explain_checkpoint
    from vision_tl.reports.report import report_run

    api_error(lambda: report_run(""), ValueError, "run directory", "empty path")
    api_error(lambda: compare_runs([""]), ValueError, "run directory", "empty path")
    api_error(lambda: explain_checkpoint(w.best, [""], tmp / "ex"), ValueError, "image file or folder", "empty path")
    return api_error(lambda: Predictor(w.onnx).predict_paths(""), DeployError, "empty path")


def cli_out_is_a_broken_link(w: World, tmp: Path) -> Result:
    """An --out name held by a link to a missing file: refused before the work, naming the link
    (it used to pass the first check, and the finished file was refused at the end)."""
    for name in ("p.csv", "m.onnx"):
        (tmp / name).symlink_to(tmp / "gone" / name)
    result = cli_error(["predict-onnx", str(w.onnx), str(w.data), "--out", str(tmp / "p.csv")],
                       str(tmp / "p.csv"), "symbolic link", "--overwrite")
    cli_error(["export", str(w.best), "--out", str(tmp / "m.onnx")], "symbolic link", "--overwrite")
    (tmp / "cmp").mkdir()
    (tmp / "cmp" / "compare.json").symlink_to(tmp / "gone" / "compare.json")
    cli_error(["compare", str(w.run), "--out", str(tmp / "cmp")], "compare.json")
    assert not (tmp / "gone").exists() and not (tmp / "m.parity.json").exists()
    return result


def cli_refit_into_existing_run(w: World, tmp: Path) -> Result:
    result = cli_error(w.fit_args(w.data, w.save_dir, "--trainer.logger.init_args.version", "0"),
                       str(w.run), "already holds a run")
    # a run trained from Python (no config.yaml) is a run too
    python_run = tmp / "runs" / "frozen" / "version_0"
    shutil.copytree(w.run, python_run)
    (python_run / "config.yaml").unlink()
    before = tree_digest(python_run)
    cli_error(w.fit_args(w.data, tmp / "runs", "--trainer.logger.init_args.version", "0"), "already holds a run")
    assert tree_digest(python_run) == before
    return Result("protected", result.message)


def cli_disk_full_writing_checkpoint(w: World, tmp: Path, monkeypatch: pytest.MonkeyPatch) -> Result:
    """Epoch 0 saves normally; in epoch 1 the disk 'fills up' after a few bytes of each write."""
    from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

    save_dir = tmp / "runs"
    args = w.fit_args(w.data, save_dir, "--trainer.max_epochs", "2", "--model.feature_cache", "null")
    real_save = TorchCheckpointIO.save_checkpoint
    state: dict[str, dict[str, str]] = {}

    def full_disk(self, checkpoint, path, storage_options=None):
        if checkpoint.get("epoch", 0) == 0:
            return real_save(self, checkpoint, path, storage_options)
        if not state:  # epoch 0's files, as they were before the failing write (whose own,
            # still empty, temporary file exists by now)
            state["before"] = {k: v for k, v in tree_digest(Path(path).parent).items() if k != str(path)}
        with open(path, "wb") as fh:
            fh.write(b"PK\x03\x04partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(TorchCheckpointIO, "save_checkpoint", full_disk)
    result = cli_error(args, "No space left on device", "could not write checkpoint", ".ckpt")
    checkpoints = save_dir / "frozen" / "version_0" / "checkpoints"
    assert state, "the simulated full disk was never hit"
    assert tree_digest(checkpoints) == state["before"], "a checkpoint changed or a partial file remained"
    torch.load(checkpoints / "last.ckpt", weights_only=True)  # still a whole checkpoint
    return Result("protected", result.message)


# ------------------------------------------------------------------------ the table

CASES: list[tuple[str, str, str, Callable]] = [
    # id, input, path (CLI/API), case
    ("truncated-jpeg", "truncated JPEG", "API", truncated_jpeg),
    ("damaged-jpeg", "JPEG with bytes flipped in its compressed data (Pillow alone reads it garbled)", "API",
     damaged_jpeg),
    ("zero-byte", "zero-byte .png", "API", zero_byte_file),
    ("text-as-png", "text file named .png", "API", text_named_png),
    ("png-as-jpg", "PNG bytes named .jpg (wrong extension)", "API", png_named_jpg),
    ("unknown-extension", "image with unknown extension (.raw) in a class folder", "API",
     image_with_unknown_extension),
    ("cmyk-jpeg", "CMYK JPEG", "API", cmyk_jpeg),
    ("tiff-16bit-gray", "16-bit grayscale TIFF", "API", tiff_16bit_gray),
    ("tiff-16bit-rgb", "16-bit RGB TIFF", "API", tiff_16bit_rgb),
    ("tiff-float-gray", "32-bit float grayscale TIFF", "API", tiff_float_gray),
    ("tiff-float-rgb", "32-bit float RGB TIFF (Pillow cannot open it)", "API", tiff_float_rgb),
    ("png-16bit", "16-bit PNG", "API", png_16bit),
    ("tiff-32bit-int", "32-bit integer TIFF", "API", tiff_32bit_int),
    ("tiff-signed-16bit", "signed 16-bit TIFF", "API", tiff_signed_16bit),
    ("multi-page-tiff", "multi-page TIFF", "API", multi_page_tiff),
    ("truncated-bmp-scan", "truncated BMP in a class folder (found by the scan, before training)", "API",
     truncated_bmp_at_scan),
    ("bomb-20k", "20,000 x 20,000 PNG (decompression bomb)", "API", decompression_bomb),
    ("bomb-limit-raised", "pixel limit raised (env var / set_max_image_pixels)", "API",
     decompression_bomb_limit_raised),
    ("bad-pixel-limit", "VISION_TL_MAX_IMAGE_PIXELS=lots, set_max_image_pixels(-5)", "API", bad_max_pixels_setting),
    ("bad-jpeg-decoder", "VISION_TL_JPEG_DECODER=turbo (not auto, simplejpeg or pillow)", "API",
     bad_jpeg_decoder_setting),
    ("symlink-loop", "symlink loop a.png -> b.png -> a.png in a class folder", "API", symlink_loop),
    ("broken-symlink", "broken symlink in a class folder", "API", broken_symlink),
    ("unreadable-file", "unreadable file (permission denied)", "API", unreadable_file),
    ("flat-broken-link", "broken symlink in a flat folder given to extract", "API", flat_folder_broken_link),
    ("unreadable-folder", "unreadable sub-folder of a class (permission denied)", "API", unreadable_folder),
    ("huge-image-header", "JPEG header claiming 30000x30000 (over twice the pixel limit)", "API", huge_image_header),
    ("split-spellings", "split folders named valid/, or Train/ and Val/", "API", split_folder_spellings),
    ("non-utf8-names", "file and class folder names that are not valid UTF-8", "CLI", non_utf8_names),
    ("linked-image", "a linked image (b.png -> a.png) in a folder given to predict-onnx", "CLI",
     linked_image_in_folder),
    ("nfc-nfd-names", "two file names that differ only in Unicode form (NFC, NFD)", "API",
     composed_and_decomposed_names),
    ("dir-as-image", "directory where an image file is expected", "API", directory_as_image),
    ("hidden-files", "hidden files, .DS_Store, ._*, .ipynb_checkpoints/", "API", hidden_files_ignored),
    ("class-names-unicode", "class folders with spaces and non-ASCII names", "CLI", class_names_spaces_non_ascii),
    ("same-image-two-classes", "the same image filed under two classes", "API", same_image_in_two_classes),
    ("same-image-two-classes-val", "the same image under two classes of val/ (train/ + val/ folders)", "API",
     same_image_two_classes_in_val),
    ("empty-class", "class folder with no images", "API", empty_class_folder),
    ("single-class", "data root with a single class folder", "API", single_class),
    ("missing-root", "data root that does not exist", "API", missing_data_root),
    ("foreign-ckpt", "checkpoint from another tool (plain state dict)", "API", foreign_checkpoint),
    ("truncated-ckpt", "truncated checkpoint", "API", truncated_checkpoint),
    ("unsafe-ckpt", "checkpoint with pickled code objects", "API", unsafe_checkpoint),
    ("foreign-onnx", "ONNX file from another tool (no vision_tl metadata)", "API", foreign_onnx_model),
    ("truncated-onnx", "truncated ONNX file", "API", truncated_onnx),
    ("dir-as-model", "directory where an ONNX file is expected", "API", directory_as_model),
    ("garbage-weights", "garbage backbone weights file", "API", garbage_backbone_weights),
    ("cache-is-file", "feature cache path is a file", "API", feature_cache_is_file),
    ("garbage-features", "corrupt feature file (.npz)", "API", garbage_feature_file),
    ("export-exists", "export onto an existing model.onnx", "API", export_over_existing),
    ("cli-unknown-key", "config with an unknown key (model.learning_rate)", "CLI", cli_unknown_config_key),
    ("cli-mistyped-option", "mistyped option (--model.lrr)", "CLI", cli_mistyped_option),
    ("cli-evaluation-config", "fit --config with the config a `test` run saved", "CLI", cli_evaluation_config_for_fit),
    ("cli-wrong-type", "wrong type (--model.lr fast)", "CLI", cli_wrong_type),
    ("cli-negative-lr", "negative learning rate", "CLI", cli_negative_learning_rate),
    ("cli-negative-epochs", "--trainer.max_epochs -3", "CLI", cli_negative_epochs),
    ("cli-linked-option", "--data.image_size (follows --model.image_size)", "CLI", cli_linked_option),
    ("cli-zero-epochs", "--trainer.max_epochs 0", "CLI", cli_zero_epochs),
    ("cli-image-too-small", "an image size smaller than the backbone's layers (convnext_atto at 16 px)", "CLI",
     cli_image_too_small_for_the_backbone),
    ("cli-accumulate-negative", "--trainer.accumulate_grad_batches -1 (a schedule of one step: lr 0)", "CLI",
     _cli_fit_refused("--trainer.accumulate_grad_batches", "-1", named="accumulate_grad_batches -1",
                      valid="at least 1")),
    ("cli-no-val-batches", "--trainer.limit_val_batches 0", "CLI",
     _cli_fit_refused("--trainer.limit_val_batches", "0", named="limit_val_batches 0", valid="positive number")),
    ("cli-val-interval-zero", "--trainer.val_check_interval 0", "CLI",
     _cli_fit_refused("--trainer.val_check_interval", "0", named="val_check_interval 0", valid="(0, 1]")),
    ("cli-val-never", "--trainer.check_val_every_n_epoch 5 with --trainer.max_epochs 1", "CLI",
     _cli_fit_refused("--trainer.check_val_every_n_epoch", "5", named="check_val_every_n_epoch 5",
                      valid="at most the number of epochs")),
    ("cli-monitor-unknown", "--checkpoint.monitor val/bogus (or null)", "CLI",
     _cli_fit_refused("--checkpoint.monitor", "val/bogus", named="val/bogus", valid="val/balanced_acc")),
    ("cli-checkpoint-filename", "--checkpoint.filename 'ep{epoch}'", "CLI",
     _cli_fit_refused("--checkpoint.filename", "ep{epoch}", named="--checkpoint.filename",
                      valid="RUN/checkpoints/best.ckpt")),
    ("cli-damaged-shard", "feature cache shard with bytes overwritten (NaN)", "CLI", cli_damaged_feature_shard),
    ("cli-damaged-decoded", "decoded-image cache with its pixels zeroed", "CLI", cli_damaged_decoded_cache),
    ("cli-config-not-mapping", "config file empty, not YAML, or 'model: 3'", "CLI", cli_config_not_a_mapping),
    ("cli-negative-workers", "--data.num_workers -1", "CLI", cli_negative_workers),
    ("cli-gpu-without-gpu", "configs/gpu.yaml on a machine without a GPU", "CLI", cli_gpu_config_without_gpu),
    ("cli-pixels-on-device-cpu", "--data.pixels_on_device true with the CPU pipeline", "CLI",
     cli_pixels_on_device_with_cpu_pipeline),
    ("cli-file-as-root", "image file where the data folder is expected", "CLI", cli_file_as_data_root),
    ("cli-truncated-in-data", "truncated image inside the training data", "CLI", cli_truncated_image_in_data),
    ("cli-ckpt-other-classes", "checkpoint trained on 4 classes, data with 3", "CLI", cli_checkpoint_other_classes),
    ("cli-ckpt-other-tool", "Lightning checkpoint from another tool", "CLI", cli_checkpoint_from_other_tool),
    ("cli-resume-truncated", "resume from a truncated checkpoint", "CLI", cli_resume_from_truncated_checkpoint),
    ("cli-dir-as-ckpt", "run directory where a checkpoint file is expected", "CLI", cli_directory_as_checkpoint),
    ("cli-no-ckpt", "test/predict/validate without --ckpt_path", "CLI", cli_evaluate_without_checkpoint),
    ("cli-ckpt-overrides-option", "--model.image_size that the checkpoint's own replaces", "CLI",
     cli_option_the_checkpoint_overrides),
    ("cli-torchrun-one-device", "torchrun with 2 processes and --trainer.devices 1", "CLI",
     cli_torchrun_with_one_device),
    ("cli-export-exists", "export onto an existing model.onnx", "CLI", cli_export_over_existing),
    ("cli-onnx-as-ckpt", "exported ONNX model given to export as the checkpoint", "CLI", cli_onnx_as_checkpoint),
    ("cli-foreign-onnx", "predict-onnx with another tool's ONNX", "CLI", cli_foreign_onnx),
    ("cli-out-is-dir", "predict-onnx --out is a directory", "CLI", cli_predict_out_is_directory),
    ("cli-empty-path", "an empty path (a script's unset \"$DIR\") for images, data or a setting", "CLI",
     cli_empty_path),
    ("api-empty-path", "an empty path for the data or the images to predict", "API", api_empty_path),
    ("cli-out-broken-link", "--out names a symbolic link to a missing file", "CLI", cli_out_is_a_broken_link),
    ("cli-refit-run", "fit into an existing run directory", "CLI", cli_refit_into_existing_run),
    ("cli-disk-full", "disk full while writing a checkpoint (simulated ENOSPC)", "CLI",
     cli_disk_full_writing_checkpoint),
]
OUTCOMES: dict[str, tuple[str, str, Result]] = {}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    root = tmp_path_factory.mktemp("bad_input")
    data = small_dataset(root / "data")
    for old, new in (("scratch", CLASSES[2]), ("spot", CLASSES[3])):
        (data / old).rename(data / new)
    save_dir, cache = root / "runs", root / "cache"
    w = World(data, save_dir, save_dir / "frozen" / "version_0", cache, root / "export" / "model.onnx")
    code, err = run_cli(w.fit_args(data, save_dir))
    assert code == 0, err
    w.onnx.parent.mkdir()
    export_onnx(w.best, w.onnx, ExportOptions(parity_images="auto"), log=lambda _: None)
    assert any(cache.rglob("*")), "the run should have filled the feature cache"
    yield w
    if os.environ.get(TABLE_ENV):
        write_table(Path(os.environ[TABLE_ENV]))


@pytest.fixture(autouse=True)
def _protected(world: World):
    """No case may change the shared run directory, feature cache or export."""
    before = tree_digest(world.run, world.cache, world.onnx.parent)
    yield
    assert tree_digest(world.run, world.cache, world.onnx.parent) == before


@pytest.mark.slow
@pytest.mark.parametrize("label,via,case", [pytest.param(*c[1:], id=c[0]) for c in CASES])
def test_bad_input(world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request,
                   label: str, via: str, case: Callable) -> None:
    monkeypatch.chdir(tmp_path)  # nothing may land in the working directory of the suite
    monkeypatch.setattr("vision_tl.imaging._max_pixels", None)
    monkeypatch.delenv("VISION_TL_MAX_IMAGE_PIXELS", raising=False)
    monkeypatch.delenv("VISION_TL_JPEG_DECODER", raising=False)
    monkeypatch.delenv("VISION_TL_DEBUG", raising=False)
    import inspect

    extra = {"monkeypatch": monkeypatch} if "monkeypatch" in inspect.signature(case).parameters else {}
    result = case(world, tmp_path, **extra)
    assert result.outcome in ("clear error", "works", "protected")
    OUTCOMES[request.node.callspec.id] = (label, via, result)


def write_table(path: Path) -> None:
    """Markdown table of the outcomes of this run (only cases that ran and passed appear)."""
    def short(text: str) -> str:
        text = re.sub(r"/tmp/pytest-of-[^/]+/pytest-\d+/[^/\s`]+/?", "…/", " ".join(text.split()))
        text = text.replace("|", "\\|")
        return text if len(text) <= 160 else text[:157] + "..."

    rows = [f"| {i} | {label} | {via} | {r.outcome} | `{short(r.message)}` |"
            for i, (case_id, *_rest) in enumerate(CASES, 1) if case_id in OUTCOMES
            for label, via, r in [OUTCOMES[case_id]]]
    missing = [c[0] for c in CASES if c[0] not in OUTCOMES]
    lines = ["| # | input | path | outcome | message shown (abbreviated) |", "|---|---|---|---|---|", *rows]
    if missing:
        lines += ["", f"Not recorded (failed or skipped in this run): {', '.join(missing)}"]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
