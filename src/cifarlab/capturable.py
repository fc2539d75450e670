"""Optimizers in a form whose step can be recorded in a CUDA graph and replayed (:mod:`cifarlab.step`).

A captured step replays the kernels its optimizer launched at the capture: every number the optimizer read on
the host is baked in. So a capturable form keeps its step counters on the device, and reads the learning rate,
and where a scheduler cycles it (one-cycle) the momentum, from device tensors that :mod:`cifarlab.step`
refreshes before each replay. torch has such forms for most of its optimizers (``capturable=True``,
``fused=True``); where it has none, the classes below are torch's optimizer with a step written in tensor
operations, the same update and the same state, so checkpoints load either way:

- :class:`DeviceMomentumSGD`, :class:`DeviceMomentumRMSprop`: torch's SGD and RMSprop test the momentum on
  the host (``momentum != 0``, ``> 0``) and hand it and the learning rate to their kernels as host numbers, so
  a one-cycle schedule, which changes the momentum every step, could not be captured with them;
- :class:`CapturableAdagrad`: torch's Adagrad keeps its step counter on the host (the learning-rate decay reads
  it there) and has no capturable form.

The course's own optimizers (:mod:`cifarlab.optim`) have a ``capturable`` form of their own.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# torch's optimizers whose step can run inside a CUDA graph with the learning rate as a device tensor: the ones
# with ``capturable`` (step counters on the device), SGD, which keeps no step counter, and Adagrad as
# CapturableAdagrad. (The course's own, cifarlab.optim, have a ``capturable`` form too: ``supports_capture``.)
CAPTURABLE_OPTIMIZERS = ("Adagrad", "Adam", "AdamW", "NAdam", "RAdam", "RMSprop", "SGD")
# torch's optimizers whose capturable form can read the momentum (β1) from a device tensor without a host sync:
# with them a scheduler that cycles it (OneCycleLR) runs captured, β1 refreshed like the learning rate. The Adam
# family in its single-tensor form (foreach=False; the fused and foreach forms read β1 on the host:
# ``_foreach_lerp_`` takes no tensor weight); SGD and RMSprop as :class:`DeviceMomentumSGD` and
# :class:`DeviceMomentumRMSprop`. (The course's own: ``device_momentum``.)
DEVICE_MOMENTUM_OPTIMIZERS = ("Adam", "AdamW", "NAdam", "RAdam", "RMSprop", "SGD")


def _torchs(optimizer_cls: type) -> bool:
    return optimizer_cls.__module__.split(".")[0] == "torch"


def has_capturable_form(optimizer_cls: type) -> bool:
    """Whether :func:`optimizer_for_capture` can build ``optimizer_cls`` in a capturable form."""
    if _torchs(optimizer_cls):
        return optimizer_cls.__name__ in CAPTURABLE_OPTIMIZERS
    return getattr(optimizer_cls, "supports_capture", False)  # cifarlab.optim's


def momentum_on_device(optimizer_cls: type) -> bool:
    """Whether the capturable form of ``optimizer_cls`` can read its momentum (β1) from a device tensor."""
    if _torchs(optimizer_cls):
        return optimizer_cls.__name__ in DEVICE_MOMENTUM_OPTIMIZERS
    return getattr(optimizer_cls, "device_momentum", False)  # cifarlab.optim's


def optimizer_for_capture(
    factory: Callable[..., torch.optim.Optimizer], params, device_momentum: bool = False
) -> torch.optim.Optimizer:
    """``factory(params)`` in a form whose step can be captured: fused or foreach, with ``capturable=True``
    where the class has it (step counters on the device), in that order of preference; the classes below where
    torch has none. ``device_momentum``: the form that reads β1 from a device tensor (:func:`momentum_on_device`),
    the single-tensor one."""
    cls = getattr(factory, "func", factory)
    args, keywords = getattr(factory, "args", ()), getattr(factory, "keywords", {})
    if cls is torch.optim.Adagrad:
        return CapturableAdagrad(params, *args, **keywords)
    if device_momentum and cls in (torch.optim.SGD, torch.optim.RMSprop):
        device_cls = DeviceMomentumSGD if cls is torch.optim.SGD else DeviceMomentumRMSprop
        return device_cls(params, *args, **keywords)
    options = [{"fused": True}, {"foreach": True}, {}]
    if device_momentum:
        options = [{"foreach": False}, {}]  # {}: the course's, which have no foreach argument
    if cls.__name__ != "SGD":
        options = [{**o, "capturable": True} for o in options]
    params = list(params)
    for option in options:
        try:
            return factory(params, **option)
        except (RuntimeError, ValueError, TypeError):
            continue
    raise RuntimeError(f"{cls.__name__} could not be built in a capturable form")


def _as_float32(value):
    """A device-tensor hyperparameter in float32, as a kernel reads a float one (:mod:`cifarlab.step` keeps the
    learning rate in float64 on a CPU, for torch's fused CPU kernels); a float as it is."""
    return value.float() if isinstance(value, torch.Tensor) else value


def device_scalar(value, like: torch.Tensor) -> torch.Tensor:
    """A state value (a step count, a decayed rate) on ``like``'s device: a number as a float32 scalar tensor, a
    tensor (torch's host counter, a checkpoint's) moved there once, in an eager step before any capture."""
    if not isinstance(value, torch.Tensor):
        return torch.tensor(float(value), dtype=torch.float32, device=like.device)
    return value if value.device == like.device else value.to(like.device)


def _device_step(state: dict, like: torch.Tensor) -> torch.Tensor:
    """The state's step counter on ``like``'s device (:func:`device_scalar`; 0 if new), counted up by one."""
    state["step"] = step = device_scalar(state.get("step", 0), like)
    step += 1
    return step


class PerParameterStep:
    """The step loop of the optimizers written here and of the course's (:mod:`cifarlab.optim`), before torch's
    ``Optimizer`` class in their bases: the closure, then ``_update`` for each parameter with a gradient, given
    ``g`` (negated under a group's ``maximize``, plus ``wd·θ``: L2 weight decay, as torch's SGD, RMSprop, Adagrad
    and Adam apply it; a new tensor, ``p.grad`` is left untouched). ``floats_run_torchs_step``: where no learning
    rate or momentum is a device tensor, the base class's own step (torch's) runs instead."""

    floats_run_torchs_step = True

    @torch.no_grad()
    def step(self, closure=None):
        tensors = any(
            isinstance(g.get(k), torch.Tensor) for g in self.param_groups for k in ("lr", "momentum")
        )
        if self.floats_run_torchs_step and not tensors:
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                g = -p.grad if group.get("maximize", False) else p.grad
                if group["weight_decay"] != 0:
                    g = g.add(p, alpha=group["weight_decay"])
                self._update(p, g, self.state[p], group)
        return loss

    def _update(self, p: torch.Tensor, g: torch.Tensor, state: dict, group: dict) -> None:
        raise NotImplementedError


class DeviceMomentumSGD(PerParameterStep, torch.optim.SGD):
    """torch's SGD whose step also runs with the learning rate and momentum as device tensors, no host sync: a
    captured step under a one-cycle schedule needs that, and torch's own step tests ``momentum != 0`` on the
    host and hands both to its kernels as host numbers. Same update, same state (``momentum_buffer``, so
    checkpoints load either way); with float hyperparameters it is torch's step. Per parameter::

        g ← ∇θ + wd·θ;   b ← g at the first step, then b ← μ·b + (1 − dampening)·g;
        d = g + μ·b (Nesterov) or b;   θ ← θ − η·d
    """

    def _update(self, p, g, state, group) -> None:
        mu = group["momentum"]
        b = state.get("momentum_buffer")
        if b is None:  # a first step: in a warm-up step, before any capture
            b = state["momentum_buffer"] = g.detach().clone()
        else:
            b.mul_(mu).add_(g, alpha=1 - group["dampening"])
        d = g.add(b.mul(mu)) if group["nesterov"] else b
        p.sub_(d.mul(group["lr"]))


class DeviceMomentumRMSprop(PerParameterStep, torch.optim.RMSprop):
    """torch's RMSprop whose step also runs with the learning rate and momentum as device tensors, no host sync
    (torch's tests ``momentum > 0`` on the host): :class:`DeviceMomentumSGD`'s reason. Same update, same state
    (``step``, ``square_avg``, ``momentum_buffer``, ``grad_avg``); with float hyperparameters torch's step.
    Per parameter::

        g ← ∇θ + wd·θ;   S ← α·S + (1 − α)·g²;   centered: ḡ ← α·ḡ + (1 − α)·g and S' = S − ḡ², else S' = S;
        b ← μ·b + g/(√S' + ε);   θ ← θ − η·b
    """

    def _update(self, p, g, state, group) -> None:
        alpha = group["alpha"]
        _device_step(state, p)
        for key in ("square_avg", "momentum_buffer") + (("grad_avg",) if group["centered"] else ()):
            if key not in state:  # a first step: in a warm-up step, before any capture
                state[key] = torch.zeros_like(p, memory_format=torch.preserve_format)
        square_avg = state["square_avg"]
        square_avg.mul_(alpha).addcmul_(g, g, value=1 - alpha)
        if group["centered"]:
            grad_avg = state["grad_avg"]
            grad_avg.lerp_(g, 1 - alpha)
            avg = square_avg.addcmul(grad_avg, grad_avg, value=-1).sqrt_()
        else:
            avg = square_avg.sqrt()
        b = state["momentum_buffer"]
        b.mul_(group["momentum"]).addcdiv_(g, avg.add_(group["eps"]))
        p.sub_(b.mul(group["lr"]))


class CapturableAdagrad(PerParameterStep, torch.optim.Adagrad):
    """torch's Adagrad with a step that can be captured: the step counter on the parameter's device and the
    learning rate a float or a device tensor (torch's keeps the counter on the host, where its learning-rate
    decay reads it, and has no capturable form). Same update, same state (``sum``, ``step``: checkpoints load
    either way), to float rounding: the decayed rate is computed in float32 on the device, where torch
    computes it in double on the host. Per parameter::

        t ← t + 1;   g ← ∇θ + wd·θ;   G ← G + g²;   θ ← θ − η/(1 + (t − 1)·lr_decay) · g/(√G + ε)
    """

    floats_run_torchs_step = False  # one step for floats and tensors: the counter stays on the device

    def _update(self, p, g, state, group) -> None:
        t = _device_step(state, p)
        # η/(1 + (t−1)·decay)
        decayed = (t - 1).mul_(group["lr_decay"]).add_(1).reciprocal_().mul_(_as_float32(group["lr"]))
        state["sum"].addcmul_(g, g)
        p.sub_(g.div(state["sum"].sqrt().add_(group["eps"])).mul_(decayed))
