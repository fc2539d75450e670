"""Imported once by the warm trials' fork server (:mod:`cifarlab.sweeper.launch_fork`), after the task script.

Imports the task script (``CIFARLAB_FORKSERVER_MAIN``, as ``__mp_main__``, as multiprocessing would in each child)
and the modules named in ``CIFARLAB_FORKSERVER_PRELOAD`` (a module that is missing or fails to import is
skipped: the trial imports it itself, or reports the error), lets Hydra discover its plugins (their configs,
e.g. ``hydra/sweeper=cifarlab_optuna``, are then in the ConfigStore of every trial), and warns when the server is
not single-threaded: a process that forks must hold no threads, or a trial may inherit a lock held by a thread
that does not exist in it.
"""

from __future__ import annotations

import importlib
import os
import sys

_main = os.environ.get("CIFARLAB_FORKSERVER_MAIN")
if _main and getattr(sys.modules.get("__main__"), "__file__", None) != _main:
    # as multiprocessing prepares a child: the script runs as __mp_main__ and stands in for __main__; a trial
    # then finds its task function there (and multiprocessing does not import the script again)
    from multiprocessing import process, spawn

    process.current_process()._inheriting = True
    try:
        spawn.import_main_path(_main)
    except Exception as _err:  # noqa: BLE001 (each trial then imports the script itself)
        print(f"warm trials: cannot preload {_main}: {type(_err).__name__}: {_err}", file=sys.stderr)
    finally:
        del process.current_process()._inheriting

for _name in filter(None, os.environ.get("CIFARLAB_FORKSERVER_PRELOAD", "").split(",")):
    try:
        importlib.import_module(_name)
    except Exception as _err:  # noqa: BLE001 (a trial that needs the module reports the error itself)
        print(f"warm trials: cannot preload {_name}: {type(_err).__name__}: {_err}", file=sys.stderr)

try:
    from hydra.core.plugins import Plugins

    Plugins.instance()
except Exception as _err:  # noqa: BLE001
    print(f"warm trials: Hydra's plugins: {type(_err).__name__}: {_err}", file=sys.stderr)


def thread_count() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return 1


_torch = sys.modules.get("torch")
if _torch is not None and _torch.cuda.is_initialized():
    print("warm trials: CUDA was initialised while preloading; trials cannot use it", file=sys.stderr)

THREADS = thread_count()
if THREADS > 1:
    print(
        f"warm trials: the fork server has {THREADS} threads after its imports; forking it is not safe "
        "(set hydra.sweeper.launch=subprocess if trials hang)",
        file=sys.stderr,
    )
