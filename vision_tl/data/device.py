"""Moving batches to a GPU without stalling it.

A batch copied on the compute stream waits for the previous step to finish and then
holds the next one up for as long as the copy takes (a few ms for 256 images at
224 px). Copied on a side stream, the copy engine moves it while the previous step
still computes. Used by ``fit`` (``ImageFolderDataModule.transfer_batch_to_device``)
and by ``extract``; and how many loader processes and decoding threads this machine gets.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import TypeVar

import torch

from vision_tl.utils import usable_cores

Batch = TypeVar("Batch")
_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def copy_on_side_stream(move: Callable[[], Batch], device: torch.device) -> Batch:
    """Run ``move`` (copies of pinned CPU tensors to ``device``, ``non_blocking=True``) on a
    side CUDA stream; the compute stream's next kernels wait for the copy to finish."""
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device not in _STREAMS:
        _STREAMS[device] = torch.cuda.Stream(device)
    stream, compute = _STREAMS[device], torch.cuda.current_stream(device)
    with torch.cuda.stream(stream):
        batch = move()
    compute.wait_stream(stream)
    for tensor in _cuda_tensors(batch):  # made on the side stream, used on the compute one
        tensor.record_stream(compute)
    return batch


def to_device(device: torch.device, *tensors: torch.Tensor) -> list[torch.Tensor]:
    """Small host tensors on ``device`` without a wait: pinned, then copied asynchronously (the
    pinned buffers are held until the copy is done by PyTorch's host allocator)."""
    if device.type != "cuda":
        return [t.to(device) for t in tensors]
    return [t.pin_memory().to(device, non_blocking=True) for t in tensors]


def _cuda_tensors(batch) -> Iterator[torch.Tensor]:
    if isinstance(batch, torch.Tensor):
        if batch.is_cuda:
            yield batch
    elif isinstance(batch, (list, tuple)):
        for item in batch:
            yield from _cuda_tensors(item)
    elif isinstance(batch, dict):
        for item in batch.values():
            yield from _cuda_tensors(item)


SHM = "/dev/shm"


def shared_memory_free() -> int | None:
    """Bytes free in ``/dev/shm``, where loader processes hand their batches to the main one
    (``None`` where there is no such folder to measure: macOS, Windows). A Docker container gets
    64 MB there unless started with ``--shm-size``; a loader that runs out dies of a bus error."""
    try:
        stat = os.statvfs(SHM)
    except (OSError, AttributeError):
        return None
    return stat.f_bavail * stat.f_frsize


def loader_processes_fitting(workers: int, batch_bytes: int, in_flight: int = 2) -> int:
    """How many of ``workers`` loader processes, each holding ``in_flight`` batches of
    ``batch_bytes`` in shared memory, fit in half of what ``/dev/shm`` has free (all of them
    where it cannot be measured)."""
    free = shared_memory_free()
    if free is None or workers <= 0:
        return workers
    return min(workers, int(free // 2 // max(1, in_flight * batch_bytes)))


def shared_memory_advice(wanted: int, fitting: int, batch_bytes: int, in_flight: int = 2) -> str:
    """The sentence that says why fewer loader processes run than ``wanted``, and how to give them room."""
    free = shared_memory_free() or 0
    return (f"{SHM} has {free / 2**20:.0f} MB free, room for {fitting} of {wanted} loader processes' batches "
            f"({in_flight} x {batch_bytes / 2**20:.1f} MB each); in Docker, `docker run --shm-size 4g` gives them room")


def default_decode_threads(processes: int = 1) -> int:
    """Decoding threads (``vision_tl.data.decode_threads``) for each of ``processes`` processes
    that decode at once on this machine (torchrun's ranks): their share of one per core but one
    (the one that drives the model), up to 16; every core on a 1-2 core machine. A thread
    costs nothing to start, and decoding releases the GIL."""
    cores = usable_cores()
    return max(1, (min(16, cores - 1) if cores > 2 else cores) // max(1, processes))


def default_num_workers(gpu: bool | None = None) -> int:
    """Loader processes for this machine: every core but one (none on a 1-2 core machine),
    up to 8 when the CPU also trains and up to 16 when a GPU does (``gpu=None``: whether
    PyTorch sees one). Feeding a GPU is all the CPU has to do there, and JPEG decoding runs
    at roughly 2,000 (Pillow) to 4,000 (simplejpeg, into the batch) images/s per core against
    the GPU's ~20,000 images/s of inference.
    """
    cores = usable_cores()
    if gpu is None:
        gpu = torch.cuda.is_available()
    return min(16 if gpu else 8, max(0, cores - 1)) if cores > 2 else 0


def resolve_device(spec: str | torch.device | None, local_rank: int = 0) -> torch.device:
    """The device a command runs on: ``spec`` checked, or this process's GPU where there is one
    (``cuda:<local_rank>``) and else the CPU.

    Raises:
        ValueError: ``spec`` is not a device name, or names a GPU this machine does not have
            (the message names it and says what is available).
    """
    if spec is None:
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"--device {spec!r} is not a device; expected cpu, cuda or cuda:N") from exc
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"--device {spec}: no CUDA GPU is usable on this machine (no GPU, no driver, or a "
                             "CPU-only PyTorch); use --device cpu, or leave --device out to use a GPU where there is one")
        if device.index is not None and device.index >= count:
            raise ValueError(f"--device {spec}: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"--device {spec}: Apple's MPS is not available here; use --device cpu")
    elif device.type != "cpu":
        raise ValueError(f"--device {spec!r}: expected cpu, cuda or cuda:N")
    return device
