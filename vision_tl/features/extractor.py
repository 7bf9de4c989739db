"""Turning images into embeddings with a frozen timm backbone.

:class:`FeatureExtractor` wraps a backbone, its preprocessing and the choice of
features: the pooled output (``"pooled"``, what ``num_classes=0`` returns) and/or
intermediate stages, each global-average-pooled and concatenated in the order
given. Stage numbers index the model's ``feature_info`` (timm's
``forward_intermediates``), so nothing is guessed from the architecture's name.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from vision_tl.backbones import (
    FoldedInference,
    GraphedInference,
    Preprocessing,
    pooled_width,
    weights_identity,
)
from vision_tl.data.batch_augment import BatchAugment
from vision_tl.data.decode_threads import (
    DecodedRows,
    decode_batches,
    decode_batches_in_processes,
    decode_in_processes,
)
from vision_tl.data.device import copy_on_side_stream, default_decode_threads
from vision_tl.data.device_decode import device_batches
from vision_tl.data.folder import content_hash
from vision_tl.data.transforms import AugmentSpec, ImageTransform, stack_images
from vision_tl.imaging import PIXELS_VERSION, ImageLoadError, load_rgb
from vision_tl.utils import no_cudnn_benchmark, progress_bar

POOLED = "pooled"
FORMAT_VERSION = 1  # bump when the meaning of stored features changes
PRECISIONS = ("32", "bf16")
DECODERS = ("cpu", "device")


def parse_stages(spec: str | Sequence[str | int] | None) -> tuple[str, ...]:
    """``"pooled"``, ``"3,4"``, ``"3,4,pooled"`` or a list of the same -> normalised tuple.

    Example:
        >>> parse_stages("3, 4, pooled")
        ('3', '4', 'pooled')
    """
    if spec is None:
        return (POOLED,)
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    stages = tuple(str(s).strip().lower() for s in items if str(s).strip())
    if not stages:
        raise ValueError("stages is empty; use 'pooled', stage numbers like '3,4', or both")
    for stage in stages:
        if stage != POOLED and not stage.lstrip("-").isdigit():
            raise ValueError(f"unknown stage {stage!r}; use 'pooled' or a stage number such as 3")
    if len(set(stages)) != len(stages):
        raise ValueError(f"stages {','.join(stages)} lists a stage twice")
    return stages


def state_digest(model: nn.Module) -> str:
    """Hash of every parameter and buffer: changes whenever the weights change at all."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b"")
    return digest.hexdigest()[:16]


