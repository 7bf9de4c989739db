"""Decoding images into uint8 batches on a pool of threads.

JPEG decoding (simplejpeg, Pillow) and Pillow's resizing release the GIL, so threads
decode in parallel as loader processes do, without what processes cost: none has to
start (with 15 of them, seconds before the first batch of a job whose GPU part takes
half a second), and no batch travels through shared memory to be copied once more
into pinned memory. Each image is decoded straight into its row of the buffer the
batch is used from: pinned memory for a GPU, or the decoded cache's memory-mapped file.

Used by ``vision-tl extract`` (un-augmented views) and by the decoded cache's build.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from vision_tl.imaging import ImageLoadError, fast_jpeg_decoder, load_rgb_into

CHUNK = 8  # images per task: enough to make a task's overhead small, few enough to spread a batch


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
