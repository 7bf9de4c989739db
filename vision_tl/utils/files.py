"""Atomic file writes: a temporary file in the same directory, synced, then ``os.replace``.

A killed or failing writer, or a power cut, therefore never leaves a partial file under the
final name. The writer holds its temporary file (``.<name>.<host>-<pid>.<random>.tmp``) locked
while it works, so one that a killed process left behind (a checkpoint's or a decoded cache's
size) is told apart and removed by the next write of the same file. Where there are no such locks
(Windows), one unchanged for a day is removed instead (see ``UNLOCKED_ORPHAN_AGE_S``).
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import os
import re
import socket
import stat
import tempfile
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO

_HOST = re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname()) or "host"
# A temporary file younger than this is never taken for an orphan: its writer may have created it
# an instant ago and not yet locked it.
ORPHAN_AGE_S = 60.0
# Without flock (Windows) no lock tells a writer at work from a killed one, so the rule is age: a
# temporary file is an orphan once unchanged for a day (no write of the kit takes that long, and
# writing moves a file's time), unless this process made it; a writer that holds its file open is
# safe besides, as Windows refuses to delete an open file. (``os.kill(pid, 0)``, which asks
# whether a writer still runs on POSIX, would terminate that process on Windows: never used there.)
UNLOCKED_ORPHAN_AGE_S = 86400.0

try:
    import fcntl
except ImportError:  # Windows: no advisory locks here; temporary files are swept by age
    fcntl = None


def orphan_age_s() -> float:
    """How old an unlocked temporary file must be to be taken for a killed writer's: a minute
    where locks tell the writers at work (they hold theirs), a day where there are none."""
    return ORPHAN_AGE_S if fcntl is not None else UNLOCKED_ORPHAN_AGE_S


def lock_dir(folder: Path) -> bool:
    """Take this process's exclusive lock on the directory ``folder`` itself (``flock``; held
    until :func:`release_dir_locks`, and released by the system if the process dies). False when
    another process holds it (a run being trained right now). Where the file system has no such
    locks (or off POSIX), or the folder is not there, True without a lock."""
    if fcntl is None:
        return True
    key = Path(folder).resolve()
    if key in _DIR_LOCKS:
        return True
    try:
        fd = os.open(key, os.O_RDONLY)
    except OSError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return False
    except OSError:
        os.close(fd)
        return True
    _DIR_LOCKS[key] = fd
    return True


def release_dir_locks() -> None:
    """Release every lock :func:`lock_dir` took."""
    for fd in _DIR_LOCKS.values():
        os.close(fd)
    _DIR_LOCKS.clear()


_DIR_LOCKS: dict[Path, int] = {}  # locked directory -> the open descriptor holding its lock


def temp_prefix(path: Path) -> str:
    """The start of a temporary file's name for writing ``path`` from this process (machine and
    process, for the person who finds one)."""
    return f".{path.name}.{_HOST}-{os.getpid()}."


@contextlib.contextmanager
def locked_temp(path: Path) -> Iterator[Path]:
    """A new temporary file beside ``path``, locked (``flock``) by this process until the block
    ends, then removed if it is still there. The lock is what tells a writer that is still at
    work from one that was killed: the kernel drops it with the process, whatever machine or
    container (PID namespace) the process ran in."""
    fd: int | None
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), suffix=".tmp", dir=path.parent)
    tmp_path = Path(tmp)
    try:
        if fcntl is not None:
            with contextlib.suppress(OSError):  # a file system without locks: the file is just not swept
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        else:  # Windows: no lock to hold, and a file open there cannot be renamed into place
            os.close(fd)
            fd = None
        yield tmp_path
    finally:
        if fd is not None:
            os.close(fd)
        if tmp_path.exists():
            tmp_path.unlink()


def remove_orphaned_temps(path: Path) -> list[Path]:
    """Remove the temporary files of ``path`` whose writer is gone (killed: SIGKILL, power cut),
    i.e. that no process holds locked and whose process is known to be gone (this machine's,
    by its number) or that are over a minute old; returns them. Another writer's temporary
    file, on this machine or another, is left alone while it works. Without locks (Windows),
    those unchanged for a day, not this process's own (``UNLOCKED_ORPHAN_AGE_S``)."""
    return _remove_orphans(glob.glob(glob.escape(str(path.parent / f".{path.name}.")) + "*-*.tmp"))


