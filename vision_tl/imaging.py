"""Torch-free image decoding and resizing, shared by training and deployment.

Training (``vision_tl.data``) and the ONNX predictor (``vision_tl.deploy``) both
call :func:`load_rgb` and :func:`resize`, so a model on the line sees exactly
the pixels it was validated on. This module imports only numpy and Pillow, and
simplejpeg where it is installed: baseline and progressive 8-bit JPEGs then decode
through it, about twice as fast as through Pillow, with the same pixels (both are
libjpeg-turbo with the same settings; :func:`fast_jpeg_decoder` checks it once per process).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import struct
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from vision_tl.utils import ignoring_warnings

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
MAX_PIXELS_ENV = "VISION_TL_MAX_IMAGE_PIXELS"
_max_pixels: int | None = None  # set_max_image_pixels(); None: the environment variable or the default
JPEG_DECODER_ENV = "VISION_TL_JPEG_DECODER"  # "pillow" turns the simplejpeg path off
_JPEG_MAGIC = b"\xff\xd8\xff"
# The chroma layouts fast_jpeg_decoder's check covers (Pillow writes no others); JPEGs in any
# other layout (4:4:0, 4:1:1 ...) go through Pillow.
_CHECKED_LAYOUTS = {("YCbCr", "444"), ("YCbCr", "422"), ("YCbCr", "420"), ("Gray", "Gray")}
_fast_jpeg: object | None = None  # the simplejpeg module once checked; False: not used here


# The version of the pixels load_rgb and resize give: bumped whenever some file decodes to other
# pixels than before (2: tifffile's alpha composited on black, signed/32-bit data refused; 3: JPEGs
# with damaged data refused). The feature and decoded-image caches key on it, so a kit upgrade never
# serves pixels or features of the old decoding.
PIXELS_VERSION = 3


class ImageLoadError(ValueError):
    """An image file that cannot be decoded; the message names the file and the reason."""


def set_max_image_pixels(limit: int) -> None:
    """Raise (or lower) the decompression-bomb guard, in pixels (width x height)."""
    global _max_pixels
    if isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0:
        raise ValueError(f"max image pixels must be a positive integer, got {limit!r}")
    _max_pixels = int(limit)


def max_image_pixels() -> int:
    """The decompression-bomb limit in pixels: set_max_image_pixels(), else $VISION_TL_MAX_IMAGE_PIXELS.

    The variable is read on every call (not at import), so a bad value is reported
    where it is used, with the variable's name, instead of breaking ``import vision_tl``.
    """
    if _max_pixels is not None:
        return _max_pixels
    text = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if not text:
        return DEFAULT_MAX_IMAGE_PIXELS
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise ValueError(f"{MAX_PIXELS_ENV}={text!r} is not valid; expected a positive integer number "
                         f"of pixels, e.g. {MAX_PIXELS_ENV}=400000000 (default {DEFAULT_MAX_IMAGE_PIXELS:,})")
    return value


def _too_large(path: Path, detail: str, limit: int) -> ImageLoadError:
    return ImageLoadError(
        f"{path}: {detail} exceeds the limit of {limit:,} pixels (decompression-bomb guard); "
        f"if the image is genuine, raise the limit with the environment variable {MAX_PIXELS_ENV} "
        "or vision_tl.imaging.set_max_image_pixels()"
    )


def is_image_file(path: str | Path) -> bool:
    """True for a visible file whose extension is a supported image type."""
    name = Path(path).name
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def image_files(folder: str | Path) -> tuple[list[Path], list[Path]]:
    """``(images, other files)`` under ``folder``, recursively, each in sorted order.

    The one walk behind training's folder scan and the deployed predictor's. Hidden files and
    folders (.DS_Store, .ipynb_checkpoints/) are not data and appear in neither list. A broken
    or looping symbolic link named like an image (or pointing at such a name) counts as an
    image, so that reading it reports it instead of it vanishing; other odd entries (sockets,
    dangling links without an image name) count as other files. Linked folders are followed
    (images gathered from elsewhere by links are data too), each real folder once, so a link
    back up the tree cannot loop.
    """
    root = Path(folder)
    images: list[Path] = []
    others: list[Path] = []
    seen: set[tuple[int, int | str]] = set()

    def unreadable(exc: OSError) -> None:  # os.walk would skip the folder, and its images with it
        where = exc.filename or root
        if Path(where).name in SYSTEM_FOLDERS and Path(where) != root:  # a disk's own, never images
            return
        move = f", or move it out of {root}" if Path(where) != root else ""
        raise OSError(exc.errno, f"cannot list folder {where} ({exc.strerror or exc}), so its images would be "
                      f"left out; let this user read it (e.g. chmod a+rx){move}") from exc

    for dirpath, dirnames, filenames in os.walk(root, onerror=unreadable, followlinks=True):
        info = os.stat(dirpath)
        # st_ino 0: no file ids here (some Windows network drives), where every folder would be
        # "seen": the real path (links and junctions resolved) tells a folder met again instead
        key = (info.st_dev, info.st_ino or os.path.realpath(dirpath))
        if key in seen:
            dirnames[:] = []
            continue
        seen.add(key)
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if name.startswith("."):
                continue
            path = Path(dirpath, name)
            if path.is_file():
                (images if is_image_file(name) else others).append(path)
            else:
                (images if _is_dangling_image_link(path) else others).append(path)
    return sorted(images), sorted(others)


# Folders a file system or an OS keeps at a disk's root, readable by administrators only:
# not data, and no reason to refuse a folder of images on that disk.
SYSTEM_FOLDERS = {"lost+found", "System Volume Information", "$RECYCLE.BIN"}


def _is_dangling_image_link(path: Path) -> bool:
    """A symbolic link that leads nowhere (missing target or a loop), named like an image."""
    if not path.is_symlink() or path.exists():
        return False
    try:
        target = os.readlink(path)
    except OSError:
        target = ""
    return is_image_file(path.name) or is_image_file(target)


# A 16-bit image whose brightest value is below this uses at most 16 of the 256 output levels.
_DIM_16_BIT = 4096
_warned_dim = False  # one warning per process, for the first such image


def _to_uint8(arr: np.ndarray, path: str | Path | None = None) -> np.ndarray:
    """Scale a decoded array of any depth to uint8 without clipping the range.

    Integer images deeper than 8 bits (16-bit PNG/TIFF arrive as I;16 or I, i.e. int32) map
    the 16-bit range 0..65535 to 0..255, the same scale for every image: an image's own
    brightest pixel never changes how it reads. Data that uses only the low bits (10- or
    12-bit camera data, 8-bit data in a 16-bit file) therefore arrives dark, with a warning
    naming the first such file of the process.
    """
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == bool:
        return arr.astype(np.uint8) * 255
    if np.issubdtype(arr.dtype, np.integer):
        top, low = int(arr.max(initial=0)), int(arr.min(initial=0))
        if low < 0 or top > 65535:  # signed data, or deeper than 16 bits (Pillow's mode I is int32)
            raise ImageLoadError(
                f"{path or 'an integer image'}: pixel values {low}..{top} lie outside 0..65535 (signed or 32-bit "
                "integer data); vision_tl reads unsigned 8- and 16-bit integer images and float images: convert "
                "the file to one of those")
        if 0 < top < _DIM_16_BIT:
            _warn_dim(path, top)
        return np.clip(np.round(arr.astype(np.float64) * (255.0 / 65535.0)), 0, 255).astype(np.uint8)
    arr = np.nan_to_num(arr.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    # Float images: treat [0, 1] as the nominal range, otherwise stretch min..max.
    lo, hi = float(arr.min(initial=0.0)), float(arr.max(initial=0.0))
    if lo >= 0.0 and hi <= 1.0:
        return np.round(arr * 255.0).astype(np.uint8)
    if hi == lo:
        return np.zeros(arr.shape, np.uint8)
    return np.round((arr - lo) / (hi - lo) * 255.0).astype(np.uint8)


class DimImageWarning(UserWarning):
    """A 16-bit image that uses few of the 8-bit output's levels (reported once per process)."""


