"""JPEG decoding on the device that runs the model: nvJPEG on a GPU, through torchvision.

``vision-tl extract --decode device``. Extraction over a folder of JPEGs is bound by
decoding: a GPU embeds ~20,000 images/s at 224 px, a CPU core decodes ~1,000. On an
A100/H100 class GPU, torchvision hands baseline JPEGs to the hardware JPEG decoder,
which works beside the GPU's compute units; other JPEGs (progressive ...) are decoded by
nvJPEG's CUDA path. CPU threads only read the files' bytes.

What does not go to the device is decoded as ``--decode cpu`` decodes it (same code,
same pixels, same error messages): files that are not JPEGs, JPEGs in other colour
spaces (CMYK ...) or chroma layouts (4:1:1, 4:4:0), files without an end-of-image marker,
images over the pixel limit, images the device refuses (12-bit JPEGs where it does),
and images resized with a filter PyTorch has no exact twin of (``nearest``, ``lanczos``).

Pixels: the GPU's decoder is not bit-exact with Pillow's (libjpeg-turbo), and PyTorch's
antialiased resize differs from Pillow's by rounding (bicubic: under half a level on
average, a few levels at sharp edges; on the CPU, torchvision's decoder gives Pillow's
pixels exactly). :func:`decoding_difference` measures both on a set of test JPEGs at the
run's size and filter; a run stops where the mean difference is over :data:`TOLERANCE`.
The feature cache keys device-decoded embeddings apart from the others.

Damaged files: a GPU decoder may accept a JPEG whose data is damaged, where the host
path (:func:`vision_tl.imaging.load_rgb`) reports it; ``--decode cpu`` is the one that finds
every damaged file.
"""

from __future__ import annotations

import io
import math
import threading
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F

from vision_tl.data.decode_threads import InOrder
from vision_tl.data.device import copy_on_side_stream, to_device
from vision_tl.imaging import (
    ImageLoadError,
    _jpeg_bytes,
    _pil_to_rgb,
    fast_jpeg_decoder,
    load_rgb_into,
    max_image_pixels,
    resize,
)
from vision_tl.utils import ignoring_warnings

# Pillow's filter -> PyTorch's twin (antialiased for down-scaling, as Pillow always is).
# (nearest has no exact twin: Pillow and PyTorch round the source position differently.)
TORCH_FILTERS = {"bilinear": "bilinear", "bicubic": "bicubic"}
TOLERANCE = 3.0  # mean |device - Pillow| per pixel value (0..255) on the check's JPEGs
_DEVICE_LAYOUTS = {("YCbCr", "444"), ("YCbCr", "422"), ("YCbCr", "420"), ("Gray", "Gray")}
_EOI = b"\xff\xd9"
_checked: dict[tuple[str, tuple[int, int], str], tuple[float, int]] = {}
_lock = threading.Lock()

# torchvision 0.29 marks its image decoders deprecated in favour of TorchCodec; the call is
# what this module is for, so the warning (left out around that call only) would repeat this docstring
_DEPRECATED = "The image decoding and encoding capabilities of TorchVision are deprecated"


@dataclass
class _Rows:
    """One batch after the reading threads: JPEG bytes for the device, host-decoded rows, errors."""

    start: int
    n: int
    jpeg: dict[int, tuple[torch.Tensor, bool, tuple[int, int]]] = field(default_factory=dict)  # row -> (bytes, gray, hw)
    host: dict[int, np.ndarray] = field(default_factory=dict)  # row -> H x W x 3 uint8 at the output size
    errors: dict[int, str] = field(default_factory=dict)


