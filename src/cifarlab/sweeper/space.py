"""Search spaces: Hydra's override syntax → Optuna distributions, conditional parameters → trial overrides.

The ``params`` of the sweeper config use the stock Optuna sweeper's syntax, parsed by Hydra's own override
parser::

    optimizer: choice(sgd, momentum, adam)        # categorical (also a config group: optimizer=adam)
    optimizer.lr: tag(log, interval(1e-4, 1e-1))   # float on a log scale
    model.dropout: interval(0.0, 0.6)              # uniform float
    trainer.max_epochs: interval(5, 20)            # integer bounds (or tag(int, ...)) → uniform int
    data.batch_size: range(32, 256, 32)            # int grid 32, 64, ..., 256 (stop included, as in the stock plugin)
    model.init: kaiming_uniform                    # a plain value: passed to every trial, not searched

``conditional`` adds parameters that are searched only when other parameters have given values::

    conditional:
      optimizer.momentum:
        when: {optimizer: [momentum, nesterov]}    # every key must match one of its values
        space: interval(0.5, 0.99)
      optimizer.betas:
        when: {optimizer: [adam, adamw]}
        space: choice([0.9,0.999], [0.8,0.99])

A ``when`` key may name a searched parameter, a fixed one, another conditional one (evaluated first), or any
config key / group not searched at all (then its value in the composed config counts).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # optuna is imported lazily: Hydra imports the plugin on every run
    import optuna
    from optuna.distributions import BaseDistribution


_INT_INTERVAL = re.compile(r"interval\(\s*[-+]?\d+\s*,\s*[-+]?\d+\s*\)")


class SearchSpaceError(ValueError):
    """A search-space setting cannot be understood; the message names it."""


@dataclass
class Conditional:
    name: str
    distribution: BaseDistribution
    when: dict[str, list[str]]  # key → allowed values, in normalised text form
    texts: dict[Any, str] = field(default_factory=dict)  # for a choice: {choice: override text}

    def active(self, values: Mapping[str, Any]) -> bool:
        return all(key in values and normalise(values[key]) in allowed for key, allowed in self.when.items())


@dataclass
class SearchSpace:
    params: dict[str, BaseDistribution] = field(default_factory=dict)  # sampled jointly for every trial
    conditional: list[Conditional] = field(default_factory=list)  # in dependency order
    fixed: dict[str, str] = field(default_factory=dict)  # name → override text, passed to every trial
    choice_texts: dict[str, dict[Any, str]] = field(default_factory=dict)  # name → {choice: override text}
    # a conditional parameter fixed on the command line: name → (its condition, override text)
    fixed_conditional: dict[str, tuple[Conditional, str]] = field(default_factory=dict)
    context: dict[str, Any] = field(
        default_factory=dict
    )  # values of `when` keys not searched (from the config)

    # ---- sampling -------------------------------------------------------------------------------------

    def suggest_conditional(self, trial: optuna.trial.Trial) -> dict[str, Any]:
        """Suggest the conditional parameters whose conditions hold; return every parameter of the trial."""
        values: dict[str, Any] = dict(self.context)
        values.update(self.fixed)
        values.update(trial.params)
        for cond in self.conditional:
            if cond.active(values):
                values[cond.name] = suggest(trial, cond.name, cond.distribution)
        return dict(trial.params)

    def overrides(self, params: Mapping[str, Any]) -> list[str]:
        """The command-line overrides of a trial: its sampled parameters, then the fixed ones."""
        out = [f"{name}={self.format(name, value)}" for name, value in params.items()]
        out += [f"{name}={text}" for name, text in self.fixed.items() if name not in params]
        return out + self.fixed_conditional_overrides(params)

    def fixed_conditional_overrides(self, params: Mapping[str, Any]) -> list[str]:
        """The conditional parameters fixed on the command line whose condition holds for ``params``."""
        values = {**self.context, **self.fixed, **params}
        return [
            f"{name}={text}" for name, (cond, text) in self.fixed_conditional.items() if cond.active(values)
        ]

    def format(self, name: str, value: Any) -> str:
        texts = self.choice_texts.get(name) or next((c.texts for c in self.conditional if c.name == name), {})
        if isinstance(value, (str, int, float, bool)) or value is None:
            try:
                if value in texts:
                    return texts[value]
            except TypeError:
                pass
        return value_text(value)

    # ---- grid sampler -----------------------------------------------------------------------------------

    def grid(self) -> dict[str, list[Any]]:
        """The values of every parameter, for optuna's GridSampler (choice/range only, no conditionals)."""
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        if self.conditional:
            raise SearchSpaceError("the grid sampler cannot search conditional parameters; use tpe or random")
        grid: dict[str, list[Any]] = {}
        for name, dist in self.params.items():
            if isinstance(dist, CategoricalDistribution):
                grid[name] = list(dist.choices)
            elif isinstance(dist, IntDistribution) and not dist.log:
                grid[name] = list(range(dist.low, dist.high + 1, dist.step))
            elif isinstance(dist, FloatDistribution) and dist.step is not None:
                n = int(round((dist.high - dist.low) / dist.step))
                grid[name] = [round(dist.low + i * dist.step, 12) for i in range(n + 1)]
            else:
                raise SearchSpaceError(
                    f"{name}: the grid sampler needs choice(...) or range(...) values, not a continuous interval"
                )
        return grid

    def names(self) -> list[str]:
        return list(self.params) + [c.name for c in self.conditional]

    def distributions(self) -> dict[str, BaseDistribution]:
        """Every searched parameter's distribution, the conditional ones included."""
        return {**self.params, **{c.name: c.distribution for c in self.conditional}}

    def choice_values(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """``{optimizer.betas: [0.8, 0.99]}`` → ``{optimizer.betas: "[0.8,0.99]"}``: a list given for a choice
        parameter as the text Optuna stores for that choice (see :func:`_choice`)."""
        from optuna.distributions import CategoricalDistribution

        dists = self.distributions()
        out = dict(values)
        for name, value in values.items():
            dist = dists.get(name)
            if isinstance(dist, CategoricalDistribution) and isinstance(value, (list, tuple)):
                wanted = normalise(value)
                out[name] = next(
                    (c for c in dist.choices if isinstance(c, str) and normalise(c) == wanted), value
                )
        return out

    def check_values(self, values: Mapping[str, Any], where: str) -> list[str]:
        """Raise SearchSpaceError for a value Optuna cannot store for its parameter (a choice it does not have, a
        number that is not one); return a warning for each number outside its interval, which Optuna evaluates as
        given (a known-good set from an earlier, wider study)."""
        from optuna.distributions import CategoricalDistribution

        dists = self.distributions()
        warnings = []
        for name, value in values.items():
            dist = dists.get(name)
            if dist is None:
                continue  # not searched: the caller warns
            try:
                inside = dist._contains(dist.to_internal_repr(value))
                storable = True
            except (ValueError, TypeError):
                inside = storable = False
            if isinstance(dist, CategoricalDistribution):
                allowed = ", ".join(value_text(c) for c in dist.choices)
            else:
                allowed = f"{value_text(dist.low)} <= {name} <= {value_text(dist.high)}"
            if not storable or (isinstance(dist, CategoricalDistribution) and not inside):
                raise SearchSpaceError(
                    f"{where}: {name}={value_text(value)} is not allowed; allowed: {allowed}"
                )
            if not inside:
                warnings.append(
                    f"{where}: {name}={value_text(value)} is outside {allowed}; evaluated as given"
                )
        return warnings


# ---- parsing ----------------------------------------------------------------------------------------------


def build_space(
    params: Mapping[str, Any] | None,
    arguments: Sequence[str] = (),
    conditional: Mapping[str, Any] | None = None,
    context: Mapping[str, Any] | None = None,
) -> tuple[SearchSpace, list[str]]:
    """Parse the sweeper's ``params`` and ``conditional`` settings and the command line's overrides.

    Returns the search space and the command-line overrides to pass unchanged to every trial (the ones that
    are not sweeps: ``hparams_search=...``, ``trainer.max_epochs=3``, ...). A plain value on the command line
    for a searched key fixes it (as in the stock plugin).
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    space = SearchSpace()
    for name, value in (params or {}).items():
        _add(space, _parse(parser, f"{name}={_config_text(value)}", f"params.{name}"))

    passthrough: list[str] = []
    pinned: dict[str, str] = {}  # plain command-line values: they fix a key, and `when` clauses see them
    for line in arguments:
        override = _parse(parser, line, "command line")
        if override.is_sweep_override():
            _add(space, override)
        else:
            key = override.get_key_element()
            spec = (conditional or {}).get(key)
            if spec is not None and not override.is_delete():  # a fixed conditional: only where `when` holds
                space.fixed_conditional[key] = (
                    _conditional(parser, key, spec),
                    override.get_value_element_as_str(),
                )
            else:
                passthrough.append(line)
            space.params.pop(key, None)
            space.fixed.pop(key, None)
            space.choice_texts.pop(key, None)
            if not override.is_delete():
                pinned[key] = override.get_value_element_as_str()

    for name, spec in (conditional or {}).items():
        if str(name) not in pinned:  # a conditional parameter fixed on the command line is not searched
            space.conditional.append(_conditional(parser, str(name), spec))
    space.conditional = _ordered(space.conditional, set(space.params) | set(space.fixed))
    space.context = {k: v for k, v in (context or {}).items() if v is not None}
    space.context.update(pinned)
    return space, passthrough


def when_keys(conditional: Mapping[str, Any] | None) -> list[str]:
    """The keys the ``when`` clauses look at (so that the caller can look up their config values)."""
    keys: list[str] = []
    for spec in (conditional or {}).values():
        if isinstance(spec, Mapping):
            keys += [str(k) for k in (spec.get("when") or {}) if str(k) not in keys]
    return keys


def _parse(parser: Any, line: str, where: str) -> Any:
    try:
        return parser.parse_overrides([line])[0]
    except Exception as err:  # hydra's OverrideParseException and friends
        raise SearchSpaceError(f"{where}: cannot parse {line!r}: {err}") from None


def _config_text(value: Any) -> str:
    """A params value from YAML back to override text (strings are already override syntax)."""
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_config_text(v) for v in value) + "]"
    return value_text(value)


def _add(space: SearchSpace, override: Any) -> None:
    name = override.get_key_element()
    dist, texts = distribution(override)
    space.params.pop(name, None)
    space.fixed.pop(name, None)
    space.choice_texts.pop(name, None)
    if dist is None:
        space.fixed[name] = override.get_value_element_as_str()
    else:
        space.params[name] = dist
        if texts:
            space.choice_texts[name] = texts


def distribution(override: Any) -> tuple[BaseDistribution | None, dict[Any, str]]:
    """An Optuna distribution from a parsed sweep override (None for a plain value), and, for a choice,
    the override text of each choice."""
    from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if not override.is_sweep_override():
        return None, {}
    value = override.value()
    name = override.get_key_element()
    if isinstance(value, ChoiceSweep) or (isinstance(value, RangeSweep) and value.shuffle):
        choices, texts = [], {}
        for item in override.sweep_iterator():
            choice, text = _choice(item)
            if choice in texts:
                continue
            choices.append(choice)
            texts[choice] = text
        if not choices:
            raise SearchSpaceError(f"{name}: choice() needs at least one value")
        return CategoricalDistribution(choices), texts
    if isinstance(value, RangeSweep):
        start, stop, step = value.start, value.stop, value.step
        if step is None or step <= 0 or stop <= start:
            raise SearchSpaceError(f"{name}: range(start, stop, step) needs start < stop and step > 0")
        if all(isinstance(v, int) and not isinstance(v, bool) for v in (start, stop, step)):
            high = start + (stop - start) // step * step
            return IntDistribution(int(start), int(high), step=int(step)), {}
        n = math.floor((stop - start) / step + 1e-9)
        return FloatDistribution(float(start), float(start + n * step), step=float(step)), {}
    if isinstance(value, IntervalSweep):
        start, end = value.start, value.end
        if start is None or end is None or not start < end:
            raise SearchSpaceError(f"{name}: interval(low, high) needs low < high")
        log = "log" in value.tags
        if log and start <= 0:
            raise SearchSpaceError(f"{name}: tag(log, interval(low, high)) needs low > 0")
        # Hydra reads interval bounds as floats; integer literals (or tag(int, ...)) mean an int parameter
        if "int" in value.tags or _INT_INTERVAL.search(override.input_line or ""):
            if not (float(start).is_integer() and float(end).is_integer()):
                raise SearchSpaceError(f"{name}: tag(int, interval(low, high)) needs integer bounds")
            return IntDistribution(int(start), int(end), log=log), {}
        return FloatDistribution(float(start), float(end), log=log), {}
    raise SearchSpaceError(f"{name}: {override.input_line!r} is not a choice, range or interval")


def _choice(item: Any) -> tuple[Any, str]:
    """(value stored by Optuna, override text). Lists and dicts are stored as their override text."""
    if item is None or isinstance(item, (bool, int, float)):
        return item, value_text(item)
    if isinstance(item, str):
        return item, value_text(item)
    from hydra.core.override_parser.types import Transformer

    text = Transformer.str(item)
    return text, text


def _conditional(parser: Any, name: str, spec: Any) -> Conditional:
    where = f"conditional.{name}"
    if not isinstance(spec, Mapping) or "space" not in spec or "when" not in spec:
        raise SearchSpaceError(f"{where}: expected a mapping with 'when' and 'space' (see docs/sweeper.md)")
    unknown = set(spec) - {"when", "space"}
    if unknown:
        raise SearchSpaceError(f"{where}: unknown keys {sorted(unknown)}; allowed: when, space")
    override = _parse(parser, f"{name}={_config_text(spec['space'])}", where)
    dist, texts = distribution(override)
    if dist is None:
        raise SearchSpaceError(
            f"{where}.space: {spec['space']!r} is a plain value; use choice/interval/range"
        )
    when = spec["when"]
    if not isinstance(when, Mapping) or not when:
        raise SearchSpaceError(f"{where}.when: expected a mapping {{key: value or [values]}}")
    allowed = {
        str(k): [normalise(v) for v in (vals if isinstance(vals, (list, tuple)) else [vals])]
        for k, vals in when.items()
    }
    return Conditional(name, dist, allowed, texts)


def _ordered(conds: list[Conditional], known: set[str]) -> list[Conditional]:
    """Order conditionals so that each comes after the conditionals its ``when`` looks at."""
    names = {c.name for c in conds}
    for c in conds:
        if c.name in known:
            raise SearchSpaceError(f"conditional.{c.name}: also in params; keep it in one place")
    out: list[Conditional] = []
    done: set[str] = set()
    pending = list(conds)
    while pending:
        ready = [c for c in pending if all(k not in names or k in done for k in c.when)]
        if not ready:
            raise SearchSpaceError(
                f"conditional parameters depend on each other in a cycle: {[c.name for c in pending]}"
            )
        for c in ready:
            out.append(c)
            done.add(c.name)
            pending.remove(c)
    return out


# ---- values ---------------------------------------------------------------------------------------------


def normalise(value: Any) -> str:
    """A comparable text form: true/false/null, numbers without trailing noise, strings as they are."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(normalise(v) for v in value) + "]"
    text = str(value).strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        text = text[1:-1]
    return {"True": "true", "False": "false", "None": "null"}.get(text, text)


