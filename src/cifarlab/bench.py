"""``make bench``: one CIFAR training epoch, side by side, on the same data, in one process tree.

    python -m cifarlab.bench [--images 10000] [--repeats 5] [--batch-size B] [--out FILE] ...  (--help)

Variants (each in its own warm worker process, a child of this one; only one runs at a time):

(a) ``reference``: the course's loop, reimplemented faithfully: a torchvision-style dataset whose
    ``__getitem__`` turns one uint8 HWC image into a PIL image and then a tensor (``ToTensor``), a
    ``DataLoader`` (batch 64, shuffled, ``--ref-workers`` workers), fp32, NCHW, Adam(lr 0.005, weight decay
    1e-4), ``loss.item()`` and the accuracy count every step.
(b) ``plain``: a plain PyTorch loop on cifarlab's pipeline: :class:`~cifarlab.data.DeviceBatches` (uint8 on the
    device, batched crop/flip, fused normalisation), channels_last, the precision ``train.py`` resolves (bf16
    autocast where the hardware has bf16), the batch size and optimizer of (c).
(b') ``captured``, GPU only: (b) with the whole step (gather, crop/flip, forward, backward, optimizer) in one
    CUDA graph, :class:`cifarlab.step.TrainStep` outside Lightning: the local limit for (c).
(c) ``train``: ``train.py``'s own ``run(cfg)``, the config composed from ``conf/train.yaml`` exactly as
    ``train.py`` composes it (defaults + the overrides printed in the results), for one epoch.
(d) GPU only: 1, 2 and 4 concurrent (c) trials on one GPU (what the sweeper's ``trials_per_gpu`` buys), at
    ``--trial-batch-size``; and, also GPU only, a full ``train.py experiment=seed_baseline`` run.

What is timed: one training epoch of ``--images`` images, from asking for the first batch to the end of the
last optimizer step (the device synchronised), i.e. data loading, augmentation, forward, backward and
optimizer steps, and in (c) everything Lightning does per step. Not timed: imports, data generation, model
and trainer construction, validation (off in the timed runs), process start-up; those are measured apart
(``startup``: ``python train.py --help`` and a two-step ``python train.py`` run, wall clock). Every worker
first runs a short untimed warm-up epoch. Repetitions are interleaved (a b c, b c a, c a b, ...) and medians
reported, so that machine noise and order effects hit all variants alike. Without a GPU every repetition after
the first runs in new worker processes (``--fresh-workers``): a process keeps a speed of its own, up to ~2% off
another's running the same code, which would otherwise bias every pair of a run the same way.

Results: a table on stdout and JSON in ``bench/results/<host>-<date>.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import SimpleNamespace
from typing import Any

ROOT = Path(__file__).resolve().parents[2]  # the checkout: train.py and conf/ live here
CONF = ROOT / "conf"
MARK = "@@cifarlab-bench@@ "  # prefix of the protocol lines a worker writes to its (private) stdout
KINDS = ("reference", "plain", "captured", "train")
LABELS = {
    "reference": "(a) course loop: PIL+ToTensor per sample, DataLoader",
    "plain": "(b) plain PyTorch on cifarlab's pipeline",
    "captured": "(b') the same, whole step in a CUDA graph",
    "train": "(c) train.py run(cfg) (Lightning)",
}
# The course's reference settings.
REF_BATCH, REF_LR, REF_WEIGHT_DECAY = 64, 0.005, 1e-4
# Targets (checked in the results, never in tests: timings on shared machines are noisy).
TARGETS = {
    "cpu_train_over_reference": 3.0,  # measured on an Intel Xeon with AMX-bf16; ~1.5x on a CPU without bf16
    "cpu_train_over_plain": 1.0,  # paired
    "gpu_train_img_per_s_b64_fp32": 60_000,
    "gpu_train_img_per_s_b512_bf16": 300_000,
    "gpu_train_over_captured": 0.8,  # (c)/(b'), paired
    "gpu_one_trial_img_per_s": 100_000,
    "gpu_four_over_one_trials": 2.5,
    "gpu_seed_baseline_s": 40.0,
}


# ---- machine --------------------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def machine() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "host": socket.gethostname(),
        "cpu": cpu_model(),
        "cores": cpu_cores(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_bf16": bool(
            torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
        ),
        "cuda": torch.cuda.is_available(),
        "gpus": [],
        # Without bytecode caching every start compiles torch & co from source: start-up figures then say so.
        "bytecode_cache": not sys.flags.dont_write_bytecode or bool(os.environ.get("PYTHONPYCACHEPREFIX")),
    }
    for name in ("torchvision", "lightning"):
        try:
            info[name] = __import__(name).__version__
        except ImportError:
            info[name] = None
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        info["gpu_bf16"] = torch.cuda.is_bf16_supported()
    if hasattr(os, "getloadavg"):
        info["load_avg"] = [round(v, 2) for v in os.getloadavg()]
    return info


# ---- the configuration of (c), shared by (a) and (b) for the data ------------------------------------------


def cifar10_present(data_dir: str | None = None) -> bool:
    """CIFAR-10's python batches (or its archive) in data/ or $CIFARLAB_DATA_DIR; checked without importing
    cifarlab.data (and so torch and Lightning), the names being those of cifarlab.data.CIFAR."""
    root = Path(data_dir or os.environ.get("CIFARLAB_DATA_DIR", ROOT / "data"))
    folder = root / "cifar-10-batches-py"
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    return all((folder / f).is_file() for f in names) or (root / "cifar-10-python.tar.gz").is_file()


def train_overrides(
    images: int,
    data: str,
    batch_size: int | None = None,
    precision: str | None = None,
    compile: bool = False,
    seed: int = 0,
    extra: list[str] | None = None,
) -> list[str]:
    """The train.py overrides of a timed epoch: ``images`` training images, no validation/test/logger/files."""
    ov = [
        f"data={data}",
        "logger=none",
        "test=false",
        "callbacks.checkpoint=false",
        "callbacks.figures=false",
        "trainer.max_epochs=1",
        "trainer.check_val_every_n_epoch=1000",  # no validation in the one-epoch runs
        "trainer.num_sanity_val_steps=0",
        "trainer.enable_progress_bar=false",
        f"seed={seed}",
    ]
    if batch_size:
        ov.append(f"data.batch_size={batch_size}")
    if precision:
        ov.append(f"trainer.precision={precision}")
    if compile:
        ov.append("trainer.compile=true")
    if data == "synthetic":
        ov += [f"data.train_size={images + 500}", "data.val_size=500", "data.test_size=100"]
    else:  # the bench never downloads; run_train cuts the epoch with limit_train_batches
        ov.append("data.download=false")
    return ov + list(extra or [])


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from cifarlab.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hydra_compose(config_name="train", overrides=overrides)


def device_for(accelerator: str):
    import torch

    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return torch.device("cuda", 0)
    return torch.device("cpu")


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- worker side: one timed epoch of each kind ----------------------------------------------------------

_CACHE: dict[str, Any] = {}


def _datamodule(cfg):
    """The training split of (c)'s config (cached per config): uint8 (N, 3, H, W) images, labels, mean, std."""
    from cifarlab.train import build_datamodule

    key = json.dumps({k: v for k, v in dict(cfg.data).items()}, sort_keys=True, default=str)
    if key not in _CACHE:
        dm = build_datamodule(cfg)
        dm.setup()
        x, y = dm.splits["train"]
        _CACHE[key] = (
            x,
            y,
            dm.mean if cfg.data.normalize else [0.0] * 3,
            dm.std if cfg.data.normalize else [1.0] * 3,
        )
    return _CACHE[key]


