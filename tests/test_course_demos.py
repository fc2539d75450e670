"""``python -m cifarlab.course``: the 1-D demos, init-variance and gradients, against independent numbers.

The references here are plain-Python transcriptions of the lecture's update rules with the analytic
derivative of the quartic, and a bisection for its critical points; nothing is shared with the code
under test except the printed numbers.
"""

from __future__ import annotations

import math
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

# ---- independent references ------------------------------------------------------------------------------
A4, A3, A2, A1, A0 = 319 / 8400, 43 / 4200, -6799 / 8400, -299 / 840, 6.0


def f(x: float) -> float:
    return A4 * x**4 + A3 * x**3 + A2 * x**2 + A1 * x + A0


def df(x: float) -> float:
    return 4 * A4 * x**3 + 3 * A3 * x**2 + 2 * A2 * x + A1


def bisect_root(lo: float, hi: float) -> float:
    assert df(lo) * df(hi) < 0
    for _ in range(200):
        mid = (lo + hi) / 2
        if df(lo) * df(mid) <= 0:
            hi = mid
        else:
            lo = mid
    return (lo + hi) / 2


X_GLOBAL = bisect_root(2.0, 4.0)
X_LOCAL = bisect_root(-4.0, -2.0)
X_MAX = bisect_root(-1.0, 0.5)


def ref_momentum(grad, x0: float, steps: int, lr: float, mu: float) -> float:
    x, m = x0, 0.0
    for _ in range(steps):
        m = mu * m - lr * grad(x)
        x = x + m
    return x


def ref_decayed(grad, x0: float, steps: int, lr: float, decay: float) -> float:
    x, eta = x0, lr
    for _ in range(steps):
        eta = decay * eta
        x = x - eta * grad(x)
    return x


def ref_grad_scaled(grad, x0: float, steps: int, lr: float, c: float) -> float:
    x, eta = x0, lr
    for _ in range(steps):
        g = grad(x)
        eta = eta / (1 + c * math.sqrt(abs(g)))
        x = x - eta * g
    return x


def parabola_grad(x: float) -> float:
    return 2 * x


EXPECTED = {  # run name → plain-Python reference value
    **{f"parabola_lr{lr}": ref_momentum(parabola_grad, 1.5, 10, lr, 0.0) for lr in (0.1, 0.3, 0.9, 1.0)},
    **{f"quartic_gd_from{x0:+g}": ref_momentum(df, x0, 100, 0.1, 0.0) for x0 in (5.0, -5.0)},
    **{
        f"quartic_momentum{mu}_from{x0:+g}": ref_momentum(df, x0, 100, 0.1, mu)
        for mu in (0.1, 0.9)
        for x0 in (5.0, -5.0)
    },
    **{f"quartic_decayed_gd_lr0.1_from{x0:+g}": ref_decayed(df, x0, 100, 0.1, 0.99) for x0 in (5.0, -5.0)},
    **{f"quartic_gd_lr0.5_from{x0:+g}": ref_momentum(df, x0, 100, 0.5, 0.0) for x0 in (5.0, -5.0)},
    **{f"quartic_decayed_gd_lr0.5_from{x0:+g}": ref_decayed(df, x0, 100, 0.5, 0.9) for x0 in (5.0, -5.0)},
    **{
        f"quartic_grad_scaled_gd_lr{lr}_from{x0:+g}": ref_grad_scaled(df, x0, 100, lr, c)
        for lr, c in ((0.3, 0.1), (0.1, 1.0), (0.5, 0.3))
        for x0 in (5.0, -5.0)
    },
}


