"""Checkpoint -> ONNX: a uint8 NHWC graph with normalisation, softmax and vision_tl metadata.

The exported graph is :class:`DeployableClassifier` traced by the TorchScript
ONNX exporter (``torch.onnx.export(..., dynamo=False)``): with torch 2.14 the
``torch.export``-based exporter needs ``onnxscript`` (not a dependency), and the
TorchScript one gives a small, clean graph with a symbolic batch axis.
"""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from vision_tl import __version__
from vision_tl.deploy.metadata import MetadataError, ModelMetadata
from vision_tl.export.options import DEFAULT_OPSET, MAX_OPSET, MIN_OPSET, ExportError
from vision_tl.export.padding import fold_pads, static_same_padding
from vision_tl.imaging import normalisation_constants
from vision_tl.models.classifier import ClassifierOutput
from vision_tl.models.unfamiliar import ClassifierWithUnfamiliarity, UnfamiliarityScore
from vision_tl.utils.files import already_there, atomic_path, refuse_empty_path, unwritable

INPUT_NAME = "image"
# the module that scores unfamiliarity in the wrapper: its graph nodes are named "/<this>/...",
# which the INT8 copy keeps in float
UNFAMILIARITY_MODULE = "unfamiliarity_score"


class DeployableClassifier(nn.Module):
    """The graph that ships: raw pixels in, class probabilities out.

    With ``normalize_in_graph=True`` the input is ``image``: uint8 ``[N, H, W, 3]``
    RGB (what a plain resize of a decoded image gives); the graph casts to
    float, applies ``(x - 255 * mean) / (255 * std)`` exactly like training's
    eval transform, and transposes to NCHW. Otherwise the input is an already
    normalised float32 ``[N, 3, H, W]`` batch. The output is the softmax of the
    network's logits, returned as :class:`ClassifierOutput` (its field names
    become the ONNX output names).

    With ``width`` (the graph's one input width), the normalisation constants are ``[1, 1,
    width, 3]`` rows of the same values: onnxruntime broadcasts a ``[1, 1, 1, 3]`` constant over
    an NHWC image three numbers at a time, and the Sub and Mul took 10 % each of the INT8 model's
    time (5 % of the fp32 one's); with a whole row per step they are 1-3 % (the values are the same,
    to the last bit; ``benchmarks/RESULTS.md``).

    With a ``bank`` (``[M, D]`` pooled features of training images, from
    ``net.forward_features``), the output is :class:`ClassifierWithUnfamiliarity`: also
    ``unfamiliarity`` ``[N]``, 1 - the best cosine similarity of the image's features to
    the bank (:class:`~vision_tl.models.unfamiliar.UnfamiliarityScore`).
    """

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float],
                 normalize_in_graph: bool = True, bank: torch.Tensor | None = None,
                 width: int | None = None) -> None:
        super().__init__()
        self.net = net
        self.normalize_in_graph = normalize_in_graph
        # the constants training's transforms use, to the last bit (a product taken in float64
        # and then rounded differs in the last bit for some values, e.g. ImageNet's std 0.224)
        mean255, inv_std255 = (torch.from_numpy(a) for a in normalisation_constants(mean, std))
        # NHWC broadcasting, so normalisation happens before the transpose (as in training).
        row = (1, 1, width or 1, 3)
        self.register_buffer("mean255", mean255.view(1, 1, 1, 3).expand(row).contiguous(), persistent=False)
        self.register_buffer("inv_std255", inv_std255.view(1, 1, 1, 3).expand(row).contiguous(), persistent=False)
        if bank is not None and not all(hasattr(net, f) for f in ("forward_features", "forward_head")):
            raise ExportError(f"{type(net).__name__} has no forward_features/forward_head: the unfamiliarity "
                              "score needs the pooled features the head takes")
        # (named UNFAMILIARITY_MODULE: the INT8 copy finds its nodes by that name)
        self.unfamiliarity_score = None if bank is None else UnfamiliarityScore(bank)

    @property
    def output_names(self) -> list[str]:
        """The ONNX output names, in order."""
        kind = ClassifierOutput if self.unfamiliarity_score is None else ClassifierWithUnfamiliarity
        return list(kind._fields)

    def forward(self, image: torch.Tensor) -> ClassifierOutput | ClassifierWithUnfamiliarity:
        if self.normalize_in_graph:
            x = (image.to(torch.float32) - self.mean255) * self.inv_std255
            image = x.permute(0, 3, 1, 2)
        if self.unfamiliarity_score is None:
            return ClassifierOutput(torch.softmax(self.net(image), dim=1))
        features = self.net.forward_features(image)
        probabilities = torch.softmax(self.net.forward_head(features), dim=1)
        return ClassifierWithUnfamiliarity(probabilities, self.unfamiliarity_score(features))


