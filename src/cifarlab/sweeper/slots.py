"""Device slots: where a trial runs. One trial per slot at a time; a slot is a set of GPUs or a CPU share.

- GPUs: ``trials_per_gpu`` slots per group of ``gpus_per_trial`` GPUs; a trial in a slot sees only its GPUs
  (``CUDA_VISIBLE_DEVICES``). GPUs are counted without initialising CUDA in the sweep process:
  ``CUDA_VISIBLE_DEVICES`` if set, else ``nvidia-smi -L``.
- No GPU (or ``devices: cpu``): ``n_jobs`` slots; each trial gets ``cores // n_jobs`` threads
  (``OMP_NUM_THREADS``/``MKL_NUM_THREADS``) so that parallel trials do not oversubscribe the CPU; with
  ``devices: cpu`` the trials also see no GPU (``CUDA_VISIBLE_DEVICES=""``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any


class SlotError(ValueError):
    """The device settings cannot be satisfied; the message says which one."""


@dataclass(frozen=True)
class Slot:
    index: int
    kind: str  # "gpu" | "cpu"
    gpus: tuple[str, ...] = ()  # GPU ids (as CUDA_VISIBLE_DEVICES names them) of a gpu slot
    threads: int = 1  # CPU threads a trial in this slot may use
    share: int = 0  # which of the trials_per_gpu trials on these GPUs (0, 1, ...)
    hide_gpus: bool = False  # a cpu slot of devices=cpu: the trial sees no GPU

    @property
    def name(self) -> str:
        if self.kind == "cpu":
            return f"cpu{self.index}"
        return "gpu" + "+".join(self.gpus) + (f"#{self.share}" if self.share else "")

    def env(self) -> dict[str, str]:
        threads = str(self.threads)
        env = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "OPENBLAS_NUM_THREADS": threads}
        if self.gpus or self.hide_gpus:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(self.gpus)
        return env


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def visible_gpus(environ: Mapping[str, str] | None = None) -> list[str]:
    """GPU ids this process may use, without initialising CUDA: CUDA_VISIBLE_DEVICES, else nvidia-smi -L."""
    environ = os.environ if environ is None else environ
    cvd = environ.get("CUDA_VISIBLE_DEVICES")
    if cvd is not None:
        ids = [x.strip() for x in cvd.split(",") if x.strip()]
        out = []
        for x in ids:  # CUDA stops at the first invalid id (e.g. -1)
            if x.lstrip("-").isdigit() and int(x) < 0:
                break
            out.append(x)
        return out
    smi = shutil.which("nvidia-smi")
    if smi is None:
        torch = sys.modules.get("torch")  # already imported by the entry point: ask it (children exec anew)
        try:
            return [str(i) for i in range(torch.cuda.device_count())] if torch is not None else []
        except Exception:
            return []
    try:
        result = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return []
    if result.returncode != 0:
        return []
    lines = [ln for ln in result.stdout.splitlines() if ln.startswith("GPU ")]
    return [str(i) for i in range(len(lines))]


# trials_per_gpu=auto. On an H100 (16 cores), 4 / 8 / 16 concurrent trials of the course CNN gave 5.0x / 9.0x /
# 9.6x the images/s of one at batch 64 (10x / 11.6x at batch 512): a small model leaves a big GPU mostly idle, the
# gain grows until ~8 trials and the doubling to 16 adds only 7% while each trial runs at half the speed.
PACK_KNEE = 8  # trials per GPU beyond which images/s hardly grows (H100 figures above)
TRIAL_MEMORY_GB = (
    2.0  # one cifarlab trial: CUDA context ~0.5 GB + CIFAR on the GPU as uint8 ~0.2 GB + activations
)
MEMORY_HEADROOM = 0.85  # of the GPU's memory that trials may fill (fragmentation, cuDNN workspaces)


def pack_trials(
    gpu_memory_gb: float | None,
    trial_memory_gb: float,
    cores: int,
    gpus: int,
    gpus_per_trial: int = 1,
) -> tuple[int, str]:
    """How many trials to run at once on each GPU, and why: as many as still add images/s (:data:`PACK_KNEE`),
    as fit in memory (``MEMORY_HEADROOM`` of it, ``trial_memory_gb`` each), and one CPU core each at least (a
    trial's Python loop feeds its GPU from a core). A pure function of its arguments."""
    if gpus < 1:
        return 1, "no GPU: CPU slots (n_jobs)"
    if gpus_per_trial > 1:
        return 1, f"gpus_per_trial={gpus_per_trial}: one multi-GPU trial per GPU group"
    limits = {f"images/s stops growing beyond ~{PACK_KNEE} trials per GPU": PACK_KNEE}
    if gpu_memory_gb:
        fit = int(MEMORY_HEADROOM * gpu_memory_gb // trial_memory_gb)
        limits[f"{gpu_memory_gb:.0f} GB per GPU fits {fit} trials of ~{trial_memory_gb:g} GB"] = fit
    limits[f"{cores} CPU cores for {gpus} GPU(s): one core per trial"] = cores // gpus
    why, n = min(limits.items(), key=lambda item: item[1])
    n = max(1, n)
    return n, f"{n} trial(s) per GPU ({why})"


def query_gpus(fields: str, timeout: float = 30) -> list[list[str]] | None:
    """``nvidia-smi --query-gpu=<fields>`` as one list of values per GPU (no CUDA initialised); None without it."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        result = subprocess.run(
            [smi, f"--query-gpu={fields}", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return [[p.strip() for p in line.split(",")] for line in result.stdout.splitlines() if line.strip()]


def _number(text: str) -> bool:
    return text.replace(".", "", 1).isdigit()


def gpu_memory_gb(environ: Mapping[str, str] | None = None) -> float | None:
    """Total memory of the smallest visible GPU in GB, from nvidia-smi (no CUDA initialised); None if unknown."""
    rows = query_gpus("index,memory.total")
    if rows is None:
        return None
    ids = visible_gpus(environ)
    sizes = {row[0]: float(row[1]) / 1024 for row in rows if len(row) == 2 and _number(row[1])}
    picked = [sizes[i] for i in ids if i in sizes] or list(sizes.values())
    return min(picked) if picked else None


def auto_trials_per_gpu(devices: Any, gpus_per_trial: int, trial_memory_gb: float | None) -> tuple[int, str]:
    """``trials_per_gpu: auto`` for this machine: :func:`pack_trials` on the GPUs ``devices`` selects."""
    if str(devices) == "cpu":
        return 1, "devices=cpu"
    ids = [str(d) for d in devices] if isinstance(devices, (list, tuple)) else visible_gpus()
    memory = gpu_memory_gb() if ids else None
    return pack_trials(memory, trial_memory_gb or TRIAL_MEMORY_GB, cpu_count(), len(ids), gpus_per_trial)


def plan_slots(
    devices: Any = "auto",
    n_jobs: int | None = None,
    trials_per_gpu: int = 1,
    gpus_per_trial: int = 1,
    gpus: Sequence[str] | None = None,
    cores: int | None = None,
    threads_per_trial: int | None = None,
) -> list[Slot]:
    """The slots of this sweep process.

    ``devices``: ``auto`` (every visible GPU, else CPU slots), ``cpu``, ``gpu`` (GPUs required), or a list of
    GPU ids. ``gpus``: the visible GPU ids (detected when None; given by tests).
    """
    cores = cores or cpu_count()
    if trials_per_gpu < 1 or gpus_per_trial < 1:
        raise SlotError(
            f"trials_per_gpu={trials_per_gpu}, gpus_per_trial={gpus_per_trial}: both must be >= 1"
        )
    if isinstance(devices, (list, tuple)):
        ids = [str(d) for d in devices]
        if len(set(ids)) != len(ids):
            raise SlotError(f"devices={list(devices)}: a GPU is listed twice")
    elif str(devices) in ("auto", "gpu", "cuda"):
        ids = list(visible_gpus() if gpus is None else gpus)
        if not ids and str(devices) != "auto":
            raise SlotError(f"devices={devices}: no GPU is visible (CUDA_VISIBLE_DEVICES / nvidia-smi)")
    elif str(devices) == "cpu":
        ids = []
    else:
        raise SlotError(f"devices={devices!r}: allowed: auto, cpu, gpu, or a list of GPU ids")

    if not ids:
        n = int(n_jobs) if n_jobs else 1
        if n < 1:
            raise SlotError(f"n_jobs={n_jobs}: must be >= 1")
        threads = threads_per_trial or max(1, cores // n)
        hide = str(devices) == "cpu"
        return [Slot(i, "cpu", (), threads, hide_gpus=hide) for i in range(n)]

    if len(ids) < gpus_per_trial:
        raise SlotError(f"gpus_per_trial={gpus_per_trial} but only {len(ids)} GPU(s) visible: {ids}")
    groups = [
        tuple(ids[i : i + gpus_per_trial]) for i in range(0, len(ids) - gpus_per_trial + 1, gpus_per_trial)
    ]
    n = len(groups) * trials_per_gpu
    threads = threads_per_trial or max(1, cores // n)
    slots = []
    for share in range(trials_per_gpu):  # spread: first one trial per GPU, then the second, ...
        for group in groups:
            slots.append(Slot(len(slots), "gpu", group, threads, share))
    return slots


class SlotPool:
    """Hands out free slots; a slot is never given to a second trial before it is released."""

    def __init__(self, slots: Sequence[Slot]) -> None:
        if not slots:
            raise SlotError("no slots")
        self.slots = list(slots)
        self._owner: dict[int, Any] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.slots)

    @property
    def n_free(self) -> int:
        return len(self.slots) - len(self._owner)

    @property
    def n_busy(self) -> int:
        return len(self._owner)

    def acquire(self, owner: Any) -> Slot | None:
        """A free slot (the least-loaded GPUs first), now owned by ``owner``; None when all are busy."""
        with self._lock:
            for slot in self.slots:
                if slot.index not in self._owner:
                    self._owner[slot.index] = owner
                    return slot
            return None

    def release(self, slot: Slot, owner: Any) -> None:
        with self._lock:
            current = self._owner.get(slot.index)
            if current is None or current != owner:
                raise RuntimeError(f"slot {slot.name} released by {owner!r} but owned by {current!r}")
            del self._owner[slot.index]

    def owners(self) -> dict[str, Any]:
        with self._lock:
            return {self.slots[i].name: o for i, o in self._owner.items()}
