"""Fast tests of the Optuna sweeper: search spaces, device slots, budget/stale bookkeeping, results files,
plugin discovery. No subprocesses (those are in test_sweeper_e2e.py)."""

from __future__ import annotations

import csv
import functools
import json
import os
import pickle
import random
import re
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from cifarlab.sweeper.results import summary_table, write_plots, write_results
from cifarlab.sweeper.runner import SweepSettings, claim_dir, instantiate_target, log_error, worker_main
from cifarlab.sweeper.slots import Slot, SlotError, SlotPool, plan_slots, visible_gpus
from cifarlab.sweeper.space import SearchSpaceError, build_space, normalise, value_text
from cifarlab.sweeper.study import (
    FAIL_REASON,
    OWNER,
    RETRIED,
    RETRY_OF,
    Owner,
    budget_used,
    fail_trial,
    rank_in_budget,
    recover_stale,
    storage_spec,
)

ROOT = Path(__file__).resolve().parents[1]
optuna.logging.set_verbosity(optuna.logging.WARNING)


# ---- search spaces --------------------------------------------------------------------------------------------


def test_stock_syntax_maps_to_optuna_distributions():
    space, passthrough = build_space(
        {
            "optimizer": "choice(sgd, momentum, adam)",
            "optimizer.lr": "tag(log, interval(1e-4, 1e-1))",
            "model.dropout": "interval(0.0, 0.6)",
            "trainer.max_epochs": "interval(5, 20)",
            "data.batch_size": "range(32, 256, 32)",
            "x": "range(0.1, 0.5, 0.1)",
            "model.init": "kaiming_uniform",
            "n": 3,
        }
    )
    p = space.params
    assert p["optimizer"] == CategoricalDistribution(["sgd", "momentum", "adam"])
    assert p["optimizer.lr"] == FloatDistribution(1e-4, 1e-1, log=True)
    assert p["model.dropout"] == FloatDistribution(0.0, 0.6)
    assert p["trainer.max_epochs"] == IntDistribution(5, 20)
    assert p["data.batch_size"] == IntDistribution(32, 256, step=32)  # stop included, as in the stock plugin
    assert p["x"].step == pytest.approx(0.1) and p["x"].high == pytest.approx(0.5)
    assert space.fixed == {"model.init": "kaiming_uniform", "n": "3"}
    assert passthrough == []


def test_command_line_sweeps_join_the_space_and_plain_values_fix_a_key():
    space, passthrough = build_space(
        {"model.dropout": "interval(0.0, 0.5)", "optimizer.lr": "interval(0.001, 0.1)"},
        ["hparams_search=tiny", "model.dropout=0.2", "trainer.max_epochs=3,4", "+extra=1"],
    )
    assert "model.dropout" not in space.params  # a plain value on the command line wins (stock behaviour)
    assert space.params["trainer.max_epochs"] == CategoricalDistribution([3, 4])
    assert passthrough == ["hparams_search=tiny", "model.dropout=0.2", "+extra=1"]


def test_choice_values_round_trip_to_override_text():
    space, _ = build_space({"s": "choice('a b', '1.0', [0.9,0.999], true, 3, adam)"})
    dist = space.params["s"]
    texts = {c: space.format("s", c) for c in dist.choices}
    assert texts == {
        "a b": "a b",
        "1.0": "'1.0'",
        "[0.9,0.999]": "[0.9,0.999]",
        True: "true",
        3: "3",
        "adam": "adam",
    }
    assert (
        value_text(0.30000000000000004) == "0.3"
        and value_text(100.0) == "100.0"
        and value_text(1e-5) == "1e-05"
    )
    assert value_text("x=y") == "'x=y'" and value_text("course/adam") == "course/adam"


def test_bad_search_space_settings_say_which_key():
    with pytest.raises(SearchSpaceError, match="lr"):
        build_space({"lr": "tag(log, interval(0, 1))"})
    with pytest.raises(SearchSpaceError, match="params.bad"):
        build_space({"bad": "interval(1"})
    with pytest.raises(SearchSpaceError, match="when"):
        build_space({}, conditional={"a": {"space": "interval(0.0, 1.0)"}})
    with pytest.raises(SearchSpaceError, match="cycle"):
        build_space(
            {},
            conditional={
                "a": {"when": {"b": 1}, "space": "choice(1, 2)"},
                "b": {"when": {"a": 1}, "space": "choice(1, 2)"},
            },
        )


