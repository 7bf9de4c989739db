"""TensorFlow-style "same" padding, made static for the export's fixed input size.

Some timm layers pad by an amount worked out from the input size at run time: ``Conv2dSame``
(the ``tf_*`` EfficientNets and MobileNets, Lite0, the default backbone, among them; TF MaxViT,
NASNet, PNASNet), ``StdConv2dSame`` (the ViT-ResNet hybrids ``vit_*_r*``),
``ScaledStdConv2dSame`` (``dm_nfnet_*``), ``MaxPool2dSame`` (the hybrids' stem, NesT's ``*_jx``,
NASNet, PNASNet) and ``AvgPool2dSame`` (TF MaxViT, NASNet; ResNets with average-pool shortcuts
and an ``output_stride``). Traced, that is a chain of Shape / Gather / Div / Ceil / Clip nodes
feeding a Pad before the layer. The exported graph has one input size, so the pads are known at export time:

- :func:`static_same_padding` pads with those numbers while the graph is traced (-inf before
  a max pool, zeros elsewhere, as timm does), so the graph holds a Pad with constant pads and
  no size arithmetic;
- :func:`fold_pads` then moves each such Pad into the node after it where that node's own
  padding computes the same: zeros into a Conv or an AveragePool (ONNX takes separate begin
  and end pads, which PyTorch's layers do not), -inf into a MaxPool.

Same arithmetic, fewer nodes: on 2 CPU cores Lite0's five Pads and their arithmetic took 12 %
of the fp32 model's onnxruntime time and, with the float islands they force around them,
about half of the INT8 model's; ``dm_nfnet_f0``'s INT8 copy runs 7-14 % faster without them,
its fp32 model (all convolution time) about the same (``benchmarks/RESULTS.md``).
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from torch import nn


def _padded_body(module: nn.Module) -> tuple[float, Callable[[torch.Tensor], torch.Tensor]] | None:
    """For a timm layer that pads its input TF-"same" by amounts it works out from the input's size
    on every call: the value it pads with, and what it computes on the padded input (timm's own
    code after its ``pad_same``, the same numbers); ``None`` for any other module."""
    from timm.layers import AvgPool2dSame, Conv2dSame
    from timm.layers.pool2d_same import MaxPool2dSame

    m = module
    if isinstance(m, Conv2dSame):
        return 0.0, lambda x: F.conv2d(x, m.weight, m.bias, m.stride, 0, m.dilation, m.groups)
    if isinstance(m, MaxPool2dSame):  # (-inf: a pad never wins the max)
        return -math.inf, lambda x: F.max_pool2d(x, m.kernel_size, m.stride, (0, 0), m.dilation, m.ceil_mode)
    if isinstance(m, AvgPool2dSame):  # (zeros, counted by the average whatever count_include_pad says)
        return 0.0, lambda x: F.avg_pool2d(x, m.kernel_size, m.stride, m.padding, m.ceil_mode, m.count_include_pad)
    flag = _dynamic_flag(m)
    if flag and getattr(m, flag):  # (called with that flag off: it also standardises the weight)
        return 0.0, functools.partial(type(m).forward, m)
    return None


def _dynamic_flag(module: nn.Module) -> str | None:
    """The attribute that switches on the run-time "same" padding of timm's layers that have one:
    they pad so only where a fixed amount would not do (a stride, an even kernel). (timm's
    ``CondConv2d`` has one too, but the TorchScript exporter cannot write its per-image kernels.)"""
    from timm.layers import ScaledStdConv2dSame, StdConv2dSame

    return "same_pad" if isinstance(module, (StdConv2dSame, ScaledStdConv2dSame)) else None


def _padded_forward(body: Callable[..., torch.Tensor], pads: list[int], value: float,
                    x: torch.Tensor, *args: torch.Tensor) -> torch.Tensor:
    return body(F.pad(x, pads, value=value), *args)


@contextlib.contextmanager
def static_same_padding(model: nn.Module, example: torch.Tensor) -> Iterator[int]:
    """Within the block, every timm layer in ``model`` that works out TF-style "same" pads from its
    input's size (``Conv2dSame``, ``StdConv2dSame``, ``ScaledStdConv2dSame``, ``MaxPool2dSame``,
    ``AvgPool2dSame``) pads by the constant amount it pads ``example``'s size
    with (found by running ``model`` on its first image), with the value timm pads with (-inf
    before a max pool, zeros elsewhere), so a trace at that size records constant pads. Yields how
    many layers that changed; the model is as before afterwards. Only valid for inputs of
    ``example``'s size (what an export with a fixed input size takes)."""
    from timm.layers import to_2tuple
    from timm.layers.padding import pad_same_arg

    layers = {m: padding for m in model.modules() if (padding := _padded_body(m)) is not None}
    sizes: dict[nn.Module, set[tuple[int, int]]] = {}

    def remember(module: nn.Module, args: tuple) -> None:
        sizes.setdefault(module, set()).add((int(args[0].shape[-2]), int(args[0].shape[-1])))

    hooks = [m.register_forward_pre_hook(remember) for m in layers]
    modes = {m: m.training for m in model.modules()}
    try:
        with torch.no_grad():  # (in eval mode, as the export traces: a model in training mode would
            model.eval()(example[:1])  # update its batch-norm statistics with this image's)
    finally:
        for hook in hooks:
            hook.remove()
        for m, training in modes.items():
            m.training = training
    # (a layer the forward skips, or one it calls at two sizes, keeps computing its pads)
    changed = [m for m in layers if len(sizes.get(m, ())) == 1]
    for m in changed:
        value, body = layers[m]
        dilation = getattr(m, "dilation", (1, 1))  # (timm's AvgPool2dSame pads as if undilated: it has none)
        pads = pad_same_arg(next(iter(sizes[m])), to_2tuple(m.kernel_size), to_2tuple(m.stride), to_2tuple(dilation))
        m.forward = functools.partial(_padded_forward, body, [int(p) for p in pads], value)
        if flag := _dynamic_flag(m):
            setattr(m, flag, False)
    try:
        yield len(changed)
    finally:
        for m in changed:
            del m.forward
            if flag := _dynamic_flag(m):
                setattr(m, flag, True)


