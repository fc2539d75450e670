"""Evaluate a checkpoint on the test split.  python eval.py ckpt_path=runs/.../checkpoints/last.ckpt"""

import hydra
from omegaconf import DictConfig

from cifarlab.cli import guarded
from cifarlab.config import register_configs

register_configs()


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> float | None:
    from cifarlab.evaluate import evaluate

    return guarded(evaluate, cfg).get("test/acc")


if __name__ == "__main__":
    main()
