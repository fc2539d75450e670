"""The captured training and evaluation steps (CUDA graphs) run on this CPU through tests/graph_emulation.py:
recorded once, replayed with every host-side value baked in, as on a GPU. A captured run computes what the
plain one-step-at-a-time loop computes: same parameters after many steps, for every capturable optimizer
(torch's and the course's), with schedulers (one-cycle too, its momentum read from the device), dropout,
clipping, bf16, a hyperparameter changed mid-run and callbacks' per-step hooks (a captured resume:
tests/test_step.py). Real Lightning Trainers."""

from __future__ import annotations

import json
from functools import partial

import lightning as L
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import cifarlab.config
import cifarlab.step
from cifarlab.capturable import (
    CapturableAdagrad,
    DeviceMomentumRMSprop,
    DeviceMomentumSGD,
    optimizer_for_capture,
)
from cifarlab.data import DeviceBatches
from cifarlab.optim import COURSE_OPTIMIZERS
from cifarlab.step import WARMUP_STEPS, EvalStep, TrainStep
from cifarlab.train import run
from tests import graph_emulation
from tests.conftest import compose_train
from tests.test_course_optim import DEFAULT_KW
from tests.test_step import (
    TINY,
    assert_identical_parameters,
    assert_same_parameters,
    fit,
    plain_evaluation,
    plain_loop,
)

# Captured bit for bit like the plain loop (fused forms both ways). torch's RMSprop, NAdam and RAdam capture in
# their foreach capturable form, which rounds differently from the plain foreach one, and the CNN amplifies such
# differences (NAdam: 40% after 21 steps, through ReLU and max-pool ties); they are compared on a small net below.
CAPTURABLE_HERE = ["adam", "adamw", "sgd", "momentum", "nesterov"]


@pytest.fixture
def graphs(monkeypatch):
    """CUDA graphs on this CPU (tests/graph_emulation.py); ``graphs.undo()`` turns them off again."""
    graph_emulation.install(monkeypatch)
    return monkeypatch


# ---- the emulation itself: what makes the tests below able to fail ---------------------------------------------


def test_the_emulation_records_without_running_and_bakes_host_values(graphs):
    """As on a GPU: the capture changes nothing, a replay reads tensors' current values and the Python floats
    of the capture, writes into the capture's own output tensors, and a host sync fails the capture."""
    x, scale = torch.ones(3), 2.0
    total = torch.zeros(3)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = x * scale + torch.rand(3)  # a fresh tensor: the graph's output
        total.add_(y)  # in place on a tensor from before the capture
    assert total.tolist() == [0.0, 0.0, 0.0]  # recorded, not run
    torch.manual_seed(0)
    g.replay()
    torch.manual_seed(0)
    expected = 2.0 + torch.rand(3)
    assert torch.equal(y, expected) and torch.equal(total, expected)
    x.fill_(10.0)
    scale = 100.0  # noqa: F841 - baked in: the replay still multiplies by 2
    g.replay()
    assert (y >= 20).all() and (y < 21).all() and torch.allclose(total, expected + y)
    with (
        pytest.raises(graph_emulation.CaptureError, match="capturing"),
        torch.cuda.graph(torch.cuda.CUDAGraph()),
    ):
        if total.sum() > 0:  # the host needs the value: a GPU capture refuses it
            pass


# ---- TrainStep and EvalStep on their own ----------------------------------------------------------------------


def _tiny_net(sync_in_forward: bool = False) -> torch.nn.Module:
    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = torch.nn.Sequential(
                torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 32), torch.nn.ReLU(), torch.nn.Dropout(0.3)
            )
            self.head = torch.nn.Linear(32, 10)

        def forward(self, x):
            h = self.body(x)
            if sync_in_forward and float(h.mean()) < 0:  # a host read: cannot be part of a graph
                h = -h
            return self.head(h)

    torch.manual_seed(0)
    return Net()


