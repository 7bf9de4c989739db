"""Round trip on a trained run: PyTorch accuracy vs `vision-tl predict-onnx` accuracy on its val split.

PyTorch predicts with the checkpoint and training's eval transform; the ONNX side
is the real command line (``vision-tl predict-onnx MODEL IMAGES... --out CSV``).

Usage:
    python benchmarks/export_roundtrip.py RUN/checkpoints/best.ckpt --onnx model.onnx
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
from pathlib import Path

import numpy as np

from vision_tl.cli import main as vision_tl
from vision_tl.deploy import read_metadata
from vision_tl.export import load_checkpoint
from vision_tl.export.parity import decode, split_images, torch_probabilities


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--onnx", required=True, action="append",
                        help="exported model(s); repeat for INT8/FP16 variants")
    args = parser.parse_args(argv)
    ckpt = load_checkpoint(args.checkpoint)
    meta = read_metadata(args.onnx[0])
    val = split_images(args.checkpoint, "val", ckpt.classes)
    if val is None:
        parser.error(f"{args.checkpoint}: no split.json with a val list beside the run")
    decoded = decode(val, meta)
    labels = np.asarray(decoded.labels)
    torch_pred = torch_probabilities(ckpt.net, meta, decoded.pixels).argmax(axis=1)
    print(f"PyTorch checkpoint: {100 * np.mean(torch_pred == labels):.2f}% on {len(labels)} images")
    for model in args.onnx:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "p.csv"
            rc = vision_tl(["predict-onnx", model, *map(str, decoded.paths), "--out", str(out)])
            if rc != 0:
                return rc
            rows = {r["path"]: r["predicted"] for r in csv.DictReader(out.open())}
        pred = np.asarray([ckpt.classes.index(rows[str(p)]) for p in decoded.paths])
        print(f"predict-onnx {model}: {100 * np.mean(pred == labels):.2f}%, "
              f"agreement with PyTorch {100 * np.mean(pred == torch_pred):.2f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
