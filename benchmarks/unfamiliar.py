"""How well an exported model's ``unfamiliarity`` score flags images unlike its training images.

Trains a frozen Lite0 on 5 of NEU's 6 classes (a symlink folder in a work directory, 200 images
a class; the fit's own 20 % validation split sets the threshold), exports it with
``vision-tl export`` (which embeds the training images and sets the threshold), and scores
with onnxruntime, through the deploy ``Predictor``:

- the 100 held-out images a class of the 5 known classes (in neither the bank nor the validation
  split): the share flagged is the false-flag rate, to compare with ``1 / (n_val + 1)``;
- the 6th class, never seen (``--unseen``);
- the held-out known-class images under shifts a line sees: strong blur, brightness halved and
  doubled, a 45 degree rotation, the top-left quarter blacked out;
- the kit's synthetic demo images (``vision_tl.data.synthetic``) as "another product".

For each set: the share flagged (score > the model's threshold) and the AUROC of the score
against the held-out known-class images, for the fp32 model and its INT8 copy (``--int8``; the
copy has its own threshold, from its own scores on the same validation images). Nothing is tuned
here: the thresholds are the ones the export wrote.

Usage:
    python benchmarks/unfamiliar.py --data ../shared/datasets/neu [--work DIR] [--size 128]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from vision_tl.deploy import Predictor
from vision_tl.imaging import load_rgb

REPO = Path(__file__).resolve().parents[1]


def split_classes(data: Path, unseen: str, per_class: int, work: Path) -> tuple[dict[str, list[Path]], list[Path]]:
    """``work/train/<class>/`` symlinks to ``per_class`` images of each known class (the fit
    splits these into train and validation); returns the held-out images per known class and
    the unseen class's images."""
    classes = sorted(p.name for p in data.iterdir() if p.is_dir())
    if unseen not in classes:
        raise SystemExit(f"--unseen {unseen!r} is not a class folder of {data}; expected one of: {', '.join(classes)}")
    held_out: dict[str, list[Path]] = {}
    rng = np.random.default_rng(0)
    for name in classes:
        if name == unseen:
            continue
        files = sorted((data / name).iterdir())
        order = rng.permutation(len(files))
        train, rest = [files[i] for i in order[:per_class]], [files[i] for i in order[per_class:]]
        folder = work / "train" / name
        folder.mkdir(parents=True, exist_ok=True)
        for path in train:
            link = folder / path.name
            if not link.is_symlink():
                link.symlink_to(path.resolve())
        held_out[name] = rest
    return held_out, sorted((data / unseen).iterdir())


def run(args: list[str], env: dict[str, str], ok: tuple[int, ...] = (0,)) -> None:
    print("$ vision-tl " + " ".join(args), flush=True)
    rc = subprocess.run([sys.executable, "-m", "vision_tl.cli", *args], check=False, env=env, cwd=REPO).returncode
    if rc not in ok:
        raise SystemExit(f"vision-tl {args[0]} failed (exit status {rc})")


def train_and_export(work: Path, size: int, threads: int) -> Path:
    model = work / "model.onnx"
    if model.is_file():
        print(f"reusing {model}")
        return model
    env = {**os.environ, "VISION_TL_CACHE": str(work / "cache"), "PYTHONPATH": str(REPO)}
    run(["fit", "--config", "configs/frozen.yaml", "--data.root", str(work / "train"),
         "--model.image_size", str(size), "--trainer.enable_progress_bar", "false",
         "--trainer.logger.init_args.save_dir", str(work / "runs")], env)
    (ckpt,) = sorted((work / "runs").glob("frozen/version_*/checkpoints/best.ckpt"))[-1:]
    run(["export", str(ckpt), "--out", str(model), "--int8", "--threads", str(threads), "--overwrite"], env, ok=(0, 3))  # 3: the INT8 copy was refused (said above)
    return model


def rotate45(image: Image.Image) -> Image.Image:
    """Rotated 45 degrees; the central square inside the rotated frame, so no black corners."""
    turned = image.rotate(45, resample=Image.BICUBIC)
    side = int(min(image.size) / np.sqrt(2))
    left, top = (image.width - side) // 2, (image.height - side) // 2
    return turned.crop((left, top, left + side, top + side))


