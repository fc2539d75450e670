"""Output variance of a linear layer y = Wx under N(0,1), Xavier and He initialisation.

With unit-variance, zero-mean inputs x ∈ R^{n_in} and independent zero-mean weights,
Var(y_j) = n_in · Var(w), so

* N(0, 1):            Var(y) = n_in                         (explodes with the width)
* Xavier (Glorot):    Var(w) = 2/(n_in + n_out) → Var(y) = 2·n_in/(n_in + n_out)   (≈1 for square layers)
* He (Kaiming, ReLU): Var(w) = 2/n_in           → Var(y) = 2  (the factor 2 makes up for ReLU zeroing
  half of its inputs: after a ReLU, E[x²] = 1/2 and Var(y) = 1)

The weights come from ``torch.nn.init`` on a real ``nn.Linear`` (``normal_``, ``xavier_normal_``,
``kaiming_normal_(nonlinearity="relu")``), so the measured points also check PyTorch's initialisers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

SCHEMES = ("normal", "xavier", "he")
LABELS = {"normal": "N(0, 1)", "xavier": "Xavier normal", "he": "He (Kaiming) normal"}


def theory(scheme: str, n_in: int, n_out: int) -> float:
    if scheme == "normal":
        return float(n_in)
    if scheme == "xavier":
        return 2.0 * n_in / (n_in + n_out)
    if scheme == "he":
        return 2.0
    raise ValueError(scheme)


def _init(weight: torch.Tensor, scheme: str) -> None:
    if scheme == "normal":
        nn.init.normal_(weight, 0.0, 1.0)
    elif scheme == "xavier":
        nn.init.xavier_normal_(weight)
    elif scheme == "he":
        nn.init.kaiming_normal_(weight, nonlinearity="relu")
    else:
        raise ValueError(scheme)


@dataclass
class Row:
    n_in: int
    measured: dict[str, float]
    theory: dict[str, float]


def widths(max_n: int = 10_000, points: int = 17) -> list[int]:
    """Log-spaced n_in from 1 to ``max_n`` (integers, duplicates removed)."""
    return sorted({int(round(v)) for v in np.logspace(0, np.log10(max_n), points)})


def measure(n_ins: list[int], n_out: int = 100, batch: int = 256, seed: int = 0) -> list[Row]:
    """Empirical Var(y) over a batch of N(0, 1) inputs and all outputs, one fresh layer per (scheme, n_in)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # nn.init draws from the global generator
    rows = []
    with torch.no_grad():
        for n_in in n_ins:
            x = torch.randn(batch, n_in, generator=g)
            x = (x - x.mean()) / x.std()  # exactly unit variance, so only the weights vary
            layer = nn.Linear(n_in, n_out, bias=False)
            measured = {}
            for scheme in SCHEMES:
                _init(layer.weight, scheme)
                measured[scheme] = layer(x).var().item()
            rows.append(Row(n_in, measured, {s: theory(s, n_in, n_out) for s in SCHEMES}))
    return rows


def plot(rows: list[Row], n_out: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = np.array([r.n_in for r in rows])
    dense = np.logspace(0, np.log10(n.max()), 200)
    fig, ax = plt.subplots(figsize=(8, 5.5), constrained_layout=True)
    colors = {"normal": "tab:red", "xavier": "tab:blue", "he": "tab:green"}
    for s in SCHEMES:
        ax.plot(n, [r.measured[s] for r in rows], "o", color=colors[s], label=f"{LABELS[s]} (measured)")
        ax.plot(dense, [theory(s, d, n_out) for d in dense], "-", color=colors[s], lw=1,
                label=f"{LABELS[s]} (theory)")  # fmt: skip
    ax.axhline(1.0, color="0.5", ls=":", lw=1)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("n_in (fan-in)")
    ax.set_ylabel("Var(y) of y = W x,  Var(x) = 1")
    ax.set_title(f"Output variance of a linear layer (n_out = {n_out}) by initialisation")
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(out_dir: Path, n_out: int = 100, max_n: int = 10_000, batch: int = 256) -> list[Row]:
    rows = measure(widths(max_n), n_out=n_out, batch=batch)
    print(f"Output variance of y = W x for unit-variance inputs, nn.Linear(n_in, {n_out}), batch {batch}")
    print(
        f"theory: N(0,1) → n_in;  Xavier → 2·n_in/(n_in + {n_out}) (= 1 at n_in = n_out);  He → 2 (= 1 after a ReLU)"
    )
    short = {"normal": "N(0,1)", "xavier": "Xavier", "he": "He"}
    print(f"{'':>6}" + "".join(f"  {short[s]:^21}" for s in SCHEMES))
    print(f"{'n_in':>6}" + "  {:>10} {:>10}".format("measured", "theory") * len(SCHEMES))
    for r in rows:
        cells = "".join(f"  {r.measured[s]:>10.4g} {r.theory[s]:>10.4g}" for s in SCHEMES)
        print(f"{r.n_in:>6}{cells}")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "init_variance.png"
    plot(rows, n_out, path)
    print(f"figure written to {path}")
    return rows
