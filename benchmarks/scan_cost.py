"""What the folder scan costs per image, by format: the check that finds cut-off files before
training, plus the sha256 the split and the caches key on.

    python benchmarks/scan_cost.py                      # 40 images of 1024 x 1024 per format
    python benchmarks/scan_cost.py --images 100 --size 2048

Prints the median over ``--rounds`` of the whole scan per image, and the same scan with full
decoding switched off, so the share of the check itself shows. The images are made here (random
pixels, in a temporary folder), one class folder per format.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

FORMATS = (("PNG", "png", {}), ("JPEG", "jpg", {"quality": 90}), ("BMP", "bmp", {}), ("TIFF", "tif", {}),
           ("TIFF", "lzw.tif", {"compression": "tiff_lzw"}), ("WEBP", "webp", {"quality": 90}))


def _scan_ms(files: list[Path], rounds: int) -> float:
    from vision_tl.data import folder

    times = []
    for _ in range(rounds):
        folder._SCANNED.clear()  # the scan's per-process memo: every round reads every file again
        start = time.perf_counter()
        for path in files:
            problem, _ = folder._checked(path)
            assert problem is None, (path, problem)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times) / len(files)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=40, help="images per format (40)")
    parser.add_argument("--size", type=int, default=1024, help="side of each image in pixels (1024)")
    parser.add_argument("--rounds", type=int, default=3, help="scans per format; the median is printed (3)")
    args = parser.parse_args()
    from vision_tl.data import folder

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        for kind, suffix, options in FORMATS:
            files = []
            for i in range(args.images):
                path = Path(tmp) / suffix / f"{i}.{suffix}"
                path.parent.mkdir(exist_ok=True)
                Image.fromarray(rng.integers(0, 255, (args.size, args.size, 3), np.uint8)).save(path, kind, **options)
                files.append(path)
            whole = _scan_ms(files, args.rounds)
            real = folder.load_rgb
            folder.load_rgb = lambda path: None  # what the scan costs without any full decode
            try:
                header = _scan_ms(files, args.rounds)
            finally:
                folder.load_rgb = real
            rows.append((suffix, whole, header))
    print(f"scan per {args.size}x{args.size} image, median of {args.rounds} rounds over {args.images} images:")
    print("| format | scan (ms) | without any full decode (ms) |\n|---|---|---|")
    for suffix, whole, header in rows:
        print(f"| {suffix} | {whole:.1f} | {header:.1f} |")


if __name__ == "__main__":
    main()