def _sample(space, n=60, seed=0):
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    out = []
    for _ in range(n):
        trial = study.ask(space.params)
        params = space.suggest_conditional(trial)
        out.append((params, space.overrides(params)))
        study.tell(trial, 0.0)
    return out


def test_conditional_parameters_are_searched_only_when_their_condition_holds():
    space, _ = build_space(
        {
            "optimizer": "choice(sgd, momentum, nesterov, adam, adamw)",
            "optimizer.lr": "tag(log, interval(1e-4, 1e-1))",
        },
        conditional={
            "optimizer.momentum": {
                "when": {"optimizer": ["momentum", "nesterov"]},
                "space": "interval(0.5, 0.99)",
            },
            "optimizer.betas": {
                "when": {"optimizer": ["adam", "adamw"]},
                "space": "choice([0.9,0.999],[0.8,0.99])",
            },
            # depends on another conditional: evaluated after it whatever the order here
            "optimizer.dampening": {"when": {"optimizer.momentum": "0.5"}, "space": "choice(0.0, 0.1)"},
        },
    )
    assert [c.name for c in space.conditional][-1] == "optimizer.dampening"
    seen = set()
    for params, overrides in _sample(space):
        opt = params["optimizer"]
        seen.add(opt)
        assert ("optimizer.momentum" in params) == (opt in ("momentum", "nesterov"))
        assert ("optimizer.betas" in params) == (opt in ("adam", "adamw"))
        assert "optimizer.dampening" not in params  # momentum is never exactly 0.5
        if "optimizer.betas" in params:
            assert (
                f"optimizer.betas={params['optimizer.betas']}" in overrides
            )  # list syntax, not a quoted string
    assert seen == {"sgd", "momentum", "nesterov", "adam", "adamw"}


def test_conditions_can_look_at_fixed_params_and_the_composed_config():
    space, _ = build_space(
        {"optimizer.lr": "interval(0.001, 0.1)", "scheduler": "cosine"},
        conditional={
            "optimizer.momentum": {"when": {"optimizer": "sgd"}, "space": "interval(0.5, 0.9)"},
            "scheduler.warmup_epochs": {"when": {"scheduler": "cosine"}, "space": "choice(0, 1)"},
        },
        context={"optimizer": "sgd"},
    )
    params, overrides = _sample(space, n=1)[0]
    assert {"optimizer.momentum", "scheduler.warmup_epochs"} <= set(params)
    assert "scheduler=cosine" in overrides
    assert normalise(1.0) == "1" and normalise(True) == "true" and normalise("'a'") == "a"


def test_grid_needs_discrete_values():
    space, _ = build_space({"a": "choice(1, 2)", "b": "range(0, 4, 2)", "c": "range(0.0, 1.0, 0.5)"})
    assert space.grid() == {"a": [1, 2], "b": [0, 2, 4], "c": [0.0, 0.5, 1.0]}
    with pytest.raises(SearchSpaceError, match="continuous"):
        build_space({"a": "interval(0.0, 1.0)"})[0].grid()


@pytest.mark.parametrize("name", ["cifar10_optuna", "synthetic_tiny", "course_optimizers"])
def test_shipped_search_configs_parse_and_name_existing_options(name):
    path = ROOT / "conf" / "hparams_search" / f"{name}.yaml"
    if not path.exists():
        pytest.skip(f"{path.name} not in this checkout")
    sweeper = yaml.safe_load(path.read_text())["hydra"]["sweeper"]
    space, _ = build_space(sweeper.get("params"), conditional=sweeper.get("conditional"))
    groups = {"optimizer", "scheduler"}
    for key, dist in space.params.items():
        if key in groups:
            for option in dist.choices:
                assert (ROOT / "conf" / key / f"{option}.yaml").exists(), (
                    f"{key}={option} is not a config option"
                )
    for cond in space.conditional:
        for key, values in cond.when.items():
            if key in groups:
                assert set(values) <= set(space.params[key].choices), f"{cond.name}: {values} never chosen"


# ---- device slots ---------------------------------------------------------------------------------------------


