"""A run directory: where one compression run keeps its recipe, results, logs, checkpoints and status.

Every file is written atomically (temporary file in the same directory, fsync, rename), so a crash or Ctrl-C
never leaves a half-written summary.json behind. status.json says whether the run is running, complete, failed
or interrupted; `RunDir.guard()` keeps it true.
"""
from __future__ import annotations

import json
import logging
import os
import platform
import re
import tempfile
import traceback
from contextlib import contextmanager
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Iterator, Literal, Optional, Union

from .config import deep_merge
from .errors import ConfigError

RUNS_ROOT = Path("runs")
STATUS = "status.json"
SUMMARY = "summary.json"
ENV = "env.json"
LOG = "run.log"
State = Literal["running", "complete", "failed", "interrupted"]
# Packages whose versions decide a run's numbers; recorded in env.json.
_VERSIONED = ("ltmpctl", "torch", "timm", "onnx", "onnxruntime")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _slug(text: str) -> str:
    """Safe directory-name piece: model names may hold `/` or `:` (hf-hub:timm/...)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "x"


def run_name(model: str, compressor: str, target: float, when: Optional[datetime] = None) -> str:
    """`<UTC %Y%m%d-%H%M%S>-<model>-<compressor>-<target>`, e.g. 20250101-120000-demo-ltmp-0.5."""
    stamp = (when or datetime.now(timezone.utc)).strftime("%Y%m%d-%H%M%S")
    return f"{stamp}-{_slug(model)}-{_slug(compressor)}-{target:g}"


def _json_default(obj: Any) -> Any:
    """JSON for what results hold besides plain types: paths, times, numpy/torch scalars and arrays."""
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, datetime):
        return obj.isoformat()
    if hasattr(obj, "tolist"):  # numpy arrays and scalars, torch tensors
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(e).__name__}: {first}"[:500] if first else type(e).__name__


def _is_run(path: Path) -> bool:
    return (path / STATUS).is_file() or (path / SUMMARY).is_file()


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})",
                          "the file was edited by hand or not written by ltmpctl; delete or fix it") from None


class RunDir:
    """One run's directory. Create with `RunDir.create`, reopen with `RunDir.open`."""

    def __init__(self, path: Union[str, Path]) -> None:
        self.path = Path(path)
        self._logger: Optional[logging.Logger] = None

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __fspath__(self) -> str:
        return str(self.path)

    # -- creating and opening ------------------------------------------------------------------------------------

    @classmethod
    def create(cls, out: Optional[Union[str, Path]], model: str, compressor: str, target: float,
               overwrite: bool = False, root: Union[str, Path] = RUNS_ROOT) -> "RunDir":
        """A fresh `root/<time>-<model>-<compressor>-<target>` (suffix -2, -3 on collision), or `out`.

        An `out` holding an unfinished run (failed, interrupted) is reused so the run can resume; one holding a
        complete run, or files that are not a run, is refused unless `overwrite`.
        """
        if out is None:
            return cls(cls._fresh(Path(root), run_name(model, compressor, target)))
        return cls._use(Path(out), overwrite)

    @staticmethod
    def _fresh(root: Path, name: str) -> Path:
        root.mkdir(parents=True, exist_ok=True)
        for n in range(1, 10_000):
            path = root / (name if n == 1 else f"{name}-{n}")
            try:
                path.mkdir()  # atomic: two runs started in the same second cannot share a directory
                return path
            except FileExistsError:
                continue
        raise ConfigError(f"{root}: too many runs named {name}", "pass --out DIR")

    @classmethod
    def _use(cls, path: Path, overwrite: bool) -> "RunDir":
        if path.exists() and not path.is_dir():
            raise ConfigError(f"out: {path} is a file, not a directory", "pass a directory path to --out")
        path.mkdir(parents=True, exist_ok=True)
        run = cls(path)
        if not any(path.iterdir()):
            return run
        if not _is_run(path):
            if not overwrite:
                raise ConfigError(f"out: {path} is not empty and holds no ltmpctl run",
                                  "choose a new or empty directory, or pass --overwrite")
            return run
        if run.state() == "complete" and not overwrite:
            raise ConfigError(f"out: {path} already holds a complete run",
                              "choose another --out, or pass --overwrite to redo it")
        if overwrite:
            run._forget()
        return run

    def _forget(self) -> None:
        """Drop the previous run's status and summary so stale results cannot merge into the new ones."""
        for name in (STATUS, SUMMARY):
            (self.path / name).unlink(missing_ok=True)

    @classmethod
    def open(cls, path: Union[str, Path]) -> "RunDir":
        """An existing run directory (one with status.json or summary.json)."""
        p = Path(path)
        if not p.is_dir():
            raise ConfigError(f"{p}: no such run directory", "runs live under runs/; pass one of them")
        if not _is_run(p):
            raise ConfigError(f"{p} is not a ltmpctl run directory (no {STATUS} or {SUMMARY})",
                              "pass a directory made by `ltmpctl compress`")
        return cls(p)

    # -- atomic files --------------------------------------------------------------------------------------------

    def file(self, name: str) -> Path:
        """Path of `name` inside the run; names that would escape the directory are refused."""
        rel = Path(name)
        if rel.is_absolute() or ".." in rel.parts or not rel.parts:
            raise ConfigError(f"{name!r} is not a file name inside the run directory", "use a relative name")
        return self.path / rel

    def write_bytes(self, name: str, data: bytes) -> Path:
        """Write `name` atomically: readers see the old file or the new one, never a partial one."""
        return atomic_write(self.file(name), data)

    def write_text(self, name: str, text: str) -> Path:
        return self.write_bytes(name, text.encode("utf-8"))

    def write_json(self, name: str, obj: Any) -> Path:
        # Serialise first, so an unserialisable object fails before anything touches the disk.
        text = json.dumps(obj, indent=2, default=_json_default) + "\n"
        return self.write_text(name, text)

    def read_json(self, name: str) -> Any:
        return _read_json(self.file(name))

    # -- summary -------------------------------------------------------------------------------------------------

    def read_summary(self) -> dict[str, Any]:
        """summary.json's contents; empty before the first `update_summary`."""
        path = self.path / SUMMARY
        return _read_json(path) if path.is_file() else {}

    def update_summary(self, **sections: Any) -> dict[str, Any]:
        """Deep-merge `sections` into summary.json and rewrite it whole; returns the new summary."""
        summary = deep_merge(self.read_summary(), sections)
        self.write_json(SUMMARY, summary)
        return summary

    # -- environment ---------------------------------------------------------------------------------------------

    def write_env(self, seed: int, device: str, threads: Optional[int]) -> dict[str, Any]:
        """Record what produced the numbers (versions, seed, device, threads) in env.json; returns it."""
        import torch

        env: dict[str, Any] = {name: _version(name) for name in _VERSIONED}
        env.update(
            python=platform.python_version(),
            platform=platform.platform(),
            seed=seed,
            device=device,
            cuda_device=torch.cuda.get_device_name() if device.startswith("cuda") else None,
            threads_requested=threads,
            torch_threads=torch.get_num_threads(),
            omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"),
            written=_now(),
        )
        self.write_json(ENV, env)
        return env

    # -- log -----------------------------------------------------------------------------------------------------

    def log_line(self, msg: str) -> None:
        """Append one timestamped line to run.log (opened per call, so nothing is lost on a crash)."""
        with open(self.path / LOG, "a", encoding="utf-8") as f:
            f.write(f"{_now()} {msg}\n")

    @property
    def logger(self) -> logging.Logger:
        """A `logging.Logger` writing to this run's run.log (not propagated to the root logger)."""
        if self._logger is None:
            logger = logging.getLogger(f"ltmpctl.run.{self.path.resolve()}")
            logger.setLevel(logging.INFO)
            logger.propagate = False
            log_path = str((self.path / LOG).resolve())
            if not any(getattr(h, "baseFilename", None) == log_path for h in logger.handlers):
                handler = logging.FileHandler(log_path, encoding="utf-8")
                handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
                logger.addHandler(handler)
            self._logger = logger
        return self._logger

    def close(self) -> None:
        """Close run.log's logging handler (tests and long-lived processes that open many runs)."""
        if self._logger is not None:
            for handler in list(self._logger.handlers):
                self._logger.removeHandler(handler)
                handler.close()
            self._logger = None

    # -- status --------------------------------------------------------------------------------------------------

    def status(self) -> Optional[dict[str, Any]]:
        """status.json's contents, or None before the run started."""
        path = self.path / STATUS
        return _read_json(path) if path.is_file() else None

    def state(self) -> Optional[str]:
        st = self.status()
        return st.get("state") if isinstance(st, dict) else None

    def set_state(self, state: State, error: Optional[str] = None) -> dict[str, Any]:
        """Write status.json; `started` is kept from the running state, `finished` set when it ends."""
        previous = self.status() or {}
        started = previous.get("started") if state != "running" else None
        status = {
            "state": state,
            "error": error,
            "started": started or _now(),
            "finished": None if state == "running" else _now(),
        }
        self.write_json(STATUS, status)
        return status

    @contextmanager
    def guard(self) -> Iterator["RunDir"]:
        """Mark the run running; complete on success, failed or interrupted on an exception (re-raised)."""
        self.set_state("running")
        self.log_line("run started")
        try:
            yield self
        except KeyboardInterrupt:
            self.set_state("interrupted", "interrupted by the user")
            self.log_line("run interrupted")
            raise
        except BaseException as e:
            error = _one_line(e)
            self.set_state("failed", error)
            # The CLI shows one line; the whole traceback goes to run.log for whoever debugs it.
            self.log_line(f"run failed: {error}\n{traceback.format_exc()}")
            raise
        self.set_state("complete")
        self.log_line("run complete")


def _read_umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it; done once, at import
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def atomic_write(path: Path, data: bytes) -> Path:
    """Write `path` through a temporary file in its directory, fsync, os.replace: never half-written.

    The file gets the permissions a plain open() would give (mkstemp makes it owner-only, which would hide runs
    from the teammates and CI jobs that read them).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        if hasattr(os, "fchmod"):  # POSIX; Windows has no such mode bits
            os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def _version(dist: str) -> Optional[str]:
    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def _fsync_dir(path: Path) -> None:
    """Make the rename itself durable; not possible on every platform (Windows), where it is skipped."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
