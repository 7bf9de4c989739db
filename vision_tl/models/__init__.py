"""Plain ``nn.Module`` networks (no Lightning): backbone + head, and freezing."""

from vision_tl.models.classifier import HEADS, ClassifierNet, ClassifierOutput
from vision_tl.models.finetuning import MODES, apply_mode, count_trainable, outside_stages

__all__ = ["HEADS", "MODES", "ClassifierNet", "ClassifierOutput", "apply_mode", "count_trainable", "outside_stages"]
