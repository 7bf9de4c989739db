"""Does ``vision-tl explain`` point at the defect? The pointing game on the synthetic set.

Trains the demo's recipe (``vision-tl fit``, as ``vision-tl demo`` does) in ``frozen`` and
``partial`` mode on a synthetic set in a temporary folder, then draws Grad-CAM with
``explain_images`` for held-out defect images of another seed, whose defect masks the
generator returns (``render_sample_with_mask``). A heat map scores a hit when its maximum lies
within ``--tolerance`` pixels of the defect; "mass" is the share of the heat on the defect
itself (a uniform map scores the defects' area share). Baselines: a centred Gaussian and
uniform noise. Rows:

* ``kit``: the kit's target layer (the deepest stage with at least 8 cells on its short side);
* ``last stage``: the deepest stage whatever its grid (the choice before this benchmark);
* ``--class <true>``: the kit's layer, explaining the image's true class instead of the predicted;
* ``--class good``: explaining the defect-free class (expected to point at the defect less);
* ``non-square``: each image cropped to its half holding most of the defect (H x H/2),
  stretched to the input size by the model and the heat map laid back on the crop.

Deterministic (seeded data and training); about a minute on 2 CPU cores. Writes only into a
temporary folder unless ``--write`` appends a section to benchmarks/RESULTS.md.

    python benchmarks/explain_pointing.py
    python benchmarks/explain_pointing.py --size 224 --write
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

RESULTS = Path(__file__).parent / "RESULTS.md"


def train(data: Path, runs: Path, mode: str, size: int, epochs: int, seed: int) -> Path:
    """The demo's ``vision-tl fit`` call; returns the best checkpoint."""
    from vision_tl.tasks.lightning_cli import run_lightning_cli

    logger = {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(runs), "name": mode}}
    argv = ["fit", "--seed_everything", str(seed), "--trainer.max_epochs", str(epochs),
            "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--trainer.logger", json.dumps(logger), "--model.image_size", str(size), "--model.mode", mode,
            "--model.lr", "2e-3", "--model.backbone_lr_factor", "0.3", "--model.feature_cache", "null",
            "--data.root", str(data), "--data.seed", str(seed), "--data.batch_size", "16",
            "--data.augment", "inspection", "--data.good_class", "good"]
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        if run_lightning_cli(argv) != 0:
            raise RuntimeError(f"vision-tl fit ({mode}) did not finish")
    (best,) = (runs / mode).glob("version_*/checkpoints/best.ckpt")
    return best


def held_out(folder: Path, per_class: int, size: int, seed: int) -> tuple[list[Path], list[np.ndarray], list[str]]:
    """Defect images of another seed than training's, written as PNGs, with their masks."""
    from vision_tl.data.synthetic import CLASSES, _image_rng, render_sample_with_mask

    paths, masks, kinds = [], [], []
    for class_index, kind in enumerate(CLASSES):
        if kind == "good":
            continue
        for index in range(per_class):
            image, mask = render_sample_with_mask(kind, _image_rng(seed, class_index, index), size)
            paths.append(folder / f"{kind}_{index:03d}.png")
            Image.fromarray(image).save(paths[-1])
            masks.append(mask)
            kinds.append(kind)
    return paths, masks, kinds


def half_crops(paths: list[Path], masks: list[np.ndarray], folder: Path) -> tuple[list[Path], list[np.ndarray]]:
    """Each image's left or right half, whichever holds more of its defect (H x H/2)."""
    folder.mkdir()
    out_paths, out_masks = [], []
    for path, mask in zip(paths, masks):
        half = mask.shape[1] // 2
        side = slice(0, half) if mask[:, :half].sum() >= mask[:, half:].sum() else slice(half, 2 * half)
        out_paths.append(folder / path.name)
        Image.fromarray(np.asarray(Image.open(path))[:, side]).save(out_paths[-1])
        out_masks.append(mask[:, side])
    return out_paths, out_masks


def score(heats: list[np.ndarray], masks: list[np.ndarray], tolerance: int) -> tuple[float, float]:
    """(pointing-game accuracy, mean share of the heat on the defect)."""
    from vision_tl.reports.pointing import mass_inside, pointing_hit

    hits = [pointing_hit(h, m, tolerance) for h, m in zip(heats, masks)]
    return float(np.mean(hits)), float(np.mean([mass_inside(h, m) for h, m in zip(heats, masks)]))


