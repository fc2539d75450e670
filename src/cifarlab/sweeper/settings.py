"""From Hydra's composed config (``hydra.sweeper.*`` and the task config) to :class:`SweepSettings`."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cifarlab.sweeper.runner import SweepError, SweepSettings
from cifarlab.sweeper.space import when_keys
from cifarlab.sweeper.study import storage_spec

# hydra overrides of the sweep command that must not reach a trial (it is a plain run in its own folder)
_NOT_FOR_TRIALS = (
    "hydra.sweep",
    "hydra/sweeper",
    "hydra.launcher",
    "hydra/launcher",
    "hydra.mode",
    "hydra.run.dir",
    "hydra.job.num",
    "hydra.job.id",
)


def _container(value: Any) -> Any:
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(value, (DictConfig, ListConfig)):
        try:
            return OmegaConf.to_container(value, resolve=True)
        except Exception:
            return OmegaConf.to_container(value, resolve=False)
    return value


def directions_of(direction: Any) -> list[str]:
    if isinstance(direction, str):
        items = [direction]
    elif isinstance(direction, Sequence):
        items = list(direction)
    else:
        items = [direction]
    out = []
    for d in items:
        name = getattr(d, "name", d)
        name = str(name).lower()
        if name not in ("maximize", "minimize"):
            raise SweepError(
                f"hydra.sweeper.direction={direction!r}: allowed: maximize, minimize, or a list of them"
            )
        out.append(name)
    return out


def trial_hydra_overrides(hydra_overrides: Sequence[str]) -> list[str]:
    out = []
    for o in hydra_overrides:
        key = str(o).lstrip("+~")
        if key.startswith(_NOT_FOR_TRIALS):
            continue
        out.append(str(o))
    return out


def settings_from_hydra(conf: Mapping[str, Any], config: Any, arguments: Sequence[str]) -> SweepSettings:
    """``conf``: the sweeper's settings (hydra.sweeper without _target_); ``config``: the composed sweep config."""
    from omegaconf import DictConfig, OmegaConf

    conf = {k: _container(v) for k, v in dict(conf).items()}
    hc = config.hydra
    cwd = str(hc.runtime.cwd)
    sweep_dir = (Path(cwd) / str(hc.sweep.dir)).resolve()
    choices = _container(hc.runtime.choices) or {}
    study_name = conf.get("study_name") or choices.get("hparams_search") or "cifarlab_optuna"
    study_name = str(study_name).replace("/", "_")
    directions = directions_of(conf.get("direction", "maximize"))
    objectives = conf.get("objectives")
    if objectives is None:
        objectives = [str(config.get("optimized_metric", "val/acc_best"))]
    elif isinstance(objectives, str):
        objectives = [objectives]
    objectives = [str(o) for o in objectives]
    if len(objectives) != len(directions):
        raise SweepError(
            f"hydra.sweeper.objectives {objectives} and direction {directions} must have the same "
            "length (one direction per objective)"
        )
    monitor = conf.get("monitor")
    if len(directions) > 1 or monitor in (False, "none", "null", ""):
        monitor = None  # Optuna prunes single-objective studies only
    elif monitor is None:
        monitor = "val/acc" if directions[0] == "maximize" else "val/loss"

    params = conf.get("params") or {}
    conditional = conf.get("conditional") or {}
    context: dict[str, Any] = {}
    for key in when_keys(conditional):
        if key in params:
            continue
        if key in choices:
            context[key] = choices[key]
        else:
            value = OmegaConf.select(config, key, default=None, throw_on_missing=False)
            if not isinstance(value, DictConfig):
                context[key] = _container(value)

    task_command = conf.get("task_command")
    if not task_command:
        script = os.path.abspath(sys.argv[0]) if sys.argv and sys.argv[0] else ""
        if not script.endswith(".py") or not os.path.isfile(script):
            raise SweepError(
                f"cannot tell the task script from sys.argv[0]={sys.argv[:1]}; set "
                "hydra.sweeper.task_command=[python,path/to/train.py]"
            )
        task_command = [sys.executable, script, f"--config-name={hc.job.config_name}"]
        for source in _container(hc.runtime.config_sources) or []:
            if source.get("provider") == "command-line" and source.get("schema") == "file":
                task_command.append(f"--config-dir={source['path']}")
    else:
        task_command = [str(c) for c in task_command]

    logger_cfg = _container(config.logger) if "logger" in config and config.logger is not None else None
    sampler = conf.get("sampler") or None
    pruner = conf.get("pruner") or None
    n_jobs = conf.get("n_jobs")
    return SweepSettings(
        study_name=study_name,
        storage=storage_spec(conf.get("storage"), sweep_dir, cwd),
        sweep_dir=str(sweep_dir),
        task_command=task_command,
        directions=directions,
        objectives=objectives,
        monitor=monitor,
        sampler=sampler,
        pruner=pruner,
        n_trials=int(conf.get("n_trials", 20)),
        params=dict(params),
        conditional=dict(conditional),
        context=context,
        arguments=[str(a) for a in arguments],
        child_overrides=trial_hydra_overrides(_container(hc.overrides.hydra) or []),
        task_cwd=cwd,
        devices=conf.get("devices", "auto"),
        n_jobs=int(n_jobs) if n_jobs else None,
        trials_per_gpu=int(conf.get("trials_per_gpu", 1)),
        gpus_per_trial=int(conf.get("gpus_per_trial", 1)),
        threads_per_trial=conf.get("threads_per_trial"),
        max_failure_rate=_rate(conf.get("max_failure_rate", 0.25)),
        max_retries=int(conf.get("max_retries", 3)),
        custom_search_space=conf.get("custom_search_space"),
        sweep_config=config if conf.get("custom_search_space") else None,
        enqueue_trials=list(conf.get("enqueue_trials") or []),
        set_logger_group=logger_cfg is not None and "group" in config.logger,
        set_run_name="run_name" in config,
        trial_timeout=conf.get("trial_timeout"),
        heartbeat_interval=float(conf.get("heartbeat_interval", 30.0)),
        stale_after=float(conf.get("stale_after", 300.0)),
        plots=bool(conf.get("plots", True)),
        wandb_summary=bool(conf.get("wandb_summary", True)),
        extra_env={str(k): str(v) for k, v in (conf.get("env") or {}).items()},
        logger_cfg=logger_cfg,
    )


def _rate(value: Any) -> float:
    rate = float(value)
    if not 0.0 <= rate <= 1.0:
        raise SweepError(f"hydra.sweeper.max_failure_rate={value!r}: allowed: 0 <= rate <= 1")
    return rate
