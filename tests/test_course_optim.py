"""The course optimizers (cifarlab.optim) against independent references.

* Where a course rule coincides with torch.optim (Momentum, Nesterov ↔ SGD; Adam ↔ Adam) the two must
  give the same float64 parameter trajectories to 1e-6 over hundreds of steps on random problems.
* Elsewhere the reference is a NumPy float64 transcription of the lecture's formula, written here.
"""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from torch import nn

from cifarlab.model import parameter_groups
from cifarlab.optim import (
    COURSE_OPTIMIZERS,
    AdaGrad,
    Adam,
    DecayedGD,
    EMAMomentum,
    GradScaledGD,
    Momentum,
    Nesterov,
    RMSProp,
)

STEPS = 300
ATOL = 1e-6


# ----------------------------------------------------------------------------------------------------------
# Random problems: nn.Modules with a ≥2-D weight and a 1-D bias (so parameter_groups gives two groups),
# and a full-batch loss.
# ----------------------------------------------------------------------------------------------------------
class Quadratic(nn.Module):
    """f(z) = ½ zᵀAz − cᵀz with z = [W.flatten(), b], A symmetric positive definite (λ ∈ ~[0.1, 4])."""

    def __init__(self, seed: int, shape: tuple[int, int] = (4, 3), n_bias: int = 5) -> None:
        super().__init__()
        rng = np.random.default_rng(seed)
        n = shape[0] * shape[1] + n_bias
        m = rng.normal(size=(n, n))
        self.A = m @ m.T / n + 0.1 * np.eye(n)
        self.c = rng.normal(size=n)
        self.n_weight = shape[0] * shape[1]
        self.weight = nn.Parameter(torch.from_numpy(rng.normal(size=shape)))
        self.bias = nn.Parameter(torch.from_numpy(rng.normal(size=n_bias)))
        self._A, self._c = torch.from_numpy(self.A), torch.from_numpy(self.c)

    def z(self) -> torch.Tensor:
        return torch.cat([self.weight.flatten(), self.bias])

    def loss(self) -> torch.Tensor:
        z = self.z()
        return 0.5 * z @ self._A @ z - self._c @ z

    # NumPy side of the same problem (for the formula transcriptions)
    def z0(self) -> np.ndarray:
        return self.z().detach().numpy().copy()

    def grad_np(self, z: np.ndarray) -> np.ndarray:
        return self.A @ z - self.c

    def wd_vector(self, wd_weight: float, wd_bias: float) -> np.ndarray:
        return np.r_[np.full(self.n_weight, wd_weight), np.full(self.z().numel() - self.n_weight, wd_bias)]


class LinReg(nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.net = nn.Linear(6, 2).double()
        self.x = torch.randn(64, 6, generator=g, dtype=torch.float64)
        self.y = self.x @ torch.randn(6, 2, generator=g, dtype=torch.float64) + 0.1 * torch.randn(
            64, 2, generator=g, dtype=torch.float64
        )

    def loss(self) -> torch.Tensor:
        return ((self.net(self.x) - self.y) ** 2).mean()


class MLP(nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3)).double()
        g = torch.Generator().manual_seed(seed + 1)
        self.x = torch.randn(32, 5, generator=g, dtype=torch.float64)
        self.y = torch.randn(32, 3, generator=g, dtype=torch.float64)

    def loss(self) -> torch.Tensor:
        return ((self.net(self.x) - self.y) ** 2).mean()


PROBLEMS = {"quadratic": Quadratic, "linreg": LinReg, "mlp": MLP}


def flat(model: nn.Module) -> np.ndarray:
    return torch.cat([p.detach().flatten() for p in model.parameters()]).numpy().copy()


def torch_trajectory(model: nn.Module, opt: torch.optim.Optimizer, steps: int = STEPS) -> np.ndarray:
    """Parameters after every step, shape (steps, n_params); uses a closure like LBFGS-style callers."""

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = model.loss()
        loss.backward()
        return loss

    out = []
    for _ in range(steps):
        loss = opt.step(closure)
        assert loss is not None and torch.isfinite(loss)
        out.append(flat(model))
    return np.stack(out)


