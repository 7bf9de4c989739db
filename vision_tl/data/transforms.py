"""Augmentation presets named for inspection work, built on albumentations.

A preset is a list of ``{"name": <albumentations class>, **kwargs}`` dicts, so
the same structure can be edited in YAML (``--data.augment``) instead of code.
Resizing and normalisation are not part of a preset: they come from the
backbone's ``pretrained_cfg`` and are applied identically at train, eval and
deploy time.
"""

from __future__ import annotations

import json
import random
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import get_worker_info

from vision_tl.backbones import Preprocessing
from vision_tl.imaging import normalisation_constants, resize
from vision_tl.utils import ignoring_warnings

if TYPE_CHECKING:
    import albumentations as A

PRESETS: dict[str, list[dict[str, Any]]] = {
    "none": [],
    "light": [
        {"name": "HorizontalFlip", "p": 0.5},
        {"name": "RandomBrightnessContrast", "brightness_limit": 0.1, "contrast_limit": 0.1, "p": 0.5},
    ],
    # Surfaces have no "up": flips and 90-degree turns are label-preserving, lighting
    # drifts on the line, and cameras add a little noise and defocus.
    "inspection": [
        {"name": "HorizontalFlip", "p": 0.5},
        {"name": "VerticalFlip", "p": 0.5},
        {"name": "RandomRotate90", "p": 0.5},
        {"name": "RandomBrightnessContrast", "brightness_limit": 0.15, "contrast_limit": 0.15, "p": 0.7},
        {"name": "RandomGamma", "gamma_limit": (85, 115), "p": 0.3},
        {"name": "GaussNoise", "std_range": (0.01, 0.03), "p": 0.2},
        {"name": "GaussianBlur", "blur_limit": (3, 3), "p": 0.1},
    ],
}

# list[Any], not list[dict]: a list the parser would reject by type gets build_augmentation's
# message (which says what an item looks like), not jsonargparse's "does not validate"
AugmentSpec = str | list[Any]


def build_augmentation(spec: AugmentSpec) -> A.Compose:
    """An albumentations pipeline from a preset name or a list of transform dicts."""
    # (imported here: with scipy, OpenCV and pydantic it costs about a second, which evaluation,
    # extract and export, whose transforms never augment, need not pay; see ImageTransform)
    import albumentations as A

    if isinstance(spec, str):
        if spec not in PRESETS:
            raise ValueError(f"unknown augmentation preset {spec!r}; expected one of: {', '.join(PRESETS)}")
        spec = PRESETS[spec]
    elif not isinstance(spec, (list, tuple)):  # (None or False, meant as "no augmentation", failed as not iterable)
        raise ValueError(f"augment {spec!r} is neither a preset ({', '.join(PRESETS)}) nor a list of transforms; "
                         "for no augmentation give 'none'")
    steps = []
    for item in spec:
        if isinstance(item, str) and item in PRESETS:  # `--data.augment+ {...}` over a preset makes [preset, {...}]
            raise ValueError(f"augment list item {item!r} is a preset, which a list cannot extend (--data.augment+ "
                             f"adds to a list, not to a preset); give the whole list instead, such as {item!r}'s "
                             f"transforms followed by yours; {item!r} is {json.dumps(PRESETS[item])}")
        if not isinstance(item, dict):
            raise ValueError(f"augment list item {item!r} is not a transform; each item is a mapping such as "
                             "{name: HorizontalFlip, p: 0.5} (in YAML: '- {name: HorizontalFlip, p: 0.5}')")
        item = dict(item)
        name = item.pop("name", None)
        cls = getattr(A, str(name), None)
        if not isinstance(cls, type) or not issubclass(cls, A.BasicTransform):
            raise ValueError(
                f"unknown albumentations transform {name!r} in augment list; use a class name "
                "from albumentations, e.g. {'name': 'HorizontalFlip', 'p': 0.5}"
            )
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                steps.append(cls(**item))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"bad arguments for albumentations.{name}: {item} ({exc})") from exc
        # albumentations 2 only warns about an argument it does not know (a typo such as
        # brightnes_limit), then trains with the default: refused like a misspelled transform
        unknown = [str(w.message) for w in caught if "are not valid for transform" in str(w.message)]
        if unknown:
            raise ValueError(f"bad arguments for albumentations.{name}: {item} ({unknown[0]}); see the "
                             f"signature of albumentations.{name} for the valid ones")
        for w in caught:  # anything else it says, as it would have
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return A.Compose(steps)


def normalisation(preprocessing: Preprocessing) -> tuple[np.ndarray, np.ndarray]:
    """float32 ``mean * 255`` and ``1 / (std * 255)`` (:func:`vision_tl.imaging.normalisation_constants`);
    every normalising path computes ``(x - mean) * inv_std`` with these, so all are bit-identical."""
    return normalisation_constants(preprocessing.mean, preprocessing.std)


def size_changed(augment, size: tuple[int, int], got: tuple[int, int]) -> str:
    """The error for an augmentation that does not keep the model's input size."""
    names = ", ".join(type(t).__name__ for t in augment.transforms)
    return (f"the augmentation ({names}) turned a {size[0]}x{size[1]} image into {got[0]}x{got[1]}; it must keep the "
            f"model's input size, which the checkpoint and the ONNX export record (set a crop's or resize's size to "
            f"{size[0]}x{size[1]}, or change --model.image_size instead)")


