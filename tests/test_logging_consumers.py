"""What reads a run's logged values, checked on real runs: eval.py against the run's own test metrics, the W&B
offline run's history and summary, the end-of-run history.json and evaluation.json."""

from __future__ import annotations

import json

import pytest

from cifarlab.train import run
from tests.conftest import TINY, compose_train, run_eval, run_script


@pytest.mark.slow
def test_eval_of_a_full_precision_run_gives_the_runs_test_metrics(tmp_path):
    """A run trained and tested with trainer.precision=32, evaluated by a plain `python eval.py ckpt_path=...`:
    the same numbers as the run's metrics.json. (eval.py's precision=auto picked bf16-mixed on a CPU with
    bf16, so its test/loss differed from the run's by 1e-4 to 1e-3 relative.)"""
    overrides = [*TINY, "data.test_size=300", "data.eval_batch_size=128", "trainer.precision=32"]
    metrics = run(compose_train(overrides, tmp_path / "run"))
    assert metrics["precision"] == "32-true" and metrics["best_ckpt"]
    result, evaluated = run_eval(metrics["best_ckpt"], tmp_path / "eval")
    assert evaluated["test/acc"] == pytest.approx(metrics["test/acc"], abs=1e-6)
    assert evaluated["test/loss"] == pytest.approx(metrics["test/loss"], rel=1e-5)
    assert f"test/loss {metrics['test/loss']:.4f}  test/acc {metrics['test/acc']:.4f}" in result.stdout


@pytest.mark.slow
def test_wandb_history_summary_and_run_files_agree(tmp_path, monkeypatch):
    """A W&B offline run of 2 epochs of 7 steps, 3 steps per Lightning call, per-step values every 2 steps and
    gradient norms every 2: read back from its .wandb file, train/loss_step and train/lr sit at the steps they
    were made (Lightning's 0-based axis), the step axis never goes back, the summary holds the run's final
    metrics, and history.json / evaluation.json say what W&B and metrics.json say."""
    from cifarlab.wandb_sync import find_offline_runs, read_run

    empty_netrc = tmp_path / "netrc"
    empty_netrc.touch()
    monkeypatch.setenv("NETRC", str(empty_netrc))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    overrides = [
        "data=synthetic",
        "data.train_size=1200",
        "data.val_size=200",
        "data.test_size=200",
        "data.batch_size=64",
        "data.eval_batch_size=128",
        "trainer.max_epochs=2",
        "trainer.limit_train_batches=7",
        "trainer.steps_per_call=3",
        "trainer.log_every_n_steps=2",
        "logger=wandb",
        "logger.grad_norm_every_n_steps=2",
    ]
    metrics = run(compose_train(overrides, tmp_path / "run"))
    assert metrics["global_step"] == 14
    [folder] = find_offline_runs([tmp_path / "run"])
    r = read_run(folder, wait=20)
    assert r.exit_code == 0

    axis = [row["trainer/global_step"] for row in r.history if "trainer/global_step" in row]
    assert axis == sorted(axis) and len(axis) == len(r.history)
    per_step = [row for row in r.history if "train/loss_step" in row]
    assert [row["trainer/global_step"] for row in per_step] == [1, 3, 5, 7, 9, 11, 13]
    assert [row["epoch"] for row in per_step] == [0, 0, 0, 1, 1, 1, 1]
    assert all(row["train/lr"] == pytest.approx(1e-3) for row in per_step)  # adam's constant lr
    assert [row["trainer/global_step"] for row in r.history if "grad_norm/total" in row] == list(
        range(0, 14, 2)
    )
    assert [row["trainer/global_step"] for row in r.history if "val/acc" in row] == [6, 13]
    assert [row["trainer/global_step"] for row in r.history if "train/loss" in row] == [6, 13]
    assert [row["trainer/global_step"] for row in r.history if "test/acc" in row] == [14]
    for key in ("val/acc_best", "val/acc", "val/loss", "test/acc", "test/loss", "train/loss"):
        assert r.summary[key] == pytest.approx(metrics[key], rel=1e-6), key
    assert r.summary["val/acc_best"] == pytest.approx(max(r.values("val/acc")))

    figures = tmp_path / "run" / "figures"
    epochs = json.loads((figures / "history.json").read_text())["epochs"]
    assert [e["epoch"] for e in epochs] == [1, 2]
    for key in ("val/acc", "val/loss", "train/loss", "train/acc"):
        assert [e[key] for e in epochs] == pytest.approx(r.values(key), rel=1e-6), key
    assert [e["lr"] for e in epochs] == pytest.approx([1e-3, 1e-3])
    evaluation = json.loads((figures / "evaluation.json").read_text())
    cm = evaluation["confusion_matrix"]
    assert sum(map(sum, cm)) == 200
    assert sum(cm[i][i] for i in range(len(cm))) / 200 == pytest.approx(metrics["test/acc"], abs=1e-6)


@pytest.mark.parametrize("split", ["test", "val"])
def test_the_confusion_matrix_covers_the_images_the_accuracy_was_measured_on(split, tmp_path):
    """trainer.limit_test_batches / limit_val_batches: test/acc (val/acc with test=false) is measured on the
    first 2 batches of 64; evaluation.json's confusion matrix and per-class accuracy (and W&B's
    <split>/acc_class/*) were of the whole split, 300 images, and did not add up to it."""
    overrides = [
        *TINY,
        "callbacks.figures=true",
        "data.val_size=300",
        "data.test_size=300",
        "data.eval_batch_size=64",
        f"trainer.limit_{split}_batches=2",
        f"test={split == 'test'}",
    ]
    metrics = run(compose_train(overrides, tmp_path))
    evaluation = json.loads((tmp_path / "figures" / "evaluation.json").read_text())
    cm = evaluation["confusion_matrix"]
    assert evaluation["split"] == split and sum(map(sum, cm)) == 128
    assert sum(cm[i][i] for i in range(len(cm))) / 128 == pytest.approx(metrics[f"{split}/acc"], abs=1e-6)


@pytest.mark.slow
def test_under_ddp_the_confusion_matrix_covers_every_ranks_images(tmp_path):
    """Two CPU processes: test/acc adds both ranks' shards; evaluation.json (drawn on rank 0) covered only rank
    0's half of the test split."""
    overrides = [
        *TINY,
        "callbacks.figures=true",
        "data.test_size=300",
        "data.eval_batch_size=64",
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.precision=32",
    ]
    result = run_script([*overrides, f"hydra.run.dir={tmp_path}"], timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    cm = json.loads((tmp_path / "figures" / "evaluation.json").read_text())["confusion_matrix"]
    assert sum(map(sum, cm)) == 300  # 150 per rank
    assert sum(cm[i][i] for i in range(len(cm))) / 300 == pytest.approx(metrics["test/acc"], abs=1e-6)