def _batches(n: int = 200, batch: int = 32) -> DeviceBatches:
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (n,), generator=g)
    return DeviceBatches(images, labels, batch, mean=(0.5,) * 3, std=(0.25,) * 3, shuffle=True, augment=True)


def _train(step: TrainStep, batches: DeviceBatches, epochs: int, schedule=None) -> list[float]:
    losses = []
    for epoch in range(epochs):
        batches.epoch = lambda e=epoch: e
        for plan in batches.batch_plans():
            loss, _ = step(batches, plan)
            losses.append(float(loss))
            if schedule is not None:
                schedule.step()
    return losses


def test_a_captured_train_step_replays_what_the_eager_one_computes(graphs):
    """Adam with a per-step cosine schedule (the lr read from a device tensor), clipping, dropout and
    augmentation: 3 warm-up steps, one capture, replays, and the short last batch of each epoch eager."""
    runs = {}
    for capture in (False, True):
        net = _tiny_net()
        opt = optimizer_for_capture(partial(torch.optim.Adam, lr=0.01), net.parameters())
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=40)
        step = TrainStep(net, opt, capture=capture, clip_norm=0.5)
        torch.manual_seed(5)
        losses = _train(step, _batches(), epochs=3, schedule=schedule)
        runs[capture] = (net, losses, step)
    net, losses, step = runs[True]
    assert step.mode == "captured" and step.replays == 3 * 7 - WARMUP_STEPS - 3  # 200 images: 6 x 32 + 8
    assert losses == runs[False][1]
    assert_identical_parameters(net, runs[False][0])
    mean_loss, acc, images = step.epoch_metrics()
    assert images == 600 and mean_loss == pytest.approx(sum(losses) / len(losses), rel=1e-6)


def test_a_step_that_reads_a_value_on_the_host_falls_back_to_eager_and_says_why(graphs):
    """A forward with ``float(tensor)`` in it cannot be captured: the step says why and trains eagerly, exactly
    as a run with capture off."""
    nets = {}
    for capture in (False, True):
        net = _tiny_net(sync_in_forward=True)
        opt = optimizer_for_capture(partial(torch.optim.SGD, lr=0.05), net.parameters())
        step = TrainStep(net, opt, capture=capture)
        torch.manual_seed(5)
        _train(step, _batches(), epochs=2)
        nets[capture] = net
    assert step.replays == 0 and step.mode.startswith("eager (capture failed (CaptureError")
    assert_identical_parameters(nets[True], nets[False])


CYCLED = {  # a one-cycle schedule cycles these optimizers' momentum (β1), read from a device tensor
    "adam": partial(torch.optim.Adam, lr=0.01),
    "adamw": partial(torch.optim.AdamW, lr=0.01, weight_decay=0.05),
    "nadam": partial(torch.optim.NAdam, lr=0.01),
    "radam": partial(torch.optim.RAdam, lr=0.01),
    "momentum": partial(torch.optim.SGD, lr=0.05, momentum=0.9, weight_decay=0.01),  # as DeviceMomentumSGD
    "nesterov": partial(torch.optim.SGD, lr=0.05, momentum=0.9, nesterov=True),
    "rmsprop": partial(torch.optim.RMSprop, lr=0.01, momentum=0.9, centered=True),  # as DeviceMomentumRMSprop
    "course/momentum": partial(COURSE_OPTIMIZERS["momentum"], lr=0.05),
    "course/nesterov": partial(COURSE_OPTIMIZERS["nesterov"], lr=0.05),
    "course/adam": partial(COURSE_OPTIMIZERS["adam"], lr=0.01),
}
FOREACH_CAPTURABLE = {  # captured in their foreach form (the emulation lets their device check pass a CPU)
    "rmsprop": partial(torch.optim.RMSprop, lr=0.01, momentum=0.5),
    "nadam": partial(torch.optim.NAdam, lr=0.01),
    "radam": partial(torch.optim.RAdam, lr=0.01),
    "adagrad": partial(torch.optim.Adagrad, lr=0.05, lr_decay=0.01, weight_decay=0.01),  # CapturableAdagrad
}


