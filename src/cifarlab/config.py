"""Typed config schemas (registered in Hydra's ConfigStore) and the range checks run before any work.

Every YAML file under ``conf/`` extends one of these schemas, so a misspelt key or a wrong type fails when
Hydra composes the config, naming the key. ``validate`` then checks ranges and names, raising
``ConfigError`` with one line: the setting, the bad value and what is allowed.
"""

import inspect
import math
import os
from dataclasses import dataclass, field, make_dataclass
from typing import Any, Optional

import torch
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig

from cifarlab.model import ACTIVATIONS, INITS


class ConfigError(ValueError):
    """A setting has a value that is not allowed. The message is one line: key, value, what is allowed."""


@dataclass
class ModelConf:
    dropout: float = 0.5  # probability of zeroing an FC-256 activation while training; 0 <= p < 1
    init: str = "kaiming_uniform"  # weight init of every conv/linear layer (biases are zeroed); see INITS
    activation: str = "relu"  # nonlinearity after every conv and the FC-256 layer; see ACTIVATIONS
    weight_decay: float = 0.0  # L2 coefficient on weights only (never biases); decoupled under AdamW


@dataclass
class DataConf:
    name: str = "cifar10"  # cifar10 | cifar100 | synthetic | imagefolder
    batch_size: int = 128  # training images per step (per device under DDP)
    eval_batch_size: int = 1000  # images per validation/test step
    val_size: int = 5000  # images carved from the training set for validation (the test set stays unseen)
    augment: bool = True  # random crop (4-pixel zero padding) + horizontal flip, on the device, per image
    normalize: bool = True  # subtract the training set's per-channel mean, divide by its std
    download: bool = True  # fetch the CIFAR archive into data_dir if it is missing
    verify_checksum: bool = True  # check the archive's md5 against the official one
    data_dir: str = "data"  # where archives and extracted batches live
    num_classes: Optional[int] = None  # synthetic: number of classes; imagefolder: inferred from sub-folders
    train_size: int = 10000  # synthetic: training images (val_size of them become validation)
    test_size: int = 2000  # synthetic: test images; imagefolder without a test/ folder: held-out images
    root: Optional[str] = None  # imagefolder: <root>/<class>/<image files>
    image_size: int = 32  # imagefolder/synthetic: images are resized to image_size x image_size
    split_seed: int = 0  # seed of the train/val split, fixed across runs so trials compare fairly
    cache: bool = True  # keep decoded datasets as memory-mapped uint8 arrays in cache_dir (see datacache)
    cache_dir: Optional[str] = None  # where the decoded-data cache lives; null: <data_dir>/cache


@dataclass
class TrainerConf:
    accelerator: str = "auto"  # auto | cpu | gpu | cuda | mps
    devices: Any = "auto"  # number of devices, a list of ids, or auto
    strategy: str = "auto"  # auto | ddp | ...
    num_nodes: int = 1
    precision: Any = (
        "auto"  # auto (bf16-mixed where the hardware has bf16, else 32) | 32 | bf16-mixed | 16-mixed
    )
    max_epochs: int = 20
    limit_train_batches: Any = 1.0  # a fraction of the epoch or a number of batches
    limit_val_batches: Any = 1.0
    limit_test_batches: Any = 1.0
    gradient_clip_val: Optional[float] = None
    deterministic: bool = False
    log_every_n_steps: int = 50
    check_val_every_n_epoch: int = 1
    num_sanity_val_steps: int = 0
    benchmark: bool = True  # cudnn autotuner
    enable_progress_bar: Optional[bool] = None  # None: a live bar on a terminal, one line per epoch otherwise
    channels_last: bool = True  # NHWC activations: faster convolutions on CPUs (oneDNN) and tensor cores
    compile: bool = False  # torch.compile the network
    # Record the whole training step once as a CUDA graph and replay it (cifarlab.step): auto (where it can
    # apply: a CUDA GPU, a torch optimizer with a capturable form, no DDP/16-mixed/compile) | true (error if
    # it cannot) | false (always eager). The run's summary and metrics.json say which ran (step_mode).
    capture: Any = "auto"
    # Optimizer steps per Lightning training_step (several batches per call, manual optimization, so that
    # Lightning's per-call cost is paid once per K steps): auto (32 captured, 8 eager) | an integer >= 1
    steps_per_call: Any = "auto"


