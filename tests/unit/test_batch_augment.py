"""The tensor batch augmentation matches the CPU `inspection` preset in distribution."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vision_tl.backbones import resolve_preprocessing
from vision_tl.data.batch_augment import BatchAugment, orientations
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


def _orientation_counts(out: torch.Tensor, grid: torch.Tensor) -> dict[tuple[int, int, int], float]:
    """Share of each of the 8 turns/mirrors of ``grid`` (a 1x3xSxS image) in ``out``."""
    variants = orientations(grid)
    counts = dict.fromkeys(variants, 0)
    for image in out:
        match = [key for key, y in variants.items() if torch.equal(image, y[0])]
        assert len(match) == 1, "every output must be one of the 8 turns/mirrors of the input"
        counts[match[0]] += 1
    return {key: c / len(out) for key, c in counts.items()}


def test_flips_and_turns_follow_the_albumentations_probabilities():
    # hflip 0.5, vflip 0.5, then with p=0.5 a uniform 0-3 quarter turns: the four images
    # reachable by flips alone come out 3/16 each, the four that need an odd turn 1/16 each.
    aug = BatchAugment(PRE, p_bc=0, p_gamma=0, p_noise=0, p_blur=0)
    grid = torch.arange(16, dtype=torch.uint8).view(1, 1, 4, 4).repeat(1, 3, 1, 1)
    out = aug._geometry(grid.repeat(4000, 1, 1, 1), torch.Generator().manual_seed(1))
    shares = _orientation_counts(out, grid)
    for (t, _, _), share in shares.items():
        assert share == pytest.approx(1 / 16 if t else 3 / 16, abs=0.02)


def test_seeded_cpu_augmentation_draws_each_step_independently():
    """Training seeds every image's CPU augmentation (``ImageTransform(..., seed=)``, the
    EpochSampler's draw). Each step must still toss its own coin: with one seed per step, the
    flips and the turn fired together, so no mirrored image was ever made, and in ``light``
    the flip and the brightness change always came as a pair."""
    from vision_tl.data.transforms import ImageTransform

    grid = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16).repeat(1, 3, 1, 1)
    image = grid[0].permute(1, 2, 0).numpy()
    geometry = [{"name": "HorizontalFlip", "p": 0.5}, {"name": "VerticalFlip", "p": 0.5},
                {"name": "RandomRotate90", "p": 0.5}]
    turns = ImageTransform(PRE, geometry, normalize=False)
    out = torch.stack([turns(image, seed=seed) for seed in range(3000)])
    for (t, _, _), share in _orientation_counts(out, grid).items():
        assert share == pytest.approx(1 / 16 if t else 3 / 16, abs=0.025)
    light = ImageTransform(PRE, "light", normalize=False)
    pairs = np.zeros((2, 2))
    for seed in range(2000):
        x = light(image, seed=seed)[0]
        flipped = float(x[8, :8].float().mean()) > float(x[8, 8:].float().mean())  # rows run dark to bright
        changed = not (torch.equal(x, grid[0, 0]) or torch.equal(x, grid[0, 0].flip(-1)))
        pairs[int(flipped), int(changed)] += 1
    assert pairs / pairs.sum() == pytest.approx(np.full((2, 2), 0.25), abs=0.04)  # p 0.5 each, independent
    assert torch.equal(light(image, seed=7), light(image, seed=7))  # a seed still fixes the outcome


@pytest.mark.parametrize("step", ["p_bc", "p_gamma", "p_noise", "p_blur"])
def test_images_a_step_skips_come_out_bit_identical(step):
    # A photometric step that does not fire must not touch a pixel: with geometry off and
    # only this step possible (p=0.5), each image is exactly the normalised input or changed.
    probs = {"p_bc": 0, "p_gamma": 0, "p_noise": 0, "p_blur": 0, "p_vflip": 0, "p_rot90": 0, step: 0.5}
    aug = BatchAugment(PRE, **probs)
    x = torch.randint(0, 256, (64, 3, 16, 16), dtype=torch.uint8)
    normalise = BatchAugment(PRE, augment=False)
    plain, flipped = normalise(x), normalise(x.flip(3))  # horizontal flips always stay on
    out = aug(x, generator=torch.Generator().manual_seed(0))
    same = [torch.equal(out[i], plain[i]) or torch.equal(out[i], flipped[i]) for i in range(64)]
    assert 16 < sum(same) < 48  # about half untouched, bit for bit; the rest changed


def test_layout_and_inputs_are_respected():
    x = torch.randint(0, 256, (4, 16, 16, 3), dtype=torch.uint8).permute(0, 3, 1, 2)  # as loaders send
    out = BatchAugment(PRE)(x)
    assert out.is_contiguous()  # on a CPU: plain NCHW for CPU convolutions
    assert torch.equal(BatchAugment(PRE, augment=False)(x), BatchAugment(PRE, augment=False)(x.contiguous()))
    f = x.float()
    before = f.clone()
    BatchAugment(PRE, augment=False)(f)
    assert torch.equal(f, before)  # the caller's float batch is not normalised in place


def test_the_same_generator_gives_the_same_batch_and_another_does_not():
    aug = BatchAugment(PRE)
    x = torch.randint(0, 256, (32, 3, 16, 16), dtype=torch.uint8)
    first, again = (aug(x, generator=torch.Generator().manual_seed(3)) for _ in range(2))
    assert torch.equal(first, again)
    assert not torch.equal(first, aug(x, generator=torch.Generator().manual_seed(4)))


def test_channels_last_batches_get_the_same_pixels_as_contiguous_ones():
    """Per-image steps gather from an NHWC view of channels-last batches; the pixels must not
    depend on the layout (checked on a CPU by calling the photometric step directly; noise
    left out: its samples land on pixels in memory order)."""
    aug = BatchAugment(PRE, p_bc=1.0, p_gamma=0.5, p_noise=0.0, p_blur=0.5)
    x = torch.randint(0, 256, (32, 3, 16, 16), dtype=torch.uint8).float()
    plain = aug._photometric(x.clone(), torch.Generator().manual_seed(5))
    cl = aug._photometric(x.contiguous(memory_format=torch.channels_last), torch.Generator().manual_seed(5))
    assert cl.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(plain, cl, atol=1e-3)


def test_blur_is_the_3x3_gaussian_with_reflected_borders():
    """The separable blur (no convolution: no cuDNN search per batch size) is the 3x3 Gaussian
    kernel of the sampled sigma, borders reflected, in either memory layout."""
    aug = BatchAugment(PRE)
    x = torch.rand(4, 3, 16, 20, generator=torch.Generator().manual_seed(0)) * 255
    sigma = torch.tensor([1.3])
    taps = torch.exp(-torch.tensor([1.0, 0.0, 1.0]) / (2 * sigma**2))
    kernel = (taps[:, None] * taps[None, :]) / taps.sum() ** 2
    reference = torch.nn.functional.conv2d(torch.nn.functional.pad(x, (1, 1, 1, 1), mode="reflect"),
                                           kernel.expand(3, 1, 3, 3).contiguous(), groups=3)
    blurred = aug._blur(x, sigma)
    assert torch.allclose(blurred, reference, atol=1e-3)
    assert torch.equal(aug._blur(x.contiguous(memory_format=torch.channels_last), sigma), blurred)
