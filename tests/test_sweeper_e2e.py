"""End-to-end tests of the Optuna sweeper: real ``python train.py -m`` sweep processes, real trial subprocesses,
real Optuna storage (journal files, PostgreSQL). Everything is written under pytest's tmp_path.

Most tests use stand-in trials that sleep (``cifarlab.sweeper.sleep_task``) so that they take seconds; one
runs real (tiny) training trials for pruning, NaN divergence and configuration errors.
"""

from __future__ import annotations

import csv
import glob
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest
import yaml
from conftest import sweep_env
from optuna.trial import TrialState

from cifarlab.sweeper.study import FAIL_REASON, JOB_DIR, OWNER, RETRY_OF, counts_toward_budget, make_storage

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
SLEEP_TASK = f"hydra.sweeper.task_command=[{PY},-m,cifarlab.sweeper.sleep_task]"
optuna.logging.set_verbosity(optuna.logging.WARNING)

SLEEPY = """\
# @package _global_
defaults:
  - override /hydra/sweeper: cifarlab_optuna
  - override /hydra/sweeper/sampler: random
  - override /hydra/sweeper/pruner: none
hydra:
  sweeper:
    study_name: sleepy
    n_trials: 6
    n_jobs: 2
    monitor: none   # no intermediate reports: the stand-in trials then never import optuna
    plots: false
    wandb_summary: false
    params:
      x: interval(0.0, 1.0)
      sleep: 1.0
"""

REAL = """\
# @package _global_
# tiny real trials: #0 completes, #1 diverges to NaN, #2 has an invalid dropout, #3 is pruned after epoch 2
defaults:
  - synthetic_tiny
  - override /hydra/sweeper/pruner: none
  - _self_
data:
  train_size: 1000
  val_size: 200
trainer:
  max_epochs: 1
  limit_train_batches: 6
hydra:
  sweeper:
    study_name: e2e
    n_trials: 4
    n_jobs: 2
    max_failure_rate: 1.0
    pruner:
      _target_: optuna.pruners.ThresholdPruner
      lower: 1.01          # every report below it prunes ...
      n_warmup_steps: 1    # ... from the 2nd epoch on: 1-epoch trials complete, longer ones are pruned
    params:
      trainer.max_epochs: choice(1, 2, 3)
    enqueue_trials:
      - {optimizer: adam, optimizer.lr: 0.003, model.dropout: 0.1, trainer.max_epochs: 1}
      - {optimizer: sgd, optimizer.lr: 1.0e+30, model.dropout: 0.0, trainer.max_epochs: 2}
      - {optimizer: adam, optimizer.lr: 0.003, model.dropout: 1.5, trainer.max_epochs: 1}
      - {optimizer: adam, optimizer.lr: 0.003, model.dropout: 0.1, trainer.max_epochs: 3}
"""


def _env(tmp_path: Path) -> dict[str, str]:
    return sweep_env(tmp_path, HYDRA_FULL_ERROR="1")


def _conf(tmp_path: Path, name: str, text: str) -> Path:
    conf = tmp_path / "conf"
    (conf / "hparams_search").mkdir(parents=True, exist_ok=True)
    (conf / "hparams_search" / f"{name}.yaml").write_text(text)
    return conf


def _cmd(conf: Path, search: str, sweep_dir: Path, *overrides: str) -> list[str]:
    return [
        PY,
        str(ROOT / "train.py"),
        "-m",
        f"--config-dir={conf}",
        f"hparams_search={search}",
        f"hydra.sweep.dir={sweep_dir}",
        *overrides,
    ]


def _run(cmd: list[str], tmp_path: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        cmd, cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=timeout
    )


def _trials(storage: str, study: str) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=study, storage=make_storage(storage)).get_trials()


def _finished(trials) -> list:
    return [t for t in trials if t.state.is_finished() and counts_toward_budget(t)]


def _overlaps(trials) -> list[tuple[int, int]]:
    out = []
    for a in trials:
        for b in trials:
            if (
                a.number < b.number
                and a.datetime_start < b.datetime_complete
                and b.datetime_start < a.datetime_complete
            ):
                out.append((a.number, b.number))
    return out


