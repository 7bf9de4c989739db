"""Decoding images into uint8 batches on a pool of threads, or of loader processes.

JPEG decoding (simplejpeg, Pillow) and Pillow's resizing release the GIL, so threads
decode in parallel as loader processes do, without what processes cost: none has to
start, and no batch travels through shared memory to be copied once more into pinned
memory. Each image is decoded straight into its row of the buffer the batch is used
from: pinned memory for a GPU, or the decoded cache's memory-mapped file.

Threads still take the GIL around every image, and so does the thread that drives the
model. On a 16-core GPU machine that convoy capped 15 threads at about 4,500 images/s
(15 processes: about 8,000) and extract, whose main thread launches the model's kernels,
at about 1,750 (benchmarks/RESULTS.md). :func:`decode_in_processes` says which a machine
gets: threads on small machines, where they were measured faster, processes on many cores.

Used by ``vision-tl extract`` (un-augmented views) and by the decoded cache's build.
"""

from __future__ import annotations

import contextlib
import errno
import math
import multiprocessing
import multiprocessing.util
import os
import pickle
import signal
import threading
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

from vision_tl.data.device import SHM, loader_processes_fitting, shared_memory_advice, usable_cores
from vision_tl.data.transforms import pixel_batch_buffer
from vision_tl.imaging import (
    DimImageWarning,
    ImageLoadError,
    fast_jpeg_decoder,
    load_rgb_into,
    warn_dim_once,
)

CHUNK = 8  # images per task: enough to make a task's overhead small, few enough to spread a batch
PROCESSES_FROM = 8  # cores from which decode_in_processes() says yes (threads measured faster on 2, slower on 16)
IN_FLIGHT = 2  # batches each decoding process has in work (DataLoader's prefetch_factor)
# shared-memory buffers each decoding process reuses, round robin: its batches in work and two
# more, so that a batch's buffer is not written again while the caller takes up to
# 2 x processes - 1 more batches (writing may start during the next one)
SPARE_SLOTS = 2


def buffer_slots(ahead: int = IN_FLIGHT) -> int:
    """Shared-memory batch buffers each decoding process holds: its ``ahead`` batches in work
    and :data:`SPARE_SLOTS` more."""
    return max(1, ahead) + SPARE_SLOTS


def decode_in_processes(workers: int, batch_bytes: int = 0) -> bool:
    """Whether ``workers`` decoders should be loader processes rather than threads on this
    machine: with two or more of them on a machine of :data:`PROCESSES_FROM` cores or more, where
    processes start by forking (Linux up to Python 3.13). Where they are spawned (Windows, macOS)
    each would import torch again, seconds per call: threads stay there. So they do where
    ``/dev/shm`` has no room for the processes' batches of ``batch_bytes`` (a warning says so)."""
    if workers < 2 or usable_cores() < PROCESSES_FROM or _start_method() != "fork":
        return False
    if multiprocessing.current_process().daemon:  # a Pool's or Celery's worker may not start processes
        return False
    slots = buffer_slots()
    fitting = loader_processes_fitting(workers, batch_bytes, slots)
    if fitting < workers:
        warnings.warn(f"vision_tl: decoding on {workers} threads, not loader processes: "
                      + shared_memory_advice(workers, fitting, batch_bytes, slots), stacklevel=2)
        return False
    return True


def _start_method() -> str:
    """How loader processes start here, without fixing it (``get_start_method()`` would, and a
    user's later ``set_start_method`` would then fail)."""
    return multiprocessing.get_start_method(allow_none=True) or multiprocessing.get_all_start_methods()[0]


@dataclass
class DecodedRows:
    """One batch: ``pixels[k]`` holds image ``start + k`` (``[N, H, W, 3]`` uint8), except the
    rows named in ``errors`` (row -> why the image could not be decoded), which are black."""

    start: int
    pixels: torch.Tensor
    errors: dict[int, str]


