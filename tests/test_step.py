"""The K-step training path (several optimizer steps per Lightning step, cifarlab.step) computes what a plain
one-step-at-a-time loop computes: same parameters after many steps, for every optimizer, with schedulers,
dropout and gradient clipping, and across a resume. Real Lightning Trainers on tiny synthetic data."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate

from cifarlab.config import ConfigError, validate
from cifarlab.data import DeviceBatches
from cifarlab.model import parameter_groups
from cifarlab.module import build_optimizer
from cifarlab.step import capture_blocker
from cifarlab.train import build_datamodule, build_module, build_trainer
from tests import graph_emulation
from tests.conftest import CONF, compose_train

OPTIMIZERS = sorted(
    str(p.relative_to(CONF / "optimizer").with_suffix("")) for p in (CONF / "optimizer").rglob("*.yaml")
)
# 8x8 images (the CNN's three poolings leave 1x1x128), batches of 16: a step costs ~1 ms, so a run is mostly
# Lightning's own start-up. 7 batches per epoch (the last one short), chunks of 3: 3 calls per epoch, the last
# with one batch.
TINY = [
    "data=synthetic",
    "data.image_size=8",
    "data.train_size=212",
    "data.val_size=112",
    "data.test_size=16",
    "data.batch_size=16",
    "data.eval_batch_size=112",
    "trainer.precision=32",
    "trainer.accelerator=cpu",
    "trainer.steps_per_call=3",
    "logger=none",
    "test=false",
    "callbacks.figures=false",
    "model.dropout=0.5",
]


def fit(overrides: list[str], out: Path, ckpt_path: str | None = None, callbacks=()):
    """What train.run does, returning the module: seed, build, fit (``callbacks`` added to the Trainer's)."""
    cfg = compose_train(overrides, out)
    validate(cfg)
    L.seed_everything(cfg.seed, verbose=False)
    dm = build_datamodule(cfg)
    module = build_module(cfg, dm.num_classes)
    trainer = build_trainer(cfg, out, extra_callbacks=callbacks)
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    return module, trainer


def plain_loop(overrides: list[str], out: Path) -> torch.nn.Module:
    """The same run as a plain PyTorch loop: one batch, one optimizer step, one scheduler step at a time.
    ``trainer.precision=bf16-true``: bf16 weights and inputs; ``bf16-mixed``: the forward under CPU autocast,
    loss and backward outside it."""
    cfg = compose_train(overrides, out)
    L.seed_everything(cfg.seed, verbose=False)
    dm = build_datamodule(cfg)
    net = build_module(cfg, dm.num_classes).net  # the same initial weights, the same RNG state after them
    precision = str(cfg.trainer.precision)
    if precision == "bf16-true":
        net = net.to(torch.bfloat16)
    dm.setup()
    images, labels = dm.splits["train"]
    optimizer = build_optimizer(
        instantiate(cfg.optimizer, _convert_="all"), parameter_groups(net, cfg.model.weight_decay)
    )
    epochs = cfg.trainer.max_epochs
    steps_per_epoch = math.ceil(len(labels) / cfg.data.batch_size)
    schedule = (
        instantiate(cfg.scheduler)(optimizer, steps_per_epoch, epochs) if cfg.get("scheduler") else None
    )
    clip = cfg.trainer.gradient_clip_val
    for epoch in range(epochs):
        net.train()
        batches = DeviceBatches(
            images,
            labels,
            cfg.data.batch_size,
            mean=dm.mean,
            std=dm.std,
            shuffle=True,
            augment=cfg.data.augment,
            seed=cfg.seed,
            epoch=lambda e=epoch: e,
            channels_last=cfg.trainer.channels_last,
        )
        for x, y in batches:
            optimizer.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
                logits = net(x.to(next(net.parameters()).dtype))
            F.cross_entropy(logits.float(), y).backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
            optimizer.step()
            if schedule and schedule["interval"] == "step":
                schedule["scheduler"].step()
        if schedule and schedule["interval"] == "epoch":
            schedule["scheduler"].step()
    return net


def assert_same_parameters(
    a: torch.nn.Module, b: torch.nn.Module, rtol: float = 1e-5, atol: float = 1e-6
) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


def assert_identical_parameters(a: torch.nn.Module, b: torch.nn.Module) -> None:
    assert_same_parameters(a, b, rtol=0, atol=0)


# The course's own optimizers run the same eager path as torch's: they are the slow tier (~3 s each).
@pytest.mark.parametrize(
    "optimizer",
    [pytest.param(o, marks=pytest.mark.slow) if o.startswith("course/") else o for o in OPTIMIZERS],
)
def test_k_steps_per_call_train_like_the_plain_loop(optimizer, tmp_path):
    """Every optimizer, a per-step scheduler, dropout, augmentation: 2 epochs, 14 steps in 6 Lightning steps."""
    overrides = TINY + [
        f"optimizer={optimizer}",
        "scheduler=cosine",
        "trainer.max_epochs=2",
        "callbacks.checkpoint=false",
    ]
    module, trainer = fit(overrides, tmp_path / "k")
    assert trainer.global_step == 14 and module.steps_per_call == 3
    assert module.step_mode == "eager (the device is cpu, not a CUDA GPU)"
    assert_same_parameters(module.net, plain_loop(overrides, tmp_path / "plain"))


@pytest.mark.parametrize(
    "scheduler", [["scheduler=step", "scheduler.step_size=1", "scheduler.gamma=0.5"], ["scheduler=onecycle"]]
)
def test_epoch_and_momentum_schedules_and_clipping_match(scheduler, tmp_path):
    overrides = TINY + [
        "optimizer=nesterov",
        "trainer.max_epochs=3",
        "trainer.gradient_clip_val=0.5",
        "callbacks.checkpoint=false",
        *scheduler,
    ]
    module, trainer = fit(overrides, tmp_path / "k")
    assert trainer.global_step == 21
    assert_same_parameters(module.net, plain_loop(overrides, tmp_path / "plain"))


def test_steps_through_lightnings_optimizer_step_clip_there(tmp_path):
    """A callback with a per-step hook sends every step through Lightning's optimizer step (as DDP and 16-mixed
    do). Clipping then happens in the module's on_before_optimizer_step, after Lightning's unscale_ of fp16
    gradients and after the callbacks' hooks: same parameters as the plain loop, and the callback saw the
    gradients before clipping."""

    class SeesGradients(L.Callback):
        every_n_steps = 1

        def __init__(self) -> None:
            self.norms: list[float] = []

        def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
            grads = [p.grad for p in pl_module.net.parameters() if p.grad is not None]
            self.norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))

    overrides = TINY + [
        "optimizer=adam",
        "trainer.max_epochs=2",
        "trainer.gradient_clip_val=0.05",
        "callbacks.checkpoint=false",
    ]
    seen = SeesGradients()
    module, trainer = fit(overrides, tmp_path / "k", callbacks=[seen])
    assert trainer.global_step == 14 and len(seen.norms) == 14
    assert max(seen.norms) > 0.05  # clipping had work to do, and the hook ran before it
    assert_same_parameters(module.net, plain_loop(overrides, tmp_path / "plain"))


