"""Latency and throughput of ONNX models on the CPU, measured the same way for every variant."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from vision_tl.deploy.metadata import ModelMetadata, open_session


def example_batch(metadata: ModelMetadata, batch: int, seed: int = 0) -> np.ndarray:
    """A random input batch in the layout and dtype the metadata describes."""
    h, w = metadata.input_size
    rng = np.random.default_rng(seed)
    shape = (batch, h, w, 3) if metadata.layout == "NHWC" else (batch, 3, h, w)
    if metadata.input_dtype == "uint8":
        return rng.integers(0, 256, size=shape, dtype=np.uint8)
    return rng.standard_normal(shape).astype(np.float32)


def time_call(call: Callable[[], object], *, warmup: int = 2, repeats: int = 10,
              budget_s: float = 20.0) -> float:
    """Median seconds per call after ``warmup`` calls; stops early after ``budget_s`` seconds."""
    for _ in range(warmup):
        call()
    times: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(times) < repeats and (not times or time.perf_counter() < deadline):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def onnx_speed(model_path: str | Path, metadata: ModelMetadata, *, threads: int | None = None,
               batch: int = 32, repeats: int = 10) -> dict[str, float]:
    """Latency at batch 1 (ms, median) and throughput at ``batch`` (images/s) in onnxruntime.

    Example:
        >>> onnx_speed("model.onnx", read_metadata("model.onnx"), threads=2)  # doctest: +SKIP
        {'latency_b1_ms': 6.1, 'throughput_b32_ips': 210.4}
    """
    session = open_session(model_path, threads=threads)
    name = session.get_inputs()[0].name
    one, many = example_batch(metadata, 1), example_batch(metadata, batch)
    latency = time_call(lambda: session.run(None, {name: one}), repeats=repeats * 3)
    per_batch = time_call(lambda: session.run(None, {name: many}), repeats=max(3, repeats // 2))
    return {"latency_b1_ms": round(1000.0 * latency, 3),
            f"throughput_b{batch}_ips": round(batch / per_batch, 2)}
