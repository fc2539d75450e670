"""End-of-run pictures as PNG files: confusion matrix, per-class accuracy, learning curves, misclassified
images, and a sweep's Optuna plots, so a person without a W&B account still sees what happened.

matplotlib is imported only inside these functions (Agg canvas, no pyplot state, no display needed), so
importing this module costs nothing at start-up.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def class_names(datamodule: Any, num_classes: int) -> list[str]:
    """Readable class names: CIFAR's own (from the extracted archive), image-folder names, else ``0..n-1``."""
    name = getattr(datamodule, "name", None)
    try:
        if name == "cifar10" and num_classes == 10:
            return list(CIFAR10_CLASSES)
        if name == "cifar100":
            import pickle

            meta = Path(datamodule.data_dir) / "cifar-100-python" / "meta"
            with open(meta, "rb") as f:
                names = pickle.load(f, encoding="latin1")["fine_label_names"]
            if len(names) == num_classes:
                return [str(n) for n in names]
        if name == "imagefolder" and getattr(datamodule, "root", None):
            names = sorted(p.name for p in Path(datamodule.root).iterdir() if p.is_dir())
            if len(names) == num_classes:
                return names
    except Exception:  # noqa: BLE001 - names are a nicety; numbers always work
        pass
    return [str(i) for i in range(num_classes)]


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def confusion_matrix_figure(
    cm: Sequence[Sequence[int]], names: Sequence[str], path: Path, title: str = "confusion matrix"
) -> Path:
    """Rows: true class, columns: predicted class; cells coloured by the row's fraction, counts written in."""
    import numpy as np

    counts = np.asarray(cm, dtype=np.int64)
    n = len(names)
    rows = counts.sum(axis=1, keepdims=True)
    fractions = np.divide(counts, np.maximum(rows, 1))
    size = min(4 + 0.45 * n, 24)
    fig = _figure(size + 1, size)
    ax = fig.add_subplot()
    image = ax.imshow(fractions, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    if n <= 20:
        ticks = range(n)
        ax.set_xticks(ticks, names, rotation=45, ha="right")
        ax.set_yticks(ticks, names)
        for i in range(n):
            for j in range(n):
                ax.text(
                    j,
                    i,
                    str(counts[i, j]),
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if fractions[i, j] > 0.5 else "black",
                )
    accuracy = np.trace(counts) / max(counts.sum(), 1)
    ax.set(xlabel="predicted", ylabel="true", title=f"{title} (accuracy {accuracy:.3f})")
    return _save(fig, path)


def per_class_accuracy_figure(
    accuracy: Sequence[float], names: Sequence[str], path: Path, title: str = "per-class accuracy"
) -> Path:
    """Horizontal bars, worst class at the top, with the mean as a dashed line."""
    import numpy as np

    acc = np.asarray(accuracy, dtype=float)
    order = np.argsort(acc)
    n = len(names)
    fig = _figure(7, min(2 + 0.3 * n, 30))
    ax = fig.add_subplot()
    colors = ["tab:red" if a < acc.mean() - acc.std() else "tab:blue" for a in acc[order]]
    ax.barh(range(n), acc[order], color=colors)
    ax.set_yticks(range(n), [names[i] for i in order], fontsize=8 if n <= 30 else 5)
    ax.invert_yaxis()
    ax.axvline(acc.mean(), color="black", linestyle="--", linewidth=1, label=f"mean {acc.mean():.3f}")
    ax.set(xlim=(0, 1), xlabel="accuracy", title=title)
    ax.legend(loc="lower right")
    return _save(fig, path)


def learning_curves_figure(history: Sequence[Mapping[str, float]], path: Path, title: str = "") -> Path:
    """Loss, accuracy and learning rate against the epoch (train and validation)."""
    from matplotlib.ticker import MaxNLocator

    fig = _figure(13, 3.8)
    panels = [
        ("loss", ["train/loss", "val/loss"]),
        ("accuracy", ["train/acc", "val/acc"]),
        ("learning rate", ["lr"]),
    ]
    for index, (label, keys) in enumerate(panels):
        ax = fig.add_subplot(1, 3, index + 1)
        for key in keys:
            points = [(h["epoch"], h[key]) for h in history if key in h and h[key] is not None]
            if points:
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, ys, marker="o", markersize=3, label=key)
        ax.set(xlabel="epoch", ylabel=label, title=label)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if label == "learning rate":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        elif ax.get_legend_handles_labels()[0]:
            ax.legend()
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def image_grid_figure(
    images: Any, captions: Sequence[str], path: Path, title: str = "", columns: int = 8
) -> Path:
    """``images``: uint8 (N, H, W, 3); one caption per image (e.g. ``cat→dog 0.93``). Drawn as one mosaic
    (a single image with the captions above each tile): many small subplots would cost seconds."""
    import numpy as np

    n = len(captions)
    if n == 0:
        fig = _figure(4, 1.5)
        ax = fig.add_subplot()
        ax.text(0.5, 0.5, "no misclassified images", ha="center", va="center")
        ax.axis("off")
        return _save(fig, path)
    images = np.asarray(images)[:n]
    h, w = images.shape[1:3]
    columns = max(1, min(columns, n))
    rows = -(-n // columns)
    pad_x, pad_y = max(2, w // 8), max(8, h // 3)  # room for a caption above every tile
    mosaic = np.full((rows * (h + pad_y), columns * (w + pad_x), 3), 255, dtype=np.uint8)
    for i in range(n):
        r, c = divmod(i, columns)
        y, x = r * (h + pad_y) + pad_y, c * (w + pad_x)
        mosaic[y : y + h, x : x + w] = images[i]
    scale = 1.7 / (w + pad_x)  # inches per pixel: 1.7 inch per tile
    fig = _figure(mosaic.shape[1] * scale, mosaic.shape[0] * scale + (0.4 if title else 0.1))
    ax = fig.add_subplot()
    ax.imshow(mosaic, interpolation="nearest")
    for i, caption in enumerate(captions):
        r, c = divmod(i, columns)
        ax.text(
            c * (w + pad_x) + w / 2,
            r * (h + pad_y) + pad_y - 2,
            caption,
            ha="center",
            va="bottom",
            fontsize=7,
        )
    ax.axis("off")
    if title:
        ax.set_title(title, fontsize=10)
    return _save(fig, path)


def write_json(path: Path, data: Mapping[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def optuna_figures(study, out_dir: Path) -> list[Path]:
    """Optuna's optimisation history, parameter importances and parallel coordinates as PNG files (those
    that the study can draw: importances need two finished trials and a parameter)."""
    import warnings

    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    complete = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    plots = [("optimization_history", ovm.plot_optimization_history)]
    if len(complete) >= 2 and any(t.params for t in complete):
        plots += [
            ("param_importances", ovm.plot_param_importances),
            ("parallel_coordinate", ovm.plot_parallel_coordinate),
        ]
    paths = []
    for name, plot in plots:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ax = plot(study)
            fig = (ax.flat[0] if hasattr(ax, "flat") else ax).get_figure()
            fig.set_size_inches(8, 5)
            fig.tight_layout()
            fig.savefig(out_dir / f"{name}.png", dpi=100)
            plt.close(fig)
            paths.append(out_dir / f"{name}.png")
        except Exception:  # noqa: BLE001 - one plot that cannot be drawn must not lose the others
            plt.close("all")
    return paths