@dataclass
class LoggerConf:
    name: str = "none"  # wandb | csv | none
    project: str = "cifarlab"  # W&B project
    mode: str = "offline"  # W&B mode: offline | online | disabled
    entity: Optional[str] = None
    group: Optional[str] = None  # W&B group; a sweep sets it to its study name
    tags: list[str] = field(default_factory=list)
    log_model: bool = False  # upload the best checkpoint as a W&B artifact
    grad_norm_every_n_steps: int = 50  # per-layer gradient/weight norms every N steps (0: off)
    job_type: str = "train"  # W&B job type: train | sweep-trial | sweep-summary
    init_timeout: float = 10.0  # online: seconds W&B may take to start before the run falls back to offline


@dataclass
class CallbacksConf:
    checkpoint: bool = True  # keep best.ckpt (by val/acc) and last.ckpt in <run>/checkpoints
    early_stopping_patience: int = 0  # stop after N epochs without val/acc improvement (0: off)
    figures: bool = True  # write confusion matrix / per-class accuracy / curves as PNG at the end


@dataclass
class TrainConf:
    model: ModelConf = field(default_factory=ModelConf)
    data: DataConf = field(default_factory=DataConf)
    trainer: TrainerConf = field(default_factory=TrainerConf)
    logger: LoggerConf = field(default_factory=LoggerConf)
    callbacks: CallbacksConf = field(default_factory=CallbacksConf)
    optimizer: Any = MISSING  # a partial torch.optim.Optimizer, completed with the model's parameters
    scheduler: Any = None  # a partial scheduler factory from cifarlab.schedulers, or None
    seed: int = 42  # seeds python, numpy, torch and the data order
    optimized_metric: str = "val/acc_best"  # the value train.py returns to a Hydra sweeper
    ckpt_path: Optional[str] = None  # resume training from this checkpoint
    test: bool = True  # test the best checkpoint on the test split at the end
    run_name: Optional[str] = None  # a readable name for the run (W&B); default: derived from the settings
    output_dir: str = MISSING  # where this run writes metrics.json, config.yaml, checkpoints, logs
    extras: dict[str, Any] = field(default_factory=dict)  # free-form notes carried into the saved config


@dataclass
class EvalConf(TrainConf):
    ckpt_path: Optional[str] = None  # the checkpoint to evaluate (required)


# ---- optimizers: one schema per optimizer class, generated from its constructor -------------------------

# Handled elsewhere, so not config keys: params (the model's), weight_decay (model.weight_decay through
# parameter groups), and implementation switches that would only confuse a search space.
_NOT_CONFIG = {
    "self",
    "params",
    "weight_decay",
    "foreach",
    "fused",
    "capturable",
    "differentiable",
    "maximize",
}

TORCH_OPTIMIZERS: dict[str, tuple[type, dict[str, Any]]] = {
    # name: (class, defaults that differ from the class's own)
    "sgd": (torch.optim.SGD, {"lr": 0.01}),
    "momentum": (torch.optim.SGD, {"lr": 0.01, "momentum": 0.9}),
    "nesterov": (torch.optim.SGD, {"lr": 0.01, "momentum": 0.9, "nesterov": True}),
    "adagrad": (torch.optim.Adagrad, {}),
    "rmsprop": (torch.optim.RMSprop, {"lr": 0.001}),
    "adam": (torch.optim.Adam, {}),
    "adamw": (torch.optim.AdamW, {}),
    "nadam": (torch.optim.NAdam, {}),
    "radam": (torch.optim.RAdam, {}),
}


def _annotation_for(default: Any) -> Any:
    if isinstance(default, bool):
        return bool
    if isinstance(default, (int, float)):
        return float
    if isinstance(default, (tuple, list)):
        return list[float]
    return Any


def optimizer_schema(cls: type, overrides: dict[str, Any] | None = None, name: Optional[str] = None) -> type:
    """A dataclass whose fields are ``cls``'s constructor arguments (with defaults), plus ``_target_``."""
    overrides = overrides or {}
    module = "torch.optim" if cls.__module__.startswith("torch.optim.") else cls.__module__
    fields: list[tuple] = [
        ("_target_", str, field(default=f"{module}.{cls.__qualname__}")),
        ("_partial_", bool, field(default=True)),
    ]
    for param in inspect.signature(cls.__init__).parameters.values():
        if param.name in _NOT_CONFIG or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        default = overrides.get(param.name, param.default)
        if default is inspect.Parameter.empty:
            continue
        if isinstance(default, torch.Tensor):
            default = default.item()
        if isinstance(default, (tuple, list)):
            fields.append((param.name, list[float], field(default_factory=lambda d=tuple(default): list(d))))
        else:
            annotation = _annotation_for(default)
            if annotation is float and default is not None:
                default = float(default)
            fields.append((param.name, annotation, field(default=default)))
    return make_dataclass(name or f"{cls.__name__}Conf", fields)