def test_gpu_slots_spread_over_gpus_and_pin_one_each():
    slots = plan_slots("auto", gpus=["0", "1"], trials_per_gpu=2, cores=8)
    assert [s.name for s in slots] == ["gpu0", "gpu1", "gpu0#1", "gpu1#1"]
    assert [s.env()["CUDA_VISIBLE_DEVICES"] for s in slots] == ["0", "1", "0", "1"]
    assert all(s.env()["OMP_NUM_THREADS"] == "2" for s in slots)
    pairs = plan_slots([4, 5, 6, 7], gpus_per_trial=2, cores=4)
    assert [s.env()["CUDA_VISIBLE_DEVICES"] for s in pairs] == ["4,5", "6,7"]


def test_cpu_slots_split_the_cores():
    slots = plan_slots("auto", n_jobs=3, gpus=[], cores=8)
    assert [(s.name, s.threads) for s in slots] == [("cpu0", 2), ("cpu1", 2), ("cpu2", 2)]
    assert "CUDA_VISIBLE_DEVICES" not in slots[0].env()  # no GPU found: leave the variable alone
    cpu = plan_slots("cpu", gpus=["0"], cores=2)[0]  # devices=cpu ignores GPUs and hides them
    assert cpu.kind == "cpu" and cpu.env()["CUDA_VISIBLE_DEVICES"] == ""
    assert len(plan_slots("auto", n_jobs=None, gpus=[], cores=2)) == 1
    with pytest.raises(SlotError, match="no GPU"):
        plan_slots("gpu", gpus=[])
    with pytest.raises(SlotError, match="twice"):
        plan_slots([0, 0])


def test_visible_gpus_reads_cuda_visible_devices_without_cuda():
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "2,3"}) == ["2", "3"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": ""}) == []
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "1,-1,2"}) == ["1"]


@pytest.mark.parametrize("gpus,per_gpu", [(["0"], 1), (["0", "1", "2"], 2), ([], 1)])
def test_slot_pool_never_hands_a_slot_to_two_trials(gpus, per_gpu):
    pool = SlotPool(plan_slots("auto", n_jobs=2, gpus=gpus, trials_per_gpu=per_gpu, cores=4))
    rng = random.Random(0)
    held: dict[int, Slot] = {}
    for number in range(500):
        if held and (rng.random() < 0.5 or pool.n_free == 0):
            owner = rng.choice(list(held))
            pool.release(held.pop(owner), owner)
        else:
            slot = pool.acquire(number)
            assert slot is not None
            held[number] = slot
        taken = [s.index for s in held.values()]
        assert len(taken) == len(set(taken)), "one slot given to two trials"
        assert pool.n_busy == len(held) and pool.acquire(-1) is None if pool.n_free == 0 else True
    some = next(iter(held.items()), None)
    if some:
        with pytest.raises(RuntimeError):
            pool.release(some[1], "someone else")


# ---- storage, budget, stale trials -------------------------------------------------------------------------------


def test_storage_specs(tmp_path):
    assert storage_spec(None, "sweep", tmp_path) == f"journal:{tmp_path}/sweep/journal.log"
    assert storage_spec("studies/a.log", "sweep", tmp_path) == f"journal:{tmp_path}/studies/a.log"
    assert storage_spec("sqlite:///a.db", "s", tmp_path) == f"sqlite:///{tmp_path}/a.db"
    assert storage_spec("postgresql://u:pw@h/db", "s", tmp_path) == "postgresql://u:pw@h/db"


def _journal_study(tmp_path, name="s"):
    from cifarlab.sweeper.study import make_storage, open_study

    spec = f"journal:{tmp_path}/journal.log"
    return open_study(spec, name, ["maximize"], storage=make_storage(spec))


def test_budget_counts_finished_and_running_but_not_retried_failures(tmp_path):
    study = _journal_study(tmp_path)
    dist = {"x": FloatDistribution(0, 1)}
    t0, t1, t2, t3 = (study.ask(dist) for _ in range(4))
    study.tell(t0, 0.5)
    t1.report(0.1, 0)
    study.tell(t1, state=TrialState.PRUNED)
    fail_trial(study, t2.number, "error", "boom")  # the trial's own failure: counts
    assert fail_trial(study, t3.number, "interrupted", "stopped", retry=True) == t3.number
    trials = study.get_trials()
    assert [t.state for t in trials] == [
        TrialState.COMPLETE,
        TrialState.PRUNED,
        TrialState.FAIL,
        TrialState.FAIL,
        TrialState.WAITING,
    ]
    assert trials[1].values == [0.1]  # a pruned trial keeps its last reported value
    assert trials[3].user_attrs[RETRIED] and not trials[2].user_attrs[RETRIED]
    assert trials[4].user_attrs[RETRY_OF] == t3.number
    assert budget_used(trials) == 3
    retry = study.ask(dist)
    assert retry.number == 4 and retry.params["x"] == trials[3].params["x"]
    assert rank_in_budget(study.get_trials(), retry.number) == 4
    assert fail_trial(study, t0.number, "x", "already finished") is None