class StopAfterEpochs(L.Callback):
    """Stops the run after ``epochs`` epochs: an interrupted run whose schedule was planned for all of them."""

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.current_epoch + 1 >= self.epochs:
            trainer.should_stop = True


@pytest.mark.parametrize(
    "captured,schedule",
    [(False, "exponential"), (True, "exponential"), (True, "onecycle")],
    ids=["eager", "captured", "captured-onecycle"],
)
def test_a_resumed_run_ends_where_an_uninterrupted_one_does(captured, schedule, monkeypatch, tmp_path):
    """Stop after epoch 2 of 3, resume from last.ckpt: same step count, data order, dropout draws, schedule, and
    bit for bit the same parameters; eager, and captured (CUDA graphs emulated: tests/graph_emulation.py), also
    with a one-cycle schedule whose momentum the captured steps read from the device (the resumed run's first
    steps are eager warm-up steps: they read the same device values)."""
    if captured:
        graph_emulation.install(monkeypatch)
    if schedule == "exponential":
        base = TINY + ["optimizer=adamw", "scheduler=exponential", "scheduler.gamma=0.7"]
    else:
        base = TINY + ["optimizer=adam", "scheduler=onecycle", "scheduler.max_lr=0.01"]
    base += ["trainer.max_epochs=3"]
    full, full_trainer = fit(base, tmp_path / "full")
    fit(base, tmp_path / "first", callbacks=[StopAfterEpochs(2)])
    resumed, trainer = fit(
        base, tmp_path / "second", ckpt_path=str(tmp_path / "first" / "checkpoints" / "last.ckpt")
    )
    mode = "captured" if captured else "eager (the device is cpu, not a CUDA GPU)"
    assert resumed.step_mode == full.step_mode == mode
    assert resumed.device_momentum == (schedule == "onecycle")
    assert trainer.global_step == full_trainer.global_step == 21
    lr = trainer.optimizers[0].param_groups[0]["lr"]
    assert lr == full_trainer.optimizers[0].param_groups[0]["lr"]
    if schedule == "exponential":
        assert lr == pytest.approx(0.001 * 0.7**3)
    assert_identical_parameters(resumed.net, full.net)