def device_batches(paths: Sequence[Path], size: tuple[int, int], interpolation: str, batch_size: int,
                   device: torch.device | str, threads: int, ahead: int = 3,
                   ) -> Iterator[tuple[list[int], torch.Tensor | None, list[tuple[int, str]]]]:
    """``(positions, [N, 3, H, W] uint8 on device or None, failures)`` per batch of ``paths``, in order.

    Args:
        paths: image files.
        size: ``(height, width)`` every image is resized to.
        interpolation: the resize filter (``bilinear``, ``bicubic`` on the device; others resize
            on the CPU).
        batch_size: images per batch (the last may be smaller).
        device: where images are decoded and the batch is returned (a GPU; a CPU decodes with
            torchvision's libjpeg-turbo, which is slower than ``decode_threads``).
        threads: threads that read files (and decode what stays on the CPU); 0: the calling thread.
        ahead: batches read ahead of the one being decoded.

    Raises:
        ValueError: the device's decoding differs from Pillow's by more than :data:`TOLERANCE`.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if threads < 0:
        raise ValueError(f"reading threads must be 0 or more, got {threads}")
    device = torch.device(device)
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"--decode device decodes JPEGs on a CUDA GPU (nvJPEG); {device} has no JPEG decoder "
                         "torchvision can use: use --decode cpu")
    if device.type == "cuda" and device.index is None:  # one spelling: torchvision keeps one decoder per device
        device = torch.device("cuda", torch.cuda.current_device())
    size = (int(size[0]), int(size[1]))
    check_device(device, size, interpolation)
    fast_jpeg_decoder()  # its one-time check runs here, not in every thread at once
    starts = range(0, len(paths), batch_size)
    if threads == 0:
        return (_assemble(_read(paths, s, min(batch_size, len(paths) - s), size, interpolation), size,
                          interpolation, device, paths) for s in starts)
    pool = ThreadPoolExecutor(threads, thread_name_prefix="vision_tl-read")
    stop = threading.Event()  # set when the consumer leaves early: queued reads then do nothing
    todo = iter(starts)
    work: deque[Future] = deque()

    def submit() -> None:
        start = next(todo, None)
        if start is not None:
            work.append(pool.submit(_read, paths, start, min(batch_size, len(paths) - start), size,
                                    interpolation, stop))

    for _ in range(max(1, ahead)):  # the threads start reading now, before the first next()
        submit()
    # (a batch's files read, the next batch's reading starts, then this one goes to the device)
    return InOrder(pool, work, submit, stop, Future.result,
                   lambda rows: _assemble(rows, size, interpolation, device, paths))


def _read(paths: Sequence[Path], start: int, n: int, size: tuple[int, int], interpolation: str,
          stop: threading.Event | None = None) -> _Rows:
    """Read a batch's files: JPEGs the device takes keep their bytes, the rest is decoded here."""
    rows = _Rows(start, n)
    limit = max_image_pixels()
    simplejpeg = _header_reader()
    resizable = interpolation in TORCH_FILTERS
    for row in range(n):
        if stop is not None and stop.is_set():
            break
        path = paths[start + row]
        header = None
        try:
            data = _jpeg_bytes(path)
            if data is not None:
                header = _device_header(simplejpeg, data, limit)
        except OSError:
            data = None  # missing or unreadable: the host path names the problem
        if header is not None and (resizable or header[:2] == size):
            rows.jpeg[row] = (torch.frombuffer(bytearray(data), dtype=torch.uint8), header[2], header[:2])
            continue
        _host_row(rows, row, path, size, interpolation)
    return rows


def _device_header(simplejpeg, data: bytes, limit: int) -> tuple[int, int, bool] | None:
    """``(height, width, gray)`` of a whole JPEG the device may decode, else None. A file cut
    short (no end-of-image marker) stays on the host, where Pillow names it: a GPU decoder
    may return what it got without an error."""
    if data[-2:] != _EOI and data.rstrip(b"\0")[-2:] != _EOI:
        return None
    try:
        height, width, colorspace, subsampling = simplejpeg.decode_jpeg_header(data)
    except Exception:  # noqa: BLE001 - damaged: the host path says what is wrong
        return None
    if (colorspace, subsampling) not in _DEVICE_LAYOUTS or height * width > limit or min(height, width) < 1:
        return None
    return height, width, colorspace == "Gray"


def _host_row(rows: _Rows, row: int, path: Path, size: tuple[int, int], interpolation: str) -> None:
    out = np.empty((*size, 3), np.uint8)
    try:
        load_rgb_into(path, out, interpolation)
        rows.host[row] = out
    except ImageLoadError as exc:
        rows.errors[row] = str(exc)


def _header_reader():
    """simplejpeg, for JPEG headers only (its pixels are not used here, so the choice of
    ``$VISION_TL_JPEG_DECODER`` does not matter)."""
    try:
        import simplejpeg
    except ImportError as exc:
        raise ValueError("--decode device reads JPEG headers with simplejpeg, which is not installed: "
                         "pip install simplejpeg, or use --decode cpu") from exc
    return simplejpeg


