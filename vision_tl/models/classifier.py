"""``ClassifierNet``: a timm backbone with a small classification head.

Plain PyTorch, no Lightning: the ONNX exporter and the feature cache use it directly.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from vision_tl.backbones import pooled_width

HEADS = ("linear", "mlp")


class ClassifierOutput(NamedTuple):
    """Typed output; field names become the ONNX output names."""

    probabilities: torch.Tensor


def make_head(in_features: int, num_classes: int, head: str = "linear", dropout: float = 0.0,
              hidden: int = 512) -> nn.Module:
    """A linear head, or a one-hidden-layer MLP, on pooled features."""
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}; expected one of: {', '.join(HEADS)}")
    if num_classes < 2:
        raise ValueError(f"a classifier needs at least 2 classes, got {num_classes}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    if head == "linear":
        return nn.Sequential(nn.Dropout(dropout), nn.Linear(in_features, num_classes))
    return nn.Sequential(
        nn.Dropout(dropout),
        nn.Linear(in_features, hidden),
        nn.GELU(),
        nn.Dropout(dropout),
        nn.Linear(hidden, num_classes),
    )


class ClassifierNet(nn.Module):
    """Backbone (pooled features, ``num_classes=0``) followed by a head.

    Modules listed in ``eval_modules`` stay in eval mode even while the network
    trains, so BatchNorm running statistics of frozen layers never move.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, head: str = "linear",
                 dropout: float = 0.0, hidden: int = 512) -> None:
        super().__init__()
        self.backbone = backbone
        self.num_features = pooled_width(backbone)
        self.head = make_head(self.num_features, num_classes, head, dropout, hidden)
        self.eval_modules: list[nn.Module] = []
        # backbone modules that neither train nor update statistics (frozen stages), for inference-only speed-ups
        self.frozen_modules: list[nn.Module] = []

    def train(self, mode: bool = True) -> ClassifierNet:
        super().train(mode)
        for module in self.eval_modules:
            module.eval()
        return self

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features, ``[N, num_features]``."""
        return self.backbone(x)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits, ``[N, num_classes]``."""
        return self.forward_head(self.forward_features(x))
