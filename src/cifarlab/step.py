"""The training step: gather + augment a batch, forward, loss, backward, optimizer step, metric sums.

:class:`TrainStep` runs it eagerly, or, on a CUDA GPU, records it once as a CUDA graph and replays the graph
for every later batch of the same size. On an H100 the course CNN's eager step at batch 64 is ~4 ms of CPU
time (Python, kernel launches) for ~0.4 ms of GPU work; a replay launches all of it at once (a plain loop of
the same net went from 34k to 119k img/s at batch 64 fp32, and to 425k at batch 512 bf16).

What makes the replay compute the same thing as the eager step:

- the batch comes in as a (4, B) int64 *plan* (image rows, crop dy, dx, flip; see
  :class:`cifarlab.data.DeviceBatches`), copied into a static buffer: gather, crop/flip and normalisation
  are inside the graph, and the random draws were made outside it, from the epoch's seeded generator;
- dropout draws from the default CUDA generator, whose Philox offset a replay advances like an eager step;
- the learning rate is a device tensor the graph reads (capturable optimizers), written from the float in
  ``param_groups`` before a replay whenever a scheduler changed it, so every scheduler works unchanged;
  so is the momentum (β1) where a scheduler cycles it (one-cycle) and the optimizer can read it from the
  device; any other hyperparameter is baked into the graph, so if one changes the step goes back to eager;
- nothing inside synchronises with the host: the loss, the correct count and the batch count are summed
  into device tensors, read once per epoch (:meth:`TrainStep.epoch_metrics`).

Eager remains where capture cannot apply (:func:`capture_blocker` says why): a CPU, an optimizer without a
capturable form (torch's and the course's all have one: :mod:`cifarlab.capturable`), 16-mixed (its gradient
scaler checks for infs on the host), DDP (its all-reduce runs in autograd hooks) and ``trainer.compile``;
every optimizer in ``conf/optimizer``, with every scheduler, is captured.

:class:`EvalStep` does the same for evaluation: forward, summed loss and correct predictions of a batch, on the
device, captured per batch shape on a CUDA GPU; read once per validation or test.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from cifarlab.capturable import has_capturable_form, momentum_on_device

WARMUP_STEPS = 3  # eager steps before the capture: cuDNN autotuning, lazy state (PyTorch's CUDA-graph notes)
# Device types with CUDA graphs (the tests add "cpu" with tests/graph_emulation.py).
GRAPH_DEVICES = ("cuda",)


def capture_blocker(
    device: torch.device,
    optimizer_cls: type,
    precision: str = "32-true",
    world_size: int = 1,
    compiled: bool = False,
    scheduler: object | None = None,
) -> str | None:
    """Why the training step cannot be captured as a CUDA graph here, or None if it can."""
    if device.type not in GRAPH_DEVICES:
        return f"the device is {device.type}, not a CUDA GPU"
    name = optimizer_cls.__name__
    if not has_capturable_form(optimizer_cls):
        return f"{optimizer_cls.__module__}.{name} has no capturable form"
    if str(precision).startswith("16"):
        return "16-mixed's gradient scaler checks for infs on the host"
    if world_size > 1:
        return "DDP all-reduces gradients in its own autograd hooks"
    if compiled:
        return "trainer.compile=true (torch.compile brings its own CUDA graphs: mode=reduce-overhead)"
    if cycles_momentum(scheduler) and not momentum_on_device(optimizer_cls):
        return f"the scheduler cycles the momentum, which {name} reads on the host"
    return None


def cycles_momentum(scheduler: object | None) -> bool:
    """Whether ``scheduler`` writes a new momentum (β1) before every step: OneCycleLR, CyclicLR."""
    return bool(getattr(scheduler, "cycle_momentum", False))


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of a Lightning precision setting: bf16/fp16 for the mixed ones, None otherwise."""
    return {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(str(precision))


def on_side_stream(fn: Callable, *args):
    """``fn(*args)`` on a fresh CUDA stream, ordered after and before the current one: the warm-up before a
    capture, as PyTorch's CUDA-graph notes do it (lazy state and cuDNN autotuning off the capture's stream)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        result = fn(*args)
    torch.cuda.current_stream().wait_stream(side)
    return result


def forward(net: nn.Module, x: torch.Tensor, autocast_dtype: torch.dtype | None) -> torch.Tensor:
    """``net(x)`` under autocast to ``autocast_dtype`` (None: none, and ``x`` in the parameters' dtype, e.g.
    bf16-true). Autocast's weight-cast cache is off: it would outlive a capture and serve stale casts
    (PyTorch's CUDA-graph notes)."""
    param = next(net.parameters())
    if x.dtype != param.dtype and not autocast_dtype:
        x = x.to(param.dtype)
    with torch.autocast(
        x.device.type,
        dtype=autocast_dtype or torch.float32,
        enabled=autocast_dtype is not None,
        cache_enabled=False,
    ):
        return net(x)


class TrainStep:
    """One optimizer step per batch plan, eager or captured; sums of loss, correct predictions and batches.

    ``backward`` and ``optimizer_step`` are the framework's versions of ``loss.backward()`` and
    ``optimizer.step()`` (Lightning's ``manual_backward`` and its optimizer's ``step`` in
    :class:`cifarlab.module.CifarModule`: callbacks' hooks, DDP's gradient sync, fp16 scaling, the step count).
    An eager step uses them where ``plain_eager`` is False or the caller asks for hooks; otherwise, like the
    captured step, the plain torch calls (~0.1-0.2 ms less Python per step). ``capture=True`` asks for the graph;
    the caller has checked :func:`capture_blocker` first.
    """

    def __init__(
        self,
        net: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        capture: bool = False,
        clip_norm: float | None = None,
        autocast_dtype: torch.dtype | None = None,
        backward: Callable[[torch.Tensor], None] | None = None,
        optimizer_step: Callable[[], None] | None = None,
        plain_eager: bool = True,
        framework_clips: bool = False,
        device_momentum: bool = False,
    ) -> None:
        self.net, self.optimizer = net, optimizer
        # True: a scheduler cycles the momentum (β1) and the optimizer reads it from a device tensor, refreshed
        # before a replay like the learning rate (optimizer_for_capture(..., device_momentum=True) built it).
        self.device_momentum = device_momentum
        # True: the framework's optimizer_step calls clip() itself, after it unscales fp16 gradients (Lightning:
        # its on_before_optimizer_step hook runs after GradScaler.unscale_); clipping here, before, would clip
        # the gradients still multiplied by the loss scale.
        self.framework_clips = framework_clips
        self.capture, self.clip_norm, self.autocast_dtype = capture, clip_norm, autocast_dtype
        self.backward = backward or torch.Tensor.backward
        self.optimizer_step = optimizer_step or optimizer.step
        self.plain_eager = plain_eager or (backward is None and optimizer_step is None)
        self.eager_reason: str | None = None  # why capture was given up during the run, if it was
        self.steps = self.replays = 0
        self._graph: torch.cuda.CUDAGraph | None = None
        self._hyper: _DeviceHyperparameters | None = None
        device = next(net.parameters()).device
        # The epoch's sums: loss over batches and correct predictions on the device (no host sync);
        # images and batches on the host (known there).
        self.sums = torch.zeros(2, dtype=torch.float64, device=device)
        self.images = self.batches = 0

    # ---- the step itself ----------------------------------------------------------------------------------

    def _forward_backward(self, source, plan: torch.Tensor, backward) -> torch.Tensor:
        x, y = source.gather(plan)  # (B, 3, H, W) float, (B,) int64
        logits = forward(self.net, x, self.autocast_dtype)  # (B, classes)
        # The backward outside any autocast, Lightning's included (manual optimization runs training_step,
        # and so this step, inside it): under autocast the backward's matmuls would run cast, in bf16.
        with torch.autocast(x.device.type, enabled=False):
            loss = F.cross_entropy(logits.float(), y)
            backward(loss)
        correct = (logits.detach().argmax(1) == y).sum()
        self.sums += torch.stack([loss.detach().double(), correct.double()])  # in place: the graph's too
        return loss.detach()

    def clip(self) -> None:
        if self.clip_norm:  # norm of all gradients, scaled down to clip_norm if above: no host sync
            torch.nn.utils.clip_grad_norm_(
                [p for g in self.optimizer.param_groups for p in g["params"]], self.clip_norm, foreach=True
            )

    def eager(self, source, plan: torch.Tensor, hooks: bool = False) -> tuple[torch.Tensor, bool]:
        """One eager step; returns the loss and whether the framework's ``optimizer_step`` ran (and counted it)."""
        framework = hooks or not self.plain_eager
        # After a capture the gradients are the graph's static tensors: zero them in place, never drop them.
        self.optimizer.zero_grad(set_to_none=self._graph is None)
        loss = self._forward_backward(source, plan, self.backward if framework else torch.Tensor.backward)
        if not (framework and self.framework_clips):
            self.clip()
        with self._device_values():
            (self.optimizer_step if framework else self.optimizer.step)()
        self.steps += 1
        return loss, framework

    def _device_values(self):
        """Where a scheduler cycles the momentum, every optimizer step of the run reads the learning rate and β1
        from the device tensors, eager ones too: one arithmetic for the whole run (a float β1 rounds 1 − β1
        differently from a float32 tensor), so a resumed run, whose first steps are eager, ends bit for bit
        where an uninterrupted one does."""
        if not self.device_momentum:
            return contextlib.nullcontext()
        if self._hyper is None:
            self._hyper = _DeviceHyperparameters(self.optimizer, momentum=True)
        self._hyper.refresh()  # a changed baked value matters to a replay only: __call__ checks it there
        return self._hyper.swapped_in()

    def _captured_body(self, source) -> torch.Tensor:
        loss = self._forward_backward(source, self._plan, torch.Tensor.backward)
        self.clip()
        self.optimizer.step()
        return loss

    # ---- capture and replay ---------------------------------------------------------------------------------

    def __call__(self, source, plan: torch.Tensor, hooks: bool = False) -> tuple[torch.Tensor, bool]:
        """One optimizer step on ``plan``'s batch; returns the loss (a device tensor) and whether the framework's
        ``optimizer_step`` ran (else the caller counts the step). ``hooks=True``: an eager step with the
        framework's calls (e.g. a callback wants its hooks on this step)."""
        self.images += plan.shape[1]
        self.batches += 1
        if not self.capture or hooks:
            return self.eager(source, plan, hooks)
        if self.steps < WARMUP_STEPS:
            return on_side_stream(self.eager, source, plan)
        if self._graph is None:
            self._capture(source, plan)
            if self._graph is None:  # capture failed: eager from now on
                return self.eager(source, plan)
        if plan.shape != self._plan.shape or source.images.data_ptr() != self._images_ptr:
            return self.eager(source, plan)  # e.g. the shorter last batch of an epoch
        changed = self._hyper.refresh()
        if changed:
            self.capture, self.eager_reason = False, changed
            return self.eager(source, plan)
        self._plan.copy_(plan)
        self._graph.replay()
        self.steps += 1
        self.replays += 1
        return self._loss, False

    def _capture(self, source, plan: torch.Tensor) -> None:
        self._plan = plan.clone()  # (4, B) static input: the plan of every replayed step is copied here
        self._images_ptr = source.images.data_ptr()
        if self._hyper is None:  # else made by the warm-up steps (device_momentum)
            self._hyper = _DeviceHyperparameters(self.optimizer, self.device_momentum)
        self._hyper.refresh()
        self._hyper.bake()
        self.optimizer.zero_grad(set_to_none=True)  # gradients are then allocated inside the graph's pool
        graph = torch.cuda.CUDAGraph()
        try:
            # Kernels are recorded, not run: the step of `plan` happens at the first replay.
            with self._hyper.swapped_in(), torch.cuda.graph(graph):
                self._loss = self._captured_body(source)
        except Exception as err:  # noqa: BLE001 - anything that cannot be captured: eager, and say why
            self.capture, self.eager_reason = False, f"capture failed ({type(err).__name__}: {err})"
            self.optimizer.zero_grad(set_to_none=True)
            return
        self._graph = graph

    # ---- metrics ------------------------------------------------------------------------------------------------

    def epoch_metrics(self) -> tuple[float, float, int]:
        """(mean batch loss, accuracy, images) since the last call; one host sync."""
        (loss_sum, correct), images, batches = self.sums.tolist(), self.images, self.batches
        self.sums.zero_()
        self.images = self.batches = 0
        return loss_sum / max(batches, 1), correct / max(images, 1), images

    @property
    def mode(self) -> str:
        if self.replays:
            return "captured" if self.eager_reason is None else f"captured, then eager ({self.eager_reason})"
        return "eager" if self.eager_reason is None else f"eager ({self.eager_reason})"


class EvalStep:
    """Evaluation batches → sums of cross-entropy and correct predictions on the device, read once per pass.

    Written here rather than with torchmetrics' MeanMetric/MulticlassAccuracy: their ``update`` checks its
    inputs on the host (``isnan(...).any()``, the label range), a host sync per batch, and cannot run inside
    a CUDA graph; two device sums can, and give the same numbers (``tests/test_step.py``).

    ``capture=True`` (a CUDA GPU): the first batch of each shape runs eager (cuDNN autotuning), the second is
    recorded as a CUDA graph (forward, loss, argmax, the sums' update) and replayed for every later batch of
    that shape after copying its pixels and labels into the graph's static buffers; an evaluation of 10,000
    images at batch 1,000 is then 10 replays and one read. The graph is kept per (shape, dtype, train/eval
    mode) for the whole run, so every validation after the first replays, as long as the weights stay where
    they were: a graph reads the addresses it was recorded on, and Lightning moves the network to the CPU at a
    fit's end and back for the test (the best checkpoint's weights then live elsewhere; replaying the old graphs
    gave test/acc 0.1000 on an H200), so the graphs are dropped and recorded again when any weight has moved.
    """

    def __init__(
        self, net: nn.Module, *, capture: bool = False, autocast_dtype: torch.dtype | None = None
    ) -> None:
        self.net, self.capture, self.autocast_dtype = net, capture, autocast_dtype
        self.eager_reason: str | None = None
        self.replays = 0
        self.sums: torch.Tensor | None = None  # (2,) float64: loss summed over images, correct predictions
        self.images = 0
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        self._seen: set[tuple] = set()
        self._weights: tuple[int, ...] = ()  # the addresses of the weights the graphs were recorded on

    def _accumulate(self, x: torch.Tensor, y: torch.Tensor) -> None:
        logits = forward(self.net, x, self.autocast_dtype)  # (B, classes)
        loss = F.cross_entropy(logits.float(), y, reduction="sum")
        correct = (logits.argmax(1) == y).sum()
        self.sums += torch.stack([loss.double(), correct.double()])  # in place: the graph's too

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Add one batch: ``x`` (B, 3, H, W) float images, ``y`` (B,) int64 labels."""
        if self.sums is None:
            with torch.inference_mode(False):  # a normal tensor: usable inside and outside inference mode
                self.sums = torch.zeros(2, dtype=torch.float64, device=x.device)
        self.images += len(y)
        key = (tuple(x.shape), x.stride(), x.dtype, self.net.training)
        if not self.capture:
            return self._accumulate(x, y)
        weights = tuple(t.data_ptr() for t in itertools.chain(self.net.parameters(), self.net.buffers()))
        if weights != self._weights:  # moved (or first call): record afresh, warm-up first
            self._graphs.clear()
            self._seen.clear()
            self._weights = weights
        entry = self._graphs.get(key)
        if entry is None:
            if key not in self._seen:  # warm-up: eager
                self._seen.add(key)
                return on_side_stream(self._accumulate, x, y)
            entry = self._capture(key, x, y)
            if entry is None:
                return self._accumulate(x, y)
        graph, static_x, static_y = entry
        static_x.copy_(x)
        static_y.copy_(y)
        graph.replay()
        self.replays += 1
        return None

    def _capture(self, key: tuple, x: torch.Tensor, y: torch.Tensor):
        with torch.inference_mode(False):
            static_x, static_y = torch.empty_like(x), torch.empty_like(y)
        static_x.copy_(x)
        static_y.copy_(y)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):  # recorded, not run: this batch is added by the first replay
                self._accumulate(static_x, static_y)
        except Exception as err:  # noqa: BLE001 - anything that cannot be captured: eager, and say why
            self.capture, self.eager_reason = False, f"capture failed ({type(err).__name__}: {err})"
            return None
        self._graphs[key] = (graph, static_x, static_y)
        return self._graphs[key]

    def reset(self) -> None:
        if self.sums is not None:
            self.sums.zero_()  # in place: the captured graphs hold this tensor
        self.images = 0

    def totals(self) -> torch.Tensor:
        """(loss sum, correct, images) as a float64 device tensor (for a sum over DDP ranks)."""
        if self.sums is None:
            return torch.zeros(3, dtype=torch.float64, device=next(self.net.parameters()).device)
        return torch.cat([self.sums, self.sums.new_tensor([self.images])])

    @staticmethod
    def metrics(totals: torch.Tensor) -> tuple[float, float]:
        """(mean loss per image, accuracy) from :meth:`totals`; one host sync."""
        loss_sum, correct, images = totals.tolist()
        if not images:
            return float("nan"), float("nan")
        return loss_sum / images, correct / images


class _DeviceHyperparameters:
    """The learning rate of every parameter group as a device tensor that the captured step reads, and the
    momentum (β1: ``betas[0]``, or ``momentum``) too where a scheduler cycles it (``momentum=True``).

    Schedulers keep writing plain floats into ``param_groups`` (so they, Lightning and checkpoints see what
    they always saw); :meth:`refresh` copies a changed float into its tensor before a replay (``fill_``: a
    kernel launch, no sync). Every other number of a group is baked into the graph: if one changes,
    :meth:`refresh` says which, and the step goes back to eager.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, momentum: bool = False) -> None:
        self.groups = optimizer.param_groups
        device = self.groups[0]["params"][0].device
        # In the dtype the fused kernels read: float32 on CUDA (their lr pointer is a float*), float64 on a CPU
        # (the fused CPU kernels compute with a double lr: a float32 one moved Adam's results by an ulp a step).
        dtype = torch.float32 if device.type == "cuda" else torch.float64
        self.keys = ["lr"] + (["momentum"] if momentum else [])
        self.values = [{k: _get(g, k) for k in self.keys} for g in self.groups]
        # β1/momentum in float32 everywhere: torch's Adam casts it to the parameters' dtype anyway.
        dtypes = {"lr": dtype, "momentum": torch.float32}
        self.tensors = [
            {k: torch.tensor(v, dtype=dtypes[k], device=device) for k, v in values.items()}
            for values in self.values
        ]
        self.bake()

    def bake(self) -> None:
        """Note the numbers a capture now bakes in (every one but the device values)."""
        self.baked = [self._numbers(g) for g in self.groups]

    def _numbers(self, group: dict) -> dict:
        numbers = {k: v for k, v in group.items() if k != "params" and isinstance(v, (int, float, tuple))}
        numbers.pop("lr")
        if "momentum" in self.keys:  # what stays baked: β2
            numbers.pop("momentum", None)
            if "betas" in numbers:
                numbers["betas"] = numbers["betas"][1:]
        return numbers

    @contextlib.contextmanager
    def swapped_in(self):
        """The device tensors in ``param_groups`` for the block (call :meth:`refresh` first); the floats back
        after it."""
        floats = [{key: _get(group, key) for key in self.keys} for group in self.groups]
        for group, tensors in zip(self.groups, self.tensors, strict=True):
            for key, tensor in tensors.items():
                _set(group, key, tensor)
        try:
            yield
        finally:
            for group, values in zip(self.groups, floats, strict=True):
                for key, value in values.items():
                    _set(group, key, value)

    def refresh(self) -> str | None:
        for i, group in enumerate(self.groups):
            for key, tensor in self.tensors[i].items():
                value = _get(group, key)
                if value != self.values[i][key]:
                    self.values[i][key] = value
                    tensor.fill_(value)
            numbers = self._numbers(group)
            if numbers != self.baked[i]:
                key = next(k for k in numbers if numbers[k] != self.baked[i].get(k))
                return f"optimizer {key} changed during the run and a captured step would bake it in"
        return None


def _get(group: dict, key: str) -> float:
    """A group's lr or momentum (β1 for the Adam family) as a float."""
    if key == "momentum" and "betas" in group:
        return float(group["betas"][0])
    return float(group[key])


def _set(group: dict, key: str, value) -> None:
    if key == "momentum" and "betas" in group:
        group["betas"] = (value, *group["betas"][1:])
    else:
        group[key] = value
