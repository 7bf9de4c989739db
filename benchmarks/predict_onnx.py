"""``Predictor.predict_paths`` (``vision-tl predict-onnx``) end to end: decoding on threads vs not.

Times the whole call (decode, resize, onnxruntime, rows) over the same images with
``decode_threads=0`` (decode on the calling thread between batches: the kit before) and with
the default (the next batch decodes on threads while the model runs the current one), in
alternating rounds in one process, checks that both give the same rows, and prints the
median of the per-round ratios. Camera images on a line are often megapixels, where decoding
costs as much as the model: ``--generate N --generate-size S`` renders N demo images of S px
as JPEGs in a temporary folder instead of reading ``--data``.

    python benchmarks/predict_onnx.py neu.int8.onnx --data ../shared/datasets/neu --images 960
    python benchmarks/predict_onnx.py neu.int8.onnx --generate 64 --generate-size 1600
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from vision_tl.data.synthetic import CLASSES, render_sample
from vision_tl.deploy import Predictor
from vision_tl.deploy.predictor import default_decode_threads, list_images


def generate(folder: Path, count: int, size: int) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        kind = CLASSES[i % len(CLASSES)]
        paths.append(folder / f"{kind}_{i:04d}.jpg")
        Image.fromarray(render_sample(kind, rng, size)).save(paths[-1], quality=90)
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path, help="an exported .onnx model")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", type=Path, help="a folder of images (searched recursively)")
    source.add_argument("--generate", type=int, metavar="N", help="render N demo JPEGs instead")
    parser.add_argument("--generate-size", type=int, default=1600, metavar="S", help="their side in px")
    parser.add_argument("--images", type=int, default=960, help="images timed from --data")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime threads (default: its choice)")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="vision_tl_predict_bench_") as tmp:
        if args.generate:
            paths = generate(Path(tmp), args.generate, args.generate_size)
            what = f"{len(paths)} generated {args.generate_size}x{args.generate_size} JPEGs"
        else:
            paths = list_images(args.data)[: args.images]
            what = f"{len(paths)} images of {args.data}"
        predictor = Predictor(args.model, threads=args.threads)
        threads = default_decode_threads()
        print(f"# {args.model.name}, {what}, batch {args.batch_size}, onnxruntime threads "
              f"{args.threads or 'default'}, decode threads {threads}, {platform.machine()}")
        predictor.predict_paths(paths[: args.batch_size], args.batch_size)  # warm-up
        rates: dict[int, list[float]] = {0: [], threads: []}
        rows: dict[int, list[dict]] = {}
        for r in range(args.rounds):
            for n in (0, threads) if r % 2 == 0 else (threads, 0):
                start = time.perf_counter()
                result = predictor.predict_paths(paths, args.batch_size, decode_threads=n)
                rates[n].append(len(paths) / (time.perf_counter() - start))
                rows[n] = [p.to_dict() for p in result]
            print(f"round {r + 1}: one thread between batches {rates[0][-1]:.1f} img/s, "
                  f"{threads} threads alongside {rates[threads][-1]:.1f} img/s, "
                  f"ratio {rates[threads][-1] / rates[0][-1]:.3f}")
        if rows[0] != rows[threads]:
            raise SystemExit("the two ways gave different rows")
        ratios = [b / a for a, b in zip(rates[0], rates[threads])]
        print(f"median: {statistics.median(rates[0]):.1f} -> {statistics.median(rates[threads]):.1f} img/s, "
              f"ratio {statistics.median(ratios):.3f} (rows identical)")


if __name__ == "__main__":
    main()