def warn_dim_once(message: str, stacklevel: int = 2) -> None:
    """Issue a :class:`DimImageWarning` in this process (also one raised in a decoding process),
    unless this process has reported such an image already."""
    global _warned_dim
    if not _warned_dim:
        _warned_dim = True
        warnings.warn(message, DimImageWarning, stacklevel=stacklevel + 1)


def _warn_dim(path: str | Path | None, top: int, at_most: bool = False) -> None:
    if _warned_dim:  # (reported already: no message to build)
        return
    bits = max(1, top.bit_length())
    warn_dim_once(
        f"{path or 'a 16-bit image'}: a 16-bit image whose brightest value is {'at most ' if at_most else ''}{top} of "
        f"65535, so it arrives as 0..{round(top * 255 / 65535)} "
        f"of 255 (dark, few grey levels). vision_tl maps every 16-bit image from the full 0..65535 range, in "
        f"training and on the line alike. If your camera writes {bits}-bit data into 16-bit files, scale the "
        f"files to the full range first (multiply by {2 ** (16 - bits)}). Other such images are not reported.",
        stacklevel=4)


def _check_dim_colour(img: Image.Image, path: Path, top_byte: int) -> None:
    """16-bit colour PNGs and TIFFs reach us from Pillow as their high bytes (the same scale as
    16-bit grey, within a level), so 12-bit data in them arrives dark too: warned about the same way."""
    if img.format == "PNG":
        with open(path, "rb") as f:
            head = f.read(26)
        deep = head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR" and head[24] == 16
    else:  # TIFF: bits per sample
        bits = getattr(img, "tag_v2", {}).get(258) or ()
        deep = 16 in (bits if isinstance(bits, tuple) else (bits,))
    if deep:
        _warn_dim(path, top_byte * 256 + 255, at_most=True)


