"""Decoded-image cache: resized uint8 pixels in one memory-mapped ``.npy`` file.

JPEG decoding and resizing dominate the input pipeline. For datasets that fit on
disk once as raw pixels (224 px RGB is 150 kB per image: 10,000 images are 1.5 GB),
the first run decodes every image once, in parallel, and later epochs and later
runs read the pixels straight from the page cache. The file is keyed like the
feature cache: the sha256 of every image in order, the input size and the resize
interpolation, so any change of content or preprocessing picks a new file and a
stale one is never read. It is written under a temporary name and renamed, so a
killed run never leaves a partial cache under the final name.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from vision_tl.data.transforms import pixel_batch_buffer
from vision_tl.imaging import ImageLoadError, load_rgb, resize
from vision_tl.utils.files import atomic_path, atomic_write_text

CACHE_ENV = "VISION_TL_DECODED_CACHE"
FORMAT = 1


def default_decoded_cache_dir() -> Path:
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "vision_tl" / "decoded"


class _Decode(Dataset):
    def __init__(self, paths: list[Path], size: tuple[int, int], interpolation: str) -> None:
        self.paths, self.size, self.interpolation = paths, size, interpolation

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, np.ndarray, str]:
        try:
            return i, resize(load_rgb(self.paths[i]), self.size, self.interpolation), ""
        except ImageLoadError as exc:
            return i, np.zeros((*self.size, 3), np.uint8), str(exc)


def _collate_pixels(items: list[tuple[int, np.ndarray, str]]) -> tuple[list[int], torch.Tensor, list[str]]:
    """One ``[N, H, W, 3]`` tensor per batch (in shared memory in a worker): sending 64
    separate images between processes cost more than decoding them."""
    pixels = pixel_batch_buffer((len(items), *items[0][1].shape))
    for row, (_, image, _) in zip(pixels.numpy(), items, strict=True):
        row[...] = image
    return [i for i, _, _ in items], pixels, [error for _, _, error in items]


def _key(shas: list[str], size: tuple[int, int], interpolation: str) -> str:
    identity = {"format": FORMAT, "shas": shas, "size": list(size), "interpolation": interpolation}
    return hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:24]


def decoded_images(paths: list[Path], shas: list[str], size: tuple[int, int], interpolation: str,
                   cache_dir: str | Path | None = None, num_workers: int = 0) -> tuple[np.ndarray, list[int]]:
    """``[N, H, W, 3]`` uint8 pixels (memory-mapped) and the indices that failed to decode.

    Builds the cache file on first use (with a progress bar), then only maps it.
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_decoded_cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    key = _key(shas, size, interpolation)
    data_path, meta_path = root / f"{key}.npy", root / f"{key}.json"
    if data_path.exists() and meta_path.exists():
        meta = json.loads(meta_path.read_text())
        array = np.load(data_path, mmap_mode="r")
        if array.shape == (len(paths), *size, 3) and meta.get("format") == FORMAT:
            return array, list(meta.get("bad", []))
        warnings.warn(f"decoded cache {data_path} does not match its key; rebuilding it", stacklevel=2)
    bad = _build(data_path, paths, size, interpolation, num_workers)
    atomic_write_text(meta_path, json.dumps({"format": FORMAT, "count": len(paths), "size": list(size),
                                             "interpolation": interpolation, "bad": bad}))
    return np.load(data_path, mmap_mode="r"), bad


def _build(path: Path, paths: list[Path], size: tuple[int, int], interpolation: str, num_workers: int) -> list[int]:
    from tqdm.auto import tqdm

    loader = DataLoader(_Decode(paths, size, interpolation), batch_size=64, num_workers=num_workers,
                        collate_fn=_collate_pixels)
    bad: list[int] = []
    with atomic_path(path) as tmp:
        # open_memmap writes a real .npy header, so np.load(mmap_mode="r") reads it back.
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(paths), *size, 3))
        with tqdm(total=len(paths), desc="decoding images (once)", unit="img") as bar:
            for rows, pixels, errors in loader:  # rows come in order: one slice per batch
                out[rows[0]:rows[-1] + 1] = pixels.numpy()
                bad += [i for i, error in zip(rows, errors, strict=True) if error]
                bar.update(len(rows))
        out.flush()
        del out
    return sorted(bad)


class DecodedImageDataset(Dataset):
    """Samples from a decoded cache; ``__getitems__`` slices a whole batch at once.

    Args:
        pixels: ``[N, H, W, 3]`` uint8 (memory-mapped) array.
        labels: class index per row.
        indices: rows to serve (bad images left out).
        transform: ``uint8 HxWx3 -> tensor`` for per-sample CPU augmentation, or
            ``None`` to serve uint8 ``[3, H, W]`` tensors for on-device augmentation.
    """

    def __init__(self, pixels: np.ndarray, labels: list[int], indices: list[int], transform=None) -> None:
        self.pixels, self.transform = pixels, transform
        self.indices = np.asarray(indices, dtype=np.int64)
        self.labels = np.asarray(labels, dtype=np.int64)[self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image = self.pixels[self.indices[i]]
        if self.transform is not None:  # a Draw from the sampler carries the augmentation seed
            return self.transform(np.asarray(image), seed=getattr(i, "seed", None)), int(self.labels[i])
        # a copy (the mapped file is read-only), served channels-last like every uint8 image
        return torch.from_numpy(np.array(image)).permute(2, 0, 1), int(self.labels[i])

    def __getitems__(self, batch: list[int]):
        """The device pipeline's whole batch in one read: rows in file order (sequential on
        disk; the order within a batch does not matter to training), into a channels-last
        ``[N, 3, H, W]`` uint8 tensor (in a loader worker, in shared memory)."""
        if self.transform is not None:
            return [self[i] for i in batch]
        positions = np.asarray(batch, dtype=np.int64)
        order = np.argsort(self.indices[positions], kind="stable")
        rows, labels = self.indices[positions[order]], self.labels[positions[order]]
        out = pixel_batch_buffer((len(rows), *self.pixels.shape[1:]))
        np.take(self.pixels, rows, axis=0, out=out.numpy())
        return [(out.permute(0, 3, 1, 2), torch.from_numpy(labels))]  # one pre-collated batch
