"""What :func:`~vision_tl.export.export_onnx` can be told (:class:`ExportOptions`, :class:`Int8Config`),
the defaults and the errors it raises.

Free of torch and onnx, so that ``vision-tl export --help`` and a mistyped option answer at once,
not after importing torch, timm and onnx (seconds on a line PC or a 2-core laptop,
``benchmarks/startup.py``).
"""

from __future__ import annotations

import numbers
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vision_tl.utils import whole_number

DEFAULT_OPSET = 18
MIN_OPSET, MAX_OPSET = 13, 20  # 13: per-channel QDQ; 20: the TorchScript exporter's newest

CALIBRATION_METHODS = ("percentile", "minmax", "entropy", "distribution")
KEEP_FLOAT_CHOICES = ("none", "stem", "head", "stem+head")
DEFAULT_CALIBRATION_IMAGES = 400
DEFAULT_MAX_ACCURACY_DROP = 0.5  # percentage points, INT8/FP16 vs fp32 on validation
DEFAULT_MAX_DECISION_CHANGES = 0.5  # percent of the check images whose good/defect decision a copy may flip


class ExportError(ValueError):
    """A checkpoint, output path, option or image set the exporter cannot use; says why."""


class ParityError(ExportError):
    """The ONNX model does not reproduce the PyTorch predictions; carries the report."""

    def __init__(self, message: str, report: Any = None):
        super().__init__(message)
        self.report = report


class VariantRejected(ParityError):
    """The fp32 model passed and was written, but an INT8/FP16 variant failed its check."""


@dataclass
class Int8Config:
    """How to quantize; the defaults are the measured best on NEU (see benchmarks/RESULTS.md).

    On NEU (frozen Lite0, 224 px, 360 val images) Percentile beat MinMax and Entropy
    by one to one and a half points; on the fully trained model (99.72 %) percentile
    99.999 and 99.99 lost 0.56 points, 99.9999 lost 0.28 (benchmarks/RESULTS.md); keeping the stem conv in float did not help, keeping
    the classifier head in float cost nothing, so only the head stays in float;
    400 calibration images agreed with fp32 on one image more than 100 or 200.
    Calibration runs one batch at a time, so memory stays ~2 GB at 224 px.

    Attributes:
        method: calibration method, one of :data:`CALIBRATION_METHODS`.
        percentile: activation range percentile for ``method="percentile"``.
        calibration_images: images drawn (evenly) from the training split.
        per_channel: per-output-channel weight scales (recommended for depthwise convs).
        keep_float: layers left in fp32: ``stem`` (the first conv, which sees the raw
            image), ``head`` (classifier Gemm/MatMul), both, or none. The input
            normalisation and the softmax always stay in float.
        batch_size: images per calibration batch.
    """

    method: str = "percentile"
    percentile: float = 99.9999
    calibration_images: int = DEFAULT_CALIBRATION_IMAGES
    per_channel: bool = True
    keep_float: str = "head"
    batch_size: int = 16

    def __post_init__(self) -> None:
        if self.method not in CALIBRATION_METHODS:
            raise ExportError(f"unknown calibration method {self.method!r}; expected one of: "
                              f"{', '.join(CALIBRATION_METHODS)}")
        if self.keep_float not in KEEP_FLOAT_CHOICES:
            raise ExportError(f"unknown keep_float {self.keep_float!r}; expected one of: "
                              f"{', '.join(KEEP_FLOAT_CHOICES)}")
        if not _positive_int(self.calibration_images):
            raise ExportError(f"calibration images must be a positive integer, got "
                              f"{self.calibration_images!r}")
        if not _positive_int(self.batch_size):
            raise ExportError(f"calibration batch_size must be a positive integer, got {self.batch_size!r}")
        if not 90.0 < self.percentile <= 100.0:
            raise ExportError(f"percentile must be in (90, 100], got {self.percentile}")
        # numpy scalars as Python numbers: the settings go into the JSON report
        self.calibration_images, self.batch_size = int(self.calibration_images), int(self.batch_size)
        self.percentile = float(self.percentile)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _positive_int(value: Any) -> bool:
    return whole_number(value) and value >= 1


@dataclass
class ExportOptions:
    """Everything :func:`~vision_tl.export.export_onnx` can be told, with the CLI's defaults.

    Attributes:
        opset: ONNX opset (13..20).
        parity_images: ``"auto"`` (the run's val split), a folder, or ``"none"``.
        normalize_in_graph: uint8 NHWC input with normalisation in the graph
            (default), or normalised float32 NCHW input.
        overwrite: replace existing output files.
        int8: also write ``<name>.int8.onnx`` (static QDQ quantization).
        int8_config: calibration settings.
        calibration_dir: calibration images when the run has no ``split.json``.
        data_root: where the run's image folder (its ``data.root``) is now, if it moved
            since training: its split's images are read there (``vision-tl export --data``).
        fp16: also write ``<name>.fp16.onnx``.
        max_accuracy_drop: INT8/FP16 fail when they lose more (percentage points).
        max_decision_changes: INT8/FP16 of a model with a good/defect threshold fail when they
            flip the decision on more of the check images (percent); ``None``: not checked.
        threads: onnxruntime threads for the latency/throughput numbers.
        unfamiliar: add the output ``unfamiliarity`` (how unlike every training image an
            image is, with its threshold in the metadata) where the run's training and
            validation images are at hand.
    """

    opset: int = DEFAULT_OPSET
    parity_images: str | Path = "auto"
    normalize_in_graph: bool = True
    overwrite: bool = False
    int8: bool = False
    int8_config: Int8Config = field(default_factory=Int8Config)
    calibration_dir: str | Path | None = None
    data_root: str | Path | None = None
    fp16: bool = False
    max_accuracy_drop: float = DEFAULT_MAX_ACCURACY_DROP
    max_decision_changes: float | None = DEFAULT_MAX_DECISION_CHANGES
    threads: int | None = None
    unfamiliar: bool = True

    def __post_init__(self) -> None:  # before anything is written, not after the float model
        if self.threads is not None and (not whole_number(self.threads) or self.threads < 1):
            raise ExportError(f"threads must be a positive integer or None, got {self.threads!r}")
        # numpy scalars as Python numbers: they go into the JSON reports, which cannot hold them
        if self.threads is not None:
            self.threads = int(self.threads)
        for name in ("max_accuracy_drop", "max_decision_changes"):
            value = getattr(self, name)
            if isinstance(value, numbers.Real) and not isinstance(value, bool):
                setattr(self, name, float(value))
