"""JPEG decoding per core: simplejpeg vs Pillow, through the kit's own loader code.

What one loader process does for ``vision-tl extract`` and for the decoded-image cache's
first pass (``load_rgb``, resize to the model's size, uint8 batch), timed in this one
process with each decoder in turn; rounds alternate and the script prints the median of
the per-round ratios. On a GPU machine extract is bound by this rate times the number of
loader processes, so the ratio is what extract gains there. Also checks that both give the
same pixels for every image timed.

    python benchmarks/decode_throughput.py --data ../shared/datasets/neu
    python benchmarks/decode_throughput.py --generate 600 --size 224   # demo JPEGs at 224 px
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

from vision_tl import imaging
from vision_tl.backbones import resolve_preprocessing
from vision_tl.data.transforms import ImageTransform
from vision_tl.features.extractor import _collate, _ImageFiles

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


def loader_rate(paths: list[Path], size: int, batch: int, whole_batches: bool = True) -> float:
    """images/s of decode + resize + batch in this process: what one ``vision-tl extract``
    loader worker does (``whole_batches``: into one batch buffer, as the kit does now; else
    image by image, then stacked, as before)."""
    transform = ImageTransform(resolve_preprocessing("tf_efficientnet_lite0", size), normalize=False)
    files = _ImageFiles(paths, transform)
    files.whole_batches = whole_batches
    start = time.perf_counter()
    for i in range(0, len(paths), batch):
        _collate(files.__getitems__(list(range(i, min(i + batch, len(paths))))))
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
        runs = [("pillow", "pillow", False), ("simplejpeg", "simplejpeg", False), ("direct", "simplejpeg", True)]
        for r in range(args.rounds):
            rates = {}
            for name, decoder, whole in runs if r % 2 == 0 else runs[::-1]:
                use_decoder(decoder)
                rates[name] = loader_rate(paths, args.size, args.batch, whole)
            rows.append((r, rates["pillow"], rates["simplejpeg"], rates["direct"], rates["direct"] / rates["pillow"]))
            print(f"round {r}: Pillow {rates['pillow']:.0f} img/s, simplejpeg {rates['simplejpeg']:.0f} img/s, "
                  f"simplejpeg into the batch {rates['direct']:.0f} img/s, ratio {rows[-1][4]:.2f}", flush=True)
    median = statistics.median(row[4] for row in rows)
    print(f"median ratio (simplejpeg into the batch) / (Pillow image by image): {median:.2f} "
          f"({len(paths)} images, identical pixels)")
    if args.no_write:
        return
    source = f"--data {args.data}" if args.data else f"--generate {args.generate}"
    lines = [f"\n### JPEG decoding per loader process: simplejpeg vs Pillow ({datetime.date.today()})\n",
             f"\n`python benchmarks/decode_throughput.py {source} --size {args.size}` — {len(paths)} JPEGs, "
             "decode + resize + uint8 batch in one process, identical pixels checked for every image.\n\n",
             "Columns: Pillow image by image and stacked (before), simplejpeg the same way, simplejpeg\n"
             "into one batch buffer (the kit's loaders now); the ratio is the last over the first.\n\n"
             "| round | Pillow img/s | simplejpeg img/s | simplejpeg into the batch img/s | ratio |\n"
             "|---|---|---|---|---|\n"]
    lines += [f"| {r} | {p:.0f} | {s:.0f} | {d:.0f} | {q:.2f} |\n" for r, p, s, d, q in rows]
    lines.append(f"| **median** | | | | **{median:.2f}** |\n")
    with RESULTS.open("a") as f:
        f.writelines(lines)


if __name__ == "__main__":
    sys.exit(main())
