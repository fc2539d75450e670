"""Edge cases of the Optuna sweeper a user meets by combining settings: real ``python train.py -m`` sweep processes
on a real journal file, real trials (tiny training runs, or the sleeping stand-in), everything under tmp_path.

- A plain value on the command line for a searched group (``optimizer=adam``) fixes it, and the parameters that
  are conditional on it are then searched (``optimizer.betas``); a plain value for a conditional parameter fixes it.
- A resumed study whose search space changed in a way Optuna cannot store (a choice's options, an interval's log
  scale, a parameter's kind) stops at once with one line saying which parameter and what to do; it leaves no
  trial behind.
- A search space that reaches a config no trial could run (a misspelt choice, an interval past a setting's range,
  a key the optimizer lacks, a conditional value, a fixed setting every trial fails on) stops before the study is
  opened, with one line naming the value and what is allowed (cifarlab.sweeper.precheck).
- Fine but untested before: a trial that early-stops is COMPLETE with the best val/acc, not the last one; warm and
  subprocess trials give the same objective for the same parameters and seed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml
from conftest import sweep_env
from optuna.trial import TrialState

from cifarlab.sweeper.study import make_storage

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
SLEEP_TASK = f"hydra.sweeper.task_command=[{PY},-m,cifarlab.sweeper.sleep_task]"
optuna.logging.set_verbosity(optuna.logging.WARNING)

# the shipped tiny search, cut to 1-epoch trials without pruning
TINY = [
    "hparams_search=synthetic_tiny",
    "trainer.max_epochs=1",
    "hydra/sweeper/pruner=none",
    "hydra.sweeper.plots=false",
]

STANDIN = """\
# @package _global_
defaults:
  - override /data: synthetic
  - override /hydra/sweeper: cifarlab_optuna
  - override /hydra/sweeper/sampler: random
  - override /hydra/sweeper/pruner: none
hydra:
  sweeper:
    study_name: changed
    n_trials: 1
    n_jobs: 1
    monitor: none
    plots: false
    wandb_summary: false
    params:
      x: interval(0.0, 1.0)
      kind: choice(a, b)
      sleep: 0.05
