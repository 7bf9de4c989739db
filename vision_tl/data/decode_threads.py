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

import math
import multiprocessing
import threading
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from vision_tl.data.device import loader_processes_fitting, shared_memory_advice, usable_cores
from vision_tl.data.transforms import pixel_batch_buffer
from vision_tl.imaging import ImageLoadError, fast_jpeg_decoder, load_rgb_into

CHUNK = 8  # images per task: enough to make a task's overhead small, few enough to spread a batch
PROCESSES_FROM = 8  # cores from which decode_in_processes() says yes (threads measured faster on 2, slower on 16)
IN_FLIGHT = 2  # batches each decoding process holds in shared memory (DataLoader's prefetch_factor)


def decode_in_processes(workers: int, batch_bytes: int = 0) -> bool:
    """Whether ``workers`` decoders should be loader processes rather than threads on this
    machine: with two or more of them on a machine of :data:`PROCESSES_FROM` cores or more, where
    processes start by forking (Linux up to Python 3.13). Where they are spawned (Windows, macOS)
    each would import torch again, seconds per call: threads stay there. So they do where
    ``/dev/shm`` has no room for the processes' batches of ``batch_bytes`` (a warning says so)."""
    if workers < 2 or usable_cores() < PROCESSES_FROM or _start_method() != "fork":
        return False
    fitting = loader_processes_fitting(workers, batch_bytes, IN_FLIGHT)
    if fitting < workers:
        warnings.warn(f"vision_tl: decoding on {workers} threads, not loader processes: "
                      + shared_memory_advice(workers, fitting, batch_bytes, IN_FLIGHT), stacklevel=2)
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
    return _in_order(pool, work, submit, stop)


def _in_this_thread(paths: Sequence[Path], batch_size: int, buffer, interpolation: str) -> Iterator[DecodedRows]:
    for start in range(0, len(paths), batch_size):
        pixels = buffer(start, min(batch_size, len(paths) - start))
        yield DecodedRows(start, pixels, _decode(paths, start, pixels, range(len(pixels)), interpolation))


def _in_order(pool: ThreadPoolExecutor, work: deque, submit: Callable[[], None],
              stop: threading.Event) -> Iterator[DecodedRows]:
    try:
        while work:
            start, pixels, futures = work.popleft()
            errors: dict[int, str] = {}
            for future in futures:
                errors.update(future.result())
            submit()
            yield DecodedRows(start, pixels, errors)
    finally:
        stop.set()
        pool.shutdown(wait=True, cancel_futures=True)  # no thread writes into a buffer after this


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
                                processes: int, pin: bool = False, ahead: int = IN_FLIGHT) -> Iterator[DecodedRows]:
    """As :func:`decode_batches`, on ``processes`` loader processes: each decodes a whole batch
    into shared memory (``pin``: copied into pinned memory by the loader's pinning thread).

    The main process holds no GIL for decoding, so a thread driving a GPU there is not slowed
    down by it; the price is the processes' start (about 0.3 s for 15 of them), one copy
    of each batch, and ``ahead`` batches per process held in shared memory."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if processes < 1:
        raise ValueError(f"decoding processes must be 1 or more, got {processes}")
    fast_jpeg_decoder()  # checked once here; forked workers inherit the answer
    batches = _Batches(paths, (int(size[0]), int(size[1])), interpolation, batch_size)
    if not len(batches):
        return iter(())
    loader = DataLoader(batches, batch_size=None, num_workers=min(processes, len(batches)),
                        pin_memory=pin, prefetch_factor=max(1, ahead))
    return (DecodedRows(start, pixels, errors) for start, pixels, errors in loader)


class _Batches(Dataset):
    """Batch ``b`` of ``paths``, decoded into one buffer (shared memory in a loader process)."""

    def __init__(self, paths: Sequence[Path], size: tuple[int, int], interpolation: str, batch_size: int) -> None:
        self.paths, self.size, self.interpolation, self.batch_size = paths, size, interpolation, batch_size

    def __len__(self) -> int:
        return math.ceil(len(self.paths) / self.batch_size)

    def __getitem__(self, b: int) -> tuple[int, torch.Tensor, dict[int, str]]:
        start = b * self.batch_size
        n = min(self.batch_size, len(self.paths) - start)
        pixels = pixel_batch_buffer((n, *self.size, 3))
        return start, pixels, _decode(self.paths, start, pixels, range(n), self.interpolation)
