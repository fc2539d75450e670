"""Composition, typed schemas and range checks: every mistake is caught before any data is loaded."""

from __future__ import annotations

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError, ValidationError

from cifarlab.config import TORCH_OPTIMIZERS, ConfigError, validate
from tests.conftest import CONF, compose_train, run_script

OPTIMIZERS = sorted(p.stem for p in (CONF / "optimizer").glob("*.yaml"))
SCHEDULERS = sorted(p.stem for p in (CONF / "scheduler").glob("*.yaml"))


def test_every_torch_optimizer_has_a_config_file():
    assert set(TORCH_OPTIMIZERS) <= set(OPTIMIZERS)
    assert {"sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adam", "adamw", "nadam", "radam"} <= set(
        OPTIMIZERS
    )
    assert {"none", "step", "exponential", "cosine", "onecycle", "plateau"} <= set(SCHEDULERS)


def test_default_config_composes_and_validates():
    cfg = compose_train([])
    validate(cfg)
    assert cfg.optimizer._target_ == "torch.optim.Adam"
    assert cfg.data.name == "cifar10" and cfg.logger.name == "wandb" and cfg.logger.mode == "offline"
    assert cfg.optimized_metric == "val/acc_best"


def test_optimizer_parameters_are_overridable():
    cfg = compose_train(["optimizer=adam", "optimizer.lr=3e-4", "optimizer.betas=[0.9,0.99]"])
    assert cfg.optimizer.lr == pytest.approx(3e-4)
    assert list(cfg.optimizer.betas) == [0.9, 0.99]
    cfg = compose_train(["optimizer=rmsprop", "optimizer.alpha=0.9", "optimizer.momentum=0.5"])
    assert cfg.optimizer._target_ == "torch.optim.RMSprop" and cfg.optimizer.alpha == 0.9
    cfg = compose_train(["optimizer=nesterov"])
    assert cfg.optimizer.nesterov is True and cfg.optimizer.momentum == 0.9


def test_misspelt_key_fails_at_composition():
    with pytest.raises(ConfigCompositionException, match="lrr"):
        compose_train(["optimizer.lrr=0.1"])
    with pytest.raises(ConfigCompositionException, match="dropuot"):
        compose_train(["model.dropuot=0.1"])


def test_wrong_type_fails_at_composition():
    with pytest.raises((ConfigCompositionException, ValidationError)) as info:
        compose_train(["optimizer.lr=abc"])
    assert "optimizer.lr" in str(info.value) or "lr" in str(info.value.__cause__)
    with pytest.raises((ConfigCompositionException, ValidationError, ConfigKeyError)):
        compose_train(["data.batch_size=many"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.dropout=1.5", "model.dropout=1.5 is not allowed; allowed: 0 <= dropout < 1"),
        ("model.dropout=-0.1", "model.dropout=-0.1"),
        ("model.init=he", "model.init='he' is not allowed; allowed: kaiming_uniform, kaiming_normal"),
        (
            "model.activation=gelu",
            "model.activation='gelu' is not allowed; allowed: relu, leaky_relu, sigmoid, tanh",
        ),
        ("model.weight_decay=-1e-4", "model.weight_decay=-0.0001 is not allowed; allowed: weight_decay >= 0"),
        ("optimizer.lr=0", "optimizer.lr=0.0 is not allowed; allowed: lr > 0"),
        ("optimizer.lr=-0.1", "optimizer.lr=-0.1"),
        ("data.batch_size=0", "data.batch_size=0 is not allowed; allowed: batch_size >= 1"),
        ("trainer.max_epochs=0", "trainer.max_epochs=0 is not allowed; allowed: max_epochs >= 1"),
        ("optimizer.betas=[0.9,1.5]", "optimizer.betas=[0.9, 1.5]"),
        ("optimized_metric=val/accuracy", "optimized_metric='val/accuracy'"),
        ("trainer.precision=8", "trainer.precision=8"),
    ],
)
def test_range_checks_name_key_value_and_allowed(override, message):
    cfg = compose_train([override])
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    text = str(info.value)
    assert message in text and "\n" not in text


def test_bad_value_exits_1_with_one_line(tmp_path):
    """The issue's own example: python train.py model.dropout=1.5 — one line, exit code 1, no run folder."""
    result = run_script(["model.dropout=1.5", "data=synthetic", f"hydra.run.dir={tmp_path}/run"])
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert errors == ["error: model.dropout=1.5 is not allowed; allowed: 0 <= dropout < 1"], result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    result = run_script(
        ["data=synthetic", f"ckpt_path={tmp_path}/nope.ckpt", f"hydra.run.dir={tmp_path}/run"]
    )
    assert result.returncode == 1
    assert "ckpt_path=" in result.stderr and "an existing checkpoint file" in result.stderr
    assert "Traceback" not in result.stderr


def test_generated_optimizer_schemas_match_torch():
    """cifarlab/torch_schemas.py is written once from torch.optim's signatures (so that --help and composing
    need no torch); a torch upgrade that adds, drops or changes an argument must regenerate it."""
    from cifarlab import schemagen

    committed = schemagen.TARGET.read_text()
    assert schemagen.generate() == committed, (
        f"{schemagen.TARGET.name} is out of date with the installed torch or cifarlab.optim/model: "
        f"run `{schemagen.COMMAND}` and commit the result"
    )


def test_the_config_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, cifarlab.config; cifarlab.config.register_configs(); print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "False", result.stderr


def test_cfg_job_resolve_needs_no_running_job():
    """``output_dir`` is Hydra's run folder in a run, and the folder a run would get where none runs."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    from cifarlab.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    try:
        assert cfg.output_dir == cfg.hydra.run.dir and cfg.output_dir.startswith("runs/")
    finally:  # HydraConfig is process-wide: leave none behind for the next test in this worker
        HydraConfig.instance().cfg = None


def test_log_model_without_checkpoints_is_refused():
    """logger.log_model=true uploads the best checkpoint; with callbacks.checkpoint=false there is none, and the
    run uploaded nothing without a word."""
    cfg = compose_train(["logger=wandb", "logger.log_model=true", "callbacks.checkpoint=false"])
    with pytest.raises(ConfigError, match=r"logger.log_model=True is not allowed; allowed: false when"):
        validate(cfg)
    validate(compose_train(["logger=wandb", "logger.log_model=true"]))
