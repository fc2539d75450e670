"""Train the course's CIFAR CNN.  python train.py [group=option ...] [key=value ...]   (--help lists them)"""

from pathlib import Path

import hydra
from omegaconf import DictConfig

from cifarlab import cli
from cifarlab.config import register_configs, validate

register_configs()


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    cli.guarded(validate, cfg)  # before torch is imported: a wrong value is reported at once
    from cifarlab.train import run

    metrics = cli.guarded(run, cfg)
    return metrics.get(cfg.optimized_metric)


if __name__ == "__main__":
    cli.main(main, Path(__file__).resolve().parent / "conf", "train")
