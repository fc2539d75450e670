"""Callbacks that make a run reviewable without a terminal.

``GradNormLogger``: per-layer gradient and weight norms every N steps (``grad_norm/features.0.weight``,
``weight_norm/...``, ``grad_norm/total``), so vanishing or exploding gradients show as curves (try
``model.activation=sigmoid model.init=default``: the first layers' gradients sit orders of magnitude
below the last ones').

``EndOfRunReport``: after training, the learning curves; after testing (or after training when there is
no test), one pass over the split for the confusion matrix, per-class accuracy and the most confidently
misclassified images. They go to PNG files in ``<run>/figures`` (``callbacks.figures``) and, when the run
logs to W&B, to the run as a confusion-matrix chart, tables and images; ``logger.log_model`` adds the best
checkpoint as a model artifact.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from cifarlab import figures


class GradNormLogger(Callback):
    """Log the L2 norm of every weight's gradient and of the weight itself every ``every_n_steps`` steps."""

    def __init__(self, every_n_steps: int = 50, include_biases: bool = False) -> None:
        self.every_n_steps = max(1, int(every_n_steps))
        self.include_biases = include_biases

    def _parameters(self, pl_module: L.LightningModule):
        net = getattr(pl_module, "net", pl_module)
        for name, param in net.named_parameters():
            if param.requires_grad and (self.include_biases or param.ndim > 1):
                yield name, param

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        if not trainer.loggers or trainer.global_step % self.every_n_steps != 0:
            return
        names, grads, weights = [], [], []
        for name, param in self._parameters(pl_module):
            names.append(name)
            weights.append(param.detach().float().norm())
            grads.append(
                param.grad.detach().float().norm()
                if param.grad is not None
                else torch.zeros((), device=param.device)
            )
        if not names:
            return
        grads_t, weights_t = (
            torch.stack(grads).cpu().tolist(),
            torch.stack(weights).cpu().tolist(),
        )  # one sync
        metrics = {f"grad_norm/{n}": g for n, g in zip(names, grads_t, strict=True)}
        metrics.update({f"weight_norm/{n}": w for n, w in zip(names, weights_t, strict=True)})
        metrics["grad_norm/total"] = math.sqrt(sum(g * g for g in grads_t))
        # One number for vanishing (<< 1) or exploding (>> 1) gradients: first layer's norm over the last's.
        metrics["grad_norm/first_to_last_ratio"] = (
            grads_t[0] / grads_t[-1] if grads_t[-1] > 0 else float("nan")
        )
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)


