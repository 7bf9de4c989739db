"""Heavy imbalance, as on a line: does drawing every class equally often (the balanced
sampler, what ``--data.sampler auto`` picks from a 4x imbalance on) find more of the rare
defects than shuffling with square-root loss weights (the previous default)?

A subset of NEU is linked into a temporary folder (nothing is copied): ``train/`` holds 200
images of one class, standing for the good parts, and 3, 5, 10 and 20 of four defect classes;
``val/`` holds 60 other images of each, so every recall is measured on the same 60 images.
Each run is the user's command, ``vision-tl fit --config configs/MODE.yaml`` with
``--data.sampler none`` or ``balanced``; the table gives each class's recall at the last
epoch (and balanced accuracy at the last and at the best epoch), and is appended to
benchmarks/RESULTS.md (unless --no-write).

    python benchmarks/imbalance.py --data ../shared/datasets/neu                 # about 20 min on 2 cores
    python benchmarks/imbalance.py --data ../shared/datasets/neu --modes frozen --seeds 0 --no-write
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
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "RESULTS.md"
GOOD = "rolled-in_scale"
RARE = {"crazing": 3, "inclusion": 5, "pitted_surface": 10, "scratches": 20}
EPOCHS = {"frozen": 15, "partial": 8, "full": 8}


def make_subset(neu: Path, out: Path, good: int, val: int, seed: int) -> dict[str, tuple[int, int]]:
    """Link train/ and val/ class folders under ``out``; {class: (train, val)} image counts."""
    rng = np.random.default_rng(seed)
    counts = {}
    for name, n_train in {GOOD: good, **RARE}.items():
        folder = neu / name
        files = sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []
        if len(files) < n_train + val:
            raise SystemExit(f"{folder}: {len(files)} images, {n_train + val} needed (is --data the NEU folder?)")
        files = [files[i] for i in rng.permutation(len(files))]
        for split, chosen in (("val", files[:val]), ("train", files[val:val + n_train])):
            (out / split / name).mkdir(parents=True)
            for path in chosen:
                (out / split / name / path.name).symlink_to(path.resolve())
        counts[name] = (n_train, val)
    return counts


def run(data: Path, mode: str, sampler: str, seed: int, args, save_dir: Path) -> dict:
    name = f"{mode}_{sampler}_seed{seed}"
    argv = ["fit", "--config", str(ROOT / "configs" / f"{mode}.yaml"), "--data.root", str(data),
            "--data.good_class", GOOD, "--data.sampler", sampler, "--seed_everything", str(seed),
            "--data.seed", str(seed), "--model.image_size", str(args.size),
            "--trainer.max_epochs", str(args.epochs or EPOCHS[mode]), "--trainer.enable_progress_bar", "false",
            "--trainer.logger.init_args.save_dir", str(save_dir), "--trainer.logger.init_args.name", name,
            *args.extra]
    save_dir.mkdir(parents=True, exist_ok=True)
    log = save_dir / f"{name}.log"
    start = time.perf_counter()
    with open(log, "w") as out:
        done = subprocess.run([sys.executable, "-m", "vision_tl.cli", *argv], stdout=out, stderr=subprocess.STDOUT,
                              cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if done.returncode != 0:
        raise SystemExit(f"fit failed (exit {done.returncode}): vision-tl {' '.join(argv)}\n{log.read_text()[-3000:]}")
    metrics = json.loads((save_dir / name / "version_0" / "metrics.json").read_text())
    last = metrics["val_last"]
    row = {"mode": mode, "sampler": sampler, "seed": seed, "recall": last["recall_per_class"],
           "last": last["balanced_acc"], "best": metrics["val"]["balanced_acc"], "best_epoch": metrics["val"]["epoch"],
           "seconds": time.perf_counter() - start}
    print(f"{name}: last-epoch recall {json.dumps({k: round(v, 2) for k, v in row['recall'].items()})}, "
          f"balanced accuracy last {row['last']:.3f}, best {row['best']:.3f}", flush=True)
    return row


def table(rows: list[dict], counts: dict[str, tuple[int, int]], args) -> str:
    classes = [GOOD, *RARE]
    lines = [f"### Imbalanced NEU subset: balanced sampler vs shuffled with sqrt loss weights ({args.size} px, CPU)", "",
             f"`python benchmarks/imbalance.py --data {args.data} --modes {','.join(args.modes)} "
             f"--seeds {','.join(map(str, args.seeds))}" + (f" --size {args.size}" if args.size != 128 else "")
             + (f" --epochs {args.epochs}" if args.epochs else "") + "`", "",
             "train/val images: " + ", ".join(f"{c} {t}/{v}" for c, (t, v) in counts.items())
             + f" ({GOOD} stands for the good parts). Recall at the last epoch on the 60 val images of each class.", "",
             "| mode | sampler | seed | " + " | ".join(f"{c} ({counts[c][0]})" for c in classes)
             + " | balanced acc, last | balanced acc, best (epoch) | wall s |",
             "|---" * (len(classes) + 6) + "|"]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['sampler']} | {r['seed']} | "
                     + " | ".join(f"{r['recall'][c]:.2f}" for c in classes)
                     + f" | {r['last']:.3f} | {r['best']:.3f} ({r['best_epoch']}) | {r['seconds']:.0f} |")
    lines.append("")
    for mode in args.modes:
        medians = {s: statistics.median(r["last"] for r in rows if r["mode"] == mode and r["sampler"] == s)
                   for s in ("none", "balanced")}
        rarest = {s: statistics.median(r["recall"]["crazing"] for r in rows if r["mode"] == mode and r["sampler"] == s)
                  for s in ("none", "balanced")}
        lines.append(f"- {mode}: balanced accuracy at the last epoch {medians['none']:.3f} shuffled -> "
                     f"{medians['balanced']:.3f} balanced; recall of the rarest class (3 training images) "
                     f"{rarest['none']:.2f} -> {rarest['balanced']:.2f} (medians over seeds).")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--data", type=Path, required=True, help="the NEU folder (one sub-folder per class)")
    parser.add_argument("--modes", type=lambda s: s.split(","), default=["frozen", "partial"],
                        help="frozen, partial, full (default: frozen,partial)")
    parser.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1],
                        help="seeds of the subset draw and of training (default: 0,1)")
    parser.add_argument("--size", type=int, default=128, help="input size in px (default: 128)")
    parser.add_argument("--epochs", type=int, help="epochs (default: frozen 15, partial and full 8)")
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more `vision-tl fit` options")
    args = parser.parse_args()
    if unknown := [m for m in args.modes if m not in EPOCHS]:
        parser.error(f"--modes: unknown {unknown}; choose from {', '.join(EPOCHS)}")
    rows, counts = [], {}
    with tempfile.TemporaryDirectory(prefix="vtl-imbalance-") as tmp:
        for seed in args.seeds:
            data = Path(tmp) / f"subset{seed}"
            counts = make_subset(args.data.resolve(), data, 200, 60, seed)
            for mode in args.modes:
                for sampler in ("none", "balanced"):
                    rows.append(run(data, mode, sampler, seed, args, Path(tmp) / "runs"))
    text = table(rows, counts, args)
    print(text)
    if not args.no_write:
        with open(RESULTS, "a", encoding="utf-8") as out:
            out.write("\n" + text)
        print(f"appended to {RESULTS}")


if __name__ == "__main__":
    main()
