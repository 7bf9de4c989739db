"""Torch-free inference on exported ONNX classifiers (onnxruntime + numpy + Pillow).

Images are decoded with :func:`vision_tl.imaging.load_rgb` and resized with
:func:`vision_tl.imaging.resize`, the same two functions training uses, so the
model sees on the line exactly the pixels it was validated on.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vision_tl.deploy.metadata import (
    PREFIX,
    DeployError,
    MetadataError,
    ModelMetadata,
    open_session,
    ort_errors,
    sibling,
)
from vision_tl.imaging import (
    IMAGE_EXTENSIONS,
    ImageLoadError,
    check_settings,
    image_files,
    load_rgb,
    normalisation_constants,
    resize,
)
from vision_tl.utils import usable_cores, whole_number
from vision_tl.utils.files import refuse_empty_path

_ORT_TYPES = {"uint8": "tensor(uint8)", "float32": "tensor(float)"}
UNFAMILIARITY_OUTPUT = "unfamiliarity"  # the graph's second output, where it has one
# How a missing/invalid key can be supplied: (Python argument, command-line option).
_ARG_HINTS = {
    "classes": ("classes=['good', 'scratch', ...]", "--classes good,scratch,..."),
    "input_size": ("input_size=(H, W)", "--input-size H,W"),
    "mean": ("mean=(r, g, b)", "--mean 0.485,0.456,0.406"),
    "std": ("std=(r, g, b)", "--std 0.229,0.224,0.225"),
    "interpolation": ("interpolation='bicubic'", "--interpolation bicubic"),
}


def probability_text(value: float) -> str:
    """A probability as every predictions CSV writes it: 9 significant digits, which give a
    float32 back exactly, so ``is_defect`` and a report's rates can be recomputed from the file
    (6 decimals made 0.99809271 and 0.99809307 one value, on either side of a threshold).

    Example:
        >>> probability_text(0.99809271)
        '0.99809271'
    """
    return f"{float(value):.9g}"


def prediction_columns(classes: Sequence[str], *, true: bool = True, error: bool = True,
                       unfamiliar: bool = False) -> list[str]:
    """The columns of every predictions CSV the kit writes, in one order: ``path``, ``true``
    (the labelled class; not in ``vision-tl predict-onnx``'s, which has no labels), ``predicted``,
    ``probability`` (of ``predicted``), ``p_<class>`` per class, ``is_defect`` (``true``/``false``:
    ``P(good) < threshold``; empty without a good class, and without a threshold except in a
    report's, where the most probable class decides, as in its escape counts), with ``unfamiliar`` (a model that scores how
    unlike its training images an image is) ``unfamiliarity`` and ``unfamiliar``
    (``true``/``false``), and ``error`` (why an image could not be read; not in a report's,
    which holds only the images it evaluated).

    Example:
        >>> prediction_columns(["good", "dent"], true=False)
        ['path', 'predicted', 'probability', 'p_good', 'p_dent', 'is_defect', 'error']
    """
    return ["path", *(["true"] if true else []), "predicted", "probability", *[f"p_{c}" for c in classes],
            "is_defect", *(["unfamiliarity", "unfamiliar"] if unfamiliar else []), *(["error"] if error else [])]


@dataclass
class Prediction:
    """The result for one image.

    Attributes:
        path: the image path, as given.
        predicted: the most probable class, or None when the image failed.
        probability: the probability of ``predicted`` (None when failed).
        probabilities: class name -> probability (empty when failed).
        is_defect: ``P(good_class) < threshold`` when the model metadata has
            both ``good_class`` and ``threshold``; otherwise None.
        error: why the image could not be used (None when it was predicted).
        unfamiliarity: for a model with the ``unfamiliarity`` output, how unlike every
            training image the image is (1 - the best cosine similarity of their features);
            otherwise None.
        unfamiliar: ``unfamiliarity > unfamiliar_threshold`` (the model's metadata): the image
            is unlike every training image (camera, lighting, product?); None without the output.
    """

    path: str
    predicted: str | None = None
    probability: float | None = None
    probabilities: dict[str, float] = field(default_factory=dict)
    is_defect: bool | None = None
    error: str | None = None
    unfamiliarity: float | None = None
    unfamiliar: bool | None = None

    def to_dict(self, unfamiliar: bool = True) -> dict[str, Any]:
        """A JSON-ready dict; without ``unfamiliarity`` and ``unfamiliar`` when ``unfamiliar`` is
        False (the keys of a model that does not score it)."""
        out = asdict(self)
        if not unfamiliar:
            del out["unfamiliarity"], out["unfamiliar"]
        return out


@dataclass
class ImageScan:
    """What :func:`scan_images` found under a folder.

    Attributes:
        images: the paths to predict, in sorted order: supported image files, plus
            broken or looping symbolic links with an image name (each becomes an
            error row when predicted, so it is not silently lost).
        ignored: visible files that are skipped: other extensions (``.gif``,
            ``.txt`` ...), non-regular files and dangling links without an image name.
    """

    images: list[Path]
    ignored: list[Path] = field(default_factory=list)


def scan_images(folder: str | Path) -> ImageScan:
    """Like :func:`list_images`, but also returns the files that were skipped.

    Raises:
        DeployError: the path does not exist, or the folder holds no image.
    """
    refuse_empty_path(folder, "image file or folder", DeployError)
    root = Path(folder)
    if root.is_file() or (root.is_symlink() and not root.exists()):
        # Named explicitly: returned whatever it is, so a bad file becomes an error row.
        return ImageScan([root])
    if not root.exists():
        raise DeployError(f"{root}: no such file or folder")
    if not root.is_dir():
        raise DeployError(f"{root}: not a regular file or folder")
    found, ignored = image_files(root)
    if not found:
        skipped = ""
        if ignored:
            examples = ", ".join(p.name for p in ignored[:3])
            skipped = f"; ignored {len(ignored)} other file(s), e.g. {examples}"
        raise DeployError(
            f"{root}: no images found (searched recursively for "
            f"{', '.join(IMAGE_EXTENSIONS)}{skipped})"
        )
    return ImageScan(found, ignored)


def list_images(folder: str | Path) -> list[Path]:
    """All supported images under ``folder``, recursively, in sorted order.

    Hidden files and folders (name starting with ".") are skipped, and so are
    files with other extensions (:func:`scan_images` lists those). A broken or
    looping symbolic link with an image name is kept, so that it shows up as an
    error row. A path to a file is returned as a one-element list, whatever its
    extension, so a bad file shows up as an error row rather than being
    silently ignored.

    Raises:
        DeployError: the path does not exist, or the folder holds no image.
    """
    return scan_images(folder).images


def check_image_settings() -> None:
    """:func:`vision_tl.imaging.check_settings`, a bad ``$VISION_TL_MAX_IMAGE_PIXELS`` or
    ``$VISION_TL_JPEG_DECODER`` raised as :class:`DeployError`."""
    try:
        check_settings()
    except ValueError as exc:
        raise DeployError(str(exc)) from exc


class Predictor:
    """Classify images with an exported ONNX model, without torch.

    The preprocessing (input size, interpolation, normalisation, layout) comes
    from the model's ``vision_tl.*`` metadata. Keyword arguments override it,
    or supply it for an ONNX model exported by another tool.

    Example:
        >>> predictor = Predictor("model.onnx", threads=4)  # doctest: +SKIP
        >>> for p in predictor.predict_paths("line3/today/"):  # doctest: +SKIP
        ...     print(p.path, p.predicted, f"{p.probability:.3f}", p.is_defect, p.error)

    Args:
        model_path: the ``.onnx`` file.
        classes: class names in output-column order (a list, or "a,b,c").
        input_size: ``(height, width)``, or one int for a square input.
        mean: per-channel mean on the 0..1 scale (used when the graph expects
            normalised float input).
        std: per-channel standard deviation on the 0..1 scale.
        interpolation: "bicubic", "bilinear", "nearest" or "lanczos".
        threads: onnxruntime ``intra_op_num_threads`` (None: its default).
        providers: onnxruntime execution providers (default: CPU only).

    Raises:
        DeployError: the file is missing or not ONNX, required information is
            missing (the message says which arguments supply it), or the
            metadata disagrees with the graph.
    """

    def __init__(
        self,
        model_path: str | Path,
        *,
        classes: Sequence[str] | str | None = None,
        input_size: int | Sequence[int] | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        interpolation: str | None = None,
        threads: int | None = None,
        providers: Sequence[Any] | None = None,
    ):
        self.model_path = Path(model_path)
        checked = _check_parity_record(self.model_path) if self.model_path.is_file() else None
        # (made from the very bytes checked: an export replacing the file meanwhile changes nothing)
        self._session = open_session(self.model_path, threads=threads, providers=providers, data=checked)
        props = dict(self._session.get_modelmeta().custom_metadata_map)
        self.has_vision_tl_metadata = any(key.startswith(PREFIX) for key in props)
        self._input = self._single_input()
        overrides = _override_props(classes, input_size, mean, std, interpolation)
        if not self.has_vision_tl_metadata:
            props = {**_graph_defaults(self._input), **props}
        if self.has_vision_tl_metadata:
            self._check_stored(props)
        stored_interpolation = props.get(PREFIX + "interpolation")
        stored = {k: props.get(PREFIX + k) for k in ("mean", "std")} if self.has_vision_tl_metadata else {}
        self._check_classes(overrides.get(PREFIX + "classes"), props.get(PREFIX + "classes"))
        props.update(overrides)
        self.metadata = self._parse_metadata(props, set(overrides))
        self._check_overrides(mean, std, stored_interpolation, stored)
        self._max_batch = self._check_input()
        self._output_name = self._check_output()
        self._unfamiliarity_name = self._check_unfamiliarity_output()
        self._warned_softmax = False

    # ------------------------------------------------------------ properties

    @property
    def classes(self) -> list[str]:
        """Class names in output-column order."""
        return list(self.metadata.classes)

    @property
    def scores_unfamiliarity(self) -> bool:
        """Whether the model has the ``unfamiliarity`` output (each :class:`Prediction` then
        carries ``unfamiliarity`` and ``unfamiliar``)."""
        return self._unfamiliarity_name is not None

    def __repr__(self) -> str:
        meta = self.metadata
        return (
            f"Predictor({str(self.model_path)!r}, classes={meta.classes}, "
            f"input_size={meta.input_size}, input={meta.input_dtype} {meta.layout})"
        )

    # ----------------------------------------------------------- prediction

    def preprocess(self, image: np.ndarray) -> np.ndarray:
        """Turn one decoded image into one graph input (without the batch axis).

        Args:
            image: ``H x W x 3`` uint8 RGB; grayscale ``H x W`` or ``H x W x 1``
                is repeated to three channels.

        Returns:
            ``H x W x 3`` uint8 for the default (NHWC, uint8) graph, or a
            normalised ``3 x H x W`` float32 array for a float NCHW graph.

        Raises:
            DeployError: wrong dtype or channel count (the message names the shape).
        """
        arr = np.asarray(image)
        if arr.dtype != np.uint8:
            raise DeployError(
                f"expected a uint8 image, got dtype {arr.dtype} with shape {arr.shape}; "
                "decode image files with vision_tl.imaging.load_rgb"
            )
        if arr.ndim == 2:
            arr = arr[:, :, None]
        if arr.ndim != 3 or arr.shape[2] not in (1, 3) or 0 in arr.shape:
            raise DeployError(
                f"expected an H x W x 3 RGB image (or H x W / H x W x 1 grayscale), "
                f"got shape {tuple(np.shape(image))}"
            )
        if arr.shape[2] == 1:
            arr = np.repeat(arr, 3, axis=2)
        meta = self.metadata
        x: np.ndarray = resize(np.ascontiguousarray(arr), meta.input_size, meta.interpolation)
        if not meta.normalize_in_graph:  # training's arithmetic, so the same input to the last bit
            mean255, inv_std255 = normalisation_constants(meta.mean, meta.std)
            x = (x.astype(np.float32) - mean255) * inv_std255
        x = x.astype(np.uint8 if meta.input_dtype == "uint8" else np.float32, copy=False)
        if meta.layout == "NCHW":
            x = x.transpose(2, 0, 1)
        return np.ascontiguousarray(x)

    def predict_arrays(self, images: Iterable[np.ndarray] | np.ndarray, *,
                       batch_size: int = 32) -> np.ndarray:
        """Class probabilities for decoded images.

        Args:
            images: a list (or other iterable) of ``H x W x 3`` uint8 arrays (any
                size; each is resized; ``H x W`` grayscale is accepted too), or one
                ``N x H x W x 3`` / ``N x H x W x 1`` array. One ``H x W x 3`` image
                must be wrapped: ``[image]`` or ``image[None]``.
            batch_size: images per onnxruntime call.

        Returns:
            float32 array ``[len(images), len(classes)]``, columns in
            :attr:`classes` order.

        Raises:
            DeployError: a single image instead of a collection, or an image of the
                wrong dtype or shape (the message names its index).
        """
        return self._run_arrays(images, batch_size)[0]

    def unfamiliarity_arrays(self, images: Iterable[np.ndarray] | np.ndarray, *,
                             batch_size: int = 32) -> np.ndarray:
        """How unlike every training image each decoded image is (the ``unfamiliarity`` output);
        images as for :meth:`predict_arrays`. Above ``metadata.unfamiliar_threshold``: unlike
        them all.

        Returns:
            float32 array ``[len(images)]``.

        Raises:
            DeployError: the model has no ``unfamiliarity`` output, or a bad image.
        """
        if self._unfamiliarity_name is None:
            raise DeployError(f"{self.model_path}: this model has no 'unfamiliarity' output; export it again "
                              "with its training and validation images at hand (vision-tl export, without "
                              "--no-unfamiliar)")
        return self._run_arrays(images, batch_size)[1]

    def outputs_arrays(self, images: Iterable[np.ndarray] | np.ndarray, *,
                       batch_size: int = 32) -> tuple[np.ndarray, np.ndarray | None]:
        """:meth:`predict_arrays` and, for a model with the ``unfamiliarity`` output,
        :meth:`unfamiliarity_arrays` (else None) from one pass of the model over the images."""
        return self._run_arrays(images, batch_size)

    def _run_arrays(self, images: Iterable[np.ndarray] | np.ndarray,
                    batch_size: int) -> tuple[np.ndarray, np.ndarray | None]:
        size = _check_batch_size(batch_size)
        items = _image_list(images)
        rows = [np.zeros((0, len(self.metadata.classes)), np.float32)]
        scores = [np.zeros(0, np.float32)]
        for start in range(0, len(items), size):
            batch = np.stack([self._preprocess_at(i, items[i])
                              for i in range(start, min(start + size, len(items)))])
            probabilities, unfamiliarity = self._run(batch)
            rows.append(probabilities)
            if unfamiliarity is not None:
                scores.append(unfamiliarity)
        return np.concatenate(rows, axis=0), (np.concatenate(scores) if self.scores_unfamiliarity else None)

    def predict_paths(
        self,
        paths: Iterable[str | Path] | str | Path,
        batch_size: int = 32,
        *,
        on_progress: Callable[[int], None] | None = None,
        decode_threads: int | None = None,
    ) -> list[Prediction]:
        """Predict image files; an unreadable image becomes an error row, never a crash.

        Images are decoded and resized on ``decode_threads`` threads, the next batch while the
        model runs the current one (JPEG decoding and Pillow's resize release the GIL; the pixels
        are the same as on one thread).

        Args:
            paths: one folder or file (``str`` or ``pathlib.Path``; a folder is expanded
                with :func:`list_images`), or any iterable of image paths (a list, a
                generator ...).
            batch_size: images decoded and run together (any positive integer,
                numpy integers included).
            on_progress: called with the number of images done after each batch.
            decode_threads: threads that decode (default :func:`default_decode_threads`);
                0 decodes on the calling thread, between batches.

        Returns:
            One :class:`Prediction` per path, in input order.

        Raises:
            DeployError: ``paths``, ``batch_size`` or ``decode_threads`` is of the wrong kind, the
                folder holds no image, or ``$VISION_TL_MAX_IMAGE_PIXELS`` or
                ``$VISION_TL_JPEG_DECODER`` is invalid.
        """
        size = _check_batch_size(batch_size)
        threads = default_decode_threads() if decode_threads is None else _check_decode_threads(decode_threads)
        paths = _path_list(paths)
        check_image_settings()  # a bad environment variable: one clear error, not one per row
        results: list[Prediction] = []

        def decoded(i: int) -> np.ndarray | ImageLoadError:
            try:
                return self.preprocess(load_rgb(paths[i]))
            except ImageLoadError as exc:
                return exc

        batches = [range(start, min(start + size, len(paths))) for start in range(0, len(paths), size)]
        pool = ThreadPoolExecutor(threads, thread_name_prefix="vision_tl-decode") if threads else None
        ahead: deque[list[Future]] = deque()
        try:
            for b, batch in enumerate(batches):
                for later in batches[b + len(ahead): b + 2] if pool else ():  # this batch and the next
                    ahead.append([pool.submit(decoded, i) for i in later])
                images = [f.result() for f in ahead.popleft()] if pool else [decoded(i) for i in batch]
                results += self._batch_predictions([str(paths[i]) for i in batch], images)
                if on_progress is not None:
                    on_progress(len(batch))
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
        return results

    def _batch_predictions(self, names: list[str], images: list[np.ndarray | ImageLoadError]) -> list[Prediction]:
        """One batch's predictions, in order: an image that could not be decoded is an error row."""
        predictions: list[Prediction | None] = [None] * len(names)
        indices, inputs = [], []
        for k, image in enumerate(images):
            if isinstance(image, ImageLoadError):
                predictions[k] = Prediction(path=names[k], error=str(image))
            else:
                indices.append(k)
                inputs.append(image)
        if inputs:
            probabilities, unfamiliarity = self._run(np.stack(inputs))
            for j, (k, row) in enumerate(zip(indices, probabilities)):
                predictions[k] = self._prediction(names[k], row, None if unfamiliarity is None else unfamiliarity[j])
        return predictions

    # ------------------------------------------------------------- internals

    def _preprocess_at(self, index: int, image: np.ndarray) -> np.ndarray:
        try:
            return self.preprocess(image)
        except DeployError as exc:
            raise DeployError(f"images[{index}]: {exc}") from exc

    def _check_stored(self, props: dict[str, str]) -> None:
        """A vision_tl model's own metadata, before any argument overrides it: a value the file
        holds but that does not parse was damaged after export, and no argument can stand in
        for what the model was trained and checked with (a key missing from an older export can)."""
        try:
            ModelMetadata.from_props(props, str(self.model_path))
        except MetadataError as exc:
            if exc.malformed and "format_version" not in exc.malformed:  # (a newer kit's: said below)
                problems = "; ".join(f"invalid {key}: {reason}" for key, reason in exc.malformed.items())
                raise DeployError(f"{self.model_path}: its vision_tl metadata is damaged ({problems}); export the "
                                  "model again from its checkpoint (vision-tl export CHECKPOINT --out MODEL.onnx)"
                                  ) from exc

    def _check_classes(self, given: str | None, stored: str | None) -> None:
        """Refuse class names other than those a vision_tl model carries: they name its output
        columns, so others would relabel every prediction and move the defect decision."""
        if given is None or stored is None or not self.has_vision_tl_metadata:
            return
        try:
            same = json.loads(given) == json.loads(stored)
        except ValueError:
            return  # malformed stored metadata: the metadata check names it
        if not same:
            raise DeployError(
                f"{self.model_path}: its metadata names its output columns {', '.join(json.loads(stored))} "
                f"(in that order); other names, {', '.join(json.loads(given))}, would relabel every prediction "
                "and the good/defect decision; leave out classes= (on the command line --classes)")

    def _check_overrides(self, mean: Any, std: Any, stored_interpolation: str | None,
                         stored: dict[str, str | None]) -> None:
        """Refuse mean/std that would be ignored or would replace the ones the model was trained
        with; warn when the resize differs from the model's."""
        meta = self.metadata
        given = [name for name, value in (("mean", mean), ("std", std)) if value is not None]
        names = " and ".join(given)
        flags = " / ".join(f"--{name}" for name in given)
        args = " and ".join(f"{name}=" for name in given)
        if given and meta.normalize_in_graph:
            raise DeployError(
                f"{self.model_path}: {names} cannot be applied to this model: it takes uint8 "
                f"pixels and normalises them inside the graph (normalize_in_graph=true), so "
                f"{names} would be ignored; leave out {args} (on the command line {flags})"
            )
        differ = [name for name in given if stored.get(name) is not None
                  and json.loads(stored[name]) != list(getattr(meta, name))]
        if differ:
            recorded = "; ".join(f"{name} {stored[name]}" for name in differ)
            raise DeployError(
                f"{self.model_path}: its metadata records the normalisation it was trained and checked with "
                f"({recorded}); other values would change every prediction; leave out "
                f"{' and '.join(f'{name}=' for name in differ)} (on the command line "
                f"{' / '.join(f'--{name}' for name in differ)})")
        if (self.has_vision_tl_metadata and stored_interpolation is not None
                and meta.interpolation != stored_interpolation):
            warnings.warn(
                f"{self.model_path}: interpolation {meta.interpolation!r} differs from "
                f"{stored_interpolation!r}, the resize this model was trained and validated "
                "with; its predictions will differ from the validated ones",
                UserWarning,
                stacklevel=3,
            )

    def _prediction(self, path: str, row: np.ndarray, unfamiliarity: np.floating | None = None) -> Prediction:
        meta = self.metadata
        probabilities = {name: float(p) for name, p in zip(meta.classes, row)}
        best = int(np.argmax(row))
        is_defect = None
        if meta.good_class is not None and meta.threshold is not None:
            is_defect = bool(probabilities[meta.good_class] < meta.threshold)
        prediction = Prediction(path, meta.classes[best], float(row[best]), probabilities, is_defect)
        if unfamiliarity is not None:
            prediction.unfamiliarity = float(unfamiliarity)
            if meta.unfamiliar_threshold is not None:  # (the float32 score, exactly, against the stored one)
                prediction.unfamiliar = bool(float(unfamiliarity) > meta.unfamiliar_threshold)
        return prediction

    def _run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Run a stacked batch, in pieces when the graph has a fixed batch size: probabilities
        and, for a model with that output, unfamiliarity."""
        step = self._max_batch or len(batch)
        outs = [self._run_once(batch[i:i + step]) for i in range(0, len(batch), step)]
        probabilities = np.concatenate([o[0] for o in outs], axis=0)
        if self._unfamiliarity_name is None:
            return probabilities, None
        return probabilities, np.concatenate([o[1] for o in outs], axis=0)

    def _run_once(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        if self._max_batch is not None and len(batch) < self._max_batch:
            pad = np.repeat(batch[-1:], self._max_batch - len(batch), axis=0)
            probabilities, unfamiliarity = self._run_once(np.concatenate([batch, pad]))
            return probabilities[: len(batch)], None if unfamiliarity is None else unfamiliarity[: len(batch)]
        names = [self._output_name] + ([self._unfamiliarity_name] if self._unfamiliarity_name else [])
        try:
            out, *rest = self._session.run(names, {self._input.name: batch})
        except ort_errors() as exc:
            raise DeployError(
                f"{self.model_path}: inference failed on input of shape {batch.shape} "
                f"({batch.dtype}): {str(exc).strip().splitlines()[0] if str(exc) else exc!r}"
            ) from exc
        out = np.asarray(out, dtype=np.float32)
        n_classes = len(self.metadata.classes)
        if out.ndim != 2 or out.shape != (len(batch), n_classes):
            raise DeployError(
                f"{self.model_path}: output {self._output_name!r} has shape {out.shape}, expected "
                f"({len(batch)}, {n_classes}) for {n_classes} classes {self.metadata.classes}"
            )
        if not np.isfinite(out).all():  # argmax would call NaN rows the first class, "good" often
            bad = int((~np.isfinite(out)).any(axis=1).sum())
            raise DeployError(
                f"{self.model_path}: the model gave NaN or infinite outputs for {bad} of {len(batch)} images; a "
                "sound model never does, so the file is most likely damaged: copy it again from where it was "
                "exported (its sha256 is in its .parity.json), or export it again")
        if not self.has_vision_tl_metadata and not _looks_like_probabilities(out):
            out = self._softmax_foreign(out)
        return out, (self._checked_unfamiliarity(rest[0], len(batch)) if rest else None)

    def _checked_unfamiliarity(self, scores: Any, n: int) -> np.ndarray:
        scores = np.asarray(scores, dtype=np.float32)
        if scores.shape != (n,):
            raise DeployError(f"{self.model_path}: output {self._unfamiliarity_name!r} has shape {scores.shape}, "
                              f"expected ({n},), one score per image")
        if not np.isfinite(scores).all():  # (a NaN is never above a threshold: it would pass silently)
            raise DeployError(
                f"{self.model_path}: the model gave NaN or infinite unfamiliarity scores for "
                f"{int((~np.isfinite(scores)).sum())} of {n} images; a sound model never does, so the file is most "
                "likely damaged: copy it again from where it was exported, or export it again")
        return scores

    def _softmax_foreign(self, logits: np.ndarray) -> np.ndarray:
        if not self._warned_softmax:
            warnings.warn(
                f"{self.model_path}: the model outputs do not sum to 1 (logits?); applying "
                "softmax so that probabilities are comparable",
                stacklevel=4,
            )
            self._warned_softmax = True
        shifted = logits - logits.max(axis=1, keepdims=True)
        exp = np.exp(shifted)
        return (exp / exp.sum(axis=1, keepdims=True)).astype(np.float32)

    def _single_input(self) -> Any:
        inputs = self._session.get_inputs()
        if len(inputs) != 1:
            names = ", ".join(f"{i.name} {i.type} {i.shape}" for i in inputs)
            raise DeployError(
                f"{self.model_path}: expected a graph with exactly one image input, found "
                f"{len(inputs)}: {names}"
            )
        return inputs[0]

    def _parse_metadata(self, props: dict[str, str], overridden: set[str]) -> ModelMetadata:
        try:
            return ModelMetadata.from_props(props, str(self.model_path))
        except MetadataError as exc:
            raise DeployError(self._metadata_message(exc, overridden)) from exc

    def _metadata_message(self, exc: MetadataError, overridden: set[str]) -> str:
        problems = [f"missing {key}" for key in exc.missing]
        for key, reason in exc.malformed.items():
            origin = f"the {key}= argument" if PREFIX + key in overridden else "the file"
            if key == "good_class" and PREFIX + "classes" in overridden:
                origin = "the file, checked against the classes= argument"
            problems.append(f"invalid {key} (from {origin}): {reason}")
        if self.has_vision_tl_metadata:
            head = f"{self.model_path}: the vision_tl metadata is incomplete or invalid"
        else:
            head = (
                f"{self.model_path}: this ONNX model has no vision_tl metadata (it was not "
                "exported by vision_tl), so its preprocessing must be given explicitly"
            )
        keys = exc.missing + list(exc.malformed)
        hints = [_ARG_HINTS[k] for k in keys if k in _ARG_HINTS]
        message = f"{head}; " + "; ".join(problems) + "."
        if hints:
            message += (
                " Supply them as Predictor(" + ", ".join(h[0] for h in hints) + ") or on the "
                "command line with " + " ".join(h[1] for h in hints) + "."
            )
        if any(k not in _ARG_HINTS for k in keys):
            message += " Other keys cannot be overridden: re-export the model with vision_tl."
        return message

    def _check_input(self) -> int | None:
        """Check the graph input against the metadata; return its fixed batch size, if any."""
        meta, inp, path = self.metadata, self._input, self.model_path
        if inp.type != _ORT_TYPES[meta.input_dtype]:
            raise DeployError(
                f"{path}: metadata says the input is {meta.input_dtype} but graph input "
                f"{inp.name!r} is {inp.type}"
            )
        shape = list(inp.shape)
        if len(shape) != 4:
            raise DeployError(
                f"{path}: graph input {inp.name!r} has shape {shape}; expected 4 dimensions "
                f"({meta.layout})"
            )
        axes = {"N": 0, "H": 1, "W": 2, "C": 3} if meta.layout == "NHWC" else {
            "N": 0, "C": 1, "H": 2, "W": 3}
        fixed = {k: shape[a] for k, a in axes.items() if isinstance(shape[a], int) and shape[a] > 0}
        expected = {"C": 3, "H": meta.input_size[0], "W": meta.input_size[1]}
        wrong = [k for k, v in expected.items() if k in fixed and fixed[k] != v]
        if wrong:
            raise DeployError(
                f"{path}: graph input {inp.name!r} has fixed shape {shape} ({meta.layout}), which "
                f"does not match 3 channels and input_size {list(meta.input_size)}"
            )
        return fixed.get("N")

    def _check_output(self) -> str:
        outputs = self._session.get_outputs()
        named = [o for o in outputs if o.name == "probabilities"]
        out = named[0] if named else outputs[0]
        shape = list(out.shape)
        n_classes = len(self.metadata.classes)
        if len(shape) != 2:
            raise DeployError(
                f"{self.model_path}: output {out.name!r} has shape {shape}; expected "
                f"[N, {n_classes}] (one column per class)"
            )
        if isinstance(shape[1], int) and shape[1] != n_classes:
            raise DeployError(
                f"{self.model_path}: the model outputs {shape[1]} classes but {n_classes} class "
                f"names were given: {self.metadata.classes}"
            )
        return out.name

    def _check_unfamiliarity_output(self) -> str | None:
        """The ``unfamiliarity`` output's name, or None where the graph has none (or, without a
        threshold in the metadata, one of another shape than ``[N]``: some other model's output
        of that name, which predicted before this output existed); a model whose metadata gives
        its threshold must have it, as ``[N]``."""
        named = [o for o in self._session.get_outputs() if o.name == UNFAMILIARITY_OUTPUT]
        if not named:
            if self.metadata.flags_unfamiliar:
                raise DeployError(
                    f"{self.model_path}: its metadata gives an unfamiliar_threshold, but the graph has no "
                    f"{UNFAMILIARITY_OUTPUT!r} output (outputs: "
                    f"{', '.join(o.name for o in self._session.get_outputs())}); export the model again from "
                    "its checkpoint (vision-tl export CHECKPOINT --out MODEL.onnx)")
            return None
        shape = list(named[0].shape)
        if len(shape) != 1 and not self.metadata.flags_unfamiliar:
            return None  # another model's output of that name (no threshold claims it): not read
        if len(shape) != 1:
            raise DeployError(f"{self.model_path}: output {UNFAMILIARITY_OUTPUT!r} has shape {shape}; expected [N], "
                              "one score per image")
        return UNFAMILIARITY_OUTPUT


# ------------------------------------------------------------------ helpers


_MATCHED_RECORDS: set[tuple] = set()  # models found to match their parity record, by file identity


def _recorded_sha256(model: Path, record: Path) -> str | None:
    """The ``model_sha256`` of ``record``; None (with a warning where it cannot be read) when
    there is none to check against."""
    try:
        expected = json.loads(record.read_text(encoding="utf-8")).get("model_sha256")
    except FileNotFoundError:
        return None
    except (OSError, ValueError, AttributeError) as exc:
        warnings.warn(f"{record}: unreadable ({type(exc).__name__}), so {model.name} is not checked against the "
                      "sha256 its export recorded", stacklevel=4)
        return None
    return expected if isinstance(expected, str) else None


def _check_parity_record(model: Path, tries: int = 3, pause_s: float = 0.5) -> bytes | None:
    """``model.onnx`` against the sha256 its export recorded in ``model.parity.json`` (when that
    file lies beside it): a model damaged in a copy to the line would otherwise run, wrongly.

    Returns:
        The bytes found to match, for the session to be made from (not the file read again,
        which an export may replace in between); None when there is no record, or this process
        matched the file as it is already.

    An export that replaces the model writes its record just after it: a mismatch is looked at
    again ``tries`` times, ``pause_s`` apart, before the model is refused.
    """
    record = sibling(model, "parity", ".json")
    if not record.is_file():
        return None
    for attempt in range(tries):
        expected = _recorded_sha256(model, record)
        if expected is None:
            return None
        info = model.stat()
        # ctime too: a copy that keeps times (cp -p, rsync -t --inplace) restores mtime, not ctime
        key = (str(model.resolve()), info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns, expected)
        if key in _MATCHED_RECORDS:  # (a line PC that opens the model per lot hashes it once per process)
            return None
        data = model.read_bytes()
        if hashlib.sha256(data).hexdigest() == expected:
            _MATCHED_RECORDS.add(key)
            return data
        if attempt + 1 < tries:
            time.sleep(pause_s)
    raise DeployError(
        f"{model}: its content differs from the model {record.name} describes (sha256 {expected[:12]}...), "
        "which passed the check against PyTorch: the file changed since its export (damaged in a copy, or an "
        "export that replaced it stopped before writing its record?). Copy it again, or export it again; if it "
        f"was replaced on purpose, remove the stale {record.name}")


def _check_batch_size(batch_size: int) -> int:
    """``batch_size`` as an int: any integral number (numpy integers too) of at least 1."""
    if not whole_number(batch_size) or batch_size < 1:
        raise DeployError(f"batch_size must be a positive integer, got {batch_size!r}")
    return int(batch_size)


def default_decode_threads() -> int:
    """Decoding threads :meth:`Predictor.predict_paths` uses by default: one per core this
    process may use, at most 8 (``--decode-threads``)."""
    return max(1, min(8, usable_cores()))


def _check_decode_threads(threads: Any) -> int:
    if not whole_number(threads) or threads < 0:
        raise DeployError(f"decode_threads must be a whole number of at least 0 (0: decode between batches), "
                          f"got {threads!r}")
    return int(threads)


def _path_list(paths: Any) -> list[str | Path]:
    """``predict_paths``' argument as a list: a folder/file expanded, any iterable listed."""
    if isinstance(paths, (str, os.PathLike)):
        return list(list_images(paths))
    accepted = ("expected a folder or image file (str or pathlib.Path) or an iterable of "
                "image paths (a list, a generator ...)")
    if isinstance(paths, (bytes, bytearray)) or not isinstance(paths, Iterable):
        raise DeployError(f"predict_paths: paths is a {type(paths).__name__} ({paths!r:.80}); "
                          f"{accepted}")
    items = list(paths)
    for i, item in enumerate(items):
        if not isinstance(item, (str, os.PathLike)):
            raise DeployError(f"predict_paths: paths[{i}] is a {type(item).__name__} "
                              f"({item!r:.80}); expected str or pathlib.Path")
    return items


def _image_list(images: Any) -> Sequence[np.ndarray]:
    """``predict_arrays``' argument as an indexable collection of images."""
    if isinstance(images, (str, bytes, os.PathLike)):
        raise DeployError(f"predict_arrays takes decoded images (numpy arrays), got the path "
                          f"{images!r:.80}; use predict_paths for image files")
    wrap = "pass a list of images ([image]) or an N x H x W x 3 array (image[None])"
    if isinstance(images, np.ndarray):
        shape = tuple(images.shape)
        if images.ndim == 3 and shape[0] == 3 and shape[2] not in (1, 3, 4):  # (1 x H x W: the same either way)
            raise DeployError(
                f"predict_arrays got one array of shape {shape}: one channels-first RGB image (3 x H x W, "
                f"as torch keeps them), or 3 grayscale images? It is ambiguous: for one image pass "
                f"image.transpose(1, 2, 0)[None] (H x W x C); for grayscale images a list or an N x H x W x 1 array"
            )
        if images.ndim == 4 or (images.ndim == 3 and shape[2] not in (1, 3, 4)):
            return images  # N x H x W x C, or N x H x W grayscale (no image has 5+ channels)
        if images.ndim == 3:
            raise DeployError(
                f"predict_arrays got one array of shape {shape}: one H x W x {shape[2]} image, "
                f"or {shape[0]} grayscale images {shape[2]} pixel(s) wide? It is ambiguous, so "
                f"{wrap}; for grayscale images use a list or an N x H x W x 1 array"
            )
        if images.ndim == 2:
            raise DeployError(f"predict_arrays got one H x W array of shape {shape} (a single "
                              f"grayscale image?); pass a list of images ([image])")
        raise DeployError(f"predict_arrays got an array of shape {shape}; {wrap}")
    if not isinstance(images, Iterable):
        raise DeployError(f"predict_arrays: images is a {type(images).__name__}; {wrap}")
    return list(images)


def _looks_like_probabilities(out: np.ndarray) -> bool:
    return bool(np.all(out >= -1e-6) and np.allclose(out.sum(axis=1), 1.0, atol=1e-3))


def _override_props(
    classes: Sequence[str] | str | None,
    input_size: int | Sequence[int] | None,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    interpolation: str | None,
) -> dict[str, str]:
    """Explicit arguments as ``vision_tl.*`` props, so they are validated like metadata."""
    props: dict[str, Any] = {}
    if classes is not None:
        names = classes.split(",") if isinstance(classes, str) else classes
        if not isinstance(names, Iterable) or isinstance(names, bytes):
            raise DeployError(f"classes must be a list of class names or one comma-separated string, got {classes!r}")
        props["classes"] = [str(c).strip() for c in names]
    if input_size is not None:
        if isinstance(input_size, (int, np.integer)):
            size = [input_size, input_size]
        elif isinstance(input_size, Iterable) and not isinstance(input_size, (str, bytes)):
            size = list(input_size)
        else:
            raise DeployError(f"input_size must be one int (a square) or (height, width), got {input_size!r}")
        props["input_size"] = [int(v) if isinstance(v, (int, np.integer)) else v for v in size]
    for key, value in (("mean", mean), ("std", std)):
        if value is not None:
            try:
                props[key] = [float(v) for v in value]
            except (TypeError, ValueError) as exc:
                raise DeployError(f"{key} must be 3 numbers, got {value!r}") from exc
    out = {PREFIX + k: json.dumps(v) for k, v in props.items()}
    if interpolation is not None:
        out[PREFIX + "interpolation"] = str(interpolation)
    return out


def _graph_defaults(inp: Any) -> dict[str, str]:
    """Metadata implied by the graph input, for a model exported by another tool."""
    shape = list(inp.shape)
    defaults = {"format_version": "1", "interpolation": "bicubic", "resize": "direct"}
    if len(shape) != 4:
        return {PREFIX + k: v for k, v in defaults.items()}
    if inp.type == "tensor(uint8)" and shape[3] == 3:
        # Normalisation happens in the graph: mean/std are not used.
        defaults.update(layout="NHWC", input_dtype="uint8", normalize_in_graph="true",
                        mean="[0.0, 0.0, 0.0]", std="[1.0, 1.0, 1.0]")
        spatial = shape[1:3]
    elif inp.type == "tensor(float)" and shape[3] == 3 and shape[1] != 3:
        defaults.update(layout="NHWC", input_dtype="float32", normalize_in_graph="false")
        spatial = shape[1:3]
    else:
        defaults.update(layout="NCHW", input_dtype="float32", normalize_in_graph="false")
        spatial = shape[2:4]
    if all(isinstance(v, int) and v > 0 for v in spatial):
        defaults["input_size"] = json.dumps(spatial)
    return {PREFIX + k: v for k, v in defaults.items()}
