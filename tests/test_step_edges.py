"""Edge cases of the K-step training path (several optimizer steps per Lightning step): resuming from a
checkpoint written at an epoch's validation (check_val_every_n_epoch > 1), a plateau schedule with validation
every other epoch, the sanity check and val/acc_best, a fraction of an epoch that is no batch, a resume with
another steps_per_call, bf16 and evaluation without a fit. Real Lightning Trainers on tiny synthetic data."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
import pytest
import torch

from cifarlab.config import ConfigError
from cifarlab.data import DeviceBatches
from cifarlab.train import build_datamodule, build_module, build_trainer, run
from tests.conftest import compose_train
from tests.test_step import TINY, assert_same_parameters, fit, plain_evaluation, plain_loop


def test_epoch_lines_show_validation_only_for_epochs_that_validated(tmp_path, capsys):
    """With check_val_every_n_epoch=2 the lines of epochs 1 and 3 showed val/loss and val/acc too: those of
    the sanity check or of the previous validation (Lightning keeps them in callback_metrics)."""
    overrides = [
        *TINY,
        "trainer.enable_progress_bar=false",
        "trainer.check_val_every_n_epoch=2",
        "trainer.max_epochs=4",
        "callbacks.checkpoint=false",
    ]
    capsys.readouterr()
    run(compose_train(overrides, tmp_path))
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch ")]
    assert [line.split()[1] for line in lines] == ["1/4", "2/4", "3/4", "4/4"], lines
    for line in lines:
        validated = line.split()[1] in ("2/4", "4/4")
        assert ("val/acc " in line) == validated and ("val/loss " in line) == validated, line
    assert "val/acc_best" not in lines[0] and "val/acc_best" in lines[2], lines  # the best so far, once known


def test_a_run_resumed_from_a_checkpoint_written_at_validation_resumes_exactly(tmp_path):
    """With check_val_every_n_epoch=2 last.ckpt is written at the end of the epoch's validation, before
    on_train_epoch_end; Lightning resumes it by running only that epoch's end hooks. The run must not fail
    there (the epoch-line printer had no start time), must not log a second, empty train/loss of 0 for that
    epoch, and must end where an uninterrupted run does (the epoch's scheduler step included)."""
    base = [o for o in TINY if o != "logger=none"] + [
        "logger=csv",
        "trainer.enable_progress_bar=false",  # one line per epoch (EpochLines), as in a log or a pipe
        "trainer.check_val_every_n_epoch=2",
        "optimizer=adamw",
        "scheduler=exponential",
        "scheduler.gamma=0.7",
    ]
    run(compose_train(base + ["trainer.max_epochs=4"], tmp_path / "full"))
    run(compose_train(base + ["trainer.max_epochs=2"], tmp_path / "first"))
    last = tmp_path / "first" / "checkpoints" / "last.ckpt"
    metrics = run(compose_train(base + ["trainer.max_epochs=4", f"ckpt_path={last}"], tmp_path / "second"))
    assert metrics["global_step"] == 28
    rows = list(csv.DictReader((tmp_path / "second" / "csv" / "metrics.csv").open()))
    epoch_rows = [(int(r["step"]), float(r["train/loss"])) for r in rows if r.get("train/loss")]
    assert [step for step, _ in epoch_rows] == [20, 27]  # epochs 3 and 4 only: epoch 2 was the first run's
    assert all(loss > 0 for _, loss in epoch_rows)
    full, resumed = (
        torch.load(tmp_path / d / "checkpoints" / "last.ckpt", weights_only=False) for d in ("full", "second")
    )
    assert resumed["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(
        full["optimizer_states"][0]["param_groups"][0]["lr"]
    )
    for name, p in full["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][name], p, rtol=1e-5, atol=1e-6, msg=name)


def test_a_plateau_schedule_counts_validations_when_not_every_epoch_has_one(tmp_path):
    """check_val_every_n_epoch=2 with scheduler=plateau: the schedule steps after each validation (epochs 2, 4,
    6), not at the end of epochs without one (it failed there: "val/acc was not logged this epoch"). SGD at
    lr 1e-12 never changes val/acc, so with patience 0 the 2nd and 3rd validations each halve the lr. A run
    resumed from epoch 4's checkpoint (written at its validation) has that validation's step too."""
    base = TINY + [
        "optimizer=sgd",
        "optimizer.lr=1e-12",
        "scheduler=plateau",
        "scheduler.patience=0",
        "scheduler.factor=0.5",
        "trainer.check_val_every_n_epoch=2",
    ]
    _, trainer = fit(base + ["trainer.max_epochs=6"], tmp_path / "full")
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.25e-12)
    fit(base + ["trainer.max_epochs=4"], tmp_path / "first")
    last = tmp_path / "first" / "checkpoints" / "last.ckpt"
    _, resumed = fit(base + ["trainer.max_epochs=6"], tmp_path / "second", ckpt_path=str(last))
    assert resumed.global_step == 42
    assert resumed.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.25e-12)
    plateau = resumed.lr_scheduler_configs[0].scheduler
    assert plateau.state_dict() == trainer.lr_scheduler_configs[0].scheduler.state_dict()


