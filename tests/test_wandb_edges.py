"""W&B edge cases found by review, each on real offline runs (no account, no network): a project name W&B
refuses, an empty tag, a multi-objective sweep's summary run, half-written runs listed by ``make
wandb-sync``, and a run stopped by Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from cifarlab.config import ConfigError
from cifarlab.loggers import init_wandb_run, log_sweep_summary, run_tags
from cifarlab.wandb_sync import find_offline_runs, read_run
from cifarlab.wandb_sync import main as sync_main
from tests.conftest import ROOT
from tests.test_wandb import SMALL, WAIT, clean_env, no_credentials  # noqa: F401 - a fixture

# ---- a project name W&B refuses, an empty tag: one line naming the setting, not wandb's traceback ------------


@pytest.mark.parametrize("project", ["my/project", "team:proj", "p" * 129])
def test_a_project_name_wandb_refuses_is_a_config_error(project, tmp_path, no_credentials):  # noqa: F811
    """logger.project=my/project: wandb.init raised UsageError (a traceback from deep inside wandb) after the
    data were built; now a ConfigError, which train.py prints as one line."""
    with pytest.raises(ConfigError) as err:
        init_wandb_run(name="x", save_dir=tmp_path, config={}, project=project, mode="offline")
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"logger.project={project!r} is not allowed")
    assert "128 characters" in message and "/" in message
    assert not find_offline_runs([tmp_path])  # nothing started


def test_a_project_name_wandb_refuses_stops_train_py_with_one_line(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "train.py"),
            *SMALL,
            "logger.project=my/project",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        cwd=tmp_path,
        env=clean_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1
    assert (
        result.stderr.strip().splitlines()[-1].startswith("error: logger.project='my/project' is not allowed")
    ), result.stderr[-2000:]
    assert "Traceback" not in result.stderr


def test_empty_tags_are_dropped_not_a_wandb_error():
    """logger.tags=[""] (or a tag of blanks): W&B's settings refused the whole run ("Tag at index 5 is
    empty"); an empty tag means nothing, so it is left out."""
    tags = run_tags({"data": {"name": "synthetic"}}, ["", "  ", "mine"])
    assert "" not in tags and "  " not in tags and tags[-1] == "mine"


# ---- a multi-objective sweep's summary run ----------------------------------------------------------------


def test_a_multi_objective_sweep_gets_a_complete_summary_run(tmp_path, no_credentials):  # noqa: F811
    """hydra.sweeper.direction=[maximize,minimize]: log_sweep_summary read trial.value, which Optuna refuses
    for multi-objective studies (RuntimeError), so the summary run was finished as failed and held nothing
    (no trials table, no history), and the sweep only logged a warning."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name="two-goals", directions=["maximize", "minimize"])
    space = {"lr": optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True)}
    for values in [(0.2, 5.0), (0.5, 9.0), (0.4, 3.0)]:
        study.tell(study.ask(space), values)
    study.tell(study.ask(space), state=optuna.trial.TrialState.FAIL)

    folder = log_sweep_summary(study, tmp_path / "sweep", None, {"name": "wandb", "mode": "offline"})
    r = read_run(folder, wait=WAIT)
    assert r.exit_code == 0 and r.summary["status"] == "completed" and r.job_type == "sweep-summary"
    assert r.config["direction"] == ["maximize", "minimize"]
    assert r.summary["sweep/trials.nrows"] == 4
    assert (r.summary["n_complete"], r.summary["n_fail"]) == (3, 1)
    assert [row["sweep/trial"] for row in r.history if "sweep/value_0" in row] == [0, 1, 2]
    assert r.values("sweep/value_0") == [0.2, 0.5, 0.4] and r.values("sweep/value_1") == [5.0, 9.0, 3.0]
    assert sorted(r.summary["best_trials"]) == [1, 2]  # the Pareto front: (0.5, 9.0) and (0.4, 3.0)


# ---- make wandb-sync on half-written and damaged runs ------------------------------------------------------


def test_sync_lists_half_written_and_damaged_runs_by_their_folder(tmp_path, no_credentials, capsys):  # noqa: F811
    """A run whose W&B process died at the start (an empty or header-only .wandb file) was listed with a
    blank name; a run cut short mid-record or a file that is not W&B's must not stop the listing either."""
    run = init_wandb_run(name="whole", save_dir=tmp_path / "whole", config={"a": 1}, mode="offline")
    for step in range(200):
        run.log({"x": step, "pad": "y" * 200})
    run.finish()
    [whole] = find_offline_runs([tmp_path / "whole"])
    assert read_run(whole, wait=WAIT).exit_code == 0
    data = next(whole.glob("run-*.wandb")).read_bytes()
    assert len(data) > 40000
    cases = {"empty": b"", "header": data[:7], "cut": data[:40000], "garbage": b"not a run at all\n"}
    for i, (case, content) in enumerate(cases.items()):
        folder = tmp_path / "runs" / case / "wandb" / f"offline-run-20250101_00000{i}-{case}id"
        folder.mkdir(parents=True)
        (folder / f"run-{case}id.wandb").write_bytes(content)

    capsys.readouterr()
    assert sync_main([str(tmp_path / "runs"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "4 offline W&B run(s)" in out
    lines = out.splitlines()
    assert any(line.split()[:2] == ["emptyid", "-"] for line in lines), out  # named by the folder's id
    assert any(line.split()[:2] == ["headerid", "-"] for line in lines), out
    assert any(line.split()[:3] == ["whole", "train", "running/crashed"] for line in lines), out  # cut short
    assert "not a W&B run file" in out


def test_sync_of_a_path_that_does_not_exist_is_an_error_naming_it(tmp_path, capsys):
    """A mistyped path said "no offline W&B runs to upload" and exited 0, as if all were uploaded."""
    (tmp_path / "runs").mkdir()
    missing = tmp_path / "runz"
    assert sync_main([str(tmp_path / "runs"), str(missing), "--dry-run"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(missing) in err[0] and "does not exist" in err[0], err
    assert sync_main([str(tmp_path / "runs"), "--dry-run"]) == 0  # an existing, empty folder: nothing to do


# ---- Ctrl-C ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_ctrl_c_leaves_a_finished_failed_run_with_what_was_logged(tmp_path):
    """Ctrl-C in a terminal (SIGINT to the whole process group, W&B's service included): the run is finished
    (exit code 1, state failed, status interrupted), keeps the epochs logged before, and can be listed."""
    out = tmp_path / "run"
    args = [*(a for a in SMALL if not a.startswith("trainer.max_epochs")), "trainer.max_epochs=100"]
    args.append("run_name=stopped")
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *args, f"hydra.run.dir={out}"],
        cwd=tmp_path,
        env=clean_env(tmp_path),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not (out / "checkpoints" / "last.ckpt").is_file() and time.monotonic() < deadline:
            time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=60) == 1
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    [folder] = find_offline_runs([out])
    r = read_run(folder, wait=WAIT)
    assert r.name == "stopped" and r.exit_code == 1 and r.state == "failed"
    assert r.summary["status"] == "interrupted"
    assert len(r.values("val/acc")) >= 1
    assert sync_main([str(out), "--dry-run"]) == 0
