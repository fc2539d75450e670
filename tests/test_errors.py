"""Every mistake on the command line ends in one line on stderr and exit code 1, never a traceback.

The walk goes through the whole config schema (cifarlab.config): every key gets a value of the wrong type
and, where the key has a range, a value outside it; every config group gets an option that does not exist.
Each case is composed and validated in-process exactly as train.py does (compose, then cifarlab's checks,
then the command line's error formatting), which takes milliseconds; a handful of real train.py/eval.py
processes prove the exit code and stderr end to end.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import typing
from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from cifarlab import cli
from cifarlab.config import (
    SCHEDULERS,
    ConfigError,
    TrainConf,
    check_hardware,
    register_configs,
    validate,
)
from cifarlab.torch_schemas import COURSE_OPTIMIZERS, TORCH_OPTIMIZERS
from tests.conftest import CONF, ROOT, run_script

# A value outside the allowed range for every key that has one (the command line's text).
OUT_OF_RANGE = {
    "model.dropout": "1.0",
    "model.init": "he",
    "model.activation": "gelu",
    "model.weight_decay": "-1e-4",
    "data.name": "mnist",
    "data.batch_size": "0",
    "data.eval_batch_size": "0",
    "data.val_size": "0",
    "data.num_classes": "1",
    "data.train_size": "0",
    "data.test_size": "0",
    "data.root": "/nonexistent/folder",  # with data=imagefolder
    "data.image_size": "4",
    "data.split_seed": "-1",
    "data.cache_dir": str(Path(__file__)),  # a file, not a folder
    "trainer.accelerator": "tpu",
    "trainer.devices": "0",
    "trainer.strategy": "fsdp_everything",
    "trainer.num_nodes": "0",
    "trainer.precision": "8",
    "trainer.max_epochs": "0",
    "trainer.limit_train_batches": "0",
    "trainer.limit_val_batches": "1.5",
    "trainer.limit_test_batches": "-2",
    "trainer.gradient_clip_val": "-1",
    "trainer.log_every_n_steps": "0",
    "trainer.check_val_every_n_epoch": "0",
    "trainer.num_sanity_val_steps": "-2",
    "trainer.capture": "sometimes",
    "trainer.steps_per_call": "0",
    "logger.name": "tensorboard",
    "logger.project": "' '",
    "logger.mode": "loud",
    "logger.grad_norm_every_n_steps": "-1",
    "logger.init_timeout": "0",
    "callbacks.early_stopping_patience": "-1",
    "seed": "-1",
    "optimized_metric": "val/accuracy",
    "ckpt_path": "/nonexistent/last.ckpt",
    # optimizer and scheduler arguments, whichever option has them
    "optimizer.lr": "0",
    "optimizer.betas": "[0.9,1.0]",
    "optimizer.eps": "-1e-8",
    "optimizer.momentum": "1.0",
    "optimizer.beta": "1.0",
    "optimizer.rho": "-0.1",
    "optimizer.alpha": "1.0",
    "optimizer.dampening": "1.5",
    "optimizer.lr_decay": "-0.1",
    "optimizer.initial_accumulator_value": "-1",
    "optimizer.momentum_decay": "-1",
    "optimizer.decay": "1.5",
    "optimizer.c": "-1",
    "scheduler.step_size": "0",
    "scheduler.gamma": "0",
    "scheduler.warmup_epochs": "-1",
    "scheduler.warmup_start_factor": "0",
    "scheduler.min_lr": "-1",
    "scheduler.max_lr": "0",
    "scheduler.pct_start": "1.0",
    "scheduler.div_factor": "0",
    "scheduler.final_div_factor": "0",
    "scheduler.anneal_strategy": "cubic",
    "scheduler.monitor": "val/f1",
    "scheduler.mode": "up",
    "scheduler.factor": "1.0",
    "scheduler.patience": "-1",
    "scheduler.threshold": "-1",
}
# Keys that take any value of their type: there is no value out of range to try.
NO_RANGE = {
    "data.data_dir": "any folder (created on first use)",
    "logger.entity": "any W&B entity",
    "logger.group": "any W&B group name",
    "logger.tags": "any list of tags",
    "logger.job_type": "any W&B job type",
    "run_name": "any name",
    "output_dir": "any folder",
    "extras": "free-form notes",
}
# Settings that only apply with a certain option of another group.
CONTEXT = {"data.root": ["data=imagefolder"], "data.num_classes": ["data=synthetic"]}


def _wrong_type(hint: Any) -> str | None:
    """A command-line value of the wrong type for ``hint`` (None: every value is a valid ``Any``...)."""
    if typing.get_origin(hint) is typing.Union:  # Optional[X]
        return _wrong_type(next(a for a in typing.get_args(hint) if a is not type(None)))
    if typing.get_origin(hint) in (list, dict):
        return "abc"
    return {int: "abc", float: "abc", bool: "maybe", str: "[1,2]"}.get(hint, "abc")


def _walk(schema: type, prefix: str = "", context: tuple[str, ...] = ()) -> list[tuple[str, Any, tuple]]:
    """(key, type, overrides that select the option) for every key of the schema, options included."""
    keys = []
    for f in dataclasses.fields(schema):
        if f.name.startswith("_"):
            continue
        hint = typing.get_type_hints(schema)[f.name]
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hint):
            keys += _walk(hint, f"{key}.", context)
        elif key == "optimizer":
            for name, node in TORCH_OPTIMIZERS.items():
                keys += _walk(node, "optimizer.", (f"optimizer={name}",))
            for name, node in COURSE_OPTIMIZERS.items():
                keys += _walk(node, "optimizer.", (f"optimizer=course/{name}",))
        elif key == "scheduler":
            for name, node in SCHEDULERS.items():
                keys += _walk(node, "scheduler.", (f"scheduler={name}",))
        else:
            keys.append((key, hint, context + tuple(CONTEXT.get(key, ()))))
    return keys


def _distinct(keys: list[tuple[str, Any, tuple]]) -> list[tuple[str, Any, tuple]]:
    """Optimizer and scheduler arguments are checked by name (cifarlab.config.OPTIMIZER_RANGES, ...), so
    ``optimizer.lr`` is tried once, with the first option that has it, not once per option."""
    seen, distinct = set(), []
    for key, hint, context in keys:
        if (key, str(hint)) not in seen:
            seen.add((key, str(hint)))
            distinct.append((key, hint, context))
    return distinct


KEYS = _distinct(_walk(TrainConf))
GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir())


@pytest.fixture(scope="module", autouse=True)
def _hydra():
    """One Hydra for the module: composing is then ~0.1 s a case instead of ~0.25 s (2 AMD EPYC cores)."""
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        yield


def _compose(overrides: list[str]) -> DictConfig:
    return compose(config_name="train", overrides=[*overrides, "output_dir=unused"])


def error_line(overrides: list[str]) -> str | None:
    """What ``python train.py <overrides>`` prints after ``error:`` (None: the config is accepted)."""
    try:
        cfg = _compose(overrides)
    except Exception as err:  # noqa: BLE001 - train.py formats whatever composition raises
        return cli.one_line(err, overrides, CONF)
    try:
        validate(cfg)
        check_hardware(cfg)
    except ConfigError as err:
        return str(err)
    return None


def _assert_one_line(message: str | None, key: str, overrides: list[str]) -> None:
    assert message is not None, f"python train.py {' '.join(overrides)} is accepted"
    assert "\n" not in message, message
    assert message.startswith(f"{key}=") and " is not allowed; allowed: " in message, message


def test_every_key_has_a_range_or_says_why_not():
    bools = {k for k, hint, _ in KEYS if hint in (bool, bool | None)}
    missing = {k for k, _, _ in KEYS} - set(OUT_OF_RANGE) - set(NO_RANGE) - bools
    assert not missing, (
        f"add a value out of range (OUT_OF_RANGE) or a reason (NO_RANGE) for {sorted(missing)}"
    )


@pytest.mark.parametrize("key, hint, context", KEYS, ids=[" ".join((*c, k)) for k, _, c in KEYS])
def test_wrong_type_is_one_line(key, hint, context):
    value = _wrong_type(hint)
    overrides = [*context, f"{key}={value}"]
    _assert_one_line(error_line(overrides), key, overrides)


@pytest.mark.parametrize(
    "key, context",
    [(k, c) for k, _, c in KEYS if k in OUT_OF_RANGE],
    ids=[" ".join((*c, k)) for k, _, c in KEYS if k in OUT_OF_RANGE],
)
def test_out_of_range_is_one_line(key, context):
    overrides = [*context, f"{key}={OUT_OF_RANGE[key]}"]
    _assert_one_line(error_line(overrides), key, overrides)


@pytest.mark.parametrize(
    "group", [*GROUPS, "optimizer/course", "hydra/sweeper", "hydra/sweeper/sampler", "hydra/sweeper/pruner"]
)
def test_unknown_option_of_every_group_is_one_line(group):
    context = ["hydra/sweeper=cifarlab_optuna"] if group.startswith("hydra/sweeper/") else []
    if group == "optimizer/course":
        overrides, key = ["optimizer=course/nope"], "optimizer"
    else:
        overrides, key = [*context, f"{group}=nope"], group
    message = error_line(overrides)
    _assert_one_line(message, key, overrides)
    assert message.split("allowed: ")[1].strip(), message


@pytest.mark.parametrize(
    "group", ["callbacks", "data", "logger", "model", "optimizer", "scheduler", "trainer"]
)
def test_no_option_for_a_group_that_needs_one_is_one_line(group):
    _assert_one_line(error_line([f"{group}=null"]), group, [f"{group}=null"])


def test_misspelt_key_names_the_keys_that_exist():
    message = error_line(["optimizer=sgd", "optimizer.lrr=0.1"])
    assert message == (
        "optimizer.lrr=0.1 is not allowed; allowed: a key of optimizer: lr, momentum, dampening, nesterov"
    )
    assert error_line(["data.batch_size=many"]) == "data.batch_size=many is not allowed; allowed: an integer"
    assert error_line(["optimizer=foo"]).startswith("optimizer=foo is not allowed; allowed: adagrad, adam,")


def test_a_key_added_with_plus_past_the_schema_is_refused():
    """``+key=value`` lets Hydra add a key no schema has: the optimizer would fail after start-up with a traceback,
    a model/data/trainer key would be ignored without a word."""
    assert error_line(["optimizer=sgd", "+optimizer.lrr=0.1"]) == (
        "optimizer.lrr=0.1 is not allowed; allowed: a key of optimizer: lr, momentum, dampening, nesterov"
    )
    assert error_line(["scheduler=step", "+scheduler.foo=1"]) == (
        "scheduler.foo=1 is not allowed; allowed: a key of scheduler: step_size, gamma"
    )
    for section in ("model", "data", "trainer", "logger", "callbacks"):
        _assert_one_line(error_line([f"+{section}.foo=1"]), f"{section}.foo", [f"+{section}.foo=1"])
    message = error_line(["+foo=1"])
    assert message.startswith("foo=1 is not allowed; allowed: a key of the config: model, data,")
    assert message.endswith("a free-form note goes under extras: +extras.<name>=<value>")
    assert error_line(["+extras.note=baseline", "+extras.nested.deep=1"]) is None
    assert error_line(["+foo=${nope}"]).startswith(
        "foo='${nope}' is not allowed;"
    )  # shown as given, not resolved


def test_a_key_of_another_option_says_which_option_has_it():
    """scheduler.patience=3 with the default scheduler=none was Hydra's "Key 'patience' is not in struct"."""
    assert error_line(["scheduler.patience=3"]) == (
        "scheduler.patience=3 is not allowed: the chosen scheduler has no key patience; allowed: choose a "
        "scheduler that has it first: scheduler=plateau"
    )
    assert error_line(["scheduler=step", "scheduler.patience=3"]) == (
        "scheduler.patience=3 is not allowed; allowed: a key of scheduler: step_size, gamma "
        "(or first scheduler=plateau, which has it)"
    )
    assert error_line(["optimizer=sgd", "optimizer.betas=[0.9,0.99]"]).endswith(
        "(or first optimizer=adam|adamw|course/adam|nadam|radam, which has it)"
    )