@pytest.mark.parametrize(
    "name,schedule",
    [(name, "onecycle") for name in CYCLED] + [(name, "cosine") for name in FOREACH_CAPTURABLE],
)
def test_a_captured_step_follows_a_one_cycle_schedules_momentum_and_every_capturable_optimizer(
    name, schedule, graphs
):
    """One-cycle changes the momentum (β1) before every step: the captured step reads it from a device tensor
    refreshed before each replay, as the learning rate; each step then computes what an eager step with the
    floats does (to float rounding: 1 - β1 from a float32 tensor; for SGD and RMSprop, cifarlab.capturable's
    step against torch's own). RMSprop, NAdam, RAdam: torch's foreach capturable form, under a cosine schedule."""
    factory = (CYCLED if schedule == "onecycle" else FOREACH_CAPTURABLE)[name]
    onecycle = schedule == "onecycle"
    runs = {}
    for capture in (False, True):
        net = _tiny_net()
        opt = optimizer_for_capture(factory, net.parameters(), device_momentum=onecycle)
        if onecycle:
            plan = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=factory.keywords["lr"], total_steps=21)
            assert plan.cycle_momentum
        else:
            plan = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=21)
        # the eager run with the floats: the device values only where the step is captured
        step = TrainStep(net, opt, capture=capture, device_momentum=capture and onecycle)
        torch.manual_seed(5)
        runs[capture] = (net, _train(step, _batches(), epochs=3, schedule=plan), step)
    (net, losses, step), (eager_net, eager_losses, _) = runs[True], runs[False]
    assert step.mode == "captured" and step.replays == 3 * 7 - WARMUP_STEPS - 3
    assert losses == pytest.approx(eager_losses, rel=1e-5)
    assert_same_parameters(net, eager_net, rtol=1e-5, atol=1e-6)


def _evaluate(evaluator: EvalStep, batches) -> torch.Tensor:
    """One validation pass as the module runs it: reset, every batch in inference mode, the totals."""
    evaluator.reset()
    with torch.inference_mode():
        for x, y in batches:
            evaluator(x, y)
    return evaluator.totals()


def test_captured_evaluation_gives_the_eager_sums_for_every_batch_shape(graphs):
    """Batches of 48, 48, 16 evaluated three times: each shape is warmed up, captured, then replayed."""
    net = _tiny_net().eval()
    batches = _batches(n=112, batch=48)
    batches.shuffle = batches.augment = False
    sums = {}
    for capture in (False, True):
        evaluator = EvalStep(net, capture=capture)
        for _ in range(3):
            sums[capture] = _evaluate(evaluator, batches)
    # 48: eager (warm-up), then captured and replayed 5 times; 16: eager, then captured and replayed twice
    assert evaluator.replays == 7
    torch.testing.assert_close(sums[True], sums[False], rtol=1e-6, atol=1e-6)
    assert EvalStep.metrics(sums[True]) == pytest.approx(plain_evaluation(net, batches), rel=1e-5)


