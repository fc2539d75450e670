"""The sweeper's benchmarks.

1. Warm trial start (:func:`warm_start`): the same ``synthetic_tiny`` sweep (``python train.py -m``, no pruning)
   with trials started the old way (``hydra.sweeper.launch=subprocess``: a fresh ``python train.py`` per trial) and
   the warm way (``launch=fork``: forked from a preloaded server), one after the other in one run. Per-trial
   overhead = (wall × slots − Σ the trials' ``duration_s``) / trials, where wall runs from the sweep process's
   start to its last trial's end; trials per minute = trials / wall. On a GPU also the GPU's busy fraction during
   the sweep (``nvidia-smi`` sampled every 0.2 s: mean utilisation).

2. Slot utilisation of the asynchronous sweeper against batch-synchronous trials (the stock plugin's way:
``n_jobs`` trials at a time, the next batch only after the slowest one).

Utilisation = time the slots spent running trials / (slots × wall time). Both modes run the same trials through
the same runner (:class:`cifarlab.sweeper.runner.Sweep`; ``sync_batches`` adds the batch barrier):

- simulated: trials that sleep for deliberately varied durations (:mod:`cifarlab.sweeper.sleep_task`);
- real (``--real``): short ``train.py`` trials (``hparams_search=synthetic_tiny``) of 1 or 5 epochs.

3. W&B's imports in the fork server (:func:`wandb_preload`): warm trials that log to W&B, with and without
   them preloaded.

    python -m cifarlab.sweeper.bench [--slots 2] [--real] [--warm-start [N]] [--wandb-preload [R]] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
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


def _train_script() -> Path:
    """The checkout's ``train.py``, which the benchmarks with real trials run."""
    script = Path(__file__).resolve().parents[3] / "train.py"
    if not script.is_file():
        raise FileNotFoundError(f"{script} not found: run the sweeper's benchmarks from a cifarlab checkout")
    return script


def _async_against_sync(out: dict[str, Any], slots: int, workdir: str | None, **task: Any) -> dict[str, Any]:
    """The same trials asynchronously and in synchronous batches, into ``out`` with their ratios.

    ``task``: the :class:`SweepSettings` that say which trials (without ``task_cwd``: the temporary folder).
    """
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        task.setdefault("task_cwd", tmp)
        for mode in ("async", "sync"):
            sweep_dir = Path(tmp) / mode
            settings = SweepSettings(
                study_name=f"bench_{mode}",
                storage=f"journal:{sweep_dir}/journal.log",
                sweep_dir=str(sweep_dir),
                monitor=None,  # no pruning: both modes run exactly the same trials
                sampler={"_target_": "optuna.samplers.RandomSampler", "seed": 0},
                set_run_name=False,
                plots=False,
                quiet=True,
                wandb_summary=False,
                sync_batches=(mode == "sync"),
                **task,
            )
            out[mode] = _measure(settings, slots)
    out["ratio"] = round(out["async"]["utilisation"] / max(out["sync"]["utilisation"], 1e-9), 3)
    out["speedup"] = round(out["sync"]["wall_s"] / max(out["async"]["wall_s"], 1e-9), 3)
    return out


def simulated(
    slots: int = 2, durations: tuple[float, ...] = DURATIONS, workdir: str | None = None
) -> dict[str, Any]:
    """Sleep trials of the given durations, in this order, asynchronously and in synchronous batches."""
    choices = ", ".join(repr(float(d)) for d in sorted(set(durations)))
    return _async_against_sync(
        {"kind": "simulated", "slots": slots, "durations": list(durations)},
        slots,
        workdir,
        task_command=[sys.executable, "-m", "cifarlab.sweeper.sleep_task"],
        n_trials=len(durations),
        # `index` makes every parameter set distinct: a study never evaluates one twice
        params={"sleep": f"choice({choices})", "index": f"range(0, {len(durations) - 1}, 1)"},
        enqueue_trials=[{"sleep": float(d), "index": i} for i, d in enumerate(durations)],
        set_logger_group=False,
        poll_interval=0.02,
    )


def real(
    slots: int = 2, epochs: tuple[int, ...] = (1, 5, 1, 5, 5, 1), workdir: str | None = None
) -> dict[str, Any]:
    """Short synthetic train.py trials of 1 or 5 epochs (in this order), asynchronously and in synchronous batches."""
    script = _train_script()
    return _async_against_sync(
        {"kind": "real", "slots": slots, "epochs": list(epochs)},
        slots,
        workdir,
        task_command=[sys.executable, str(script)],
        task_cwd=str(script.parent),
        n_trials=len(epochs),
        arguments=["hparams_search=synthetic_tiny", "data.image_size=32", "trainer.limit_train_batches=30"],
        params={
            "trainer.max_epochs": f"choice({', '.join(str(e) for e in sorted(set(epochs)))})",
            "optimizer.lr": "tag(log, interval(1e-3, 1e-2))",
        },
        enqueue_trials=[{"trainer.max_epochs": e} for e in epochs],
    )


