"""The study in Optuna storage: opening it, counting the budget, and recovering trials of dead sweep processes.

Storage specs: a database URL (``sqlite:///path.db``, ``postgresql://user@host/db``, ``mysql://...``) or a
journal file (``journal:/abs/path/journal.log``, or a plain path ending in ``.log``/``.journal``). Several sweep
processes (machines) pointed at the same storage and study name share one study and one ``n_trials`` budget.

Every trial launched by a sweep process carries user attrs: ``owner`` (``host:pid:start``, the sweep process),
``job_dir``, ``slot``, ``overrides``; a finished one also ``error``/``fail_reason`` when it failed. A RUNNING
trial whose owner is gone (same host: the pid is dead; another host: no heartbeat for ``stale_after`` s) is
stale: it is marked FAIL (``fail_reason: stale``) and its parameters are enqueued again, at most
``max_retries`` times.

Interruptions (a dead or stopped sweep process) and rejected duplicates never count toward ``n_trials``: after
any kill and resume a study ends with exactly ``n_trials`` evaluated trials. A seeded sampler is reseeded from
(seed, trials already in the study) on resume (:func:`resume_seed`), and :class:`Dedupe` keeps a sweep from
evaluating a parameter set the study already has.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import optuna

log = logging.getLogger("cifarlab.sweeper")

# user attrs (on trials) and study user attrs written by the sweeper
OWNER = "owner"
JOB_DIR = "job_dir"
SLOT = "slot"
OVERRIDES = "overrides"
ERROR = "error"
FAIL_REASON = "fail_reason"
RETRIED = "retried"  # this FAIL was an infrastructure failure whose parameters were enqueued again
RETRY_OF = "retry_of"  # this trial re-runs the parameters of that trial number
RETRIES = "retries"
DUPLICATE_OF = "duplicate_of"  # this FAIL was sampled with the parameters of that trial number: not run
METRICS = "metrics"
WORKER_PREFIX = "worker:"  # study user attr per sweep process: {"heartbeat": t, "started": t, "slots": n}

# fail reasons that are not the trial's fault: such trials never count toward n_trials (each needs a sweep
# process to die or be stopped, or a new sample, so not counting them cannot loop)
INFRA_REASONS = ("stale", "interrupted", "surplus", "duplicate")
ORPHAN_AFTER = 60.0  # seconds an owner-less RUNNING trial may wait for its tag while other sweeps are alive


class StorageError(RuntimeError):
    pass


def storage_spec(storage: str | None, sweep_dir: str | Path, cwd: str | Path = ".") -> str:
    """The normalised storage spec: a database URL, or ``journal:<absolute path>``.

    None → ``<sweep_dir>/journal.log`` (stable across re-runs when the sweep dir is: see the search configs).
    """
    if storage is None or str(storage).strip() == "":
        return "journal:" + str((Path(cwd) / sweep_dir / "journal.log").resolve())
    text = str(storage).strip()
    if text.startswith("journal:"):
        path = text[len("journal:") :]
        if path.startswith("//"):
            path = path[2:]
        return "journal:" + str((Path(cwd) / path).resolve())
    if "://" in text:
        if text.startswith("sqlite:///") and not text.startswith("sqlite:////"):
            rel = text[len("sqlite:///") :]
            if rel and rel != ":memory:":
                return "sqlite:///" + str((Path(cwd) / rel).resolve())
        return text
    return "journal:" + str((Path(cwd) / text).resolve())


def redact(spec: str) -> str:
    """The spec with any password hidden, for logs and result files."""
    if "://" in spec and "@" in spec:
        scheme, rest = spec.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        if ":" in creds:
            creds = creds.split(":", 1)[0] + ":***"
        return f"{scheme}://{creds}@{host}"
    return spec


def with_driver(url: str) -> str:
    """``postgresql://`` → ``postgresql+psycopg2://`` when only psycopg2 is installed (SQLAlchemy 2.1 defaults to
    psycopg 3; the ``postgres`` extra installs psycopg2-binary)."""
    import importlib.util

    for scheme in ("postgresql://", "postgres://"):
        if url.startswith(scheme):
            if (
                importlib.util.find_spec("psycopg") is None
                and importlib.util.find_spec("psycopg2") is not None
            ):
                return "postgresql+psycopg2://" + url[len(scheme) :]
            return "postgresql://" + url[len(scheme) :]
    return url


def make_storage(spec: str) -> Any:
    """An Optuna storage object from a spec (retrying briefly: processes may create tables concurrently)."""
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    if spec.startswith("journal:"):
        path = Path(spec[len("journal:") :])
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            return JournalStorage(JournalFileBackend(str(path)))
        except OSError as err:
            raise StorageError(f"{_storage_is(path)}: {_cannot(err)}; allowed: {STORAGES}") from err
    engine_kwargs: dict[str, Any]
    if spec.startswith("sqlite"):
        engine_kwargs = {"connect_args": {"timeout": 120}}
        db = spec[len("sqlite:///") :]
        if db and db != ":memory:":
            try:
                Path(db).parent.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise StorageError(f"{_storage_is(spec)}: {_cannot(err)}; allowed: {STORAGES}") from err
    else:
        engine_kwargs = {"pool_pre_ping": True}
    from sqlalchemy.exc import ArgumentError

    last: Exception | None = None
    for attempt in range(8):
        try:
            return optuna.storages.RDBStorage(with_driver(spec), engine_kwargs=engine_kwargs)
        except ImportError as err:
            driver = (
                "psycopg2-binary (pip install 'cifarlab[postgres]')" if "postgres" in spec else "its driver"
            )
            raise StorageError(
                f"{_storage_is(spec)}: cannot import {driver} ({err}); allowed: {STORAGES}"
            ) from err
        except (ArgumentError, ValueError) as err:  # not a URL SQLAlchemy can use (foo://bar, host:notaport)
            raise StorageError(f"{_storage_is(spec)}: {_first_line(err)}; allowed: {STORAGES}") from err
        except Exception as err:  # e.g. two processes creating the tables at once, a database still starting
            last = err
            time.sleep(0.2 * (attempt + 1))
    raise StorageError(
        f"hydra.sweeper.storage={redact(spec)}: cannot connect after 8 tries in ~7 s ({_first_line(last)}); "
        "is the database server running and reachable from this machine?"
    ) from last


STORAGES = (
    "a journal file path (default <sweep dir>/journal.log), sqlite:///<file>, postgresql://user:pw@host/db, "
    "mysql://user:pw@host/db"
)


def _storage_is(spec: str | Path) -> str:
    return f"hydra.sweeper.storage={redact(str(spec))} is not allowed"


def _cannot(err: OSError) -> str:
    return f"cannot create {err.filename} ({err.strerror or err})"


def _first_line(err: BaseException | None) -> str:
    """SQLAlchemy's messages run over several lines (the driver's, then a link to its docs)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def open_study(
    spec: str,
    study_name: str,
    directions: Sequence[str],
    sampler: Any = None,
    pruner: Any = None,
    storage: Any = None,
) -> optuna.Study:
    """Create the study or load the existing one (checking that its directions match)."""
    import optuna

    storage = storage if storage is not None else make_storage(spec)
    last: Exception | None = None
    for attempt in range(5):
        try:
            study = optuna.create_study(
                storage=storage,
                study_name=study_name,
                sampler=sampler,
                pruner=pruner,
                directions=list(directions),
                load_if_exists=True,
            )
            break
        except (
            optuna.exceptions.DuplicatedStudyError,
            KeyError,
        ) as err:  # created by another process meanwhile
            last = err
            time.sleep(0.2 * (attempt + 1))
    else:
        raise StorageError(f"cannot open study {study_name!r} in {redact(spec)}: {last}") from last
    stored = [d.name.lower() for d in study.directions]
    if stored != [d.lower() for d in directions]:
        raise StorageError(
            f"study {study_name!r} in {redact(spec)} has directions {stored}, but the sweep asks for "
            f"{list(directions)}; use another study_name (or storage) for a different objective"
        )
    return study


