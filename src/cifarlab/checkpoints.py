"""The checkpoint a user names (``ckpt_path=``): read once, or one clear error saying why it cannot be used.

Lightning would fail deep inside ``fit``/``test`` with a traceback for a file that is not a checkpoint
(``UnpicklingError``), one written by another program (``KeyError``) or one of a different network
(``size mismatch``); these checks run before any data is loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from cifarlab.config import ConfigError

# Settings a resumed run must share with the run that wrote the checkpoint: they decide the network's
# shape and the kind of optimizer and scheduler state in the file.
RESUME_MUST_MATCH = (
    "data.name",
    "data.num_classes",
    "data.image_size",
    "optimizer._target_",
    "scheduler._target_",
)


def _refuse(path: Path | str, allowed: str) -> ConfigError:
    return ConfigError(f"ckpt_path={str(path)!r} is not allowed; allowed: {allowed}")


def read_checkpoint(path: Path | str) -> dict[str, Any]:
    """The checkpoint as Lightning wrote it (on the CPU), after checking that cifarlab wrote it."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise _refuse(path, "an existing checkpoint file (<run>/checkpoints/last.ckpt)")
    try:
        # weights_only=False as Lightning loads it: the file holds the run's config and callback states.
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 - whatever torch says, the file is not a checkpoint
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise _refuse(
            path, f"a checkpoint written by cifarlab (this file cannot be read: {reason})"
        ) from None
    if (
        not isinstance(checkpoint, dict)
        or "cifarlab_config" not in checkpoint
        or "state_dict" not in checkpoint
    ):
        raise _refuse(path, "a checkpoint written by cifarlab (<run>/checkpoints/*.ckpt)")
    return checkpoint


def check_resumable(checkpoint: dict[str, Any], cfg: DictConfig, path: Path | str) -> None:
    """Resuming continues the same run: the network, optimizer and scheduler must be of the same kind."""
    saved = OmegaConf.create(checkpoint["cifarlab_config"])
    for key in RESUME_MUST_MATCH:
        was, now = OmegaConf.select(saved, key), OmegaConf.select(cfg, key)
        if was != now:
            raise _refuse(path, f"a checkpoint of a run with {key}={now!r} (this one has {key}={was!r})")
