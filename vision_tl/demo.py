"""``vision-tl demo``: generate a synthetic inspection set and train the default recipe on it.

Runs on a 2-core CPU in a few minutes with the bundled ImageNet EfficientNet-Lite0
(no download): procedural metal surfaces (good, scratch, spot, crack), imbalanced
like a real line, trained with the ``partial`` recipe, then validated.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

from vision_tl.utils.files import path_arg

EXAMPLE = """example:
  vision-tl demo                       # data in data/demo, run in runs/demo/version_N
  vision-tl demo --epochs 3 --size 96  # quicker; its images go to data/demo-96px-seed0
"""

DEFAULT_SIZE, DEFAULT_SEED = 128, 0


def default_data(size: int, seed: int) -> Path:
    """Where the demo's images go without --data: data/demo, or a folder of their own for
    another size or seed (the images of data/demo are what earlier demo runs trained on)."""
    if (size, seed) == (DEFAULT_SIZE, DEFAULT_SEED):
        return Path("data/demo")
    return Path(f"data/demo-{size}px-seed{seed}")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vision-tl demo", description=__doc__.split("\n\n")[0], epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--data", type=path_arg, help="where the synthetic images go (default: data/demo; data/demo-SIZEpx-seedSEED "
                                       "for another --size or --seed)")
    parser.add_argument("--runs", type=path_arg, default="runs", help="parent of the run directory (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=6, help="training epochs (default: %(default)s)")
    parser.add_argument("--size", type=int, default=DEFAULT_SIZE, help="image and input size in px (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="data and training seed (default: %(default)s)")
    parser.add_argument("--mode", default="partial", choices=("frozen", "partial", "full"),
                        help="transfer-learning mode (default: %(default)s)")
    parser.add_argument("--backbone", default="tf_efficientnet_lite0", help="timm backbone (default: %(default)s)")
    return parser


def _prepare_data(root: Path, size: int, seed: int) -> None:
    from vision_tl.data.synthetic import DEMO_COUNTS, make_inspection_dataset
    from vision_tl.utils.files import atomic_write_text

    if root.exists() and not root.is_dir():
        raise NotADirectoryError(f"--data {root} is a file; give a folder for the demo images (default: data/demo)")
    marker = root / ".vision_tl_demo.json"
    recipe = {"counts": DEMO_COUNTS, "size": size, "seed": seed}
    if marker.exists():
        try:
            made = json.loads(marker.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise ValueError(f"{marker} (the demo's record of how it made {root}) is damaged ({exc}); delete it, "
                             "or pass --data to another folder") from exc
        if made == recipe:
            print(f"demo data: reusing {root}")
            return
        if isinstance(made, dict) and made.get("writing"):  # stopped part-way: nothing trained on it yet
            print(f"demo data: an earlier demo stopped while writing {root}; writing it again")
            made = None
        # other images under the same names: earlier demo runs, trained and validated on these files,
        # could no longer be tested, reported or resumed (their split's sha256 would not match)
        if made is not None:
            raise FileExistsError(
                f"{root} holds the demo images made at size {made.get('size')} with seed {made.get('seed')}, which "
                f"earlier demo runs trained on; for size {size} and seed {seed} pass another folder, e.g. "
                f"--data {root.parent / f'{root.name}-{size}px-seed{seed}'}")
    elif root.exists() and any(root.iterdir()):
        raise FileExistsError(f"{root} exists and was not made by the demo; pass --data to another folder")
    # said before the first image, so a demo stopped part-way (Ctrl-C) is finished by the next one
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(marker, json.dumps({**recipe, "writing": True}))
    counts = make_inspection_dataset(root, DEMO_COUNTS, size=size, seed=seed, overwrite=True)
    atomic_write_text(marker, json.dumps(recipe))
    print(f"demo data: wrote {sum(counts.values())} images to {root} ({counts})")


def run(args: argparse.Namespace) -> dict:
    """Generate data, train with ``vision-tl fit``, validate; returns the best validation metrics.

    Training goes through the same command users run, so the demo's run directory holds what
    every run does (``config.yaml`` included): the README's next steps (``test``, ``predict``,
    ``report``, ``export``, a resume) work on it as written.
    """
    from vision_tl.tasks.lightning_cli import run_lightning_cli

    if args.epochs < 1 or args.size < 32:
        raise ValueError(f"--epochs must be >= 1 and --size >= 32, got {args.epochs} and {args.size}")
    root = Path(args.data) if args.data else default_data(args.size, args.seed)
    root.parent.mkdir(parents=True, exist_ok=True)
    _prepare_data(root, args.size, args.seed)
    parent = Path(args.runs).expanduser().resolve() / "demo"
    before = set(parent.glob("version_*"))
    logger = {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(parent.parent),
                                                                               "name": "demo"}}
    argv = ["fit", "--seed_everything", str(args.seed), "--trainer.max_epochs", str(args.epochs),
            "--trainer.accelerator", "auto", "--trainer.devices", "1", "--trainer.log_every_n_steps", "5",
            "--trainer.logger", json.dumps(logger),
            "--model.backbone", args.backbone, "--model.image_size", str(args.size), "--model.mode", args.mode,
            "--model.lr", "2e-3", "--model.backbone_lr_factor", "0.3",
            "--data.root", str(root), "--data.seed", str(args.seed), "--data.batch_size", "16",
            "--data.augment", "inspection", "--data.good_class", "good"]
    start = time.perf_counter()
    with warnings.catch_warnings():  # the demo calls the CLI from Python on purpose
        warnings.filterwarnings("ignore", message=r"LightningCLI's args parameter is intended to run from within Python")
        code = run_lightning_cli(argv)
    if code != 0:
        raise RuntimeError("vision-tl fit did not finish; see the messages above")
    (run_dir,) = set(parent.glob("version_*")) - before
    metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    _print_summary(metrics["val"], metrics["classes"], time.perf_counter() - start, str(run_dir))
    return metrics["val"]


def _print_summary(best: dict, classes: list[str], seconds: float, run_dir: str) -> None:
    chance = 1.0 / len(classes)
    print(f"\nvision-tl demo: trained in {seconds:.0f} s; best epoch {best['epoch']} (validation)")
    print(f"  accuracy          {best['acc']:.3f}")
    print(f"  balanced accuracy {best['balanced_acc']:.3f}   (chance: {chance:.3f})")
    print(f"  macro F1          {best['f1_macro']:.3f}")
    print(f"  {'class':<10} {'precision':>9} {'recall':>7}")
    for name in classes:
        precision, recall = (best[f"{k}_per_class"][name] for k in ("precision", "recall"))
        print(f"  {name:<10} {_num(precision):>9} {_num(recall):>7}")
    print(f"  run directory: {run_dir} (config.yaml, checkpoints, metrics.json, confusion_matrix_val.png)")
    print(f"  next: vision-tl report {run_dir}   |   vision-tl export {run_dir}/checkpoints/best.ckpt --out model.onnx")


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"  # None: never predicted / no images of the class


def main(argv: list[str] | None = None) -> int:
    from vision_tl.errors import user_errors

    args = _parser().parse_args(argv)
    with user_errors():
        run(args)
    return 0
