"""Experiment loggers built from ``cfg.logger``: W&B (offline by default), CSV, or none.

W&B runs are made here, not lazily by Lightning, so that a run that asked for ``mode=online`` but has no
API key or no network says so in one line and goes on logging offline within a few seconds (it never
blocks training on a login prompt or a network timeout). ``make wandb-sync`` uploads offline runs later.

Every run carries its resolved config flat (dot keys: one dashboard column per setting), tags naming the
optimizer, scheduler, init and data, a group (the sweep/study or the multirun) and a job type; at the end
its summary says ``status`` (completed, failed, pruned, interrupted) and failed runs exit with code 1.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

if TYPE_CHECKING:
    from lightning.pytorch.loggers import Logger

DEFAULT_BASE_URL = "https://api.wandb.ai"
ENV_TRIAL_NUMBER = "CIFARLAB_OPTUNA_TRIAL_NUMBER"  # set by cifarlab.sweeper in each trial's process


# ---- config → W&B columns and tags ---------------------------------------------------------------------


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"optimizer": {"lr": 0.1}}`` → ``{"optimizer.lr": 0.1}``: every setting its own dashboard column."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _hydra_choices() -> dict[str, str]:
    """The config-group options this run was composed from (``optimizer: rmsprop``), if Hydra made it."""
    try:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            return {str(k): str(v) for k, v in HydraConfig.get().runtime.choices.items() if v is not None}
    except Exception:  # noqa: BLE001 - only a nicety
        pass
    return {}


def _target_name(node: Any) -> str | None:
    if isinstance(node, Mapping) and node.get("_target_"):
        return str(node["_target_"]).rsplit(".", 1)[-1].lower()
    return None


def run_tags(config: Mapping[str, Any], extra: list[str] | None = None) -> list[str]:
    """``optimizer:rmsprop``, ``scheduler:cosine``, ``init:kaiming_uniform``, ``data:cifar10`` (+ extra)."""
    choices = _hydra_choices()
    optimizer = choices.get("optimizer") or _target_name(config.get("optimizer")) or "none"
    scheduler = choices.get("scheduler") or _target_name(config.get("scheduler")) or "none"
    model = config.get("model") or {}
    data = config.get("data") or {}
    tags = [
        f"optimizer:{optimizer}",
        f"scheduler:{scheduler}",
        f"init:{model.get('init', '?')}",
        f"activation:{model.get('activation', '?')}",
        f"data:{data.get('name', '?')}",
    ]
    for tag in extra or []:
        if str(tag).strip() and tag not in tags:  # W&B refuses a whole run for one empty tag
            tags.append(str(tag))
    return [t[:64] for t in tags]  # W&B's limit


def default_group() -> str | None:
    """The multirun's folder (``multirun-2025-01-31_12-00-00``) for the jobs of a plain ``-m`` sweep."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
            sweep_dir = Path(str(HydraConfig.get().sweep.dir))
            return "multirun-" + "_".join(sweep_dir.parts[-2:])
    except Exception:  # noqa: BLE001
        pass
    return None


# ---- online or offline ---------------------------------------------------------------------------------


def _base_url() -> str:
    return os.environ.get("WANDB_BASE_URL") or DEFAULT_BASE_URL


def has_api_key(base_url: str | None = None) -> bool:
    """An API key for ``base_url`` in WANDB_API_KEY, an identity-token file or the netrc file (wandb login)."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlparse(base_url or _base_url()).hostname or ""
    import netrc

    candidates = [os.environ.get("NETRC"), "~/.netrc", "~/_netrc"]
    for candidate in filter(None, candidates):
        path = Path(candidate).expanduser()
        if not path.is_file():
            continue
        try:
            auth = netrc.netrc(str(path)).authenticators(host)
        except (netrc.NetrcParseError, OSError):
            continue
        if auth and auth[2]:
            return True
    return False


def reachable(base_url: str | None = None, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the W&B server opens within ``timeout`` seconds, name lookup included
    (behind a proxy: assumed; wandb.init's own timeout then bounds the wait)."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy")):
        return True
    url = urlparse(base_url or _base_url())
    port = url.port or (443 if url.scheme == "https" else 80)
    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((url.hostname or "", port), timeout=timeout):
                result.append(True)
        except (OSError, ValueError):
            result.append(False)

    # A thread, because socket timeouts do not cover the DNS lookup (which can hang without a network).
    thread = threading.Thread(target=probe, name="wandb-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


_PROJECT_FORBIDDEN = "/\\#?%:"


def check_project(project: str) -> None:
    """The names W&B accepts (else ``wandb.init`` raises UsageError, a traceback): 1 to 128 characters,
    none of ``/ \\ # ? % :``."""
    from cifarlab.config import ConfigError

    name = str(project)
    if not name.strip() or len(name) > 128 or any(c in name for c in _PROJECT_FORBIDDEN):
        raise ConfigError(
            f"logger.project={project!r} is not allowed; allowed: a W&B project name of 1 to 128 characters "
            f"without {' '.join(_PROJECT_FORBIDDEN)}"
        )