def test_captured_evaluation_follows_the_network_to_new_memory(graphs):
    """A run's test after its fit: Lightning moves the network to the CPU at the fit's end and back to the GPU for
    the test (new memory for every weight), and loads the best checkpoint into it. The graphs captured during
    validation read the old addresses: replayed, they gave test/acc 0.1000 on an H200. The evaluator captures
    again when the weights have moved (the emulation refuses a replay on moved memory, as a GPU cannot)."""
    net = _tiny_net().eval()
    batches = _batches(n=96, batch=48)
    batches.shuffle = batches.augment = False
    evaluator = EvalStep(net, capture=True)
    before = plain_evaluation(net, batches)
    for _ in range(2):  # validation: the first batch warms up, the second is captured, then replays
        assert EvalStep.metrics(_evaluate(evaluator, batches)) == pytest.approx(before, rel=1e-5)
    assert evaluator.replays == 3
    torch.manual_seed(9)  # "the best checkpoint": other weights, loaded into new memory
    best = {k: v + 0.2 * torch.randn_like(v) for k, v in net.state_dict().items()}
    net.load_state_dict(best, assign=True)
    expected = plain_evaluation(net, batches)
    assert expected[0] != pytest.approx(before[0], rel=1e-3)  # else the test could not tell old from new
    for _ in range(2):
        assert EvalStep.metrics(_evaluate(evaluator, batches)) == pytest.approx(expected, rel=1e-5)
    assert evaluator.capture and evaluator.replays == 3 + 3  # captured again, on the new memory


# ---- whole runs: a real Trainer with the captured step -----------------------------------------------------


@pytest.mark.parametrize("optimizer", CAPTURABLE_HERE)
def test_captured_runs_train_like_the_plain_loop(optimizer, graphs, tmp_path):
    """A per-step cosine schedule, dropout, augmentation: 2 epochs of 7 batches, every full batch after the
    warm-up replayed; validation captured too."""
    overrides = TINY + [
        f"optimizer={optimizer}",
        "scheduler=cosine",
        "trainer.max_epochs=2",
        "callbacks.checkpoint=false",
        "trainer.steps_per_call=auto",
        "data.eval_batch_size=48",  # 112 validation images: 48 + 48 + 16, each shape captured
    ]
    module, trainer = fit(overrides, tmp_path / "captured")
    assert module.step_mode == "captured" and module.eval_mode == "captured"
    assert module.steps_per_call == 7  # auto: 32 for a captured step, capped at an epoch's 7 batches
    assert trainer.global_step == 14 and module.stepper.replays == 14 - WARMUP_STEPS - 2  # short last batches
    graphs.undo()
    assert_same_parameters(module.net, plain_loop(overrides, tmp_path / "plain"))
    dm = trainer.datamodule
    loss, acc = plain_evaluation(module.net, dm.val_dataloader())
    assert float(trainer.callback_metrics["val/loss"]) == pytest.approx(loss, rel=1e-5)
    assert float(trainer.callback_metrics["val/acc"]) == pytest.approx(acc, rel=1e-6)


@pytest.mark.parametrize(
    "extra",
    [
        ["optimizer=nesterov", "scheduler=step", "scheduler.step_size=1", "scheduler.gamma=0.5"],
        ["optimizer=adam", "scheduler=plateau", "scheduler.patience=0", "scheduler.factor=0.5"],
        ["optimizer=adamw", "scheduler=cosine", "trainer.gradient_clip_val=0.05"],
        ["optimizer=adam", "trainer.precision=bf16-mixed", "scheduler=exponential", "scheduler.gamma=0.7"],
        ["optimizer=momentum", "model.activation=tanh", "model.dropout=0.0", "model.init=xavier_normal"],
        ["optimizer=sgd", "model.activation=leaky_relu", "trainer.channels_last=false"],
    ],
    ids=["step", "plateau", "clip", "bf16-mixed", "tanh-no-dropout", "leaky-relu-nchw"],
)
def test_captured_runs_compute_bit_for_bit_what_eager_runs_do(extra, graphs, tmp_path):
    """Epoch schedules (the plateau one driven by validation), clipping of the total gradient norm inside the
    graph, bf16 autocast: 3 epochs captured end with exactly the parameters of trainer.capture=false."""
    sets_precision = any(o.startswith("trainer.precision") for o in extra)
    overrides = [o for o in TINY if not (sets_precision and o.startswith("trainer.precision"))] + [
        "trainer.max_epochs=3",
        "callbacks.checkpoint=false",
        *extra,
    ]
    captured, trainer = fit(overrides, tmp_path / "captured")
    eager, _ = fit(overrides + ["trainer.capture=false"], tmp_path / "eager")
    assert captured.step_mode == "captured" and trainer.global_step == 21
    assert captured.stepper.replays == 21 - WARMUP_STEPS - 3
    assert_identical_parameters(captured.net, eager.net)


