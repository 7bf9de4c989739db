"""TensorFlow-style "same" padding, made static for the export's fixed input size.

timm's ``tf_*`` models (Lite0, the default backbone, among them) pad each strided
convolution by an amount worked out from the input size at run time. Traced, that is a
chain of Shape / Gather / Div / Ceil / Clip nodes feeding a Pad before the convolution.
The exported graph has one input size, so the pads are known at export time:

- :func:`static_same_padding` pads with those numbers while the graph is traced, so the
  graph holds a Pad with constant pads and no size arithmetic;
- :func:`fold_pads_into_convs` then moves each such zero Pad into the Conv after it (ONNX
  ``Conv`` takes separate begin and end pads, which PyTorch's ``Conv2d`` does not).

Same arithmetic, fewer nodes: on 2 CPU cores the five Pads and their arithmetic took 12 %
of the fp32 model's onnxruntime time and, with the float islands they force around them,
about half of the INT8 model's (``benchmarks/RESULTS.md``).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from torch import nn


def _same_padded_types() -> tuple[type, ...]:
    from timm.layers import Conv2dSame

    return (Conv2dSame,)


def _padded_conv(conv: nn.Conv2d, pads: list[int], x: torch.Tensor) -> torch.Tensor:
    return F.conv2d(F.pad(x, pads), conv.weight, conv.bias, conv.stride, 0, conv.dilation, conv.groups)


@contextlib.contextmanager
def static_same_padding(model: nn.Module, example: torch.Tensor) -> Iterator[int]:
    """Within the block, every timm ``Conv2dSame`` in ``model`` pads by the constant amount it
    pads ``example``'s size with (found by running ``model`` on its first image), so a trace at
    that size records constant pads. Yields how many layers that changed; the model is as
    before afterwards. Only valid for inputs of ``example``'s size (what an export with a
    fixed input size takes)."""
    from timm.layers.padding import pad_same_arg

    layers = [m for m in model.modules() if isinstance(m, _same_padded_types())]
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
        pads = pad_same_arg(next(iter(sizes[m])), list(m.weight.shape[-2:]), list(m.stride), list(m.dilation))
        m.forward = functools.partial(_padded_conv, m, [int(p) for p in pads])
    try:
        yield len(changed)
    finally:
        for m in changed:
            del m.forward


def fold_pads_into_convs(model: onnx.ModelProto) -> int:
    """Remove each zero, constant-mode ``Pad`` of only the spatial axes whose pads are constants
    (or computed from constants only, as the TorchScript exporter writes ``F.pad``'s) and whose
    one consumer is a ``Conv`` (without ``auto_pad``), adding its pads to the Conv's. Returns
    how many were folded; the graph computes the same values."""
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
        # (the Conv's data input only: a padded weight or bias is not a padded image)
        if len(users) != 1 or users[0].op_type != "Conv" or list(users[0].input).count(pad.output[0]) != 1 \
                or users[0].input[0] != pad.output[0]:
            continue
        conv = users[0]
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in pad.attribute}
        conv_attrs = {a.name: onnx.helper.get_attribute_value(a) for a in conv.attribute}
        if attrs.get("mode", b"constant") != b"constant" or conv_attrs.get("auto_pad", b"NOTSET") != b"NOTSET":
            continue
        inputs = list(pad.input) + [""] * (4 - len(pad.input))
        pads, value = constant(inputs[1]), constant(inputs[2]) if inputs[2] else np.zeros(1)
        if pads is None or value is None or np.any(value != 0) or inputs[3]:  # (no `axes` input)
            continue
        pads = pads.astype(np.int64).ravel().tolist()
        rank = len(pads) // 2
        begin, end = pads[:rank], pads[rank:]
        if rank < 3 or any(begin[:2]) or any(end[:2]) or min(pads) < 0:
            continue
        spatial = rank - 2
        old = list(conv_attrs.get("pads", [0] * (2 * spatial)))
        new = [old[i] + begin[2 + i] for i in range(spatial)] + [old[spatial + i] + end[2 + i] for i in range(spatial)]
        kept = [a for a in conv.attribute if a.name != "pads"]
        del conv.attribute[:]
        conv.attribute.extend(kept)
        conv.attribute.append(onnx.helper.make_attribute("pads", new))
        conv.input[0] = pad.input[0]
        folded.append(pad)
    for pad in folded:
        graph.node.remove(pad)
    _drop_unused(graph)
    return len(folded)


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