def _say(message: str) -> None:
    print(f"wandb: {message}", file=sys.stderr, flush=True)


def init_wandb_run(
    *,
    name: str | None,
    save_dir: Path,
    config: dict[str, Any],
    project: str = "cifarlab",
    mode: str = "offline",
    entity: str | None = None,
    group: str | None = None,
    tags: list[str] | None = None,
    job_type: str = "train",
    init_timeout: float = 10.0,
):
    """``wandb.init`` that never hangs: online needs a key and a reachable server, else it logs offline."""
    check_project(project)
    import wandb

    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    mode = {"dryrun": "offline", "run": "online"}.get(mode, mode)
    if mode == "online":
        base_url = _base_url()
        if not has_api_key(base_url):
            _say(
                "online logging needs an API key (`wandb login` or WANDB_API_KEY); logging offline instead, "
                "upload later with `make wandb-sync`"
            )
            mode = "offline"
        elif not reachable(base_url):
            _say(f"{base_url} is unreachable; logging offline instead, upload later with `make wandb-sync`")
            mode = "offline"
    kwargs = dict(
        project=project,
        entity=entity,
        name=name,
        group=group,
        job_type=job_type,
        tags=tags or None,
        config=config,
        dir=str(save_dir),
        reinit="finish_previous",
    )
    if mode == "online":
        try:
            return wandb.init(
                mode="online", settings=wandb.Settings(init_timeout=init_timeout, quiet=True), **kwargs
            )
        except Exception as err:  # noqa: BLE001 - bad key, timeout, server error: fall back, never stop training
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            _say(
                f"online logging failed ({reason[:160]}); logging offline instead, upload later with "
                "`make wandb-sync`"
            )
            mode = "offline"
    # Offline runs never touch the network (no key, no login prompt, no retries).
    return wandb.init(mode=mode, settings=wandb.Settings(quiet=True, silent=True), **kwargs)


# ---- the training run's logger -------------------------------------------------------------------------


def is_rank_zero() -> bool:
    """The process of a (possibly DDP) run that writes files and logs: local rank 0 on node 0."""
    return int(os.environ.get("LOCAL_RANK", "0")) == 0 and int(os.environ.get("NODE_RANK", "0")) == 0


def build_logger(
    name: str,
    output_dir: Path,
    run_name: str,
    config: dict[str, Any],
    project: str = "cifarlab",
    mode: str = "offline",
    entity: str | None = None,
    group: str | None = None,
    tags: list[str] | None = None,
    job_type: str = "train",
    log_model: bool = False,
    init_timeout: float = 10.0,
) -> Logger | None:
    if name == "none":
        return None
    if name == "csv":
        from lightning.pytorch.loggers import CSVLogger

        logger = CSVLogger(save_dir=str(output_dir), name="csv", version="")
        logger.log_hyperparams(flatten(config))
        return logger
    if mode == "disabled":
        return None
    from lightning.pytorch.loggers import WandbLogger  # imports wandb: only when it is used

    group = group or default_group()
    tags = list(tags or [])
    if os.environ.get(ENV_TRIAL_NUMBER) is not None:  # started by cifarlab.sweeper for an Optuna trial
        job_type = "sweep-trial" if job_type == "train" else job_type
        tags.append(f"trial:{os.environ[ENV_TRIAL_NUMBER]}")
    if not is_rank_zero():  # other DDP ranks: a logger Lightning never starts (it logs from rank zero only)
        return WandbLogger(project=project, name=run_name, save_dir=str(output_dir), offline=True)
    run = init_wandb_run(
        name=run_name,
        save_dir=output_dir,
        config=flatten(config),
        project=project,
        mode=mode,
        entity=entity,
        group=group,
        tags=run_tags(config, tags),
        job_type=job_type,
        init_timeout=init_timeout,
    )
    # Lightning defines these axes only for runs it starts itself.
    run.define_metric("trainer/global_step")
    run.define_metric("*", step_metric="trainer/global_step", step_sync=True)
    logger = WandbLogger(experiment=run, project=project, name=run_name, save_dir=str(output_dir))
    logger.cifarlab_log_model = (
        log_model  # read by cifarlab.diagnostics.EndOfRunReport (best checkpoint only)
    )
    return logger


