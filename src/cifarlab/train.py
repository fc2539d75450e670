"""``run(cfg) -> metrics``: every object of a training run is built here from the validated config."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from cifarlab.checkpoints import check_resumable, read_checkpoint
from cifarlab.config import check_hardware, validate


def resolve_precision(precision: Any, accelerator: str) -> str:
    """``auto`` → bf16-mixed where the device computes in bf16 natively, else 32-true."""
    if str(precision) != "auto":
        return str(precision)
    wants_gpu = accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    if wants_gpu:
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "32-true"
    # oneDNN runs bf16 convolutions natively on CPUs with AVX512-BF16 or AMX.
    if (
        accelerator in ("auto", "cpu")
        and torch.backends.mkldnn.is_available()
        and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    ):
        return "bf16-mixed"
    return "32-true"


# glibc's malloc options (malloc.h); glibc caps M_MMAP_THRESHOLD at 32 MiB on 64-bit systems.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4


def reuse_freed_memory() -> bool:
    """Make glibc's malloc keep freed blocks for reuse instead of handing them back to the kernel; True if set.

    A CPU training step allocates and frees its activations and gradients every step (~30 MB at batch 64,
    fp32). glibc returns blocks above its mmap threshold with munmap and trims the heap's free top above its trim
    threshold; both adapt to what the process did before, so depending on its history every step could fault
    all of that memory in again: 8,500 minor page faults a step in a train.py on CIFAR-10 (batch 64, fp32) on the
    2-core AMD EPYC, 16 steps in 0.52 - 0.60 s against 0.40 s once the thresholds are fixed (32 MiB, glibc's
    largest, for mmap; 1 GiB for trimming), after which the epoch faulted 16 pages. Blocks above 32 MiB (an
    evaluation batch of 1,000: 131 MB for the first conv's output in fp32) were still mapped afresh each time, so
    mmap is off too (M_MMAP_MAX 0: the heap grows instead): evaluation at batch 1,000 went from 4,900 to 8,300
    images/s in fp32 (bf16: 11,500 to 14,300), training unchanged. Called for CPU runs only (a GPU run's host
    allocations are few; :func:`build_trainer` calls this). ``CIFARLAB_MALLOPT=0`` leaves glibc's defaults."""
    if not sys.platform.startswith("linux") or os.environ.get("CIFARLAB_MALLOPT", "1") == "0":
        return False
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's C library; musl's mallopt is a no-op returning 0
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # The mmap threshold first: fixing the trim threshold alone also stops the mmap threshold adapting, at
    # 128 KiB, which made the churn worse (both loops faulted every step).
    return all(
        mallopt(option, value)
        for option, value in ((_M_MMAP_THRESHOLD, 32 << 20), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 1 << 30))
    )


def default_run_name(cfg: DictConfig) -> str:
    """e.g. ``rmsprop-lr3e-4-cosine``: optimizer option, learning rate, scheduler; ``-j3``: job 3 of a multirun."""
    from cifarlab.loggers import hydra_choices, multirun_job_number, short_number

    choices = hydra_choices()
    optimizer = choices.get("optimizer") or str(cfg.optimizer._target_).rsplit(".", 1)[-1].lower()
    scheduler = str(cfg.scheduler._target_).rsplit(".", 1)[-1] if cfg.get("scheduler") else "const"
    name = f"{optimizer.replace('/', '-')}-lr{short_number(cfg.optimizer.lr)}-{scheduler}"
    job = multirun_job_number()
    return name if job is None else f"{name}-j{job}"


def build_datamodule(cfg: DictConfig, data_dir: str | None = None):
    from cifarlab.data import CifarDataModule
    from cifarlab.datacache import cache_dir_for

    d = cfg.data
    return CifarDataModule(
        name=d.name,
        data_dir=data_dir or d.data_dir,
        batch_size=d.batch_size,
        eval_batch_size=d.eval_batch_size,
        val_size=d.val_size,
        augment=d.augment,
        normalize=d.normalize,
        download=d.download,
        verify_checksum=d.verify_checksum,
        num_classes=d.num_classes,
        train_size=d.train_size,
        test_size=d.test_size,
        root=d.root,
        image_size=d.image_size,
        split_seed=d.split_seed,
        seed=cfg.seed,
        channels_last=cfg.trainer.channels_last,
        cache_dir=cache_dir_for(d, data_dir),
        limit_train_batches=_limit(cfg.trainer.limit_train_batches),  # in batches, whatever steps_per_call
    )