"""


def _sweep(
    tmp_path: Path, sweep_dir: Path, *args: str, conf: Path | None = None
) -> subprocess.CompletedProcess:
    cmd = [PY, str(ROOT / "train.py"), "-m", f"hydra.sweep.dir={sweep_dir}", *args]
    if conf is not None:
        cmd.insert(3, f"--config-dir={conf}")
    return subprocess.run(
        cmd, cwd=tmp_path, env=sweep_env(tmp_path), capture_output=True, text=True, timeout=300
    )


def _ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def _trials(sweep_dir: Path, study: str) -> list[optuna.trial.FrozenTrial]:
    storage = make_storage(f"journal:{sweep_dir}/journal.log")
    return optuna.load_study(study_name=study, storage=storage).get_trials()


def _config(trial: optuna.trial.FrozenTrial) -> dict:
    return yaml.safe_load((Path(trial.user_attrs["job_dir"]) / "config.yaml").read_text())


# ---- a group fixed on the command line still gets its conditional parameters searched ---------------------------


@pytest.mark.timeout(300)
def test_a_group_fixed_on_the_command_line_keeps_its_conditional_parameters_searched(tmp_path):
    # synthetic_tiny searches optimizer.betas when optimizer is adam: fixing optimizer=adam must search it
    sweep = tmp_path / "adam"
    _ok(_sweep(tmp_path, sweep, *TINY, "optimizer=adam", "hydra.sweeper.n_trials=2"))
    trials = _trials(sweep, "synthetic_tiny")
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2
    for t in trials:
        assert set(t.params) == {"optimizer.lr", "model.dropout", "optimizer.betas"}, t.params
        assert _config(t)["optimizer"]["betas"] == yaml.safe_load(t.params["optimizer.betas"])


@pytest.mark.timeout(300)
def test_a_conditional_parameter_fixed_on_the_command_line_is_not_searched(tmp_path):
    sweep = tmp_path / "momentum"
    args = ("optimizer=momentum", "optimizer.momentum=0.9", "hydra.sweeper.n_trials=2")
    _ok(_sweep(tmp_path, sweep, *TINY, *args))
    for t in _trials(sweep, "synthetic_tiny"):
        assert t.state == TrialState.COMPLETE and set(t.params) == {"optimizer.lr", "model.dropout"}
        assert _config(t)["optimizer"]["momentum"] == 0.9


def test_a_fixed_conditional_parameter_goes_only_to_the_trials_whose_when_holds():
    """optimizer.betas=[0.8,0.99] with optimizer searched: an sgd trial has no betas key (it failed on it before)."""
    from cifarlab.sweeper.space import build_space

    params = {"optimizer": "choice(sgd, adam)"}
    conditional = {
        "optimizer.betas": {"when": {"optimizer": "adam"}, "space": "choice([0.9,0.999], [0.8,0.99])"}
    }
    space, passthrough = build_space(
        params, ["optimizer.betas=[0.8,0.99]", "trainer.max_epochs=2"], conditional
    )
    assert passthrough == ["trainer.max_epochs=2"] and space.names() == ["optimizer"]
    assert space.overrides({"optimizer": "sgd"}) == ["optimizer=sgd"]
    assert space.overrides({"optimizer": "adam"}) == ["optimizer=adam", "optimizer.betas=[0.8,0.99]"]
    fixed, _ = build_space(
        {}, ["optimizer=adam", "optimizer.betas=[0.8,0.99]"], conditional
    )  # `when` on a fixed key
    assert fixed.overrides({}) == ["optimizer.betas=[0.8,0.99]"]


# ---- a direction that contradicts the objective: refused before any trial ------------------------------------


@pytest.mark.parametrize(
    "args,objective,wanted",
    [
        (("hydra.sweeper.direction=minimize",), "val/acc_best", "maximize"),
        (("optimized_metric=val/loss", "hydra.sweeper.direction=maximize"), "val/loss", "minimize"),
    ],
)
def test_a_direction_that_contradicts_the_objective_is_one_line_and_no_trial(
    tmp_path, args, objective, wanted
):
    """direction=minimize with optimized_metric=val/acc_best searched for the worst network without a word."""
    sweep = tmp_path / "sweep"
    result = _sweep(tmp_path, sweep, *TINY, *args)
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert objective in lines[0] and f"allowed: {wanted}" in lines[0] and "Traceback" not in result.stderr
    assert not (sweep / "journal.log").exists()  # no study, no trial


# ---- a search space that reaches a config no trial could run: one line before the first trial -------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    "args, expected",
    [
        (  # a misspelt choice: it failed each trial that drew it, and stopped the good ones at max_failure_rate
            ("optimizer=choice(sgd,adamm)",),
            "error: search space: optimizer=adamm is not allowed; allowed: adagrad, adam, adamw, course/adagrad,",
        ),
        (
            ("model.dropout=interval(0.0,1.5)",),
            "error: search space: model.dropout=1.5 is not allowed; allowed: 0",
        ),
        (
            ("optimizer.lrr=tag(log,interval(0.001,0.1))",),
            "error: search space: optimizer.lrr=0.001 is not allowed; allowed: a key of optimizer: lr, momentum,",
        ),
        (  # a conditional parameter, probed with its `when` key set: optimizer=adam (conf: see below)
            ("hparams_search=bad_betas",),
            "error: search space: optimizer.betas=[0.9, 1.5] is not allowed; allowed: two numbers in [0, 1)",
        ),
        (  # a bad plain value on the command line is the command line's, not the search space's
            ("trainer.max_epochs=0",),
            "error: trainer.max_epochs=0 is not allowed; allowed: max_epochs >= 1",
        ),
        (  # an enqueued parameter set outside the space: Optuna raised at that trial's first suggest
            ("hydra.sweeper.enqueue_trials=[{optimizer: adamm}]",),
            "error: hydra.sweeper.enqueue_trials[0]: optimizer=adamm is not allowed; allowed: sgd, momentum, adam",
        ),
        (  # a fixed setting every trial fails on (synthetic_tiny's 16-pixel images with CIFAR's 32)
            ("data=cifar10",),
            "error: search space, with optimizer=sgd, optimizer.lr=0.0001, model.dropout=0.0: data.image_size=16 is not "
            "allowed; allowed: 32 with data=",
        ),
    ],
)
def test_a_search_space_that_reaches_a_bad_config_stops_before_any_trial(tmp_path, args, expected):
    sweep = tmp_path / "sweep"
    conf = tmp_path / "conf"
    (conf / "hparams_search").mkdir(parents=True)
    (conf / "hparams_search" / "bad_betas.yaml").write_text(
        "# @package _global_\ndefaults:\n  - synthetic_tiny\nhydra:\n  sweeper:\n    conditional:\n"
        "      optimizer.betas:\n        when: {optimizer: adam}\n        space: choice([0.9,0.999], [0.9,1.5])\n"
    )
    tiny = [
        a for a in TINY if not (args[0].startswith("hparams_search=") and a.startswith("hparams_search="))
    ]
    result = _sweep(tmp_path, sweep, *tiny, *args, conf=conf)
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(expected), result.stderr
    assert not (sweep / "journal.log").exists() and not list(sweep.glob("trial_*"))  # no study, no trial


@pytest.mark.slow
def test_the_precheck_resolves_hydra_interpolations_as_a_trial_does(tmp_path):
    """${output_dir} and ${hydra:...} resolve against a trial's Hydra config; the sweep process has none of its own."""
    sweep = tmp_path / "sweep"
    args = (
        "data.cache_dir=${output_dir}/cache",
        "logger.project=${hydra:job.name}",
        "hydra.sweeper.n_trials=1",
    )
    _ok(_sweep(tmp_path, sweep, *TINY, *args))
    [trial] = _trials(sweep, "synthetic_tiny")
    assert trial.state == TrialState.COMPLETE  # refused before the fix: "HydraConfig was not set"


