"""Deterministic synthetic inspection dataset of procedural metal surfaces.

Used by ``vision-tl demo`` and by the tests, so that the whole pipeline can run
without a real dataset. Every image is a gray, brushed/ground metal texture
(illumination gradient, directional grain, mild blotches) and, for the defect
classes, one kind of defect drawn on top:

* ``good``: texture only.
* ``scratch``: one to three thin, long, bright or dark, straight or slightly
  curved lines.
* ``spot``: one to three small, soft-edged, dark or bright round blobs (pits,
  stains).
* ``crack``: a dark, jagged, branching random-walk line.

Background and defect parameters vary per image. Each image is rendered from its
own generator, seeded from ``(seed, class index, image index)``, so the same
seed gives byte-identical files and adding images never changes earlier ones.

This module imports only numpy and Pillow.
"""

from __future__ import annotations

import contextlib
import operator
import os
import re
import secrets
from collections.abc import Mapping
from io import BytesIO
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

CLASSES: tuple[str, ...] = ("good", "scratch", "spot", "crack")
# Imbalanced like a real line: mostly good parts, fewer of each defect.
DEMO_COUNTS: dict[str, int] = {"good": 90, "scratch": 30, "spot": 30, "crack": 30}
MIN_SIZE = 32

# Strokes are drawn at this multiple of the output size and box-filtered down (anti-aliasing).
_SUPERSAMPLE = 2
_BILINEAR = Image.Resampling.BILINEAR
_BICUBIC = Image.Resampling.BICUBIC


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Smooth zero-mean noise: a ``cells x cells`` normal grid upsampled bicubically.

    Args:
        rng: Random generator.
        size: Output side length in pixels.
        cells: Grid side length; fewer cells give lower-frequency noise.

    Returns:
        A ``size x size`` float32 array with roughly unit standard deviation.
    """
    grid = rng.standard_normal((cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(grid).resize((size, size), _BICUBIC), dtype=np.float32)


def _grain(rng: np.random.Generator, size: int) -> np.ndarray:
    """Directional fine grain (brushing marks) at a random angle.

    Independent rows of noise are stretched along x into thin streaks, rotated,
    and the centre cropped so the rotation leaves no empty corners.

    Args:
        rng: Random generator.
        size: Output side length in pixels.

    Returns:
        A ``size x size`` float32 array with roughly unit standard deviation.
    """
    big = int(size * 1.5) + 2
    streak = rng.uniform(6.0, 24.0)
    cols = max(2, int(big / streak))
    noise = rng.standard_normal((big, cols)).astype(np.float32)
    layer = Image.fromarray(noise).resize((big, big), _BILINEAR)
    layer = layer.rotate(float(rng.uniform(0.0, 180.0)), resample=_BILINEAR)
    off = (big - size) // 2
    grain = np.asarray(layer, dtype=np.float32)[off : off + size, off : off + size]
    return grain / max(float(grain.std()), 1e-6)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Render a gray metal surface.

    Args:
        rng: Random generator.
        size: Side length in pixels.

    Returns:
        A ``size x size`` float32 gray-level image (roughly 0..255, not clipped).
    """
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5
    theta = rng.uniform(0.0, 2.0 * np.pi)
    gradient = np.cos(theta) * coords[None, :] + np.sin(theta) * coords[:, None]
    gray = np.full((size, size), rng.uniform(95.0, 175.0), dtype=np.float32)
    gray += rng.uniform(5.0, 35.0) * gradient
    gray += rng.uniform(3.0, 12.0) * _smooth_noise(rng, size, 3)
    gray += rng.uniform(1.5, 6.0) * _smooth_noise(rng, size, int(rng.integers(6, 13)))
    gray += rng.uniform(3.0, 9.0) * _grain(rng, size)
    gray += rng.uniform(1.0, 4.0) * rng.standard_normal((size, size), dtype=np.float32)
    return gray


def _stroke_layer(size: int) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    """Create a black supersampled ``L`` layer to draw strokes on, and its context.

    Args:
        size: Output side length in pixels; the layer is ``_SUPERSAMPLE`` times larger.

    Returns:
        The layer and an :class:`ImageDraw.ImageDraw` for it.
    """
    layer = Image.new("L", (size * _SUPERSAMPLE, size * _SUPERSAMPLE), 0)
    return layer, ImageDraw.Draw(layer)


def _polyline(points: np.ndarray) -> list[tuple[float, float]]:
    """Output-pixel ``N x 2`` points as a coordinate list for the supersampled layer."""
    return [(x, y) for x, y in (points * _SUPERSAMPLE).tolist()]


