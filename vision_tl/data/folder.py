"""Scan an image folder (one sub-folder per class) and split it reproducibly."""

from __future__ import annotations

import errno
import json
import os
import time
import unicodedata
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import UnidentifiedImageError

from vision_tl.imaging import (
    IMAGE_EXTENSIONS,
    SYSTEM_FOLDERS,
    ImageLoadError,
    image_files,
    is_image_file,
    load_rgb,
    max_image_pixels,
    open_image,
)
from vision_tl.utils.files import file_sha256, path_text

SPLIT_NAMES = ("train", "val", "test")


class DatasetError(ValueError):
    """The image folder cannot be used as given; the message names what to fix."""


@dataclass
class Sample:
    path: Path
    label: int
    sha256: str


@dataclass
class FolderIndex:
    """Files found under one class-per-folder root."""

    root: Path
    classes: list[str]
    samples: list[Sample] = field(default_factory=list)
    bad_files: list[tuple[Path, str]] = field(default_factory=list)

    @property
    def labels(self) -> np.ndarray:
        return np.array([s.label for s in self.samples], dtype=np.int64)

    def class_counts(self) -> list[int]:
        return np.bincount(self.labels, minlength=len(self.classes)).tolist()

    def absent_classes(self) -> list[str]:
        """The classes with no image here (a held-out split may lack a rare one)."""
        return [c for c, n in zip(self.classes, self.class_counts()) if n == 0]


def detect_layout(root: str | Path) -> dict[str, Path]:
    """``{"train": ..., "val": ..., "test": ...}`` for split folders, else ``{"all": root}``."""
    root = Path(root).expanduser()
    if not root.exists():
        raise DatasetError(f"data root {root} does not exist")
    if not root.is_dir():
        raise DatasetError(f"data root {root} is a file; expected a folder with one sub-folder per class")
    found = {name: root / name for name in SPLIT_NAMES if (root / name).is_dir()}
    # Not class_folders: a folder left out here need not have a name that could be a class. On a
    # case-insensitive disk (macOS, Windows) Train/ is train/, read as such: the listing then has
    # no train/ of its own; beside a real train/, Train/ is another folder.
    names = visible_folders(root)
    others = [n for n in names if n not in found and not (n.lower() in found and n.lower() not in names)]
    lookalikes = [name for name in others if _SPLIT_SPELLINGS.get(name.lower())]
    if "train" in found:
        if lookalikes:  # e.g. train/ valid/ test/ (a common export): valid/ would be ignored
            raise DatasetError(
                f"{root} has train/ and also {', '.join(f'{n}/' for n in lookalikes)}, which is not a split name this "
                f"kit reads ({', '.join(f'{n}/' for n in SPLIT_NAMES)}, lower case), so its images would be left out; "
                + _renames(lookalikes)
                + ", or move it out of the folder")
        if others:
            warnings.warn(f"{root}: the folder(s) {', '.join(f'{path_text(n)}/' for n in others)} beside train/ are "
                          f"not split folders ({', '.join(SPLIT_NAMES)}) and are left out", stacklevel=2)
        loose = loose_images(root)
        if loose:
            warnings.warn(f"{root}: {len(loose)} image(s) beside train/ (e.g. {path_text(loose[0].name)}) are in no "
                          "split folder and are left out", stacklevel=2)
        return found
    if found:
        raise DatasetError(
            f"{root} has {', '.join(found)} folder(s) but no train/ folder; either put every split "
            "(train/ and val/, optionally test/) in it, or use one sub-folder per class (a class folder named "
            f"{' or '.join(f'{n}/' for n in found)} is read as a split folder: rename it)"
        )
    if others and len(lookalikes) == len(others):  # Train/ Val/: two classes named after splits?
        raise DatasetError(
            f"{root}'s sub-folders ({', '.join(f'{n}/' for n in others)}) look like split folders, but split folders "
            f"are named {', '.join(f'{n}/' for n in SPLIT_NAMES)} (lower case), so they would be read as classes; "
            + _renames(lookalikes)
            + " (each holding one sub-folder per class)")
    return {"all": root}


def _renames(lookalikes: list[str]) -> str:
    return "; ".join(f"rename {n}/ to {_SPLIT_SPELLINGS[n.lower()]}/" for n in lookalikes)