class _ChangesWeightDecay(L.Callback):
    """Sets the weight decay of the first parameter group at the start of epoch 2 (a value a graph bakes in)."""

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == 1:
            trainer.optimizers[0].param_groups[0]["weight_decay"] = 0.5


class _SeesGradientsEveryFourSteps(L.Callback):
    every_n_steps = 4

    def __init__(self) -> None:
        self.steps: list[int] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.steps.append(trainer.global_step)


@pytest.mark.parametrize("callback", [_ChangesWeightDecay, _SeesGradientsEveryFourSteps])
def test_a_baked_in_value_changed_mid_run_and_per_step_hooks_train_like_eager(callback, graphs, tmp_path):
    """A weight decay changed mid-run sends the rest of the run eager, and the summary says why; a callback's
    hook every 4 steps gets those steps eagerly, between replays. Either way: the parameters of the same run
    with trainer.capture=false."""
    overrides = TINY + ["optimizer=adam", "trainer.max_epochs=3", "callbacks.checkpoint=false"]
    captured, trainer = fit(overrides, tmp_path / "captured", callbacks=[callback()])
    eager, _ = fit(overrides + ["trainer.capture=false"], tmp_path / "eager", callbacks=[callback()])
    assert eager.step_mode == "eager (trainer.capture=false)"
    if callback is _ChangesWeightDecay:
        assert captured.step_mode.startswith("captured, then eager (optimizer weight_decay changed")
    else:
        assert captured.step_mode == "captured" and captured.stepper.replays > 0
        assert trainer.callbacks[-1].steps == [0, 4, 8, 12, 16, 20]
    assert_identical_parameters(captured.net, eager.net)


def test_train_py_reports_the_captured_step_and_logs_every_steps_own_loss(graphs, tmp_path):
    """train.run with the captured step: metrics.json says so, and the per-step losses logged every 2 steps
    (the graph's output tensor, read right after its step) are the ones the eager run logs."""
    import csv

    overrides = [o for o in TINY if o != "logger=none"] + [
        "logger=csv",
        "trainer.log_every_n_steps=2",
        "trainer.max_epochs=2",
        "callbacks.checkpoint=false",
    ]
    logged = {}
    for mode in ("captured", "eager"):
        out = tmp_path / mode
        run(compose_train(overrides + ([] if mode == "captured" else ["trainer.capture=false"]), out))
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["step_mode"] == ("captured" if mode == "captured" else "eager (trainer.capture=false)")
        rows = csv.DictReader((out / "csv" / "metrics.csv").open())
        logged[mode] = {int(r["step"]): float(r["train/loss_step"]) for r in rows if r.get("train/loss_step")}
        # metrics.json keeps the last one logged (step 14, at 13 on the loggers' 0-based axis)
        assert metrics["train/loss_step"] == logged[mode][13]
    assert sorted(logged["captured"]) == [1, 3, 5, 7, 9, 11, 13]
    assert logged["captured"] == logged["eager"]
    assert len(set(logged["captured"].values())) == 7