def remove_orphaned_temps_in(folder: Path, names: str = r".+") -> list[Path]:
    """:func:`remove_orphaned_temps` for every file written in ``folder`` whose name matches the
    regular expression ``names`` (a cache's files, where a killed writer's temporary file could
    otherwise stay for good: its name may never be written again). Only temporary files named
    as this kit names them are candidates: a shared folder's other files are never touched."""
    own = re.compile(rf"\.(?:{names})\.[A-Za-z0-9_]+-\d+\.[A-Za-z0-9_]{{8}}\.tmp")
    return _remove_orphans([found for found in glob.glob(glob.escape(str(folder)) + "/.*-*.tmp")
                            if own.fullmatch(Path(found).name)])


def _writer_of(name: str) -> tuple[str, int | None]:
    """The machine and process named in a temporary file's name (``.<file>.<host>-<pid>.<x>.tmp``)."""
    host, _, pid = name.rsplit(".", 2)[0].rpartition("-")
    return host.rsplit(".", 1)[-1], int(pid) if pid.isdigit() else None


def _writer_gone(name: str) -> bool:
    """Whether the process named in a temporary file's name ran on this machine and no longer runs."""
    host, pid = _writer_of(name)
    if host != _HOST or pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # there, but another user's
        return False
    return False


def _remove_orphans(candidates: list[str]) -> list[Path]:
    if fcntl is None:
        return _remove_old_orphans(candidates)
    removed = []
    now = time.time()
    for found in candidates:
        try:
            fd = os.open(found, os.O_RDONLY)
        except OSError:
            continue
        try:
            # a writer creates its file an instant before locking it: a young file's writer must
            # be known gone (the age alone also covers writers on other machines)
            if now - os.fstat(fd).st_mtime < ORPHAN_AGE_S and not _writer_gone(Path(found).name):
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # locked: its writer is at work
                continue
            with contextlib.suppress(FileNotFoundError):
                os.unlink(found)
                removed.append(Path(found))
        finally:
            os.close(fd)
    return removed


def _remove_old_orphans(candidates: list[str]) -> list[Path]:
    """:func:`_remove_orphans` without locks: by age (see ``UNLOCKED_ORPHAN_AGE_S``)."""
    removed = []
    now = time.time()
    for found in candidates:
        if _writer_of(Path(found).name) == (_HOST, os.getpid()):  # this process's own: perhaps at work
            continue
        try:
            if now - os.stat(found).st_mtime < UNLOCKED_ORPHAN_AGE_S:
                continue
            os.unlink(found)
        except OSError:  # gone meanwhile, or held open by its writer (Windows refuses to delete it)
            continue
        removed.append(Path(found))
    return removed


