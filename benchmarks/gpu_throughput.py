"""GPU training throughput: the kit's ``fit`` vs the plain-loop upper bound, in one run.

1. Prepares (on the CPU, in parallel) a folder of >= 10,000 synthetic 224 px JPEGs with
   the demo generator, unless it exists.
2. Measures the plain PyTorch upper bound on the GPU: bf16 autocast, channels_last,
   batch 256, tensors already on the device -- training for ``partial`` and ``full``,
   inference for ``frozen``.
3. Runs the kit's ``fit`` (device pipeline: decoded-image cache, pinned memory,
   on-device augmentation, bf16-mixed, channels_last) per mode and reports steady-state
   images/s (epochs after the first, which fills the decoded cache), the ratio to the
   bound, and peak GPU memory; then ``extract`` over the JPEGs (bf16, no feature cache)
   against the inference bound.
4. Appends the table, with the device name and this command, to benchmarks/RESULTS.md.

Must finish in under 5 minutes on an H100/H200. Smoke-test on a CPU with
``--device cpu --images 256 --size 64 --batch 32 --backbone test_efficientnet [--pipeline device]``.

    python benchmarks/gpu_throughput.py                      # on a GPU machine
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import lightning as L
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _throughput import ThroughputMeter, plain_inference_rate, plain_net, plain_train_rate  # noqa: E402

from vision_tl.data import ImageFolderDataModule  # noqa: E402
from vision_tl.tasks import ImageClassifier  # noqa: E402

RESULTS = Path(__file__).parent / "RESULTS.md"


def _render(job: tuple[str, int, int, str]) -> None:
    from PIL import Image

    from vision_tl.data.synthetic import CLASSES, render_sample

    kind, index, size, folder = job
    rng = np.random.default_rng([CLASSES.index(kind), index])
    Image.fromarray(render_sample(kind, rng, size)).save(Path(folder) / kind / f"{kind}_{index:05d}.jpg", quality=90)


def prepare(root: Path, images: int, size: int) -> Path:
    from vision_tl.data.synthetic import CLASSES

    marker = root / f".ready_{images}_{size}"
    if marker.exists():
        return root
    per_class = images // len(CLASSES)
    for kind in CLASSES:
        (root / kind).mkdir(parents=True, exist_ok=True)
    jobs = [(kind, i, size, str(root)) for kind in CLASSES for i in range(per_class)]
    start = time.perf_counter()
    with ProcessPoolExecutor(max_workers=os.cpu_count()) as pool:
        list(pool.map(_render, jobs, chunksize=64))
    marker.touch()
    print(f"prepared {len(jobs)} JPEGs at {size} px in {time.perf_counter() - start:.0f} s", flush=True)
    return root


def bounds(args, num_classes: int) -> dict[str, float]:
    amp = torch.bfloat16 if args.device == "cuda" else None
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(args.batch, 3, args.size, args.size, generator=g).to(args.device)
          .contiguous(memory_format=torch.channels_last) for _ in range(4)]
    ys = [torch.randint(0, num_classes, (args.batch,), generator=g).to(args.device) for _ in range(4)]
    out = {}
    for mode in ("partial", "full"):
        net = plain_net(args.backbone, num_classes, mode, args.device, channels_last=True)
        out[mode] = plain_train_rate(net, list(zip(xs, ys)), args.steps, amp)
    net = plain_net(args.backbone, num_classes, "frozen", args.device, channels_last=True)
    out["frozen"] = plain_inference_rate(net, xs, args.steps, amp)
    return out


def kit_rate(args, root: Path, mode: str) -> tuple[float, float]:
    """Steady-state training images/s of ``fit`` and the peak GPU memory in GiB."""
    L.seed_everything(0, verbose=False)
    dm = ImageFolderDataModule(str(root), backbone=args.backbone, image_size=args.size, batch_size=args.batch,
                               augment="inspection", pipeline=args.pipeline,
                               decoded_cache=str(args.cache), val_fraction=0.05, num_workers=args.workers)
    # Frozen mode without the feature cache: the backbone runs on every batch, so this
    # measures the inference-bound path; with the cache (the default) epochs cost ~nothing.
    model = ImageClassifier(dm.classes, backbone=args.backbone, image_size=args.size, mode=mode,
                            channels_last=True, feature_cache=None, pretrained=args.backbone != "test_efficientnet")
    meter = ThroughputMeter(skip_epochs=1)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer = L.Trainer(max_epochs=args.epochs, accelerator="gpu" if args.device == "cuda" else "cpu", devices=1,
                        precision="bf16-mixed" if args.device == "cuda" else "32-true", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0, callbacks=[meter])
    trainer.fit(model, datamodule=dm)
    peak = torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else float("nan")
    return meter.rate, peak


def extract_rate(args, root: Path) -> tuple[float, float]:
    """images/s of ``extract`` over the JPEG folder (decode on workers, uint8 to the device,
    bf16 on a GPU; no feature cache) and the peak GPU memory in GiB."""
    import tempfile

    from vision_tl.features import extract

    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as tmp:
        fs = extract(root, args.backbone, Path(tmp) / "features.npz", batch_size=args.batch,
                     num_workers=args.workers, use_cache=False, device=args.device, image_size=args.size,
                     precision="bf16" if args.device == "cuda" else "32", progress=False,
                     pretrained=args.backbone != "test_efficientnet")
    peak = torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else float("nan")
    return float(fs.metadata["images_per_second"]), peak


def report(args, device_name: str, bound: dict[str, float], kit: dict[str, tuple[float, float]]) -> str:
    lines = [f"### GPU pipeline throughput ({device_name})", "",
             f"`python benchmarks/gpu_throughput.py --images {args.images} --batch {args.batch} "
             f"--epochs {args.epochs}` — {args.backbone}, {args.size} px, batch {args.batch}, bf16, channels_last.", "",
             "| mode | plain-loop bound (img/s) | kit fit (img/s) | ratio | peak GPU memory (GiB) |",
             "| --- | --- | --- | --- | --- |"]
    for mode in ("frozen", "partial", "full", "extract"):
        rate, peak = kit[mode]
        kind = "inference" if mode in ("frozen", "extract") else "train"
        bound_rate = bound["frozen" if mode == "extract" else mode]
        lines.append(f"| {mode} | {bound_rate:,.0f} ({kind}) | {rate:,.0f} | {rate / bound_rate:.2f} | {peak:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("/tmp/vision_tl_gpu_bench"))
    parser.add_argument("--cache", type=Path, default=Path("/tmp/vision_tl_gpu_bench_decoded"))
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30, help="timed steps of the plain-loop bound")
    parser.add_argument("--workers", type=int, default=min(12, os.cpu_count() or 1))
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--pipeline", choices=("device", "cpu"), default=None,
                        help="the kit's input pipeline (default: device on a GPU, cpu otherwise)")
    parser.add_argument("--no-write", action="store_true", help="do not append to RESULTS.md")
    args = parser.parse_args()
    args.pipeline = args.pipeline or ("device" if args.device == "cuda" else "cpu")
    start = time.perf_counter()
    torch.backends.cudnn.benchmark = True
    root = prepare(args.data, args.images, args.size)
    bound = bounds(args, num_classes=4)
    print("plain-loop bounds:", {k: round(v) for k, v in bound.items()}, flush=True)
    kit = {}
    for mode in ("frozen", "partial", "full"):
        kit[mode] = kit_rate(args, root, mode)
        print(f"kit {mode}: {kit[mode][0]:,.0f} img/s (ratio {kit[mode][0] / bound[mode]:.2f})", flush=True)
    kit["extract"] = extract_rate(args, root)
    print(f"extract: {kit['extract'][0]:,.0f} img/s (ratio {kit['extract'][0] / bound['frozen']:.2f})", flush=True)
    name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    table = report(args, name, bound, kit)
    print("\n" + table + f"\ntotal {time.perf_counter() - start:.0f} s")
    if not args.no_write and args.device == "cuda":
        with open(RESULTS, "a") as fh:
            fh.write("\n" + table)


if __name__ == "__main__":
    main()
