"""Resume semantics of the Optuna sweeper, end to end: real ``python train.py -m`` sweep processes on a real journal
file, real trial processes, real SIGKILLs.

- A trial stopped because its sweep process died is an interruption, not a result: the same command afterwards
  re-runs its parameters and ends with exactly ``n_trials`` evaluated trials.
- A seeded study that is resumed or extended never re-evaluates a parameter set it already has, and the same
  command from scratch still gives the same parameters.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from conftest import sweep_env
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState

from cifarlab.sweeper.runner import unrecorded_dir
from cifarlab.sweeper.study import (
    DUPLICATE_OF,
    FAIL_REASON,
    JOB_DIR,
    OWNER,
    RETRIED,
    RETRY_OF,
    Dedupe,
    Owner,
    budget_used,
    fail_trial,
    heartbeat,
    make_storage,
    open_study,
    recover_stale,
    resume_seed,
    space_size,
)
from cifarlab.sweeper.trial import is_interruption

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
SLEEP_TASK = f"hydra.sweeper.task_command=[{PY},-m,cifarlab.sweeper.sleep_task]"
EVALUATED = (TrialState.COMPLETE, TrialState.PRUNED)
optuna.logging.set_verbosity(optuna.logging.WARNING)

# real (tiny) training trials: 12 epochs of ~0.5 s, so that they are surely killed in the middle of training
TRAINING = """\
# @package _global_
defaults:
  - synthetic_tiny
  - override /hydra/sweeper/pruner: none
  - _self_
data:
  train_size: 640
  val_size: 64
trainer:
  max_epochs: 12
  limit_train_batches: 10
hydra:
  sweeper:
    study_name: killed
    n_trials: 2
    n_jobs: 2
    plots: false
"""

SEEDED = """\
# @package _global_
defaults:
  - override /data: synthetic  # nothing to download or decode before the (stand-in) trials
  - override /hydra/sweeper: cifarlab_optuna
  - override /hydra/sweeper/sampler: random
  - override /hydra/sweeper/pruner: none
hydra:
  sweeper:
    study_name: seeded
    n_trials: 3
    n_jobs: 1
    monitor: none
    plots: false
    wandb_summary: false
    sampler:
      seed: 0
    params:
      x: interval(0.0, 1.0)
      sleep: 0.1
