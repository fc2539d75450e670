"""Typed config schemas (registered in Hydra's ConfigStore) and the range checks run before any work.

Every YAML file under ``conf/`` extends one of these schemas, so a misspelt key or a wrong type fails when
Hydra composes the config, naming the key. ``validate`` then checks ranges and names (and keys that ``+key=value``
added past the schema), raising ``ConfigError`` with one line: the setting, the bad value and what is allowed.
"""

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

# Generated from torch.optim's signatures, cifarlab.optim and cifarlab.model (python -m cifarlab.schemagen):
# importing torch here would cost every --help, --cfg job and misspelt setting ~3 s (2 AMD EPYC cores).
from cifarlab.torch_schemas import ACTIVATIONS, COURSE_OPTIMIZERS, INITS, TORCH_OPTIMIZERS


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
    # apply: a CUDA GPU, an optimizer with a capturable form (every one in conf/optimizer), no DDP, 16-mixed or
    # compile) | true (error if it cannot) | false (always eager). The run's summary and metrics.json say
    # which ran (step_mode).
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


def run_dir() -> str:
    """``output_dir: ${cifarlab.run_dir:}``: Hydra's folder of this run (or of this multirun job). Where no
    job runs (``--cfg job --resolve``), the folder a run would get, instead of Hydra's ``None``."""
    from hydra.core.hydra_config import HydraConfig

    hydra_cfg = HydraConfig.get()
    if OmegaConf.is_missing(hydra_cfg.runtime, "output_dir") or hydra_cfg.runtime.output_dir is None:
        return str(hydra_cfg.run.dir)
    return str(hydra_cfg.runtime.output_dir)


def register_configs() -> None:
    """Put every schema into Hydra's ConfigStore and the ``cifarlab.run_dir`` resolver in OmegaConf
    (idempotent)."""
    OmegaConf.register_new_resolver("cifarlab.run_dir", run_dir, replace=True)
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConf)
    cs.store(name="eval_schema", node=EvalConf)
    cs.store(group="schema/model", name="cnn", node=ModelConf)
    cs.store(group="schema/data", name="data", node=DataConf)
    cs.store(group="schema/trainer", name="trainer", node=TrainerConf)
    cs.store(group="schema/logger", name="logger", node=LoggerConf)
    cs.store(group="schema/callbacks", name="callbacks", node=CallbacksConf)
    for name, node in TORCH_OPTIMIZERS.items():
        cs.store(group="schema/optimizer", name=name, node=node)
    for name, node in COURSE_OPTIMIZERS.items():
        cs.store(group="schema/optimizer/course", name=name, node=node)
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
    capturable = ("Adagrad", "Adam", "AdamW", "NAdam", "RAdam", "RMSprop", "SGD")  # cifarlab.capturable's
    if str(t.accelerator) == "cpu":
        return "trainer.accelerator=cpu: CUDA graphs need a CUDA GPU"
    course = target.startswith("cifarlab.optim.")  # the course's optimizers: all capturable
    if not (course or target.startswith("torch.optim.") and target.rsplit(".", 1)[-1] in capturable):
        return f"optimizer {target} has no capturable form"
    if str(t.precision).startswith("16"):
        return "16-mixed checks its gradient scale on the host"
    if str(t.strategy).startswith("ddp"):
        return "DDP all-reduces gradients in its own hooks"
    if t.compile:
        return "trainer.compile=true"
    return None


def _check_known_keys(node: DictConfig, path: str = "") -> None:
    """``+optimizer.lrr=0.1`` or ``+model.foo=1``: Hydra lets ``+`` add a key a schema does not have. Unchecked,
    the optimizer would fail with a traceback after start-up, and a model/data/trainer key would be silently
    ignored; free-form notes have their own place, ``+extras.<name>=...``."""
    schema = OmegaConf.get_type(node)
    if dataclasses.is_dataclass(schema):
        known = [f.name for f in dataclasses.fields(schema) if not f.name.startswith("_")]
        for key in node:
            if key not in known and not str(key).startswith("_"):
                where = f"a key of {path.rstrip('.')}" if path else "a key of the config"
                notes = "" if path else "; a free-form note goes under extras: +extras.<name>=<value>"
                value = OmegaConf.to_container(node, resolve=False)[key]  # as given: ${...} may not resolve
                raise ConfigError(
                    f"{path}{key}={value!r} is not allowed; allowed: {where}: {', '.join(known)}{notes}"
                )
    for key in node:
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_none() and str(key) != "extras":
            _check_known_keys(child, f"{path}{key}.")