def test_steps_per_call_changes_nothing_but_the_grouping(tmp_path):
    """K = 1, 4 and auto (8, capped at the 7 batches of an epoch) give the same parameters, with a plateau
    schedule on val/acc (patience 0: it halves the lr after every epoch without improvement)."""
    runs = {}
    for k in ("1", "4", "auto"):
        module, trainer = fit(
            TINY
            + [
                f"trainer.steps_per_call={k}",
                "trainer.max_epochs=3",
                "callbacks.checkpoint=false",
                "scheduler=plateau",
                "scheduler.patience=0",
                "scheduler.factor=0.5",
            ],
            tmp_path / k,
        )
        runs[k] = module
        assert trainer.global_step == 21
        assert 0 <= float(trainer.callback_metrics["train/acc"]) <= 1
    assert runs["auto"].steps_per_call == 7
    assert_same_parameters(runs["1"].net, runs["4"].net)
    assert_same_parameters(runs["1"].net, runs["auto"].net)


def test_limit_train_batches_counts_optimizer_steps(tmp_path):
    _, trainer = fit(
        TINY + ["trainer.limit_train_batches=5", "trainer.max_epochs=2", "callbacks.checkpoint=false"],
        tmp_path,
    )
    assert trainer.global_step == 10


def test_capture_is_chosen_where_it_can_apply_and_refused_clearly_where_not(tmp_path):
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert capture_blocker(cuda, torch.optim.Adam) is None
    assert capture_blocker(cuda, torch.optim.SGD, "bf16-mixed") is None
    assert "cpu" in capture_blocker(cpu, torch.optim.Adam)
    from cifarlab.optim import COURSE_OPTIMIZERS

    assert all(capture_blocker(cuda, cls) is None for cls in COURSE_OPTIMIZERS.values())
    assert capture_blocker(cuda, torch.optim.Adagrad) is None  # as cifarlab.capturable.CapturableAdagrad
    assert capture_blocker(cuda, torch.optim.LBFGS) == "torch.optim.lbfgs.LBFGS has no capturable form"
    assert "16-mixed" in capture_blocker(cuda, torch.optim.Adam, "16-mixed")
    assert "DDP" in capture_blocker(cuda, torch.optim.Adam, world_size=2)
    # A one-cycle schedule cycles the momentum: captured where the optimizer reads it from the device.
    sgd = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1, momentum=0.9)
    onecycle = torch.optim.lr_scheduler.OneCycleLR(sgd, max_lr=0.1, total_steps=10)
    for cls in (torch.optim.Adam, torch.optim.AdamW, torch.optim.NAdam, torch.optim.RAdam, torch.optim.SGD):
        assert capture_blocker(cuda, cls, scheduler=onecycle) is None
    for name in ("momentum", "nesterov", "adam"):
        assert capture_blocker(cuda, COURSE_OPTIMIZERS[name], scheduler=onecycle) is None
    assert capture_blocker(cuda, torch.optim.RMSprop, scheduler=onecycle) is None

    class HostMomentum(torch.optim.SGD):  # capturable, but reads its momentum on the host
        supports_capture = True

    assert capture_blocker(cuda, HostMomentum) is None
    assert capture_blocker(cuda, HostMomentum, scheduler=onecycle) == (
        "the scheduler cycles the momentum, which HostMomentum reads on the host"
    )
    # trainer.capture=true where it cannot apply: one line naming the setting, before any work
    for extra in (["trainer.accelerator=cpu"], ["trainer=ddp"], ["trainer.precision=16-mixed"]):
        with pytest.raises(
            ConfigError, match=r"trainer.capture=True is not allowed; allowed: auto or false here"
        ):
            validate(compose_train(["trainer.capture=true", *extra]))
    # where only the device rules it out, the module refuses it when it knows the device: before any step
    with pytest.raises(ConfigError) as err:
        fit([o for o in TINY if o != "trainer.accelerator=cpu"] + ["trainer.capture=true"], tmp_path)
    assert str(err.value) == (
        "trainer.capture=True is not allowed; allowed: auto or false here (the device is cpu, not a CUDA GPU)"
    )
    assert not (tmp_path / "checkpoints").exists()
    for bad in ("trainer.steps_per_call=0", "trainer.capture=maybe"):
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            validate(compose_train([bad]))


