"""cifarlab.capturable's own optimizer steps compute torch's update: CapturableAdagrad against torch's Adagrad,
DeviceMomentumSGD and DeviceMomentumRMSprop (learning rate and momentum as tensors, changed every step) against
torch's SGD and RMSprop with floats, and checkpoints load either way. Plain eager steps on a small smooth model, where float rounding stays small."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch

from cifarlab.capturable import (
    CapturableAdagrad,
    DeviceMomentumRMSprop,
    DeviceMomentumSGD,
    optimizer_for_capture,
)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))


def _groups(model: torch.nn.Module, weight_decay: float = 0.01) -> list[dict]:
    weights = [p for p in model.parameters() if p.ndim > 1]
    biases = [p for p in model.parameters() if p.ndim == 1]
    return [{"params": weights, "weight_decay": weight_decay}, {"params": biases, "weight_decay": 0.0}]


def _train(model, optimizer, steps: int, schedule=None) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 6, generator=g), torch.randn(64, 2, generator=g)
    trajectory = []
    for t in range(steps):
        if schedule is not None:
            schedule(optimizer, t)
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
        trajectory.append(torch.cat([p.detach().flatten().clone() for p in model.parameters()]))
    return trajectory


def _close(a: list[torch.Tensor], b: list[torch.Tensor], rtol: float = 1e-5) -> None:
    torch.testing.assert_close(torch.stack(a), torch.stack(b), rtol=rtol, atol=1e-5)  # parameters ~0.1-1


@pytest.mark.parametrize(
    "kw",
    [{}, {"lr_decay": 0.05}, {"initial_accumulator_value": 0.1, "eps": 1e-6}, {"maximize": True}],
    ids=["default", "lr-decay", "accumulator-eps", "maximize"],
)
def test_capturable_adagrad_is_torchs_adagrad(kw):
    """50 steps, weight decay on the weights: torch's trajectory to float rounding, with the learning rate a
    float or a float64 tensor (as cifarlab.step hands it over on a CPU: the same bits as the float)."""
    runs = {}
    for name in ("torch", "float", "tensor"):
        model = _model()
        if name == "torch":
            opt = torch.optim.Adagrad(_groups(model), lr=0.1, **kw)
        else:
            lr = 0.1 if name == "float" else torch.tensor(0.1, dtype=torch.float64)
            opt = CapturableAdagrad(_groups(model), lr=lr, **kw)
        runs[name] = _train(model, opt, 50)
    _close(runs["float"], runs["torch"])
    assert all(torch.equal(a, b) for a, b in zip(runs["float"], runs["tensor"], strict=True))
    assert runs["torch"][-1].sub(runs["torch"][0]).abs().max() > 0.01  # it trained


def test_adagrad_checkpoints_load_either_way():
    """10 steps of one class, its state dict loaded into the other, 10 more: torch's 20 steps, both ways."""
    model = _model()
    full = _train(model, torch.optim.Adagrad(_groups(model), lr=0.1, lr_decay=0.05), 20)
    for first, second in ((torch.optim.Adagrad, CapturableAdagrad), (CapturableAdagrad, torch.optim.Adagrad)):
        model = _model()
        opt = first(_groups(model), lr=0.1, lr_decay=0.05)
        _train(model, opt, 10)
        resumed = second(_groups(model), lr=0.1, lr_decay=0.05)
        resumed.load_state_dict(opt.state_dict())
        later = _train(model, resumed, 10)
        _close(later, full[10:])
        assert all(float(s["step"]) == 20 for s in resumed.state.values())


def _one_cycle_like(optimizer, t: int, peak: float) -> None:
    """A new learning rate and momentum every step, as one-cycle writes them; as device tensors where the
    group holds tensors."""
    lr, mu = peak * (1 + 0.5 * math.sin(t / 5.0)), 0.85 + 0.1 * (t % 7) / 6
    for group in optimizer.param_groups:
        if isinstance(group["momentum"], torch.Tensor):
            group["lr"].fill_(lr)
            group["momentum"].fill_(mu)
        else:
            group["lr"], group["momentum"] = lr, mu


@pytest.mark.parametrize(
    "cls,kw",
    [
        (DeviceMomentumSGD, {}),
        (DeviceMomentumSGD, {"nesterov": True}),
        (DeviceMomentumSGD, {"dampening": 0.3}),
        (DeviceMomentumSGD, {"maximize": True}),
        (DeviceMomentumRMSprop, {}),
        (DeviceMomentumRMSprop, {"centered": True, "alpha": 0.9}),
        (DeviceMomentumRMSprop, {"maximize": True, "eps": 1e-4}),
    ],
    ids=["sgd", "nesterov", "dampening", "sgd-maximize", "rmsprop", "rmsprop-centered", "rmsprop-maximize"],
)
def test_device_momentum_forms_are_torchs_step_with_the_same_schedule(cls, kw):
    """50 steps, learning rate and momentum changed before every step: DeviceMomentumSGD and
    DeviceMomentumRMSprop with both as tensors follow torch's SGD and RMSprop with both as floats."""
    runs = {}
    lr = 0.05 if cls is DeviceMomentumSGD else 0.005
    for name in ("torch", "device"):
        model = _model()
        if name == "torch":
            torchs = torch.optim.SGD if cls is DeviceMomentumSGD else torch.optim.RMSprop
            opt = torchs(_groups(model), lr=lr, momentum=0.9, **kw)
        else:
            opt = cls(_groups(model), lr=lr, momentum=0.9, **kw)
            for group in opt.param_groups:  # what cifarlab.step swaps in for a run with a cycled momentum
                group["lr"] = torch.tensor(lr, dtype=torch.float64)
                group["momentum"] = torch.tensor(0.9)
        runs[name] = _train(model, opt, 50, schedule=partial(_one_cycle_like, peak=lr))
    _close(runs["device"], runs["torch"])
    assert runs["torch"][-1].sub(runs["torch"][0]).abs().max() > 0.01


def test_optimizer_for_capture_builds_cifarlabs_forms_where_torch_has_none():
    model = _model()
    assert type(optimizer_for_capture(partial(torch.optim.Adagrad, lr=0.1), model.parameters())) is (
        CapturableAdagrad
    )
    sgd = partial(torch.optim.SGD, lr=0.1, momentum=0.9)
    assert type(optimizer_for_capture(sgd, model.parameters(), device_momentum=True)) is DeviceMomentumSGD
    assert type(optimizer_for_capture(sgd, model.parameters())) is torch.optim.SGD  # fused: momentum fixed
    rmsprop = partial(torch.optim.RMSprop, lr=0.1, momentum=0.9)
    assert (
        type(optimizer_for_capture(rmsprop, model.parameters(), device_momentum=True))
        is DeviceMomentumRMSprop
    )
    adam = optimizer_for_capture(partial(torch.optim.Adam, lr=0.1), model.parameters(), device_momentum=True)
    assert adam.param_groups[0]["foreach"] is False and adam.param_groups[0]["capturable"] is True