@pytest.mark.slow
def test_precheck_false_leaves_the_space_to_the_trials(tmp_path):
    sweep = tmp_path / "sweep"
    args = ("model.dropout=interval(0.0,1.5)", "hydra.sweeper.precheck=false", "hydra.sweeper.n_trials=2")
    result = _sweep(tmp_path, sweep, *TINY, *args)
    assert "search space" not in result.stderr and (sweep / "journal.log").exists(), result.stderr[-2000:]
    errors = [t.user_attrs.get("error", "") for t in _trials(sweep, "synthetic_tiny")]
    assert any("model.dropout=" in e and "is not allowed" in e for e in errors), errors  # a trial drew > 1


def test_enqueued_values_are_checked_against_the_space():
    from cifarlab.sweeper.space import SearchSpaceError, build_space

    params = {"optimizer": "choice(sgd, adam)", "trainer.max_epochs": "interval(2, 5)"}
    conditional = {"optimizer.lr": {"when": {"optimizer": "adam"}, "space": "tag(log, interval(1e-4, 1e-1))"}}
    space, _ = build_space(params, [], conditional)
    good = {"optimizer": "adam", "trainer.max_epochs": 5, "optimizer.lr": 0.01, "not_searched": 1}
    assert space.check_values(good, "q") == []
    # a number outside its interval: Optuna evaluates it as given (with a warning): a known-good set from a wider study
    assert space.check_values({"trainer.max_epochs": 6}, "q") == [
        "q: trainer.max_epochs=6 is outside 2 <= trainer.max_epochs <= 5; evaluated as given"
    ]
    # a list for a choice of lists is the text Optuna stores for it
    lists, _ = build_space({"optimizer.betas": "choice([0.9,0.999], [0.8,0.99])"}, [])
    assert lists.choice_values({"optimizer.betas": [0.8, 0.99], "x": [1]}) == {
        "optimizer.betas": "[0.8,0.99]",
        "x": [1],
    }
    assert lists.check_values(lists.choice_values({"optimizer.betas": [0.8, 0.99]}), "q") == []
    for bad, message in [
        ({"optimizer": "rmsprop"}, "q: optimizer=rmsprop is not allowed; allowed: sgd, adam"),
        (
            {"optimizer.lr": "fast"},
            "q: optimizer.lr=fast is not allowed; allowed: 0.0001 <= optimizer.lr <= 0.1",
        ),
    ]:
        with pytest.raises(SearchSpaceError) as info:
            space.check_values(bad, "q")
        assert str(info.value) == message


def test_the_probes_cover_every_choice_both_ends_and_each_active_conditional():
    from cifarlab.sweeper.precheck import probes
    from cifarlab.sweeper.space import build_space

    params = {"optimizer": "choice(sgd, momentum, adam)", "optimizer.lr": "tag(log, interval(1e-4, 3e-2))"}
    conditional = {
        "optimizer.momentum": {"when": {"optimizer": "momentum"}, "space": "interval(0.5, 0.95)"},
        "optimizer.betas": {"when": {"optimizer": "adam"}, "space": "choice([0.9,0.999], [0.8,0.99])"},
        "trainer.max_epochs": {"when": {"data.name": "cifar10"}, "space": "interval(5, 9)"},  # never active
    }
    space, _ = build_space(params, ["data.name=synthetic"], conditional)
    got = [(what, p) for what, p in probes(space)]
    assert got == [  # rounds: each parameter's k-th value, cycling through the shorter lists
        ("optimizer=sgd, optimizer.lr=0.0001", {"optimizer": "sgd", "optimizer.lr": "0.0001"}),
        ("optimizer=momentum, optimizer.lr=0.03", {"optimizer": "momentum", "optimizer.lr": "0.03"}),
        ("optimizer=adam, optimizer.lr=0.0001", {"optimizer": "adam", "optimizer.lr": "0.0001"}),
        # each conditional with its `when` values; the one on data.name=cifar10 is never active here
        (
            "optimizer.momentum=0.5",
            {"optimizer": "momentum", "optimizer.lr": "0.0001", "optimizer.momentum": "0.5"},
        ),
        (
            "optimizer.momentum=0.95",
            {"optimizer": "momentum", "optimizer.lr": "0.0001", "optimizer.momentum": "0.95"},
        ),
        (
            "optimizer.betas=[0.9,0.999]",
            {"optimizer": "adam", "optimizer.lr": "0.0001", "optimizer.betas": "[0.9,0.999]"},
        ),
        (
            "optimizer.betas=[0.8,0.99]",
            {"optimizer": "adam", "optimizer.lr": "0.0001", "optimizer.betas": "[0.8,0.99]"},
        ),
    ]


