"""Does the fast input path train as well as the slow one? ``partial`` on a real folder,
through the device pipeline (batched augmentation after the transfer) and through the
CPU pipeline (albumentations per image in the loader), on several seeds.

Each run is the user's command, ``vision-tl fit --config configs/partial.yaml`` (plus
``--config configs/gpu.yaml`` on a GPU) with
``--data.pipeline device|cpu``, ``--data.seed S --seed_everything S`` and the given
epochs; the table lists the best and the last validation accuracy of every run, and
is appended to benchmarks/RESULTS.md with the device name (unless --no-write).

    python benchmarks/pipeline_accuracy.py --data ../shared/datasets/neu            # on a GPU: 3 seeds x 25 epochs
    python benchmarks/pipeline_accuracy.py --data DIR --epochs 1 --seeds 0 --no-write \\
        --extra --model.backbone test_efficientnet --model.pretrained false --model.image_size 64   # CPU smoke test
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from vision_tl.cli import main as vision_tl

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "RESULTS.md"


def run(data: Path, pipeline: str, seed: int, args, save_dir: Path) -> dict:
    gpu = torch.cuda.is_available()
    argv = ["fit", "--config", str(ROOT / "configs" / "partial.yaml"), "--data.root", str(data),
            "--data.pipeline", pipeline, "--data.seed", str(seed), "--seed_everything", str(seed),
            "--trainer.max_epochs", str(args.epochs), "--trainer.enable_progress_bar", "false",
            "--trainer.logger.init_args.save_dir", str(save_dir),
            "--trainer.logger.init_args.name", f"{pipeline}_seed{seed}"]
    if gpu:  # the GPU overlay (bf16, decoded cache), then this run's pipeline again
        argv += ["--config", str(ROOT / "configs" / "gpu.yaml"), "--data.pipeline", pipeline]
    argv += args.extra
    start = time.perf_counter()
    if vision_tl(argv) != 0:
        raise SystemExit(f"fit failed: {' '.join(argv)}")
    seconds = time.perf_counter() - start
    run_dir = save_dir / f"{pipeline}_seed{seed}" / "version_0"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {"pipeline": pipeline, "seed": seed, "best": metrics["val"]["acc"], "best_epoch": metrics["val"]["epoch"],
            "last": metrics["val_last"]["acc"], "seconds": seconds}


def table(rows: list[dict], args, device: str) -> str:
    lines = [f"### Device vs CPU pipeline, `partial`, {args.epochs} epochs ({device})", "",
             f"`python benchmarks/pipeline_accuracy.py --data {args.data} --epochs {args.epochs} "
             f"--seeds {','.join(map(str, args.seeds))}`", "",
             "| pipeline | seed | best val acc (epoch) | last val acc | wall s |", "| --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['pipeline']} | {r['seed']} | {100 * r['best']:.2f} % ({r['best_epoch']}) | "
                     f"{100 * r['last']:.2f} % | {r['seconds']:.0f} |")
    for pipeline in ("device", "cpu"):
        best = [r["best"] for r in rows if r["pipeline"] == pipeline]
        last = [r["last"] for r in rows if r["pipeline"] == pipeline]
        if best:
            lines.append(f"| **{pipeline}, mean** | | {100 * statistics.mean(best):.2f} % | "
                         f"{100 * statistics.mean(last):.2f} % | |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("../shared/datasets/neu"))
    parser.add_argument("--epochs", type=int, default=25)
    parser.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2])
    parser.add_argument("--pipelines", default="device,cpu")
    parser.add_argument("--no-write", action="store_true", help="do not append to RESULTS.md")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more `vision-tl fit` arguments")
    args = parser.parse_args()
    if not args.data.is_dir():
        raise SystemExit(f"no image folder at {args.data}")
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    rows = []
    with tempfile.TemporaryDirectory(prefix="vtl_pipeline_acc_") as tmp:
        for seed in args.seeds:
            for pipeline in args.pipelines.split(","):
                rows.append(run(args.data, pipeline, seed, args, Path(tmp)))
                print(f"{pipeline} seed {seed}: best {rows[-1]['best']:.4f}, last {rows[-1]['last']:.4f}, "
                      f"{rows[-1]['seconds']:.0f} s", flush=True)
    text = table(rows, args, device)
    print("\n" + text)
    if not args.no_write:
        with open(RESULTS, "a") as fh:
            fh.write("\n" + text)


if __name__ == "__main__":
    sys.exit(main())