def _signed_8_bit(img: Image.Image) -> bool:
    """A TIFF of signed 8-bit samples, which Pillow reads as unsigned (-1 becomes 255)."""
    if img.format != "TIFF" or img.mode not in ("L", "LA", "RGB", "RGBA"):
        return False
    sample_format = img.tag_v2.get(339) or ()
    return 2 in (sample_format if isinstance(sample_format, tuple) else (sample_format,))


class MultiFrameWarning(UserWarning):
    """An image file with several pages or frames, of which only the first is read (once per process)."""


_warned_frames = False


def _warn_frames(img: Image.Image, path: Path) -> None:
    """Warn (once per process) about a file with pages or frames after the first. Counted on a
    handle of its own: a TIFF's pages are found by seeking through it, and a damaged pointer to a
    later page must neither fail nor disturb the decoding of the first."""
    global _warned_frames
    if _warned_frames or img.format not in ("TIFF", "PNG", "WEBP"):
        return
    try:
        with ignoring_warnings(), Image.open(path) as other:  # (Pillow's own notes on a damaged later page)
            if not getattr(other, "is_animated", False):
                return
            frames = f"{other.n_frames} pages or frames"
    except Exception:  # noqa: BLE001 - a later page that cannot be read: the first is what is used
        return
    _warned_frames = True
    warnings.warn(f"{path}: holds {frames}; vision_tl reads the first only, in training and on the line alike "
                  "(save each page as its own file to use the others). Other such files are not reported.",
                  MultiFrameWarning, stacklevel=3)


_warned_truncated = False