def _soft_mask(layer: Image.Image, size: int, radius: float) -> np.ndarray:
    """Downsample a stroke layer, blur it and scale it so its peak is 1.

    Args:
        layer: Supersampled mode ``L`` image with strokes drawn on black.
        size: Output side length in pixels.
        radius: Gaussian blur radius in output pixels.

    Returns:
        A ``size x size`` float32 mask in ``[0, 1]``.
    """
    small = layer.resize((size, size), Image.Resampling.BOX)
    mask = np.asarray(small.filter(ImageFilter.GaussianBlur(radius)), dtype=np.float32)
    return mask / max(float(mask.max()), 1.0)


def _scratches(rng: np.random.Generator, size: int) -> np.ndarray:
    """Draw one to three thin, long, nearly parallel, straight or slightly bent lines.

    Args:
        rng: Random generator.
        size: Side length in pixels.

    Returns:
        A ``size x size`` float32 gray-level offset (bright or dark).
    """
    layer, draw = _stroke_layer(size)
    theta0 = rng.uniform(0.0, np.pi)
    t = np.linspace(-0.5, 0.5, 24)
    for _ in range(int(rng.integers(1, 4))):
        theta = theta0 + rng.normal(0.0, 0.12)
        dx, dy = np.cos(theta), np.sin(theta)
        length = rng.uniform(0.45, 1.0) * size
        cx, cy = rng.uniform(0.2, 0.8, size=2) * size
        bend = rng.normal(0.0, 0.035) * length * (1.0 - 4.0 * t**2)
        points = np.stack([cx + t * length * dx - bend * dy, cy + t * length * dy + bend * dx], 1)
        width = max(1, round(rng.uniform(0.7, 1.8) * _SUPERSAMPLE * size / 128))
        fill = int(rng.integers(170, 256))
        draw.line(_polyline(points), fill=fill, width=width, joint="curve")
    mask = _soft_mask(layer, size, rng.uniform(0.3, 0.6) * max(1.0, size / 128))
    sign = 1.0 if rng.random() < 0.6 else -1.0
    return sign * rng.uniform(35.0, 80.0) * mask


def _spots(rng: np.random.Generator, size: int) -> np.ndarray:
    """Draw one to three small soft-edged blobs; dark ones may be rust-tinted.

    Args:
        rng: Random generator.
        size: Side length in pixels.

    Returns:
        A ``size x size x 3`` float32 RGB offset.
    """
    coords = np.arange(size, dtype=np.float32) + 0.5
    delta = np.zeros((size, size, 3), dtype=np.float32)
    for _ in range(int(rng.integers(1, 4))):
        radius = rng.uniform(0.02, 0.07) * size
        aspect = rng.uniform(0.8, 1.25)
        cx, cy = rng.uniform(0.1, 0.9, size=2) * size
        dist = np.sqrt(
            ((coords[None, :] - cx) / (radius * aspect)) ** 2
            + ((coords[:, None] - cy) / (radius / aspect)) ** 2
        )
        edge = rng.uniform(0.08, 0.25)
        blob = 1.0 / (1.0 + np.exp(np.clip((dist - 1.0) / edge, -30.0, 30.0)))
        amp = rng.uniform(40.0, 90.0)
        if rng.random() < 0.3:
            tint = np.ones(3, dtype=np.float32)
        else:
            rust = rng.uniform(0.0, 0.22)
            amp, tint = -amp, np.array([1.0 - rust, 1.0, 1.0 + rust], dtype=np.float32)
        delta += (amp * blob)[..., None] * tint
    return delta


def _walk(
    rng: np.random.Generator, start: np.ndarray, theta: float, steps: int, step: float
) -> np.ndarray:
    """Walk jaggedly: a slowly drifting heading plus strong per-step jitter.

    Args:
        rng: Random generator.
        start: ``(x, y)`` starting point.
        theta: Mean heading in radians.
        steps: Number of steps.
        step: Step length in pixels.

    Returns:
        A ``(steps + 1) x 2`` float array of points.
    """
    heading = theta + np.cumsum(rng.normal(0.0, 0.12, steps)) + rng.normal(0.0, 0.55, steps)
    moves = step * np.stack([np.cos(heading), np.sin(heading)], axis=1)
    return np.vstack([start, start + np.cumsum(moves, axis=0)])


