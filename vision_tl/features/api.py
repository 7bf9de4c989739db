"""``extract``: one embedding per image of a folder, as arrays and/or an ``.npz`` / Parquet file."""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from vision_tl.backbones import DEFAULT_BACKBONE, create_backbone, resolve_preprocessing
from vision_tl.data.device import default_decode_threads, resolve_device
from vision_tl.data.folder import (
    SPLIT_NAMES,
    DatasetError,
    FolderIndex,
    class_folders,
    detect_layout,
    file_sha256,
    loose_images,
    refuse_twins,
    same_name,
    scan_folder,
    visible_folders,
    warn_ignored,
)
from vision_tl.features.cache import CacheReport, FeatureCache, failure_listing
from vision_tl.features.extractor import FeatureExtractor
from vision_tl.features.store import (
    FeatureSet,
    FeatureStoreError,
    check_output_path,
    remove_store,
    write_features,
)
from vision_tl.imaging import image_files
from vision_tl.utils import launcher_int
from vision_tl.utils.files import path_lock, refuse_empty_path

WRITE_CHUNK = 2048  # rows per streamed write


@dataclass
class ImageList:
    """The images of a folder: class-per-folder (labels) or flat (label -1)."""

    root: Path
    classes: list[str]
    paths: list[Path] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    hashes: list[str] = field(default_factory=list)
    bad: list[tuple[Path, str]] = field(default_factory=list)

    def relative(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    def drop(self, bad_paths: set[Path]) -> None:
        keep = [i for i, p in enumerate(self.paths) if p not in bad_paths]
        self.paths = [self.paths[i] for i in keep]
        self.labels = [self.labels[i] for i in keep]
        self.hashes = [self.hashes[i] for i in keep]


def scan_images(root: str | Path, skip_bad: bool = False, unlabelled: bool = False) -> ImageList:
    """Index ``root``: ``<class>/`` folders, ``train/ val/ test/`` split folders, or flat images;
    with ``unlabelled``, every image at any depth, without labels (sub-folders are not classes).

    Raises:
        DatasetError: the folder is missing or empty, holds unreadable images (listed by name)
            and ``skip_bad`` is False, or has class folders and also images beside them, which
            would be left out (the message says how to include them).
    """
    refuse_empty_path(root, "image folder")
    root = Path(root).expanduser()
    if root.is_file():
        raise DatasetError(f"{root} is a file; give the folder that holds the images (with <class>/ sub-folders, "
                           "train/ val/ test/ split folders, or the images themselves)")
    if not root.is_dir():
        raise DatasetError(f"image folder {root} does not exist")
    # (the root's own sub-folders may be split folders, or folders a split layout leaves out:
    # detect_layout decides; the class folders are checked below)
    dirs = [] if unlabelled else [root / name for name in visible_folders(root)]
    images = ImageList(root, [])
    if unlabelled or not dirs:  # (image_files: a broken link named like an image is reported, not dropped)
        found, ignored = image_files(root)
        warn_ignored(ignored, root, stacklevel=3)
        _add_flat(images, found)
    else:
        layout = detect_layout(root)  # the same split folders as fit, and the same refusals
        folders = [layout[name] for name in SPLIT_NAMES if name in layout] or [root]
        _refuse_loose_images(root, folders)
        first = [f for f in folders if f.name == "train"] or folders  # classes: train/'s first
        present = {folder: class_folders(folder) for folder in [*first, *folders]}
        for folder, names in present.items():
            refuse_twins(folder, names)  # accents encoded two ways: one class read twice
        images.classes = _split_classes(present)
        if not images.classes:
            raise DatasetError(f"{first[0]} has no class folders; expected <class>/ sub-folders")
        label_of = {same_name(name): k for k, name in enumerate(images.classes)}
        for folder in folders:
            # a class folder of val/ or test/ may be empty (a rare defect with no held-out image), as fit reads them
            held_out = folder != root and folder.name != "train"
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="skipped .* unreadable")
                index = scan_folder(folder, present[folder], skip_bad=True, partial=held_out,
                                    every_class=False)  # listed below
            _add_index(images, index, [label_of[same_name(name)] for name in present[folder]])
    if images.bad and not skip_bad:
        raise DatasetError(f"{len(images.bad)} unreadable image(s) under {root}:\n{failure_listing(images.bad)}\n"
                           "Fix or remove them, or pass --skip-bad (Python: skip_bad=True) to leave them out.")
    if images.bad:
        warnings.warn(f"left out {len(images.bad)} unreadable image(s) under {root}:\n{failure_listing(images.bad, 5)}",
                      stacklevel=2)
    if not images.paths:
        raise DatasetError(f"{root} holds no readable images")
    return images


