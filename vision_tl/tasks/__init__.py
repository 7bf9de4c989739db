"""Lightning tasks: ``ImageClassifier``, its callbacks and checkpoint loading."""

from vision_tl.tasks.checkpoint import CheckpointError, load_classifier
from vision_tl.tasks.classifier import CLASS_WEIGHTS, ImageClassifier, class_weights_from_counts
from vision_tl.tasks.resume import RunCheckpoint

__all__ = [
    "CLASS_WEIGHTS",
    "CheckpointError",
    "ImageClassifier",
    "RunCheckpoint",
    "class_weights_from_counts",
    "load_classifier",
]
