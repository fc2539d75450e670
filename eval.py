"""Evaluate a checkpoint on the test split.  python eval.py ckpt_path=runs/.../checkpoints/last.ckpt"""

from pathlib import Path

import hydra
from omegaconf import DictConfig

from cifarlab import cli
from cifarlab.config import register_configs

register_configs()


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> float | None:
    from cifarlab.evaluate import evaluate

    return cli.guarded(evaluate, cfg).get("test/acc")


if __name__ == "__main__":
    cli.main(main, Path(__file__).resolve().parent / "conf", "eval")