# Other spellings of the split folders (exports of labelling tools, other kits), lower-cased,
# and the name this kit reads them by.
_SPLIT_SPELLINGS = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                    "test": "test", "testing": "test"}


def class_folders(root: str | Path) -> list[str]:
    """The names of the visible sub-folders of ``root``, sorted (hidden ones such as
    .ipynb_checkpoints/ are not classes)."""
    names = visible_folders(root)
    for name in names:
        if path_text(name) != name:  # class names go into labels.json, plots and the ONNX model, as UTF-8
            raise DatasetError(f"{Path(root) / path_text(name)}: the folder's name is not valid UTF-8 (another system's "
                               "encoding?), and its name would be a class name; rename the folder")
    return names


def visible_folders(root: str | Path) -> list[str]:
    """Sub-folder names, less hidden ones (.ipynb_checkpoints/) and a disk's own (lost+found/).

    Raises:
        DatasetError: a visible entry is a symbolic link to nothing (a share not mounted, a
            folder moved): it would be a class folder, and leaving it out would train without
            that class."""
    names = []
    for p in Path(root).iterdir():
        if p.name.startswith(".") or p.name in SYSTEM_FOLDERS:
            continue
        if p.is_symlink() and not p.exists() and not is_image_file(p.name):  # (an image's is named where read)
            broken = (f"{p} is a symbolic link to {os.readlink(p)}, which does not exist (a share not mounted? a "
                      "folder moved?)")
            suffix = p.suffix[1:]
            if not (suffix.isalpha() and 2 <= len(suffix) <= 4):  # a folder's name: dent, dent.v2, type.A
                raise DatasetError(f"{broken}; mount or fix it, or remove the link")
            warnings.warn(f"{broken}; left out as a file (notes.json, list.txt): if it is a class folder, mount "
                          "or fix it", stacklevel=2)
            continue
        if p.is_dir():
            names.append(p.name)
    return sorted(names)


def same_name(name: str) -> str:
    """``name`` in Unicode NFC form, for comparing class names: "été" typed on one system and
    "été" copied from another (macOS writes decomposed accents) look alike and are one class."""
    return unicodedata.normalize("NFC", name)


def same_classes(a: list[str], b: list[str]) -> bool:
    """Whether two class lists name the same classes in the same order (in NFC form)."""
    return [same_name(c) for c in a] == [same_name(c) for c in b]


def class_folder(root: Path, name: str) -> Path | None:
    """``root``'s sub-folder for class ``name`` (matched in NFC form, see :func:`same_name`), or None."""
    if (root / name).is_dir():
        return root / name
    matches = [n for n in class_folders(root) if same_name(n) == same_name(name)] if root.is_dir() else []
    return root / matches[0] if matches else None


def refuse_twins(root: Path, names: list[str]) -> None:
    """Class folders of ``root`` whose names differ only in how accents are encoded would be one
    class read twice, or one of them ignored: an error naming both (as ``ascii`` shows them)."""
    counts = Counter(map(same_name, names))
    twins = {name for name, n in counts.items() if n > 1}
    if twins:
        raise DatasetError(
            f"{root} has class folders whose names differ only in how their accents are encoded "
            f"(Unicode NFC vs NFD): {', '.join(ascii(n) for n in names if same_name(n) in twins)}; "
            "merge them into one folder"
        )


def foreign_class_folders(folder: Path, classes: list[str]) -> list[str]:
    """The class folders of a held-out split (val/, test/) that are none of ``classes`` (matched
    in NFC form); twin folders of one class are refused (:func:`refuse_twins`)."""
    present = class_folders(folder)
    refuse_twins(folder, present)
    known = {same_name(c) for c in classes}
    return [name for name in present if same_name(name) not in known]


def loose_images(folder: Path) -> list[Path]:
    """The visible image files directly in ``folder`` (in none of its sub-folders), sorted."""
    return sorted(p for p in folder.iterdir() if p.is_file() and is_image_file(p) and not p.name.startswith("."))


def list_classes(root: str | Path) -> list[str]:
    """Sorted class names: the visible sub-folders of ``root``; at least two of them."""
    root = Path(root)
    classes = class_folders(root)
    refuse_twins(root, classes)
    if not classes:
        raise DatasetError(
            f"{root} has no class folders; expected one sub-folder per class, e.g. "
            f"{root}/ok/*.png and {root}/scratch/*.png"
        )
    if len(classes) == 1:
        raise DatasetError(
            f"{root} has a single class folder ({classes[0]!r}); a classifier needs at least two classes"
        )
    return classes


