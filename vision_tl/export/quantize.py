"""Smaller, faster variants of an exported fp32 model: static INT8 (QDQ) and FP16.

INT8 uses ``onnxruntime.quantization.quantize_static`` with calibration images
from the training split, fed exactly as on the line (uint8 after the training
resize). The defaults in :class:`Int8Config` were chosen by measurement on NEU
(``benchmarks/int8_accuracy.py``; numbers in ``benchmarks/RESULTS.md``).
"""

from __future__ import annotations

import contextlib
import io
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from vision_tl.deploy import ModelMetadata, Predictor
from vision_tl.export.onnx_export import UNFAMILIARITY_MODULE, check_model, set_metadata
from vision_tl.export.options import ExportError, Int8Config
from vision_tl.imaging import ImageLoadError, load_rgb


class ImageCalibrationReader:
    """Feeds calibration images to ``quantize_static``, preprocessed by the deploy Predictor.

    Implements onnxruntime's ``CalibrationDataReader`` protocol (``get_next``,
    ``rewind``); unreadable images are skipped.
    """

    def __init__(self, fp32_model: str | Path, paths: Sequence[Path], batch_size: int = 16):
        predictor = Predictor(fp32_model)
        self.input_name = predictor._input.name
        pixels, self.skipped = [], []
        for path in paths:
            try:
                pixels.append(predictor.preprocess(load_rgb(path)))
            except ImageLoadError as exc:
                self.skipped.append(str(exc))
        if not pixels:
            raise ExportError(f"no readable calibration image among {len(paths)} "
                              f"(first error: {self.skipped[0] if self.skipped else 'none given'})")
        self.count = len(pixels)
        # Equal-sized batches: onnxruntime's histogram calibrators stack per-batch outputs and
        # fail on a short last batch, so it is topped up with the first images again.
        batch_size = min(batch_size, len(pixels))
        padded = pixels + pixels[: -len(pixels) % batch_size]
        self._batches = [np.stack(padded[i:i + batch_size]) for i in range(0, len(padded), batch_size)]
        self._iter: Iterator[np.ndarray] = iter(self._batches)

    def set_range(self, start_index: int, end_index: int) -> None:
        """Restrict to batches ``start_index:end_index`` (onnxruntime's chunked calibration)."""
        self._iter = iter(self._batches[start_index:end_index])

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._iter, None)
        return None if batch is None else {self.input_name: batch}

    def rewind(self) -> None:
        self._iter = iter(self._batches)

    def __len__(self) -> int:
        return len(self._batches)


def float_nodes(model: onnx.ModelProto, keep_float: str) -> list[str]:
    """Names of nodes to leave in fp32: the input normalisation, softmax, the unfamiliarity score
    (:func:`unfamiliarity_nodes`) and ``keep_float``.

    The normalisation is everything before the first Conv (Cast, Sub, Mul,
    Transpose on the raw uint8 image); ``stem`` is that first Conv; ``head``
    is the classifier: every node of the kit's head module (named ``.../head/...``;
    in a model without it, the last Gemm/MatMul with the Add of a MatMul's
    bias), plus the softmax. (Not every Gemm/MatMul after the last Conv: in a ViT, whose only Conv
    is the patch embedding, that is the whole transformer.)
    """
    nodes = list(model.graph.node)
    convs = [i for i, n in enumerate(nodes) if n.op_type == "Conv"]
    if not convs:
        raise ExportError("the model has no Conv layer; INT8 export supports CNN backbones only")
    first, last = convs[0], convs[-1]
    names = [n.name for n in nodes[:first]]
    names += [n.name for n in nodes[last + 1:] if n.op_type == "Softmax"]
    names += unfamiliarity_nodes(model)
    if "stem" in keep_float:
        names.append(nodes[first].name)
    if "head" in keep_float:
        # the kit's head module, every node of it (--model.head mlp: both layers and the GELU
        # between them); else the last Gemm/MatMul, with the Add of a MatMul's bias
        module = [n.name for n in nodes[last + 1:] if "/head/" in n.name and "/backbone/" not in n.name]
        linear = [n for n in nodes[last + 1:] if n.op_type in ("Gemm", "MatMul")][-1:]
        names += module or [n.name for n in linear]
        if not module and linear and linear[0].op_type == "MatMul":  # a Linear on tokens: its bias is an Add
            names += [n.name for n in nodes if n.op_type == "Add" and linear[0].output[0] in n.input]
    return list(dict.fromkeys(names))  # (once each)


