"""Data: image folders, splits, augmentation presets and the LightningDataModule.

The data module (and with it Lightning) is imported on first use, so commands that only
scan folders and decode images (``vision-tl extract``, ``probe``) start without it.
"""

from vision_tl.data.folder import DatasetError, FolderIndex, scan_folder, stratified_split
from vision_tl.data.transforms import PRESETS, ImageTransform, build_augmentation, eval_transform

__all__ = [
    "PRESETS",
    "DatasetError",
    "FolderIndex",
    "ImageDataset",
    "ImageFolderDataModule",
    "ImageTransform",
    "build_augmentation",
    "eval_transform",
    "scan_folder",
    "stratified_split",
]


def __getattr__(name: str):
    if name in ("ImageDataset", "ImageFolderDataModule"):
        from vision_tl.data import datamodule

        return getattr(datamodule, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
