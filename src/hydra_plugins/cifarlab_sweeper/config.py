"""``hydra/sweeper=cifarlab_optuna`` and its ``sampler`` / ``pruner`` groups, registered in Hydra's ConfigStore.

The names of the stock Optuna sweeper are kept where they mean the same (``sampler``, ``direction``,
``study_name``, ``storage``, ``n_trials``, ``n_jobs``, ``params``, ``max_failure_rate``, ``custom_search_space``), so
its search configs keep working. Reference: docs/sweeper.md.
"""

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class CifarlabOptunaSweeperConf:
    _target_: str = "hydra_plugins.cifarlab_sweeper.sweeper.CifarlabOptunaSweeper"
    _recursive_: bool = False  # sampler/pruner reach the sweeper as configs (trials rebuild the pruner)
    defaults: list[Any] = field(default_factory=lambda: [{"sampler": "tpe"}, {"pruner": "median"}])

    sampler: Any = (
        MISSING  # hydra/sweeper/sampler: tpe | random | cmaes | grid | nsgaii | gp | qmc (or {_target_: ...})
    )
    pruner: Any = MISSING  # hydra/sweeper/pruner: median | successive_halving | hyperband | none
    direction: Any = "maximize"  # maximize | minimize | a list, one per objective
    objectives: list[str] | None = (
        None  # metrics.json keys; None: the task function's return value (warm trials)
    )
    monitor: str | None = None  # reported every epoch for pruning; None: val/acc (val/loss when minimizing)
    study_name: str | None = None  # None: the hparams_search option's name (stable across re-runs)
    storage: str | None = (
        None  # None: journal file <hydra.sweep.dir>/journal.log; or sqlite:///…, postgresql://…
    )
    n_trials: int = 20  # in total, over every sweep process sharing the study, including earlier runs
    n_jobs: int | None = None  # parallel trials without GPUs (CPU slots); None: 1
    devices: Any = "auto"  # auto (every visible GPU, else CPU) | cpu | gpu | a list of GPU ids
    trials_per_gpu: Any = (
        "auto"  # trials sharing one GPU; auto: as many as add images/s and fit (docs/sweeper.md)
    )
    trial_memory_gb: float | None = None  # GPU memory one trial needs, for trials_per_gpu=auto; None: 2 GB
    gpus_per_trial: int = 1
    threads_per_trial: int | None = None  # OMP_NUM_THREADS of a trial; None: cores // slots
    max_failure_rate: float = 0.25  # stop when more than this fraction of n_trials has failed in this run
    max_retries: int = 3  # re-runs of a trial interrupted by a dead/stopped sweep process
    params: dict[str, Any] | None = (
        None  # key: choice(...) | interval(...) | tag(log, interval(...)) | range(...)
    )
    conditional: dict[str, Any] = field(default_factory=dict)  # key: {when: {other: [values]}, space: ...}
    custom_search_space: str | None = None  # dotted path of fn(cfg, trial) suggesting more parameters
    enqueue_trials: list[Any] = field(default_factory=list)  # parameter sets to try first ({key: value})
    workers: int = 0  # >0: run that many sweep processes as jobs of hydra.launcher (e.g. submitit on SLURM)
    task_command: list[str] | None = None  # set: every trial is this command (a subprocess) + its overrides
    launch: str = (
        "auto"  # auto: warm trials forked from a preloaded server where possible | fork | subprocess
    )
    preload: list[str] | None = (
        None  # modules the warm trials' server imports; None: torch, lightning, cifarlab (+ wandb's)
    )
    trial_timeout: float | None = None  # seconds; a trial running longer is killed and FAILs
    heartbeat_interval: float = 30.0  # seconds between a sweep process's liveness records
    stale_after: float = (
        300.0  # a trial of another host's sweep process without heartbeat this long is retried
    )
    plots: bool = True  # PNG plots in the sweep folder at the end
    precheck: bool = True  # compose and check every kind of value the space gives before the first trial
    wandb_summary: bool = (
        True  # a W&B summary run of the study at the end (cifarlab.loggers.log_sweep_summary)
    )
    env: dict[str, str] = field(default_factory=dict)  # extra environment variables of every trial


SAMPLERS: dict[str, dict[str, Any]] = {
    # constant_liar: running trials count as bad guesses, so parallel workers do not propose the same point
    "tpe": {
        "_target_": "optuna.samplers.TPESampler",
        "seed": None,
        "n_startup_trials": 10,
        "multivariate": True,
        "group": True,
        "constant_liar": True,
    },
    "random": {"_target_": "optuna.samplers.RandomSampler", "seed": None},
    "cmaes": {
        "_target_": "optuna.samplers.CmaEsSampler",
        "seed": None,
        "n_startup_trials": 1,
        "warn_independent_sampling": False,
    },
    "grid": {"_target_": "optuna.samplers.GridSampler", "seed": None},  # search_space: built from params
    "nsgaii": {"_target_": "optuna.samplers.NSGAIISampler", "seed": None, "population_size": 20},
    # Gaussian-process Bayesian optimisation (needs torch and scipy); best for few, expensive trials
    "gp": {"_target_": "optuna.samplers.GPSampler", "seed": None, "n_startup_trials": 10},
    # quasi-random (Sobol) points that cover the space evenly (needs scipy)
    "qmc": {"_target_": "optuna.samplers.QMCSampler", "seed": None, "qmc_type": "sobol", "scramble": True},
}

PRUNERS: dict[str, dict[str, Any]] = {
    "median": {
        "_target_": "optuna.pruners.MedianPruner",
        "n_startup_trials": 5,
        "n_warmup_steps": 1,
        "interval_steps": 1,
        "n_min_trials": 1,
    },
    "successive_halving": {
        "_target_": "optuna.pruners.SuccessiveHalvingPruner",
        "min_resource": "auto",
        "reduction_factor": 3,
        "min_early_stopping_rate": 0,
    },
    "hyperband": {
        "_target_": "optuna.pruners.HyperbandPruner",
        "min_resource": 1,
        "max_resource": "auto",
        "reduction_factor": 3,
    },
    "none": {"_target_": "optuna.pruners.NopPruner"},
}


def register() -> None:
    cs = ConfigStore.instance()
    cs.store(
        group="hydra/sweeper", name="cifarlab_optuna", node=CifarlabOptunaSweeperConf, provider="cifarlab"
    )
    for name, node in SAMPLERS.items():
        cs.store(group="hydra/sweeper/sampler", name=name, node=node, provider="cifarlab")
    for name, node in PRUNERS.items():
        cs.store(group="hydra/sweeper/pruner", name=name, node=node, provider="cifarlab")


register()
