"""Which images check an export, and how: PyTorch vs onnxruntime on the same pixels.

Images come from the training run's ``split.json`` (its ``val`` list, or
``train`` for INT8 calibration) or from a folder. Both sides see the output of
:func:`vision_tl.imaging.load_rgb` followed by :func:`vision_tl.imaging.resize`;
PyTorch then normalises with training's eval transform, onnxruntime gets the
uint8 pixels through :class:`vision_tl.deploy.Predictor`, exactly as on the line.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vision_tl.data.folder import DatasetError, read_split, recorded_mismatches, same_name
from vision_tl.deploy import DeployError, ModelMetadata, Predictor, list_images
from vision_tl.export.onnx_export import ExportError
from vision_tl.imaging import ImageLoadError, load_rgb, resize
from vision_tl.reports.report import config_data_root
from vision_tl.utils.files import file_sha256, refuse_empty_path, shown_path

AUTO, NONE = "auto", "none"
PROB_TOLERANCE = 1e-4  # fp32: max |probability difference| allowed between PyTorch and ONNX
# fp32: max |unfamiliarity difference| between PyTorch and ONNX (scores lie in [0, 2]; float
# rounding alone gives about 1e-7)
UNFAMILIARITY_TOLERANCE = 1e-4


@dataclass
class ImageSet:
    """Image paths with optional integer labels (index into the model's classes), and the files'
    sha256 where a split.json recorded them (checked when the set was read)."""

    paths: list[Path]
    labels: list[int | None]
    source: str
    sha256: list[str] | None = None

    def content_hashes(self) -> set[str]:
        """The files' sha256: as the split.json recorded them, else read (an unreadable file is
        left out: the check that reads it reports it)."""
        if self.sha256 is not None:
            return set(self.sha256)
        return file_hashes(self.paths)

    def subsample(self, limit: int | None) -> ImageSet:
        """At most ``limit`` images, evenly spread (deterministic, keeps every class present)."""
        if limit is None or len(self.paths) <= limit:
            return self
        keep = np.linspace(0, len(self.paths) - 1, num=limit).round().astype(int)
        return ImageSet([self.paths[i] for i in keep], [self.labels[i] for i in keep],
                        f"{self.source} (every {len(self.paths) / limit:.1f}th, {limit} images)",
                        None if self.sha256 is None else [self.sha256[i] for i in keep])


def run_dir_of(checkpoint: str | Path) -> Path:
    """``runs/NAME/version_N/checkpoints/best.ckpt`` -> ``runs/NAME/version_N``."""
    parent = Path(checkpoint).expanduser().resolve().parent
    return parent.parent if parent.name == "checkpoints" else parent


_OPTION_FOR_SPLIT = {"val": "--parity-images DIR (Python: ExportOptions(parity_images=DIR))",
                     "train": "--calibration-dir DIR (training images; Python: ExportOptions(calibration_dir=DIR))"}


def split_images(checkpoint: str | Path, split: str, classes: Sequence[str],
                 data_root: str | Path | None = None) -> ImageSet | None:
    """The run's ``split`` images ("val" or "train"), or None when the run does not say which.

    From the run's ``split.json`` when it made its own split: paths there are relative to
    the data root it names, looked up from the current folder and from the run directory's
    parents (a root counts only if a sample of its files has the recorded sha256), and then
    every listed file must still have its recorded sha256. A run
    trained on a ``train/`` + ``val/`` layout has no ``split.json``: then ``ROOT/<split>/``
    of the ``data.root`` in the run's ``config.yaml``. ``data_root`` (``export --data``) is
    where that folder is now, when it moved since training: the same files are looked up there.

    Raises:
        ExportError: ``split.json`` exists but is unreadable, or its images are gone or differ.
    """
    run_dir = run_dir_of(checkpoint)
    split_path = run_dir / "split.json"
    option = _OPTION_FOR_SPLIT.get(split, _OPTION_FOR_SPLIT["val"])
    moved = None if data_root is None else Path(data_root).expanduser().resolve()
    if moved is not None and not moved.is_dir():
        raise ExportError(f"--data {data_root}: no such folder; give the folder the run was trained on "
                          "(--data.root of its fit), where it is now")
    if not split_path.is_file():
        root = moved or config_data_root(run_dir)
        if root is None or not (root / split).is_dir():
            return None
        found = folder_images(root / split, classes)
        return ImageSet(found.paths, found.labels,
                        f"{shown_path(root / split)}/ (the run's data root, {len(found.paths)} images)")
    try:
        payload = read_split(split_path)
    except DatasetError as exc:
        raise ExportError(str(exc)) from exc
    entries = payload.get(split, [])
    if not entries:
        return None
    root = _find_root(moved or Path(payload["root"]), entries, split_path, option)
    if root is None:
        if moved is not None:
            raise ExportError(f"{split_path}: --data {data_root} does not hold the run's {split} images "
                              f"(e.g. {entries[0]['path']}); give the folder the run was trained on, or pass the "
                              f"images with {option}")
        raise ExportError(
            f"{split_path}: its data root {payload['root']!r} is not found (looked from {Path.cwd()} and "
            f"the run directory); if the folder moved, pass where it is now with --data ROOT (Python: "
            f"ExportOptions(data_root=ROOT)), or pass the images with {option}"
        )
    missing, changed = recorded_mismatches(root, entries)  # the sample found the root; now every file
    if missing or changed:
        raise ExportError(
            f"{split_path}: {len(missing)} of its {len(entries)} {split} images are missing under {root} and "
            f"{len(changed)} differ from the ones recorded at training (sha256), e.g. {(missing + changed)[0]}; "
            f"checking the export on them would score images against labels they no longer have. Restore the "
            f"run's images, or pass a folder of images with {option}")
    rel = [Path(e["path"]) for e in entries]
    names = [e["label"] for e in entries]
    labels = [classes.index(n) if n in classes else None for n in names]
    return ImageSet([root / p for p in rel], labels,
                    f"{split} split of {shown_path(split_path)} (files under {shown_path(root)})",
                    [e["sha256"] for e in entries])


def _find_root(root: Path, entries: list[dict], split_path: Path, option: str) -> Path | None:
    """The first candidate root holding the split's files with their recorded content."""
    candidates = [root] if root.is_absolute() else [Path.cwd() / root] + [
        parent / root for parent in split_path.parent.parents
    ]
    mismatch = None
    for candidate in candidates:
        if not (candidate / entries[0]["path"]).is_file():
            continue
        missing, changed = recorded_mismatches(candidate, entries, sample=True)
        if not missing and not changed:
            return candidate
        mismatch = mismatch or (missing + changed)[0]
    if mismatch is not None:
        raise ExportError(
            f"{split_path}: the images found under its data root are not the run's: {mismatch} is missing or "
            f"its content (sha256) differs from the one recorded at training; pass the run's images with {option}")
    return None