def _crack(rng: np.random.Generator, size: int) -> np.ndarray:
    """Draw a dark jagged crack with zero to three thinner branches.

    Args:
        rng: Random generator.
        size: Side length in pixels.

    Returns:
        A ``size x size`` float32 gray-level offset (dark).
    """
    layer, draw = _stroke_layer(size)
    step = size / 48
    theta = rng.uniform(0.0, 2.0 * np.pi)
    steps = int(rng.uniform(0.4, 0.8) * size / step)
    start = rng.uniform(0.25, 0.75, size=2) * size - 0.3 * steps * step * np.array(
        [np.cos(theta), np.sin(theta)]
    )
    main = _walk(rng, start, theta, steps, step)
    width = max(1, round(rng.uniform(1.0, 2.2) * _SUPERSAMPLE * size / 128))
    draw.line(_polyline(main), fill=255, width=width, joint="curve")
    for _ in range(int(rng.integers(0, 4))):
        at = main[int(rng.integers(steps // 5, steps))]
        side = rng.choice([-1.0, 1.0])
        branch_theta = theta + side * rng.uniform(0.5, 1.1)
        branch = _walk(rng, at, branch_theta, max(3, int(steps * rng.uniform(0.15, 0.45))), step)
        draw.line(_polyline(branch), fill=200, width=max(1, width - _SUPERSAMPLE // 2))
    mask = _soft_mask(layer, size, rng.uniform(0.3, 0.6) * max(1.0, size / 128))
    return -rng.uniform(55.0, 100.0) * mask


# A pixel belongs to a defect where the defect changes it by at least this share of the
# defect's largest change: the soft edges of blurred strokes and blobs fade into the grain.
MASK_THRESHOLD = 0.25


def _check_kind_and_size(kind: str, size: int) -> int:
    if kind not in CLASSES:
        raise ValueError(f"unknown kind {kind!r}; valid kinds: {', '.join(CLASSES)}")
    size = operator.index(size)
    if size < MIN_SIZE:
        raise ValueError(f"size must be at least {MIN_SIZE}, got {size}")
    return size


def _render(kind: str, rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The image and the defect's per-pixel change (its largest over the channels, >= 0)."""
    gray = _background(rng, size)
    tint = (1.0 + rng.uniform(-0.03, 0.03, size=3)).astype(np.float32)
    extra = np.zeros((size, size, 3), dtype=np.float32)
    change = np.zeros((size, size), dtype=np.float32)
    if kind == "scratch":
        change = _scratches(rng, size)
    elif kind == "spot":
        extra = _spots(rng, size)
    elif kind == "crack":
        change = _crack(rng, size)
    gray += change  # adding zeros for good and spot leaves the image as it always was
    rgb = gray[..., None] * tint + extra
    change = np.maximum(np.abs(change), np.abs(extra).max(axis=-1))
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8), change


def render_sample(kind: str, rng: np.random.Generator, size: int = 128) -> np.ndarray:
    """Render one synthetic inspection image.

    The background is drawn from ``rng`` before the defect, so generators in the
    same state give the same surface for every kind (``good`` is the defect-free
    counterpart of a defect image).

    Args:
        kind: One of :data:`CLASSES`.
        rng: Random generator; it is advanced.
        size: Side length in pixels, at least :data:`MIN_SIZE`.

    Returns:
        A ``size x size x 3`` uint8 RGB array.

    Raises:
        ValueError: If ``kind`` is unknown or ``size`` is too small.
    """
    return _render(kind, rng, _check_kind_and_size(kind, size))[0]


def render_sample_with_mask(
    kind: str, rng: np.random.Generator, size: int = 128
) -> tuple[np.ndarray, np.ndarray]:
    """Render one image as :func:`render_sample` does, and where its defect is.

    The image is the one :func:`render_sample` gives for a generator in the same
    state; the mask marks the pixels the defect changes by at least
    :data:`MASK_THRESHOLD` of its largest change (the ground truth for checking
    what a heat map points at).

    Example:
        >>> image, mask = render_sample_with_mask("spot", _image_rng(0, 2, 0), 64)
        >>> image.shape, mask.shape, bool(mask.any())
        ((64, 64, 3), (64, 64), True)

    Returns:
        ``(image, mask)``: a ``size x size x 3`` uint8 RGB array and a ``size x size``
        bool array, all False for ``good``.

    Raises:
        ValueError: If ``kind`` is unknown or ``size`` is too small.
    """
    image, change = _render(kind, rng, _check_kind_and_size(kind, size))
    peak = float(change.max())
    if peak <= 0.0:
        return image, np.zeros(change.shape, dtype=bool)
    return image, change >= MASK_THRESHOLD * peak


def _normalise_counts(counts: Mapping[str, int] | int) -> dict[str, int]:
    """Validate ``counts`` and return it per class, in :data:`CLASSES` order.

    Args:
        counts: Images per class (int) or a mapping from class name to count.

    Returns:
        The count for each requested class.

    Raises:
        ValueError: On unknown class names, negative or non-integer counts, or
            when nothing would be generated.
    """
    if isinstance(counts, Mapping):
        unknown = sorted(set(counts) - set(CLASSES), key=str)
        if unknown:
            raise ValueError(
                f"unknown class name(s) {unknown}; valid classes: {', '.join(CLASSES)}"
            )
        requested = {name: counts[name] for name in CLASSES if name in counts}
    else:
        requested = dict.fromkeys(CLASSES, counts)
    result: dict[str, int] = {}
    for name, value in requested.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"count for {name!r} must be a non-negative int, got {value!r}")
        result[name] = int(value)
    if sum(result.values()) == 0:
        raise ValueError(f"nothing to generate: counts={counts!r}")
    return result


def _image_rng(seed: int, class_index: int, index: int) -> np.random.Generator:
    """Return the generator for one image, independent of how many are made."""
    return np.random.default_rng(np.random.SeedSequence([seed, class_index, index]))


def _file_name(kind: str, index: int) -> str:
    """Return the file name of image ``index`` of class ``kind``."""
    return f"{kind}_{index:04d}.png"


def _write_png_atomic(image: np.ndarray, path: Path) -> None:
    """Encode ``image`` as PNG and move it into place with :func:`os.replace`.

    The temporary file is a dot file in the same directory, so image folder
    scanners skip it, and it gets the default (umask) permissions.

    Args:
        image: HxWx3 uint8 RGB array.
        path: Destination file.
    """
    buffer = BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as handle:
            handle.write(buffer.getvalue())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _remove_stale(root: Path, counts: dict[str, int]) -> None:
    """Delete generated files that the new recipe does not produce.

    Only files named like this module's output (``<class>/<class>_NNNN.png``)
    are touched; a class folder left empty is removed.

    Args:
        root: Dataset root.
        counts: The recipe being written.
    """
    for kind in CLASSES:
        folder = root / kind
        if not folder.is_dir():
            continue
        pattern = re.compile(rf"{re.escape(kind)}_(\d{{4,}})\.png")
        for path in folder.iterdir():
            match = pattern.fullmatch(path.name)
            if match and path.is_file() and int(match.group(1)) >= counts.get(kind, 0):
                path.unlink()
        if not any(folder.iterdir()):
            folder.rmdir()


def make_inspection_dataset(
    root: str | Path,
    counts: dict[str, int] | int = 40,
    size: int = 128,
    seed: int = 0,
    overwrite: bool = False,
) -> dict[str, int]:
    """Write a synthetic image-folder dataset: ``root/<class>/<class>_<0000>.png``.

    Image ``i`` of class ``c`` depends only on ``(seed, CLASSES.index(c), i)``,
    so the same call gives byte-identical files and larger counts extend a set
    without changing its earlier images. Classes with a count of 0 get no folder.

    Args:
        root: Dataset folder; created if missing.
        counts: Images per class (int), or a mapping from class name to count
            for imbalanced sets or a subset of :data:`CLASSES` (see
            :data:`DEMO_COUNTS`).
        size: Image side length in pixels, at least :data:`MIN_SIZE`.
        seed: Non-negative base seed.
        overwrite: Allow writing into a non-empty ``root``. Files with the same
            names are replaced, and generated files (``<class>/<class>_NNNN.png``
            under any class folder) that the new recipe does not produce are
            deleted; other files are left alone.

    Returns:
        The number of images written per class, in :data:`CLASSES` order.

    Raises:
        FileExistsError: If ``root`` is non-empty and ``overwrite`` is false.
        NotADirectoryError: If ``root`` exists and is not a directory.
        ValueError: On unknown class names, bad counts, size or seed.
    """
    resolved = _normalise_counts(counts)
    size, seed = operator.index(size), operator.index(seed)
    if size < MIN_SIZE:
        raise ValueError(f"size must be at least {MIN_SIZE}, got {size}")
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise NotADirectoryError(f"dataset root {str(root)!r} exists and is not a directory")
    if root.is_dir() and any(root.iterdir()):
        if not overwrite:
            raise FileExistsError(
                f"dataset root {str(root)!r} is not empty; pass overwrite=True to replace it"
            )
        _remove_stale(root, resolved)
    for kind, count in resolved.items():
        if count == 0:
            continue
        folder = root / kind
        folder.mkdir(parents=True, exist_ok=True)
        class_index = CLASSES.index(kind)
        for index in range(count):
            image = render_sample(kind, _image_rng(seed, class_index, index), size)
            _write_png_atomic(image, folder / _file_name(kind, index))
    return resolved
