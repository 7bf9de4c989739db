"""The tensor batch augmentation matches the CPU `inspection` preset in distribution."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vision_tl.backbones import resolve_preprocessing
from vision_tl.data.batch_augment import BatchAugment
from vision_tl.data.transforms import build_augmentation

PRE = resolve_preprocessing("tf_efficientnet_lite0", 16)
N = 3000


def _image() -> np.ndarray:
    ramp = np.linspace(70, 200, 16, dtype=np.float32)
    img = np.stack([np.add.outer(ramp, ramp) / 2] * 3, axis=-1)
    img[:4, :4] = 0  # a black corner to see flips and turns
    return img.astype(np.uint8)


def _stats(batch: np.ndarray) -> dict[str, float]:
    """batch: N x 16 x 16 x 3 on the 0..255 scale."""
    means = batch.mean(axis=(1, 2, 3))
    # Which corner holds the black patch: brightness changes are monotone, so only geometry moves it.
    corners = np.stack([batch[:, :4, :4], batch[:, :4, -4:], batch[:, -4:, :4], batch[:, -4:, -4:]], 1)
    corner = corners.mean(axis=(2, 3, 4)).argmin(axis=1) == 0
    return {"mean": means.mean(), "std_of_means": means.std(), "corner_kept": corner.mean(),
            "pixel_std": batch.std(axis=(1, 2, 3)).mean()}


def test_distribution_matches_albumentations_inspection_preset():
    img = _image()
    cpu = build_augmentation("inspection")
    # No Compose.set_random_seed here: it gives every transform the same stream, so the
    # horizontal and vertical flips would fire together (a real albumentations quirk).
    ref = np.stack([cpu(image=img)["image"] for _ in range(N)]).astype(np.float32)
    aug = BatchAugment(PRE)
    x = torch.from_numpy(img).permute(2, 0, 1)[None].repeat(N, 1, 1, 1)
    out = aug(x, generator=torch.Generator().manual_seed(0))
    mine = (out / aug.inv_std + aug.mean).permute(0, 2, 3, 1).numpy()
    a, b = _stats(ref), _stats(mine)
    assert b["corner_kept"] == pytest.approx(a["corner_kept"], abs=0.04)  # flips + turns: ~0.25 kept
    assert b["mean"] == pytest.approx(a["mean"], abs=2.0)
    assert b["std_of_means"] == pytest.approx(a["std_of_means"], rel=0.15)
    assert b["pixel_std"] == pytest.approx(a["pixel_std"], rel=0.1)


def test_without_augmentation_it_only_normalises():
    aug = BatchAugment(PRE, augment=False)
    x = torch.full((2, 3, 4, 4), 255, dtype=torch.uint8)
    assert torch.allclose(aug(x), torch.ones(2, 3, 4, 4))  # mean = std = 0.5 -> (1 - 0.5) / 0.5


def test_non_square_batches_skip_turns_but_keep_shape():
    aug = BatchAugment(PRE)
    assert aug(torch.zeros(4, 3, 8, 12, dtype=torch.uint8)).shape == (4, 3, 8, 12)
