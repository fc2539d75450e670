"""A stand-in trial for the benchmark and the sweeper's tests: sleeps instead of training (no torch import).

    python -m cifarlab.sweeper.sleep_task sleep=1.5 x=0.3 epochs=3 hydra.run.dir=/tmp/t   [--flags ignored]

Reads Hydra-style ``key=value`` overrides, sleeps ``sleep`` seconds (split over ``epochs``), reports ``val/acc``
each epoch to its Optuna trial when started by the sweeper (and stops when pruned), and writes
``<hydra.run.dir>/metrics.json`` like :func:`cifarlab.train.run`: ``val/acc_best = 1 - (x - 0.3)²`` (or 0.5),
``duration_s``, ``status``. ``fail=true`` raises (status failed, exit 1), ``nan=true`` gives a NaN objective,
``crash=true`` exits 3 without metrics.json, ``term_delay=S`` takes S seconds to exit on SIGTERM (exit 143).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path


def _value(text: str) -> object:
    text = text.strip().strip("'\"")
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


def main(argv: list[str]) -> int:
    args = {}
    for item in argv:
        if item.startswith("-") or "=" not in item:
            continue
        key, value = item.split("=", 1)
        args[key.lstrip("+~")] = _value(value)
    out = Path(str(args.get("hydra.run.dir", ".")))
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    seconds = float(args.get("sleep", 1.0))
    epochs = max(1, int(args.get("epochs", 1)))
    x = args.get("x")
    score = 1.0 - (float(x) - 0.3) ** 2 if isinstance(x, (int, float)) else 0.5
    metrics: dict[str, object] = {"status": "running", "output_dir": str(out)}
    delay = float(args.get("term_delay", 0.0))
    if delay > 0:

        def slow_exit(signum: int, frame: object) -> None:
            time.sleep(delay)
            sys.exit(128 + signum)

        signal.signal(signal.SIGTERM, slow_exit)
    if args.get("crash"):
        time.sleep(seconds / 2)
        return 3
    reporter = None
    if os.environ.get("CIFARLAB_OPTUNA_TRIAL") and os.environ.get("CIFARLAB_OPTUNA_MONITOR"):
        from cifarlab.sweeper.trial import TrialReporter

        reporter = TrialReporter()
    pruned = False
    epoch = 0
    for epoch in range(epochs):
        time.sleep(seconds / epochs)
        if args.get("fail") and epoch == epochs - 1:
            metrics.update(status="failed", error="RuntimeError: asked to fail (fail=true)", epochs=epoch)
            _write(out, metrics, start)
            print("RuntimeError: asked to fail (fail=true)", file=sys.stderr)
            return 1
        acc = score * (epoch + 1) / epochs
        if reporter is not None and reporter.report(acc, epoch):
            pruned = True
            break
    metrics["val/acc"] = metrics["val/acc_best"] = (
        float("nan") if args.get("nan") else score * (epoch + 1) / epochs
    )
    metrics.update(status="pruned" if pruned else "completed", epochs=epoch + 1)
    _write(out, metrics, start)
    return 0


def _write(out: Path, metrics: dict[str, object], start: float) -> None:
    metrics["duration_s"] = round(time.perf_counter() - start, 3)
    tmp = out / "metrics.json.tmp"
    tmp.write_text(json.dumps(metrics))
    os.replace(tmp, out / "metrics.json")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
