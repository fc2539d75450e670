"""The lecture's 1-D gradient-descent pictures, computed with the course optimizers (cifarlab.optim).

Every run optimises a 1-element float64 tensor with a real ``torch.optim.Optimizer`` from
``cifarlab.optim`` and autograd gradients, so the pictures double as a check of the optimizers:

* f(x) = x² from x₀ = 1.5, 10 steps, η ∈ {0.1, 0.3, 0.9, 1.0} (x ← (1 − 2η)·x: converge, converge fast,
  oscillate while converging, oscillate ±1.5 for ever);
* the quartic f(x) = 319/8400·x⁴ + 43/4200·x³ − 6799/8400·x² − 299/840·x + 6 (global minimum near 3.27,
  local minimum near −3.25) from x₀ = ±5: plain gradient descent (η = 0.1, 100 steps), momentum
  μ = 0.1 and μ = 0.9, learning-rate decay (``DecayedGD``) and gradient-scaled control (``GradScaledGD``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from cifarlab.optim import DecayedGD, GradScaledGD, Momentum

# f(x) = 319/8400·x⁴ + 43/4200·x³ − 6799/8400·x² − 299/840·x + 6, highest power first (numpy.poly1d order)
QUARTIC = (Fraction(319, 8400), Fraction(43, 4200), Fraction(-6799, 8400), Fraction(-299, 840), Fraction(6))
QUARTIC_TEXT = "f(x) = 319/8400·x⁴ + 43/4200·x³ − 6799/8400·x² − 299/840·x + 6"
_QUARTIC_F = tuple(float(c) for c in QUARTIC)


def parabola(x: torch.Tensor) -> torch.Tensor:
    return x**2


def quartic(x: torch.Tensor) -> torch.Tensor:
    a4, a3, a2, a1, a0 = _QUARTIC_F
    return a4 * x**4 + a3 * x**3 + a2 * x**2 + a1 * x + a0


def quartic_np(x: np.ndarray | float) -> np.ndarray | float:
    return np.polyval(_QUARTIC_F, x)


def quartic_critical_points() -> dict[str, float]:
    """Roots of f′ (numpy), classified by f″: ``global_min``, ``local_min`` and ``local_max``."""
    poly = np.poly1d(_QUARTIC_F)
    roots = np.sort(np.real(poly.deriv().roots[np.abs(np.imag(poly.deriv().roots)) < 1e-12]))
    minima = [float(r) for r in roots if poly.deriv(2)(r) > 0]
    maxima = [float(r) for r in roots if poly.deriv(2)(r) < 0]
    if len(minima) != 2 or len(maxima) != 1:
        raise AssertionError(f"unexpected critical points of the quartic: {roots}")
    minima.sort(key=poly)
    return {"global_min": minima[0], "local_min": minima[1], "local_max": maxima[0]}


@dataclass
class Run:
    """One 1-D optimisation: ``xs`` holds x₀ … x_steps."""

    name: str
    problem: str  # "parabola" | "quartic"
    label: str  # the optimizer and its settings, for humans
    x0: float
    steps: int
    xs: list[float] = field(default_factory=list)

    @property
    def final(self) -> float:
        return self.xs[-1]


def run_1d(
    f: Callable[[torch.Tensor], torch.Tensor],
    opt_cls: type[torch.optim.Optimizer],
    x0: float,
    steps: int,
    **opt_kwargs: float,
) -> list[float]:
    """Minimise ``f`` from ``x0`` with ``opt_cls`` on a 1-element float64 tensor; return x₀ … x_steps."""
    x = torch.tensor([float(x0)], dtype=torch.float64, requires_grad=True)
    opt = opt_cls([x], **opt_kwargs)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = f(x).sum()
        loss.backward()
        return loss

    xs = [x.item()]
    for _ in range(steps):
        opt.step(closure)
        xs.append(x.item())
    return xs


def _run(name, problem, label, opt_cls, x0, steps, **kw) -> Run:
    f = parabola if problem == "parabola" else quartic
    return Run(name, problem, label, float(x0), steps, run_1d(f, opt_cls, x0, steps, **kw))


def _start(x0: float) -> str:
    return f"from{x0:+g}"


def compute_runs() -> dict[str, list[Run]]:
    """All demo runs, grouped by figure."""
    groups: dict[str, list[Run]] = {}
    groups["parabola_learning_rates"] = [
        _run(f"parabola_lr{lr}", "parabola", f"GD η={lr}", Momentum, 1.5, 10, lr=lr, momentum=0.0)
        for lr in (0.1, 0.3, 0.9, 1.0)
    ]
    starts = (5.0, -5.0)
    groups["quartic_gd"] = [
        _run(f"quartic_gd_{_start(x0)}", "quartic", "GD η=0.1", Momentum, x0, 100, lr=0.1, momentum=0.0)
        for x0 in starts
    ]
    groups["quartic_momentum"] = [
        _run(
            f"quartic_momentum{mu}_{_start(x0)}",
            "quartic",
            f"Momentum η=0.1 μ={mu}",
            Momentum,
            x0,
            100,
            lr=0.1,
            momentum=mu,
        )
        for mu in (0.1, 0.9)
        for x0 in starts
    ]
    groups["quartic_lr_decay"] = [
        *(
            _run(
                f"quartic_decayed_gd_lr0.1_{_start(x0)}",
                "quartic",
                "DecayedGD η₀=0.1 K=0.99",
                DecayedGD,
                x0,
                100,
                lr=0.1,
                decay=0.99,
            )
            for x0 in starts
        ),
        *(
            _run(
                f"quartic_gd_lr0.5_{_start(x0)}",
                "quartic",
                "GD η=0.5",
                Momentum,
                x0,
                100,
                lr=0.5,
                momentum=0.0,
            )
            for x0 in starts
        ),
        *(
            _run(
                f"quartic_decayed_gd_lr0.5_{_start(x0)}",
                "quartic",
                "DecayedGD η₀=0.5 K=0.9",
                DecayedGD,
                x0,
                100,
                lr=0.5,
                decay=0.9,
            )
            for x0 in starts
        ),
    ]
    groups["quartic_grad_scaled"] = [
        *(
            _run(
                f"quartic_grad_scaled_gd_lr0.3_{_start(x0)}",
                "quartic",
                "GradScaledGD η₀=0.3 c=0.1",
                GradScaledGD,
                x0,
                100,
                lr=0.3,
                c=0.1,
            )
            for x0 in starts
        ),
        *(
            _run(
                f"quartic_grad_scaled_gd_lr0.1_{_start(x0)}",
                "quartic",
                "GradScaledGD η₀=0.1 c=1",
                GradScaledGD,
                x0,
                100,
                lr=0.1,
                c=1.0,
            )
            for x0 in starts
        ),
        *(
            _run(
                f"quartic_grad_scaled_gd_lr0.5_{_start(x0)}",
                "quartic",
                "GradScaledGD η₀=0.5 c=0.3",
                GradScaledGD,
                x0,
                100,
                lr=0.5,
                c=0.3,
            )
            for x0 in starts
        ),
    ]
    return groups


# ---- figures -----------------------------------------------------------------------------------------


def _plot_parabola(runs: list[Run], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 8), constrained_layout=True)
    grid = np.linspace(-2.0, 2.0, 401)
    for ax, run in zip(axes.flat, runs, strict=True):
        xs = np.asarray(run.xs)
        ax.plot(grid, grid**2, color="0.6", lw=1.5, label="f(x) = x²")
        ax.plot(xs, xs**2, "-", color="tab:blue", lw=0.8, alpha=0.7)
        ax.scatter(xs, xs**2, c=np.arange(len(xs)), cmap="viridis", s=30, zorder=3, label="x₀ … x₁₀")
        ax.plot([xs[0]], [xs[0] ** 2], "o", mfc="none", mec="k", ms=10, label=f"start x₀ = {xs[0]:g}")
        ax.plot([0.0], [0.0], "*", color="tab:red", ms=15, zorder=4, label="minimum x* = 0")
        ax.set_title(f"{run.label}: x₁₀ = {run.final:.6g}")
        ax.set_xlabel("x")
        ax.set_ylabel("f(x)")
        ax.legend(loc="upper center", fontsize=8, markerscale=0.7)
    fig.suptitle("Gradient descent on f(x) = x² from x₀ = 1.5 (x ← (1 − 2η)·x)")
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_quartic(rows: list[list[Run]], title: str, path: Path, crit: dict[str, float]) -> None:
    """One row per setting: left, trajectories on f; right, x_t against t (minima as dashed lines)."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        len(rows), 2, figsize=(12, 4.2 * len(rows)), squeeze=False, constrained_layout=True
    )
    grid = np.linspace(-6.0, 6.0, 601)
    fgrid = quartic_np(grid)
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:purple"]
    for (ax_f, ax_t), runs in zip(axes, rows, strict=True):
        ax_f.plot(grid, fgrid, color="0.6", lw=1.5, label="f(x)")
        for name, marker in (("global_min", "*"), ("local_min", "v")):
            x = crit[name]
            ax_f.plot([x], [quartic_np(x)], marker, color="tab:red", ms=14, zorder=4,
                      label=f"{name.replace('_', ' ')} x* = {x:.4f}")  # fmt: skip
            ax_t.axhline(x, color="tab:red", ls="--", lw=1)
        for run, color in zip(runs, colors[: len(runs)], strict=True):
            xs = np.asarray(run.xs)
            shown = np.abs(xs) <= 6.0
            ax_f.plot(xs[shown], quartic_np(xs[shown]), ".-", color=color, lw=0.7, ms=5, alpha=0.8,
                      label=f"{run.label} from {run.x0:g} → {run.final:.4f}")  # fmt: skip
            ax_t.plot(np.arange(len(xs)), xs, "-", color=color, lw=1.5, label=f"{run.label} from {run.x0:g}")
        ax_f.set_ylim(fgrid.min() - 0.5, fgrid.max() + 0.5)
        ax_f.set_xlabel("x")
        ax_f.set_ylabel("f(x)")
        ax_f.legend(fontsize=7, loc="upper center", markerscale=0.6)
        ax_t.set_ylim(-6.5, 6.5)
        ax_t.set_xlabel("step t")
        ax_t.set_ylabel("x_t")
        ax_t.legend(fontsize=7)
    fig.suptitle(f"{title}\n{QUARTIC_TEXT}")
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_figures(groups: dict[str, list[Run]], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")

    out_dir.mkdir(parents=True, exist_ok=True)
    crit = quartic_critical_points()
    paths = []

    path = out_dir / "parabola_learning_rates.png"
    _plot_parabola(groups["parabola_learning_rates"], path)
    paths.append(path)

    def pairs(runs: list[Run]) -> list[list[Run]]:
        return [runs[i : i + 2] for i in range(0, len(runs), 2)]  # (from +5, from −5) per setting

    for key, title, rows in (
        ("quartic_gd", "Gradient descent, η = 0.1, 100 steps", [groups["quartic_gd"]]),
        (
            "quartic_momentum",
            "Momentum m ← μm − ηg, θ ← θ + m (η = 0.1, 100 steps)",
            pairs(groups["quartic_momentum"]),
        ),
        (
            "quartic_lr_decay",
            "Learning-rate decay η ← K·η before every step vs constant η (100 steps)",
            [groups["quartic_lr_decay"][:2], groups["quartic_lr_decay"][2:]],
        ),
        (
            "quartic_grad_scaled",
            "Gradient-scaled control η ← η/(1 + c·√|g|) before every step (100 steps)",
            [
                *pairs(groups["quartic_grad_scaled"][:4]),
                groups["quartic_grad_scaled"][4:] + groups["quartic_lr_decay"][2:4],  # vs GD η = 0.5
            ],
        ),
    ):
        path = out_dir / f"{key}.png"
        _plot_quartic(rows, title, path, crit)
        paths.append(path)
    return paths


def main(out_dir: Path) -> dict[str, float]:
    """Compute every run, print the table (final x as ``repr``), write the PNGs; return name → final x."""
    groups = compute_runs()
    crit = quartic_critical_points()
    print("Course demos: 1-D gradient descent with the course optimizers (float64, autograd gradients)")
    print(f"quartic {QUARTIC_TEXT}")
    for name in ("global_min", "local_min", "local_max"):
        x = crit[name]
        print(f"  {name.replace('_', ' '):<13} x = {x!r:<22} f(x) = {float(quartic_np(x))!r}")
    print()
    runs = [run for group in groups.values() for run in group]
    width = max(len(r.name) for r in runs)
    print(f"{'run':<{width}}  {'optimizer':<26} {'x0':>5} {'steps':>5}  final_x")
    for r in runs:
        print(f"{r.name:<{width}}  {r.label:<26} {r.x0:>5g} {r.steps:>5}  {r.final!r}")
    print()
    paths = write_figures(groups, out_dir)
    print(f"figures written to {out_dir}:")
    for p in paths:
        print(f"  {p}")
    return {r.name: r.final for r in runs}
