"""Start a trial as a fresh process: ``<task_command> <overrides>`` (e.g. ``python train.py ... hydra.run.dir=...``).

The cold way: every trial imports its libraries anew (5-10 s for torch + Lightning on a 2-core AMD EPYC). It is
used for ``hydra.sweeper.task_command`` (any script that writes metrics.json), for sweep processes that run as
Hydra launcher jobs (``hydra.sweeper.workers``, e.g. SLURM), with ``hydra.sweeper.launch=subprocess``, and where
the task function cannot be found again by name. Otherwise trials start warm: :mod:`cifarlab.sweeper.launch_fork`.

Both ways give a trial the same things: its own process group (killed as a whole), its slot's
``CUDA_VISIBLE_DEVICES`` and thread budget, the ``CIFARLAB_OPTUNA_*`` variables, ``trial.log``, and death with the
sweep process (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cifarlab.sweeper import ENV_MONITOR, ENV_PRUNER, ENV_STORAGE, ENV_STUDY, ENV_TRIAL, ENV_TRIAL_NUMBER


def trial_env(
    base: Mapping[str, str],
    slot_env: Mapping[str, str],
    extra: Mapping[str, str],
    storage: str,
    study_name: str,
    trial_id: int,
    number: int,
    monitor: str | None,
    pruner: Any,
) -> dict[str, str]:
    """The environment of a trial: the sweep's, its slot's devices and threads, ``extra``, and its Optuna trial."""
    env = dict(base)
    env.update(slot_env)
    env.update(extra)
    env.update(
        {
            ENV_STORAGE: storage,
            ENV_STUDY: study_name,
            ENV_TRIAL: str(trial_id),
            ENV_TRIAL_NUMBER: str(number),
            "PYTHONUNBUFFERED": "1",
            "HYDRA_FULL_ERROR": "1",
        }
    )
    if monitor:
        env[ENV_MONITOR] = monitor
        env[ENV_PRUNER] = json.dumps(pruner or None)
    else:
        env.pop(ENV_MONITOR, None)
        env.pop(ENV_PRUNER, None)
    return env


def _libc_prctl() -> Any:
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _libc_prctl() if sys.platform.startswith("linux") else None
PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int | None, sweep_pid: int) -> None:
    """In a trial process: get SIGTERM when ``parent`` (the sweep process, or the fork server it started) dies
    (PR_SET_PDEATHSIG), so that a killed sweep leaves no orphan trials writing to the study; exit at once when
    the parent or the sweep process is already gone."""
    if _PRCTL is not None:
        _PRCTL(PR_SET_PDEATHSIG, signal.SIGTERM)
    if parent is not None and os.getppid() != parent:  # the parent died before prctl
        os._exit(1)
    try:
        os.kill(sweep_pid, 0)
    except ProcessLookupError:
        os._exit(1)
    except PermissionError:
        pass


def signal_group(proc: Any, sig: int) -> None:
    """Signal a trial and everything it started (its process group; the trial itself if it has none yet)."""
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)


class SubprocessLauncher:
    """Trials as ``task_command + overrides`` in fresh processes."""

    name = "subprocess"

    def __init__(self, task_command: Sequence[str], cwd: str) -> None:
        self.task_command = list(task_command)
        self.cwd = cwd

    def start(self) -> None:
        pass

    def call(self, target: str, config: dict[str, Any]) -> str | None:
        """Run ``module:function(config as a DictConfig)`` here; its error, or None."""
        return call_target(target, config)

    def launch(self, overrides: list[str], env: dict[str, str], log_path: Path, threads: int) -> Any:
        """Start the trial; its output goes to ``log_path`` (after its command line). Raises OSError."""
        cmd = self.task_command + list(overrides)
        with open(log_path, "w") as log_file:  # the child keeps its own copy of the descriptor
            log_file.write("$ " + " ".join(cmd) + "\n")
            log_file.flush()
            parent = os.getpid()
            return subprocess.Popen(
                cmd,
                cwd=self.cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: killed as a whole
                preexec_fn=lambda: die_with_parent(parent, parent),
            )

    def close(self) -> None:
        pass


def call_target(target: str, config: dict[str, Any]) -> str | None:
    """``module:function(OmegaConf.create(config))``; the error as one line, or None."""
    import importlib

    from omegaconf import OmegaConf

    module, name = target.split(":")
    try:
        getattr(importlib.import_module(module), name)(OmegaConf.create(config))
    except Exception as err:  # noqa: BLE001 (reported by the caller)
        return f"{type(err).__name__}: {err}"
    return None