def build_module(cfg: DictConfig, num_classes: int, config: dict[str, Any] | None = None):
    from cifarlab.model import CifarCNN
    from cifarlab.module import CifarModule

    m = cfg.model
    net = CifarCNN(
        num_classes, dropout=m.dropout, activation=m.activation, init=m.init, image_size=cfg.data.image_size
    )
    if cfg.trainer.channels_last:
        net = net.to(memory_format=torch.channels_last)
    return CifarModule(
        net=net,
        optimizer=instantiate(cfg.optimizer, _convert_="all"),
        scheduler=instantiate(cfg.scheduler, _convert_="all") if cfg.get("scheduler") else None,
        weight_decay=m.weight_decay,
        num_classes=num_classes,
        compile=cfg.trainer.compile,
        config=config,
        capture=cfg.trainer.capture,
        steps_per_call=cfg.trainer.steps_per_call,
        gradient_clip_val=cfg.trainer.gradient_clip_val,
        log_every_n_steps=cfg.trainer.log_every_n_steps,
    )


def build_trainer(cfg: DictConfig, output_dir: Path, logger=None, extra_callbacks=()):
    import lightning as L

    from cifarlab.callbacks import build_callbacks

    t = cfg.trainer
    callbacks, progress_bar = build_callbacks(
        output_dir,
        checkpoint=cfg.callbacks.checkpoint,
        early_stopping_patience=cfg.callbacks.early_stopping_patience,
        progress_bar=t.enable_progress_bar,
    )
    strategy = t.strategy
    if str(strategy).startswith("ddp"):
        from cifarlab.ddp import hydra_safe_ddp

        strategy = hydra_safe_ddp(strategy)
    trainer = L.Trainer(
        accelerator=t.accelerator,
        devices=t.devices,
        strategy=strategy,
        num_nodes=t.num_nodes,
        precision=resolve_precision(t.precision, t.accelerator),
        max_epochs=t.max_epochs,
        # Training: the datamodule limits batches, the module clips gradients and logs every
        # log_every_n_steps optimizer steps (it runs several per Lightning step, manual optimization).
        limit_val_batches=_limit(t.limit_val_batches),
        limit_test_batches=_limit(t.limit_test_batches),
        deterministic=t.deterministic,
        log_every_n_steps=1,
        check_val_every_n_epoch=t.check_val_every_n_epoch,
        num_sanity_val_steps=t.num_sanity_val_steps,
        benchmark=t.benchmark,
        enable_progress_bar=progress_bar,
        enable_model_summary=False,
        enable_checkpointing=cfg.callbacks.checkpoint,
        default_root_dir=str(output_dir),
        logger=logger if logger is not None else False,
        callbacks=callbacks + list(extra_callbacks),
    )
    if trainer.strategy.root_device.type == "cpu":  # train.py, eval.py, sweep trials, DDP ranks on a CPU
        reuse_freed_memory()
    return trainer


def _limit(value: Any) -> Any:
    # None: all batches, without Lightning's "100% of batches" notice. An int 1 means one batch, not 100%.
    return None if isinstance(value, float) and value == 1.0 else value


def quiet_lightning() -> None:
    """Route Lightning's log lines through Hydra's handlers once (not twice), and drop warnings that
    only concern Lightning's internals."""
    import logging
    import warnings

    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).propagate = True
    warnings.filterwarnings("ignore", message=r".*ckpt_path.*")
    warnings.filterwarnings("ignore", message=r".*LeafSpec.*")
    # a resume into a new run folder: cifarlab's BestCheckpoint carries the best checkpoint over itself
    warnings.filterwarnings("ignore", message=r".*The dirpath has changed from.*")
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")


def start_line(trainer, ckpt_path: str | None = None) -> str:
    """``device: cpu, 1 process, bf16-mixed``: what Lightning chose, once, in place of its own lines (which
    cifarlab.cli.TerminalFilter keeps off the terminal; <run>/train.log has them)."""
    device = trainer.strategy.root_device
    name = f"cuda ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else device.type
    count = trainer.num_devices * trainer.num_nodes
    processes = f"{count} processes ({type(trainer.strategy).__name__})" if count > 1 else "1 process"
    resume = f"; resuming from {ckpt_path}" if ckpt_path else ""
    return f"device: {name}, {processes}, {trainer.precision}{resume}"