# ---- budget -------------------------------------------------------------------------------------------


def counts_toward_budget(trial: optuna.trial.FrozenTrial) -> bool:
    """Finished or running trials count; failures that were not the trial's own (interruptions, surplus,
    duplicates: :data:`INFRA_REASONS`) do not, even when their parameters were not queued again."""
    from optuna.trial import TrialState

    if trial.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING):
        return True
    if trial.state == TrialState.FAIL:
        attrs = trial.user_attrs
        return not (attrs.get(RETRIED) or attrs.get(FAIL_REASON) in INFRA_REASONS)
    return False  # WAITING: enqueued, not yet started


def budget_used(trials: Iterable[optuna.trial.FrozenTrial]) -> int:
    return sum(1 for t in trials if counts_toward_budget(t))


def rank_in_budget(trials: Iterable[optuna.trial.FrozenTrial], number: int) -> int:
    """1 + how many counted trials have a smaller number: the trial's place in the n_trials budget."""
    return 1 + sum(1 for t in trials if t.number < number and counts_toward_budget(t))


# ---- owners and stale trials ------------------------------------------------------------------------------


def _proc_stat(pid: int) -> list[str]:
    """Fields of /proc/<pid>/stat after the command name ([] where unavailable)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def _proc_start(pid: int) -> str:
    """The process's start time in clock ticks since boot ("" where /proc is unavailable): tells a reused pid apart."""
    fields = _proc_stat(pid)
    return fields[19] if len(fields) > 19 else ""