def _split_classes(present: dict[Path, list[str]]) -> list[str]:
    """Every class folder of every split: the first folder's (train/'s) in order, then the others'.

    An embedding file records images, not a training set: a class folder that only ``val/`` or
    ``test/`` has (a defect type seen after training, say) is kept with its own label rather than
    dropped, and a split may lack some classes. Listing ``train/``'s classes first keeps their
    label indices those of a classifier fitted on ``train/``; the extra classes are warned about.
    """
    folders = list(present)
    classes = list(present[folders[0]])
    known = {same_name(c) for c in classes}  # another split may spell a class's accents otherwise
    extra = []
    for name in sorted(name for folder in folders[1:] for name in present[folder]):
        if same_name(name) not in known:
            known.add(same_name(name))
            extra.append(name)
    if extra:
        where = " and ".join(f"{folder.name}/ has {', '.join(n for n in present[folder] if n in extra)}"
                             for folder in folders[1:] if set(present[folder]) & set(extra))
        labels = ", ".join(f"{name} = {len(classes) + k}" for k, name in enumerate(extra))
        warnings.warn(f"{where}, which {folders[0].name}/ lacks; their images are included with their own "
                      f"label(s): {labels}", stacklevel=3)
    return classes + extra


def _add_index(images: ImageList, index: FolderIndex, label_map: list[int]) -> None:
    """Append ``index``'s rows; ``label_map[k]`` is the global label of its class ``k``."""
    images.paths += [s.path for s in index.samples]
    images.labels += [label_map[s.label] for s in index.samples]
    images.hashes += [s.sha256 for s in index.samples]
    images.bad += index.bad_files


def _refuse_loose_images(root: Path, folders: list[Path]) -> None:
    """Sub-folders read as classes leave images beside them out: say so instead of dropping them."""
    loose = [p for folder in folders for p in loose_images(folder)]
    if loose:
        shown = ", ".join(str(p.relative_to(root)) for p in loose[:5]) + (", ..." if len(loose) > 5 else "")
        raise DatasetError(
            f"{root} has sub-folders, read as classes ({', '.join(class_folders(folders[0]))}), and "
            f"{len(loose)} image(s) beside them that no class holds: {shown}. Move each into the folder of its "
            f"class; or, if the sub-folders are not classes (dates, lines), `vision-tl extract --unlabelled` "
            f"(extract(..., unlabelled=True)) embeds every image under {root} at any depth, without labels")


def _add_flat(images: ImageList, paths: list[Path]) -> None:
    from vision_tl.data.folder import _check_header  # the same cheap header check as scan_folder

    for path in sorted(paths):
        problem = _check_header(path)
        if problem:
            images.bad.append((path, problem))
            continue
        images.paths.append(path)
        images.labels.append(-1)
        images.hashes.append(file_sha256(path))


def _chunks(cache: FeatureCache, extractor: FeatureExtractor, images: ImageList) -> Iterator[tuple]:
    store = cache.store(extractor)  # once: finding it digests every weight of the backbone
    for start in range(0, len(images.paths), WRITE_CHUNK):
        part = slice(start, start + WRITE_CHUNK)
        feats = store.read(list(images.hashes[part]))
        yield (feats, [images.relative(p) for p in images.paths[part]],
               np.asarray(images.labels[part], np.int64), images.hashes[part])


def _metadata(extractor: FeatureExtractor, images: ImageList, report: CacheReport) -> dict:
    timings = {"images_per_second": report.images_per_second, "seconds": report.seconds,
               "seconds_to_first_batch": report.first_batch_seconds}
    # null, not NaN (which is not JSON), when every feature came from the cache
    # the root absolute: the rows' paths are relative to it, and the file may be read from elsewhere
    return {**extractor.identity(), "root": os.path.abspath(images.root), "classes": images.classes,
            "rows": len(images.paths),
            **{k: v if math.isfinite(v) else None for k, v in timings.items()}}


