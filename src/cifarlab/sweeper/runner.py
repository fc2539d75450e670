"""The asynchronous sweep loop: ask Optuna for a trial whenever a device slot is free, start it, tell Optuna its
outcome when it exits. No batch barrier: a new trial starts as soon as any slot frees. Orchestration only:

- a trial runs the task with ``<overrides> hydra.run.dir=<sweep_dir>/trial_<number>`` in its own process (group),
  with the slot's ``CUDA_VISIBLE_DEVICES``/``OMP_NUM_THREADS`` and the ``CIFARLAB_OPTUNA_*`` variables that let it
  report to its trial (:mod:`cifarlab.sweeper.trial`); it starts warm, forked from a server that has imported the
  task's libraries (:mod:`cifarlab.sweeper.launch_fork`), or cold, as ``task_command``
  (:mod:`cifarlab.sweeper.launch_subprocess`);
- its outcome is read from its folder (:mod:`cifarlab.sweeper.outcome`): ``metrics.json``, the task function's
  return value (``trial_result.json``), or its exit code and the end of ``trial.log``.

:func:`run_sweep` is the whole of one sweep process; several of them (here, on other machines, or as Hydra
launcher jobs: ``hydra.sweeper.workers``) cooperate on one study through its storage.
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import logging
import math
import os
import re
import signal
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cifarlab.sweeper.launch_subprocess import SubprocessLauncher, signal_group, trial_env
from cifarlab.sweeper.outcome import finite as _finite
from cifarlab.sweeper.outcome import log_error, read_outcome
from cifarlab.sweeper.settings import SweepError, SweepSettings
from cifarlab.sweeper.slots import Slot, SlotPool, plan_slots
from cifarlab.sweeper.space import build_space, value_text
from cifarlab.sweeper.study import (
    ERROR,
    FAIL_REASON,
    INFRA_REASONS,
    JOB_DIR,
    METRICS,
    OVERRIDES,
    OWNER,
    SLOT,
    Dedupe,
    Owner,
    budget_used,
    fail_trial,
    heartbeat,
    live_workers,
    make_storage,
    open_study,
    rank_in_budget,
    recover_stale,
    redact,
    resume_seed,
)

log = logging.getLogger("cifarlab.sweeper")


@dataclass
class Running:
    number: int
    trial_id: int
    slot: Slot
    job_dir: Path
    proc: Any  # subprocess.Popen or launch_fork.ForkedTrial: pid, poll(), wait(), send_signal()
    started: float
    killed_by_us: bool = False
    timed_out: bool = False


@dataclass
class SweepReport:
    study_name: str
    storage: str
    sweep_dir: str
    counts: dict[str, int]
    launched: list[int]
    stopped: str | None  # None | "interrupted" | "failures"
    wall_s: float
    busy_s: float
    n_slots: int

    @property
    def utilisation(self) -> float:
        return self.busy_s / (self.n_slots * self.wall_s) if self.wall_s > 0 else 0.0


# ---- helpers ----------------------------------------------------------------------------------------------


def instantiate_target(config: Mapping[str, Any], what: str = "object", warn: bool = True) -> Any:
    """``{"_target_": "pkg.Class", **kwargs}`` → ``pkg.Class(**kwargs)``; keys the class does not take are dropped
    with a warning (so that switching ``_target_`` on top of a group default does not fail on its leftovers;
    ``warn=False`` where the sweep process has said so already)."""
    from hydra.utils import get_object

    cfg = {k: v for k, v in dict(config).items() if k not in ("_partial_", "_recursive_", "_convert_")}
    target = cfg.pop("_target_", None)
    if not target:
        raise SweepError(f"{what}: no _target_ in {dict(config)}")
    try:
        cls = get_object(str(target))
    except Exception as err:
        raise SweepError(f"{what}: cannot import {target}: {err}") from None
    try:
        sig = inspect.signature(cls)
        accepted = (
            None if any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values()) else set(sig.parameters)
        )
    except (TypeError, ValueError):
        accepted = None
    if accepted is not None:
        dropped = sorted(k for k in cfg if k not in accepted)
        if dropped and warn:
            log.warning("%s %s does not take %s; ignored", what, target, ", ".join(dropped))
        cfg = {k: v for k, v in cfg.items() if k in accepted}
    return cls(**cfg)


def _dir_names(sweep_dir: Path, number: int) -> Iterator[Path]:
    """The job folders trial ``number`` may get, in the order :func:`claim_dir` tries them."""
    base = f"trial_{number:04d}"
    for k in range(1000):
        yield sweep_dir / (base if k == 0 else f"{base}-{k}")


def claim_dir(sweep_dir: Path, number: int) -> Path:
    """Create a fresh job folder for trial ``number``: ``trial_0007`` (``trial_0007-1`` if that exists, ...)."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    for path in _dir_names(sweep_dir, number):
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise SweepError(f"cannot create a job folder for trial {number} in {sweep_dir}")