def test_the_sanity_check_is_not_part_of_val_acc_best(tmp_path):
    """num_sanity_val_steps=-1 validates the untrained network on every validation image before training; its
    accuracy (0.14 here, above the trained network's 0.06) is no accuracy of the run: after one epoch
    val/acc_best is that epoch's val/acc."""
    module, trainer = fit(
        TINY
        + [
            "seed=1",
            "optimizer=sgd",
            "optimizer.lr=0.1",
            "trainer.max_epochs=1",
            "trainer.num_sanity_val_steps=-1",
            "callbacks.checkpoint=false",
        ],
        tmp_path,
    )
    metrics = trainer.callback_metrics
    assert float(metrics["val/acc_best"]) == float(metrics["val/acc"])
    assert module.val_acc_best.update_count == 1


def test_a_fraction_of_an_epoch_that_is_no_batch_is_refused(tmp_path):
    """7 batches per epoch: limit_train_batches=0.1 is 0.7 of a batch. Lightning refuses such a fraction of its
    own dataloaders; the datamodule, which applies the limit, must too (the run trained nothing and said
    nothing)."""
    with pytest.raises(
        ConfigError, match=r"trainer.limit_train_batches=0.1 is not allowed; allowed: at least 0.1429"
    ):
        fit(TINY + ["trainer.limit_train_batches=0.1", "callbacks.checkpoint=false"], tmp_path)


def test_a_resume_with_another_steps_per_call_ends_where_an_uninterrupted_run_does(tmp_path):
    """last.ckpt of a run with 3 steps per call, resumed with auto (7: one call per epoch)."""
    base = [o for o in TINY if not o.startswith("trainer.steps_per_call")] + [
        "optimizer=adamw",
        "scheduler=exponential",
        "scheduler.gamma=0.7",
    ]
    full, _ = fit(base + ["trainer.max_epochs=3", "trainer.steps_per_call=3"], tmp_path / "full")
    fit(base + ["trainer.max_epochs=1", "trainer.steps_per_call=3"], tmp_path / "first")
    resumed, trainer = fit(
        base + ["trainer.max_epochs=3", "trainer.steps_per_call=auto"],
        tmp_path / "second",
        ckpt_path=str(tmp_path / "first" / "checkpoints" / "last.ckpt"),
    )
    assert resumed.steps_per_call == 7 and trainer.global_step == 21
    assert trainer.fit_loop.epoch_loop._batches_that_stepped == 21  # the loggers' step axis
    assert_same_parameters(resumed.net, full.net)


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_bf16_k_steps_train_like_a_plain_bf16_loop(precision, tmp_path):
    """bf16-mixed: the forward under CPU autocast, loss and backward outside it; bf16-true: bf16 weights and
    inputs. Either way K = 3 steps per call give exactly what a plain loop computes in the same precision."""
    overrides = [o for o in TINY if not o.startswith("trainer.precision")] + [
        f"trainer.precision={precision}",
        "optimizer=adam",
        "trainer.max_epochs=2",
        "callbacks.checkpoint=false",
    ]
    module, trainer = fit(overrides, tmp_path / "k")
    assert trainer.global_step == 14
    net = plain_loop(overrides, tmp_path / "plain")
    assert next(module.net.parameters()).dtype == next(net.parameters()).dtype
    for (name, p), q in zip(module.net.named_parameters(), net.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)