def _float_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in metrics.items()
        if k.split("/")[0] in ("train", "val", "test") and "_step" not in k
    }


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write atomically, so a reader (a sweeper, a dashboard) never sees half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train, validate every epoch, test the best checkpoint; write metrics.json; return the metrics."""
    validate(cfg)
    check_hardware(cfg)
    if cfg.ckpt_path is not None:  # read here too (a few MB), so a wrong file is one line, not a traceback
        check_resumable(read_checkpoint(cfg.ckpt_path), cfg, cfg.ckpt_path)
    import lightning as L

    from cifarlab.loggers import build_logger, finish_logger, is_rank_zero

    quiet_lightning()
    output_dir = Path(cfg.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    config = OmegaConf.to_container(cfg, resolve=True)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    if is_rank_zero():
        (output_dir / "config.yaml").write_text(OmegaConf.to_yaml(config))

    datamodule = build_datamodule(cfg)
    module = build_module(cfg, datamodule.num_classes, config)
    run_name = cfg.run_name or default_run_name(cfg)
    lg = cfg.logger
    logger = build_logger(
        lg.name,
        output_dir,
        run_name,
        config,
        project=lg.project,
        mode=lg.mode,
        entity=lg.entity,
        group=lg.group,
        tags=list(lg.tags),
        log_model=lg.log_model,
        job_type=lg.job_type,
        init_timeout=lg.init_timeout,
    )
    from cifarlab.diagnostics import run_callbacks

    sweep_callbacks = []  # a trial of the Optuna sweeper (cifarlab.sweeper): reports val/acc, may be pruned
    if os.environ.get("CIFARLAB_OPTUNA_TRIAL"):
        from cifarlab.sweeper.trial import trial_callbacks

        sweep_callbacks = trial_callbacks()
    trainer = build_trainer(
        cfg, output_dir, logger, extra_callbacks=[*run_callbacks(cfg, output_dir, logger), *sweep_callbacks]
    )
    if trainer.is_global_zero:
        logging.getLogger("cifarlab").info(start_line(trainer, cfg.ckpt_path))

    start = time.perf_counter()
    metrics: dict[str, Any] = {"status": "running", "run_name": run_name, "output_dir": str(output_dir)}
    failed = True
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
        metrics.update(_float_metrics(trainer.callback_metrics))
        if getattr(module, "last_step_loss", None) is not None:  # the last logged one (not a callback metric)
            metrics["train/loss_step"] = module.last_step_loss
        pruned = any(getattr(cb, "pruned", False) for cb in sweep_callbacks)
        if cfg.test and not pruned:
            best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
            trainer.test(module, datamodule=datamodule, ckpt_path=best or None, verbose=False)
            metrics.update(_float_metrics(trainer.callback_metrics))
            metrics["best_ckpt"] = best
        failed = False
        metrics["status"] = "pruned" if pruned else "completed"
    except BaseException as err:
        from cifarlab.sweeper.trial import is_interruption  # Ctrl-C or SIGTERM: not the run's own failure

        metrics["status"] = "interrupted" if is_interruption(err) else "failed"
        metrics["error"] = f"{type(err).__name__}: {err}"
        if is_interruption(err):  # SystemExit: 1 / SIGTERMException: (empty) said nothing
            by = "SIGTERM" if type(err).__name__ == "SIGTERMException" else "Ctrl-C (SIGINT)"
            metrics["error"] = (
                f"interrupted by {by} at epoch {trainer.current_epoch}, step {trainer.global_step}"
            )
        raise
    finally:
        metrics.update(
            epochs=trainer.current_epoch,
            global_step=trainer.global_step,
            duration_s=round(time.perf_counter() - start, 3),
            precision=str(trainer.precision),
            step_mode=getattr(module, "step_mode", None),
            steps_per_call=getattr(module, "steps_per_call", None),
            eval_mode=getattr(module, "eval_mode", None),
        )
        if trainer.is_global_zero:
            write_json(output_dir / "metrics.json", metrics)
        finish_logger(logger, failed, metrics)
    if trainer.is_global_zero:
        print_summary(metrics)
    return metrics


def print_summary(metrics: dict[str, Any]) -> None:
    keys = ("val/acc_best", "val/acc", "val/loss", "test/acc", "test/loss", "train/loss")
    shown = "  ".join(f"{k} {metrics[k]:.4f}" for k in keys if k in metrics)
    print(
        f"\n{metrics['run_name']}: {metrics['epochs']} epochs, {metrics['global_step']} steps, "
        f"{metrics['duration_s']:.1f}s ({metrics['precision']}; steps {metrics.get('step_mode')}, "
        f"{metrics.get('steps_per_call')} per call; evaluation {metrics.get('eval_mode') or 'none'})\n  {shown}\n  results: {metrics['output_dir']}/metrics.json",
        file=sys.stdout,
        flush=True,
    )
