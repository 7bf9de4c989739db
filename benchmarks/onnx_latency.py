"""CPU speed, each ratio measured in one run: onnxruntime vs PyTorch eager, INT8 vs FP32 ONNX.

PyTorch runs the same deployable module that was exported (uint8 NHWC in,
normalisation + network + softmax), with ``torch.set_num_threads(T)``;
onnxruntime runs the exported file with ``intra_op_num_threads=T``. The two
sides alternate in rounds and the median of the rounds is reported, so a
neighbour's load on a shared machine hits both sides alike.

Usage:
    python benchmarks/onnx_latency.py RUN/checkpoints/best.ckpt --fp32 model.onnx \
        [--int8 model.int8.onnx] [--fp16 model.fp16.onnx] [--threads 2] [--rounds 5]
"""

from __future__ import annotations

import argparse
import platform
import sys

import numpy as np
import torch

from vision_tl.deploy import read_metadata
from vision_tl.deploy.metadata import open_session
from vision_tl.export import DeployableClassifier, load_checkpoint
from vision_tl.export.speed import example_batch, time_call


def _ort(path: str, threads: int, batch: np.ndarray):
    session = open_session(path, threads=threads)
    name = session.get_inputs()[0].name
    return lambda: session.run(None, {name: batch})


def _rounds(calls: dict, rounds: int, repeats: int) -> dict[str, float]:
    """Median over rounds of the per-round median seconds per call, sides interleaved."""
    times: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            times[name].append(time_call(call, warmup=1, repeats=repeats, budget_s=10.0))
    return {k: float(np.median(v)) for k, v in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--fp32", required=True)
    parser.add_argument("--int8", default=None)
    parser.add_argument("--fp16", default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    meta = read_metadata(args.fp32)
    ckpt = load_checkpoint(args.checkpoint)
    module = DeployableClassifier(ckpt.net, ckpt.mean, ckpt.std, meta.normalize_in_graph).eval()
    one, many = example_batch(meta, 1), example_batch(meta, args.batch)
    x1 = torch.from_numpy(one)

    def eager() -> None:
        with torch.inference_mode():
            module(x1)

    print(f"# {meta.backbone} at {meta.input_size[0]}x{meta.input_size[1]}, {args.threads} threads, "
          f"torch {torch.__version__}, {platform.processor() or platform.machine()}")
    b1 = {"pytorch eager": eager, "onnx fp32": _ort(args.fp32, args.threads, one)}
    variants = {k: v for k, v in (("int8", args.int8), ("fp16", args.fp16)) if v}
    b1.update({f"onnx {k}": _ort(p, args.threads, one) for k, p in variants.items()})
    lat = _rounds(b1, args.rounds, repeats=20)
    for name, sec in lat.items():
        print(f"latency b1  {name:14s} {1000 * sec:8.2f} ms")
    print(f"ratio onnx fp32 / pytorch eager latency (b1): {lat['onnx fp32'] / lat['pytorch eager']:.3f}")
    bn = {"onnx fp32": _ort(args.fp32, args.threads, many)}
    bn.update({f"onnx {k}": _ort(p, args.threads, many) for k, p in variants.items()})
    thr = {k: args.batch / v for k, v in _rounds(bn, args.rounds, repeats=3).items()}
    for name, ips in thr.items():
        print(f"throughput b{args.batch} {name:14s} {ips:8.1f} img/s")
    for k in variants:
        print(f"ratio {k} / fp32 throughput (b{args.batch}): {thr[f'onnx {k}'] / thr['onnx fp32']:.3f}; "
              f"latency (b1): {lat[f'onnx {k}'] / lat['onnx fp32']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