def test_a_checkpoint_from_automatic_optimization_resumes_at_its_step(tmp_path):
    """Checkpoints written before manual optimization count steps in the automatic loop: resumed, they go on
    from that global_step."""
    base = TINY + ["trainer.max_epochs=1"]
    fit(base, tmp_path / "first")
    last = tmp_path / "first" / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, weights_only=False)
    loops = ckpt["loops"]["fit_loop"]
    manual = loops["epoch_loop.manual_optimization.optim_step_progress"]
    automatic = loops["epoch_loop.automatic_optimization.optim_progress"]["optimizer"]["step"]
    for k in ("total", "current"):
        automatic[k].update(ready=manual[k]["ready"], completed=manual[k]["completed"])
        manual[k].update(ready=0, completed=0)
    torch.save(ckpt, last)
    _, trainer = fit(base + ["trainer.max_epochs=2"], tmp_path / "second", ckpt_path=str(last))
    assert trainer.global_step == 14


def plain_evaluation(net: torch.nn.Module, batches: DeviceBatches) -> tuple[float, float]:
    """Mean cross-entropy per image and accuracy, one batch at a time, as a course notebook computes them."""
    net.eval()
    loss_sum, correct, images = 0.0, 0, 0
    with torch.no_grad():
        for x, y in batches:
            logits = net(x)
            loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(1) == y).sum())
            images += len(y)
    return loss_sum / images, correct / images


def test_evaluation_sums_give_what_a_plain_evaluation_gives(tmp_path):
    """Validation and test read device sums once per pass (EvalStep): the same loss and accuracy as a plain
    evaluation of the final network, with a short last batch (112 = 48 + 48 + 16), after a sanity check."""
    overrides = TINY + [
        "data.eval_batch_size=48",
        "trainer.max_epochs=2",
        "trainer.num_sanity_val_steps=1",
        "callbacks.checkpoint=false",
    ]
    module, trainer = fit(overrides, tmp_path)
    dm = trainer.datamodule
    loss, acc = plain_evaluation(module.net, dm.val_dataloader())
    assert float(trainer.callback_metrics["val/loss"]) == pytest.approx(loss, rel=1e-5)
    assert float(trainer.callback_metrics["val/acc"]) == pytest.approx(acc, rel=1e-6)  # logged as float32
    assert module.eval_mode == "eager"
    tested = trainer.test(module, datamodule=dm, verbose=False)[0]
    loss, acc = plain_evaluation(module.net, dm.test_dataloader())
    assert tested["test/loss"] == pytest.approx(loss, rel=1e-5)
    assert tested["test/acc"] == pytest.approx(acc, rel=1e-6)  # logged as float32
    assert module.evaluator.images == 0  # read and reset at the end of the pass