class EndOfRunReport(Callback):
    """Learning curves, confusion matrix, per-class accuracy and misclassified images at the end of a run."""

    def __init__(
        self,
        output_dir: Path,
        split: str = "test",
        write_figures: bool = True,
        log_model: bool = False,
        max_images: int = 32,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.split = split  # "test": after trainer.test; "val": after trainer.fit (no test phase)
        self.write_figures = write_figures
        self.log_model = log_model
        self.max_images = max_images
        self.history: list[dict[str, float]] = []
        self._epoch: dict[str, float] | None = None

    @property
    def figures_dir(self) -> Path:
        return self.output_dir / "figures"

    # ---- learning curves: one row per epoch, from what the module logged ---------------------------------

    def _metric(self, trainer: L.Trainer, key: str) -> float | None:
        value = trainer.callback_metrics.get(key)
        return float(value) if value is not None else None

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._close_epoch(trainer)
        self._epoch = {"epoch": trainer.current_epoch + 1}
        if trainer.optimizers:
            self._epoch["lr"] = float(trainer.optimizers[0].param_groups[0]["lr"])

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._epoch is not None and not trainer.sanity_checking:
            for key in ("val/loss", "val/acc"):
                self._epoch[key] = self._metric(trainer, key)

    def _close_epoch(self, trainer: L.Trainer) -> None:
        # The module logs train/loss in its own on_train_epoch_end, after the callbacks' hook: read it here,
        # at the next epoch's start or at the end of training.
        if self._epoch is None:
            return
        for key in ("train/loss", "train/acc"):
            self._epoch[key] = self._metric(trainer, key)
        self.history.append(self._epoch)
        self._epoch = None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._close_epoch(trainer)
        self._write_curves(trainer)

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        if self._epoch is not None:  # the failed epoch: what was logged before it failed
            self.history.append(self._epoch)
            self._epoch = None
        self._write_curves(trainer)

    def _write_curves(self, trainer: L.Trainer) -> None:
        if not (self.write_figures and trainer.is_global_zero and self.history):
            return
        try:
            figures.learning_curves_figure(self.history, self.figures_dir / "learning_curves.png")
            figures.write_json(self.figures_dir / "history.json", {"epochs": self.history})
        except Exception as err:  # noqa: BLE001 - a picture must never fail a run
            print(f"figures: learning curves not drawn ({type(err).__name__}: {err})", flush=True)

    # ---- evaluation: confusion matrix, per-class accuracy, misclassified images ----------------------------

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            self._log_best_checkpoint(trainer)
        if self.split == "val":
            self._report(trainer, pl_module)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.split == "test":
            self._report(trainer, pl_module)

    @torch.no_grad()
    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        """One pass over the split: confusion counts and the most confidently misclassified images."""
        datamodule = trainer.datamodule
        # The batches Lightning evaluated (trainer.limit_test_batches / limit_val_batches), so the matrix
        # covers the same images as test/acc (val/acc); under DDP those of every rank's shard (this runs on
        # rank 0 only, and every rank holds the whole split).
        counted = trainer.num_test_batches if self.split == "test" else trainer.num_val_batches
        limit = int(counted[0]) if counted and 0 < counted[0] < float("inf") else None

        def batches():
            shard = datamodule.test_dataloader() if self.split == "test" else datamodule.val_dataloader()
            for rank in range(getattr(shard, "world_size", 1)):
                if hasattr(shard, "rank"):
                    shard.rank = rank  # a DeviceBatches draws its shard's plan when iterated
                yield from itertools.islice(shard, limit)

        loader = batches()
        num_classes = int(getattr(pl_module, "num_classes", 0) or datamodule.num_classes)
        counts = torch.zeros(num_classes * num_classes, dtype=torch.long)
        wrong_images, wrong_true, wrong_pred, wrong_conf = [], [], [], []
        was_training = pl_module.training
        pl_module.eval()
        try:
            for x, y in loader:
                with trainer.precision_plugin.forward_context():
                    logits = pl_module(x)
                probs = logits.float().softmax(dim=1)
                conf, pred = probs.max(dim=1)
                counts += torch.bincount((y * num_classes + pred).cpu(), minlength=num_classes * num_classes)
                wrong = (pred != y).nonzero().flatten()
                if self.max_images and len(wrong):
                    top = wrong[conf[wrong].argsort(descending=True)[: self.max_images]]
                    wrong_images.append(x[top].float().cpu())
                    wrong_true.append(y[top].cpu())
                    wrong_pred.append(pred[top].cpu())
                    wrong_conf.append(conf[top].float().cpu())
        finally:
            pl_module.train(was_training)
        cm = counts.view(num_classes, num_classes)
        support = cm.sum(dim=1)
        per_class = (cm.diag().float() / support.clamp(min=1)).tolist()
        result: dict[str, Any] = {
            "confusion_matrix": cm.tolist(),
            "per_class_accuracy": per_class,
            "support": support.tolist(),
            "images": None,
        }
        if wrong_conf:
            conf = torch.cat(wrong_conf)
            order = conf.argsort(descending=True)[: self.max_images]
            mean = torch.tensor(datamodule.mean).view(1, -1, 1, 1)
            std = torch.tensor(datamodule.std).view(1, -1, 1, 1)
            images = (torch.cat(wrong_images)[order] * std + mean).clamp(0, 1)
            result["images"] = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
            result["true"], result["pred"] = (
                torch.cat(wrong_true)[order].tolist(),
                torch.cat(wrong_pred)[order].tolist(),
            )
            result["confidence"] = conf[order].tolist()
        return result

    def _report(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        from cifarlab.loggers import wandb_run_of

        run = wandb_run_of(trainer)
        if not (self.write_figures or run is not None):
            return
        try:
            result = self.evaluate(trainer, pl_module)
        except Exception as err:  # noqa: BLE001 - the report must never fail a finished run
            print(f"figures: evaluation skipped ({type(err).__name__}: {err})", flush=True)
            return
        names = figures.class_names(trainer.datamodule, len(result["per_class_accuracy"]))
        pngs: dict[str, Path] = {}
        if self.write_figures:
            try:
                pngs = self._write_pngs(result, names)
            except Exception as err:  # noqa: BLE001
                print(f"figures: not drawn ({type(err).__name__}: {err})", flush=True)
        if run is not None:
            try:
                self._log_wandb(run, trainer, result, names, pngs)
            except Exception as err:  # noqa: BLE001
                print(f"wandb: end-of-run report not logged ({type(err).__name__}: {err})", flush=True)

    def _captions(self, result: dict[str, Any], names: list[str]) -> list[str]:
        if result["images"] is None:
            return []
        return [
            f"{names[t]}→{names[p]} {c:.2f}"
            for t, p, c in zip(result["true"], result["pred"], result["confidence"], strict=True)
        ]

    def _write_pngs(self, result: dict[str, Any], names: list[str]) -> dict[str, Path]:
        split, out = self.split, self.figures_dir
        pngs = {
            "confusion_matrix": figures.confusion_matrix_figure(
                result["confusion_matrix"],
                names,
                out / "confusion_matrix.png",
                title=f"{split} confusion matrix",
            ),
            "per_class_accuracy": figures.per_class_accuracy_figure(
                result["per_class_accuracy"],
                names,
                out / "per_class_accuracy.png",
                title=f"{split} per-class accuracy",
            ),
        }
        if result["images"] is not None:
            pngs["misclassified"] = figures.image_grid_figure(
                result["images"],
                self._captions(result, names),
                out / "misclassified.png",
                title=f"most confident {split} mistakes (true→predicted, confidence)",
            )
        figures.write_json(
            out / "evaluation.json",
            {
                "split": split,
                "classes": names,
                "confusion_matrix": result["confusion_matrix"],
                "per_class_accuracy": dict(zip(names, result["per_class_accuracy"], strict=True)),
                "support": result["support"],
            },
        )
        return pngs

    def _log_wandb(
        self, run, trainer: L.Trainer, result: dict[str, Any], names: list[str], pngs: dict[str, Path]
    ) -> None:
        import wandb

        split = self.split
        cm = result["confusion_matrix"]
        y_true = [i for i, row in enumerate(cm) for j, count in enumerate(row) for _ in range(count)]
        y_pred = [j for row in cm for j, count in enumerate(row) for _ in range(count)]
        acc_table = wandb.Table(
            columns=["class", "accuracy", "support"],
            data=[
                [n, a, s]
                for n, a, s in zip(names, result["per_class_accuracy"], result["support"], strict=True)
            ],
        )
        data: dict[str, Any] = {
            f"{split}/confusion_matrix": wandb.plot.confusion_matrix(
                y_true=y_true, preds=y_pred, class_names=names, title=f"{split} confusion matrix"
            ),
            f"{split}/per_class_accuracy": wandb.plot.bar(
                acc_table, "class", "accuracy", title=f"{split} per-class accuracy"
            ),
        }
        if result["images"] is not None:
            # A list of captioned images (a media panel), not a table of images: W&B drops the pixels of
            # images inside tables of offline runs (wandb/wandb#4611).
            data[f"{split}/misclassified"] = [
                wandb.Image(image, caption=caption)
                for image, caption in zip(result["images"], self._captions(result, names), strict=True)
            ]
        for key, path in {**pngs, **self._curves_png()}.items():
            data[f"figures/{key}"] = wandb.Image(str(path))
        data["trainer/global_step"] = trainer.global_step
        run.log(data)
        acc = result["per_class_accuracy"]
        worst = min(range(len(acc)), key=acc.__getitem__)
        run.summary[f"{split}/worst_class"] = names[worst]
        run.summary[f"{split}/worst_class_acc"] = acc[worst]
        if len(names) <= 20:
            for name, value in zip(names, acc, strict=True):
                run.summary[f"{split}/acc_class/{name}"] = value

    def _curves_png(self) -> dict[str, Path]:
        path = self.figures_dir / "learning_curves.png"
        return {"learning_curves": path} if self.write_figures and path.is_file() else {}

    # ---- the best checkpoint as a W&B artifact -----------------------------------------------------------

    def _log_best_checkpoint(self, trainer: L.Trainer) -> None:
        from cifarlab.loggers import wandb_run_of

        callback = trainer.checkpoint_callback
        best = getattr(callback, "best_model_path", "") if callback is not None else ""
        run = wandb_run_of(trainer) if self.log_model else None
        if run is None or not best or not Path(best).is_file():
            return
        import wandb

        score = getattr(callback, "best_model_score", None)
        metadata = {
            "val/acc": float(score) if score is not None else None,
            "epochs": trainer.current_epoch,
            "global_step": trainer.global_step,
            "run_name": run.name,
            "file": Path(best).name,
        }
        artifact = wandb.Artifact(
            f"model-{run.id}",
            type="model",
            metadata=metadata,
            description="best checkpoint (by val/acc); load with eval.py ckpt_path=...",
        )
        artifact.add_file(best, name="best.ckpt")
        run.log_artifact(artifact, aliases=["best", "latest"])


def run_callbacks(cfg, output_dir: Path, logger=None) -> list[Callback]:
    """The callbacks of this module that ``cfg`` asks for (given to ``build_trainer(extra_callbacks=...)``)."""
    callbacks: list[Callback] = []
    is_wandb = type(logger).__name__ == "WandbLogger"
    every = int(cfg.logger.get("grad_norm_every_n_steps", 0) or 0)
    if logger is not None and every > 0:
        callbacks.append(GradNormLogger(every))
    write_figures = bool(cfg.callbacks.get("figures", True))
    if write_figures or is_wandb:
        callbacks.append(
            EndOfRunReport(
                output_dir,
                split="test" if cfg.get("test", True) else "val",
                write_figures=write_figures,
                log_model=bool(is_wandb and getattr(logger, "cifarlab_log_model", False)),
            )
        )
    return callbacks
