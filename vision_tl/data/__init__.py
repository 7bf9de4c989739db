"""Data: image folders, splits, augmentation presets and the LightningDataModule.

Only the folder scanning is imported with the package: the transforms (torch, timm,
albumentations) and the data module (Lightning) are imported on first use, so commands that
only scan folders (``vision-tl report``'s and ``export``'s checks of a run's split) or only
decode images (``vision-tl extract``, ``probe``) start without what they do not need.
"""

from vision_tl.data.folder import DatasetError, FolderIndex, scan_folder, stratified_split
from vision_tl.utils import lazy_attributes

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

__getattr__, __dir__ = lazy_attributes(__name__, {
    "ImageDataset": "vision_tl.data.datamodule", "ImageFolderDataModule": "vision_tl.data.datamodule",
    "PRESETS": "vision_tl.data.transforms", "ImageTransform": "vision_tl.data.transforms",
    "build_augmentation": "vision_tl.data.transforms", "eval_transform": "vision_tl.data.transforms"}, __all__)