def check_keeps_size(augment: AugmentSpec, size: tuple[int, int], draws: int = 16) -> None:
    """Refuse, before training, an augmentation list that changes the image size (a crop or a
    resize to another size): it would crash mid-epoch, or train at a size the checkpoint and the
    export do not describe. Refuse one that changes the pixels' type or scale as well (Normalize,
    ToFloat, ToTensorV2): the kit normalises after augmenting, so training would see values that
    validation and the export never do. Tried on ``draws`` seeded draws of a blank image (a step
    with p=0.5 fires in one of them but with odds of 1 in 65,000)."""
    pipeline = build_augmentation(augment)
    if not pipeline.transforms:
        return
    blank = np.zeros((*size, 3), np.uint8)
    for seed in range(draws):
        pipeline.set_random_state(np.random.default_rng(seed), random.Random(seed))
        out = pipeline(image=blank)["image"]
        if not isinstance(out, np.ndarray) or out.dtype != np.uint8 or out.ndim != 3 or out.shape[2] != 3:
            names = ", ".join(type(t).__name__ for t in pipeline.transforms)
            kind = (f"{out.dtype} {'x'.join(map(str, out.shape))}" if isinstance(out, np.ndarray)
                    else type(out).__name__)
            raise ValueError(f"the augmentation ({names}) turned uint8 RGB pixels into {kind}; it must keep them "
                             "uint8 H x W x 3: the kit normalises with the backbone's mean and std after augmenting, "
                             "as in validation and the ONNX export (leave out Normalize, ToFloat, ToTensorV2 and "
                             "the like)")
        if tuple(out.shape[:2]) != tuple(size):
            raise ValueError(size_changed(pipeline, size, out.shape[:2]))


class ImageTransform:
    """uint8 RGB array -> normalised CHW float tensor: resize, augment, normalise.

    With ``normalize=False`` the result stays a uint8 ``[3, H, W]`` tensor (4x less to
    move between processes and to the GPU), laid out channels-last (a view of the
    ``H x W x 3`` pixels); :func:`stack_images` batches such
    tensors and :class:`~vision_tl.data.batch_augment.BatchAugment` finishes them on the device.
    """

    def __init__(self, preprocessing: Preprocessing, augment: AugmentSpec = "none", normalize: bool = True) -> None:
        self.preprocessing = preprocessing
        # None: no augmentation ("none", the evaluation transform), built without albumentations
        self.augment = None if augment == "none" else build_augmentation(augment)
        self.normalize = normalize
        self._mean, self._inv_std = normalisation(preprocessing)

    @property
    def augments(self) -> bool:
        """Whether images are augmented: a pipeline with at least one step."""
        return self.augment is not None and bool(self.augment.transforms)

    def __call__(self, image: np.ndarray, seed: int | None = None) -> torch.Tensor:
        """``seed`` fixes this image's augmentation; albumentations ignores the global seeds.

        Raises:
            ValueError: ``image`` is not an ``H x W x 3`` uint8 RGB array.
        """
        if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            kind = (f"a {image.dtype} array of shape {image.shape}" if isinstance(image, np.ndarray)
                    else type(image).__name__)
            raise ValueError(f"expected an H x W x 3 uint8 RGB array, got {kind}; vision_tl.imaging.load_rgb(path) "
                             "reads any supported file that way (grey repeated, alpha composited on black, 16-bit "
                             "scaled), as training and the ONNX export do")
        p = self.preprocessing
        image = resize(image, p.input_size, p.interpolation)
        if self.augments:
            if seed is not None:
                # One generator pair, shared by every step, so the steps draw one after another.
                # (Compose.set_random_seed would give each step its own generator with the same
                # seed: every step's coin would then land the same way, and flips, turns and
                # brightness would always fire together.)
                self.augment.set_random_state(np.random.default_rng(seed), random.Random(seed))
            image = self.augment(image=image)["image"]
            if image.shape[:2] != tuple(p.input_size):
                raise ValueError(size_changed(self.augment, p.input_size, image.shape[:2]))
        if not self.normalize:  # [3, H, W] in channels-last memory: no transposing copy here
            # Pixels straight from Pillow are read-only (torch warns); copying them here would cost
            # as much as decoding's overhead. The tensor is only read: stack_images copies it.
            with ignoring_warnings(UserWarning):
                return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
        x = (image.astype(np.float32) - self._mean) * self._inv_std
        return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


def stack_images(images: list[torch.Tensor]) -> torch.Tensor:
    """Batch ``[3, H, W]`` tensors; uint8 ones into one channels-last ``[N, 3, H, W]`` tensor.

    uint8 images (the device pipeline's, and ``extract``'s augmented views) are copied pixel
    row by pixel row, never transposed, into an ``N x H x W x 3`` buffer -- in a loader worker, straight
    into shared memory, so handing the batch to the training process copies nothing more.
    The GPU wants channels-last anyway; a CPU consumer makes it contiguous itself.
    """
    first = images[0]
    if first.dtype != torch.uint8 or first.ndim != 3:
        return torch.stack(images)
    channels, height, width = first.shape
    out = pixel_batch_buffer((len(images), height, width, channels))
    for row, image in zip(out, images, strict=True):
        row.copy_(image.permute(1, 2, 0))
    return out.permute(0, 3, 1, 2)


def pixel_batch_buffer(shape: tuple[int, ...]) -> torch.Tensor:
    """An empty uint8 tensor for a batch of pixels; in a loader worker it lives in shared
    memory (as ``default_collate`` does it), so sending it to the trainer copies nothing."""
    out = torch.empty(0, dtype=torch.uint8)
    if get_worker_info() is not None:
        out = out.new(out._typed_storage()._new_shared(int(np.prod(shape))))
    return out.resize_(*shape)


def eval_transform(preprocessing: Preprocessing) -> Callable[[np.ndarray], torch.Tensor]:
    """The deterministic transform used for validation, test, predict and export parity."""
    return ImageTransform(preprocessing, "none")