# ---- real training trials ----------------------------------------------------------------------------------


def test_real_sweep_runs_trials_concurrently_prunes_and_survives_failing_trials(tmp_path):
    conf = _conf(tmp_path, "e2e_real", REAL)
    sweep = tmp_path / "sweep"
    result = _run(_cmd(conf, "e2e_real", sweep), tmp_path, timeout=480)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # the diverging learning rate lies outside the search's interval: said in one line, then evaluated as given
    out = result.stdout + result.stderr
    assert (
        "warning: hydra.sweeper.enqueue_trials[1]: optimizer.lr=1e+30 is outside 0.0001 <= optimizer.lr"
        in out
    )
    assert "Fixed parameter" not in out  # Optuna's own two-line warning of the same

    trials = _trials(f"journal:{sweep}/journal.log", "e2e")
    states = {t.number: t.state for t in trials}
    assert states == {0: TrialState.COMPLETE, 1: TrialState.FAIL, 2: TrialState.FAIL, 3: TrialState.PRUNED}, (
        states
    )
    done, nan, bad, pruned = trials

    # the NaN trial and the invalid-config trial FAIL with their errors; the sweep went on
    assert nan.user_attrs[FAIL_REASON] == "nan" and "FloatingPointError" in nan.user_attrs["error"]
    assert bad.user_attrs[FAIL_REASON] == "error" and "model.dropout" in bad.user_attrs["error"]

    # pruning: val/acc reported every epoch, stopped after the 2nd of 3 epochs, recorded with its last value
    assert set(pruned.intermediate_values) == {0, 1}
    assert pruned.value == pruned.intermediate_values[1]
    metrics = json.loads((Path(pruned.user_attrs[JOB_DIR]) / "metrics.json").read_text())
    assert metrics["status"] == "pruned" and metrics["epochs"] == 2
    assert set(done.intermediate_values) == {0} and done.value == pytest.approx(
        done.user_attrs["metrics"]["val/acc_best"]
    )

    # two slots: trials overlapped in time, never more than two at once, never two on one slot
    overlaps = _overlaps(trials)
    assert overlaps, "no two trials ran at the same time"
    for a, b in overlaps:
        assert trials[a].user_attrs["slot"] != trials[b].user_attrs["slot"]
    assert {t.user_attrs["slot"] for t in trials} == {"cpu0", "cpu1"}

    # each trial ran in its own folder, as a plain run with the study's W&B group and a run name
    for t in trials:
        job = Path(t.user_attrs[JOB_DIR])
        assert job.name == f"trial_{t.number:04d}" and (job / "trial.log").exists()
        assert "logger.group=e2e" in t.user_attrs["overrides"]
        assert f"run_name=e2e-{t.number:04d}" in t.user_attrs["overrides"]
    cfg = yaml.safe_load((Path(done.user_attrs[JOB_DIR]) / "config.yaml").read_text())
    assert (
        cfg["logger"]["group"] == "e2e" and cfg["run_name"] == "e2e-0000" and cfg["optimizer"]["lr"] == 0.003
    )

    # results
    data = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert (
        data["name"] == "optuna"
        and data["best_trial"] == 0
        and data["best_value"] == pytest.approx(done.value)
    )
    assert data["best_params"]["trainer.max_epochs"] == 1
    rows = list(csv.DictReader((sweep / "trials.csv").open()))
    assert [r["state"] for r in rows] == ["COMPLETE", "FAIL", "FAIL", "PRUNED"]
    for png in ("optimization_history.png", "intermediate_values.png", "timeline.png"):
        assert (sweep / png).stat().st_size > 0, png
    assert "1 complete, 1 pruned, 2 failed" in result.stdout


# ---- stand-in trials ---------------------------------------------------------------------------------------------


