"""Hydra sweeper plugin ``hydra/sweeper=cifarlab_optuna``: see cifarlab.sweeper and docs/sweeper.md."""
