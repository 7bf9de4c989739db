"""Frozen ``fit`` with the feature cache vs without it, and vs its lower bound.

Each ratio is measured in one run of this script, on one machine, on the same images:

* ``--compare nocache``: frozen fit for E epochs with a fresh (empty) cache vs
  ``feature_cache=None`` (the backbone runs on every batch of every epoch).
* ``--compare lowerbound``: frozen fit with a fresh cache vs listing the images,
  loading the backbone, one plain forward pass over the same images and a plain
  PyTorch head-training loop (E epochs, same batch size, optimiser and validation
  each epoch): no Lightning, no cache, no disk.

Usage (from the repository root)::

    python benchmarks/feature_cache.py --data ../shared/datasets/neu --per-class 20 --compare nocache
    python benchmarks/feature_cache.py --data ../shared/datasets/neu --per-class 100 --compare lowerbound
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

from vision_tl.data import ImageFolderDataModule
from vision_tl.imaging import load_rgb
from vision_tl.tasks.classifier import ImageClassifier

BACKBONE = "tf_efficientnet_lite0"


def make_subset(root: Path, per_class: int, dest: Path) -> Path:
    """Symlink the first ``per_class`` images of each class (the data set stays read-only)."""
    for cls in sorted(p for p in root.iterdir() if p.is_dir()):
        (dest / cls.name).mkdir(parents=True)
        for src in sorted(cls.iterdir())[:per_class]:
            (dest / cls.name / src.name).symlink_to(src.resolve())
    return dest


def _datamodule(root: Path, batch_size: int) -> ImageFolderDataModule:
    # frozen.yaml's data settings; augment "light" only affects the uncached run.
    return ImageFolderDataModule(str(root), backbone=BACKBONE, batch_size=batch_size, num_workers=0,
                                 augment="light", val_fraction=0.2, seed=0)


def timed_fit(root: Path, epochs: int, batch_size: int, cache: str | None) -> tuple[float, dict]:
    L.seed_everything(0, verbose=False)
    start = time.perf_counter()
    dm = _datamodule(root, batch_size)
    model = ImageClassifier(dm.classes, backbone=BACKBONE, mode="frozen", head="linear", dropout=0.2,
                            lr=0.003, feature_cache=cache)
    trainer = L.Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tempfile.mkdtemp(prefix="vtl_bench_"))
    trainer.fit(model, datamodule=dm)
    return time.perf_counter() - start, model.eval_results["val"]


@torch.inference_mode()
def _forward_all(net, transform, samples, batch_size: int) -> torch.Tensor:
    feats = []
    for i in range(0, len(samples), batch_size):
        x = torch.stack([transform(load_rgb(s.path)) for s in samples[i:i + batch_size]])
        feats.append(net(x))
    return torch.cat(feats)


def lower_bound(root: Path, epochs: int, batch_size: int) -> tuple[float, float]:
    """Scan + load the backbone, one plain forward pass over train+val, then plain head training
    with per-epoch validation; returns (total seconds, forward-pass seconds)."""
    from vision_tl.backbones import create_backbone
    from vision_tl.data.transforms import eval_transform

    torch.manual_seed(0)
    # Timed like the fit: listing the data and loading the backbone are part of any run.
    start = time.perf_counter()
    dm = _datamodule(root, batch_size)
    dm.setup("fit")
    net = create_backbone(BACKBONE).eval()
    transform = eval_transform(dm.preprocessing)
    forward_start = time.perf_counter()
    x_train = _forward_all(net, transform, dm.splits["train"], batch_size)
    x_val = _forward_all(net, transform, dm.splits["val"], batch_size)
    forward = time.perf_counter() - forward_start
    y_train = torch.tensor([s.label for s in dm.splits["train"]])
    y_val = torch.tensor([s.label for s in dm.splits["val"]])
    head = torch.nn.Sequential(torch.nn.Dropout(0.2), torch.nn.Linear(x_train.shape[1], dm.num_classes))
    opt = torch.optim.AdamW(head.parameters(), lr=0.003, weight_decay=1e-4)
    for _ in range(epochs):
        head.train()
        for idx in torch.randperm(len(y_train)).split(batch_size):
            loss = torch.nn.functional.cross_entropy(head(x_train[idx]), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        head.eval()
        with torch.no_grad():
            (head(x_val).argmax(1) == y_val).float().mean()
    return time.perf_counter() - start, forward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("../shared/datasets/neu"))
    parser.add_argument("--per-class", type=int, default=20, help="images per class (symlinked subset)")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--compare", choices=("nocache", "lowerbound"), required=True)
    parser.add_argument("--repeats", type=int, default=2, help="lowerbound: interleaved repeats")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    with tempfile.TemporaryDirectory(prefix="vtl_bench_") as tmp:
        root = make_subset(args.data, args.per_class, Path(tmp) / "data")
        cached_s, cached_val = timed_fit(root, args.epochs, args.batch_size, str(Path(tmp) / "cache"))
        print(f"cached fit (fresh cache): {cached_s:.1f} s, val acc {cached_val['acc']:.4f}", flush=True)
        if args.compare == "nocache":
            plain_s, plain_val = timed_fit(root, args.epochs, args.batch_size, None)
            print(f"uncached fit:             {plain_s:.1f} s, val acc {plain_val['acc']:.4f}")
            print(f"RATIO uncached / cached = {plain_s / cached_s:.2f}x  (target >= 8)")
        else:
            # Interleaved repeats, best of each: damps load drift on a shared machine.
            cached, bounds = [cached_s], []
            for i in range(args.repeats):
                bound_s, forward_s = lower_bound(root, args.epochs, args.batch_size)
                bounds.append(bound_s)
                print(f"lower bound:              {bound_s:.1f} s (forward pass {forward_s:.1f} s)", flush=True)
                if i + 1 < args.repeats:
                    cached.append(timed_fit(root, args.epochs, args.batch_size,
                                            str(Path(tmp) / f"cache{i}"))[0])
                    print(f"cached fit (fresh cache): {cached[-1]:.1f} s", flush=True)
            print(f"RATIO cached / lower bound = {min(cached) / min(bounds):.3f}  (target <= 1.3; "
                  f"best of {len(cached)} each)")
        print(f"images: {6 * args.per_class}, epochs: {args.epochs}, torch threads: {torch.get_num_threads()}")


if __name__ == "__main__":
    main()
