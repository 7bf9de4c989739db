"""The ``unfamiliarity`` output of an export: a bank of training-image features, and its threshold.

The bank is up to :data:`BANK_IMAGES` of the run's training images (evenly subsampled), embedded
with the trained network's pooled features on the pixels the ONNX graph sees, L2-normalised. The
threshold is the highest score among the validation images of the parity check (none of them
a training image): a new image from the same distribution as those scores above it with probability
at most ``1 / (n_val + 1)`` (the images are exchangeable, so the new one is the highest of the
``n_val + 1`` with at most that chance).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vision_tl.deploy import ModelMetadata
from vision_tl.deploy.metadata import MAX_UNFAMILIARITY
from vision_tl.export.parity import (
    DecodedImages,
    ImageSet,
    decode,
    file_hash,
    file_hashes,
    torch_features,
)

COPY_SCORE = 1e-5  # at most this (float rounding of 0), a check image's pixels are a bank image's
BANK_IMAGES = 2000  # 2,000 x 1,280 features (Lite0) are 10 MB of float32 in the model file
HOW_TO_GET_IT = ("export with the run's training images (its split.json or ROOT/train/) and validation images "
                 "(the parity check) at hand")


@dataclass
class BankPlan:
    """The training images to embed, and the check images the threshold must leave out (the same
    content as a training image, in the bank or not: their score says nothing about new images)."""

    images: ImageSet
    in_bank: set[Path] = field(default_factory=set)


def plan_bank(training: ImageSet | None, checked: ImageSet | None, reason: str | None,
              log: Callable[[str], None]) -> BankPlan | None:
    """What the unfamiliarity output will be made from, or None (with one line saying why and
    how to get it) where the training or the validation images are missing."""
    if checked is None:
        log("note: no 'unfamiliarity' output (it flags images unlike every training image): its threshold "
            "comes from the parity check's validation images, and this export has none (--parity-images none); "
            "export with the check to get it")
        return None
    if training is None:
        # (a reason is the error that listing the run's training images raised, which says itself
        # how to give them: the run has a split.json, so saving one is no advice)
        log("note: no 'unfamiliarity' output (it flags images unlike every training image): "
            + (reason or "the run's training images are not found (no split.json with a train list, no ROOT/train/ "
                         "under the data root in its config.yaml); to get it, write the split at training with "
                         "datamodule.save_split(RUN_DIR/'split.json'), or pass them with --calibration-dir DIR "
                         "(Python: ExportOptions(calibration_dir=DIR))"))
        return None
    chosen = training.subsample(BANK_IMAGES)
    # every training image, not only the bank's: one the network was trained on is no
    # validation image either, though the bank left it out (a training set over BANK_IMAGES)
    # (a split.json's sha256, checked as its images were listed, or those of the files that can match)
    trained = (set(training.sha256) if training.sha256 is not None
               else file_hashes(_same_sizes(training.paths, checked.paths)))
    in_bank = {p for p in checked.paths if file_hash(p) in trained}
    if in_bank and len(in_bank) == len(checked.paths):
        log(f"note: no 'unfamiliarity' output: every one of the {len(checked.paths)} check images is also a training "
            f"image ({training.source}), so they cannot set its threshold; {HOW_TO_GET_IT}, "
            "the check images not among the training images (--parity-images DIR)")
        return None
    return BankPlan(chosen, in_bank)


def build_bank(net, metadata: ModelMetadata, plan: BankPlan, scratch: str | Path | None,
               log: Callable[[str], None]) -> np.ndarray:
    """``[M, D]`` float32 L2-normalised pooled features of the plan's training images, on the
    pixels the ONNX graph sees (``load_rgb`` + ``resize``, training's eval normalisation)."""
    log(f"embedding {len(plan.images.paths)} training images for the unfamiliarity score, "
        f"{plan.images.source} ...")
    decoded = decode(plan.images, metadata, scratch=scratch)
    if decoded.unreadable:
        log(f"note: {len(decoded.unreadable)} of them could not be read and are not in the bank, e.g. "
            f"{decoded.unreadable[0]}")
    features = torch_features(net, metadata, decoded.pixels).astype(np.float64)
    norms = np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    return (features / norms).astype(np.float32)


def threshold_images(decoded: DecodedImages, plan: BankPlan, scores: np.ndarray | None = None) -> np.ndarray:
    """Which of the decoded check images may set the threshold: those not among the training
    images, by content, nor (given their ``scores``) copies of a bank image's pixels saved in
    other bytes (a score of 0 but for float rounding): such a copy says nothing about new images,
    and a threshold of 0 from copies alone would flag nearly every one."""
    keep = np.asarray([p not in plan.in_bank for p in decoded.paths], bool)
    if scores is not None:
        keep &= np.asarray(scores) > COPY_SCORE
    return keep


def no_threshold_note(decoded: DecodedImages, plan: BankPlan) -> str:
    """Why a model whose readable check images are all training images gets no unfamiliarity output."""
    return (f"note: no 'unfamiliarity' output: the {len(decoded.paths)} check images that could be read are all "
            f"training images ({plan.images.source}), and the other "
            f"{len(decoded.unreadable)} could not be read, so none can set its threshold; {HOW_TO_GET_IT}, the "
            "check images not among the training images (--parity-images DIR)")


def with_threshold(metadata: ModelMetadata, scores: np.ndarray, keep: np.ndarray, bank_size: int) -> ModelMetadata:
    """The metadata with ``unfamiliar_threshold``: the highest ONNX score among the ``keep``
    check images (so none of them is flagged, and the model on the line gives exactly these
    scores to these pixels). An INT8/FP16 copy gets its own, from its own scores: the argument
    holds for whichever model scores the images, and the copy's features differ (see
    benchmarks/RESULTS.md).

    The score of an image whose features equal a bank image's is 0 give or take float rounding
    (-6e-7 seen): a highest score below 0 (every kept image a copy of a training image in other
    bytes) is stored as 0, the lowest threshold the metadata holds; the bound still holds, since
    a higher threshold flags fewer images."""
    highest = float(np.max(np.asarray(scores)[keep]))
    return dataclasses.replace(metadata, unfamiliar_threshold=min(max(highest, 0.0), MAX_UNFAMILIARITY),
                               unfamiliar_bank_images=int(bank_size), unfamiliar_val_images=int(keep.sum()))


def threshold_note(metadata: ModelMetadata, checked: int) -> str:
    """The line export prints on the threshold; ``checked``: the check images read."""
    n = metadata.unfamiliar_val_images
    left_out = (f"; {checked - n} check images that are training images or copies of their pixels were left out"
                if checked > n else "")
    few = (" (a tighter bound needs more validation images: --parity-images DIR; Python: "
           "ExportOptions(parity_images=DIR))" if n < 99 else "")
    return (f"unfamiliarity: bank of {metadata.unfamiliar_bank_images} training images; threshold "
            f"{metadata.unfamiliar_threshold:.4g}, the highest score of {n} validation images{left_out}: images like "
            f"those are flagged unfamiliar at most 1 time in {n + 1}{few}")


def _same_sizes(paths: list[Path], others: list[Path]) -> list[Path]:
    """Those of ``paths`` whose file size is one of ``others``' (only they can have the same
    content: a training set of 50,000 images is then not read for a check of 200)."""
    def size(path: Path) -> int | None:
        with contextlib.suppress(OSError):
            return os.stat(path).st_size
        return None

    sizes = {size(p) for p in others} - {None}
    return [p for p in paths if size(p) in sizes]
