"""What the entry points share: a user's mistake becomes one line on stderr and exit code 1."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any


def guarded(fn: Callable[..., Any], *args: Any) -> Any:
    """Call ``fn``; turn ConfigError/DataError into ``error: <one line>`` and exit code 1."""
    from cifarlab.config import ConfigError
    from cifarlab.data import DataError

    try:
        return fn(*args)
    except (ConfigError, DataError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(1)
