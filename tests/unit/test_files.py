"""Atomic writes: what a killed writer leaves behind is cleared by the next write of the file."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from vision_tl.utils.files import atomic_path, atomic_write_text

WRITER = """
import sys, time
from vision_tl.utils.files import atomic_path
with atomic_path(sys.argv[1]) as tmp:
    tmp.write_bytes(b"x" * 100_000)
    print("writing", flush=True)
    time.sleep(600)
"""


def _writer(target) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(target)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    return proc


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL and process checks are POSIX")
def test_a_killed_writers_temporary_file_goes_with_the_next_write(tmp_path):
    """A checkpoint or decoded cache half-written by a killed process (SIGKILL: no clean-up)
    must not stay on disk for ever; a writer that still runs keeps its own (it holds it locked,
    which a process in another container or on another machine sees too)."""
    target = tmp_path / "last.ckpt"
    killed, running = _writer(target), _writer(target)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    temps = sorted(tmp_path.glob(".last.ckpt.*.tmp"))
    assert len(temps) == 2
    atomic_write_text(target, "first")  # the killed writer's goes at once (its process is known gone)
    assert [p.name for p in tmp_path.glob(".last.ckpt.*.tmp")] == [p.name for p in temps if f"-{running.pid}." in p.name]
    for temp in tmp_path.glob(".last.ckpt.*.tmp"):  # older than a minute now; the live writer holds it locked
        os.utime(temp, (time.time() - 120, time.time() - 120))
    try:
        atomic_write_text(target, "new")
        left = sorted(tmp_path.glob(".last.ckpt.*.tmp"))
        assert len(left) == 1 and f"-{running.pid}." in left[0].name  # the live writer's, untouched
        assert target.read_text() == "new"
    finally:
        running.kill()
        running.wait()
    for temp in tmp_path.glob(".last.ckpt.*.tmp"):
        os.utime(temp, (time.time() - 120, time.time() - 120))
    with atomic_path(target) as tmp:
        tmp.write_text("again")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_a_file_another_process_wrote_meanwhile_is_not_replaced_without_overwrite(tmp_path):
    """Two runs writing one --out at once: the check before writing passed for both; the second
    to finish must fail, not silently replace the first's file."""
    from vision_tl.utils.files import atomic_path

    out = tmp_path / "features.npz"
    with pytest.raises(FileExistsError, match="written meanwhile by another process"):
        with atomic_path(out, overwrite=False) as tmp:
            tmp.write_bytes(b"second")
            out.write_bytes(b"first")  # the other run finished first
    assert out.read_bytes() == b"first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["features.npz"]  # no temporary file left
    with atomic_path(tmp_path / "new.npz", overwrite=False) as tmp:
        tmp.write_bytes(b"data")
    assert (tmp_path / "new.npz").read_bytes() == b"data" and len(list(tmp_path.iterdir())) == 2


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL and process checks are POSIX")
def test_a_killed_writers_file_goes_at_once_where_its_process_is_known_gone(tmp_path):
    """A cache's temporary file of a writer killed on this machine is removed at the next look,
    not only after a minute: a prompt rerun after an out-of-memory kill must not leave a
    cache-sized file behind for good. A live writer's (locked) file stays."""
    from vision_tl.utils.files import remove_orphaned_temps_in

    killed, running = _writer(tmp_path / "a.npy"), _writer(tmp_path / "b.npy")
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    try:
        removed = remove_orphaned_temps_in(tmp_path)
        assert [p.name for p in removed] == [p.name for p in removed if f"-{killed.pid}." in p.name] and removed
        left = sorted(p.name for p in tmp_path.iterdir())
        assert len(left) == 1 and f"-{running.pid}." in left[0]
    finally:
        running.kill()
        running.wait()