def unrecorded_dir(sweep_dir: Path, number: int) -> Path | None:
    """The folder :func:`claim_dir` made last for trial ``number`` when it is still empty: a sweep process killed
    between making it and recording it in the trial left it so (a launched trial's folder holds its log)."""
    last = None
    for path in _dir_names(sweep_dir, number):
        if not path.is_dir():
            break
        last = path
    return last if last is not None and not any(last.iterdir()) else None


# ---- the sweep --------------------------------------------------------------------------------------------


# (search space, the overrides every trial gets) → raises SearchSpaceError: cifarlab.sweeper.precheck
Precheck = Callable[[Any, list[str]], None]


class Sweep:
    def __init__(
        self, settings: SweepSettings, slots: list[Slot] | None = None, precheck: Precheck | None = None
    ) -> None:
        self.s = settings
        self.t0 = time.time()  # the sweep's wall clock starts here
        self.precheck = precheck
        self.launcher = _launcher(settings)
        self.launcher.start()  # a warm launcher's server imports while this process sets up the sweep
        self.sweep_dir = Path(settings.sweep_dir)
        self.packing = ""  # what trials_per_gpu=auto chose, and why
        self.slots = SlotPool(slots or self._plan_slots())
        self.space, self.base_overrides = build_space(
            settings.params, settings.arguments, settings.conditional, settings.context
        )
        self.n_trials = int(settings.n_trials)
        self.running: dict[int, Running] = {}
        self.launched: list[int] = []
        self.failed_here = 0
        self.stop_reason: str | None = None
        self.busy_s = 0.0
        self.me = Owner.me()
        self._signals = 0
        self._custom = None
        if settings.custom_search_space:
            from hydra.utils import get_method

            try:
                self._custom = get_method(settings.custom_search_space)
            except Exception as err:
                raise SweepError(
                    f"hydra.sweeper.custom_search_space={settings.custom_search_space!r}: cannot import it: {err}"
                ) from None
        from cifarlab.sweeper.results import Console

        self.out = Console(self.sweep_dir / "sweep.log", quiet=settings.quiet)
        seed = (settings.sampler or {}).get("seed")
        self.dedupe = Dedupe(None if self._custom else self.space, self.out.say, seed)

    # -- set-up ------------------------------------------------------------------------------------------

    def _plan_slots(self) -> list[Slot]:
        s = self.s
        per_gpu = s.trials_per_gpu
        if per_gpu == "auto":
            from cifarlab.sweeper.slots import auto_trials_per_gpu

            per_gpu, self.packing = auto_trials_per_gpu(s.devices, s.gpus_per_trial, s.trial_memory_gb)
        return plan_slots(
            s.devices, s.n_jobs, per_gpu, s.gpus_per_trial, threads_per_trial=s.threads_per_trial
        )

    def _warm_data_cache(self) -> None:
        """Decode the task's dataset into its cache once, before any trial would (``cifarlab.datacache``)."""
        data = self.s.data_config
        if (
            not data
            or data.get("name") == "synthetic"
            or importlib.util.find_spec("cifarlab.datacache") is None
        ):
            return  # synthetic data is generated, not decoded
        started = time.time()
        error = self.launcher.call("cifarlab.datacache:warm_cache", self.s.data_config)
        if error:  # the trials then decode (and report any error) themselves
            self.out.say(f"  data cache not warmed: {error}")
        elif time.time() - started > 1:
            self.out.say(f"  data cache warmed in {time.time() - started:.1f}s")

    def _share_wandb_service(self) -> Any:
        """Start W&B's service once here; the trials find it through WANDB_SERVICE in their environment and attach
        to it instead of starting their own (about 1 s of each warm trial of the course CNN, on a 2-core AMD EPYC).
        Returns the wandb module to tear it down with, or None."""
        cfg = self.s.logger_cfg
        if not isinstance(cfg, dict) or cfg.get("name") != "wandb" or cfg.get("mode") == "disabled":
            return None
        if os.environ.get("WANDB_MODE") == "disabled" or os.environ.get("WANDB_SERVICE"):
            return None
        try:
            import wandb

            wandb.setup()
        except Exception as err:  # the trials then start their own
            log.debug("no shared W&B service: %s", err)
            return None
        return wandb if os.environ.get("WANDB_SERVICE") else None

    def _sampler(self, others_alive: bool, n_existing: int = 0) -> Any:
        cfg = dict(self.s.sampler or {"_target_": "optuna.samplers.TPESampler"})
        target = str(cfg.get("_target_", ""))
        if target.endswith("GridSampler"):
            grid = self.space.grid()
            cfg["search_space"] = grid
            size = math.prod(len(v) for v in grid.values()) if grid else 1
            if size < self.n_trials:
                self.out.say(f"grid sampler: {size} grid points, so n_trials {self.n_trials} → {size}")
                self.n_trials = size
        if target.endswith("CmaEsSampler"):
            try:
                import cmaes  # noqa: F401
            except ImportError:
                raise SweepError("the cmaes sampler needs the `cmaes` package: pip install cmaes") from None
        if cfg.get("seed") is not None:  # resumed: its own seed, not a replay of the first process's samples
            cfg["seed"] = resume_seed(int(cfg["seed"]), n_existing)
        if others_alive and cfg.get("seed") is not None:
            # another sweep process shares the study: the same seed would propose the same parameters
            cfg["seed"] = (int(cfg["seed"]) + os.getpid()) % (2**31)
        return instantiate_target(cfg, "sampler")

    def _pruner(self) -> Any:
        from cifarlab.sweeper.trial import instantiate_pruner

        return instantiate_pruner(self.s.pruner if self.s.monitor else None)

    # -- main loop -----------------------------------------------------------------------------------------

    def run(self) -> SweepReport:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
        # an enqueued number outside its interval: _enqueued has said so in one line
        warnings.filterwarnings("ignore", message="Fixed parameter .* is out of range", category=UserWarning)
        t0 = self.t0
        try:
            # values Optuna cannot store raise here, not at that trial's first suggest; list choices become their text
            self.s.enqueue_trials = [
                self._enqueued(dict(params), f"hydra.sweeper.enqueue_trials[{i}]")
                for i, params in enumerate(self.s.enqueue_trials)
            ]
            if self.precheck is not None:  # while the warm server imports (cifarlab.sweeper.precheck)
                self.precheck(self.space, self.base_overrides)
        except BaseException:
            self.launcher.close()
            raise
        # here, so that a folder that cannot be made is named as hydra.sweep.dir (cifarlab.cli), not as the storage
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        storage = make_storage(self.s.storage)
        study = open_study(self.s.storage, self.s.study_name, self.s.directions, storage=storage)
        self._check_space(study)
        heartbeat(study, self.me, len(self.slots), t0)
        others = [w for w in live_workers(study, self.s.stale_after) if w != str(self.me)]
        study.sampler = self._sampler(bool(others), len(study.get_trials(deepcopy=False)))
        study.pruner = self._pruner()
        names = set(self.space.names())
        for params in self.s.enqueue_trials:
            unknown = sorted(set(params) - names)
            if unknown:
                self.out.say(
                    f"warning: enqueue_trials: {unknown} are not searched parameters and are ignored"
                )
            study.enqueue_trial(dict(params), skip_if_exists=True)
        recovered = recover_stale(
            study, self.me, self.s.stale_after, self.s.max_retries, self._recover_finished
        )
        self._header(study, recovered, others)
        self._warm_data_cache()
        wandb_service = self._share_wandb_service()

        previous = self._install_signals()
        last_beat = last_stale = time.time()
        check_budget = True
        exhausted = False
        try:
            while True:
                if self._reap(study):
                    check_budget = True
                if self.stop_reason:
                    break
                now = time.time()
                if now - last_beat > self.s.heartbeat_interval:
                    heartbeat(study, self.me, len(self.slots), t0)
                    last_beat = now
                if now - last_stale > min(60.0, self.s.stale_after / 2):
                    if recover_stale(
                        study, self.me, self.s.stale_after, self.s.max_retries, self._recover_finished
                    ):
                        check_budget = True
                    last_stale = now
                    check_budget = check_budget or exhausted
                can_launch = self.slots.n_free > 0 and not (self.s.sync_batches and self.running)
                if can_launch and check_budget:
                    check_budget = False
                    exhausted = False
                    while self.slots.n_free > 0:
                        if not self._launch(study):
                            exhausted = True
                            break
                if exhausted and not self.running:
                    break
                time.sleep(self.s.poll_interval)
        finally:
            try:
                self._stop_all(study)
            finally:
                self._restore_signals(previous)
                self.launcher.close()
                wall = time.time() - t0
                report = self._finish_sweep(study, wall)
                if wandb_service:
                    with contextlib.suppress(Exception):
                        wandb_service.teardown()
        return report

    def _enqueued(self, params: dict[str, Any], where: str) -> dict[str, Any]:
        params = self.space.choice_values(params)
        for warning in self.space.check_values(params, where):
            self.out.say(f"warning: {warning}")
        return params

    def _check_space(self, study: Any) -> None:
        """A resumed study whose parameters changed in a way Optuna cannot store (a choice's options, a log scale,
        the kind of a parameter) stops here, with one line, instead of with a traceback at its first ask."""
        from optuna.distributions import check_distribution_compatibility

        wanted = self.space.distributions()
        stored: dict[str, Any] = {}
        for t in study.get_trials(deepcopy=False):
            for name, dist in t.distributions.items():
                stored.setdefault(name, dist)
        for name, dist in wanted.items():
            if name not in stored:
                continue
            try:
                check_distribution_compatibility(stored[name], dist)
            except ValueError:
                raise SweepError(
                    f"{name}: was {_describe(stored[name])} in the trials of study {self.s.study_name!r} "
                    f"({redact(self.s.storage)}), is {_describe(dist)} now; a study keeps a parameter's kind, "
                    "log scale and choices: keep them, or start a new study (hydra.sweeper.study_name=<new name>)"
                ) from None

    def _header(self, study: Any, recovered: list[int], others: list[str]) -> None:
        used = budget_used(study.get_trials(deepcopy=False))
        slots = ", ".join(s.name for s in self.slots.slots)
        self.out.say(f"optuna study {self.s.study_name!r} in {redact(self.s.storage)}")
        self.out.say(
            f"  {used}/{self.n_trials} trials already counted; sampler {type(study.sampler).__name__}, "
            f"pruner {type(study.pruner).__name__}; objective(s) {', '.join(self.s.objectives)} "
            f"({', '.join(self.s.directions)})"
        )
        self.out.say(f"  {len(self.slots)} slot(s): {slots}; trials in {self.sweep_dir}/trial_<number>")
        if self.packing and any(slot.kind == "gpu" for slot in self.slots.slots):
            self.out.say(f"  trials_per_gpu=auto: {self.packing}")
        how = "warm (forked from a preloaded server)" if self.launcher.name == "fork" else "as subprocesses"
        note = f" ({self.s.launch_note})" if self.s.launch_note else ""
        self.out.say(f"  trials start {how}{note}")
        if others:
            self.out.say(f"  sharing the study with {len(others)} other live sweep process(es)")
        if recovered:
            self.out.say(
                f"  trials {recovered} were left running by a dead sweep process: recorded from their folders "
                "when they had finished, else marked FAIL and their parameters queued again"
            )

    # -- launching ---------------------------------------------------------------------------------------------

    def _launch(self, study: Any) -> bool:
        """Start one trial in a free slot; False when the n_trials budget is used up."""
        from optuna.trial import TrialState

        if budget_used(study.get_trials(deepcopy=False)) >= self.n_trials or self.dedupe.exhausted(study):
            return False
        trial = study.ask(self.space.params)
        if rank_in_budget(study.get_trials(deepcopy=False), trial.number) > self.n_trials:
            # another sweep process took the last place meanwhile
            trial.set_user_attr(FAIL_REASON, "surplus")
            trial.set_user_attr(ERROR, "another sweep process used the last place in n_trials")
            study.tell(trial, state=TrialState.FAIL)
            return False
        try:
            params = self.space.suggest_conditional(trial)
            if self._custom is not None:
                self._custom(self.s.sweep_config, trial)
                params = dict(trial.params)
        except Exception as err:
            fail_trial(study, trial.number, "search_space", f"{type(err).__name__}: {err}")
            raise SweepError(f"cannot sample trial {trial.number}: {type(err).__name__}: {err}") from err
        if self.dedupe.reject(study, trial):  # parameters the study already has: not run, sample again
            return self._launch(study)

        slot = self.slots.acquire(trial.number)
        assert slot is not None
        job_dir = claim_dir(self.sweep_dir, trial.number)
        overrides = self.base_overrides + self.space.overrides(params) + self._trial_overrides(trial.number)
        overrides += [f"hydra.run.dir={value_text(str(job_dir))}"]
        trial.set_user_attr(OWNER, str(self.me))
        trial.set_user_attr(JOB_DIR, str(job_dir))
        trial.set_user_attr(SLOT, slot.name)
        trial.set_user_attr(OVERRIDES, overrides)
        env = trial_env(
            os.environ,
            slot.env(),
            self.s.extra_env,
            self.s.storage,
            self.s.study_name,
            trial._trial_id,
            trial.number,
            self.s.monitor,
            self.s.pruner,
        )
        try:
            proc = self.launcher.launch(overrides, env, job_dir / "trial.log", slot.threads)
        except OSError as err:
            self.slots.release(slot, trial.number)
            fail_trial(study, trial.number, "launch", f"cannot start the trial ({self.launcher.name}): {err}")
            raise SweepError(f"cannot start trial {trial.number} ({self.launcher.name}): {err}") from err
        self.running[trial.number] = Running(trial.number, trial._trial_id, slot, job_dir, proc, time.time())
        self.launched.append(trial.number)
        return True

    def _trial_overrides(self, number: int) -> list[str]:
        keys = {o.lstrip("+~").split("=", 1)[0] for o in self.base_overrides} | set(self.space.names())
        keys |= set(self.space.fixed)
        out = []
        if self.s.set_logger_group and "logger.group" not in keys:
            out.append(f"logger.group={value_text(self.s.study_name)}")
        if self.s.set_run_name and "run_name" not in keys:
            out.append(f"run_name={value_text(f'{self.s.study_name}-{number:04d}')}")
        return out + ["hydra.mode=RUN"] + list(self.s.child_overrides)

    # -- reaping ---------------------------------------------------------------------------------------------------

    def _reap(self, study: Any) -> bool:
        """Tell Optuna about every trial process that has exited; True if any did."""
        done = False
        now = time.time()
        for _number, run in list(self.running.items()):
            rc = run.proc.poll()
            if rc is None:
                if self.s.trial_timeout and not run.timed_out and now - run.started > self.s.trial_timeout:
                    run.timed_out = True
                    signal_group(run.proc, signal.SIGKILL)
                continue
            self._finish_trial(study, run, rc)
            done = True
        return done

    def _finish_trial(self, study: Any, run: Running, rc: int) -> None:
        duration = time.time() - run.started
        self.busy_s += duration
        metrics = self._outcome(run.job_dir)
        trial = _trial_handle(study, run.trial_id)
        attrs: dict[str, Any] = {"exit_code": rc, "wall_s": round(duration, 3)}
        if metrics:
            attrs[METRICS] = {k: v for k, v in metrics.items() if _finite(v)}
        reason = None
        try:
            handled, reason = self._record(study, run.number, trial, metrics, attrs)  # completed / pruned
            if handled:
                pass
            elif run.killed_by_us and not run.timed_out:  # stopped by us: not the trial's fault, run it again
                reason = "interrupted"
                fail_trial(
                    study,
                    run.number,
                    "interrupted",
                    "stopped by the sweep (Ctrl-C, SIGTERM or too many "
                    "failures); its parameters are queued again",
                    retry=True,
                    max_retries=self.s.max_retries,
                    extra=attrs,
                )
            elif run.timed_out:
                reason = self._fail(
                    study, run, "timeout", f"ran longer than trial_timeout={self.s.trial_timeout}s", attrs
                )
            else:
                error = (metrics or {}).get("error") or log_error(run.job_dir / "trial.log", rc)
                if metrics and metrics.get("error") and rc != 0:
                    error = f"{error} (exit code {rc})"
                diverged = "FloatingPointError" in error or re.search(r"\bnan\b", error, re.IGNORECASE)
                kind = "nan" if diverged else ("killed" if rc < 0 else "error")
                reason = self._fail(study, run, kind, error, attrs)
        finally:
            self.slots.release(run.slot, run.number)
            del self.running[run.number]
        if reason is not None and reason not in INFRA_REASONS:
            self.failed_here += 1
            allowed = self.s.max_failure_rate * self.n_trials
            if self.failed_here > allowed and not self.stop_reason:
                self.stop_reason = "failures"
                self.out.say(
                    f"stopping: {self.failed_here} trials failed in this sweep, more than max_failure_rate "
                    f"{self.s.max_failure_rate} × n_trials {self.n_trials} = {allowed:g}"
                )
        from cifarlab.sweeper.results import progress_line, write_results

        trials = study.get_trials(deepcopy=False)
        frozen = next((t for t in trials if t.number == run.number), None)
        if frozen is not None:
            self.out.say(
                progress_line(study, frozen, trials, self.n_trials, len(self.running), self.s.objectives)
            )
        try:
            write_results(study, self.sweep_dir, self.s.objectives, self.s.storage, trials=trials)
        except Exception as err:  # a results file must never take the sweep down
            log.warning("could not write the results: %s", err)

    def _record(
        self, study: Any, number: int, trial: Any, metrics: dict[str, Any] | None, attrs: dict[str, Any]
    ) -> tuple[bool, str | None]:
        """Tell a completed or pruned trial from its metrics.json; (handled, failure reason or None)."""
        from optuna.trial import TrialState

        status = metrics.get("status") if metrics else None
        if status == "completed":
            values = [metrics.get(o) for o in self.s.objectives]
            bad = [o for o, v in zip(self.s.objectives, values, strict=True) if not _finite(v)]
            if bad:
                missing = [o for o in bad if o not in metrics]
                if missing:
                    kind = "missing_metric"
                    have = ", ".join(sorted(k for k, v in metrics.items() if _finite(v)))
                    error = (
                        f"objective {', '.join(missing)} is not in metrics.json (it has: {have or 'nothing'})"
                    )
                else:
                    kind = "nan"
                    got = ", ".join(f"{o}={metrics.get(o)!r}" for o in bad)
                    error = f"objective not a finite number: {got}"
                fail_trial(study, number, kind, error, extra=attrs)
                return True, kind
            self._set_attrs(trial, attrs)
            self._tell(study, number, values=[float(v) for v in values])
            return True, None
        if status == "pruned":
            self._set_attrs(trial, attrs)
            self._tell(study, number, state=TrialState.PRUNED)
            return True, None
        return False, None

    def _recover_finished(self, study: Any, frozen: Any) -> bool:
        """A trial of a dead sweep process that finished anyway (its metrics.json says so) is recorded as such
        instead of being re-run. True when recorded (here or by another process). One killed before it named its
        folder gets that folder as its job_dir (it did not finish: False)."""
        job_dir = frozen.user_attrs.get(JOB_DIR)
        if not job_dir:  # killed before it recorded its folder: the folder is the trial's all the same
            orphan = unrecorded_dir(self.sweep_dir, frozen.number)
            if orphan is not None:
                with contextlib.suppress(ValueError, RuntimeError):  # finished by another process meanwhile
                    study._storage.set_trial_user_attr(frozen._trial_id, JOB_DIR, str(orphan))
            return False
        metrics = self._outcome(Path(job_dir))
        if not metrics or metrics.get("status") not in ("completed", "pruned", "failed"):
            return False
        attrs: dict[str, Any] = {METRICS: {k: v for k, v in metrics.items() if _finite(v)}, "recovered": True}
        try:
            if metrics["status"] == "failed":
                error = str(metrics.get("error") or "failed")
                kind = "nan" if "FloatingPointError" in error else "error"
                fail_trial(study, frozen.number, kind, error, extra=attrs)
            else:
                self._record(study, frozen.number, _trial_handle(study, frozen._trial_id), metrics, attrs)
        except (ValueError, RuntimeError):  # finished by another process meanwhile
            pass
        return True

    def _outcome(self, job_dir: Path) -> dict[str, Any] | None:
        return read_outcome(job_dir, self.s.objectives, self.s.objective_source == "return")

    def _fail(self, study: Any, run: Running, reason: str, error: str, attrs: dict[str, Any]) -> str:
        fail_trial(study, run.number, reason, error, retry=False, extra=attrs)
        return reason

    @staticmethod
    def _set_attrs(trial: Any, attrs: dict[str, Any]) -> None:
        for key, value in attrs.items():
            trial.set_user_attr(key, value)

    @staticmethod
    def _tell(study: Any, number: int, values: list[float] | None = None, state: Any = None) -> None:
        try:
            study.tell(number, values, state=state)
        except RuntimeError as err:  # GridSampler stops the study when the grid is done: not an error here
            if "Study.stop" not in str(err):
                raise

    # -- stopping -------------------------------------------------------------------------------------------

    def _install_signals(self) -> dict[int, Any]:
        previous: dict[int, Any] = {}

        def handler(signum: int, frame: Any) -> None:
            self._signals += 1
            if self._signals > 1:
                raise KeyboardInterrupt
            self.stop_reason = self.stop_reason or "interrupted"
            name = signal.Signals(signum).name
            self.out.say(
                f"{name}: stopping {len(self.running)} running trial(s); their parameters are queued again "
                "(press Ctrl-C again to kill at once)"
            )

        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread: no signal handling
                previous[sig] = signal.signal(sig, handler)
        return previous

    @staticmethod
    def _restore_signals(previous: dict[int, Any]) -> None:
        for sig, old in previous.items():
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(sig, old)

    def _stop_all(self, study: Any) -> None:
        """Terminate running trials (SIGTERM, then SIGKILL after kill_grace) and record them."""
        if not self.running:
            return
        if self.stop_reason is None:
            self.stop_reason = "interrupted"
        for run in self.running.values():
            run.killed_by_us = True
            signal_group(run.proc, signal.SIGTERM)
        # Wait for them all before recording any: recorded in the order they started, their parameters are
        # queued again in that order, whichever process happens to exit first.
        deadline = time.time() + self.s.kill_grace
        try:
            while time.time() < deadline and any(r.proc.poll() is None for r in self.running.values()):
                time.sleep(0.1)
        except KeyboardInterrupt:
            pass
        for run in list(self.running.values()):
            if run.proc.poll() is None:
                signal_group(run.proc, signal.SIGKILL)
                with contextlib.suppress(Exception):
                    run.proc.wait(timeout=10)
        while self.running:
            before = len(self.running)
            self._reap(study)
            if len(self.running) == before:
                for run in list(
                    self.running.values()
                ):  # unreapable: release and leave the trial to stale recovery
                    self.slots.release(run.slot, run.number)
                    del self.running[run.number]

    def _finish_sweep(self, study: Any, wall: float) -> SweepReport:
        from cifarlab.sweeper.results import finish

        counts = finish(study, self, wall)
        return SweepReport(
            self.s.study_name,
            self.s.storage,
            str(self.sweep_dir),
            counts,
            self.launched,
            self.stop_reason,
            wall,
            self.busy_s,
            len(self.slots),
        )


