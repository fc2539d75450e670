"""Callbacks built from ``cfg.callbacks``: checkpoints, progress output and early stopping."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint


class EpochLines(Callback):
    """One plain line per epoch, for logs and pipes where a live progress bar would be noise."""

    def __init__(self) -> None:
        # (epoch, seconds, validated) waiting for its epoch metrics
        self._pending: tuple[int, float, bool] | None = None
        self._start: float | None = None  # when this process started the current epoch's training
        self._validated = False  # whether this epoch ran a validation (check_val_every_n_epoch > 1: not all)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._print_pending(trainer)
        self._start = time.perf_counter()
        self._validated = False

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._validated = True

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning fills in the epoch's metrics only after this hook, so the line is printed at the next
        # epoch's start (immediately after) or at the end of training.
        if (
            self._start is None
        ):  # a resumed run at the end of an epoch the checkpoint's run trained (and printed)
            return
        self._pending = (trainer.current_epoch, time.perf_counter() - self._start, self._validated)
        self._start = None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._print_pending(trainer)

    def _print_pending(self, trainer: L.Trainer) -> None:
        if self._pending is None or not trainer.is_global_zero:
            return
        epoch, seconds, validated = self._pending
        self._pending = None
        metrics = trainer.callback_metrics
        parts = [f"epoch {epoch + 1}/{trainer.max_epochs}"]
        # An epoch without validation shows no val/loss, val/acc (callback_metrics still holds the last
        # validation's); val/acc_best is the best so far, true at any epoch.
        keys = (
            ("train/loss", "train/acc") + (("val/loss", "val/acc") if validated else ()) + ("val/acc_best",)
        )
        for key in keys:
            if key in metrics:
                parts.append(f"{key} {float(metrics[key]):.4f}")
        if trainer.optimizers:
            parts.append(f"lr {trainer.optimizers[0].param_groups[0]['lr']:.3g}")
        parts.append(f"{seconds:.1f}s")
        print("  ".join(parts), flush=True)


class BestCheckpoint(ModelCheckpoint):
    """ModelCheckpoint that keeps the best epoch of a resumed run.

    A resume writes into a new run folder; Lightning then restores only ``best_model_path`` and forgets the
    best score, so the resumed run's first validation became "best" however bad it was, and the final test
    and the W&B model artifact used that checkpoint. Here the earlier best checkpoint is copied into the new
    folder with its score (the old run's folder is never written to), and competes as usual.
    """

    @property
    def state_key(self) -> str:  # ModelCheckpoint's: checkpoints written before this class still resume
        return super().state_key.replace(type(self).__qualname__, "ModelCheckpoint", 1)

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        old = state_dict.get("best_model_path") or ""
        score = state_dict.get("best_model_score")
        elsewhere = state_dict.get("dirpath") not in (None, self.dirpath)
        if not (elsewhere and self.monitor and score is not None and Path(old).is_file() and self.dirpath):
            return
        import shutil

        copy = Path(self.dirpath) / Path(old).name
        copy.parent.mkdir(parents=True, exist_ok=True)
        if not copy.exists():
            shutil.copy2(old, copy)
        self.best_model_path = self.kth_best_model_path = str(copy)
        self.best_model_score = self.kth_value = score
        self.best_k_models = {str(copy): score}


def build_callbacks(
    output_dir: Path,
    checkpoint: bool = True,
    early_stopping_patience: int = 0,
    progress_bar: bool | None = None,
) -> tuple[list[Callback], bool]:
    """Return the callbacks and whether Lightning's progress bar should be enabled."""
    callbacks: list[Callback] = []
    if checkpoint:
        ckpt_dir = output_dir / "checkpoints"
        # The best epoch by val/acc (what the final test uses) ...
        callbacks.append(
            BestCheckpoint(
                dirpath=ckpt_dir,
                filename="epoch{epoch:03d}-acc{val/acc:.4f}",
                auto_insert_metric_name=False,
                monitor="val/acc",
                mode="max",
                save_top_k=1,
            )
        )
        # ... and last.ckpt after every epoch, to resume from. A separate callback because Lightning >= 2.6
        # writes save_last only in epochs where the monitored checkpoint improved.
        callbacks.append(
            ModelCheckpoint(
                dirpath=ckpt_dir,
                filename="last",
                monitor=None,
                save_top_k=1,
                every_n_epochs=1,
                enable_version_counter=False,
            )
        )
    if early_stopping_patience > 0:
        callbacks.append(EarlyStopping(monitor="val/acc", mode="max", patience=early_stopping_patience))
    if progress_bar is None:
        progress_bar = sys.stdout.isatty()
    if progress_bar:
        callbacks.append(step_progress_bar())
    else:
        callbacks.append(EpochLines())
    return callbacks, progress_bar


def step_progress_bar() -> Callback:
    """Rich's progress bar, counting optimizer steps (batches) rather than Lightning's ``training_step`` calls.

    With K steps per call (:class:`cifarlab.module.CifarModule`) Lightning's own bar would show an epoch of
    352 batches as 44 "iterations" at an eighth of the real rate; this one shows 352 at the real rate."""
    from lightning.pytorch.callbacks import RichProgressBar

    class StepProgressBar(RichProgressBar):
        @property
        def total_train_batches(self) -> int | float:
            datamodule = getattr(self.trainer, "datamodule", None)
            if hasattr(datamodule, "train_steps_per_epoch"):
                return datamodule.train_steps_per_epoch()
            return super().total_train_batches

        def on_train_epoch_start(self, trainer, pl_module) -> None:
            self._steps_done = 0
            super().on_train_epoch_start(trainer, pl_module)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
            # a Chunk of K batches, or one (images, labels) batch
            self._steps_done = getattr(self, "_steps_done", 0) + (
                len(batch) if hasattr(batch, "plans") else 1
            )
            super().on_train_batch_end(trainer, pl_module, outputs, batch, self._steps_done - 1)

        def get_metrics(self, trainer, pl_module) -> dict:
            metrics = super().get_metrics(trainer, pl_module)
            loss = getattr(pl_module, "last_step_loss", None)  # a float the module keeps: no device read
            if loss is not None:
                metrics["train/loss_step"] = loss
            return metrics

    return StepProgressBar(leave=True)