def _check_header(path: Path) -> str | None:
    """Cheap validity check (header + structure) without decoding all pixels."""
    if path.is_symlink() and not path.exists():
        try:
            path.stat()
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                return "symbolic link loop; point the link at an image file"
        return f"broken symbolic link (to {os.readlink(path)!r}, which does not exist)"
    limit = max_image_pixels()  # a bad $VISION_TL_MAX_IMAGE_PIXELS is the user's error, not the file's
    try:
        size = path.stat().st_size
        if size == 0:
            return "empty file (0 bytes)"
        with open_image(path, limit) as img:
            kind = img.format
            data_end = _tiff_data_end(img) if kind == "TIFF" else _raw_data_end(img)
            img.verify()  # a PNG's every chunk and checksum; of other formats the header only
        # Cut off in transfer, the other formats pass verify and failed only when training decoded
        # them: each is checked cheaply, and decoded (which names what is wrong) where that fails.
        if kind in ("JPEG", "MPO"):
            cut = not _ends_like_a_jpeg(path)  # (MPO: a camera's JPEG with a second picture)
        elif kind == "WEBP":
            cut = _riff_size(path) > size
        elif kind != "PNG":  # TIFF strips or tiles, BMP rows ending past the file; else decoded, to be sure
            cut = data_end is None or data_end > size
        else:
            cut = False
        if cut:
            load_rgb(path)
    except ImageLoadError as exc:
        return str(exc).removeprefix(f"{path}: ")
    except UnidentifiedImageError:
        if path.suffix.lower() not in (".tif", ".tiff"):
            return f"not a recognised image (supported: {', '.join(IMAGE_EXTENSIONS)})"
        try:  # float or multi-sample TIFFs that Pillow cannot open: load_rgb has a fallback
            load_rgb(path)
        except ImageLoadError as exc:
            return str(exc).removeprefix(f"{path}: ")
    except Exception as exc:  # noqa: BLE001 - every reader failure means "not a usable image"
        return f"not a readable image ({type(exc).__name__}: {exc})"
    return None


def _tiff_data_end(img) -> int | None:
    """Where the first page's last strip or tile ends in the file (None: no such tags)."""
    tags = img.tag_v2
    for offsets_tag, counts_tag in ((273, 279), (324, 325)):  # strips, tiles
        offsets, counts = tags.get(offsets_tag), tags.get(counts_tag)
        if offsets is not None and counts is not None:
            offsets = offsets if isinstance(offsets, tuple) else (offsets,)
            counts = counts if isinstance(counts, tuple) else (counts,)
            return max((int(o) + int(c) for o, c in zip(offsets, counts, strict=False)), default=0)
    return None


def _raw_data_end(img) -> int | None:
    """Where an uncompressed image's pixel rows end in the file (BMP), or None where its header
    does not say (compressed, or no row stride given)."""
    tiles = getattr(img, "tile", None) or []
    if len(tiles) != 1 or tiles[0][0] != "raw":
        return None
    _, extents, offset, args = tiles[0]
    stride = args[1] if isinstance(args, tuple) and len(args) > 1 and isinstance(args[1], int) else 0
    return int(offset) + abs(stride) * (extents[3] - extents[1]) if stride else None


def _riff_size(path: Path) -> int:
    """The file size a WebP's RIFF header declares (its bytes 4..8 plus the 8 before them)."""
    with open(path, "rb") as fh:
        head = fh.read(8)
    return int.from_bytes(head[4:8], "little") + 8 if head[:4] == b"RIFF" and len(head) == 8 else 1 << 62


def _ends_like_a_jpeg(path: Path, tail: int = 4096) -> bool:
    """Whether a JPEG's end-of-image marker (FF D9) is in its last ``tail`` bytes. Pillow's
    ``verify`` reads only the header, so a file cut off in transfer passes it and fails only
    when training decodes it, after an epoch or more; this catches it at the scan, for the
    price of one small read. (A camera trailer after the marker makes a valid file miss it:
    those are decoded in full to tell.)"""
    with open(path, "rb") as fh:
        fh.seek(max(0, fh.seek(0, os.SEEK_END) - tail))
        return b"\xff\xd9" in fh.read()


