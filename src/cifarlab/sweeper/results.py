"""What a sweep leaves in its folder, rewritten atomically after every finished trial:

- ``optimization_results.yaml``: ``name: optuna``, ``best_params``, ``best_value`` (as the stock Optuna sweeper),
  or ``solutions`` (the Pareto front) for several objectives; plus counts, the best trial's folder and overrides.
- ``trials.csv``: number, state, value(s), params, duration, job folder, slot, failure reason and error.
- ``*.png`` at the end: optimisation history, parameter importances, parallel coordinates, intermediate values,
  timeline (and the Pareto front for several objectives), through ``optuna.visualization.matplotlib``; a plot
  that needs more trials than there are is skipped.
- ``sweep.log``: the progress lines printed by every sweep process.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cifarlab.sweeper.study import ERROR, FAIL_REASON, JOB_DIR, OVERRIDES, SLOT, counts_toward_budget, redact

if TYPE_CHECKING:
    import optuna

log = logging.getLogger("cifarlab.sweeper")


class Console:
    """Progress lines: printed, and appended to ``sweep.log``."""

    def __init__(self, path: Path | None, quiet: bool = False) -> None:
        self.path, self.quiet = path, quiet

    def say(self, message: str) -> None:
        if not self.quiet:
            print(message, flush=True)
        if self.path is not None:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with open(self.path, "a") as f:
                    f.write(f"[{time.strftime('%Y-%m-%d %H:%M:%S')} pid {os.getpid()}] {message}\n")
            except OSError:
                pass


def atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ---- formatting -----------------------------------------------------------------------------------------------


def short_names(names: Sequence[str]) -> dict[str, str]:
    """``optimizer.lr`` → ``lr`` where the last part is unambiguous."""
    last = [n.rsplit(".", 1)[-1] for n in names]
    return {n: (s if last.count(s) == 1 else n) for n, s in zip(names, last, strict=True)}


def fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def params_text(params: dict[str, Any]) -> str:
    names = short_names(list(params))
    return " ".join(f"{names[k]}={fmt(v)}" for k, v in params.items())


def trial_seconds(t: optuna.trial.FrozenTrial) -> float | None:
    if t.datetime_start and t.datetime_complete:
        return (t.datetime_complete - t.datetime_start).total_seconds()
    wall = t.user_attrs.get("wall_s")
    return float(wall) if isinstance(wall, (int, float)) else None


def _best(study: optuna.Study, trials: Sequence[optuna.trial.FrozenTrial]) -> Any:
    """Single objective: the best COMPLETE trial (or None); several: the Pareto front."""
    from optuna.trial import TrialState

    complete = [t for t in trials if t.state == TrialState.COMPLETE and t.values]
    if not complete:
        return None if len(study.directions) == 1 else []
    if len(study.directions) == 1:
        sign = 1 if study.direction.name == "MAXIMIZE" else -1
        return max(complete, key=lambda t: sign * t.values[0])
    return study.best_trials


def progress_line(
    study: optuna.Study,
    t: optuna.trial.FrozenTrial,
    trials: Sequence[optuna.trial.FrozenTrial],
    n_trials: int,
    n_running: int,
    objectives: Sequence[str],
) -> str:
    seconds = trial_seconds(t)
    parts = [f"trial {t.number:>3} {t.state.name:<8}"]
    if t.state.name == "PRUNED":
        if t.values:
            parts.append(f"{t.values[0]:.4f} (last report, epoch {t.last_step + 1})")
    elif t.values:
        parts.append(" ".join(f"{o} {v:.4f}" for o, v in zip(objectives, t.values, strict=False)))
    if t.state.name == "FAIL":
        reason = t.user_attrs.get(FAIL_REASON, "error")
        parts.append(f"[{reason}] {str(t.user_attrs.get(ERROR, ''))[:160]}")
    if seconds is not None:
        parts.append(f"{seconds:.1f}s")
    if t.params:
        parts.append(params_text(t.params))
    best = _best(study, trials)
    if isinstance(best, list):
        parts.append(f"| Pareto front {len(best)} trial(s)")
    elif best is not None:
        parts.append(f"| best {best.values[0]:.4f} (trial {best.number})")
    counted = sum(1 for x in trials if counts_toward_budget(x) and x.state.is_finished())
    parts.append(f"| {counted}/{n_trials} done, {n_running} running here")
    return "  ".join(parts)


# ---- result files ---------------------------------------------------------------------------------------------


def counts(trials: Sequence[optuna.trial.FrozenTrial]) -> dict[str, int]:
    out = {"complete": 0, "pruned": 0, "failed": 0, "running": 0, "waiting": 0, "retried": 0, "duplicates": 0}
    for t in trials:
        name = t.state.name
        if name == "FAIL":
            if counts_toward_budget(t):
                out["failed"] += 1
            else:  # not run (a repeated parameter set) or interrupted (then retried): never counted
                out["duplicates" if t.user_attrs.get("fail_reason") == "duplicate" else "retried"] += 1
        elif name in ("COMPLETE", "PRUNED", "RUNNING", "WAITING"):
            out[
                {"COMPLETE": "complete", "PRUNED": "pruned", "RUNNING": "running", "WAITING": "waiting"}[name]
            ] += 1
    out["counted"] = out["complete"] + out["pruned"] + out["failed"] + out["running"]
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def results_dict(
    study: optuna.Study, objectives: Sequence[str], storage: str, trials: Sequence[optuna.trial.FrozenTrial]
) -> dict[str, Any]:
    data: dict[str, Any] = {"name": "optuna"}
    best = _best(study, trials)
    if len(study.directions) == 1:
        if best is not None:
            data["best_params"] = {k: _plain(v) for k, v in best.params.items()}
            data["best_value"] = _plain(best.values[0])
            data["best_trial"] = best.number
            data["best_job_dir"] = best.user_attrs.get(JOB_DIR)
            data["best_overrides"] = task_overrides(best.user_attrs.get(OVERRIDES) or [])
        else:
            data["best_params"] = None
            data["best_value"] = None
    else:
        data["solutions"] = [
            {
                "number": t.number,
                "params": {k: _plain(v) for k, v in t.params.items()},
                "values": {o: _plain(v) for o, v in zip(objectives, t.values, strict=False)},
                "job_dir": t.user_attrs.get(JOB_DIR),
            }
            for t in (best or [])
        ]
    data["study_name"] = study.study_name
    data["storage"] = redact(storage)
    data["objectives"] = list(objectives)
    data["directions"] = [d.name.lower() for d in study.directions]
    data["trials"] = counts(trials)
    return data


def task_overrides(overrides: Sequence[str]) -> list[str]:
    """The overrides that reproduce a trial as a plain run (without the sweeper's hydra.*, logger.group, run_name)."""
    skip = ("hydra.", "logger.group=", "run_name=")
    return [o for o in overrides if not o.startswith(skip)]


def trial_rows(
    trials: Sequence[optuna.trial.FrozenTrial], objectives: Sequence[str]
) -> tuple[list[str], list[dict[str, Any]]]:
    names: list[str] = []
    for t in trials:
        names += [n for n in t.params if n not in names]
    value_cols = ["value"] if len(objectives) == 1 else [f"value:{o}" for o in objectives]
    header = [
        "number",
        "state",
        *value_cols,
        *[f"params:{n}" for n in names],
        "duration_s",
        "started",
        "completed",
        "job_dir",
        "slot",
        "fail_reason",
        "error",
    ]
    rows = []
    for t in trials:
        row: dict[str, Any] = {"number": t.number, "state": t.state.name}
        for col, v in zip(value_cols, t.values or [None] * len(value_cols), strict=False):
            row[col] = v
        for n in names:
            row[f"params:{n}"] = t.params.get(n)
        seconds = trial_seconds(t)
        row["duration_s"] = round(seconds, 3) if seconds is not None else None
        row["started"] = t.datetime_start.isoformat(timespec="seconds") if t.datetime_start else None
        row["completed"] = t.datetime_complete.isoformat(timespec="seconds") if t.datetime_complete else None
        row["job_dir"] = t.user_attrs.get(JOB_DIR)
        row["slot"] = t.user_attrs.get(SLOT)
        row["fail_reason"] = t.user_attrs.get(FAIL_REASON) if t.state.name == "FAIL" else None
        row["error"] = str(t.user_attrs.get(ERROR, ""))[:500] if t.state.name == "FAIL" else None
        rows.append(row)
    return header, rows


def write_results(
    study: optuna.Study,
    sweep_dir: Path,
    objectives: Sequence[str],
    storage: str,
    trials: Sequence[optuna.trial.FrozenTrial] | None = None,
) -> None:
    """Rewrite optimization_results.yaml and trials.csv (atomically)."""
    import yaml

    trials = study.get_trials(deepcopy=False) if trials is None else trials
    data = results_dict(study, objectives, storage, trials)
    atomic_write(Path(sweep_dir) / "optimization_results.yaml", yaml.safe_dump(data, sort_keys=False))
    header, rows = trial_rows(trials, objectives)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=header, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    atomic_write(Path(sweep_dir) / "trials.csv", buf.getvalue())


def write_plots(study: optuna.Study, sweep_dir: Path, objectives: Sequence[str]) -> dict[str, str]:
    """PNG plots; returns {file name: "ok" or why it was skipped}."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    import optuna
    import optuna.visualization.matplotlib as vm
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    multi = len(study.directions) > 1
    target = (lambda t: t.values[0]) if multi else None
    tname = objectives[0] if objectives else "Objective Value"
    plots: list[tuple[str, Any, int]] = [  # (file, how, min. complete trials)
        (
            "optimization_history.png",
            lambda: vm.plot_optimization_history(study, target=target, target_name=tname),
            1,
        ),
        (
            "param_importances.png",
            lambda: vm.plot_param_importances(study, target=target, target_name=tname),
            2,
        ),
        (
            "parallel_coordinate.png",
            lambda: vm.plot_parallel_coordinate(study, target=target, target_name=tname),
            2,
        ),
        ("timeline.png", lambda: vm.plot_timeline(study), 0),
    ]
    if not multi:
        plots.insert(3, ("intermediate_values.png", lambda: vm.plot_intermediate_values(study), 0))
    elif len(study.directions) in (2, 3):
        plots.insert(
            0, ("pareto_front.png", lambda: vm.plot_pareto_front(study, target_names=list(objectives)), 1)
        )
    done: dict[str, str] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        level = optuna.logging.get_verbosity()
        optuna.logging.set_verbosity(optuna.logging.ERROR)
        try:
            for name, make, need in plots:
                if len(complete) < need:
                    done[name] = f"skipped: needs {need} complete trial(s), has {len(complete)}"
                    continue
                if name == "intermediate_values.png" and not any(t.intermediate_values for t in trials):
                    done[name] = "skipped: no intermediate values reported"
                    continue
                if name in ("param_importances.png", "parallel_coordinate.png") and not any(
                    t.params for t in complete
                ):
                    done[name] = "skipped: no searched parameters"
                    continue
                try:
                    ax = make()
                    fig = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
                    fig.set_size_inches(max(fig.get_size_inches()[0], 9), max(fig.get_size_inches()[1], 5.5))
                    path = Path(sweep_dir) / name
                    tmp = path.with_name(f".{name}.{os.getpid()}.tmp")
                    fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
                    os.replace(tmp, path)
                    plt.close(fig)
                    done[name] = "ok"
                except Exception as err:  # too few distinct values, a single parameter, ...
                    done[name] = f"skipped: {type(err).__name__}: {err}"
                    plt.close("all")
        finally:
            optuna.logging.set_verbosity(level)
    return done


def summary_table(
    study: optuna.Study, trials: Sequence[optuna.trial.FrozenTrial], objectives: Sequence[str], top: int = 10
) -> str:
    from optuna.trial import TrialState

    c = counts(trials)
    lines = [
        f"study {study.study_name!r}: {c['complete']} complete, {c['pruned']} pruned, {c['failed']} failed"
        + (f", {c['running']} running" if c["running"] else "")
        + (f", {c['waiting']} queued" if c["waiting"] else "")
        + (f" (+{c['retried']} interrupted and retried)" if c["retried"] else "")
        + (f" (+{c['duplicates']} repeated parameter sets, not run)" if c["duplicates"] else "")
    ]
    scored = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED) and t.values]
    if scored:
        multi = len(study.directions) > 1
        sign = 1 if (not multi and study.direction.name == "MAXIMIZE") else -1
        if multi:
            front = {t.number for t in study.best_trials}
            scored.sort(key=lambda t: (t.number not in front, t.number))
        else:
            scored.sort(key=lambda t: (t.state != TrialState.COMPLETE, -sign * t.values[0]))
        obj_w = max(12, *(len(o) for o in objectives))
        head = (
            f"  {'#':>4}  {'state':<8}  "
            + "  ".join(f"{o:>{obj_w}}" for o in objectives)
            + f"  {'time':>7}  params"
        )
        lines += [head]
        for t in scored[:top]:
            seconds = trial_seconds(t)
            vals = "  ".join(f"{v:>{obj_w}.4f}" for v in t.values)
            if len(t.values) < len(objectives):
                vals += "  " * (len(objectives) - len(t.values))
            tm = f"{seconds:6.1f}s" if seconds is not None else "      -"
            lines.append(f"  {t.number:>4}  {t.state.name:<8}  {vals}  {tm}  {params_text(t.params)}")
    fails = [t for t in trials if t.state == TrialState.FAIL and counts_toward_budget(t)]
    for t in fails[:10]:
        lines.append(
            f"  trial {t.number} FAIL [{t.user_attrs.get(FAIL_REASON, 'error')}]: "
            f"{str(t.user_attrs.get(ERROR, ''))[:200]}  ({t.user_attrs.get(JOB_DIR, '')})"
        )
    best = _best(study, trials)
    if best is not None and not isinstance(best, list):
        lines.append(
            f"best: trial {best.number}, {objectives[0]} {best.values[0]:.4f}: "
            + " ".join(task_overrides(best.user_attrs.get(OVERRIDES) or []))
        )
    return "\n".join(lines)


def finish(study: optuna.Study, sweep: Any, wall: float) -> dict[str, int]:
    """At the end of a sweep process: results files, plots, the summary table, the W&B sweep summary hook."""
    s = sweep.s
    sweep_dir = Path(s.sweep_dir)
    trials = study.get_trials(deepcopy=False)
    try:
        write_results(study, sweep_dir, s.objectives, s.storage, trials=trials)
    except Exception as err:
        log.warning("could not write the results: %s", err)
    if s.plots and trials:
        try:
            made = write_plots(study, sweep_dir, s.objectives)
            ok = [n for n, v in made.items() if v == "ok"]
            skipped = {n: v for n, v in made.items() if v != "ok"}
            sweep.out.say(
                f"plots: {', '.join(ok) or 'none'}" + (f" (skipped {', '.join(skipped)})" if skipped else "")
            )
            for n, why in skipped.items():
                log.debug("%s %s", n, why)
        except Exception as err:
            log.warning("could not draw the plots: %s", err)
    sweep.out.say(summary_table(study, trials, s.objectives))
    busy = sweep.busy_s
    n_slots = len(sweep.slots)
    util = busy / (n_slots * wall) if wall > 0 else 0.0
    mine = [t for t in trials if t.number in set(sweep.launched)]
    work = sum(float(t.user_attrs.get("metrics", {}).get("duration_s", 0.0)) for t in mine)
    overhead = f", {(wall * n_slots - work) / len(mine):.1f}s overhead per trial" if mine and work else ""
    sweep.out.say(
        f"this sweep process: {len(sweep.launched)} trial(s) in {wall:.1f}s on {n_slots} slot(s), "
        f"slot utilisation {util:.0%}{overhead}; results in {sweep_dir}/optimization_results.yaml, trials.csv"
    )
    if s.wandb_summary:
        _wandb_summary(study, sweep_dir, s)
    return counts(trials)


def _wandb_summary(study: optuna.Study, sweep_dir: Path, s: Any) -> None:
    """Call cifarlab.loggers.log_sweep_summary when it exists (the W&B helper); never fail the sweep."""
    cfg = s.logger_cfg
    if not isinstance(cfg, dict):  # the task has no logger config (e.g. a plain Hydra app): nothing to log to
        return
    if cfg.get("name", "wandb") != "wandb" or cfg.get("mode") == "disabled":
        return  # nothing to log to (and importing the loggers would cost seconds)
    try:
        import cifarlab.loggers as loggers
    except Exception:
        return
    fn = getattr(loggers, "log_sweep_summary", None)
    if fn is None:
        return
    try:
        fn(study=study, sweep_dir=Path(sweep_dir), group=s.study_name, logger_cfg=s.logger_cfg)
    except Exception as err:
        log.warning("log_sweep_summary failed: %s: %s", type(err).__name__, err)


def summarise_study(settings: Any, returns: Sequence[Any] = ()) -> dict[str, int]:
    """After launcher workers (``hydra.sweeper.workers``): their outcomes, then the study's results and plots."""
    import optuna

    from cifarlab.sweeper.study import make_storage, open_study

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    out = Console(Path(settings.sweep_dir) / "sweep.log", quiet=settings.quiet)
    for i, ret in enumerate(returns):
        status = getattr(getattr(ret, "status", None), "name", "?")
        if status == "COMPLETED":
            out.say(f"worker {i}: {ret.return_value}")
        else:
            out.say(f"worker {i}: {status}: {getattr(ret, '_return_value', '')}")
    study = open_study(
        settings.storage, settings.study_name, settings.directions, storage=make_storage(settings.storage)
    )
    trials = study.get_trials(deepcopy=False)
    write_results(study, Path(settings.sweep_dir), settings.objectives, settings.storage, trials=trials)
    if settings.plots and trials:
        made = write_plots(study, Path(settings.sweep_dir), settings.objectives)
        out.say("plots: " + (", ".join(n for n, v in made.items() if v == "ok") or "none"))
    out.say(summary_table(study, trials, settings.objectives))
    if settings.wandb_summary:
        _wandb_summary(study, Path(settings.sweep_dir), settings)
    return counts(trials)