def _warn_truncated_allowed() -> None:
    """Pillow pads a cut-off file instead of failing while ``ImageFile.LOAD_TRUNCATED_IMAGES`` is
    set: the process's setting (its owner's choice, left as it is), so say once what it does here."""
    global _warned_truncated
    if ImageFile.LOAD_TRUNCATED_IMAGES and not _warned_truncated:
        _warned_truncated = True
        warnings.warn("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is set in this process: images cut off in the middle "
                      "are read with their missing part filled in, and JPEGs with damaged data as they decode, "
                      "not refused as damaged", stacklevel=3)


def decode_error(path: str | Path) -> str:
    """Why :func:`load_rgb` cannot read ``path`` (for a message in a process other than the one that
    met the failure: a loader process's own message does not come back with its batch)."""
    try:
        load_rgb(path)
    except ImageLoadError as exc:
        return str(exc)
    return f"{path}: could not be decoded"


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
        arr = _to_uint8(np.asarray(img), getattr(img, "filename", None))
    arr = _to_uint8(arr)
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"unsupported channel layout {arr.shape}")
    return np.ascontiguousarray(arr)


def _bomb(path: Path, exc: Exception, limit: int) -> ImageLoadError:
    """Pillow's DecompressionBombError (names neither the file nor our setting), or the kit's own
    check met inside it (:class:`_OverLimit`, which knows the size), as ours."""
    if isinstance(exc, _OverLimit):
        width, height = exc.size
        return _too_large(path, f"{width}x{height} = {width * height:,} pixels", limit)
    size = re.search(r"\((\d+) pixels\)", str(exc))
    return _too_large(path, f"{int(size.group(1)):,} pixels" if size else str(exc), limit)


class _OverLimit(Image.DecompressionBombError):
    """An image over the kit's pixel limit, met inside one of Pillow's own size checks."""

    def __init__(self, size: tuple[int, int]) -> None:
        super().__init__(f"Image size ({size[0]}x{size[1]}) exceeds the kit's limit")
        self.size = size


_OWN_CHECK = threading.local()  # .limits: the kit's pixel limits in force on this thread (innermost last)
_SWITCH_LOCK = threading.Lock()


@contextlib.contextmanager
def own_bomb_check(limit: int | None = None) -> Iterator[None]:
    """Pillow's decompression-bomb check applies the kit's limit (:func:`max_image_pixels`, or
    ``limit``) on this thread meanwhile, and never warns: Pillow's own, at ``Image.open`` and
    again when a TIFF loads, refused images a raised limit allows, and warned about others. Every
    place Pillow checks keeps checking (an ICO decodes its image inside ``Image.open``, right after
    its check), against the kit's limit. Pillow's function is wrapped once, and applies as before
    everywhere else: on other threads and in the caller's own ``Image.open``. Pillow's
    ``MAX_IMAGE_PIXELS`` is never changed."""
    with _SWITCH_LOCK:
        original = Image._decompression_bomb_check
        if not getattr(original, "vision_tl_switch", False):
            def check(size, *args, **kwargs):  # (error_only= in WebP's own call)
                limits = getattr(_OWN_CHECK, "limits", None)
                if not limits:
                    return original(size, *args, **kwargs)
                if max(1, size[0]) * max(1, size[1]) > limits[-1]:
                    raise _OverLimit(tuple(size))
                return None
            check.vision_tl_switch = True
            Image._decompression_bomb_check = check
    if not hasattr(_OWN_CHECK, "limits"):
        _OWN_CHECK.limits = []
    _OWN_CHECK.limits.append(max_image_pixels() if limit is None else limit)
    try:
        yield
    finally:
        _OWN_CHECK.limits.pop()


def open_image(path: Path, limit: int | None = None) -> Image.Image:
    """``Image.open`` (lazy: header only) with the decompression-bomb guard applied.

    Decode it (``load()``) inside :func:`own_bomb_check`: Pillow checks a TIFF again then.

    Raises:
        ImageLoadError: the image has more than ``limit`` (default :func:`max_image_pixels`) pixels.
        OSError, UnidentifiedImageError: as ``Image.open``.
    """
    limit = max_image_pixels() if limit is None else limit
    try:
        with own_bomb_check(limit):
            img = Image.open(path)
    except _OverLimit as exc:  # (a size checked inside Image.open: every format's header, an ICO's image)
        raise _bomb(path, exc, limit) from None
    pixels = img.width * img.height
    if pixels > limit:
        img.close()
        raise _too_large(path, f"{img.width}x{img.height} = {pixels:,} pixels", limit)
    return img


