"""End-of-run pictures without W&B: PNG files a person without an account can open."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cifarlab import figures
from cifarlab.diagnostics import GradNormLogger

PNG = b"\x89PNG\r\n\x1a\n"


def is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == PNG and path.stat().st_size > 1000


def test_importing_the_figure_modules_is_cheap():
    code = (
        "import sys, cifarlab.figures, cifarlab.loggers, cifarlab.wandb_sync; "
        "print(sorted(m for m in ('matplotlib', 'wandb', 'lightning', 'optuna') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_every_figure_is_a_png(tmp_path):
    names = figures.CIFAR10_CLASSES
    rng = np.random.default_rng(0)
    cm = rng.integers(0, 30, (10, 10)) + np.eye(10, dtype=int) * 50
    paths = [
        figures.confusion_matrix_figure(cm, names, tmp_path / "cm.png"),
        figures.per_class_accuracy_figure(cm.diagonal() / cm.sum(1), names, tmp_path / "acc.png"),
        figures.learning_curves_figure(
            [
                {
                    "epoch": e,
                    "train/loss": 2 / e,
                    "val/loss": 2.1 / e,
                    "train/acc": 0.1 * e,
                    "val/acc": 0.09 * e,
                    "lr": 0.1 / e,
                }
                for e in (1, 2, 3)
            ],
            tmp_path / "lc.png",
        ),
        figures.image_grid_figure(
            rng.integers(0, 255, (5, 32, 32, 3), dtype=np.uint8),
            [f"cat→dog {c:.2f}" for c in (0.9, 0.8, 0.7, 0.6, 0.5)],
            tmp_path / "grid.png",
        ),
        figures.image_grid_figure(np.zeros((0, 32, 32, 3), np.uint8), [], tmp_path / "none.png"),
        figures.confusion_matrix_figure(
            rng.integers(0, 5, (100, 100)), [str(i) for i in range(100)], tmp_path / "cm100.png"
        ),
    ]
    assert all(is_png(p) for p in paths)


def test_class_names():
    assert figures.class_names(SimpleNamespace(name="cifar10"), 10)[3] == "cat"
    assert figures.class_names(SimpleNamespace(name="synthetic"), 4) == ["0", "1", "2", "3"]
    assert figures.class_names(SimpleNamespace(name="cifar100", data_dir="/nonexistent"), 100)[99] == "99"


class _Collect:
    def __init__(self) -> None:
        self.rows: list[dict] = []

    def log_metrics(self, metrics, step):
        self.rows.append(dict(metrics, step=step))


def _grad_norms(activation: str, init: str) -> dict[str, float]:
    from cifarlab.model import CifarCNN

    torch.manual_seed(0)
    net = CifarCNN(10, activation=activation, init=init)
    x, y = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))
    F.cross_entropy(net(x), y).backward()
    logger = _Collect()
    trainer = SimpleNamespace(loggers=[logger], global_step=0, is_global_zero=True)
    GradNormLogger(every_n_steps=5).on_before_optimizer_step(trainer, SimpleNamespace(net=net), None)
    trainer.global_step = 3  # not a multiple of 5: nothing logged
    GradNormLogger(every_n_steps=5).on_before_optimizer_step(trainer, SimpleNamespace(net=net), None)
    assert len(logger.rows) == 1
    return logger.rows[0]


def test_grad_norms_show_the_course_vanishing_gradients():
    """sigmoid + PyTorch's default init: the first conv's gradient is thousands of times below the last
    layer's; ReLU + Kaiming keeps them within an order of magnitude or two."""
    sigmoid = _grad_norms("sigmoid", "default")
    relu = _grad_norms("relu", "kaiming_uniform")
    layers = [
        "features.0.weight",
        "features.3.weight",
        "features.6.weight",
        "classifier.1.weight",
        "classifier.4.weight",
    ]
    assert {f"grad_norm/{n}" for n in layers} | {f"weight_norm/{n}" for n in layers} <= set(sigmoid)
    assert "grad_norm/features.0.bias" not in sigmoid  # per layer: weights only
    assert sigmoid["grad_norm/first_to_last_ratio"] < 1e-2 < relu["grad_norm/first_to_last_ratio"]
    assert sigmoid["grad_norm/total"] == pytest.approx(
        sum(sigmoid[f"grad_norm/{n}"] ** 2 for n in layers) ** 0.5, rel=1e-5
    )


@pytest.mark.slow
def test_a_plain_run_writes_png_figures(tmp_path):
    """logger=none (no W&B at all): confusion matrix, per-class accuracy, curves and mistakes as PNG."""
    from cifarlab.train import run
    from tests.conftest import compose_train

    overrides = [
        "data=synthetic",
        "data.train_size=600",
        "data.val_size=200",
        "data.test_size=200",
        "data.batch_size=64",
        "trainer.max_epochs=2",
        "trainer.limit_train_batches=2",
        "logger=none",
        "trainer.precision=32",
    ]
    run(compose_train(overrides, tmp_path))
    out = tmp_path / "figures"
    for name in ("confusion_matrix", "per_class_accuracy", "learning_curves", "misclassified"):
        assert is_png(out / f"{name}.png"), name
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert evaluation["split"] == "test" and sum(map(sum, evaluation["confusion_matrix"])) == 200
    assert [h["epoch"] for h in json.loads((out / "history.json").read_text())["epochs"]] == [1, 2]
    assert not (tmp_path / "wandb").exists()


@pytest.mark.slow
def test_figures_can_be_switched_off(tmp_path):
    from cifarlab.train import run
    from tests.conftest import TINY, compose_train

    run(compose_train([*TINY, "callbacks.figures=false", "test=false"], tmp_path))
    assert not (tmp_path / "figures").exists()
