"""Per-layer gradient norms of the course CNN: sigmoid vs ReLU, PyTorch's default vs He (Kaiming) init.

Trains ``CifarCNN`` for a few hundred steps on the synthetic CIFAR-like data (``make_synthetic``; 16x16
images by default, to stay well under a minute on 2 CPU cores) with the course's ``Momentum`` optimizer
and records ‖∂L/∂W‖ of every conv/linear weight at every step.
With sigmoids the backward pass multiplies by σ′ ≤ 1/4 at every layer, so the gradients reaching the
first convolution are orders of magnitude smaller than those of the last layer (vanishing gradients);
ReLU with He initialisation keeps them at a similar scale through the whole network.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

CONFIGS: tuple[tuple[str, str], ...] = (
    ("sigmoid", "default"),
    ("sigmoid", "kaiming_uniform"),
    ("relu", "default"),
    ("relu", "kaiming_uniform"),
)
LAYERS = ("conv1", "conv2", "conv3", "fc1", "fc2")


@dataclass
class GradRun:
    activation: str
    init: str
    norms: np.ndarray  # (steps, layers): ‖grad‖₂ of each weight at each step
    losses: np.ndarray  # (steps,)
    held_out_acc: float

    @property
    def key(self) -> str:
        return f"{self.activation}+{self.init}"

    def mean_norms(self) -> dict[str, float]:
        return dict(zip(LAYERS, self.norms.mean(axis=0).tolist(), strict=True))


def _weights(model: nn.Module) -> list[torch.Tensor]:
    ws = [m.weight for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(ws) == len(LAYERS), len(ws)
    return ws


def train_one(
    activation: str,
    init: str,
    images: torch.Tensor,
    labels: torch.Tensor,
    held_out: tuple[torch.Tensor, torch.Tensor],
    steps: int,
    batch_size: int,
    lr: float,
    momentum: float,
    seed: int,
) -> GradRun:
    from cifarlab.model import CifarCNN
    from cifarlab.optim import Momentum

    torch.manual_seed(seed)
    model = CifarCNN(
        num_classes=10, dropout=0.5, activation=activation, init=init, image_size=images.shape[-1]
    )
    opt = Momentum(model.parameters(), lr=lr, momentum=momentum)
    weights = _weights(model)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(images), generator=g)
    norms = np.zeros((steps, len(LAYERS)))
    losses = np.zeros(steps)
    pos = 0
    model.train()
    for step in range(steps):
        if pos + batch_size > len(order):
            order, pos = torch.randperm(len(images), generator=g), 0
        idx = order[pos : pos + batch_size]
        pos += batch_size
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(images[idx]), labels[idx])
        loss.backward()
        norms[step] = [w.grad.norm().item() for w in weights]
        losses[step] = loss.item()
        opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model(held_out[0]).argmax(1) == held_out[1]).float().mean().item()
    return GradRun(activation, init, norms, losses, acc)


def plot(runs: list[GradRun], path: Path, image_size: int = 16) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axd = plt.subplot_mosaic(
        [["a", "b", "c", "d"], ["e", "e", "f", "f"]], figsize=(16, 8.5), constrained_layout=True
    )
    lo = min(r.norms[r.norms > 0].min() for r in runs) / 2
    hi = max(r.norms.max() for r in runs) * 2
    cmap = plt.get_cmap("viridis")
    for key, run in zip("abcd", runs, strict=True):
        ax = axd[key]
        for i, layer in enumerate(LAYERS):
            ax.plot(run.norms[:, i], color=cmap(i / (len(LAYERS) - 1)), lw=1, label=layer)
        ax.set_yscale("log")
        ax.set_ylim(lo, hi)
        ax.set_title(f"{run.activation}, init={run.init}")
        ax.set_xlabel("step")
        ax.set_ylabel("‖∂L/∂W‖")
        ax.legend(fontsize=7, ncol=2)
    markers = "osv^"
    for run, m in zip(runs, markers, strict=True):
        axd["e"].plot(LAYERS, list(run.mean_norms().values()), marker=m, label=run.key)
        axd["f"].plot(run.losses, lw=1, label=f"{run.key} (held-out acc {run.held_out_acc:.2f})")
    axd["e"].set_yscale("log")
    axd["e"].set_ylabel("mean ‖∂L/∂W‖ over the run")
    axd["e"].set_title("Gradient norm per layer (input → output): vanishing with sigmoid")
    axd["e"].legend(fontsize=8)
    axd["f"].set_xlabel("step")
    axd["f"].set_ylabel("training loss (cross-entropy)")
    axd["f"].axhline(np.log(10), color="0.5", ls=":", lw=1)
    axd["f"].set_title("Training loss (dotted: chance, ln 10)")
    axd["f"].legend(fontsize=8)
    fig.suptitle(f"Course CNN on synthetic {image_size}x{image_size} images: per-layer weight-gradient norms")
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(
    out_dir: Path,
    steps: int = 200,
    batch_size: int = 64,
    image_size: int = 16,
    lr: float = 0.01,
    momentum: float = 0.9,
    seed: int = 0,
    threads: int = 1,
    plot_figure: bool = True,
) -> dict[str, GradRun]:
    from cifarlab.data import make_synthetic

    if steps < 1:
        raise ValueError(f"--steps={steps}; need at least 1")
    if threads > 0:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    n_train = min(max(steps * batch_size, batch_size), 4096)  # cycled through when steps·batch is larger
    images, labels = make_synthetic(n_train + 512, num_classes=10, seed=seed, image_size=image_size)
    x = images.float() / 255
    train_x, train_y = x[:n_train], labels[:n_train]
    held_out = (x[n_train:], labels[n_train:])
    print(
        f"Course CNN, {steps} steps of Momentum(lr={lr}, momentum={momentum}) at batch {batch_size} on "
        f"{n_train} synthetic {image_size}x{image_size} images; ‖∂L/∂W‖ per layer, mean over the steps"
    )
    runs = []
    for activation, init in CONFIGS:
        runs.append(
            train_one(activation, init, train_x, train_y, held_out, steps, batch_size, lr, momentum, seed)
        )
    width = max(len(r.key) for r in runs)
    print(
        f"{'config':<{width}}"
        + "".join(f"{name:>11}" for name in LAYERS)
        + f"{'conv1/fc2':>11}{'loss':>8}{'acc':>7}"
    )
    for r in runs:
        m = r.mean_norms()
        tail = r.losses[-max(1, steps // 10) :].mean()
        print(
            f"{r.key:<{width}}"
            + "".join(f"{m[name]:>11.3e}" for name in LAYERS)
            + f"{m['conv1'] / m['fc2']:>11.2e}{tail:>8.3f}{r.held_out_acc:>7.3f}"
        )
    print("(loss: mean over the last 10% of steps; acc: held-out accuracy of 512 images, chance = 0.1)")
    if plot_figure:
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / "gradient_norms.png"
        plot(runs, path, image_size)
        print(f"figure written to {path}")
    print(f"({time.perf_counter() - t0:.1f} s)")
    return {r.key: r for r in runs}
