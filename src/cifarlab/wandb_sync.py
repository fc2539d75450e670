"""Upload offline W&B runs: ``make wandb-sync [ARGS="runs/2025-01-31 --dry-run"]``.

    python -m cifarlab.wandb_sync [PATH ...] [--dry-run] [--include-synced] [-p PROJECT] [-e ENTITY]

Finds the offline run folders (``.../wandb/offline-run-*``) under ``runs/`` and ``multirun/`` (or under
the given paths, or the given run folders themselves), lists them with their name, group and state, and
hands them to ``wandb sync``. Without an API key it says how to log in and uploads nothing.

``read_run(folder)`` reads an offline run back from its ``run-<id>.wandb`` file (no server, no account):
its name, group, job type, tags, config, every history row, summary and exit code.
"""

from __future__ import annotations

import argparse
import json
import shutil
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_ROOTS = ("runs", "multirun")

# ---- reading a run's transaction log: W&B header, then LevelDB log blocks of protobuf records --------------
# https://github.com/google/leveldb/blob/main/doc/log_format.md

_BLOCK = 32768
_HEADER = 7  # checksum (4), length (2), type (1)
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _raw_records(data: bytes):
    if len(data) < 7:
        return  # not written yet
    if data[:4] != b":W&B":
        raise ValueError("not a W&B run file (no :W&B header)")
    pos, pending = 7, b""  # ":W&B", magic (2), version (1)
    while pos + _HEADER <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _HEADER:  # a block's trailer: too short for a record
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + _HEADER])
        if kind == 0 and length == 0:  # zero padding: the rest of the block is empty
            pos += left
            continue
        chunk = data[pos + _HEADER : pos + _HEADER + length]
        if len(chunk) < length:
            return  # a run still being written (or cut short): stop at its last whole record
        pos += _HEADER + length
        if kind == _FULL:
            yield chunk
        elif kind == _FIRST:
            pending = chunk
        elif kind == _MIDDLE:
            pending += chunk
        elif kind == _LAST:
            yield pending + chunk
            pending = b""


def _key(item: Any) -> str:
    return ".".join(item.nested_key) if item.nested_key else item.key


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


@dataclass
class OfflineRun:
    """What a W&B run folder holds, as plain Python values."""

    folder: Path
    id: str = ""
    name: str = ""
    project: str = ""
    group: str = ""
    job_type: str = ""
    tags: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    exit_code: int | None = None  # None: the run never finished (crashed or still running)
    artifacts: list[str] = field(default_factory=list)

    @property
    def state(self) -> str:
        if self.exit_code is None:
            return "running/crashed"
        return "finished" if self.exit_code == 0 else "failed"

    @property
    def synced(self) -> bool:
        return any(self.folder.glob("*.wandb.synced"))

    def values(self, key: str) -> list[Any]:
        """Every logged value of ``key``, in order."""
        return [row[key] for row in self.history if key in row]


def read_run(folder: str | Path, wait: float = 0.0) -> OfflineRun:
    """Read a W&B run folder (``.../wandb/offline-run-*``) back from its ``run-<id>.wandb`` file.

    ``wait``: seconds to wait for the run's exit record. W&B's service writes the file in the background
    and may still be writing it for a moment after ``run.finish()`` returns.
    """
    deadline = time.monotonic() + wait
    while True:
        run = _read_run(Path(folder))
        if run.exit_code is not None or time.monotonic() >= deadline:
            return run
        time.sleep(0.1)


def _read_run(folder: Path) -> OfflineRun:
    from wandb.proto import wandb_internal_pb2 as pb

    files = sorted(folder.glob("run-*.wandb"))
    if not files:
        raise FileNotFoundError(f"{folder} holds no run-*.wandb file")
    run = OfflineRun(folder=folder)
    for raw in _raw_records(files[0].read_bytes()):
        record = pb.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            r = record.run
            run.id, run.name, run.project = r.run_id, r.display_name, r.project
            run.group, run.job_type, run.tags = r.run_group, r.job_type, list(r.tags)
            for item in r.config.update:
                run.config[_key(item)] = _value(item.value_json)
        elif kind == "config":
            for item in record.config.update:
                run.config[_key(item)] = _value(item.value_json)
            for item in record.config.remove:
                run.config.pop(_key(item), None)
        elif kind == "history":
            run.history.append({_key(item): _value(item.value_json) for item in record.history.item})
        elif kind == "summary":
            for item in record.summary.update:
                run.summary[_key(item)] = _value(item.value_json)
            for item in record.summary.remove:
                run.summary.pop(_key(item), None)
        elif kind == "exit":
            run.exit_code = record.exit.exit_code
        elif kind == "artifact":
            run.artifacts.append(f"{record.artifact.name}:{record.artifact.type}")
    run.config = {k: v for k, v in run.config.items() if k != "_wandb" and not k.startswith("_wandb.")}
    return run