class FeatureExtractor:
    """A frozen backbone that maps ``[N, 3, H, W]`` batches to ``[N, num_features]`` embeddings.

    Args:
        model: a timm model with ``num_classes=0`` (as :func:`create_backbone` returns).
        backbone: its timm name (recorded in every output and cache key).
        preprocessing: resize + normalisation applied to every image.
        stages: ``("pooled",)`` (default), stage numbers into ``feature_info``, or both.
        augment: augmentation applied before normalisation (``"none"`` for clean views).
        view: index of an augmented view (0 = clean); part of the cache key.
        precision: ``"32"`` (default) or ``"bf16"`` autocast, for GPUs; part of the cache key.
        decode: where clean views' JPEGs are decoded: ``"cpu"`` (default; threads, Pillow's
            pixels) or ``"device"`` (the model's device: nvJPEG on a GPU, see
            :mod:`vision_tl.data.device_decode`); part of the cache key.
        cuda_graphs: on a GPU, replay normalisation and the backbone as a CUDA graph per batch
            shape (:class:`~vision_tl.backbones.GraphedInference`): one launch instead of about a
            hundred per batch, which the CPU cannot otherwise queue as fast as the GPU runs them.
            The graph runs the unfolded backbone's kernels: its embeddings equal the unfolded
            model's exactly (the CPU's folded path's to float rounding).
        fold_batchnorm: run the backbone with BatchNorm folded into its convolutions
            (:class:`~vision_tl.backbones.FoldedInference`; embeddings equal to float rounding).
            ``None`` (default): folded except where a CUDA graph runs it, which is faster unfolded.

    Example:
        >>> net = create_backbone("tf_efficientnet_lite0")
        >>> fx = FeatureExtractor(net, "tf_efficientnet_lite0", resolve_preprocessing("tf_efficientnet_lite0"))
        >>> fx.num_features
        1280
    """

    def __init__(self, model: nn.Module, backbone: str, preprocessing: Preprocessing,
                 stages: str | Sequence[str | int] | None = None, augment: AugmentSpec = "none",
                 view: int = 0, precision: str = "32", decode: str = "cpu", cuda_graphs: bool = True,
                 fold_batchnorm: bool | None = None) -> None:
        if str(precision) not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; expected one of: {', '.join(PRECISIONS)}")
        if decode not in DECODERS:
            raise ValueError(f"unknown decode {decode!r}; expected one of: {', '.join(DECODERS)}")
        self.precision = str(precision)
        self.model = model
        self.backbone = backbone
        self.preprocessing = preprocessing
        self.stages = parse_stages(stages)
        self.augment = augment if view > 0 else "none"
        self.view = int(view)
        self.decode = decode if self.augment == "none" else "cpu"  # augmented views: loader processes
        info = [int(f["num_chs"]) for f in getattr(model, "feature_info", [])]
        self._indices: list[int] = []
        for stage in self.stages:
            if stage == POOLED:
                continue
            k = int(stage)
            if not info or not -len(info) <= k < len(info):
                raise ValueError(
                    f"stage {k} does not exist in {backbone}: it has {len(info)} feature stages "
                    f"(0..{len(info) - 1}, or -{len(info)}..-1 counted from the end; widths {info}); use 'pooled' "
                    "or one of those numbers"
                )
            if k % len(info) in self._indices:
                raise ValueError(f"stages {','.join(self.stages)} name stage {k % len(info)} twice ({k} counts from "
                                 f"the end of {backbone}'s {len(info)} stages); list each stage once")
            self._indices.append(k % len(info))
        self._stage_widths = info
        widths = {str(k): info[k % len(info)] for k in self._indices} if info else {}
        self.widths = [pooled_width(model) if s == POOLED else widths[str(int(s) % len(info))]
                       for s in self.stages]
        self.num_features = int(sum(self.widths))
        self._identity: dict | None = None
        self._channels_last = False
        self._folded = FoldedInference(model, run=self._features)  # checked on the features as returned
        self._normalise = BatchAugment(preprocessing, augment=False)  # uint8 batches, on their device
        self.cuda_graphs = bool(cuda_graphs)
        self.fold_batchnorm = fold_batchnorm
        # a shape is recorded on its second batch: a pass's last, smaller batch runs eagerly
        self._graphs = GraphedInference(record_after=1)
        self._graphed = _Embedding(model, self._normalise, self._features)

    def identity(self) -> dict:
        """Everything the embeddings depend on; the cache key and the output metadata. The
        weights' digest is taken on every call (it reads every weight: ~20 MB for Lite0): a model
        trained further between two calls gets another key, never the old weights' store, also
        when its weights were written through ``.data``, which moves no version counter."""
        digest = state_digest(self.model)
        if self._identity is None:
            import timm

            self._identity = {
                "format": FORMAT_VERSION,
                "backbone": self.backbone,
                "weights": weights_identity(self.model),
                "state_digest": "",  # below, from the weights as they are now
                "preprocessing": self.preprocessing.to_dict(),
                # counted from the start: --stages -1 and --stages 4 of a 5-stage model share a store
                "stages": [s if s == POOLED else str(int(s) % len(self._stage_widths)) for s in self.stages],
                "num_features": self.num_features,
                "augment": json.loads(json.dumps(self.augment)),
                "view": self.view,
                "timm": timm.__version__,
                "pixels": PIXELS_VERSION,  # (decoding changed in a kit upgrade: other features)
            }
            if self.precision != "32":  # fp32 keys stay those of earlier versions
                self._identity["precision"] = self.precision
            if self.decode != "cpu":  # other pixels (within device_decode.TOLERANCE), other embeddings:
                # per kind of device, whose decoders differ (nvJPEG; torchvision's libjpeg-turbo)
                device = next(self.model.parameters()).device.type
                self._identity["decode"] = f"{self.decode}:{device}"
        return {**self._identity, "state_digest": digest}

    def transform(self) -> ImageTransform:
        """Resize (and augment) to a uint8 ``[3, H, W]`` tensor; :meth:`embed` normalises on the device."""
        return ImageTransform(self.preprocessing, self.augment, normalize=False)

    @torch.inference_mode()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Embeddings for a batch: uint8 from :meth:`transform` (normalised here, on ``x``'s
        device) or already normalised float; the model is run in eval mode."""
        if x.dtype == torch.uint8:
            self._normalise.to(x.device)
            if not self._graphing(x):  # a graph normalises inside
                x = self._normalise(x)
        # channels-last on every device: CPU convolutions (oneDNN) run Lite0 1.7x faster in it
        # than in NCHW, GPU ones prefer it too (benchmarks/cpu_layout.py)
        x = x.contiguous(memory_format=torch.channels_last)
        if not self._channels_last:  # once: converting walks every parameter
            # outside inference mode: parameters converted inside it would become inference
            # tensors, which a model trained later (fit after extract) cannot use
            with torch.inference_mode(False):
                self.model.to(memory_format=torch.channels_last)
            self._channels_last = True
        autocast = torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16")
        was_training = self.model.training
        self.model.eval()
        try:
            with autocast:
                return self._embed(x)
        finally:
            self.model.train(was_training)

    def _graphing(self, x: torch.Tensor) -> bool:
        return x.is_cuda and self.cuda_graphs

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        if self._graphing(x):
            # On a GPU the CPU queueing Lite0's ~100 kernels per batch is the limit (eager, the
            # H100 ran 0.72 of the inference bound): one graph replays normalisation and the
            # backbone. Unfolded there: cuDNN's BatchNorm costs the GPU less than a folded
            # convolution's bias add (benchmarks/RESULTS.md, sixth session).
            # (a folded copy is built from normalised pixels, once; its version moves with the weights)
            probe = (lambda: self._normalise(x[:2])) if self.fold_batchnorm and x.dtype == torch.uint8 else x
            model = self._folded.model_for(probe, fold=bool(self.fold_batchnorm))
            if model is not self._graphed.model:  # the folded copy (fold_batchnorm=True), built again
                self._graphed = _Embedding(model, self._normalise, self._features)
            return self._graphs(self._graphed, x, (self._folded.version, x.device))
        # BatchNorm folded into the convolutions: fewer layers to run (checked on this very call)
        return self._features(self._folded.model_for(x, fold=self.fold_batchnorm is not False), x)

    def release_graphs(self) -> None:
        """Free the CUDA graphs recorded so far (their memory); later batches record again."""
        self._graphs.clear()

    def _features(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if not self._indices:
            return model(x).flatten(1).float()
        final, inter = model.forward_intermediates(x, indices=sorted(set(self._indices)))
        by_index = dict(zip(sorted(set(self._indices)), inter))
        parts = []
        for stage in self.stages:
            if stage == POOLED:
                parts.append(model.forward_head(final, pre_logits=True).flatten(1).float())
            else:  # pooled in fp32 also under bf16 autocast
                parts.append(by_index[int(stage) % len(model.feature_info)].float().mean((2, 3)))
        return torch.cat(parts, 1)


class _Embedding(nn.Module):
    """What one CUDA graph replays: a uint8 batch normalised, then the extractor's features."""

    def __init__(self, model: nn.Module, normalise: nn.Module, features) -> None:
        super().__init__()
        self.training = False  # this wrapper only (eval() would switch the caller's model too)
        self.model, self.normalise = model, normalise
        self.features = features  # FeatureExtractor._features: (model, x) -> [N, F] float32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8:
            x = self.normalise(x).contiguous(memory_format=torch.channels_last)
        return self.features(self.model, x)