def load_rgb(path: str | Path) -> np.ndarray:
    """Decode any supported image to an ``H x W x 3`` uint8 RGB array.

    Grayscale is repeated to three channels, alpha is composited on black,
    CMYK is converted, and 16-bit or float images are scaled to 0..255. A JPEG whose
    compressed data libjpeg finds damaged is refused (where simplejpeg decodes it, see
    :func:`fast_jpeg_decoder`; Pillow alone cannot tell).

    Raises:
        ImageLoadError: the file is missing, not an image, truncated, too large
            or otherwise undecodable; the message names the file.
    """
    path = Path(path)
    limit = max_image_pixels()
    simplejpeg = fast_jpeg_decoder()
    try:
        if path.is_dir():  # (inside: a name too long or a folder one may not enter raises here)
            raise ImageLoadError(f"{path}: is a directory, expected an image file")
        if path.stat().st_size == 0:
            raise ImageLoadError(f"{path}: empty file (0 bytes), not an image")
        fast = _load_jpeg_fast(simplejpeg, path, limit) if simplejpeg is not None else None
        if fast is not None:
            return fast
        with own_bomb_check(limit), open_image(path, limit) as img:
            _warn_truncated_allowed()
            if _signed_8_bit(img):
                raise ImageLoadError(f"{path}: a TIFF of signed 8-bit samples (their negative values would read as "
                                     "bright); vision_tl reads unsigned 8- and 16-bit and float images: convert it")
            _warn_frames(img, path)
            img.load()
            arr = _pil_to_rgb(img)
            if (img.format in ("PNG", "TIFF") and img.mode in ("RGB", "RGBA")
                    and arr.max(initial=0) < _DIM_16_BIT >> 8):
                _check_dim_colour(img, path, int(arr.max(initial=0)))
            return arr
    except ImageLoadError:
        raise
    except Image.DecompressionBombError as exc:
        raise _bomb(path, exc, limit) from exc
    except FileNotFoundError as exc:
        raise ImageLoadError(f"{path}: file not found (or a broken symbolic link)") from exc
    except PermissionError as exc:
        raise ImageLoadError(f"{path}: permission denied, the file is not readable") from exc
    except UnidentifiedImageError as exc:
        if path.suffix.lower() in (".tif", ".tiff"):
            return _load_tiff_fallback(path, limit, exc)
        raise ImageLoadError(
            f"{path}: not a recognised image (supported: {', '.join(IMAGE_EXTENSIONS)})"
        ) from exc
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ImageLoadError(f"{path}: symbolic link loop; point the link at an image file") from exc
        if exc.errno == errno.ENAMETOOLONG:
            raise ImageLoadError(f"{path}: the file name is too long for this file system") from exc
        raise ImageLoadError(f"{path}: corrupt or truncated image ({exc})") from exc
    except (ValueError, SyntaxError, MemoryError, EOFError, TypeError, IndexError,
            KeyError, struct.error, ZeroDivisionError, OverflowError) as exc:
        # Pillow's decoders raise all of these on malformed headers (found by fuzzing).
        raise ImageLoadError(f"{path}: corrupt or truncated image ({type(exc).__name__}: {exc})") from exc


def check_settings() -> None:
    """Check the environment variables image loading reads (``$VISION_TL_MAX_IMAGE_PIXELS``,
    ``$VISION_TL_JPEG_DECODER``), so that a command stops with one clear error before any
    work instead of at its first image, deep inside a loop.

    Raises:
        ValueError: a variable's value is not valid (its name and the valid values in the message).
    """
    max_image_pixels()
    fast_jpeg_decoder()


