"""Does the fast input path train as well as the slow one? ``partial`` on a real folder,
through the device pipeline (batched augmentation after the transfer) and through the
CPU pipeline (albumentations per image in the loader), on several seeds.

Each run is the user's command, ``vision-tl fit --config configs/partial.yaml`` (plus
``--config configs/gpu.yaml`` on a GPU) with
``--data.pipeline device|cpu``, ``--data.seed S --seed_everything S`` and the given
epochs; the table lists the best and the last validation accuracy of every run, and
is appended to benchmarks/RESULTS.md with the device name (unless --no-write).

Runs are separate ``vision-tl fit`` processes; on a GPU three run at once by default
(``--jobs``), sharing the loader processes between them: one NEU run keeps a large GPU
busy only a fraction of the time, and GPU time is what this check is short of.

    python benchmarks/pipeline_accuracy.py --data ../shared/datasets/neu            # on a GPU: 3 seeds x 25 epochs
    python benchmarks/pipeline_accuracy.py --data DIR --epochs 1 --seeds 0 --no-write \\
        --extra --model.backbone test_efficientnet --model.pretrained false --model.image_size 64   # CPU smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from vision_tl.data.device import default_num_workers

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "RESULTS.md"


def run(data: Path, pipeline: str, seed: int, args, save_dir: Path) -> dict:
    gpu = torch.cuda.is_available()
    argv = ["fit", "--config", str(ROOT / "configs" / "partial.yaml"), "--data.root", str(data.resolve()),
            "--data.pipeline", pipeline, "--data.seed", str(seed), "--seed_everything", str(seed),
            "--trainer.max_epochs", str(args.epochs), "--trainer.enable_progress_bar", "false",
            "--trainer.logger.init_args.save_dir", str(save_dir),
            "--trainer.logger.init_args.name", f"{pipeline}_seed{seed}"]
    if gpu:  # the GPU overlay (bf16, decoded cache), then this run's pipeline again
        argv += ["--config", str(ROOT / "configs" / "gpu.yaml"), "--data.pipeline", pipeline]
    if args.workers is not None:
        argv += ["--data.num_workers", str(args.workers)]
    argv += args.extra
    name = f"{pipeline}_seed{seed}"
    log = save_dir / f"{name}.log"
    start = time.perf_counter()
    with open(log, "w") as out:
        done = subprocess.run([sys.executable, "-m", "vision_tl.cli", *argv], stdout=out, stderr=subprocess.STDOUT,
                              cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        tail = log.read_text()[-3000:]
        raise SystemExit(f"fit failed (exit {done.returncode}): vision-tl {' '.join(argv)}\n{tail}")
    run_dir = save_dir / name / "version_0"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {"pipeline": pipeline, "seed": seed, "best": metrics["val"]["acc"], "best_epoch": metrics["val"]["epoch"],
            "last": metrics["val_last"]["acc"], "seconds": seconds}


def table(rows: list[dict], args, device: str) -> str:
    lines = [f"### Device vs CPU pipeline, `partial`, {args.epochs} epochs ({device})", "",
             f"`python benchmarks/pipeline_accuracy.py --data {args.data} --epochs {args.epochs} "
             f"--seeds {','.join(map(str, args.seeds))}"
             + (f" --extra {' '.join(args.extra)}" if args.extra else "") + "`", "",
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
    parser.add_argument("--jobs", type=int, default=None,
                        help="runs at once (default: 3 on a GPU, 1 on a CPU)")
    parser.add_argument("--no-write", action="store_true", help="do not append to RESULTS.md")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more `vision-tl fit` arguments")
    args = parser.parse_args()
    if not args.data.is_dir():
        raise SystemExit(f"no image folder at {args.data}")
    gpu = torch.cuda.is_available()
    device = torch.cuda.get_device_name() if gpu else "CPU"
    jobs = args.jobs or (3 if gpu else 1)
    if jobs < 1:
        raise SystemExit(f"--jobs must be at least 1, got {jobs}")
    # Concurrent runs share the machine's loader processes instead of each taking them all.
    args.workers = None if jobs == 1 else max(1, default_num_workers(gpu) // jobs)
    grid = [(seed, pipeline) for seed in args.seeds for pipeline in args.pipelines.split(",")]
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="vtl_pipeline_acc_") as tmp, ThreadPoolExecutor(jobs) as pool:
        def one(job: tuple[int, str]) -> dict:
            seed, pipeline = job
            row = run(args.data, pipeline, seed, args, Path(tmp))
            print(f"{pipeline} seed {seed}: best {row['best']:.4f}, last {row['last']:.4f}, "
                  f"{row['seconds']:.0f} s", flush=True)
            return row

        rows = list(pool.map(one, grid))
    print(f"{len(rows)} runs, {jobs} at a time: {time.perf_counter() - start:.0f} s wall")
    text = table(rows, args, device)
    print("\n" + text)
    if not args.no_write:
        with open(RESULTS, "a", encoding="utf-8") as fh:
            fh.write("\n" + text)


if __name__ == "__main__":
    sys.exit(main())
