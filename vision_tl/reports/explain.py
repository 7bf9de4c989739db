"""Grad-CAM heat maps: which part of an image drove a class score.

Uses the ``grad-cam`` package (``pytorch_grad_cam``). The target layer is the
deepest feature stage timm reports in ``feature_info`` (its ``module`` entry) whose map is
fine enough to place a small defect (:func:`target_stage`), so it works for any timm CNN
without guessing from names.

Example:
    >>> from vision_tl.reports.explain import explain_checkpoint
    >>> explain_checkpoint("runs/partial/version_0/checkpoints/best.ckpt",
    ...                    ["data/demo/scratch/scratch_0001.png"], out_dir="explain")  # doctest: +SKIP
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vision_tl.reports.plots import literal_text

DISPLAY_SIZE = 256


class ExplainError(ValueError):
    """A model, class name or image that Grad-CAM cannot use; the message says which."""


@dataclass
class Explanation:
    """One image's Grad-CAM for one class."""

    path: Path
    image: np.ndarray  # H x W x 3 uint8, as decoded
    cam: np.ndarray  # H x W float in [0, 1], at the model's input size
    predicted: str
    probability: float
    explained: str
    p_explained: float

    def cam_on_image(self) -> np.ndarray:
        """The heat map at the image's own size (H x W), as the overlay lays it on the image."""
        h, w = self.image.shape[:2]
        return np.clip(_resize(self.cam, (w, h)), 0.0, 1.0)


# A heat map places evidence on its layer's grid: with fewer cells than this on the shorter
# side, a defect a few percent of the image wide shares its cell with most of the surface.
# benchmarks/explain_pointing.py measured it on the synthetic set (EfficientNet-Lite0):
# at 128 px the last stage (4 x 4 cells) put its peak on the defect less often than a centred
# Gaussian, the stride-16 stage (8 x 8) on most defects; at 224 px the last stage (7 x 7)
# also pointed far worse than the stride-16 one (14 x 14).
MIN_CELLS = 8


def _stages(backbone) -> list[dict]:
    info = getattr(backbone, "feature_info", None)
    if not info:
        raise ExplainError(f"backbone {type(backbone).__name__} has no timm feature_info; Grad-CAM needs "
                           "a timm model with feature stages")
    return list(info) if isinstance(info, list) else info.get_dicts()


