"""``evaluate(cfg)``: rebuild the run stored in a checkpoint and measure it on the test split."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from cifarlab.checkpoints import read_checkpoint
from cifarlab.config import ConfigError, check_hardware, validate


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    from cifarlab.train import (
        build_datamodule,
        build_module,
        build_trainer,
        quiet_lightning,
        start_line,
        write_json,
    )

    if OmegaConf.is_missing(cfg, "ckpt_path") or cfg.ckpt_path is None:
        raise ConfigError("ckpt_path is missing; allowed: ckpt_path=runs/<date>/<time>/checkpoints/last.ckpt")
    validate(cfg)  # the trainer settings are this command's; the rest comes from the checkpoint
    check_hardware(cfg)
    path = Path(str(cfg.ckpt_path))
    checkpoint = read_checkpoint(path)
    run_cfg = OmegaConf.create(checkpoint["cifarlab_config"])
    # The checkpoint decides what the model and data are; this command decides where and how to run.
    # precision=auto: the run's own setting, so that a run trained and tested in 32 bits is evaluated in 32
    # bits (auto would pick bf16-mixed where the hardware has it) and gives the run's own test metrics.
    run_precision = OmegaConf.select(run_cfg, "trainer.precision", default="auto")
    run_cfg.trainer = cfg.trainer
    if str(cfg.trainer.precision) == "auto":
        run_cfg.trainer.precision = run_precision
    run_cfg.data.data_dir = cfg.data.data_dir if "data" in cfg else run_cfg.data.data_dir
    run_cfg.callbacks.checkpoint = False
    output_dir = Path(cfg.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    datamodule = build_datamodule(run_cfg)
    module = build_module(run_cfg, datamodule.num_classes, checkpoint["cifarlab_config"])
    module.load_state_dict(checkpoint["state_dict"])
    quiet_lightning()
    trainer = build_trainer(run_cfg, output_dir)
    logging.getLogger("cifarlab").info(start_line(trainer))
    trainer.test(module, datamodule=datamodule, verbose=False)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")}
    metrics["ckpt_path"] = str(path)
    write_json(output_dir / "metrics.json", metrics)
    print(f"{path}: " + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k.startswith("test/")))
    return metrics
