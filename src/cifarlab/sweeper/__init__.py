"""cifarlab's Optuna sweeper: asynchronous, pruning, resumable hyperparameter search through Hydra.

``python train.py -m hparams_search=cifar10_optuna`` runs :func:`cifarlab.sweeper.runner.run_sweep` through the
Hydra plugin in ``hydra_plugins/cifarlab_sweeper``. The pieces:

- :mod:`~cifarlab.sweeper.space`: Hydra override syntax (``interval``, ``tag(log, ...)``, ``choice``, ``range``)
  and conditional parameters → Optuna distributions and trial overrides.
- :mod:`~cifarlab.sweeper.slots`: device slots (one or more per GPU, or CPU slots with a thread budget).
- :mod:`~cifarlab.sweeper.study`: Optuna storage (journal file, SQLite, PostgreSQL), budget counting,
  stale-trial recovery.
- :mod:`~cifarlab.sweeper.settings`: ``hydra.sweeper.*`` and the composed config → :class:`SweepSettings`.
- :mod:`~cifarlab.sweeper.runner`: the asynchronous ask/launch/tell loop (orchestration only).
- :mod:`~cifarlab.sweeper.launch_fork`: warm trials, forked from a server that preloaded the task's libraries
  (:mod:`~cifarlab.sweeper.preload` runs in that server); :mod:`~cifarlab.sweeper.launch_subprocess`: trials
  as fresh processes (``task_command``, launcher workers).
- :mod:`~cifarlab.sweeper.outcome`: what a finished trial left (metrics.json, its return value, its log).
- :mod:`~cifarlab.sweeper.results`: ``optimization_results.yaml``, ``trials.csv``, plots, progress lines.
- :mod:`~cifarlab.sweeper.trial`: inside a trial process, reports ``val/acc`` to Optuna and stops a pruned run.
- :mod:`~cifarlab.sweeper.bench`: warm against cold trial start; the asynchronous loop against batch-synchronous
  trials.

Importing this package is cheap (no optuna, no torch): Hydra imports the plugin in every run.
"""

# Environment of a trial process started by the sweeper (read by cifarlab.sweeper.trial).
ENV_STORAGE = "CIFARLAB_OPTUNA_STORAGE"  # storage spec: a database URL or journal:<path>
ENV_STUDY = "CIFARLAB_OPTUNA_STUDY"  # study name
ENV_TRIAL = "CIFARLAB_OPTUNA_TRIAL"  # the trial's storage id
ENV_TRIAL_NUMBER = "CIFARLAB_OPTUNA_TRIAL_NUMBER"  # the trial's number in the study (for messages)
ENV_MONITOR = "CIFARLAB_OPTUNA_MONITOR"  # the metric reported every validation (unset: report nothing)
ENV_PRUNER = "CIFARLAB_OPTUNA_PRUNER"  # the pruner's config as JSON ({"_target_": ..., kwargs})
