"""JPEG decoding for extract and the decoded cache: per core, and threads vs loader processes.

1. **Per core**: what one decoding worker does (decode, resize to the model's size, uint8
   batch) with Pillow image by image and stacked (the kit before simplejpeg) and with
   simplejpeg straight into the batch (the kit now), in this one process; also checks that
   both give the same pixels for every image timed.
2. **Threads vs loader processes** (``--workers N``): the whole pass over the images, start-up
   included, through N decoding threads (``decode_batches``, the kit now) and through a
   ``DataLoader`` with N processes that decode into shared-memory batches (the kit before).
   The parent holds a Lite0 model first, as ``vision-tl extract``'s does when it starts them.
3. **The kit's decoding processes** (``decode_batches_in_processes``, used on 8+ cores): each
   process's shared-memory buffers reused round robin, against a new one per batch.

Rounds alternate; the script prints the medians of the per-round ratios. On a GPU machine
extract is bound by this decoding rate, so the ratios are what extract gains there.

    python benchmarks/decode_throughput.py --data ../shared/datasets/neu
    python benchmarks/decode_throughput.py --generate 600 --size 224   # demo JPEGs at 224 px
    python benchmarks/decode_throughput.py --generate 3000 --workers 15 --images 3000   # a 16-core GPU machine
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from vision_tl import imaging
from vision_tl.backbones import create_backbone
from vision_tl.data.decode_threads import decode_batches, decode_batches_in_processes
from vision_tl.data.device import default_decode_threads
from vision_tl.data.transforms import pixel_batch_buffer

sys.path.insert(0, str(Path(__file__).parent))
from gpu_throughput import prepare  # noqa: E402

RESULTS = Path(__file__).parent / "RESULTS.md"


def use_decoder(name: str) -> None:
    """Switch ``load_rgb``'s JPEG decoder in this process (``simplejpeg`` or ``pillow``)."""
    imaging._fast_jpeg = None
    if name == "pillow":
        imaging._fast_jpeg = False
    elif imaging.fast_jpeg_decoder() is None:
        raise SystemExit("simplejpeg is not installed or not bit-exact with Pillow here")


def per_core_rate(paths: list[Path], size: int, batch: int, into_batch: bool) -> float:
    """images/s of decode + resize + uint8 batch in this process: straight into the batch (the
    kit, ``decode_batches`` without threads), or image by image and then stacked (before)."""
    start = time.perf_counter()
    if into_batch:
        for _ in decode_batches(paths, (size, size), "bicubic", batch, threads=0):
            pass
    else:
        for i in range(0, len(paths), batch):
            np.stack([imaging.resize(imaging.load_rgb(p), (size, size), "bicubic") for p in paths[i:i + batch]])
    return len(paths) / (time.perf_counter() - start)


class _ProcessBatches(Dataset):
    """The kit's extract loader before decoding threads: a ``DataLoader`` worker decodes a whole
    batch into one shared-memory buffer, which the parent then receives."""

    def __init__(self, paths: list[Path], size: int) -> None:
        self.paths, self.size = paths, size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitems__(self, indices: list[int]) -> list[torch.Tensor]:
        out = pixel_batch_buffer((len(indices), self.size, self.size, 3))
        for row, i in zip(out.numpy(), indices, strict=True):
            imaging.load_rgb_into(self.paths[i], row, "bicubic")
        return [out]


def outside_decoder_us(paths: list[Path], size: int, rounds: int = 3) -> tuple[float, float]:
    """Microseconds per image of ``load_rgb_into`` in this thread, and of the same calls with
    simplejpeg's decode replaced by blank pixels: the second is the work around each decode
    (file reads, headers, checks, any resize), an upper bound on what holds the GIL, which caps
    the images/s that decoding threads in one process can reach at 1e6 / it."""
    simplejpeg = imaging.fast_jpeg_decoder()
    row = np.empty((size, size, 3), np.uint8)

    def per_image() -> float:
        start = time.perf_counter()
        for p in paths:
            imaging.load_rgb_into(p, row, "bicubic")
        return 1e6 * (time.perf_counter() - start) / len(paths)

    full = min(per_image() for _ in range(rounds))
    real = simplejpeg.decode_jpeg

    def no_decode(data, colorspace="RGB", strict=True, buffer=None):  # blank pixels of the right shape
        if buffer is not None:
            return buffer
        height, width, _, _ = simplejpeg.decode_jpeg_header(data)
        return np.zeros((height, width, 1 if colorspace == "GRAY" else 3), np.uint8)

    simplejpeg.decode_jpeg = no_decode
    try:
        outside = min(per_image() for _ in range(rounds))
    finally:
        simplejpeg.decode_jpeg = real
    return full, outside