@pytest.mark.parametrize(
    "override, reason",
    [
        ("model.dropout=foo(0.1,0.2)", "(in 'foo(0.1,0.2)': Unknown function 'foo'; Available: bool,choice,"),
        ("eval", "(missing EQUAL at '<EOF>')"),
    ],
)
def test_an_override_that_does_not_parse_says_why_and_the_forms_allowed(override, reason):
    message = error_line([override])
    assert message.startswith(f"{override} is not a valid override {reason}") and "\n" not in message, message
    assert message.endswith(f"allowed: {cli.OVERRIDE_FORMS}") and "interval(low,high)" in message


def test_a_group_the_command_does_not_have_is_one_line_naming_the_ones_it_has():
    args = ["ckpt_path=x", "hparams_search=synthetic_tiny"]
    with pytest.raises(Exception) as info:  # noqa: PT011 - whatever Hydra raises is formatted
        compose("eval", overrides=args)
    assert cli.one_line(info.value, args, CONF, "eval") == (
        "hparams_search=synthetic_tiny is not allowed: eval's config has no hparams_search group; allowed: model, "
        "data, optimizer, scheduler, trainer, logger, callbacks"
    )
    assert cli.config_groups(CONF, "train")[-3:] == ["experiment", "hparams_search", "debug"]