@dataclass(frozen=True)
class Owner:
    host: str
    pid: int
    start: str

    @classmethod
    def me(cls) -> Owner:
        return cls(socket.gethostname(), os.getpid(), _proc_start(os.getpid()))

    @classmethod
    def parse(cls, text: str) -> Owner | None:
        try:
            host, pid, start = str(text).rsplit(":", 2)
            return cls(host, int(pid), start)
        except ValueError:
            return None

    def __str__(self) -> str:
        return f"{self.host}:{self.pid}:{self.start}"

    def alive_here(self) -> bool:
        """Same host only: is the process still running (and not a reused pid)?"""
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        fields = _proc_stat(self.pid)
        if fields and fields[0] in ("Z", "X"):  # a zombie: dead, not yet reaped by its parent
            return False
        return not self.start or _proc_start(self.pid) in ("", self.start)


def heartbeat(study: optuna.Study, me: Owner, slots: int, started: float) -> None:
    study.set_user_attr(
        WORKER_PREFIX + str(me), {"heartbeat": time.time(), "started": started, "slots": slots}
    )


def live_workers(study: optuna.Study, stale_after: float, now: float | None = None) -> list[str]:
    """Sweep processes of the study that look alive: a recent heartbeat (and, on this host, a live pid)."""
    return _live(study.user_attrs, stale_after, time.time() if now is None else now)


def _live(attrs: dict[str, Any], stale_after: float, now: float) -> list[str]:
    host = socket.gethostname()
    out = []
    for key, rec in attrs.items():
        if not key.startswith(WORKER_PREFIX) or not isinstance(rec, dict):
            continue
        if now - rec.get("heartbeat", 0) >= stale_after:
            continue
        owner = Owner.parse(key[len(WORKER_PREFIX) :])
        if owner is not None and owner.host == host and not owner.alive_here():
            continue
        out.append(key[len(WORKER_PREFIX) :])
    return out


