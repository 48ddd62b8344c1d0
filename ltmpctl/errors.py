"""Domain errors. Raised anywhere in ltmpctl, translated once at the CLI boundary into one line + exit code."""
from __future__ import annotations


class LtmpctlError(Exception):
    """Base error: `message` names the problem, `hint` says how to fix it."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class ConfigError(LtmpctlError):
    """Bad recipe, bad flag value, bad compressor parameter."""


class ModelError(LtmpctlError):
    """Unknown or unsupported model, unreadable checkpoint, weights not available."""


class DataError(LtmpctlError):
    """Missing or unreadable data set."""


class PluginError(LtmpctlError):
    """Unknown compressor or conflicting plugin registrations."""


class ExportError(LtmpctlError):
    """An export that can't be produced or fails verification."""

    exit_code = 3


class DeviceError(LtmpctlError):
    """Android device problems (adb)."""

    exit_code = 4


class WriteError(LtmpctlError):
    """An output that can't be written: disk full, read-only file system, no permission."""

    exit_code = 5


class RunBusyError(LtmpctlError):
    """A run directory another live process is writing."""

    exit_code = 6
