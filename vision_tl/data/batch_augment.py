"""Batch augmentation on tensors, for use after the batch reaches the device.

``BatchAugment`` mirrors the ``inspection`` albumentations preset in
distribution (same probabilities and parameter ranges, same pixel arithmetic
on the 0..255 scale, with clipping) but works on whole ``[N, 3, H, W]`` uint8
or float batches, on a GPU or a CPU. Decoding and resizing stay on the CPU;
augmenting and normalising move to the device, so the GPU is not starved by
per-image CPU work. Normalisation uses the backbone's mean and std.
"""

from __future__ import annotations

import torch
from torch import nn

from vision_tl.backbones import Preprocessing
from vision_tl.data.transforms import normalisation


def _coin(n: int, p: float, device: torch.device, generator: torch.Generator | None) -> torch.Tensor:
    return torch.rand(n, device=device, generator=generator) < p


def _uniform(n: int, low: float, high: float, device, generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, device=device, generator=generator)


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
        # Constants live on the module's device: a tensor built from host data inside forward
        # would be a blocking copy, i.e. a wait for the GPU on every batch.
        self.register_buffer("dihedral", _DIHEDRAL.clone(), persistent=False)
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
        NCHW as CPU convolutions expect. Nothing here waits for the device, so on a GPU
        the next batch is augmented while the previous step still runs.
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
        n, dev = len(x), x.device
        h = _coin(n, 0.5, dev, generator).long()
        v = _coin(n, self.p_vflip, dev, generator).long()
        square = x.shape[2] == x.shape[3] and self.p_rot90 > 0  # turns keep only square shapes
        k = torch.zeros(n, dtype=torch.long, device=dev)
        if square:
            k = torch.randint(0, 4, (n,), device=dev, generator=generator)
            k = torch.where(_coin(n, self.p_rot90, dev, generator), k, torch.zeros_like(k))
        table = self.dihedral.to(dev)[h + 2 * v + 4 * k]  # [n, 3]: transpose, flip W, flip H
        shape = (n, 1, 1, 1)
        if square:
            x = torch.where(~table[:, 0].view(shape), x, x.transpose(2, 3))  # keeps x's layout
        x = torch.where(table[:, 1].view(shape), x.flip(3), x)
        return torch.where(table[:, 2].view(shape), x.flip(2), x)

    def _photometric(self, x: torch.Tensor, generator) -> torch.Tensor:
        """Brightness/contrast, gamma, noise, blur; ``x`` uint8 or float on the 0..255 scale.

        Samples a step skips get identity parameters (contrast 1, brightness 0, noise 0),
        which leave them bit-for-bit unchanged, so most steps need no masked copy.
        """
        n, dev = len(x), x.device
        shape = (n, 1, 1, 1)
        on = _coin(n, self.p_bc, dev, generator).view(shape)
        alpha = 1.0 + _uniform(n, -self.contrast, self.contrast, dev, generator).view(shape)
        beta = 255.0 * _uniform(n, -self.brightness, self.brightness, dev, generator).view(shape)
        alpha, beta = torch.where(on, alpha, 1.0), torch.where(on, beta, 0.0)
        x = torch.addcmul(beta, x, alpha).clamp_(0, 255)  # also the conversion to float32
        on = _coin(n, self.p_gamma, dev, generator).view(shape)
        g = _uniform(n, self.gamma[0] / 100, self.gamma[1] / 100, dev, generator).view(shape)
        x = torch.where(on, x.div(255.0).pow_(g).mul_(255.0), x)
        on = _coin(n, self.p_noise, dev, generator).view(shape)
        std = torch.where(on, 255.0 * _uniform(n, *self.noise_std, dev, generator).view(shape), 0.0)
        x.addcmul_(torch.empty_like(x).normal_(generator=generator), std).clamp_(0, 255)
        if self.p_blur > 0:
            x = torch.where(_coin(n, self.p_blur, dev, generator).view(shape), self._blur(x, generator), x)
        return x

    def _blur(self, x: torch.Tensor, generator) -> torch.Tensor:
        """3x3 Gaussian blur, sigma uniform in 0.5..3 (one draw per batch), reflected borders."""
        sigma = _uniform(1, 0.5, 3.0, x.device, generator)  # a tensor: no wait for the device
        t = self.taps.to(x.device)
        k1 = torch.exp(-(t**2) / (2 * sigma**2))
        kernel = (k1[:, None] * k1[None, :]) / (k1.sum() ** 2)
        weight = kernel.expand(3, 1, 3, 3).contiguous()
        padded = nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")
        return nn.functional.conv2d(padded, weight, groups=3)


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
