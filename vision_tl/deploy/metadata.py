"""The ``vision_tl.*`` metadata contract stored in exported ONNX classifiers.

The exporter writes :meth:`ModelMetadata.to_props` into the model's
``metadata_props``; the predictor reads it back with :func:`read_metadata` or
:meth:`ModelMetadata.from_props`. Every value is a string, JSON where
structured, and every key carries the ``vision_tl.`` prefix:

- ``format_version`` (required): ``"1"``.
- ``classes`` (required): JSON list of class names, in output-column order.
- ``input_size`` (required): JSON ``[H, W]``.
- ``layout`` (required): ``"NHWC"`` or ``"NCHW"``.
- ``input_dtype`` (required): ``"uint8"`` or ``"float32"``.
- ``normalize_in_graph`` (required): ``"true"`` or ``"false"``.
- ``mean``, ``std`` (required): JSON lists of 3 floats on the 0..1 scale.
- ``interpolation`` (required): ``"bicubic"``, ``"bilinear"``, ``"nearest"`` or ``"lanczos"``.
- ``resize`` (required): ``"direct"`` (plain resize to H x W, no crop).
- ``good_class`` (optional): name of the "no defect" class.
- ``threshold`` (optional): float; the image is a defect when ``P(good_class) < threshold``.
- ``backbone``, ``kit_version`` (optional, informational): strings.
- ``metrics`` (optional, informational): JSON object of validation metrics.
- ``unfamiliar_threshold``, ``unfamiliar_bank_images``, ``unfamiliar_val_images`` (optional,
  all three or none): the model has a second output ``unfamiliarity`` (1 - the best cosine
  similarity of the image's features to those of ``unfamiliar_bank_images`` training images);
  an image is unlike every training image when its score is above ``unfamiliar_threshold`` (a
  float from 0 to 2), the highest score of ``unfamiliar_val_images`` validation images.

This module imports only the standard library, vision_tl.imaging and, lazily, onnxruntime.
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vision_tl.imaging import INTERPOLATIONS
from vision_tl.utils import whole_number

PREFIX = "vision_tl."
FORMAT_VERSION = "1"
LAYOUTS = ("NHWC", "NCHW")
INPUT_DTYPES = ("uint8", "float32")
RESIZE_MODES = ("direct",)
REQUIRED_KEYS = (
    "format_version", "classes", "input_size", "layout", "input_dtype",
    "normalize_in_graph", "mean", "std", "interpolation", "resize",
)
UNFAMILIAR_KEYS = ("unfamiliar_threshold", "unfamiliar_bank_images", "unfamiliar_val_images")
OPTIONAL_KEYS = ("good_class", "threshold", "backbone", "kit_version", "metrics", *UNFAMILIAR_KEYS)
MAX_UNFAMILIARITY = 2.0  # 1 - cosine similarity lies in [0, 2]
KEYS = REQUIRED_KEYS + OPTIONAL_KEYS


class DeployError(ValueError):
    """A model, image folder or option that the predictor cannot use; the message says why."""


class MetadataError(DeployError):
    """Missing or malformed ``vision_tl.*`` metadata.

    Attributes:
        source: the file (or other origin) the metadata came from.
        missing: required keys (without prefix) that are absent.
        malformed: key -> reason, for keys present but unusable.
    """

    def __init__(self, source: str, missing: Sequence[str], malformed: dict[str, str]):
        self.source = source
        self.missing = list(missing)
        self.malformed = dict(malformed)
        parts = []
        if self.missing:
            parts.append("missing required key(s): " + ", ".join(PREFIX + k for k in self.missing))
        for key, reason in self.malformed.items():
            parts.append(f"malformed {PREFIX}{key}: {reason}")
        super().__init__(f"{source}: invalid vision_tl model metadata; " + "; ".join(parts))

    def __reduce__(self) -> tuple[Any, ...]:  # picklable despite the custom __init__
        return (type(self), (self.source, self.missing, self.malformed))


@dataclass
class ModelMetadata:
    """Everything needed to turn an image into the model's input and read its output.

    Example:
        >>> meta = ModelMetadata(classes=["good", "scratch"], input_size=(224, 224),
        ...                      mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
        ...                      good_class="good", threshold=0.5)
        >>> ModelMetadata.from_props(meta.to_props(), "example") == meta
        True
    """

    classes: list[str]
    input_size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    layout: str = "NHWC"
    input_dtype: str = "uint8"
    normalize_in_graph: bool = True
    interpolation: str = "bicubic"
    resize: str = "direct"
    good_class: str | None = None
    threshold: float | None = None
    backbone: str = ""
    kit_version: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    unfamiliar_threshold: float | None = None
    unfamiliar_bank_images: int | None = None
    unfamiliar_val_images: int | None = None
    format_version: str = FORMAT_VERSION

    @property
    def flags_unfamiliar(self) -> bool:
        """Whether the model scores how unlike its training images an image is (output
        ``unfamiliarity``) and says above which score it is."""
        return self.unfamiliar_threshold is not None

    def __post_init__(self) -> None:
        self.classes = [str(c) for c in self.classes]
        self.input_size = (int(self.input_size[0]), int(self.input_size[1]))
        self.mean = tuple(float(v) for v in self.mean)  # type: ignore[assignment]
        self.std = tuple(float(v) for v in self.std)  # type: ignore[assignment]
        if self.threshold is not None:
            self.threshold = float(self.threshold)
        if self.unfamiliar_threshold is not None:  # (numpy numbers as Python ones: they go into JSON)
            self.unfamiliar_threshold = float(self.unfamiliar_threshold)
        for key in ("unfamiliar_bank_images", "unfamiliar_val_images"):
            if isinstance(getattr(self, key), numbers.Integral) and not isinstance(getattr(self, key), bool):
                setattr(self, key, int(getattr(self, key)))

    def to_props(self) -> dict[str, str]:
        """Serialise to ONNX ``metadata_props`` (prefixed keys, string values).

        The result is validated by parsing it back, so an exporter can never
        write metadata that the predictor would refuse.

        Raises:
            MetadataError: a field holds a value outside the contract.
        """
        props = {
            "format_version": str(self.format_version),
            "classes": json.dumps(list(self.classes)),
            "input_size": json.dumps(list(self.input_size)),
            "layout": self.layout,
            "input_dtype": self.input_dtype,
            "normalize_in_graph": "true" if self.normalize_in_graph else "false",
            "mean": json.dumps(list(self.mean)),
            "std": json.dumps(list(self.std)),
            "interpolation": self.interpolation,
            "resize": self.resize,
            "backbone": self.backbone,
            "kit_version": self.kit_version,
            "metrics": json.dumps(self.metrics, sort_keys=True),
        }
        if self.good_class is not None:
            props["good_class"] = self.good_class
        if self.threshold is not None:
            props["threshold"] = repr(float(self.threshold))
        for key in UNFAMILIAR_KEYS:
            value = getattr(self, key)
            if value is not None:
                props[key] = repr(float(value)) if key == "unfamiliar_threshold" else str(value)
        out = {PREFIX + key: value for key, value in props.items()}
        ModelMetadata.from_props(out, "ModelMetadata.to_props()")
        return out

    @classmethod
    def from_props(cls, props: dict[str, str], source: str) -> ModelMetadata:
        """Parse ONNX ``metadata_props``; keys without the ``vision_tl.`` prefix are ignored.

        Args:
            props: the model's custom metadata map.
            source: where it came from (usually the ONNX path), used in errors.

        Raises:
            MetadataError: naming ``source`` and listing every missing or
                malformed key at once.
        """
        raw = {k[len(PREFIX):]: v for k, v in props.items() if k.startswith(PREFIX)}
        missing = [key for key in REQUIRED_KEYS if key not in raw]
        malformed: dict[str, str] = {}
        values: dict[str, Any] = {}
        for key in KEYS:
            if key not in raw:
                continue
            try:
                values[key] = _PARSERS[key](raw[key])
            except (TypeError, ValueError) as exc:
                malformed[key] = str(exc)
        _check_cross_fields(values, malformed)
        if missing or malformed:
            raise MetadataError(source, missing, malformed)
        return cls(**values)


def sibling(path: Path, tag: str, suffix: str = ".onnx") -> Path:
    """``model.onnx`` -> ``model.<tag><suffix>`` (``model.int8.onnx``, ``model.parity.json``): the
    files an export writes beside its model, which the predictor reads too."""
    stem = path.name[: -len(".onnx")] if path.name.lower().endswith(".onnx") else path.stem
    return path.with_name(f"{stem}.{tag}{suffix}" if tag else f"{stem}{suffix}")


def read_metadata(onnx_path: str | Path) -> ModelMetadata:
    """Read and validate the ``vision_tl.*`` metadata of an ONNX file.

    Raises:
        DeployError: the file is missing or not a loadable ONNX model.
        MetadataError: the metadata is missing or malformed.
    """
    session = open_session(onnx_path)
    props = dict(session.get_modelmeta().custom_metadata_map)
    return ModelMetadata.from_props(props, str(onnx_path))


def open_session(path: str | Path, *, threads: int | None = None,
                 providers: Sequence[Any] | None = None, data: bytes | None = None) -> Any:
    """Open an ``onnxruntime.InferenceSession``, turning every failure into :class:`DeployError`.

    Args:
        path: the ONNX file.
        threads: ``intra_op_num_threads`` (None: onnxruntime's default).
        providers: execution providers (default: CPU only).
        data: the file's bytes, already read (and checked): the session is made from them.
    """
    path = Path(path)
    if data is None and not path.exists():
        raise DeployError(f"{path}: model file not found")
    if data is None and not path.is_file():
        raise DeployError(f"{path}: is a directory, expected an .onnx model file")
    if threads is not None and (not whole_number(threads) or threads < 1):  # (numpy integers too)
        raise DeployError(f"threads must be a positive integer, got {threads!r}")
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise DeployError(
            "onnxruntime is not installed; install it with: pip install onnxruntime"
        ) from exc
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: no optimiser chatter on a line PC
    if threads is not None:
        options.intra_op_num_threads = int(threads)
    try:
        return ort.InferenceSession(
            str(path) if data is None else data, sess_options=options,
            providers=list(providers or ["CPUExecutionProvider"])
        )
    except ort_errors() as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if _is_torch_checkpoint(path):
            raise DeployError(
                f"{path}: a PyTorch checkpoint, not an ONNX model; export it first: "
                f"vision-tl export {path} --out model.onnx"
            ) from exc
        raise DeployError(
            f"{path}: not a loadable ONNX model (corrupt, truncated, not ONNX, or needs an "
            f"operator this onnxruntime lacks): {reason}"
        ) from exc


def _is_torch_checkpoint(path: Path) -> bool:
    """A file ``torch.save`` wrote: a zip archive holding ``data.pkl``, or a bare pickle."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
            if head[:1] == b"\x80":  # pickle protocol 2+
                return True
            if head != b"PK\x03\x04":
                return False
            f.seek(0)
            return b"data.pkl" in f.read(1 << 16)
    except OSError:
        return False


def ort_errors() -> tuple[type[BaseException], ...]:
    """The exception types onnxruntime raises (its own classes do not derive from RuntimeError)."""
    errors: list[type[BaseException]] = [RuntimeError, ValueError, OSError, TypeError]
    try:
        from onnxruntime.capi import onnxruntime_pybind11_state as state
    except ImportError:
        return tuple(errors)
    for name in dir(state):
        obj = getattr(state, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            errors.append(obj)
    return tuple(errors)


# --------------------------------------------------------------------- parsers


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON ({text!r})") from exc


def _parse_format_version(text: str) -> str:
    if text.strip() != FORMAT_VERSION:
        raise ValueError(
            f"format version {text!r} is not supported by this vision_tl (it reads version "
            f"{FORMAT_VERSION}); upgrade vision_tl on this machine"
        )
    return FORMAT_VERSION


def _parse_classes(text: str) -> list[str]:
    value = _json(text)
    if not isinstance(value, list) or not value:
        raise ValueError(f"expected a non-empty JSON list of class names, got {text!r}")
    if not all(isinstance(c, str) and c for c in value):
        raise ValueError(f"class names must be non-empty strings, got {text!r}")
    dupes = sorted({c for c in value if value.count(c) > 1})
    if dupes:
        raise ValueError(f"duplicate class names: {', '.join(dupes)}")
    return value


def _parse_input_size(text: str) -> tuple[int, int]:
    value = _json(text)
    ok = isinstance(value, list) and len(value) == 2 and all(
        isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value
    )
    if not ok:
        raise ValueError(f"expected JSON [height, width] of positive integers, got {text!r}")
    return int(value[0]), int(value[1])


def _choice(options: Sequence[str]) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in options:
            raise ValueError(f"expected one of {', '.join(options)}, got {text!r}")
        return text
    return parse


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered not in ("true", "false"):
        raise ValueError(f"expected 'true' or 'false', got {text!r}")
    return lowered == "true"


def _triple(name: str, low: float, high: float, low_open: bool) -> Callable[[str], tuple]:
    def parse(text: str) -> tuple[float, float, float]:
        value = _json(text)
        ok = isinstance(value, list) and len(value) == 3 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            for v in value
        )
        if not ok:
            raise ValueError(f"expected a JSON list of 3 finite numbers, got {text!r}")
        bad = [v for v in value if v > high or v < low or (low_open and v == low)]
        if bad:
            interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
            raise ValueError(
                f"{name} values must lie in {interval} on the 0..1 pixel scale "
                f"(e.g. 0.485, not 123.7), got {text!r}"
            )
        return float(value[0]), float(value[1]), float(value[2])
    return parse


# A threshold that rejects every image lies just above the highest score, which a float32
# softmax can give as exactly 1.0: one step of a double above 1 is a threshold too.
REJECT_ALL = math.nextafter(1.0, 2.0)


def _parse_threshold(text: str) -> float:
    try:
        value = float(text)
    except ValueError as exc:
        raise ValueError(f"expected a number between 0 and 1, got {text!r}") from exc
    if not 0.0 <= value <= REJECT_ALL:
        raise ValueError(f"expected a number between 0 and 1, got {text!r}")
    return value


def _parse_unfamiliar_threshold(text: str) -> float:
    try:
        value = float(text)
    except ValueError as exc:
        raise ValueError(f"expected a number from 0 to {MAX_UNFAMILIARITY:g}, got {text!r}") from exc
    if not 0.0 <= value <= MAX_UNFAMILIARITY:  # nan too
        raise ValueError(f"expected a number from 0 to {MAX_UNFAMILIARITY:g}, got {text!r}")
    return value


def _parse_count(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise ValueError(f"expected a positive whole number of images, got {text!r}")
    return int(text)


def _parse_metrics(text: str) -> dict[str, Any]:
    value = _json(text) if text.strip() else {}
    if not isinstance(value, dict):
        raise TypeError(f"expected a JSON object, got {text!r}")
    return value


def _parse_good_class(text: str) -> str:
    if not text:
        raise ValueError("empty class name")
    return text


_PARSERS: dict[str, Callable[[str], Any]] = {
    "format_version": _parse_format_version,
    "classes": _parse_classes,
    "input_size": _parse_input_size,
    "layout": _choice(LAYOUTS),
    "input_dtype": _choice(INPUT_DTYPES),
    "normalize_in_graph": _parse_bool,
    "mean": _triple("mean", 0.0, 1.0, low_open=False),
    "std": _triple("std", 0.0, 1.0, low_open=True),
    "interpolation": _choice(tuple(INTERPOLATIONS)),
    "resize": _choice(RESIZE_MODES),
    "good_class": _parse_good_class,
    "threshold": _parse_threshold,
    "backbone": str,
    "kit_version": str,
    "metrics": _parse_metrics,
    "unfamiliar_threshold": _parse_unfamiliar_threshold,
    "unfamiliar_bank_images": _parse_count,
    "unfamiliar_val_images": _parse_count,
}


def _check_cross_fields(values: dict[str, Any], malformed: dict[str, str]) -> None:
    """Constraints that involve more than one key; adds to ``malformed`` in place."""
    if values.get("input_dtype") == "uint8" and values.get("normalize_in_graph") is False:
        malformed["normalize_in_graph"] = (
            "'false' is impossible with input_dtype uint8 (normalised pixels are not integers)"
        )
    classes = values.get("classes")
    good = values.get("good_class")
    if good is not None and classes is not None and good not in classes:
        malformed["good_class"] = f"{good!r} is not one of the classes {classes}"
    if "threshold" in values and "good_class" not in values and "good_class" not in malformed:
        malformed["threshold"] = "a threshold needs good_class (the class it applies to)"
    given = [key for key in UNFAMILIAR_KEYS if key in values or key in malformed]
    if given and len(given) < len(UNFAMILIAR_KEYS):
        lacking = ", ".join(PREFIX + key for key in UNFAMILIAR_KEYS if key not in given)
        malformed[given[0]] = f"comes only with {lacking} (the three describe one output)"
