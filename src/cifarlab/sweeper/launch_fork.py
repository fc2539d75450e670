"""Warm trial start: trials are forked from a server process that has already imported the task's libraries.

The sweep process starts Python's own fork server (``multiprocessing``'s ``forkserver`` context) once, with the
task script and torch, Lightning, Optuna and cifarlab preloaded (:mod:`cifarlab.sweeper.preload`). Each trial is
then a fresh fork of that server: no interpreter start, no imports, so a trial begins its work within a fraction
of a second instead of after 5-10 s (torch + Lightning imports on a 2-core AMD EPYC).

Each trial stays its own process, exactly like a subprocess trial (:mod:`cifarlab.sweeper.launch_subprocess`):

- its own session and process group (``os.setsid``): the sweep kills it and whatever it started as a whole;
- its own environment: the slot's ``CUDA_VISIBLE_DEVICES``, ``OMP_NUM_THREADS``, the ``CIFARLAB_OPTUNA_*``
  variables; torch's thread count set to the slot's share. CUDA is never initialised in the fork server (it only
  imports), so every trial creates its own CUDA context on its own devices;
- its output (stdout and stderr, file descriptors 1 and 2) in ``trial.log``; death with the sweep process: the
  fork server exits when the sweep process does (Python closes its "alive" pipe, even on SIGKILL) and each trial
  has ``PR_SET_PDEATHSIG`` on the server;
- the task function runs through Hydra's own job machinery (:meth:`hydra._internal.hydra.Hydra.run`, i.e.
  ``hydra.core.utils.run_job``) with the trial's overrides, as ``python train.py <overrides>`` would: the same
  composed config, ``.hydra/``, job logging, output folder. Its return value goes to ``trial_result.json``.

Fork safety: the server must hold no threads when it forks. Importing numpy/scipy starts an OpenBLAS thread pool
sized by ``OPENBLAS_NUM_THREADS`` (read once, when the library loads), so the server imports with every
BLAS/OpenMP thread variable set to 1 and, in the trial, torch gets the slot's thread count
(``torch.set_num_threads``); :mod:`cifarlab.sweeper.preload` checks that the server has one thread.

Why a fork server and not forking the sweep process itself: the sweep process holds storage connections
(PostgreSQL sockets), signal handlers and threads of its libraries; the server is a clean process that only
imported modules. Python's stdlib ``forkserver`` does exactly this; nothing here re-implements it.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import multiprocessing
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cifarlab.sweeper.launch_subprocess import die_with_parent
from cifarlab.sweeper.outcome import RESULT_FILE, returned_values

# what the fork server imports besides the task script (missing ones are skipped): the libraries a cifarlab
# trial would otherwise import at its start (torch ~3 s, Lightning ~5 s, on a 2-core AMD EPYC)
DEFAULT_PRELOAD = (
    "torch",
    "lightning",
    "optuna",
    "cifarlab.train",
    "cifarlab.data",
    "cifarlab.module",
    "cifarlab.callbacks",
    "cifarlab.loggers",
    "cifarlab.diagnostics",
    "cifarlab.sweeper.trial",
)
# and, when the task logs to W&B, what a W&B run imports lazily: wandb itself (0.45 s), the module wandb.init
# imports for launch job inputs (0.5 s), pandas, which wandb's log imports to test for data frames as soon as a
# run logs media (0.4 s). 8 warm W&B trials on 2 slots: 15.3 s -> 12.9 s on a 2-core AMD EPYC
# (python -m cifarlab.sweeper.bench --wandb-preload).
WANDB_PRELOAD = ("wandb", "wandb.sdk.launch.inputs.internal", "pandas")
ENV_PRELOAD = "CIFARLAB_FORKSERVER_PRELOAD"  # comma-separated modules, read by cifarlab.sweeper.preload
ENV_MAIN = "CIFARLAB_FORKSERVER_MAIN"  # the task script, imported by cifarlab.sweeper.preload as __mp_main__
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS")


@dataclass(frozen=True)
class WarmTask:
    """How a trial finds the task function and composes its config again (plain data: pickled to the server)."""

    module: str  # the task function's module ("__main__" for the script)
    qualname: str
    config_name: str | None
    task_name: str  # hydra.job.name (names the job's log file: train.log)
    search_path: tuple[tuple[str, str], ...]  # Hydra's config search path: (provider, path), in order
    argv: tuple[
        str, ...
    ] = ()  # sys.argv before the overrides, as a subprocess trial has it (DDP relaunches it)


def _is_hydra_main(obj: Any) -> bool:
    code = getattr(obj, "__code__", None)
    return code is not None and code.co_name == "decorated_main" and "hydra" in code.co_filename


def resolve_task(module: str, qualname: str) -> Callable[..., Any]:
    """The task function by name; ``@hydra.main``'s wrapper is replaced by the function it wraps."""
    obj: Any = sys.modules.get(module) or importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    if _is_hydra_main(obj):
        obj = obj.__wrapped__
    return obj


