"""What the entry points share: a user's mistake becomes one line on stderr and exit code 1, and ``--help``
answers without importing torch.

``python train.py ...`` runs ``main(hydra_main, conf_dir, "train")``:

- ``--help`` is answered here (``print_help``) from the YAML folders and one composed config. Hydra's own
  help lists the same, but deep-copies its whole config store once per group (~170 times, ~2.4 s on 2 AMD
  EPYC cores); ``hydra.help`` in ``conf/train.yaml`` still gives the header, footer and template.
- A mistake Hydra finds while composing (a misspelt key, a wrong type, an unknown option) and one cifarlab
  finds before training (``ConfigError``, ``DataError``) print ``error: key=value is not allowed; allowed:
  ...`` (``one_line``). Hydra would print several lines and a hint about ``HYDRA_FULL_ERROR``; cifarlab sets
  that variable so that Hydra raises instead, and formats the error itself. A user who sets
  ``HYDRA_FULL_ERROR=1`` still gets Hydra's full traceback.
- Any other exception (raised by cifarlab's own code, in the task or in the sweep process) is a bug: its
  traceback is shown.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import string
import sys
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

# Set by cifarlab for its own processes (and inherited by their children: DDP ranks, sweep trials), so
# that HYDRA_FULL_ERROR=1 set by a user can be told apart from cifarlab's.
_OWN_FULL_ERROR = "CIFARLAB_HYDRA_FULL_ERROR"
_task_started = False


def guarded(fn: Callable[..., Any], *args: Any) -> Any:
    """Call ``fn``; turn ConfigError/DataError into ``error: <one line>`` and exit code 1."""
    global _task_started
    _task_started = True
    from cifarlab.config import ConfigError

    try:
        return fn(*args)
    except Exception as err:
        # DataError lives with torch in cifarlab.data: if that was never imported, this is not one.
        data = sys.modules.get("cifarlab.data")
        if isinstance(err, ConfigError) or (data is not None and isinstance(err, data.DataError)):
            fail(str(err))
        raise


def fail(message: str) -> typing.NoReturn:
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(1)


def main(hydra_main: Callable[[], Any], conf_dir: Path, config_name: str) -> None:
    """Run a ``@hydra.main`` function as the command line ``sys.argv`` asks."""
    args = sys.argv[1:]
    if "--help" in args or "-h" in args:
        print_help(conf_dir, config_name, args)
        return
    user_wants_traceback = os.environ.get("HYDRA_FULL_ERROR") == "1" and not os.environ.get(_OWN_FULL_ERROR)
    if user_wants_traceback:
        hydra_main()
        return
    os.environ["HYDRA_FULL_ERROR"] = os.environ[_OWN_FULL_ERROR] = "1"
    try:
        hydra_main()
    except SystemExit as err:
        # Lightning's SIGTERMException is a SystemExit without a code: a killed run would exit 0 and look
        # successful to a job scheduler or a shell script. 143 = 128 + SIGTERM, what a shell reports.
        if type(err).__name__ == "SIGTERMException":
            raise SystemExit(143) from None
        raise
    except Exception as err:
        unwritable = None if _task_started else _unwritable_output_dir(err, args)
        if unwritable:
            fail(unwritable)
        if _task_started or not is_usage_error(err):  # a bug, not a mistake on the command line
            raise
        fail(one_line(err, args, conf_dir, config_name))


def _unwritable_output_dir(err: BaseException, args: Sequence[str]) -> str | None:
    """``hydra.run.dir=/proc/x``: Hydra creates the output folder before the task starts and raises a bare
    OSError; an OSError about a folder the command line names (or the default runs/ and multirun/) is the
    user's to fix."""
    if not isinstance(err, OSError) or err.filename is None:
        return None
    failed = Path(os.path.abspath(str(err.filename)))
    given = {k: v for k, _, v in (a.lstrip("+").partition("=") for a in args) if k in _OUTPUT_DIRS}
    for key in _OUTPUT_DIRS:
        value = given.get(key, _OUTPUT_DIRS[key])
        literal = value.split("${")[0].rpartition("/")[0] if "${" in value else value  # /x/${now:%H} → /x
        if not literal:
            continue  # all of it is interpolated: no telling which folder it names
        folder = Path(os.path.abspath(literal))
        if failed == folder or folder in failed.parents or failed in folder.parents:
            value = given.get(key, f"{_OUTPUT_DIRS[key]}/... (the default)")
            return (
                f"{key}={value} is not allowed: cannot create {err.filename} ({err.strerror or err}); "
                "allowed: a folder this user can write to"
            )
    return None


# where Hydra writes a run's or a sweep's folder, and the top of the default (conf/train.yaml)
_OUTPUT_DIRS = {"hydra.run.dir": "runs", "hydra.sweep.dir": "multirun"}


