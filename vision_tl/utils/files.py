"""Atomic file writes: a temporary file in the same directory, synced, then ``os.replace``.

A killed or failing writer, or a power cut, therefore never leaves a partial file under the
final name. The temporary file's name says which machine and process writes it
(``.<name>.<host>-<pid>.<random>.tmp``), so one that a killed process left behind (a
checkpoint's or a decoded cache's size) is removed by the next write of the same file.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import os
import re
import socket
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path

_HOST = re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname()) or "host"


def temp_prefix(path: Path) -> str:
    """The start of a temporary file's name for writing ``path`` from this process."""
    return f".{path.name}.{_HOST}-{os.getpid()}."


def remove_orphaned_temps(path: Path) -> list[Path]:
    """Remove the temporary files of ``path`` that processes of this machine left when they were
    killed (their process no longer runs); returns them. Another machine's (a shared disk) and
    a running process's are left alone."""
    if os.name != "posix":  # os.kill(pid, 0) would end the process on Windows
        return []
    removed = []
    start = f".{path.name}.{_HOST}-"
    for found in glob.glob(glob.escape(str(path.parent / start)) + "*.tmp"):
        pid = Path(found).name[len(start):].split(".", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid() or _running(int(pid)):
            continue
        with contextlib.suppress(FileNotFoundError):
            Path(found).unlink()
            removed.append(Path(found))
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: another user's process
        return True
    return True


@contextlib.contextmanager
def atomic_path(path: str | Path, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed to ``path``.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is False.
        FileNotFoundError: the parent directory does not exist.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"directory {path.parent} does not exist (writing {path.name})")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; refusing to overwrite it")
    remove_orphaned_temps(path)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        _make_readable(tmp_path)
        durable_replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def durable_replace(tmp: Path, path: Path) -> None:
    """``os.replace(tmp, path)`` that survives a power cut: the data reaches the disk before
    the rename, and the rename before this returns. Without the first fsync a crash soon after
    can leave ``path`` empty on some file systems; line PCs do lose power."""
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    with contextlib.suppress(OSError):  # not every file system can sync a directory
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _make_readable(path: Path) -> None:
    """Give the temporary file (created 0600 by mkstemp) the permissions of a normal new file."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def atomic_write_bytes(path: str | Path, data: bytes, overwrite: bool = True) -> None:
    with atomic_path(path, overwrite) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str, overwrite: bool = True) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), overwrite)


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
