"""``vision-tl demo``: generate a synthetic inspection set and train the default recipe on it.

Runs on a 2-core CPU in a few minutes with the bundled ImageNet EfficientNet-Lite0
(no download): procedural metal surfaces (good, scratch, spot, crack), imbalanced
like a real line, trained with the ``partial`` recipe, then validated.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

EXAMPLE = """example:
  vision-tl demo                       # data in data/demo, run in runs/demo/version_N
  vision-tl demo --epochs 3 --size 96  # quicker
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vision-tl demo", description=__doc__.split("\n\n")[0], epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--data", default="data/demo", help="where the synthetic images go (default: %(default)s)")
    parser.add_argument("--runs", default="runs", help="parent of the run directory (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=6, help="training epochs (default: %(default)s)")
    parser.add_argument("--size", type=int, default=128, help="image and input size in px (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="data and training seed (default: %(default)s)")
    parser.add_argument("--mode", default="partial", choices=("frozen", "partial", "full"),
                        help="transfer-learning mode (default: %(default)s)")
    parser.add_argument("--backbone", default="tf_efficientnet_lite0", help="timm backbone (default: %(default)s)")
    return parser


def _prepare_data(root: Path, size: int, seed: int) -> None:
    from vision_tl.data.synthetic import DEMO_COUNTS, make_inspection_dataset

    marker = root / ".vision_tl_demo.json"
    recipe = {"counts": DEMO_COUNTS, "size": size, "seed": seed}
    if marker.exists() and json.loads(marker.read_text()) == recipe:
        print(f"demo data: reusing {root}")
        return
    if root.exists() and any(root.iterdir()) and not marker.exists():
        raise FileExistsError(f"{root} exists and was not made by the demo; pass --data to another folder")
    counts = make_inspection_dataset(root, DEMO_COUNTS, size=size, seed=seed, overwrite=True)
    marker.write_text(json.dumps(recipe))
    print(f"demo data: wrote {sum(counts.values())} images to {root} ({counts})")


def run(args: argparse.Namespace) -> dict:
    """Generate data, train, validate; returns the best validation metrics."""
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger

    from vision_tl.data import ImageFolderDataModule
    from vision_tl.tasks import ImageClassifier
    from vision_tl.tasks.callbacks import RunArtifacts, ThrottledProgressBar
    from vision_tl.tasks.resume import RunCheckpoint

    if args.epochs < 1 or args.size < 32:
        raise ValueError(f"--epochs must be >= 1 and --size >= 32, got {args.epochs} and {args.size}")
    root = Path(args.data)
    root.parent.mkdir(parents=True, exist_ok=True)
    _prepare_data(root, args.size, args.seed)
    L.seed_everything(args.seed, verbose=False)
    data = ImageFolderDataModule(str(root), backbone=args.backbone, image_size=args.size, seed=args.seed,
                                 batch_size=16, augment="inspection", good_class="good")
    model = ImageClassifier(data.classes, backbone=args.backbone, image_size=args.size, mode=args.mode,
                            lr=2e-3, backbone_lr_factor=0.3, good_class="good")
    artifacts = RunArtifacts()
    checkpoint = RunCheckpoint(monitor="val/balanced_acc", mode="max", filename="best",
                                                     save_last=True)
    trainer = L.Trainer(max_epochs=args.epochs, accelerator="auto", devices=1,
                        logger=CSVLogger(args.runs, name="demo"), callbacks=[checkpoint, artifacts, ThrottledProgressBar()],
                        log_every_n_steps=5, deterministic=False)
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    best = artifacts.best_epoch()
    _print_summary(best, data.classes, time.perf_counter() - start, trainer.log_dir)
    return best


def _print_summary(best: dict, classes: list[str], seconds: float, run_dir: str) -> None:
    chance = 1.0 / len(classes)
    print(f"\nvision-tl demo: trained in {seconds:.0f} s; best epoch {best['epoch']} (validation)")
    print(f"  accuracy          {best['acc']:.3f}")
    print(f"  balanced accuracy {best['balanced_acc']:.3f}   (chance: {chance:.3f})")
    print(f"  macro F1          {best['f1_macro']:.3f}")
    print(f"  {'class':<10} {'precision':>9} {'recall':>7}")
    for name in classes:
        print(f"  {name:<10} {best['precision_per_class'][name]:>9.3f} {best['recall_per_class'][name]:>7.3f}")
    print(f"  run directory: {run_dir} (checkpoints, metrics.json, confusion_matrix_val.png)")


def main(argv: list[str] | None = None) -> int:
    from vision_tl.errors import user_errors

    args = _parser().parse_args(argv)
    with user_errors():
        run(args)
    return 0
