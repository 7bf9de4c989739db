"""CPU training throughput: the kit's ``fit`` vs a plain PyTorch loop over pre-decoded tensors.

Same model (EfficientNet-Lite0, ``partial`` mode: last two stages + head), same batch
size, same optimiser, same threads, same memory layout (channels-last, the kit's default,
1.4-1.6x faster than NCHW on a CPU: ``benchmarks/cpu_layout.py``). The kit reads images through its data module with
the decoded-image cache (so epochs after the first do not decode JPEG); the plain loop
gets ready-made normalised tensors. Runs alternate, and the script prints the median
of the per-round ratios (this machine is noisy).

    python benchmarks/cpu_throughput.py --data ../shared/datasets/neu --per-class 30
    python benchmarks/cpu_throughput.py --compile     # the kit with torch.compile vs the eager plain loop
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import lightning as L
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _throughput import ThroughputMeter, plain_net, plain_train_rate  # noqa: E402
from feature_cache import make_subset  # noqa: E402

from vision_tl.data import ImageFolderDataModule  # noqa: E402
from vision_tl.tasks import ImageClassifier  # noqa: E402

BACKBONE = "tf_efficientnet_lite0"


def kit_rate(root: Path, cache: Path, args) -> float:
    L.seed_everything(0, verbose=False)
    dm = ImageFolderDataModule(str(root), backbone=BACKBONE, image_size=args.size, batch_size=args.batch,
                               num_workers=0, augment=args.augment, pipeline="cpu", decoded_cache=str(cache))
    model = ImageClassifier(dm.classes, backbone=BACKBONE, image_size=args.size, mode="partial",
                            compile=args.compile)
    meter = ThroughputMeter(skip_epochs=1)
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0, callbacks=[meter])
    trainer.fit(model, datamodule=dm)
    return meter.rate


def plain_rate(root: Path, cache: Path, args) -> float:
    dm = ImageFolderDataModule(str(root), backbone=BACKBONE, image_size=args.size, num_workers=0,
                               augment="none", pipeline="cpu", decoded_cache=str(cache))
    dm.setup("fit")
    ds = dm.dataset("train")
    xs = torch.stack([ds[i][0] for i in range(len(ds))])
    ys = torch.as_tensor(ds.labels)
    batches = [(xs[i:i + args.batch], ys[i:i + args.batch]) for i in range(0, len(xs) - args.batch + 1, args.batch)]
    # channels-last as the kit runs (its default on every device): the faster plain loop on a CPU too
    batches = [(x.contiguous(memory_format=torch.channels_last), y) for x, y in batches]
    net = plain_net(BACKBONE, dm.num_classes, "partial", "cpu", channels_last=True)
    return plain_train_rate(net, batches, steps=len(batches), amp_dtype=None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/datasets/neu"))
    parser.add_argument("--per-class", type=int, default=30)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--augment", default="none", help="kit augmentation preset (default: none)")
    parser.add_argument("--compile", action="store_true",
                        help="the kit runs --model.compile true (the first epoch, which compiles, is not timed)")
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    with tempfile.TemporaryDirectory() as tmp:
        root = make_subset(args.data, args.per_class, Path(tmp) / "data")
        cache = Path(tmp) / "decoded"
        ratios = []
        for r in range(args.rounds):
            kit, plain = kit_rate(root, cache, args), plain_rate(root, cache, args)
            ratios.append(kit / plain)
            print(f"round {r}: kit {kit:.1f} img/s, plain loop {plain:.1f} img/s, ratio {kit / plain:.3f}",
                  flush=True)
    print(f"\nmedian ratio kit/plain over {args.rounds} rounds: {statistics.median(ratios):.3f} "
          f"(threads={torch.get_num_threads()}, batch={args.batch}, size={args.size}, augment={args.augment}, "
          f"kit compiled={args.compile})")


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
