"""Training end to end: every optimizer x scheduler, learning, resume, determinism, eval, multirun, DDP."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from cifarlab.model import ACTIVATIONS, INITS
from cifarlab.train import run
from tests.conftest import CONF, TINY, compose_train, run_eval, run_script

OPTIMIZERS = sorted(p.stem for p in (CONF / "optimizer").glob("*.yaml"))
SCHEDULERS = sorted(p.stem for p in (CONF / "scheduler").glob("*.yaml"))
# Two epochs of 3 steps, so epoch-stepped schedules (step, exponential, plateau) step too.
BRIEF = TINY + ["trainer.max_epochs=2", "callbacks.checkpoint=false", "test=false", "trainer.precision=32"]


def train(overrides: list[str], output_dir: Path) -> dict:
    return run(compose_train(overrides, output_dir))


@pytest.mark.parametrize("scheduler", SCHEDULERS)
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_every_optimizer_and_scheduler_trains(optimizer, scheduler, tmp_path):
    extra = ["scheduler.step_size=1"] if scheduler == "step" else []
    metrics = train(BRIEF + [f"optimizer={optimizer}", f"scheduler={scheduler}", *extra], tmp_path)
    assert metrics["status"] == "completed" and metrics["global_step"] == 6
    assert math.isfinite(metrics["train/loss"]) and 0 <= metrics["val/acc"] <= 1
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert (
        saved["optimizer"]["_target_"]
        .lower()
        .endswith({"momentum": "sgd", "nesterov": "sgd"}.get(optimizer, optimizer))
    )


def test_schedulers_step_at_their_interval(tmp_path):
    """step: x0.1 per epoch; exponential: x0.99 per epoch; onecycle/cosine: per batch."""
    from cifarlab.train import build_datamodule, build_module, build_trainer

    lrs = {}
    for name, extra in [
        ("step", ["scheduler.step_size=1"]),
        ("exponential", []),
        ("cosine", []),
        ("onecycle", []),
    ]:
        cfg = compose_train(
            # one optimizer step per training_step, so that on_train_batch_start sees every step's lr
            BRIEF
            + ["optimizer=sgd", "optimizer.lr=0.1", f"scheduler={name}", "trainer.steps_per_call=1", *extra],
            tmp_path / name,
        )
        dm = build_datamodule(cfg)
        module = build_module(cfg, dm.num_classes)
        seen = []
        module.on_train_batch_start = lambda *a, m=module, s=seen: s.append(
            m.optimizers().param_groups[0]["lr"]
        )
        build_trainer(cfg, tmp_path / name).fit(module, datamodule=dm)
        lrs[name] = seen
    assert lrs["step"] == pytest.approx([0.1] * 3 + [0.01] * 3)
    assert lrs["exponential"] == pytest.approx([0.1] * 3 + [0.099] * 3)
    assert len(set(lrs["cosine"])) == 6 and lrs["cosine"][0] == pytest.approx(0.1)
    assert lrs["onecycle"][0] == pytest.approx(0.1 / 25) and max(lrs["onecycle"]) > lrs["onecycle"][0]


@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_every_init_and_activation_trains(init, activation, tmp_path):
    metrics = train(
        BRIEF + ["trainer.max_epochs=1", f"model.init={init}", f"model.activation={activation}"], tmp_path
    )
    assert metrics["status"] == "completed" and math.isfinite(metrics["train/loss"])


def test_same_seed_same_metrics(tmp_path):
    a = train(BRIEF + ["seed=5"], tmp_path / "a")
    b = train(BRIEF + ["seed=5"], tmp_path / "b")
    c = train(BRIEF + ["seed=6"], tmp_path / "c")
    keys = ["train/loss", "val/loss", "val/acc"]
    assert [a[k] for k in keys] == [b[k] for k in keys]
    assert a["train/loss"] != c["train/loss"]


def test_resume_continues_at_the_right_epoch_and_step(tmp_path):
    base = TINY + ["trainer.precision=32", "test=false"]
    first = train(base + ["trainer.max_epochs=2"], tmp_path / "first")
    assert (first["epochs"], first["global_step"]) == (2, 6)
    last = tmp_path / "first" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == 6
    resumed = train(base + ["trainer.max_epochs=3", f"ckpt_path={last}"], tmp_path / "resumed")
    assert (resumed["epochs"], resumed["global_step"]) == (3, 9)
    # val/acc_best carries over: it can only be >= the best of the first run.
    assert resumed["val/acc_best"] >= first["val/acc_best"]
    # An uninterrupted 3-epoch run with the same seed takes the same steps on the same data.
    straight = train(base + ["trainer.max_epochs=3"], tmp_path / "straight")
    assert straight["train/loss"] == pytest.approx(resumed["train/loss"], rel=1e-5)


def test_nan_divergence_fails_the_run_and_says_so(tmp_path):
    with pytest.raises(FloatingPointError, match="diverged"):
        train(BRIEF + ["optimizer=sgd", "optimizer.lr=1e12"], tmp_path)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["status"] == "failed" and "diverged" in saved["error"]


@pytest.mark.slow
def test_synthetic_is_learned_well_above_chance(tmp_path):
    """Measured: Adam at the defaults reaches ~0.9 val accuracy after 2 epochs; a sigmoid net with
    PyTorch's default init stays at chance (~0.1). Thresholds leave a wide margin both ways."""
    common = [
        "data=synthetic",
        "logger=none",
        "trainer.max_epochs=2",
        "test=false",
        "callbacks.checkpoint=false",
    ]
    good = train(common, tmp_path / "good")
    broken = train(
        common + ["model.activation=sigmoid", "model.init=default", "optimizer=sgd"], tmp_path / "broken"
    )
    assert good["val/acc"] > 0.6, good
    assert broken["val/acc"] < 0.25, broken


