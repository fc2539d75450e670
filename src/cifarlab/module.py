"""The LightningModule: cross-entropy training of a network (K optimizer steps per Lightning step), its
metrics, and optimizer/scheduler wiring."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from torch import nn
from torchmetrics import MaxMetric

import cifarlab.step
from cifarlab.capturable import optimizer_for_capture
from cifarlab.config import ConfigError
from cifarlab.data import Chunk
from cifarlab.model import parameter_groups
from cifarlab.step import (
    EvalStep,
    TrainStep,
    autocast_dtype,
    capture_blocker,
    cycles_momentum,
)


def build_optimizer(factory: Callable[..., torch.optim.Optimizer], params) -> torch.optim.Optimizer:
    """``factory(params)`` in torch's fastest implementation of the same update rule: ``fused=True`` (one
    kernel for all parameters; on a CPU ~5x faster steps than the per-tensor loop) where the class has it
    (Adam, AdamW, SGD, Adagrad), else ``foreach=True`` (~2x; RMSprop, NAdam, RAdam), else as configured
    (the course's own optimizers). Never overrides an explicit ``fused``/``foreach`` setting."""
    cls = getattr(factory, "func", factory)
    keywords = getattr(factory, "keywords", {}) or {}
    try:
        accepted = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        accepted = {}
    if keywords.get("fused") is None and keywords.get("foreach") is None:
        for option in ("fused", "foreach"):
            if option in accepted:
                try:
                    return factory(params, **{option: True})
                except (RuntimeError, ValueError, TypeError):  # e.g. no fused kernel for this device
                    continue
    return factory(params)


# How an optimizer runs, not what it computes: torch's load_state_dict would take these from the checkpoint.
IMPLEMENTATION_KEYS = ("capturable", "fused", "foreach")


def keep_implementation_on_load(optimizer: torch.optim.Optimizer) -> None:
    """Make ``optimizer.load_state_dict`` keep this run's ``capturable``/``fused``/``foreach`` settings.

    torch restores every key of a saved parameter group, these included, so a checkpoint of a captured GPU run
    (``capturable=True``) resumed on a CPU failed at its first step ("If capturable=True, params and
    state_steps must be on supported devices"), and a CPU checkpoint resumed on a GPU could not be captured.
    The saved groups are given this run's settings before torch reads them (it also places the step counters
    by them: on the device where capturable or fused)."""
    built = [{k: g[k] for k in IMPLEMENTATION_KEYS if k in g} for g in optimizer.param_groups]

    def use_this_runs_settings(opt, state_dict):
        groups = [dict(g) for g in state_dict["param_groups"]]
        for group, settings in zip(groups, built, strict=False):
            group.update(settings)
        return {**state_dict, "param_groups": groups}

    optimizer.register_load_state_dict_pre_hook(use_this_runs_settings)


# Optimizer steps per Lightning training_step with trainer.steps_per_call=auto. Lightning's own cost per call
# (its loop, hooks, progress bar, logging) is ~1-1.5 ms on this 2-core AMD EPYC CPU and a few ms on a GPU
# machine's host; a captured step of the course CNN is ~0.3-1 ms of GPU time (batch 64-512 on an H100),
# an eager CPU step >= 10 ms. K = 32 keeps Lightning under ~10% of the captured steps; K = 8 keeps it ~1% of
# eager ones. K never exceeds an epoch's batches.
AUTO_STEPS_PER_CALL = {"captured": 32, "eager": 8}
# What on_validation_epoch_end logs: a plateau schedule on one of these steps after each validation.
VALIDATION_METRICS = ("val/loss", "val/acc", "val/acc_best")
# Callback hooks that only run in an eager step (a captured step has no Python between its kernels).
_STEP_HOOKS = ("on_before_backward", "on_after_backward", "on_before_optimizer_step")


class CifarModule(L.LightningModule):
    """Trains ``net`` with cross-entropy; logs train/val/test loss and accuracy, val/acc_best and the lr.

    ``optimizer`` is a partial optimizer completed with parameter groups (decay on weights, not biases);
    ``scheduler`` is a factory from :mod:`cifarlab.schedulers` or None.

    Manual optimization: each ``training_step`` receives a :class:`~cifarlab.data.Chunk` of ``steps_per_call``
    consecutive batches and runs one optimizer step per batch through :class:`~cifarlab.step.TrainStep`
    (captured as a CUDA graph where :func:`~cifarlab.step.capture_blocker` allows it, and ``capture`` is
    ``auto`` or ``True``). Schedulers step per batch or per epoch as their factory says, ``global_step``
    counts optimizer steps, ``gradient_clip_val`` clips the gradients' total norm before every step.
    """

    def __init__(
        self,
        net: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., dict[str, Any]] | None = None,
        weight_decay: float = 0.0,
        num_classes: int = 10,
        compile: bool = False,
        config: dict[str, Any] | None = None,
        capture: bool | str = "auto",
        steps_per_call: int | str = "auto",
        gradient_clip_val: float | None = None,
        log_every_n_steps: int = 50,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.net = net
        self.compile = compile
        self.forward_fn = torch.compile(net) if compile else net  # keeps net's state_dict keys unprefixed
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.weight_decay, self.num_classes = weight_decay, num_classes
        self.config = config or {}  # the resolved run config, stored in every checkpoint for eval.py
        self.capture_setting, self.steps_per_call_setting = capture, steps_per_call
        self.gradient_clip_val, self.log_every_n_steps = gradient_clip_val, log_every_n_steps
        self.steps_per_call: int | None = None  # resolved in configure_optimizers; read by the datamodule
        self.capture, self.capture_reason = False, "not configured yet"
        # True: the scheduler cycles the momentum (β1) and the captured step reads it from a device tensor
        self.device_momentum = False
        self.stepper: TrainStep | None = None
        self._evaluator: EvalStep | None = None
        self.val_acc_best = MaxMetric()
        self.last_step_loss: float | None = None  # the last logged train/loss_step, for the progress bar

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_fn(x)

    # ---- training: K optimizer steps per call ---------------------------------------------------------------

    @property
    def step_mode(self) -> str:
        """``captured``, or ``eager (why)``: what the training steps of this run were."""
        if self.stepper is not None and (self.stepper.replays or self.stepper.eager_reason):
            return self.stepper.mode
        return "captured" if self.capture else f"eager ({self.capture_reason})"

    @property
    def eval_mode(self) -> str | None:
        """``captured``/``eager``: what the evaluation batches of this run were (None: no evaluation ran)."""
        e = self._evaluator
        if e is None:
            return None
        if e.replays:
            return "captured"
        return f"eager ({e.eager_reason})" if e.eager_reason else "eager"

    def on_train_start(self) -> None:
        opt = self.optimizers()
        precision = str(self.trainer.precision)
        self.stepper = TrainStep(
            self.forward_fn,
            opt.optimizer,
            capture=self.capture,
            clip_norm=self.gradient_clip_val,
            autocast_dtype=autocast_dtype(precision),
            backward=self.manual_backward,  # Lightning's: DDP's gradient sync, fp16 scaling, callback hooks
            optimizer_step=opt.step,  # counts trainer.global_step, runs on_before_optimizer_step hooks
            # Lightning's calls on every step only where they do more than hooks: DDP and fp16 scaling
            plain_eager=self.trainer.world_size == 1 and not precision.startswith("16"),
            framework_clips=True,  # on_before_optimizer_step below: after 16-mixed's unscale_
            device_momentum=self.device_momentum,
        )
        # Callbacks with per-step hooks get them: their steps run eager (every_n_steps: only those steps).
        self._hook_periods = [
            max(1, int(getattr(cb, "every_n_steps", 1)))
            for cb in self.trainer.callbacks
            if any(getattr(type(cb), h) is not getattr(L.Callback, h) for h in _STEP_HOOKS)
        ]
        configs = self.trainer.lr_scheduler_configs
        self._step_schedulers = [c for c in configs if c.interval == "step"]
        self._epoch_schedulers = [c for c in configs if c.interval != "step"]
        self._check_resumed_schedule()

    def _check_resumed_schedule(self) -> None:
        """A one-cycle schedule restored from a checkpoint keeps the length its run planned: a resume with more
        epochs would fail mid-run ("Tried to step N times"). Refused here, before any step, in one line."""
        trainer = self.trainer
        datamodule = trainer.datamodule
        if not hasattr(datamodule, "train_steps_per_epoch"):
            return
        per_epoch = max(1, datamodule.train_steps_per_epoch())  # optimizer steps (Lightning counts chunks)
        needed = per_epoch * max(1, trainer.max_epochs or 1)
        for c in self._step_schedulers:
            planned = getattr(c.scheduler, "total_steps", None)
            if isinstance(c.scheduler, torch.optim.lr_scheduler.OneCycleLR) and planned < needed:
                raise ConfigError(
                    f"trainer.max_epochs={trainer.max_epochs} is not allowed for this resume; allowed: "
                    f"<= {max(1, planned // per_epoch)} (scheduler=onecycle was planned for {planned} steps by the "
                    "run that wrote the checkpoint; to train longer, start a new run)"
                )

    def training_step(self, chunk: Chunk, chunk_idx: int) -> None:
        opt = self.optimizers()
        for plan in chunk.plans:
            step = self.trainer.global_step
            hooks = any(step % p == 0 for p in self._hook_periods)
            loss, counted = self.stepper(chunk.source, plan, hooks=hooks)
            if (
                not counted
            ):  # torch's own step ran (in the graph or eager): count it as Lightning's opt.step() does
                opt._on_before_step()
                opt._on_after_step()
            step = self.trainer.global_step
            n = self.log_every_n_steps
            if n and step % n == 0:
                self._log_step(step, loss, float(opt.param_groups[0]["lr"]))
            for c in self._step_schedulers:
                if step % c.frequency == 0:
                    c.scheduler.step()
        # Lightning counts this call as one batch for its loggers' step axis: make it count every batch.
        self.trainer.fit_loop.epoch_loop._batches_that_stepped += len(chunk) - 1

    def _log_step(self, step: int, loss: torch.Tensor, lr: float) -> None:
        """train/loss_step and the step's learning rate, at optimizer step ``step`` on the loggers' axis.

        Straight to the loggers: ``self.log`` keeps one value per key per ``training_step`` call and logs it
        at the call's end, so with K steps per call most of them were lost or logged at the wrong step.
        Lightning's axis is 0-based (the value after step s at s - 1), as its epoch-level values are.
        ``float(loss)`` waits for the GPU: once per log_every_n_steps steps, and nothing else does. (The progress
        bar reads ``last_step_loss``: ``self.log(..., prog_bar=True)`` put the float on the GPU and Lightning
        read it back at the end of this call and of every later call of the epoch, two stream syncs per call,
        each leaving the GPU idle through Lightning's per-call work.)"""
        values = {"train/loss_step": float(loss), "train/lr": lr}
        if self.trainer.is_global_zero:
            for logger in self.loggers:  # with the epoch, as Lightning's own per-step values have it
                logger.log_metrics({**values, "epoch": self.current_epoch}, step=step - 1)
        self.last_step_loss = values["train/loss_step"]

    def on_before_optimizer_step(self, optimizer) -> None:
        # Lightning's optimizer step (the eager steps that go through it) calls this after 16-mixed's
        # GradScaler.unscale_ and before the update: the place to clip (Lightning clips nothing itself under
        # manual optimization). Callbacks' on_before_optimizer_step hooks run before this one, as they did
        # before Lightning's own clipping, so gradient-norm diagnostics see the gradients before clipping.
        if self.stepper is not None:
            self.stepper.clip()

    def on_train_epoch_end(self) -> None:
        loss, acc, images = self.stepper.epoch_metrics()  # one host sync per epoch
        # No images: a run resumed from a checkpoint written at this epoch's validation (check_val_every_n_epoch
        # > 1), after its training; Lightning runs only the epoch's end here, and its run logged the metrics.
        if images:
            self.log("train/loss", loss, sync_dist=True)
            self.log("train/acc", acc, sync_dist=True)
        if not math.isfinite(loss):
            raise FloatingPointError(f"training diverged: train/loss is {loss} at epoch {self.current_epoch}")
        # Epoch schedulers step here: after this epoch's validation and before the epoch's checkpoint is
        # written (ModelCheckpoint runs after this hook), so a resume continues exactly. (With validation
        # every n > 1 epochs the checkpoint is written at the validation's end, before this hook: a run
        # resumed from it runs this hook for that epoch, and they step then.) A plateau on a validation
        # metric steps after each validation instead (_step_plateau).
        for c in self._epoch_schedulers:
            if (self.current_epoch + 1) % c.frequency:
                continue
            if isinstance(c.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                monitor, strict = self._monitor
                if monitor in VALIDATION_METRICS and self.trainer.enable_validation:
                    continue
                metric = self.trainer.callback_metrics.get(monitor)
                if metric is None:
                    if strict:
                        raise RuntimeError(
                            f"scheduler=plateau monitors {monitor}, which was not logged this epoch "
                            "(is validation off?)"
                        )
                    continue
                c.scheduler.step(float(metric))
            else:
                c.scheduler.step()
        # The learning rate the next step will use, for metrics.json and the summary (the loggers have it per
        # step from _log_step)
        self.log("train/lr", float(self.optimizers().param_groups[0]["lr"]), logger=False)

    def on_train_end(self) -> None:
        if self.stepper is not None:  # the run's step mode, for the summary and metrics.json
            self.capture_reason = self.stepper.eager_reason or self.capture_reason

    # ---- evaluation: device sums, one read per pass (captured on a GPU) ------------------------------------

    @property
    def evaluator(self) -> EvalStep:
        """The evaluation step (built at the first validation or test: eval.py never trains)."""
        if self._evaluator is None:
            trainer = self.trainer
            precision = str(trainer.precision)
            setting = str(self.capture_setting).lower()
            on_gpu = trainer.strategy.root_device.type in cifarlab.step.GRAPH_DEVICES
            capture = on_gpu and not self.compile and setting != "false"
            self._evaluator = EvalStep(
                self.forward_fn,
                capture=capture,
                autocast_dtype=autocast_dtype(precision),
            )
        return self._evaluator

    def _evaluation(self) -> tuple[float, float]:
        """(mean loss per image, accuracy) of this pass, summed over DDP ranks."""
        totals = self.evaluator.totals()
        if self.trainer.world_size > 1:
            totals = self.trainer.strategy.reduce(totals, reduce_op="sum")
        self.evaluator.reset()
        return EvalStep.metrics(totals)

    def on_validation_epoch_start(self) -> None:
        self.evaluator.reset()

    def validation_step(self, batch, batch_idx: int) -> None:
        self.evaluator(*batch)  # (B, 3, H, W) float images, (B,) int64 labels

    def on_validation_epoch_end(self) -> None:
        loss, acc = self._evaluation()
        sanity = self.trainer.sanity_checking
        if not sanity:  # the sanity check's network is the untrained one: its accuracy is none of the run's
            self.val_acc_best(torch.tensor(acc))
        values = {"val/loss": loss, "val/acc": acc}
        if self.val_acc_best.update_count:
            values["val/acc_best"] = float(self.val_acc_best.compute())
        self.log_dict(values, prog_bar=True)
        if self.trainer.state.fn == "fit" and not sanity:
            self._step_plateau(values)

    def _step_plateau(self, values: dict[str, float]) -> None:
        """Step a plateau schedule on a validation metric after each validation of the fit: an epoch without
        one (check_val_every_n_epoch > 1) is no epoch without improvement, and the step is in the checkpoint
        that ModelCheckpoint writes at the validation's end (the end of an epoch with validation every n > 1
        epochs, before on_train_epoch_end)."""
        monitor = getattr(self, "_monitor", (None, True))[0]
        for c in self._epoch_schedulers:
            plateau = isinstance(c.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
            if plateau and monitor in values and (self.current_epoch + 1) % c.frequency == 0:
                c.scheduler.step(float(values[monitor]))

    def on_test_epoch_start(self) -> None:
        self.evaluator.reset()

    def test_step(self, batch, batch_idx: int) -> None:
        self.evaluator(*batch)

    def on_test_epoch_end(self) -> None:
        loss, acc = self._evaluation()
        self.log_dict({"test/loss": loss, "test/acc": acc})

    def configure_optimizers(self):
        trainer = self.trainer
        device = trainer.strategy.root_device
        factory_cls = getattr(self.optimizer_factory, "func", self.optimizer_factory)
        blocker = capture_blocker(
            device, factory_cls, str(trainer.precision), trainer.world_size, self.compile
        )
        self._decide_capture(blocker)
        self.device_momentum = False
        optimizer = self._build_optimizer()
        datamodule = trainer.datamodule
        max_epochs = max(1, trainer.max_epochs or 1)
        if hasattr(datamodule, "train_steps_per_epoch"):
            steps_per_epoch = max(1, datamodule.train_steps_per_epoch())
        else:
            steps_per_epoch = max(1, math.ceil(trainer.estimated_stepping_batches / max_epochs))
        setting = self.steps_per_call_setting
        auto = AUTO_STEPS_PER_CALL["captured" if self.capture else "eager"]
        self.steps_per_call = min(steps_per_epoch, auto) if str(setting) == "auto" else int(setting)
        if self.scheduler_factory is None:
            return optimizer
        schedule = dict(self.scheduler_factory(optimizer, steps_per_epoch, max_epochs))
        if self.capture:
            scheduler = schedule["scheduler"]
            self._decide_capture(
                capture_blocker(device, factory_cls, str(trainer.precision), scheduler=scheduler)
            )
            if self.capture and cycles_momentum(scheduler):
                # The form that reads the cycled momentum from a device tensor, and its schedule, built afresh.
                self.device_momentum = True
                optimizer = self._build_optimizer()
                schedule = dict(self.scheduler_factory(optimizer, steps_per_epoch, max_epochs))
        # Lightning drops these keys under manual optimization; the plateau step below reads them.
        self._monitor = (schedule.pop("monitor", None), schedule.pop("strict", True))
        return {"optimizer": optimizer, "lr_scheduler": schedule}

    def _build_optimizer(self) -> torch.optim.Optimizer:
        groups = parameter_groups(self.net, self.weight_decay)
        if self.capture:
            optimizer = optimizer_for_capture(self.optimizer_factory, groups, self.device_momentum)
        else:
            optimizer = build_optimizer(self.optimizer_factory, groups)
        keep_implementation_on_load(optimizer)
        return optimizer

    def _decide_capture(self, blocker: str | None) -> None:
        setting = self.capture_setting
        if setting is True and blocker is not None:
            raise ConfigError(f"trainer.capture=True is not allowed; allowed: auto or false here ({blocker})")
        if setting is False or str(setting).lower() == "false":
            self.capture, self.capture_reason = False, "trainer.capture=false"
        else:
            self.capture, self.capture_reason = blocker is None, blocker or ""

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["cifarlab_config"] = self.config
        checkpoint["val_acc_best"] = (
            float(self.val_acc_best.compute()) if self.val_acc_best.update_count else None
        )
        # Dropout draws from the global generators: saving them makes a resumed run continue exactly like an
        # uninterrupted one (the data order is already a function of seed and epoch).
        checkpoint["rng_states"] = {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        _carry_automatic_step_count(checkpoint)
        best = checkpoint.get("val_acc_best")
        if best is not None:  # resumed runs keep their best-so-far accuracy
            self.val_acc_best(torch.tensor(best))
        rng = checkpoint.get("rng_states")
        if rng is not None:
            torch.set_rng_state(rng["torch"])
            if (
                rng["cuda"] is not None
                and torch.cuda.is_available()
                and len(rng["cuda"]) == torch.cuda.device_count()
            ):
                torch.cuda.set_rng_state_all(rng["cuda"])


def _carry_automatic_step_count(checkpoint: dict[str, Any]) -> None:
    """A checkpoint written before the module used manual optimization counts its optimizer steps in the
    automatic loop's progress; Lightning reads the manual loop's now: carry the count over, so a resumed run
    goes on from its global_step rather than from 0. (Runs before Lightning restores the loops from this dict.)"""
    loops = checkpoint.get("loops", {}).get("fit_loop", {})
    automatic = loops.get("epoch_loop.automatic_optimization.optim_progress", {}).get("optimizer", {})
    manual = loops.get("epoch_loop.manual_optimization.optim_step_progress")
    old, new = automatic.get("step", {}), manual or {}
    if (
        old.get("total", {}).get("completed")
        and not new.get("total", {}).get("completed")
        and manual is not None
    ):
        for key in ("total", "current"):
            if key in old and key in manual:
                manual[key].update({k: old[key][k] for k in ("ready", "completed") if k in old[key]})