# ---- helpers ---------------------------------------------------------------------------------------------
def run_cli(args: list[str], cwd: Path, timeout: float = 120) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    proc = subprocess.run(
        [sys.executable, "-m", "cifarlab.course", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def parse_finals(stdout: str) -> dict[str, float]:
    """Rows of the demos table: first token the run name, last token repr(final x)."""
    out = {}
    for line in stdout.splitlines():
        tokens = line.split()
        if tokens and tokens[0].startswith(("parabola_", "quartic_")):
            out[tokens[0]] = float(tokens[-1])
    return out


def assert_png(path: Path, min_bytes: int = 10_000) -> None:
    assert path.is_file(), path
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    width, height = struct.unpack(">II", data[16:24])
    assert width >= 400 and height >= 300, (path, width, height)
    assert len(data) >= min_bytes, (path, len(data))
    import matplotlib.image

    pixels = matplotlib.image.imread(path)
    assert pixels.std() > 0.01, f"{path} looks blank"


# ---- the references themselves -----------------------------------------------------------------------------
def test_reference_minima() -> None:
    assert abs(X_GLOBAL - 3.27) < 0.01
    assert abs(X_LOCAL + 3.25) < 0.01
    assert f(X_GLOBAL) < f(X_LOCAL) < f(X_MAX)


def test_quartic_critical_points_match_bisection() -> None:
    from cifarlab.course.demos import quartic_critical_points, quartic_np

    crit = quartic_critical_points()
    assert crit["global_min"] == pytest.approx(X_GLOBAL, abs=1e-12)
    assert crit["local_min"] == pytest.approx(X_LOCAL, abs=1e-12)
    assert crit["local_max"] == pytest.approx(X_MAX, abs=1e-12)
    assert float(quartic_np(2.0)) == pytest.approx(f(2.0), rel=1e-15)


# ---- demos, in-process (fast) ----------------------------------------------------------------------------
def test_parabola_runs_are_the_closed_form() -> None:
    from cifarlab.course.demos import parabola, run_1d
    from cifarlab.optim import Momentum

    xs = run_1d(parabola, Momentum, 1.5, 10, lr=0.1, momentum=0.0)
    # x ← x − 0.1·2x, the same float64 operations as the optimizer: bit-identical
    assert xs[-1] == ref_momentum(parabola_grad, 1.5, 10, 0.1, 0.0) == 0.16106127360000003
    # the closed form 1.5·0.8^10 rounds differently (0.16106127360000008): equal to float64 precision only
    assert xs[-1] == pytest.approx(1.5 * 0.8**10, rel=1e-15) and xs[-1] != 1.5 * 0.8**10
    for t, x in enumerate(xs):
        assert x == pytest.approx(1.5 * 0.8**t, rel=1e-14)
    # η = 1: x ← x − 2x = −x, an exact oscillation ±1.5
    assert run_1d(parabola, Momentum, 1.5, 10, lr=1.0, momentum=0.0) == [1.5 * (-1) ** t for t in range(11)]
    # η = 0.9: x ← −0.8x, oscillating while converging
    xs = run_1d(parabola, Momentum, 1.5, 10, lr=0.9, momentum=0.0)
    assert all(x == pytest.approx(1.5 * (-0.8) ** t, rel=1e-14) for t, x in enumerate(xs))


@pytest.mark.parametrize(
    "name, opt, x0, kwargs",
    [
        ("quartic_gd_from+5", "Momentum", 5.0, {"lr": 0.1, "momentum": 0.0}),
        ("quartic_gd_from-5", "Momentum", -5.0, {"lr": 0.1, "momentum": 0.0}),
        ("quartic_momentum0.9_from-5", "Momentum", -5.0, {"lr": 0.1, "momentum": 0.9}),
        ("quartic_decayed_gd_lr0.5_from-5", "DecayedGD", -5.0, {"lr": 0.5, "decay": 0.9}),
        ("quartic_grad_scaled_gd_lr0.5_from+5", "GradScaledGD", 5.0, {"lr": 0.5, "c": 0.3}),
    ],
)
def test_quartic_runs_match_plain_python(name: str, opt: str, x0: float, kwargs: dict) -> None:
    from cifarlab import optim
    from cifarlab.course.demos import quartic, run_1d

    xs = run_1d(quartic, getattr(optim, opt), x0, 100, **kwargs)
    assert len(xs) == 101 and xs[0] == x0
    assert xs[-1] == pytest.approx(EXPECTED[name], rel=1e-9)


# ---- demos, the real command (slow: ~10 s of plotting) -----------------------------------------------------
@pytest.mark.slow
def test_demos_command(tmp_path: Path) -> None:
    out = tmp_path / "figs"
    stdout = run_cli(["demos", "--out", str(out)], cwd=tmp_path, timeout=300)
    finals = parse_finals(stdout)
    assert set(finals) == set(EXPECTED)
    for name, expected in EXPECTED.items():
        assert finals[name] == pytest.approx(expected, rel=1e-9, abs=1e-12), name

    # the lecture's story, as measured
    assert finals["parabola_lr0.1"] == pytest.approx(1.5 * 0.8**10, rel=1e-15)
    assert finals["parabola_lr0.3"] == pytest.approx(1.5 * 0.4**10, rel=1e-14)
    assert finals["parabola_lr0.9"] == pytest.approx(1.5 * 0.8**10, rel=1e-14)  # (−0.8)^10
    assert finals["parabola_lr1.0"] == 1.5  # ±1.5 for ever
    # plain GD (η = 0.1) falls into the nearest minimum
    assert finals["quartic_gd_from+5"] == pytest.approx(X_GLOBAL, abs=1e-9)
    assert finals["quartic_gd_from-5"] == pytest.approx(X_LOCAL, abs=1e-9)
    # small momentum changes nothing; μ = 0.9 carries the run from −5 over the hump into the global
    # minimum's basin (still oscillating around it after 100 steps)
    assert finals["quartic_momentum0.1_from-5"] == pytest.approx(X_LOCAL, abs=1e-9)
    assert finals["quartic_momentum0.9_from-5"] == pytest.approx(X_GLOBAL, abs=0.02)
    assert finals["quartic_momentum0.9_from+5"] == pytest.approx(X_GLOBAL, abs=0.05)
    # decay with the course's K = 0.99 still converges; with η = 0.5 constant GD jumps to the other basin
    assert finals["quartic_decayed_gd_lr0.1_from+5"] == pytest.approx(X_GLOBAL, abs=1e-8)
    assert finals["quartic_gd_lr0.5_from+5"] == pytest.approx(X_LOCAL, abs=1e-9)
    assert finals["quartic_gd_lr0.5_from-5"] == pytest.approx(X_GLOBAL, abs=1e-9)
    # K = 0.9 freezes the rate before the −5 run arrives; c = 1 brakes the rate for good near the start
    assert X_LOCAL < finals["quartic_decayed_gd_lr0.5_from-5"] < X_LOCAL + 0.1
    assert finals["quartic_grad_scaled_gd_lr0.1_from+5"] > 4.5
    assert finals["quartic_grad_scaled_gd_lr0.3_from-5"] == pytest.approx(X_LOCAL, abs=1e-9)
    assert 3.0 < finals["quartic_grad_scaled_gd_lr0.5_from+5"] < X_GLOBAL  # braked: stays in its basin

    for name in (
        "parabola_learning_rates",
        "quartic_gd",
        "quartic_momentum",
        "quartic_lr_decay",
        "quartic_grad_scaled",
    ):
        assert_png(out / f"{name}.png")
    assert str(out) in stdout.splitlines()[-6]  # "figures written to <out>:" then the files
    assert {p.name for p in tmp_path.iterdir()} == {"figs"}  # nothing written elsewhere


# ---- init-variance ---------------------------------------------------------------------------------------
def test_init_variance_measure_matches_theory() -> None:
    from cifarlab.course.init_variance import measure, theory, widths

    assert widths()[0] == 1 and widths()[-1] == 10_000 and len(widths()) >= 10
    rows = measure([10, 100, 1000], n_out=50, batch=128)
    for row in rows:
        for scheme in ("normal", "xavier", "he"):
            assert row.measured[scheme] == pytest.approx(theory(scheme, row.n_in, 50), rel=0.25), (
                row,
                scheme,
            )
    assert theory("normal", 1000, 50) == 1000
    assert theory("xavier", 50, 50) == 1.0
    assert theory("he", 7, 50) == 2.0


@pytest.mark.slow
def test_init_variance_command_default_out(tmp_path: Path) -> None:
    stdout = run_cli(["init-variance"], cwd=tmp_path)
    png = tmp_path / "course_figures" / "init_variance.png"
    assert_png(png)
    assert str(Path("course_figures") / "init_variance.png") in stdout.splitlines()[-1]
    rows = {}
    for line in stdout.splitlines():
        tokens = line.split()
        if len(tokens) == 7 and tokens[0].isdigit():
            rows[int(tokens[0])] = [float(t) for t in tokens[1:]]
    assert min(rows) == 1 and max(rows) == 10_000 and len(rows) >= 10
    big = rows[10_000]  # N(0,1) measured/theory, Xavier measured/theory, He measured/theory
    assert big[1] == 10_000 and big[0] == pytest.approx(10_000, rel=0.1)
    assert big[3] == pytest.approx(2 * 10_000 / 10_100, rel=1e-3) and big[2] == pytest.approx(big[3], rel=0.1)
    assert big[5] == 2 and big[4] == pytest.approx(2, rel=0.1)


# ---- gradients -------------------------------------------------------------------------------------------
def test_gradients_vanish_with_sigmoid_and_default_init(tmp_path: Path, capsys) -> None:
    from cifarlab.course import gradients

    runs = gradients.main(tmp_path, steps=20, plot_figure=False)
    assert set(runs) == {f"{a}+{i}" for a, i in gradients.CONFIGS}
    sig, relu = runs["sigmoid+default"].mean_norms(), runs["relu+kaiming_uniform"].mean_norms()
    assert sig["conv1"] < 1e-2 * relu["conv1"]
    # vanishing: with sigmoids the first layer gets a tiny fraction of the last layer's gradient …
    assert sig["conv1"] < 1e-2 * sig["fc2"]
    # … with ReLU + He it does not
    assert relu["conv1"] > 0.1 * relu["fc2"]
    assert runs["relu+kaiming_uniform"].norms.shape == (20, len(gradients.LAYERS))
    table = capsys.readouterr().out
    assert "sigmoid+default" in table and "conv1/fc2" in table
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_gradients_command(tmp_path: Path) -> None:
    stdout = run_cli(["gradients", "--steps", "10", "--out", str(tmp_path)], cwd=tmp_path)
    assert_png(tmp_path / "gradient_norms.png")
    rows = {}
    for line in stdout.splitlines():
        tokens = line.split()
        if tokens and tokens[0] in ("sigmoid+default", "relu+kaiming_uniform"):
            rows[tokens[0]] = [float(t) for t in tokens[1:]]
    assert rows["sigmoid+default"][0] < 1e-2 * rows["relu+kaiming_uniform"][0]  # conv1 column


def test_cli_rejects_bad_arguments(tmp_path: Path, capsys) -> None:
    from cifarlab.course.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["gradients", "--image-size", "20", "--out", str(tmp_path)])
    assert exc.value.code == 2
    with pytest.raises(SystemExit):
        main(["no-such-command"])
    assert "invalid choice" in capsys.readouterr().err


def test_race_table_pairs_course_optimizers_with_their_twins(tmp_path):
    """The reader of a course_optimizers sweep: best completed value and its lr per optimizer."""
    import csv

    from cifarlab.course.race import best_per_optimizer, format_race

    rows = [
        ("COMPLETE", "0.61", "course/rmsprop", "0.001"),
        ("COMPLETE", "0.64", "course/rmsprop", "0.0003"),
        ("PRUNED", "0.70", "course/rmsprop", "0.01"),  # pruned values never win the race
        ("COMPLETE", "0.66", "rmsprop", "0.0003"),
        ("FAIL", "", "course/adagrad", "0.03"),
    ]
    path = tmp_path / "trials.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["number", "state", "value", "params:optimizer", "params:optimizer.lr"])
        writer.writerows((i, *row) for i, row in enumerate(rows))
    table = best_per_optimizer(path)
    assert table["course/rmsprop"]["best"] == 0.64 and table["course/rmsprop"]["lr"] == "0.0003"
    assert table["course/rmsprop"]["pruned"] == 1 and table["course/adagrad"]["failed"] == 1
    text = format_race(table)
    line = next(t for t in text.splitlines() if t.startswith("course/rmsprop"))
    assert "0.6400" in line and "0.6600" in line  # course value and its twin on one line
    assert "3 complete, 1 pruned, 1 failed" in text