@dataclass
class LoadedCheckpoint:
    """A classifier rebuilt from a checkpoint, with what the export needs from it."""

    path: Path
    net: nn.Module
    classes: list[str]
    input_size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    meta: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def load_checkpoint(path: str | Path) -> LoadedCheckpoint:
    """Rebuild the network of a vision_tl checkpoint (``weights_only=True``) for export.

    A checkpoint written by another vision_tl version is accepted with a note
    (the parity check then proves the rebuilt network is the trained one); one
    that no longer fits this version's classifier raises.

    Raises:
        ExportError: the file is missing, unsafe, not a vision_tl checkpoint, or
            does not fit; the message names the file (and both versions).
    """
    from vision_tl.tasks.checkpoint import CheckpointError, load_classifier, read_checkpoint

    path = Path(path).expanduser()
    try:
        ckpt_version = str(read_checkpoint(path)["vision_tl"].get("kit_version") or "unknown")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the version note below replaces the loader's warning
            model, meta = load_classifier(path)
    except CheckpointError as exc:
        hint = ""
        if "ckpt_version" in locals() and ckpt_version != __version__:
            hint = f" (it was written by vision_tl {ckpt_version}; this is vision_tl {__version__})"
        raise ExportError(f"{exc}{hint}") from exc
    notes = []
    if ckpt_version != __version__:
        recorded = ((meta.get("metrics") or {}).get("val") or {}).get("acc")
        notes.append(
            f"{path} was written by vision_tl {ckpt_version}, this is vision_tl {__version__}; exporting "
            "anyway. The parity check compares this version's rebuild of the network with its ONNX export, "
            "so also compare the reference accuracy it prints with the run's validation accuracy at training"
            + (f" ({100 * float(recorded):.2f} %)" if isinstance(recorded, (int, float)) else "")
        )
    pre = meta.get("preprocessing") or {}
    try:
        size = pre["input_size"]
        return LoadedCheckpoint(
            path=path, net=model.net.eval(), classes=list(meta["classes"]),
            input_size=(int(size[0]), int(size[1])), mean=tuple(pre["mean"]),
            std=tuple(pre["std"]), interpolation=str(pre["interpolation"]), meta=meta, notes=notes,
        )
    except (KeyError, TypeError, IndexError, ValueError) as exc:
        raise ExportError(
            f"{path}: the checkpoint's vision_tl section lacks classes or preprocessing "
            f"(input_size, mean, std, interpolation): {exc!r}"
        ) from exc


def build_metadata(ckpt: LoadedCheckpoint, normalize_in_graph: bool = True) -> ModelMetadata:
    """The ``vision_tl.*`` metadata of the exported model (validated against the contract).

    Raises:
        ExportError: the checkpoint holds a value the contract cannot express.
    """
    meta = ckpt.meta
    good_class, threshold = meta.get("good_class"), meta.get("threshold")
    if threshold is not None and good_class is None:
        raise ExportError(
            f"{ckpt.path}: the checkpoint has a decision threshold ({threshold}) but no good_class "
            "it applies to; retrain with --data.good_class NAME"
        )
    metadata = ModelMetadata(
        classes=ckpt.classes, input_size=ckpt.input_size, mean=ckpt.mean, std=ckpt.std,
        layout="NHWC" if normalize_in_graph else "NCHW",
        input_dtype="uint8" if normalize_in_graph else "float32",
        normalize_in_graph=normalize_in_graph, interpolation=ckpt.interpolation,
        good_class=good_class, threshold=threshold, backbone=str(meta.get("backbone") or ""),
        kit_version=str(meta.get("kit_version") or __version__),
        metrics=_json_safe(meta.get("metrics") or {}),
    )
    try:
        metadata.to_props()
    except MetadataError as exc:
        raise ExportError(f"{ckpt.path}: cannot describe this checkpoint in ONNX metadata: {exc}") from exc
    return metadata