def _quantiles(values: list[float]) -> list[float]:
    """min, 10%, 50%, 90%, max."""
    if not values:
        return []
    v = sorted(values)
    return [v[0], v[len(v) // 10], v[len(v) // 2], v[(len(v) * 9) // 10], v[-1]]


def _minor_faults() -> int | None:
    try:
        import resource
    except ImportError:  # not a Unix
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


class _Clock:
    """Epoch timing shared by the three loops: start, warm-up boundary, end; images counted per step."""

    def __init__(self, device, warmup_steps: int) -> None:
        self.device, self.warmup_steps = device, warmup_steps
        self.images = self.images_at_warm = self.steps = 0
        self.faults0: int | None = None
        self.t0 = self.t_warm = self.t_end = self.t_last = 0.0
        self.wall0 = 0.0
        self.step_s: list[float] = []  # time between consecutive step ends (the first from the epoch start)

    def start(self) -> None:
        sync(self.device)
        self.faults0 = _minor_faults()
        self.wall0 = time.time()
        self.t0 = self.t_warm = self.t_last = time.perf_counter()

    def step_start(self) -> None:
        if self.steps == self.warmup_steps and self.steps > 0:
            sync(self.device)
            self.t_warm, self.images_at_warm = time.perf_counter(), self.images

    def step_end(self, n: int) -> None:
        now = time.perf_counter()
        self.step_s.append(now - self.t_last)
        self.t_last = now
        self.images += n
        self.steps += 1

    def stop(self) -> dict[str, Any]:
        sync(self.device)
        self.t_end = time.perf_counter()
        epoch_s = self.t_end - self.t0
        steady = self.images - self.images_at_warm
        steady_s = self.t_end - self.t_warm
        faults = _minor_faults()
        return {
            # pages the epoch touched for the first time (fresh memory from the kernel): ~0 once memory is reused
            "minor_page_faults": faults - self.faults0
            if faults is not None and self.faults0 is not None
            else None,
            "images": self.images,
            "steps": self.steps,
            "epoch_s": round(epoch_s, 4),
            "img_per_s": round(self.images / epoch_s, 1) if epoch_s > 0 else None,
            "steady_img_per_s": round(steady / steady_s, 1) if steady and steady_s > 0 else None,
            # batch / median step time: robust to other processes stealing the CPU now and then
            "median_step_img_per_s": round(self.images / self.steps / statistics.median(self.step_s), 1)
            if self.step_s
            else None,
            "step_s_quantiles": [round(q, 5) for q in _quantiles(self.step_s)],
            "wall_start": self.wall0,
            "wall_end": self.wall0 + epoch_s,
        }


def course_cnn():
    """The course's network as the course wrote it: conv → ReLU → max-pool blocks (cifarlab's CifarCNN pools
    before an in-place activation, the same function with less work), with CifarCNN's init."""
    from torch import nn

    from cifarlab.model import CifarCNN

    net = CifarCNN(10)
    convs = [m for m in net.features if isinstance(m, nn.Conv2d)]
    net.features = nn.Sequential(*[layer for c in convs for layer in (c, nn.ReLU(), nn.MaxPool2d(2))])
    return net


def run_reference(job: dict[str, Any]) -> dict[str, Any]:
    """(a) The course's loop: per-sample PIL + ToTensor through a DataLoader, fp32, NCHW, batch 64."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from PIL import Image
    from torch.utils.data import DataLoader, Dataset
    from torchvision import transforms

    cfg = compose(job["overrides"])
    x, y, _, _ = _datamodule(cfg)
    n = min(job["images"], len(y))
    data_hwc = np.ascontiguousarray(x[:n].permute(0, 2, 3, 1).numpy())  # how torchvision's CIFAR10 keeps it
    targets = y[:n].tolist()

    class CourseCIFAR(Dataset):  # torchvision.datasets.CIFAR10.__getitem__, line for line
        def __init__(self, data, targets, transform):
            self.data, self.targets, self.transform = data, targets, transform

        def __len__(self):
            return len(self.data)

        def __getitem__(self, index):
            img, target = self.data[index], self.targets[index]
            img = Image.fromarray(img)
            if self.transform is not None:
                img = self.transform(img)
            return img, target

    device = device_for(cfg.trainer.accelerator)
    torch.manual_seed(job["seed"])
    loader = DataLoader(
        CourseCIFAR(data_hwc, targets, transforms.ToTensor()),
        batch_size=REF_BATCH,
        shuffle=True,
        num_workers=job["ref_workers"],
    )
    net = course_cnn().to(device)
    optimizer = torch.optim.Adam(net.parameters(), lr=REF_LR, weight_decay=REF_WEIGHT_DECAY)
    net.train()
    clock = _Clock(device, job["warmup_steps"])
    running_loss, correct = 0.0, 0
    limit = job.get("limit_steps")
    clock.start()
    for i, (inputs, labels) in enumerate(loader):
        if limit is not None and i >= limit:
            break
        clock.step_start()
        inputs, labels = inputs.to(device), labels.to(device)
        optimizer.zero_grad()
        outputs = net(inputs)
        loss = F.cross_entropy(outputs, labels)
        loss.backward()
        optimizer.step()
        running_loss += loss.item()
        correct += (outputs.argmax(1) == labels).sum().item()
        clock.step_end(len(labels))
    out = clock.stop()
    out.update(
        batch_size=REF_BATCH,
        precision="32-true",
        layout="NCHW",
        train_acc=round(correct / max(1, clock.images), 4),
    )
    return out


def _plain_setup(job: dict[str, Any], capturable: bool = False) -> SimpleNamespace:
    """What (b) and (b') share: (c)'s config, data on the device as DeviceBatches, the net, the optimizer
    (torch's fastest form of it, or its capturable form for (b'))."""
    import torch
    from hydra.utils import instantiate

    from cifarlab.capturable import optimizer_for_capture
    from cifarlab.data import DeviceBatches
    from cifarlab.model import CifarCNN, parameter_groups
    from cifarlab.module import build_optimizer
    from cifarlab.step import autocast_dtype
    from cifarlab.train import resolve_precision, reuse_freed_memory

    cfg = compose(job["overrides"])
    x, y, mean, std = _datamodule(cfg)
    n = min(job["images"], len(y))
    device = device_for(cfg.trainer.accelerator)
    if device.type == "cpu":  # as train.py does on a CPU: its page faults are no part of Lightning's cost
        reuse_freed_memory()
    precision = resolve_precision(cfg.trainer.precision, cfg.trainer.accelerator)
    channels_last = bool(cfg.trainer.channels_last)
    batches = DeviceBatches(
        x[:n].to(device),
        y[:n].to(device),
        cfg.data.batch_size,
        mean=mean,
        std=std,
        shuffle=True,
        augment=cfg.data.augment,
        seed=job["seed"],
        channels_last=channels_last,
    )
    torch.manual_seed(job["seed"])
    torch.backends.cudnn.benchmark = bool(cfg.trainer.benchmark)  # as Lightning sets it for (c)
    m = cfg.model
    net = CifarCNN(10, dropout=m.dropout, activation=m.activation, init=m.init).to(device)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    build = optimizer_for_capture if capturable else build_optimizer
    optimizer = build(instantiate(cfg.optimizer, _convert_="all"), parameter_groups(net, m.weight_decay))
    return SimpleNamespace(
        cfg=cfg,
        device=device,
        precision=precision,
        dtype=autocast_dtype(precision),
        layout="NHWC" if channels_last else "NCHW",
        batches=batches,
        net=net,
        optimizer=optimizer,
    )


def run_plain(job: dict[str, Any]) -> dict[str, Any]:
    """(b) A plain loop on cifarlab's pipeline, with (c)'s batch size, optimizer and resolved precision."""
    import torch
    import torch.nn.functional as F

    b = _plain_setup(job)
    forward = torch.compile(b.net) if b.cfg.trainer.compile else b.net
    scaler = torch.amp.GradScaler(b.device.type, enabled=b.dtype is torch.float16)
    b.net.train()
    clock = _Clock(b.device, job["warmup_steps"])
    limit = job.get("limit_steps")
    clock.start()
    for i, (inputs, labels) in enumerate(b.batches):
        if limit is not None and i >= limit:
            break
        clock.step_start()
        with torch.autocast(b.device.type, dtype=b.dtype or torch.float32, enabled=b.dtype is not None):
            loss = F.cross_entropy(forward(inputs).float(), labels)
        b.optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(b.optimizer)
        scaler.update()
        clock.step_end(len(labels))
    out = clock.stop()
    out.update(batch_size=b.cfg.data.batch_size, precision=b.precision, layout=b.layout)
    return out


def run_captured(job: dict[str, Any]) -> dict[str, Any]:
    """(b') (b) with the whole step captured in a CUDA graph (cifarlab.step.TrainStep), no Lightning."""
    from cifarlab.step import GRAPH_DEVICES, TrainStep

    b = _plain_setup(job, capturable=True)
    step = TrainStep(b.net, b.optimizer, capture=b.device.type in GRAPH_DEVICES, autocast_dtype=b.dtype)
    b.net.train()
    clock = _Clock(b.device, job["warmup_steps"])
    limit = job.get("limit_steps")
    clock.start()
    for i, plan in enumerate(b.batches.batch_plans()):
        if limit is not None and i >= limit:
            break
        clock.step_start()
        step(b.batches, plan)
        clock.step_end(plan.shape[1])
    out = clock.stop()
    out.update(batch_size=b.cfg.data.batch_size, precision=b.precision, layout=b.layout, step_mode=step.mode)
    return out


def run_train(job: dict[str, Any]) -> dict[str, Any]:
    """(c) train.py's run(cfg) for one epoch; a callback added to its Trainer times the training epoch."""
    import lightning as L

    import cifarlab.train as T

    cfg = compose(job["overrides"] + [f"output_dir={job['output_dir']}"])
    if cfg.data.name != "synthetic" or job.get("limit_steps") is not None:
        steps = job.get("limit_steps") or math.ceil(job["images"] / cfg.data.batch_size)
        cfg.trainer.limit_train_batches = max(2, int(steps))  # train.py reads 1 like 1.0: the whole epoch
    device = device_for(cfg.trainer.accelerator)
    barrier = job.get("barrier")

    class EpochTimer(L.Callback):
        def __init__(self) -> None:
            self.clock = _Clock(device, job["warmup_steps"])
            self.result: dict[str, Any] | None = None

        def on_train_epoch_start(self, trainer, pl_module) -> None:
            if barrier:  # concurrent trials: start the timed epochs together
                Path(barrier["dir"], f"ready{barrier['id']}").touch()
                while not Path(barrier["dir"], "go").exists():
                    time.sleep(0.005)
            self.clock.start()

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self.clock.step_start()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            # a Chunk of steps_per_call batches (CifarModule), or an (images, labels) batch
            self.clock.step_end(batch.images if hasattr(batch, "plans") else len(batch[1]))

        def on_train_epoch_end(self, trainer, pl_module) -> None:  # before the module's own epoch end
            self.result = self.clock.stop()

    timer = EpochTimer()
    original = T.build_trainer

    def build_trainer(cfg, output_dir, logger=None, extra_callbacks=()):
        return original(cfg, output_dir, logger, extra_callbacks=[*extra_callbacks, timer])

    T.build_trainer = build_trainer
    try:
        metrics = T.run(cfg)
    finally:
        T.build_trainer = original
    if timer.result is None:
        raise RuntimeError("the training epoch did not run")
    out = dict(timer.result)
    out.update(
        batch_size=cfg.data.batch_size,
        step_mode=metrics.get("step_mode"),
        steps_per_call=metrics.get("steps_per_call"),
        precision=metrics.get("precision"),
        layout="NHWC" if cfg.trainer.channels_last else "NCHW",
        train_acc=metrics.get("train/acc"),
    )
    return out


JOBS = {"reference": run_reference, "plain": run_plain, "captured": run_captured, "train": run_train}


def worker_main() -> int:
    """Serve jobs (one JSON line each on stdin) until stdin closes; answer on a private copy of stdout."""
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # whatever the jobs print (Lightning, run summaries) goes to the log, not the protocol
    sys.stdout = sys.stderr
    # The heavy imports now, while the other workers import theirs, rather than one after the other at
    # their first jobs.
    import torchvision.transforms  # noqa: F401 - the reference loop's ToTensor

    import cifarlab.data  # noqa: F401 - torch, Lightning
    import cifarlab.module  # noqa: F401 - torchmetrics
    import cifarlab.train  # noqa: F401 - hydra

    for line in sys.stdin:
        if not line.strip():
            continue
        job = json.loads(line)
        try:
            result = JOBS[job["kind"]](job)
        except BaseException as err:  # noqa: BLE001 - reported to the parent, which stops with the traceback
            if isinstance(err, KeyboardInterrupt):
                raise
            result = {"error": traceback.format_exc()}
        # which process ran it (--fresh-workers: a new one each repetition)
        result["worker_pid"] = os.getpid()
        proto.write(MARK + json.dumps(result) + "\n")
    return 0


# ---- parent side ----------------------------------------------------------------------------------------


class Worker:
    """A persistent ``python -m cifarlab.bench --worker`` child; jobs go in one at a time."""

    def __init__(self, name: str, log_dir: Path, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in close()
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        src = str(ROOT / "src")
        full_env["PYTHONPATH"] = src + (
            os.pathsep + full_env["PYTHONPATH"] if full_env.get("PYTHONPATH") else ""
        )
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cifarlab.bench", "--worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            cwd=str(ROOT),
            env=full_env,
        )

    def send(self, job: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()

    def receive(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(MARK):
                result = json.loads(line[len(MARK) :])
                if "error" in result:
                    raise RuntimeError(f"bench worker {self.name} failed:\n{result['error']}")
                return result
        self.proc.wait()
        tail = self.log_path.read_text()[-3000:]
        raise RuntimeError(f"bench worker {self.name} exited with code {self.proc.returncode}:\n{tail}")

    def run(self, job: dict[str, Any]) -> dict[str, Any]:
        self.send(job)
        return self.receive()

    def close(self) -> None:
        if self.proc.stdin and not self.proc.stdin.closed:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    def med(key):
        values = [r[key] for r in runs if r.get(key) is not None]
        return round(statistics.median(values), 4) if values else None

    first = runs[0]
    return {
        "img_per_s": med("img_per_s"),
        "epoch_s": med("epoch_s"),
        "steady_img_per_s": med("steady_img_per_s"),
        "median_step_img_per_s": med("median_step_img_per_s"),
        "images": first["images"],
        "batch_size": first["batch_size"],
        "precision": first["precision"],
        "layout": first["layout"],
        "step_mode": first.get("step_mode"),
        "steps_per_call": first.get("steps_per_call"),
        "repeats": runs,
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def _paired(runs: dict[str, dict[str, Any]], a: str, b: str) -> float | None:
    if a not in runs or b not in runs:
        return None
    pairs = zip(runs[a]["repeats"], runs[b]["repeats"], strict=True)
    return round(statistics.median(x["img_per_s"] / y["img_per_s"] for x, y in pairs), 3)


def side_by_side(args, workers: dict[str, Worker], overrides: list[str], tmp: Path, log) -> dict[str, Any]:
    """(a), (b), (c): warm up each worker, then interleave the timed epochs.

    With ``args.fresh_workers`` every repetition after the first runs in new worker processes: two (b) workers
    alternated on the 2-core EPYC differed steadily (paired 1.020, 0.990, 0.994, 1.003 in four pairs of
    processes, much of it glibc's malloc, see docs/speed.md), a bias as large as the differences the bench is
    meant to show. New processes per repetition make whatever is left of it part of the spread."""
    kinds = list(workers)
    base = {
        "overrides": overrides,
        "images": args.images,
        "seed": args.seed,
        "warmup_steps": args.warmup_steps,
        "ref_workers": args.ref_workers,
    }
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in kinds}
    if not kinds:
        log("  every variant skipped")
        return {}
    # A few steps warm a worker up, except under --compile: there the epoch's short last batch compiles
    # again (8 s of a 12 s timed epoch on the 2-core EPYC), so the warm-up is a whole epoch.
    warmup_steps = None if args.compile else 4

    def warm_up(rep: int) -> None:
        for k in kinds:
            if rep == 0:
                log(f"  warm-up {k} ...")
            out = str(tmp / f"{k}-warmup{rep}")
            limit = 4 if k == "reference" else warmup_steps  # (a) never compiles
            workers[k].run({**base, "kind": k, "limit_steps": limit, "output_dir": out})

    try:
        warm_up(0)
        for rep in range(args.repeats):
            if args.fresh_workers and rep > 0:
                for w in workers.values():
                    w.close()
                workers.update({k: Worker(f"{k}-{rep}", tmp) for k in kinds})  # they import side by side
                warm_up(rep)
            # a b c, b c a, c a b, ...: every variant also runs first, second and last (after the long (a))
            for k in kinds[rep % len(kinds) :] + kinds[: rep % len(kinds)]:
                result = workers[k].run({**base, "kind": k, "output_dir": str(tmp / f"{k}-{rep}")})
                runs[k].append(result)
                log(
                    f"  repeat {rep + 1}/{args.repeats} {k:9s} {result['img_per_s']:>10,.0f} img/s  "
                    f"{result['epoch_s']:7.2f} s"
                )
    finally:
        for w in workers.values():
            w.close()
    return {k: summarise(v) for k, v in runs.items()}


def concurrent_trials(args, tmp: Path, log, data: str = "synthetic") -> dict[str, Any]:
    """(d) k train.py trials at once on one GPU (k in --trials): total images/s over their common epoch.

    The single trial is (c) in another process, so it must agree with (c): same data, and a whole untimed
    epoch first. (It used to warm up 4 steps on synthetic data and time the worker's first full epoch, with
    its one-time costs inside: cuDNN autotuning the epoch's short last batch, the allocator growing; with no
    median over repetitions to hide them. That read 8,822 img/s where (c) read 14,940 on an H100.)"""
    import torch

    if not args.trials:
        return {"skipped": "no CUDA device (pass --trials 1,2 to try the mechanics on a CPU)"}
    cuda = torch.cuda.is_available()
    images = args.trial_images or args.images
    overrides = train_overrides(
        images, data, args.trial_batch_size, args.precision, args.compile, args.seed, args.set
    )
    gpu = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0] if cuda else ""
    out: dict[str, Any] = {
        "batch_size": args.trial_batch_size,
        "images_per_trial": images,
        "gpu": gpu,
        "by_trials": {},
    }
    for k in args.trials:
        threads = max(1, cpu_cores() // k)
        env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        if cuda:
            env["CUDA_VISIBLE_DEVICES"] = gpu
        workers = [Worker(f"trials{k}-{i}", tmp, env) for i in range(k)]
        try:
            base = {
                "kind": "train",
                "overrides": overrides,
                "images": images,
                "seed": args.seed,
                "warmup_steps": args.warmup_steps,
                "ref_workers": 0,
            }
            for i, w in enumerate(workers):  # a whole epoch, the timed one's shapes included
                w.send({**base, "output_dir": str(tmp / f"t{k}-{i}-warmup")})
            for w in workers:
                w.receive()
            barrier = tmp / f"barrier{k}"
            barrier.mkdir()
            for i, w in enumerate(workers):
                w.send(
                    {**base, "output_dir": str(tmp / f"t{k}-{i}"), "barrier": {"dir": str(barrier), "id": i}}
                )
            while len(list(barrier.glob("ready*"))) < k:
                time.sleep(0.01)
            (barrier / "go").touch()
            results = [w.receive() for w in workers]
        finally:
            for w in workers:
                w.close()
        span = max(r["wall_end"] for r in results) - min(r["wall_start"] for r in results)
        total = sum(r["images"] for r in results)
        entry = {
            "img_per_s": round(total / span, 1),
            "sum_of_trials_img_per_s": round(sum(r["img_per_s"] for r in results), 1),
            "span_s": round(span, 3),
            "trials": results,
        }
        out["by_trials"][str(k)] = entry
        log(f"  {k} concurrent trial(s): {entry['img_per_s']:,.0f} img/s in total")
    one = out["by_trials"].get("1", {}).get("img_per_s")
    for entry in out["by_trials"].values():
        entry["over_one"] = _ratio(entry["img_per_s"], one)
    return out


def _run_script(
    args: list[str], timeout: float, env: dict[str, str] | None = None
) -> tuple[float, subprocess.CompletedProcess]:
    full_env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        **(env or {}),
    }
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=str(ROOT),
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return time.perf_counter() - start, proc


def startup(args, tmp: Path, log) -> dict[str, Any]:
    """Wall clock of ``python train.py --help`` and of a two-step run (an upper bound on the time to the
    first training step: it also includes writing metrics.json and exiting). Interleaved, medians."""
    two_steps = [
        "data=synthetic",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=2",  # not 1: train.py's _limit reads 1 like 1.0 (all batches)
        "trainer.check_val_every_n_epoch=1000",
        "test=false",
        "callbacks.checkpoint=false",
        "callbacks.figures=false",
    ]
    cases = {
        "help_s": ["--help"],
        "first_step_s": [*two_steps, "logger=none"],
        "first_step_wandb_offline_s": two_steps,
    }
    times: dict[str, list[float]] = {k: [] for k in cases}
    for rep in range(args.startup_repeats):
        for key, argv in cases.items():
            run_dir = tmp / f"startup-{key}-{rep}"
            extra = [] if argv == ["--help"] else [f"hydra.run.dir={run_dir}"]
            seconds, proc = _run_script([*argv, *extra], timeout=600, env={"WANDB_DIR": str(run_dir)})
            if proc.returncode != 0:
                raise RuntimeError(f"python train.py {' '.join(argv)} failed:\n{proc.stderr[-3000:]}")
            times[key].append(round(seconds, 3))
            log(
                f"  python train.py {'--help' if argv == ['--help'] else key.removesuffix('_s')}: {seconds:.2f} s"
            )
    out: dict[str, Any] = {k: round(statistics.median(v), 3) for k, v in times.items()}
    out["repeats"] = times
    return out


def seed_baseline(args, tmp: Path, log) -> dict[str, Any]:
    """GPU: the course's full run, ``python train.py experiment=seed_baseline`` (50 epochs), wall clock and
    the run's own duration (fit + test, without start-up)."""
    run_dir = tmp / "seed_baseline"
    argv = ["experiment=seed_baseline", "logger=none", f"hydra.run.dir={run_dir}"]
    data = "cifar10" if cifar10_present() else "synthetic"
    if data == "synthetic":  # CIFAR-10-sized synthetic data
        argv += ["data=synthetic", "data.train_size=50000", "data.val_size=5000", "data.test_size=10000"]
    argv += list(args.set)
    log(f"  python train.py {' '.join(argv[:1] + argv[3:])} ...")
    seconds, proc = _run_script(argv, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"seed_baseline failed:\n{proc.stderr[-3000:]}")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {
        "data": data,
        "wall_s": round(seconds, 2),
        "duration_s": metrics.get("duration_s"),
        "epochs": metrics.get("epochs"),
        "test_acc": metrics.get("test/acc"),
        "overrides": [a for a in argv if not a.startswith("hydra.run.dir=")],
        "modified": bool(args.set),  # extra overrides: not the course's run, so no target check
    }


def sweeper_figure(log, warm_trials: int = 8) -> dict[str, Any]:
    """The sweeper's benchmarks, if this checkout has them: slot utilisation (simulated trials), and the per-trial
    overhead of the same ``warm_trials``-trial sweep started the old way and the warm way (0: skipped)."""
    try:
        from cifarlab.sweeper import bench as sweeper_bench
    except ImportError as err:
        return {"skipped": f"cifarlab.sweeper.bench not available ({err})"}
    result = sweeper_bench.simulated(slots=2)
    log("  " + sweeper_bench.describe(result))
    if warm_trials:
        result["warm_start"] = sweeper_bench.warm_start(n_trials=warm_trials, slots=2)
        log("  " + sweeper_bench.describe_warm_start(result["warm_start"]))
    return result


def table(results: dict[str, Any]) -> str:
    m = results["machine"]
    gpu = ", ".join(m["gpus"]) if m["gpus"] else "no GPU"
    lines = [
        f"cifarlab bench: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, {gpu}; "
        f"{results['settings']['images']:,} images per epoch, median of {results['settings']['repeats']}"
        + (" (each in new processes)" if results["settings"].get("fresh_workers") else ""),
        "",
        f"{'':52s} {'batch':>5s}  {'precision':10s} {'layout':6s} {'img/s':>10s} {'epoch s':>8s}",
    ]
    for kind, r in results["runs"].items():
        lines.append(
            f"{LABELS[kind]:52s} {r['batch_size']:5d}  {r['precision']:10s} {r['layout']:6s} "
            f"{r['img_per_s']:>10,.0f} {r['epoch_s']:8.2f}"
            + (f"  {r['step_mode']}" if r.get("step_mode") else "")
            + (f", {r['steps_per_call']} steps per call" if r.get("steps_per_call") else "")
        )
    ratios = results["ratios"]
    parts = []
    if ratios.get("train_over_reference") is not None:
        parts.append(
            f"(c)/(a) {ratios['train_over_reference']:.2f}x (paired {ratios['train_over_reference_paired']:.2f}x)"
        )
    if ratios.get("train_over_plain") is not None:
        parts.append(
            f"(c)/(b) {ratios['train_over_plain']:.2f} (paired {ratios['train_over_plain_paired']:.2f})"
        )
    if ratios.get("train_over_captured") is not None:
        parts.append(
            f"(c)/(b') {ratios['train_over_captured']:.2f} (paired {ratios['train_over_captured_paired']:.2f})"
        )
    if parts:
        if results["machine"]["cuda"]:
            targets = (
                f"targets on a GPU: (c) >= {TARGETS['gpu_train_img_per_s_b64_fp32']:,} img/s at batch 64 fp32, "
                f">= {TARGETS['gpu_train_img_per_s_b512_bf16']:,} at batch 512 bf16, "
                f"(c)/(b') >= {TARGETS['gpu_train_over_captured']:g}"
            )
        else:
            targets = (
                f"targets on a CPU: (c)/(a) >= {TARGETS['cpu_train_over_reference']:g}x, "
                f"(c)/(b) >= {TARGETS['cpu_train_over_plain']:g}"
            )
        lines += ["", "  ".join(parts) + "   " + targets]
    s = results.get("startup")
    if s and "help_s" in s:
        lines.append(
            f"start-up: train.py --help {s['help_s']:.2f} s; a two-step run {s['first_step_s']:.2f} s "
            f"(logger=none), {s['first_step_wandb_offline_s']:.2f} s (W&B offline)"
        )
    d = results.get("gpu_trials", {})
    if "by_trials" in d:
        lines.append(
            f"concurrent trials on one device (batch {d['batch_size']}): "
            + ", ".join(
                f"{k}: {v['img_per_s']:,.0f} img/s ({v['over_one']:.2f}x)" for k, v in d["by_trials"].items()
            )
        )
    elif "skipped" in d:
        lines.append(f"concurrent trials per GPU: skipped ({d['skipped']})")
    sb = results.get("seed_baseline", {})
    if "wall_s" in sb:
        lines.append(
            f"seed_baseline ({sb['epochs']} epochs, {sb['data']}): {sb['duration_s']:.1f} s training+test, "
            f"{sb['wall_s']:.1f} s wall"
        )
    sw = results.get("sweeper", {})
    if "ratio" in sw:
        lines.append(
            f"sweeper slot utilisation: async {sw['async']['utilisation']:.0%} vs batch-synchronous "
            f"{sw['sync']['utilisation']:.0%} (ratio {sw['ratio']:.2f})"
        )
    if sw.get("warm_start", {}).get("n_trials"):
        from cifarlab.sweeper import bench as sweeper_bench

        lines.append(sweeper_bench.describe_warm_start(sw["warm_start"]))
    met = check_targets(results)["met"]
    if met:
        lines.append("targets: " + ", ".join(f"{k} {'met' if ok else 'NOT met'}" for k, ok in met.items()))
    return "\n".join(lines)


def check_targets(results: dict[str, Any]) -> dict[str, Any]:
    checks: dict[str, Any] = {}
    r = results["ratios"]
    if not results["machine"]["cuda"]:
        if r.get("train_over_reference") is not None:
            checks["cpu_train_over_reference"] = (
                r["train_over_reference"] >= TARGETS["cpu_train_over_reference"]
            )
        if r.get("train_over_plain_paired") is not None:
            checks["cpu_train_over_plain"] = r["train_over_plain_paired"] >= TARGETS["cpu_train_over_plain"]
    c = results["runs"].get("train")
    if results["machine"]["cuda"] and c:
        setting = {(64, "32-true"): "b64_fp32", (512, "bf16-mixed"): "b512_bf16"}.get(
            (c["batch_size"], c["precision"])
        )
        if setting:
            checks[f"gpu_train_img_per_s_{setting}"] = (
                c["img_per_s"] >= TARGETS[f"gpu_train_img_per_s_{setting}"]
            )
        if r.get("train_over_captured_paired") is not None:
            checks["gpu_train_over_captured"] = (
                r["train_over_captured_paired"] >= TARGETS["gpu_train_over_captured"]
            )
    d = results.get("gpu_trials", {}).get("by_trials", {})
    if results["machine"]["cuda"] and d:
        if "1" in d:
            checks["gpu_one_trial_img_per_s"] = d["1"]["img_per_s"] >= TARGETS["gpu_one_trial_img_per_s"]
        if "4" in d and d["4"].get("over_one") is not None:
            checks["gpu_four_over_one_trials"] = d["4"]["over_one"] >= TARGETS["gpu_four_over_one_trials"]
    sb = results.get("seed_baseline", {})
    if results["machine"]["cuda"] and sb.get("duration_s") is not None and not sb.get("modified"):
        checks["gpu_seed_baseline_s"] = sb["duration_s"] <= TARGETS["gpu_seed_baseline_s"]
    return {"targets": TARGETS, "met": checks}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m cifarlab.bench",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--images", type=int, default=10_000, help="training images per timed epoch (default 10000)"
    )
    p.add_argument("--repeats", type=int, default=5, help="interleaved repetitions; medians are reported")
    p.add_argument(
        "--batch-size", type=int, default=None, help="batch size of (b) and (c) (default: train.py's)"
    )
    p.add_argument(
        "--precision", default=None, help="trainer.precision of (b) and (c) (default: train.py's, auto)"
    )
    p.add_argument("--compile", action="store_true", help="torch.compile the network in (b) and (c)")
    p.add_argument(
        "--data",
        choices=("auto", "synthetic", "cifar10"),
        default="auto",
        help="auto: CIFAR-10 if it is in data/ (or $CIFARLAB_DATA_DIR), else synthetic",
    )
    p.add_argument("--ref-workers", type=int, default=0, help="DataLoader workers of the course loop (a)")
    p.add_argument("--warmup-steps", type=int, default=5, help="steps excluded from steady_img_per_s")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--fresh-workers",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="new worker processes for every repetition (default: on without a GPU; a process's own "
        "speed differs from another's by up to ~2%%)",
    )
    p.add_argument("--skip", nargs="*", default=[], choices=KINDS, help="variants to leave out")
    p.add_argument(
        "--trials",
        default=None,
        help="concurrent trials per GPU to measure, e.g. 1,2,4, or none (default on a GPU: 1,2,4; else none)",
    )
    p.add_argument("--trial-batch-size", type=int, default=512)
    p.add_argument("--trial-images", type=int, default=None, help="images per trial (default: --images)")
    p.add_argument(
        "--seed-baseline",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run experiment=seed_baseline in full (default: on a GPU only)",
    )
    p.add_argument(
        "--startup",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="measure python train.py --help and a two-step run",
    )
    p.add_argument("--startup-repeats", type=int, default=2)
    p.add_argument(
        "--sweeper",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="include the sweeper's slot-utilisation figure (cifarlab.sweeper.bench)",
    )
    p.add_argument(
        "--set", nargs="*", default=[], metavar="KEY=VALUE", help="extra train.py overrides for (b)/(c)"
    )
    p.add_argument(
        "--out", type=Path, default=None, help="JSON file (default: bench/results/<host>-<date>.json)"
    )
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker_main()

    def log(msg: str) -> None:
        print(msg, flush=True)

    data = args.data if args.data != "auto" else ("cifar10" if cifar10_present() else "synthetic")
    overrides = train_overrides(
        args.images, data, args.batch_size, args.precision, args.compile, args.seed, args.set
    )
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="cifarlab-bench-") as tmp_name:
        tmp = Path(tmp_name)
        # The workers start first: they import torch & co. while this process does the same.
        workers = {k: Worker(k, tmp) for k in KINDS if k not in args.skip}
        try:
            import torch
        except BaseException:
            for w in workers.values():
                w.close()
            raise

        cuda = torch.cuda.is_available()
        if not cuda and "captured" in workers:  # (b') needs CUDA graphs
            workers.pop("captured").close()
        if args.trials == "none":
            args.trials = []
        else:
            args.trials = (
                [int(k) for k in args.trials.split(",")] if args.trials else ([1, 2, 4] if cuda else [])
            )
        run_seed_baseline = cuda if args.seed_baseline is None else args.seed_baseline
        results: dict[str, Any] = {
            "created": _dt.datetime.now().isoformat(timespec="seconds"),
            "machine": machine(),
            "settings": {
                "images": args.images,
                "repeats": args.repeats,
                "data": data,
                "warmup_steps": args.warmup_steps,
                "reference": {
                    "batch_size": REF_BATCH,
                    "lr": REF_LR,
                    "weight_decay": REF_WEIGHT_DECAY,
                    "num_workers": args.ref_workers,
                    "precision": "32-true",
                    "layout": "NCHW",
                },
                "train_overrides": overrides,
                "timed": "one training epoch: first batch request to the end of the last optimizer step "
                "(device synchronised); warm workers; no validation, imports, data generation or start-up",
            },
        }
        m = results["machine"]
        log(
            f"cifarlab bench: {m['cpu']} ({m['cores']} cores), torch {m['torch']}, "
            f"{'GPU ' + ', '.join(m['gpus']) if cuda else 'no GPU'}; {data} data, {args.images:,} images per epoch"
        )
        log("side by side (a) course loop, (b) plain loop on cifarlab's pipeline, (c) train.py:")
        if args.fresh_workers is None:  # the per-process bias matters where the differences are ~1% (a CPU)
            args.fresh_workers = not cuda
        results["settings"]["fresh_workers"] = args.fresh_workers
        runs = side_by_side(args, workers, overrides, tmp, log)
        results["runs"] = runs
        img = {k: v["img_per_s"] for k, v in runs.items()}
        results["ratios"] = {
            "train_over_reference": _ratio(img.get("train"), img.get("reference")),
            "train_over_plain": _ratio(img.get("train"), img.get("plain")),
            "plain_over_reference": _ratio(img.get("plain"), img.get("reference")),
            # the median of the per-repetition ratios: runs next to each other share the machine's mood
            "train_over_reference_paired": _paired(runs, "train", "reference"),
            "train_over_plain_paired": _paired(runs, "train", "plain"),
            "train_over_captured": _ratio(img.get("train"), img.get("captured")),
            "train_over_captured_paired": _paired(runs, "train", "captured"),
        }
        if args.trials:
            log("concurrent trials on one device:")
            results["gpu_trials"] = concurrent_trials(args, tmp, log, data)
        else:
            why = "--trials none" if cuda else "no CUDA device"
            results["gpu_trials"] = {"skipped": why}
            log(f"concurrent trials per GPU: skipped ({why})")
        if run_seed_baseline:
            log("seed_baseline, 50 epochs:")
            results["seed_baseline"] = seed_baseline(args, tmp, log)
        if args.startup:
            log("start-up:")
            results["startup"] = startup(args, tmp, log)
        if args.sweeper:
            log("sweeper:")
            results["sweeper"] = sweeper_figure(log)
    results["checks"] = check_targets(results)
    results["seconds"] = round(time.time() - started, 1)
    results["machine"]["load_avg_end"] = (
        [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None
    )
    out = args.out or ROOT / "bench" / "results" / (
        f"{socket.gethostname()}-{_dt.datetime.now().strftime('%Y-%m-%d-%H%M%S')}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    log("")
    log(table(results))
    log(f"\nresults: {out}  ({results['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
