"""``ImageFolderDataModule``: a class-per-folder dataset as a LightningDataModule."""

from __future__ import annotations

import numbers
import sys
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from vision_tl.backbones import DEFAULT_BACKBONE, Preprocessing, resolve_preprocessing
from vision_tl.data.batch_augment import BatchAugment
from vision_tl.data.decoded_cache import DecodedImageDataset, PixelRows, decoded_images, pixels_to
from vision_tl.data.device import (
    copy_on_side_stream,
    default_decode_threads,
    default_num_workers,
    loader_processes_fitting,
    shared_memory_advice,
)
from vision_tl.data.folder import (
    DatasetError,
    FolderIndex,
    Sample,
    detect_layout,
    foreign_class_folders,
    list_classes,
    read_split,
    recorded_parts,
    same_classes,
    same_name,
    scan_folder,
    scan_unlabelled,
    split_record,
    stratified_split,
    warn_conflicting_labels,
    warn_cross_duplicates,
    write_split,
)
from vision_tl.data.transforms import (
    AugmentSpec,
    ImageTransform,
    build_augmentation,
    check_keeps_size,
    stack_images,
)
from vision_tl.imaging import IMAGE_EXTENSIONS, ImageLoadError, decode_error, load_rgb
from vision_tl.utils import ignoring_warnings, whole_number
from vision_tl.utils.distributed import first_builds
from vision_tl.utils.files import refuse_empty_path

SAMPLERS = ("auto", "none", "balanced")
# sampler "auto" draws classes equally often from this ratio of the largest training class to
# the smallest on: with 200 of one class and 3-20 of four others, balanced accuracy rose from 0.84
# to 0.89 (frozen) and 0.90 to 0.94 (partial), the large class's recall stayed 1.00
# (benchmarks/imbalance.py on NEU)
BALANCE_RATIO = 4
PIPELINES = ("auto", "cpu", "device")
# decoded_cache strings that are switches meant, not folder names
_NOT_FOLDERS = {"", "0", "1", "yes", "no", "on", "off", "none", "null", "maybe", "auto", "y", "n"}


class ImageDataset(Dataset):
    """Decodes images on access; nothing is held in memory."""

    def __init__(self, samples: list[Sample], transform: ImageTransform, skip_bad: bool = False) -> None:
        self.samples = samples
        self.transform = transform
        self.skip_bad = skip_bad

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int] | None:
        sample = self.samples[i]
        try:
            image = load_rgb(sample.path)
        except ImageLoadError as exc:
            if self.skip_bad:
                warnings.warn(f"skipping {exc}", stacklevel=1)  # (2 would name torch's fetch loop)
                return None
            raise ImageLoadError(f"{exc}. Pass --data.skip_bad_images true to skip such files.") from exc
        return self.transform(image, seed=getattr(i, "seed", None)), sample.label


def collate_skipping_bad(batch: list) -> tuple[torch.Tensor, torch.Tensor]:
    """Collate ``(image, label)`` pairs after dropping samples that failed to decode (``None``).

    A single item whose image is 4-D, or a :class:`PixelRows`, is a batch a dataset already
    assembled (``DecodedImageDataset.__getitems__``) and passes through unchanged.
    """
    if len(batch) == 1 and (isinstance(batch[0], PixelRows) or batch[0] is not None and batch[0][0].ndim == 4):
        return batch[0]
    kept = [b for b in batch if b is not None]
    if not kept:
        return torch.empty(0), torch.empty(0, dtype=torch.long)
    if kept[0][0].dtype == torch.uint8:
        return stack_images([x for x, _ in kept]), torch.tensor([int(y) for _, y in kept])
    return default_collate(kept)


class Draw(int):
    """A dataset index that also carries the seed of its sample's augmentation."""

    seed: int

    def __new__(cls, index: int, seed: int) -> Draw:
        draw = super().__new__(cls, index)
        draw.seed = seed
        return draw

    def __reduce__(self):  # crosses to loader workers with its seed
        return Draw, (int(self), self.seed)


class EpochSampler(Sampler[int]):
    """Shuffles (or, with ``weights``, draws with replacement) from ``(seed, epoch)`` alone.

    The order never depends on the global random state, and every draw carries the
    seed of its augmentation (:class:`Draw`), so a run resumed from a checkpoint sees
    exactly the batches, augmented the same way, that the uninterrupted run would have
    seen, whatever the number of loader workers. Lightning calls :meth:`set_epoch`
    before every epoch.
    """

    def __init__(self, n: int, seed: int, weights: list[float] | None = None, augment_seeds: bool = True) -> None:
        self.n, self.seed, self.epoch, self.augment_seeds = n, seed, 0, augment_seeds
        self.weights = torch.as_tensor(weights, dtype=torch.double) if weights is not None else None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        if self.weights is None:
            order = torch.randperm(self.n, generator=generator)
        else:
            order = torch.multinomial(self.weights, self.n, replacement=True, generator=generator)
        if not self.augment_seeds:  # plain ints are cheaper to send to the loader workers
            return iter(order.tolist())
        seeds = torch.randint(0, 2**32, (self.n,), generator=generator, dtype=torch.int64)
        return iter([Draw(i, s) for i, s in zip(order.tolist(), seeds.tolist(), strict=True)])