def warm_task_of(task_function: Any, config: Any, search_path: Sequence[Any]) -> tuple[WarmTask | None, str]:
    """A :class:`WarmTask` for the task function of this run, or (None, why not)."""
    if sys.platform != "linux":
        return None, "warm trials need Linux (fork server and PR_SET_PDEATHSIG)"
    module = getattr(task_function, "__module__", None)
    qualname = getattr(task_function, "__qualname__", "")
    if not module or "<locals>" in qualname:
        return None, f"the task function {qualname or task_function!r} cannot be found again by name"
    try:
        found = resolve_task(module, qualname)
    except Exception as err:
        return None, f"the task function {module}.{qualname} cannot be found again by name ({err})"
    if found is not task_function:
        return None, f"{module}.{qualname} is not the task function"
    if module == "__main__" and not getattr(sys.modules["__main__"], "__file__", None):
        return None, "the task is not run from a script file"
    job = config.hydra.job
    elements = tuple((str(e.provider), str(e.path)) for e in search_path)
    return WarmTask(module, qualname, job.config_name, str(job.name), elements), ""


@contextlib.contextmanager
def _environment(variables: dict[str, str]) -> Iterator[None]:
    """``os.environ`` with ``variables`` set (the fork server inherits the environment it starts with)."""
    saved = {k: os.environ.get(k) for k in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@dataclass(frozen=True)
class ChildSpec:
    task: WarmTask
    overrides: tuple[str, ...]
    env: dict[str, str]
    log_path: str
    cwd: str
    threads: int
    sweep_pid: int
    server_pid: int | None


class ForkedTrial:
    """A trial forked by the server, with the little of ``subprocess.Popen``'s interface the sweep uses."""

    def __init__(self, process: Any) -> None:
        self._process = process
        self.pid = process.pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            code = self._process.exitcode  # negative: killed by that signal
            if code is not None:
                self._process.join()
                self._process.close()  # its pipe to the server
                self.returncode = code
        return self.returncode

    def wait(self, timeout: float | None = None) -> int | None:
        if self.returncode is None:
            self._process.join(timeout)
        return self.poll()

    def send_signal(self, sig: int) -> None:
        os.kill(self.pid, sig)


class ForkLauncher:
    """Trials as forks of a warm server process (Python's ``forkserver``)."""

    name = "fork"

    def __init__(self, task: WarmTask, cwd: str, preload: Sequence[str] = DEFAULT_PRELOAD) -> None:
        self.task = task
        self.cwd = cwd
        self.preload = [m for m in preload if m != "__main__"]
        self.ctx = multiprocessing.get_context("forkserver")
        # the script, imported in the server as multiprocessing would in each child (Python 3.11's forkserver
        # means to preload "__main__" but never finds its path, so every trial would import the script again)
        main = sys.modules.get("__main__")
        by_path = task.module == "__main__" and getattr(main, "__spec__", None) is None  # not `python -m`
        path = getattr(main, "__file__", None) if by_path else None
        self.preload_main = os.path.normpath(os.path.abspath(path)) if path else None

    def start(self) -> None:
        """Start the server (it imports in the background; the first trial waits for it)."""
        from multiprocessing import forkserver

        task_module = [] if self.task.module == "__main__" else [self.task.module]
        self.ctx.set_forkserver_preload([*task_module, "cifarlab.sweeper.preload"])
        with self._server_env():
            forkserver.ensure_running()

    def _server_env(self) -> contextlib.AbstractContextManager[None]:
        """The environment the server starts with (again, should it have died: Process.start restarts it)."""
        variables = {k: "1" for k in THREAD_VARS}  # BLAS/OpenMP libraries start no thread pools when loaded
        # should an import ask torch.cuda.is_available(), NVML answers: the CUDA driver stays uninitialised here
        variables["PYTORCH_NVML_BASED_CUDA_CHECK"] = "1"
        variables.update({ENV_PRELOAD: ",".join(self.preload), ENV_MAIN: self.preload_main or ""})
        return _environment(variables)

    def call(self, target: str, config: dict[str, Any]) -> str | None:
        """Run ``module:function(config as a DictConfig)`` in a fork of the warm server (nothing to import; the
        sweep process stays free of torch); its error, or None."""
        from multiprocessing import get_context

        reader, writer = get_context("forkserver").Pipe(duplex=False)
        process = self.ctx.Process(target=_call_child, args=(target, config, writer), name="warm call")
        with self._server_env():
            process.start()
        writer.close()
        try:
            error = reader.recv()
        except EOFError:  # it died before answering
            error = None
        process.join()
        reader.close()
        return error if process.exitcode == 0 else (error or f"exited with code {process.exitcode}")

    def launch(self, overrides: list[str], env: dict[str, str], log_path: Path, threads: int) -> ForkedTrial:
        from multiprocessing import forkserver

        with open(log_path, "w") as log_file:
            log_file.write(f"$ (warm fork) {self.task.task_name} " + " ".join(overrides) + "\n")
        with self._server_env():
            forkserver.ensure_running()  # (restarted, should it have died): the trial's parent is this server
        server_pid = getattr(getattr(forkserver, "_forkserver", None), "_forkserver_pid", None)
        spec = ChildSpec(
            self.task, tuple(overrides), dict(env), str(log_path), self.cwd, threads, os.getpid(), server_pid
        )
        process = self.ctx.Process(
            target=_trial_main, args=(spec,), name=f"trial:{Path(log_path).parent.name}"
        )
        try:
            with self._server_env():
                process.start()
        except (OSError, EOFError, ConnectionError) as err:
            raise OSError(f"the fork server did not start the trial: {err}") from err
        return ForkedTrial(process)

    def close(self) -> None:
        pass  # the server exits with the sweep process (its "alive" pipe closes)


def _call_child(target: str, config: dict[str, Any], writer: Any) -> None:
    from cifarlab.sweeper.launch_subprocess import call_target

    writer.send(call_target(target, config))


# ---- in the trial process ------------------------------------------------------------------------------


def _trial_main(spec: ChildSpec) -> None:
    """The trial: detach, redirect, take the slot's environment, run the task through Hydra, record the result."""
    os.setsid()  # its own session and process group, as a subprocess trial (start_new_session)
    _let_go_of_the_server()
    die_with_parent(spec.server_pid, spec.sweep_pid)
    fd = os.open(spec.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(AttributeError, ValueError):
            stream.reconfigure(line_buffering=True)
    os.chdir(spec.cwd)
    os.environ.clear()
    os.environ.update(spec.env)
    torch = sys.modules.get("torch")
    if torch is not None:  # the server loaded torch with one thread; this trial gets its slot's share
        torch.set_num_threads(max(1, spec.threads))
    sys.argv = [*(spec.task.argv or sys.argv[:1]), *spec.overrides]
    sys.exit(run_task(spec.task, list(spec.overrides), Path(spec.log_path).parent))


def _let_go_of_the_server() -> None:
    """Close this process's copy of the server's "alive" pipe (multiprocessing hands one to every child, so that
    children may use the server too). Otherwise the server would not see the sweep process die (its pipe would
    stay open in the trials) and would not exit, and PR_SET_PDEATHSIG would never fire."""
    from multiprocessing import forkserver

    server = getattr(forkserver, "_forkserver", None)
    fd = getattr(server, "_forkserver_alive_fd", None)
    if fd is not None:
        with contextlib.suppress(OSError):
            os.close(fd)
        server._forkserver_alive_fd = None


def run_task(task: WarmTask, overrides: list[str], job_dir: Path) -> int:
    """Compose the config and run the task function through Hydra (as ``python script.py <overrides>``); write
    ``trial_result.json``. Returns the exit code."""
    from hydra._internal.config_search_path_impl import ConfigSearchPathImpl
    from hydra._internal.hydra import Hydra
    from hydra.core.global_hydra import GlobalHydra

    search_path = ConfigSearchPathImpl()
    for provider, path in task.search_path:
        search_path.append(provider, path)
    GlobalHydra.instance().clear()
    hydra = Hydra.create_main_hydra2(task_name=task.task_name, config_search_path=search_path)
    function = resolve_task(task.module, task.qualname)
    start = time.perf_counter()
    result: dict[str, Any] = {"status": "failed"}
    try:
        job = hydra.run(config_name=task.config_name, task_function=function, overrides=overrides)
        value = job.return_value  # raises the task's exception
        result = {"status": "completed", "values": returned_values(value)}
        if value is not None and result["values"] is None:
            result["error"] = f"the task function returned {type(value).__name__}, not a number or a sequence"
        return 0
    except BaseException as err:
        from cifarlab.sweeper.trial import is_interruption

        if isinstance(err, SystemExit) and not is_interruption(err):
            # e.g. cifarlab.cli.guarded: the one-line error is in the log. (Lightning's SIGTERMException is a
            # SystemExit too: an interruption, below.)
            code = err.code if isinstance(err.code, int) else 1
            result = {"status": "failed" if code else "completed", "values": None, "exit_code": code}
            return code
        traceback.print_exc()
        status = "interrupted" if is_interruption(err) else "failed"
        result = {"status": status, "values": None, "error": f"{type(err).__name__}: {err}"}
        return 130 if isinstance(err, KeyboardInterrupt) else 1
    finally:
        result["duration_s"] = round(time.perf_counter() - start, 3)
        _write_json(job_dir / RESULT_FILE, result)
        sys.stdout.flush()
        sys.stderr.flush()


def _write_json(path: Path, data: dict[str, Any]) -> None:
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, path)