def pass_rate(paths: list[Path], size: int, batch: int, workers: int, threads: bool) -> tuple[float, float]:
    """images/s of one whole pass, start-up included, and the milliseconds to the first batch."""
    start, first = time.perf_counter(), None
    if threads:
        batches = decode_batches(paths, (size, size), "bicubic", batch, workers)
    else:
        batches = DataLoader(_ProcessBatches(paths, size), batch_size=batch, num_workers=workers,
                             collate_fn=lambda items: items[0], prefetch_factor=4 if workers else None)
    for _ in batches:
        first = first or time.perf_counter() - start
    return len(paths) / (time.perf_counter() - start), 1000 * (first or 0.0)


def kit_process_rate(paths: list[Path], size: int, batch: int, workers: int, reuse: bool) -> float:
    """images/s of one whole pass through the kit's decoding processes (what extract and the
    decoded cache use on 8+ cores), with each process's shared-memory buffers reused or new per batch."""
    start = time.perf_counter()
    for _ in decode_batches_in_processes(paths, (size, size), "bicubic", batch, workers, reuse_buffers=reuse):
        pass
    return len(paths) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", type=Path, help="a folder of JPEGs (searched recursively)")
    source.add_argument("--generate", type=int, metavar="N", help="time N demo JPEGs made here instead")
    parser.add_argument("--size", type=int, default=224, help="model input size (and generated image size)")
    parser.add_argument("--images", type=int, default=600, help="images timed per round")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--workers", type=int, default=default_decode_threads(),
                        help="decoding threads and loader processes to compare (default: what extract uses here)")
    parser.add_argument("--no-write", action="store_true", help="do not append to RESULTS.md")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        # the GPU benchmark's data: demo JPEGs rendered in parallel
        root = prepare(Path(tmp), args.generate, args.size) if args.generate else args.data
        paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))[:args.images]
        if not paths:
            raise SystemExit(f"no .jpg/.jpeg files under {root}")
        for p in paths:  # same pixels, or the comparison is void
            use_decoder("pillow")
            slow = imaging.load_rgb(p)
            use_decoder("simplejpeg")
            if not np.array_equal(slow, imaging.load_rgb(p)):
                raise SystemExit(f"{p}: simplejpeg and Pillow disagree")
        rows = []
        for r in range(args.rounds):
            order = [False, True] if r % 2 == 0 else [True, False]
            rates = {}
            for into in order:
                use_decoder("simplejpeg" if into else "pillow")
                rates[into] = per_core_rate(paths, args.size, args.batch, into)
            rows.append((r, rates[False], rates[True], rates[True] / rates[False]))
            print(f"round {r}: Pillow image by image {rates[False]:.0f} img/s, simplejpeg into the batch "
                  f"{rates[True]:.0f} img/s, ratio {rows[-1][3]:.2f}", flush=True)
        use_decoder("simplejpeg")
        full_us, outside_us = outside_decoder_us(paths, args.size)
        print(f"load_rgb_into: {full_us:.0f} us per image, {outside_us:.0f} us of it outside the decoder "
              f"(caps decoding threads at ~{1e6 / outside_us:,.0f} img/s per process)", flush=True)
        model = create_backbone("tf_efficientnet_lite0")  # noqa: F841 - held, as extract's parent holds one
        passes = []
        for r in range(args.rounds):
            rates = {}
            for threads in ([False, True] if r % 2 == 0 else [True, False]):
                rates[threads] = pass_rate(paths, args.size, args.batch, args.workers, threads)
            (proc, proc_first), (thr, thr_first) = rates[False], rates[True]
            passes.append((r, proc, proc_first, thr, thr_first, thr / proc))
            print(f"round {r}: {args.workers} loader processes {proc:.0f} img/s (first batch after {proc_first:.0f} ms), "
                  f"{args.workers} threads {thr:.0f} img/s ({thr_first:.0f} ms), ratio {thr / proc:.2f}", flush=True)
        reuse = []
        for r in range(args.rounds):
            rates = {}
            for again in ([False, True] if r % 2 == 0 else [True, False]):
                rates[again] = kit_process_rate(paths, args.size, args.batch, args.workers, again)
            reuse.append((r, rates[False], rates[True], rates[True] / rates[False]))
            print(f"round {r}: the kit's {args.workers} decoding processes, a new shared-memory batch each time "
                  f"{rates[False]:.0f} img/s, buffers reused {rates[True]:.0f} img/s, ratio {reuse[-1][3]:.2f}",
                  flush=True)
    median = statistics.median(row[3] for row in rows)
    reuse_median = statistics.median(row[3] for row in reuse)
    pass_median = statistics.median(row[5] for row in passes)
    print(f"median ratio per core, simplejpeg into the batch / Pillow image by image: {median:.2f} "
          f"({len(paths)} images, identical pixels)")
    print(f"median ratio of a whole pass, {args.workers} threads / {args.workers} loader processes: {pass_median:.2f}")
    print(f"median ratio of a whole pass through the kit's decoding processes, buffers reused / new: {reuse_median:.2f}")
    if args.no_write:
        return
    source = f"--data {args.data}" if args.data else f"--generate {args.generate}"
    lines = [f"\n### JPEG decoding for extract and the decoded cache ({datetime.date.today()})\n",
             f"\n`python benchmarks/decode_throughput.py {source} --size {args.size} --images {args.images} "
             f"--workers {args.workers}` — {len(paths)} JPEGs, decode + resize to {args.size} px + uint8 batch of "
             f"{args.batch}; identical pixels checked for every image.\n\n",
             "Per core (one process): Pillow image by image, then stacked (before), against simplejpeg\n"
             "straight into the batch (now).\n\n",
             "| round | Pillow img/s | simplejpeg into the batch img/s | ratio |\n|---|---|---|---|\n"]
    lines += [f"| {r} | {p:.0f} | {d:.0f} | {q:.2f} |\n" for r, p, d, q in rows]
    lines.append(f"| **median** | | | **{median:.2f}** |\n")
    lines += [f"\nA whole pass, start-up included: {args.workers} loader processes decoding into shared-memory "
              f"batches (before) against {args.workers} decoding threads (now).\n\n",
              "| round | processes img/s | first batch (ms) | threads img/s | first batch (ms) | ratio |\n"
              "|---|---|---|---|---|---|\n"]
    lines += [f"| {r} | {p:.0f} | {pf:.0f} | {t:.0f} | {tf:.0f} | {q:.2f} |\n" for r, p, pf, t, tf, q in passes]
    lines.append(f"| **median** | | | | | **{pass_median:.2f}** |\n")
    lines.append(f"\n`load_rgb_into` in one thread: {full_us:.0f} µs per image, {outside_us:.0f} µs of it outside the "
                 "decoder (file read, header, checks, and the resize where one is needed, which Pillow runs without "
                 f"the GIL). For JPEGs at the model's size that bounds the GIL's share and caps decoding threads at "
                 f"about {1e6 / outside_us:,.0f} images/s per process.\n")
    lines += [f"\nA whole pass through the kit's {args.workers} decoding processes (extract and the decoded cache "
              "on 8+ cores): a new shared-memory batch each time (before) against each process's buffers reused "
              "(now).\n\n", "| round | new batches img/s | reused buffers img/s | ratio |\n|---|---|---|---|\n"]
    lines += [f"| {r} | {a:.0f} | {b:.0f} | {q:.2f} |\n" for r, a, b, q in reuse]
    lines.append(f"| **median** | | | **{reuse_median:.2f}** |\n")
    with RESULTS.open("a", encoding="utf-8") as f:
        f.writelines(lines)


if __name__ == "__main__":
    sys.exit(main())