@pytest.mark.parametrize(
    "optimizer,schedule",
    [("nesterov", "onecycle"), ("adamw", "onecycle"), ("rmsprop", "onecycle"), ("adagrad", "cosine")],
)
def test_cifarlabs_capturable_forms_run_captured_and_replay_what_their_eager_steps_compute(
    optimizer, schedule, graphs, tmp_path
):
    """scheduler=onecycle with torch's Nesterov SGD, AdamW and RMSprop with momentum, and torch's Adagrad
    (CapturableAdagrad): captured, every replay computing bit for bit what the same run's steps compute when all
    of them are eager."""
    overrides = TINY + [f"optimizer={optimizer}", f"scheduler={schedule}", "trainer.max_epochs=3"]
    overrides += ["callbacks.checkpoint=false"] + (
        ["optimizer.momentum=0.9"] if optimizer == "rmsprop" else []
    )
    captured, trainer = fit(overrides, tmp_path / "captured")
    assert captured.step_mode == "captured" and captured.device_momentum == (schedule == "onecycle")
    expected = {
        "nesterov": DeviceMomentumSGD,
        "adamw": torch.optim.AdamW,
        "rmsprop": DeviceMomentumRMSprop,
        "adagrad": CapturableAdagrad,
    }
    assert type(trainer.optimizers[0]) is expected[optimizer]
    assert captured.stepper.replays == 21 - WARMUP_STEPS - 3
    graphs.setattr(cifarlab.step, "WARMUP_STEPS", 10**6)  # every step eager, reading the same device values
    eager, _ = fit(overrides, tmp_path / "eager")
    assert eager.stepper.replays == 0 and eager.stepper.steps == 21
    assert_identical_parameters(captured.net, eager.net)


@pytest.mark.parametrize("precision,augment", [("32", "false"), ("bf16-mixed", "true")])
def test_the_benchs_captured_plain_loop_runs_here_on_emulated_graphs(precision, augment, graphs, tmp_path):
    """(b'), ``make bench``'s captured plain loop, runs only where graphs are (a GPU): on emulated ones it times an
    epoch of captured replays, in both of the GPU session's settings (batch 64 fp32; bf16 with augmentation)."""
    from cifarlab import bench

    graphs.setattr(cifarlab.step, "GRAPH_DEVICES", ("cuda", "cpu"))
    overrides = bench.train_overrides(640, "synthetic", 64, precision, False, 0, [f"data.augment={augment}"])
    job = {"overrides": overrides, "images": 640, "seed": 0, "warmup_steps": 3, "output_dir": str(tmp_path)}
    result = bench.JOBS["captured"]({**job, "kind": "captured"})
    assert result["step_mode"] == "captured" and result["precision"] == precision
    assert result["images"] == 640 and result["steps"] == 10
    assert result["img_per_s"] > 0 and result["steady_img_per_s"] > 0  # steady: after the 3 warm-up steps