def test_issue_cases_in_process(tmp_path):
    """The issue's own examples, each one line naming the setting and what is allowed."""
    assert error_line(["trainer.devices=0"]).startswith("trainer.devices=0 is not allowed; allowed: auto,")
    missing = tmp_path / "missing"
    assert error_line(["data=imagefolder", f"data.root={missing}"]).startswith(
        f"data.root='{missing}' is not allowed; allowed: a folder with one sub-folder of images per class"
    )
    assert error_line(["optimizer=sgd", "optimizer.nesterov=true"]).startswith("optimizer.nesterov=True")
    assert error_line(["data.val_size=50000"]).startswith(
        "data.val_size=50000 is not allowed; allowed: val_size <"
    )


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a GPU")
def test_gpu_trainer_without_a_gpu_is_one_line():
    assert error_line(["trainer=gpu"]) == (
        "trainer.accelerator='gpu' is not allowed; allowed: cpu or auto on this machine (no CUDA GPU found)"
    )


def test_a_checkpoint_that_is_not_one_is_refused(tmp_path):
    from cifarlab.checkpoints import check_resumable, read_checkpoint

    text = tmp_path / "notes.ckpt"
    text.write_text("not a checkpoint\n")
    with pytest.raises(ConfigError, match=r"^ckpt_path='.*notes.ckpt' is not allowed; allowed: a checkpoint"):
        read_checkpoint(text)
    import torch

    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(ConfigError, match="a checkpoint written by cifarlab"):
        read_checkpoint(foreign)
    ours = {"state_dict": {}, "cifarlab_config": OmegaConf.to_container(_compose(["optimizer=sgd"]))}
    check_resumable(ours, _compose(["optimizer=sgd", "optimizer.lr=0.5"]), foreign)  # same kind: fine
    with pytest.raises(ConfigError, match=r"optimizer._target_='torch.optim.Adam' \(this one has .*SGD'\)"):
        check_resumable(ours, _compose(["optimizer=adam"]), foreign)


