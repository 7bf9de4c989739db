"""The CPU work around each batch in ``vision-tl extract``'s main process, the model left out.

On a GPU, extract keeps up with the device only if its main process (and the thread that pins
batches) spends less time per batch than the GPU does. This times, with the model replaced by
a stub that returns zeros:

1. **Taking a batch from the decoding processes and copying it once**, what the pinning thread
   does with each batch (here into an ordinary buffer: pinning needs a GPU): the median copy,
   with each process's shared-memory buffers reused (the kit) and new per batch.
2. **The main thread's CPU per batch** (``time.thread_time``) through ``iter_embeddings`` alone
   and through ``FeatureCache.ensure`` (what ``vision-tl extract`` runs: a ``stat`` per file to
   catch files rewritten since the scan, the shard writes); the difference is the cache's share.

    python benchmarks/extract_host.py --generate 4000 --size 224 --batch 256 --workers 2
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from vision_tl.backbones import create_backbone, resolve_preprocessing
from vision_tl.data import decode_threads
from vision_tl.features.api import scan_images
from vision_tl.features.cache import FeatureCache
from vision_tl.features.extractor import FeatureExtractor, iter_embeddings

sys.path.insert(0, str(Path(__file__).parent))
from gpu_throughput import prepare  # noqa: E402

RESULTS = Path(__file__).parent / "RESULTS.md"


def copy_ms(paths: list[Path], size: int, batch: int, workers: int, reuse: bool) -> float:
    """Median milliseconds to copy each batch out of the decoding processes' shared memory."""
    out = torch.empty(batch, size, size, 3, dtype=torch.uint8)
    times = []
    for rows in decode_threads.decode_batches_in_processes(paths, (size, size), "bicubic", batch, workers,
                                                           reuse_buffers=reuse):
        start = time.perf_counter()
        out[: len(rows.pixels)].copy_(rows.pixels)
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times[1:] or times)  # the first batch also maps the process's first buffer


def main_thread_ms(fx: FeatureExtractor, paths, hashes, batch: int, workers: int, cached: bool) -> float:
    """Main-thread CPU milliseconds per batch through iter_embeddings or FeatureCache.ensure."""
    start = time.thread_time()
    if cached:
        with tempfile.TemporaryDirectory() as tmp:
            FeatureCache(tmp).ensure(fx, paths, hashes, batch, workers, "cpu", progress=False)
    else:
        for _ in iter_embeddings(fx, paths, batch, workers, "cpu", progress=False):
            pass
    return 1000 * (time.thread_time() - start) / -(-len(paths) // batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", type=Path, help="a folder of JPEGs (class sub-folders)")
    source.add_argument("--generate", type=int, metavar="N", help="time N demo JPEGs made here instead")
    parser.add_argument("--size", type=int, default=224, help="model input size (and generated image size)")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2, help="decoding processes")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-write", action="store_true", help="do not append to RESULTS.md")
    args = parser.parse_args()
    decode_threads.PROCESSES_FROM = 1  # decoding processes, as on a GPU machine's 8+ cores, on any machine

    with tempfile.TemporaryDirectory() as tmp:
        root = prepare(Path(tmp), args.generate, args.size) if args.generate else args.data
        images = scan_images(root)
        paths, hashes = images.paths, images.hashes
        fx = FeatureExtractor(create_backbone("test_efficientnet", pretrained=False), "test_efficientnet",
                              resolve_preprocessing("tf_efficientnet_lite0", args.size))
        fx.embed = lambda x: torch.zeros(len(x), fx.num_features)  # the model left out
        copies = {True: [], False: []}
        thread = {False: [], True: []}
        for r in range(args.rounds):
            for reuse in ((True, False) if r % 2 == 0 else (False, True)):
                copies[reuse].append(copy_ms(paths, args.size, args.batch, args.workers, reuse))
            for cached in ((False, True) if r % 2 == 0 else (True, False)):
                thread[cached].append(main_thread_ms(fx, paths, hashes, args.batch, args.workers, cached))
            print(f"round {r}: copy out of shared memory {copies[True][-1]:.1f} ms (reused buffers), "
                  f"{copies[False][-1]:.1f} ms (new); main thread {thread[False][-1]:.1f} ms (iter_embeddings), "
                  f"{thread[True][-1]:.1f} ms (FeatureCache.ensure) per batch", flush=True)
    med = {k: statistics.median(v) for k, v in {**{f"copy {k}": v for k, v in copies.items()},
                                                 **{f"thread {k}": v for k, v in thread.items()}}.items()}
    mb = args.batch * args.size * args.size * 3 / 1e6
    lines = [f"### extract's main-process work per batch, model stubbed ({datetime.date.today()}, "
             f"{args.workers} decoding processes, batch {args.batch} at {args.size} px = {mb:.1f} MB)", "",
             f"`python benchmarks/extract_host.py {' '.join(sys.argv[1:])}` — medians of {args.rounds} "
             "alternating rounds.", "",
             "| what | ms per batch |", "| --- | --- |",
             f"| copy a batch out of the decoding processes' shared memory (the pinning thread's job), buffers reused "
             f"| {med['copy True']:.1f} |",
             f"| the same, a new buffer per batch | {med['copy False']:.1f} |",
             f"| main thread through `iter_embeddings` | {med['thread False']:.1f} |",
             f"| main thread through `FeatureCache.ensure` (as `vision-tl extract`) | {med['thread True']:.1f} |",
             f"| the feature cache's share | {med['thread True'] - med['thread False']:.1f} |"]
    print("\n".join(lines))
    if not args.no_write:
        with RESULTS.open("a", encoding="utf-8") as f:
            f.write("\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