"""


def _cmd(tmp_path: Path, text: str, sweep_dir: Path, *overrides: str) -> list[str]:
    conf = tmp_path / "conf" / "hparams_search"
    conf.mkdir(parents=True, exist_ok=True)
    (conf / "under_test.yaml").write_text(text)
    return [
        PY,
        str(ROOT / "train.py"),
        "-m",
        f"--config-dir={tmp_path / 'conf'}",
        "hparams_search=under_test",
        f"hydra.sweep.dir={sweep_dir}",
        *overrides,
    ]


def _run(cmd: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    result = subprocess.run(
        cmd, cwd=tmp_path, env=sweep_env(tmp_path), capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def _trials(sweep_dir: Path, name: str) -> list[optuna.trial.FrozenTrial]:
    storage = make_storage(f"journal:{sweep_dir}/journal.log")
    return optuna.load_study(study_name=name, storage=storage).get_trials()


def _params(trials: list[optuna.trial.FrozenTrial]) -> list[tuple]:
    return [tuple(sorted(t.params.items())) for t in trials if t.state in EVALUATED]


# ---- a killed sweep: its trials are interruptions -----------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_trials_of_a_killed_sweep_are_run_again_to_exactly_n_trials(tmp_path):
    sweep = tmp_path / "sweep"
    cmd = _cmd(tmp_path, TRAINING, sweep)
    proc = subprocess.Popen(
        cmd,
        cwd=tmp_path,
        env=sweep_env(tmp_path),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    # kill the sweep once both trials are training (each has reported its first epoch)
    deadline = time.time() + 180
    while True:
        assert time.time() < deadline, "the trials did not start training in time"
        assert proc.poll() is None, "the sweep ended before it was killed"
        if (sweep / "journal.log").exists():
            running = [t for t in _trials(sweep, "killed") if t.state == TrialState.RUNNING]
            if len(running) == 2 and all(t.intermediate_values for t in running):
                break
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the sweep process only: its trials get SIGTERM (PR_SET_PDEATHSIG)
    proc.wait()
    killed = {t.number: t for t in running}
    folders = [Path(t.user_attrs[JOB_DIR]) for t in running]
    deadline = time.time() + 60
    while not all((f / "metrics.json").exists() for f in folders):
        assert time.time() < deadline, "the trials of the killed sweep did not stop"
        time.sleep(0.2)
    before = {f: (f / "metrics.json").read_text() for f in folders}
    for f in folders:  # the trials know they were interrupted, not failed
        assert '"status": "interrupted"' in before[f], before[f]

    result = _run(cmd, tmp_path)  # the same command
    trials = _trials(sweep, "killed")
    evaluated = [t for t in trials if t.state in EVALUATED]
    assert len(evaluated) == 2, [(t.number, t.state.name, t.user_attrs.get("error")) for t in trials]
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    for number, t in killed.items():  # each interrupted parameter set was evaluated again, once
        assert trials[number].state == TrialState.FAIL
        retries = [r for r in trials if r.user_attrs.get(RETRY_OF) == number]
        assert len(retries) == 1 and retries[0].state in EVALUATED and retries[0].params == t.params
    assert {f: (f / "metrics.json").read_text() for f in folders} == before  # nothing overwritten
    dirs = [t.user_attrs[JOB_DIR] for t in trials]
    assert len(set(dirs)) == len(dirs) == len(list(sweep.glob("trial_*")))
    assert "2 complete, 0 pruned, 0 failed" in result.stdout


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_folder_made_by_a_launch_the_kill_cut_short_is_its_trials(tmp_path):
    """A sweep process killed between making a trial's folder and recording it in the trial (seen once in CI: an
    interrupted trial without a job_dir, its empty folder nobody's). The next sweep process records the folder in
    the interrupted trial, runs its parameters again in a new one, and every folder is then exactly one trial's."""
    sweep = tmp_path / "sweep"
    _run(_cmd(tmp_path, SEEDED, sweep, SLEEP_TASK, "hydra.sweeper.n_trials=1"), tmp_path)
    study = optuna.load_study(study_name="seeded", storage=make_storage(f"journal:{sweep}/journal.log"))
    cut = study.ask({"x": FloatDistribution(0.0, 1.0)})  # the launch the kill cut short ...
    dead = subprocess.Popen(["true"])
    dead.wait()  # a pid that is gone: its sweep process died
    study._storage.set_trial_user_attr(cut._trial_id, OWNER, str(Owner(Owner.me().host, dead.pid, "")))
    (sweep / "trial_0001").mkdir()  # ... after claim_dir, before the trial named its folder

    result = _run(_cmd(tmp_path, SEEDED, sweep, SLEEP_TASK, "hydra.sweeper.n_trials=2"), tmp_path)
    trials = _trials(sweep, "seeded")
    assert trials[1].state == TrialState.FAIL and trials[1].user_attrs[FAIL_REASON] == "stale"
    assert trials[1].user_attrs[JOB_DIR] == str(sweep / "trial_0001")
    retry = [t for t in trials if t.user_attrs.get(RETRY_OF) == 1]
    assert len(retry) == 1 and retry[0].params == cut.params and retry[0].state == TrialState.COMPLETE
    dirs = [t.user_attrs[JOB_DIR] for t in trials]
    assert len(set(dirs)) == len(dirs) == len(list(sweep.glob("trial_*"))) == 3
    assert "trials [1] were left running by a dead sweep process" in result.stdout


