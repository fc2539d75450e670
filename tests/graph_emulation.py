"""CUDA-graph capture and replay, emulated on the CPU, so the tests can run cifarlab's captured paths here.

A CUDA graph records the kernels that a piece of code launches, without running them, and a replay launches the
same kernels on the same memory: a tensor's *contents* may change between replays, while every host-side value
(a Python float, a shape, a branch taken) stays what it was at the capture. This module does that one level up,
with ATen operations:

- :class:`graph` (``torch.cuda.graph``) runs the captured code once under a dispatch mode that records every
  operation with its tensor arguments and results, then puts every tensor that existed before the capture back
  as it was (and the random generator too): the capture has computed nothing, as on a GPU;
- :meth:`CUDAGraph.replay` runs the recorded operations again on the recorded tensors, writing each result
  into the tensor the capture produced (a fixed address) and mutating in place what the capture mutated.
  Python does not run: a float read by the captured code is baked in, a tensor's current value is read;
- a replay refuses to run if a tensor the capture read or wrote has since moved to other memory (``.data``
  replaced, as ``module.to()`` does): a GPU's graph would go on using the old address, its kernels reading
  whatever is there now;
- an operation that needs the host to wait for the device (``.item()``, ``float(t)``, ``nonzero``) fails the
  capture, as it does on a GPU (``operation not permitted when stream is capturing``).

What it cannot show: anything of the CUDA runtime itself (memory pools, streams, kernels that are not allowed in
a graph, the Philox offsets of the GPU's generator). ``bench/gpu_step_check.py`` checks those on a GPU.
"""

from __future__ import annotations

import contextlib
import importlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

aten = torch.ops.aten
# Operations whose result the host needs to see: a CUDA stream capture refuses them.
HOST_SYNCS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.equal.default}


class CaptureError(RuntimeError):
    """What a CUDA stream capture raises for an operation that cannot be part of a graph."""


def _tensors(tree) -> list[torch.Tensor]:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


def _returns_alias(func, i: int) -> bool:
    returns = func._schema.returns
    return i < len(returns) and returns[i].alias_info is not None


def _written_tensors(func, args, kwargs) -> list[torch.Tensor]:
    """The tensors ``func`` writes into (in-place and out= arguments)."""
    written = []
    schema_args = func._schema.arguments
    values = list(args) + [kwargs.get(a.name) for a in schema_args[len(args) :]]
    for a, value in zip(schema_args, values, strict=False):
        if a.alias_info is not None and a.alias_info.is_write:
            written += _tensors(value)
    return written


class _Recorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple] = []  # (func, args, kwargs, fresh results, their indices): what a replay runs
        self.depth = 0  # > 0: inside an operation that is being recorded
        self.created: set[int] = set()  # storages allocated by the capture (the graph's memory pool)
        self.saved: dict[int, tuple[torch.UntypedStorage, torch.UntypedStorage]] = {}  # outside ones, before

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in HOST_SYNCS:
            raise CaptureError(
                f"operation not permitted when stream is capturing: {func} waits for the device"
            )
        for t in _written_tensors(func, args, kwargs):  # keep what the capture overwrites, to put it back
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr not in self.created and ptr not in self.saved:
                self.saved[ptr] = (storage, storage.clone())
        self.depth += 1
        try:
            out = func(*args, **kwargs)
        finally:
            self.depth -= 1
        # Inside an operation that is recorded itself (a composite one, e.g. in inference mode): not again.
        if self.depth:
            return out
        results = out if isinstance(out, tuple) else (out,)
        inputs = {t.untyped_storage().data_ptr() for t in _tensors((args, kwargs))}
        fresh = [  # allocated by the operation (reshape & co. alias their input only where they can)
            i
            for i, r in enumerate(results)
            if not _returns_alias(func, i)
            or not {t.untyped_storage().data_ptr() for t in _tensors(r)} <= inputs
        ]
        for i in fresh:
            self.created.update(t.untyped_storage().data_ptr() for t in _tensors(results[i]))
        if fresh or _written_tensors(func, args, kwargs):  # else a view: its memory exists already
            # The addresses the graph's kernels were given: a replay checks that every tensor still has them.
            addresses = [(t, t.untyped_storage().data_ptr()) for t in _tensors((args, kwargs))]
            self.ops.append((func, args, kwargs, [results[i] for i in fresh], fresh, addresses))
        return out

    def undo(self) -> None:
        for storage, before in self.saved.values():
            storage.copy_(before)
        self.saved.clear()


