"""The CPU time the kit's ``fit`` spends per training step beyond a plain loop, measured where
compute is negligible (16 px, batch 2, fp32, one thread).

On a GPU the CPU only queues work; a step is GPU-bound while queueing it takes less time
than the GPU needs to run it (about 11 ms for a Lite0 inference step of 256 images at
224 px on an H200). Lightning's loop, the device pipeline's augmentation and the logging
all add CPU time per step; this script measures how much, per mode, on any machine:
the kit's ``fit`` (device pipeline, ``inspection`` augmentation, decoded cache) against a
plain training step and a plain inference step of the same network. Rounds alternate; the
script prints medians.

    python benchmarks/host_overhead.py
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _throughput import ThroughputMeter, plain_inference_rate, plain_net, plain_train_rate  # noqa: E402

from vision_tl.data import ImageFolderDataModule  # noqa: E402
from vision_tl.data.synthetic import make_inspection_dataset  # noqa: E402
from vision_tl.tasks import ImageClassifier  # noqa: E402

BACKBONE = "tf_efficientnet_lite0"
RESULTS = Path(__file__).parent / "RESULTS.md"


def kit_ms(root: Path, cache: Path, mode: str, args) -> float:
    """Milliseconds per training step of the kit's fit (epochs after the first)."""
    dm = ImageFolderDataModule(str(root), backbone=BACKBONE, image_size=args.size, batch_size=args.batch,
                               num_workers=0, augment="inspection", pipeline="device", decoded_cache=str(cache),
                               val_fraction=0.05)
    model = ImageClassifier(dm.classes, backbone=BACKBONE, image_size=args.size, mode=mode, pretrained=False,
                            feature_cache=None)
    meter = ThroughputMeter(skip_epochs=1)
    trainer = L.Trainer(max_epochs=3, accelerator="cpu", precision="32-true", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0, callbacks=[meter])
    trainer.fit(model, datamodule=dm)
    return 1000 * args.batch / meter.rate


def plain_ms(mode: str, num_classes: int, args) -> tuple[float, float]:
    """Milliseconds per plain training step and per plain inference step."""
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(args.batch, 3, args.size, args.size, generator=g) for _ in range(4)]
    ys = [torch.randint(0, num_classes, (args.batch,), generator=g) for _ in range(4)]
    net = plain_net(BACKBONE, num_classes, mode, "cpu", channels_last=False)
    train = plain_train_rate(net, list(zip(xs, ys)), args.steps, None)
    infer = plain_inference_rate(net, xs, args.steps, None)
    return 1000 * args.batch / train, 1000 * args.batch / infer


def log_call_us(steps: int = 400) -> float:
    """Median microseconds of one ``self.log`` call in a training step (Lightning's bookkeeping
    of a logged value; the kit calls it only on steps whose metrics reach the logger)."""
    from torch.utils.data import DataLoader, TensorDataset

    class Tiny(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer, self.seconds = torch.nn.Linear(4, 2), []

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = torch.nn.functional.cross_entropy(self.layer(x), y)
            start = time.perf_counter()
            self.log("train/loss", loss, batch_size=len(y))
            self.seconds.append(time.perf_counter() - start)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    module = Tiny()
    data = TensorDataset(torch.randn(2 * steps, 4), torch.randint(0, 2, (2 * steps,)))
    L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False).fit(module, DataLoader(data, batch_size=2))
    return 1e6 * statistics.median(module.seconds[steps // 10:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", default="frozen,partial,full")
    parser.add_argument("--size", type=int, default=16)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--images", type=int, default=40, help="training images per class")
    parser.add_argument("--steps", type=int, default=200, help="timed steps of each plain loop")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-write", action="store_true", help="do not append to RESULTS.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data"
        make_inspection_dataset(root, args.images, size=32, seed=0)
        cache = Path(tmp) / "decoded"
        for mode in modes:
            kit, train, infer = [], [], []
            for _ in range(args.rounds):
                kit.append(kit_ms(root, cache, mode, args))
                t, i = plain_ms(mode, 4, args)
                train.append(t)
                infer.append(i)
            row = (mode, *(statistics.median(v) for v in (kit, train, infer)))
            rows.append(row)
            print(f"{mode}: kit {row[1]:.2f} ms per step, plain training step {row[2]:.2f} ms, "
                  f"plain inference step {row[3]:.2f} ms", flush=True)
    table = ["| mode | kit fit (ms/step) | plain training step (ms) | plain inference step (ms) "
             "| kit minus plain training (ms) |", "|---|---|---|---|---|"]
    table += [f"| {m} | {k:.2f} | {t:.2f} | {i:.2f} | {k - t:+.2f} |" for m, k, t, i in rows]
    log_us = log_call_us()
    table.append(f"\nOne `self.log` call in a training step: {log_us:.0f} µs (median).")
    print("\n".join(table))
    if not args.no_write:
        with RESULTS.open("a", encoding="utf-8") as f:
            f.write(f"\n### CPU time per training step at negligible compute ({args.size} px, batch {args.batch}, "
                    f"fp32, 1 thread)\n\n`python benchmarks/host_overhead.py --rounds {args.rounds}` — medians of "
                    f"{args.rounds} rounds.\n\n"
                    + "\n".join(table) + "\n")


if __name__ == "__main__":
    main()