def gradcam(model, paths: list[Path], class_name: str | None = None) -> list[np.ndarray]:
    from vision_tl.reports.explain import explain_images

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [item.cam_on_image() for item in explain_images(model, paths, class_name)]


def measure(ckpt: Path, paths, masks, kinds, crops, tolerance: int) -> list[tuple[str, float, float]]:
    """The rows for one trained model."""
    import vision_tl.reports.explain as explain
    from vision_tl.tasks.checkpoint import load_classifier

    model, _ = load_classifier(ckpt)
    rows = [("kit", *score(gradcam(model, paths), masks, tolerance))]
    kept = explain.MIN_CELLS
    explain.MIN_CELLS = 0  # every stage qualifies: the deepest, as before
    try:
        rows.append(("last stage", *score(gradcam(model, paths), masks, tolerance)))
    finally:
        explain.MIN_CELLS = kept
    true_heats = [None] * len(paths)
    for kind in sorted(set(kinds)):
        chosen = [i for i, k in enumerate(kinds) if k == kind]
        for i, heat in zip(chosen, gradcam(model, [paths[i] for i in chosen], kind)):
            true_heats[i] = heat
    rows.append(("--class <true>", *score(true_heats, masks, tolerance)))
    rows.append(("--class good", *score(gradcam(model, paths, "good"), masks, tolerance)))
    rows.append(("non-square", *score(gradcam(model, crops[0]), crops[1], tolerance)))
    return rows


def main(argv: list[str] | None = None) -> int:
    from vision_tl.data.synthetic import DEMO_COUNTS, make_inspection_dataset
    from vision_tl.reports.pointing import centre_map, random_map

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=128, help="image and input size in px (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=4, help="training epochs per mode (default: %(default)s)")
    parser.add_argument("--per-class", type=int, default=20, help="held-out images per defect class (default: %(default)s)")
    parser.add_argument("--tolerance", type=int, default=8,
                        help="pixels a hit may lie off the defect (default: %(default)s, 15 px at 224 as in the "
                             "pointing game, scaled to 128)")
    parser.add_argument("--seed", type=int, default=0, help="training seed; held-out images use seed + 1")
    parser.add_argument("--write", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    table = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_inspection_dataset(tmp / "data", DEMO_COUNTS, size=args.size, seed=args.seed)
        (tmp / "held_out").mkdir()
        paths, masks, kinds = held_out(tmp / "held_out", args.per_class, args.size, args.seed + 1)
        crops = half_crops(paths, masks, tmp / "crops")
        rng = np.random.default_rng(args.seed)
        table.append(("centre Gaussian", "-", *score([centre_map(m.shape) for m in masks], masks, args.tolerance)))
        table.append(("random", "-", *score([random_map(m.shape, rng) for m in masks], masks, args.tolerance)))
        for mode in ("frozen", "partial"):
            ckpt = train(tmp / "data", tmp / "runs", mode, args.size, args.epochs, args.seed)
            table += [(name, mode, hit, mass) for name, hit, mass in
                      measure(ckpt, paths, masks, kinds, crops, args.tolerance)]
    area = float(np.mean([m.mean() for m in masks]))
    lines = [f"Grad-CAM pointing game, synthetic set at {args.size} px: {len(masks)} held-out defect images, "
             f"hit = heat-map maximum within {args.tolerance} px of the defect; defects cover {area:.3f} of the "
             f"image on average (a uniform map's mass); {args.epochs} epochs per mode, "
             f"{time.perf_counter() - start:.0f} s.", "",
             "| heat map | mode | pointing game | mass on defect |", "|---|---|---|---|"]
    lines += [f"| {name} | {mode} | {hit:.3f} | {mass:.3f} |" for name, mode, hit, mass in table]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.write:
        command = "python benchmarks/explain_pointing.py " + " ".join(argv if argv is not None else sys.argv[1:])
        with open(RESULTS, "a", encoding="utf-8") as out:
            out.write(f"\n### Grad-CAM pointing game\n\n`{command.strip()}`\n\n{text}")
        print(f"appended to {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
