"""W&B runs as a reviewer sees them, read back from the offline runs' own files (no account, no network).

Each slow test makes its real runs once and checks everything about them (one test per set of runs, so
that ``pytest -n 2`` never makes the same runs in two workers): a 3-job multirun (sgd, adam, rmsprop) in
one group, a run that fails mid-training, a sweep summary run, a real synthetic Optuna sweep.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from cifarlab.loggers import flatten, has_api_key, init_wandb_run, reachable, run_tags, short_number
from cifarlab.wandb_sync import find_offline_runs, read_run
from cifarlab.wandb_sync import main as sync_main
from tests.conftest import ROOT, compose_train

GROUP = "wandb-test-group"
SMALL = [
    "data=synthetic",
    "data.train_size=1500",
    "data.val_size=300",
    "data.test_size=300",
    "data.batch_size=128",
    "data.eval_batch_size=300",
    "trainer.max_epochs=2",
    "trainer.limit_train_batches=4",
    "logger=wandb",
    "logger.grad_norm_every_n_steps=2",
]
CLOSED_PORT = "http://127.0.0.1:9"  # nothing listens on the discard port: connections are refused at once
FAKE_KEY = "x" * 40
WAIT = 20  # seconds: W&B's service may still be writing a run's file just after run.finish()


def wandb_env(root: Path) -> dict[str, str]:
    """Every W&B/matplotlib folder in ``root``, offline, and no credentials from the real environment."""
    env = {
        var: str(root / var.lower())
        for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "MPLCONFIGDIR")
    }
    empty_netrc = root / "netrc"
    empty_netrc.touch()
    env.update(
        WANDB_MODE="offline",
        WANDB_SILENT="true",
        CIFARLAB_DATA_DIR=str(root / "data"),
        NETRC=str(empty_netrc),
        HOME=str(root / "home"),
    )
    return env


@pytest.fixture
def no_credentials(tmp_path, monkeypatch):
    for var in (
        "WANDB_API_KEY",
        "WANDB_IDENTITY_TOKEN_FILE",
        "WANDB_BASE_URL",
        "HTTPS_PROXY",
        "https_proxy",
        "HTTP_PROXY",
        "http_proxy",
    ):
        monkeypatch.delenv(var, raising=False)
    for key, value in wandb_env(tmp_path).items():
        monkeypatch.setenv(key, value)


# ---- fast: names, tags, flat config, key and network checks --------------------------------------------------


def test_flatten_gives_one_column_per_setting():
    assert flatten({"optimizer": {"lr": 0.1, "betas": [0.9, 0.99]}, "seed": 1, "extras": {}}) == {
        "optimizer.lr": 0.1,
        "optimizer.betas": [0.9, 0.99],
        "seed": 1,
        "extras": {},
    }


def test_short_numbers_for_run_names():
    assert [short_number(x) for x in (3e-4, 0.001, 0.00125, 0.05, 0.1, 1.0, 1e6, 0)] == [
        "3e-4",
        "1e-3",
        "1.25e-3",
        "0.05",
        "0.1",
        "1",
        "1e6",
        "0",
    ]


def test_default_run_name_and_tags():
    from cifarlab.train import default_run_name

    cfg = compose_train(
        ["optimizer=rmsprop", "optimizer.lr=3e-4", "scheduler=cosine", "model.init=orthogonal"]
    )
    assert default_run_name(cfg) == "rmsprop-lr3e-4-cosine"
    from omegaconf import OmegaConf

    tags = run_tags(OmegaConf.to_container(cfg, resolve=True), ["mine"])
    assert tags == [
        "optimizer:rmsprop",
        "scheduler:cosine",
        "init:orthogonal",
        "activation:relu",
        "data:cifar10",
        "mine",
    ]


def test_api_key_from_env_or_netrc(no_credentials, tmp_path, monkeypatch):
    assert not has_api_key("https://api.wandb.ai")
    netrc = tmp_path / "netrc_with_key"
    netrc.write_text(f"machine api.wandb.ai\n  login user\n  password {FAKE_KEY}\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    assert has_api_key("https://api.wandb.ai") and not has_api_key("https://wandb.example.com")
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    assert has_api_key("https://wandb.example.com")


def test_an_unreachable_server_is_known_at_once():
    start = time.perf_counter()
    assert not reachable(CLOSED_PORT, timeout=2)
    assert not reachable("http://does-not-exist.invalid", timeout=2)
    assert time.perf_counter() - start < 4.5


@pytest.mark.slow
def test_online_without_network_or_key_logs_offline_within_seconds(
    no_credentials, tmp_path, monkeypatch, capsys
):
    """logger.mode=online: an unreachable server (or no API key) costs a one-line message, not a hang, and
    the run still logs, offline."""
    monkeypatch.setenv("WANDB_BASE_URL", CLOSED_PORT)
    # What an offline start costs on this machine right now (W&B's service process): the bound below is
    # measured against it, so a loaded machine does not fail the test, and a network wait still would.
    start = time.perf_counter()
    baseline = init_wandb_run(name="baseline", save_dir=tmp_path / "baseline", config={}, mode="offline")
    offline_start = time.perf_counter() - start
    baseline.finish()
    capsys.readouterr()
    for case, key in (("unreachable", FAKE_KEY), ("no key", None)):
        if key:
            monkeypatch.setenv("WANDB_API_KEY", key)
        else:
            monkeypatch.delenv("WANDB_API_KEY", raising=False)
        start = time.perf_counter()
        run = init_wandb_run(
            name=case, save_dir=tmp_path / case, config={"a.b": 1}, mode="online", init_timeout=30
        )
        waited = time.perf_counter() - start
        run.log({"val/acc": 0.5})
        run.finish()
        assert waited < offline_start + 5, (
            f"{case}: wandb.init took {waited:.1f}s (offline start {offline_start:.1f}s)"
        )
        message = capsys.readouterr().err
        assert "logging offline" in message and len(message.strip().splitlines()) == 1, message
        [folder] = find_offline_runs([tmp_path / case])
        back = read_run(folder, wait=WAIT)
        assert back.name == case and back.values("val/acc") == [0.5] and back.config == {"a.b": 1}


# ---- slow: real runs -----------------------------------------------------------------------------------------


def clean_env(root: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_") and "PROXY" not in k.upper()}
    env.update(wandb_env(root), PYTHONUNBUFFERED="1")
    return env


def train_py(args: list[str], root: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=root,
        env=clean_env(root),
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.mark.slow
def test_a_multirun_makes_one_complete_run_per_job_in_one_group(tmp_path):
    """python train.py -m ... optimizer=sgd,adam,rmsprop logger=wandb logger.group=GROUP"""
    multirun = tmp_path / "multirun"
    train_py(
        [
            "-m",
            *SMALL,
            "optimizer=sgd,adam,rmsprop",
            f"logger.group={GROUP}",
            "logger.log_model=true",
            f"hydra.sweep.dir={multirun}",
        ],
        tmp_path,
    )
    runs = {}
    for job in ("0", "1", "2"):
        [folder] = find_offline_runs([multirun / job])
        runs[job] = read_run(folder, wait=WAIT)

    # Three distinct runs, one group, readable names, tags, finished.
    assert len({r.id for r in runs.values()}) == 3 and {r.group for r in runs.values()} == {GROUP}
    assert {r.job_type for r in runs.values()} == {"train"} and {r.project for r in runs.values()} == {
        "cifarlab"
    }
    assert [runs[j].name for j in "012"] == [
        "sgd-lr0.01-const-j0",
        "adam-lr1e-3-const-j1",
        "rmsprop-lr1e-3-const-j2",
    ]
    for job, r in runs.items():
        optimizer = r.name.split("-")[0]
        assert {f"optimizer:{optimizer}", "scheduler:none", "init:kaiming_uniform", "data:synthetic"} <= set(
            r.tags
        )
        assert r.exit_code == 0 and r.summary["status"] == "completed"

        # The config: the resolved config, flat.
        saved = flatten(yaml.safe_load((multirun / job / "config.yaml").read_text()))
        assert r.config == saved and {"optimizer.lr", "model.dropout", "data.train_size"} <= set(saved)

        # The history: every epoch, and the gradient norms every 2 of the 8 steps.
        assert len(r.values("val/acc")) == 2 and len(r.values("train/loss")) == 2
        assert len(r.values("test/acc")) == 1 and 0 <= r.summary["test/acc"] <= 1
        steps = [row["trainer/global_step"] for row in r.history if "grad_norm/features.0.weight" in row]
        assert steps == [0, 2, 4, 6]
        assert {
            "grad_norm/classifier.4.weight",
            "weight_norm/features.0.weight",
            "grad_norm/total",
            "grad_norm/first_to_last_ratio",
        } <= set(r.summary)
        assert r.folder.joinpath(f"run-{r.id}.wandb").stat().st_size > 32768  # records across LevelDB blocks

        # The end-of-run report and the best checkpoint.
        s = r.summary
        assert s["test/confusion_matrix_table.nrows"] == 100  # (true, predicted) for 10 x 10 classes
        assert (
            s["test/per_class_accuracy_table.nrows"] == 10
            and s["test/misclassified._type"] == "images/separated"
        )
        assert {
            "figures/confusion_matrix.path",
            "figures/per_class_accuracy.path",
            "figures/learning_curves.path",
            "figures/misclassified.path",
        } <= set(s)
        assert (r.folder / "files" / s["figures/confusion_matrix.path"]).is_file()
        assert 0 <= s["test/worst_class_acc"] == min(s[f"test/acc_class/{c}"] for c in range(10))
        assert f"model-{r.id}:model" in r.artifacts

        # The same pictures as PNG files in the run folder.
        for name in ("confusion_matrix", "per_class_accuracy", "learning_curves", "misclassified"):
            assert (multirun / job / "figures" / f"{name}.png").stat().st_size > 1000


@pytest.mark.slow
def test_a_failed_run_is_marked_failed(tmp_path):
    """A run that fails in its second epoch (an injected error, in-process): state failed, status failed."""
    from cifarlab.module import CifarModule
    from cifarlab.train import run

    original = CifarModule.on_train_epoch_end

    def failing(self):
        original(self)
        if self.current_epoch == 1:
            raise FloatingPointError("injected: training diverged")

    with pytest.MonkeyPatch.context() as mp:
        for key, value in wandb_env(tmp_path).items():
            mp.setenv(key, value)
        mp.setattr(CifarModule, "on_train_epoch_end", failing)
        with pytest.raises(FloatingPointError):
            run(compose_train([*SMALL, "optimizer=sgd", "run_name=doomed"], tmp_path / "run"))
    [folder] = find_offline_runs([tmp_path / "run"])
    r = read_run(folder, wait=WAIT)
    assert r.name == "doomed" and r.exit_code == 1 and r.state == "failed"
    assert r.summary["status"] == "failed" and "injected" in r.summary["error"]
    assert len(r.values("val/acc")) == 2  # what it logged before failing is kept
    assert (tmp_path / "run" / "figures" / "learning_curves.png").is_file()


def fake_sweep(sweep_dir: Path):
    """A small Optuna study (3 complete trials, 1 pruned, 1 failed) and the files a sweeper leaves."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=GROUP, direction="maximize")
    space = {
        "optimizer": optuna.distributions.CategoricalDistribution(["sgd", "adam", "rmsprop"]),
        "lr": optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True),
    }
    for number, value in enumerate([0.2, 0.5, 0.4]):
        trial = study.ask(space)
        job = sweep_dir / f"trial_{number:04d}"
        job.mkdir(parents=True)
        (job / "config.yaml").write_text(
            f"optimizer:\n  _target_: torch.optim.X{number}\n  lr: 0.1\nseed: {number}\n"
        )
        trial.set_user_attr("job_dir", str(job))
        study.tell(trial, value)
    pruned = study.ask(space)
    pruned.report(0.1, 0)
    study.tell(pruned, state=optuna.trial.TrialState.PRUNED)
    study.tell(study.ask(), state=optuna.trial.TrialState.FAIL)
    (sweep_dir / "trials.csv").write_text("number,state,value\n0,COMPLETE,0.2\n")
    (sweep_dir / "optimization_results.yaml").write_text(
        f"name: {GROUP}\nbest_params: {{}}\nbest_value: 0.5\n"
    )
    return study