def fast_jpeg_decoder():
    """The simplejpeg module if :func:`load_rgb` may decode JPEGs with it, else None.

    Checked once per process: simplejpeg must import, ``$VISION_TL_JPEG_DECODER`` must not be
    ``pillow``, and it must give Pillow's pixels bit for bit on a set of JPEGs encoded here
    (4:2:0, 4:2:2 and 4:4:4 chroma, grayscale, progressive, restart markers, odd sizes). Where
    any differs, every image goes through Pillow, so a model never sees other pixels than on
    a machine without simplejpeg. JPEGs in chroma layouts the check cannot cover (4:4:0,
    4:1:1 ...) always go through Pillow.
    """
    global _fast_jpeg
    if _fast_jpeg is not None:
        return _fast_jpeg or None
    choice = os.environ.get(JPEG_DECODER_ENV, "").strip().lower()
    if choice not in ("", "auto", "pillow", "simplejpeg"):
        raise ValueError(f"{JPEG_DECODER_ENV}={choice!r} is not valid; expected auto (the default: "
                         "simplejpeg where installed and checked), simplejpeg or pillow")
    simplejpeg = None
    if choice != "pillow":
        try:
            import simplejpeg
        except ImportError:
            pass
    usable = simplejpeg is not None and _same_pixels_as_pillow(simplejpeg)
    if choice == "simplejpeg" and not usable:
        raise ValueError(f"{JPEG_DECODER_ENV}=simplejpeg, but simplejpeg is "
                         f"{'not installed' if simplejpeg is None else 'not bit-exact with Pillow here'}; "
                         "install it (pip install simplejpeg) or unset the variable")
    _fast_jpeg = simplejpeg if usable else False
    return _fast_jpeg or None


def _same_pixels_as_pillow(simplejpeg) -> bool:
    import io

    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 200, 61)[None, :, None] + np.linspace(0, 50, 37)[:, None, None]
    base = np.clip(ramp + rng.normal(0, 20, (37, 61, 3)), 0, 255).astype(np.uint8)
    cases = [("RGB", {"subsampling": 2}), ("RGB", {"subsampling": 1, "quality": 60}),
             ("RGB", {"subsampling": 0, "quality": 95}), ("L", {}),
             ("RGB", {"progressive": True}), ("RGB", {"restart_marker_blocks": 1, "optimize": True})]
    try:
        for mode, options in cases:
            buffer = io.BytesIO()
            Image.fromarray(base).convert(mode).save(buffer, "JPEG", **options)
            with Image.open(buffer) as img:
                reference = _pil_to_rgb(img)
            if not np.array_equal(_decode_jpeg_bytes(simplejpeg, buffer.getvalue()), reference):
                return False
    except Exception:  # noqa: BLE001 - any failure of the check means: use Pillow
        return False
    return True


def _decode_jpeg_bytes(simplejpeg, data: bytes, limit: int | None = None, path: Path | None = None):
    """``H x W x 3`` uint8 pixels, or None for a JPEG simplejpeg does not take (CMYK, 12-bit,
    malformed, cut off: Pillow then decodes it or says what is wrong).

    Raises:
        ImageLoadError: over ``limit``; or, with ``path`` given, damaged scan data (see
            :func:`_damaged_scan`), which Pillow would decode without a word to grey or garbled pixels.
    """
    try:
        header = _checked_header(simplejpeg, data)
    except Exception:  # noqa: BLE001 - a header libjpeg has something to say about: Pillow decides
        return None
    if header is None:
        return None
    height, width, gray = header
    if limit is not None and height * width > limit:
        raise _too_large(path, f"{width}x{height} = {height * width:,} pixels", limit)
    try:
        pixels = simplejpeg.decode_jpeg(data, colorspace="GRAY" if gray else "RGB", strict=True)
    except Exception as exc:  # noqa: BLE001 - simplejpeg's ValueError/RuntimeError; Pillow decides
        if path is not None and _damaged_scan(str(exc), data):
            raise ImageLoadError(
                f"{path}: damaged JPEG data (libjpeg: {exc}); it would decode with part of the image grey or "
                "garbled, so it is refused, in training and on the line alike: copy or capture the file again"
            ) from None
        return None
    if pixels.ndim != 3 or pixels.shape[:2] != (height, width) or 0 in pixels.shape:
        return None
    return np.repeat(pixels, 3, axis=2) if gray else pixels


