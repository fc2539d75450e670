"""``python -m cifarlab.course race SWEEP_DIR``: read a ``course_optimizers`` sweep as a race table.

Each course optimizer sits next to its torch.optim twin; for each, the best validation accuracy over the
learning rates tried, the learning rate that gave it, and how many of its trials completed or were pruned.
"""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path

# course optimizer → the torch.optim configuration it is raced against (same formula or closest relative)
TWINS = {
    "course/momentum": "momentum",
    "course/nesterov": "nesterov",
    "course/adam": "adam",
    "course/adagrad": "adagrad",
    "course/rmsprop": "rmsprop",
    "course/ema_momentum": "momentum",
    "course/decayed_gd_cifar": "sgd",
    "course/grad_scaled_gd_cifar": "sgd",
}


def best_per_optimizer(trials_csv: Path) -> dict[str, dict]:
    """{optimizer: {best, lr, complete, pruned, failed}} from the sweeper's trials.csv."""
    table: dict[str, dict] = {}
    with open(trials_csv, newline="") as f:
        for row in csv.DictReader(f):
            name = row.get("params:optimizer") or "?"
            entry = table.setdefault(
                name, {"best": -math.inf, "lr": None, "complete": 0, "pruned": 0, "failed": 0}
            )
            state = row["state"].lower()
            if state in ("complete", "pruned", "fail"):
                entry[{"fail": "failed"}.get(state, state)] += 1
            if state == "complete" and row.get("value") not in (None, ""):
                value = float(row["value"])
                if value > entry["best"]:
                    entry["best"], entry["lr"] = value, row.get("params:optimizer.lr")
    return table


def format_race(table: dict[str, dict]) -> str:
    def cell(name: str) -> str:
        e = table.get(name)
        if e is None or e["best"] == -math.inf:
            return f"{name:<28}{'—':>8}{'':>10}"
        lr = f"{float(e['lr']):.2g}" if e["lr"] else "?"
        return f"{name:<28}{e['best']:>8.4f}{lr:>10}"

    lines = [
        f"{'course optimizer':<28}{'val/acc':>8}{'best lr':>10}   {'torch.optim twin':<28}{'val/acc':>8}{'best lr':>10}"
    ]
    for course, twin in TWINS.items():
        lines.append(f"{cell(course)}   {cell(twin)}")
    counts = {k: sum(e[k] for e in table.values()) for k in ("complete", "pruned", "failed")}
    lines.append(
        f"trials: {counts['complete']} complete, {counts['pruned']} pruned, {counts['failed']} failed"
    )
    return "\n".join(lines)


def main(sweep_dir: Path) -> int:
    trials_csv = Path(sweep_dir) / "trials.csv"
    if not trials_csv.is_file():
        print(
            f"error: {trials_csv} not found; run python train.py -m hparams_search=course_optimizers first",
            file=sys.stderr,
        )
        return 1
    print(format_race(best_per_optimizer(trials_csv)))
    return 0