def folder_images(folder: str | Path, classes: Sequence[str], option: str = "--parity-images") -> ImageSet:
    """Every image under ``folder``; an image's label is the top-most folder between ``folder``
    and the image that is named like a class (``val/<class>/day1/x.png`` is ``<class>``, as in
    training, which labels by the class folder and looks into its sub-folders), else none.

    Raises:
        ExportError: the folder is missing, not a folder, or holds no image (``option`` names it).
    """
    refuse_empty_path(folder, option, ExportError)
    if Path(folder).expanduser().is_file():
        raise ExportError(f"{option} {folder}: is a file; give a folder of images (optionally one sub-folder "
                          "per class)")
    try:
        paths = list_images(Path(folder).expanduser())
    except DeployError as exc:
        raise ExportError(f"{option}: {exc}") from exc
    index = {same_name(c): i for i, c in enumerate(classes)}  # accents encoded either way
    root = Path(folder).expanduser()
    labels = [next((index[same_name(part)] for part in _folders_between(root, p) if same_name(part) in index), None)
              for p in paths]
    return ImageSet(paths, labels, f"folder {folder} ({len(paths)} images)")


def _folders_between(root: Path, path: Path) -> tuple[str, ...]:
    """The folder names from ``root`` down to ``path``'s own folder (a path outside ``root``, through
    a link: its parent's name alone)."""
    try:
        return path.relative_to(root).parts[:-1]
    except ValueError:
        return (path.parent.name,)


