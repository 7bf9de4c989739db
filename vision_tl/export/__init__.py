"""Export vision_tl checkpoints to ONNX for factory lines, checked against PyTorch.

Command line::

    vision-tl export runs/frozen/version_0/checkpoints/best.ckpt --out model.onnx
    vision-tl export runs/frozen/version_0/checkpoints/best.ckpt --out model.onnx --int8

Python::

    from vision_tl.export import export_onnx, ExportOptions
    result = export_onnx("runs/frozen/version_0/checkpoints/best.ckpt", "model.onnx",
                         ExportOptions(int8=True))
    print(result.report.summary())

The input contract of an exported model
---------------------------------------

Default export (``vision_tl.normalize_in_graph = "true"``):

- **One input named** ``image``: ``uint8`` tensor of shape ``[N, H, W, 3]``
  (layout ``NHWC``), channels in **RGB** order, values ``0..255``. ``N`` is a
  dynamic batch axis; ``H x W`` is the training input size (``vision_tl.input_size``),
  fixed in the graph.
- The pixels are the decoded image after **one plain resize** to ``W x H``
  (no crop, aspect ratio not kept) with the interpolation in
  ``vision_tl.interpolation`` (Pillow, usually bicubic) — exactly
  :func:`vision_tl.imaging.resize` applied to :func:`vision_tl.imaging.load_rgb`.
  Grayscale images are repeated to three channels, alpha is composited on black,
  16-bit images are scaled to 0..255. Do **not** normalise, scale to 0..1,
  swap to BGR or transpose: the graph does ``(x - 255*mean) / (255*std)`` and
  the NCHW transpose itself, with ``vision_tl.mean`` / ``vision_tl.std``.
- **One output named** ``probabilities`` (the field of
  :class:`vision_tl.models.classifier.ClassifierOutput`): ``float32``
  ``[N, C]``, softmax probabilities whose columns follow ``vision_tl.classes``.
  When the metadata has ``vision_tl.good_class`` and ``vision_tl.threshold``,
  an image is a defect when ``P(good_class) < threshold``.
- Where the export had the run's training and validation images (default; not with
  ``--no-unfamiliar``), a **second output** ``unfamiliarity``: ``float32`` ``[N]``,
  1 - the best cosine similarity of the image's pooled features to those of up to
  2,000 training images held in the graph. Above ``vision_tl.unfamiliar_threshold``
  (the highest score of the validation images) the image is unlike every training
  image. A model without ``unfamiliar_threshold`` has only ``probabilities``.

With ``--no-normalize-in-graph`` the input is instead ``float32``
``[N, 3, H, W]`` (``NCHW``), already normalised as ``(x/255 - mean) / std``;
the metadata says so (``layout``, ``input_dtype``, ``normalize_in_graph``).
INT8 (``model.int8.onnx``) and FP16 (``model.fp16.onnx``) variants keep the
same input and outputs; only their insides change, and their ``unfamiliar_threshold``
is set from their own scores on the same validation images.

Every key of the ``vision_tl.*`` metadata is listed in
:mod:`vision_tl.deploy.metadata`; :class:`vision_tl.deploy.Predictor` reads it
and needs neither torch nor this package's training code.

Each export writes ``model.parity.json`` beside the model: on the run's
validation images, PyTorch (training's eval transform) vs onnxruntime (the
uint8 contract above), max ``|Δprob|`` <= 1e-4 and 100 % top-1 agreement, or
the export fails and nothing is written under the model's name.
"""

from vision_tl.export.options import (
    DEFAULT_OPSET,
    ExportError,
    ExportOptions,
    Int8Config,
    ParityError,
    VariantRejected,
)
from vision_tl.utils import lazy_attributes

__all__ = [
    "DEFAULT_OPSET",
    "DeployableClassifier",
    "ExportError",
    "ExportOptions",
    "ExportResult",
    "ImageSet",
    "Int8Config",
    "ParityError",
    "VariantRejected",
    "ParityReport",
    "build_metadata",
    "check_parity",
    "convert_fp16",
    "export_onnx",
    "load_checkpoint",
    "onnx_speed",
    "quantize_int8",
    "resolve_parity_images",
    "write_onnx",
]

# Imported on first use (they import torch and onnx), so that ``vision-tl export --help``, which
# imports this package on its way to vision_tl.export.cli, answers without them.
__getattr__, __dir__ = lazy_attributes(__name__, {
    "onnx_speed": "vision_tl.deploy.speed",
    "DeployableClassifier": "vision_tl.export.onnx_export",
    "build_metadata": "vision_tl.export.onnx_export",
    "load_checkpoint": "vision_tl.export.onnx_export",
    "write_onnx": "vision_tl.export.onnx_export",
    "ImageSet": "vision_tl.export.parity",
    "ParityReport": "vision_tl.export.parity",
    "check_parity": "vision_tl.export.parity",
    "resolve_parity_images": "vision_tl.export.parity",
    "ExportResult": "vision_tl.export.pipeline",
    "export_onnx": "vision_tl.export.pipeline",
    "convert_fp16": "vision_tl.export.quantize",
    "quantize_int8": "vision_tl.export.quantize",
}, __all__)
