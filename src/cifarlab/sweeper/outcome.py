"""What a finished trial left behind, read by the sweep process: its folder, its result files, its log.

- ``metrics.json`` (written by :func:`cifarlab.train.run`, :mod:`cifarlab.sweeper.sleep_task` or any task
  script): ``status`` (completed / pruned / failed / interrupted), metrics, ``error``.
- ``trial_result.json`` (written by a warm trial, :mod:`cifarlab.sweeper.launch_fork`): ``status`` (completed /
  failed), ``values`` (the task function's return value as a list of floats, or null), ``error``,
  ``duration_s`` (the task function's run time).
- ``trial.log``: the command line and everything the trial printed; the cause of a failure without result files.
"""

from __future__ import annotations

import json
import math
import signal
from collections.abc import Sequence
from pathlib import Path
from typing import Any

RESULT_FILE = "trial_result.json"


def finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None


def read_metrics(job_dir: Path) -> dict[str, Any] | None:
    return _read_json(Path(job_dir) / "metrics.json")


def read_outcome(job_dir: Path, objectives: Sequence[str], from_return: bool) -> dict[str, Any] | None:
    """The trial's metrics as the sweep scores them: ``metrics.json``, completed by ``trial_result.json``.

    With ``from_return`` the objectives are the task function's return value (one per objective, stored under
    the objectives' names); ``metrics.json`` still decides a status it states (``pruned``, ``failed``)."""
    metrics = read_metrics(job_dir)
    result = _read_json(Path(job_dir) / RESULT_FILE)
    if result is None:
        return metrics
    out = dict(metrics or {})
    out.setdefault("status", result.get("status"))
    if result.get("error") and not out.get("error"):
        out["error"] = result["error"]
    if "duration_s" not in out and finite(result.get("duration_s")):
        out["duration_s"] = result["duration_s"]
    values = result.get("values")
    if from_return and out.get("status") == "completed":
        # a run whose metrics.json lacks the objective (it never validated, say) returns nothing: left
        # completed without it, the sweep records it `missing_metric` and names the metric
        unrecorded = values is None and metrics is not None and any(o not in metrics for o in objectives)
        if values is not None and len(values) == len(objectives):
            out.update(zip(objectives, values, strict=True))
        elif not unrecorded:
            got = "nothing" if values is None else f"{len(values)} value(s)"
            out["status"] = "failed"
            out["error"] = result.get("error") or (
                f"the task function returned {got}, but the sweep has {len(objectives)} objective(s) "
                f"{list(objectives)}: return a float (or one per direction), or set hydra.sweeper.objectives "
                "to keys of metrics.json"
            )
    return out


def log_error(log_path: Path, returncode: int) -> str:
    """A one-line cause from a trial's exit code and the end of its log."""
    try:
        lines = [ln.rstrip() for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        lines = []
    tail = lines[-30:]
    cause = ""
    for ln in reversed(tail):
        low = ln.lower()
        if low.startswith("error") or "error:" in low or "exception" in low or low.startswith("killed"):
            cause = ln.strip()
            break
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        head = f"killed by {name}" + (" (out of memory?)" if name == "SIGKILL" else "")
    else:
        head = f"exited with code {returncode}"
    return f"{head}: {cause}" if cause else (f"{head}; log: {tail[-1]}" if tail else head)


def returned_values(value: Any) -> list[float] | None:
    """A task function's return value as a list of floats (a number, a 0-d tensor/array, or a sequence of them);
    None when it is None or not numeric."""
    if value is None:
        return None
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    out = []
    for item in items:
        if hasattr(item, "item") and callable(item.item):  # a 0-d tensor or numpy scalar
            item = item.item()
        if isinstance(item, bool) or not isinstance(item, (int, float)):
            return None
        out.append(float(item))
    return out