def _add_images(index: FolderIndex, images: list[Path], label: int) -> None:
    for path in images:
        problem, digest = _checked(path)
        if problem:
            index.bad_files.append((path, problem))
        else:
            index.samples.append(Sample(path, label, digest))


# What scanning found for each image file this process read, while the file's inode, size and
# modification time (and the pixel limit) stay the same; bounded, for folders of millions of images.
# Each entry keeps when it was worked out: see _RACY_NS.
_SCANNED: dict[tuple, tuple[str | None, str | None, int]] = {}
_MAX_SCANNED = 200_000
# A file whose times lie this close to (or after) the moment it was hashed could be rewritten at its
# size within the same timestamp step without its times changing (FAT keeps 2 s steps, ext2 with
# small inodes and some network shares 1 s): such an entry is worked out again (git's "racily
# clean" rule), until it is hashed long enough after the file's last change. (Times further in the
# future, a clock set ahead, cannot be told apart from a later change either way: left alone.)
_RACY_NS = 2_000_000_000


def _checked(path: Path) -> tuple[str | None, str | None]:
    """``(problem, sha256)`` of an image file: :func:`_check_header`'s problem (None: usable) and,
    for a usable file, its hash. Worked out once per process while the file is unchanged: a resumed
    fit scans the data to check it against the run's split and again to train, and the second
    scan then only reads the files' sizes and times."""
    try:
        st = path.stat()
    except OSError:  # a broken link or a file gone: _check_header says what is wrong
        return _check_header(path) or "cannot be read", None
    # ctime too: a file rewritten in place at its old size, with its old mtime put back (os.utime,
    # some copy tools), keeps size and mtime, but no user call can set its ctime back
    key = (str(path), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, max_image_pixels())
    found = _SCANNED.get(key)
    if found is None or abs(max(st.st_mtime_ns, st.st_ctime_ns) - found[2]) <= _RACY_NS:
        hashed_at = time.time_ns()  # before reading: a change during the read counts as later
        problem = _check_header(path)
        found = (problem, None if problem else file_sha256(path), hashed_at)
        if len(_SCANNED) >= _MAX_SCANNED:
            _SCANNED.clear()
        _SCANNED[key] = found
    return found[:2]


def content_hash(path: Path) -> str | None:
    """``path``'s sha256 as the scan took it (read again only when the file's size or times
    changed, so an unchanged file costs a ``stat``); None for a file that is not a usable image."""
    return _checked(path)[1]


def warn_ignored(ignored: list[Path], root: Path, stacklevel: int = 2) -> None:
    """Say that files under ``root`` that are not supported images (``ignored``) are left out."""
    if ignored:
        shown = ", ".join(str(p) for p in ignored[:5])
        warnings.warn(f"ignoring {len(ignored)} non-image file(s) under {root}: {shown}", stacklevel=stacklevel)


def _finish_scan(index: FolderIndex, ignored: list[Path], skip_bad: bool, advice: str) -> FolderIndex:
    warn_ignored(ignored, index.root, stacklevel=4)
    if index.bad_files and not skip_bad:
        lines = "\n".join(f"  {p}: {why}" for p, why in index.bad_files[:20])
        raise DatasetError(f"{len(index.bad_files)} unreadable image(s) under {index.root}:\n{lines}\n{advice}")
    if index.bad_files:
        warnings.warn(f"skipped {len(index.bad_files)} unreadable image(s) under {index.root}", stacklevel=3)
    return index


