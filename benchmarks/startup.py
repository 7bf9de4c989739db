"""How long each ``vision-tl`` command takes before it does any work, and the same before a change.

Every command runs in a new process (``python -m vision_tl.cli ...``), as a user starts it: the
top-level ``--help``, each sub-command's ``--help`` (``fit`` stands for ``validate``, ``test`` and
``predict``, which start the same way), ``extract`` on a few images (``--no-cache``; its wall time,
the part before the extraction began, and the time until its first batch's features were back,
from the seconds its output records) and ``predict-onnx`` on the same images
with Lite0 exported untrained (the graph, and so the start-up, of a trained one). Two baselines run
in the same rounds: ``python -c pass`` (the interpreter) and ``python -c "import torch"`` (the
floor of a command that needs torch).

With ``--before DIR`` (a checkout of the kit before a change), every command also runs from that
checkout, the two in alternating order within each round, so a neighbour's load on a shared
machine hits both alike; the ratio is the median of the per-round ratios before/after.

    python benchmarks/startup.py --data ../shared/datasets/neu --before ../vision_tl-before --rounds 5
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]  # the checkout this script belongs to: "after"
HELP_COMMANDS = ("fit", "demo", "extract", "probe", "export", "predict-onnx", "deploy-wheel", "report", "compare",
                 "explain", "cache")


def run_once(argv: list[str], checkout: Path, cwd: Path) -> float:
    """Wall seconds of one new process running ``argv`` with ``checkout``'s vision_tl first on the path
    (run from ``cwd``: ``python -m`` puts the working folder before PYTHONPATH)."""
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, *argv], cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed from {checkout} (exit {done.returncode}):\n{done.stderr[-2000:]}")
    return seconds


def extract_split(wall: float, out: Path) -> dict[str, float]:
    """extract's wall time split by the metadata its output records: the seconds before the
    extraction began (imports, the model, set-up) and until its first batch's features were back."""
    from vision_tl.features.store import read_features

    meta = read_features(out).metadata
    before = wall - float(meta["seconds"])
    return {"before extraction": before, "to first batch": before + float(meta["seconds_to_first_batch"])}


def sample_images(data: Path, per_class: int, folder: Path) -> int:
    """Copy the first ``per_class`` images of each class folder of ``data`` into ``folder``."""
    count = 0
    for cls in sorted(p for p in data.iterdir() if p.is_dir()):
        (folder / cls.name).mkdir(parents=True)
        for image in sorted(cls.iterdir())[:per_class]:
            shutil.copy(image, folder / cls.name / image.name)
            count += 1
    return count


def export_untrained(path: Path, classes: list[str]) -> None:
    """Lite0 (ImageNet weights) with an untrained head, exported as ``vision-tl export`` writes it."""
    from vision_tl.backbones import create_backbone, resolve_preprocessing
    from vision_tl.export.onnx_export import LoadedCheckpoint, build_metadata, write_onnx
    from vision_tl.models import ClassifierNet

    pre = resolve_preprocessing("tf_efficientnet_lite0")
    net = ClassifierNet(create_backbone("tf_efficientnet_lite0", pretrained=True), len(classes)).eval()
    ckpt = LoadedCheckpoint(path=path, net=net, classes=classes, input_size=tuple(pre.input_size),
                            mean=tuple(pre.mean), std=tuple(pre.std), interpolation=pre.interpolation,
                            meta={"backbone": "tf_efficientnet_lite0"})
    write_onnx(ckpt, path, build_metadata(ckpt))


def commands(images: Path, model: Path, work: Path) -> dict[str, tuple[list[str], Path | None]]:
    """Label -> (python arguments, extract's output file or None)."""
    cli = ["-m", "vision_tl.cli"]
    out: dict[str, tuple[list[str], Path | None]] = {
        "python -c pass": (["-c", "pass"], None),
        "python -c 'import torch'": (["-c", "import torch"], None),
        "vision-tl --help": ([*cli, "--help"], None),
    }
    for name in HELP_COMMANDS:
        out[f"vision-tl {name} --help"] = ([*cli, name, "--help"], None)
    features = work / "features.npz"
    out["vision-tl extract (wall)"] = ([*cli, "extract", str(images), "--out", str(features), "--no-cache",
                                        "--overwrite", "--no-progress"], features)
    out["vision-tl predict-onnx (wall)"] = ([*cli, "predict-onnx", str(model), str(images), "--out",
                                             str(work / "predictions.csv"), "--overwrite"], None)
    return out


def commit(checkout: Path) -> str:
    """The checkout's commit, marked ``+changes`` where its tracked files differ from it."""
    head = subprocess.run(["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(checkout), "diff", "--quiet", "HEAD"], capture_output=True).returncode
    return (head.stdout.strip() or "unknown") + ("+changes" if dirty else "")


def median_ratio(before: list[float], after: list[float]) -> float:
    return statistics.median(b / a for b, a in zip(before, after, strict=True))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="an image folder with class sub-folders (NEU)")
    parser.add_argument("--per-class", type=int, default=4, help="images per class for extract and predict-onnx")
    parser.add_argument("--before", type=Path, default=None, help="a checkout of the kit before the change")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--only", default=None, metavar="TEXT", help="only the commands whose label holds TEXT")
    args = parser.parse_args(argv)

    checkouts = {"after": HERE, **({"before": args.before.resolve()} if args.before else {})}
    with tempfile.TemporaryDirectory(prefix="vision_tl_startup_") as tmp:
        work = Path(tmp)
        images = work / "images"
        count = sample_images(args.data, args.per_class, images)
        model = work / "model.onnx"
        export_untrained(model, sorted(p.name for p in images.iterdir()))
        todo = {k: v for k, v in commands(images, model, work).items()
                if not args.only or args.only in k or k.startswith("python")}  # (the baselines always)
        print(f"# {count} images of {args.data}, {args.rounds} rounds, {os.cpu_count()} cores; "
              + ", ".join(f"{k}: {commit(v)}" for k, v in checkouts.items()), flush=True)
        times: dict[tuple[str, str], list[float]] = {}
        for r in range(args.rounds):
            order = list(checkouts) if r % 2 == 0 else list(reversed(checkouts))
            for label, (argv_, features) in todo.items():
                for side in order:
                    wall = run_once(argv_, checkouts[side], work)
                    times.setdefault((label, side), []).append(wall)
                    for part, seconds in (extract_split(wall, features) if features else {}).items():
                        times.setdefault((label.replace("wall", part), side), []).append(seconds)
            print(f"round {r + 1} done", flush=True)
    labels = list(dict.fromkeys(label for label, _ in times))
    head = "| command | after (s) |" + (" before (s) | before / after |" if args.before else "")
    print("\n" + head)
    print("|" + " --- |" * (head.count("|") - 1))
    for label in labels:
        after = times[(label, "after")]
        row = f"| {label} | {statistics.median(after):.2f} |"
        if args.before:
            before = times[(label, "before")]
            row += f" {statistics.median(before):.2f} | {median_ratio(before, after):.2f} |"
        print(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