def assert_same_trajectory(a: np.ndarray, b: np.ndarray) -> None:
    assert a.shape == b.shape
    assert np.isfinite(a).all() and np.isfinite(b).all()
    np.testing.assert_allclose(a, b, rtol=0, atol=ATOL)
    # the runs must actually move, or the comparison proves nothing
    assert np.abs(a[-1] - a[0]).max() > 1e-2


# ----------------------------------------------------------------------------------------------------------
# 1. Against torch.optim (same algebra, different bookkeeping)
# ----------------------------------------------------------------------------------------------------------
TORCH_TWINS = {
    "momentum": (
        lambda g, wd: Momentum(g, lr=0.05, momentum=0.9, weight_decay=wd),
        lambda g, wd: torch.optim.SGD(g, lr=0.05, momentum=0.9, weight_decay=wd),
    ),
    "momentum_0.5": (
        lambda g, wd: Momentum(g, lr=0.1, momentum=0.5, weight_decay=wd),
        lambda g, wd: torch.optim.SGD(g, lr=0.1, momentum=0.5, weight_decay=wd),
    ),
    "plain_gd": (
        lambda g, wd: Momentum(g, lr=0.1, momentum=0.0, weight_decay=wd),
        lambda g, wd: torch.optim.SGD(g, lr=0.1, weight_decay=wd),
    ),
    "nesterov": (
        lambda g, wd: Nesterov(g, lr=0.05, momentum=0.9, weight_decay=wd),
        lambda g, wd: torch.optim.SGD(g, lr=0.05, momentum=0.9, nesterov=True, weight_decay=wd),
    ),
    "adam": (
        lambda g, wd: Adam(g, lr=0.01, betas=(0.9, 0.999), eps=1e-8, weight_decay=wd),
        lambda g, wd: torch.optim.Adam(g, lr=0.01, betas=(0.9, 0.999), eps=1e-8, weight_decay=wd),
    ),
    "adam_betas": (
        lambda g, wd: Adam(g, lr=0.02, betas=(0.8, 0.99), eps=1e-6, weight_decay=wd),
        lambda g, wd: torch.optim.Adam(g, lr=0.02, betas=(0.8, 0.99), eps=1e-6, weight_decay=wd),
    ),
}


@pytest.mark.parametrize("problem", sorted(PROBLEMS))
@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
@pytest.mark.parametrize("twin", sorted(TORCH_TWINS))
def test_matches_torch_optim(twin: str, weight_decay: float, problem: str) -> None:
    ours, theirs = TORCH_TWINS[twin]
    m1, m2 = PROBLEMS[problem](seed=3), PROBLEMS[problem](seed=3)
    m1.load_state_dict(m2.state_dict())
    # the project's two groups: weights with decay, biases without
    t1 = torch_trajectory(m1, ours(parameter_groups(m1, weight_decay), weight_decay))
    t2 = torch_trajectory(m2, theirs(parameter_groups(m2, weight_decay), weight_decay))
    assert_same_trajectory(t1, t2)


@pytest.mark.parametrize("twin", ["momentum", "nesterov", "adam"])
def test_matches_torch_optim_with_decay_on_every_group(twin: str) -> None:
    ours, theirs = TORCH_TWINS[twin]
    m1, m2 = MLP(seed=5), MLP(seed=5)
    t1 = torch_trajectory(m1, ours(m1.parameters(), 0.1))
    t2 = torch_trajectory(m2, theirs(m2.parameters(), 0.1))
    assert_same_trajectory(t1, t2)


