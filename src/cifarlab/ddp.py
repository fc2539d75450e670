"""DDP that keeps Hydra's output folders intact, also inside a multirun.

Lightning starts the other DDP ranks by re-running ``sys.argv``. Inside a Hydra multirun that command
still holds ``-m`` and the sweep lists, so every rank would start a sweep of its own; and Lightning points
the ranks at ``hydra.run.dir``, not at the job's folder. Here each rank re-runs exactly this job: its own
overrides, in its own output folder, without writing a second ``.hydra`` config.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence


def _job_subprocess_cmd(local_rank: int) -> tuple[Sequence[str], str]:
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import get_original_cwd, to_absolute_path

    import __main__

    hydra_cfg = HydraConfig.get()
    if __main__.__spec__ is None:
        command = [sys.executable, to_absolute_path(sys.argv[0])]
    else:
        command = [sys.executable, "-m", __main__.__spec__.name]
    command += [o for o in hydra_cfg.overrides.task if not o.startswith("hydra.")]
    command += [
        f'hydra.run.dir="{hydra_cfg.runtime.output_dir}"',
        f"hydra.job.name={hydra_cfg.job.name}_rank{local_rank}",
        "hydra.output_subdir=null",
        "hydra/hydra_logging=none",
        "hydra/job_logging=none",
    ]
    return command, get_original_cwd()


def hydra_safe_ddp(strategy: str):
    """Return ``strategy`` unchanged, after pointing Lightning's rank launcher at this job's command."""
    from lightning.fabric.strategies.launchers import subprocess_script

    subprocess_script._hydra_subprocess_cmd = _job_subprocess_cmd
    return strategy
