"""The most recent finished compress run under runs/: what `ltmpctl bench` (and friends) use when given no target."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from .errors import ConfigError, LtmpctlError
from .rundir import RECIPE_FILE, RUNS_ROOT, RunDir
from .runs import MODEL_FILE

NO_RUN_HINT = "run `ltmpctl compress demo --target 0.5` first, or name a run directory, model or file"


def _finished_at(path: Path) -> Optional[str]:
    """status.json's `finished` time (ISO, sorts as text) when the run completed, else None."""
    try:
        status = RunDir(path).status()
    except (OSError, LtmpctlError):  # unreadable or not ltmpctl's: not a finished run
        return None
    if not isinstance(status, dict) or status.get("state") != "complete":
        return None
    return str(status.get("finished") or "")


def finished_runs(root: Path = RUNS_ROOT) -> list[Path]:
    """Complete runs directly under `root` (not a compare's own runs/), oldest first."""
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        if not (path / RECIPE_FILE).is_file() or not (path / MODEL_FILE).is_file():
            continue
        when = _finished_at(path)
        if when is not None:
            # Run names start with their UTC start time, so the name breaks ties between equal finish times.
            found.append((when, path.name, path))
    return [p for _, _, p in sorted(found)]


def latest_run(root: Path = RUNS_ROOT) -> Path:
    """The run that finished last under `root`; a one-line ConfigError when there is none."""
    runs = finished_runs(root)
    if not runs:
        raise ConfigError(f"no finished run under {root}/ to benchmark", NO_RUN_HINT)
    return runs[-1]
