"""Inside a trial process: report the monitored metric to the Optuna trial every epoch, and stop when pruned.

The sweeper starts each trial with ``CIFARLAB_OPTUNA_*`` environment variables (see
:mod:`cifarlab.sweeper`); :func:`cifarlab.train.run` then adds :func:`trial_callbacks` to the trainer. When
the pruner says so, the callback stops training at the end of the epoch and ``run`` writes
``status: pruned`` into metrics.json; the sweeper records the trial PRUNED with its last reported value.

:class:`TrialReporter` is framework-free: any task script can report through it (see ``_sleep_task.py``).
"""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Any

from cifarlab.sweeper import ENV_MONITOR, ENV_PRUNER, ENV_STORAGE, ENV_STUDY, ENV_TRIAL, ENV_TRIAL_NUMBER


def in_trial() -> bool:
    """Whether this process was started by the sweeper for an Optuna trial."""
    return bool(os.environ.get(ENV_TRIAL))


def instantiate_pruner(config: dict[str, Any] | None, warn: bool = True) -> Any:
    """An Optuna pruner from ``{"_target_": "optuna.pruners.MedianPruner", **kwargs}`` (None: no pruning);
    ``warn=False``: say nothing of the keys it drops (in a trial: its sweep process said it once)."""
    import optuna

    if not config:
        return optuna.pruners.NopPruner()
    from cifarlab.sweeper.runner import instantiate_target

    return instantiate_target(config, "pruner", warn=warn)


class TrialReporter:
    """Report intermediate values of the trial named by the environment; tell whether to prune."""

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        import optuna

        from cifarlab.sweeper.study import make_storage

        env = dict(os.environ if environ is None else environ)
        self.monitor = env.get(ENV_MONITOR) or None
        self.number = env.get(ENV_TRIAL_NUMBER, "?")
        pruner = instantiate_pruner(json.loads(env.get(ENV_PRUNER) or "null"), warn=False)
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        storage = make_storage(env[ENV_STORAGE])
        study = optuna.load_study(
            study_name=env[ENV_STUDY], storage=storage, pruner=pruner, sampler=optuna.samplers.RandomSampler()
        )
        self.trial = optuna.trial.Trial(study, int(env[ENV_TRIAL]))

    def report(self, value: float, step: int) -> bool:
        """Record ``value`` at ``step``; True when the pruner says to stop this trial."""
        if not math.isfinite(value):
            return False  # a diverged run fails on its own; NaN would only confuse the pruner
        self.trial.report(float(value), int(step))
        return bool(self.trial.should_prune())


def trial_callbacks() -> list[Any]:
    """The Lightning callbacks of a sweeper trial ([] outside one, or when nothing is monitored)."""
    if not in_trial() or not os.environ.get(ENV_MONITOR):
        return []
    return [pruning_callback_class()(os.environ[ENV_MONITOR])]


_CALLBACK_CLASS: type | None = None


def pruning_callback_class() -> type:
    """The Lightning callback class (built on first use: importing this module must not import Lightning)."""
    global _CALLBACK_CLASS
    if _CALLBACK_CLASS is not None:
        return _CALLBACK_CLASS
    from lightning.pytorch.callbacks import Callback

    class OptunaPruning(Callback):
        """Reports ``monitor`` after every validation epoch; on a prune decision stops training (``pruned``)."""

        def __init__(self, monitor: str = "val/acc", reporter: TrialReporter | None = None) -> None:
            self.monitor = monitor
            self.reporter = reporter
            self.pruned = False
            self.pruned_epoch: int | None = None

        def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
            if trainer.sanity_checking or self.pruned:
                return
            prune, value = False, None
            if trainer.is_global_zero:
                value = trainer.callback_metrics.get(self.monitor)
                if value is not None:
                    if self.reporter is None:
                        self.reporter = TrialReporter()
                    prune = self.reporter.report(float(value), trainer.current_epoch)
            prune = bool(trainer.strategy.broadcast(prune, src=0))
            if prune:
                self.pruned = True
                self.pruned_epoch = trainer.current_epoch
                trainer.should_stop = True
                if trainer.is_global_zero:
                    number = self.reporter.number if self.reporter else "?"
                    print(
                        f"optuna: trial {number} pruned after epoch {trainer.current_epoch + 1} "
                        f"({self.monitor} {float(value):.4f})",
                        file=sys.stdout,
                        flush=True,
                    )

    _CALLBACK_CLASS = OptunaPruning
    return OptunaPruning


def is_interruption(err: BaseException) -> bool:
    """Whether a run ended because it was stopped from outside (Ctrl-C; SIGTERM from its dead or stopped sweep
    process, PR_SET_PDEATHSIG, or from a scheduler), not by a fault of its own: its metrics.json then says
    ``interrupted`` and the sweeper runs its parameters again instead of recording a failure.

    Lightning turns SIGTERM into ``SIGTERMException`` and handles Ctrl-C itself with ``sys.exit(1)``, raised
    while handling the KeyboardInterrupt, so the exception's context chain is searched too."""
    seen: BaseException | None = err
    for _ in range(10):  # a short chain; never loop on a cyclic one
        if seen is None:
            return False
        # by name: importing this module must not import Lightning
        if isinstance(seen, KeyboardInterrupt) or type(seen).__name__ == "SIGTERMException":
            return True
        seen = seen.__context__
    return False