def validate(cfg: DictConfig) -> None:
    """Check ranges and names of the settings that would otherwise fail late (or silently)."""
    _check_known_keys(cfg)
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
    _check_optimizer(cfg.optimizer)
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
        classes = (
            [p for p in Path(d.root).iterdir() if p.is_dir()] if d.root and Path(d.root).is_dir() else []
        )
        _check(
            len(classes) >= 2,
            "data.root",
            d.root,
            "a folder with one sub-folder of images per class, at least 2 (data.root=/path/to/train)",
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
        _check_numbers("scheduler", cfg.scheduler, SCHEDULER_RANGES)
        for key, allowed in SCHEDULER_CHOICES.items():
            if key in cfg.scheduler:
                _check(
                    cfg.scheduler[key] in allowed, f"scheduler.{key}", cfg.scheduler[key], ", ".join(allowed)
                )
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
    _check_numbers("data", d, DATA_RANGES)
    if d.name in ("cifar10", "cifar100"):  # 50,000 training images, val_size of them for validation
        check_cifar_image_size(d.name, d.image_size)
        _check(d.val_size < 50000, "data.val_size", d.val_size, "val_size < 50000 (the CIFAR training set)")
    _check_trainer(t)
    _check_numbers("logger", cfg.logger, {"grad_norm_every_n_steps": INT_0, "init_timeout": POSITIVE})
    _check(bool(str(cfg.logger.project).strip()), "logger.project", cfg.logger.project, "a W&B project name")
    _check(
        not (cfg.logger.name == "wandb" and cfg.logger.get("log_model") and not cfg.callbacks.checkpoint),
        "logger.log_model",
        cfg.logger.get("log_model"),
        "false when callbacks.checkpoint=false (no checkpoint is written to upload)",
    )
    _check_numbers("callbacks", cfg.callbacks, {"early_stopping_patience": INT_0})
    _check_numbers("", cfg, {"seed": SEED})
    _check(
        cfg.ckpt_path is None or Path(cfg.ckpt_path).is_file(),
        "ckpt_path",
        cfg.ckpt_path,
        "an existing checkpoint file (<run>/checkpoints/last.ckpt)",
    )


# ---- ranges of numeric settings --------------------------------------------------------------------------


@dataclass(frozen=True)
class Range:
    """``low <= x <= high`` (``<`` where open); ``integer``: whole numbers only; ``optional``: or null."""

    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False
    integer: bool = False
    optional: bool = False

    def __contains__(self, x: Any) -> bool:
        if x is None:
            return self.optional
        if not _number(x) or (self.integer and not isinstance(x, int)):
            return False
        above = x > self.low if self.low_open else x >= self.low
        below = x < self.high if self.high_open else x <= self.high
        return above and below

    def describe(self, name: str) -> str:
        """``lr > 0``, ``0 <= momentum < 1``, ``max_lr > 0, or null``."""
        if self.low > -math.inf and self.high < math.inf:
            low, high = "<" if self.low_open else "<=", "<" if self.high_open else "<="
            text = f"{self.low:g} {low} {name} {high} {self.high:g}"
        elif self.low > -math.inf:
            text = f"{name} {'>' if self.low_open else '>='} {self.low:g}"
        else:
            text = f"{name} {'<' if self.high_open else '<='} {self.high:g}"
        return f"{text}, or null" if self.optional else text


POSITIVE = Range(0, low_open=True)
NON_NEGATIVE = Range(0)
FRACTION = Range(0, 1, high_open=True)  # [0, 1): decay rates, momentum
INT_0 = Range(0, integer=True)
INT_1 = Range(1, integer=True)
SEED = Range(0, 2**32 - 1, integer=True)  # numpy's seed range

# Every numeric constructor argument of the optimizers (torch.optim's and the course's) by name; a new one
# fails tests/test_errors.py until it has a range here.
OPTIMIZER_RANGES = {
    "lr": POSITIVE,
    "eps": POSITIVE,  # eps = 0: a zero gradient gives 0/0 in Adagrad, RMSprop, Adam
    "momentum": FRACTION,
    "beta": FRACTION,
    "rho": FRACTION,
    "alpha": FRACTION,  # RMSprop's smoothing; 1 would never update the average
    "dampening": Range(0, 1),
    "lr_decay": NON_NEGATIVE,
    "initial_accumulator_value": NON_NEGATIVE,
    "momentum_decay": NON_NEGATIVE,
    "decay": Range(0, 1),
    "c": NON_NEGATIVE,
}
SCHEDULER_RANGES = {
    "step_size": INT_1,
    "gamma": Range(0, 1, low_open=True),
    "warmup_epochs": NON_NEGATIVE,
    "warmup_start_factor": Range(0, 1, low_open=True),
    "min_lr": NON_NEGATIVE,
    "max_lr": Range(0, low_open=True, optional=True),
    "pct_start": Range(0, 1, low_open=True, high_open=True),
    "div_factor": POSITIVE,
    "final_div_factor": POSITIVE,
    "factor": Range(0, 1, low_open=True, high_open=True),
    "patience": INT_0,
    "threshold": NON_NEGATIVE,
}
SCHEDULER_CHOICES = {
    "anneal_strategy": ("cos", "linear"),
    "monitor": ("val/acc", "val/loss"),
    "mode": ("max", "min"),
}
DATA_RANGES = {
    "batch_size": INT_1,
    "eval_batch_size": INT_1,
    "val_size": INT_1,
    "train_size": INT_1,
    "test_size": INT_1,
    "num_classes": Range(2, integer=True, optional=True),
    "image_size": Range(8, integer=True),  # three 2x poolings
    "split_seed": SEED,
}
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")
STRATEGIES = ("auto", "ddp", "ddp_spawn", "ddp_find_unused_parameters_true")
BATCH_LIMIT = "a fraction 0 < x <= 1.0 of the batches or a number of batches >= 1"


def check_cifar_image_size(name: str, image_size: Any) -> None:
    """The model's layers are sized for image_size, and CIFAR's images are not resized."""
    _check(
        image_size == 32,
        "data.image_size",
        image_size,
        f"32 with data={name} (its images are 32x32; data=imagefolder resizes to any size)",
    )


def _check_numbers(section: str, node: Any, ranges: dict[str, Range]) -> None:
    for key, allowed in ranges.items():
        if key in node:
            name = f"{section}.{key}" if section else key
            _check(node[key] in allowed, name, node[key], allowed.describe(key))


def _check_optimizer(opt: Any) -> None:
    _check(opt is not None and "lr" in opt, "optimizer", opt, "an optimizer with a learning rate lr")
    _check_numbers("optimizer", opt, OPTIMIZER_RANGES)
    if "betas" in opt:
        betas = list(opt.betas)
        _check(
            len(betas) == 2 and all(b in FRACTION for b in betas),
            "optimizer.betas",
            betas,
            "two numbers in [0, 1)",
        )
    if opt.get("nesterov"):
        _check(
            opt.get("momentum", 0) > 0 and opt.get("dampening", 0) == 0,
            "optimizer.nesterov",
            True,
            "true only with optimizer.momentum > 0 and optimizer.dampening=0 (or optimizer=nesterov)",
        )


def _check_trainer(t: Any) -> None:
    _check(t.accelerator in ACCELERATORS, "trainer.accelerator", t.accelerator, ", ".join(ACCELERATORS))
    devices = t.devices
    listed = OmegaConf.is_list(devices) or isinstance(devices, list)
    _check(
        devices == "auto"
        or (devices in INT_1 or devices == -1)
        or (
            listed
            and len(devices) > 0
            and all(d in INT_0 for d in devices)
            and len(set(devices)) == len(devices)
        ),
        "trainer.devices",
        devices,
        "auto, a number of devices >= 1, -1 (all), or a list of device ids like [0,1]",
    )
    _check(t.strategy in STRATEGIES, "trainer.strategy", t.strategy, ", ".join(STRATEGIES))
    _check(t.num_nodes in INT_1, "trainer.num_nodes", t.num_nodes, "num_nodes >= 1")
    for key in ("limit_train_batches", "limit_val_batches", "limit_test_batches"):
        limit = t[key]
        ok = limit in INT_1 if isinstance(limit, int) else limit in Range(0, 1, low_open=True)
        _check(ok, f"trainer.{key}", limit, BATCH_LIMIT)
    _check_numbers(
        "trainer",
        t,
        {
            "gradient_clip_val": Range(0, optional=True),
            "log_every_n_steps": INT_1,
            "check_val_every_n_epoch": INT_1,
            "num_sanity_val_steps": Range(-1, integer=True),
        },
    )


def check_hardware(cfg: DictConfig) -> None:
    """The accelerator and device count asked for exist on this machine (imports torch: call it where a
    run starts, not while composing)."""
    import torch

    t = cfg.trainer
    accelerator, devices = str(t.accelerator), t.devices
    if accelerator in ("gpu", "cuda"):
        _check(
            torch.cuda.is_available(),
            "trainer.accelerator",
            accelerator,
            "cpu or auto on this machine (no CUDA GPU found)",
        )
    if accelerator == "mps":
        _check(
            torch.backends.mps.is_available(), "trainer.accelerator", accelerator, "cpu or auto (no MPS here)"
        )
    on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    if on_gpu:
        count = torch.cuda.device_count()
        wanted = devices if isinstance(devices, int) else None
        ids = list(devices) if OmegaConf.is_list(devices) else []
        _check(
            (wanted is None or wanted <= count) and all(i < count for i in ids),
            "trainer.devices",
            devices,
            f"auto, -1, 1 to {count} or ids in 0..{count - 1} ({count} GPU(s) on this machine)",
        )