def _gpu_sampler(stop: threading.Event, samples: list[float]) -> None:
    """Append the GPUs' mean utilisation (0-1) every 0.2 s until ``stop`` (nvidia-smi; no CUDA in this process)."""
    from cifarlab.sweeper.slots import query_gpus

    while not stop.is_set():
        rows = query_gpus("utilization.gpu", timeout=10)
        if rows is None:
            return
        values = [float(row[0]) for row in rows if row and row[0].replace(".", "", 1).isdigit()]
        if values:
            samples.append(sum(values) / len(values) / 100)
        stop.wait(0.2)


def sweep_overhead(journal: Path, study_name: str, slots: int) -> dict[str, float]:
    """Per-trial overhead and trials per minute of a finished sweep, from its journal and trial folders."""
    import optuna

    from cifarlab.sweeper.study import make_storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=study_name, storage=make_storage(f"journal:{journal}"))
    trials = [t for t in study.get_trials(deepcopy=False) if t.state.is_finished() and t.datetime_complete]
    started = min(rec["started"] for key, rec in study.user_attrs.items() if key.startswith("worker:"))
    wall = max(t.datetime_complete.timestamp() for t in trials) - started
    work = sum(float(t.user_attrs.get("metrics", {}).get("duration_s", 0.0)) for t in trials)
    n = len(trials)
    return {
        "trials": n,
        "wall_s": round(wall, 2),
        "work_s": round(work, 2),
        "overhead_per_trial_s": round((wall * slots - work) / max(n, 1), 2),
        "trials_per_min": round(60 * n / wall, 2) if wall > 0 else 0.0,
        # when the first trial began training (its end minus its duration_s): the sweep's start-up
        "first_training_s": round(
            min(
                t.datetime_complete.timestamp()
                - float(t.user_attrs.get("metrics", {}).get("duration_s", 0.0))
                for t in trials
            )
            - started,
            2,
        ),
    }


def _timed_sweep(
    tmp: Path, name: str, overrides: list[str], env: dict[str, str], slots: int
) -> dict[str, Any]:
    """Run ``python train.py -m hparams_search=synthetic_tiny <overrides>`` (no pruning, no plots) into
    ``tmp/name``; its :func:`sweep_overhead` figures, the command's wall time and, on a GPU, its busy fraction."""
    script = _train_script()
    sweep_dir = tmp / name
    cmd = [
        sys.executable,
        str(script),
        "-m",
        "hparams_search=synthetic_tiny",
        f"hydra.sweeper.n_jobs={slots}",
        "hydra/sweeper/pruner=none",
        "hydra.sweeper.plots=false",
        f"hydra.sweep.dir={sweep_dir}",
        *overrides,
    ]
    stop, samples = threading.Event(), []
    sampler = threading.Thread(target=_gpu_sampler, args=(stop, samples), daemon=True)
    sampler.start()
    t0 = time.time()
    result = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=1800)
    stop.set()
    sampler.join()
    if result.returncode != 0:
        raise RuntimeError(f"the {name} sweep failed: {result.stdout[-2000:]}{result.stderr[-2000:]}")
    figures = sweep_overhead(sweep_dir / "journal.log", "synthetic_tiny", slots)
    figures["command_s"] = round(time.time() - t0, 2)
    figures["gpu_busy"] = round(sum(samples) / len(samples), 3) if samples else None
    return figures


def warm_start(
    n_trials: int = 8,
    slots: int = 2,
    workdir: str | None = None,
    modes: tuple[str, ...] = ("subprocess", "fork"),
) -> dict[str, Any]:
    """The same synthetic_tiny sweep (no pruning) started the old way and the warm way, one after the other."""
    out: dict[str, Any] = {"kind": "warm_start", "slots": slots, "n_trials": n_trials}
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        env = {**os.environ, "CIFARLAB_DATA_DIR": str(Path(tmp) / "data"), "WANDB_MODE": "disabled"}
        for mode in modes:
            overrides = [f"hydra.sweeper.n_trials={n_trials}", f"hydra.sweeper.launch={mode}"]
            out[mode] = _timed_sweep(Path(tmp), mode, overrides, env, slots)
    if "subprocess" in out and "fork" in out:
        old, warm = out["subprocess"], out["fork"]
        out["overhead_ratio"] = round(
            old["overhead_per_trial_s"] / max(warm["overhead_per_trial_s"], 1e-9), 2
        )
        out["speedup"] = round(warm["trials_per_min"] / max(old["trials_per_min"], 1e-9), 2)
    return out