class ImageFolderDataModule(L.LightningDataModule):
    """Images in one sub-folder per class, or in ``train/ val/ [test/]`` split folders.

    Without a ``val/`` folder a stratified, seeded split is made (byte-identical
    files stay on one side) and written to the run directory as ``split.json``.

    Args:
        root: the image folder.
        backbone: timm name whose ``pretrained_cfg`` gives the preprocessing
            (linked to ``model.backbone`` on the command line).
        image_size: overrides the backbone's input size (int or (height, width)).
        val_fraction: share of each class held out for validation when there is no val/ folder.
        seed: seed of the split and of the balanced sampler.
        batch_size: images per batch.
        num_workers: loader processes (and threads that build the decoded cache); ``None``
            picks from the machine's cores.
        augment: preset name (``none``, ``light``, ``inspection``) or a list of
            albumentations transforms as ``{"name": ..., **kwargs}`` dicts.
        sampler: ``balanced`` (each class drawn equally often), ``none``, or ``auto``
            (default): balanced where the largest training class has at least
            4 times (``BALANCE_RATIO``) the images of the smallest.
        skip_bad_images: train past unreadable images instead of stopping.
        good_class: name of the defect-free class, for reports and export.
        pipeline: ``cpu`` (albumentations per image in the loader), ``device``
            (decode + resize in the loader, augment + normalise the batch on the
            accelerator) or ``auto`` (``device`` when training on a GPU).
        decoded_cache: keep resized uint8 pixels in a memory-mapped file so JPEGs are
            decoded once (``true``: ``~/.cache/vision_tl/decoded`` or
            ``$VISION_TL_DECODED_CACHE``; a path: that directory; ``false``: decode every epoch).
        pixels_on_device: with the device pipeline and the decoded cache, copy the train and
            val pixels into the accelerator's memory once and gather each batch there: no
            loader processes, no per-batch copies. ``None`` (auto): on a GPU, when both splits
            take at most a quarter of its free memory (10,000 images at 224 px: 1.5 GB).
        predict_root: new images for ``predict`` (a folder, searched recursively, no class
            sub-folders needed; or one image). Default: the test split, else val.
        split_file: a run's ``split.json``: train and val are exactly the images it lists (a
            recorded image gone or changed is an error; images added since are left out, with a
            warning), instead of a new split. ``validate``, ``test`` and ``predict`` with a run's
            checkpoint set it to that run's file, so they score the images the run held out.
        classes: the class names in index order, as a checkpoint records them. Default: the
            class folders of ``root``, which must otherwise be exactly these. With
            ``predict_root`` the names are taken as given and ``root`` is not read, so new images
            are predicted where the training folder is not at hand; ``predict`` of a checkpoint
            with ``--data.predict_root`` sets them to the checkpoint's.

    Example:
        >>> dm = ImageFolderDataModule("data/demo", backbone="tf_efficientnet_lite0")
        >>> dm.classes
        ['crack', 'good', 'scratch', 'spot']
    """

    def __init__(
        self,
        root: str,
        backbone: str = DEFAULT_BACKBONE,
        image_size: int | tuple[int, int] | None = None,
        val_fraction: float = 0.2,
        seed: int = 0,
        batch_size: int = 32,
        num_workers: int | None = None,
        augment: AugmentSpec = "inspection",
        sampler: str = "auto",
        skip_bad_images: bool = False,
        good_class: str | None = None,
        pipeline: str = "auto",
        decoded_cache: bool | str = False,
        predict_root: str | None = None,
        pixels_on_device: bool | None = None,
        split_file: str | None = None,
        classes: list[str] | None = None,
    ) -> None:
        super().__init__()
        if pipeline not in PIPELINES:
            raise ValueError(f"unknown pipeline {pipeline!r}; expected one of: {', '.join(PIPELINES)}")
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; expected one of: {', '.join(SAMPLERS)}")
        if not whole_number(batch_size) or batch_size < 1:
            raise ValueError(f"batch_size must be a whole number of at least 1, got {batch_size!r}")
        if not whole_number(seed) or not 0 <= seed < 2**32:
            raise ValueError(f"seed (--data.seed) must be a whole number from 0 to 2**32 - 1, got {seed!r}")
        if num_workers is not None and (not whole_number(num_workers) or num_workers < 0):
            raise ValueError(f"num_workers must be a whole number, 0 (load in the main process) or more, got "
                             f"{num_workers!r}; leave it unset to choose from the machine's cores")
        if isinstance(val_fraction, bool) or not isinstance(val_fraction, numbers.Real) \
                or not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction (--data.val_fraction) must be a number between 0 and 1 (exclusive), "
                             f"such as 0.2, got {val_fraction!r}")
        batch_size, val_fraction = int(batch_size), float(val_fraction)
        num_workers = None if num_workers is None else int(num_workers)
        for name, value in (("root", root), ("predict_root", predict_root), ("split_file", split_file)):
            refuse_empty_path(value, f"{name} (--data.{name})")
        if split_file:  # absolute, as the config.yaml of the run records it: any working directory finds it
            split_file = str(Path(split_file).expanduser().resolve())
        # (not classes: the model's hyperparameters hold them, and Lightning refuses two values of one name)
        self.save_hyperparameters(ignore=["classes"])
        # absolute now: the folder is scanned at set-up, perhaps after a notebook changed directory
        self.root = Path(root).expanduser().absolute()
        self._layout: dict[str, Path] | None = None  # see layout
        self.preprocessing: Preprocessing = resolve_preprocessing(backbone, image_size)
        height, width = self.preprocessing.input_size
        # A bad preset or transform fails here, in every mode (frozen mode never builds a CPU loader).
        turns = [t for t in build_augmentation(augment).transforms
                 if type(t).__name__ in ("RandomRotate90", "Transpose", "D4", "SquareSymmetry")]
        if pipeline == "device" and not isinstance(augment, str):
            raise ValueError(f"pipeline 'device' augments on the accelerator with the presets none, light and "
                             f"inspection, not a custom list ({augment!r}); use pipeline 'cpu' (or 'auto', which "
                             "picks 'cpu' for a custom list)")
        if not isinstance(augment, str):  # a custom list: it must keep the input size
            check_keeps_size(augment, (height, width))
        if height != width and turns:
            raise ValueError(
                f"augment {augment!r} turns images by 90 degrees ({type(turns[0]).__name__}), which swaps height "
                f"and width of the non-square input size {height}x{width}; use a square image_size, or "
                "augment 'light', 'none' or a list without 90-degree turns")
        if isinstance(decoded_cache, str) and decoded_cache.strip().lower() in _NOT_FOLDERS:
            # (a word meant as a switch would become a cache folder of that name in the working directory)
            raise ValueError(f"decoded_cache {decoded_cache!r}: give true, false or a folder path "
                             "(e.g. --data.decoded_cache true, or --data.decoded_cache /scratch/decoded)")
        if pixels_on_device and (pipeline == "cpu" or not decoded_cache):
            raise ValueError("pixels_on_device keeps the decoded cache's pixels on the device for the device "
                             f"pipeline; it needs pipeline 'device' or 'auto' (got {pipeline!r}) and decoded_cache "
                             f"true or a folder (got {decoded_cache!r})")
        self.num_workers = default_num_workers() if num_workers is None else num_workers
        # the decoded cache is built on threads: as many as the loader processes a user asked for
        self.decode_threads = default_decode_threads() if num_workers is None else num_workers
        self.splits: dict[str, FolderIndex | list[Sample]] = {}
        # the split.json of the run whose checkpoint is evaluated, where its split is not used (set
        # by the CLI): val and test images that run trained on are then named at set-up
        self.held_out_check: str | Path | None = None
        self._feature_data: dict[str, Dataset] = {}  # see use_features
        self._augment_batches = (-1, 0)  # (epoch, training batches augmented on the device in it)
        self._split_bad: dict[str, list[tuple[Path, str]]] = {}  # unreadable images of each split folder
        self._batch_augment: dict[bool, torch.nn.Module] = {}
        self._host_pixels: dict[str, np.ndarray] = {}  # split -> decoded cache, for pixels_on_device
        self._device_pixels: dict[tuple[str, torch.device], torch.Tensor] = {}
        self._said_no_pixels = False  # the pixels_on_device warning, once
        self._classes = self._class_names(classes)
        self._classes_given = classes is not None
        if good_class is not None:
            named = [c for c in self._classes if same_name(c) == same_name(good_class)]
            if not named:
                raise ValueError(f"good_class {good_class!r} is not a class; classes are {self._classes}")
            self.hparams.good_class = named[0]  # the folder's spelling (accents may be encoded differently)

    def __repr__(self) -> str:  # (Lightning's data module has none: a notebook showed only the object's address)
        hp = self.hparams
        return (f"ImageFolderDataModule({str(self.root)!r}, classes={self.classes}, backbone={hp.backbone!r}, "
                f"input_size={self.preprocessing.input_size}, batch_size={hp.batch_size}, augment={hp.augment!r}, "
                f"good_class={hp.good_class!r})")

    @property
    def classes(self) -> list[str]:
        """Class names in index order (sorted folder names, or the ``classes`` given)."""
        return self._classes

    @property
    def layout(self) -> dict[str, Path]:
        """``root``'s split folders (:func:`detect_layout`), read on first use: predicting new
        images with given ``classes`` never reads the training folder."""
        if self._layout is None:
            self._layout = detect_layout(self.root)
        return self._layout

    def _folder_classes(self) -> list[str]:
        return list_classes(self.layout.get("train", self.root))

    def _class_names(self, given: list[str] | None) -> list[str]:
        """``root``'s classes; ``given`` ones must be those, except with ``predict_root``, where they
        are taken as they are (see :meth:`setup` for the check where the folder is used after all)."""
        if given is None:
            return self._folder_classes()
        if isinstance(given, str) or len(given) < 2 or not all(isinstance(c, str) and c for c in given):
            raise ValueError(f"classes must be a list of at least two class names, e.g. ['good', 'scratch'], got "
                             f"{given!r}; leave it unset to use the class folders of root")
        if len({same_name(c) for c in given}) < len(given):
            raise ValueError(f"classes {list(given)} name a class twice; give each class once")
        if self.hparams.predict_root is None:
            self._check_given_classes(list(given))
        else:
            self._warn_other_folder_classes(list(given))
        return list(given)

    def _warn_other_folder_classes(self, given: list[str]) -> None:
        """Predicting new images with given classes: a training folder still at hand whose classes
        differ (a class added since the checkpoint was trained) is named, since no prediction
        can name its new classes. A folder that is not there, or not readable, is no concern."""
        if not self.root.is_dir():
            return
        try:
            with ignoring_warnings():  # (its layout's own warnings concern training, not this)
                found = list_classes(detect_layout(self.root).get("train", self.root))
        except (OSError, DatasetError):
            return
        if not same_classes(given, found):
            warnings.warn(f"{self.root} now has the classes {found}, the model was trained on {given}: the "
                          "predictions name the model's classes; train a new run to predict the others",
                          stacklevel=3)

    def _check_given_classes(self, given: list[str]) -> None:
        found = self._folder_classes()
        if not same_classes(given, found):
            raise DatasetError(f"{self.root} has the classes {found}, not the classes {given} given (--data.classes, "
                               "e.g. a checkpoint's); use the folder the model was trained on, or leave classes "
                               "unset to train on the folder's")

    @property
    def num_classes(self) -> int:
        return len(self._classes)

    def setup(self, stage: str | None = None) -> None:
        if self.splits or stage == "predict" and self.hparams.predict_root is not None:
            return  # new images to predict: the training folder need not be scanned
        if self._classes_given and self.hparams.predict_root is not None:
            self._check_given_classes(self._classes)  # (taken unread at construction)
        self._read_splits()
        if stage in (None, "fit"):
            self._warn_thin_val()
        elif self.held_out_check is not None:
            self._warn_trained_images(Path(self.held_out_check))

    def _warn_trained_images(self, record_path: Path) -> None:
        """Warn about images of the val and test splits that the run whose ``split.json`` is
        ``record_path`` trained on (by content): scored as held out, they inflate the scores."""
        try:
            trained = {entry["sha256"] for entry in read_split(record_path).get("train", [])}
        except DatasetError:
            return  # (a damaged record: report names it)
        for name in ("val", "test"):
            samples = self.splits.get(name, [])
            seen = [s for s in samples if s.sha256 in trained]
            if seen:
                shown = ", ".join(str(s.path) for s in seen[:3])
                warnings.warn(f"{len(seen)} of the {len(samples)} {name} images are images the checkpoint's run "
                              f"trained on ({record_path} lists them as train), e.g. {shown}: their {name} scores "
                              "are not held-out scores", stacklevel=2)

    def summary(self) -> str:
        """What fit trains on, in a line or two: the classes with their train/val image counts
        (a stray folder read as a class shows here), and images in sub-folders of a class
        folder, which count as that class."""
        train, val = self.class_counts("train"), self.class_counts("val")
        per_class = ", ".join(f"{c} {n}/{m}" for c, n, m in zip(self._classes, train, val))
        lines = [f"{self.num_classes} classes (train/val images): {per_class}"]
        nested: dict[str, int] = {}
        for name in ("train", "val"):
            # (a val split carved out of train/ lives under train/)
            folder = self.layout.get(name) or self.layout.get("all") or self.layout.get("train")
            for sample in self.splits.get(name, []):
                try:
                    parts = sample.path.relative_to(folder).parts
                except ValueError:  # (a file reached through a link outside the folder)
                    continue
                if len(parts) > 2:
                    key = f"{Path(*parts[:-1]).as_posix()}/"
                    nested[key] = nested.get(key, 0) + 1
        if nested:
            shown = ", ".join(f"{k} ({n})" for k, n in sorted(nested.items())[:5])
            lines.append(f"images in sub-folders count as their class folder's class: {shown}"
                         f"{' ...' if len(nested) > 5 else ''}")
        if self.hparams.sampler == "auto" and self.sampler_choice() == "balanced":
            present = [n for n in train if n > 0]
            lines.append(f"imbalanced (the largest class has {max(present) / min(present):.0f}x the images of the "
                         "smallest): the balanced sampler draws every class equally often, with no class weights "
                         "on top (--data.sampler none turns it off)")
        return "\n".join(lines)

    def sampler_choice(self) -> str:
        """``none`` or ``balanced``: the sampler the training loader uses (``auto`` resolved on
        the training split's class counts; after :meth:`setup`)."""
        if self.hparams.sampler != "auto":
            return self.hparams.sampler
        counts = [n for n in self.class_counts("train") if n > 0]
        return "balanced" if counts and max(counts) >= BALANCE_RATIO * min(counts) else "none"

    def _warn_thin_val(self) -> None:
        """A class with one or two val images: its recall moves in steps of 50-100 %, so the
        best epoch (and a good/defect threshold) rests on those images."""
        thin = [f"{n} of {c!r}" for c, n in zip(self._classes, self.class_counts("val")) if 0 < n < 3]
        if thin:
            warnings.warn(f"val holds only {', '.join(thin)} (image count): each such image moves that class's "
                          "recall, and balanced accuracy, in big steps, so the best epoch and any threshold rest on "
                          "them. Hold out more images of rare classes if you can (split folders ROOT/train/ and "
                          "ROOT/val/ choose which), and read `vision-tl report`'s counts", stacklevel=2)

    def _read_splits(self) -> None:
        skip = self.hparams.skip_bad_images
        if "all" in self.layout:
            index = scan_folder(self.root, self._classes, skip)
            train_ids, val_ids = self._split_ids(index)
            self.splits = {
                "train": [index.samples[i] for i in train_ids],
                "val": [index.samples[i] for i in val_ids],
            }
            self._split_record = (index, {"train": train_ids, "val": val_ids})
            return
        indexes = {}
        for name, folder in self.layout.items():
            if name != "train":
                self._check_split_classes(name, folder)
            indexes[name] = scan_folder(folder, self._classes, skip, partial=name != "train")
            self._split_bad[name] = list(indexes[name].bad_files)  # (skip_bad_images: predict lists them)
            if name != "train":
                self._warn_absent_classes(name, folder, indexes[name])
            if name != "train" or "val" in self.layout:  # (a train/ that is split warns in the split)
                warn_conflicting_labels(indexes[name])
        folders = dict(indexes)  # (each folder's whole index, before train/ is split)
        if "val" not in indexes:
            train_ids, val_ids = self._split_ids(indexes["train"])
            indexes["val"] = [indexes["train"].samples[i] for i in val_ids]
            self._split_record = (indexes["train"], {"train": train_ids, "val": val_ids})
            indexes["train"] = [indexes["train"].samples[i] for i in train_ids]
        else:
            if self.hparams.get("split_file"):
                raise DatasetError(f"--data.split_file {self.hparams.split_file}: {self.root} has its own val/ folder, "
                                   "which is the validation split; a split file applies to a folder the kit splits "
                                   "(without val/): leave out --data.split_file")
            warn_cross_duplicates(indexes["train"], indexes["val"], "train/", "val/")
            self._split_record = None
        if "test" in indexes:  # a copy of a training or validation image makes the test score optimistic
            for name in ("train", "val"):  # (val carved out of train/: train/ once, both parts)
                if name in folders:
                    warn_cross_duplicates(folders[name], indexes["test"], f"{name}/", "test/")
        self.splits = {k: v.samples if isinstance(v, FolderIndex) else v for k, v in indexes.items()}

    def _split_ids(self, index: FolderIndex) -> tuple[list[int], list[int]]:
        """A new stratified split, or the one ``split_file`` records."""
        source = self.hparams.get("split_file")
        if not source:
            return stratified_split(index, self.hparams.val_fraction, self.hparams.seed)
        parts, unlisted = recorded_parts(index, read_split(source), Path(source))
        if unlisted:
            warnings.warn(f"{index.root} holds {unlisted} image(s) that {source} does not list (added since it "
                          "was written): left out, so train and val are the images it records", stacklevel=2)
        return parts["train"], parts["val"]

    def _check_split_classes(self, name: str, folder: Path) -> None:
        """A val/ or test/ folder may lack a class (warned about after the scan), but a class
        folder that train/ lacks has no label: that is an error naming it."""
        extra = foreign_class_folders(folder, self._classes)
        if extra:
            raise DatasetError(
                f"{folder} has class folder(s) that train/ lacks: {', '.join(map(repr, extra))} (train/ has "
                f"{self._classes}). A classifier only predicts the classes it trained on: add train/ images of "
                f"them, or move these folders out of {name}/")

    def _warn_absent_classes(self, name: str, folder: Path, index: FolderIndex) -> None:
        if not index.samples:
            raise DatasetError(f"{folder} holds no images (supported: {', '.join(IMAGE_EXTENSIONS)}); put each "
                               f"class's held-out images in {folder}/<class>/, or remove {name}/")
        absent = index.absent_classes()
        if absent:
            warnings.warn(f"{name}/ has no images of {', '.join(map(repr, absent))}: their recall on {name}/ is not "
                          "measured (null), and balanced accuracy averages the other classes", stacklevel=2)

    def class_counts(self, split: str = "train") -> list[int]:
        """Images per class in ``split`` (after :meth:`setup`)."""
        labels = [s.label for s in self._split(split)]
        return np.bincount(labels, minlength=self.num_classes).tolist()

    def split_record(self) -> dict | None:
        """The split this data module made (what :meth:`save_split` writes), or None when the
        folder brought its own ``train/`` and ``val/``."""
        if getattr(self, "_split_record", None):
            return split_record(*self._split_record)
        return None

    def save_split(self, path: str | Path) -> bool:
        """Write the split (relative paths, labels, sha256) as JSON; set up first where needed.

        Returns:
            False, writing nothing, for a folder with its own ``train/`` and ``val/`` (the folders
            are the record of that split); True otherwise.
        """
        if not self.splits:
            self.setup()  # (before set-up there is no split to write: nothing was written, silently)
        if getattr(self, "_split_record", None):
            index, parts = self._split_record
            write_split(Path(path), index, parts)
            return True
        return False

    def _split(self, name: str) -> list[Sample]:
        if not self.splits:
            self.setup()
        if name not in self.splits:
            raise DatasetError(f"{self.root} has no {name}/ split; available: {', '.join(self.splits)}")
        return self.splits[name]

    def device_pipeline(self) -> bool:
        """True when batches are augmented and normalised on the device, not in the loader."""
        if self.hparams.pipeline == "auto":
            trainer = self.trainer
            return trainer is not None and trainer.strategy.root_device.type == "cuda" and isinstance(
                self.hparams.augment, str)
        return self.hparams.pipeline == "device"

    def dataset(self, split: str | list[Sample], augment: bool = False, rows_only: bool = False) -> Dataset:
        """The split (a name, or the samples themselves) as a dataset of ``(image tensor, label)``.

        In the device pipeline images are resized uint8 ``[3, H, W]``; otherwise they are
        augmented (``augment=True``) and normalised float tensors. ``rows_only`` (device
        pipeline, decoded cache, a split name): batches are :class:`PixelRows` whose pixels
        :meth:`on_after_batch_transfer` gathers from a copy on the device.
        """
        on_device = self.device_pipeline()
        transform = (ImageTransform(self.preprocessing, normalize=False) if on_device else
                     ImageTransform(self.preprocessing, self.hparams.augment if augment else "none"))
        samples = self._split(split) if isinstance(split, str) else split
        if not self.hparams.decoded_cache:
            return ImageDataset(samples, transform, self.hparams.skip_bad_images)
        pixels, bad = self._decoded(samples)
        if bad and not self.hparams.skip_bad_images:
            more = f"\n  ... and {len(bad) - 5} more" if len(bad) > 5 else ""
            reasons = "\n".join(f"  {decode_error(samples[i].path)}" for i in bad[:5])
            raise ImageLoadError(f"{len(bad)} image(s) could not be decoded:\n{reasons}{more}\n"
                                 "Pass --data.skip_bad_images true to skip such files.")
        bad_rows = set(bad)
        keep = [i for i in range(len(samples)) if i not in bad_rows]
        if rows_only:
            if not (on_device and isinstance(split, str)):
                raise ValueError("rows_only needs the device pipeline and a split name")
            self._host_pixels[split] = pixels
        return DecodedImageDataset(pixels, [s.label for s in samples], keep, None if on_device else transform,
                                   rows_only=rows_only, source=split if rows_only else "", samples=samples)

    def _decoded(self, samples: list[Sample]) -> tuple[np.ndarray, list[int]]:
        """The samples' decoded-cache pixels. Under DDP the first process of each machine decodes
        the images; the others wait for it and then only open the finished file."""
        cache_dir = None if self.hparams.decoded_cache is True else self.hparams.decoded_cache

        def decode() -> tuple[np.ndarray, list[int]]:
            return decoded_images([s.path for s in samples], [s.sha256 for s in samples],
                                  self.preprocessing.input_size, self.preprocessing.interpolation,
                                  cache_dir, self.decode_threads)

        trainer = self.trainer
        if trainer is None:
            return decode()
        first = trainer.local_rank == 0
        result = first_builds(trainer.strategy, first, decode)
        return result if first else decode()

    def _keep_pixels_on_device(self, split: str | list[Sample]) -> bool:
        """Whether ``split``'s loader serves :class:`PixelRows` (see ``pixels_on_device``)."""
        wanted = self.hparams.get("pixels_on_device")
        if wanted and not self.device_pipeline() and not self._said_no_pixels:
            self._said_no_pixels = True  # an explicit setting that cannot take effect is said, once
            warnings.warn("pixels_on_device true has no effect here: the CPU pipeline runs (no GPU, or a custom "
                          "augment list), which augments in the loader; it applies to the device pipeline only",
                          stacklevel=2)
        if (wanted is False or not isinstance(split, str) or split not in ("train", "val")
                or not self.hparams.decoded_cache or not self.device_pipeline()):
            return False
        if wanted:
            return True
        device = self.trainer.strategy.root_device if self.trainer is not None else None
        if device is None or device.type != "cuda":
            return False
        height, width = self.preprocessing.input_size
        need = sum(len(self._split(name)) for name in ("train", "val") if name in self.splits) * height * width * 3
        free, _ = torch.cuda.mem_get_info(device)
        return need <= free // 4

    def _pixels_on(self, source: str, device: torch.device) -> torch.Tensor:
        """The split's decoded pixels in ``device`` memory, copied on first use."""
        key = (source, device)
        if key not in self._device_pixels:
            if source not in self._host_pixels:
                raise RuntimeError(f"no decoded pixels for the {source!r} split: build its loader first")
            pixels = self._host_pixels[source]
            try:
                self._device_pixels[key] = pixels_to(pixels, device)
            except torch.OutOfMemoryError as exc:
                raise ValueError(
                    f"the decoded {source} images ({pixels.nbytes / 2**30:.2f} GiB) do not fit in the memory of "
                    f"{device}; pass --data.pixels_on_device false to read batches through loader processes "
                    "(or leave it unset: then they go to the device only when they fit)") from exc
        return self._device_pixels[key]

    def teardown(self, stage: str) -> None:
        """Frees the device copies of decoded pixels (``pixels_on_device``)."""
        self._device_pixels.clear()

    def transfer_batch_to_device(self, batch, device: torch.device, dataloader_idx: int):
        """On a GPU the copy runs on a side stream, while the previous step still computes."""
        move = super().transfer_batch_to_device
        if device.type != "cuda":
            return move(batch, device, dataloader_idx)
        return copy_on_side_stream(lambda: move(batch, device, dataloader_idx), device)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """Device pipeline: augment (training only) and normalise uint8 image batches on the device
        (gathered there first for :class:`PixelRows` batches)."""
        if isinstance(batch, PixelRows):
            pixels = self._pixels_on(batch.source, batch.rows.device)
            batch = (pixels.index_select(0, batch.rows).permute(0, 3, 1, 2), batch.labels)
        x, y = batch
        if x.dtype != torch.uint8:
            return batch
        train = bool(self.trainer is not None and self.trainer.training)
        if train not in self._batch_augment:
            self._batch_augment[train] = BatchAugment.from_preset(
                self.hparams.augment if train else "none", self.preprocessing, train)
        augment = self._batch_augment[train].to(x.device)
        return augment(x, self._augment_generator() if train else None), y

    def _augment_generator(self) -> torch.Generator:
        """The device pipeline's random choices for this training batch, from (seed, epoch, rank,
        batch of the epoch) alone: each rank augments its images differently (the global random
        state is seeded alike on every rank), and a resumed epoch draws what the uninterrupted
        one drew, as the CPU pipeline's per-image seeds do."""
        epoch = self.trainer.current_epoch if self.trainer is not None else 0
        rank = self.trainer.global_rank if self.trainer is not None else 0
        if self._augment_batches[0] != epoch:
            self._augment_batches = (epoch, 0)
        batch = self._augment_batches[1]
        self._augment_batches = (epoch, batch + 1)
        return torch.Generator().manual_seed(
            ((self.hparams.seed * 1_000_003 + epoch) * 65_537 + rank) * 1_048_583 + batch & (2**63 - 1))

    def use_features(self, datasets: dict[str, Dataset] | None) -> None:
        """Serve these ``(features, label)`` datasets instead of images for their splits.

        Frozen-mode training sets cached backbone features here
        (:func:`vision_tl.features.cached_feature_datasets`); ``None`` restores images.
        """
        self._feature_data = dict(datasets or {})

    def _loader(self, split: str | list[Sample], train: bool = False) -> DataLoader:
        features = self._feature_data.get(split) if isinstance(split, str) else None
        rows_only = features is None and self._keep_pixels_on_device(split)
        dataset = features if features is not None else self.dataset(split, augment=train, rows_only=rows_only)
        workers = 0 if features is not None or rows_only else self.num_workers  # tensors: no decoding
        local = self.trainer.num_devices if self.trainer is not None else 1
        if workers and self.hparams.num_workers is None and local > 1:
            # the machine's default share: each of the processes on this machine (one per GPU)
            # starts its own train and val loaders, which would otherwise each take every core
            workers = max(1, workers // local)
        if workers:
            workers = self._workers_with_room(workers, uint8=self.device_pipeline() and features is None)
        sampler = None
        world = self.trainer.world_size if self.trainer is not None else 1
        if not train and 1 < world <= len(dataset):
            # Every image once: Lightning's default DistributedSampler pads the last share with
            # repeats, which counted some validation images twice. Rank r gets r, r+world, ...
            sampler = UnrepeatedDistributedSampler(dataset, num_replicas=world, rank=self.trainer.global_rank,
                                                   shuffle=False)
        if train:
            weights = None
            if self.sampler_choice() == "balanced":
                counts = np.maximum(np.array(self.class_counts(split)), 1)
                labels = dataset.labels if hasattr(dataset, "labels") else [s.label for s in dataset.samples]
                weights = [1.0 / counts[label] for label in labels]
            cpu_augment = features is None and not self.device_pipeline() and self.hparams.augment != "none"
            sampler = EpochSampler(len(dataset), self.hparams.seed, weights, augment_seeds=cpu_augment)
            # A resumed run may draw its first batches before Lightning calls set_epoch.
            sampler.set_epoch(self.trainer.current_epoch if self.trainer is not None else 0)
        return DataLoader(
            dataset,
            batch_size=self.hparams.batch_size,
            sampler=sampler,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=torch.cuda.is_available(),
            collate_fn=collate_skipping_bad,
            drop_last=train and self._drop_last(len(dataset)),
            # Worker seeds come from this generator, not the global one, so creating an
            # iterator never shifts the random stream that dropout and augmentation use.
            generator=torch.Generator().manual_seed(self.hparams.seed),
        )

    def _workers_with_room(self, workers: int, uint8: bool) -> int:
        """``workers``, or as many loader processes as ``/dev/shm`` has room for (each holds two
        batches there; a Docker container's 64 MB default holds few at 224 px), with a warning.
        A number the user chose is kept, with the same warning: a loader out of room dies of a bus error."""
        height, width = self.preprocessing.input_size
        batch_bytes = self.hparams.batch_size * height * width * 3 * (1 if uint8 else 4)  # uint8, or float32
        fitting = loader_processes_fitting(workers, batch_bytes)
        if fitting >= workers:
            return workers
        chosen = self.hparams.num_workers is not None
        warnings.warn(f"vision_tl: {shared_memory_advice(workers, fitting, batch_bytes)}; "
                      + (f"--data.num_workers {workers} kept as set, but a loader process out of room dies of a bus "
                         "error" if chosen else f"using {fitting}, or pass --data.num_workers"), stacklevel=2)
        return workers if chosen else fitting

    def _drop_last(self, n: int) -> bool:
        """Whether a training epoch leaves out its last, partial batch. Small sets keep it (dropping
        it left 30 of 62 images out of each epoch at batch size 32), unless it holds one image,
        on which BatchNorm cannot train. From 16 batches on it is dropped: under 1/16 of an
        epoch, other images each epoch, and every step has one shape (a GPU's kernels are
        tuned, and torch.compile compiles, per shape)."""
        size = self.hparams.batch_size
        return n > 1 and (n % size == 1 or n >= 16 * size)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def has_test_split(self) -> bool:
        """Whether the folder has a ``test/`` split (else ``test`` evaluates ``val``)."""
        return "test" in self.splits if self.splits else "test" in self.layout

    def test_dataloader(self) -> DataLoader:
        if not self.has_test_split() and (self.trainer is None or self.trainer.is_global_zero):
            print(f"vision_tl: {self.root} has no test/ folder, so `test` evaluates the val split. That split "
                  "chose the best checkpoint: expect an optimistic score; hold out ROOT/test/<class>/ for an "
                  "unbiased one.", file=sys.stderr)
        return self._loader("test" if self.has_test_split() else "val")

    def predict_dataloader(self) -> DataLoader:
        """Images of ``predict_root`` (or the test split, else val); each batch's labels are the
        images' positions in :attr:`predict_samples`, so a skipped image never shifts a row."""
        self.predict_bad: list[tuple[Path, str]] = []
        if self.hparams.predict_root is not None:
            index = scan_unlabelled(self.hparams.predict_root, self.hparams.skip_bad_images)
            self.predict_samples, self.predict_bad = index.samples, index.bad_files
        else:
            name = "test" if self.has_test_split() else "val"
            self.predict_samples = self._split(name)
            # a test/ or val/ folder's unreadable images (skipped with skip_bad_images) get error rows too
            self.predict_bad = list(self._split_bad.get(name, []))
        return self._loader([Sample(s.path, i, s.sha256) for i, s in enumerate(self.predict_samples)])
