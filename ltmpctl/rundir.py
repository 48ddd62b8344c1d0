"""A run directory: where one compression run keeps its recipe, results, logs, checkpoints and status.

Every file is written atomically (temporary file in the same directory, fsync, rename), so a crash, Ctrl-C or
SIGKILL never leaves a half-written summary.json behind, and a full or read-only disk is one `WriteError`.
status.json says whether the run is running, complete, failed or interrupted; `RunDir.guard()` keeps it true.
A `running` status names its writer (pid, host): `state()` reports a run whose writer died (SIGKILL, OOM killer)
as `interrupted`.

One writer per run directory: the first write through a `RunDir` (or `create`) takes `.lock`, an flock'ed file
holding the writer's pid and host. A second writer is refused with `RunBusyError` while the first lives; the
kernel drops the flock when its holder dies, so a dead writer's lock is taken over (with a note on stderr).
"""
from __future__ import annotations

import errno
import json
import logging
import os
import platform
import re
import socket
import sys
import tempfile
import traceback
from contextlib import contextmanager
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import IO, Any, Iterator, Literal, Optional, Union

from .config import deep_merge
from .errors import ConfigError, RunBusyError, WriteError

try:
    import fcntl
except ImportError:  # Windows: no flock; the lock falls back to checking the recorded pid
    fcntl = None  # type: ignore[assignment]

RUNS_ROOT = Path("runs")
RECIPE_FILE = "resolved.yaml"  # the resolved recipe of a compress run: what marks a run dir to reopen
STATUS = "status.json"
SUMMARY = "summary.json"
ENV = "env.json"
LOG = "run.log"
LOCK = ".lock"  # hidden: not a result; holds the live writer's pid and host while it writes
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


def _note(msg: str) -> None:
    """One line on stderr that the run goes on despite something worth knowing (not an error)."""
    sys.stderr.write(f"note: {msg}\n")


# -- who is writing ------------------------------------------------------------------------------------------------


def _host() -> str:
    return socket.gethostname()