# ---- end to end: a few real processes ------------------------------------------------------------------


@pytest.fixture(scope="module")
def not_a_checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "last.ckpt"
    path.write_text("this is a text file\n")
    return path


@pytest.mark.parametrize(
    "script, args, expected",
    [
        (
            "train.py",
            ["optimizer.lrr=0.1"],
            "error: optimizer.lrr=0.1 is not allowed; allowed: a key of optimizer",
        ),
        (
            "train.py",
            ["data=imagefolder", "data.root=/nonexistent"],
            "error: data.root='/nonexistent' is not",
        ),
        pytest.param(  # these two import torch and Lightning first: ~5 s each
            "train.py",
            ["data=synthetic", "ckpt_path=NOT_A_CKPT"],
            "error: ckpt_path='NOT_A_CKPT' is not allowed",
            marks=pytest.mark.slow,
        ),
        pytest.param(
            "eval.py",
            ["ckpt_path=NOT_A_CKPT"],
            "error: ckpt_path='NOT_A_CKPT' is not allowed",
            marks=pytest.mark.slow,
        ),
        ("train.py", ["data=synthetic", "trainer.devices=0"], "error: trainer.devices=0 is not allowed"),
        (  # Hydra makes the run folder before the task starts: its OSError is the user's to fix
            "train.py",
            ["data=synthetic", "hydra.run.dir=A_FILE/run"],
            "error: hydra.run.dir=A_FILE/run is not allowed: cannot create A_FILE/run (Not a directory)",
        ),
        (  # an interpolated folder under a file: the literal part names it
            "train.py",
            ["data=synthetic", "hydra.run.dir=A_FILE/${now:%Y}"],
            "error: hydra.run.dir=A_FILE/${now:%Y} is not allowed: cannot create A_FILE/",
        ),
        (
            "train.py",
            ["-m", "hparams_search=synthetic_tiny", "hydra.sweep.dir=A_FILE/sweep"],
            "error: hydra.sweep.dir=A_FILE/sweep is not allowed: cannot create A_FILE/sweep (Not a directory)",
        ),
        (  # a search expression for a sweeper parameter: the key itself takes it
            "train.py",
            ["-m", "hparams_search=synthetic_tiny", "hydra.sweeper.params.model.dropout=choice(0.1,0.5)"],
            "error: hydra.sweeper.params.model.dropout=choice(0.1,0.5) is not allowed: Hydra's own settings take "
            "no search expression; to search model.dropout, write 'model.dropout=choice(0.1,0.5)'",
        ),
    ],
)
def test_entry_points_print_one_line_and_exit_1(script, args, expected, not_a_checkpoint, tmp_path):
    (tmp_path / "a_file").write_text("")
    names = {"NOT_A_CKPT": str(not_a_checkpoint), "A_FILE": str(tmp_path / "a_file")}

    def named(text: str) -> str:
        for name, path in names.items():
            text = text.replace(name, path)
        return text

    run_dir = [] if any(a.startswith("hydra.run.dir=") for a in args) else [f"hydra.run.dir={tmp_path}/run"]
    result = run_script([*map(named, args), *run_dir], script=script, timeout=120)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 1, result.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith(named(expected)), lines
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_user_asking_for_hydras_full_error_gets_the_traceback(tmp_path):
    result = run_script(["optimizer.lrr=0.1"], env={"HYDRA_FULL_ERROR": "1"}, timeout=60)
    assert result.returncode == 1 and "Traceback" in result.stderr


