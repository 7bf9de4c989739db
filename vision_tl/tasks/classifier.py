"""``ImageClassifier``: the LightningModule that trains a ``ClassifierNet``.

It only wires steps, optimiser, scheduler and metrics; the network and the
freezing logic live in :mod:`vision_tl.models`.
"""

from __future__ import annotations

import math
import numbers
import os
import warnings
from fractions import Fraction

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)

from vision_tl import __version__
from vision_tl.backbones import (
    DEFAULT_BACKBONE,
    FoldedInference,
    GraphedChain,
    GraphedInference,
    backbone_stages,
    create_backbone,
    resolve_preprocessing,
    swapped_in,
    weights_identity,
)
from vision_tl.data.folder import same_name
from vision_tl.models import ClassifierNet, apply_mode, count_trainable, outside_stages
from vision_tl.reports.metrics import ThresholdError, parse_threshold_target, select_threshold
from vision_tl.utils import say, whole_number
from vision_tl.utils.distributed import first_builds

CLASS_WEIGHTS = ("none", "sqrt", "inverse")


def _not_a_cache_folder(value) -> bool:
    """A switch (True, "true", "yes"...) where ``feature_cache`` takes "auto" or a folder: True
    failed deep in pathlib once training started, "true" made a cache folder of that name."""
    from vision_tl.data.datamodule import _NOT_FOLDERS

    if not isinstance(value, (str, os.PathLike)):
        return True
    return value != "auto" and os.fspath(value).strip().lower() in _NOT_FOLDERS | {"true", "false"}


def _real_numbers(**given) -> list[float]:
    """The ``given`` numbers as Python floats: a numpy number would reach the optimizer's state in
    the checkpoint, which ``weights_only=True`` then refuses; a string or None is named here
    rather than failing a comparison with a TypeError."""
    for name, value in given.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            hint = " (a string: pass the number itself, e.g. 1e-3, not '1e-3')" if isinstance(value, str) else ""
            raise ValueError(f"{name} must be a number, got {value!r}{hint}")
    return [float(value) for value in given.values()]


def _plain(value):
    """``value`` with paths as strings and numpy numbers and arrays as Python ones, at any depth."""
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (np.generic, np.ndarray)):
        return value.tolist()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        items = [_plain(v) for v in value]
        return tuple(items) if isinstance(value, tuple) else items
    return value