# ---- finding and uploading offline runs ------------------------------------------------------------------


def find_offline_runs(paths: list[str | Path] | None = None) -> list[Path]:
    """Offline run folders under ``paths`` (default: runs/ and multirun/), oldest first."""
    roots = [Path(p) for p in (paths or DEFAULT_ROOTS)]
    found: set[Path] = set()
    for root in roots:
        if root.is_dir() and root.name.startswith("offline-run-") and any(root.glob("run-*.wandb")):
            found.add(root.resolve())
        elif root.is_dir():
            found.update(
                p.resolve() for p in root.rglob("offline-run-*") if p.is_dir() and any(p.glob("run-*.wandb"))
            )
    return sorted(found, key=lambda p: (p.name.split("-", 2)[-1], str(p)))


def _describe(folder: Path) -> str:
    try:
        run = read_run(folder)
    except Exception as err:  # noqa: BLE001 - a damaged file is listed, not fatal
        return f"  {folder}  (unreadable: {err})"
    status = run.summary.get("status", run.state)
    group = f"  group {run.group}" if run.group else ""
    synced = "  [synced]" if run.synced else ""
    name = run.name or run.id or folder.name.rsplit("-", 1)[-1]  # an empty run: its folder's id
    return f"  {name}  {run.job_type or '-'}  {status}{group}{synced}\n      {folder}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cifarlab.wandb_sync", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "paths", nargs="*", help="run folders or folders to search (default: runs/ multirun/)"
    )
    parser.add_argument("--dry-run", action="store_true", help="list what would be uploaded; upload nothing")
    parser.add_argument("--include-synced", action="store_true", help="upload runs that were uploaded before")
    parser.add_argument("-p", "--project", help="upload into this project instead of each run's own")
    parser.add_argument("-e", "--entity", help="upload into this entity (user or team)")
    args = parser.parse_args(argv)
    missing = [p for p in args.paths if not Path(p).exists()]
    if missing:  # a typo in a path is the user's mistake, not "nothing to upload"
        print(
            f"error: wandb-sync path {missing[0]!r} does not exist; allowed: existing run folders or folders to "
            f"search (default: {' '.join(DEFAULT_ROOTS)})",
            file=sys.stderr,
        )
        return 1

    runs = find_offline_runs(args.paths or None)
    if not args.include_synced:
        runs = [r for r in runs if not any(r.glob("*.wandb.synced"))]
    where = " ".join(args.paths) if args.paths else " and ".join(f"{r}/" for r in DEFAULT_ROOTS)
    if not runs:
        print(f"no offline W&B runs to upload under {where}")
        return 0
    print(f"{len(runs)} offline W&B run(s) under {where}:")
    for folder in runs:
        print(_describe(folder))
    if args.dry_run:
        return 0

    from cifarlab.loggers import _base_url, has_api_key, reachable

    if not has_api_key():
        print(
            "error: not logged in to W&B: run `wandb login` (or set WANDB_API_KEY), then `make wandb-sync` "
            "again; the runs stay on disk until then",
            file=sys.stderr,
        )
        return 1
    if not reachable():
        print(
            f"error: {_base_url()} is unreachable; the runs stay on disk, try `make wandb-sync` again later",
            file=sys.stderr,
        )
        return 1
    wandb_cli = shutil.which("wandb", path=str(Path(sys.executable).parent)) or shutil.which("wandb")
    command = [wandb_cli] if wandb_cli else [sys.executable, "-m", "wandb"]
    command += ["sync", "--yes"]
    if args.include_synced:
        command.append("--include-synced")
    if args.project:
        command += ["--project", args.project]
    if args.entity:
        command += ["--entity", args.entity]
    result = subprocess.run(command + [str(r) for r in runs], check=False)
    if result.returncode == 0:
        print(f"uploaded {len(runs)} run(s)")
    else:
        print(
            f"error: `wandb sync` exited with code {result.returncode}; see its messages above",
            file=sys.stderr,
        )
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
