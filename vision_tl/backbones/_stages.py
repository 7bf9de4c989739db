"""The backbone's stages, in order, from timm's own layer grouping."""

from __future__ import annotations

from torch import nn


def backbone_stages(model: nn.Module) -> list[list[nn.Module]]:
    """Split a timm model into its stages (stem first, last stage + final conv last).

    Uses the model's ``group_matcher(coarse=True)``, the same grouping timm uses
    for layer-wise learning-rate decay, so no architecture is guessed from its name.
    The classifier is not part of any stage.
    """
    from timm.models import group_modules

    if not hasattr(model, "group_matcher"):
        raise ValueError(
            f"{type(model).__name__} has no group_matcher(); partial fine-tuning needs a timm "
            "model that defines its stages (most timm CNNs and ViTs do)"
        )
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    head_ids = {id(m) for m in head.modules()} if isinstance(head, nn.Module) else set()
    groups = group_modules(model, model.group_matcher(coarse=True))
    stages = []
    for _, names in sorted(groups.items()):
        modules = [model.get_submodule(n) for n in names]
        modules = [m for m in modules if id(m) not in head_ids]
        if modules:
            stages.append(modules)
    return stages