# ---- schedulers ----------------------------------------------------------------------------------------


@dataclass
class StepLRConf:
    _target_: str = "cifarlab.schedulers.step"
    _partial_: bool = True
    step_size: int = 10  # epochs between decays
    gamma: float = 0.1  # lr ← gamma·lr every step_size epochs


@dataclass
class ExponentialLRConf:
    _target_: str = "cifarlab.schedulers.exponential"
    _partial_: bool = True
    gamma: float = 0.99  # lr ← gamma·lr after every epoch (the course's α ← 0.99·α)


@dataclass
class CosineConf:
    _target_: str = "cifarlab.schedulers.cosine"
    _partial_: bool = True
    warmup_epochs: float = 0.0  # linear warm-up from warmup_start_factor·lr to lr, in epochs (fractions ok)
    warmup_start_factor: float = 0.01
    min_lr: float = 0.0  # the lr reached at the last step


@dataclass
class OneCycleConf:
    _target_: str = "cifarlab.schedulers.onecycle"
    _partial_: bool = True
    max_lr: Optional[float] = None  # peak lr; None: optimizer.lr
    pct_start: float = 0.3  # fraction of the steps spent increasing the lr
    div_factor: float = 25.0  # initial lr = max_lr / div_factor
    final_div_factor: float = 1e4  # final lr = initial lr / final_div_factor
    anneal_strategy: str = "cos"  # cos | linear


@dataclass
class PlateauConf:
    _target_: str = "cifarlab.schedulers.plateau"
    _partial_: bool = True
    monitor: str = "val/acc"  # the metric watched (logged every validation)
    mode: str = "max"  # max: a higher metric is better
    factor: float = 0.1  # lr ← factor·lr on a plateau
    patience: int = 5  # epochs without improvement before decaying
    threshold: float = 1e-4
    min_lr: float = 0.0


SCHEDULERS = {
    "step": StepLRConf,
    "exponential": ExponentialLRConf,
    "cosine": CosineConf,
    "onecycle": OneCycleConf,
    "plateau": PlateauConf,
}


def register_configs() -> None:
    """Put every schema into Hydra's ConfigStore (idempotent)."""
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConf)
    cs.store(name="eval_schema", node=EvalConf)
    cs.store(group="schema/model", name="cnn", node=ModelConf)
    cs.store(group="schema/data", name="data", node=DataConf)
    cs.store(group="schema/trainer", name="trainer", node=TrainerConf)
    cs.store(group="schema/logger", name="logger", node=LoggerConf)
    cs.store(group="schema/callbacks", name="callbacks", node=CallbacksConf)
    for name, (cls, overrides) in TORCH_OPTIMIZERS.items():
        cs.store(group="schema/optimizer", name=name, node=optimizer_schema(cls, overrides, f"{name}_conf"))
    try:
        from cifarlab.optim import COURSE_OPTIMIZERS
    except ImportError:  # the course optimizers are optional for the core
        COURSE_OPTIMIZERS = {}
    for name, cls in COURSE_OPTIMIZERS.items():
        cs.store(
            group="schema/optimizer/course",
            name=name,
            node=optimizer_schema(cls, None, f"course_{name}_conf"),
        )
    for name, node in SCHEDULERS.items():
        cs.store(group="schema/scheduler", name=name, node=node)


# ---- range checks --------------------------------------------------------------------------------------


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is not allowed; allowed: {allowed}")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _capture_blocker(cfg: DictConfig) -> str | None:
    """What in the config rules out a captured training step (cifarlab.step.capture_blocker checks the rest
    when the device is known)."""
    t = cfg.trainer
    target = str(cfg.optimizer.get("_target_", "")) if cfg.get("optimizer") is not None else ""
    capturable = ("Adam", "AdamW", "NAdam", "RAdam", "RMSprop", "SGD")  # cifarlab.step.CAPTURABLE_OPTIMIZERS
    if str(t.accelerator) == "cpu":
        return "trainer.accelerator=cpu: CUDA graphs need a CUDA GPU"
    if not (target.startswith("torch.optim.") and target.rsplit(".", 1)[-1] in capturable):
        return f"optimizer {target} has no capturable form"
    if str(t.precision).startswith("16"):
        return "16-mixed checks its gradient scale on the host"
    if str(t.strategy).startswith("ddp"):
        return "DDP all-reduces gradients in its own hooks"
    if t.compile:
        return "trainer.compile=true"
    return None