@pytest.mark.skipif(sys.platform == "win32", reason="without flock (Windows) nothing is swept: see utils.files")
def test_a_cache_folder_sweep_touches_only_the_kits_own_temporary_files(tmp_path):
    """A decoded cache may be put in a shared folder: other programs' dot-files ending in .tmp
    are theirs, however old."""
    from vision_tl.utils.files import remove_orphaned_temps_in

    theirs = [tmp_path / ".notes-draft.tmp", tmp_path / ".session-1234.tmp"]
    ours = tmp_path / ".0123456789abcdef01234567.npy.somehost-999999999.abcd_123.tmp"  # no such process
    for path in (*theirs, ours):
        path.write_text("x")
        os.utime(path, (time.time() - 3600, time.time() - 3600))
    removed = remove_orphaned_temps_in(tmp_path, r"[0-9a-f]{24}\.(?:npy|json)")
    assert removed == [ours] and all(p.exists() for p in theirs)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are POSIX")
def test_the_held_check_returns_at_once_for_a_named_pipe(tmp_path):
    """Opening a named pipe for writing waits for a reader: predict-onnx's check of an --out that is
    a pipe (before it replaces it) waited for good, before any inference."""
    import threading

    from vision_tl.utils.files import held_by_another_program

    pipe = tmp_path / "p.csv"
    os.mkfifo(pipe)
    answers = []
    check = threading.Thread(target=lambda: answers.append(held_by_another_program(pipe)), daemon=True)
    check.start()
    check.join(5)
    waited = check.is_alive()
    if waited:  # let the waiting open go, so the thread ends
        os.close(os.open(pipe, os.O_RDONLY | os.O_NONBLOCK))
        check.join(5)
    assert not waited and answers == [False]


@pytest.mark.skipif(os.name == "nt", reason="POSIX owners and modes")
def test_a_lock_folder_someone_else_could_control_is_not_used(tmp_path, monkeypatch):
    """The lock folder's name in the shared temporary folder is predictable: a link or a folder
    others can write, put there first, would let its owner hold every lock (stalling every
    writer of a shared cache). Such a folder is refused and the locks run without it."""
    from vision_tl.utils import files

    monkeypatch.setattr(files.tempfile, "gettempdir", lambda: str(tmp_path))
    name = tmp_path / f"vision_tl-locks-{os.getuid()}"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    name.symlink_to(elsewhere)
    with pytest.raises(PermissionError, match="only this user owns and can write"):
        files.lock_folder()
    with files.path_lock(tmp_path / "run") as held:
        assert held  # unlocked, as without flock, rather than failing or locking in the link's target
    assert list(elsewhere.iterdir()) == []
    name.unlink()
    name.mkdir()
    name.chmod(0o777)
    with pytest.raises(PermissionError):
        files.lock_folder()
    name.chmod(0o700)
    assert files.lock_folder() == name


@pytest.mark.parametrize(("value", "on"), [("1", True), ("true", True), ("Yes", True), (" on ", True),
                                           ("0", False), ("false", False), ("", False)])
def test_debug_and_download_switches_take_the_usual_spellings(value, on, monkeypatch):
    """VISION_TL_DEBUG=true (or VISION_TL_ALLOW_DOWNLOAD=yes) was ignored without a word: only "1" counted."""
    from vision_tl.errors import user_errors
    from vision_tl.utils import env_on

    monkeypatch.setenv("VISION_TL_DEBUG", value)
    assert env_on("VISION_TL_DEBUG") is on
    with pytest.raises(ValueError if on else SystemExit):  # the traceback, or one line and exit 2
        with user_errors():
            raise ValueError("bad input")


def test_a_user_error_is_one_write_so_ddp_ranks_print_a_line_each(monkeypatch):
    """Two DDP processes refusing the same setting printed "...on one processerror: ..." on one line:
    print wrote the message and its newline apart, and the other process wrote in between."""
    import sys

    from vision_tl.errors import user_errors

    writes = []

    class Recorder:
        def write(self, text):
            writes.append(text)

        def flush(self):
            pass

    monkeypatch.delenv("VISION_TL_DEBUG", raising=False)
    monkeypatch.setattr(sys, "stderr", Recorder())
    with pytest.raises(SystemExit):
        with user_errors():
            raise ValueError("bad input")
    assert writes == ["error: bad input\n"]