def fold_pads(model: onnx.ModelProto) -> int:
    """Remove each constant-mode ``Pad`` of only the spatial axes whose pads and value are constants
    (or computed from constants only, as the TorchScript exporter writes ``F.pad``'s) and whose one
    consumer pads its data input itself the same way, adding its pads to that node's: a ``Conv``
    after zeros, an ``AveragePool`` after zeros (made to count its pads), a ``MaxPool`` after -inf
    (see :func:`_takes_pads`). Returns how many were folded; the graph computes the same values."""
    graph = model.graph
    constant = _Constants(graph)
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in [*node.input, *_subgraph_names(node)]:  # (an If's branch reads a Pad's output too)
            consumers.setdefault(name, []).append(node)
    graph_outputs = {o.name for o in graph.output}
    folded = []
    for pad in graph.node:
        if pad.op_type != "Pad" or pad.output[0] in graph_outputs:
            continue
        users = consumers.get(pad.output[0], [])
        # (the data input only: a padded weight or bias is not a padded image)
        if len(users) != 1 or list(users[0].input).count(pad.output[0]) != 1 or users[0].input[0] != pad.output[0]:
            continue
        node = users[0]
        inputs = list(pad.input) + [""] * (4 - len(pad.input))
        if _attributes(pad).get("mode", b"constant") != b"constant" or inputs[3]:  # (no `axes` input)
            continue
        pads, value = constant(inputs[1]), constant(inputs[2]) if inputs[2] else np.zeros(1)
        if pads is None or value is None or value.size != 1:
            continue
        pads = pads.astype(np.int64).ravel().tolist()
        rank = len(pads) // 2
        begin, end = pads[:rank], pads[rank:]
        if rank < 3 or any(begin[:2]) or any(end[:2]) or min(pads) < 0:
            continue
        spatial = rank - 2
        old = list(_attributes(node).get("pads", [0] * (2 * spatial)))
        new = [old[i] + begin[2 + i] for i in range(spatial)] + [old[spatial + i] + end[2 + i] for i in range(spatial)]
        settings = _takes_pads(node, float(value.ravel()[0]), new)
        if settings is None:
            continue
        kept = [a for a in node.attribute if a.name not in ("pads", *settings)]
        del node.attribute[:]
        node.attribute.extend(kept)
        for name, setting in {"pads": new, **settings}.items():
            node.attribute.append(onnx.helper.make_attribute(name, setting))
        node.input[0] = pad.input[0]
        folded.append(pad)
    for pad in folded:
        graph.node.remove(pad)
    _drop_unused(graph)
    return len(folded)