def validate(cfg: DictConfig) -> None:
    """Check ranges and names of the settings that would otherwise fail late (or silently)."""
    m, d, t = cfg.model, cfg.data, cfg.trainer
    _check(_number(m.dropout) and 0 <= m.dropout < 1, "model.dropout", m.dropout, "0 <= dropout < 1")
    _check(m.init in INITS, "model.init", m.init, ", ".join(INITS))
    _check(m.activation in ACTIVATIONS, "model.activation", m.activation, ", ".join(ACTIVATIONS))
    _check(
        _number(m.weight_decay) and m.weight_decay >= 0,
        "model.weight_decay",
        m.weight_decay,
        "weight_decay >= 0",
    )
    lr = cfg.optimizer.get("lr") if cfg.get("optimizer") is not None else None
    _check(lr is not None and _number(lr) and lr > 0, "optimizer.lr", lr, "lr > 0")
    for key in ("betas",):
        if key in cfg.optimizer:
            betas = list(cfg.optimizer[key])
            _check(
                len(betas) == 2 and all(_number(b) and 0 <= b < 1 for b in betas),
                f"optimizer.{key}",
                betas,
                "two numbers in [0, 1)",
            )
    if "momentum" in cfg.optimizer:
        mom = cfg.optimizer.momentum
        _check(_number(mom) and 0 <= mom < 1, "optimizer.momentum", mom, "0 <= momentum < 1")
    _check(
        d.name in ("cifar10", "cifar100", "synthetic", "imagefolder"),
        "data.name",
        d.name,
        "cifar10, cifar100, synthetic, imagefolder",
    )
    _check(d.batch_size >= 1, "data.batch_size", d.batch_size, "batch_size >= 1")
    _check(d.eval_batch_size >= 1, "data.eval_batch_size", d.eval_batch_size, "eval_batch_size >= 1")
    _check(d.val_size >= 1, "data.val_size", d.val_size, "val_size >= 1")
    if d.name == "synthetic":
        _check(
            d.train_size > d.val_size,
            "data.train_size",
            d.train_size,
            f"train_size > data.val_size ({d.val_size})",
        )
        _check(
            d.num_classes is None or d.num_classes >= 2, "data.num_classes", d.num_classes, "num_classes >= 2"
        )
    if d.name == "imagefolder":
        _check(
            d.root is not None,
            "data.root",
            d.root,
            "a folder of class sub-folders (data.root=/path/to/train)",
        )
    cache_dir = d.get("cache_dir")
    _check(
        cache_dir is None or (str(cache_dir).strip() != "" and not os.path.isfile(str(cache_dir))),
        "data.cache_dir",
        cache_dir,
        "null (<data_dir>/cache) or a folder path; data.cache=false turns the cache off",
    )
    _check(t.max_epochs >= 1, "trainer.max_epochs", t.max_epochs, "max_epochs >= 1")
    _check(t.capture in ("auto", True, False), "trainer.capture", t.capture, "auto, true, false")
    spc = t.steps_per_call
    _check(
        spc == "auto" or (isinstance(spc, int) and not isinstance(spc, bool) and spc >= 1),
        "trainer.steps_per_call",
        spc,
        "auto or an integer >= 1",
    )
    if t.capture is True:
        blocker = _capture_blocker(cfg)
        _check(blocker is None, "trainer.capture", True, f"auto or false here ({blocker})")
    _check(
        str(t.precision)
        in ("auto", "32", "32-true", "bf16-mixed", "16-mixed", "bf16-true", "64", "64-true", "16"),
        "trainer.precision",
        t.precision,
        "auto, 32, bf16-mixed, 16-mixed, bf16-true, 64",
    )
    _check(cfg.logger.name in ("wandb", "csv", "none"), "logger.name", cfg.logger.name, "wandb, csv, none")
    _check(
        cfg.logger.mode in ("offline", "online", "disabled"),
        "logger.mode",
        cfg.logger.mode,
        "offline, online, disabled",
    )
    if cfg.get("scheduler") is not None:
        s = cfg.scheduler
        if "gamma" in s:
            _check(_number(s.gamma) and 0 < s.gamma <= 1, "scheduler.gamma", s.gamma, "0 < gamma <= 1")
        if "step_size" in s:
            _check(s.step_size >= 1, "scheduler.step_size", s.step_size, "step_size >= 1 (epochs)")
    allowed_metrics = (
        "val/acc_best",
        "val/acc",
        "val/loss",
        "test/acc",
        "test/loss",
        "train/loss",
        "train/acc",
    )
    _check(
        cfg.optimized_metric in allowed_metrics,
        "optimized_metric",
        cfg.optimized_metric,
        ", ".join(allowed_metrics),
    )