def test_only_an_empty_last_claimed_folder_is_taken_for_an_unrecorded_trials(tmp_path):
    assert unrecorded_dir(tmp_path, 3) is None  # never made
    (tmp_path / "trial_0003").mkdir()
    assert unrecorded_dir(tmp_path, 3) == tmp_path / "trial_0003"
    (tmp_path / "trial_0003" / "trial.log").write_text("launched")  # a launched trial's: not this one's
    assert unrecorded_dir(tmp_path, 3) is None
    (tmp_path / "trial_0003-1").mkdir()  # claim_dir's next name for the same number (another study's folder)
    assert unrecorded_dir(tmp_path, 3) == tmp_path / "trial_0003-1"


# ---- seeded studies: reproducible, never a parameter set twice -------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("sampler", ["random", "tpe"])
def test_an_extended_seeded_study_never_repeats_a_parameter_set(tmp_path, sampler):
    text = SEEDED.replace("sampler: random", f"sampler: {sampler}")
    first, fresh = tmp_path / "first", tmp_path / "fresh"
    _run(_cmd(tmp_path, text, first, SLEEP_TASK), tmp_path)
    _run(
        _cmd(tmp_path, text, first, SLEEP_TASK, "hydra.sweeper.n_trials=6"), tmp_path
    )  # extend: a new process
    extended = _params(_trials(first, "seeded"))
    assert len(extended) == 6 and len(set(extended)) == 6, extended

    _run(
        _cmd(tmp_path, text, fresh, SLEEP_TASK), tmp_path
    )  # the same command from scratch: the same parameters
    assert _params(_trials(fresh, "seeded")) == extended[:3]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_an_exhausted_space_stops_with_a_message(tmp_path):
    text = SEEDED.replace("interval(0.0, 1.0)", "choice(0.1, 0.2, 0.3)")
    sweep = tmp_path / "sweep"
    result = _run(_cmd(tmp_path, text, sweep, SLEEP_TASK, "hydra.sweeper.n_trials=5"), tmp_path)
    trials = _trials(sweep, "seeded")
    assert sorted(_params(trials)) == [(("x", x),) for x in (0.1, 0.2, 0.3)]
    assert "search space exhausted" in result.stdout
    assert budget_used(trials) == 3  # the rejected duplicates do not count toward n_trials


# ---- the pieces, on a real journal study -------------------------------------------------------------------------


def _study(tmp_path: Path, sampler: optuna.samplers.BaseSampler | None = None) -> optuna.Study:
    spec = f"journal:{tmp_path}/journal.log"
    return open_study(spec, "s", ["maximize"], sampler=sampler, storage=make_storage(spec))


def test_resume_seed_is_the_seed_on_a_new_study_and_differs_after_each_trial():
    assert resume_seed(0, 0) == 0 and resume_seed(7, 0) == 7
    seeds = {resume_seed(0, n) for n in range(1, 200)} | {resume_seed(1, n) for n in range(1, 200)}
    assert len(seeds) == 398 and all(0 <= s < 2**31 for s in seeds)
    assert resume_seed(0, 5) == resume_seed(0, 5)


def test_a_duplicate_is_told_failed_and_not_counted(tmp_path):
    study = _study(tmp_path)
    dist = {"x": FloatDistribution(0, 1)}
    done = study.ask(dist)
    study.tell(done, 0.5)
    study.enqueue_trial({"x": done.params["x"]})  # the same parameters again
    said: list[str] = []
    dedupe = Dedupe(None, said.append, seed=0)
    again = study.ask(dist)
    assert dedupe.reject(study, again)
    trials = study.get_trials()
    assert trials[1].state == TrialState.FAIL and trials[1].user_attrs[FAIL_REASON] == "duplicate"
    assert trials[1].user_attrs[DUPLICATE_OF] == 0 and budget_used(trials) == 1
    new = study.ask(dist)  # re-sampled: something new
    assert not dedupe.reject(study, new) and new.params != done.params
    assert not dedupe.exhausted(study)
    assert said == ["trial   1 repeats the parameters of trial 0: not run, sampling again"]