def _takes_pads(node: onnx.NodeProto, value: float, pads: list[int]) -> dict[str, int] | None:
    """The attributes, besides ``pads``, that make ``node`` compute on its unpadded input, padded
    with its own ``pads``, what it computed on the input a ``Pad`` of ``value`` padded; ``None``
    where it cannot. A ``Conv`` pads with zeros. An ``AveragePool`` pads with zeros and counts them
    with ``count_include_pad`` (set here; its own pads, if any, must be counted already); where
    ``ceil_mode`` adds a window that runs off the padded input (a stride over 1) it would divide
    that one by fewer. ONNX's ``MaxPool`` leaves its pads out of the max, which is a -inf pad where
    every window holds an input element: no dilation or ``ceil_mode`` stride, and each side's pad
    narrower than the window."""
    attrs = _attributes(node)
    if attrs.get("auto_pad", b"NOTSET") != b"NOTSET":
        return None
    if node.op_type == "Conv":
        return {} if value == 0 else None
    if node.op_type not in ("AveragePool", "MaxPool") or len(node.output) != 1 \
            or any(d != 1 for d in attrs.get("dilations", [])) \
            or (attrs.get("ceil_mode", 0) and any(s != 1 for s in attrs.get("strides", []))):
        return None
    if node.op_type == "AveragePool":
        counted = attrs.get("count_include_pad", 0) or not any(attrs.get("pads", []))
        return {"count_include_pad": 1} if value == 0 and counted else None
    kernel = list(attrs["kernel_shape"]) * 2
    return {} if value == -math.inf and all(p < k for p, k in zip(pads, kernel, strict=True)) else None


def _attributes(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


class _Constants:
    """The value of a tensor of ``graph`` that is an initializer, a ``Constant`` or computed from
    those alone (evaluated with onnx's reference runtime); ``None`` for anything that depends on
    a graph input."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self._values: dict[str, np.ndarray | None] = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        self._producer = {name: node for node in graph.node for name in node.output}
        # what depends on a graph input, found in one pass over the (topologically sorted) nodes: asked
        # for pads computed from a Shape, the evaluation would otherwise recurse up the whole network
        # (past Python's recursion limit in a deep one, dm_nfnet_f1's)
        variable = {i.name for i in graph.input} - set(self._values)
        for node in graph.node:
            if any(name in variable for name in node.input):
                variable.update(node.output)
        self._values.update(dict.fromkeys(variable))

    def __call__(self, name: str) -> np.ndarray | None:
        if name not in self._values:
            self._values[name] = self._evaluate(name)
        return self._values[name]

    def _evaluate(self, name: str) -> np.ndarray | None:
        node = self._producer.get(name)
        if node is None or node.op_type in ("If", "Loop", "Scan") or node.domain not in ("", "ai.onnx"):
            return None
        inputs = {i: self(i) for i in node.input if i}
        if any(v is None for v in inputs.values()):
            return None
        from onnx.reference import ReferenceEvaluator

        results = ReferenceEvaluator(node).run(None, inputs)
        for output, value in zip(node.output, results, strict=False):
            self._values[output] = np.asarray(value)
        return self._values.get(name)


def _drop_unused(graph: onnx.GraphProto) -> None:
    """Remove the nodes and initializers nothing reads any more (what computed the folded Pads'
    pads), until none is left."""
    while True:
        used = ({name for node in graph.node for name in [*node.input, *_subgraph_names(node)]}
                | {o.name for o in graph.output}
                | {i.name for i in graph.input})  # (an initializer listed as an input is a default value)
        dead = [n for n in graph.node if not any(o in used for o in n.output)]
        for node in dead:
            graph.node.remove(node)
        if not dead:
            break
    for tensor in [t for t in graph.initializer if t.name not in used]:
        graph.initializer.remove(tensor)


def _subgraph_names(node: onnx.NodeProto) -> set[str]:
    """The names the subgraphs of ``node`` (an ``If``'s branches, a ``Loop``'s body ...) read, at any
    depth: they read the outer graph's tensors by name, not through the node's inputs."""
    names: set[str] = set()
    for attr in node.attribute:
        for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else
                    attr.graphs if attr.type == onnx.AttributeProto.GRAPHS else []):
            names.update(o.name for o in sub.output)
            for inner in sub.node:
                names.update(name for name in inner.input if name)
                names.update(_subgraph_names(inner))
    return names
