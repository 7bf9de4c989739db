"""Which score on a trained model's pooled features separates shifted images from unshifted ones.

The export's ``unfamiliarity`` output is 1 - the best cosine similarity of an image's pooled
features to those of training images. This script asks whether another score on the same
features would catch what that one misses (darker images on NEU), by the AUROC of each score
for shifted validation images against the same images unshifted, and whether a check of the
pixels' mean grey level and spread against the training images' range would.

It reads the run's ``split.json`` (beside ``checkpoints/``): a draw of training images is the
bank, a draw of validation images the unshifted set.

Usage:
    python benchmarks/unfamiliar_scores.py RUN/checkpoints/best.ckpt [--bank 700] [--images 240]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from vision_tl.export.onnx_export import build_metadata, load_checkpoint
from vision_tl.export.parity import torch_features

SHIFTS = {
    "brightness x0.5": lambda x: (x * 0.5).astype(np.uint8),
    "brightness x0.7": lambda x: (x * 0.7).astype(np.uint8),
    "brightness x2": lambda x: np.clip(x * 2.0, 0, 255).astype(np.uint8),
    "contrast x0.5": lambda x: (128 + (x.astype(np.float32) - 128) * 0.5).astype(np.uint8),
    "blur r=4": lambda x: np.asarray(Image.fromarray(x).filter(ImageFilter.GaussianBlur(4))),
}


def auroc(negatives: np.ndarray, positives: np.ndarray) -> float:
    """P(score of a positive > score of a negative), ties counted half (Mann-Whitney U)."""
    diff = positives[:, None] - negatives[None, :]
    return float((diff > 0).mean() + 0.5 * (diff == 0).mean())


def scores(features: np.ndarray, bank: np.ndarray) -> dict[str, np.ndarray]:
    unit_bank = bank / np.linalg.norm(bank, axis=1, keepdims=True)
    norms = np.linalg.norm(features, axis=1)
    median = np.median(np.linalg.norm(bank, axis=1))
    squared = (features ** 2).sum(1)[:, None] - 2 * features @ bank.T + (bank ** 2).sum(1)[None, :]
    return {
        "1 - best cosine similarity (the export's)": 1 - ((features / norms[:, None]) @ unit_bank.T).max(1),
        "Euclidean distance to the nearest bank feature": np.sqrt(np.maximum(squared.min(1), 0)),
        "|log(feature norm / median bank norm)|": np.abs(np.log(norms / median)),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path, help="a run's checkpoints/best.ckpt (its split.json is read)")
    parser.add_argument("--bank", type=int, default=700, help="training images drawn for the bank")
    parser.add_argument("--images", type=int, default=240, help="validation images drawn")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    ckpt = load_checkpoint(args.checkpoint)
    metadata = build_metadata(ckpt)
    split_path = args.checkpoint.resolve().parents[1] / "split.json"
    if not split_path.is_file():
        raise SystemExit(f"{split_path}: not found; give the best.ckpt of a run trained by vision-tl fit")
    split = json.loads(split_path.read_text())
    root = Path(split["root"])
    h, w = metadata.input_size

    def load(entry: dict) -> np.ndarray:
        return np.asarray(Image.open(root / entry["path"]).convert("RGB").resize((w, h), Image.BICUBIC))

    rng = np.random.default_rng(args.seed)
    train = [split["train"][i] for i in rng.choice(len(split["train"]), min(args.bank, len(split["train"])), replace=False)]
    val = [split["val"][i] for i in rng.choice(len(split["val"]), min(args.images, len(split["val"])), replace=False)]
    print(f"# {args.checkpoint}: bank of {len(train)} training images, {len(val)} validation images, "
          f"{metadata.backbone} at {h}x{w}")
    bank = torch_features(ckpt.net, metadata, [load(e) for e in train])
    unshifted = [load(e) for e in val]
    reference = scores(torch_features(ckpt.net, metadata, unshifted), bank)
    results = {name: scores(torch_features(ckpt.net, metadata, [shift(x) for x in unshifted]), bank)
               for name, shift in SHIFTS.items()}
    print("\nAUROC of each score, shifted against unshifted validation images:\n")
    print("| score | " + " | ".join(SHIFTS) + " |")
    print("|---|" + "---|" * len(SHIFTS))
    for score in reference:
        print(f"| {score} | " + " | ".join(f"{auroc(reference[score], results[s][score]):.3f}" for s in SHIFTS) + " |")

    def grey_stats(images: list[np.ndarray]) -> np.ndarray:
        grey = [x.astype(np.float32).mean(-1) for x in images]
        return np.array([(g.mean(), g.std()) for g in grey])

    train_stats = grey_stats([load(e) for e in train])
    (lo_mean, lo_std), (hi_mean, hi_std) = train_stats.min(0), train_stats.max(0)
    print(f"\ntraining images' mean grey level {lo_mean:.1f}-{hi_mean:.1f}, spread (std) {lo_std:.1f}-{hi_std:.1f}; "
          "share of images outside that range:")
    for name, shift in {"unshifted": lambda x: x, **SHIFTS}.items():
        stats = grey_stats([shift(x) for x in unshifted])
        outside = (stats[:, 0] < lo_mean) | (stats[:, 0] > hi_mean) | (stats[:, 1] < lo_std) | (stats[:, 1] > hi_std)
        print(f"  {name}: {100 * outside.mean():.1f} %")


if __name__ == "__main__":
    main()
