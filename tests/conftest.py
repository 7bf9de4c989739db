"""Shared fixtures: small synthetic image folders and the optional real NEU data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests never download anything and run on CPU with few threads.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
NEU = (REPO / ".." / "shared" / "datasets" / "neu").resolve()
TINY = "test_efficientnet"  # a ~100k-parameter timm model for mechanics


@pytest.fixture(scope="session")
def inspection_folder(tmp_path_factory) -> Path:
    """4 classes (good, scratch, spot, crack), 12 images each, 48 px; read-only by convention."""
    from vision_tl.data.synthetic import make_inspection_dataset

    root = tmp_path_factory.mktemp("inspection")
    make_inspection_dataset(root, 12, size=48, seed=1, overwrite=True)
    return root


@pytest.fixture
def neu_root() -> Path:
    if not (NEU / "crazing").is_dir():
        pytest.skip(f"real-data test: NEU dataset not found at {NEU}")
    return NEU
