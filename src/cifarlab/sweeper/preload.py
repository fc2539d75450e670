"""Imported once by the warm trials' fork server (:mod:`cifarlab.sweeper.launch_fork`), after the task script.

Imports the modules named in ``CIFARLAB_FORKSERVER_PRELOAD`` (a module that is missing or fails to import is
skipped: the trial imports it itself, or reports the error), lets Hydra discover its plugins (their configs,
e.g. ``hydra/sweeper=cifarlab_optuna``, are then in the ConfigStore of every trial), and warns when the server is
not single-threaded: a process that forks must hold no threads, or a trial may inherit a lock held by a thread
that does not exist in it.
"""

from __future__ import annotations

import importlib
import os
import sys

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


THREADS = thread_count()
if THREADS > 1:
    print(
        f"warm trials: the fork server has {THREADS} threads after its imports; forking it is not safe "
        "(set hydra.sweeper.launch=subprocess if trials hang)",
        file=sys.stderr,
    )
