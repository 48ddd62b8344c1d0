"""A thin wrapper over the `adb` command line: timeouts, no shell on this side, quoted arguments on the other."""
from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Sequence

from ..errors import ConfigError, DeviceError
from .devices import AdbNotFoundError, Device, parse_devices

DEFAULT_TIMEOUT_S = 60.0
TRANSFER_TIMEOUT_S = 600.0  # push/pull of a model over USB 2 can take minutes


def find_adb(adb_path: str = "adb") -> str:
    """The adb executable: `adb_path` itself if it is a path, else looked up on PATH."""
    found = shutil.which(adb_path)
    if found is None:
        raise AdbNotFoundError(f"adb not found ({adb_path!r} is not on PATH or not executable)",
                               "install it (`apt-get install adb`, or Android's platform-tools) and put it on PATH")
    return found


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "no output"


def run_adb(argv: Sequence[str], adb_path: str = "adb",
            timeout: float = DEFAULT_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    """`adb *argv` as an argument list (never through a local shell); errors name the command and adb's last words."""
    cmd = [find_adb(adb_path), *argv]
    shown = shlex.join(["adb", *argv])
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace", timeout=timeout)
    except subprocess.TimeoutExpired:
        raise DeviceError(f"`{shown}` timed out after {timeout:.0f} s",
                          "check the device responds (`adb shell true`), or allow more time") from None
    except OSError as e:
        raise AdbNotFoundError(f"can't run adb at {cmd[0]!r}: {e.strerror}", "reinstall adb") from None
    if proc.returncode != 0:
        raise DeviceError(f"`{shown}` failed (exit {proc.returncode}): {_last_line(proc.stderr or proc.stdout)}",
                          "the device's own message is above; `adb devices -l` shows whether it is still attached")
    return proc


def list_devices(adb_path: str = "adb") -> list[Device]:
    """Everything `adb devices -l` lists, in any state."""
    return parse_devices(run_adb(["devices", "-l"], adb_path, timeout=30.0).stdout)


class Adb:
    """One device, addressed by serial: `adb -s SERIAL ...`."""

    def __init__(self, serial: str, adb_path: str = "adb") -> None:
        self.serial = serial
        self.adb_path = adb_path

    def _run(self, argv: Sequence[str], timeout: float) -> subprocess.CompletedProcess[str]:
        return run_adb(["-s", self.serial, *argv], self.adb_path, timeout)

    def shell(self, args: Sequence[str], timeout: float = DEFAULT_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
        """Run a command on the device. The device runs the string through its shell, so every argument is quoted:
        a path with spaces or `;` arrives as one argument and is never executed."""
        if not args:
            raise ValueError("adb shell needs a command")
        return self._run(["shell", " ".join(shlex.quote(str(a)) for a in args)], timeout)

    def getprop(self, name: str) -> str:
        return self.shell(["getprop", name]).stdout.strip()

    def fingerprint(self) -> dict[str, str]:
        """What a latency number depends on: build, SoC, Android version, ABI, model."""
        soc = self.getprop("ro.soc.model") or self.getprop("ro.board.platform") or self.getprop("ro.hardware")
        return {
            "fingerprint": self.getprop("ro.build.fingerprint"),
            "soc": soc,
            "android": self.getprop("ro.build.version.release"),
            "abi": self.getprop("ro.product.cpu.abi"),
            "model": self.getprop("ro.product.model"),
        }

    def push(self, local: str | Path, remote: str, timeout: float = TRANSFER_TIMEOUT_S) -> None:
        if not Path(local).is_file():
            raise ConfigError(f"{str(local)!r} not found", "check the path of the file to push")
        self._run(["push", str(local), remote], timeout)

    def pull(self, remote: str, local: str | Path, timeout: float = TRANSFER_TIMEOUT_S) -> None:
        self._run(["pull", remote, str(local)], timeout)