def resolve_parity_images(checkpoint: str | Path, spec: str | Path | None,
                          classes: Sequence[str], data_root: str | Path | None = None) -> ImageSet | None:
    """Images for the parity check: ``"auto"`` (the run's val split, under ``data_root`` where
    the run's folder moved: :func:`split_images`), a folder, or ``"none"``.

    Returns:
        The image set, or None for ``"none"`` (the caller warns loudly).

    Raises:
        ExportError: ``"auto"`` without a usable ``split.json``; the message says
            how to give images instead.
    """
    spec = AUTO if spec is None else str(spec)
    if spec.lower() == NONE:
        return None
    if spec.lower() != AUTO:
        return folder_images(spec, classes)
    found = split_images(checkpoint, "val", classes, data_root)
    if found is None:
        raise ExportError(
            f"{checkpoint}: no validation images to check the export with: there is no "
            f"{run_dir_of(checkpoint) / 'split.json'} with a val list, and no ROOT/val/ folder under the "
            "data root in the run's config.yaml (a run trained from Python has neither). Pass "
            "--parity-images DIR (Python: ExportOptions(parity_images=DIR); a folder of images, optionally one "
            "sub-folder per class, e.g. ROOT/val), write the split at training with "
            "datamodule.save_split(RUN_DIR/'split.json') (RUN_DIR holds checkpoints/), or skip the check with "
            "--parity-images none (parity_images='none'; not recommended)"
        )
    return found


@dataclass
class DecodedImages:
    """Resized uint8 images ready for both runtimes (``N x H x W x 3``), and what could not be read."""

    pixels: np.ndarray
    paths: list[Path]
    labels: list[int | None]
    unreadable: list[str] = field(default_factory=list)


def _pixel_array(shape: tuple[int, ...], scratch: str | Path | None) -> np.ndarray:
    """uint8 array of ``shape``: memory-mapped from an unlinked file in ``scratch``, its blocks
    reserved up front (a sparse file on a full disk would kill the process with SIGBUS at the
    first page written); in memory where there is no scratch folder or no room in it."""
    size = int(np.prod(shape))
    if scratch is not None and size:
        import mmap

        try:
            # the mapping outlives the file's handle, closed here (np.memmap kept it open until the
            # array went, with a ResourceWarning); the unlinked file goes with the mapping
            with tempfile.TemporaryFile(dir=scratch, prefix=".parity-pixels-") as handle:
                if hasattr(os, "posix_fallocate"):
                    os.posix_fallocate(handle.fileno(), 0, size)
                else:
                    handle.truncate(size)
                mapped = mmap.mmap(handle.fileno(), size)
            return np.frombuffer(mapped, np.uint8).reshape(shape)
        except OSError:  # read-only folder, full disk: the pixels stay in memory, as before
            pass
    return np.empty(shape, np.uint8)


def decode(images: ImageSet, metadata: ModelMetadata, scratch: str | Path | None = None) -> DecodedImages:
    """``load_rgb`` + ``resize`` every image once; unreadable ones are listed, not fatal.

    With ``scratch`` (a folder), the pixels go to a memory-mapped temporary file there (gone
    when the array is), so a large check set takes disk space, not memory: the float model and
    each INT8/FP16 copy read it batch by batch. 14,400 images of 224 px are 2.2 GB of pixels.
    """
    paths, labels, unreadable = [], [], []
    pixels: np.ndarray | None = None
    for path, label in zip(images.paths, images.labels):
        try:
            rgb = load_rgb(path)
        except ImageLoadError as exc:
            unreadable.append(str(exc))
            continue
        image = resize(rgb, metadata.input_size, metadata.interpolation)
        if pixels is None:  # every image has the model's input size: one array for all
            pixels = _pixel_array((len(images.paths), *image.shape), scratch)
        pixels[len(paths)] = image
        paths.append(path)
        labels.append(label)
    if pixels is None:
        raise ExportError(
            f"{images.source}: none of the {len(images.paths)} images could be read; first "
            f"error: {unreadable[0] if unreadable else 'no images'}"
        )
    return DecodedImages(pixels[:len(paths)], paths, labels, unreadable)


