"""A frozen backbone's forward replayed as a CUDA graph.

On a GPU, a backbone that only infers (``frozen`` mode, validation, prediction) is cheap
enough that the CPU queueing its kernels becomes the limit: Lite0 is about a hundred kernels
per batch, each costing the CPU several microseconds through PyTorch's dispatcher and
autocast, against about 13 ms of GPU work for a batch of 256 on an H100. A CUDA graph
records those kernels once per input shape and replays them with a single launch.

A graph reads its weights and input from fixed addresses: weights updated in place replay
as they are, weights replaced by other tensors need a new recording. :class:`GraphedInference`
therefore records one graph per (module, input shape, strides, dtype, autocast state), keeps
the recorded weights' storage alive, and looks at the weights' addresses and the module's
forward hooks again whenever the caller's ``version`` of them moves (on every call without
one; :class:`~vision_tl.backbones.FoldedInference`'s moves with both). Anything it cannot
record runs eagerly, as before. :class:`GraphedChain` does the same for the frozen stages that
run first in a backbone that partly trains (``partial`` mode).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any

import torch
from torch import nn

from vision_tl.backbones._fold import has_forward_hooks

log = logging.getLogger(__name__)

# input shapes recorded per runner: a training batch, its smaller last batch and the same
# two for validation; one more shape replaces the least recently used graph
MAX_GRAPHS = 4
WARMUP_RUNS = 2  # before recording: cuDNN picks its algorithms, lazy state initialises


class _Graph:
    def __init__(self, graph: torch.cuda.CUDAGraph, static_in: torch.Tensor, static_out: Any,
                 keep: list) -> None:
        self.graph, self.static_in, self.static_out, self.keep = graph, static_in, static_out, keep


class GraphedInference:
    """Runs ``module(x)`` on CUDA tensors through a recorded CUDA graph, without gradients.

    Callers run it under ``torch.no_grad()`` with ``module`` in eval mode and its weights not
    being trained (the graph replays the kernels, it records no autograd graph). Outputs are
    fresh tensors, not the graph's buffers. Modules with forward hooks, CPU tensors and
    inputs that need gradients run eagerly.

    Args:
        max_graphs: graphs kept (one per input shape); one more replaces the least recently used.
        record_after: calls of a new shape that run eagerly before the next one records it
            (0: record on the first call, as a fit wants, whose shapes come back every epoch).

    Example:
        >>> graphs = GraphedInference()
        >>> with torch.no_grad():
        ...     features = graphs(backbone.eval(), batch_on_gpu)
    """

    def __init__(self, max_graphs: int = MAX_GRAPHS, record_after: int = 0) -> None:
        self.max_graphs = max_graphs
        # eager calls of a shape before it is recorded: recording costs about three forward
        # passes and a device-wide wait, which a shape seen once (an extraction's last, smaller
        # batch) would never earn back
        self.record_after = record_after
        self._seen: dict[tuple, int] = {}  # eager calls so far of shapes not recorded yet
        self._graphs: OrderedDict[tuple, _Graph | None] = OrderedDict()  # None: could not be recorded
        self._pool = None
        # one capture stream per GPU: the allocator reuses a pool's free blocks only for the
        # stream they were allocated on (torch.cuda.graph: "pass the same stream argument")
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self._module: nn.Module | None = None
        self._version: Any = None
        self._addresses: tuple = ()
        self._hooked = False

    # a copy (Lightning's weight averaging deep-copies the model) or a pickle starts without graphs
    def __deepcopy__(self, memo: dict) -> GraphedInference:
        return GraphedInference(self.max_graphs, self.record_after)

    def __getstate__(self) -> dict:
        return {"max_graphs": self.max_graphs, "record_after": self.record_after}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["max_graphs"], state.get("record_after", 0))

    def clear(self) -> None:
        """Drop every recorded graph (and with them their memory)."""
        self._graphs.clear()
        self._seen.clear()
        self._pool = None
        self._streams.clear()

    def __call__(self, module: nn.Module, x: torch.Tensor, version: Any = None) -> Any:
        if not x.is_cuda or torch.is_grad_enabled() or module.training or torch.cuda.is_current_stream_capturing():
            return module(x)
        if module is not self._module or version is None or version != self._version:
            # weights changed in place replay as they are; weights at other addresses record again
            addresses = _addresses(module)
            if module is not self._module or addresses != self._addresses:
                self.clear()
                self._module, self._addresses = module, addresses
            self._version, self._hooked = version, has_forward_hooks(module)
        if self._hooked:  # a graph would not call them
            return module(x)
        key = (tuple(x.shape), x.stride(), x.dtype, x.device, _autocast_state())
        if key in self._graphs:
            self._graphs.move_to_end(key)
        elif self._seen.get(key, 0) < self.record_after:
            if len(self._seen) >= 16 * self.max_graphs:  # many one-off shapes: forget them
                self._seen.clear()
            self._seen[key] = self._seen.get(key, 0) + 1
            return module(x)
        else:
            self._seen.pop(key, None)
            while len(self._graphs) >= self.max_graphs:
                self._graphs.popitem(last=False)
            self._graphs[key] = self._record(module, x)
        entry = self._graphs[key]
        if entry is None:
            return module(x)
        with torch.cuda.device(x.device):  # x's GPU, whichever is current
            entry.static_in.copy_(x)
            entry.graph.replay()
            return _clone(entry.static_out)

    def _record(self, module: nn.Module, x: torch.Tensor) -> _Graph | None:
        # Outside inference mode: a graph recorded during validation (which Lightning runs in
        # inference mode) replays in training steps, where inference tensors cannot be written.
        # On x's GPU and its current stream, restored whatever the recording does.
        with (torch.inference_mode(False), torch.no_grad(), torch.cuda.device(x.device),
              torch.cuda.stream(torch.cuda.current_stream(x.device))):
            return self._record_here(module, x)

    def _record_here(self, module: nn.Module, x: torch.Tensor) -> _Graph | None:
        enabled, dtype = _autocast_state()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        try:
            # x's strides where they are dense; an expanded (stride 0) input gets a dense buffer
            static_in = torch.empty_like(x, memory_format=torch.preserve_format)
            static_in.copy_(x)
            # autocast keeps no cast-weight cache inside a recording (torch.cuda.graph's rule)
            with torch.autocast("cuda", dtype=dtype, enabled=enabled, cache_enabled=False):
                side = torch.cuda.Stream(x.device)
                side.wait_stream(torch.cuda.current_stream(x.device))
                with torch.cuda.stream(side):
                    for _ in range(WARMUP_RUNS):
                        module(static_in)
                torch.cuda.current_stream(x.device).wait_stream(side)
                # a stream of x's GPU (the default capture stream belongs to whichever GPU was
                # current first); thread_local: loader and pin-memory threads keep using CUDA
                if x.device not in self._streams:
                    self._streams[x.device] = torch.cuda.Stream(x.device)
                stream = self._streams[x.device]
                with torch.cuda.graph(graph, pool=self._pool, stream=stream, capture_error_mode="thread_local"):
                    static_out = module(static_in)
        except Exception as error:  # an operation that cannot be recorded: this shape runs eagerly
            log.warning("vision_tl: the backbone could not be recorded as a CUDA graph (%s: %s); it runs "
                        "eagerly for inputs of shape %s", type(error).__name__, error, tuple(x.shape))
            return None
        # keep the weights' storage alive: the graph reads it by address
        keep = [t.untyped_storage() for t in (*module.parameters(), *module.buffers())]
        return _Graph(graph, static_in, static_out, keep)


def _addresses(module: nn.Module) -> tuple:
    return tuple(t.data_ptr() for t in (*module.parameters(), *module.buffers()))


def _autocast_state() -> tuple[bool, torch.dtype]:
    return torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")


def _clone(out: Any) -> Any:
    if isinstance(out, torch.Tensor):
        return out.clone()
    if isinstance(out, (list, tuple)):
        return type(out)(_clone(o) for o in out)
    if isinstance(out, dict):
        return {k: _clone(v) for k, v in out.items()}
    return out


class GraphedChain(nn.Module):
    """Modules that run one after another, each on the previous one's output (a backbone's
    frozen stem and first stages), run as one module: without gradients, and on a GPU replayed
    as one CUDA graph per input shape (:class:`GraphedInference`, recorded on a shape's second
    call). Swapped into a model in place of the first module, with :class:`torch.nn.Identity`
    in place of the others, it runs the whole chain where the first one ran.

    Its modules must not train (no parameter that needs a gradient, eval mode); where one would
    act as in training (a module with parameters or buffers of its own, such as a BatchNorm that
    would update its statistics, or a dropout that draws) is in train mode, the chain runs
    eagerly. Containers and stateless layers (activations, identities) keep the model's train
    flag in ``partial`` mode, which only freezes the layers that hold weights: their flag changes
    nothing. Set :attr:`version` to something that moves whenever their weights or hooks may
    have changed (see :class:`GraphedInference`).
    """

    def __init__(self, modules: list[nn.Module], record_after: int = 1) -> None:
        super().__init__()
        self.training = False  # this wrapper's own flag (eval() would switch the modules too)
        self.chain = nn.Sequential(*modules)
        self.chain.training = False
        self.graphs = GraphedInference(record_after=record_after)
        self.version: Any = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            if any(_acts_as_in_training(m) for m in self.chain.modules() if m is not self.chain):
                return self.chain(x)
            return self.graphs(self.chain, x, self.version)


def _acts_as_in_training(module: nn.Module) -> bool:
    """Whether ``module`` in its current mode computes other than in eval mode: in train mode
    with state of its own (BatchNorm updates its running statistics) or a dropout probability
    (``Dropout``, timm's ``DropPath``/``DropBlock``). A container or an activation in train mode
    computes as in eval mode."""
    if not module.training:
        return False
    if any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(recurse=False)):
        return True
    p = getattr(module, "p", None) if isinstance(module, nn.modules.dropout._DropoutNd) else None
    p = p if p is not None else getattr(module, "drop_prob", None)
    return bool(p)
