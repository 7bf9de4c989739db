"""How unlike the training images an image is: 1 - its best cosine similarity to a bank of them.

Plain PyTorch. The exporter puts :class:`UnfamiliarityScore` into the ONNX graph after the
backbone's pooled features (the head's input), with the bank as a constant: L2-normalise,
MatMul with the bank's transpose, ReduceMax, 1 - x. A score of 0 is an image whose features
point exactly like a training image's; unrelated images score higher (at most 2).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

EPS = 1e-12  # as torch.nn.functional.normalize: an all-zero feature vector scores 1, not NaN


class ClassifierWithUnfamiliarity(NamedTuple):
    """The exported graph's outputs when it carries a bank (field names become the ONNX output
    names; ``probabilities`` stays first, as in :class:`~vision_tl.models.ClassifierOutput`)."""

    probabilities: torch.Tensor
    unfamiliarity: torch.Tensor


def normalise_rows(features: torch.Tensor) -> torch.Tensor:
    """Each row divided by its L2 norm (float32)."""
    if features.dtype != torch.float32:
        features = features.to(torch.float32)
    return features / features.norm(dim=1, keepdim=True).clamp_min(EPS)


class UnfamiliarityScore(nn.Module):
    """``1 - max_j cos(features, bank_j)`` for each row of ``features`` ``[N, D]``.

    Args:
        bank: ``[M, D]`` features of training images (normalised here again, so any
            scale will do).

    Example:
        >>> score = UnfamiliarityScore(torch.eye(3))
        >>> score(torch.tensor([[2.0, 0.0, 0.0], [1.0, 1.0, 0.0]])).round(decimals=4)
        tensor([0.0000, 0.2929])
    """

    def __init__(self, bank: torch.Tensor) -> None:
        super().__init__()
        if bank.ndim != 2 or not len(bank):
            raise ValueError(f"the bank must be a non-empty [M, D] matrix, got shape {tuple(bank.shape)}")
        # stored transposed, [D, M]: the graph multiplies by it as it is (one MatMul, no Transpose)
        self.register_buffer("bank_t", normalise_rows(bank).t().contiguous(), persistent=False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.shape[-1] != self.bank_t.shape[0]:
            raise ValueError(f"features of width {features.shape[-1]} cannot be compared with a bank of "
                             f"width {self.bank_t.shape[0]}")
        similarity = normalise_rows(features) @ self.bank_t
        return 1.0 - similarity.max(dim=1).values