def scan_folder(root: str | Path, classes: list[str] | None = None, skip_bad: bool = False,
                partial: bool = False, every_class: bool = True) -> FolderIndex:
    """Index every image under ``root/<class>/`` (recursively), hashing each file.

    Non-image files are warned about and ignored; hidden files are ignored; images directly
    in ``root`` (in no class folder) are warned about and not used. Unreadable images raise
    :class:`DatasetError` naming them unless ``skip_bad``. ``partial`` (a val/ or test/ split):
    a class folder may be missing or empty there (a rare defect with no held-out image);
    otherwise that is an error, as is (with ``every_class``, for training) a class whose every
    image was unreadable and skipped.
    """
    root = Path(root).expanduser()
    classes = classes if classes is not None else list_classes(root)
    index = FolderIndex(root=root, classes=list(classes))
    ignored: list[Path] = []
    for label, name in enumerate(classes):
        folder = class_folder(root, name)
        if folder is None:
            if partial:
                continue
            raise DatasetError(f"class folder {root / name} is missing; expected classes {classes}")
        images, others = image_files(folder)
        ignored += others
        if not images and not partial:
            raise DatasetError(
                f"class folder {folder} has no images (supported: {', '.join(IMAGE_EXTENSIONS)}); "
                "add images or remove the folder"
            )
        _add_images(index, images, label)
    loose = loose_images(root)
    if loose:
        shown = ", ".join(p.name for p in loose[:5]) + (", ..." if len(loose) > 5 else "")
        warnings.warn(f"{len(loose)} image(s) directly in {root} are in no class folder and are not used: {shown}. "
                      "Move each into the folder of its class.", stacklevel=2)
    index = _finish_scan(index, ignored, skip_bad, "Fix or remove them, or pass --data.skip_bad_images true "
                                                   "to train without them.")
    empty = [name for name, n in zip(index.classes, index.class_counts()) if n == 0]
    if empty and not partial and every_class:  # every image of the class unreadable, and skipped
        raise DatasetError(f"class folder(s) {', '.join(str(class_folder(root, n)) for n in empty)} hold no readable "
                           "image: all were unreadable and skipped (--data.skip_bad_images); fix them, or remove "
                           "the class folder")
    return index


def check_unlabelled_root(root: str | Path) -> Path:
    """``root`` as :func:`scan_unlabelled` reads it: a folder or one image file. Raises
    :class:`DatasetError` where it is neither, so a command can refuse it before any work."""
    root = Path(root).expanduser()
    if not root.is_file() and not root.is_dir():
        raise DatasetError(f"image folder {root} does not exist; give a folder of images (any nesting) or one image")
    return root


def scan_unlabelled(root: str | Path, skip_bad: bool = False) -> FolderIndex:
    """Index every image under ``root`` (any nesting, no classes) with label ``-1``, for prediction.

    ``root`` may also be one image file. Unreadable images raise :class:`DatasetError`
    naming them unless ``skip_bad``, which keeps them in ``bad_files``.
    """
    root = check_unlabelled_root(root)
    index = FolderIndex(root=root, classes=[])
    if root.is_file():
        _add_images(index, [root], -1)
        return _finish_scan(index, [], skip_bad, "Pass --data.skip_bad_images true to predict the rest.")
    images, others = image_files(root)
    if not images:
        raise DatasetError(f"{root} holds no images (searched recursively for {', '.join(IMAGE_EXTENSIONS)})")
    _add_images(index, images, -1)
    return _finish_scan(index, others, skip_bad, "Fix or remove them, or pass --data.skip_bad_images true to "
                                                 "predict the rest (they get a row with the error).")


def stratified_split(
    index: FolderIndex, val_fraction: float, seed: int
) -> tuple[list[int], list[int]]:
    """Seeded stratified split of sample indices into (train, val).

    Byte-identical files are kept on the same side, also when they sit in different
    class folders, so a duplicate can never leak from training into validation. Copies
    that carry different labels are a labelling error and are warned about.
    """
    if not 0.0 < val_fraction < 1.0:
        raise DatasetError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    rng = np.random.default_rng(seed)
    groups: dict[tuple[int, str], list[int]] = defaultdict(list)
    for i, s in enumerate(index.samples):
        groups[(s.label, s.sha256)].append(i)
    warn_conflicting_labels(index, splitting=True)
    train, val = [], []
    side_of: dict[str, bool] = {}  # sha256 -> in val, for copies in later classes
    for label, name in enumerate(index.classes):
        keys = sorted(k for k in groups if k[0] == label)
        n_items = sum(len(groups[k]) for k in keys)
        target = min(max(1, round(n_items * val_fraction)), n_items - 1)
        taken, own = 0, []  # own: the groups whose side this class chose (not an earlier class's copies)
        for j in rng.permutation(len(keys)):
            members, sha = groups[keys[j]], keys[j][1]
            if sha not in side_of:
                # A group (a file and its copies) joins val while that brings val nearer its
                # target: a large group of copies that would overshoot it goes to train instead.
                side_of[sha] = abs(taken + len(members) - target) < abs(taken - target)
                own.append(keys[j])
            (val if side_of[sha] else train).extend(members)
            taken += len(members) if side_of[sha] else 0
        if taken == 0 and own:  # every group overshoots: val gets the smallest one
            smallest = min(own, key=lambda k: (len(groups[k]), k))
            moved = set(groups[smallest])
            train[:] = [i for i in train if i not in moved]
            val.extend(groups[smallest])
            side_of[smallest[1]] = True
            taken = len(moved)
        elsewhere = len(keys) - len(own)  # copies of files an earlier class put on a side
        if len(keys) >= 2 and elsewhere and (taken >= n_items or taken == 0):
            side = "val" if taken else "train"
            message = (f"class {name!r}: {elsewhere} of its {len(keys)} distinct images are byte-identical to "
                       f"images filed under other classes, which stay on one side of the split, and every image "
                       f"of {name!r} ended up in {side}. Fix those labels (the warning above lists the copies)")
            if taken:
                raise DatasetError(f"{message}; a class needs images in train")
            warnings.warn(f"{message}: its recall on val is not measured, and balanced accuracy averages the "
                          "other classes", stacklevel=2)
        elif len(keys) < 2 or taken >= n_items:
            raise DatasetError(
                f"class {name!r} has too few distinct images ({len(keys)}) to split into train "
                "and val; add images, or use split folders (ROOT/train/<class>/ and ROOT/val/<class>/: val/ "
                "may lack a rare class)"
            )
    return sorted(train), sorted(val)


