"""Backbone factory: timm models with ImageNet weights that work offline.

One public entry, :func:`create_backbone`, over ``timm.create_model``.
Preprocessing always comes from the model's ``pretrained_cfg``
(:func:`resolve_preprocessing`), never from the caller. :class:`FoldedInference` runs a
frozen backbone with its BatchNorm folded into its convolutions;
:class:`GraphedInference` replays a frozen backbone on a GPU as a CUDA graph.
"""

from vision_tl.backbones._embedded import EMBEDDED_WEIGHTS, embedded_weights_path
from vision_tl.backbones._factory import (
    DEFAULT_BACKBONE,
    BackboneWeightsError,
    Preprocessing,
    check_pretrained_weights,
    create_backbone,
    pooled_width,
    resolve_preprocessing,
    run_backbone_state,
    weights_identity,
)
from vision_tl.backbones._fold import FoldedInference, fold_batchnorm, swapped_in
from vision_tl.backbones._graph import GraphedChain, GraphedInference
from vision_tl.backbones._stages import backbone_stages

__all__ = [
    "DEFAULT_BACKBONE",
    "EMBEDDED_WEIGHTS",
    "BackboneWeightsError",
    "FoldedInference",
    "GraphedChain",
    "GraphedInference",
    "Preprocessing",
    "backbone_stages",
    "check_pretrained_weights",
    "create_backbone",
    "embedded_weights_path",
    "fold_batchnorm",
    "pooled_width",
    "resolve_preprocessing",
    "run_backbone_state",
    "swapped_in",
    "weights_identity",
]
