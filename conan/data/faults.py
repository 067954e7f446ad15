"""Chaos option of the data steps (`inject_failure_at`): the Ray Data worker that handles one chosen input row dies
once, as when its node fails, so a test can check that Ray's retry loses and repeats nothing."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable


def die_once_on(origin: str | None, origins: Iterable[str], output_dir: str) -> None:
    """Kill this worker process if its batch holds the row `origin` (file:line, or path/file:line: the end of a row's
    origin) and no earlier attempt died on it (a marker file in output_dir remembers)."""
    if origin is None or not any(o == origin or o.endswith("/" + origin) for o in origins):
        return
    marker = Path(output_dir) / ".injected_failure"
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()
    os._exit(1)
