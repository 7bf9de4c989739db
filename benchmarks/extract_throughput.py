"""``extract`` throughput vs a plain hand-written timm loop, and peak memory of ``vision-tl extract``.

Throughput: the same files, model, batch size and torch threads; the plain loop only
decodes, resizes, normalises and runs the model (no hashing, no shards, no file), and
``extract`` runs with a fresh cache-less work directory so every image is computed.
The two are interleaved (plain, extract, plain, extract) and the best of each is kept,
which damps noise from other processes on a shared machine.

Peak memory: ``vision-tl extract`` over the whole folder in a child process; its
maximum resident set size is read from ``getrusage(RUSAGE_CHILDREN)``.

Usage (from the repository root)::

    python benchmarks/extract_throughput.py --data ../shared/datasets/neu --images 300
    python benchmarks/extract_throughput.py --data ../shared/datasets/neu --memory --cache-dir /tmp/vtl_cache
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

BACKBONE = "tf_efficientnet_lite0"


def subset(root: Path, n: int, dest: Path) -> Path:
    """Symlink ``n`` images spread over the classes (read-only data is never copied)."""
    classes = sorted(p for p in root.iterdir() if p.is_dir())
    for cls in classes:
        (dest / cls.name).mkdir(parents=True)
        for src in sorted(cls.iterdir())[: n // len(classes)]:
            (dest / cls.name / src.name).symlink_to(src.resolve())
    return dest


@torch.inference_mode()
def plain_loop(root: Path, batch_size: int) -> float:
    """What a user would write by hand with timm: seconds for every image in ``root``."""
    from vision_tl.backbones import create_backbone, resolve_preprocessing
    from vision_tl.data.transforms import eval_transform
    from vision_tl.imaging import load_rgb

    start = time.perf_counter()
    model = create_backbone(BACKBONE).eval()  # timm model + the bundled ImageNet weights
    transform = eval_transform(resolve_preprocessing(BACKBONE))
    files = sorted(root.rglob("*.jpg"))
    for i in range(0, len(files), batch_size):
        x = torch.stack([transform(load_rgb(f)) for f in files[i:i + batch_size]])
        model(x).numpy()
    return time.perf_counter() - start


def extract_run(root: Path, batch_size: int, out: Path) -> float:
    from vision_tl.features import extract

    start = time.perf_counter()
    extract(root, BACKBONE, out, batch_size=batch_size, use_cache=False, overwrite=True,
            progress=False, return_features=False)
    return time.perf_counter() - start


def throughput(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="vtl_bench_") as tmp:
        root = subset(args.data, args.images, Path(tmp) / "data")
        n = sum(1 for _ in root.rglob("*.jpg"))
        plain, ours = [], []
        for _ in range(args.repeats):
            plain.append(plain_loop(root, args.batch_size))
            ours.append(extract_run(root, args.batch_size, Path(tmp) / "out.npz"))
            print(f"plain {plain[-1]:.1f} s, extract {ours[-1]:.1f} s", flush=True)
        print(f"images: {n}, batch size {args.batch_size}, torch threads {torch.get_num_threads()}")
        print(f"plain loop: {n / min(plain):.1f} img/s; extract: {n / min(ours):.1f} img/s")
        print(f"RATIO extract / plain throughput = {min(plain) / min(ours):.3f}  (target >= 0.95)")


def memory(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="vtl_bench_") as tmp:
        cmd = [sys.executable, "-m", "vision_tl.cli", "extract", str(args.data), "--backbone", BACKBONE,
               "--out", str(Path(tmp) / "neu.parquet"), "--no-progress"]
        cmd += ["--cache-dir", args.cache_dir] if args.cache_dir else ["--no-cache"]
        start = time.perf_counter()
        subprocess.run(cmd, check=True)
        seconds = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(f"vision-tl extract over {args.data}: {seconds:.1f} s, peak RSS {peak_mb:.0f} MB (target <= 1536)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("../shared/datasets/neu"))
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--memory", action="store_true", help="measure peak memory of the CLI instead")
    parser.add_argument("--cache-dir", default=None, help="with --memory: fill this cache (else --no-cache)")
    args = parser.parse_args()
    memory(args) if args.memory else throughput(args)


if __name__ == "__main__":
    main()
