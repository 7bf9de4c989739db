"""Shared pieces of the training-throughput benchmarks (CPU and GPU)."""

from __future__ import annotations

import json
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path

import lightning as L
import torch
from torch import nn

from vision_tl.backbones import create_backbone
from vision_tl.models import ClassifierNet, apply_mode


class ThroughputMeter(L.Callback):
    """Images per second of training steps, from ``skip_epochs`` on (the first builds caches).

    Times each epoch from its start to the start of validation (or to its end when there
    is none), so validation, checkpoints and run artifacts are left out, as the plain loop
    has none. With ``whole``, it counts every epoch's training images over the whole fit instead,
    from setup (feature caches included) to the end of training. With ``out`` set, the rate is written there as JSON when training ends (for
    runs through the ``vision-tl fit`` command line, where the callback is built by name).
    """

    def __init__(self, skip_epochs: int = 1, out: str | None = None, whole: bool = False) -> None:
        self.skip_epochs, self.out, self.images, self.seconds = skip_epochs, out, 0, 0.0
        self._start, self._images, self._timing = 0.0, 0, False
        # whole: every training image of every epoch over the time from setup (before the model's
        # own setup, which builds the feature cache) to the end of training, validation included
        self.whole, self._setup_start, self._all_images = whole, 0.0, 0

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit":
            self._setup_start, self._all_images = time.perf_counter(), 0

    def _sync(self, pl_module) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._sync(pl_module)
        self._start, self._images, self._timing = time.perf_counter(), 0, True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._images += len(batch[1])
        self._all_images += len(batch[1])

    def _stop(self, trainer, pl_module) -> None:
        if not self._timing:
            return
        self._sync(pl_module)
        self._timing = False
        if trainer.current_epoch >= self.skip_epochs:
            self.images += self._images
            self.seconds += time.perf_counter() - self._start

    def on_validation_start(self, trainer, pl_module) -> None:
        self._stop(trainer, pl_module)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._stop(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.whole:
            self._sync(pl_module)
            self.images, self.seconds = self._all_images, time.perf_counter() - self._setup_start
        if self.out:  # with the peak GPU memory, for a fit run in another process
            peak = torch.cuda.max_memory_allocated() / 2**30 if pl_module.device.type == "cuda" else float("nan")
            Path(self.out).write_text(json.dumps({"images_per_second": self.rate, "images": self.images,
                                                  "peak_gib": peak}))

    @property
    def rate(self) -> float:
        return self.images / self.seconds if self.seconds else float("nan")


class SyncAudit(L.Callback):
    """Where the CPU waits for the GPU between training steps: PyTorch's sync debug mode turns
    each such wait into a warning; this records the kit's or Lightning's line that caused it,
    over training batches ``first`` to ``last`` of the first epoch, into ``out`` (JSON).

    A fast pipeline has none per step: each wait stops the CPU from queueing the next
    batch's copy and kernels while the GPU computes.
    """

    def __init__(self, out: str, first: int = 3, last: int = 12) -> None:
        self.out, self.first, self.last = out, first, last
        self.sites: Counter[str] = Counter()
        self._context = None

    def _record(self, message, category, filename, lineno, file=None, line=None) -> None:
        if "synchronizing CUDA operation" not in str(message):
            return  # the mode's own one-time notice, and any other warning of those steps
        frames = [f for f in traceback.extract_stack()[:-1] if "site-packages/torch/" not in f.filename
                  and "/warnings.py" not in f.filename and "_throughput.py" not in f.filename]
        where = " <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in frames[-3:][::-1])
        self.sites[f"{str(message).splitlines()[0][:60]} at {where}"] += 1

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if pl_module.device.type == "cuda" and trainer.current_epoch == 0 and batch_idx == self.first:
            self._context = warnings.catch_warnings()
            self._context.__enter__()
            warnings.simplefilter("always")
            warnings.showwarning = self._record
            torch.cuda.set_sync_debug_mode("warn")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._context is not None and (batch_idx >= self.last or batch_idx + 1 == trainer.num_training_batches):
            torch.cuda.set_sync_debug_mode(0)
            self._context.__exit__(None, None, None)
            self._context = None
            steps = batch_idx - self.first + 1
            Path(self.out).write_text(json.dumps({"steps": steps, "sites": dict(self.sites.most_common(8))}))


def plain_net(backbone: str, num_classes: int, mode: str, device: str, channels_last: bool) -> nn.Module:
    net = ClassifierNet(create_backbone(backbone, pretrained=False), num_classes)
    apply_mode(net, mode, trainable_stages=2, freeze_bn=True)
    net = net.to(device)
    return net.to(memory_format=torch.channels_last) if channels_last else net


def plain_train_rate(net: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], steps: int,
                     amp_dtype: torch.dtype | None, lr: float = 1e-3) -> float:
    """Images/s of a plain PyTorch loop: forward, loss, backward, AdamW step, over ready tensors."""
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    net.train()
    device = batches[0][0].device
    loss_fn = nn.CrossEntropyLoss()

    def step(x, y):
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss = loss_fn(net(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for x, y in batches[:3]:  # warm-up
        step(x, y)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start, images = time.perf_counter(), 0
    for i in range(steps):
        x, y = batches[i % len(batches)]
        step(x, y)
        images += len(y)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return images / (time.perf_counter() - start)


@torch.no_grad()
def plain_inference_rate(net: nn.Module, batches: list[torch.Tensor], steps: int,
                         amp_dtype: torch.dtype | None) -> float:
    net.eval()
    device = batches[0].device
    for x in batches[:3]:
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            net(x)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start, images = time.perf_counter(), 0
    for i in range(steps):
        x = batches[i % len(batches)]
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            net(x)
        images += len(x)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return images / (time.perf_counter() - start)


class GpuBusy(L.Callback):
    """How busy the GPU is during training steps ``first`` to ``last`` of the first epoch (after
    ``SyncAudit``'s steps, and untimed: the profiler slows the CPU): the kernels' and copies'
    summed device time over the wall time of those steps, and the operations that took the
    most device time. Below 100 % the GPU waited for the CPU; at 100 % only less device work
    makes a step faster. Writes JSON to ``out``. Short epochs start it earlier.

    On a CPU (smoke tests) it records the operations' CPU time instead and no busy share.
    """

    def __init__(self, out: str, first: int = 15, last: int = 20, top: int = 8) -> None:
        # 5 profiled steps: the profiler's own processing of 15 steps of a CNN's events took
        # 5-13 s per fit on a CPU, time the whole script must spare
        self.out, self.first, self.last, self.top = out, first, last, top
        self._profile, self._start, self._steps = None, 0.0, 0

    def _sync(self, pl_module) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        first = min(self.first, max(0, trainer.num_training_batches - 3))
        if trainer.current_epoch == 0 and batch_idx == first and self._profile is None:
            from torch.profiler import ProfilerActivity, profile

            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if pl_module.device.type == "cuda" else [])
            self._sync(pl_module)
            self._profile = profile(activities=activities)
            self._profile.__enter__()
            self._start, self._steps = time.perf_counter(), 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._profile is None:
            return
        self._steps += 1
        if batch_idx >= self.last or batch_idx + 1 == trainer.num_training_batches:
            self._sync(pl_module)
            wall = time.perf_counter() - self._start
            self._profile.__exit__(None, None, None)
            cuda = pl_module.device.type == "cuda"
            events = self._profile.key_averages()
            self._profile = None
            own = (lambda e: e.self_device_time_total) if cuda else (lambda e: e.self_cpu_time_total)
            # The busy share sums the device's own events (kernels, copies) once: an operator's
            # self device time repeats its kernels', and user annotations span others. The ranking
            # names operators (readable), by the device time of the kernels each launched.
            from torch.autograd import DeviceType

            kernels = [e for e in events if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)]
            device_us = sum(e.self_device_time_total for e in kernels) if cuda and kernels else None
            operators = [e for e in events if e.device_type == DeviceType.CPU and not getattr(e, "is_user_annotation", False)]
            ranked = sorted(operators, key=own, reverse=True)[:self.top]
            Path(self.out).write_text(json.dumps({
                "steps": self._steps, "wall_ms_per_step": 1000 * wall / self._steps,
                "busy": device_us / 1e6 / wall if device_us is not None else None,
                "top": [(e.key, round(own(e) / 1000 / self._steps, 3)) for e in ranked],  # ms per step
            }))
