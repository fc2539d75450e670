"""From Hydra's composed config (``hydra.sweeper.*`` and the task config) to :class:`SweepSettings`."""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cifarlab.sweeper.space import when_keys
from cifarlab.sweeper.study import storage_spec

LAUNCH_MODES = ("auto", "fork", "subprocess")


class SweepError(RuntimeError):
    """The sweep cannot start or had to stop (too many failures); the message says why."""


@dataclass
class SweepSettings:
    """Everything one sweep process needs (plain data: it travels to launcher jobs by pickle)."""

    study_name: str
    storage: str  # normalised spec (cifarlab.sweeper.study.storage_spec)
    sweep_dir: str
    task_command: list[str]  # e.g. [python, /abs/train.py]: how a subprocess trial starts
    directions: list[str] = field(default_factory=lambda: ["maximize"])
    objectives: list[str] = field(default_factory=lambda: ["val/acc_best"])  # keys of metrics.json
    objective_source: str = "metrics"  # metrics: keys of metrics.json; return: the task's return value
    launch: str = "subprocess"  # fork: warm trials (launch_fork); subprocess: task_command
    launch_note: str = ""  # why trials start the way they do, when it is not the default
    warm_task: Any = None  # a cifarlab.sweeper.launch_fork.WarmTask when launch == "fork"
    preload: list[str] | None = None  # modules the fork server imports; None: see lightning_task
    lightning_task: bool = False  # the task config has a `trainer` node: preload torch, Lightning, cifarlab
    monitor: str | None = "val/acc"  # reported every epoch for pruning; None: no reports
    sampler: dict[str, Any] | None = None  # {"_target_": "optuna.samplers.TPESampler", **kwargs}
    pruner: dict[str, Any] | None = None  # {"_target_": "optuna.pruners.MedianPruner", **kwargs}
    n_trials: int = 20
    params: dict[str, Any] = field(default_factory=dict)
    conditional: dict[str, Any] = field(default_factory=dict)
    context: dict[str, Any] = field(default_factory=dict)  # config values of `when` keys not searched
    arguments: list[str] = field(default_factory=list)  # the command line's task overrides
    child_overrides: list[str] = field(default_factory=list)  # appended to every trial (hydra.* settings)
    task_cwd: str = "."
    devices: Any = "auto"
    n_jobs: int | None = None
    trials_per_gpu: int | str = 1  # or "auto" (cifarlab.sweeper.slots.pack_trials)
    trial_memory_gb: float | None = None  # GPU memory of one trial, for trials_per_gpu=auto
    gpus_per_trial: int = 1
    threads_per_trial: int | None = None
    max_failure_rate: float = 0.25
    max_retries: int = 3
    custom_search_space: str | None = None
    sweep_config: Any = None  # the composed config, for custom_search_space(cfg, trial)
    data_config: dict[str, Any] | None = None  # the task's `data` node (decoded-data cache warmed once)
    enqueue_trials: list[dict[str, Any]] = field(default_factory=list)
    set_logger_group: bool = True  # pass logger.group=<study_name>
    set_run_name: bool = True  # pass run_name=<study_name>-<number>
    trial_timeout: float | None = None  # seconds; a trial running longer is killed and FAILs
    poll_interval: float = 0.05
    heartbeat_interval: float = 30.0
    stale_after: float = 300.0
    kill_grace: float = 10.0  # seconds between SIGTERM and SIGKILL when stopping trials
    plots: bool = True
    sync_batches: bool = False  # batch-synchronous (only for the benchmark): wait for every slot to free
    extra_env: dict[str, str] = field(default_factory=dict)
    logger_cfg: dict[str, Any] | None = None  # the task's logger config, for the W&B sweep summary
    wandb_summary: bool = True  # call cifarlab.loggers.log_sweep_summary at the end (when it exists)
    quiet: bool = False


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


def _check_directions(objectives: Sequence[str], directions: Sequence[str]) -> None:
    """An accuracy minimised or a loss maximised is a slip (``direction=minimize`` left from a loss sweep
    while ``optimized_metric`` is ``val/acc_best``): the study would search for the worst network, for hours,
    and say nothing. Metrics of other names are not judged."""
    for objective, direction in zip(objectives, directions, strict=True):
        name = str(objective).rsplit("/", 1)[-1].lower()
        wanted = "maximize" if name.startswith("acc") else "minimize" if name.startswith("loss") else None
        if wanted and direction != wanted:
            key = "direction" if len(directions) == 1 else "direction (one per objective)"
            raise SweepError(
                f"hydra.sweeper.{key}={direction} is not allowed for the objective {objective}; allowed: "
                f"{wanted} (an {'accuracy' if wanted == 'maximize' else 'loss'} is {wanted[:-1]}ed)"
            )