def test_trials_of_a_dead_sweep_process_are_failed_and_queued_again(tmp_path):
    study = _journal_study(tmp_path)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    me = Owner.me()
    trials = [study.ask({"x": FloatDistribution(0, 1)}) for _ in range(3)]
    trials[0].set_user_attr(OWNER, str(Owner(me.host, dead.pid, "1")))  # same host, gone
    trials[1].set_user_attr(OWNER, str(me))  # ours: untouched
    trials[2].set_user_attr(OWNER, "elsewhere:1:1")  # another host, no heartbeat yet: judged by start time
    assert recover_stale(study, me, stale_after=3600, max_retries=3) == [trials[0].number]
    assert recover_stale(study, me, stale_after=-1, max_retries=3) == [trials[2].number]
    states = [t.state for t in study.get_trials()]
    assert states == [
        TrialState.FAIL,
        TrialState.RUNNING,
        TrialState.FAIL,
        TrialState.WAITING,
        TrialState.WAITING,
    ]
    assert study.get_trials()[0].user_attrs[FAIL_REASON] == "stale"


def test_job_folders_are_never_reused(tmp_path):
    a = claim_dir(tmp_path, 7)
    (a / "metrics.json").write_text("{}")
    b = claim_dir(tmp_path, 7)
    assert a.name == "trial_0007" and b.name == "trial_0007-1" and (a / "metrics.json").exists()


def test_error_line_from_a_trial_log(tmp_path):
    log = tmp_path / "trial.log"
    log.write_text(
        "$ python train.py\nstuff\nerror: model.dropout=1.5 is not allowed; allowed: 0 <= dropout < 1\n"
    )
    assert (
        log_error(log, 1)
        == "exited with code 1: error: model.dropout=1.5 is not allowed; allowed: 0 <= dropout < 1"
    )
    assert log_error(tmp_path / "missing.log", -9) == "killed by SIGKILL (out of memory?)"


def test_instantiate_target_drops_leftover_keys(caplog):
    config = {"_target_": "optuna.pruners.ThresholdPruner", "lower": 0.1, "n_startup_trials": 5}
    with caplog.at_level("WARNING", logger="cifarlab.sweeper"):
        pruner = instantiate_target(config, "pruner")
    assert isinstance(pruner, optuna.pruners.ThresholdPruner)
    assert "ThresholdPruner does not take n_startup_trials; ignored" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="cifarlab.sweeper"):
        assert isinstance(instantiate_target(config, "pruner", warn=False), optuna.pruners.ThresholdPruner)
    assert caplog.text == ""


def test_launcher_worker_task_pickles():
    settings = SweepSettings(
        study_name="s", storage="journal:/tmp/x.log", sweep_dir="/tmp/x", task_command=["x"]
    )
    task = pickle.loads(pickle.dumps(functools.partial(worker_main, settings)))
    assert task.args[0].study_name == "s"


# ---- results -----------------------------------------------------------------------------------------------------


def _finished_study(directions=("maximize",), n=6):
    study = optuna.create_study(directions=list(directions), sampler=optuna.samplers.RandomSampler(seed=0))
    for i in range(n):
        trial = study.ask(
            {
                "optimizer": CategoricalDistribution(["sgd", "adam"]),
                "lr": FloatDistribution(1e-4, 1e-1, log=True),
            }
        )
        trial.set_user_attr("job_dir", f"/sweep/trial_{i:04d}")
        trial.set_user_attr("overrides", ["hparams_search=x", f"lr={trial.params['lr']}", "hydra.run.dir=/x"])
        for step in range(2):
            if len(directions) == 1:
                trial.report(0.1 * step + trial.params["lr"], step)
        if i == 2:
            trial.set_user_attr("error", "FloatingPointError: training diverged")
            trial.set_user_attr("fail_reason", "nan")
            study.tell(trial, state=TrialState.FAIL)
        elif i == 3 and len(directions) == 1:
            study.tell(trial, state=TrialState.PRUNED)
        else:
            study.tell(trial, [trial.params["lr"] * (k + 1) for k in range(len(directions))])
    return study