def _damaged_scan(message: str, data: bytes) -> bool:
    """Whether libjpeg's complaint (simplejpeg's strict mode turns its warnings into errors) is
    about the compressed pixel data itself: a header it warns about fails earlier, in
    ``decode_jpeg_header``, and is left to Pillow. Pillow drops libjpeg's warnings, so such a
    file would pass as an image; here it costs nothing extra, as the strict decode runs anyway.
    Zero bytes padding a scan's data before the marker that follows it (the end marker, or the
    next scan's tables in a progressive JPEG) are not damage; nor is anything while the process
    allows damaged images (``ImageFile.LOAD_TRUNCATED_IMAGES``). The padding is looked for
    anywhere in the file, not at its last end marker: a camera's second picture (MPF) or a
    trailer after the image ends with an end marker of its own."""
    if not message.startswith("Corrupt JPEG data") or ImageFile.LOAD_TRUNCATED_IMAGES:
        return False
    padding = re.match(r"Corrupt JPEG data: (\d+) extraneous bytes before marker 0x([0-9a-f]{2})", message)
    if padding:
        return bytes(int(padding[1])) + bytes((0xFF, int(padding[2], 16))) not in data
    return True


def _checked_header(simplejpeg, data: bytes) -> tuple[int, int, bool] | None:
    """``(height, width, gray)`` of a JPEG in a layout the check covers, else None."""
    height, width, colorspace, subsampling = simplejpeg.decode_jpeg_header(data)
    return (height, width, colorspace == "Gray") if (colorspace, subsampling) in _CHECKED_LAYOUTS else None


def _jpeg_bytes(path: Path) -> bytes | None:
    """The file's bytes if it is a JPEG (read after its first 3 bytes say so), else None."""
    with open(path, "rb") as f:
        head = f.read(len(_JPEG_MAGIC))
        return head + f.read() if head == _JPEG_MAGIC else None


def _load_jpeg_fast(simplejpeg, path: Path, limit: int) -> np.ndarray | None:
    data = _jpeg_bytes(path)
    return None if data is None else _decode_jpeg_bytes(simplejpeg, data, limit, path)


def _load_tiff_fallback(path: Path, limit: int, cause: Exception) -> np.ndarray:
    """TIFFs Pillow cannot read (float RGB, 16-bit RGB planar ...) via the optional tifffile package."""
    try:
        import tifffile
    except ImportError:
        raise ImageLoadError(
            f"{path}: a TIFF variant Pillow cannot decode (e.g. float or multi-sample 16-bit); "
            "install tifffile (pip install tifffile) or convert it to 8/16-bit PNG"
        ) from cause
    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages[0]
            pixels = int(np.prod(page.shape[:2]))
            if pixels > limit:
                raise _too_large(path, f"{page.shape[1]}x{page.shape[0]} = {pixels:,} pixels", limit)
            arr = page.asarray()
            extra = tuple(page.extrasamples or ())
    except ImageLoadError:
        raise
    except Exception as exc:  # noqa: BLE001 - tifffile raises many types; all mean "unreadable TIFF"
        raise ImageLoadError(f"{path}: corrupt or unsupported TIFF ({type(exc).__name__}: {exc})") from exc
    if arr.ndim in (2, 3) and 0 in arr.shape[:2]:
        raise ImageLoadError(f"{path}: the TIFF holds no pixels ({arr.shape[1]}x{arr.shape[0]}); "
                             "expected an image of at least 1x1 pixels")
    if arr.ndim == 3 and arr.shape[2] == 4 and extra[:1] == (2,):  # unassociated alpha: onto black, as elsewhere
        alpha = arr[:, :, 3:].astype(np.float64)
        alpha = alpha / np.iinfo(arr.dtype).max if np.issubdtype(arr.dtype, np.integer) else np.clip(alpha, 0, 1)
        composited = arr[:, :, :3] * alpha
        arr = composited.round().astype(arr.dtype) if np.issubdtype(arr.dtype, np.integer) else composited
    if arr.ndim == 3 and arr.shape[2] in (3, 4):  # (associated alpha: the colours are on black already)
        arr = _to_uint8(arr[:, :, :3], path)
    elif arr.ndim == 2:
        arr = np.repeat(_to_uint8(arr, path)[:, :, None], 3, axis=2)
    else:
        raise ImageLoadError(f"{path}: unsupported TIFF layout {arr.shape}; expected H x W or H x W x 3/4")
    return np.ascontiguousarray(arr)


