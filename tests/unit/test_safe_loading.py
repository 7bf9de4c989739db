"""Checkpoints and weights load with weights_only=True: a pickle payload never runs."""

from __future__ import annotations

import pytest
import torch

from vision_tl.backbones import BackboneWeightsError, create_backbone
from vision_tl.tasks import CheckpointError, load_classifier


class Payload:
    """Unpickling this calls open(marker, "w"): executing it would create a file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _malicious(path, marker) -> None:
    torch.save({"state_dict": {"w": torch.zeros(1)}, "hyper_parameters": {"classes": ["a", "b"]},
                "vision_tl": {"classes": ["a", "b"]}, "payload": Payload(str(marker))}, path)


def test_checkpoint_with_a_payload_is_refused_and_never_executed(tmp_path):
    marker, ckpt = tmp_path / "pwned", tmp_path / "evil.ckpt"
    _malicious(ckpt, marker)
    with pytest.raises(CheckpointError, match="refusing to load .*evil.ckpt"):
        load_classifier(ckpt)
    assert not marker.exists()


def test_weights_file_with_a_payload_is_refused(tmp_path):
    marker, weights = tmp_path / "pwned", tmp_path / "evil.pth"
    _malicious(weights, marker)
    with pytest.raises(BackboneWeightsError, match="evil.pth"):
        create_backbone("test_efficientnet", weights=weights)
    assert not marker.exists()


def test_cli_ckpt_path_with_a_payload_is_refused(tmp_path, inspection_folder):
    from pathlib import Path

    from vision_tl.cli import main

    marker, ckpt = tmp_path / "pwned", tmp_path / "evil.ckpt"
    _malicious(ckpt, marker)
    config = Path(__file__).resolve().parents[2] / "configs" / "frozen.yaml"
    info = main(["test", "--config", str(config), "--data.root", str(inspection_folder),
          "--model.backbone", "test_efficientnet", "--model.pretrained", "false",
          "--trainer.logger.init_args.save_dir", str(tmp_path), "--ckpt_path", str(ckpt)])
    assert info == 2
    assert not marker.exists()


@pytest.mark.parametrize("section", ["vision_tl", "hyper_parameters"])
def test_a_checkpoint_whose_sections_are_not_mappings_is_named_as_damaged(tmp_path, section):
    from vision_tl.tasks.checkpoint import CheckpointError, read_checkpoint

    ckpt = {"state_dict": {}, "vision_tl": {}, "hyper_parameters": {}}
    ckpt[section] = ["not", "a", "mapping"]
    torch.save(ckpt, tmp_path / "odd.ckpt")
    with pytest.raises(CheckpointError, match=rf"odd.ckpt is damaged: its '{section}' section is a list"):
        read_checkpoint(tmp_path / "odd.ckpt")


def test_a_checkpoint_with_a_flipped_byte_is_refused_not_loaded_as_other_weights(tmp_path):
    """torch.load does not check the archive's CRCs: a damaged copy loaded, exported and passed
    its parity check against its own, wrong, weights."""
    import zipfile

    from vision_tl.tasks.checkpoint import read_checkpoint

    path = tmp_path / "best.ckpt"
    torch.save({"state_dict": {"w": torch.arange(4096, dtype=torch.float32)}, "vision_tl": {},
                "hyper_parameters": {}}, path)
    read_checkpoint(path)
    with zipfile.ZipFile(path) as archive:
        member = next(i for i in archive.infolist() if i.filename.endswith("data/0"))
    data = bytearray(path.read_bytes())
    data[member.header_offset + 200] ^= 0xFF  # inside the tensor's bytes (past the local header)
    path.write_bytes(bytes(data))
    assert torch.load(path, weights_only=True)["state_dict"]["w"].shape == (4096,)  # torch does not notice
    with pytest.raises(CheckpointError, match=r"best\.ckpt is damaged: its part .*data/0 no longer matches"):
        read_checkpoint(path)


@pytest.mark.parametrize("given", ["run", "run/checkpoints"])
def test_a_folder_given_as_checkpoint_is_told_the_file_inside_it(tmp_path, given):
    """`--ckpt_path RUN/checkpoints` is pointed at RUN/checkpoints/best.ckpt, not at a
    checkpoints/checkpoints/ path that does not exist; a run directory at its checkpoints/best.ckpt."""
    from vision_tl.tasks.checkpoint import read_checkpoint

    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(tmp_path / given)
    assert str(info.value).endswith(f"(e.g. {tmp_path / 'run' / 'checkpoints' / 'best.ckpt'})")


def test_a_run_given_paths_and_numpy_numbers_from_python_saves_a_checkpoint_that_loads(tmp_path, inspection_folder):
    """A notebook passes root=Path(...) and numbers from numpy: saved as they are, they made a
    checkpoint that weights_only=True refused as unsafe, so it could be neither loaded nor exported."""
    from pathlib import Path

    import lightning as L
    import numpy as np

    from vision_tl.data import ImageFolderDataModule
    from vision_tl.tasks import ImageClassifier

    data = ImageFolderDataModule(Path(inspection_folder), backbone="test_efficientnet", image_size=32,
                                 batch_size=np.int64(8), num_workers=0, augment="none")
    model = ImageClassifier(data.classes, backbone="test_efficientnet", pretrained=False, image_size=32,
                            mode="frozen", lr=np.float64(1e-3), feature_cache=tmp_path / "features")
    trainer = L.Trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path)
    trainer.fit(model, datamodule=data)
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    loaded, meta = load_classifier(tmp_path / "run.ckpt")
    assert meta["classes"] == data.classes
    assert loaded.hparams.feature_cache == str(tmp_path / "features")
    assert torch.load(tmp_path / "run.ckpt", weights_only=True)["datamodule_hyper_parameters"]["root"] == str(
        inspection_folder)