def _decode(datas: list[torch.Tensor], gray: bool, device: torch.device) -> list[torch.Tensor]:
    from torchvision.io import ImageReadMode, decode_jpeg

    mode = ImageReadMode.GRAY if gray else ImageReadMode.RGB
    with ignoring_warnings(DeprecationWarning, _DEPRECATED):
        if device.type != "cuda":
            return decode_jpeg(datas, mode=mode, device=device)
        # torchvision allocates the images on the current stream and writes them on a stream of its
        # own: on the compute stream, it could be handed memory that kernels queued there still read.
        # On a side stream it gets memory only that stream used; the compute stream then waits for it.
        return copy_on_side_stream(lambda: decode_jpeg(datas, mode=mode, device=device), device)


def _refused(exc: RuntimeError) -> bool:
    """Whether the decoder refused the images (damaged, unsupported), rather than the device
    failing (out of memory, a CUDA error), which must not pass for a damaged file."""
    fatal = tuple(t for t in (getattr(torch, "OutOfMemoryError", None), getattr(torch, "AcceleratorError", None))
                  if t is not None)
    # torchvision re-raises the device's own failures inside its decoder as plain RuntimeErrors
    text = str(exc).lower()
    device_failed = any(sign in text for sign in ("out of memory", "failed to synchronize", "cuda error"))
    return not isinstance(exc, fatal) and not device_failed


def _decode_group(datas: list[torch.Tensor], gray: bool, device: torch.device) -> list[torch.Tensor | None]:
    """Decode ``datas``; None for each the device refuses. A call fails as a whole when one
    image fails, so a failed call is split in halves: a damaged file costs a few calls, not
    one call per image of its batch."""
    try:
        return list(_decode(datas, gray, device))
    except RuntimeError as exc:
        if not _refused(exc):
            raise
        if len(datas) == 1:
            return [None]
    half = len(datas) // 2
    return _decode_group(datas[:half], gray, device) + _decode_group(datas[half:], gray, device)


def _decode_all(rows: _Rows, device: torch.device) -> dict[int, torch.Tensor]:
    """Row -> ``[C, h, w]`` uint8 on ``device`` for the batch's JPEGs, colour and grey in one
    call each; the images the device refuses are left out (the host decodes or names them)."""
    decoded: dict[int, torch.Tensor] = {}
    for gray in (False, True):
        picked = [row for row, (_, g, _) in rows.jpeg.items() if g == gray]
        if picked:
            images = _decode_group([rows.jpeg[r][0] for r in picked], gray, device)
            decoded.update((row, image) for row, image in zip(picked, images) if image is not None)
    return decoded


def _assemble(rows: _Rows, size: tuple[int, int], interpolation: str, device: torch.device,
              paths: Sequence[Path]) -> tuple[list[int], torch.Tensor | None, list[tuple[int, str]]]:
    decoded = _decode_all(rows, device)
    for row in rows.jpeg:
        if row not in decoded:  # refused by the device: decoded (or named) on the host
            _host_row(rows, row, paths[rows.start + row], size, interpolation)
    good = sorted([*decoded, *rows.host])
    failures = [(rows.start + r, why) for r, why in sorted(rows.errors.items())]
    if not good:
        return [], None, failures
    # channels-last, as the threads' batches are: what the model runs on a GPU, no conversion pass
    out = torch.empty((len(good), 3, *size), dtype=torch.uint8, device=device, memory_format=torch.channels_last)
    slot = {row: k for k, row in enumerate(good)}
    groups: dict[tuple[int, int, int], list[int]] = {}
    for row, image in decoded.items():
        groups.setdefault(tuple(image.shape), []).append(row)
    for (_, h, w), members in groups.items():
        batch = torch.stack([decoded[r] for r in members])
        if (h, w) != size:
            batch = _resize(batch, size, interpolation)
        out.index_copy_(0, _index(slot, members, device), batch.expand(-1, 3, -1, -1))
    if rows.host:
        members = sorted(rows.host)
        (host,) = to_device(device, torch.from_numpy(np.stack([rows.host[r] for r in members])))
        out.index_copy_(0, _index(slot, members, device), host.permute(0, 3, 1, 2))
    return [rows.start + r for r in good], out, failures


