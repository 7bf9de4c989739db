"""Frozen-backbone features: ``extract`` to files, a content-keyed ``FeatureCache``, quick probes.

Imports are lazy so that ``import vision_tl.features`` stays fast (no torch until used)::

    from vision_tl.features import extract, FeatureCache, probe
    fs = extract("images/", "tf_efficientnet_lite0", "emb.parquet")

``vision_tl.features.probe`` is the ``probe`` function, also once its submodule is imported;
that module's other names come with ``from vision_tl.features.probe import ...``.
"""

from __future__ import annotations

import importlib
import sys
import types

_EXPORTS = {
    "extract": "vision_tl.features.api",
    "scan_images": "vision_tl.features.api",
    "FeatureCache": "vision_tl.features.cache",
    "FeatureCacheError": "vision_tl.features.cache",
    "default_cache_dir": "vision_tl.features.cache",
    "FeatureExtractor": "vision_tl.features.extractor",
    "parse_stages": "vision_tl.features.extractor",
    "FeatureSet": "vision_tl.features.store",
    "FeatureStoreError": "vision_tl.features.store",
    "read_features": "vision_tl.features.store",
    "probe": "vision_tl.features.probe",
    "cross_validate": "vision_tl.features.probe",
    "few_shot": "vision_tl.features.probe",
    "pca_scatter": "vision_tl.features.probe",
    "format_table": "vision_tl.features.probe",
    "cached_feature_datasets": "vision_tl.features.training",
}

__all__ = [
    "FeatureCache",
    "FeatureCacheError",
    "FeatureExtractor",
    "FeatureSet",
    "FeatureStoreError",
    "cached_feature_datasets",
    "cross_validate",
    "default_cache_dir",
    "extract",
    "few_shot",
    "format_table",
    "parse_stages",
    "pca_scatter",
    "probe",
    "read_features",
    "scan_images",
]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # looked up once; the module dict bypasses _Package.__setattr__
        return value
    raise AttributeError(f"module 'vision_tl.features' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """Keeps exported names on their objects: importing the submodule ``vision_tl.features.probe``
    would otherwise bind the package attribute ``probe`` to that module, hiding the function."""

    def __setattr__(self, name: str, value) -> None:
        if name in _EXPORTS and isinstance(value, types.ModuleType) and value.__name__ == f"{__name__}.{name}":
            return  # the submodule stays reachable as sys.modules["vision_tl.features.probe"]
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
