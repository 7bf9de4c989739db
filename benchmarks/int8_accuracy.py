"""INT8 calibration choices, measured: accuracy of each static-QDQ variant vs the fp32 ONNX model.

Every variant is calibrated on images from the run's training split and evaluated
on its validation split, both fed exactly as on the line (load_rgb -> resize ->
uint8). The default of ``vision-tl export --int8`` was picked from this table.

Usage:
    python benchmarks/int8_accuracy.py RUN/checkpoints/best.ckpt --fp32 model.onnx \
        [--configs default,minmax,entropy,...] [--out int8_results.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from vision_tl.deploy import Predictor, read_metadata
from vision_tl.export import Int8Config, quantize_int8
from vision_tl.export.parity import decode, split_images

BASE = Int8Config()
CONFIGS: dict[str, Int8Config] = {
    # The reference points: everything quantized, per-channel QDQ, 200 images.
    "minmax": replace(BASE, method="minmax", keep_float="none"),
    "entropy": replace(BASE, method="entropy", keep_float="none"),
    "percentile": replace(BASE, method="percentile", keep_float="none"),
    # Keeping the stem conv (raw image in) and/or the classifier in float.
    "percentile+stem": replace(BASE, keep_float="stem"),
    "percentile+head": replace(BASE, keep_float="head"),
    "percentile+stem+head": replace(BASE, keep_float="stem+head"),
    "minmax+stem+head": replace(BASE, method="minmax", keep_float="stem+head"),
    "entropy+stem+head": replace(BASE, method="entropy", keep_float="stem+head"),
    "p99.99+stem+head": replace(BASE, percentile=99.99, keep_float="stem+head"),
    "stem+head@100": replace(BASE, keep_float="stem+head", calibration_images=100),
    "stem+head@400": replace(BASE, keep_float="stem+head", calibration_images=400),
    "default": BASE,  # percentile 99.999, head in float, 200 images
    "default@400": replace(BASE, calibration_images=400),
    "per-tensor": replace(BASE, per_channel=False),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="the run's best.ckpt (for split.json)")
    parser.add_argument("--fp32", required=True, help="the fp32 ONNX export of that checkpoint")
    parser.add_argument("--configs", default=",".join(CONFIGS),
                        help=f"comma-separated subset of: {', '.join(CONFIGS)}")
    parser.add_argument("--out", default=None, help="also write the rows as JSON")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        parser.error(f"unknown config(s) {unknown}; expected: {', '.join(CONFIGS)}")

    meta = read_metadata(args.fp32)
    val = split_images(args.checkpoint, "val", meta.classes)
    train = split_images(args.checkpoint, "train", meta.classes)
    if val is None or train is None:
        parser.error(f"{args.checkpoint}: the run has no split.json with train and val lists")
    decoded = decode(val, meta)
    labels = np.asarray(decoded.labels)
    fp32 = Predictor(args.fp32).predict_arrays(decoded.pixels).argmax(axis=1)
    acc32 = float(np.mean(fp32 == labels))
    print(f"fp32 ONNX: {100 * acc32:.2f}% on {len(labels)} val images ({val.source})")
    print("| config | method | keep float | per-channel | calib images | accuracy | Δ points "
          "| agreement with fp32 | quantize s |")
    print("|---|---|---|---|---|---|---|---|---|")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            cfg = CONFIGS[name]
            start = time.perf_counter()
            path = Path(tmp) / f"{name}.onnx"
            quantize_int8(args.fp32, path, train.subsample(cfg.calibration_images).paths, meta, cfg)
            seconds = time.perf_counter() - start
            pred = Predictor(path).predict_arrays(decoded.pixels).argmax(axis=1)
            acc = float(np.mean(pred == labels))
            row = {"config": name, **cfg.to_dict(), "accuracy": acc,
                   "delta_points": 100 * (acc - acc32), "agreement": float(np.mean(pred == fp32)),
                   "quantize_s": round(seconds, 1)}
            rows.append(row)
            print(f"| {name} | {cfg.method}{'' if cfg.method != 'percentile' else f' {cfg.percentile}'}"
                  f" | {cfg.keep_float} | {cfg.per_channel} | {cfg.calibration_images} "
                  f"| {100 * acc:.2f}% | {row['delta_points']:+.2f} | {100 * row['agreement']:.2f}% "
                  f"| {seconds:.0f} |", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"fp32_accuracy": acc32, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