def test_results_yaml_and_csv(tmp_path):
    study = _finished_study()
    write_results(study, tmp_path, ["val/acc_best"], "journal:/x/journal.log")
    data = yaml.safe_load((tmp_path / "optimization_results.yaml").read_text())
    best = max((t for t in study.trials if t.state == TrialState.COMPLETE), key=lambda t: t.value)
    assert (
        data["name"] == "optuna" and data["best_value"] == best.value and data["best_params"] == best.params
    )
    assert data["best_overrides"] == ["hparams_search=x", f"lr={best.params['lr']}"]
    assert data["trials"]["complete"] == 4 and data["trials"]["pruned"] == 1 and data["trials"]["failed"] == 1
    rows = list(csv.DictReader((tmp_path / "trials.csv").open()))
    assert [r["state"] for r in rows] == ["COMPLETE", "COMPLETE", "FAIL", "PRUNED", "COMPLETE", "COMPLETE"]
    assert rows[2]["fail_reason"] == "nan" and "diverged" in rows[2]["error"]
    assert {"params:optimizer", "params:lr", "value", "duration_s", "job_dir"} <= set(rows[0])
    assert not list(tmp_path.glob(".*.tmp"))
    table = summary_table(study, study.trials, ["val/acc_best"])
    assert "4 complete, 1 pruned, 1 failed" in table and "trial 2 FAIL [nan]" in table


def test_multi_objective_results_list_the_pareto_front(tmp_path):
    study = _finished_study(("maximize", "minimize"))
    write_results(study, tmp_path, ["val/acc_best", "duration_s"], "sqlite:///x.db")
    data = yaml.safe_load((tmp_path / "optimization_results.yaml").read_text())
    assert data["solutions"] and set(data["solutions"][0]["values"]) == {"val/acc_best", "duration_s"}
    assert "value:duration_s" in (tmp_path / "trials.csv").read_text().splitlines()[0]


def test_plots_are_written_or_skipped(tmp_path):
    made = write_plots(_finished_study(), tmp_path, ["val/acc_best"])
    assert (
        made["optimization_history.png"] == "ok"
        and (tmp_path / "optimization_history.png").stat().st_size > 0
    )
    assert made["intermediate_values.png"] == "ok" and made["param_importances.png"] == "ok"
    few = optuna.create_study()
    few.enqueue_trial({})
    few.tell(few.ask(), state=TrialState.FAIL)
    made = write_plots(few, tmp_path / "few", ["val/acc_best"])
    assert made["param_importances.png"].startswith("skipped")


# ---- in-trial reporting -----------------------------------------------------------------------------------------


def test_trial_reporter_reports_and_prunes_through_storage(tmp_path, monkeypatch, caplog):
    from cifarlab.sweeper import ENV_MONITOR, ENV_PRUNER, ENV_STORAGE, ENV_STUDY, ENV_TRIAL
    from cifarlab.sweeper.trial import TrialReporter, trial_callbacks

    study = _journal_study(tmp_path, "r")
    trial = study.ask()
    env = {
        ENV_STORAGE: f"journal:{tmp_path}/journal.log",
        ENV_STUDY: "r",
        ENV_TRIAL: str(trial._trial_id),
        ENV_MONITOR: "val/acc",
        # a key the pruner does not take (left by the pruner group's default): its sweep said so, once
        ENV_PRUNER: json.dumps(
            {"_target_": "optuna.pruners.ThresholdPruner", "lower": 0.5, "n_startup_trials": 3}
        ),
    }
    with caplog.at_level("WARNING", logger="cifarlab.sweeper"):
        reporter = TrialReporter(env)
    assert "does not take" not in caplog.text
    assert reporter.report(0.7, 0) is False
    assert reporter.report(0.2, 1) is True
    assert reporter.report(float("nan"), 2) is False
    assert study.get_trials()[0].intermediate_values == {0: 0.7, 1: 0.2}
    monkeypatch.delenv(ENV_TRIAL, raising=False)
    assert trial_callbacks() == []


# ---- the Hydra plugin ----------------------------------------------------------------------------------------------