def is_usage_error(err: BaseException) -> bool:
    """An error Hydra or OmegaConf raise about the command line or the config (composition, overrides,
    flags), as opposed to a bug in cifarlab's own code, whose traceback must show."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(err, (HydraException, OmegaConfBaseException)):
        return True
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    where = Path(tb.tb_frame.f_code.co_filename).parts if tb is not None else ()
    return isinstance(err, ValueError) and "hydra" in where  # e.g. "Only one of --run, --multirun, --cfg"


# ---- Hydra's composition errors as one line ------------------------------------------------------------


def one_line(err: BaseException, args: Sequence[str], conf_dir: Path, config_name: str = "train") -> str:
    """``key=value is not allowed; allowed: ...`` for a composition error, else its first line(s)."""
    from hydra.errors import MissingConfigException, OverrideParseException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

    cause = err.__cause__ if err.__cause__ is not None else err
    if isinstance(err, MissingConfigException) and err.missing_cfg_file:
        group, _, option = str(err.missing_cfg_file).rpartition("/")
        top = group.split("/")[0]
        if "/" in group and (conf_dir / top).is_dir():  # optimizer=course/nope
            option, group = f"{group.split('/', 1)[1]}/{option}", top
        allowed = group_options(conf_dir, group) or sorted(err.options or [])
        if allowed:
            return f"{group}={option} is not allowed; allowed: {', '.join(allowed)}"
    full_key = getattr(cause, "full_key", None)
    schema = getattr(cause, "object_type", None)
    if full_key and isinstance(cause, (ConfigAttributeError, ConfigKeyError)) and _is_schema(schema):
        keys = [f.name for f in dataclasses.fields(schema) if not f.name.startswith("_")]
        parent = full_key.rpartition(".")[0]
        if not parent:  # the root also takes the groups that have no key of their own (experiment, ...)
            keys += [g for g in config_groups(conf_dir, config_name) if g not in keys]
        where = f"a key of {parent}" if parent else "a group or key"
        having = _options_with_key(conf_dir, parent, full_key.rpartition(".")[2]) if parent else []
        elsewhere = f" (or first {parent}={'|'.join(having)}, which has it)" if having else ""
        return f"{_override(full_key, args)} is not allowed; allowed: {where}: {', '.join(keys)}{elsewhere}"
    if full_key and isinstance(cause, (ConfigAttributeError, ConfigKeyError)) and "." in full_key:
        group, _, key = full_key.rpartition(".")
        having = _options_with_key(conf_dir, group, key)
        if having:  # scheduler.patience=3 while scheduler=none: the option that has the key comes first
            return (
                f"{_override(full_key, args)} is not allowed: the chosen {group} has no key {key}; allowed: "
                f"choose a {group} that has it first: {group}={'|'.join(having)}"
            )
    if full_key and isinstance(cause, ValidationError) and _is_schema(schema):
        hint = typing.get_type_hints(schema).get(full_key.rpartition(".")[2])
        if hint is not None and _describe(hint):
            return f"{_override(full_key, args)} is not allowed; allowed: {_describe(hint)}"
    for arg in args:  # optimizer=null: Hydra's message names no group
        group, _, value = arg.partition("=")
        if value == "null" and group_options(conf_dir, group) and "must be a string" in str(err):
            return f"{arg} is not allowed; allowed: {', '.join(group_options(conf_dir, group))}"
    no_group = re.match(r"Could not override '([\w/]+)'\. No match in the defaults list", str(err))
    if no_group:  # eval.py hparams_search=...: a group this command's config does not have
        group = no_group.group(1)
        return (
            f"{_override(group, args)} is not allowed: {config_name}'s config has no {group} group; allowed: "
            f"{', '.join(config_groups(conf_dir, config_name))}"
        )
    if isinstance(err, OverrideParseException):
        return f"{err.override} is not a valid override ({_parse_reason(err)}); allowed: {OVERRIDE_FORMS}"
    searched = _searched_sweeper_param(err, args)
    if searched:
        return searched
    lines = [str(err).strip().splitlines()[0]]
    if cause is not err and str(cause).strip():
        lines.append(str(cause).strip().splitlines()[0])
    return ": ".join(lines)


def _searched_sweeper_param(err: BaseException, args: Sequence[str]) -> str | None:
    """``hydra.sweeper.params.model.dropout=choice(0.1,0.5)``: Hydra refuses a search over its own settings, and
    ``params`` keys are dotted names that no ``hydra.sweeper.params.<key>`` override can reach anyway; the same
    expression on the key itself joins the search space."""
    if "Sweeping over Hydra's configuration is not supported" not in str(err):
        return None
    prefix = "hydra.sweeper.params."
    for arg in args:
        key, sep, value = arg.lstrip("+~").partition("=")
        if sep and key.startswith(prefix) and key != prefix:
            param = key[len(prefix) :]
            return (
                f"{arg} is not allowed: Hydra's own settings take no search expression; to search {param}, "
                f"write '{param}={value}' (a search expression on the command line joins the search space)"
            )
    return None


OVERRIDE_FORMS = (
    "key=value, group=option, +key=value (a new key), ~key (delete); to sweep (-m): a,b, choice(a,b), "
    "range(start,stop[,step]), interval(low,high), tag(log,interval(low,high))"
)


def _parse_reason(err: BaseException) -> str:
    """What Hydra's parser says is wrong, without its 'Error parsing override' header and docs link."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    reasons = [line for line in lines if not line.startswith(("Error parsing override", "See https://"))]
    return "; ".join(reasons).replace("HydraException while evaluating", "in") or (lines[0] if lines else "")


