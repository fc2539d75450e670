"""The Hydra Sweeper class of ``hydra/sweeper=cifarlab_optuna``; the work is in :mod:`cifarlab.sweeper`."""

import functools
import sys
from pathlib import Path
from typing import Any

from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


class CifarlabOptunaSweeper(Sweeper):
    def __init__(self, **conf: Any) -> None:
        self.conf = conf
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.task_function: TaskFunction | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.task_function = (
            task_function  # warm trials run it in forked processes (cifarlab.sweeper.launch_fork)
        )

    def sweep(self, arguments: list[str]) -> Any:
        from cifarlab.sweeper.runner import SweepError, run_sweep, worker_main
        from cifarlab.sweeper.settings import settings_from_hydra
        from cifarlab.sweeper.slots import SlotError
        from cifarlab.sweeper.space import SearchSpaceError, build_space
        from cifarlab.sweeper.study import StorageError

        assert self.config is not None and self.hydra_context is not None
        try:
            search_path = self.hydra_context.config_loader.get_search_path().get_path()
            settings = settings_from_hydra(self.conf, self.config, arguments, self.task_function, search_path)
            # a task_command may be any script with its own config: only this app's trials are composed here
            precheck = (
                self._precheck
                if self.conf.get("precheck", True) and not self.conf.get("task_command")
                else None
            )
            workers = int(self.conf.get("workers") or 0)
            if workers <= 0:
                return run_sweep(settings, precheck=precheck)
            # each job composes the task config again: give it the command line's plain (non-sweep) overrides
            space, plain = build_space(
                settings.params, settings.arguments, settings.conditional, settings.context
            )
            if precheck is not None:
                precheck(space, plain)
            launcher = Plugins.instance().instantiate_launcher(
                config=self.config,
                hydra_context=self.hydra_context,
                task_function=functools.partial(worker_main, settings),
            )
            jobs = [[*plain, f"hydra.sweep.subdir=workers/{i}"] for i in range(workers)]
            returns = launcher.launch(jobs, initial_job_idx=0)
            from cifarlab.sweeper.results import summarise_study

            return summarise_study(settings, returns)
        except KeyboardInterrupt:
            print(
                "sweep interrupted: re-run the same command to resume the study", file=sys.stderr, flush=True
            )
            sys.exit(130)
        except (SweepError, SearchSpaceError, SlotError, StorageError) as err:
            print(f"error: {err}", file=sys.stderr, flush=True)
            sys.exit(1)

    def _precheck(self, space: Any, base_overrides: list[str]) -> None:
        """Every kind of value the search space gives composes as a trial's config and passes cifarlab's checks
        (cifarlab.sweeper.precheck), before the study is opened."""
        from hydra.core.hydra_config import HydraConfig
        from omegaconf import OmegaConf, open_dict

        from cifarlab.cli import one_line
        from cifarlab.config import TrainConf, validate
        from cifarlab.sweeper.precheck import check_space

        assert self.config is not None and self.hydra_context is not None
        loader, master = self.hydra_context.config_loader, self.config
        sources = OmegaConf.to_container(master.hydra.runtime.config_sources)
        mains = [s["path"] for s in sources if s.get("provider") == "main" and s.get("schema") == "file"]
        conf_dir = Path(mains[0]) if mains else Path(".")
        config_name = str(master.hydra.job.config_name or "train")  # its groups are the ones one_line lists

        hydra_config = HydraConfig.instance()
        previous = hydra_config.cfg

        def compose(overrides: list[str]) -> DictConfig:
            cfg = loader.load_sweep_config(master, overrides)
            # a trial resolves ${hydra:...} and ${output_dir} against its own Hydra config: so does the probe
            hydra_config.set_config(cfg)
            with open_dict(cfg):
                del cfg["hydra"]
            return cfg

        def check(cfg: DictConfig) -> None:
            schema = OmegaConf.get_type(cfg)
            if isinstance(schema, type) and issubclass(
                schema, TrainConf
            ):  # train.py's config, not another app's
                validate(cfg)

        try:
            check_space(
                space,
                base_overrides,
                compose,
                check,
                lambda err, args: one_line(err, args, conf_dir, config_name),
            )
        finally:
            hydra_config.cfg = previous
