"""Train the course's CIFAR CNN.  python train.py [group=option ...] [key=value ...]   (--help lists them)"""

import hydra
from omegaconf import DictConfig

from cifarlab.cli import guarded
from cifarlab.config import register_configs

register_configs()


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from cifarlab.train import run

    metrics = guarded(run, cfg)
    return metrics.get(cfg.optimized_metric)


if __name__ == "__main__":
    main()