def trial_hydra_overrides(hydra_overrides: Sequence[str]) -> list[str]:
    out = []
    for o in hydra_overrides:
        key = str(o).lstrip("+~")
        if key.startswith(_NOT_FOR_TRIALS):
            continue
        out.append(str(o))
    return out


def settings_from_hydra(
    conf: Mapping[str, Any],
    config: Any,
    arguments: Sequence[str],
    task_function: Any = None,
    search_path: Sequence[Any] = (),
) -> SweepSettings:
    """``conf``: the sweeper's settings (hydra.sweeper without _target_); ``config``: the composed sweep config;
    ``task_function`` and Hydra's config ``search_path``: for warm trials (None: trials are subprocesses)."""
    from omegaconf import DictConfig, OmegaConf

    conf = {k: _container(v) for k, v in dict(conf).items()}
    hc = config.hydra
    cwd = str(hc.runtime.cwd)
    sweep_dir = (Path(cwd) / str(hc.sweep.dir)).resolve()
    choices = _container(hc.runtime.choices) or {}
    study_name = conf.get("study_name") or choices.get("hparams_search") or "cifarlab_optuna"
    study_name = str(study_name).replace("/", "_")
    directions = directions_of(conf.get("direction", "maximize"))
    launch, warm_task, launch_note = _launch_mode(conf, config, task_function, search_path)
    objectives = conf.get("objectives")
    objective_source = "metrics"
    if objectives is None and launch == "fork":
        objective_source = (
            "return"  # the task function's return value, named after optimized_metric when there is one
        )
        if len(directions) == 1:
            objectives = [str(config.get("optimized_metric") or "value")]
        else:
            objectives = [f"value_{i}" for i in range(len(directions))]
    elif objectives is None:
        objectives = [str(config.get("optimized_metric", "val/acc_best"))]
    elif isinstance(objectives, str):
        objectives = [objectives]
    objectives = [str(o) for o in objectives]
    if len(objectives) != len(directions):
        raise SweepError(
            f"hydra.sweeper.objectives {objectives} and direction {directions} must have the same "
            "length (one direction per objective)"
        )
    _check_directions(objectives, directions)
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
    if warm_task is not None:  # a warm trial's sys.argv: the script and its Hydra flags, then the overrides
        warm_task = dataclasses.replace(warm_task, argv=tuple(task_command[1:]))

    logger_cfg = _container(config.logger) if "logger" in config and config.logger is not None else None
    sampler = _component(conf.get("sampler"), "sampler", "tpe, random, cmaes, grid, nsgaii, gp, qmc")
    pruner = _component(conf.get("pruner"), "pruner", "median, successive_halving, hyperband, none")
    n_jobs = conf.get("n_jobs")
    n_trials = _positive_int(conf.get("n_trials", 20), "n_trials")
    if sampler and sampler.get("seed") is not None:
        _positive_int(sampler["seed"], "sampler.seed", minimum=0)
    return SweepSettings(
        study_name=study_name,
        storage=storage_spec(conf.get("storage"), sweep_dir, cwd),
        sweep_dir=str(sweep_dir),
        task_command=task_command,
        directions=directions,
        objectives=objectives,
        objective_source=objective_source,
        launch=launch,
        launch_note=launch_note,
        warm_task=warm_task,
        preload=[str(m) for m in conf["preload"]] if conf.get("preload") is not None else None,
        lightning_task="trainer" in config,
        monitor=monitor,
        sampler=sampler,
        pruner=pruner,
        n_trials=n_trials,
        params=dict(params),
        conditional=dict(conditional),
        context=context,
        arguments=[str(a) for a in arguments],
        child_overrides=trial_hydra_overrides(_container(hc.overrides.hydra) or []),
        task_cwd=cwd,
        devices=conf.get("devices", "auto"),
        n_jobs=None if n_jobs is None else _positive_int(n_jobs, "n_jobs"),
        trials_per_gpu=_trials_per_gpu(conf.get("trials_per_gpu", "auto")),
        trial_memory_gb=_optional_float(conf.get("trial_memory_gb"), "trial_memory_gb"),
        gpus_per_trial=_positive_int(conf.get("gpus_per_trial", 1), "gpus_per_trial"),
        threads_per_trial=_optional(_positive_int, conf.get("threads_per_trial"), "threads_per_trial"),
        max_failure_rate=_rate(conf.get("max_failure_rate", 0.25)),
        max_retries=_positive_int(conf.get("max_retries", 3), "max_retries", minimum=0),
        custom_search_space=conf.get("custom_search_space"),
        sweep_config=config if conf.get("custom_search_space") else None,
        # the dataset to decode into its cache before the first trial: only when the trials run this app itself
        # (a task_command may be anything, e.g. a stand-in that never loads data)
        data_config=_container(config.data)
        if isinstance(config.get("data"), DictConfig) and not conf.get("task_command")
        else None,
        enqueue_trials=list(conf.get("enqueue_trials") or []),
        set_logger_group=logger_cfg is not None and "group" in config.logger,
        set_run_name="run_name" in config,
        trial_timeout=_optional_float(conf.get("trial_timeout"), "trial_timeout"),
        heartbeat_interval=_positive_float(conf.get("heartbeat_interval", 30.0), "heartbeat_interval"),
        stale_after=_positive_float(conf.get("stale_after", 300.0), "stale_after"),
        plots=bool(conf.get("plots", True)),
        wandb_summary=bool(conf.get("wandb_summary", True)),
        extra_env={str(k): str(v) for k, v in (conf.get("env") or {}).items()},
        logger_cfg=logger_cfg,
    )