# ---- the objective is missing: the trial fails with one line that names it ------------------------------------


@pytest.mark.timeout(300)
@pytest.mark.parametrize("launch", ["fork", "subprocess"])
def test_a_run_without_its_objective_fails_with_missing_metric(tmp_path, launch):
    # 1 epoch, validation every 2nd: the run completes without ever computing val/acc_best
    sweep = tmp_path / launch
    args = (
        "trainer.check_val_every_n_epoch=2",
        "hydra.sweeper.n_trials=1",
        "hydra.sweeper.max_failure_rate=1",
        f"hydra.sweeper.launch={launch}",
    )
    _ok(_sweep(tmp_path, sweep, *TINY, *args))
    [trial] = _trials(sweep, "synthetic_tiny")
    error = trial.user_attrs["error"]
    assert trial.state == TrialState.FAIL and trial.user_attrs["fail_reason"] == "missing_metric", error
    assert "val/acc_best is not in metrics.json" in error and "train/loss" in error, error
    assert "\n" not in error and "return a float" not in error, error


# ---- a resumed study whose space changed incompatibly ------------------------------------------------------------


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    ("change", "what"),
    [
        ("kind=choice(a,b,c)", "kind"),  # new options of a choice
        ("x=tag(log,interval(0.01,1.0))", "x"),  # a log scale where there was none
        ("x=choice(0.1,0.2)", "x"),  # another kind of parameter
    ],
)
def test_a_resumed_study_with_an_incompatible_space_says_which_parameter(tmp_path, change, what):
    conf = tmp_path / "conf"
    (conf / "hparams_search").mkdir(parents=True)
    (conf / "hparams_search" / "changed.yaml").write_text(STANDIN)
    sweep = tmp_path / "sweep"
    _ok(_sweep(tmp_path, sweep, "hparams_search=changed", SLEEP_TASK, conf=conf))
    before = _trials(sweep, "changed")
    assert [t.state for t in before] == [TrialState.COMPLETE]

    result = _sweep(
        tmp_path, sweep, "hparams_search=changed", SLEEP_TASK, "hydra.sweeper.n_trials=3", change, conf=conf
    )
    out = result.stdout + result.stderr
    assert result.returncode != 0 and "Traceback" not in out, out[-3000:]
    error = next(line for line in out.splitlines() if line.startswith("error:"))
    assert f"{what}:" in error and "'changed'" in error and "study_name" in error, error
    after = _trials(sweep, "changed")
    assert len(after) == 1 and after[0].state == TrialState.COMPLETE  # nothing asked, nothing left RUNNING

    # a compatible change (a wider interval) resumes the study
    _ok(
        _sweep(
            tmp_path,
            sweep,
            "hparams_search=changed",
            SLEEP_TASK,
            "hydra.sweeper.n_trials=2",
            "x=interval(0.0,2.0)",
            conf=conf,
        )
    )
    assert [t.state for t in _trials(sweep, "changed")] == [TrialState.COMPLETE] * 2


# ---- fine, and now tested -----------------------------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_an_early_stopped_trial_is_complete_with_its_best_val_acc(tmp_path):
    sweep = tmp_path / "es"
    args = (
        "hydra.sweeper.n_trials=1",
        "trainer.max_epochs=8",
        "callbacks.early_stopping_patience=1",
        "optimizer=adam",
        "optimizer.lr=0.03",  # too high: val/acc stalls at once, so the trial stops early
    )
    _ok(_sweep(tmp_path, sweep, *TINY, *args))
    [trial] = _trials(sweep, "synthetic_tiny")
    metrics = json.loads((Path(trial.user_attrs["job_dir"]) / "metrics.json").read_text())
    assert trial.state == TrialState.COMPLETE and metrics["status"] == "completed"
    assert metrics["epochs"] < 8, "the trial did not stop early"
    assert trial.value == pytest.approx(metrics["val/acc_best"])
    assert metrics["val/acc_best"] == max(trial.intermediate_values.values())


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_warm_and_subprocess_trials_give_the_same_objective(tmp_path):
    values = {}
    for launch in ("fork", "subprocess"):
        sweep = tmp_path / launch
        args = ("hydra.sweeper.n_trials=2", "trainer.max_epochs=2", f"hydra.sweeper.launch={launch}")
        _ok(_sweep(tmp_path, sweep, *TINY, *args))
        values[launch] = [(t.params, t.value) for t in _trials(sweep, "synthetic_tiny")]
    assert values["fork"] == values["subprocess"]