def test_cfg_job_resolve_prints_the_run_folder():
    result = run_script(["--cfg", "job", "--resolve", "data=synthetic"], timeout=60)
    assert result.returncode == 0, result.stderr
    resolved = OmegaConf.create(result.stdout)
    assert resolved.output_dir.startswith("runs/") and "${" not in result.stdout
    assert resolved.data.name == "synthetic"


def test_help_and_composition_errors_do_not_import_torch():
    """--help, --cfg job and a misspelt key answer without torch (~3 s to import on 2 cores)."""
    for args in (["--help"], ["--cfg", "job"], ["optimizer.lrr=0.1"]):
        result = subprocess.run(
            [sys.executable, "-X", "importtime", str(ROOT / "train.py"), *args],
            capture_output=True,
            text=True,
            timeout=60,
        )
        imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if "|" in line}
        assert "hydra" in imported and "torch" not in imported, args
        if args == ["--help"]:
            assert (
                result.returncode == 0
                and "\noptimizer: adagrad, adam, adamw, course/adagrad" in result.stdout
            )
            assert "schema/" not in result.stdout and "== Config ==" in result.stdout


def test_a_bug_is_not_mistaken_for_a_usage_error():
    """Only Hydra's and OmegaConf's errors about the command line become one line; a bug keeps its traceback."""
    from hydra.errors import ConfigCompositionException

    assert cli.is_usage_error(ConfigCompositionException("Could not override 'x'"))
    assert not cli.is_usage_error(AttributeError("'str' object has no attribute 'get'"))
    try:
        raise ValueError("a bug of ours")
    except ValueError as err:
        assert not cli.is_usage_error(err)