@pytest.mark.slow
def test_the_gpu_step_check_runs_here_on_emulated_graphs(tmp_path):
    """bench/gpu_step_check.py, the captured-vs-eager check of a GPU session, as a dry run on this CPU: it runs
    to its end and finds the captured step and evaluation equal to the eager ones, after 5 steps and after 8, and
    the repeated eager run (the check's noise scale) equal to the first."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    out = tmp_path / "step_check.json"
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "gpu_step_check.py"),
            "--emulate",
            "--steps",
            "8",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    checks = json.loads(out.read_text())
    optimizers = ("adam", "course_adam", "sgd", "rmsprop", "adagrad", "adam_onecycle", "nesterov_onecycle")
    runs = [f"{o}-{d}" for o in optimizers for d in ("bf16", "fp32")]
    assert sorted(checks) == sorted([*runs, "eval-bf16", "eval-fp32"])
    for key in runs:
        check = checks[key]
        assert check["captured"]["replays"] == 8 - WARMUP_STEPS
        assert check["eager"]["mode"] == check["eager_again"]["mode"] == "eager"
        # RMSprop's eager step reads its learning rate as a float, its captured one as a tensor: another rounding
        for diff in ("max_rel_param_diff_early", "max_rel_param_diff"):
            assert check[diff] <= (1e-4 if key.startswith("rmsprop") else 0.0), (key, diff, check[diff])
        assert check["noise_early"] == check["noise"] == 0.0, key  # eager runs repeat bit for bit on a CPU
    for key in ("eval-fp32", "eval-bf16"):
        assert checks[key]["replays"] > 0 and checks[key]["captured"] == checks[key]["eager"]


class _CountsHostReads(L.Callback):
    """Notes the training call (Lightning batch) of every operation that makes the host wait for the device
    (``.item()``, ``float(t)``, ``nonzero``) while the training epochs run, validation left out: on a GPU each
    one stalls the queue of launched steps."""

    class _Mode(TorchDispatchMode):
        def __init__(self, note) -> None:
            super().__init__()
            self.note = note

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in graph_emulation.HOST_SYNCS:
                self.note()
            return func(*args, **(kwargs or {}))

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []  # (epoch, batch_idx) of each read
        self.where = (-1, -1)
        self.mode: TorchDispatchMode | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.where = (trainer.current_epoch, batch_idx)

    def _start(self, *_) -> None:
        self.mode = self._Mode(lambda: self.calls.append(self.where))
        self.mode.__enter__()

    def _stop(self, *_) -> None:
        if self.mode is not None:
            self.mode.__exit__(None, None, None)
            self.mode = None

    on_train_epoch_start = on_validation_end = _start
    on_validation_start = on_train_epoch_end = _stop


@pytest.mark.parametrize("capture", ["auto", "false"])
def test_training_steps_read_from_the_device_only_where_they_log(capture, graphs, tmp_path):
    """3 epochs of 7 optimizer steps in calls of 3 (3, 3, 1), logging every 5 steps: the host reads one value (the
    logged loss) in each call with a logged step (steps 5, 10, 15, 20) and none in any other, eager or captured.
    (Logging the progress bar's loss through ``self.log`` made Lightning read it back twice in that call and in
    every later call of the epoch: on a GPU, two stream syncs per call.)"""
    overrides = TINY + [
        f"trainer.capture={capture}",
        "optimizer=adam",
        "scheduler=cosine",
        "trainer.max_epochs=3",
        "trainer.log_every_n_steps=5",
        "callbacks.checkpoint=false",
    ]
    counter = _CountsHostReads()
    module, trainer = fit(overrides, tmp_path, callbacks=[counter])
    assert trainer.global_step == 21
    assert module.step_mode == ("captured" if capture == "auto" else "eager (trainer.capture=false)")
    assert counter.calls == [
        (0, 1),
        (1, 0),
        (2, 0),
        (2, 1),
    ]  # steps 4-6, 8-10, 15-17 and 18-20: one read each


def test_the_final_test_replays_the_graphs_on_the_best_checkpoints_weights(graphs, tmp_path):
    """train.py tests the best checkpoint, loaded into the network whose evaluation graphs were captured during
    validation: the replays must read the loaded weights (a graph reads its tensors where they were at the
    capture, so the load must copy into them). test/acc and test/loss equal eval.py's eager evaluation of
    the same checkpoint in a new process."""
    from tests.conftest import run_eval

    overrides = [o for o in TINY if o not in ("test=false", "data.test_size=16")] + [
        "data.test_size=112",
        "data.eval_batch_size=48",
        "optimizer=sgd",
        "optimizer.lr=0.1",  # unstable on purpose: the best validation is not the last epoch's
        "trainer.max_epochs=4",
    ]
    out = tmp_path / "run"
    metrics = run(compose_train(overrides, out))
    assert metrics["step_mode"] == "captured" and metrics["eval_mode"] == "captured"
    best = metrics["best_ckpt"]
    assert "epoch003" not in best, best  # the best is an earlier epoch than the last
    _, evaluated = run_eval(best, tmp_path / "eval")
    assert metrics["test/acc"] == pytest.approx(evaluated["test/acc"], rel=1e-6)
    assert metrics["test/loss"] == pytest.approx(evaluated["test/loss"], rel=1e-5)


# ---- the course's own optimizers (cifarlab.optim), in their capturable form ---------------------------------


@pytest.mark.parametrize("name", sorted(DEFAULT_KW))
def test_the_course_optimizers_capturable_form_is_captured_and_follows_the_lecture(name, graphs):
    """optimizer_for_capture builds the course's optimizer with capturable=True (learning rate read from a
    device tensor, step counts and decayed rates on the device): captured, it replays bit for bit what the same
    optimizer computes eagerly, with a per-step schedule; and it follows the plain (lecture's) form of the rule
    to float rounding."""
    from cifarlab.module import build_optimizer
    from cifarlab.optim import COURSE_OPTIMIZERS

    factory = partial(COURSE_OPTIMIZERS[name], **DEFAULT_KW[name])
    runs = {}
    for mode in ("plain", "capturable", "captured"):
        net = _tiny_net()
        groups = [
            {"params": [net.body[1].weight, net.head.weight], "weight_decay": 1e-3},
            {"params": [net.body[1].bias, net.head.bias], "weight_decay": 0.0},
        ]
        opt = build_optimizer(factory, groups) if mode == "plain" else optimizer_for_capture(factory, groups)
        assert opt.param_groups[0]["capturable"] == (mode != "plain")
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=30)
        step = TrainStep(net, opt, capture=mode == "captured")
        torch.manual_seed(5)
        start = [p.detach().clone() for p in net.parameters()]
        _train(step, _batches(), epochs=3, schedule=schedule)
        assert all(not torch.equal(a, p) for a, p in zip(start, net.parameters(), strict=True))
        runs[mode] = (net, step)
    assert runs["captured"][1].mode == "captured" and runs["captured"][1].replays == 3 * 7 - WARMUP_STEPS - 3
    assert_identical_parameters(runs["captured"][0], runs["capturable"][0])
    assert_same_parameters(runs["capturable"][0], runs["plain"][0], rtol=1e-4, atol=1e-5)


def test_a_captured_course_adam_run_resumes_exactly_and_its_checkpoint_also_resumes_eagerly(graphs, tmp_path):
    """optimizer=course/adam runs captured, its step counts device tensors: resumed from its checkpoint it ends
    bit for bit where an uninterrupted captured run does; resumed without capture, the counts come back as host
    numbers and go on from 7; and an eager run's checkpoint (counts as ints) resumes captured."""
    base = TINY + ["optimizer=course/adam", "optimizer.lr=0.005"]
    first, _ = fit(base + ["trainer.max_epochs=1"], tmp_path / "first")
    assert first.step_mode == "captured"
    counts = [s["step"] for s in first.stepper.optimizer.state.values()]
    assert all(isinstance(c, torch.Tensor) and float(c) == 7 for c in counts)
    last = str(tmp_path / "first" / "checkpoints" / "last.ckpt")
    full, _ = fit(base + ["trainer.max_epochs=2"], tmp_path / "full")
    resumed, trainer = fit(base + ["trainer.max_epochs=2"], tmp_path / "second", ckpt_path=last)
    assert trainer.global_step == 14 and resumed.step_mode == "captured"
    assert_identical_parameters(resumed.net, full.net)
    eager, trainer = fit(
        base + ["trainer.max_epochs=2", "trainer.capture=false"], tmp_path / "eager", ckpt_path=last
    )
    assert trainer.global_step == 14 and not trainer.optimizers[0].param_groups[0]["capturable"]
    assert [s["step"] for s in trainer.optimizers[0].state.values()] == [14.0] * len(counts)
    assert all(torch.isfinite(p).all() for p in eager.net.parameters())
    # and the other way: an eager run's checkpoint (counts as ints) resumes captured
    fit(base + ["trainer.max_epochs=1", "trainer.capture=false"], tmp_path / "eager-first")
    last = str(tmp_path / "eager-first" / "checkpoints" / "last.ckpt")
    captured, trainer = fit(base + ["trainer.max_epochs=2"], tmp_path / "captured-second", ckpt_path=last)
    assert captured.step_mode == "captured" and trainer.global_step == 14
    assert all(float(s["step"]) == 14 for s in trainer.optimizers[0].state.values())