class _ImageFiles(Dataset):
    """Decoded, transformed (augmented) images; an undecodable file yields its error instead.

    An augmented view is seeded by the image's content and the view's number: the same image
    gets the same augmentation in every run, whichever run fills the cache and however many
    loader processes share the work."""

    def __init__(self, paths: list[Path], transform: ImageTransform, view: int = 0) -> None:
        self.paths = paths
        self.transform = transform
        self.view = view
        self.whole_batches = not transform.augments and not transform.normalize

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            image = load_rgb(self.paths[i])
            return i, self.transform(image, seed=self._seed(i) if self.transform.augments else None), None
        except ImageLoadError as exc:
            return i, None, str(exc)

    def _seed(self, i: int) -> int:
        digest = content_hash(self.paths[i]) or str(self.paths[i])  # the scan's hash: a stat, no re-read
        return int(hashlib.sha256(f"{digest}:{self.view}".encode()).hexdigest()[:15], 16)


def _collate(batch: list) -> tuple[list[int], torch.Tensor | None, list[tuple[int, str]]]:
    ok = [(i, x) for i, x, err in batch if err is None]
    bad = [(i, err) for i, x, err in batch if err is not None]
    x = stack_images([x for _, x in ok]) if ok else None
    return [i for i, _ in ok], x, bad


