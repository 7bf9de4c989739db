"""Torch-free image decoding and resizing, shared by training and deployment.

Training (``vision_tl.data``) and the ONNX predictor (``vision_tl.deploy``) both
call :func:`load_rgb` and :func:`resize`, so a model on the line sees exactly
the pixels it was validated on. This module imports only numpy and Pillow.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".pgm", ".ppm")
INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}
# Pillow's own default guard is ~89 Mpx with a warning and 2x that as an error; we
# make it one clear error. Raise it with VISION_TL_MAX_IMAGE_PIXELS or set_max_image_pixels.
DEFAULT_MAX_IMAGE_PIXELS = 100_000_000
_max_pixels = int(os.environ.get("VISION_TL_MAX_IMAGE_PIXELS", DEFAULT_MAX_IMAGE_PIXELS))


class ImageLoadError(ValueError):
    """An image file that cannot be decoded; the message names the file and the reason."""


def set_max_image_pixels(limit: int) -> None:
    """Raise (or lower) the decompression-bomb guard, in pixels (width x height)."""
    global _max_pixels
    if limit <= 0:
        raise ValueError(f"max image pixels must be positive, got {limit}")
    _max_pixels = int(limit)


def is_image_file(path: str | Path) -> bool:
    """True for a visible file whose extension is a supported image type."""
    name = Path(path).name
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    """Scale a decoded array of any depth to uint8 without clipping the range."""
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == bool:
        return arr.astype(np.uint8) * 255
    if arr.dtype in (np.uint16, np.int32, np.uint32) or np.issubdtype(arr.dtype, np.integer):
        # 16-bit PNG/TIFF arrive as I;16 or I (int32); full 16-bit range maps to 0..255.
        arr = arr.astype(np.float64)
        top = 65535.0 if arr.max(initial=0) > 255 else 255.0
        return np.clip(np.round(arr / top * 255.0), 0, 255).astype(np.uint8)
    arr = np.nan_to_num(arr.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    # Float images: treat [0, 1] as the nominal range, otherwise stretch min..max.
    lo, hi = float(arr.min(initial=0.0)), float(arr.max(initial=0.0))
    if lo >= 0.0 and hi <= 1.0:
        return np.round(arr * 255.0).astype(np.uint8)
    if hi == lo:
        return np.zeros(arr.shape, np.uint8)
    return np.round((arr - lo) / (hi - lo) * 255.0).astype(np.uint8)


def _pil_to_rgb(img: Image.Image) -> np.ndarray:
    if img.mode in ("RGB", "L"):
        arr = np.asarray(img)
    elif img.mode in ("RGBA", "LA", "P", "PA"):
        # Composite transparency on black: the same rule everywhere, never random.
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        arr = np.asarray(Image.alpha_composite(bg, rgba).convert("RGB"))
    elif img.mode in ("CMYK", "YCbCr", "HSV", "LAB", "1"):
        arr = np.asarray(img.convert("RGB"))
    else:  # I;16, I;16B, I, F and friends: single channel, high depth
        arr = _to_uint8(np.asarray(img))
    arr = _to_uint8(arr)
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"unsupported channel layout {arr.shape}")
    return np.ascontiguousarray(arr)


def load_rgb(path: str | Path) -> np.ndarray:
    """Decode any supported image to an ``H x W x 3`` uint8 RGB array.

    Grayscale is repeated to three channels, alpha is composited on black,
    CMYK is converted, and 16-bit or float images are scaled to 0..255.

    Raises:
        ImageLoadError: the file is missing, not an image, truncated, too large
            or otherwise undecodable; the message names the file.
    """
    path = Path(path)
    if path.is_dir():
        raise ImageLoadError(f"{path}: is a directory, expected an image file")
    try:
        if path.stat().st_size == 0:
            raise ImageLoadError(f"{path}: empty file (0 bytes), not an image")
        with Image.open(path) as img:
            pixels = img.width * img.height
            if pixels > _max_pixels:
                raise ImageLoadError(
                    f"{path}: {img.width}x{img.height} = {pixels:,} pixels exceeds the limit of "
                    f"{_max_pixels:,} (decompression-bomb guard); raise it with the environment "
                    "variable VISION_TL_MAX_IMAGE_PIXELS or vision_tl.imaging.set_max_image_pixels()"
                )
            ImageFile.LOAD_TRUNCATED_IMAGES = False
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                img.load()
            return _pil_to_rgb(img)
    except ImageLoadError:
        raise
    except FileNotFoundError as exc:
        raise ImageLoadError(f"{path}: file not found") from exc
    except PermissionError as exc:
        raise ImageLoadError(f"{path}: permission denied, the file is not readable") from exc
    except UnidentifiedImageError as exc:
        raise ImageLoadError(
            f"{path}: not a recognised image (supported: {', '.join(IMAGE_EXTENSIONS)})"
        ) from exc
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError,
            Image.DecompressionBombWarning, MemoryError, EOFError, TypeError, IndexError) as exc:
        raise ImageLoadError(f"{path}: corrupt or truncated image ({exc})") from exc


def resize(image: np.ndarray, size: tuple[int, int], interpolation: str = "bicubic") -> np.ndarray:
    """Resize an ``H x W x 3`` uint8 array to ``size = (height, width)`` with Pillow.

    A plain resize (no crop, aspect ratio not kept): inspection images are
    framed on purpose, and cropping could cut a defect out of view.
    """
    if interpolation not in INTERPOLATIONS:
        raise ValueError(
            f"unknown interpolation {interpolation!r}; expected one of: {', '.join(INTERPOLATIONS)}"
        )
    height, width = int(size[0]), int(size[1])
    if image.shape[0] == height and image.shape[1] == width:
        return image
    out = Image.fromarray(image).resize((width, height), INTERPOLATIONS[interpolation])
    return np.asarray(out)
