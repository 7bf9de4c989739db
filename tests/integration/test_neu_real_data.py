"""Real data: frozen EfficientNet-Lite0 (bundled ImageNet weights) on a NEU subset."""

from __future__ import annotations

import lightning as L
import pytest

from vision_tl.data import ImageFolderDataModule
from vision_tl.tasks import ImageClassifier

pytestmark = [pytest.mark.realdata, pytest.mark.slow]


def _subset(neu_root, dest, per_class: int):
    """Symlink the first `per_class` images of every class (sorted) into dest/train and dest/val."""
    n_val = per_class // 3
    for class_dir in sorted(p for p in neu_root.iterdir() if p.is_dir()):
        files = sorted(class_dir.glob("*.jpg"))[: per_class]
        for split, chosen in (("val", files[:n_val]), ("train", files[n_val:])):
            (dest / split / class_dir.name).mkdir(parents=True, exist_ok=True)
            for f in chosen:
                (dest / split / class_dir.name / f.name).symlink_to(f)
    return dest


def test_frozen_lite0_reaches_95_percent_on_a_neu_subset(neu_root, tmp_path):
    root = _subset(neu_root, tmp_path / "neu", per_class=60)
    L.seed_everything(0, verbose=False)
    data = ImageFolderDataModule(str(root), augment="none", batch_size=32, num_workers=0)
    model = ImageClassifier(data.classes, mode="frozen", lr=3e-3, feature_cache=str(tmp_path / "cache"))
    trainer = L.Trainer(max_epochs=15, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(model, datamodule=data)
    result = trainer.validate(model, datamodule=data, verbose=False)[0]
    assert result["val/acc"] >= 0.95, result