def _index(slot: dict[int, int], members: list[int], device: torch.device) -> torch.Tensor:
    return to_device(device, torch.tensor([slot[r] for r in members], dtype=torch.long))[0]


def _resize(batch: torch.Tensor, size: tuple[int, int], interpolation: str) -> torch.Tensor:
    """``[N, C, h, w]`` uint8 -> ``[N, C, H, W]`` uint8 with PyTorch's twin of Pillow's filter."""
    x = F.interpolate(batch.float(), size=size, mode=TORCH_FILTERS[interpolation], antialias=True)
    return x.round_().clamp_(0, 255).to(torch.uint8)


def decoding_difference(device: torch.device | str, size: tuple[int, int] = (64, 64),
                        interpolation: str = "bicubic") -> tuple[float, int]:
    """Mean and largest ``|device - Pillow|`` per pixel value over a set of test JPEGs (4:2:0,
    4:2:2, 4:4:4, grey, progressive, odd sizes), decoded and resized to ``size`` as
    :func:`device_batches` does against ``--decode cpu``'s pixels."""
    size = (int(size[0]), int(size[1]))
    rng = np.random.default_rng(0)
    height, width = max(71, size[0] + 3), max(97, size[1] + 5)  # odd, and never the output size
    ramp = np.linspace(0, 200, width)[None, :, None] + np.linspace(0, 50, height)[:, None, None]
    base = np.clip(ramp + rng.normal(0, 20, (height, width, 3)), 0, 255).astype(np.uint8)
    cases = [("RGB", {"subsampling": 2}), ("RGB", {"subsampling": 1, "quality": 60}),
             ("RGB", {"subsampling": 0, "quality": 95}), ("L", {}), ("RGB", {"progressive": True})]
    # decoded at the output size, and resized to it where the device resizes with this filter
    images = (base[:size[0], :size[1]], base) if interpolation in TORCH_FILTERS else (base[:size[0], :size[1]],)
    datas, refs = [], []
    for mode, options in cases:
        for image in images:
            buffer = io.BytesIO()
            Image.fromarray(np.ascontiguousarray(image)).convert(mode).save(buffer, "JPEG", **options)
            datas.append(buffer.getvalue())
            with Image.open(buffer) as decoded_by_pillow:
                refs.append(resize(_pil_to_rgb(decoded_by_pillow), size, interpolation))
    rows = _Rows(0, len(datas))
    simplejpeg = _header_reader()
    for row, data in enumerate(datas):
        height, width, gray = _device_header(simplejpeg, data, limit=1 << 62)  # the user's limit is for their images
        rows.jpeg[row] = (torch.frombuffer(bytearray(data), dtype=torch.uint8), gray, (height, width))
    decoded = _decode_all(rows, torch.device(device))
    if len(decoded) != len(datas):
        raise ValueError(f"{device} could not decode {len(datas) - len(decoded)} of the {len(datas)} test JPEGs; "
                         "use --decode cpu")
    diffs = []
    for row in range(len(datas)):
        image = decoded[row][None]
        if tuple(image.shape[-2:]) != size:
            image = _resize(image, size, interpolation)
        got = image.expand(-1, 3, -1, -1)[0].permute(1, 2, 0).cpu().numpy()
        diffs.append(np.abs(got.astype(np.int16) - refs[row].astype(np.int16)))
    every = np.stack(diffs)
    return float(every.mean()), int(every.max())


def check_device(device: torch.device, size: tuple[int, int] = (64, 64),
                 interpolation: str = "bicubic") -> tuple[float, int]:
    """:func:`decoding_difference` on ``device`` at ``size`` with ``interpolation``, once per
    process for each; ValueError above :data:`TOLERANCE`."""
    key = (str(device), tuple(size), interpolation)
    with _lock:
        if key not in _checked:
            _checked[key] = decoding_difference(device, tuple(size), interpolation)
    mean, largest = _checked[key]
    if not math.isfinite(mean) or mean > TOLERANCE:
        raise ValueError(f"--decode device: JPEG decoding on {device} (resized to {size[0]}x{size[1]}, {interpolation}) "
                         f"differs from Pillow's by {mean:.2f} per pixel value on average (largest {largest}), over "
                         f"the {TOLERANCE} allowed; use --decode cpu")
    return mean, largest