def test_hydra_discovers_the_plugin_and_its_config():
    from hydra.core.config_store import ConfigStore
    from hydra.core.plugins import Plugins
    from hydra.plugins.sweeper import Sweeper

    import hydra_plugins.cifarlab_sweeper  # noqa: F401  (namespace package from src/, installed editable)

    names = [p.__name__ for p in Plugins.instance().discover(Sweeper)]
    assert "CifarlabOptunaSweeper" in names
    repo = ConfigStore.instance().repo["hydra"]["sweeper"]
    assert "cifarlab_optuna.yaml" in repo
    assert {"tpe.yaml", "random.yaml", "cmaes.yaml", "grid.yaml", "nsgaii.yaml"} <= set(repo["sampler"])
    assert {"median.yaml", "successive_halving.yaml", "hyperband.yaml", "none.yaml"} <= set(repo["pruner"])


def test_search_config_composes_with_the_sweeper():
    from hydra import compose, initialize_config_dir

    from cifarlab.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=["hparams_search=cifar10_optuna", "hydra/sweeper/sampler=random"],
            return_hydra_config=True,
        )
    sw = cfg.hydra.sweeper
    assert sw._target_.endswith("CifarlabOptunaSweeper") and sw.study_name == "cifar10_optuna"
    assert sw.sampler._target_ == "optuna.samplers.RandomSampler" and sw.sampler.seed == 42
    assert sw.pruner._target_ == "optuna.pruners.MedianPruner" and sw.pruner.n_warmup_steps == 3
    assert cfg.hydra.sweep.dir == "multirun/cifar10_optuna"


def test_settings_from_the_composed_config(tmp_path, monkeypatch):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf, open_dict

    from cifarlab.config import register_configs
    from cifarlab.sweeper.settings import settings_from_hydra

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=["hparams_search=synthetic_tiny", "hydra.sweeper.n_trials=5"],
            return_hydra_config=True,
        )
    with open_dict(cfg):
        cfg.hydra.runtime.cwd = str(tmp_path)
        cfg.hydra.job.config_name = "train"
        cfg.hydra.overrides.hydra = ["hydra.sweeper.n_trials=5", "hydra.sweep.dir=x", "hydra.verbose=true"]
    conf = {k: v for k, v in cfg.hydra.sweeper.items() if not k.startswith("_")}
    monkeypatch.setattr(sys, "argv", [str(ROOT / "train.py")])
    s = settings_from_hydra(
        conf, cfg, ["hparams_search=synthetic_tiny", "optimizer.lr=interval(0.001, 0.01)"]
    )
    assert s.study_name == "synthetic_tiny" and s.n_trials == 5 and s.n_jobs == 2
    assert s.storage == f"journal:{tmp_path}/multirun/synthetic_tiny/journal.log"
    assert s.objectives == ["val/acc_best"] and s.monitor == "val/acc" and s.directions == ["maximize"]
    assert s.task_command[1:] == [str(ROOT / "train.py"), "--config-name=train"]
    assert s.child_overrides == ["hydra.verbose=true"]
    assert s.set_logger_group and s.set_run_name
    assert s.pruner["_target_"] == "optuna.pruners.MedianPruner"
    assert OmegaConf.is_config(cfg) and "optimizer.lr=interval(0.001, 0.01)" in s.arguments


def _tiny_sweep_settings(cwd: Path, extra: list[str]):
    """SweepSettings of ``train.py -m hparams_search=synthetic_tiny <extra>``, composed as the sweeper gets them."""
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    from cifarlab.config import register_configs
    from cifarlab.sweeper.settings import settings_from_hydra

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["hparams_search=synthetic_tiny", *extra], return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.cwd = str(cwd)
        cfg.hydra.job.config_name = "train"
    conf = {k: v for k, v in cfg.hydra.sweeper.items() if not k.startswith("_")}
    return settings_from_hydra(conf, cfg, ["hparams_search=synthetic_tiny", *extra])


@pytest.mark.parametrize(
    "overrides, wandb",
    [
        (["logger=wandb"], True),  # cifar10_optuna's default logger
        (["logger=wandb", "logger.mode=disabled"], False),
        (["logger=none"], False),
        (["logger=csv"], False),
    ],
)
def test_warm_trials_preload_what_their_logger_imports(tmp_path, monkeypatch, overrides, wandb):
    from cifarlab.sweeper.launch_fork import DEFAULT_PRELOAD, WANDB_PRELOAD
    from cifarlab.sweeper.runner import warm_preload

    def settings(extra):
        return _tiny_sweep_settings(tmp_path, extra)

    monkeypatch.setattr(sys, "argv", [str(ROOT / "train.py")])
    preload = warm_preload(settings(overrides))
    assert preload[: len(DEFAULT_PRELOAD)] == list(DEFAULT_PRELOAD)
    assert set(WANDB_PRELOAD) <= set(preload) if wandb else not set(WANDB_PRELOAD) & set(preload)
    # hydra.sweeper.preload, when set, is all the server imports
    assert warm_preload(settings([*overrides, "hydra.sweeper.preload=[optuna]"])) == ["optuna"]