def unfamiliarity_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the nodes of the unfamiliarity score (normalise, MatMul with the bank, ReduceMax,
    1 - x), which the INT8 copy keeps in float, as it keeps the softmax: it is a few thousand
    multiply-adds per image, and a bank and similarities in 8 bits would be one more source of
    error. (On NEU the copy's scores moved as much either way, up to 0.1: the quantised
    backbone's features move them; hence the copy's own threshold, see the export pipeline.)"""
    scope = f"/{UNFAMILIARITY_MODULE}/"
    return [n.name for n in model.graph.node if scope in n.name]


def shape_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the nodes that compute sizes rather than pixels: ``Shape`` / ``Size`` and every
    node fed only by their results and constants. TensorFlow-style "same" padding (timm's ``tf_*``
    models, Lite0 included, NFNets, ViT hybrids ...) computed each layer's pads this way, in float
    arithmetic: once quantised, a pad of 2 came out a little under 2, which the cast to int64 made
    1, so the feature maps shifted (or a graph no longer ran at some input sizes). The export now writes
    those pads as constants (:mod:`vision_tl.export.padding`); a graph exported before that, or
    a layer it does not know, still computes sizes, and they stay in float."""
    constant = {t.name for t in model.graph.initializer}
    sizes: set[str] = set()
    names = []
    for node in model.graph.node:  # (in topological order)
        if node.op_type == "Constant":
            constant.update(node.output)
            continue
        used = [name for name in node.input if name]
        if node.op_type in ("Shape", "Size") or (
                any(name in sizes for name in used) and all(name in sizes or name in constant for name in used)):
            sizes.update(node.output)
            names.append(node.name)
    return names


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """Keep onnxruntime's quantiser notes (a ViT gives one 'Axis 1 is out-of-range' per LayerNorm
    weight) off stderr: it logs them through the root logger, and ``logging.warning`` on a root
    without handlers would also install one there for good (``basicConfig``). A handler that
    drops everything holds that place meanwhile, and a filter drops onnxruntime's records."""
    import logging

    root = logging.getLogger()
    placeholder = logging.NullHandler()

    def not_onnxruntime(record: logging.LogRecord) -> bool:
        return "onnxruntime" not in record.pathname

    root.addHandler(placeholder)
    root.addFilter(not_onnxruntime)
    try:
        yield
    finally:
        root.removeFilter(not_onnxruntime)
        root.removeHandler(placeholder)


def _named(model: onnx.ModelProto) -> onnx.ModelProto:
    for i, node in enumerate(model.graph.node):
        if not node.name:
            node.name = f"{node.op_type}_{i}"
    return model


def quantize_int8(fp32_model: str | Path, out: str | Path, calibration: Sequence[Path],
                  metadata: ModelMetadata, config: Int8Config | None = None) -> dict[str, Any]:
    """Write a static INT8 QDQ model (``out`` is overwritten; callers make it atomic).

    Example:
        >>> quantize_int8("model.onnx", "model.int8.onnx", train_paths, meta)  # doctest: +SKIP

    Returns:
        What was done: the config, images used and skipped, nodes kept in float.

    Raises:
        ExportError: no usable calibration image, or onnxruntime failed.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    config = config or Int8Config()
    reader = ImageCalibrationReader(fp32_model, calibration, config.batch_size)
    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile,
               "distribution": CalibrationMethod.Distribution}
    with tempfile.TemporaryDirectory(prefix="vision_tl_int8_") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings(), _quiet_root_logger():
            warnings.simplefilter("ignore")
            quant_pre_process(str(fp32_model), str(prepared), skip_symbolic_shape=True)
            model = _named(onnx.load(str(prepared)))
            onnx.save(model, str(prepared))
            keep = float_nodes(model, config.keep_float)
            sizes = [name for name in shape_nodes(model) if name not in keep]
            try:
                quantize_static(
                    str(prepared), str(out), reader, quant_format=QuantFormat.QDQ,
                    per_channel=config.per_channel, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8, calibrate_method=methods[config.method],
                    nodes_to_exclude=keep + sizes,
                    # One batch per collection step: the histogram calibrators otherwise keep
                    # every activation of every image (~55 MB per 224 px Lite0 image) in memory.
                    extra_options={"CalibPercentile": config.percentile,
                                   "CalibTensorRangeSymmetric": False,
                                   "CalibStridedMinMax": 1},
                )
            except (RuntimeError, ValueError, KeyError) as exc:
                raise ExportError(f"{fp32_model}: INT8 quantization failed: {exc}") from exc
    _finish(out, metadata, "int8")
    return {"config": config.to_dict(), "calibration_images_used": reader.count,
            "calibration_images_skipped": reader.skipped[:20], "float_nodes": keep,
            "size_nodes_in_float": len(sizes)}


def convert_fp16(fp32_model: str | Path, out: str | Path, metadata: ModelMetadata) -> dict[str, Any]:
    """Write an FP16 copy (weights and activations); input and output types stay as they were.
    (The unfamiliarity score is converted too: kept in float32, its scores on NEU moved as much,
    3e-3 at most, since the half-precision features move them.)"""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(fp32_model))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        half = convert_float_to_float16(model, keep_io_types=True)
    onnx.save(half, str(out))
    _finish(out, metadata, "fp16")
    return {"keep_io_types": True}


def _finish(path: str | Path, metadata: ModelMetadata, variant: str,
            shown: str | Path | None = None) -> None:
    """Restore the metadata (quantizers drop or keep it unpredictably) and re-check the graph."""
    model = onnx.load(str(path))
    set_metadata(model, metadata)
    model.doc_string = f"[{variant}] " + model.doc_string
    onnx.save(model, str(path))
    check_model(path, shown)
