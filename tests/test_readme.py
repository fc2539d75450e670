"""The README's examples: every command line composes and validates; a few are run for real."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from cifarlab.config import validate
from tests.conftest import ROOT, TINY, compose_train, run_script

README = (ROOT / "README.md").read_text()


def readme_examples() -> list[list[str]]:
    block = README.split("<!-- examples:start -->")[1].split("<!-- examples:end -->")[0]
    commands = []
    for line in block.splitlines():
        line = line.split("  #")[0].strip()
        if line.startswith("python "):
            commands.append(shlex.split(line)[1:])
    return commands


EXAMPLES = readme_examples()


def test_the_readme_has_a_dozen_examples():
    assert len(EXAMPLES) >= 12


def _with_real_paths(args: list[str], tmp_path: Path) -> list[str]:
    """The README's placeholder paths, made real: validation checks that they exist."""
    real = []
    for arg in args:
        if arg.startswith("data.root="):
            for name in ("cat", "dog"):
                (tmp_path / "train" / name).mkdir(parents=True)
            arg = f"data.root={tmp_path / 'train'}"
        elif arg.startswith("ckpt_path="):
            (tmp_path / "last.ckpt").write_bytes(b"")
            arg = f"ckpt_path={tmp_path / 'last.ckpt'}"
        real.append(arg)
    return real


@pytest.mark.parametrize("argv", EXAMPLES, ids=[" ".join(a) for a in EXAMPLES])
def test_example_composes_and_validates(argv, tmp_path):
    script, args = argv[0], [a for a in argv[1:] if a not in ("-m", "--help")]
    args = [
        a.split(",")[0] if "=" in a and "," in a and "[" not in a else a for a in args
    ]  # first job of a sweep
    args = _with_real_paths(args, tmp_path)
    cfg = compose_train(args, config_name="eval" if script == "eval.py" else "train")
    if script == "train.py":
        validate(cfg)


def test_make_targets_named_in_the_readme_exist():
    makefile = (ROOT / "Makefile").read_text()
    for target in set(re.findall(r"`make ([a-z-]+)", README)):
        assert re.search(rf"^{target}:", makefile, re.M), target


def test_make_dashboard_opens_the_newest_sweep_journal_or_says_there_is_none(tmp_path):
    """``make dashboard`` picks the newest ``multirun/*/journal.log`` (or ARGS); UV=echo prints the command it would
    run instead of installing optuna-dashboard and serving."""

    def dashboard(*args):
        cmd = ["make", "-s", "-f", str(ROOT / "Makefile"), "dashboard", "UV=echo", *args]
        return subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=60)

    result = dashboard()
    assert result.returncode != 0 and "no multirun/*/journal.log yet" in result.stderr
    for i, study in enumerate(["older", "newer"]):
        (tmp_path / "multirun" / study).mkdir(parents=True)
        journal = tmp_path / "multirun" / study / "journal.log"
        journal.write_text("")
        os.utime(journal, (1_700_000_000 + i, 1_700_000_000 + i))
    result = dashboard()
    assert result.returncode == 0, result.stderr
    assert (
        result.stdout.splitlines()[-1]
        == "run --frozen --extra dashboard optuna-dashboard multirun/newer/journal.log"
    )
    dated = (
        tmp_path / "multirun" / "2026-11-30" / "12-00-00" / "journal.log"
    )  # a sweep without a study folder
    dated.parent.mkdir(parents=True)
    dated.write_text("")
    os.utime(dated, (1_700_000_009, 1_700_000_009))
    assert (
        dashboard()
        .stdout.splitlines()[-1]
        .endswith("optuna-dashboard multirun/2026-11-30/12-00-00/journal.log")
    )
    result = dashboard("ARGS=sqlite:///studies.db --port 8081")
    assert result.stdout.splitlines()[-1].endswith("optuna-dashboard sqlite:///studies.db --port 8081")


@pytest.mark.slow
def test_readme_rmsprop_and_help_run(tmp_path):
    result = run_script(["--help"])
    assert result.returncode == 0 and "optimizer: adagrad, adam" in result.stdout
    result = run_script(["optimizer=rmsprop", *TINY, f"hydra.run.dir={tmp_path}"])
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((Path(tmp_path) / "metrics.json").read_text())["status"] == "completed"