def wandb_run_of(trainer_or_logger: Any):
    """The live W&B run behind a trainer's (or a logger's) WandbLogger, or None."""
    loggers = getattr(trainer_or_logger, "loggers", None)
    if loggers is None:
        loggers = [trainer_or_logger] if trainer_or_logger is not None else []
    for logger in loggers:
        if type(logger).__name__ == "WandbLogger":
            run = logger.experiment
            return run if hasattr(run, "log") and getattr(run, "id", None) else None
    return None


def _status(failed: bool, metrics: Mapping[str, Any] | None) -> str:
    status = str((metrics or {}).get("status") or ("failed" if failed else "completed"))
    error = str((metrics or {}).get("error") or "")
    if error.startswith(("TrialPruned", "optuna.exceptions.TrialPruned")):
        status = "pruned"
    return status


def finish_logger(logger: Logger | None, failed: bool, metrics: Mapping[str, Any] | None = None) -> None:
    """Close the logger so that the next job of a multirun starts its own run.

    W&B: the summary gets ``status`` (completed | failed | pruned | interrupted), ``error`` and the run's
    timings; a failed or interrupted run exits with code 1 (its state reads *failed*), a pruned one with 0
    (stopping a hopeless trial early is not a failure) and the tag ``pruned``.
    """
    if logger is None:
        return
    if type(logger).__name__ != "WandbLogger":
        logger.finalize("failed" if failed else "success")
        return
    import wandb

    run = wandb.run
    if run is None:
        return
    status = _status(failed, metrics)
    try:
        run.summary["status"] = status
        for key in ("error", "duration_s", "epochs", "global_step", "precision", "best_ckpt"):
            if metrics and metrics.get(key) not in (None, ""):
                run.summary[key] = metrics[key]
        if status == "pruned":
            run.tags = tuple(run.tags or ()) + ("pruned",)
    finally:
        run.finish(exit_code=0 if status in ("completed", "pruned") else 1)
    if getattr(run, "offline", False) or run.settings.mode in ("offline", "dryrun"):
        print(
            f"wandb: offline run saved in {run.dir.rsplit('/files', 1)[0]} (upload: make wandb-sync)",
            flush=True,
        )


# ---- a sweep's summary run -----------------------------------------------------------------------------


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    if cfg is None:
        return default
    value = cfg.get(key, default) if isinstance(cfg, Mapping) else getattr(cfg, key, default)
    return default if value is None else value