def is_stale(
    trial: optuna.trial.FrozenTrial, me: Owner, workers: dict[str, Any], stale_after: float, now: float
) -> bool:
    """A RUNNING trial launched by a sweep process that is gone (never one of ours).

    A trial without an owner was asked for by a sweep process that was killed before it could tag it (a live
    one tags it within milliseconds of asking, and registers its heartbeat before it asks at all): stale at once
    when no other sweep process of the study is alive, else once it is ``ORPHAN_AFTER`` seconds old."""
    owner = Owner.parse(trial.user_attrs.get(OWNER, ""))
    if owner is None:
        others = [w for w in _live(workers, stale_after, now) if w != str(me)]
        started = trial.datetime_start.timestamp() if trial.datetime_start else now
        return not others or now - started > ORPHAN_AFTER
    if owner == me:
        return False
    if owner.host == me.host:
        return not owner.alive_here()
    rec = workers.get(WORKER_PREFIX + str(owner))
    last = rec.get("heartbeat", 0) if isinstance(rec, dict) else 0
    if not last:  # no heartbeat recorded: judge by the trial's start
        last = trial.datetime_start.timestamp() if trial.datetime_start else 0
    return now - last > stale_after


def fail_trial(
    study: optuna.Study,
    trial: optuna.trial.FrozenTrial | int,
    reason: str,
    error: str,
    retry: bool = False,
    max_retries: int = 3,
    extra: dict[str, Any] | None = None,
) -> int | None:
    """Mark a RUNNING trial FAIL with its error; with ``retry``, enqueue its parameters again (once: whoever
    wins the race to tell). Returns the number told, or None when another process finished it first."""
    import optuna
    from optuna.trial import TrialState

    frozen = (
        trial
        if isinstance(trial, optuna.trial.FrozenTrial)
        else study._storage.get_trial(
            study._storage.get_trial_id_from_study_id_trial_number(study._study_id, trial)
        )
    )
    if frozen.state != TrialState.RUNNING:
        return None
    retries = int(frozen.user_attrs.get(RETRIES, 0))
    will_retry = retry and retries < max_retries and bool(frozen.params)
    attrs = {ERROR: error[-2000:], FAIL_REASON: reason, RETRIED: will_retry, **(extra or {})}
    try:
        for key, value in attrs.items():
            study._storage.set_trial_user_attr(frozen._trial_id, key, value)
        study.tell(frozen.number, state=TrialState.FAIL)
    except (RuntimeError, ValueError):  # finished by another process meanwhile
        return None
    if will_retry:
        study.enqueue_trial(dict(frozen.params), user_attrs={RETRY_OF: frozen.number, RETRIES: retries + 1})
    return frozen.number


def recover_stale(
    study: optuna.Study, me: Owner, stale_after: float, max_retries: int, finished: Any = None
) -> list[int]:
    """Fail (and re-enqueue) the RUNNING trials of sweep processes that are gone. Returns their numbers.

    ``finished(study, trial) -> bool`` may first record a trial that completed after all (its folder says so)."""
    from optuna.trial import TrialState

    now = time.time()
    workers = dict(study.user_attrs)
    recovered = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if is_stale(t, me, workers, stale_after, now):
            if finished is not None and finished(study, t):
                recovered.append(t.number)
                continue
            owner = t.user_attrs.get(OWNER, "?")
            number = fail_trial(
                study, t, "stale", f"its sweep process {owner} is gone", retry=True, max_retries=max_retries
            )
            if number is not None:
                recovered.append(number)
    return recovered


# ---- seeds and duplicates ------------------------------------------------------------------------------------


def resume_seed(seed: int, n_existing: int) -> int:
    """The sampler seed of a sweep process that finds ``n_existing`` trials in its study.

    A new study keeps ``seed`` (the same command from scratch samples the same parameters); a resumed or extended
    one gets a seed derived from (seed, n_existing), so that the new process does not replay the sequence the
    first one has already evaluated. numpy's SeedSequence mixes the pair into independent, well-spread seeds."""
    if n_existing <= 0:
        return int(seed)
    import numpy as np

    return int(np.random.SeedSequence([int(seed) % 2**32, int(n_existing)]).generate_state(1)[0]) % 2**31