@pytest.mark.slow
def test_sweep_summary_run_and_sync(tmp_path, no_credentials, capsys):
    from cifarlab.loggers import log_sweep_summary

    sweep_dir = tmp_path / "sweep"
    study = fake_sweep(sweep_dir)
    folder = log_sweep_summary(
        study, sweep_dir, GROUP, {"name": "wandb", "mode": "offline", "project": "cifarlab"}
    )
    r = read_run(folder, wait=WAIT)
    assert (
        r.job_type == "sweep-summary"
        and r.group == GROUP
        and r.exit_code == 0
        and r.name == f"{GROUP}-summary"
    )
    s = r.summary
    assert s["best_value"] == 0.5 and s["best_trial"] == study.best_trial.number == 1
    assert (s["n_complete"], s["n_pruned"], s["n_fail"]) == (3, 1, 1)
    assert s["sweep/trials.nrows"] == 5 and s["sweep/trials._type"] == "table-file"
    assert r.values("sweep/best_value") == [0.2, 0.5, 0.5]
    # No PNGs in the sweep folder: Optuna's plots are made here.
    assert {
        "plots/optimization_history.path",
        "plots/param_importances.path",
        "plots/parallel_coordinate.path",
    } <= set(s)
    # The best config is the best trial's own resolved config (its job folder's config.yaml).
    assert r.config["best.optimizer._target_"] == "torch.optim.X1" and r.config["best.seed"] == 1
    assert (r.folder / "files" / "trials.csv").is_file() and (
        r.folder / "files" / "optimization_results.yaml"
    ).is_file()
    assert log_sweep_summary(study, sweep_dir, GROUP, {"name": "none"}) is None

    # make wandb-sync: lists the offline runs; without a login it uploads nothing and says so.
    capsys.readouterr()
    assert sync_main([str(sweep_dir), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert (
        "1 offline W&B run(s)" in out and f"{GROUP}-summary  sweep-summary  completed  group {GROUP}" in out
    )
    assert sync_main([str(sweep_dir)]) == 1
    assert "not logged in" in capsys.readouterr().err
    (tmp_path / "nothing-here").mkdir()
    assert sync_main([str(tmp_path / "nothing-here")]) == 0  # no runs: nothing to do (a missing path: exit 1)
    assert "no offline W&B runs" in capsys.readouterr().out


@pytest.mark.slow
def test_a_synthetic_sweep_leaves_one_run_per_trial_and_a_summary(tmp_path):
    """python train.py -m hparams_search=synthetic_tiny logger=wandb: each trial a sweep-trial run, then the
    sweep's summary run, all in the study's group; PNG figures in every trial folder."""
    sweep_dir = tmp_path / "sweep"
    train_py(
        [
            "-m",
            "hparams_search=synthetic_tiny",
            "logger=wandb",
            "callbacks.figures=true",
            "hydra.sweeper.n_trials=2",
            "trainer.max_epochs=2",
            "trainer.limit_train_batches=3",
            f"hydra.sweep.dir={sweep_dir}",
        ],
        tmp_path,
    )
    runs = [read_run(f, wait=WAIT) for f in find_offline_runs([sweep_dir])]
    assert sorted(r.job_type for r in runs) == ["sweep-summary", "sweep-trial", "sweep-trial"]
    assert {r.group for r in runs} == {"synthetic_tiny"} and {r.exit_code for r in runs} == {0}
    trials = sorted((r for r in runs if r.job_type == "sweep-trial"), key=lambda r: r.name)
    assert [r.name for r in trials] == ["synthetic_tiny-0000", "synthetic_tiny-0001"]
    for r in trials:
        assert len(r.values("val/acc")) == 2 and r.summary["status"] == "completed"
        assert "trial:" + r.name[-1] in r.tags
        assert "val/confusion_matrix_table.nrows" in r.summary  # no test split in this search: on val
        for name in ("confusion_matrix", "per_class_accuracy", "learning_curves", "misclassified"):
            assert (Path(r.config["output_dir"]) / "figures" / f"{name}.png").is_file()
    [summary] = [r for r in runs if r.job_type == "sweep-summary"]
    assert summary.summary["sweep/trials.nrows"] == 2 and summary.summary["n_complete"] == 2
    assert "plots/optimization_history.path" in summary.summary  # the sweeper's own PNG
    assert summary.summary["best_value"] == max(r.summary["val/acc_best"] for r in trials)