@dataclass
class BatchResult:
    positions: list[int]  # indices into the list of paths given to ``iter_embeddings``
    features: np.ndarray
    failures: list[tuple[int, str]]


def progress_label(extractor: FeatureExtractor, progress: bool | str) -> str:
    """The progress bar's label: ``progress`` where it is one, else ``extract <backbone>``."""
    return progress if isinstance(progress, str) else f"extract {extractor.backbone}"


def iter_embeddings(extractor: FeatureExtractor, paths: list[Path], batch_size: int = 8,
                    num_workers: int | None = 0, device: torch.device | str | None = None,
                    progress: bool | str = True) -> Iterator[BatchResult]:
    """Embed ``paths`` batch by batch (decode, transform, forward), with a tqdm bar.

    Only one batch of images is in memory at a time (plus the few decoded ahead).
    ``num_workers`` decoding threads (loader processes for augmented views); ``None`` picks
    one per core but one, up to 16 (every core on a 1-2 core machine).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    device = torch.device(device) if device is not None else next(extractor.model.parameters()).device
    cuda = device.type == "cuda"
    if num_workers is None:
        num_workers = default_decode_threads()
    if num_workers < 0:
        raise ValueError(f"num_workers (--num-workers) must be 0 or more, got {num_workers}")
    desc = progress_label(extractor, progress)
    extractor._folded.invalidate()  # weights written through .data since the last pass move no version counter

    pending = batches = None  # on a GPU, batch k+1 is queued before batch k's features are read back
    graphs = extractor.cuda_graphs
    # a pass of one batch runs eagerly: recording costs about three forward passes and a wait
    extractor.cuda_graphs = graphs and len(paths) > batch_size
    try:
        with progress_bar(total=len(paths), desc=desc, unit="img", disable=not progress or not paths) as bar:
            batches = _decoded_batches(extractor, paths, batch_size, num_workers, device)  # decoding starts now
            if cuda and paths:
                with no_cudnn_benchmark():
                    warm_up(extractor, min(batch_size, len(paths)), device)
            for positions, x, bad in batches:
                with no_cudnn_benchmark():
                    started = (positions, *_launch(extractor, x, device), bad)
                if not cuda:
                    yield _finish(started, bar)
                    continue
                if pending is not None:
                    yield _finish(pending, bar)
                pending = started
            if pending is not None:
                yield _finish(pending, bar)
    finally:
        if hasattr(batches, "close"):  # a caller that left early: the decoding threads stop now
            batches.close()
        # the graphs' memory (a batch's activations) is not kept past the pass: the extractor
        # refers to itself, so dropping it would free them only at the next garbage collection
        extractor.cuda_graphs = graphs
        extractor.release_graphs()


def _launch(extractor: FeatureExtractor, x: torch.Tensor | None, device: torch.device):
    """Start a batch on ``device``: ``(features, None)``, or on a GPU ``(features on their way to
    pinned memory, the event that says they arrived)``: nothing here waits for it to finish."""
    if x is None:
        return np.zeros((0, extractor.num_features), np.float32), None
    if device.type != "cuda":
        return extractor.embed(x.to(device)).numpy(), None
    if not x.is_cuda:  # with --decode device the batch was decoded there already
        x = copy_on_side_stream(lambda: x.to(device, non_blocking=True), device)
    feats = extractor.embed(x).to("cpu", non_blocking=True)  # into pinned memory
    done = torch.cuda.Event()
    # on the stream of the GPU that ran it: the current stream of the current GPU (cuda:0 unless
    # set) would be idle on a run on cuda:1, and the features read before they arrived
    done.record(torch.cuda.current_stream(device))
    return feats, done


def _decoded_batches(extractor: FeatureExtractor, paths: list[Path], batch_size: int, workers: int,
                     device: torch.device) -> Iterator[tuple[list[int], torch.Tensor | None, list[tuple[int, str]]]]:
    """``(positions, [N, 3, H, W] uint8 pixels or None, failures)`` per batch of ``paths``.

    Clean views (no augmentation) are decoded on ``workers`` threads straight into the batch
    (pinned for a GPU): nothing to start, no copy between processes; on a machine of many
    cores, on ``workers`` loader processes instead (``decode_in_processes``); with ``decode="device"``
    the threads only read the files and JPEGs are decoded on ``device``. Augmented views run
    their albumentations pipeline, which is per-image Python, in ``workers`` loader processes.
    """
    transform = extractor.transform()
    files = _ImageFiles(paths, transform, extractor.view)
    pinned = device.type == "cuda"
    if files.whole_batches and extractor.decode == "device":
        return device_batches(paths, transform.preprocessing.input_size, transform.preprocessing.interpolation,
                              batch_size, device, workers)
    if not files.whole_batches:
        return iter(DataLoader(files, batch_size=batch_size, num_workers=workers, collate_fn=_collate,
                               pin_memory=pinned, prefetch_factor=4 if pinned and workers > 0 else None))
    height, width = transform.preprocessing.input_size
    interpolation = transform.preprocessing.interpolation
    if decode_in_processes(workers, batch_size * height * width * 3):  # many cores: threads would fight for the GIL
        return _Compacted(decode_batches_in_processes(paths, (height, width), interpolation, batch_size,
                                                      workers, pin=pinned))

    def buffer(start: int, n: int) -> torch.Tensor:
        return torch.empty((n, height, width, 3), dtype=torch.uint8, pin_memory=pinned)

    return _Compacted(decode_batches(paths, (height, width), interpolation, batch_size, workers, buffer))


class _Compacted:
    """Decoded batches as :func:`_compact` gives them; ``close()`` stops their decoding."""

    def __init__(self, rows: Iterator[DecodedRows]) -> None:
        self.rows = rows

    def __iter__(self) -> _Compacted:
        return self

    def __next__(self) -> tuple[list[int], torch.Tensor | None, list[tuple[int, str]]]:
        return _compact(next(self.rows))

    def close(self) -> None:
        close = getattr(self.rows, "close", None)
        if close is not None:
            close()


def _compact(rows: DecodedRows) -> tuple[list[int], torch.Tensor | None, list[tuple[int, str]]]:
    """A decoded batch without the rows that failed, as ``(positions, [N, 3, H, W] or None, failures)``."""
    pixels, good = rows.pixels, [k for k in range(len(rows.pixels)) if k not in rows.errors]
    if rows.errors:  # rare: keep the decoded images only, in order
        pixels = pixels[good].pin_memory() if rows.pixels.is_pinned() and good else pixels[good]
    failures = [(rows.start + k, why) for k, why in rows.errors.items()]
    return [rows.start + k for k in good], pixels.permute(0, 3, 1, 2) if good else None, failures


def warm_up(extractor: FeatureExtractor, batch_size: int, device: torch.device) -> None:
    """Run a blank batch of the real shape, so that a GPU's one-time costs (loading its
    kernels, choosing convolution algorithms, the channels-last weights, recording the CUDA
    graph) are paid while the first batch is decoded, not after. The model's weights and
    statistics do not change. Eager, nothing here waits for the GPU; a graph's recording does."""
    height, width = extractor.preprocessing.input_size
    blank = torch.zeros(batch_size, 3, height, width, dtype=torch.uint8, device=device)
    blank = blank.contiguous(memory_format=torch.channels_last)
    for _ in range(2 if extractor._graphing(blank) else 1):  # the second call records the graph
        extractor.embed(blank)


def _finish(pending, bar) -> BatchResult:
    positions, feats, done, bad = pending
    if done is not None:
        done.synchronize()
        feats = feats.numpy()
    bar.update(len(positions) + len(bad))
    return BatchResult(positions, feats, bad)