def black_quarter(image: Image.Image) -> Image.Image:
    arr = np.array(image)
    arr[: arr.shape[0] // 2, : arr.shape[1] // 2] = 0
    return Image.fromarray(arr)


def brightness(factor: float) -> Callable[[Image.Image], Image.Image]:
    def shift(image: Image.Image) -> Image.Image:
        return Image.fromarray(np.clip(np.asarray(image, np.float32) * factor, 0, 255).round().astype(np.uint8))
    return shift


SHIFTS: dict[str, Callable[[Image.Image], Image.Image]] = {
    "strong blur (Gaussian, radius 4 px of 200)": lambda im: im.filter(ImageFilter.GaussianBlur(4)),
    "brightness halved": brightness(0.5),
    "brightness doubled": brightness(2.0),
    "rotated 45 degrees (central square)": rotate45,
    "top-left quarter black": black_quarter,
}


def scores(predictor: Predictor, images: list[np.ndarray]) -> np.ndarray:
    """The model's unfamiliarity of decoded images (resized by the predictor, as on the line)."""
    return predictor.unfamiliarity_arrays(images)


def auroc(negatives: np.ndarray, positives: np.ndarray) -> float:
    """P(score of a positive > score of a negative), ties counted half (Mann-Whitney)."""
    neg, pos = np.sort(negatives), np.asarray(positives)
    below = np.searchsorted(neg, pos, side="left")
    at_or_below = np.searchsorted(neg, pos, side="right")
    return float(np.mean((below + at_or_below) / 2.0) / len(neg))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="the NEU folder (one sub-folder per class)")
    parser.add_argument("--unseen", default="scratches", help="the class left out of training (default: scratches)")
    parser.add_argument("--per-class", type=int, default=200, help="images per known class given to fit")
    parser.add_argument("--size", type=int, default=128, help="model input size (default: 128)")
    parser.add_argument("--synthetic", type=int, default=50, help="synthetic demo images per class")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", type=Path, default=None,
                        help="work folder (reused when it holds model.onnx; default: a temporary one)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="unfamiliar-") as tmp:
        work = (args.work or Path(tmp)).resolve()
        work.mkdir(parents=True, exist_ok=True)
        held_out, unseen = split_classes(args.data.resolve(), args.unseen, args.per_class, work)
        model = train_and_export(work, args.size, args.threads)
        models = {"fp32": Predictor(model, threads=args.threads)}
        if model.with_name("model.int8.onnx").is_file():
            models["INT8"] = Predictor(model.with_name("model.int8.onnx"), threads=args.threads)
        known = [load_rgb(p) for paths in held_out.values() for p in paths]
        sets = [("held-out images of the 5 known classes (false flags)", known),
                (f"unseen 6th class ({args.unseen})", [load_rgb(p) for p in unseen])]
        for name, shift in SHIFTS.items():
            sets.append((f"known classes, {name}", [np.asarray(shift(Image.fromarray(image))) for image in known]))
        from vision_tl.data.synthetic import make_inspection_dataset

        synthetic = work / "synthetic"
        make_inspection_dataset(synthetic, args.synthetic, size=200, seed=3, overwrite=True)
        sets.append(("another product (the kit's synthetic demo images)",
                     [load_rgb(p) for p in sorted(synthetic.rglob("*.png"))]))
        print()
        for kind, predictor in models.items():
            meta = predictor.metadata
            n_val = meta.unfamiliar_val_images
            print(f"{kind}: {args.size} px, bank {meta.unfamiliar_bank_images} training images, threshold "
                  f"{meta.unfamiliar_threshold:.4f} (the highest of its scores on {n_val} validation images; "
                  f"bound on false flags 1/(n_val+1) = {100 / (n_val + 1):.2f} %)")
        print(f"({time.perf_counter() - start:.0f} s)\n")
        print("| images | n | " + " | ".join(f"flagged, {kind} | AUROC, {kind}" for kind in models) + " |")
        print("|---|---|" + "---|---|" * len(models))
        base = {kind: scores(predictor, known) for kind, predictor in models.items()}
        for name, images in sets:
            cells = []
            for kind, predictor in models.items():
                values = base[kind] if images is known else scores(predictor, images)
                flagged = np.mean(values > predictor.metadata.unfamiliar_threshold)
                area = "-" if images is known else f"{auroc(base[kind], values):.3f}"
                cells += [f"{100 * flagged:.1f} % ({int(np.sum(values > predictor.metadata.unfamiliar_threshold))})",
                          area]
            print(f"| {name} | {len(images)} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