def extract(
    root: str | Path,
    backbone: str = DEFAULT_BACKBONE,
    out: str | Path | None = None,
    *,
    weights: str | Path | None = None,
    pretrained: bool = True,
    stages: str | Sequence[str | int] | None = None,
    image_size: int | tuple[int, int] | None = None,
    batch_size: int = 8,
    num_workers: int | None = None,
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
    overwrite: bool = False,
    skip_bad: bool = False,
    device: str | None = None,
    precision: str = "32",
    decode: str = "cpu",
    cuda_graphs: bool = True,
    progress: bool = True,
    return_features: bool = True,
    unlabelled: bool = False,
) -> FeatureSet | None:
    """Embed every image under ``root`` with a frozen backbone; optionally write ``out``.

    Work is streamed through a content-keyed :class:`FeatureCache`, shard by shard:
    a re-run (or a run after a kill) only computes images whose hash is not stored
    yet. With ``use_cache=False`` the shards go to ``.<out>.partial/`` beside the
    output instead and are removed once the output is written.

    Args:
        root: image folder (``<class>/`` sub-folders, ``train/ val/`` splits, or flat). With
            splits, every class folder of every split is embedded (``train/``'s classes first).
        backbone: timm model name.
        out: ``.npz`` or ``.parquet`` file to write (atomically); ``None`` writes nothing.
        weights: local backbone weights (``.safetensors`` / ``.pth``).
        pretrained: use ImageNet weights (offline); False = random init.
        stages: ``"pooled"`` (default), stage numbers ``"3,4"``, or both ``"3,4,pooled"``.
        image_size: input size override (default from the backbone's ``pretrained_cfg``).
        batch_size: images per forward pass.
        num_workers: image-decoding threads (0 = decode between batches; default: one per core
            but one, up to 16, every core on a 1-2 core machine, shared among torchrun's ranks on
            one machine); loader processes for augmented views.
        cache_dir: feature cache root (default ``$VISION_TL_CACHE`` or ``~/.cache/vision_tl/features``).
        use_cache: keep the features in the cache for later runs.
        overwrite: replace an existing ``out``.
        skip_bad: leave unreadable images out instead of stopping.
        device: ``"cpu"``, ``"cuda"``...; default cuda when available. Images travel as
            uint8 and are normalised on the device (pinned memory, channels_last on a GPU).
        precision: ``"32"`` or ``"bf16"`` (autocast; for GPUs; cached separately from fp32).
        decode: ``"cpu"`` (decoding threads, Pillow's pixels) or ``"device"`` (JPEGs decoded on
            ``device``: nvJPEG on a GPU, which takes extraction past what the CPU's cores
            decode; pixels within a rounding of Pillow's, cached apart). Meant for GPUs.
        cuda_graphs: on a GPU, replay the backbone as a CUDA graph per batch shape (one launch
            per batch; the same embeddings as the unfolded model).
        progress: show a tqdm bar.
        return_features: also return the arrays (False keeps memory flat for huge folders).
        unlabelled: every image under ``root`` at any depth, label -1 (sub-folders such as
            dates or lines are not classes).

    Returns:
        A :class:`FeatureSet` (features ``[N, F]``, relative paths, labels, hashes, metadata),
        or None when ``return_features`` is False.

    Example:
        >>> fs = extract("../shared/datasets/neu", "tf_efficientnet_lite0", "neu.parquet")
        >>> fs.features.shape
        (1800, 1280)
    """
    from vision_tl.features.distributed import current_ranks

    ranks = current_ranks()  # torchrun: this process embeds every world-th image
    out_path = check_output_path(out, overwrite) if out is not None else None
    if out_path is None and not use_cache and ranks.world > 1:  # each rank's own scratch folder: no merge
        raise ValueError("under torchrun, extract without the cache needs an output file (out=, --out), whose "
                         "partial folder every rank shares; give one, or keep the cache on")
    device = resolve_device(device, ranks.local_rank)
    if decode == "device" and device.type != "cuda":
        warnings.warn(f"--decode device on {device}: JPEGs are then decoded by torchvision in the main thread, "
                      "batch by batch, which is slower than --decode cpu's threads; it is meant for GPUs (nvJPEG)",
                      stacklevel=2)
    images = scan_images(root, skip_bad, unlabelled)
    with torch.random.fork_rng(devices=[]):  # random-init weights: the same every run (one cache entry)
        torch.manual_seed(0)
        model = create_backbone(backbone, pretrained=pretrained, weights=weights, img_size=image_size).to(device)
    ranks.sync_module(model)
    extractor = FeatureExtractor(model, backbone, resolve_preprocessing(backbone, image_size), stages,
                                 precision=precision, decode=decode, cuda_graphs=cuda_graphs)
    with _work_dir(out_path, use_cache, cache_dir, owner=ranks.is_main, overwrite=overwrite) as cache_root:
        cache = FeatureCache(cache_root)
        share = slice(ranks.rank, None, ranks.world)
        if num_workers is None:  # the ranks on this machine share its cores
            num_workers = default_decode_threads(launcher_int("LOCAL_WORLD_SIZE", 1))
        report = cache.ensure(extractor, images.paths[share], images.hashes[share], batch_size, num_workers,
                              device, progress and ranks.is_main)
        report = _merge_reports(ranks.gather(report))
        ranks.barrier()  # every share is in the cache before anyone reads it
        handle_failures(images, report, skip_bad)
        metadata = _metadata(extractor, images, report)
        if out_path is not None and ranks.is_main:
            write_features(out_path, _chunks(cache, extractor, images), len(images.paths), metadata,
                           overwrite=overwrite)
        ranks.barrier()  # the output is written before rank 0 clears partial shards
        if not return_features:
            return None
        feats = cache.read(extractor, images.hashes)
    return FeatureSet(feats, [images.relative(p) for p in images.paths],
                      np.asarray(images.labels, np.int64), images.classes, images.hashes, metadata)


