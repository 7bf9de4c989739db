"""Frozen-mode training on cached features: the backbone runs once per image (per view).

``ImageClassifier`` (``mode="frozen"``) calls :func:`cached_feature_datasets` in its
``setup("fit")`` and hands the result to ``ImageFolderDataModule.use_features``; the
loaders then yield ``[N, F]`` feature batches and the module runs only the head.
Because the frozen backbone is always in eval mode, a cached validation feature is
exactly what the uncached forward pass computes: validation metrics mean the same.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from vision_tl.features.cache import FeatureCache, failure_listing
from vision_tl.features.extractor import FeatureExtractor


class CachedFeatures(Dataset):
    """``(features, label)`` pairs; with K views per image, each access draws one view at random.

    View 0 is the clean image, views 1..K-1 augmented ones; training thus sees a
    different cached augmentation of an image from epoch to epoch.
    """

    def __init__(self, features: np.ndarray, labels: list[int] | np.ndarray) -> None:
        feats = torch.from_numpy(np.ascontiguousarray(features, np.float32))
        self.features = feats if feats.ndim == 3 else feats[:, None]
        self.labels = [int(y) for y in labels]
        if len(self.features) != len(self.labels):
            raise ValueError(f"{len(self.features)} feature rows for {len(self.labels)} labels")

    @property
    def views(self) -> int:
        return int(self.features.shape[1])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        view = int(torch.randint(self.views, ()).item()) if self.views > 1 else 0
        return self.features[i, view], self.labels[i]


def cached_feature_datasets(backbone: nn.Module, backbone_name: str, datamodule,
                            cache_dir: str | Path | None = None, views: int = 1,
                            device: torch.device | str | None = None,
                            progress: bool = True, precision: str = "32",
                            cuda_graphs: bool = True) -> dict[str, CachedFeatures]:
    """Train/val feature datasets for ``datamodule``'s splits, through the :class:`FeatureCache`.

    Args:
        backbone: the (frozen) backbone of the model being trained; its weights are
            part of the cache key, so fine-tuned or random weights never hit a stale entry.
        backbone_name: timm name (cache layout and metadata).
        datamodule: an ``ImageFolderDataModule`` after ``setup``: gives the samples,
            the preprocessing and the augmentation of views 1..K-1.
        cache_dir: cache root (default ``$VISION_TL_CACHE`` or ``~/.cache/vision_tl/features``).
        views: K cached views per training image (1 = clean only).
        device: where to run the backbone.
        progress: tqdm bars.
        precision: ``"32"`` or ``"bf16"`` (autocast): the precision the backbone would run in
            during training (features of each are cached apart).
        cuda_graphs: on a GPU, run the backbone as CUDA graphs (see :class:`FeatureExtractor`).

    Example:
        >>> data = cached_feature_datasets(model.net.backbone, "tf_efficientnet_lite0", dm)
        >>> dm.use_features(data)
    """
    if views < 1:
        raise ValueError(f"cached_views must be at least 1, got {views}")
    cache = FeatureCache(cache_dir)
    out = {}
    for split in ("train", "val"):
        extractors = [FeatureExtractor(backbone, backbone_name, datamodule.preprocessing, "pooled",
                                       datamodule.hparams.augment, view, precision, cuda_graphs=cuda_graphs)
                      for view in range(views if split == "train" else 1)]
        out[split] = _split_features(cache, extractors, datamodule, split, device, progress)
    return out


def _split_features(cache: FeatureCache, extractors: list[FeatureExtractor], datamodule, split: str,
                    device, progress: bool) -> CachedFeatures:
    samples = list(datamodule.splits.get(split, []))
    paths, hashes = [s.path for s in samples], [s.sha256 for s in samples]
    failed: dict[Path, str] = {}
    model_device = next(extractors[0].model.parameters()).device
    on_gpu = (torch.device(device) if device is not None else model_device).type == "cuda"
    # A GPU gets the training batch size; a CPU 8 (no slower than more, and a smaller peak).
    batch_size = int(datamodule.hparams.batch_size) if on_gpu else 8
    for extractor in extractors:
        desc = f"features {split}" + (f" view {extractor.view}" if len(extractors) > 1 else "")
        # clean views decode on threads, augmented ones run albumentations in loader processes
        workers = getattr(datamodule, "decode_threads", 0) if extractor.view == 0 else datamodule.num_workers
        report = cache.ensure(extractor, paths, hashes, batch_size=batch_size, num_workers=workers, device=device,
                              progress=desc if progress else False)
        failed.update({Path(p): why for p, why in report.failed})
    if failed and not datamodule.hparams.skip_bad_images:
        raise ValueError(f"{len(failed)} image(s) could not be decoded:\n{failure_listing(list(failed.items()))}\n"
                         "Fix or remove them, or pass --data.skip_bad_images true.")
    samples = [s for s in samples if Path(s.path) not in failed]
    feats = [cache.read(extractor, [s.sha256 for s in samples]) for extractor in extractors]
    return CachedFeatures(np.stack(feats, 1), [s.label for s in samples])
