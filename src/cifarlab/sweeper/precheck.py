"""Before the first trial: every kind of value the search space can give composes, and passes the task's checks.

Without this, ``optimizer=choice(sgd,adamm)`` or ``model.dropout=interval(0.0,1.5)`` is found by the trials that
draw the bad value: each one FAILs, a good trial running beside them is stopped at ``max_failure_rate``, and the
sweep ends with "too many failed trials". Here the sweep stops before any trial, with one line naming the
parameter, the value and what is allowed.

The probes: every choice of every categorical parameter and both ends of every interval/range; every conditional
parameter likewise, with its ``when`` keys set to values that make it active (see :func:`probes`). Each probe is
composed the way Hydra composes a trial (``load_sweep_config``: the stock BasicSweeper's own check) and, for
cifarlab's own ``train.py``, checked by :func:`cifarlab.config.validate`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from cifarlab.sweeper.space import SearchSpace, SearchSpaceError, normalise, value_text


def probes(space: SearchSpace) -> Iterator[tuple[str, dict[str, str]]]:
    """(what is probed, every probed parameter's override text) for each probe.

    Probes go in rounds: round k gives every parameter its k-th value (cycling through the shorter lists), so
    every value is composed once in as many compositions as the longest list has values (6 instead of 23 for
    cifar10_optuna's parameters: a composition costs ~0.12 s on 2 AMD EPYC cores). Any round is a parameter set a
    trial could draw. Conditional parameters that need the same ``when`` values share rounds the same way."""
    values = {name: _ends(space, name, dist) for name, dist in space.params.items()}
    first = {name: texts[0] for name, texts in values.items() if texts}
    yield from _rounds(values, {})
    groups: dict[tuple[tuple[str, str], ...], dict[str, list[str]]] = {}
    for cond in space.conditional:
        active: dict[str, str] = {}
        for key, allowed in cond.when.items():
            if key in space.fixed or key in space.context:
                if normalise(space.fixed.get(key, space.context.get(key))) not in allowed:
                    break  # never active with this command line: nothing to check
            elif key in values or any(c.name == key for c in space.conditional):
                active[key] = allowed[0]
            else:
                break  # a config key the search does not set: its value decides at run time
        else:
            group = groups.setdefault(tuple(sorted(active.items())), {})
            group[cond.name] = _ends(space, cond.name, cond.distribution)
    for when, conditional in groups.items():
        yield from _rounds(conditional, {**first, **dict(when)})


def _rounds(values: dict[str, list[str]], base: dict[str, str]) -> Iterator[tuple[str, dict[str, str]]]:
    for k in range(max((len(texts) for texts in values.values()), default=0)):
        probed = {name: texts[k % len(texts)] for name, texts in values.items()}
        yield ", ".join(f"{name}={text}" for name, text in probed.items()), {**base, **probed}


def check_space(
    space: SearchSpace,
    base_overrides: list[str],
    compose: Callable[[list[str]], Any],
    check: Callable[[Any], None] | None,
    one_line: Callable[[BaseException, list[str]], str],
) -> None:
    """Compose (and ``check``) every probe; raise SearchSpaceError with one line at the first that fails.

    ``compose(overrides)`` returns the task config as a trial would see it; ``one_line`` words a composition
    error the way the command line does (cifarlab.cli.one_line)."""
    from cifarlab.config import ConfigError

    fixed = {o.lstrip("+~").partition("=")[0] for o in base_overrides} | set(space.fixed_conditional)
    for what, params in probes(space):
        overrides = [*base_overrides, *(f"{k}={v}" for k, v in params.items())]
        overrides += space.fixed_conditional_overrides(params)  # as SearchSpace.overrides passes them
        try:
            cfg = compose(overrides)
            if check is not None:
                check(cfg)
        except Exception as err:  # noqa: BLE001 - Hydra's composition errors, worded as on the command line
            message = str(err) if isinstance(err, ConfigError) else one_line(err, overrides)
            named = any(message.startswith(f"{k}=") for k in params) or message.startswith(what)
            # trainer.max_epochs=0 on the command line is the command line's mistake, not the search space's
            given = any(message.startswith(f"{k}=") for k in fixed)
            where = "" if given else "search space: " if named else f"search space, with {what}: "
            raise SearchSpaceError(where + message) from None


def _ends(space: SearchSpace, name: str, dist: Any) -> list[str]:
    """The override texts of a distribution's values worth probing: each choice, or the two ends."""
    from optuna.distributions import CategoricalDistribution

    if isinstance(dist, CategoricalDistribution):
        return [space.format(name, choice) for choice in dist.choices]
    return [value_text(dist.low), value_text(dist.high)]
