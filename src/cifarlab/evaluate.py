"""``evaluate(cfg)``: rebuild the run stored in a checkpoint and measure it on the test split."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from cifarlab.config import ConfigError


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    from cifarlab.train import build_datamodule, build_module, build_trainer, write_json

    path = Path(str(cfg.ckpt_path))
    if not path.is_file():
        raise ConfigError(f"ckpt_path={str(path)!r} is not allowed; allowed: an existing checkpoint file")
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    if "cifarlab_config" not in checkpoint:
        raise ConfigError(
            f"ckpt_path={str(path)!r} is not allowed; allowed: a checkpoint written by cifarlab"
        )
    run_cfg = OmegaConf.create(checkpoint["cifarlab_config"])
    # The checkpoint decides what the model and data are; this command decides where and how to run.
    run_cfg.trainer = cfg.trainer
    run_cfg.data.data_dir = cfg.data.data_dir if "data" in cfg else run_cfg.data.data_dir
    run_cfg.callbacks.checkpoint = False
    output_dir = Path(cfg.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    datamodule = build_datamodule(run_cfg)
    module = build_module(run_cfg, datamodule.num_classes, checkpoint["cifarlab_config"])
    module.load_state_dict(checkpoint["state_dict"])
    trainer = build_trainer(run_cfg, output_dir)
    trainer.test(module, datamodule=datamodule, verbose=False)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")}
    metrics["ckpt_path"] = str(path)
    write_json(output_dir / "metrics.json", metrics)
    print(f"{path}: " + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k.startswith("test/")))
    return metrics
