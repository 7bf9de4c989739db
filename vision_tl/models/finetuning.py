"""Freezing, partial unfreezing and BatchNorm handling, in one place.

``frozen``: the whole backbone is frozen and in eval mode; only the head trains.
``partial``: the last ``trainable_stages`` stages of the backbone train; earlier
stages are frozen and held in eval mode (their BatchNorm statistics never move).
``full``: everything trains; ``freeze_bn=True`` keeps every BatchNorm's statistics fixed.
"""

from __future__ import annotations

from torch import nn

from vision_tl.backbones import backbone_stages
from vision_tl.models.classifier import ClassifierNet
from vision_tl.utils import whole_number

MODES = ("frozen", "partial", "full")


def _set_frozen(modules: list[nn.Module], frozen: bool) -> None:
    for module in modules:
        for param in module.parameters():
            param.requires_grad = not frozen


def _bn_modules(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def apply_mode(net: ClassifierNet, mode: str, trainable_stages: int = 2, freeze_bn: bool = False) -> None:
    """Set which parameters train and which modules stay in eval mode.

    Args:
        net: the network to change in place.
        mode: ``frozen``, ``partial`` or ``full``.
        trainable_stages: for ``partial``, how many of the last backbone stages train.
        freeze_bn: keep BatchNorm statistics of *trainable* stages fixed too.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of: {', '.join(MODES)}")
    if not whole_number(trainable_stages):
        raise ValueError(f"trainable_stages must be a whole number of stages, got {trainable_stages!r}")
    stages = backbone_stages(net.backbone) if mode == "partial" else []
    if mode == "partial" and len(stages) < trainable_stages == len(backbone_stages(net.backbone, False)):
        # all stages, counted as before a final norm (or head conv) joined the last one: runs made
        # then (their checkpoints and configs) still load and resume, training what they trained
        trainable_stages = len(stages)
    if mode == "partial" and not 1 <= trainable_stages <= len(stages):
        raise ValueError(
            f"trainable_stages must be between 1 and {len(stages)} for {type(net.backbone).__name__}, "
            f"got {trainable_stages}"
        )
    _set_frozen([net.backbone], mode == "frozen")
    _set_frozen([net.head], False)
    net.eval_modules = [net.backbone] if mode == "frozen" else []
    if mode == "partial":
        frozen = [m for stage in stages[:-trainable_stages] for m in stage]
        _set_frozen(frozen, True)
        # Parameters outside every stage (a ViT's cls_token and pos_embed, which belong to no
        # module) are frozen with the stem, which they feed.
        for param in outside_stages(net.backbone, stages):
            param.requires_grad = False
        net.eval_modules = frozen
    net.frozen_modules = list(net.eval_modules)  # before freeze_bn adds norms of stages that train
    if freeze_bn and mode != "frozen":
        net.eval_modules = net.eval_modules + _bn_modules(net.backbone)
    net.train(net.training)


def outside_stages(backbone: nn.Module, stages: list | None = None) -> list[nn.Parameter]:
    """The backbone's parameters in none of its stages (``backbone_stages``): a ViT's
    ``cls_token`` and ``pos_embed``; none in the CNNs."""
    stages = backbone_stages(backbone) if stages is None else stages
    inside = {id(p) for stage in stages for m in stage for p in m.parameters()}
    return [p for p in backbone.parameters() if id(p) not in inside]


def unfreeze_stages(net: ClassifierNet, n_last: int, freeze_bn: bool = False) -> list[nn.Parameter]:
    """Make the last ``n_last`` stages trainable; returns the parameters that became trainable.

    Only ever adds: where those stages train already (a full fit, or a partial one that trains
    more), nothing changes. (Rebuilding the frozen set from ``n_last`` froze again stages that
    were training, while the log said there was nothing to unfreeze.)"""
    stages = backbone_stages(net.backbone)
    n_last = min(n_last, len(stages))
    wanted = [p for stage in stages[len(stages) - n_last:] for m in stage for p in m.parameters()]
    if n_last == len(stages):
        wanted += outside_stages(net.backbone, stages)
    if all(p.requires_grad for p in wanted):
        return []
    before = {id(p) for p in net.backbone.parameters() if p.requires_grad}
    if n_last < len(stages):
        apply_mode(net, "partial", n_last, freeze_bn)
    else:  # everything, parameters outside the stages (a ViT's cls_token) too
        apply_mode(net, "full", freeze_bn=freeze_bn)
    # apply_mode freezes a ViT's tokens with the stem, also where a resumed older run trains them:
    # what trained before keeps training
    for param in net.backbone.parameters():
        if id(param) in before:
            param.requires_grad = True
    return [p for p in net.backbone.parameters() if p.requires_grad and id(p) not in before]


def count_trainable(module: nn.Module) -> tuple[int, int]:
    """(trainable parameters, all parameters)."""
    params = list(module.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