class MovedMemoryError(RuntimeError):
    """A replay whose graph reads memory that a tensor has left: on a GPU, stale or freed memory, silently."""


class CUDAGraph:
    """``torch.cuda.CUDAGraph``: filled by :class:`graph`, run by :meth:`replay`."""

    def __init__(self) -> None:
        self.ops: list[tuple] | None = None
        self.replays = 0

    def replay(self) -> None:
        if self.ops is None:
            raise RuntimeError("replay of a graph that was never captured")
        # Below autograd and autocast, as a graph's kernels are: each operation exactly as it was recorded.
        with torch.no_grad(), torch.autocast("cpu", enabled=False):
            for func, args, kwargs, recorded, fresh, addresses in self.ops:
                for t, address in addresses:
                    if t.untyped_storage().data_ptr() != address:
                        raise MovedMemoryError(
                            f"replay of {func}: a tensor it reads was moved since the capture (e.g. module.to(),"
                            " load_state_dict(assign=True)); a GPU's graph would read the memory it left"
                        )
                out = func(*args, **kwargs)  # in-place and out= operations write the recorded tensors here
                results = out if isinstance(out, tuple) else (out,)
                for into, i in zip(recorded, fresh, strict=True):  # fresh results: into the capture's memory
                    for dst, src in zip(tree_flatten(into)[0], tree_flatten(results[i])[0], strict=True):
                        if isinstance(dst, torch.Tensor):
                            dst.copy_(src)
        self.replays += 1


class graph:  # noqa: N801 - torch.cuda.graph's name
    """``with torch.cuda.graph(g):`` records what the block does into ``g`` without doing it."""

    def __init__(
        self, cuda_graph: CUDAGraph, pool=None, stream=None, capture_error_mode: str = "global"
    ) -> None:
        self.cuda_graph = cuda_graph
        self.recorder = _Recorder()

    def __enter__(self):
        self.rng = torch.get_rng_state()
        self.recorder.__enter__()
        return self

    def __exit__(self, *exc) -> bool:
        self.recorder.__exit__(*exc)
        self.recorder.undo()  # recorded, not run: every tensor from before the capture is as it was
        torch.set_rng_state(self.rng)
        if exc[0] is None:
            self.cuda_graph.ops = self.recorder.ops
        return False


class Stream:
    def wait_stream(self, other) -> None:
        pass


@contextlib.contextmanager
def stream(s):
    yield s


def install(monkeypatch) -> None:
    """Make ``torch.cuda``'s graph API the emulation, and let cifarlab capture on a CPU."""
    import cifarlab.step

    monkeypatch.setattr(torch.cuda, "CUDAGraph", CUDAGraph)
    monkeypatch.setattr(torch.cuda, "graph", graph)
    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "stream", stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
    monkeypatch.setattr(cifarlab.step, "GRAPH_DEVICES", ("cuda", "cpu"))
    # torch's capturable optimizers check that their tensors are on a device with graphs: a CPU is one here.
    for name in ("optimizer", "adam", "adamw", "nadam", "radam", "rmsprop", "sgd", "adamax", "asgd"):
        module = importlib.import_module(f"torch.optim.{name}")
        if hasattr(module, "_get_capturable_supported_devices"):
            devices = module._get_capturable_supported_devices
            monkeypatch.setattr(
                module, "_get_capturable_supported_devices", lambda *a, d=devices, **k: [*d(*a, **k), "cpu"]
            )
