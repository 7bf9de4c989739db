"""The backbone's stages, in order, from timm's own layer grouping."""

from __future__ import annotations

import math
import re

from torch import nn


def backbone_stages(model: nn.Module, merge_unmatched: bool = True) -> list[list[nn.Module]]:
    """Split a timm model into its stages (stem first, last stage + final conv or norm last).

    Uses the model's ``group_matcher(coarse=True)``, the same grouping timm uses
    for layer-wise learning-rate decay, so no architecture is guessed from its name.
    The classifier is not part of any stage. Layers the matcher leaves out (timm files them
    last, as "neck, head": ConvNeXt's and Swin's final norm, DenseNet's ``norm5``, MobileNetV3's
    head convolution) join the last stage, as EfficientNet's matcher itself puts its head
    convolution there: as a stage of their own, ``trainable_stages=2`` would train one real
    stage and a norm layer. ``merge_unmatched=False``: they stay a stage of their own, as
    vision_tl grouped them before (to read settings of runs made then).
    """
    from timm.models import group_modules

    if not hasattr(model, "group_matcher"):
        raise ValueError(
            f"{type(model).__name__} has no group_matcher(); partial fine-tuning needs a timm "
            "model that defines its stages (most timm CNNs and ViTs do)"
        )
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    head_ids = {id(m) for m in head.modules()} if isinstance(head, nn.Module) else set()
    matcher = model.group_matcher(coarse=True)
    groups = group_modules(model, matcher)
    stages, unmatched = [], []
    for _, names in sorted(groups.items()):
        names = [n for n in names if id(model.get_submodule(n)) not in head_ids]
        if names:
            stages.append([model.get_submodule(n) for n in names])
            unmatched.append(not any(_matched(matcher, n) for n in names))
    if merge_unmatched and len(stages) > 2 and unmatched[-1]:
        stages[-2:] = [stages[-2] + stages[-1]]
    return stages


def _matched(matcher, name: str) -> bool:
    """Whether timm's ``group_matcher`` places layer ``name`` in a group (else it goes last)."""
    if callable(matcher):
        order = matcher(name)
        first = next(iter(order), math.inf) if isinstance(order, (tuple, list)) else order
        return first != math.inf
    specs = []
    for spec in matcher.values():
        if isinstance(spec, (tuple, list)):
            specs += [s[0] for s in spec]
        elif spec is not None:
            specs.append(spec)
    return any(re.match(spec, name) for spec in specs)