def target_stage(backbone, input_size: tuple[int, int] | None = None) -> dict:
    """The ``feature_info`` entry Grad-CAM explains: the deepest stage whose map has at least
    :data:`MIN_CELLS` cells on its shorter side at ``input_size``; where none has, the deepest of
    those with the finest map (a ViT's blocks share one grid: its last). ``None``: the last stage.

    Raises:
        ExplainError: the backbone has no ``feature_info`` (e.g. not a timm model).
    """
    stages = _stages(backbone)
    if input_size is None:
        return stages[-1]
    cells = [min(input_size) // int(stage.get("reduction") or 1) for stage in stages]
    fine = [i for i, n in enumerate(cells) if n >= MIN_CELLS] or [i for i, n in enumerate(cells) if n == max(cells)]
    return stages[fine[-1]]


def target_layer(backbone, input_size: tuple[int, int] | None = None):
    """The module of :func:`target_stage`'s entry.

    Raises:
        ExplainError: the backbone has no ``feature_info`` (e.g. not a timm model), or lacks
            the module it names.
    """
    stage = target_stage(backbone, input_size)
    try:
        return backbone.get_submodule(stage["module"])
    except AttributeError as exc:
        raise ExplainError(f"feature_info names module {stage['module']!r}, which the backbone lacks") from exc


def feature_map_transform(backbone, layer, input_size: tuple[int, int]):
    """How to read the target layer's output as the ``[N, C, H, W]`` map Grad-CAM weighs:
    ``None`` for a CNN's map; a function for tokens ``[N, prefix + H*W, C]`` (ViTs: the
    class and register tokens dropped, the patches laid out on their grid) or for channels-last
    ``[N, H, W, C]`` maps. Found by running a blank image, not from the architecture's name.

    Raises:
        ExplainError: the output is neither (named, with its shape).
    """
    import torch

    last = target_stage(backbone, input_size)
    channels, reduction = int(last["num_chs"]), int(last.get("reduction") or 1)
    seen: list = []
    handle = layer.register_forward_hook(lambda module, args, out: seen.append(out))
    try:
        with torch.no_grad():
            backbone(torch.zeros(1, 3, *input_size))
    finally:
        handle.remove()
    out = seen[-1][0] if seen and isinstance(seen[-1], (tuple, list)) else (seen[-1] if seen else None)
    shape = tuple(getattr(out, "shape", ()))
    if len(shape) == 4 and shape[1] == channels:
        return None
    if len(shape) == 4 and shape[3] == channels:
        return lambda t: t.permute(0, 3, 1, 2)
    height, width = (max(1, n // reduction) for n in input_size)
    prefix = shape[1] - height * width if len(shape) == 3 else -1
    if len(shape) == 3 and shape[2] == channels and prefix == int(getattr(backbone, "num_prefix_tokens", 0)):
        return lambda t: t[:, prefix:].reshape(t.shape[0], height, width, t.shape[2]).permute(0, 3, 1, 2)
    raise ExplainError(
        f"the feature stage of {type(backbone).__name__} ({last['module']}) outputs shape {list(shape)}, which "
        f"is neither a feature map [N, {channels}, H, W] nor {height}x{width} patch tokens; Grad-CAM cannot place "
        "it on the image (CNN and ViT backbones work)")


def _class_index(classes: list[str], name: str | None) -> int | None:
    if name is None:
        return None
    if name not in classes:
        raise ExplainError(f"unknown class {name!r}; the model's classes are: {', '.join(classes)}")
    return classes.index(name)


def explain_images(model, paths: list[str | Path], class_name: str | None = None) -> list[Explanation]:
    """Grad-CAM of ``class_name`` (default: each image's predicted class) for image files.

    Args:
        model: an :class:`~vision_tl.tasks.ImageClassifier` (e.g. from ``load_classifier``).
        paths: image files.
        class_name: the class to explain; ``None`` explains the predicted class.
    """
    return list(iter_explanations(model, paths, class_name))


def iter_explanations(model, paths: list[str | Path], class_name: str | None = None,
                      unreadable: list[str] | None = None) -> Iterator[Explanation]:
    """:func:`explain_images` one image at a time: each image is decoded only when the one before
    it has been used (a folder of large images is never in memory at once).

    An image that cannot be decoded raises :class:`~vision_tl.imaging.ImageLoadError`; given an
    ``unreadable`` list, its message goes there instead and the other images are explained."""
    import torch
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from vision_tl.data.transforms import eval_transform
    from vision_tl.imaging import ImageLoadError, load_rgb

    classes = list(model.classes)
    wanted = _class_index(classes, class_name)
    net = model.net.to("cpu").eval()
    transform = eval_transform(model.preprocessing)
    layer = target_layer(net.backbone, tuple(model.preprocessing.input_size))
    reshape = feature_map_transform(net.backbone, layer, tuple(model.preprocessing.input_size))
    if reshape is not None and isinstance(getattr(layer, "norm1", None), torch.nn.Module):
        # a transformer block: a head that reads the class token passes no gradient to the last
        # block's patch outputs (an all-zero map); its first norm's outputs still reach the
        # class token through the block's attention (the usual ViT Grad-CAM target)
        layer = layer.norm1
    with GradCAM(model=net, target_layers=[layer], reshape_transform=reshape) as cam:
        for path in paths:
            try:
                image = load_rgb(path)
            except ImageLoadError as exc:
                if unreadable is None:
                    raise
                unreadable.append(str(exc))
                continue
            x = transform(image)[None].requires_grad_(True)  # gradients reach frozen stages too
            with torch.no_grad():
                probs = net(x).float().softmax(-1)[0].numpy()
            k = int(probs.argmax()) if wanted is None else wanted
            heat = cam(input_tensor=x, targets=[ClassifierOutputTarget(k)])[0]
            yield Explanation(Path(path), image, np.nan_to_num(heat), classes[int(probs.argmax())],
                              float(probs.max()), classes[k], float(probs[k]))


def _resize(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    if array.dtype == np.uint8:
        return np.asarray(Image.fromarray(array).resize(size, Image.Resampling.BILINEAR))
    return np.asarray(Image.fromarray(array.astype(np.float32)).resize(size, Image.Resampling.BILINEAR))


HEAT_COLOURS = "inferno"  # perceptually even and readable with colour-blindness; jet is neither


@literal_text
def save_explanation(item: Explanation, path: str | Path, overwrite: bool = True) -> Path:
    """A PNG with the image, the heat map and the overlay side by side, each at the image's own
    aspect ratio (the figure takes the image's shape, so a long strip is not shrunk to a sliver),
    the relevance scale underneath."""
    from vision_tl.reports.plots import _save, _subplots

    h, w = item.image.shape[:2]
    scale = DISPLAY_SIZE / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    image, heat = _resize(item.image, size), np.clip(_resize(item.cam, size), 0.0, 1.0)
    panel_w = 3.3  # inches per panel; the height follows the image's aspect ratio
    panel_h = min(max(panel_w * h / w, 1.0), 5.0)
    fig, axes = _subplots(1, 3, figsize=(3 * panel_w + 0.4, panel_h + 1.5), constrained_layout=True)
    axes[0].imshow(image)
    axes[0].set_title("image", fontsize=10)
    shown = axes[1].imshow(heat, cmap=HEAT_COLOURS, vmin=0, vmax=1)
    axes[1].set_title(f"Grad-CAM for '{item.explained}'", fontsize=10)
    axes[2].imshow(image)
    # the heat tints the image where it is high and leaves it as it is where it is low, so the
    # surface under a cold region stays visible (a uniform alpha washed all of it in colour)
    colours = np.asarray(shown.cmap(heat))
    colours[..., 3] = 0.65 * heat
    axes[2].imshow(colours)
    axes[2].set_title("overlay", fontsize=10)
    for ax in axes:
        ax.axis("off")
    fig.colorbar(shown, ax=list(axes), orientation="horizontal", fraction=0.06, aspect=50, pad=0.02,
                 label="relevance for the class (0 none, 1 most)")
    also = "" if item.explained == item.predicted else f"; P({item.explained}) = {item.p_explained:.2f}"
    fig.suptitle(f"{item.path.name}: predicted {item.predicted} ({item.probability:.2f}){also}", fontsize=11)
    return _save(fig, path, overwrite=overwrite)


def expand_images(inputs: list[str | Path], skip: str | Path | None = None) -> list[Path]:
    """Image files from files and folders (folders searched recursively); a folder's heat maps
    (``*.gradcam.png``) under ``skip`` (explain's output folder: an earlier run's) are left out,
    its other images not (``--out`` may be the images' own folder)."""
    from vision_tl.data.folder import warn_ignored
    from vision_tl.imaging import IMAGE_EXTENSIONS, image_files
    from vision_tl.utils.files import name_key, refuse_empty_path

    for item in inputs:
        refuse_empty_path(item, "image file or folder")
    paths: list[Path] = []
    seen: set[Path] = set()  # a file given twice (alone and in its folder) is explained once
    for item in map(Path, inputs):
        if item.is_dir():
            found, ignored = image_files(item)  # the walk of fit, predict and predict-onnx
            warn_ignored(ignored, item, stacklevel=3)
            walked = len(found)
            if skip is not None:
                outputs = Path(os.path.abspath(skip))
                found = [path for path in found if not (path.name.casefold().endswith(".gradcam.png")
                                                        and Path(os.path.abspath(path)).is_relative_to(outputs))]
            if not found:
                raise ExplainError(f"folder {item} holds no images (searched recursively for "
                                   f"{', '.join(IMAGE_EXTENSIONS)})" + (f" but the heat maps in --out {skip}"
                                                                        if walked else ""))
        elif item.is_file():
            found = [item]
        else:
            raise ExplainError(f"image {item} does not exist")
        for path in found:
            key = name_key(path)
            if key not in seen:
                seen.add(key)
                paths.append(path)
    return paths


def explain_checkpoint(checkpoint: str | Path, images: list[str | Path], out_dir: str | Path,
                       class_name: str | None = None, overwrite: bool = False) -> list[Path]:
    """Load a checkpoint, explain every image and write ``<out_dir>/<stem>.gradcam.png`` files;
    the files written, in the images' order. One image is in memory at a time (see
    :func:`iter_explain_checkpoint`, which yields each explanation as its file is written).

    Raises:
        FileExistsError: an output file exists and ``overwrite`` is False (checked before any work).
    """
    return [png for _, png in iter_explain_checkpoint(checkpoint, images, out_dir, class_name, overwrite)]


def iter_explain_checkpoint(checkpoint: str | Path, images: list[str | Path], out_dir: str | Path,
                            class_name: str | None = None, overwrite: bool = False,
                            unreadable: list[str] | None = None) -> Iterator[tuple[Explanation, Path]]:
    """:func:`explain_checkpoint` as it goes: ``(explanation, png)`` per image, yielded as each
    file is written (iterate to write them all): one image is in memory at a time, not a whole
    folder of them. ``unreadable``: as in :func:`iter_explanations`.

    Raises:
        FileExistsError: an output file exists and ``overwrite`` is False (checked before any work,
            as are the images, ``out_dir`` and the class, when this is called).
    """
    from vision_tl.tasks.checkpoint import load_classifier

    paths = expand_images(images, skip=out_dir)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ExplainError(f"--out {out_dir} is a file; --out is the folder that receives the .gradcam.png files")
    names, used = {}, set()
    for path in paths:
        name = f"{path.stem}.gradcam.png"
        # same file name in two folders: the folder's name, then a number; compared as a
        # case-insensitive disk (macOS, Windows) compares, where x.png and X.png are one file
        if name.casefold() in used:
            name = f"{path.parent.name}_{name}"
        k = 2
        while name.casefold() in used:
            name, k = f"{path.parent.name}_{path.stem}_{k}.gradcam.png", k + 1
        used.add(name.casefold())
        names[path] = name
    existing = [n for n in names.values() if os.path.lexists(out_dir / n)]
    if existing and not overwrite:
        raise FileExistsError(f"--out {out_dir}: {len(existing)} heat map(s) already exist there (e.g. {existing[0]}); "
                              "pass --overwrite to replace them or choose another --out")
    model, _ = load_classifier(checkpoint)
    _class_index(list(model.classes), class_name)  # fail before any work
    out_dir.mkdir(parents=True, exist_ok=True)
    return ((item, save_explanation(item, out_dir / names[item.path], overwrite=overwrite))
            for item in iter_explanations(model, paths, class_name, unreadable))
