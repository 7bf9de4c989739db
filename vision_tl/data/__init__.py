"""Data: image folders, splits, augmentation presets and the LightningDataModule."""

from vision_tl.data.datamodule import ImageDataset, ImageFolderDataModule
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