def test_validate_and_test_without_a_fit(tmp_path):
    """trainer.validate and trainer.test of a module that never trained (as eval.py tests a checkpoint): the
    evaluation step is built at the first evaluation, and gives what a plain evaluation gives."""
    cfg = compose_train(TINY + ["data.eval_batch_size=48", "trainer.limit_val_batches=2"], tmp_path)
    L.seed_everything(cfg.seed, verbose=False)
    dm = build_datamodule(cfg)
    module = build_module(cfg, dm.num_classes)
    trainer = build_trainer(cfg, tmp_path)
    validated = trainer.validate(module, datamodule=dm, verbose=False)[0]
    first_two = DeviceBatches(*dm.splits["val"][0:2], 48, mean=dm.mean, std=dm.std, max_batches=2)
    loss, acc = plain_evaluation(module.net, first_two)  # limit_val_batches=2: 96 of the 112 images
    assert validated["val/loss"] == pytest.approx(loss, rel=1e-5)
    assert validated["val/acc"] == pytest.approx(acc, rel=1e-6)
    assert validated["val/acc_best"] == validated["val/acc"]
    tested = trainer.test(module, datamodule=dm, verbose=False)[0]
    loss, acc = plain_evaluation(module.net, dm.test_dataloader())
    assert tested["test/loss"] == pytest.approx(loss, rel=1e-5)
    assert tested["test/acc"] == pytest.approx(acc, rel=1e-6)
    assert module.eval_mode == "eager" and module.stepper is None


def test_a_onecycle_resume_with_more_epochs_is_refused_before_any_step(tmp_path):
    """scheduler=onecycle keeps the length its run planned (14 steps for 2 epochs of 7): a resume with 4 epochs
    failed at step 15 ("Tried to step 15 times"); it is refused at the start, naming the setting."""
    base = TINY + ["scheduler=onecycle", "optimizer=sgd"]
    fit(base + ["trainer.max_epochs=2"], tmp_path / "first")
    last = tmp_path / "first" / "checkpoints" / "last.ckpt"
    with pytest.raises(
        ConfigError, match=r"trainer.max_epochs=4 is not allowed for this resume; allowed: <= 2"
    ):
        fit(base + ["trainer.max_epochs=4"], tmp_path / "second", ckpt_path=str(last))
    _, trainer = fit(base + ["trainer.max_epochs=2"], tmp_path / "third", ckpt_path=str(last))
    assert trainer.global_step == 14  # the same length resumes (and finishes at once)


def test_a_resume_in_a_new_folder_keeps_the_best_checkpoint_of_the_run_before(tmp_path):
    """A resumed run writes into a new folder, where Lightning forgot the best score: its first validation
    became "best" however bad, and the final test used it. The earlier best (here made unbeatable: its score
    set to 0.99 in last.ckpt) is copied into the new folder and stays best; the old folder is left as it was."""
    base = TINY + ["trainer.max_epochs=2"]
    fit(base, tmp_path / "first")
    last = tmp_path / "first" / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, weights_only=False)
    [key] = [k for k in ckpt["callbacks"] if k.startswith("ModelCheckpoint") and "val/acc" in k]
    state = ckpt["callbacks"][key]
    state["best_model_score"] = torch.tensor(0.99)
    torch.save(ckpt, last)
    old_best = Path(state["best_model_path"])
    before = sorted(p.name for p in (tmp_path / "first" / "checkpoints").iterdir())
    _, trainer = fit(TINY + ["trainer.max_epochs=3"], tmp_path / "second", ckpt_path=str(last))
    best = Path(trainer.checkpoint_callback.best_model_path)
    assert best == tmp_path / "second" / "checkpoints" / old_best.name and best.is_file()
    assert float(trainer.checkpoint_callback.best_model_score) == pytest.approx(0.99)
    assert sorted(p.name for p in (tmp_path / "first" / "checkpoints").iterdir()) == before