@contextlib.contextmanager
def atomic_path(path: str | Path, overwrite: bool = True, sweep: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed to ``path``.

    ``sweep`` first removes what killed writers of ``path`` left (:func:`remove_orphaned_temps`);
    writers of files with fresh names every time (the feature store's shards) skip that scan of
    the directory.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is False.
        FileNotFoundError: the parent directory does not exist.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"directory {path.parent} does not exist (writing {path.name})")
    there = already_there(path)
    if there and not overwrite:
        raise FileExistsError(f"{path} {there}; refusing to overwrite it")
    if sweep:
        remove_orphaned_temps(path)
    with locked_temp(path) as tmp_path:
        yield tmp_path
        _make_readable(tmp_path)
        durable_replace(tmp_path, path, overwrite=overwrite)


def already_there(path: Path) -> str:
    """How to say what holds the name ``path`` already, for an error; ``""`` when nothing does. A
    symbolic link whose target is missing counts (``Path.exists()`` says False, yet writing the
    name replaces the link, and linking a file into place fails after all the work is done)."""
    path = Path(path)
    if path.is_symlink() and not path.exists():
        return f"is a symbolic link to {os.readlink(path)}, which does not exist"
    return "already exists" if os.path.lexists(path) else ""


def durable_replace(tmp: Path, path: Path, overwrite: bool = True) -> None:
    """``os.replace(tmp, path)`` that survives a power cut: the data reaches the disk before
    the rename, and the rename before this returns. Without the first fsync a crash soon after
    can leave ``path`` empty on some file systems; line PCs do lose power.

    With ``overwrite=False`` a ``path`` that appeared meanwhile (another process writing the same
    file) is never replaced: the file is linked into place, which fails if the name exists.

    Raises:
        FileExistsError: ``overwrite`` is False and ``path`` exists.
    """
    with _open_for_sync(tmp) as fh:
        os.fsync(fh.fileno())
    if overwrite:
        os.replace(tmp, path)
    else:
        try:
            os.link(tmp, path)  # atomic, and refuses an existing name
        except FileExistsError:
            raise FileExistsError(f"{path} already exists (written meanwhile by another process); "
                                  "refusing to overwrite it") from None
        except OSError:  # a file system without hard links: the check, then the rename
            if os.path.lexists(path):
                raise FileExistsError(f"{path} already exists; refusing to overwrite it") from None
            os.replace(tmp, path)
        else:
            os.unlink(tmp)
    with contextlib.suppress(OSError):  # not every file system can sync a directory
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _open_for_sync(path: Path) -> IO[bytes]:
    """``path`` opened so that ``os.fsync`` works on it: for writing, which Windows requires
    (``FlushFileBuffers``; ``EBADF`` on a read-only descriptor); read-only where the file's
    permissions (a umask without the owner's write bit) refuse writing, which POSIX syncs too."""
    try:
        return open(path, "r+b")
    except PermissionError:
        return open(path, "rb")


def _make_readable(path: Path) -> None:
    """Give the temporary file (created 0600 by mkstemp) the permissions of a normal new file."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def atomic_write_bytes(path: str | Path, data: bytes, overwrite: bool = True, sweep: bool = True) -> None:
    with atomic_path(path, overwrite, sweep) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str, overwrite: bool = True, sweep: bool = True) -> None:
    """UTF-8; a file name in ``text`` whose bytes are not UTF-8 is written as its escape (see
    :func:`path_text`) rather than failing after the work that produced the text."""
    atomic_write_bytes(path, text.encode("utf-8", "backslashreplace"), overwrite, sweep)


def name_key(path: str | Path) -> Path:
    """Identity of a path for dropping repeats: the same name reached twice (a file given alone
    and in its folder, or through a linked folder). The folder is resolved, not the file: a
    linked image (b.png -> a.png) is an image of its own name."""
    path = Path(path)
    try:
        return path.absolute().parent.resolve() / path.name
    except (OSError, RuntimeError):  # RuntimeError: a symbolic link loop on Python < 3.13
        return path.absolute()


def path_text(path: str | Path) -> str:
    r"""``path`` as text for a CSV, a table, a page or a plot. A file name whose bytes are not
    valid UTF-8 (Python keeps them as lone surrogates, which no UTF-8 file can hold) shows
    those bytes as ``\xNN`` escapes; every other name is returned unchanged.

    Example:
        >>> path_text(os.fsdecode(b"scratch/bad\xffname.png"))
        'scratch/bad\\xffname.png'
    """
    text = str(path)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return os.fsencode(text).decode("utf-8", "backslashreplace")
    return text


def shown_path(path: str | Path) -> Path:
    """``path`` as a message names it: relative to the working directory when it lies below it,
    else unchanged. Runs keep their folders absolute (a resume or an export works from any
    folder), but ``runs/frozen/version_0`` says as much in a message, and a notebook's stored
    output does not show where the repository was checked out.

    Example:
        >>> shown_path(Path.cwd() / "runs" / "frozen") == Path("runs", "frozen")
        True
    """
    path = Path(path)
    if not path.is_absolute():
        return path
    try:
        return path.relative_to(Path.cwd())
    except (ValueError, OSError):  # elsewhere (another drive), or the working directory is gone
        return path


def unwritable(folder: str | Path) -> str | None:
    """Why no file can be created in ``folder`` (read-only, permissions, a full disk: what the
    system says), or None where one can. Made and removed, the way outputs are written (a
    temporary file beside the final name), so it answers as the write itself would, also for
    root, for whom ``os.access`` says yes to every folder."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".vision_tl.", suffix=".probe", dir=folder)
    except OSError as exc:
        return exc.strerror or str(exc)
    os.close(fd)
    os.unlink(probe)
    return None


def held_by_another_program(path: str | Path) -> bool:
    """Whether another program holds ``path`` open so that it cannot be replaced now: on
    Windows, Excel with a CSV open (it shares the file for reading only) makes opening it for
    writing fail with a sharing violation (PermissionError), as the final rename would, after
    all the work. Opened for appending, not created and not written, so the file is unchanged.
    False where it is not there; a file only read-only by its mode is not held (POSIX replaces it
    nonetheless). A program that shares it for writing but not deletion is not detected: the
    final rename still fails there, and callers keep what they wrote (see predict-onnx).
    Non-blocking: a named pipe would otherwise wait for a reader (without one: not held)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | getattr(os, "O_NONBLOCK", 0))
    except PermissionError:
        return os.name == "nt" or os.access(path, os.W_OK)
    except OSError:  # not there, a folder, ...: the write itself says so
        return False
    os.close(fd)
    return False


def free_sibling(path: str | Path, tag: str) -> Path:
    """``path`` with ``.tag`` before its extension (``p.csv`` -> ``p.unsaved.csv``), or
    ``.tag_2``, ``.tag_3`` ... where that name is taken: a name beside it that holds nothing."""
    path = Path(path)
    number = 1
    while True:
        candidate = path.with_name(f"{path.stem}.{tag}{'' if number == 1 else f'_{number}'}{path.suffix}")
        if not os.path.lexists(candidate):
            return candidate
        number += 1


def file_head(path: str | Path, n: int = 4) -> bytes:
    """The first ``n`` bytes of a file (fewer for a shorter one)."""
    with open(path, "rb") as fh:
        return fh.read(n)


# How every file torch.save writes starts: a zip archive (or, before PyTorch 1.6, a pickle).
# Anything else is another kind of file, which torch.load would report as an unsafe pickle.
TORCH_SAVE_MAGIC = (b"PK\x03\x04", b"\x80")


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_crc32(path: str | Path, offset: int = 0) -> int:
    """CRC-32 of a file's bytes from ``offset`` on (zlib, about 3-4 GB/s from the page cache),
    read in 4 MiB chunks. The caches record it when they write a file and check it on reading."""
    crc = 0
    with open(path, "rb") as fh:
        fh.seek(offset)
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            crc = zlib.crc32(chunk, crc)
    return crc


EMPTY_PATH = ("an empty path (an unset shell variable?), which would mean the current folder; give the file or "
              "folder, or . for the current folder")


def path_arg(text: str) -> str:
    """``type=`` of a command-line path: an empty one (a script's ``"$DIR"`` with ``DIR`` unset) is
    refused, not read as the current folder, whose images would then be predicted, checked or
    trained on."""
    if not text.strip():
        import argparse

        raise argparse.ArgumentTypeError(EMPTY_PATH)
    return text


def refuse_empty_path(path: str | Path | None, what: str, error: type[Exception] = ValueError) -> None:
    """:func:`path_arg` for the Python API: ``error`` (the caller's own type, a ``ValueError`` by
    default) naming ``what`` when ``path`` is ``""``."""
    if isinstance(path, str) and not path.strip():
        raise error(f"{what}: {EMPTY_PATH}")


def lock_folder() -> Path:
    """This user's folder of lock files on this machine (``vision_tl-locks-UID`` in the temporary
    folder), made if missing; OSError where it cannot be, or where what holds that name is not
    a folder of this user's that only this user can write (made by another user of the shared
    temporary folder, or a link: whoever controls it could hold every lock; the callers then
    run unlocked, as without ``flock``)."""
    folder = Path(tempfile.gettempdir()) / f"vision_tl-locks-{os.getuid()}"
    folder.mkdir(mode=0o700, exist_ok=True)
    st = folder.lstat()
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o022:
        raise PermissionError(errno.EPERM, "not a folder that only this user owns and can write", str(folder))
    return folder


def name_digest(path: str | Path) -> str:
    """A short file name standing for the resolved path ``path`` (its lock's, its claims' folder)."""
    return hashlib.sha256(str(Path(path).resolve()).encode()).hexdigest()[:24]


@contextlib.contextmanager
def path_lock(path: str | Path, wait: bool = True) -> Iterator[bool]:
    """An exclusive lock among this machine's processes on the name ``path`` (which need not
    exist), for a read-modify-write or a whole command on it. Yields True while held; with
    ``wait=False``, False at once where another process holds it. The lock file lies in the
    temporary folder (``vision_tl-locks-UID``), not beside ``path``: nothing in a run or an
    export changes. Without ``flock`` (Windows): True, unlocked; released if the process dies."""
    if fcntl is None:
        yield True
        return
    try:
        fd = os.open(lock_folder() / (name_digest(path) + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
    except OSError:  # (no usable temporary folder: unlocked, as without flock)
        yield True
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        except OSError:  # a temporary folder on a file system without locks (ENOLCK): unlocked, as above
            yield True
            return
        yield True
    finally:
        os.close(fd)  # (releases the lock)


def hold_in_use(path: str | Path, wait_s: float = 30.0) -> int | None:
    """Mark the file or folder ``path`` as in use by this process: a shared ``flock`` on it,
    held until the returned descriptor is closed (or the process exits). ``vision-tl cache
    clear`` deletes only what it can lock exclusively (:func:`exclusive_if_unused`), so a cache
    entry being read or written is never deleted under a run. Many processes can hold it.

    Waits up to ``wait_s`` for a clear that is deleting ``path`` right now, then raises
    :class:`FileNotFoundError` when it is gone (the caller builds it again). None where no lock
    could be taken (no ``flock``, a file system without locks, a timeout): a lock is a courtesy
    to the cleaner, never a reason to fail a run."""
    if fcntl is None:
        return None
    fd = os.open(path, os.O_RDONLY)  # (FileNotFoundError: the caller's to handle)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() > deadline:
                os.close(fd)
                return None
            time.sleep(0.05)
        except OSError:
            os.close(fd)
            return None
    try:
        same = os.path.samestat(os.fstat(fd), os.stat(path))
    except OSError:
        same = False
    if not same:  # deleted (and perhaps made again) while this waited
        os.close(fd)
        raise FileNotFoundError(errno.ENOENT, "removed while it was being opened", str(path))
    return fd


@contextlib.contextmanager
def exclusive_if_unused(path: str | Path) -> Iterator[bool]:
    """Yield True while this process holds ``path`` exclusively (no process holds
    :func:`hold_in_use` on it, nor writes it through :func:`locked_temp`), False at once where
    one does, or where that cannot be told. True without a lock where locks cannot be taken (no
    ``flock``)."""
    if fcntl is None:
        yield True
        return
    try:
        fds = [os.open(path, os.O_RDONLY)]
    except OSError:
        yield False
        return
    try:
        yield _lock_exclusive(path, fds)
    finally:
        for fd in fds:
            os.close(fd)


def _lock_exclusive(path: str | Path, fds: list[int]) -> bool:
    """:func:`exclusive_if_unused`'s lock on ``fds[0]`` (``path`` read-only); a descriptor it
    opens besides is appended to ``fds`` (closed by the caller, which releases the lock)."""
    try:
        fcntl.flock(fds[0], fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError:
        pass
    try:
        fcntl.flock(fds[0], fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:  # a file system without locks: nobody can hold one either
        return True
    # Shared locks work, exclusive ones not on this descriptor: NFS, which makes flock a lock on
    # the server whose exclusive kind needs a descriptor open for writing (EBADF), while runs
    # hold their shared locks there. Only such a descriptor can tell; a folder or a file that
    # cannot be opened so is kept (deleting it under a run would fail that run).
    fcntl.flock(fds[0], fcntl.LOCK_UN)
    try:
        fds.append(os.open(path, os.O_RDWR))
        fcntl.flock(fds[-1], fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True