def _cell(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def trials_rows(study) -> tuple[list[str], list[list[Any]]]:
    """The study's trials as table rows: number, state, value, duration, params, scalar user attributes."""
    trials = study.get_trials(deepcopy=False)
    params = sorted({p for t in trials for p in t.params})
    attrs = sorted(
        {k for t in trials for k, v in t.user_attrs.items() if isinstance(v, (bool, int, float, str))}
    )
    columns = ["trial", "state", "value", "duration_s", *params, *[f"attr.{a}" for a in attrs]]
    rows = []
    for t in trials:
        value = t.value if t.values is not None and len(t.values) == 1 else (t.values and list(t.values))
        duration = t.duration.total_seconds() if t.duration is not None else None
        rows.append(
            [
                t.number,
                t.state.name.lower(),
                _cell(value),
                duration,
                *[_cell(t.params.get(p)) for p in params],
                *[_cell(t.user_attrs.get(a)) for a in attrs],
            ]
        )
    return columns, rows


def _best_trial(study):
    try:
        return study.best_trial
    except (ValueError, RuntimeError):  # no completed trial, or a multi-objective study
        return None


def log_sweep_summary(study, sweep_dir: str | Path, group: str | None, logger_cfg: Any = None) -> str | None:
    """One W&B run (job type ``sweep-summary``, the trials' group) that shows a whole sweep at a glance:
    the trials table (params, state, value, duration), the optimisation history as a chart, Optuna's plots
    (the sweep's PNGs, or made here with ``optuna.visualization.matplotlib``) and the best config.

    Returns the run's local folder, or None where the logger is not W&B.
    """
    if (
        str(_get(logger_cfg, "name", "wandb")) != "wandb"
        or str(_get(logger_cfg, "mode", "offline")) == "disabled"
    ):
        return None
    import wandb

    sweep_dir = Path(sweep_dir)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    group = group or study.study_name
    columns, rows = trials_rows(study)
    states = [row[1] for row in rows]
    best = _best_trial(study)
    directions = [d.name.lower() for d in study.directions]
    config: dict[str, Any] = {
        "study_name": study.study_name,
        "direction": directions[0] if len(directions) == 1 else directions,
        "n_trials": len(rows),
    }
    best_config = _best_config(sweep_dir, best)
    config.update(flatten({"best": best_config}))
    summary: dict[str, Any] = {f"n_{s}": states.count(s) for s in ("complete", "pruned", "fail", "running")}
    if best is not None:
        summary.update(best_value=best.value, best_trial=best.number)
        summary.update({f"best/{k}": _cell(v) for k, v in best.params.items()})
        for key in ("run_name", "job_dir", "output_dir"):
            if key in best.user_attrs:
                summary[f"best/{key}"] = _cell(best.user_attrs[key])
    elif len(directions) > 1:  # no single best trial: the Pareto front's trial numbers
        summary["best_trials"] = [t.number for t in study.best_trials]

    run = init_wandb_run(
        name=f"{group}-summary",
        save_dir=sweep_dir,
        config=config,
        project=str(_get(logger_cfg, "project", "cifarlab")),
        mode=str(_get(logger_cfg, "mode", "offline")),
        entity=_get(logger_cfg, "entity"),
        group=group,
        tags=["sweep-summary", f"study:{study.study_name}"[:64]],
        job_type="sweep-summary",
        init_timeout=float(_get(logger_cfg, "init_timeout", 10.0)),
    )
    try:
        run.define_metric("sweep/trial")
        run.define_metric("sweep/*", step_metric="sweep/trial")
        # The optimisation history as native charts: each finished trial's value and the best so far.
        # Several objectives: each trial's values as sweep/value_<i> (trial.value is refused there).
        sign = -1.0 if directions and directions[0] == "minimize" else 1.0
        best_so_far = None
        for t in study.get_trials(deepcopy=False):
            if t.state.name != "COMPLETE" or not t.values:
                continue
            if len(t.values) > 1:
                run.log({"sweep/trial": t.number, **{f"sweep/value_{i}": v for i, v in enumerate(t.values)}})
                continue
            best_so_far = (
                t.value
                if best_so_far is None
                else (t.value if sign * t.value > sign * best_so_far else best_so_far)
            )
            run.log({"sweep/trial": t.number, "sweep/value": t.value, "sweep/best_value": best_so_far})
        media: dict[str, Any] = {
            "sweep/trials": wandb.Table(columns=columns, data=rows, allow_mixed_types=True)
        }
        for png in _sweep_plots(study, sweep_dir):
            media[f"plots/{png.stem}"] = wandb.Image(str(png), caption=png.stem.replace("_", " "))
        run.log(media)
        for key, value in summary.items():
            run.summary[key] = value
        run.summary["status"] = "completed"
        for name in ("trials.csv", "optimization_results.yaml", "best_config.yaml"):
            if (sweep_dir / name).is_file():  # a copy in the run's files/ is uploaded with the run
                shutil.copy2(sweep_dir / name, Path(run.dir) / name)
        folder = run.dir.rsplit("/files", 1)[0]
    except BaseException:
        run.finish(exit_code=1)
        raise
    run.finish(exit_code=0)
    return folder


def _best_config(sweep_dir: Path, best) -> dict[str, Any]:
    """The best trial's config: its run's resolved config.yaml where the trial names its run folder, else
    the sweeper's optimization_results.yaml (best_params), else the trial's own params."""
    from omegaconf import OmegaConf

    if best is not None:
        for key in ("job_dir", "output_dir", "run_dir"):
            path = Path(str(best.user_attrs.get(key, ""))) / "config.yaml"
            if best.user_attrs.get(key) and path.is_file():
                return OmegaConf.to_container(OmegaConf.load(path), resolve=False)  # type: ignore[return-value]
    results = sweep_dir / "optimization_results.yaml"
    if results.is_file():
        loaded = OmegaConf.to_container(OmegaConf.load(results), resolve=False)
        if isinstance(loaded, dict) and isinstance(loaded.get("best_params"), dict):
            return dict(loaded["best_params"])
    return dict(best.params) if best is not None else {}


def _sweep_plots(study, sweep_dir: Path) -> list[Path]:
    pngs = sorted(sweep_dir.glob("*.png"))
    if pngs:
        return pngs
    from cifarlab.figures import optuna_figures

    return optuna_figures(study, sweep_dir / "figures")


# ---- run names -----------------------------------------------------------------------------------------


def short_number(x: float) -> str:
    """``0.0003`` → ``3e-4``, ``0.00125`` → ``1.25e-3``, ``0.05`` → ``0.05``: short enough for a run name."""
    x = float(x)
    if x == 0 or 1e-2 <= abs(x) < 1e3:
        return f"{x:g}"
    mantissa, exponent = f"{x:.2e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def hydra_choices() -> dict[str, str]:
    return _hydra_choices()


def multirun_job_number() -> int | None:
    """This job's number in a Hydra multirun (``-m``), or None for a single run."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
            return int(HydraConfig.get().job.num)
    except Exception:  # noqa: BLE001
        pass
    return None
