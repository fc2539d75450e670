"""Shared fixtures: configs composed in-process, train.py run as a real subprocess, all output in tmp."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parents[1]

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs one pytest worker per core: each worker (and every process it starts) gets one
    # thread, so two workers never fight over the same two cores.
    import torch

    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
CONF = ROOT / "conf"

# Small, fast synthetic runs: a few batches of a few hundred images.
TINY = [
    "data=synthetic",
    "data.train_size=600",
    "data.val_size=200",
    "data.test_size=200",
    "data.batch_size=32",
    "data.eval_batch_size=200",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=3",
    "logger=none",
    "callbacks.figures=false",  # the end-of-run figures have tests of their own (test_figures, test_wandb)
]


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path_factory, monkeypatch):
    """Nothing a test does may write into the repo or the home folder."""
    scratch = tmp_path_factory.getbasetemp()
    monkeypatch.setenv("CIFARLAB_DATA_DIR", str(scratch / "data"))
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "MPLCONFIGDIR"):
        monkeypatch.setenv(var, str(scratch / var.lower()))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")


def compose_train(
    overrides: list[str], output_dir: Path | None = None, config_name: str = "train"
) -> DictConfig:
    """Compose conf/train.yaml with ``overrides`` exactly as train.py would (schemas registered)."""
    from cifarlab.config import register_configs

    register_configs()
    extra = [f"output_dir={output_dir}"] if output_dir is not None else ["output_dir=unused"]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name=config_name, overrides=overrides + extra)


def sweep_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The environment of a ``train.py -m`` sweep run as a subprocess by a test: data under ``tmp_path``, no W&B,
    no GPU (trials must not grab one the machine may have), unbuffered output; ``extra`` on top."""
    env = dict(os.environ)
    env.update(CIFARLAB_DATA_DIR=str(tmp_path / "data"), WANDB_MODE="disabled", PYTHONUNBUFFERED="1", **extra)
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def run_script(
    args: list[str],
    cwd: Path = ROOT,
    timeout: float = 300,
    script: str = "train.py",
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """Run an entry point as a user would, in a real subprocess, and capture what it prints."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, str(ROOT / script), *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_eval(ckpt_path: str | Path, out_dir: Path) -> tuple[subprocess.CompletedProcess, dict]:
    """``python eval.py ckpt_path=... hydra.run.dir=out_dir`` as a user runs it: what it printed and the
    metrics.json it wrote (it must succeed)."""
    result = run_script([f"ckpt_path={ckpt_path}", f"hydra.run.dir={out_dir}"], script="eval.py")
    assert result.returncode == 0, result.stderr[-3000:]
    return result, json.loads((Path(out_dir) / "metrics.json").read_text())
