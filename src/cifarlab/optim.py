"""The course's hand-written optimizers as real ``torch.optim.Optimizer`` classes.

Each class follows the lecture's update rule literally (the formula is in its docstring), with
``g`` the gradient of the loss, ``η`` the learning rate (``lr``) and ``θ`` the parameter.  All of them
also accept ``weight_decay`` per parameter group, applied as an L2 term added to the gradient
before the rule runs (``g ← g + wd·θ``), exactly like ``torch.optim.SGD``/``torch.optim.Adam``; the
project passes two groups (weights with decay, biases without, see ``cifarlab.model.parameter_groups``).

Where a course rule coincides with a ``torch.optim`` one the tests prove equal trajectories
(``Momentum``/``Nesterov`` ↔ ``torch.optim.SGD(momentum=μ, nesterov=...)``, whose buffer is ``-m/η``;
``Adam`` ↔ ``torch.optim.Adam``); the others are checked against a NumPy transcription of the formula.

``COURSE_OPTIMIZERS`` maps the config names (``optimizer=course/<name>``) to the classes.  Every
constructor argument except ``params`` has a float/int/bool/tuple default, because the config schema is
generated from the signature.

``capturable=True`` (what :func:`cifarlab.capturable.optimizer_for_capture` asks for, as torch's own optimizers have
it) writes each rule so that its step can be recorded in a CUDA graph and replayed: the learning rate may be
a device tensor (the captured step reads it from one), and step counters and decayed rates live on the
parameter's device, so no value is read on the host and none is baked into the graph.  The same formula in
tensor operations; the default path is unchanged.  ``Momentum``, ``Nesterov`` and ``Adam`` also take the
momentum (β1) as a device tensor there (``device_momentum``), so a one-cycle schedule, which cycles it, can
run captured too.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from cifarlab.capturable import PerParameterStep, device_scalar

__all__ = [
    "COURSE_OPTIMIZERS",
    "AdaGrad",
    "Adam",
    "DecayedGD",
    "EMAMomentum",
    "GradScaledGD",
    "Momentum",
    "Nesterov",
    "RMSProp",
]

Params = Iterable[Tensor] | Iterable[dict[str, Any]]


def _check(
    name: str,
    value: float,
    low: float,
    high: float = math.inf,
    *,
    low_open: bool = False,
    high_open: bool = True,
) -> None:
    above = low < value if low_open else low <= value
    below = value < high if high_open else value <= high
    if not (above and below):
        left, right = "(" if low_open else "[", ")" if high_open else "]"
        raise ValueError(f"invalid {name}={value!r}; allowed: {left}{low}, {high}{right}")


def _host_number(value: float | Tensor) -> float:
    """A state value as a Python number (a checkpoint of a capturable run resumed without capture)."""
    return float(value) if isinstance(value, Tensor) else value


class _CourseOptimizer(PerParameterStep, Optimizer):
    """Shared ``step`` (:class:`~cifarlab.capturable.PerParameterStep`): closure, weight decay as L2 on the
    gradient, then the subclass's ``_update``, for float and device-tensor hyperparameters alike."""

    # cifarlab.step.capture_blocker: these can be built capturable and captured in a CUDA graph.
    supports_capture = True
    floats_run_torchs_step = False  # there is no torch step below: the rule is the subclass's _update

    def __init__(self, params: Params, defaults: dict[str, Any], capturable: bool = False) -> None:
        _check("lr", defaults["lr"], 0.0)
        _check("weight_decay", defaults["weight_decay"], 0.0)
        super().__init__(params, {**defaults, "capturable": bool(capturable)})


def _lr_step(t: Tensor, x: Tensor, group: dict[str, Any]) -> None:
    """t ← t − η·x, with η a float, or a device tensor when capturable."""
    if group["capturable"]:
        t.sub_(x.mul(group["lr"]))
    else:
        t.add_(x, alpha=-group["lr"])


def _scaled_step(p: Tensor, num: Tensor, den: Tensor, group: dict[str, Any]) -> None:
    """θ ← θ − η·num/den, with η a float, or a device tensor when capturable."""
    if group["capturable"]:
        p.sub_(num.div(den).mul_(group["lr"]))
    else:
        p.addcdiv_(num, den, value=-group["lr"])