def test_killed_sweep_resumes_to_exactly_n_trials_without_overwriting(tmp_path):
    conf = _conf(tmp_path, "sleepy", SLEEPY)
    sweep = tmp_path / "sweep"
    cmd = _cmd(conf, "sleepy", sweep, SLEEP_TASK, "hydra.sweeper.params.sleep=1.5")
    storage = f"journal:{sweep}/journal.log"
    proc = subprocess.Popen(
        cmd,
        cwd=tmp_path,
        env=_env(tmp_path),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 180
    while time.time() < deadline:
        if len(glob.glob(str(sweep / "trial_*" / "metrics.json"))) >= 3:
            break
        assert proc.poll() is None, "the sweep ended before it was killed"
        time.sleep(0.1)
    else:
        pytest.fail("three trials did not finish in time")
    os.killpg(proc.pid, signal.SIGKILL)  # the sweep process; its trials die with it (PR_SET_PDEATHSIG)
    proc.wait()
    time.sleep(0.5)
    before = {p: p.read_text() for p in sweep.glob("trial_*/metrics.json")}
    running_at_kill = [t.number for t in _trials(storage, "sleepy") if t.state == TrialState.RUNNING]
    assert running_at_kill, "nothing was running when the sweep was killed"

    result = _run(cmd, tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    trials = _trials(storage, "sleepy")
    states = [
        (t.number, t.state.name, t.user_attrs.get(FAIL_REASON), t.user_attrs.get("error")) for t in trials
    ]
    assert len(_finished(trials)) == 6, (states, result.stdout[-2000:])
    assert all(t.state == TrialState.COMPLETE for t in _finished(trials)), (states, result.stdout[-2000:])
    for t in (trials[n] for n in running_at_kill):
        if t.state == TrialState.COMPLETE:  # it finished just before the kill: recorded from its folder
            assert t.user_attrs["recovered"] and (Path(t.user_attrs[JOB_DIR]) / "metrics.json").exists()
            continue
        assert t.state == TrialState.FAIL and t.user_attrs[FAIL_REASON] == "stale"
        retry = [r for r in trials if r.user_attrs.get(RETRY_OF) == t.number]
        if not t.params:  # killed before it was sampled: nothing to run again, a new trial takes its place
            assert not retry and not t.user_attrs.get(JOB_DIR)
            continue
        assert len(retry) == 1 and retry[0].params == t.params and retry[0].state == TrialState.COMPLETE
        if JOB_DIR in t.user_attrs:  # else killed before it made its folder
            assert not (Path(t.user_attrs[JOB_DIR]) / "metrics.json").exists()  # killed with the sweep
    assert all(t.number in running_at_kill for t in trials if t.state == TrialState.FAIL)
    assert {p: p.read_text() for p in before} == before  # finished trials' folders untouched
    # every folder is a trial's, also one made by a launch the kill cut short (test_sweeper_resume.py)
    dirs = [t.user_attrs[JOB_DIR] for t in trials if JOB_DIR in t.user_attrs]
    assert len(set(dirs)) == len(dirs) == len(list(sweep.glob("trial_*")))
    assert "left running by a dead sweep process" in result.stdout


def test_ctrl_c_stops_running_trials_and_queues_them_again(tmp_path):
    """Ctrl-C stops both running trials; their parameters are queued again in the order the trials started,
    though trial 0 takes 1.5 s to exit on SIGTERM and trial 1 exits at once."""
    conf = _conf(tmp_path, "sleepy", SLEEPY)
    sweep = tmp_path / "sweep"
    slow_first = [
        "+hydra.sweeper.params.term_delay='choice(0.0,1.5)'",
        "hydra.sweeper.enqueue_trials=[{term_delay:1.5},{term_delay:0.0}]",
    ]
    cmd = _cmd(
        conf,
        "sleepy",
        sweep,
        SLEEP_TASK,
        "hydra.sweeper.n_trials=4",
        "hydra.sweeper.params.sleep=30",
        *slow_first,
    )
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    deadline = time.time() + 120
    while len(list(sweep.glob("trial_*/trial.log"))) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 130, out
    trials = _trials(f"journal:{sweep}/journal.log", "sleepy")
    assert [t.state for t in trials] == [TrialState.FAIL] * 2 + [TrialState.WAITING] * 2
    assert all(t.user_attrs[FAIL_REASON] == "interrupted" for t in trials[:2])
    assert [t.params["term_delay"] for t in trials[:2]] == [1.5, 0.0]
    assert [t.user_attrs[RETRY_OF] for t in trials[2:]] == [0, 1]
    assert "re-run the same command to resume" in out and (sweep / "trials.csv").exists()


def _run_sweeps_side_by_side(cmd: list[str], tmp_path, count: int) -> None:
    """Start ``count`` identical sweep processes at once and wait for all; each must succeed."""
    procs = [
        subprocess.Popen(
            cmd, cwd=tmp_path, env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for _ in range(count)
    ]
    outs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * count, outs


def test_two_sweep_processes_share_one_study_and_budget(tmp_path):
    conf = _conf(tmp_path, "sleepy", SLEEPY)
    sweep = tmp_path / "sweep"
    cmd = _cmd(conf, "sleepy", sweep, SLEEP_TASK, "hydra.sweeper.n_jobs=1", "hydra.sweeper.params.sleep=1.5")
    _run_sweeps_side_by_side(cmd, tmp_path, 2)
    trials = _trials(f"journal:{sweep}/journal.log", "sleepy")
    finished = _finished(trials)
    assert len(finished) == 6 and all(t.state == TrialState.COMPLETE for t in finished)
    owners = {t.user_attrs[OWNER] for t in finished}
    assert len(owners) == 2, f"one process ran everything: {owners}"
    assert len({t.user_attrs[JOB_DIR] for t in trials if JOB_DIR in t.user_attrs}) == len(finished)


def test_too_many_failures_stop_the_sweep_with_a_summary(tmp_path):
    conf = _conf(tmp_path, "sleepy", SLEEPY)
    sweep = tmp_path / "sweep"
    cmd = _cmd(
        conf,
        "sleepy",
        sweep,
        SLEEP_TASK,
        "hydra.sweeper.n_trials=8",
        "+hydra.sweeper.params.fail=true",
        "hydra.sweeper.params.sleep=0.2",
        "hydra.sweeper.max_failure_rate=0.25",
    )
    result = _run(cmd, tmp_path)
    assert result.returncode == 1
    assert "too many failed trials" in result.stderr and "asked to fail" in result.stdout
    trials = _trials(f"journal:{sweep}/journal.log", "sleepy")
    failed = [t for t in trials if t.user_attrs.get(FAIL_REASON) == "error"]
    assert 3 <= len(failed) < 8  # stopped after more than 0.25 × 8 = 2 failures
    assert (sweep / "trials.csv").exists() and (sweep / "optimization_results.yaml").exists()


def test_launcher_workers_run_sweep_processes_as_hydra_jobs(tmp_path):
    conf = _conf(tmp_path, "sleepy", SLEEPY)
    sweep = tmp_path / "sweep"
    cmd = _cmd(
        conf,
        "sleepy",
        sweep,
        SLEEP_TASK,
        "hydra.sweeper.workers=2",
        "hydra.sweeper.n_trials=3",
        "hydra.sweeper.params.sleep=0.3",
    )
    result = _run(cmd, tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    trials = _trials(f"journal:{sweep}/journal.log", "sleepy")
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3
    assert (sweep / "workers" / "0").is_dir() and (sweep / "workers" / "1").is_dir()
    assert "worker 1:" in result.stdout


def test_benchmark_async_beats_batch_synchronous(tmp_path):
    from cifarlab.sweeper.bench import describe, simulated

    result = simulated(slots=2, durations=(0.3, 1.5, 0.3, 1.5, 0.3, 1.5), workdir=str(tmp_path))
    assert result["async"]["trials"] == result["sync"]["trials"] == 6
    assert result["ratio"] > 1.1 and result["speedup"] > 1.1, describe(result)


def test_the_wandb_preload_benchmark_runs_both_variants(tmp_path):
    from cifarlab.sweeper.bench import describe_wandb_preload, wandb_preload

    result = wandb_preload(n_trials=2, slots=2, repeats=1, workdir=str(tmp_path))
    for variant in ("without", "with"):
        (run,) = result[variant]["runs"]
        assert run["trials"] == 2 and run["wall_s"] > 0
    assert result["wall_ratio"] > 0
    assert describe_wandb_preload(result).startswith("warm W&B trials (2 synthetic_tiny trials, 2 slots")


# ---- PostgreSQL ------------------------------------------------------------------------------------------------------


def _pg_bin() -> Path | None:
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).resolve().parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    return Path(candidates[-1]).parent if candidates else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def postgres_url(tmp_path):
    """A throwaway PostgreSQL cluster on a free localhost port, its files in tmp_path (Debian: the `postgresql`
    package; as root, the server runs as the `postgres` or `nobody` user)."""
    bindir = _pg_bin()
    if bindir is None or not (bindir / "initdb").exists():
        pytest.skip(
            "PostgreSQL server binaries (initdb, pg_ctl) not found; Debian/Ubuntu: apt-get install -y postgresql"
        )
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        pytest.skip("psycopg2 is not installed (pip install 'cifarlab[postgres]')")
    pg = tmp_path / "pg"
    pg.mkdir()
    kwargs: dict = {}
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            user = pwd.getpwnam("nobody")
        kwargs = {"user": user.pw_uid, "group": user.pw_gid}
        os.chown(pg, user.pw_uid, user.pw_gid)
        # let that user reach tmp_path: traverse-only permission on pytest's temporary folders down to it
        temp_root = Path(tempfile.gettempdir()).resolve()
        for path in [tmp_path.resolve(), *tmp_path.resolve().parents]:
            if temp_root not in path.parents:
                break
            path.chmod(path.stat().st_mode | 0o001)
    port = _free_port()
    env = {**os.environ, "LC_ALL": "C"}
    init = subprocess.run(
        [str(bindir / "initdb"), "-D", str(pg / "data"), "-U", "postgres", "--auth=trust", "-E", "UTF8"],
        capture_output=True,
        text=True,
        env=env,
        **kwargs,
    )
    if init.returncode != 0:
        pytest.skip(f"initdb failed: {init.stderr[-500:]}")
    opts = f"-p {port} -k {pg} -c listen_addresses=127.0.0.1 -c fsync=off"
    start = subprocess.run(
        [str(bindir / "pg_ctl"), "-D", str(pg / "data"), "-l", str(pg / "log"), "-o", opts, "-w", "start"],
        capture_output=True,
        text=True,
        env=env,
        **kwargs,
    )
    if start.returncode != 0:
        log = (pg / "log").read_text() if (pg / "log").exists() else ""
        pytest.skip(f"pg_ctl start failed: {start.stderr[-300:]} {log[-500:]}")
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(
            [str(bindir / "pg_ctl"), "-D", str(pg / "data"), "-m", "immediate", "stop"],
            capture_output=True,
            env=env,
            **kwargs,
        )


def test_postgres_study_shared_by_several_sweep_processes(tmp_path, postgres_url):
    conf = _conf(tmp_path, "sleepy", SLEEPY)
    sweep = tmp_path / "sweep"
    cmd = _cmd(
        conf,
        "sleepy",
        sweep,
        SLEEP_TASK,
        f"hydra.sweeper.storage={postgres_url}",
        "hydra.sweeper.n_jobs=1",
        "hydra.sweeper.n_trials=5",
        "hydra.sweeper.params.sleep=1.5",
        "hydra.sweeper.study_name=pg",
    )
    _run_sweeps_side_by_side(cmd, tmp_path, 2)
    trials = _trials(postgres_url, "pg")
    finished = _finished(trials)
    assert len(finished) == 5 and all(t.state == TrialState.COMPLETE for t in finished)
    assert len({t.user_attrs[OWNER] for t in finished}) >= 2
    assert not (sweep / "journal.log").exists()
    data = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert data["storage"].startswith("postgresql://") and data["trials"]["complete"] == 5


def test_sleep_task_writes_metrics_like_train(tmp_path):
    out = tmp_path / "run"
    subprocess.run(
        [PY, "-m", "cifarlab.sweeper.sleep_task", "sleep=0.1", "x=0.3", f"hydra.run.dir={out}"],
        check=True,
        env=_env(tmp_path),
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["val/acc_best"] == 1.0
