"""What the GPU input pipeline costs outside the model, measured on any machine (CPU is fine).

The GPU targets of ``benchmarks/gpu_throughput.py`` (>= 80 % of the plain-loop bound)
leave the input pipeline about a fifth of each step. Two parts of it can be measured
without a GPU, each against a baseline in the same run:

1. **On-device augmentation.** ``BatchAugment`` with the ``inspection`` preset against
   normalisation alone (what evaluation and the plain-loop bound pay), on the same
   uint8 batch. Augmentation is elementwise and memory-bound on a GPU, so this ratio
   is the number of full passes over the batch, relative to normalising; the absolute
   milliseconds are the CPU's, not the GPU's.
2. **Host-side feed rate.** Images/s that the kit's loaders deliver with no model
   attached: the device pipeline reading the decoded-image cache (``fit``, epochs
   after the first), the device pipeline decoding JPEGs (``fit`` without the cache),
   and ``extract``'s decoding threads. Per loader process (or thread), then how many the GPU
   targets need (6,100 img/s train and 22,800 img/s inference on an H200, times 0.8).

    python benchmarks/pipeline_cost.py                   # 2,000 synthetic 224 px JPEGs
    python benchmarks/pipeline_cost.py --images 500 --batch 64 --rounds 3   # quicker
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from gpu_throughput import prepare  # noqa: E402

from vision_tl.backbones import resolve_preprocessing  # noqa: E402
from vision_tl.data import ImageFolderDataModule  # noqa: E402
from vision_tl.data.batch_augment import BatchAugment  # noqa: E402

TRAIN_TARGET = 0.8 * 6_100  # img/s, H200 plain-loop bound x 0.8
INFER_TARGET = 0.8 * 22_800


def augment_cost(batch: int, size: int, rounds: int) -> tuple[float, float]:
    """Median ms per batch: (normalise only, inspection augmentation + normalise)."""
    pre = resolve_preprocessing("tf_efficientnet_lite0", size)
    x = torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8).permute(0, 3, 1, 2)  # as loaders send
    out = []
    for aug in (BatchAugment(pre, augment=False), BatchAugment(pre)):
        aug(x, generator=torch.Generator().manual_seed(0))  # warm-up
        times = []
        for r in range(rounds):
            start = time.perf_counter()
            aug(x, generator=torch.Generator().manual_seed(r))
            times.append(time.perf_counter() - start)
        out.append(1000 * statistics.median(times))
    return out[0], out[1]


def feed_rate(root: Path, cache: Path | None, workers: int, batch: int, size: int, rounds: int) -> float:
    """Median images/s of one pass over the training loader of the device pipeline."""
    dm = ImageFolderDataModule(str(root), image_size=size, batch_size=batch, pipeline="device",
                               decoded_cache=str(cache) if cache else False, val_fraction=0.05,
                               num_workers=workers)
    dm.setup("fit")
    loader = dm.train_dataloader()
    rates = []
    for _ in range(rounds + (1 if cache else 0)):  # the first pass over a new cache fills it
        start, images = time.perf_counter(), 0
        for _x, y in loader:
            images += len(y)
        rates.append(images / (time.perf_counter() - start))
    return statistics.median(rates[1:] if cache else rates)


def extract_feed_rate(root: Path, workers: int, batch: int, size: int, rounds: int) -> float:
    """Median images/s of ``extract``'s decoding (threads, straight into the batch), no model."""
    from vision_tl.data.decode_threads import decode_batches

    paths = sorted(root.rglob("*.jpg"))
    interpolation = resolve_preprocessing("tf_efficientnet_lite0", size).interpolation
    rates = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in decode_batches(paths, (size, size), interpolation, batch, workers):
            pass
        rates.append(len(paths) / (time.perf_counter() - start))
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--workers", type=int, default=1, help="loader processes (decoding threads for extract) for the feed rates")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    norm, aug = augment_cost(args.batch, args.size, args.rounds)
    print(f"batch augmentation, {args.batch} x {args.size} px, median of {args.rounds}: "
          f"normalise {norm:.1f} ms, inspection + normalise {aug:.1f} ms, ratio {aug / norm:.1f}x", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        root = prepare(Path(tmp) / "jpegs", args.images, args.size)
        w = args.workers
        rates = {
            "fit, decoded cache": feed_rate(root, Path(tmp) / "decoded", w, args.batch, args.size, args.rounds),
            "fit, JPEG decoding": feed_rate(root, None, w, args.batch, args.size, args.rounds),
            "extract, JPEG decoding": extract_feed_rate(root, w, args.batch, args.size, args.rounds),
        }
    print(f"\nhost feed rate with {w} loader process(es) or decoding thread(s), batch {args.batch}, median of {args.rounds}:")
    for name, rate in rates.items():
        per = rate / max(1, w)
        target = INFER_TARGET if name.startswith("extract") else TRAIN_TARGET
        print(f"  {name:24s} {rate:8,.0f} img/s  ({per:,.0f} per process; {target:,.0f} img/s "
              f"needs ~{target / per:.1f} processes, {INFER_TARGET / per:.1f} for frozen/inference)")


if __name__ == "__main__":
    main()