class EMAMomentum(_CourseOptimizer):
    r"""Momentum as an exponential moving average of the gradients.

    .. math::  v \leftarrow \beta v + (1-\beta) g, \qquad \theta \leftarrow \theta - \eta\, v

    ``v`` starts at 0 (no bias correction).  Equivalent to SGD momentum with ``dampening=β`` except for
    the first step (torch copies ``g`` into the empty buffer), so it is tested against NumPy instead.
    """

    def __init__(
        self,
        params: Params,
        lr: float = 0.01,
        beta: float = 0.9,
        weight_decay: float = 0.0,
        capturable: bool = False,
    ) -> None:
        _check("beta", beta, 0.0, 1.0)
        super().__init__(params, {"lr": lr, "beta": beta, "weight_decay": weight_decay}, capturable)

    def _update(self, p: Tensor, g: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        if not state:
            state["velocity"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        beta = group["beta"]
        v = state["velocity"]
        v.mul_(beta).add_(g, alpha=1.0 - beta)  # v ← βv + (1−β)g
        _lr_step(p, v, group)  # θ ← θ − η·v


class Momentum(_CourseOptimizer):
    r"""Classical (heavy-ball) momentum, the lecture's form.

    .. math::  m \leftarrow \mu m - \eta g, \qquad \theta \leftarrow \theta + m

    ``m`` starts at 0; ``momentum=0`` is plain gradient descent ``θ ← θ − η·g``.  With a constant ``lr`` this
    is ``torch.optim.SGD(lr, momentum=μ)`` (dampening 0), whose buffer ``b`` equals ``-m/η``.  (The
    velocity ``m`` carries ``η``, so when a scheduler changes ``lr`` the two differ: here past steps keep
    their old ``η``.)
    """

    def __init__(
        self,
        params: Params,
        lr: float = 0.01,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        capturable: bool = False,
    ) -> None:
        _check("momentum", momentum, 0.0, 1.0)
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay}, capturable)

    # cifarlab.capturable.momentum_on_device: capturable, μ may be a device tensor too (a cycled one)
    device_momentum = True

    def _update(self, p: Tensor, g: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        if not state:
            state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        m = state["momentum_buffer"]
        _lr_step(m.mul_(group["momentum"]), g, group)  # m ← μ·m − η·g
        p.add_(m)  # θ ← θ + m


class Nesterov(_CourseOptimizer):
    r"""Nesterov momentum, the lecture's form (look-ahead folded into the update).

    .. math::  m \leftarrow \mu m - \eta g, \qquad \theta \leftarrow \theta + \mu m - \eta g

    (``m`` on the right is the new one.)  With a constant ``lr`` this is
    ``torch.optim.SGD(lr, momentum=μ, nesterov=True)``: with ``b = -m/η`` torch's ``θ ← θ − η(g + μb)``
    is ``θ + μm − ηg``.
    """

    def __init__(
        self,
        params: Params,
        lr: float = 0.01,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        capturable: bool = False,
    ) -> None:
        _check("momentum", momentum, 0.0, 1.0)
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay}, capturable)

    device_momentum = True  # as Momentum's

    def _update(self, p: Tensor, g: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        if not state:
            state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        mu, lr = group["momentum"], group["lr"]
        m = state["momentum_buffer"]
        if group["capturable"]:  # η and μ floats or device tensors
            step = g.mul(lr)
            m.mul_(mu).sub_(step)
            p.add_(m.mul(mu)).sub_(step)
            return
        m.mul_(mu).add_(g, alpha=-lr)  # m ← μ·m − η·g
        p.add_(m, alpha=mu).add_(g, alpha=-lr)  # θ ← θ + μ·m − η·g


class AdaGrad(_CourseOptimizer):
    r"""AdaGrad: per-element step sizes shrinking with the accumulated squared gradients.

    .. math::  G \leftarrow G + g^2, \qquad \theta \leftarrow \theta - \eta\, \frac{g}{\sqrt{G + \varepsilon}}

    ``ε = 1e-6`` sits *inside* the square root (``torch.optim.Adagrad`` adds it outside, with 1e-10).
    """

    def __init__(
        self,
        params: Params,
        lr: float = 0.01,
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        capturable: bool = False,
    ) -> None:
        _check("eps", eps, 0.0, low_open=True)  # ε = 0: a zero gradient gives 0/0
        super().__init__(params, {"lr": lr, "eps": eps, "weight_decay": weight_decay}, capturable)

    def _update(self, p: Tensor, g: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        if not state:
            state["sum"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        G = state["sum"]
        G.addcmul_(g, g)  # G ← G + g²
        _scaled_step(p, g, G.add(group["eps"]).sqrt_(), group)  # θ ← θ − η·g/√(G+ε)


class RMSProp(_CourseOptimizer):
    r"""RMSProp: AdaGrad with a leaky (exponentially averaged) accumulator.

    .. math::  G \leftarrow \rho G + (1-\rho) g^2, \qquad
               \theta \leftarrow \theta - \eta\, \frac{g}{\sqrt{G + \varepsilon}}

    ``ε = 1e-6`` sits *inside* the square root (``torch.optim.RMSprop`` adds it outside, with 1e-8, and
    calls ``ρ`` ``alpha``; here ``alpha`` is avoided because the lecture uses α for the learning rate).
    """

    def __init__(
        self,
        params: Params,
        lr: float = 0.001,
        rho: float = 0.9,
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        capturable: bool = False,
    ) -> None:
        _check("rho", rho, 0.0, 1.0)
        _check("eps", eps, 0.0, low_open=True)  # ε = 0: a zero gradient gives 0/0
        defaults = {"lr": lr, "rho": rho, "eps": eps, "weight_decay": weight_decay}
        super().__init__(params, defaults, capturable)

    def _update(self, p: Tensor, g: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        if not state:
            state["square_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        rho = group["rho"]
        G = state["square_avg"]
        G.mul_(rho).addcmul_(g, g, value=1.0 - rho)  # G ← ρG + (1−ρ)g²
        _scaled_step(p, g, G.add(group["eps"]).sqrt_(), group)  # θ ← θ − η·g/√(G+ε)


class Adam(_CourseOptimizer):
    r"""Adam: momentum (first moment) over RMSProp (second moment), with optional bias correction.

    .. math::  v \leftarrow \beta_1 v + (1-\beta_1) g, \qquad s \leftarrow \beta_2 s + (1-\beta_2) g^2, \\
               \hat v = \frac{v}{1-\beta_1^t}, \quad \hat s = \frac{s}{1-\beta_2^t}, \qquad
               \theta \leftarrow \theta - \eta\, \frac{\hat v}{\sqrt{\hat s} + \varepsilon}

    ``t`` counts this parameter's steps from 1.  With ``bias_correction=False``, ``v̂ = v`` and ``ŝ = s``;
    since both start at 0 the early steps are then scaled by ``(1−β1^t)/√(1−β2^t)`` relative to Adam's
    (with the default betas: 3.2× at ``t = 1``, up to 6.6× near ``t = 12``, 1.26× at ``t = 1000``, ≈1
    after ~5000 steps).  With bias correction this is
    ``torch.optim.Adam`` (``weight_decay`` is L2 on the gradient like there, not AdamW's decoupled decay).
    """

    def __init__(
        self,
        params: Params,
        lr: float = 0.001,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        bias_correction: bool = True,
        capturable: bool = False,
    ) -> None:
        betas = tuple(float(b) for b in betas)  # configs hand over lists
        if len(betas) != 2:
            raise ValueError(f"invalid betas={betas!r}; expected two values (β1, β2)")
        _check("betas[0]", betas[0], 0.0, 1.0)
        _check("betas[1]", betas[1], 0.0, 1.0)
        _check("eps", eps, 0.0, low_open=True)  # ε = 0: a zero gradient gives 0/0
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "bias_correction": bool(bias_correction),
        }
        super().__init__(params, defaults, capturable)

    device_momentum = True  # as Momentum's: β1

    def _update(self, p: Tensor, g: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        beta1, beta2 = group["betas"]
        capturable = group["capturable"]
        # t on the device when capturable (a graph replays what it recorded: a host count would stay at the
        # capture's value), else a Python int; either way as a checkpoint of the other kind has it
        state["step"] = device_scalar(state["step"], p) if capturable else _host_number(state["step"])
        state["step"] += 1
        t = state["step"]
        v, s = state["exp_avg"], state["exp_avg_sq"]
        if capturable:  # β1 a float or a device tensor
            v.mul_(beta1).add_(g.mul(1.0 - beta1))
        else:
            v.mul_(beta1).add_(g, alpha=1.0 - beta1)  # v ← β1·v + (1−β1)·g
        s.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)  # s ← β2·s + (1−β2)·g²
        if group["bias_correction"]:
            bc1, bc2 = 1.0 - beta1**t, 1.0 - beta2**t
        else:
            bc1 = bc2 = 1.0
        denom = s.div(bc2).sqrt_().add_(group["eps"])  # √ŝ + ε
        # capturable: η only ever multiplies a full tensor, so a float η and a tensor η give the same bits
        if capturable:
            p.sub_(v.div(denom).mul_(group["lr"]).div_(bc1))
        else:
            p.addcdiv_(v, denom, value=-group["lr"] / bc1)  # θ ← θ − η·v̂/(√ŝ + ε)


class DecayedGD(_CourseOptimizer):
    r"""Gradient descent with a learning rate decayed geometrically before every step.

    .. math::  \eta \leftarrow K \eta, \qquad \theta \leftarrow \theta - \eta\, g

    (the lecture's ``α ← 0.99·α``, so the first step already uses ``K·η₀`` and step ``t`` uses ``K^t·η₀``).
    The decayed rate is kept as a per-parameter factor ``state["lr_factor"]`` (``1 → K → K² …``) times
    the group's ``lr``, so ``param_groups`` keep the base rate and an LR scheduler, if any, still applies.
    Note that ``K = 0.99`` *per step* freezes training after a few hundred steps; on CIFAR (hundreds of
    steps per epoch) use ``decay`` much closer to 1.
    """

    def __init__(
        self,
        params: Params,
        lr: float = 0.1,
        decay: float = 0.99,
        weight_decay: float = 0.0,
        capturable: bool = False,
    ) -> None:
        _check("decay", decay, 0.0, 1.0, high_open=False)
        super().__init__(params, {"lr": lr, "decay": decay, "weight_decay": weight_decay}, capturable)

    def _update(self, p: Tensor, g: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        factor = state.get("lr_factor", 1.0)
        if group["capturable"]:  # the factor on the device, decayed in place
            factor = state["lr_factor"] = device_scalar(factor, p)
            factor.mul_(group["decay"])
            p.sub_(g.mul(factor).mul_(group["lr"]))
            return
        state["lr_factor"] = _host_number(factor) * group["decay"]  # η ← K·η
        p.add_(g, alpha=-group["lr"] * state["lr_factor"])  # θ ← θ − η·g


class GradScaledGD(_CourseOptimizer):
    r"""Gradient descent whose per-element learning rate shrinks where the gradient is large.

    .. math::  \eta \leftarrow \frac{\eta}{1 + c\sqrt{|g|}}, \qquad \theta \leftarrow \theta - \eta\, g

    element-wise, before every step (the lecture's gradient-scaled control: big gradients brake the
    step size for good).  As in :class:`DecayedGD` the rate is stored as a per-element factor
    ``state["lr_factor"]`` (starting at 1) times the group's ``lr``.  The factor only ever shrinks, so
    long runs need a small ``c``.
    """

    def __init__(
        self,
        params: Params,
        lr: float = 0.1,
        c: float = 1.0,
        weight_decay: float = 0.0,
        capturable: bool = False,
    ) -> None:
        _check("c", c, 0.0)
        super().__init__(params, {"lr": lr, "c": c, "weight_decay": weight_decay}, capturable)

    def _update(self, p: Tensor, g: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        if not state:
            state["lr_factor"] = torch.ones_like(p, memory_format=torch.preserve_format)
        factor = state["lr_factor"]
        factor.div_(g.abs().sqrt_().mul_(group["c"]).add_(1.0))  # η ← η / (1 + c·√|g|)
        if group["capturable"]:
            p.sub_(factor.mul(g).mul_(group["lr"]))
        else:
            p.addcmul_(factor, g, value=-group["lr"])  # θ ← θ − η·g


COURSE_OPTIMIZERS: dict[str, type[Optimizer]] = {
    "ema_momentum": EMAMomentum,
    "momentum": Momentum,
    "nesterov": Nesterov,
    "adagrad": AdaGrad,
    "rmsprop": RMSProp,
    "adam": Adam,
    "decayed_gd": DecayedGD,
    "grad_scaled_gd": GradScaledGD,
}