def _merge_reports(reports: list[CacheReport]) -> CacheReport:
    if len(reports) == 1:
        return reports[0]
    return CacheReport(sum(r.requested for r in reports), sum(r.computed for r in reports),
                       [f for r in reports for f in r.failed], max(r.seconds for r in reports),
                       max(r.first_batch_seconds for r in reports), max(r.waited_seconds for r in reports))


def handle_failures(images: ImageList, report: CacheReport, skip_bad: bool) -> None:
    """Images the extraction could not decode: an error naming them, or with ``skip_bad`` a
    warning, and they are left out of ``images``."""
    if not report.failed:
        return
    if not skip_bad:
        raise DatasetError(f"{len(report.failed)} image(s) could not be decoded:\n{failure_listing(report.failed)}\n"
                           "Fix or remove them, or pass --skip-bad to leave them out.")
    warnings.warn(f"left out {len(report.failed)} image(s) that could not be decoded:\n{failure_listing(report.failed, 5)}",
                  stacklevel=3)
    images.drop({p for p, _ in report.failed})


@contextlib.contextmanager
def _work_dir(out: Path | None, use_cache: bool, cache_dir: str | Path | None,
              owner: bool = True, overwrite: bool = False) -> Iterator[Path | None]:
    """The cache root, or a partial-shards folder beside ``out`` when the cache is off; with
    ``out``, held as this extraction's alone until the output is written (:func:`_claim_output`).

    Only the ``owner`` (rank 0) removes the partial shards once the output is written.
    """
    with _claim_output(out, owner, overwrite):
        if use_cache:
            yield Path(cache_dir).expanduser() if cache_dir else None
        elif out is None:
            with tempfile.TemporaryDirectory(prefix="vision_tl_features_") as tmp:
                yield Path(tmp)
        else:
            path = partial_dir(out)
            yield path  # an exception leaves the finished shards for the next run to resume from
            if owner and path.exists():
                remove_store(path)  # done: the output holds everything


@contextlib.contextmanager
def _claim_output(out: Path | None, owner: bool, overwrite: bool) -> Iterator[None]:
    """One extraction per output at a time, cache or not. Two at once each computed every image
    (into the cache: every row twice), then the later one failed at its end on the output the
    other had written, or with ``overwrite`` replaced it without a word; without the cache, the
    first to finish removed the other's partial shards. The second is refused at the start.
    The ranks of one job share the claim: its first holds the lock."""
    if out is None or not owner:
        yield
        return
    with path_lock(partial_dir(out), wait=False) as alone:  # (the partial folder's name: one lock for both modes)
        if not alone:
            raise FeatureStoreError(f"another extraction is writing {out} now (nothing was computed here); wait for "
                                    "it to finish, or write to another --out")
        check_output_path(out, overwrite)  # again, now that it is ours: the other may have finished since
        yield


def partial_dir(out: Path) -> Path:
    """Where a cache-less extraction keeps its finished shards until the output is written."""
    return out.parent / f".{out.name}.partial"