def decode_batches(paths: Sequence[Path], size: tuple[int, int], interpolation: str, batch_size: int,
                   threads: int, buffer: Callable[[int, int], torch.Tensor] | None = None,
                   ahead: int = 4) -> Iterator[DecodedRows]:
    """Decode ``paths`` in order, ``batch_size`` at a time, on ``threads`` threads (0: in the
    calling thread, one batch at a time), keeping up to ``ahead`` batches in work.

    Args:
        paths: image files.
        size: ``(height, width)`` every image is resized to (as :func:`load_rgb_into`).
        interpolation: the resize filter.
        batch_size: images per batch (the last may be smaller).
        threads: decoding threads.
        buffer: ``buffer(start, n)`` -> a writable C-contiguous ``[n, H, W, 3]`` uint8 tensor
            for images ``start .. start + n - 1`` (default: a new tensor); rows are written in
            place, so this chooses where the pixels land (pinned memory, a file mapping).
        ahead: batches decoded ahead of the one being used.

    Yields:
        :class:`DecodedRows` in order. An error other than :class:`ImageLoadError` in a
        thread (a bug, memory) is raised here; the batches not yet used are then abandoned.
        A caller that stops early calls the iterator's ``close()`` (as ``contextlib.closing``
        does): the threads then stop, and none writes into a buffer afterwards.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if threads < 0:
        raise ValueError(f"decoding threads must be 0 or more, got {threads}")
    height, width = size
    if buffer is None:
        def buffer(start: int, n: int) -> torch.Tensor:
            return torch.empty((n, height, width, 3), dtype=torch.uint8)
    fast_jpeg_decoder()  # its one-time check runs here, not in every thread at once
    if threads == 0:
        return _in_this_thread(paths, batch_size, buffer, interpolation)
    pool = ThreadPoolExecutor(threads, thread_name_prefix="vision_tl-decode")
    stop = threading.Event()  # set when the consumer leaves early: queued chunks then do nothing
    work: deque[tuple[int, torch.Tensor, list[Future]]] = deque()
    todo = iter(range(0, len(paths), batch_size))

    def submit() -> None:
        start = next(todo, None)
        if start is None:
            return
        pixels = buffer(start, min(batch_size, len(paths) - start))
        step = max(1, min(CHUNK, math.ceil(len(pixels) / threads)))
        work.append((start, pixels, [pool.submit(_decode, paths, start, pixels, range(k, min(k + step, len(pixels))),
                                                 interpolation, stop)
                                     for k in range(0, len(pixels), step)]))

    for _ in range(max(1, ahead)):  # the threads start on the first batches now, before the first next()
        submit()
    return InOrder(pool, work, submit, stop, _rows_of)


def _in_this_thread(paths: Sequence[Path], batch_size: int, buffer, interpolation: str) -> Iterator[DecodedRows]:
    for start in range(0, len(paths), batch_size):
        pixels = buffer(start, min(batch_size, len(paths) - start))
        yield DecodedRows(start, pixels, _decode(paths, start, pixels, range(len(pixels)), interpolation))


class InOrder:
    """What a pool of threads works on, in the order queued: ``wait(item)`` for each item of
    ``work`` (a batch's futures), then ``submit()`` (the next batch starts), then ``finish`` of
    what ``wait`` returned (work that need not hold the next batch back).

    :meth:`close` (also at the end, on an error, and when the object is collected) stops the
    threads: work not yet started is dropped, and no thread writes into a buffer after it
    returns. A generator could not do this for a caller that leaves before its first batch
    (its ``finally`` would never run) while the threads work on the batches queued ahead."""

    def __init__(self, pool: ThreadPoolExecutor, work: deque, submit: Callable[[], None], stop: threading.Event,
                 wait: Callable, finish: Callable | None = None) -> None:
        self._pool, self._work, self._submit, self._stop = pool, work, submit, stop
        self._wait, self._finish = wait, finish

    def __iter__(self) -> InOrder:
        return self

    def __next__(self):
        if not self._work:
            self.close()
            raise StopIteration
        try:
            done = self._wait(self._work.popleft())
            self._submit()
            return done if self._finish is None else self._finish(done)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        self._stop.set()
        self._work.clear()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # (at interpreter exit the pool may be gone already)
            self.close()


def _rows_of(batch: tuple[int, torch.Tensor, list[Future]]) -> DecodedRows:
    """A batch once its chunks are decoded, with the rows that failed."""
    start, pixels, futures = batch
    errors: dict[int, str] = {}
    for future in futures:
        errors.update(future.result())
    return DecodedRows(start, pixels, errors)


def _decode(paths: Sequence[Path], start: int, pixels: torch.Tensor, rows: range, interpolation: str,
            stop: threading.Event | None = None) -> dict[int, str]:
    """Decode images ``start + rows`` into ``pixels[rows]``; the rows that failed, with why."""
    out = pixels.numpy()
    errors = {}
    for row in rows:
        if stop is not None and stop.is_set():
            break
        try:
            load_rgb_into(paths[start + row], out[row], interpolation)
        except ImageLoadError as exc:
            out[row] = 0
            errors[row] = str(exc)
    return errors


def decode_batches_in_processes(paths: Sequence[Path], size: tuple[int, int], interpolation: str, batch_size: int,
                                processes: int, pin: bool = False, ahead: int = IN_FLIGHT,
                                reuse_buffers: bool = True) -> Iterator[DecodedRows]:
    """As :func:`decode_batches`, on ``processes`` loader processes: each decodes a whole batch
    into shared memory (``pin``: copied into pinned memory by the loader's pinning thread).

    The main process holds no GIL for decoding, so a thread driving a GPU there is not slowed
    down by it; the price is the processes' start (about 0.3 s for 15 of them), one copy
    of each batch, and ``ahead + 2`` batch buffers per process held in shared memory. Each
    process reuses its buffers round robin (a new shared-memory batch cost 6.75 ms per 64
    images at 224 px to create and fill on 2 cores, a reused one 0.23 ms): without ``pin``,
    a batch's pixels stay valid while up to ``2 x processes - 1`` more batches are taken; copy
    them to keep them longer. ``reuse_buffers=False``: a new buffer for every batch (for comparison)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if processes < 1:
        raise ValueError(f"decoding processes must be 1 or more, got {processes}")
    fast_jpeg_decoder()  # checked once here; forked workers inherit the answer
    batches = _Batches(paths, (int(size[0]), int(size[1])), interpolation, batch_size,
                       slots=buffer_slots(ahead) if reuse_buffers else 0)
    if not len(batches):
        return iter(())
    loader = DataLoader(batches, batch_size=None, num_workers=min(processes, len(batches)),
                        pin_memory=pin, prefetch_factor=max(1, ahead), worker_init_fn=_exit_quietly_on_sigterm,
                        # not the global default: a user's later set_start_method() still works
                        multiprocessing_context=multiprocessing.get_context(_start_method()))
    return _from_processes(iter(loader))  # the processes start now, before the first next()


def _from_processes(batches: Iterator) -> Iterator[DecodedRows]:
    """The decoded batches, with what the processes could not hand over raised or reported here as
    the threads would: their warnings once, an unexpected error as itself. The processes are
    stopped as soon as this ends, by error or by the caller leaving, not at the next GC pass."""
    try:
        for start, pixels, errors, warned in batches:
            for message, category in warned:
                if issubclass(category, DimImageWarning):
                    warn_dim_once(message, stacklevel=3)
                else:
                    warnings.warn(message, category, stacklevel=3)
            if isinstance(errors, BaseException):
                raise errors
            yield DecodedRows(start, pixels, errors)
    finally:
        shutdown = getattr(batches, "_shutdown_workers", None)  # DataLoader's own clean-up
        if shutdown is not None:
            shutdown()


def _exit_quietly_on_sigterm(worker_id: int) -> None:
    """A decoding process ends at once on SIGTERM. A whole process group gets it (Slurm's scancel,
    systemd, ``kill -- -PGID``); PyTorch's own handler would let the main process report the
    worker's death as a crash while it stops as asked."""
    signal.signal(signal.SIGTERM, lambda signum, frame: os._exit(0))


class _Batches(Dataset):
    """Batch ``b`` of ``paths``, decoded into one buffer (shared memory in a loader process),
    with the warnings raised meanwhile; an unexpected error is returned in place of the rows'
    errors, to be raised in the main process as itself."""

    def __init__(self, paths: Sequence[Path], size: tuple[int, int], interpolation: str, batch_size: int,
                 slots: int = 0) -> None:
        self.paths, self.size, self.interpolation, self.batch_size = paths, size, interpolation, batch_size
        # per process (each forked worker has its own): buffers reused round robin; 0 = a new one per batch
        self.slots, self._ring, self._taken = slots, [], 0

    def _buffer(self, n: int) -> torch.Tensor:
        """Where batch rows go: the next of this process's reused shared-memory buffers. A worker
        is handed its batches ``ahead`` at a time, in order, and gets its next one only once the
        caller takes the batch ``ahead`` before it, so a buffer ``slots`` batches back is free."""
        if not self.slots or get_worker_info() is None:
            return pixel_batch_buffer((n, *self.size, 3))
        if not self._ring:  # freed as the process ends: under the file_system sharing strategy
            # a buffer still referenced then would stay in /dev/shm until the main process ends
            multiprocessing.util.Finalize(self, self._ring.clear, exitpriority=0)
        k = self._taken % self.slots
        while len(self._ring) <= k:  # created as first needed (a failed creation is tried again)
            self._ring.append(pixel_batch_buffer((self.batch_size, *self.size, 3)))
        self._taken += 1
        return self._ring[k][:n]

    def __len__(self) -> int:
        return math.ceil(len(self.paths) / self.batch_size)

    def __getitem__(self, b: int) -> tuple[int, torch.Tensor | None, dict[int, str] | BaseException, list]:
        start = b * self.batch_size
        n = min(self.batch_size, len(self.paths) - start)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                pixels = self._buffer(n)
            except RuntimeError as exc:  # /dev/shm filled up since the check
                if "shared memory" not in str(exc):
                    raise
                return start, None, OSError(errno.ENOSPC, f"{SHM} is full: a decoding process could not hand over "
                                            f"its batch ({exc}). Free room there; in Docker, `docker run --shm-size "
                                            "4g` gives more"), []
            try:
                errors: dict[int, str] | BaseException = _decode(self.paths, start, pixels, range(n),
                                                                 self.interpolation)
            except Exception as exc:  # noqa: BLE001 - raised as itself by _from_processes
                errors = exc if _travels(exc) else RuntimeError(f"{type(exc).__name__}: {exc}")
        return start, pixels, errors, [(str(w.message), w.category) for w in caught]


def _travels(exc: BaseException) -> bool:
    """Whether ``exc`` survives the trip to the main process (one whose ``__init__`` takes other
    arguments than its ``args`` cannot be rebuilt there)."""
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:  # noqa: BLE001 - any failure means it does not
        return False
    return True