def space_size(space: Any) -> int | None:
    """How many distinct parameter sets a search space has (None: continuous, conditional or unknown)."""
    if space is None:
        return None
    from cifarlab.sweeper.space import SearchSpaceError

    try:
        grid = space.grid()
    except SearchSpaceError:
        return None
    return math.prod(len(values) for values in grid.values()) if grid else None


class Dedupe:
    """Keeps a sweep from evaluating a parameter set its study already has.

    Samplers do propose repeats: a small categorical space, TPE's best guess again, a seed replayed. Before a
    trial is launched, :meth:`reject` compares its parameters with every trial that counts toward n_trials
    (COMPLETE, PRUNED, RUNNING, own failures; interrupted ones are meant to be re-run). A repeat is told FAIL
    (``fail_reason: duplicate``, ``duplicate_of: <number>``), does not count toward n_trials, and is not run; the
    next samples come from a RandomSampler seeded from (seed, trial number) until a new set turns up, because a
    model-based sampler (TPE) does not learn from a FAIL and would propose its best guess again.

    :meth:`exhausted` tells the sweep to stop launching: when every point of a finite space is in the study, or
    after ``max_streak`` repeats in a row (a space too small to say how small: at one new point in 12, 100
    random draws all miss with probability 2e-4).
    """

    def __init__(self, space: Any, say: Any, seed: int | None = None, max_streak: int = 100) -> None:
        self.size = space_size(space)  # pass space=None when custom_search_space adds parameters
        self.say = say
        self.seed = seed
        self.max_streak = max_streak
        self.streak = 0
        self._saved_sampler: Any = None
        self._stopped = False

    def exhausted(self, study: optuna.Study) -> bool:
        """True (and said once) when no new parameter set can be expected."""
        if self._stopped:
            return True
        distinct = _distinct_sets(study.get_trials(deepcopy=False)) if self.size or self.streak else 0
        if self.size is not None and distinct >= self.size:
            self.say(
                f"search space exhausted: all {self.size} parameter sets of the space are in the study; "
                "no more trials are started (n_trials cannot be reached)"
            )
        elif self.streak >= self.max_streak:
            self.say(
                f"search space exhausted: {self.streak} samples in a row repeated parameter sets the study "
                f"already has ({distinct} distinct sets); no more trials are started"
            )
        else:
            return False
        self._stopped = True
        self._restore(study)
        return True

    def reject(self, study: optuna.Study, trial: optuna.trial.Trial) -> bool:
        """True when ``trial`` (asked, parameters sampled, not launched) repeats a parameter set of the study:
        it is then told FAIL (``duplicate``) and the next ask samples at random."""
        params = dict(trial.params)
        if not params:  # nothing is searched: the one configuration is simply run n_trials times
            return False
        same = next(
            (
                t.number
                for t in study.get_trials(deepcopy=False)
                if t.number != trial.number and counts_toward_budget(t) and t.params == params
            ),
            None,
        )
        if same is None:
            self.streak = 0
            self._restore(study)
            return False
        fail_trial(
            study,
            trial.number,
            "duplicate",
            f"the same parameters as trial {same}; not run, sampled again",
            extra={DUPLICATE_OF: same},
        )
        self.streak += 1
        self.say(f"trial {trial.number:>3} repeats the parameters of trial {same}: not run, sampling again")
        if self._saved_sampler is None:
            import optuna

            seed = None if self.seed is None else resume_seed(self.seed, trial.number + 1)
            self._saved_sampler = study.sampler
            study.sampler = optuna.samplers.RandomSampler(seed=seed)
        return True

    def _restore(self, study: optuna.Study) -> None:
        if self._saved_sampler is not None:
            study.sampler = self._saved_sampler
            self._saved_sampler = None


def _distinct_sets(trials: Iterable[optuna.trial.FrozenTrial]) -> int:
    # parameter values are None, bool, int, float or str (Optuna's rule for choices): hashable
    return len({tuple(sorted(t.params.items())) for t in trials if counts_toward_budget(t)})
