"""Slot utilisation of the asynchronous sweeper against batch-synchronous trials (the stock plugin's way:
``n_jobs`` trials at a time, the next batch only after the slowest one).

Utilisation = time the slots spent running trials / (slots × wall time). Both modes run the same trials through
the same runner (:class:`cifarlab.sweeper.runner.Sweep`; ``sync_batches`` adds the batch barrier):

- simulated: trials that sleep for deliberately varied durations (:mod:`cifarlab.sweeper.sleep_task`);
- real (``--real``): short ``train.py`` trials (``hparams_search=synthetic_tiny``) of 1 or 5 epochs.

    python -m cifarlab.sweeper.bench [--slots 2] [--real] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from cifarlab.sweeper.runner import Sweep, SweepSettings
from cifarlab.sweeper.slots import Slot

# varied on purpose: a batch of two waits for its slower trial
DURATIONS = (0.4, 2.0, 0.6, 1.8, 0.5, 2.2, 1.6, 0.7, 0.5, 1.9)


def _measure(settings: SweepSettings, slots: int) -> dict[str, float]:
    plan = [Slot(i, "cpu", (), 1) for i in range(slots)]
    report = Sweep(settings, plan).run()
    return {
        "wall_s": round(report.wall_s, 3),
        "busy_s": round(report.busy_s, 3),
        "utilisation": round(report.utilisation, 4),
        "trials": len(report.launched),
    }


def simulated(
    slots: int = 2, durations: tuple[float, ...] = DURATIONS, workdir: str | None = None
) -> dict[str, Any]:
    """Sleep trials of the given durations, in this order, asynchronously and in synchronous batches."""
    out: dict[str, Any] = {"kind": "simulated", "slots": slots, "durations": list(durations)}
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        for mode in ("async", "sync"):
            sweep_dir = Path(tmp) / mode
            choices = ", ".join(repr(float(d)) for d in sorted(set(durations)))
            settings = SweepSettings(
                study_name=f"bench_{mode}",
                storage=f"journal:{sweep_dir}/journal.log",
                sweep_dir=str(sweep_dir),
                task_command=[sys.executable, "-m", "cifarlab.sweeper.sleep_task"],
                task_cwd=tmp,
                monitor=None,
                sampler={"_target_": "optuna.samplers.RandomSampler", "seed": 0},
                n_trials=len(durations),
                params={"sleep": f"choice({choices})"},
                enqueue_trials=[{"sleep": float(d)} for d in durations],
                set_logger_group=False,
                set_run_name=False,
                poll_interval=0.02,
                plots=False,
                quiet=True,
                wandb_summary=False,
                sync_batches=(mode == "sync"),
            )
            out[mode] = _measure(settings, slots)
    out["ratio"] = round(out["async"]["utilisation"] / max(out["sync"]["utilisation"], 1e-9), 3)
    out["speedup"] = round(out["sync"]["wall_s"] / max(out["async"]["wall_s"], 1e-9), 3)
    return out


def real(
    slots: int = 2, epochs: tuple[int, ...] = (1, 5, 1, 5, 5, 1), workdir: str | None = None
) -> dict[str, Any]:
    """Short synthetic train.py trials of 1 or 5 epochs (in this order), asynchronously and in synchronous batches."""
    root = Path(__file__).resolve().parents[3]
    script = root / "train.py"
    if not script.is_file():
        raise FileNotFoundError(f"{script} not found: run the real benchmark from a cifarlab checkout")
    out: dict[str, Any] = {"kind": "real", "slots": slots, "epochs": list(epochs)}
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        for mode in ("async", "sync"):
            sweep_dir = Path(tmp) / mode
            settings = SweepSettings(
                study_name=f"bench_{mode}",
                storage=f"journal:{sweep_dir}/journal.log",
                sweep_dir=str(sweep_dir),
                task_command=[sys.executable, str(script)],
                task_cwd=str(root),
                monitor=None,  # no pruning: both modes run exactly the same trials
                sampler={"_target_": "optuna.samplers.RandomSampler", "seed": 0},
                n_trials=len(epochs),
                arguments=[
                    "hparams_search=synthetic_tiny",
                    "data.image_size=32",
                    "trainer.limit_train_batches=30",
                ],
                params={
                    "trainer.max_epochs": f"choice({', '.join(str(e) for e in sorted(set(epochs)))})",
                    "optimizer.lr": "tag(log, interval(1e-3, 1e-2))",
                },
                enqueue_trials=[{"trainer.max_epochs": e} for e in epochs],
                set_run_name=False,
                plots=False,
                quiet=True,
                wandb_summary=False,
                sync_batches=(mode == "sync"),
            )
            out[mode] = _measure(settings, slots)
    out["ratio"] = round(out["async"]["utilisation"] / max(out["sync"]["utilisation"], 1e-9), 3)
    out["speedup"] = round(out["sync"]["wall_s"] / max(out["async"]["wall_s"], 1e-9), 3)
    return out


def describe(result: dict[str, Any]) -> str:
    a, s = result["async"], result["sync"]
    return (
        f"sweeper slot utilisation ({result['kind']}, {result['slots']} slots, {a['trials']} trials): "
        f"async {a['utilisation']:.0%} in {a['wall_s']:.1f}s vs batch-synchronous {s['utilisation']:.0%} in "
        f"{s['wall_s']:.1f}s → ratio {result['ratio']:.2f}, {result['speedup']:.2f}× faster"
    )


def run_bench(slots: int = 2, include_real: bool = False) -> list[dict[str, Any]]:
    results = [simulated(slots)]
    if include_real:
        results.append(real(slots))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slots", type=int, default=2)
    parser.add_argument(
        "--real", action="store_true", help="also run short train.py trials (a few minutes on a CPU)"
    )
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    t0 = time.time()
    results = run_bench(args.slots, args.real)
    for r in results:
        print(describe(r), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps({"sweeper": results, "seconds": round(time.time() - t0, 1)}, indent=2) + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