def _describe(dist: Any) -> str:
    """An Optuna distribution in the search-space syntax of the sweeper's ``params``."""
    from optuna.distributions import CategoricalDistribution

    if isinstance(dist, CategoricalDistribution):
        return "choice(" + ", ".join(value_text(c) for c in dist.choices) + ")"
    low, high, step = dist.low, dist.high, getattr(dist, "step", None)
    if step is not None and not (isinstance(low, int) and step == 1):
        return f"range({value_text(low)}, {value_text(high)}, {value_text(step)})"
    text = f"interval({value_text(low)}, {value_text(high)})"
    return f"tag(log, {text})" if dist.log else text


def _trial_handle(study: Any, trial_id: int) -> Any:
    import optuna

    return optuna.trial.Trial(study, trial_id)


def warm_preload(settings: SweepSettings) -> list[str]:
    """What the warm trials' fork server imports: ``hydra.sweeper.preload`` if set; else, for a Lightning-style
    task (it has a trainer), torch, Lightning and cifarlab, and W&B's lazy imports when the task logs to W&B."""
    from cifarlab.sweeper.launch_fork import DEFAULT_PRELOAD, WANDB_PRELOAD

    if settings.preload is not None:
        return list(settings.preload)
    if not settings.lightning_task:
        return []
    logger = settings.logger_cfg or {}
    wandb = logger.get("name") == "wandb" and logger.get("mode") != "disabled"
    return [*DEFAULT_PRELOAD, *(WANDB_PRELOAD if wandb else ())]


