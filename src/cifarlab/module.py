"""The LightningModule: cross-entropy training of a network, its metrics, and optimizer/scheduler wiring."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MaxMetric, MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from cifarlab.model import parameter_groups


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


class CifarModule(L.LightningModule):
    """Trains ``net`` with cross-entropy; logs train/val/test loss and accuracy, val/acc_best and the lr.

    ``optimizer`` is a partial optimizer completed with parameter groups (decay on weights, not biases);
    ``scheduler`` is a factory from :mod:`cifarlab.schedulers` or None.
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
    ) -> None:
        super().__init__()
        self.net = net
        self.forward_fn = torch.compile(net) if compile else net  # keeps net's state_dict keys unprefixed
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.weight_decay, self.num_classes = weight_decay, num_classes
        self.config = config or {}  # the resolved run config, stored in every checkpoint for eval.py
        # Training metrics run every step, so they must not wait for the GPU: no argument checks (labels are
        # checked when the data is loaded) and no NaN filter (a NaN loss reaches the epoch mean, which fails
        # the run below); both would call .item()/.any() on device tensors, a host sync per step.
        self.train_acc = MulticlassAccuracy(num_classes, average="micro", validate_args=False)
        self.val_acc, self.test_acc = (MulticlassAccuracy(num_classes, average="micro") for _ in range(2))
        self.train_loss = MeanMetric(nan_strategy="disable")
        self.val_loss, self.test_loss = MeanMetric(), MeanMetric()
        self.val_acc_best = MaxMetric()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_fn(x)

    def _shared_step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = batch  # (B, 3, H, W) float, (B,) int64
        logits = self(x)
        return F.cross_entropy(logits.float(), y), logits

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        loss, logits = self._shared_step(batch)
        # update(), not __call__: __call__ would also compute a per-batch value, then throw it away
        self.train_loss.update(loss.detach())
        self.train_acc.update(logits.detach(), batch[1])
        # Per-step values only on the steps Lightning hands to the loggers (every trainer.log_every_n_steps):
        # each self.log costs ~1 ms of Python. Both are CPU tensors, so that a progress bar reading them every
        # batch never waits for the GPU (the .cpu() here syncs once per logging step, not per step).
        n = self.trainer.log_every_n_steps
        if n and (self.global_step + 1) % n == 0:
            lr = float(self.trainer.optimizers[0].param_groups[0]["lr"])
            self.log(
                "train/loss_step", loss.detach().float().cpu(), on_step=True, on_epoch=False, prog_bar=True
            )
            self.log("train/lr", torch.tensor(lr), on_step=True, on_epoch=False)
        return loss

    def on_train_epoch_end(self) -> None:
        loss = self.train_loss.compute()
        self.log("train/loss", loss, sync_dist=True)
        self.log("train/acc", self.train_acc.compute(), sync_dist=True)
        self.train_loss.reset()
        self.train_acc.reset()
        if not math.isfinite(float(loss)):
            raise FloatingPointError(f"training diverged: train/loss is {float(loss)} at epoch {self.current_epoch}")

    def validation_step(self, batch, batch_idx: int) -> None:
        loss, logits = self._shared_step(batch)
        self.val_loss(loss)
        self.val_acc(logits, batch[1])

    def on_validation_epoch_end(self) -> None:
        acc = self.val_acc.compute()
        self.val_acc_best(acc)
        self.log_dict({"val/loss": self.val_loss.compute(), "val/acc": acc, "val/acc_best": self.val_acc_best.compute()},
                      prog_bar=True)
        self.val_loss.reset()
        self.val_acc.reset()

    def test_step(self, batch, batch_idx: int) -> None:
        loss, logits = self._shared_step(batch)
        self.test_loss(loss)
        self.test_acc(logits, batch[1])

    def on_test_epoch_end(self) -> None:
        self.log_dict({"test/loss": self.test_loss.compute(), "test/acc": self.test_acc.compute()})
        self.test_loss.reset()
        self.test_acc.reset()

    def configure_optimizers(self):
        optimizer = build_optimizer(self.optimizer_factory, parameter_groups(self.net, self.weight_decay))
        if self.scheduler_factory is None:
            return optimizer
        max_epochs = max(1, self.trainer.max_epochs or 1)
        steps_per_epoch = max(1, math.ceil(self.trainer.estimated_stepping_batches / max_epochs))
        return {"optimizer": optimizer, "lr_scheduler": self.scheduler_factory(optimizer, steps_per_epoch, max_epochs)}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["cifarlab_config"] = self.config
        checkpoint["val_acc_best"] = float(self.val_acc_best.compute()) if self.val_acc_best.update_count else None
        # Dropout draws from the global generators: saving them makes a resumed run continue exactly like an
        # uninterrupted one (the data order is already a function of seed and epoch).
        checkpoint["rng_states"] = {"torch": torch.get_rng_state(),
                                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        best = checkpoint.get("val_acc_best")
        if best is not None:  # resumed runs keep their best-so-far accuracy
            self.val_acc_best(torch.tensor(best))
        rng = checkpoint.get("rng_states")
        if rng is not None:
            torch.set_rng_state(rng["torch"])
            if rng["cuda"] is not None and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(rng["cuda"])