def wandb_preload(
    n_trials: int = 8, slots: int = 2, repeats: int = 3, workdir: str | None = None
) -> dict[str, Any]:
    """Warm trials that log to W&B (offline), with the fork server importing W&B's lazy imports (the default,
    :data:`cifarlab.sweeper.launch_fork.WANDB_PRELOAD`) and without (``hydra.sweeper.preload`` set to the rest):
    the same sweep ``repeats`` times each, alternated; medians."""
    from statistics import median

    from cifarlab.sweeper.launch_fork import DEFAULT_PRELOAD

    out: dict[str, Any] = {"kind": "wandb_preload", "slots": slots, "n_trials": n_trials, "repeats": repeats}
    runs: dict[str, list[dict[str, Any]]] = {"without": [], "with": []}
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        env = {**os.environ, "CIFARLAB_DATA_DIR": str(Path(tmp) / "data"), "WANDB_MODE": "offline"}
        base = [f"hydra.sweeper.n_trials={n_trials}", "hydra.sweeper.launch=fork", "logger=wandb"]
        for rep in range(repeats):
            for variant in ("without", "with"):
                extra = (
                    [f"hydra.sweeper.preload=[{','.join(DEFAULT_PRELOAD)}]"] if variant == "without" else []
                )
                runs[variant].append(_timed_sweep(Path(tmp), f"{variant}{rep}", base + extra, env, slots))
    for variant, results in runs.items():
        out[variant] = {
            key: median(r[key] for r in results)
            for key in ("wall_s", "overhead_per_trial_s", "trials_per_min")
        }
        out[variant]["runs"] = results
    out["wall_ratio"] = round(out["without"]["wall_s"] / max(out["with"]["wall_s"], 1e-9), 2)
    return out


def describe_wandb_preload(result: dict[str, Any]) -> str:
    a, b = result["without"], result["with"]
    return (
        f"warm W&B trials ({result['n_trials']} synthetic_tiny trials, {result['slots']} slots, median of "
        f"{result['repeats']}): without W&B preloaded {a['wall_s']:.1f} s ({a['overhead_per_trial_s']:.1f} s "
        f"overhead per trial), with {b['wall_s']:.1f} s ({b['overhead_per_trial_s']:.1f} s) → "
        f"{result['wall_ratio']:.2f}x"
    )


def describe_warm_start(result: dict[str, Any]) -> str:
    parts = []
    for mode, label in (("subprocess", "subprocess (old)"), ("fork", "warm fork")):
        r = result.get(mode)
        if r:
            gpu = f", GPU busy {r['gpu_busy']:.0%}" if r.get("gpu_busy") is not None else ""
            parts.append(
                f"{label}: {r['overhead_per_trial_s']:.1f} s overhead per trial, {r['trials_per_min']:.1f} "
                f"trials/min, first trial training after {r['first_training_s']:.1f} s{gpu}"
            )
    head = f"sweep start-up ({result['n_trials']} synthetic_tiny trials, {result['slots']} slots): "
    tail = f" → {result['speedup']:.2f}x trials/min" if "speedup" in result else ""
    return head + "; ".join(parts) + tail


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
    parser.add_argument(
        "--warm-start",
        type=int,
        nargs="?",
        const=8,
        default=0,
        metavar="N",
        help="also run an N-trial synthetic_tiny sweep the old way and the warm way (default N: 8; minutes)",
    )
    parser.add_argument(
        "--wandb-preload",
        type=int,
        nargs="?",
        const=3,
        default=0,
        metavar="R",
        help="also run 8 warm trials that log to W&B with and without W&B preloaded, R times each (default 3)",
    )
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    t0 = time.time()
    results = run_bench(args.slots, args.real)
    for r in results:
        print(describe(r), flush=True)
    if args.warm_start:
        results.append(warm_start(args.warm_start, args.slots))
        print(describe_warm_start(results[-1]), flush=True)
    if args.wandb_preload:
        results.append(wandb_preload(slots=args.slots, repeats=args.wandb_preload))
        print(describe_wandb_preload(results[-1]), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps({"sweeper": results, "seconds": round(time.time() - t0, 1)}, indent=2) + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