@pytest.mark.slow
def test_k_steps_under_ddp_train_like_one_step_per_call(tmp_path):
    """Two CPU processes (gloo): K = 3 and K = 1 end with the same parameters on both ranks (DDP averaged the
    gradients of their different shards) and the same validation (each rank evaluates its shard of the
    validation images, every image on some rank; the sums are added over ranks)."""
    import os
    import subprocess
    import sys

    script = tmp_path / "ddp.py"
    script.write_text(
        "import sys, torch, lightning as L\n"
        "from pathlib import Path\n"
        "from cifarlab.config import validate\n"
        "from cifarlab.train import build_datamodule, build_module, build_trainer\n"
        "from tests.conftest import compose_train\n"
        "out = Path(sys.argv[1]); overrides = sys.argv[2:]\n"
        "cfg = compose_train(overrides, out); validate(cfg)\n"
        "L.seed_everything(cfg.seed, verbose=False)\n"
        "dm = build_datamodule(cfg); module = build_module(cfg, dm.num_classes)\n"
        "trainer = build_trainer(cfg, out); trainer.fit(module, datamodule=dm)\n"
        "torch.save({'net': module.net.state_dict(), 'step': trainer.global_step,\n"
        "            'val': {k: float(v) for k, v in trainer.callback_metrics.items()}},\n"
        "           out / f'end{trainer.global_rank}.pt')\n"
    )
    ends = {}
    for k in ("1", "3"):
        out = tmp_path / k
        out.mkdir()
        overrides = [o for o in TINY if not o.startswith(("trainer.steps_per_call", "data.val_size"))] + [
            "data.val_size=111",  # odd: one rank validates 56 images, the other 55
            "trainer=ddp",
            "trainer.accelerator=cpu",
            "trainer.devices=2",
            "trainer.precision=32",
            f"trainer.steps_per_call={k}",
            "trainer.max_epochs=2",
            "optimizer=adam",
            "callbacks.checkpoint=false",
        ]
        result = subprocess.run(
            [sys.executable, str(script), str(out), *overrides],
            cwd=tmp_path,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        ends[k], other_rank = (torch.load(out / f"end{r}.pt", weights_only=False) for r in (0, 1))
        for name, p in ends[k]["net"].items():  # the ranks' gradients were averaged: one model
            torch.testing.assert_close(p, other_rank["net"][name], rtol=0, atol=0, msg=name)
    # 212 - 111 = 101 training images over 2 ranks: 50 each (one left out), batch 16: 4 steps per epoch and rank
    assert ends["1"]["step"] == ends["3"]["step"] == 8
    for name, p in ends["1"]["net"].items():
        torch.testing.assert_close(p, ends["3"]["net"][name], rtol=1e-5, atol=1e-6, msg=name)
    assert ends["1"]["val"]["val/acc"] == pytest.approx(ends["3"]["val"]["val/acc"], rel=1e-6)
    assert ends["1"]["val"]["val/loss"] == pytest.approx(ends["3"]["val"]["val/loss"], rel=1e-5)
    # the ranks' sums add up to one evaluation of all 111 validation images in one process (none left out)
    cfg = compose_train(overrides, tmp_path / "one")
    dm = build_datamodule(cfg)
    net = build_module(cfg, dm.num_classes).net
    net.load_state_dict(ends["3"]["net"])
    loss, acc = plain_evaluation(net, dm.val_dataloader())
    assert ends["3"]["val"]["val/acc"] == pytest.approx(acc, rel=1e-6)
    assert ends["3"]["val"]["val/loss"] == pytest.approx(loss, rel=1e-5)


def test_early_stopping_stops_k_step_runs_at_the_epoch_it_should(tmp_path):
    """SGD at lr 1e-12: val/acc never improves after epoch 1, so patience 1 stops after epoch 2 of 5, with
    every optimizer step of those 2 epochs counted (7 each)."""
    overrides = TINY + [
        "optimizer=sgd",
        "optimizer.lr=1e-12",
        "trainer.max_epochs=5",
        "callbacks.early_stopping_patience=1",
        "callbacks.checkpoint=false",
    ]
    module, trainer = fit(overrides, tmp_path)
    assert trainer.current_epoch == 2 and trainer.global_step == 14
    assert trainer.should_stop


@pytest.mark.parametrize("optimizer", ["rmsprop", "adam"])
def test_a_captured_gpu_runs_checkpoint_resumes_on_a_cpu(optimizer, tmp_path):
    """A checkpoint of a captured GPU run has capturable=True in its optimizer groups; torch's load_state_dict
    would restore it and the CPU's first step would fail. The run's own settings are kept instead, and the
    resumed run ends where an uninterrupted one does."""
    base = TINY + [f"optimizer={optimizer}", "trainer.max_epochs=2"]
    full, _ = fit(base, tmp_path / "full")
    fit(TINY + [f"optimizer={optimizer}", "trainer.max_epochs=1"], tmp_path / "first")
    last = tmp_path / "first" / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, weights_only=False)
    for group in ckpt["optimizer_states"][0]["param_groups"]:  # as optimizer_for_capture builds it on a GPU
        group.update(capturable=True, fused=None, foreach=True)
    torch.save(ckpt, last)
    resumed, trainer = fit(base, tmp_path / "second", ckpt_path=str(last))
    assert trainer.global_step == 14
    groups = trainer.optimizers[0].param_groups
    assert not groups[0]["capturable"] and (groups[0]["fused"] or groups[0]["foreach"])
    assert_same_parameters(resumed.net, full.net)


