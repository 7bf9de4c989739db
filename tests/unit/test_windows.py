"""What breaks on Windows, simulated on Linux: its file rules and its text encodings.

Line PCs are very often Windows. There a file that is open cannot be renamed or deleted (Python's
``open``/``os.open`` never share it for deletion), ``os.fsync`` needs a descriptor open for writing
(``FlushFileBuffers``), there is no ``fcntl``, and text files and a redirected console default to
the ANSI code page (cp1252), not UTF-8.
"""

from __future__ import annotations

import ast
import errno
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from vision_tl.deploy.cli import main as predict_onnx
from vision_tl.utils import files
from vision_tl.utils.files import atomic_path, atomic_write_text


def _open_here(path: str | os.PathLike) -> bool:
    """Whether this process holds a descriptor on the file at ``path``."""
    try:
        target = os.stat(path)
    except OSError:
        return False
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.path.samestat(os.fstat(int(name)), target):
                return True
        except OSError:
            continue
    return False


def _open_under(folder: str | os.PathLike) -> bool:
    """Whether this process holds a descriptor on a file inside the folder ``folder``."""
    if not os.path.isdir(folder) or os.path.islink(folder):
        return False
    inside = os.path.realpath(folder) + os.sep
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}").startswith(inside):
                return True
        except OSError:
            continue
    return False


def _sharing_violation(path: str | os.PathLike) -> PermissionError:
    return PermissionError(errno.EACCES, "The process cannot access the file because it is being used by "
                                         "another process (simulated Windows)", str(path))


@pytest.fixture
def windows_files(monkeypatch):
    """Windows' rules for open files, and no ``fcntl``, for what runs inside the test."""
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("the simulation reads /proc/self/fd (Linux)")
    real = {name: getattr(os, name) for name in ("replace", "rename", "unlink", "remove", "fsync")}

    def moving(name):
        def call(src, dst, *args, **kwargs):  # (a folder with an open file in it cannot be renamed either)
            if _open_here(src) or _open_here(dst) or _open_under(src):
                raise _sharing_violation(src)
            return real[name](src, dst, *args, **kwargs)
        return call

    def deleting(name):
        def call(path, *args, **kwargs):
            if _open_here(path):
                raise _sharing_violation(path)
            return real[name](path, *args, **kwargs)
        return call

    import fcntl

    def fsync(fd):
        fd = fd if isinstance(fd, int) else fd.fileno()
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY:
            raise OSError(errno.EBADF, "Bad file descriptor (simulated Windows: fsync of a read-only descriptor)")
        return real["fsync"](fd)

    for name in ("replace", "rename"):
        monkeypatch.setattr(os, name, moving(name))
    for name in ("unlink", "remove"):
        monkeypatch.setattr(os, name, deleting(name))
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(files, "fcntl", None)


def test_the_simulation_refuses_what_windows_refuses(tmp_path, windows_files):
    path = tmp_path / "folder" / "a.txt"
    path.parent.mkdir()
    path.write_text("x", encoding="utf-8")
    with open(path, "rb") as fh:
        with pytest.raises(PermissionError):
            os.replace(path, tmp_path / "b.txt")
        with pytest.raises(OSError):
            os.fsync(fh.fileno())
        with pytest.raises(PermissionError):
            os.rename(path.parent, tmp_path / "other")
    os.replace(path, tmp_path / "b.txt")
    os.rename(path.parent, tmp_path / "other")


def test_atomic_writes_work_under_windows_file_rules(tmp_path, windows_files):
    """Every file the kit writes goes through atomic_path: its temporary file must be closed
    before the rename, and synced through a descriptor that may write."""
    target = tmp_path / "labels.json"
    atomic_write_text(target, '["good"]')
    atomic_write_text(target, '["good", "dent"]')  # replacing an existing file
    with atomic_path(tmp_path / "new.bin", overwrite=False) as tmp:
        tmp.write_bytes(b"x")
    assert target.read_text(encoding="utf-8") == '["good", "dent"]' and (tmp_path / "new.bin").read_bytes() == b"x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.json", "new.bin"]  # no temporary file left


