"""BatchNorm folded into the convolution before it, for a backbone that only runs inference.

In eval mode a BatchNorm is a fixed per-channel scale and shift. Where it follows a
convolution, the scale and shift fit into the convolution's weight and bias: the same outputs
(to float rounding), one layer less to run. EfficientNet-Lite0 has 49 of them; channels-last
on 2 CPU cores, its forward runs 1.4x faster without them (oneDNN fuses the bias into the
convolution; ``benchmarks/cpu_layout.py``), and a GPU queues 49 BatchNorm kernels fewer per batch.

The folded network is a copy kept outside the module tree, so checkpoints, ONNX exports and
the weights' digests see the model as trained. :class:`FoldedInference` rebuilds the copy when
the source's weights change, and every fold is checked against the source on the batch that
triggered it: an architecture where the traced pairing does not hold keeps running unfolded.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from vision_tl.utils import no_cudnn_benchmark

log = logging.getLogger(__name__)

# a fold changes only rounding: outputs within this share of their largest magnitude
TOLERANCE = 1e-3


def _conv_types() -> tuple[type, ...]:
    from timm.layers import Conv2dSame

    return nn.Conv2d, Conv2dSame  # exact types: ScaledStdConv2d & co. rewrite their weight per call


def _norm_types() -> tuple[type, ...]:
    from timm.layers import BatchNormAct2d, FrozenBatchNormAct2d
    from torchvision.ops.misc import FrozenBatchNorm2d

    return nn.BatchNorm2d, BatchNormAct2d, FrozenBatchNorm2d, FrozenBatchNormAct2d


def _traced_pairs(model: nn.Module, example: torch.Tensor) -> list[tuple[str, str]]:
    """``(conv name, norm name)`` for every norm whose input, in one forward of ``example``, is
    the very tensor a convolution returned. Modules reached under two names or called twice
    are left out: folding them would change their other use; so is a convolution whose output
    another module reads too (MaxViT's stem feeds a block's pre-norm and its shortcut)."""
    names = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    convs, norms = _conv_types(), _norm_types()
    produced: dict[int, str] = {}
    keep: list[torch.Tensor] = []  # holds every traced output, so no id is reused mid-trace
    calls: Counter[str] = Counter()
    pairs: list[tuple[str, str]] = []
    read: dict[tuple[str, str], int] = {}  # a pair -> the id of the conv output its norm read

    def on_conv(name):
        def hook(_module, _args, out):
            calls[name] += 1
            keep.append(out)
            produced[id(out)] = name
        return hook

    def on_norm(name):
        def hook(_module, args):
            calls[name] += 1
            if args and id(args[0]) in produced:
                pairs.append((produced[id(args[0])], name))
                read[pairs[-1]] = id(args[0])
        return hook

    readers: dict[int, list[str]] = {}  # a traced output's id -> every module called with it

    def on_any(name):
        def hook(_module, args):
            for arg in args:
                if id(arg) in produced:
                    readers.setdefault(id(arg), []).append(name)
        return hook

    handles = []
    try:
        for name, module in model.named_modules():
            if type(module) in convs:
                handles.append(module.register_forward_hook(on_conv(name)))
            elif type(module) in norms:
                handles.append(module.register_forward_pre_hook(on_norm(name)))
            if name:
                handles.append(module.register_forward_pre_hook(on_any(name)))
        model(example)
    finally:
        for handle in handles:
            handle.remove()
    # the norm and the blocks that contain it receive the conv's output as the norm does (the
    # very output it read: a convolution called twice has another, maybe read by no module)
    shared = {n for c, n in pairs
              if any(r != n and not n.startswith(r + ".") for r in readers.get(read[c, n], ()))}
    return [(c, n) for c, n in pairs
            if calls[c] == 1 and calls[n] == 1 and n not in shared
            and names[id(model.get_submodule(c))] == 1 and names[id(model.get_submodule(n))] == 1
            # without running statistics a norm normalises with each batch's own, also in eval mode
            and getattr(model.get_submodule(n), "running_mean", None) is not None
            and getattr(model.get_submodule(n), "running_var", None) is not None]


def _after_norm(norm: nn.Module) -> nn.Module:
    """What the norm does after normalising: timm's norm-act layers drop and activate."""
    parts = [m for m in (getattr(norm, "drop", None), getattr(norm, "act", None))
             if isinstance(m, nn.Module) and not isinstance(m, nn.Identity)]
    return parts[0] if len(parts) == 1 else nn.Sequential(*parts) if parts else nn.Identity()


