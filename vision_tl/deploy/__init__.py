"""Torch-free deployment: run exported ONNX classifiers with onnxruntime, numpy and Pillow.

Nothing here imports torch, lightning or timm, so a line PC needs only numpy, Pillow,
onnxruntime and simplejpeg (faster JPEG decoding; Pillow alone also works): install the small wheel that ``vision-tl deploy-wheel`` builds
(:mod:`vision_tl.deploy.package`)::

    from vision_tl.deploy import Predictor

    predictor = Predictor("model.onnx")
    for p in predictor.predict_paths("images/"):
        print(p.path, p.predicted, p.probability, p.is_defect, p.error)

Command line: ``vision-tl predict-onnx model.onnx images/ --out predictions.csv``.
"""

from vision_tl.deploy.metadata import (
    KEYS,
    OPTIONAL_KEYS,
    PREFIX,
    REQUIRED_KEYS,
    DeployError,
    MetadataError,
    ModelMetadata,
    read_metadata,
)
from vision_tl.deploy.predictor import (
    ImageScan,
    Prediction,
    Predictor,
    check_image_settings,
    list_images,
    scan_images,
)

__all__ = [
    "KEYS",
    "OPTIONAL_KEYS",
    "PREFIX",
    "REQUIRED_KEYS",
    "DeployError",
    "ImageScan",
    "MetadataError",
    "ModelMetadata",
    "Prediction",
    "Predictor",
    "check_image_settings",
    "list_images",
    "read_metadata",
    "scan_images",
]
