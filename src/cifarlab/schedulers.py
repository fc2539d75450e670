"""Learning-rate schedules as factories: ``factory(optimizer, steps_per_epoch, max_epochs)`` returns the
``lr_scheduler`` dict Lightning expects, with the interval each schedule must step at.

The config (``conf/scheduler/*.yaml``) holds a partial of one of these; the LightningModule completes it
once the optimizer exists and the length of an epoch is known.
"""

from __future__ import annotations

from typing import Any

from torch.optim import Optimizer, lr_scheduler


def step(
    optimizer: Optimizer, steps_per_epoch: int, max_epochs: int, step_size: int = 10, gamma: float = 0.1
):
    """lr ← gamma·lr every ``step_size`` epochs."""
    return {
        "scheduler": lr_scheduler.StepLR(optimizer, step_size=step_size, gamma=gamma),
        "interval": "epoch",
    }


def exponential(optimizer: Optimizer, steps_per_epoch: int, max_epochs: int, gamma: float = 0.99):
    """lr ← gamma·lr after every epoch (the course's α ← 0.99·α)."""
    return {"scheduler": lr_scheduler.ExponentialLR(optimizer, gamma=gamma), "interval": "epoch"}


def cosine(
    optimizer: Optimizer,
    steps_per_epoch: int,
    max_epochs: int,
    warmup_epochs: float = 0.0,
    warmup_start_factor: float = 0.01,
    min_lr: float = 0.0,
):
    """Optional linear warm-up, then cosine annealing to ``min_lr`` at the last step; stepped per batch."""
    total = max(1, steps_per_epoch * max_epochs)
    warmup = min(total - 1, round(warmup_epochs * steps_per_epoch))
    cosine_part = lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, total - warmup), eta_min=min_lr)
    if warmup <= 0:
        return {"scheduler": cosine_part, "interval": "step"}
    ramp = lr_scheduler.LinearLR(
        optimizer, start_factor=warmup_start_factor, end_factor=1.0, total_iters=warmup
    )
    schedule = lr_scheduler.SequentialLR(optimizer, [ramp, cosine_part], milestones=[warmup])
    return {"scheduler": schedule, "interval": "step"}


def onecycle(
    optimizer: Optimizer,
    steps_per_epoch: int,
    max_epochs: int,
    max_lr: float | None = None,
    pct_start: float = 0.3,
    div_factor: float = 25.0,
    final_div_factor: float = 1e4,
    anneal_strategy: str = "cos",
):
    """Smith's one-cycle policy over the whole run, stepped per batch; peak lr = max_lr or optimizer.lr."""
    peak = max_lr if max_lr is not None else optimizer.param_groups[0]["lr"]
    schedule = lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=peak,
        total_steps=max(2, steps_per_epoch * max_epochs),
        pct_start=pct_start,
        div_factor=div_factor,
        final_div_factor=final_div_factor,
        anneal_strategy=anneal_strategy,
        # cycle_momentum needs a momentum or betas hyperparameter; SGD without momentum has neither to cycle.
        cycle_momentum=any(
            ("momentum" in g and g["momentum"] > 0) or "betas" in g for g in optimizer.param_groups
        ),
    )
    return {"scheduler": schedule, "interval": "step"}


def plateau(
    optimizer: Optimizer,
    steps_per_epoch: int,
    max_epochs: int,
    monitor: str = "val/acc",
    mode: str = "max",
    factor: float = 0.1,
    patience: int = 5,
    threshold: float = 1e-4,
    min_lr: float = 0.0,
) -> dict[str, Any]:
    """lr ← factor·lr when ``monitor`` has not improved for ``patience`` validations."""
    schedule = lr_scheduler.ReduceLROnPlateau(
        optimizer, mode=mode, factor=factor, patience=patience, threshold=threshold, min_lr=min_lr
    )
    return {"scheduler": schedule, "interval": "epoch", "monitor": monitor, "strict": True}