def _launcher(settings: SweepSettings) -> Any:
    if settings.launch == "fork":
        from cifarlab.sweeper.launch_fork import ForkLauncher

        return ForkLauncher(settings.warm_task, settings.task_cwd, warm_preload(settings))
    return SubprocessLauncher(settings.task_command, settings.task_cwd)


def run_sweep(
    settings: SweepSettings, slots: list[Slot] | None = None, precheck: Precheck | None = None
) -> SweepReport:
    """Run one sweep process to the end of the budget (or until stopped); raise SweepError on too many failures.
    ``precheck`` checks the search space before the study is opened (the sweeper plugin's, with Hydra's loader)."""
    report = Sweep(settings, slots, precheck).run()
    if report.stopped == "failures":
        raise SweepError(
            f"too many failed trials (max_failure_rate={settings.max_failure_rate}); the errors are in "
            f"{settings.sweep_dir}/trials.csv and trial_*/trial.log. Re-run the same command to resume."
        )
    if report.stopped == "interrupted":
        raise KeyboardInterrupt
    return report


def worker_main(settings: SweepSettings, cfg: Any = None) -> dict[str, Any]:
    """The task of a Hydra launcher job with ``hydra.sweeper.workers``: one sweep process on that node's devices."""
    report = run_sweep(settings)
    return {"counts": report.counts, "launched": report.launched, "utilisation": report.utilisation}
