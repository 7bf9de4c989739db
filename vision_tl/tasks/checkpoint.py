"""Load vision_tl checkpoints safely (``weights_only=True``) with clear errors."""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

from vision_tl import __version__
from vision_tl.utils.files import TORCH_SAVE_MAGIC, file_head


class CheckpointError(ValueError):
    """A checkpoint that is missing, unsafe, from another tool, or does not fit."""


def read_checkpoint(path: str | Path) -> dict:
    """``torch.load(weights_only=True)`` with errors that name the file and the cause."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.is_dir():
        # a run's checkpoints/ folder holds the files; a run directory holds that folder
        inside = path.name == "checkpoints" or (path / "best.ckpt").is_file()
        example = path / "best.ckpt" if inside else path / "checkpoints" / "best.ckpt"
        raise CheckpointError(f"checkpoint {path} is a directory; expected a .ckpt file (e.g. {example})")
    if not file_head(path).startswith(TORCH_SAVE_MAGIC):
        kind = "an ONNX model; " if path.suffix.lower() == ".onnx" else ""
        raise CheckpointError(
            f"{path} is not a PyTorch checkpoint ({kind}expected a .ckpt written by `vision-tl fit`, "
            "e.g. runs/partial/version_0/checkpoints/best.ckpt)"
        )
    _check_crc(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"refusing to load {path}: it contains objects other than tensors and plain data, which "
            f"could run code when unpickled (weights_only=True rejected it: {str(exc).splitlines()[0]})"
        ) from exc
    except Exception as exc:  # noqa: BLE001 - zip/EOF/pickle errors all mean "not a checkpoint"
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"{path} is not a Lightning checkpoint (no state_dict)")
    if "vision_tl" not in ckpt or "hyper_parameters" not in ckpt:
        raise CheckpointError(
            f"{path} was not written by vision_tl (no 'vision_tl' section); train with `vision-tl fit` "
            "or load raw backbone weights with --model.weights instead"
        )
    for key in ("vision_tl", "hyper_parameters", "state_dict"):
        if not isinstance(ckpt[key], dict):
            raise CheckpointError(f"{path} is damaged: its {key!r} section is a {type(ckpt[key]).__name__}, not the "
                                  "mapping vision-tl fit writes; use another checkpoint of the run (e.g. last.ckpt)")
    return ckpt


def _check_crc(path: Path) -> None:
    """Every member of the checkpoint's zip archive against the CRC-32 stored with it when it was
    written. ``torch.load`` does not check them: a byte flipped in a copy or on a disk loaded as
    slightly other weights, which exported and passed the parity check against themselves."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError):
        return  # not a readable zip at all: torch.load names the problem
    if damaged is not None:
        raise CheckpointError(
            f"{path} is damaged: its part {damaged} no longer matches the checksum written with it (the file "
            "changed after it was saved: a bad copy or disk); copy it again, or use another checkpoint of the run "
            "(e.g. last.ckpt)")


def load_classifier(path: str | Path, map_location: str = "cpu"):
    """Rebuild an :class:`ImageClassifier` from a vision_tl checkpoint, in eval mode.

    The backbone is built without pretrained weights (the checkpoint has them), so
    this works offline for any backbone.
    """
    from vision_tl.tasks.classifier import ImageClassifier

    ckpt = read_checkpoint(path)
    meta = ckpt["vision_tl"]
    import inspect

    accepted = inspect.signature(ImageClassifier.__init__).parameters
    # LightningCLI adds private keys (_instantiator, _class_path); keep the init arguments only.
    hparams = {k: v for k, v in ckpt["hyper_parameters"].items() if k in accepted}
    hparams.update(pretrained=False, weights=None)
    if meta.get("kit_version") != __version__:
        import warnings

        warnings.warn(f"{path} was written by vision_tl {meta.get('kit_version')}, this is {__version__}", stacklevel=2)
    try:
        with torch.random.fork_rng(devices=[]):  # the random weights it replaces leave the caller's generator alone
            model = ImageClassifier(**hparams)
        model.load_state_dict(ckpt["state_dict"])
    except (TypeError, RuntimeError, ValueError) as exc:
        raise CheckpointError(f"{path} does not fit an ImageClassifier of this version: {exc}") from exc
    model.threshold = meta.get("threshold")
    model.checkpoint_epoch = ckpt.get("epoch")  # which epoch's weights (reports record it)
    model.eval()
    return model.to(map_location), meta