def test_momentum_buffer_is_minus_sgd_buffer_times_lr() -> None:
    """The sign/scale convention: the course's m equals −η·b of torch.optim.SGD (dampening 0)."""
    lr = 0.05
    m1, m2 = MLP(seed=1), MLP(seed=1)
    o1 = Momentum(m1.parameters(), lr=lr, momentum=0.9)
    o2 = torch.optim.SGD(m2.parameters(), lr=lr, momentum=0.9)
    torch_trajectory(m1, o1, steps=50)
    torch_trajectory(m2, o2, steps=50)
    for p1, p2 in zip(m1.parameters(), m2.parameters(), strict=True):
        m = o1.state[p1]["momentum_buffer"]
        b = o2.state[p2]["momentum_buffer"]
        torch.testing.assert_close(m, -lr * b, rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------------------------------------
# 2. Against NumPy transcriptions of the lecture's formulas (everything is element-wise, so per-group
#    weight decay is simply a per-element vector `wd`, and the L2 term is g ← g + wd·θ).
# ----------------------------------------------------------------------------------------------------------
def np_ema_momentum(lr, beta):
    def update(theta, g, st):
        st["v"] = beta * st.get("v", 0.0) + (1 - beta) * g
        return theta - lr * st["v"]

    return update


def np_momentum(lr, mu):
    def update(theta, g, st):
        st["m"] = mu * st.get("m", 0.0) - lr * g
        return theta + st["m"]

    return update


def np_nesterov(lr, mu):
    def update(theta, g, st):
        st["m"] = mu * st.get("m", 0.0) - lr * g
        return theta + mu * st["m"] - lr * g

    return update


def np_adagrad(lr, eps=1e-6):
    def update(theta, g, st):
        st["G"] = st.get("G", 0.0) + g**2
        return theta - lr * g / np.sqrt(st["G"] + eps)

    return update


def np_rmsprop(lr, rho, eps=1e-6):
    def update(theta, g, st):
        st["G"] = rho * st.get("G", 0.0) + (1 - rho) * g**2
        return theta - lr * g / np.sqrt(st["G"] + eps)

    return update


def np_adam(lr, beta1, beta2, eps=1e-8, bias_correction=True):
    def update(theta, g, st):
        st["t"] = st.get("t", 0) + 1
        st["v"] = beta1 * st.get("v", 0.0) + (1 - beta1) * g
        st["s"] = beta2 * st.get("s", 0.0) + (1 - beta2) * g**2
        if bias_correction:
            v_hat = st["v"] / (1 - beta1 ** st["t"])
            s_hat = st["s"] / (1 - beta2 ** st["t"])
        else:
            v_hat, s_hat = st["v"], st["s"]
        return theta - lr * v_hat / (np.sqrt(s_hat) + eps)

    return update


def np_decayed_gd(lr, decay):
    def update(theta, g, st):
        st["eta"] = decay * st.get("eta", lr)  # α ← 0.99·α before the step
        return theta - st["eta"] * g

    return update


def np_grad_scaled_gd(lr, c):
    def update(theta, g, st):
        st["eta"] = st.get("eta", np.full_like(theta, lr)) / (1 + c * np.sqrt(np.abs(g)))
        return theta - st["eta"] * g

    return update


def np_trajectory(update, problem: Quadratic, wd: np.ndarray, steps: int = STEPS) -> np.ndarray:
    theta, st, out = problem.z0(), {}, []
    for _ in range(steps):
        g = problem.grad_np(theta) + wd * theta
        theta = update(theta, g, st)
        out.append(theta.copy())
    return np.stack(out)


FORMULA_CASES = {
    "ema_momentum": (lambda: np_ema_momentum(0.1, 0.9), lambda g: EMAMomentum(g, lr=0.1, beta=0.9)),
    "ema_momentum_0.5": (lambda: np_ema_momentum(0.2, 0.5), lambda g: EMAMomentum(g, lr=0.2, beta=0.5)),
    "momentum": (lambda: np_momentum(0.05, 0.9), lambda g: Momentum(g, lr=0.05, momentum=0.9)),
    "nesterov": (lambda: np_nesterov(0.05, 0.9), lambda g: Nesterov(g, lr=0.05, momentum=0.9)),
    "adagrad": (lambda: np_adagrad(0.3), lambda g: AdaGrad(g, lr=0.3)),
    "adagrad_eps": (lambda: np_adagrad(0.3, eps=0.5), lambda g: AdaGrad(g, lr=0.3, eps=0.5)),
    # RMSProp with the lecture's ε = 1e-6 and a short memory (ρ = 0.9) is chaotic near the optimum: when a
    # gradient component crosses 0 after G has decayed, g/√(G+ε) amplifies differences by up to η/√ε per
    # step, so even float64 rounding grows to ~1e-3 between two exact implementations.  These settings
    # stay out of that regime.
    "rmsprop": (lambda: np_rmsprop(0.001, 0.9), lambda g: RMSProp(g)),  # the class defaults
    "rmsprop_rho0.999": (lambda: np_rmsprop(0.01, 0.999), lambda g: RMSProp(g, lr=0.01, rho=0.999)),
    "rmsprop_rho0.9": (
        lambda: np_rmsprop(0.005, 0.9, 1e-4),
        lambda g: RMSProp(g, lr=0.005, rho=0.9, eps=1e-4),
    ),
    "rmsprop_eps": (lambda: np_rmsprop(0.02, 0.99, 0.3), lambda g: RMSProp(g, lr=0.02, rho=0.99, eps=0.3)),
    "adam": (lambda: np_adam(0.01, 0.9, 0.999), lambda g: Adam(g, lr=0.01)),
    "adam_no_bias_correction": (
        lambda: np_adam(0.01, 0.9, 0.999, bias_correction=False),
        lambda g: Adam(g, lr=0.01, bias_correction=False),
    ),
    "adam_no_bc_betas": (
        lambda: np_adam(0.005, 0.8, 0.99, eps=1e-3, bias_correction=False),
        lambda g: Adam(g, lr=0.005, betas=(0.8, 0.99), eps=1e-3, bias_correction=False),
    ),
    "decayed_gd": (lambda: np_decayed_gd(0.2, 0.99), lambda g: DecayedGD(g, lr=0.2, decay=0.99)),
    "decayed_gd_slow": (lambda: np_decayed_gd(0.1, 0.999), lambda g: DecayedGD(g, lr=0.1, decay=0.999)),
    "grad_scaled_gd": (lambda: np_grad_scaled_gd(0.3, 0.5), lambda g: GradScaledGD(g, lr=0.3, c=0.5)),
    "grad_scaled_gd_c0.1": (lambda: np_grad_scaled_gd(0.2, 0.1), lambda g: GradScaledGD(g, lr=0.2, c=0.1)),
}


@pytest.mark.parametrize("wd_weight, wd_bias", [(0.0, 0.0), (0.1, 0.1), (0.1, 0.0), (0.0, 0.3)])
@pytest.mark.parametrize("case", sorted(FORMULA_CASES))
def test_matches_numpy_formula(case: str, wd_weight: float, wd_bias: float) -> None:
    make_ref, make_opt = FORMULA_CASES[case]
    problem = Quadratic(seed=7)
    groups = [
        {"params": [problem.weight], "weight_decay": wd_weight},
        {"params": [problem.bias], "weight_decay": wd_bias},
    ]
    ours = torch_trajectory(problem, make_opt(groups))
    ref = np_trajectory(make_ref(), Quadratic(seed=7), problem.wd_vector(wd_weight, wd_bias))
    assert_same_trajectory(ours, ref)


def test_epsilon_inside_the_square_root_matters() -> None:
    """Sanity check of the references: AdaGrad/RMSProp with ε outside √ (torch's choice) are different."""
    problem = Quadratic(seed=2)
    ours = torch_trajectory(problem, RMSProp(problem.parameters(), lr=0.01, rho=0.9, eps=1e-2), steps=100)
    p2 = Quadratic(seed=2)
    theirs = torch_trajectory(
        p2, torch.optim.RMSprop(p2.parameters(), lr=0.01, alpha=0.9, eps=1e-2), steps=100
    )
    assert np.abs(ours - theirs).max() > 1e-3


def test_weight_decay_per_group_is_applied_only_where_asked() -> None:
    """On a separable problem, the group with weight_decay=0 follows *exactly* the decay-free trajectory
    while the group with decay departs from it."""
    torch.manual_seed(0)
    w0, b0 = torch.randn(3, 2, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    target_w, target_b = torch.randn(3, 2, dtype=torch.float64), torch.randn(4, dtype=torch.float64)

    def run(opt_cls, wd_w, wd_b, **kw):
        w, b = nn.Parameter(w0.clone()), nn.Parameter(b0.clone())
        opt = opt_cls([{"params": [w], "weight_decay": wd_w}, {"params": [b], "weight_decay": wd_b}], **kw)
        for _ in range(100):
            opt.zero_grad()
            (((w - target_w) ** 2).sum() + ((b - target_b) ** 2).sum()).backward()
            opt.step()
        return w.detach(), b.detach()

    for name, cls in COURSE_OPTIMIZERS.items():
        w_dec, b_dec = run(cls, 0.5, 0.0, lr=0.01)
        w_free, b_free = run(cls, 0.0, 0.0, lr=0.01)
        assert torch.equal(b_dec, b_free), name
        assert (w_dec - w_free).abs().max() > 1e-4, name


# ----------------------------------------------------------------------------------------------------------
# 3. Mechanics: state_dict round trip, closure, constructor, dtype/device
# ----------------------------------------------------------------------------------------------------------
DEFAULT_KW = {
    "ema_momentum": {"lr": 0.05},
    "momentum": {"lr": 0.02},
    "nesterov": {"lr": 0.02},
    "adagrad": {"lr": 0.1},
    "rmsprop": {"lr": 0.01},
    "adam": {"lr": 0.01},
    "decayed_gd": {"lr": 0.1, "decay": 0.995},
    "grad_scaled_gd": {"lr": 0.1, "c": 0.2},
}


@pytest.mark.parametrize("name", sorted(COURSE_OPTIMIZERS))
def test_state_dict_resume_is_identical(name: str) -> None:
    cls = COURSE_OPTIMIZERS[name]
    model = MLP(seed=11)
    opt = cls(parameter_groups(model, 0.01), **DEFAULT_KW[name])
    torch_trajectory(model, opt, steps=40)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    straight = torch_trajectory(model, opt, steps=40)

    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    model2 = MLP(seed=99)  # different init: everything must come from the checkpoint
    model2.x, model2.y = model.x, model.y  # (same data)
    model2.load_state_dict(ckpt["model"])
    opt2 = cls(parameter_groups(model2, 0.01), **DEFAULT_KW[name])
    opt2.load_state_dict(ckpt["opt"])
    resumed = torch_trajectory(model2, opt2, steps=40)
    np.testing.assert_array_equal(straight, resumed)
    assert np.abs(straight[-1] - straight[0]).max() > 1e-4


@pytest.mark.parametrize("name", sorted(COURSE_OPTIMIZERS))
def test_defaults_step_without_closure_and_float32(name: str) -> None:
    """Every constructor argument but params has a default; step() works without closure; grads are
    left untouched by weight decay; params without grads are skipped."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    unused = nn.Parameter(torch.ones(3))
    opt = COURSE_OPTIMIZERS[name]([*parameter_groups(net, 1e-2), {"params": [unused], "weight_decay": 0.1}])
    x, y = torch.randn(16, 4), torch.randn(16, 2)
    before = [p.detach().clone() for p in net.parameters()]
    for _ in range(3):
        opt.zero_grad()
        nn.functional.mse_loss(net(x), y).backward()
        grads = [p.grad.clone() for p in net.parameters()]
        assert opt.step() is None
        assert all(torch.equal(g, p.grad) for g, p in zip(grads, net.parameters(), strict=True))
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in net.parameters())
    assert any(not torch.equal(b, p) for b, p in zip(before, net.parameters(), strict=True))
    assert torch.equal(unused, torch.ones(3)) and not opt.state[unused]


def test_signatures_have_config_friendly_defaults() -> None:
    import inspect

    for name, cls in COURSE_OPTIMIZERS.items():
        params = list(inspect.signature(cls.__init__).parameters.values())[1:]
        assert params[0].name == "params" and params[0].default is inspect.Parameter.empty, name
        for p in params[1:]:
            assert p.default is not inspect.Parameter.empty, (name, p.name)
            assert isinstance(p.default, (float, int, bool, tuple)), (name, p.name, p.default)
        names = {p.name for p in params}
        assert {"lr", "weight_decay"} <= names, name


@pytest.mark.parametrize(
    "make",
    [
        lambda p: Momentum(p, lr=-1.0),
        lambda p: Momentum(p, momentum=1.0),
        lambda p: EMAMomentum(p, beta=-0.1),
        lambda p: RMSProp(p, rho=1.5),
        lambda p: AdaGrad(p, eps=-1.0),
        lambda p: Adam(p, betas=(0.9, 1.0)),
        lambda p: Adam(p, betas=(0.9,)),
        lambda p: DecayedGD(p, decay=1.1),
        lambda p: GradScaledGD(p, c=-1.0),
        lambda p: Nesterov(p, weight_decay=-0.1),
    ],
)
def test_invalid_hyperparameters_are_rejected(make) -> None:
    with pytest.raises(ValueError, match="invalid"):
        make([nn.Parameter(torch.zeros(2))])


def test_adam_accepts_list_betas_from_configs() -> None:
    p = nn.Parameter(torch.zeros(2))
    assert Adam([p], betas=[0.8, 0.9]).param_groups[0]["betas"] == (0.8, 0.9)


def test_decayed_gd_step_sizes_are_geometric() -> None:
    """x ← x − η_t·1 with η_t = η₀·K^t, t = 1, 2, …: after n steps x = −η₀·Σ K^t."""
    x = nn.Parameter(torch.zeros(1, dtype=torch.float64))
    opt = DecayedGD([x], lr=1.0, decay=0.5)
    for _ in range(10):
        x.grad = torch.ones_like(x)
        opt.step()
    assert math.isclose(x.item(), -sum(0.5**t for t in range(1, 11)), rel_tol=1e-15)
    assert opt.param_groups[0]["lr"] == 1.0  # the base rate is left alone


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", sorted(COURSE_OPTIMIZERS))
def test_cuda_matches_cpu(name: str) -> None:
    cls = COURSE_OPTIMIZERS[name]
    m_cpu, m_gpu = MLP(seed=4), MLP(seed=4)
    m_gpu.cuda()
    m_gpu.x, m_gpu.y = m_gpu.x.cuda(), m_gpu.y.cuda()
    t_cpu = torch_trajectory(m_cpu, cls(parameter_groups(m_cpu, 0.01), **DEFAULT_KW[name]), steps=50)

    opt = cls(parameter_groups(m_gpu, 0.01), **DEFAULT_KW[name])
    out = []
    for _ in range(50):
        opt.zero_grad()
        m_gpu.loss().backward()
        opt.step()
        out.append(torch.cat([p.detach().flatten() for p in m_gpu.parameters()]).cpu().numpy())
    np.testing.assert_allclose(np.stack(out), t_cpu, rtol=0, atol=1e-9)


# ----------------------------------------------------------------------------------------------------------
# 4. conf/optimizer/course/<name>.yaml: composes, instantiates the class, and documents the class defaults
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(COURSE_OPTIMIZERS))
def test_course_optimizer_config_composes(name: str) -> None:
    import inspect

    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from tests.conftest import CONF, compose_train

    cls = COURSE_OPTIMIZERS[name]
    yaml_keys = set(OmegaConf.load(CONF / "optimizer" / "course" / f"{name}.yaml")) - {"defaults"}
    assert "weight_decay" not in yaml_keys and "_target_" not in yaml_keys
    cfg = compose_train([f"optimizer=course/{name}"])
    signature = inspect.signature(cls.__init__).parameters
    for key in yaml_keys:  # the yaml repeats the class's (course) defaults
        default = signature[key].default
        value = cfg.optimizer[key]
        assert (list(default) if isinstance(default, tuple) else default) == value, (name, key)
    net = nn.Linear(3, 2)
    opt = instantiate(cfg.optimizer)(parameter_groups(net, 0.01))
    assert type(opt) is cls
    assert [g["weight_decay"] for g in opt.param_groups] == [0.01, 0.0]
    assert opt.param_groups[0]["lr"] == signature["lr"].default


def test_course_optimizer_config_overrides() -> None:
    from hydra.utils import instantiate

    from tests.conftest import compose_train

    cfg = compose_train(
        ["optimizer=course/adam", "optimizer.betas=[0.8,0.99]", "optimizer.bias_correction=false"]
    )
    opt = instantiate(cfg.optimizer)([nn.Parameter(torch.zeros(2))])
    assert opt.defaults["betas"] == (0.8, 0.99) and opt.defaults["bias_correction"] is False
    cfg = compose_train(["optimizer=course/rmsprop", "optimizer.lr=3e-4", "optimizer.rho=0.99"])
    opt = instantiate(cfg.optimizer)([nn.Parameter(torch.zeros(2))])
    assert isinstance(opt, RMSProp) and opt.defaults["lr"] == 3e-4 and opt.defaults["rho"] == 0.99
