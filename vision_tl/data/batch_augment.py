"""Batch augmentation on tensors, for use after the batch reaches the device.

``BatchAugment`` mirrors the ``inspection`` albumentations preset in
distribution (same probabilities and parameter ranges, same pixel arithmetic
on the 0..255 scale, with clipping; the noise follows the nominal std, where
albumentations' ``GaussNoise`` on uint8 images comes out about 10 % weaker,
measured on a flat grey image) but works on whole ``[N, 3, H, W]`` uint8
or float batches, on a GPU or a CPU. Decoding and resizing stay on the CPU;
augmenting and normalising move to the device, so the GPU is not starved by
per-image CPU work. Normalisation uses the backbone's mean and std.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from vision_tl.backbones import Preprocessing
from vision_tl.data.device import to_device
from vision_tl.data.transforms import normalisation


def _coin(n: int, p: float, generator: torch.Generator | None) -> torch.Tensor:
    return torch.rand(n, generator=generator) < p


def _uniform(n: int, low: float, high: float, generator: torch.Generator | None) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator)


def _rows(picked: torch.Tensor) -> torch.Tensor:
    """Indices of the picked images, found on the host (numpy: never a device operation)."""
    return torch.from_numpy(np.flatnonzero(picked.numpy()))


def _change_rows(batch: torch.Tensor, rows: torch.Tensor, change) -> None:
    """``batch[rows] = change(batch[rows])``, in place, for the images one step picked."""
    if len(rows):
        batch.index_copy_(0, rows, change(batch.index_select(0, rows)))


class BatchAugment(nn.Module):
    """Flips, 90° turns, brightness/contrast, gamma, noise and blur on a batch, then normalise.

    Args:
        preprocessing: the backbone's mean/std (0..1 scale).
        augment: apply the random part (False: normalise only, for evaluation).
        brightness, contrast: albumentations ``RandomBrightnessContrast`` limits, ``p_bc`` its p.
        gamma: ``RandomGamma`` limits in percent, ``p_gamma`` its p.
        noise_std: ``GaussNoise`` std range as a share of 255, ``p_noise`` its p.
        p_blur: ``GaussianBlur`` (3x3, sigma 0.5..3) probability.

    Example:
        >>> aug = BatchAugment(resolve_preprocessing("tf_efficientnet_lite0"))
        >>> x = aug(torch.randint(0, 256, (8, 3, 224, 224), dtype=torch.uint8))
    """

    def __init__(self, preprocessing: Preprocessing, augment: bool = True, brightness: float = 0.15,
                 contrast: float = 0.15, p_bc: float = 0.7, gamma: tuple[float, float] = (85, 115),
                 p_gamma: float = 0.3, noise_std: tuple[float, float] = (0.01, 0.03), p_noise: float = 0.2,
                 p_blur: float = 0.1, p_vflip: float = 0.5, p_rot90: float = 0.5) -> None:
        super().__init__()
        self.augment = augment
        self.p_vflip, self.p_rot90 = p_vflip, p_rot90
        self.brightness, self.contrast, self.p_bc = brightness, contrast, p_bc
        self.gamma, self.p_gamma = gamma, p_gamma
        self.noise_std, self.p_noise, self.p_blur = noise_std, p_noise, p_blur
        mean, inv_std = (torch.from_numpy(a).view(1, 3, 1, 1) for a in normalisation(preprocessing))
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("inv_std", inv_std, persistent=False)
        # A constant on the module's device: a tensor built from host data inside forward would
        # be a blocking copy, i.e. a wait for the GPU on every batch (see to_device for the random draws).
        self.register_buffer("taps", torch.tensor([-1.0, 0.0, 1.0]), persistent=False)

    @classmethod
    def from_preset(cls, preset: str, preprocessing: Preprocessing, train: bool = True) -> BatchAugment:
        """The batch twin of an albumentations preset (``none``, ``light``, ``inspection``)."""
        if preset == "inspection":
            return cls(preprocessing, augment=train)
        if preset == "light":
            return cls(preprocessing, augment=train, brightness=0.1, contrast=0.1, p_bc=0.5, p_gamma=0.0,
                       p_noise=0.0, p_blur=0.0, p_vflip=0.0, p_rot90=0.0)
        if preset == "none":
            return cls(preprocessing, augment=False)
        raise ValueError(
            f"on-device augmentation supports the presets none, light and inspection, not {preset!r}; "
            "use --data.pipeline cpu for a custom albumentations list"
        )

    @torch.no_grad()
    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """``[N, 3, H, W]`` uint8 (or float on the 0..255 scale) -> normalised float32.

        The result keeps the batch's memory layout (channels_last batches from the
        loaders stay channels_last for the GPU), except on a CPU, where it is contiguous
        NCHW, the layout these CPU operations were written and measured for (the model
        converts its input to channels-last itself). The random choices are drawn on the CPU (from
        ``generator``, a CPU generator, or the global one), so which images a step touches
        is known without asking the device: gamma, noise and blur run on those images
        only, and nothing here waits for the GPU, so the next batch is augmented while the
        previous step still runs.
        """
        if x.device.type == "cpu":
            x = x.contiguous()
        if self.augment and len(x):
            x = self._geometry(x, generator)  # on uint8: a quarter of the memory traffic
            x = self._photometric(x, generator)
        else:
            x = x.to(torch.float32, copy=True)  # never normalise the caller's tensor in place
        return x.sub_(self.mean).mul_(self.inv_std)  # = (x - mean) * inv_std, bit for bit

    def _geometry(self, x: torch.Tensor, generator) -> torch.Tensor:
        """Horizontal flip, vertical flip, then 0-3 quarter turns (the albumentations order and
        probabilities), applied as the equivalent transpose + flips: three passes instead of ten."""
        n = len(x)
        h = _coin(n, 0.5, generator).long()
        v = _coin(n, self.p_vflip, generator).long()
        square = x.shape[2] == x.shape[3] and self.p_rot90 > 0  # turns keep only square shapes
        k = torch.zeros(n, dtype=torch.long)
        if square:
            k = torch.randint(0, 4, (n,), generator=generator)
            k = torch.where(_coin(n, self.p_rot90, generator), k, torch.zeros_like(k))
        (table,) = to_device(x.device, _DIHEDRAL[h + 2 * v + 4 * k])  # [n, 3]: transpose, flip W, flip H
        shape = (n, 1, 1, 1)
        if square:
            x = torch.where(~table[:, 0].view(shape), x, x.transpose(2, 3))  # keeps x's layout
        x = torch.where(table[:, 1].view(shape), x.flip(3), x)
        return torch.where(table[:, 2].view(shape), x.flip(2), x)

    def _photometric(self, x: torch.Tensor, generator) -> torch.Tensor:
        """Brightness/contrast, gamma, noise, blur; ``x`` uint8 or float on the 0..255 scale.

        Brightness/contrast (most images) runs on the whole batch, with identity parameters
        (contrast 1, brightness 0) for the images it skips, which leaves them bit-for-bit
        unchanged. Gamma, noise and blur fire for a minority of images: each runs on the
        images it picked alone (gathered, changed, written back), about a quarter of the
        work of computing it for every image and masking.
        """
        n = len(x)
        shape = (n, 1, 1, 1)
        on = _coin(n, self.p_bc, generator)
        alpha = torch.where(on, 1.0 + _uniform(n, -self.contrast, self.contrast, generator), 1.0)
        beta = torch.where(on, 255.0 * _uniform(n, -self.brightness, self.brightness, generator), 0.0)
        gamma_rows = _rows(_coin(n, self.p_gamma, generator))
        gamma = _uniform(len(gamma_rows), self.gamma[0] / 100, self.gamma[1] / 100, generator)
        noise_rows = _rows(_coin(n, self.p_noise, generator))
        std = 255.0 * _uniform(len(noise_rows), *self.noise_std, generator)
        blur_rows = _rows(_coin(n, self.p_blur, generator))
        sigma = _uniform(1, 0.5, 3.0, generator)  # one draw per batch
        alpha, beta, gamma_rows, gamma, noise_rows, std, blur_rows, sigma = to_device(
            x.device, alpha, beta, gamma_rows, gamma, noise_rows, std, blur_rows, sigma)
        x = torch.addcmul(beta.view(shape), x, alpha.view(shape)).clamp_(0, 255)  # also the conversion to float32
        # Per-image steps work on an NHWC view of channels-last batches: rows gathered from it
        # and written back are contiguous blocks.
        nhwc = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
        view = x.permute(0, 2, 3, 1) if nhwc else x
        noise_generator = generator if generator is not None and generator.device == x.device else None

        def blur(part: torch.Tensor) -> torch.Tensor:  # the convolution wants NCHW order
            return self._blur(part.permute(0, 3, 1, 2), sigma).permute(0, 2, 3, 1) if nhwc else self._blur(part, sigma)

        _change_rows(view, gamma_rows, lambda part: part.div_(255.0).pow_(gamma.view(-1, 1, 1, 1)).mul_(255.0))
        _change_rows(view, noise_rows, lambda part: part.addcmul_(
            torch.empty_like(part).normal_(generator=noise_generator), std.view(-1, 1, 1, 1)).clamp_(0, 255))
        _change_rows(view, blur_rows, blur)
        return x

    def _blur(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """3x3 Gaussian blur with standard deviation ``sigma`` (a 1-element tensor), reflected borders.

        Separable, as weighted sums of shifted views rather than a convolution: the number of
        images blurred changes from batch to batch, and with cuDNN autotuning on (configs/gpu.yaml)
        every new count of a convolution would start a new search that makes the CPU wait.
        """
        t = self.taps.to(x.device)
        k1 = torch.exp(-(t**2) / (2 * sigma**2))
        w = k1 / k1.sum()
        padded = nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")
        height, width = x.shape[-2:]
        rows = w[0] * padded[..., :, :width] + w[1] * padded[..., :, 1:width + 1] + w[2] * padded[..., :, 2:]
        return w[0] * rows[..., :height, :] + w[1] * rows[..., 1:height + 1, :] + w[2] * rows[..., 2:, :]


def orientations(image: torch.Tensor) -> dict[tuple[int, int, int], torch.Tensor]:
    """The 8 turns and mirrors of ``[..., S, S]`` images, keyed by (transpose, flip W, flip H)."""
    out = {}
    for t in (0, 1):
        for fw in (0, 1):
            for fh in (0, 1):
                y = image.transpose(-2, -1) if t else image
                y = y.flip(-1) if fw else y
                out[(t, fw, fh)] = y.flip(-2) if fh else y
    return out


def _dihedral_table() -> torch.Tensor:
    """For each (hflip, vflip, turns) code ``h + 2v + 4k``: the (transpose, flip W, flip H)
    that gives the same image, found by applying both to a 3x3 grid of distinct values."""
    grid = torch.arange(9).view(1, 1, 3, 3)
    candidates = {tuple(y.flatten().tolist()): key for key, y in orientations(grid).items()}
    rows = []
    for code in range(16):
        h, v, k = code & 1, (code >> 1) & 1, code >> 2
        y = grid.flip(3) if h else grid
        y = y.flip(2) if v else y
        rows.append(candidates[tuple(torch.rot90(y, k, (2, 3)).flatten().tolist())])
    return torch.tensor(rows, dtype=torch.bool)


_DIHEDRAL = _dihedral_table()