def write_onnx(ckpt: LoadedCheckpoint, path: str | Path, metadata: ModelMetadata,
               opset: int = DEFAULT_OPSET, shown: str | Path | None = None,
               bank: np.ndarray | None = None) -> None:
    """Trace the deployable graph to ``path`` (overwritten), add metadata, run ``onnx.checker``.

    Not atomic by itself: :func:`vision_tl.export.export_onnx` calls it on a
    temporary file. With ``bank`` (``[M, D]`` float32 training-image features), the graph
    has the second output ``unfamiliarity`` (see :class:`DeployableClassifier`).

    Raises:
        ExportError: an unsupported opset, a trace failure or a checker failure.
    """
    check_opset(opset)
    h, w = ckpt.input_size
    wrapper = DeployableClassifier(ckpt.net, ckpt.mean, ckpt.std, metadata.normalize_in_graph,
                                   None if bank is None else torch.from_numpy(np.asarray(bank, np.float32)),
                                   width=w).eval()
    if metadata.normalize_in_graph:
        example = torch.zeros((2, h, w, 3), dtype=torch.uint8)
    else:
        example = torch.zeros((2, 3, h, w), dtype=torch.float32)
    outputs = wrapper.output_names
    axes = {INPUT_NAME: {0: "batch"}, **{name: {0: "batch"} for name in outputs}}
    try:
        # (the graph's one input size lets TF-style "same" padding be constants: see export.padding)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), torch.no_grad(), \
                static_same_padding(wrapper, example):
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
            torch.onnx.export(wrapper, (example,), str(path), dynamo=False, opset_version=opset,
                              input_names=[INPUT_NAME], output_names=outputs, dynamic_axes=axes,
                              do_constant_folding=True)
    except (RuntimeError, ValueError, TypeError, torch.onnx.errors.OnnxExporterError) as exc:
        raise ExportError(f"{ckpt.path}: torch.onnx.export failed at opset {opset}: {exc}") from exc
    model = onnx.load(str(path))
    fold_pads(model)
    set_metadata(model, metadata)
    onnx.save(model, str(path))
    check_model(path, shown)


def rewrite_metadata(path: str | Path, metadata: ModelMetadata, shown: str | Path | None = None) -> None:
    """Replace the ``vision_tl.*`` metadata of the ONNX file ``path`` (the graph stays as it is)
    and run ``onnx.checker`` again. Not atomic by itself: callers use a temporary file."""
    model = onnx.load(str(path))
    tag = model.doc_string.split("] ", 1)[0] + "] " if model.doc_string.startswith("[") else ""  # "[int8] "
    set_metadata(model, metadata)
    model.doc_string = tag + model.doc_string
    onnx.save(model, str(path))
    check_model(path, shown)


def set_metadata(model: onnx.ModelProto, metadata: ModelMetadata) -> None:
    """Replace the ``vision_tl.*`` entries of ``model.metadata_props`` and name the producer."""
    props = metadata.to_props()
    keep = [p for p in model.metadata_props if p.key not in props]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    for key, value in props.items():
        model.metadata_props.add(key=key, value=value)
    model.producer_name, model.producer_version = "vision_tl", __version__
    model.doc_string = (
        f"vision_tl classifier ({metadata.backbone}); input '{INPUT_NAME}': "
        + (f"uint8 [N, {metadata.input_size[0]}, {metadata.input_size[1]}, 3] RGB, resized with "
           f"{metadata.interpolation}, not normalised" if metadata.normalize_in_graph else
           f"float32 [N, 3, {metadata.input_size[0]}, {metadata.input_size[1]}] normalised")
        + f"; output 'probabilities': float32 [N, {len(metadata.classes)}] softmax in the order "
        + json.dumps(metadata.classes)
        + ("; output 'unfamiliarity': float32 [N], 1 - the best cosine similarity to "
           f"{metadata.unfamiliar_bank_images} training images' features (unlike all of them above "
           f"{metadata.unfamiliar_threshold:.6g})" if metadata.flags_unfamiliar else "")
    )


def check_model(path: str | Path, shown: str | Path | None = None) -> None:
    """``onnx.checker.check_model(full_check=True)``; errors name ``shown`` (default ``path``)."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ExportError(f"{shown or path}: the exported graph fails onnx.checker: {exc}") from exc


def check_opset(opset: int) -> None:
    """Raise :class:`ExportError` for an opset outside :data:`MIN_OPSET`..:data:`MAX_OPSET`."""
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise ExportError(
            f"unsupported opset {opset!r}; expected an integer from {MIN_OPSET} to {MAX_OPSET} "
            f"(default {DEFAULT_OPSET})"
        )


def check_output_path(out: str | Path, overwrite: bool) -> Path:
    """Validate the target ``.onnx`` path before any slow work.

    Raises:
        ExportError: a directory, a missing parent folder, a wrong extension, or
            an existing file without ``overwrite``.
    """
    refuse_empty_path(out, "--out", ExportError)
    out = Path(out).expanduser()
    if out.suffix.lower() != ".onnx":
        raise ExportError(f"--out {out}: the model file name must end in .onnx")
    if out.is_dir():
        raise ExportError(f"--out {out}: is a directory; give a file name such as {out}/model.onnx")
    if not out.parent.is_dir():
        raise ExportError(f"--out {out}: the folder {out.parent} does not exist")
    there = already_there(out)
    if there and not overwrite:
        raise ExportError(f"--out {out}: {there}; pass --overwrite to replace it")
    reason = unwritable(out.parent)
    if reason:
        raise ExportError(f"--out {out}: cannot write in {out.parent} ({reason}); export to a folder you can write to")
    return out


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    """Write JSON through a temporary file, so a reader never sees half a report."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")


def _json_safe(value: Any) -> Any:
    """Metrics as plain JSON types (tensors and numpy scalars become floats)."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)
