"""CPU speed, each ratio measured in one run: onnxruntime vs PyTorch eager, INT8 vs FP32 ONNX.

PyTorch runs the same deployable module that was exported (uint8 NHWC in,
normalisation + network + softmax), with ``torch.set_num_threads(T)``;
onnxruntime runs the exported file with ``intra_op_num_threads=T``.

Each runtime lives in its own worker process, the way it would on a line PC:
in one process, the thread pool of whichever runtime ran last keeps spinning and
takes the cores from the other (measured: the onnxruntime/eager ratio flipped
between 0.39 and 0.64 from run to run). The ONNX workers never import torch.
The parent asks the workers in turn, one at a time with a short pause between
them, over several rounds and reports the median of the rounds, so a
neighbour's load on a shared machine hits every side alike.

``--also LABEL=FILE`` (repeatable) times another ONNX file of the same model in the same
rounds, e.g. an earlier export as the baseline of a change to the export.

Usage:
    python benchmarks/onnx_latency.py RUN/checkpoints/best.ckpt --fp32 model.onnx \
        [--int8 model.int8.onnx] [--fp16 model.fp16.onnx] [--also old=old.onnx] [--threads 2] [--rounds 5]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import platform
import sys
import time
from pathlib import Path

import numpy as np

PAUSE_S = 0.5  # lets the previous worker's threads stop spinning before the next one runs


def _serve(conn, kind: str, path: str, fp32_path: str, threads: int, batch: int) -> None:
    """Worker loop: build the model once, then answer ``(batch, repeats)`` with median seconds."""
    from vision_tl.deploy import read_metadata
    from vision_tl.deploy.speed import example_batch, time_call

    meta = read_metadata(fp32_path)
    inputs = {1: example_batch(meta, 1), batch: example_batch(meta, batch)}
    if kind == "torch":
        import torch

        from vision_tl.export import DeployableClassifier, load_checkpoint

        torch.set_num_threads(threads)
        ckpt = load_checkpoint(path)
        module = DeployableClassifier(ckpt.net, ckpt.mean, ckpt.std, meta.normalize_in_graph).eval()
        tensors = {n: torch.from_numpy(x) for n, x in inputs.items()}

        def run(n: int) -> None:
            with torch.inference_mode():
                module(tensors[n])
        conn.send(f"torch {torch.__version__}")
    else:
        import onnxruntime as ort

        from vision_tl.deploy.metadata import open_session

        session = open_session(path, threads=threads)
        name = session.get_inputs()[0].name

        def run(n: int) -> None:
            session.run(None, {name: inputs[n]})
        conn.send(f"onnxruntime {ort.__version__}, torch imported: {'torch' in sys.modules}")
    while (request := conn.recv()) is not None:
        n, repeats = request
        conn.send(time_call(lambda n=n: run(n), warmup=1, repeats=repeats, budget_s=10.0))


class _Worker:
    def __init__(self, ctx, kind: str, path: str, args: argparse.Namespace) -> None:
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_serve, daemon=True,
                                   args=(child, kind, path, args.fp32, args.threads, args.batch))
        self.process.start()
        self.version = self.conn.recv()

    def time(self, batch: int, repeats: int) -> float:
        self.conn.send((batch, repeats))
        return self.conn.recv()

    def close(self) -> None:
        self.conn.send(None)
        self.process.join(timeout=30)


def _rounds(workers: dict[str, _Worker], batch: int, rounds: int, repeats: int) -> dict[str, float]:
    """Median over rounds of the per-round median seconds per call, workers taking turns."""
    times: dict[str, list[float]] = {k: [] for k in workers}
    for _ in range(rounds):
        for name, worker in workers.items():
            time.sleep(PAUSE_S)
            times[name].append(worker.time(batch, repeats))
    return {k: float(np.median(v)) for k, v in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--fp32", required=True)
    parser.add_argument("--int8", default=None)
    parser.add_argument("--fp16", default=None)
    parser.add_argument("--also", action="append", default=[], metavar="LABEL=FILE",
                        help="another ONNX file of the same model to time beside the others")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args(argv)

    variants = {k: v for k, v in (("int8", args.int8), ("fp16", args.fp16)) if v}
    for also in args.also:
        label, sep, path = also.partition("=")
        if not sep or not label or not path or label in ("fp32", *variants):
            parser.error(f"--also {also!r}: expected LABEL=FILE with a label not taken yet (taken: "
                         f"{', '.join(['fp32', *variants])})")
        if not Path(path).is_file():
            parser.error(f"--also {also!r}: {path} is not a file")
        variants[label] = path

    from vision_tl.deploy import read_metadata

    meta = read_metadata(args.fp32)
    ctx = mp.get_context("spawn")
    workers = {"pytorch eager": _Worker(ctx, "torch", args.checkpoint, args),
               "onnx fp32": _Worker(ctx, "onnx", args.fp32, args)}
    workers.update({f"onnx {k}": _Worker(ctx, "onnx", p, args) for k, p in variants.items()})
    try:
        print(f"# {meta.backbone} at {meta.input_size[0]}x{meta.input_size[1]}, {args.threads} threads, "
              f"one process per runtime, {args.rounds} rounds, "
              f"{platform.processor() or platform.machine()}")
        for name, worker in workers.items():
            print(f"#   {name}: {worker.version}")
        lat = _rounds(workers, 1, args.rounds, repeats=20)
        for name, sec in lat.items():
            print(f"latency b1  {name:14s} {1000 * sec:8.2f} ms")
        print(f"ratio onnx fp32 / pytorch eager latency (b1): {lat['onnx fp32'] / lat['pytorch eager']:.3f}")
        onnx_workers = {k: w for k, w in workers.items() if k.startswith("onnx")}
        thr = {k: args.batch / v for k, v in _rounds(onnx_workers, args.batch, args.rounds, repeats=3).items()}
        for name, ips in thr.items():
            print(f"throughput b{args.batch} {name:14s} {ips:8.1f} img/s")
        for k in variants:
            print(f"ratio {k} / fp32 throughput (b{args.batch}): {thr[f'onnx {k}'] / thr['onnx fp32']:.3f}; "
                  f"latency (b1): {lat[f'onnx {k}'] / lat['onnx fp32']:.3f}")
    finally:
        for worker in workers.values():
            worker.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