def test_per_step_values_are_logged_at_every_nth_optimizer_step(tmp_path):
    """log_every_n_steps=2 with 3 steps per Lightning call: train/loss_step and train/lr after steps 2, 4, ..., 14,
    each at its own step on the logger's axis (Lightning's, 0-based: 1, 3, ..., 13), not one value per call at
    the call's last step."""
    import csv

    from cifarlab.train import run

    overrides = [o for o in TINY if o != "logger=none"] + [
        "logger=csv",
        "trainer.log_every_n_steps=2",
        "trainer.max_epochs=2",
        "scheduler=cosine",
        "callbacks.checkpoint=false",
    ]
    run(compose_train(overrides, tmp_path))
    rows = list(csv.DictReader((tmp_path / "csv" / "metrics.csv").open()))
    logged = {int(r["step"]): r for r in rows if r.get("train/loss_step")}
    assert sorted(logged) == [1, 3, 5, 7, 9, 11, 13]
    lrs = [float(logged[s]["train/lr"]) for s in sorted(logged)]
    assert lrs == sorted(lrs, reverse=True) and len(set(lrs)) == 7  # the cosine schedule, step by step
    # epoch-level values on the same axis: at the epoch's last optimizer step (7 and 14)
    assert sorted(int(r["step"]) for r in rows if r.get("train/acc")) == [6, 13]


def test_the_progress_bar_counts_optimizer_steps(tmp_path):
    """With 3 steps per call, Rich's bar shows 7 batches per epoch (not 3 calls), and reaches 7; it shows the
    last logged train/loss_step (every 2 steps: after the calls of steps 1-3, 4-6, 7 | 8-10, 11-13, 14, those of
    steps 2, 6, 6 | 10, 12, 14)."""
    cfg = compose_train(
        TINY
        + [
            "trainer.max_epochs=2",
            "callbacks.checkpoint=false",
            "trainer.enable_progress_bar=true",
            "trainer.log_every_n_steps=2",
        ],
        tmp_path,
    )
    L.seed_everything(cfg.seed, verbose=False)
    dm = build_datamodule(cfg)
    module = build_module(cfg, dm.num_classes)
    trainer = build_trainer(cfg, tmp_path)
    bar = trainer.progress_bar_callback
    assert type(bar).__name__ == "StepProgressBar"
    updates: list[tuple[float, float]] = []
    shown: list[float | None] = []
    logged: dict[int, float] = {}
    original, log_step = bar._update, module._log_step

    def record(progress_bar_id, current, visible=True, hard=False):
        if progress_bar_id is not None and progress_bar_id == bar.train_progress_bar_id:
            updates.append((current, bar.progress.tasks[progress_bar_id].total))
            shown.append(bar.get_metrics(trainer, module).get("train/loss_step"))
        original(progress_bar_id, current, visible, hard)

    def note(step, loss, lr):
        logged[step] = float(loss)
        log_step(step, loss, lr)

    bar._update, module._log_step = record, note
    trainer.fit(module, datamodule=dm)
    assert updates == [(3, 7), (6, 7), (7, 7)] * 2
    assert sorted(logged) == [2, 4, 6, 8, 10, 12, 14]
    assert shown == [logged[s] for s in (2, 6, 6, 10, 12, 14)]