def warn_conflicting_labels(index: FolderIndex, splitting: bool = False) -> None:
    """Warn about byte-identical files filed under more than one class (a labelling error)."""
    by_hash: dict[str, list[Sample]] = defaultdict(list)
    for s in index.samples:
        by_hash[s.sha256].append(s)
    clashes = [copies for copies in by_hash.values() if len({s.label for s in copies}) > 1]
    if clashes:
        shown = "; ".join(" == ".join(str(s.path.relative_to(index.root)) for s in copies) for copies in clashes[:5])
        warnings.warn(
            f"{len(clashes)} image(s) are filed under more than one class (byte-identical files with "
            f"different labels{'; each set is kept on one side of the split' if splitting else ''}): {shown}. "
            "Check their labels.",
            stacklevel=3,
        )


def warn_cross_duplicates(a: FolderIndex, b: FolderIndex, a_name: str, b_name: str) -> list[tuple[Path, Path]]:
    """Warn about byte-identical files present in both ``a`` and ``b`` (and about those filed
    under different classes there, a labelling error); returns the pairs."""
    by_hash = {s.sha256: s for s in a.samples}
    pairs = [(by_hash[s.sha256], s) for s in b.samples if s.sha256 in by_hash]
    if pairs:
        shown = "; ".join(f"{x.path} == {y.path}" for x, y in pairs[:5])
        clashes = [(x, y) for x, y in pairs if x.label != y.label]
        relabelled = (f". {len(clashes)} of them are filed under another class there: "
                      + "; ".join(f"{x.path} ({a.classes[x.label]}) == {y.path} ({b.classes[y.label]})"
                                  for x, y in clashes[:5]) + ". Check their labels") if clashes else ""
        warnings.warn(
            f"{len(pairs)} byte-identical file(s) in both {a_name} and {b_name} inflate the {b_name.rstrip('/')} "
            f"scores: {shown}{relabelled}",
            stacklevel=2,
        )
    return [(x.path, y.path) for x, y in pairs]


def split_record(index: FolderIndex, parts: dict[str, list[int]]) -> dict:
    """The split as ``split.json`` holds it: the data root, classes, and per part the relative
    paths, labels and sha256 of its images."""
    return {
        "root": str(index.root.resolve()),  # absolute: a report run from another folder finds the same data
        "classes": index.classes,
        **{
            name: [
                {"path": str(index.samples[i].path.relative_to(index.root)),
                 "label": index.classes[index.samples[i].label],
                 "sha256": index.samples[i].sha256}
                for i in ids
            ]
            for name, ids in parts.items()
        },
    }


def write_split(path: Path, index: FolderIndex, parts: dict[str, list[int]]) -> None:
    """Write the split as JSON (relative paths + sha256) so a run can be reproduced."""
    from vision_tl.utils.files import atomic_write_text

    atomic_write_text(path, json.dumps(split_record(index, parts), indent=1))