def torch_probabilities(net: Any, metadata: ModelMetadata, pixels: Sequence[np.ndarray],
                        batch_size: int = 32) -> np.ndarray:
    """Softmax of ``net`` on training's eval transform of already resized uint8 images."""
    return torch_outputs(net, metadata, pixels, batch_size)[0]


def torch_outputs(net: Any, metadata: ModelMetadata, pixels: Sequence[np.ndarray], batch_size: int = 32,
                  bank: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Softmax of ``net`` on training's eval transform of already resized uint8 images, and with
    a ``bank`` the unfamiliarity of each image (one pass of the backbone for both)."""
    import torch

    from vision_tl.models.unfamiliar import UnfamiliarityScore

    score = None if bank is None else UnfamiliarityScore(torch.from_numpy(np.asarray(bank, np.float32)))
    rows, scores = [], []
    with torch.inference_mode():
        for x in _eval_batches(metadata, pixels, batch_size):
            if score is None:
                rows.append(torch.softmax(net(x).float(), dim=1).numpy())
                continue
            features = net.forward_features(x)
            rows.append(torch.softmax(net.forward_head(features).float(), dim=1).numpy())
            scores.append(score(features).numpy())
    return np.concatenate(rows, axis=0), (None if score is None else np.concatenate(scores))


def torch_features(net: Any, metadata: ModelMetadata, pixels: Sequence[np.ndarray],
                   batch_size: int = 32) -> np.ndarray:
    """``net.forward_features`` (the pooled features the head takes), float32 ``[N, D]``, on
    training's eval transform of already resized uint8 images."""
    import torch

    with torch.inference_mode():
        return np.concatenate([net.forward_features(x).float().numpy()
                               for x in _eval_batches(metadata, pixels, batch_size)], axis=0)


def _eval_batches(metadata: ModelMetadata, pixels: Sequence[np.ndarray], batch_size: int) -> Iterator[Any]:
    import torch

    from vision_tl.backbones import Preprocessing
    from vision_tl.data import eval_transform

    transform = eval_transform(Preprocessing(metadata.input_size, metadata.mean, metadata.std,
                                             metadata.interpolation))
    for start in range(0, len(pixels), batch_size):
        yield torch.stack([transform(p) for p in pixels[start:start + batch_size]])


def file_hash(path: Path) -> str | None:
    """The file's sha256, or None where it cannot be read (the check that reads it reports it)."""
    with contextlib.suppress(OSError):
        return file_sha256(path)
    return None


def file_hashes(paths: Sequence[Path]) -> set[str]:
    """The sha256 of each readable file of ``paths``."""
    return {h for h in map(file_hash, paths) if h is not None}


def onnx_outputs(model_path: str | Path, pixels: Sequence[np.ndarray],
                 batch_size: int = 32) -> tuple[np.ndarray, np.ndarray | None]:
    """Probabilities and, for a model with that output, unfamiliarity from one onnxruntime pass
    through the deploy :class:`Predictor` (else None)."""
    return Predictor(model_path).outputs_arrays(list(pixels), batch_size=batch_size)


@dataclass
class ParityReport:
    """How closely ``model`` reproduces ``reference`` on the same images.

    ``passed`` is decided by :meth:`judge`; ``failures`` says which criterion failed.
    """

    model: str
    reference: str
    images: str
    n_images: int
    max_abs_diff: float
    mean_abs_diff: float
    top1_agreement: float
    accuracy_reference: float | None
    accuracy_model: float | None
    n_labelled: int
    unreadable: list[str] = field(default_factory=list)
    disagreements: list[dict[str, Any]] = field(default_factory=list)
    model_sha256: str | None = None  # of the file this report describes, as written
    # Variants of a model with a good/defect threshold: images whose pass/reject decision changed.
    decision_changes: int | None = None
    decision_rule: str | None = None
    # A model with the unfamiliarity output: how far its scores are from the reference's, and on
    # how many images the unfamiliar flag (score > threshold; known once the fp32 check set it) differs.
    unfamiliarity_max_abs_diff: float | None = None
    unfamiliarity_mean_abs_diff: float | None = None
    unfamiliar_flag_changes: int | None = None
    # An INT8/FP16 copy's own unfamiliar threshold (the highest of its scores on the check images),
    # and the fp32 model's
    unfamiliar_threshold: float | None = None
    reference_unfamiliar_threshold: float | None = None
    criteria: dict[str, float] = field(default_factory=dict)
    passed: bool | None = None
    failures: list[str] = field(default_factory=list)
    speed: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def accuracy_change_points(self) -> float | None:
        """Model accuracy minus reference accuracy, in percentage points."""
        if self.accuracy_model is None or self.accuracy_reference is None:
            return None
        return 100.0 * (self.accuracy_model - self.accuracy_reference)

    def judge(self, *, max_abs_diff: float | None = None, min_agreement: float | None = None,
              max_accuracy_drop: float | None = None, max_decision_changes: float | None = None,
              exact: bool = False, max_unfamiliarity_diff: float | None = None) -> bool:
        """Apply the criteria (``None`` = not checked), set ``passed`` and ``failures``.
        ``max_decision_changes`` (percent of the images) applies where ``decision_changes``
        was counted, i.e. for a copy of a model with a good/defect threshold. ``exact``: the
        fp32 check, whose limits are fixed (a failure's advice names no option to loosen them).
        ``max_unfamiliarity_diff`` applies where the unfamiliarity was compared."""
        if self.decision_changes is None:
            max_decision_changes = None
        if self.unfamiliarity_max_abs_diff is None:
            max_unfamiliarity_diff = None
        self.criteria = {k: v for k, v in (("max_abs_diff", max_abs_diff),
                                           ("min_top1_agreement", min_agreement),
                                           ("max_accuracy_drop_points", max_accuracy_drop),
                                           ("max_decision_changes_percent", max_decision_changes),
                                           ("max_unfamiliarity_diff", max_unfamiliarity_diff))
                         if v is not None}
        self.failures = []
        if max_abs_diff is not None and not self.max_abs_diff <= max_abs_diff:
            self.failures.append(f"max |Δprob| {self.max_abs_diff:.2e} > {max_abs_diff:.0e}")
        if min_agreement is not None and self.top1_agreement < min_agreement:
            self.failures.append(
                f"top-1 agreement {100 * self.top1_agreement:.2f}% < {100 * min_agreement:.2f}%")
        if max_accuracy_drop is not None:
            drop = self._drop_points()
            if not drop <= max_accuracy_drop:  # a nan limit or drop fails rather than passes
                one = 100.0 / max(self.n_labelled, 1)
                self.failures.append(
                    f"accuracy drop {drop:.2f} points > {max_accuracy_drop:.2f}"
                    + (f" (one image is {one:.2f} points of these {self.n_labelled} labelled images: check on more "
                       "with --parity-images DIR, or raise --max-accuracy-drop)" if one > max_accuracy_drop else ""))
        if max_decision_changes is not None:
            share = 100.0 * self.decision_changes / max(self.n_images, 1)
            if not share <= max_decision_changes:
                one = 100.0 / max(self.n_images, 1)
                self.failures.append(
                    f"good/defect decision ({self.decision_rule}) changed on {self.decision_changes} of "
                    f"{self.n_images} images ({share:.2f}%) > {max_decision_changes:.2f}%"
                    + ("" if exact else " (--max-decision-changes)")
                    + (" (an image's probability lies within float rounding of the threshold: set one that keeps "
                       "a margin, e.g. with vision-tl report --target-false-reject or --target-escape, which put it "
                       "midway between two images' scores)" if exact
                       else f" (one image is {one:.2f}% of these {self.n_images}: check on more with --parity-images "
                       "DIR, or raise --max-decision-changes)" if one > max_decision_changes else ""))
        if max_unfamiliarity_diff is not None and not self.unfamiliarity_max_abs_diff <= max_unfamiliarity_diff:
            self.failures.append(f"max |Δunfamiliarity| {self.unfamiliarity_max_abs_diff:.2e} > "
                                 f"{max_unfamiliarity_diff:.2g}")
        self.passed = not self.failures
        return self.passed

    def _drop_points(self) -> float:
        change = self.accuracy_change_points
        if change is not None:
            return -change
        return 100.0 * (1.0 - self.top1_agreement)  # unlabelled: disagreement counts as error

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (with the derived accuracy change)."""
        return {**asdict(self), "accuracy_change_points": self.accuracy_change_points}

    def summary(self) -> str:
        """A few human-readable lines for the terminal."""
        verdict = {True: "PASSED", False: "FAILED", None: "not judged"}[self.passed]
        lines = [
            f"parity {verdict}: {self.model} vs {self.reference}",
            f"  images: {self.n_images} from {self.images}"
            + (f"; {len(self.unreadable)} unreadable, skipped" if self.unreadable else ""),
            (f"  max |Δprob| {self.max_abs_diff:.2e}, mean {self.mean_abs_diff:.2e}, "
             f"top-1 agreement {100 * self.top1_agreement:.2f}%"),
        ]
        if self.accuracy_model is not None:
            lines.append(f"  accuracy on {self.n_labelled} labelled images: reference "
                         f"{100 * self.accuracy_reference:.2f}%, model {100 * self.accuracy_model:.2f}% "
                         f"({self.accuracy_change_points:+.2f} points)")
        if self.decision_changes is not None:
            advice = ("" if not self.decision_changes else
                      ": this copy moves images across the saved threshold, so it was not written"
                      if self.passed is False else
                      f": this copy moves images across the saved threshold. Use the float model on the line, "
                      f"or check this copy's decisions on labelled images first (vision-tl predict-onnx "
                      f"{Path(self.model).name} <folder>)")
            lines.append(f"  {'WARNING: ' if self.decision_changes else ''}good/defect decision "
                         f"({self.decision_rule}) changed on {self.decision_changes} of {self.n_images} images"
                         + advice)
        if self.unfamiliarity_max_abs_diff is not None:
            lines.append(f"  unfamiliarity: max |Δ| {self.unfamiliarity_max_abs_diff:.2e}, mean "
                         f"{self.unfamiliarity_mean_abs_diff:.2e}"
                         + ("" if self.unfamiliar_threshold is None or self.reference_unfamiliar_threshold is None else
                            f"; its own threshold {self.unfamiliar_threshold:.4g} (the reference's "
                            f"{self.reference_unfamiliar_threshold:.4g}, with which it would flag "
                            f"{self.unfamiliar_flag_changes} of these {self.n_images} images)"))
        if self.speed:
            base, new = self.speed["fp32"], self.speed["variant"]
            lines.append("  speed (fp32 -> this model, " + str(self.speed["threads"]) + " threads): "
                         + ", ".join(f"{k} {base[k]} -> {new[k]}" for k in base))
        lines += [f"  FAILED: {f}" for f in self.failures]
        return "\n".join(lines)


def compare(reference: np.ndarray, candidate: np.ndarray, decoded: DecodedImages, *,
            model: str, reference_name: str, source: str) -> ParityReport:
    """Differences, top-1 agreement and accuracies of two probability matrices."""
    diff = np.abs(reference.astype(np.float64) - candidate.astype(np.float64))
    ref_top, got_top = reference.argmax(axis=1), candidate.argmax(axis=1)
    labelled = [i for i, lab in enumerate(decoded.labels) if lab is not None]
    y = np.asarray([decoded.labels[i] for i in labelled], dtype=int)
    acc_ref = float(np.mean(ref_top[labelled] == y)) if labelled else None
    acc_got = float(np.mean(got_top[labelled] == y)) if labelled else None
    disagreements = [
        {"path": str(decoded.paths[i]), "reference": int(ref_top[i]), "model": int(got_top[i]),
         "max_abs_diff": float(diff[i].max())}
        for i in np.flatnonzero(ref_top != got_top)[:20]
    ]
    return ParityReport(
        model=model, reference=reference_name, images=source, n_images=len(reference),
        max_abs_diff=float(diff.max()), mean_abs_diff=float(diff.mean()),
        top1_agreement=float(np.mean(ref_top == got_top)), accuracy_reference=acc_ref,
        accuracy_model=acc_got, n_labelled=len(labelled), unreadable=decoded.unreadable[:20],
        disagreements=disagreements,
    )


def check_parity(net: Any, model_path: str | Path, metadata: ModelMetadata, images: ImageSet,
                 *, tolerance: float = PROB_TOLERANCE, batch_size: int = 32,
                 scratch: str | Path | None = None,
                 bank: np.ndarray | None = None
                 ) -> tuple[ParityReport, DecodedImages, np.ndarray, np.ndarray | None]:
    """PyTorch ``net`` vs the ONNX file on ``images``; fp32 criteria applied. ``scratch``: a
    folder for the decoded pixels (see :func:`decode`; the export passes its output folder).
    With ``bank`` (the model was written with it), the ``unfamiliarity`` output is compared
    too (:func:`compare_unfamiliarity`).

    Returns:
        The judged report, the decoded images, the ONNX probabilities (reused as the reference
        for INT8/FP16 variants) and, with a bank, the ONNX unfamiliarity scores (else None).
    """
    start = time.perf_counter()
    decoded = decode(images, metadata, scratch=scratch)
    reference, reference_scores = torch_outputs(net, metadata, decoded.pixels, batch_size, bank)
    candidate, scores = onnx_outputs(model_path, decoded.pixels, batch_size)  # (one pass for both outputs)
    report = compare(reference, candidate, decoded, model=str(model_path),
                     reference_name="PyTorch checkpoint", source=images.source)
    count_decision_changes(report, reference, candidate, metadata)
    if reference_scores is not None:
        compare_unfamiliarity(report, reference_scores, scores, None)
    # the line acts on the good/defect decision: the ONNX model may not flip it on any image
    # (a threshold between two scores 1e-7 apart is crossed by float rounding alone)
    report.judge(max_abs_diff=tolerance, min_agreement=1.0, max_decision_changes=0.0, exact=True,
                 max_unfamiliarity_diff=UNFAMILIARITY_TOLERANCE)
    report.seconds = round(time.perf_counter() - start, 2)
    return report, decoded, candidate, scores


def compare_unfamiliarity(report: ParityReport, before: np.ndarray, after: np.ndarray,
                          threshold: float | None) -> None:
    """Set the report's unfamiliarity differences, and with a ``threshold`` the number of
    images whose unfamiliar flag (score > threshold) differs between ``before`` and ``after``."""
    diff = np.abs(np.asarray(before, np.float64) - np.asarray(after, np.float64))
    report.unfamiliarity_max_abs_diff = float(diff.max()) if diff.size else 0.0
    report.unfamiliarity_mean_abs_diff = float(diff.mean()) if diff.size else 0.0
    if threshold is not None:
        report.unfamiliar_flag_changes = int(np.sum((np.asarray(before, np.float64) > threshold)
                                                    != (np.asarray(after, np.float64) > threshold)))


def count_decision_changes(report: ParityReport, before: np.ndarray, after: np.ndarray,
                           metadata: ModelMetadata) -> None:
    """For a model with a good/defect threshold, set ``report.decision_changes``: the images
    whose decision (P(good) >= threshold passes) differs between ``before`` and ``after``."""
    if metadata.good_class is None or metadata.threshold is None:
        return
    k, t = list(metadata.classes).index(metadata.good_class), metadata.threshold
    first, second = (np.asarray(x[:, k], np.float64) for x in (before, after))  # t may be just above 1
    report.decision_changes = int(np.sum((first >= t) != (second >= t)))
    report.decision_rule = f"P({metadata.good_class}) >= {t:.6g}"