def _component(value: Any, key: str, options: str) -> Any:
    """A sampler/pruner node; a bare string (``hydra.sweeper.sampler=random``) is the group form's mistake."""
    if value is None or isinstance(value, Mapping):
        return value or None
    raise SweepError(
        f"hydra.sweeper.{key}={value!r} is not allowed; allowed: a config group option, chosen with "
        f"hydra/sweeper/{key}=<{options.replace(', ', '|')}>"
    )


def _positive_int(value: Any, key: str, minimum: int = 1) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = minimum - 1
    if number < minimum or str(number) != str(value).strip():
        raise SweepError(f"hydra.sweeper.{key}={value!r} is not allowed; allowed: an integer >= {minimum}")
    return number


def _optional(check: Any, value: Any, key: str) -> Any:
    return None if value is None else check(value, key)


def _rate(value: Any) -> float:
    try:
        rate = float(value)
    except (TypeError, ValueError):
        rate = math.nan
    if not 0.0 <= rate <= 1.0:
        raise SweepError(
            f"hydra.sweeper.max_failure_rate={value!r} is not allowed; allowed: a number 0 <= rate <= 1"
        )
    return rate


def _launch_mode(
    conf: Mapping[str, Any], config: Any, task_function: Any, search_path: Sequence[Any]
) -> tuple:
    """(launch, warm task or None, note): trials start warm (forked) unless they cannot or must not."""
    mode = str(conf.get("launch") or "auto")
    if mode not in LAUNCH_MODES:
        raise SweepError(f"hydra.sweeper.launch={mode!r} is not allowed; allowed: {', '.join(LAUNCH_MODES)}")
    if mode == "subprocess":
        return "subprocess", None, "hydra.sweeper.launch=subprocess"
    why = ""
    if conf.get("task_command"):
        why = "hydra.sweeper.task_command is set"
    elif int(conf.get("workers") or 0) > 0:
        why = "sweep processes run as launcher jobs (hydra.sweeper.workers)"
    elif task_function is None:
        why = "no task function"
    else:
        from cifarlab.sweeper.launch_fork import warm_task_of

        task, why = warm_task_of(task_function, config, search_path)
        if task is not None:
            return "fork", task, ""
    if mode == "fork":
        raise SweepError(f"hydra.sweeper.launch=fork is not possible: {why}; allowed: auto, subprocess")
    return "subprocess", None, why


def _trials_per_gpu(value: Any) -> int | str:
    if str(value) == "auto":
        return "auto"
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = 0
    if n < 1 or str(n) != str(value).strip():
        raise SweepError(
            f"hydra.sweeper.trials_per_gpu={value!r} is not allowed; allowed: auto or an integer >= 1"
        )
    return n


def _optional_float(value: Any, key: str) -> float | None:
    return None if value is None else _positive_float(value, key, or_null=True)


def _positive_float(value: Any, key: str, or_null: bool = False) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = -1.0
    if not (number > 0 and math.isfinite(number)) or isinstance(value, bool):
        allowed = "null or a number > 0" if or_null else "a number > 0"
        raise SweepError(f"hydra.sweeper.{key}={value!r} is not allowed; allowed: {allowed}")
    return number
