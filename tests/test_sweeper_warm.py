"""Warm trials, any Hydra app, packing: cifarlab's sweeper on a plain ``@hydra.main`` app written to tmp_path.

The slow tests run real sweep processes (``python app.py -m``) whose trials are real forks of a real fork server:
the objective is the task function's return value; the trial is its own process group with its slot's
environment; a failing or timed-out trial costs only itself; the trials die with a SIGKILLed sweep process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from cifarlab.sweeper.outcome import read_outcome, returned_values
from cifarlab.sweeper.settings import SweepError, _launch_mode, _trials_per_gpu
from cifarlab.sweeper.slots import PACK_KNEE, pack_trials
from cifarlab.sweeper.study import FAIL_REASON, JOB_DIR, make_storage

PY = sys.executable
optuna.logging.set_verbosity(optuna.logging.WARNING)


# ---- packing: a pure function --------------------------------------------------------------------------------


def test_packing_stops_where_images_per_second_stop_growing():
    n, why = pack_trials(gpu_memory_gb=80, trial_memory_gb=2, cores=64, gpus=1)
    assert n == PACK_KNEE == 8 and "images/s" in why


def test_packing_is_limited_by_memory_and_cores():
    assert pack_trials(16, 2, cores=64, gpus=1)[0] == 6  # 0.85 × 16 GB / 2 GB
    n, why = pack_trials(16, 2, cores=64, gpus=1)
    assert "16 GB" in why
    n, why = pack_trials(80, 2, cores=16, gpus=4)  # 16 cores for 4 GPUs: 4 trials each
    assert n == 4 and "cores" in why
    assert pack_trials(4, 8, cores=2, gpus=8)[0] == 1  # never below one trial
    assert pack_trials(None, 2, cores=32, gpus=2)[0] == 8  # memory unknown: not a limit
    assert pack_trials(80, 2, cores=64, gpus=0)[0] == 1
    assert pack_trials(80, 2, cores=64, gpus=4, gpus_per_trial=2)[0] == 1


def test_trials_per_gpu_setting():
    assert _trials_per_gpu("auto") == "auto" and _trials_per_gpu(3) == 3
    for bad in (0, "two", 1.5):
        with pytest.raises(SweepError, match="trials_per_gpu"):
            _trials_per_gpu(bad)


# ---- outcome -----------------------------------------------------------------------------------------------------


def test_return_values_of_a_task_function():
    import numpy as np
    import torch

    assert returned_values(0.5) == [0.5] and returned_values((1, 2.5)) == [1.0, 2.5]
    assert returned_values(torch.tensor(0.25)) == [0.25] and returned_values(np.float32(2.0)) == [2.0]
    assert returned_values(None) is None and returned_values("high") is None


def test_outcome_from_the_return_value_and_metrics_json(tmp_path):
    (tmp_path / "trial_result.json").write_text(json.dumps({"status": "completed", "values": [0.1, 3.0]}))
    out = read_outcome(tmp_path, ["value_0", "value_1"], from_return=True)
    assert out["status"] == "completed" and out["value_0"] == 0.1 and out["value_1"] == 3.0
    wrong = read_outcome(tmp_path, ["value"], from_return=True)
    assert wrong["status"] == "failed" and "returned 2 value(s)" in wrong["error"]
    # metrics.json decides a status it states: a pruned train.py run stays pruned
    (tmp_path / "metrics.json").write_text(json.dumps({"status": "pruned", "val/acc_best": 0.2}))
    assert read_outcome(tmp_path, ["val/acc_best"], from_return=True)["status"] == "pruned"


def test_launch_mode_falls_back_to_subprocesses_where_it_must():
    def task(cfg):
        return 0.0

    assert _launch_mode({"task_command": ["python", "x.py"]}, None, task, [])[0] == "subprocess"
    assert _launch_mode({"workers": 2}, None, task, [])[0] == "subprocess"
    mode, warm, note = _launch_mode({}, None, None, [])
    assert (mode, warm) == ("subprocess", None) and note
    with pytest.raises(SweepError, match="launch=fork is not possible: hydra.sweeper.task_command"):
        _launch_mode({"launch": "fork", "task_command": ["python"]}, None, task, [])
    with pytest.raises(SweepError, match="launch='warm' is not allowed; allowed: auto, fork, subprocess"):
        _launch_mode({"launch": "warm"}, None, task, [])


def test_gp_and_qmc_samplers_are_registered():
    from cifarlab.sweeper.runner import instantiate_target
    from hydra_plugins.cifarlab_sweeper.config import SAMPLERS

    assert type(instantiate_target(SAMPLERS["qmc"])).__name__ == "QMCSampler"
    assert type(instantiate_target(SAMPLERS["gp"])).__name__ == "GPSampler"


# ---- a plain Hydra app, swept for real -------------------------------------------------------------------------

APP = '''\
"""A plain Hydra app: its task function returns the objective(s)."""
import json
import logging
import os
import sys
import time

import hydra
from hydra.core.hydra_config import HydraConfig

IMPORTED_BY = os.getpid()  # the fork server's pid when the server imported this script


@hydra.main(version_base="1.3", config_path="conf", config_name="app")
def main(cfg):
    out = HydraConfig.get().runtime.output_dir
    info = {
        "pid": os.getpid(),
        "pgid": os.getpgid(0),
        "argv": sys.argv,
        "optuna_preloaded": "optuna" in sys.modules,
        "script_preloaded": IMPORTED_BY != os.getpid(),
        "omp": os.environ.get("OMP_NUM_THREADS"),
        "cwd": os.getcwd(),
        "output_dir": out,
    }
    with open(os.path.join(out, "info.json"), "w") as f:
        json.dump(info, f)
    print(f"app: x={cfg.x:.4f} y={cfg.y:.4f}")
    logging.getLogger(__name__).info("logged through Hydra's job logging")
    if cfg.x > cfg.fail_above:
        raise ValueError(f"x={cfg.x} is above fail_above={cfg.fail_above}")
    time.sleep(cfg.sleep)
    if cfg.two:
        return (cfg.x - 0.3) ** 2, (cfg.y - 0.7) ** 2
    return (cfg.x - 0.3) ** 2 + cfg.y


if __name__ == "__main__":
    main()
'''

APP_CONF = """\
defaults:
  - override hydra/sweeper: cifarlab_optuna
  - _self_