def read_split(path: str | Path) -> dict:
    """A run's ``split.json`` as :func:`write_split` wrote it, its shape checked.

    Returns:
        ``{"root": str, "classes": [...], "train": [...], "val": [...]}``; every list entry
        a dict with a relative ``path``, a ``label`` and a ``sha256``.

    Raises:
        DatasetError: the file cannot be read, is not JSON, or is not a split record; the
            message names the file.
    """
    path = Path(path)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetError(f"{path}: not a readable split file ({exc}); `vision-tl fit` wrote it in the run "
                           "directory, beside checkpoints/: restore it from a copy of the run") from exc
    problem = _split_problem(record)
    if problem:
        raise DatasetError(f"{path}: not a split file as `vision-tl fit` writes it ({problem}); restore it from a "
                           "copy of the run")
    return record


def _split_problem(record) -> str | None:
    if not isinstance(record, dict):
        return f"a JSON {type(record).__name__}, expected an object"
    if not isinstance(record.get("root"), str):
        return 'no "root" string'
    for part, entries in record.items():
        if part in ("root", "classes"):
            continue
        if not isinstance(entries, list):
            return f"{part!r} is not a list"
        for i, entry in enumerate(entries):
            if not (isinstance(entry, dict) and all(isinstance(entry.get(k), str) for k in ("path", "label", "sha256"))):
                return f'{part}[{i}] is not an object with "path", "label" and "sha256" strings'
    return None


def recorded_parts(index: FolderIndex, record: dict, source: Path) -> tuple[dict[str, list[int]], int]:
    """The split a :func:`read_split` record describes, over a fresh scan of its folder:
    ``({"train": ids, "val": ids}, images found that the record does not list)``.

    Raises:
        DatasetError: a recorded image is gone or its content (sha256) changed; the message
            names the file and ``source``.
    """
    recorded = record.get("classes")
    if isinstance(recorded, list) and not same_classes(recorded, index.classes):
        added = [c for c in index.classes if same_name(c) not in {same_name(r) for r in recorded}]
        raise DatasetError(
            f"{source} records the classes {recorded}, but {index.root} has {index.classes}"
            + (f" (added since: {', '.join(map(repr, added))}, of which the split lists no image)" if added else "")
            + ": a split cannot be reused across class lists; leave out --data.split_file for a new split, or "
              "move the added class folders out")
    exact = {str(s.path.relative_to(index.root)): i for i, s in enumerate(index.samples)}
    # a copy whose names another system re-encoded (macOS: decomposed accents) matches in NFC form;
    # the exact name comes first, so "é.png" twice (composed and decomposed) are two images
    by_name = {same_name(path): i for path, i in reversed(exact.items())}
    parts: dict[str, list[int]] = {}
    for part in ("train", "val"):
        ids = []
        for entry in record.get(part, []):
            i = exact.get(entry["path"], by_name.get(same_name(entry["path"])))
            if i is None or index.samples[i].sha256 != entry["sha256"]:
                what = "is gone" if i is None else "changed since (its sha256 differs)"
                raise DatasetError(
                    f"{index.root / entry['path']}, a {part} image in {source}, {what}: the split the run trained "
                    "with cannot be rebuilt; restore the image, or evaluate with `vision-tl report RUN --data ROOT` "
                    "on a copy of the data as it was")
            ids.append(i)
        parts[part] = ids
    if not parts["val"]:
        raise DatasetError(f"{source} lists no val images: there is nothing to evaluate; pass the split.json of the "
                           "run whose checkpoint you evaluate")
    listed = {i for ids in parts.values() for i in ids}
    return parts, len(index.samples) - len(listed)


def recorded_mismatches(root: Path, entries: list[dict], sample: bool = False) -> tuple[list[Path], list[Path]]:
    """``(missing, changed)``: the files of a :func:`read_split` list that are gone from under
    ``root``, and those whose content (sha256) is not the recorded one. ``sample`` checks only
    the first, middle and last entry (cheap, and it catches another copy of the data)."""
    ids = sorted({0, len(entries) // 2, len(entries) - 1}) if sample and entries else range(len(entries))
    missing, changed = [], []
    for i in ids:
        file = root / entries[i]["path"]
        if not file.is_file():
            missing.append(file)
        elif file_sha256(file) != entries[i]["sha256"]:
            changed.append(file)
    return missing, changed