@pytest.mark.parametrize(
    "override, allowed",
    [
        ("hydra.sweeper.sampler.seed=abc", "an integer >= 0"),  # was a ValueError traceback from the sampler
        ("hydra.sweeper.n_jobs=0", "an integer >= 1"),  # was taken as null (1 slot) without a word
        ("hydra.sweeper.gpus_per_trial=0", "an integer >= 1"),
        ("hydra.sweeper.max_retries=-1", "an integer >= 0"),
        ("+hydra.sweeper.threads_per_trial=0", "an integer >= 1"),
        ("hydra.sweeper.trial_timeout=-5", "null or a number > 0"),
        ("hydra.sweeper.heartbeat_interval=0", "a number > 0"),
        ("hydra.sweeper.stale_after=-1", "a number > 0"),
        ("hydra.sweeper.max_failure_rate=1.5", "a number 0 <= rate <= 1"),
    ],
)
def test_a_bad_sweeper_setting_is_one_line_naming_it(tmp_path, monkeypatch, override, allowed):
    from cifarlab.sweeper.settings import SweepError

    monkeypatch.setattr(sys, "argv", [str(ROOT / "train.py")])
    key = override.lstrip("+").partition("=")[0]
    with pytest.raises(
        SweepError, match=rf"^{re.escape(key)}=.* is not allowed; allowed: {re.escape(allowed)}$"
    ):
        _tiny_sweep_settings(tmp_path, [override])


@pytest.mark.parametrize(
    "url, why",
    [
        ("foo://bar", "Can't load plugin: sqlalchemy.dialects:foo"),  # at once: no retries for a bad URL
        ("postgresql://u@localhost:notaport/db", "invalid literal for int()"),  # a port that is not a number
        ("sqlite:///DIR/a_file/x.db", "cannot create"),  # its folder cannot be made
        ("DIR/a_file/journal.log", "cannot create"),
    ],
)
def test_a_storage_that_cannot_be_opened_is_one_line_naming_the_setting(tmp_path, url, why):
    from cifarlab.sweeper.study import StorageError, make_storage, storage_spec

    (tmp_path / "a_file").write_text("")
    spec = storage_spec(url.replace("DIR", str(tmp_path)), tmp_path)
    with pytest.raises(StorageError) as info:
        make_storage(spec)
    message = str(info.value)
    assert "\n" not in message and message.startswith("hydra.sweeper.storage=") and why in message, message
    assert message.endswith("postgresql://user:pw@host/db, mysql://user:pw@host/db"), message


def test_importing_the_plugin_is_cheap():
    code = (
        "import sys, hydra_plugins.cifarlab_sweeper.config, hydra_plugins.cifarlab_sweeper.sweeper, "
        "cifarlab.sweeper.trial; print(sorted(m for m in ('optuna', 'torch', 'lightning') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
    )
    assert out.stdout.strip() == "[]"


def test_postgres_urls_get_an_installed_driver():
    import importlib.util

    from cifarlab.sweeper.study import with_driver

    url = with_driver("postgresql://u@h:5432/db")
    if importlib.util.find_spec("psycopg") is None and importlib.util.find_spec("psycopg2") is not None:
        assert url == "postgresql+psycopg2://u@h:5432/db"
    assert with_driver("postgresql+psycopg2://u@h/db") == "postgresql+psycopg2://u@h/db"
    assert with_driver("sqlite:///x.db") == "sqlite:///x.db"


def test_dead_local_workers_are_not_live(tmp_path):
    from cifarlab.sweeper.study import heartbeat, live_workers

    study = _journal_study(tmp_path)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    me = Owner.me()
    heartbeat(study, me, 2, 0.0)
    heartbeat(study, Owner(me.host, dead.pid, "1"), 2, 0.0)
    assert live_workers(study, stale_after=60) == [str(me)]