def _fold_pair(conv: nn.Conv2d, norm: nn.Module) -> None:
    """Scale the convolution's output channels and shift them as ``norm`` (eval mode) does."""
    mean, var = norm.running_mean.float(), norm.running_var.float()
    weight = norm.weight.float() if norm.weight is not None else torch.ones_like(mean)
    bias = norm.bias.float() if norm.bias is not None else torch.zeros_like(mean)
    scale = weight * torch.rsqrt(var + norm.eps)
    old_bias = conv.bias.float() if conv.bias is not None else torch.zeros_like(mean)
    conv.weight.copy_(conv.weight.float() * scale.reshape(-1, *[1] * (conv.weight.ndim - 1)))
    conv.bias = nn.Parameter(((old_bias - mean) * scale + bias).to(conv.weight.dtype), requires_grad=False)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


@contextlib.contextmanager
def swapped_in(root: nn.Module, modules: dict[str, nn.Module]) -> Iterator[None]:
    """``root``'s submodules of these names replaced by the given ones (a folded copy's frozen
    stages), put back on the way out, also after an error."""
    originals = {name: root.get_submodule(name) for name in modules}
    try:
        for name, module in modules.items():
            _set_submodule(root, name, module)
        yield
    finally:
        for name, module in originals.items():
            _set_submodule(root, name, module)


def _agree(expected, got) -> bool:
    if isinstance(expected, (tuple, list)):
        return (isinstance(got, (tuple, list)) and len(got) == len(expected)
                and all(_agree(e, g) for e, g in zip(expected, got)))
    if not (isinstance(expected, torch.Tensor) and isinstance(got, torch.Tensor)) or expected.shape != got.shape:
        return False
    expected, got = expected.float(), got.float()
    if not expected.numel():
        return True
    scale = max(float(expected.abs().max()), 1e-6)
    return bool(torch.isfinite(got).all()) and float((expected - got).abs().max()) <= TOLERANCE * scale


@contextlib.contextmanager
def _no_tf32() -> Iterator[None]:
    """Full fp32 on a GPU for the check: TF32 convolutions round at 1e-3, the check's own scale."""
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


def _call(module: nn.Module, x: torch.Tensor):
    return module(x)


def _has_hooks(modules) -> bool:
    return any(m._forward_hooks or m._forward_pre_hooks for m in modules)


def has_forward_hooks(module: nn.Module) -> bool:
    """Whether ``module`` or a submodule has a forward (pre-)hook: a copy or a recorded graph
    of it would not run them."""
    return _has_hooks(module.modules())


def _under(name: str, prefixes: Sequence[str]) -> bool:
    return any(name == p or name.startswith(p + ".") or not p for p in prefixes)


def fold_batchnorm(model: nn.Module, example: torch.Tensor,
                   run: Callable[[nn.Module, torch.Tensor], Any] = _call,
                   within: Sequence[str] | None = None) -> nn.Module | None:
    """An eval-mode copy of ``model`` with each BatchNorm that directly follows a convolution
    folded into it, or ``None`` where there is nothing to fold or the copy disagrees with
    ``model`` on ``example`` (a small batch of the inputs it will see).

    ``run(module, x)`` is the call to check, with tensors or tuples of them as its result: the
    plain forward by default; the feature extractor checks its own, which may read
    intermediate stages (GhostNet's stage 0 is the stem convolution *before* its BatchNorm).
    ``within`` (submodule names) folds only pairs inside those submodules, e.g. a partly
    trained backbone's frozen stages. A model with forward hooks is not folded: a copy would
    call them on other batches, or keep calling one removed later. ``model`` is left as it
    was (weights, train/eval flags).
    The copy's parameters do not require gradients: it serves inference only.
    """
    if _has_hooks(model.modules()):
        return None
    example = example.detach().float()
    with (torch.inference_mode(False), torch.no_grad(), torch.autocast(example.device.type, enabled=False),
          no_cudnn_benchmark(), _no_tf32()):
        example = example.clone()  # a normal tensor, also when handed in from inference mode
        folded = copy.deepcopy(model).eval()
        for p in folded.parameters():
            p.requires_grad_(False)
        flags = [(m, m.training) for m in model.modules()]
        try:
            pairs = [(c, n) for c, n in _traced_pairs(folded, example)
                     if within is None or (_under(c, within) and _under(n, within))]
            if not pairs:
                return None
            for conv_name, norm_name in pairs:
                norm = folded.get_submodule(norm_name)
                _fold_pair(folded.get_submodule(conv_name), norm)
                _set_submodule(folded, norm_name, _after_norm(norm))
            model.eval()
            expected = run(model, example)
            got = run(folded, example)
        except Exception as err:  # noqa: BLE001 - the caller's own forward then raises it, unfolded
            log.info("BatchNorm folding of %s failed (%s); running it unfolded", type(model).__name__, err)
            return None
        finally:
            for module, training in flags:
                module.training = training
    if not _agree(expected, got):
        log.info("BatchNorm folding of %s disagrees with the model; running it unfolded", type(model).__name__)
        return None
    return folded