def load_rgb_into(path: str | Path, out: np.ndarray, interpolation: str = "bicubic") -> None:
    """Write ``resize(load_rgb(path), out.shape[:2], interpolation)`` into ``out`` (``H x W x 3``
    uint8, C-contiguous: a row of a batch buffer), the same pixels without the copies between.

    A JPEG that already has ``out``'s size decodes straight into it (with simplejpeg, see
    :func:`fast_jpeg_decoder`), other JPEGs from the bytes read for that; anything else goes
    through :func:`load_rgb` and :func:`resize`.

    Raises:
        ImageLoadError: as :func:`load_rgb`; ``out`` may then hold part of an image.
    """
    path = Path(path)
    limit = max_image_pixels()
    simplejpeg = fast_jpeg_decoder()
    if simplejpeg is not None:
        try:
            data = _jpeg_bytes(path)
        except OSError:
            data = None  # missing, a directory, unreadable: load_rgb names the problem
        if data is not None:
            if _decode_jpeg_into(simplejpeg, data, out, limit):
                return
            pixels = _decode_jpeg_bytes(simplejpeg, data, limit, path)
            if pixels is not None:
                out[...] = resize(pixels, out.shape[:2], interpolation)
                return
    out[...] = resize(load_rgb(path), out.shape[:2], interpolation)


def _decode_jpeg_into(simplejpeg, data: bytes, out: np.ndarray, limit: int) -> bool:
    """Decode a colour JPEG of exactly ``out``'s size into ``out``; False when that is not the
    case or anything fails (the caller then takes the general path, which names the problem)."""
    if (out.dtype != np.uint8 or out.ndim != 3 or out.shape[2] != 3 or not out.flags.c_contiguous
            or not out.flags.writeable):
        return False
    try:
        header = _checked_header(simplejpeg, data)
        if header is None or header[2] or header[:2] != out.shape[:2] or header[0] * header[1] > limit:
            return False  # not a colour JPEG of out's size within the pixel limit
        simplejpeg.decode_jpeg(data, colorspace="RGB", strict=True, buffer=out)
    except Exception:  # noqa: BLE001 - damaged or odd: the general path says what is wrong
        return False
    return True


def normalisation_constants(mean, std) -> tuple[np.ndarray, np.ndarray]:
    """float32 ``mean * 255`` and ``1 / (std * 255)`` (``mean`` and ``std`` on the 0..1 scale).

    Every path that normalises pixels (training's transforms, the device pipeline, the ONNX
    graph, the predictor for a float-input graph) computes ``(x - mean) * inv_std`` in float32
    with these, so all give the same input tensor bit for bit.
    """
    mean255 = np.asarray(mean, np.float32) * np.float32(255.0)
    inv_std255 = np.float32(1.0) / (np.asarray(std, np.float32) * np.float32(255.0))
    return mean255, inv_std255


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