x: 0.5
y: 0.5
sleep: 0.0
two: false
fail_above: 2.0
hydra:
  sweeper:
    study_name: app
    direction: minimize
    n_trials: 6
    n_jobs: 2
    plots: false
    wandb_summary: false
    preload: [optuna]
    sampler:
      seed: 0
    params:
      x: interval(0.0, 1.0)
      y: interval(0.0, 1.0)
"""


def _app(tmp_path: Path) -> Path:
    (tmp_path / "conf").mkdir(exist_ok=True)
    (tmp_path / "conf" / "app.yaml").write_text(APP_CONF)
    (tmp_path / "app.py").write_text(APP)
    return tmp_path / "app.py"


def _env(tmp_path: Path) -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled"}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def _sweep(tmp_path: Path, *overrides: str, timeout: float = 240) -> subprocess.CompletedProcess:
    cmd = [PY, str(_app(tmp_path)), "-m", f"hydra.sweep.dir={tmp_path / 'sweep'}", *overrides]
    return subprocess.run(
        cmd, cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=timeout
    )


def _trials(tmp_path: Path, study: str = "app") -> list:
    storage = make_storage(f"journal:{tmp_path / 'sweep' / 'journal.log'}")
    return optuna.load_study(study_name=study, storage=storage).get_trials()


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_plain_app_single_objective_from_the_return_value(tmp_path):
    result = _sweep(
        tmp_path, "hydra/sweeper/sampler=qmc", "hydra.sweeper.custom_search_space=app_space.extend"
    )
    # a missing function: one clear line, exit code 1
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "error: hydra.sweeper.custom_search_space='app_space.extend': cannot import it" in result.stderr
    (tmp_path / "app_space.py").write_text(
        "def extend(cfg, trial):\n    trial.suggest_categorical('sleep', [0.1, 0.2])\n"
    )
    gp = ["hydra/sweeper/sampler=gp", "hydra.sweeper.sampler.n_startup_trials=3"]  # GP fits from trial 3 on
    result = _sweep(tmp_path, *gp, "hydra.sweeper.custom_search_space=app_space.extend")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "trials start warm" in result.stdout
    trials = _trials(tmp_path)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 6
    pids = set()
    threads = str(max(1, len(os.sched_getaffinity(0)) // 2))
    for t in trials:
        job = Path(t.user_attrs[JOB_DIR])
        info = json.loads((job / "info.json").read_text())
        # the objective is the task function's return value
        assert t.value == pytest.approx((t.params["x"] - 0.3) ** 2 + t.params["y"])
        assert t.params["sleep"] in (0.1, 0.2)  # custom_search_space
        # a warm trial: forked from the preloaded server, its own process group, its slot's threads, Hydra's files
        assert info["optuna_preloaded"] and info["script_preloaded"]
        assert info["pgid"] == info["pid"] and info["omp"] == threads
        assert info["argv"][:2] == [str(tmp_path / "app.py"), "--config-name=app"]  # as `python app.py ...`
        assert info["argv"][-1] == f"hydra.run.dir={job}"
        assert info["output_dir"] == str(job) and info["cwd"] == str(tmp_path)
        assert (job / ".hydra" / "config.yaml").exists() and (job / ".hydra" / "overrides.yaml").exists()
        assert "logged through Hydra's job logging" in (job / "app.log").read_text()  # as a plain run
        log = (job / "trial.log").read_text()
        assert log.startswith("$ (warm fork) app ") and "app: x=" in log
        pids.add(info["pid"])
    assert len(pids) == 6  # one process per trial
    data = yaml.safe_load((tmp_path / "sweep" / "optimization_results.yaml").read_text())
    assert data["best_value"] == pytest.approx(min(t.value for t in trials))
    assert "GPSampler" in result.stdout


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_plain_app_two_objectives_with_nsgaii_list_the_pareto_front(tmp_path):
    result = _sweep(
        tmp_path,
        "two=true",
        "hydra/sweeper/sampler=nsgaii",
        "hydra.sweeper.direction=[minimize,minimize]",
        "hydra.sweeper.n_trials=8",
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    trials = _trials(tmp_path)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 8
    for t in trials:
        assert t.values == pytest.approx([(t.params["x"] - 0.3) ** 2, (t.params["y"] - 0.7) ** 2])
    data = yaml.safe_load((tmp_path / "sweep" / "optimization_results.yaml").read_text())
    front = {s["number"] for s in data["solutions"]}
    study = optuna.load_study(
        study_name="app", storage=make_storage(f"journal:{tmp_path / 'sweep' / 'journal.log'}")
    )
    assert front == {t.number for t in study.best_trials}


def test_the_precheck_names_the_groups_of_the_apps_own_config(tmp_path):
    """A searched group the app's config does not use is one line listing that config's groups (app.yaml's),
    not train.yaml's: before, it read "train's config has no extra group; allowed: " with nothing listed."""
    script, conf = _app(tmp_path), tmp_path / "conf"
    (conf / "app.yaml").write_text(APP_CONF.replace("defaults:\n", "defaults:\n  - model: small\n"))
    for group, option in [("model", "small"), ("model", "big"), ("extra", "a"), ("extra", "b")]:
        (conf / group).mkdir(exist_ok=True)
        (conf / group / f"{option}.yaml").write_text("z: 1\n")
    cmd = [PY, str(script), "-m", f"hydra.sweep.dir={tmp_path / 'sweep'}", "extra=choice(a,b)"]
    result = subprocess.run(
        cmd, cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "error: search space: extra=a is not allowed: app's config has no extra group; allowed: model"
    )
    assert not (tmp_path / "sweep" / "journal.log").exists()  # stopped before the study was opened


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_plain_app_failing_and_timed_out_trials_cost_only_themselves(tmp_path):
    enqueue = (
        "hydra.sweeper.enqueue_trials=[{x:0.9,y:0.1,sleep:0.0},{x:0.2,y:0.1,sleep:30},{x:0.3,y:0.2,sleep:0.0},"
        "{x:0.4,y:0.2,sleep:0.0},{x:0.5,y:0.2,sleep:0.0}]"
    )
    result = _sweep(
        tmp_path,
        "fail_above=0.8",
        "hydra.sweeper.n_trials=5",
        "hydra.sweeper.max_failure_rate=0.5",
        "hydra.sweeper.trial_timeout=8",
        "sleep=choice(0.0,30)",
        enqueue,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    trials = _trials(tmp_path)
    failing, slow, good = trials[:3]
    assert failing.state == TrialState.FAIL and failing.user_attrs[FAIL_REASON] == "error"
    assert "ValueError: x=0.9 is above fail_above=0.8" in failing.user_attrs["error"]
    assert slow.state == TrialState.FAIL and slow.user_attrs[FAIL_REASON] == "timeout"
    assert good.state == TrialState.COMPLETE and good.value == pytest.approx(0.2)
    assert [t.state for t in trials[3:]] == [
        TrialState.COMPLETE
    ] * 2 and "3 complete, 0 pruned, 2 failed" in result.stdout


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_warm_trials_die_with_a_killed_sweep_process(tmp_path):
    cmd = [
        PY,
        str(_app(tmp_path)),
        "-m",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        "sleep=120",
        "hydra.sweeper.n_trials=2",
    ]
    # the sweep alone is killed (not its process group): its fork server exits, and the trials with it
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, env=_env(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.time() + 120
        infos = []
        while time.time() < deadline and len(infos) < 2:
            infos = list((tmp_path / "sweep").glob("trial_*/info.json"))
            assert proc.poll() is None
            time.sleep(0.2)
        assert len(infos) == 2, "the trials did not start"
        pids = [json.loads(p.read_text())["pid"] for p in infos]
        assert all(_alive(pid) for pid in pids)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    deadline = time.time() + 20
    while time.time() < deadline and any(_alive(pid) for pid in pids):
        time.sleep(0.1)
    assert not any(_alive(pid) for pid in pids), "a trial outlived its sweep process"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def test_auto_packing_plans_the_slots_and_says_why(tmp_path, monkeypatch):
    from cifarlab.sweeper import slots as slots_module
    from cifarlab.sweeper.runner import Sweep
    from cifarlab.sweeper.settings import SweepSettings

    monkeypatch.setattr(slots_module, "cpu_count", lambda: 16)
    monkeypatch.setattr(slots_module, "gpu_memory_gb", lambda environ=None: 80.0)
    settings = SweepSettings(
        study_name="s",
        storage=f"journal:{tmp_path}/journal.log",
        sweep_dir=str(tmp_path),
        task_command=[PY, "-m", "cifarlab.sweeper.sleep_task"],
        devices=["0", "1"],
        trials_per_gpu="auto",
        quiet=True,
    )
    sweep = Sweep(settings)
    assert len(sweep.slots) == 16 and "8 trial(s) per GPU" in sweep.packing  # 80 GB, 8 cores per GPU
    assert {s.gpus for s in sweep.slots.slots} == {("0",), ("1",)}
    settings.trial_memory_gb = 30.0  # 0.85 × 80 GB holds two
    assert len(Sweep(settings).slots) == 4


def test_a_call_in_a_fork_of_the_warm_server_reports_its_error():
    from cifarlab.sweeper.launch_fork import ForkLauncher, WarmTask

    launcher = ForkLauncher(WarmTask("cifarlab.sweeper.outcome", "finite", None, "t", ()), ".", preload=[])
    launcher.start()
    assert launcher.call("cifarlab.sweeper.outcome:finite", {"name": "x"}) is None
    error = launcher.call("json:dumps", {"name": "x"})
    assert error.startswith("TypeError:") and "DictConfig" in error


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_ctrl_c_stops_warm_trials_and_queues_them_again(tmp_path):
    cmd = [PY, str(_app(tmp_path)), "-m", f"hydra.sweep.dir={tmp_path / 'sweep'}", "sleep=120"]
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    deadline = time.time() + 120
    infos: list[Path] = []
    while time.time() < deadline and len(infos) < 2:
        infos = list((tmp_path / "sweep").glob("trial_*/info.json"))
        time.sleep(0.2)
    assert len(infos) == 2, "the trials did not start"
    pids = [json.loads(p.read_text())["pid"] for p in infos]
    proc.send_signal(signal.SIGINT)
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 130, out
    assert not any(_alive(pid) for pid in pids)
    trials = _trials(tmp_path)
    assert [t.state for t in trials] == [TrialState.FAIL] * 2 + [TrialState.WAITING] * 2
    assert all(t.user_attrs[FAIL_REASON] == "interrupted" for t in trials[:2])


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_sweep_decodes_an_image_folder_once_before_its_first_trial(tmp_path):
    from PIL import Image

    root = tmp_path / "images"
    for label in ("cat", "dog"):
        (root / label).mkdir(parents=True)
        for i in range(24):
            Image.new("RGB", (12, 12), (i * 10, 100 if label == "cat" else 200, 50)).save(
                root / label / f"{i}.png"
            )
    sweep = tmp_path / "sweep"
    train_py = Path(__file__).resolve().parents[1] / "train.py"
    cmd = [PY, str(train_py), "-m", "hparams_search=synthetic_tiny", "data=imagefolder", f"data.root={root}"]
    cmd += ["data.image_size=16", "data.val_size=8", "data.test_size=8", "data.batch_size=16"]
    cmd += ["trainer.max_epochs=1", "trainer.limit_train_batches=2", "hydra/sweeper/pruner=none"]
    cmd += ["hydra.sweeper.n_trials=2", "hydra.sweeper.plots=false", f"hydra.sweep.dir={sweep}"]
    env = {**_env(tmp_path), "CIFARLAB_DATA_DIR": str(tmp_path / "data")}
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "data cache not warmed" not in result.stdout
    cached = [p for p in (tmp_path / "data" / "cache").rglob("*") if p.is_file()]
    assert cached, "nothing was cached"
    storage = make_storage(f"journal:{sweep / 'journal.log'}")
    trials = optuna.load_study(study_name="synthetic_tiny", storage=storage).get_trials()
    first_trial = min(t.datetime_start.timestamp() for t in trials)
    assert max(p.stat().st_mtime for p in cached) <= first_trial  # built before any trial began
    assert "2 complete" in result.stdout