@pytest.mark.slow
def test_train_then_eval_reproduces_the_test_metric(tmp_path):
    run_dir = tmp_path / "run"
    result = run_script(TINY + ["trainer.max_epochs=2", f"hydra.run.dir={run_dir}"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "results:" in result.stdout and "test/acc" in result.stdout
    metrics = json.loads((run_dir / "metrics.json").read_text())
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["data"]["name"] == "synthetic" and saved["optimizer"]["_target_"] == "torch.optim.Adam"
    _, evaluated = run_eval(metrics["best_ckpt"], tmp_path / "eval")
    assert evaluated["test/acc"] == pytest.approx(metrics["test/acc"], abs=1e-6)
    assert evaluated["test/loss"] == pytest.approx(metrics["test/loss"], rel=1e-4)


@pytest.mark.slow
def test_rmsprop_from_the_command_line(tmp_path):
    """The issue's own example: the chosen optimizer is visible in the saved config."""
    result = run_script(TINY + ["optimizer=rmsprop", f"hydra.run.dir={tmp_path}"])
    assert result.returncode == 0, result.stderr[-3000:]
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["optimizer"]["_target_"] == "torch.optim.RMSprop"
    hydra_saved = yaml.safe_load((tmp_path / ".hydra" / "overrides.yaml").read_text())
    assert "optimizer=rmsprop" in hydra_saved


@pytest.mark.slow
def test_multirun_writes_one_metrics_file_per_job(tmp_path):
    result = run_script(["-m", *TINY, "optimizer=sgd,adam", f"hydra.sweep.dir={tmp_path}"])
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = sorted(p.parent.name for p in tmp_path.glob("*/metrics.json"))
    assert jobs == ["0", "1"]
    targets = {
        yaml.safe_load((tmp_path / j / "config.yaml").read_text())["optimizer"]["_target_"] for j in jobs
    }
    assert targets == {"torch.optim.SGD", "torch.optim.Adam"}


@pytest.mark.slow
def test_ddp_on_cpu_keeps_one_output_folder_per_job(tmp_path):
    """Two CPU processes per job, inside a 2-job multirun: each job folder gets its metrics; no stray folders."""
    ddp = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32"]
    result = run_script(["-m", *TINY, *ddp, "seed=1,2", f"hydra.sweep.dir={tmp_path}"], timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(
        p.name for p in tmp_path.iterdir() if not p.name.startswith(".") and p.name != "multirun.yaml"
    ) == ["0", "1"]
    for job in ("0", "1"):
        metrics = json.loads((tmp_path / job / "metrics.json").read_text())
        assert metrics["status"] == "completed"
        # 600-200 = 400 training images over 2 ranks, batch 32 each: limit 3 batches per epoch and rank.
        assert metrics["global_step"] == 3
        assert (tmp_path / job / ".hydra" / "config.yaml").exists()
    assert not list(Path(tmp_path).glob("**/multirun/*")), "a rank started a multirun of its own"


def test_limit_of_one_batch_means_one_batch(tmp_path):
    """trainer.limit_train_batches=1 is one batch (an int), not 100% of the epoch."""
    metrics = train([*BRIEF, "trainer.max_epochs=1", "trainer.limit_train_batches=1"], tmp_path)
    assert metrics["global_step"] == 1


@pytest.mark.slow
def test_a_run_prints_its_device_once_and_no_lightning_noise(tmp_path):
    """cifarlab's one device line instead of Lightning's GPU/TPU/AMP lines and litlogger tip; a warning that
    matters (old checkpoints in the run folder) still shows, and train.log keeps Lightning's lines."""
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "old.ckpt").write_text("from an earlier run\n")
    result = run_script(TINY + [f"hydra.run.dir={tmp_path}"])
    assert result.returncode == 0, result.stderr[-3000:]
    shown = result.stdout + result.stderr
    for noise in ("GPU available", "TPU available", "litlogger", "Automatic Mixed Precision", "Tip:"):
        assert noise not in shown, noise
    device_lines = [line for line in result.stdout.splitlines() if line.startswith("device: ")]
    assert len(device_lines) == 1 and device_lines[0].startswith("device: cpu, 1 process, "), device_lines
    assert "Checkpoint directory" in result.stderr and "exists and is not empty" in result.stderr
    assert "GPU available: False" in (tmp_path / "train.log").read_text()
    evaluated, _ = run_eval(tmp_path / "checkpoints" / "last.ckpt", tmp_path / "eval")
    assert evaluated.stdout.splitlines()[0].startswith("device: cpu, 1 process, ")
    for noise in ("GPU available", "TPU available", "litlogger", "Automatic Mixed Precision", "INFO"):
        assert noise not in evaluated.stdout + evaluated.stderr, noise


@pytest.mark.slow
def test_a_run_stopped_by_sigterm_exits_143_and_says_interrupted(tmp_path):
    """A job scheduler's or `kill`'s SIGTERM: Lightning stops the run with a SystemExit without a code, so
    train.py exited 0 as if it had finished. It exits 143 (128 + SIGTERM), metrics.json says interrupted, and
    the last finished epoch's checkpoint is there to resume from."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    args = [*TINY, "trainer.max_epochs=200", "test=false", "trainer.precision=32", f"hydra.run.dir={out}"]
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve().parents[1] / "train.py"), *args],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while not (out / "checkpoints" / "last.ckpt").is_file() and time.monotonic() < deadline:
            time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 143
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["status"] == "interrupted" and 0 < metrics["epochs"] < 200
    assert metrics["error"].startswith("interrupted by SIGTERM at epoch ")
    assert (out / "checkpoints" / "last.ckpt").is_file()