def tiny_model(path: Path, classes: list[str]) -> Path:
    """A uint8 NHWC model with vision_tl metadata: mean colour -> softmax over ``classes``."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from vision_tl.deploy import ModelMetadata

    weights = np.linspace(-1, 1, 3 * len(classes), dtype=np.float32).reshape(3, len(classes))
    nodes = [helper.make_node("Cast", ["image"], ["x"], to=TensorProto.FLOAT),
             helper.make_node("ReduceMean", ["x"], ["feat"], axes=[1, 2], keepdims=0),
             helper.make_node("MatMul", ["feat", "W"], ["z"]),
             helper.make_node("Softmax", ["z"], ["probabilities"], axis=-1)]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("image", TensorProto.UINT8, ["N", 8, 8, 3])],
                              [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", len(classes)])],
                              [numpy_helper.from_array(weights / 64, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    meta = ModelMetadata(classes=classes, input_size=(8, 8), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
                         interpolation="bicubic", backbone="tiny", kit_version="0.1.0", metrics={},
                         good_class=classes[0], threshold=0.5)
    helper.set_model_props(model, meta.to_props())
    onnx.save(model, str(path))
    return path


def line_images(folder: Path, n: int = 3) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(np.full((10, 12, 3), 40 * i, np.uint8)).save(folder / f"part_{i}.png")
    return folder


def test_predict_onnx_writes_and_replaces_its_csv_under_windows_file_rules(tmp_path, windows_files, capsys):
    model = tiny_model(tmp_path / "model.onnx", ["good", "scratch"])
    args = [str(model), str(line_images(tmp_path / "images")), "--out", str(tmp_path / "p.csv")]
    assert predict_onnx(args) == 0, capsys.readouterr().err
    assert predict_onnx([*args, "--overwrite"]) == 0, capsys.readouterr().err
    assert (tmp_path / "p.csv").read_text(encoding="utf-8").startswith("path,predicted")


def test_predict_onnx_prints_class_names_a_cp1252_output_cannot_hold(tmp_path):
    """Redirected to a file or a pipe, Windows' standard output is cp1252: a class named 傷 in the
    summary must come out escaped, not as a UnicodeEncodeError after the CSV was written."""
    model = tiny_model(tmp_path / "model.onnx", ["gut", "Kratzer_ä", "傷"])
    script = "import sys; from vision_tl.cli import console_main; sys.exit(console_main())"
    args = ["predict-onnx", str(model), str(line_images(tmp_path / "images")), "--out", str(tmp_path / "p.csv")]
    env = {**os.environ, "PYTHONIOENCODING": "cp1252", "PYTHONUTF8": "0"}
    done = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr.decode("cp1252", "replace")
    out = done.stdout.decode("cp1252")
    assert "Kratzer_ä" in out and "\\u50b7" in out and "wrote" in out
    assert (tmp_path / "p.csv").read_text(encoding="utf-8").startswith("path,predicted")


def _text_io_without_encoding(tree: ast.AST) -> list[int]:
    """Lines of ``open(...)`` in text mode, ``.read_text()`` and ``.write_text()`` without an encoding."""
    lines = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or any(k.arg in ("encoding", None) for k in node.keywords):
            continue
        func = node.func
        if isinstance(func, ast.Attribute) and func.attr == "read_text" and not node.args:
            lines.append(node.lineno)
        elif isinstance(func, ast.Attribute) and func.attr == "write_text" and len(node.args) < 2:
            lines.append(node.lineno)
        elif isinstance(func, ast.Name) and func.id == "open":
            mode = next((k.value for k in node.keywords if k.arg == "mode"), node.args[1] if len(node.args) > 1 else None)
            binary = isinstance(mode, ast.Constant) and isinstance(mode.value, str) and "b" in mode.value
            if not binary and len(node.args) < 4:  # (the fourth positional argument is the encoding)
                lines.append(node.lineno)
    return lines


def test_the_kit_reads_and_writes_text_files_as_utf8():
    """Without an encoding, Python reads and writes text in the locale's: cp1252 on Windows (before
    Python 3.15), where a config or JSON file with a class named Kratzer_ä or 傷 was misread or refused."""
    package = Path(files.__file__).resolve().parents[1]
    found = [f"{path.relative_to(package.parent)}:{line}" for path in sorted(package.rglob("*.py"))
             for line in _text_io_without_encoding(ast.parse(path.read_text(encoding="utf-8")))]
    assert found == [], "text I/O without encoding='utf-8': " + ", ".join(found)
    sample = ast.parse("open(p)\nopen(p, 'rb')\nopen(p, 'w', encoding='utf-8')\np.read_text()\np.write_text(t)\n"
                       "p.write_text(t, encoding='utf-8')\nos.open(p, os.O_RDONLY)\n")
    assert _text_io_without_encoding(sample) == [1, 4, 5]


@pytest.fixture
def no_file_ids(tmp_path, monkeypatch):
    """A drive that gives every file the id 0 (sshfs-win, WebDAV), holding good/a.png and scratch/a.png."""
    from PIL import Image

    from vision_tl import imaging

    for name in ("good", "scratch"):
        (tmp_path / name).mkdir()
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / name / "a.png")
    real_stat = os.stat

    class NoFileId:
        def __init__(self, info):
            self._info = info

        st_ino = 0

        def __getattr__(self, name):
            return getattr(self._info, name)

    monkeypatch.setattr(imaging.os, "stat", lambda *a, **k: NoFileId(real_stat(*a, **k)))


def test_folders_of_a_drive_without_file_ids_are_all_searched(tmp_path, no_file_ids):
    """Some Windows network drives (sshfs-win, WebDAV) give every file st_ino 0: the walk, which
    visits each real folder once, must not take every sub-folder for the root seen again."""
    from vision_tl import imaging

    images, _ = imaging.image_files(tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in images] == ["good/a.png", "scratch/a.png"]


def test_a_link_back_up_a_drive_without_file_ids_is_not_followed_round(tmp_path, no_file_ids):
    """Without file ids the folder seen again is told by its real path: a link back up the tree
    (or a junction) was followed round until the system refused the path, every image once a level."""
    from vision_tl import imaging

    (tmp_path / "good" / "up").symlink_to(tmp_path, target_is_directory=True)
    images, others = imaging.image_files(tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in images] == ["good/a.png", "scratch/a.png"]
    assert others == []


def _open_in_cp1252_by_default(monkeypatch, *modules) -> None:
    """``open`` in ``modules`` as on Windows before Python 3.15: text in cp1252 unless told otherwise."""
    import builtins

    def cp1252_open(file, mode="r", buffering=-1, encoding=None, *args, **kwargs):
        if "b" not in mode and encoding is None:
            encoding = "cp1252"
        return builtins.open(file, mode, buffering, encoding, *args, **kwargs)

    for module in modules:
        monkeypatch.setattr(module, "open", cp1252_open, raising=False)


@pytest.mark.parametrize("root", ["Jürgen/data", "傷/data"])
def test_a_run_config_is_written_as_utf8_on_a_cp1252_system(tmp_path, monkeypatch, root):
    """jsonargparse writes in the system's encoding: on Windows a data root with Jürgen was saved as
    cp1252 (which report and export then could not read), one with 傷 failed to save at all."""
    from types import SimpleNamespace

    import jsonargparse
    import jsonargparse._core

    from vision_tl.tasks import lightning_cli
    from vision_tl.utils import read_run_config

    _open_in_cp1252_by_default(monkeypatch, jsonargparse._core)
    parser = jsonargparse.ArgumentParser()
    parser.add_argument("--data.root", type=str)
    config = parser.parse_args(["--data.root", str(tmp_path / root)])
    run = tmp_path / "run"
    trainer = SimpleNamespace(log_dir=str(run), is_global_zero=True, strategy=SimpleNamespace(broadcast=lambda x: x))
    try:
        lightning_cli.SaveRunConfig(parser, config).setup(trainer, None, "fit")
    finally:
        lightning_cli._forget_runs()  # (the run's lock, held for the command)
    assert read_run_config(run)["data"]["root"] == str((tmp_path / root).resolve())
    assert root.split("/")[0].encode("utf-8") in (run / "config.yaml").read_bytes()


def test_a_run_config_is_read_back_by_config_as_utf8_on_a_cp1252_system(tmp_path, monkeypatch, capsys):
    """``vision-tl validate --config RUN/config.yaml``: jsonargparse read the kit's UTF-8 file in the
    system's encoding, so on Windows the run's data root C:/Users/Jürgen came back as .../JÃ¼rgen."""
    import jsonargparse._paths
    import yaml

    from vision_tl.cli import main

    _open_in_cp1252_by_default(monkeypatch, jsonargparse._paths)
    config = Path(__file__).resolve().parents[2] / "configs" / "frozen.yaml"
    run_config = tmp_path / "config.yaml"
    run_config.write_text("data:\n  root: C:/Users/Jürgen/傷\n", encoding="utf-8")
    assert main(["fit", "--config", str(config), "--config", str(run_config), "--print_config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["data"]["root"] == "C:/Users/Jürgen/傷"
    group = tmp_path / "data.yaml"  # a group's own file on the command line
    group.write_text("root: C:/Users/Jürgen/傷\n", encoding="utf-8")
    assert main(["fit", "--config", str(config), "--data", str(group), "--print_config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["data"]["root"] == "C:/Users/Jürgen/傷"


def test_a_run_config_in_another_encoding_is_refused_naming_the_file(tmp_path):
    from vision_tl.utils import read_run_config

    (tmp_path / "config.yaml").write_bytes("data:\n  root: C:/Users/Jürgen\n".encode("cp1252"))
    with pytest.raises(ValueError, match=r"config\.yaml: not a UTF-8 text file .* save it with UTF-8"):
        read_run_config(tmp_path)
    (tmp_path / "config.yaml").write_bytes("data:\n  root: C:/Users/Jürgen\n".encode("utf-8-sig"))
    assert read_run_config(tmp_path) == {"data": {"root": "C:/Users/Jürgen"}}


@pytest.fixture
def excel_holds(monkeypatch, windows_files):
    """``excel_holds(path)``: ``path`` open in Excel, as Windows sees it: shared for reading only, so
    opening it for writing fails with a sharing violation, and (the fixture) it cannot be replaced."""
    held: list = []
    real_open = os.open

    def sharing_open(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR) and any(os.path.samefile(path, fh.name) for fh in held
                                                     if os.path.exists(path)):
            raise _sharing_violation(path)
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", sharing_open)
    yield lambda path: held.append(open(path, "rb"))  # noqa: SIM115 (closed below)
    for fh in held:
        fh.close()


def test_predict_onnx_refuses_an_output_open_in_excel_before_inference(tmp_path, excel_holds, monkeypatch, capsys):
    from vision_tl.deploy import cli

    model = tiny_model(tmp_path / "model.onnx", ["good", "scratch"])
    out = tmp_path / "p.csv"
    out.write_text("path,predicted\nold,good\n", encoding="utf-8")
    excel_holds(out)

    def no_inference(*args, **kwargs):
        raise AssertionError("inference ran before the output was checked")

    monkeypatch.setattr(cli, "Predictor", no_inference)
    info = predict_onnx([str(model), str(line_images(tmp_path / "images")), "--out", str(out), "--overwrite"])
    err = capsys.readouterr().err
    assert info == 2 and f"--out {out} cannot be replaced" in err and "open in another program" in err
    assert out.read_text(encoding="utf-8") == "path,predicted\nold,good\n"


def test_predict_onnx_keeps_its_predictions_when_the_output_cannot_be_replaced(tmp_path, windows_files, capsys):
    """Opened by another program after the check (or one that shares it for writing, not deletion):
    the final rename fails after all the inference, whose results must not be lost."""
    model = tiny_model(tmp_path / "model.onnx", ["good", "scratch"])
    out = tmp_path / "p.csv"
    out.write_text("path,predicted\nold,good\n", encoding="utf-8")
    (tmp_path / "p.unsaved.csv").write_text("an earlier one\n", encoding="utf-8")
    with open(out, "rb"):
        info = predict_onnx([str(model), str(line_images(tmp_path / "images")), "--out", str(out), "--overwrite"])
    err = capsys.readouterr().err
    kept = tmp_path / "p.unsaved_2.csv"
    assert info == 2 and f"{out} could not be replaced" in err and "open in another program" in err
    assert f"written to {kept} instead" in err
    assert out.read_text(encoding="utf-8") == "path,predicted\nold,good\n"
    assert (tmp_path / "p.unsaved.csv").read_text(encoding="utf-8") == "an earlier one\n"
    assert len(kept.read_text(encoding="utf-8").splitlines()) == 4  # header and three images


def test_an_output_refused_on_posix_blames_permissions_not_excel(tmp_path, monkeypatch, capsys):
    """With file locks (Linux, macOS) an open file is replaced anyway: a refused rename is a
    permission (a sticky folder holding another user's file), which the message says."""
    model = tiny_model(tmp_path / "model.onnx", ["good", "scratch"])
    out = tmp_path / "p.csv"
    out.write_text("old\n", encoding="utf-8")
    real = os.replace

    def refused(src, dst, *args, **kwargs):
        if os.fspath(dst) == os.fspath(out):
            raise PermissionError(errno.EPERM, "Operation not permitted", os.fspath(dst))
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", refused)
    info = predict_onnx([str(model), str(line_images(tmp_path / "images")), "--out", str(out), "--overwrite"])
    err = capsys.readouterr().err
    assert info == 2 and "check the permissions" in err and "Excel" not in err
    assert (tmp_path / "p.unsaved.csv").is_file() and out.read_text(encoding="utf-8") == "old\n"


def test_predict_onnx_writes_a_csv_excel_reads_as_utf8_when_asked(tmp_path, capsys):
    """Excel on Windows reads a CSV without a byte order mark as cp1252: Kratzer_ä came out Kratzer_Ã¤."""
    model = tiny_model(tmp_path / "model.onnx", ["gut", "Kratzer_ä"])
    args = [str(model), str(line_images(tmp_path / "images"))]
    assert predict_onnx([*args, "--out", str(tmp_path / "plain.csv")]) == 0, capsys.readouterr().err
    assert predict_onnx([*args, "--out", str(tmp_path / "excel.csv"), "--csv-encoding", "utf-8-sig"]) == 0
    assert (tmp_path / "plain.csv").read_bytes().startswith(b"path,")  # the default is unchanged
    excel = (tmp_path / "excel.csv").read_bytes()
    assert excel.startswith(b"\xef\xbb\xbfpath,") and "Kratzer_ä".encode() in excel
    assert predict_onnx([*args, "--out", str(tmp_path / "p.json"), "--csv-encoding", "utf-8-sig"]) == 2
    assert "--csv-encoding utf-8-sig is for a .csv --out" in capsys.readouterr().err
    assert not (tmp_path / "p.json").exists()


def test_cache_clear_without_file_locks_keeps_entries_in_use(tmp_path, windows_files, capsys):
    """Without locks, clear cannot tell the entries a running job reads: it deleted them all
    (with --older-than 0 or none), and a file held open then failed to delete half-way."""
    import gc
    import time

    from PIL import Image

    from vision_tl.caches.cli import main as cache
    from vision_tl.data import decoded_cache as dc

    paths = []
    for i in range(3):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(np.full((8, 8, 3), 60 * i, np.uint8)).save(paths[-1])
    pixels, _ = dc.decoded_images(paths, [files.file_sha256(p) for p in paths], (8, 8), "bilinear",
                                  tmp_path / "dec")
    data = Path(pixels.filename)
    del pixels
    gc.collect()  # (the mapping held the file open)
    root = ["--decoded", str(tmp_path / "dec")]
    assert cache(["clear", *root, "--yes"]) == 2 and cache(["clear", *root, "--older-than", "0.5", "--yes"]) == 2
    assert "no file locks" in capsys.readouterr().err and data.is_file()
    old = time.time() - 2 * 86400
    for path in data.parent.iterdir():
        os.utime(path, (old, old))
    with open(data, "rb"):  # a run reading the pixels
        assert cache(["clear", *root, "--older-than", "1", "--yes"]) == 0
        assert "in use by a running process" in capsys.readouterr().out and data.is_file()
    assert cache(["clear", *root, "--older-than", "1", "--yes"]) == 0
    assert not data.exists()


def _aged(path: Path, hours: float, data: bytes = b"\0" * 64) -> Path:
    import time

    path.write_bytes(data)
    when = time.time() - hours * 3600
    os.utime(path, (when, when))
    return path


def test_temporary_files_of_killed_writers_are_swept_by_age_without_file_locks(tmp_path, windows_files, capsys):
    """Without flock no lock tells a killed writer's temporary file from a live one's, and none was
    ever removed: a killed extraction's shard or a killed build's pixel file (a cache's size) stayed
    for good. One unchanged for a day goes; a younger one, this process's own and one held open stay."""
    from vision_tl.caches.cli import main as cache
    from vision_tl.features.store import ShardStore

    store = tmp_path / "store"
    store.mkdir()
    killed = _aged(store / ".0123456789abcdef.feats.npy.otherpc-123.abcd1234.tmp", 30)
    recent = _aged(store / ".0123456789abcdef.sum.json.otherpc-124.abcd1234.tmp", 2)  # perhaps at work
    mine = _aged(store / f".fedcba9876543210.feats.npy.{files._HOST}-{os.getpid()}.abcd1234.tmp", 30)
    held = _aged(store / ".1111111111111111.feats.npy.otherpc-125.abcd1234.tmp", 30)
    with open(held, "rb"):  # its writer at work (Windows refuses to delete it)
        ShardStore(store, {"format": 1, "backbone": "tiny_net", "num_features": 4})
    assert not killed.exists() and recent.exists() and mine.exists() and held.exists()
    orphan = _aged(tmp_path / ".labels.json.otherpc-126.abcd1234.tmp", 30)  # any atomic write's
    atomic_write_text(tmp_path / "labels.json", "[]")
    assert not orphan.exists()
    decoded = tmp_path / "dec"
    decoded.mkdir()
    killed = _aged(decoded / ".0123456789abcdef01234567.npy.otherpc-127.abcd1234.tmp", 30)
    recent = _aged(decoded / ".0123456789abcdef01234567.npy.otherpc-128.abcd1234.tmp", 2)
    assert cache(["clear", "--decoded", str(decoded), "--older-than", "1", "--yes"]) == 0
    assert "deleted 1 entry" in capsys.readouterr().out
    assert not killed.exists() and recent.exists()


STORE_IDENTITY = {"format": 1, "backbone": "tiny_net", "weights": "random", "state_digest": "0", "num_features": 4,
                  "preprocessing": {"input_size": [32, 32], "mean": [0.5] * 3, "std": [0.5] * 3,
                                    "interpolation": "bilinear"}, "stages": ["pooled"]}


def _age_tree(folder: Path, days: float) -> None:
    import time

    when = time.time() - days * 86400
    for path in folder.rglob("*"):
        os.utime(path, (when, when))


def test_cache_clear_without_file_locks_deletes_a_store_whole_or_not_at_all(tmp_path, windows_files, capsys):
    """A run reading a store holds its shards open (memory maps), which Windows refuses to delete.
    clear deleted the keys files (the commit markers) first and stopped at the first open shard:
    a store with every row lost, listed as 0 images, reported as in use. Now it stays whole, and
    goes whole once the run is done."""
    import gc

    from vision_tl.caches.cli import main as cache
    from vision_tl.features.cache import FeatureCache
    from vision_tl.features.store import ShardStore

    path = tmp_path / "feat" / "tiny_net" / FeatureCache.key(STORE_IDENTITY)
    writer = ShardStore(path, STORE_IDENTITY)
    first, second = [f"{i:064x}" for i in range(3)], [f"{i:064x}" for i in range(3, 6)]
    writer.append(first, np.ones((3, 4), np.float32))
    writer.append(second, np.ones((3, 4), np.float32))
    del writer
    reader = ShardStore(path, STORE_IDENTITY)
    reader.read(second[:1])  # maps the second shard only
    _age_tree(path, 2)
    before = sorted(p.name for p in path.iterdir())
    root = ["--features", str(tmp_path / "feat")]
    assert cache(["clear", *root, "--older-than", "1", "--yes"]) == 0
    assert "in use by a running process" in capsys.readouterr().out
    assert sorted(p.name for p in path.iterdir()) == before
    assert len(ShardStore(path, STORE_IDENTITY)) == 6
    del reader
    gc.collect()
    _age_tree(path, 2)
    assert cache(["clear", *root, "--older-than", "1", "--yes"]) == 0
    assert "deleted 1 entry" in capsys.readouterr().out
    assert list((tmp_path / "feat").rglob("*")) == []


def test_cache_clear_without_file_locks_deletes_a_decoded_entry_whole_or_not_at_all(tmp_path, windows_files,
                                                                                  capsys):
    """The pixel file went first, then the .json, held open (a run reading it, an indexer), was
    refused: a pixel-less half. Now neither goes while either is open."""
    from vision_tl.caches.cli import main as cache

    dec = tmp_path / "dec"
    dec.mkdir()
    data = dec / "0123456789abcdef01234567.npy"
    np.save(data, np.zeros((2, 4, 4, 3), np.uint8))
    meta = data.with_suffix(".json")
    meta.write_text('{"format": 1, "count": 2, "size": [4, 4], "bad": []}', encoding="utf-8")
    _age_tree(dec, 2)
    with open(meta, "rb"):
        assert cache(["clear", "--decoded", str(dec), "--older-than", "1", "--yes"]) == 0
        assert "in use by a running process" in capsys.readouterr().out
    assert sorted(p.name for p in dec.iterdir()) == [meta.name, data.name]
    assert cache(["clear", "--decoded", str(dec), "--older-than", "1", "--yes"]) == 0
    assert list(dec.iterdir()) == []