def value_text(value: Any) -> str:
    """Override text for a primitive value; strings are quoted only when Hydra would read them otherwise."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        text = f"{value:.12g}"  # drops the 1e-17 noise of step grids (0.30000000000000004 → 0.3)
        return text if any(c in text for c in ".en") else text + ".0"
    text = str(value)
    if _reads_back(text):
        return text
    escaped = text.replace("\\", "\\\\").replace("'", "\\'")
    return f"'{escaped}'"


def _reads_back(text: str) -> bool:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if not text or text != text.strip():
        return False
    try:
        parsed = OverridesParser.create().parse_overrides([f"k={text}"])[0]
    except Exception:
        return False
    return not parsed.is_sweep_override() and parsed.value() == text and isinstance(parsed.value(), str)


def suggest(trial: optuna.trial.Trial, name: str, dist: BaseDistribution) -> Any:
    """Suggest through the public API (so that enqueued/fixed values and samplers behave as documented)."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if isinstance(dist, FloatDistribution):
        return trial.suggest_float(name, dist.low, dist.high, step=dist.step, log=dist.log)
    if isinstance(dist, IntDistribution):
        return trial.suggest_int(name, dist.low, dist.high, step=dist.step, log=dist.log)
    if isinstance(dist, CategoricalDistribution):
        return trial.suggest_categorical(name, dist.choices)
    raise SearchSpaceError(f"{name}: unsupported distribution {dist!r}")