def _options_with_key(conf_dir: Path, group: str, key: str) -> list[str]:
    """The options of config group ``group`` whose schema (``- /schema/<group>@_here_: <name>``) has ``key``."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    having = []
    for option in group_options(conf_dir, group):
        text = (conf_dir / group / f"{option}.yaml").read_text()
        found = re.search(r"^\s*-\s*/(schema/[\w/]+)@_here_:\s*(\w+)", text, re.M)
        try:
            node = store.load(f"{found.group(1)}/{found.group(2)}.yaml").node if found else None
        except Exception:  # noqa: BLE001 - not a schema this app registered: that option is not listed
            node = None
        if node is not None and key in node:
            having.append(option)
    return having


def _is_schema(schema: Any) -> bool:
    return isinstance(schema, type) and dataclasses.is_dataclass(schema)


def _override(full_key: str, args: Sequence[str]) -> str:
    """The command line's ``key=value`` for ``full_key`` (``optimizer.lrr=0.1``), else the key alone."""
    for arg in args:
        key, sep, _ = arg.lstrip("+~").partition("=")
        if sep and key == full_key:
            return arg.lstrip("+~")
    return full_key


def _describe(hint: Any) -> str | None:
    """``int`` → "an integer", ``Optional[float]`` → "a number or null", ``list[float]`` → "a list of numbers"."""
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    args = typing.get_args(hint)
    if typing.get_origin(hint) is typing.Union and type(None) in args:
        inner = [a for a in args if a is not type(None)]
        described = _describe(inner[0]) if len(inner) == 1 else None
        return f"{described} or null" if described else None
    if typing.get_origin(hint) is list:
        item = {int: "integers", float: "numbers", str: "strings", bool: "booleans"}.get(
            args[0] if args else None
        )
        return f"a list of {item}, e.g. [a,b]" if item else "a list, e.g. [a,b]"
    if typing.get_origin(hint) is dict:
        return "a mapping, e.g. {a:1}"
    return names.get(hint)


# ---- --help --------------------------------------------------------------------------------------------


def config_groups(conf_dir: Path, config_name: str) -> list[str]:
    """The config groups that ``<config_name>.yaml``'s defaults list names: the ones its command line can set."""
    import yaml

    try:
        defaults = yaml.safe_load((conf_dir / f"{config_name}.yaml").read_text()).get("defaults") or []
    except (OSError, AttributeError, yaml.YAMLError):
        defaults = []
    names = [str(k).split()[-1].lstrip("/") for entry in defaults if isinstance(entry, dict) for k in entry]
    return [name for name in names if (conf_dir / name).is_dir()]


def group_options(conf_dir: Path, group: str) -> list[str]:
    """The options of a config group: its YAML files, nested ones as ``course/adam``."""
    folder = conf_dir / group
    if not folder.is_dir():
        return []
    return sorted(str(p.relative_to(folder).with_suffix("")) for p in folder.rglob("*.yaml"))


def print_help(conf_dir: Path, config_name: str, args: Sequence[str]) -> None:
    """Hydra's help page (``hydra.help.template``): the groups and their options, and the composed config."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    flags = {"--help", "-h", "--resolve", "-m", "--multirun"}
    overrides = [a for a in args if a not in flags]
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
            cfg = compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
    except Exception as err:  # noqa: BLE001 - any composition error is the user's to fix
        fail(one_line(err, overrides, conf_dir, config_name))
    template = str(cfg.hydra.help.template)
    groups = sorted(config_groups(conf_dir, config_name))
    app_groups = "\n".join(f"{g}: {', '.join(group_options(conf_dir, g))}" for g in groups)
    job_cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    if "--resolve" in args:
        from hydra.core.hydra_config import HydraConfig

        HydraConfig.instance().set_config(cfg)
        OmegaConf.resolve(job_cfg)
    text = string.Template(template).safe_substitute(
        FLAGS_HELP="--help, --cfg job [--resolve], -m/--multirun, --hydra-help (Hydra's own flags)",
        APP_CONFIG_GROUPS=app_groups + "\n",
        HYDRA_CONFIG_GROUPS="(python train.py --hydra-help)",
        CONFIG=OmegaConf.to_yaml(job_cfg),
    )
    try:
        print(text, flush=True)
    except BrokenPipeError:  # python train.py --help | head: as the Python docs advise, no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


# ---- the terminal --------------------------------------------------------------------------------------


class TerminalFilter(logging.Filter):
    """Keeps Lightning's info lines (GPU/TPU available, AMP, its litlogger tip, checkpoint restores) off the
    terminal: cifarlab says which device it uses in one line of its own. Lightning's warnings still show,
    and ``<run>/train.log`` keeps every line. Set on Hydra's console handler by ``hydra.job_logging``."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or not record.name.startswith("lightning")
