"""Experiment loggers built from ``cfg.logger``: W&B (offline by default), CSV, or none."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import CSVLogger, Logger


def build_logger(
    name: str,
    output_dir: Path,
    run_name: str,
    config: dict[str, Any],
    project: str = "cifarlab",
    mode: str = "offline",
    entity: str | None = None,
    group: str | None = None,
    tags: list[str] | None = None,
    job_type: str = "train",
    log_model: bool = False,
) -> Logger | None:
    if name == "none":
        return None
    if name == "csv":
        logger = CSVLogger(save_dir=str(output_dir), name="csv", version="")
        logger.log_hyperparams(config)
        return logger
    from lightning.pytorch.loggers import WandbLogger  # imports wandb: only when it is used

    logger = WandbLogger(
        project=project,
        name=run_name,
        save_dir=str(output_dir),
        mode=mode,
        entity=entity,
        group=group,
        tags=list(tags or []),
        job_type=job_type,
        log_model=log_model,
        config=config,
    )
    return logger


def finish_logger(logger: Logger | None, failed: bool) -> None:
    """Close the logger so that the next job of a multirun starts its own run."""
    if logger is None:
        return
    if type(logger).__name__ == "WandbLogger":
        import wandb

        wandb.finish(exit_code=1 if failed else 0)
    else:
        logger.finalize("failed" if failed else "success")