def _proc_stat(pid: int) -> Optional[tuple[str, str]]:
    """(state letter, start time in clock ticks) of a Linux process from /proc; None where there is no /proc."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rpartition(")")[2].split()  # after the command name, which may hold spaces and parentheses
    return (fields[0], fields[19]) if len(fields) > 19 else None


def _writer() -> dict[str, Any]:
    """This process as a writer record: pid, host, start time (tells a reused pid apart), command, since."""
    stat = _proc_stat(os.getpid())
    return {"pid": os.getpid(), "host": _host(), "proc_start": stat[1] if stat else None,
            "command": " ".join(sys.argv)[:300], "since": _now()}


def _is_me(rec: dict[str, Any]) -> bool:
    return rec.get("pid") == os.getpid() and rec.get("host") == _host()


def writer_alive(rec: dict[str, Any]) -> Optional[bool]:
    """Whether the process a writer record names still runs: None when it ran on another host (unknowable)."""
    pid = rec.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    if rec.get("host") != _host():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    stat = _proc_stat(pid)
    if stat is None:
        return True
    state, start = stat
    # A zombie has exited (its parent has not reaped it yet); another start time means the pid was reused.
    return state != "Z" and (rec.get("proc_start") in (None, start))


def _flock(f: IO[bytes]) -> Optional[bool]:
    """Try to flock `f` exclusively without waiting: True got it, False another holds it, None not supported."""
    if fcntl is None:
        return None
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:  # file systems without flock (some network mounts)
        return None
    return True


def _read_record(f: IO[bytes]) -> Optional[dict[str, Any]]:
    f.seek(0)
    raw = f.read(4096)
    if not raw.strip():
        return None
    try:
        rec = json.loads(raw)
    except ValueError:
        return {}  # half-written by a writer killed mid-write: someone held it, nobody known
    return rec if isinstance(rec, dict) else {}


def _busy(path: Path, rec: dict[str, Any]) -> RunBusyError:
    who = f"pid {rec.get('pid')} on {rec.get('host')}" if rec else "another process"
    since = f" since {rec['since']}" if rec.get("since") else ""
    return RunBusyError(f"{path} is being written by ltmpctl ({who}{since})",
                        f"wait for it to finish or choose another --out; if that process is gone, delete "
                        f"{path / LOCK}")


def _is_run(path: Path) -> bool:
    return (path / STATUS).is_file() or (path / SUMMARY).is_file()


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})",
                          "the file was edited by hand or not written by ltmpctl; delete or fix it") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not valid JSON (binary data)",
                          "the file was overwritten or not written by ltmpctl; delete or fix it") from None


class RunDir:
    """One run's directory. Create with `RunDir.create`, reopen with `RunDir.open`."""

    def __init__(self, path: Union[str, Path]) -> None:
        self.path = Path(path)
        self._logger: Optional[logging.Logger] = None
        self._lock: Optional[IO[bytes]] = None  # open while this object is the run dir's writer

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
            return cls(cls._fresh(Path(root), run_name(model, compressor, target))).lock()
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
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise _write_error(path, e) from None
        run = cls(path)
        if not any(p.name != LOCK for p in path.iterdir()):  # a lock file alone: a writer died before writing
            return run.lock()
        if not _is_run(path):
            if not overwrite:
                raise ConfigError(f"out: {path} is not empty and holds no ltmpctl run",
                                  "choose a new or empty directory, or pass --overwrite")
            return run.lock()
        if run.state() == "complete" and not overwrite:
            raise ConfigError(f"out: {path} already holds a complete run",
                              "choose another --out, or pass --overwrite to redo it")
        run.lock()  # before _forget and before the caller clears old results: a live writer's files stay
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
        run = cls(p)
        # Parsed now, so a corrupted status or summary is refused before a resume writes anything.
        run.status()
        run.read_summary()
        return run

    # -- one writer ----------------------------------------------------------------------------------------------

    def lock(self) -> "RunDir":
        """Become the run dir's one writer (idempotent); `RunBusyError` while another live process is it.

        flock decides where the file system has it (the kernel releases it when the holder dies, even by
        SIGKILL); the pid + host inside are for the refusal message and, without flock, the liveness check.
        """
        if self._lock is not None:
            return self
        path = self.path / LOCK
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            # Held open for as long as this object writes (a with-block would drop the flock); a+ never
            # truncates another writer's record before we hold the lock.
            f = open(path, "a+b")  # noqa: SIM115
        except OSError as e:
            raise _write_error(path, e) from None
        try:
            held = _flock(f)
            rec = _read_record(f)
            mine = rec is not None and _is_me(rec)
            if held is False and not mine:  # mine: another RunDir object of this very process holds it
                raise _busy(self.path, rec or {})
            if held is None and rec and not mine and writer_alive(rec) is not False:
                raise _busy(self.path, rec)
            if rec and not mine and writer_alive(rec) is False:
                _note(f"{self.path}: taking over the lock of ltmpctl pid {rec.get('pid')} on {rec.get('host')}, "
                      "which is no longer running")
            f.seek(0)
            f.truncate()
            f.write(json.dumps(_writer()).encode("utf-8") + b"\n")
            f.flush()
        except OSError as e:
            f.close()
            raise _write_error(path, e) from None
        except BaseException:
            f.close()
            raise
        self._lock = f
        return self

    def unlock(self) -> None:
        """Stop being the writer: empty the record (a clean end leaves nothing to take over) and drop the flock."""
        f, self._lock = self._lock, None
        if f is None:
            return
        try:
            f.seek(0)
            f.truncate()
        except OSError:
            pass  # the flock still goes with close(); a stale record is then taken over silently
        finally:
            f.close()

    def writer(self) -> Optional[dict[str, Any]]:
        """The lock file's writer record (pid, host, since), or None when no one has it."""
        try:
            with open(self.path / LOCK, "rb") as f:
                return _read_record(f)
        except OSError:
            return None

    # -- atomic files --------------------------------------------------------------------------------------------

    def file(self, name: str) -> Path:
        """Path of `name` inside the run; names that would escape the directory are refused."""
        rel = Path(name)
        if rel.is_absolute() or ".." in rel.parts or not rel.parts:
            raise ConfigError(f"{name!r} is not a file name inside the run directory", "use a relative name")
        return self.path / rel

    def write_bytes(self, name: str, data: bytes) -> Path:
        """Write `name` atomically: readers see the old file or the new one, never a partial one."""
        self.lock()
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
        self.lock()
        try:
            with open(self.path / LOG, "a", encoding="utf-8") as f:
                f.write(f"{_now()} {msg}\n")
        except OSError as e:
            raise _write_error(self.path / LOG, e) from None

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
        """Close run.log's logging handler and give up the lock (tests and long-lived processes)."""
        self.unlock()
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
        """The run's state; `running` whose writer is known dead (SIGKILL, OOM killer, reboot) is `interrupted`."""
        st = self.status()
        if not isinstance(st, dict):
            return None
        state = st.get("state")
        if state == "running" and isinstance(st.get("writer"), dict) and writer_alive(st["writer"]) is False:
            return "interrupted"
        return state

    def set_state(self, state: State, error: Optional[str] = None) -> dict[str, Any]:
        """Write status.json; `started` is kept from the running state, `finished` set when it ends. The writer
        (pid, host) is recorded so a later command can tell a live run from one whose process was killed."""
        previous = self.status() or {}
        started = previous.get("started") if state != "running" else None
        status = {
            "state": state,
            "error": error,
            "started": started or _now(),
            "finished": None if state == "running" else _now(),
            "writer": _writer(),
        }
        self.write_json(STATUS, status)
        return status

    def _record_end(self, state: State, error: Optional[str], log: str) -> None:
        """Best effort: on a full or read-only disk the original error matters more than the bookkeeping."""
        try:
            self.set_state(state, error)
            self.log_line(log)
        except (WriteError, RunBusyError):
            pass

    @contextmanager
    def guard(self) -> Iterator["RunDir"]:
        """Mark the run running; complete on success, failed or interrupted on an exception (re-raised)."""
        self.set_state("running")
        try:
            self.log_line("run started")
            try:
                yield self
            except KeyboardInterrupt:
                self._record_end("interrupted", "interrupted by the user", "run interrupted")
                raise
            except BaseException as e:
                error = _one_line(e)
                # The CLI shows one line; the whole traceback goes to run.log for whoever debugs it.
                self._record_end("failed", error, f"run failed: {error}\n{traceback.format_exc()}")
                raise
            self.set_state("complete")
            self.log_line("run complete")
        finally:
            self.unlock()


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
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise _write_error(path, e) from None
    try:
        if hasattr(os, "fchmod"):  # POSIX; Windows has no such mode bits
            os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)  # the old file, if any, is untouched: nothing half-written stays
        if isinstance(e, OSError):
            raise _write_error(path, e) from None
        raise
    _fsync_dir(path.parent)
    return path


def _write_error(path: Path, e: OSError) -> WriteError:
    """A failed write as one line that names the file, with the fix for the usual causes."""
    full = e.errno in (errno.ENOSPC, errno.EDQUOT)
    hint = ("free some disk space, or write elsewhere with --out" if full
            else "write elsewhere with --out (that location is read-only or not yours)"
            if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM) else "check the path and the disk")
    return WriteError(f"can't write {path}: {e.strerror or e}", hint)


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