class FoldedInference:
    """Runs ``source`` for inference through its BatchNorm-folded copy (:func:`fold_batchnorm`).

    The copy is rebuilt whenever a parameter or buffer of ``source`` is changed in place
    (an optimiser step, ``load_state_dict``), replaced, moved to another device or memory
    format, or when a submodule or forward hook is added or removed; a source with forward
    hooks runs as it is. Writes through ``.data`` (Lightning's weight averaging swaps weights
    so) move no version counter: callers :meth:`invalidate` at the start of each pass.
    Callers put ``source`` in eval mode and run the copy without gradients; the copy is
    always in eval mode.

    Args:
        source: the backbone.
        run: the call to check the copy with (see :func:`fold_batchnorm`).
        within: fold only inside these submodules (see :func:`fold_batchnorm`); the copy then
            follows their weights only, and callers use its submodules of those names.

    Example:
        >>> run = FoldedInference(backbone)
        >>> with torch.no_grad():
        ...     features = run.model_for(batch)(batch)  # same as backbone.eval()(batch), to float rounding
    """

    def __init__(self, source: nn.Module, run: Callable[[nn.Module, torch.Tensor], Any] = _call,
                 within: Sequence[str] | None = None) -> None:
        self.source = source
        self.run = run
        self.within = None if within is None else tuple(within)
        self._modules: list[nn.Module] = []
        self._key: tuple | None = None
        self._trains = False  # a watched parameter required gradients at the last change
        self._hooked = False  # a watched module had forward hooks at the last change
        self._built = False
        self._folded: nn.Module | None = None
        self.version = 0  # counts the changes seen to the watched weights or hooks (or invalidations)

    def _state_key(self) -> tuple:
        # Read from the module list kept since the last build (walking the tree again costs
        # 0.4 ms per call on Lite0, this 0.1 ms); a submodule swapped in changes the child ids.
        tensors = tuple((id(t), t.data_ptr(), t._version, t.dtype, t.requires_grad) if isinstance(t, torch.Tensor)
                        else id(t)
                        for module in self._modules
                        for table in (module._parameters, module._buffers, module._modules)
                        for t in table.values())
        hooks = tuple(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in self._modules)
        # a submodule of these names swapped in by its parent (outside the watched modules)
        named = () if self.within is None else tuple(id(self.source.get_submodule(n)) for n in self.within)
        return tensors, hooks, named

    def _watched(self) -> list[nn.Module]:
        """``source``'s modules, or those inside ``within``."""
        return (list(self.source.modules()) if self.within is None else
                [m for name in self.within for m in self.source.get_submodule(name).modules()])

    def invalidate(self) -> None:
        """Build the copy again on the next call (after weights were written through ``.data``)."""
        self._key = None

    @property
    def trains(self) -> bool:
        """Whether a watched parameter required gradients at the last :meth:`model_for`."""
        return self._trains

    @property
    def hooked(self) -> bool:
        """Whether a watched module had forward hooks at the last :meth:`model_for`."""
        return self._hooked

    def model_for(self, x, trainable_ok: bool = True, fold: bool = True) -> nn.Module:
        """The module to run on ``x`` (a batch, or a callable returning one, called only when
        a copy is built): the folded copy, or ``source`` itself where nothing folds
        or, with ``trainable_ok=False`` (a forward with gradients), where a watched parameter
        requires gradients: that backbone trains, and no copy is built for it. ``fold=False``
        only checks the weights (:attr:`version`, :attr:`trains`, :attr:`hooked`) and returns ``source``."""
        key = self._state_key() if self._modules and self._key is not None else None
        if key is None or key != self._key:
            self._modules = self._watched()
            self._key = self._state_key()
            self._trains = any(p is not None and p.requires_grad for m in self._modules for p in m._parameters.values())
            self._hooked = _has_hooks(self._modules)
            self._folded, self._built = None, False
            self.version += 1
        if (self._trains and not trainable_ok) or not fold:
            return self.source
        if not self._built:
            sample = (x() if callable(x) else x)[:2]
            self._folded, self._built = fold_batchnorm(self.source, sample, self.run, self.within), True
        return self.source if self._folded is None else self._folded
