"""The user's phone setup, written once: `devices.yaml` names the on-device runner binaries, extra device aliases and
a default device, so `ltmpctl bench --adb pixel7` needs no other flag.

Where it lives: $LTMPCTL_DEVICES if set, else $XDG_CONFIG_HOME/ltmpctl/devices.yaml, else
~/.config/ltmpctl/devices.yaml. A missing file is an empty setup. Example:

    default_device: pixel7          # what `--adb default` means
    runners:                        # host paths; ltmpctl pushes them to the phone for each benchmark
      executorch: ~/android/executor_runner            # runs .pte programs
      onnxruntime: ~/android/onnxruntime_perf_test     # runs .onnx files
      torch: ~/android/speed_benchmark_torch           # runs TorchScript .pt files
    aliases:                        # name -> device codename (what `adb devices -l` prints as device:)
      labphone: shiba

A file holding only `name: codename` lines (the older form) is read as aliases.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..errors import ConfigError

ENV = "LTMPCTL_DEVICES"
FILE_NAME = Path("ltmpctl") / "devices.yaml"
DEFAULT_QUERY = "default"  # `--adb default`: the configured default device
# Runtime key -> (runner binary's usual name, the model file it runs). The order is the preference when a run
# could be benchmarked by several: ExecuTorch is what ships in apps.
RUNTIMES: dict[str, tuple[str, str]] = {
    "executorch": ("executor_runner", ".pte"),
    "onnxruntime": ("onnxruntime_perf_test", ".onnx"),
    "torch": ("speed_benchmark_torch", ".pt"),
}
_BINARY_NAMES = {binary: runtime for runtime, (binary, _) in RUNTIMES.items()}
_KEYS = ("default_device", "runners", "aliases")
EXAMPLE = "runners: {executorch: /path/to/executor_runner}"


@dataclass
class DevicesConfig:
    """What devices.yaml says, paths resolved."""

    path: Path  # where it was (or would be) read from
    exists: bool  # False: no file, everything empty
    default_device: Optional[str] = None  # the query `--adb default` stands for
    runners: dict[str, Path] = field(default_factory=dict)  # runtime key (RUNTIMES) -> host path of the binary
    aliases: dict[str, str] = field(default_factory=dict)  # alias as written -> codename

    def as_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "exists": self.exists, "default_device": self.default_device,
                "runners": {k: {"path": str(p), "found": p.is_file()} for k, p in self.runners.items()},
                "aliases": dict(self.aliases)}


def config_path() -> Path:
    env = os.environ.get(ENV)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CONFIG_HOME")
    base = Path(xdg).expanduser() if xdg else Path("~/.config").expanduser()
    return base / FILE_NAME


def runtime_of(name: str) -> Optional[str]:
    """`executorch` for `executorch` or `executor_runner` (and likewise for the others); None if unknown."""
    return name if name in RUNTIMES else _BINARY_NAMES.get(name)


def load(path: Optional[Path] = None) -> DevicesConfig:
    """The setup at `path` (default: config_path()); a missing file at the default place is an empty setup, but
    a file named explicitly ($LTMPCTL_DEVICES or `path`) must be readable."""
    explicit = path is not None or bool(os.environ.get(ENV))
    p = Path(path) if path is not None else config_path()
    if not explicit and not p.is_file():
        return DevicesConfig(p, exists=False)
    return _parse(p, _read(p))


def _read(path: Path) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(path.read_text()) or {}
    except OSError as e:
        raise ConfigError(f"can't read the device setup {str(path)!r}: {e.strerror}",
                          f"fix the file or unset ${ENV}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"the device setup {str(path)!r} is not valid YAML: {str(e).splitlines()[0]}",
                          f"write a mapping, e.g. `{EXAMPLE}`") from None
    if not isinstance(data, dict):
        raise ConfigError(f"the device setup {str(path)!r} must be a mapping",
                          f"write e.g. `{EXAMPLE}` or `labphone: panther`")
    return data


def _parse(path: Path, data: dict[str, Any]) -> DevicesConfig:
    if data and not any(k in _KEYS for k in data):  # the older form: nothing but alias -> codename
        data = {"aliases": data}
    unknown = sorted(str(k) for k in data if k not in _KEYS)
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(unknown)}", f"the keys are {', '.join(_KEYS)}")
    cfg = DevicesConfig(path, exists=True)
    default = data.get("default_device")
    if default is not None and not isinstance(default, str):
        raise ConfigError(f"{path}: default_device must be a device name or serial", "e.g. `default_device: pixel7`")
    cfg.default_device = default
    cfg.aliases = _str_map(path, data.get("aliases") or {}, "aliases", "`labphone: panther`")
    for key, value in _str_map(path, data.get("runners") or {}, "runners", f"`{EXAMPLE}`").items():
        runtime = runtime_of(key)
        if runtime is None:
            raise ConfigError(f"{path}: unknown runner {key!r}", f"name one of {', '.join(RUNTIMES)}")
        # Relative paths are read from the file's folder, so a setup can sit next to its binaries.
        cfg.runners[runtime] = (path.parent / Path(value).expanduser())
    return cfg


def _str_map(path: Path, value: Any, what: str, example: str) -> dict[str, str]:
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise ConfigError(f"{path}: {what} must map names to strings", f"write e.g. {example}")
    return dict(value)