def gather_shares(module: L.LightningModule, rows: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's ``rows``, indexed by rank, on the CPU; the shares may differ in length
    (all_gather needs equal shapes, so they travel padded). A collective: call it on every rank."""
    sizes = module.all_gather(torch.tensor([len(rows)], device=module.device)).flatten().tolist()
    padded = torch.zeros((max(sizes), *rows.shape[1:]), dtype=rows.dtype, device=module.device)
    padded[: len(rows)] = rows.to(module.device)
    gathered = module.all_gather(padded).cpu()
    return [gathered[r, :n] for r, n in enumerate(sizes)]


def _data_setting(datamodule, name: str):
    """A data module's init argument ``name`` (None for data modules that do not have it)."""
    hparams = getattr(datamodule, "hparams", None)
    return hparams.get(name) if hasattr(hparams, "get") else None


def class_weights_from_counts(counts: list[int], kind: str) -> torch.Tensor | None:
    """Loss weights from class frequencies, normalised to mean 1 (``sqrt`` is the stable default)."""
    if kind not in CLASS_WEIGHTS:
        raise ValueError(f"unknown class_weights {kind!r}; expected one of: {', '.join(CLASS_WEIGHTS)}")
    if kind == "none":
        return None
    freq = torch.tensor(counts, dtype=torch.float32).clamp_min(1.0)
    weights = 1.0 / (freq.sqrt() if kind == "sqrt" else freq)
    return weights * len(counts) / weights.sum()


class WarmupCosine(torch.optim.lr_scheduler.LRScheduler):
    """Linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``total``: one factor
    for every parameter group, each from its own starting lr. A group added during training
    (:class:`~vision_tl.tasks.callbacks.GradualUnfreezing`) starts from the lr it was added
    with; ``LambdaLR`` keeps one function per group and stopped at the first step after one
    was added. The state is plain numbers, so checkpoints load with ``weights_only=True``."""

    def __init__(self, optimizer: torch.optim.Optimizer, total: int, warmup: int = 0, last_epoch: int = -1) -> None:
        self.total, self.warmup = max(1, int(total)), max(0, int(warmup))
        super().__init__(optimizer, last_epoch)

    def factor(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = (step - self.warmup) / max(1, self.total - self.warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    def get_lr(self) -> list[float]:
        factor = self.factor(self.last_epoch)
        return [group.setdefault("initial_lr", group["lr"]) * factor for group in self.optimizer.param_groups]

    def load_state_dict(self, state_dict: dict) -> None:
        """Resume at the saved step, on this run's schedule: a resume with a larger
        ``--trainer.max_epochs`` stretches the cosine to the new length (with the saved length,
        the added epochs would all train at a learning rate of 0). The same length gives the
        same learning rates as a run that was never stopped."""
        total = self.total
        super().load_state_dict(state_dict)
        saved = self.total
        self.total = total  # the warm-up keeps its saved length in steps: a resume past it stays past it
        if saved != total and total <= self.last_epoch:
            raise ValueError(
                f"the resumed run's learning-rate schedule would end at step {total} (--trainer.max_epochs x its steps "
                f"per epoch), at or before the {self.last_epoch} steps the checkpoint has trained, so every step left "
                "would train at a learning rate of 0; keep --data.batch_size as the run had it, or pass a larger "
                "--trainer.max_epochs")
        self._last_lr = self.get_lr()
        for group, lr in zip(self.optimizer.param_groups, self._last_lr):
            group["lr"] = lr  # the rate of the next step, on this schedule
        if saved != total:
            say(f"vision_tl: the learning-rate schedule now decays to 0 at step {total} (it was {saved}): "
                f"training goes on from step {self.last_epoch} at {self.factor(self.last_epoch):.3g} x the base rate")


def _check_compiler(device_type: str = "cpu") -> None:
    """``torch.compile`` builds C++ code (a CPU's kernels; on a GPU, Triton's launchers, in C),
    and only at the first batch, deep inside training, does a missing compiler show (as a long
    traceback). Checked before anything runs."""
    if device_type == "cuda":  # Triton looks for $CC, else gcc, else clang
        import shutil

        if not (os.environ.get("CC") or shutil.which("gcc") or shutil.which("clang")):
            raise ValueError("--model.compile true needs a C compiler (gcc or clang) for torch.compile's GPU kernels "
                             "(Triton), and none is on PATH. Install one (e.g. `apt install gcc`) or set $CC to it, "
                             "or leave --model.compile false: training is the same without it")
        return
    if device_type != "cpu":  # (MPS, XPU: their own compilers; torch.compile says what it lacks)
        return
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler
    except ImportError:  # another PyTorch layout: torch.compile says it itself
        return
    try:
        get_cpp_compiler()
    except Exception as exc:  # noqa: BLE001 - InvalidCxxCompiler, or whatever finding one raises
        raise ValueError(
            f"--model.compile true needs a C++ compiler (gcc or clang) for torch.compile, and none works here "
            f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}). Install one (e.g. `apt install "
            "g++`) or set $CXX to it, or leave --model.compile false: training is the same without it") from exc


def _metrics(num_classes: int) -> MetricCollection:
    # validate_args=False: the checks run torch.unique on every update, a wait for the GPU each
    # step; the inputs are this module's own softmax and the data module's labels
    checked = {"validate_args": False}
    return MetricCollection({
        "acc": MulticlassAccuracy(num_classes, average="micro", **checked),
        "balanced_acc": MulticlassRecall(num_classes, average="macro", **checked),
        "f1_macro": MulticlassF1Score(num_classes, average="macro", **checked),
        "precision_per_class": MulticlassPrecision(num_classes, average=None, **checked),
        "recall_per_class": MulticlassRecall(num_classes, average=None, **checked),
        "confusion_matrix": MulticlassConfusionMatrix(num_classes, **checked),
    })


def _outermost_covered(root: nn.Module, frozen: set[int]) -> list[str]:
    """Names of the outermost submodules of ``root`` made only of frozen modules (``frozen``:
    their ids) and stateless ones (activations, identities): Lite0's 66 frozen layers in
    ``partial`` are 7 whole stages, so a training step swaps 7 modules for their folded copies
    instead of 66."""
    covered: dict[int, bool] = {}
    holds_frozen: dict[int, bool] = {}

    def walk(module: nn.Module) -> None:
        children = list(module.children())
        for child in children:
            walk(child)
        own_state = any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(recurse=False))
        holds_frozen[id(module)] = id(module) in frozen or any(holds_frozen[id(c)] for c in children)
        covered[id(module)] = id(module) in frozen or not own_state and all(covered[id(c)] for c in children)

    walk(root)
    names: list[str] = []
    for name, module in root.named_modules():
        if (name and covered[id(module)] and holds_frozen[id(module)]
                and not any(name.startswith(n + ".") for n in names)):
            names.append(name)
    return names


class ImageClassifier(L.LightningModule):
    """Transfer-learning classifier over a timm backbone, in ``frozen``, ``partial`` or ``full`` mode.

    Args:
        classes: class names in index order (on the CLI, linked from ``data.classes``).
        backbone: timm model name.
        pretrained: start from ImageNet weights (offline: bundled or cached); False = random init.
        weights: local ``.safetensors``/``.pth`` weights for the backbone (wins over ``pretrained``).
        image_size: input size override; default from the backbone's ``pretrained_cfg``.
        mode: ``frozen`` (head only), ``partial`` (last stages + head) or ``full``.
        trainable_stages: stages trained in ``partial`` mode, counted from the end.
        freeze_bn: keep BatchNorm statistics fixed in trainable stages too (stable on small data).
        head: ``linear`` or ``mlp``.
        dropout: dropout before the head's linear layer(s).
        lr: head learning rate (AdamW).
        backbone_lr_factor: backbone learning rate = ``lr * backbone_lr_factor``.
        weight_decay: AdamW weight decay.
        warmup_fraction: share of steps with linear warm-up before cosine decay.
        class_weights: ``none``, ``sqrt`` (inverse square-root frequency) or ``inverse``.
        class_counts: training images per class; read from the datamodule when omitted.
        label_smoothing: cross-entropy label smoothing.
        good_class: the defect-free class, if any (used by reports and export).
        channels_last: run in channels-last memory format, as GPU and CPU (oneDNN)
            convolutions prefer: on a 2-core CPU Lite0 trains 1.5-1.7x faster in it than in
            NCHW (``benchmarks/cpu_layout.py``). ``None`` (default) and ``True``: on; ``False``: NCHW.
        compile: run the network through ``torch.compile`` (opt-in: compiling takes a while
            on the first batches and needs a C++ compiler; on an H100, Lite0 ``partial`` trained
            slower compiled than eager even after compilation, 0.73 against 0.84 of the plain loop;
            on 2 CPU cores it is about as fast as the eager path, which folds the frozen stages).
        fold_batchnorm: where the backbone only infers (``frozen`` mode, the frozen stages of
            ``partial``, evaluation), run it with BatchNorm folded into the convolutions
            (:mod:`vision_tl.backbones._fold`). ``None`` (default): on, except where a CUDA graph
            runs the backbone (``frozen`` on a GPU with ``cuda_graphs``), which is faster unfolded.
        cuda_graphs: ``frozen`` mode on a GPU: replay the backbone as a CUDA graph
            (:class:`~vision_tl.backbones.GraphedInference`), one launch instead of about a
            hundred per batch, which the CPU otherwise cannot queue as fast as the GPU runs
            them (H100, Lite0: 0.84 of the plain inference loop against 0.72 eager); also the
            feature cache's extraction pass.
        partial_cuda_graph: ``partial`` mode on a GPU: run the frozen stem and stages, which
            come first, as one CUDA graph (:class:`~vision_tl.backbones.GraphedChain`), unfolded
            unless ``fold_batchnorm`` is true; the stages that train run eagerly. Opt-in until
            measured on a GPU (benchmarks/RESULTS.md).
        feature_cache: ``frozen`` mode only: run the backbone once per image and train the
            head on cached features (:mod:`vision_tl.features`). ``"auto"`` uses
            ``$VISION_TL_CACHE`` or ``~/.cache/vision_tl/features``; a path picks the cache
            directory; ``None`` runs the backbone on every batch. Features are
            computed in the trainer's precision (bf16 under ``bf16-mixed`` on a GPU) and, with
            ``cuda_graphs``, through CUDA graphs.
        cached_views: ``frozen`` + cache: views per training image, view 0 clean and the
            others augmented with the datamodule's ``augment`` (1 = clean features only).
        threshold_target: choose the good/defect threshold on P(good) after every validation
            epoch, e.g. ``"false_reject:0.01"`` (at most 1 % of good images rejected) or
            ``"escape:0.005"``; needs ``good_class``. Saved as ``threshold`` in the checkpoint.

    Example:
        >>> model = ImageClassifier(["good", "scratch"], mode="frozen")
    """

    def __init__(
        self,
        classes: list[str],
        backbone: str = DEFAULT_BACKBONE,
        pretrained: bool = True,
        weights: str | None = None,
        image_size: int | tuple[int, int] | None = None,
        mode: str = "partial",
        trainable_stages: int = 2,
        freeze_bn: bool = True,
        head: str = "linear",
        dropout: float = 0.2,
        lr: float = 1e-3,
        backbone_lr_factor: float = 0.1,
        weight_decay: float = 1e-4,
        warmup_fraction: float = 0.05,
        class_weights: str = "sqrt",
        class_counts: list[int] | None = None,
        label_smoothing: float = 0.0,
        good_class: str | None = None,
        channels_last: bool | None = None,
        feature_cache: str | None = "auto",
        cached_views: int = 1,
        threshold_target: str | None = None,
        compile: bool = False,
        fold_batchnorm: bool | None = None,
        cuda_graphs: bool = True,
        partial_cuda_graph: bool = False,
    ) -> None:
        super().__init__()
        # (a data module passed as classes is not iterable; a generator cannot be saved as a hyperparameter)
        if not isinstance(classes, (list, tuple, np.ndarray)) or not all(isinstance(c, str) and c for c in classes):
            raise ValueError(f"classes must be a list of class names, e.g. ['good', 'scratch'], got {classes!r} "
                             "(ImageClassifier(datamodule.classes, ...) passes the folder's)")
        classes = [str(c) for c in classes]  # (numpy's str_ would make the checkpoint one weights_only refuses)
        names = [same_name(c) for c in classes]  # accents typed either way name one class
        twice = sorted({c for c, n in zip(classes, names) if names.count(n) > 1})
        if twice:
            raise ValueError(f"classes {list(classes)} name {', '.join(map(repr, twice))} twice; give each class once")
        if good_class is not None:
            if same_name(good_class) not in names:
                raise ValueError(f"good_class {good_class!r} is not one of the classes {list(classes)}; name the "
                                 "defect-free class as its folder is named")
            good_class = classes[names.index(same_name(good_class))]  # the classes' own spelling: looked up by it
        lr, backbone_lr_factor, weight_decay, warmup_fraction, label_smoothing, dropout = _real_numbers(
            lr=lr, backbone_lr_factor=backbone_lr_factor, weight_decay=weight_decay,
            warmup_fraction=warmup_fraction, label_smoothing=label_smoothing, dropout=dropout)
        if not whole_number(cached_views) or cached_views < 1:
            raise ValueError(f"cached_views must be a whole number of at least 1 (1: the clean view only), "
                             f"got {cached_views!r}")
        if lr <= 0 or backbone_lr_factor < 0 or weight_decay < 0:
            raise ValueError(
                f"lr must be > 0 and backbone_lr_factor, weight_decay >= 0; got lr={lr}, "
                f"backbone_lr_factor={backbone_lr_factor}, weight_decay={weight_decay}"
            )
        if not 0.0 <= warmup_fraction < 1.0:
            raise ValueError(f"warmup_fraction must be in [0, 1), got {warmup_fraction}")
        class_weights_from_counts([1, 1], class_weights)  # validates the name early
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing} (0.1 is a common choice)")
        if class_counts is not None and (len(class_counts) != len(classes) or any(c < 0 for c in class_counts)):
            raise ValueError(f"class_counts {list(class_counts)} must give one count >= 0 per class, in the order "
                             f"{list(classes)} ({len(classes)} numbers); leave it out to count the training images")
        if feature_cache is not None and _not_a_cache_folder(feature_cache):
            raise ValueError(f"feature_cache {feature_cache!r}: give 'auto' (the default cache folder), a folder "
                             "path, or None to run the backbone on every batch")
        if threshold_target is not None:
            parse_threshold_target(threshold_target)  # (its good_class may come from the data module: setup)
        self.save_hyperparameters()
        self.classes = list(classes)
        self.preprocessing = resolve_preprocessing(backbone, image_size)
        net_backbone = create_backbone(backbone, pretrained=pretrained, weights=weights, img_size=image_size)
        self.net = ClassifierNet(net_backbone, len(self.classes), head, dropout)
        apply_mode(self.net, mode, trainable_stages, freeze_bn)
        self.val_metrics = _metrics(len(self.classes))
        self.test_metrics = _metrics(len(self.classes))
        self.eval_results: dict[str, dict] = {}
        # Per-image probabilities and labels of the last val/test epoch (numpy), for reports.
        self.eval_outputs: dict[str, dict[str, np.ndarray]] = {}
        self._eval_batches: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self._loss_sums: dict[str, torch.Tensor] = {}  # per stage: [sum of w_y * loss, sum of w_y] (_add_loss)
        self.threshold: float | None = None
        self.last_train_loss: torch.Tensor | None = None  # for progress bars (see training_step)
        self._train_loss_sum: torch.Tensor | None = None  # this epoch's step losses, added on the device
        self._train_loss_steps = 0
        self.register_buffer("loss_weights", torch.ones(len(self.classes)), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a normalised ``[N, 3, H, W]`` batch."""
        if x.ndim != 4:  # (channels-last needs rank 4: torch's own message says only that)
            shape = "x".join(map(str, x.shape))
            raise ValueError(f"the model takes a batch [N, 3, H, W] of normalised images, got a tensor of shape "
                             f"{shape}" + ("; for one image pass x[None]" if x.ndim == 3 else ""))
        if self._channels_last():
            x = x.contiguous(memory_format=torch.channels_last)
        # The compiled wrapper lives outside the module tree, so checkpoints keep plain keys.
        # (``or`` would call len() on the wrapper, which an nn.Module has not.)
        net = self.__dict__.get("_compiled_net")
        if net is not None:
            return net(x)
        grad = torch.is_grad_enabled()
        if (not self.training and not grad) or any(m is self.net.backbone for m in self.net.eval_modules):
            # Inference (validation, test, predict, reports) or frozen mode: the backbone runs as a
            # copy with BatchNorm folded into the convolutions (49 layers fewer in Lite0), kept
            # outside the module tree as well; the backbone itself where nothing folds.
            # ... unless a gradient must flow through it: an input that wants its gradient
            # (saliency maps, adversarial checks), or a parameter set to train (model_for)
            if not (grad and x.requires_grad):
                folded, fold = self._folded(), self._fold_batchnorm(x)
                backbone = folded.model_for(x, trainable_ok=not grad, fold=fold)
                # unfolded by choice (a GPU's graph): without gradients unless one may be wanted,
                # by a parameter set to train or a hook (which a fold steps aside for as well)
                if backbone is not self.net.backbone or not (fold or grad and (folded.trains or folded.hooked)):
                    with torch.no_grad():
                        features = self._run_frozen(backbone, x, folded.version)
                    return self.net.forward_head(features)
        elif getattr(self.net, "frozen_modules", None) and not x.requires_grad:
            # partial mode, training: the frozen stages run as their folded copies (or, with
            # partial_cuda_graph on a GPU, as one CUDA graph), swapped into the backbone for this
            # forward only (the stages that train run as they are)
            swapped = self._frozen_stages(x)
            if swapped:
                with swapped_in(self.net.backbone, swapped):
                    return self.net(x)
        self._drop_chain()
        return self.net(x)

    def _drop_chain(self) -> None:
        """Free the frozen stages' graph (its memory) once a step runs without it: unfrozen
        since, on another device, or the switch turned off."""
        chained = self.__dict__.pop("_graphed_chain", None)
        if chained is not None:
            chained[2].graphs.clear()

    def _frozen_stages(self, x: torch.Tensor) -> dict[str, nn.Module]:
        """What replaces partial mode's frozen stages in a training step, by name: their folded
        copies, their chain (:class:`~vision_tl.backbones.GraphedChain`), or nothing."""
        graph = x.is_cuda and bool(self.hparams.get("partial_cuda_graph")) and "_compiled_net" not in self.__dict__
        fold = self.hparams.get("fold_batchnorm")
        fold = (not graph) if fold is None else bool(fold)  # a graph runs cuDNN's BatchNorm for less
        if not (fold or graph):
            return {}
        stages = self._folded_stages(x, fold)
        if not (graph and stages):
            return stages
        swap = self._chained(stages, x)
        if swap is stages and not fold and self.hparams.get("fold_batchnorm") is None:
            return self._folded_stages(x)  # no chain here: the folded copies, as without the switch
        return swap

    def _chained(self, stages: dict[str, nn.Module], x: torch.Tensor) -> dict[str, nn.Module]:
        """The frozen stages as one :class:`~vision_tl.backbones.GraphedChain` in place of the
        first and identities in place of the others; checked once (per set of stages) to give
        the model's own logits, the stages as they are where it does not (a backbone whose
        forward uses a stage's output twice, or runs them in another order)."""
        key = tuple(id(m) for m in stages.values())
        cached = self.__dict__.get("_graphed_chain")
        if cached is None or cached[0] != key:
            names = list(stages)
            chain = GraphedChain([stages[n] for n in names])
            swap = {names[0]: chain, **{n: nn.Identity() for n in names[1:]}}
            if not self._swap_agrees(stages, swap, x):
                warnings.warn("vision_tl: the frozen stages do not run as one chain in this backbone; "
                              "partial_cuda_graph is not used", stacklevel=2)
                swap = stages
            self._drop_chain()
            cached = self.__dict__["_graphed_chain"] = (key, swap, chain)
        folded = self.__dict__["_folded_stages_by"][1]
        cached[2].version = (id(folded), folded.version)  # a rebuilt FoldedInference counts from 1 again
        return cached[1]

    def _swap_agrees(self, stages: dict[str, nn.Module], swap: dict[str, nn.Module], x: torch.Tensor) -> bool:
        """Whether the network gives the same logits on two of ``x``'s images with ``swap`` as
        with ``stages`` swapped in (in eval mode, so that nothing the check runs updates a
        BatchNorm statistic; every module's mode is put back)."""
        modes = [(m, m.training) for m in self.net.modules()]
        kind = x.device.type
        try:
            self.net.eval()
            # no autocast cast cache: weights cast here under no_grad and reused by the step's own
            # forward would get no gradient (PyTorch before the fix of pytorch#112583)
            with torch.no_grad(), torch.autocast(kind, dtype=torch.get_autocast_dtype(kind),
                                                 enabled=torch.is_autocast_enabled(kind), cache_enabled=False):
                with swapped_in(self.net.backbone, stages):
                    expected = self.net(x[:2])
                with swapped_in(self.net.backbone, swap):
                    got = self.net(x[:2])
            return bool(torch.allclose(got.float(), expected.float(), rtol=1e-4, atol=1e-5))
        except Exception:  # noqa: BLE001 - any failure means the chain cannot stand in
            return False
        finally:
            for module, mode in modes:
                module.training = mode

    def _fold_batchnorm(self, x: torch.Tensor) -> bool:
        fold = self.hparams.get("fold_batchnorm")
        # On a GPU a recorded graph removes the launches folding saves, and a cuDNN BatchNorm
        # costs less GPU time than the separate bias add of a folded convolution (H100, Lite0).
        return (not (x.is_cuda and self._cuda_graphs())) if fold is None else fold

    def _cuda_graphs(self) -> bool:
        """Frozen mode only: there the backbone never changes during a fit. (Replaying the frozen
        layers of ``partial`` as graphs was measured and withdrawn, see benchmarks/RESULTS.md.)"""
        return (bool(self.hparams.get("cuda_graphs", True)) and self.__dict__.get("_compiled_net") is None
                and any(m is self.net.backbone for m in self.net.eval_modules))

    def _run_frozen(self, backbone: nn.Module, x: torch.Tensor, version: int) -> torch.Tensor:
        """``backbone(x)`` without gradients; on a GPU replayed as a CUDA graph (``cuda_graphs``)."""
        if not (x.is_cuda and self._cuda_graphs()):
            self.__dict__.pop("_graphed_backbone", None)  # e.g. unfrozen since: free their memory
            return backbone(x)
        graphs = self.__dict__.get("_graphed_backbone")
        if graphs is None:
            graphs = self.__dict__["_graphed_backbone"] = GraphedInference()
        return graphs(backbone, x, version)

    def _folded_stages(self, x: torch.Tensor, fold: bool = True) -> dict[str, nn.Module]:
        """Folded copies of the frozen stages' modules by name (``fold=False``: the modules
        themselves); empty where nothing folds, or where a frozen stage trains or has hooks."""
        frozen = tuple(id(m) for m in self.net.frozen_modules)
        cached = self.__dict__.get("_folded_stages_by")
        if cached is None or cached[0] != frozen or cached[1].source is not self.net.backbone:
            within = _outermost_covered(self.net.backbone, set(frozen))
            cached = self.__dict__["_folded_stages_by"] = (frozen, FoldedInference(self.net.backbone, within=within), {})
        folded, by_copy = cached[1], cached[2]
        if not folded.within:
            return {}
        copy = folded.model_for(x, trainable_ok=False, fold=fold)  # a stage set to train by hand runs as it is
        if copy is self.net.backbone and (fold or folded.trains or folded.hooked):
            return {}
        if by_copy.get("key") != (copy, folded.version):  # looked up once per copy, not on every step
            by_copy.update(key=(copy, folded.version),
                           modules={name: copy.get_submodule(name) for name in folded.within})
        return by_copy["modules"]

    def _folded(self) -> FoldedInference:
        folded = self.__dict__.get("_folded_backbone")
        if folded is None or folded.source is not self.net.backbone:  # first call, or a backbone swapped in
            folded = self.__dict__["_folded_backbone"] = FoldedInference(self.net.backbone)
        return folded

    def _refold(self) -> None:
        """Check the folded copy against the weights at the start of every evaluation pass:
        weight averaging (Lightning's ``WeightAveraging``) swaps weights in through ``.data``,
        which moves no version counter. (The frozen stages' copy needs no such check: an
        average of weights that never change is the same weights.)"""
        if "_folded_backbone" in self.__dict__:
            self.__dict__["_folded_backbone"].invalidate()

    def on_validation_epoch_start(self) -> None:
        self._refold()
        self._loss_sums.pop("val", None)  # (a pass stopped midway, e.g. in a notebook, left its sums)

    def on_test_epoch_start(self) -> None:
        self._refold()
        self._loss_sums.pop("test", None)

    def on_predict_epoch_start(self) -> None:
        self._refold()

    def _channels_last(self) -> bool:
        flag = self.hparams.get("channels_last")
        return True if flag is None else bool(flag)

    def setup(self, stage: str) -> None:
        if stage == "fit" and self._trainer is not None:
            # Frozen backbone stages are kept in eval mode on purpose (their BatchNorm statistics must
            # not move), so Lightning's "Found N module(s) in eval mode at the start of training" is
            # noise for this model: silenced on this trainer's loop alone, not by a warnings filter
            # for the whole process (which would hide it for a user's own models too).
            loop = getattr(self.trainer, "fit_loop", None)
            if hasattr(loop, "_warn_if_modules_in_eval_mode"):
                loop._warn_if_modules_in_eval_mode = lambda: None
        counts = self.hparams.class_counts
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer else None
        self._check_datamodule(datamodule)  # (takes the data module's good_class)
        if self.hparams.get("threshold_target") and self.hparams.good_class is None:
            raise ValueError(f"threshold_target {self.hparams.threshold_target!r} needs a good class: --data.good_class "
                             "NAME on the command line (Python: good_class=NAME on the data module or the model)")
        if hasattr(datamodule, "use_features"):
            # images again, until a frozen fit (below) switches to its features: a fit that stopped on an
            # error or Ctrl-C never reached teardown, and left them for the next model (in a notebook)
            datamodule.use_features(None)
        if counts is None and stage != "predict" and datamodule is not None and hasattr(datamodule, "class_counts"):
            counts = datamodule.class_counts("train")
        scheme = self.hparams.class_weights
        # (validate and test too: their val/loss is the loss fit logged)
        if (stage in ("fit", "validate", "test") and scheme not in (None, "none") and datamodule is not None
                and (datamodule.sampler_choice() if hasattr(datamodule, "sampler_choice")
                     else _data_setting(datamodule, "sampler")) == "balanced"):
            # the sampler already draws every class equally often: weighting the loss as well
            # would favour the rare classes a second time (about 3x with sqrt, 9x with inverse)
            if stage == "fit" and _data_setting(datamodule, "sampler") == "balanced":  # (auto: in the data summary)
                say(f"vision_tl: --data.sampler balanced evens out the classes; class_weights {scheme} is "
                    "not applied on top (pass --model.class_weights none to silence this)")
            scheme = "none"
        weights = class_weights_from_counts(counts, scheme) if counts else None
        if stage == "fit" and weights is not None and float(weights.max()) > 1.5 * float(weights.min()):
            # (the balanced sampler says what it does in the data summary; the loss weights, here)
            shown = ", ".join(f"{c} {w:.2f}" for c, w in zip(self.classes, weights.tolist()))
            say(f"vision_tl: loss weights per class (class_weights {scheme}, from the training counts): {shown} "
                "(--model.class_weights none for equal weights, --data.sampler balanced to draw classes evenly instead)")
        self.loss_weights = (torch.ones(len(self.classes)) if weights is None else weights).to(self.loss_weights.device)
        if self._channels_last():
            self.net.to(memory_format=torch.channels_last)
        if self.hparams.get("compile") and "_compiled_net" not in self.__dict__:
            device = self.trainer.strategy.root_device if self._trainer else self.device
            _check_compiler(device.type)  # inductor's C++ backend; a GPU compiles with Triton
            # dynamic=False: one graph per batch size. By default a smaller last batch makes Dynamo
            # recompile for any size, and the full batches after it run those shape-generic kernels too.
            self.__dict__["_compiled_net"] = torch.compile(self.net, dynamic=False)
        if stage == "fit":
            say(f"vision_tl: mode={self.hparams.mode}, {self._trainable_line()}")
            self._use_feature_cache(datamodule)

    def _check_datamodule(self, datamodule) -> None:
        """The CLI links the data module to the model; from Python nothing does. A data module
        built for another backbone or size would train on pixels the checkpoint and the ONNX
        export then describe wrongly, so a mismatch stops here, naming both sides."""
        if datamodule is None:
            return
        classes = getattr(datamodule, "classes", None)
        if classes is not None and list(classes) != self.classes:
            raise ValueError(f"the model was built for the classes {self.classes}, but the data module has "
                             f"{list(classes)}; build the model with ImageClassifier(datamodule.classes, ...)")
        theirs = getattr(datamodule, "preprocessing", None)
        if isinstance(theirs, type(self.preprocessing)) and theirs != self.preprocessing:
            raise ValueError(
                f"the data module prepares images as {theirs.to_dict()}, but the model "
                f"({self.hparams.backbone}, image_size={self.hparams.image_size}) expects "
                f"{self.preprocessing.to_dict()}; build both with the same backbone and image_size "
                "(ImageFolderDataModule(root, backbone=..., image_size=...))")
        good = _data_setting(datamodule, "good_class")
        if good is not None and (self.hparams.good_class is None or same_name(good) == same_name(
                self.hparams.good_class)):  # the folder's spelling, however its accents were typed
            self.hparams.good_class = good  # the reports, the checkpoint and the export need it
        elif good is not None and good != self.hparams.good_class:
            raise ValueError(f"good_class differs: the data module has {good!r}, the model "
                             f"{self.hparams.good_class!r}; give both the same one")

    def _use_feature_cache(self, datamodule) -> None:
        """Frozen mode: switch the datamodule's train/val loaders to cached backbone features."""
        cache = self.hparams.feature_cache
        if self.hparams.mode != "frozen" or cache is None or not hasattr(datamodule, "use_features"):
            return
        from vision_tl.tasks.callbacks import GradualUnfreezing

        if any(isinstance(c, GradualUnfreezing) for c in self.trainer.callbacks):
            # cached features would leave the stages it unfreezes out of every training step
            say("vision_tl: GradualUnfreezing trains backbone stages, so the backbone runs on every batch "
                "(feature_cache is not used)")
            return
        from vision_tl.features.training import cached_feature_datasets

        device = self.trainer.strategy.root_device
        # bf16 where the backbone runs in bf16 at each step (bf16 on a GPU); fp32 otherwise (the
        # extractor has no fp16: 16-mixed gets fp32 features)
        precision = "bf16" if device.type == "cuda" and str(self.trainer.precision).startswith("bf16") else "32"

        def compute():
            return cached_feature_datasets(
                self.net.backbone.to(device), self.hparams.backbone, datamodule,
                cache_dir=None if cache == "auto" else cache, views=self.hparams.cached_views, device=device,
                progress=self.trainer.progress_bar_callback is not None, precision=precision,
                cuda_graphs=bool(self.hparams.get("cuda_graphs", True)))

        # Under DDP rank 0 fills the shared cache first; the other ranks then only read it.
        datasets = first_builds(self.trainer.strategy, self.trainer.is_global_zero, compute)
        datamodule.use_features(datasets if datasets is not None else compute())
        augment = _data_setting(datamodule, "augment")
        views = self.hparams.cached_views
        hint = (f"; --model.cached_views K > 1 adds K-1 views per image augmented with --data.augment {augment}"
                if views == 1 and augment not in (None, "none") else "")
        if _data_setting(datamodule, "decoded_cache"):
            hint += "; --data.decoded_cache is not used for training (the features are cached)"
        say(f"vision_tl: training the head on cached features ({views} view(s){', clean' if views == 1 else ''})"
            f"{hint}")

    def teardown(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer else None
        if stage == "fit" and hasattr(datamodule, "use_features"):
            datamodule.use_features(None)  # validate/test/predict read images again
        # recorded CUDA graphs hold GPU memory (their buffers, a pool per batch shape)
        graphs = self.__dict__.pop("_graphed_backbone", None)
        if graphs is not None:
            graphs.clear()
        self._drop_chain()

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for an image batch ``[N, 3, H, W]`` or a cached-feature batch ``[N, F]``."""
        return self.net.forward_head(x) if x.ndim == 2 else self(x)

    def _loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        weight = self.loss_weights.float() if self.loss_weights is not None else None  # (*-true precision casts it)
        return F.cross_entropy(logits.float(), y, weight=weight,
                               label_smoothing=self.hparams.label_smoothing)

    def training_step(self, batch, batch_idx: int):
        x, y = batch
        if len(y) == 0:  # every image of the batch was unreadable (skip_bad_images)
            if self._trainer is not None and self.trainer.world_size > 1:
                # DDP needs every rank to step together: a zero loss that touches every trainable weight
                return sum(p.sum() for p in self.parameters() if p.requires_grad) * 0.0
            return None
        loss = self._loss(self._logits(x), y)
        # Not prog_bar=True: Lightning would read a progress-bar value back from the device after
        # every step, so the CPU could never queue the next step while the GPU computes. The
        # time-throttled bar of `vision-tl fit` shows ``last_train_loss`` instead.
        if self._step_metrics_due(batch_idx):
            self.log("train/loss", loss, batch_size=len(y))
        self.last_train_loss = loss.detach()
        # the epoch's mean, logged once at its end (train/epoch_loss): an add on the device per
        # step, where logging every step would cost a logger call each (see _step_metrics_due)
        self._train_loss_sum = self.last_train_loss if self._train_loss_sum is None else \
            self._train_loss_sum + self.last_train_loss
        self._train_loss_steps += 1
        return loss

    def on_train_epoch_start(self) -> None:
        self._train_loss_sum, self._train_loss_steps = None, 0

    @property
    def epoch_train_loss(self) -> float | None:
        """The mean loss of this epoch's training steps so far, on this process (progress lines
        read it; ``train/epoch_loss``, logged at the epoch's end, is the mean over every rank)."""
        if not self._train_loss_steps or self._train_loss_sum is None:
            return None
        return float(self._train_loss_sum) / self._train_loss_steps

    def on_train_epoch_end(self) -> None:
        """Log ``train/epoch_loss``, the mean loss of the epoch's steps (averaged over ranks): the
        training curve of ``training_curves.png``, where ``train/loss`` is only every Nth step."""
        steps, total = self._train_loss_steps, self._train_loss_sum
        self._train_loss_sum, self._train_loss_steps = None, 0
        sums = None if total is None else torch.stack([total.float(), torch.tensor(float(steps), device=total.device)])
        mean = self._mean_over_ranks(sums)
        if mean is not None:
            self.log("train/epoch_loss", mean)

    def _mean_over_ranks(self, sums: torch.Tensor | None) -> torch.Tensor | None:
        """``sums[0] / sums[1]`` of ``[total, count]`` added up over every rank (each rank joins the
        reduce, one with nothing counted too); None where nothing was counted."""
        if self._trainer is not None and self.trainer.world_size > 1:
            sums = self.trainer.strategy.reduce(torch.zeros(2, device=self.device) if sums is None else sums,
                                                reduce_op="sum")
        return sums[0] / sums[1] if sums is not None and float(sums[1]) > 0 else None

    def _step_metrics_due(self, batch_idx: int) -> bool:
        """Whether Lightning hands this step's metrics to the logger (every ``log_every_n_steps``)
        or the epoch ends. On the other steps the value would reach no logger, so skipping
        ``self.log`` there leaves the logs as they were and saves its CPU time (0.3 ms a call
        on a 2-core machine), which a GPU step in frozen mode (about 11 ms) cannot spare."""
        trainer = self._trainer
        if trainer is None:
            return True
        due = getattr(getattr(trainer, "_logger_connector", None), "should_update_logs", True)
        return bool(due) or batch_idx + 1 >= trainer.num_training_batches

    def _eval_step(self, batch, metrics: MetricCollection, stage: str) -> None:
        x, y = batch
        if len(y) == 0:
            return
        logits = self._logits(x)
        self._add_loss(stage, logits, y)
        probs = logits.float().softmax(-1)
        metrics.update(probs, y)
        # kept on the device until the epoch ends: a copy to the CPU here would make every step
        # wait for the GPU (a few kB per batch)
        self._eval_batches.setdefault(stage, []).append((probs.detach(), y.detach()))

    def _add_loss(self, stage: str, logits: torch.Tensor, y: torch.Tensor) -> None:
        """Add a batch to ``{stage}/loss``, which is the loss of all the split's images at once:
        sum(w_y * loss) / sum(w_y). With class weights, PyTorch's mean divides each batch by that
        batch's own weight sum, so the mean of batch means (what logging per step gives) moved
        with --data.batch_size and with how the class-sorted images fell into batches (one
        checkpoint: 0.330 at batch size 50, 0.443 at 64)."""
        weight = self.loss_weights.float() if self.loss_weights is not None else None
        losses = F.cross_entropy(logits.float(), y, weight=weight, reduction="none",
                                 label_smoothing=self.hparams.label_smoothing)
        weights = weight[y] if weight is not None else torch.ones_like(losses)
        batch = torch.stack([losses.sum(), weights.sum()]).detach()
        self._loss_sums[stage] = self._loss_sums[stage] + batch if stage in self._loss_sums else batch

    def validation_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, self.val_metrics, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, self.test_metrics, "test")

    def _weights_epoch(self) -> int:
        """The epoch whose weights are evaluated: the trainer's while fitting; for ``validate`` /
        ``test`` of a checkpoint, the checkpoint's (their trainer counts from 0 again)."""
        fitting = self._trainer is not None and getattr(self.trainer.state, "fn", None) == "fit"
        saved = getattr(self, "checkpoint_epoch", None)
        return int(saved) if not fitting and isinstance(saved, int) else self.current_epoch

    def _eval_epoch_end(self, metrics: MetricCollection, stage: str) -> None:
        values = metrics.compute()
        metrics.reset()
        matrix = values["confusion_matrix"].int()
        rows = matrix.sum(1)
        # balanced accuracy = mean recall of the classes this split has, as in `vision-tl report`
        # (torchmetrics counts a class with no images here as recall 0 once anything is predicted as it)
        # Averaged exactly: equal means must log equal, for the best checkpoint's tie-break by val loss
        # (a float32 mean in class order put 1 of 6 and 2 of 12 missed one step from 2 of 6 missed)
        recalls = [Fraction(hit, n) for hit, n in zip(matrix.diag().tolist(), rows.tolist()) if n]
        if recalls:
            values["balanced_acc"] = torch.tensor(float(sum(recalls) / len(recalls)), device=matrix.device)
        for name in ("acc", "balanced_acc", "f1_macro"):
            self.log(f"{stage}/{name}", values[name], prog_bar=name != "f1_macro")
        loss = self._mean_over_ranks(self._loss_sums.pop(stage, None))  # (every rank's images; a rank may have none)
        if loss is not None:
            self.log(f"{stage}/loss", loss)
        predicted, present = matrix.sum(0).tolist(), rows.tolist()
        # None, as in `vision-tl report`, where the ratio is undefined (torchmetrics says 0):
        # precision of a class never predicted, recall of a class with no images here
        self.eval_results[stage] = {
            "epoch": self._weights_epoch(),
            **{k: float(values[k]) for k in ("acc", "balanced_acc", "f1_macro")},
            "precision_per_class": {c: v if n else None for c, v, n in
                                    zip(self.classes, values["precision_per_class"].tolist(), predicted)},
            "recall_per_class": {c: v if n else None for c, v, n in
                                 zip(self.classes, values["recall_per_class"].tolist(), present)},
            "confusion_matrix": matrix.tolist(),
        }
        batches = self._eval_batches.pop(stage, [])
        probs = torch.cat([p for p, _ in batches]).cpu() if batches else torch.zeros(0, len(self.classes))
        labels = torch.cat([y for _, y in batches]).cpu() if batches else torch.zeros(0, dtype=torch.long)
        if self._trainer is not None and self.trainer.world_size > 1:  # every rank, in the data's order
            probs, labels = self._gather_in_order(probs), self._gather_in_order(labels)
        if len(labels):
            self.eval_outputs[stage] = {"probabilities": probs.numpy(), "labels": labels.numpy()}
        # (not on the sanity check's first batches: often one class's images only)
        sanity = self._trainer is not None and self.trainer.sanity_checking
        if stage == "val" and self.hparams.threshold_target and len(labels) and not sanity:
            self._choose_threshold(self.eval_outputs["val"])

    def _gather_in_order(self, rows: torch.Tensor) -> torch.Tensor:
        """All ranks' evaluation rows, in the data set's order: the data module's evaluation
        sampler gives rank r the images r, r + world, r + 2 world, ... (shares differ by one)."""
        shares = gather_shares(self, rows)
        world, total = len(shares), sum(len(s) for s in shares)
        if not all(len(range(r, total, world)) == len(s) for r, s in enumerate(shares)):
            return torch.cat(shares)  # not the data module's sampler: rank by rank
        out = torch.empty((total, *rows.shape[1:]), dtype=rows.dtype)
        for r, share in enumerate(shares):
            out[r::world] = share
        return out

    def _choose_threshold(self, outputs: dict[str, np.ndarray]) -> None:
        """Set ``self.threshold`` to meet ``threshold_target`` on this validation epoch."""
        k = self.classes.index(self.hparams.good_class)
        try:
            choice = select_threshold(outputs["probabilities"][:, k], outputs["labels"] == k,
                                      self.hparams.threshold_target)
        except ThresholdError as exc:
            rank_zero_warn(f"vision_tl: no threshold this epoch: {exc}")
            return
        self.threshold = choice["threshold"]
        self.eval_results["val"].update(threshold=choice["threshold"], escape_rate=choice["escape_rate"],
                                        false_reject_rate=choice["false_reject_rate"])

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end(self.val_metrics, "val")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end(self.test_metrics, "test")

    def predict_step(self, batch, batch_idx: int) -> dict[str, torch.Tensor]:
        """Probabilities and argmax; ``index`` is the batch's second element (from the data
        module's predict loader: each image's position in ``datamodule.predict_samples``)."""
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        probs = self(x).float().softmax(-1)
        out = {"probabilities": probs, "predicted": probs.argmax(-1)}
        if isinstance(batch, (list, tuple)) and len(batch) > 1:
            out["index"] = batch[1]
        return out

    def configure_optimizers(self):
        hp = self.hparams
        head = [p for p in self.net.head.parameters() if p.requires_grad]
        body = [p for p in self.net.backbone.parameters() if p.requires_grad]
        groups = [{"params": head, "lr": hp.lr, "name": "head"}]
        if body:
            groups.append({"params": body, "lr": hp.lr * hp.backbone_lr_factor, "name": "backbone"})
        optimizer = torch.optim.AdamW(groups, weight_decay=hp.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        scheduler = WarmupCosine(optimizer, total, warmup=int(total * hp.warmup_fraction))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # Runs before Lightning loads the weights: a checkpoint for other classes fails here with
        # both class lists, not with a tensor size mismatch from load_state_dict.
        from vision_tl.tasks.checkpoint import CheckpointError

        meta = checkpoint.get("vision_tl") or {}
        saved = meta.get("classes")
        if saved is not None and list(saved) != self.classes:
            source = getattr(self._trainer, "ckpt_path", None) if self._trainer else None
            raise CheckpointError(
                f"checkpoint {source or ''} was trained on {len(saved)} classes {list(saved)}, but the data "
                f"has {len(self.classes)} classes {self.classes}; use the data it was trained on "
                "(--data.root) or train a new model without --ckpt_path"
            )
        # `vision-tl test --ckpt_path` and resumed fits keep the chosen good/defect threshold.
        self.threshold = meta.get("threshold")
        self.checkpoint_epoch = checkpoint.get("epoch")  # (as load_classifier records it)
        self._train_what_the_checkpoint_trained(checkpoint)

    def _train_what_the_checkpoint_trained(self, checkpoint: dict) -> None:
        """Before vision_tl froze them with the stem, ``partial`` mode trained the parameters of a
        ViT that belong to no stage (``cls_token``, ``pos_embed``); a run resumed from such a
        checkpoint keeps training them, so its optimizer state fits (the optimizers are made
        after this hook)."""
        states = checkpoint.get("optimizer_states") or []
        if self.hparams.get("mode") != "partial" or not states:
            return
        outside = [p for p in outside_stages(self.net.backbone) if not p.requires_grad]
        groups = states[0].get("param_groups", [])
        saved = sum(len(group.get("params", [])) for group in groups)
        trains = sum(p.requires_grad for p in self.parameters())
        if outside and saved == trains + len(outside):
            for param in outside:
                param.requires_grad = True
            warnings.warn(f"vision_tl: this checkpoint trained {len(outside)} parameter(s) of the backbone that belong "
                          "to no stage (a ViT's cls_token and pos_embed; vision_tl now freezes them with the stem in "
                          f"partial mode); they keep training in this resumed run ({self._trainable_line()})",
                          stacklevel=2)
        elif saved != trains and len(groups) <= 2:  # (more groups: GradualUnfreezing's, restored by name)
            self._train_the_checkpoints_stages(saved, trains)

    def _train_the_checkpoints_stages(self, saved: int, trains: int) -> None:
        """A ``partial`` checkpoint from before the layers timm's group matcher leaves out (a
        final norm, a head convolution) joined the last stage: there they were a stage of their
        own, so ``trainable_stages=N`` trained one real stage fewer than it does now, and the
        optimizer state fits none of this run's parameters. Train the stages the checkpoint
        trained (its optimizer state fits them), or say what happened (not an optimizer error)."""
        from vision_tl.tasks.checkpoint import CheckpointError

        hp = self.hparams
        stages = backbone_stages(self.net.backbone)
        head = sum(p.requires_grad for p in self.net.head.parameters())
        fits = [n for n in range(1, len(stages) + 1)  # (a stage may list a module and its children)
                if head + len({id(p) for stage in stages[-n:] for m in stage for p in m.parameters()}) == saved]
        source = getattr(self._trainer, "ckpt_path", None) if self._trainer else None
        what = (f"checkpoint {source or ''} trained {saved} parameter tensors in partial mode with trainable_stages="
                f"{hp.trainable_stages}, but this version of vision_tl trains {trains} with that setting: it counts the "
                f"stages of {hp.backbone} differently (layers timm's group matcher leaves out, such as a final norm or "
                "head convolution, now belong to the last stage instead of forming a stage of their own)")
        if not fits:
            raise CheckpointError(f"{what}; no number of stages trains what the checkpoint trained, so it cannot "
                                  "resume: start a new run (without --ckpt_path), e.g. from its weights with "
                                  "--model.weights CHECKPOINT")
        apply_mode(self.net, "partial", fits[0], bool(hp.get("freeze_bn")))
        warnings.warn(f"vision_tl: {what}; this resumed run trains the last {fits[0]} stage(s), as the checkpoint "
                      f"did ({self._trainable_line()}; a new run would give --model.trainable_stages {fits[0]} for the "
                      "same)", stacklevel=2)

    def _trainable_line(self) -> str:
        """``"1,234 of 5,678 parameters train"``: setup prints it before a resumed checkpoint can
        change what trains, so a change says it again."""
        trainable, total = count_trainable(self.net)
        return f"{trainable:,} of {total:,} parameters train"

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Arguments given from Python as a Path or a numpy number (root=Path(...), lr=np.float32(...))
        # would make the checkpoint one that weights_only=True refuses to load: stored as plain types.
        for key in ("hyper_parameters", "datamodule_hyper_parameters"):
            if isinstance(checkpoint.get(key), dict):
                checkpoint[key] = {name: _plain(value) for name, value in checkpoint[key].items()}
        # Everything export and deployment need, in plain types (loadable with weights_only=True).
        checkpoint["vision_tl"] = {
            "kit_version": __version__,
            "classes": self.classes,
            "backbone": self.hparams.backbone,
            "weights": weights_identity(self.net.backbone),
            "preprocessing": self.preprocessing.to_dict(),
            "good_class": self.hparams.good_class,
            "threshold": getattr(self, "threshold", None),
            "threshold_target": self.hparams.get("threshold_target"),
            "metrics": {k: {m: v for m, v in r.items() if not isinstance(v, (list, dict))}
                        for k, r in self.eval_results.items()},
        }
