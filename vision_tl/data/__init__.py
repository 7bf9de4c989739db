"""Data: image folders, splits, augmentation presets and the LightningDataModule.

Only the folder scanning is imported with the package: the transforms (torch, timm,
albumentations) and the data module (Lightning) are imported on first use, so commands that
only scan folders (``vision-tl report``'s and ``export``'s checks of a run's split) or only
decode images (``vision-tl extract``, ``probe``) start without what they do not need.
"""

from vision_tl.data.folder import DatasetError, FolderIndex, scan_folder, stratified_split

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

_LAZY = {"ImageDataset": "datamodule", "ImageFolderDataModule": "datamodule", "PRESETS": "transforms",
         "ImageTransform": "transforms", "build_augmentation": "transforms", "eval_transform": "transforms"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"vision_tl.data.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:  # (the names not imported yet too, as before they were lazy)
    return sorted(set(globals()) | set(__all__))