def test_an_interruption_never_counts_even_when_its_retries_are_used_up(tmp_path):
    study = _study(tmp_path)
    dist = {"x": FloatDistribution(0, 1)}
    for reason in ("interrupted", "stale"):
        trial = study.ask(dist)
        fail_trial(study, trial.number, reason, "its sweep died", retry=True, max_retries=0)  # not queued
    own = study.ask(dist)
    fail_trial(study, own.number, "error", "RuntimeError: boom")  # the trial's own failure counts
    assert [t.user_attrs[RETRIED] for t in study.get_trials()] == [False] * 3
    assert budget_used(study.get_trials()) == 1


def test_a_trial_asked_by_a_sweep_killed_before_it_tagged_it_is_recovered(tmp_path, monkeypatch):
    """A sweep process killed between study.ask() and tagging the trial leaves a RUNNING trial without an owner
    (seen in a real kill-and-resume run: the resumed sweep ended with it still RUNNING and 5 of 6 evaluated).
    With no other sweep process alive it is stale at once; while another is alive (it could be that one's,
    between its ask and its tag), only after ORPHAN_AFTER seconds."""
    import cifarlab.sweeper.study as study_module

    study = _study(tmp_path)
    dist = {"x": FloatDistribution(0, 1)}
    queued = {"x": 0.25}
    study.enqueue_trial(queued)
    orphan = study.ask(dist)  # the enqueued parameters, RUNNING, no owner: its sweep died right here
    me = Owner.me()
    heartbeat(study, me, 1, time.time())
    assert recover_stale(study, me, stale_after=300, max_retries=3) == [orphan.number]
    trials = study.get_trials()
    assert trials[0].state == TrialState.FAIL and trials[0].user_attrs[FAIL_REASON] == "stale"
    assert budget_used(trials) == 0
    assert trials[1].state == TrialState.WAITING  # queued again with its parameters: run again
    assert trials[1].system_attrs["fixed_params"] == queued

    other = Owner("another-host", 1234, "1")  # a live sweep process elsewhere (recent heartbeat)
    heartbeat(study, other, 1, time.time())
    fresh = study.ask(dist)  # maybe the other one's, not tagged yet
    assert recover_stale(study, me, stale_after=300, max_retries=3) == []
    monkeypatch.setattr(study_module, "ORPHAN_AFTER", 0.0)
    time.sleep(0.01)
    assert recover_stale(study, me, stale_after=300, max_retries=3) == [fresh.number]


def test_a_signal_from_outside_is_an_interruption_and_a_fault_is_not():
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    def lightning_ctrl_c() -> BaseException:  # what Lightning does on Ctrl-C inside fit
        try:
            try:
                raise KeyboardInterrupt
            except KeyboardInterrupt:
                sys.exit(1)
        except SystemExit as err:
            return err

    assert is_interruption(SIGTERMException()) and is_interruption(KeyboardInterrupt())
    assert is_interruption(lightning_ctrl_c())
    assert not is_interruption(RuntimeError("CUDA out of memory")) and not is_interruption(SystemExit(1))
    assert not is_interruption(FloatingPointError("val/loss is nan"))


def test_the_size_of_a_space_is_known_only_when_it_is_finite():
    from cifarlab.sweeper.space import build_space

    def size(params, conditional=None):
        return space_size(build_space(params, [], conditional)[0])

    assert size({"a": "choice(x, y, z)", "b": "range(32, 128, 32)", "c": "interval(1, 5)"}) == 3 * 4 * 5
    assert size({"a": "choice(x, y)", "lr": "tag(log, interval(1e-4, 1e-1))"}) is None
    assert size({"a": "choice(x, y)"}, {"b": {"when": {"a": "x"}, "space": "choice(1, 2)"}}) is None
    assert space_size(None) is None
