"""Decoded-image cache: resized uint8 pixels in one memory-mapped ``.npy`` file.

JPEG decoding and resizing dominate the input pipeline. For datasets that fit on
disk once as raw pixels (224 px RGB is 150 kB per image: 10,000 images are 1.5 GB),
the first run decodes every image once, in parallel, and later epochs and later
runs read the pixels straight from the page cache. The file is keyed like the
feature cache: the sha256 of every image in order, the input size and the resize
interpolation, so any change of content or preprocessing picks a new file and a
stale one is never read. It is written under a temporary name and renamed, so a
killed run never leaves a partial cache under the final name.

Beside each ``<key>.npy`` a ``<key>.json`` records the count, size, undecodable
images and a CRC-32 of the pixel bytes, computed while they are written. Opening
the cache checks the file size against its header and the CRC-32 once per process
(about 0.35 s per GB from the page cache, against roughly 20 s per GB for decoding
the JPEGs on one core). A damaged or cut-off file (full disk, power loss, bit rot)
is therefore never trained on: it is reported, naming the file, and rebuilt.
Files written before the checksum existed are still used after the size checks.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import warnings
import weakref
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset

from vision_tl.caches.inventory import ENV, cache_note, default_root, format_bytes
from vision_tl.data.decode_threads import (
    decode_batches,
    decode_batches_in_processes,
    decode_in_processes,
)
from vision_tl.data.transforms import pixel_batch_buffer
from vision_tl.imaging import PIXELS_VERSION
from vision_tl.utils import local_rank, progress_bar, say
from vision_tl.utils.files import (
    atomic_path,
    atomic_write_text,
    file_crc32,
    hold_in_use,
    remove_orphaned_temps_in,
    unwritable,
)

CACHE_ENV = ENV["decoded"]
FORMAT = 1
BUILD_BATCH = 64  # images decoded per step of the build (and of its progress bar)

# Pixel files that passed the full check in this process: (path, inode, size, mtime_ns). The files
# are never modified once renamed into place, so train and val loaders check them once.
_VERIFIED: set[tuple[str, int, int, int]] = set()


class DecodedCacheError(ValueError):
    """A decoded-image cache location that cannot be used; the message says how to pick another."""


def default_decoded_cache_dir() -> Path:
    """``$VISION_TL_DECODED_CACHE`` if set, else ``~/.cache/vision_tl/decoded``."""
    return default_root("decoded")


def _cache_root(cache_dir: str | Path | None) -> tuple[Path, str, str]:
    """The root, where it came from, and how to choose another (for error messages)."""
    if cache_dir is not None:
        return (Path(cache_dir).expanduser(), "from --data.decoded_cache",
                "pass --data.decoded_cache DIR with a writable folder, or --data.decoded_cache false "
                "to decode the images every epoch")
    fix = (f"set ${CACHE_ENV} to a writable folder or pass --data.decoded_cache DIR "
           "(--data.decoded_cache false decodes the images every epoch)")
    if os.environ.get(CACHE_ENV):
        return default_decoded_cache_dir(), f"from ${CACHE_ENV}", fix
    return default_decoded_cache_dir(), "the default", fix


def _prepare_root(root: Path, origin: str, fix: str) -> None:
    if root.exists() and not root.is_dir():
        raise DecodedCacheError(f"decoded-image cache {root} ({origin}) is a file, not a folder; {fix}")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DecodedCacheError(f"decoded-image cache {root} ({origin}) cannot be created "
                                f"({exc.strerror or exc}); {fix}") from exc


def _check_writable(root: Path, origin: str, fix: str) -> None:
    """Fail before decoding anything when the result could not be stored."""
    reason = unwritable(root)
    if reason:
        raise DecodedCacheError(f"decoded-image cache {root} ({origin}) is not writable ({reason}); {fix}")


def _key(shas: list[str], size: tuple[int, int], interpolation: str) -> str:
    identity = {"format": FORMAT, "shas": shas, "size": list(size), "interpolation": interpolation,
                "pixels": PIXELS_VERSION}  # (decoding changed in a kit upgrade: other pixels)
    return hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:24]


def _check_unchanged(data_path: Path, paths: list[Path], shas: list[str], bad: set[int]) -> None:
    """The files still hold what the scan hashed: the pixels are stored under those hashes, and an
    image rewritten while it was decoded would be served, later, for its old content. (A file whose
    size and times did not change costs a ``stat``.)"""
    from vision_tl.data.folder import content_hash

    changed = [p for i, (p, sha) in enumerate(zip(paths, shas, strict=True))
               if i not in bad and content_hash(p) != sha]
    if changed:
        data_path.unlink(missing_ok=True)
        raise ValueError(f"{len(changed)} image(s) changed since the folder was scanned (e.g. {changed[0]}), "
                         "so their pixels may be of the old or the new file; nothing was cached. Run the command "
                         "again once the folder has stopped changing")


def decoded_images(paths: list[Path], shas: list[str], size: tuple[int, int], interpolation: str,
                   cache_dir: str | Path | None = None, threads: int = 0) -> tuple[np.ndarray, list[int]]:
    """``[N, H, W, 3]`` uint8 pixels (memory-mapped) and the indices that failed to decode.

    Builds the cache file on first use (on ``threads`` decoding threads, with a progress
    bar), then only maps it.
    """
    root, origin, fix = _cache_root(cache_dir)
    _prepare_root(root, origin, fix)
    remove_orphaned_temps_in(root, r"[0-9a-f]{24}\.(?:npy|json)")  # a killed build's file (a whole cache's size)
    key = _key(shas, size, interpolation)
    data_path, meta_path = root / f"{key}.npy", root / f"{key}.json"
    held = _hold_in_use(data_path) if data_path.exists() and meta_path.exists() else False
    if held is not False:
        try:
            pixels, bad = _open(data_path, meta_path, len(paths), size)
        except _Damaged as exc:
            _in_use_while(None, held)
            warnings.warn(f"decoded-image cache file {exc.path} is damaged ({exc}); rebuilding {key}.npy "
                          "(a cache file, not your data)", stacklevel=2)
        except BaseException:  # (Ctrl-C in the checksum, a read error: not held for the process's life)
            _in_use_while(None, held)
            raise
        else:
            _in_use_while(pixels, held)
            with contextlib.suppress(OSError):  # its time is the entry's "last used" (vision-tl cache list)
                os.utime(meta_path)
            say(f"vision_tl: decoded-image cache: reusing {data_path} ({_extent(pixels)})")
            return pixels, bad
    _check_writable(root, origin, fix)
    meta_path.unlink(missing_ok=True)  # a kill while rebuilding leaves no stale checksum behind
    bad, crc = _build(data_path, paths, size, interpolation, threads, fix)
    held = _hold_in_use(data_path)  # (a clear skips a .npy without its .json for a minute meanwhile)
    try:
        _check_unchanged(data_path, paths, shas, set(bad))
        atomic_write_text(meta_path, json.dumps({"format": FORMAT, "count": len(paths), "size": list(size),
                                                 "interpolation": interpolation, "bad": bad, "crc32": crc}))
        pixels = np.load(data_path, mmap_mode="r")
    except BaseException:
        _in_use_while(None, held)
        raise
    _in_use_while(pixels, held)
    _VERIFIED.add(_stamp(data_path))  # checksummed as it was written
    say(f"vision_tl: decoded-image cache: wrote {data_path} ({_extent(pixels)}); {cache_note(root)}")
    return pixels, bad


def _hold_in_use(data_path: Path) -> int | None | bool:
    """:func:`hold_in_use` on an entry's pixel file: its descriptor, None when unlocked (no
    locks here), False when a ``vision-tl cache clear`` deleted it meanwhile (build it again)."""
    try:
        return hold_in_use(data_path)
    except FileNotFoundError:
        return False


def _in_use_while(pixels: np.ndarray | None, held: int | None | bool) -> None:
    """Keep the entry held in use as long as its mapped pixels (and any view of them) live;
    ``pixels=None`` lets it go now."""
    if isinstance(held, bool) or held is None:
        return
    if pixels is None:
        os.close(held)
    else:
        weakref.finalize(pixels, os.close, held)


def _extent(pixels: np.ndarray) -> str:
    return f"{len(pixels):,} images, {format_bytes(pixels.nbytes)}"


class _Damaged(Exception):
    """A cache file that cannot be used; ``path`` names it."""

    def __init__(self, path: Path, why: str) -> None:
        super().__init__(why)
        self.path = path


def _stamp(path: Path) -> tuple[str, int, int, int]:
    st = path.stat()
    return str(path), st.st_ino, st.st_size, st.st_mtime_ns


def _open(data_path: Path, meta_path: Path, count: int, size: tuple[int, int]) -> tuple[np.ndarray, list[int]]:
    """The mapped pixels and bad indices of a finished entry, after checking it; else :class:`_Damaged`."""
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise _Damaged(meta_path, f"cannot be read: {exc}") from exc
    bad = meta.get("bad") if isinstance(meta, dict) else None
    if (not isinstance(bad, list) or meta.get("format") != FORMAT or meta.get("count") != count
            or not all(isinstance(i, int) and 0 <= i < count for i in bad)):
        raise _Damaged(meta_path, f"does not describe {count} images in format {FORMAT}")
    shape = (count, *size, 3)
    try:
        pixels = np.load(data_path, mmap_mode="r")
    except (OSError, ValueError, EOFError) as exc:
        raise _Damaged(data_path, f"cannot be read: {str(exc) or 'empty or cut-off file'}") from exc
    if pixels.shape != shape or pixels.dtype != np.uint8:
        raise _Damaged(data_path, f"holds {pixels.dtype} {pixels.shape}, expected uint8 {shape}")
    expected = pixels.offset + pixels.nbytes
    if data_path.stat().st_size != expected:
        raise _Damaged(data_path, f"is {data_path.stat().st_size:,} bytes, expected {expected:,}")
    crc = meta.get("crc32")
    stamp = _stamp(data_path)
    if crc is not None and stamp not in _VERIFIED:  # entries of older versions have no checksum
        if file_crc32(data_path, pixels.offset) != crc:
            raise _Damaged(data_path, "its pixels do not match the checksum recorded when it was written")
        _VERIFIED.add(stamp)
    return pixels, list(bad)


def _build(path: Path, paths: list[Path], size: tuple[int, int], interpolation: str,
           threads: int, fix: str = "") -> tuple[list[int], int]:
    """Decode every image into ``path``; returns the bad indices and the CRC-32 of the pixels."""
    with atomic_path(path) as tmp:
        # open_memmap writes a real .npy header, so np.load(mmap_mode="r") reads it back.
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(paths), *size, 3))
        _reserve(tmp, path, fix)
        bad, crc = _decode_into(out, paths, interpolation, threads)
        out.flush()
        del out  # no view of the mapping is left (Windows cannot rename a mapped file)
    return bad, crc


def _reserve(tmp: Path, path: Path, fix: str) -> None:
    """Allocate the mapped file's blocks now. It starts sparse: on a disk that fills up while
    the pixels are written, the kernel would kill the process with SIGBUS (no message, and the
    temporary file left behind); reserved here, a full disk is an error that names the file."""
    if not hasattr(os, "posix_fallocate"):
        return
    size = tmp.stat().st_size
    try:
        fd = os.open(tmp, os.O_RDWR)
        try:
            os.posix_fallocate(fd, 0, size)
        finally:
            os.close(fd)
    except OSError as exc:
        if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL):  # a file system that cannot: written as is
            return
        raise DecodedCacheError(f"decoded-image cache {path.parent}: cannot make room for {path.name} "
                                f"({size / 2**30:.2f} GiB: {exc.strerror or exc}); {fix}") from exc


def _decode_into(out: np.ndarray, paths: list[Path], interpolation: str, threads: int) -> tuple[list[int], int]:
    """Decode on ``threads`` threads, each image straight into its row of ``out`` (the mapped
    file; on many cores, ``threads`` loader processes whose batches are copied there), with a
    progress bar; the bad indices and the CRC-32 of the pixels, in file order."""
    bad: list[int] = []
    crc = 0
    with progress_bar(total=len(paths), desc="decoding images (once)", unit="img",
              disable=local_rank() != 0) as bar:  # DDP: one bar, from the first rank
        copied = decode_in_processes(threads, BUILD_BATCH * out[0].nbytes)  # many cores: processes, batches copied
        if copied:
            batches = decode_batches_in_processes(paths, out.shape[1:3], interpolation, BUILD_BATCH, threads)
        else:
            batches = decode_batches(paths, out.shape[1:3], interpolation, BUILD_BATCH, threads,
                                     lambda start, n: torch.from_numpy(out[start:start + n]))
        with contextlib.closing(batches):  # (an interruption stops the threads at once)
            for rows in batches:
                if copied:
                    out[rows.start:rows.start + len(rows.pixels)] = rows.pixels.numpy()
                crc = zlib.crc32(rows.pixels.numpy(), crc)
                bad += [rows.start + k for k in sorted(rows.errors)]
                bar.update(len(rows.pixels))
    return bad, crc


class PixelRows(NamedTuple):
    """A batch named by its rows of a decoded cache whose pixels are already on the device
    (``DecodedImageDataset(rows_only=True)``); the data module gathers the pixels there."""

    rows: torch.Tensor
    labels: torch.Tensor
    source: str


def pixels_to(pixels: np.ndarray, device: torch.device, chunk_bytes: int = 64 << 20) -> torch.Tensor:
    """A copy of ``[N, H, W, 3]`` uint8 pixels in ``device`` memory, moved in chunks (no second
    full copy in host memory)."""
    out = torch.empty(pixels.shape, dtype=torch.uint8, device=device)
    step = max(1, chunk_bytes // max(1, int(np.prod(pixels.shape[1:]))))
    for start in range(0, len(pixels), step):
        out[start:start + step].copy_(torch.from_numpy(np.array(pixels[start:start + step])))
    return out


class DecodedImageDataset(Dataset):
    """Samples from a decoded cache; ``__getitems__`` slices a whole batch at once.

    Args:
        pixels: ``[N, H, W, 3]`` uint8 (memory-mapped) array.
        labels: class index per row.
        indices: rows to serve (bad images left out).
        transform: ``uint8 HxWx3 -> tensor`` for per-sample CPU augmentation, or
            ``None`` to serve uint8 ``[3, H, W]`` tensors for on-device augmentation.
        rows_only: serve batches as :class:`PixelRows` (row numbers, labels and ``source``)
            instead of pixels, for a copy of ``pixels`` kept on the device.
        source: the name ``PixelRows`` batches carry (the split).
        samples: what each row of ``pixels`` is (e.g. the image's path and label); ``samples``
            then lists those of the served rows, in order, for reports that name the images.
    """

    def __init__(self, pixels: np.ndarray, labels: list[int], indices: list[int], transform=None,
                 rows_only: bool = False, source: str = "", samples: list | None = None) -> None:
        if rows_only and transform is not None:
            raise ValueError("rows_only batches are augmented on the device: pass transform=None")
        self.pixels, self.transform, self.rows_only, self.source = pixels, transform, rows_only, source
        self.indices = np.asarray(indices, dtype=np.int64)
        self.labels = np.asarray(labels, dtype=np.int64)[self.indices]
        self.samples = [samples[i] for i in self.indices] if samples is not None else None

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image = self.pixels[self.indices[i]]
        if self.transform is not None:  # a Draw from the sampler carries the augmentation seed
            return self.transform(np.asarray(image), seed=getattr(i, "seed", None)), int(self.labels[i])
        # a copy (the mapped file is read-only), served channels-last like every uint8 image
        return torch.from_numpy(np.array(image)).permute(2, 0, 1), int(self.labels[i])

    def __getitems__(self, batch: list[int]):
        """The device pipeline's whole batch in one read: rows in file order (sequential on
        disk; the order within a batch does not matter to training), into a channels-last
        ``[N, 3, H, W]`` uint8 tensor (in a loader worker, in shared memory)."""
        if self.transform is not None:
            return [self[i] for i in batch]
        positions = np.asarray(batch, dtype=np.int64)
        order = np.argsort(self.indices[positions], kind="stable")
        rows, labels = self.indices[positions[order]], self.labels[positions[order]]
        if self.rows_only:  # the same rows, in the same order, gathered later on the device
            return [PixelRows(torch.from_numpy(rows), torch.from_numpy(labels), self.source)]
        out = pixel_batch_buffer((len(rows), *self.pixels.shape[1:]))
        np.take(self.pixels, rows, axis=0, out=out.numpy())
        return [(out.permute(0, 3, 1, 2), torch.from_numpy(labels))]  # one pre-collated batch
