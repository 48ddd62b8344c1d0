"""Android devices: the alias table, parsing `adb devices -l`, and picking one device from a user's query.

A query may be a serial (exact), a model as adb prints it (`Pixel_7`, also written `Pixel 7` or `pixel7`), a
device codename (`panther`), an alias from ALIASES / the user's devices.yaml (`pixel7` -> `panther`), or `default`
(devices.yaml's default_device; with none set, the one attached device).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..errors import DeviceError

# Marketing name -> device codename (what `adb devices -l` prints as device:/product:). Extend it with `aliases:`
# in the user's devices.yaml (devconfig) rather than here.
ALIASES: dict[str, str] = {
    "pixel6": "oriole",
    "pixel6pro": "raven",
    "pixel6a": "bluejay",
    "pixel7": "panther",
    "pixel7pro": "cheetah",
    "pixel7a": "lynx",
    "pixelfold": "felix",
    "pixeltablet": "tangorpro",
    "pixel8": "shiba",
    "pixel8pro": "husky",
    "pixel8a": "akita",
    "pixel9": "tokay",
    "pixel9pro": "caiman",
    "pixel9proxl": "komodo",
    "pixel9profold": "comet",
    "pixel9a": "tegu",
}
READY = "device"  # the state adb gives a usable device
_QUALIFIERS = ("usb", "product", "model", "device", "transport_id")


class AdbNotFoundError(DeviceError):
    exit_code = 40


class NoDevicesError(DeviceError):
    exit_code = 41


class DeviceNotFoundError(DeviceError):
    exit_code = 42


class AmbiguousDeviceError(DeviceError):
    exit_code = 43


class DeviceUnauthorizedError(DeviceError):
    exit_code = 44


class DeviceOfflineError(DeviceError):
    exit_code = 45


@dataclass(frozen=True)
class Device:
    serial: str
    state: str  # device, unauthorized, offline, recovery, "no permissions (...)", ...
    model: Optional[str] = None  # e.g. Pixel_7 (adb replaces spaces by underscores)
    device: Optional[str] = None  # codename, e.g. panther
    product: Optional[str] = None
    transport_id: Optional[str] = None

    def describe(self) -> str:
        """`serial (model, state)` for error messages and listings."""
        what = ", ".join(x for x in (self.model or self.device, None if self.state == READY else self.state) if x)
        return f"{self.serial} ({what})" if what else self.serial


def normalize(name: str) -> str:
    """Compare models and aliases ignoring case, spaces, underscores and dashes: `Pixel 7` == `Pixel_7` == `pixel7`."""
    return re.sub(r"[\s_\-]+", "", name).lower()


def load_aliases(path: Optional[Path] = None) -> dict[str, str]:
    """ALIASES merged with the user's devices.yaml aliases (alias -> codename); the user's entries win."""
    from . import devconfig

    merged = dict(ALIASES)
    merged.update({normalize(k): v for k, v in devconfig.load(path).aliases.items()})
    return merged


def parse_devices(output: str) -> list[Device]:
    """Devices from `adb devices -l` output; daemon start-up chatter and the header are skipped."""
    found = []
    for line in output.splitlines():
        line = line.strip()
        if not line or line.startswith("*") or line.startswith("List of devices"):
            continue
        serial, *rest = line.split()
        quals: dict[str, str] = {}
        state_words = []
        for token in rest:
            key, sep, value = token.partition(":")
            if sep and key in _QUALIFIERS:
                if key != "usb":  # the USB port path says nothing about which phone it is
                    quals[key] = value
            else:  # states can be several words: "no permissions (user ... rules wrong?); see [...]"
                state_words.append(token)
        found.append(Device(serial=serial, state=" ".join(state_words) or "unknown", **quals))
    return found


def _matches(query: str, devices: list[Device], aliases: dict[str, str]) -> list[Device]:
    exact = [d for d in devices if d.serial == query]
    if exact:
        return exact  # a serial is unique, whatever else the query resembles
    q = normalize(query)
    codename = normalize(aliases.get(q, ""))
    names = {q, codename} - {""}

    def hit(d: Device) -> bool:
        fields = [d.model, d.device, d.product]
        return any(f is not None and normalize(f) in names for f in fields)

    return [d for d in devices if hit(d)]


def _listing(devices: list[Device]) -> str:
    return ", ".join(d.describe() for d in devices)


def check_ready(dev: Device) -> Device:
    """The device if adb can talk to it, else the error for its state."""
    if dev.state == READY:
        return dev
    if dev.state == "unauthorized":
        raise DeviceUnauthorizedError(f"device {dev.serial} is unauthorized",
                                      "accept the USB debugging prompt on the phone, then retry")
    if dev.state == "offline":
        raise DeviceOfflineError(f"device {dev.serial} is offline",
                                 "reconnect the cable or run `adb reconnect offline`, then retry")
    raise DeviceError(f"device {dev.serial} is not ready (state: {dev.state})",
                      "`adb devices -l` shows its state; see adb's documentation for it")


def resolve(query: str, devices: list[Device], aliases: Optional[dict[str, str]] = None) -> Device:
    """The one attached device the query names: by serial, model, codename or alias; errors say what is attached."""
    if not devices:
        raise NoDevicesError("no Android devices attached",
                             "plug the phone in with USB debugging on; `adb devices -l` should list it")
    matches = _matches(query, devices, load_aliases() if aliases is None else aliases)
    if not matches:
        hint = f"attached: {_listing(devices)}"
        if any(d.state != READY for d in devices):
            hint += "; devices that are not ready don't report their model, so pass their serial"
        raise DeviceNotFoundError(f"no attached device matches {query!r}", hint)
    if len(matches) > 1:
        raise AmbiguousDeviceError(f"{len(matches)} attached devices match {query!r}: {_listing(matches)}",
                                   "pass the serial of the one you mean")
    return check_ready(matches[0])


def default_query(configured: Optional[str], devices: list[Device]) -> str:
    """What `--adb default` stands for: devices.yaml's default_device, else the one ready device attached."""
    if configured:
        return configured
    ready = [d for d in devices if d.state == READY]
    if len(ready) == 1:
        return ready[0].serial
    if not devices:
        raise NoDevicesError("no Android devices attached",
                             "plug the phone in with USB debugging on; `adb devices -l` should list it")
    raise AmbiguousDeviceError(f"`--adb default` but devices.yaml sets no default_device and {len(ready)} devices "
                               f"are ready: {_listing(ready) or 'none'}",
                               "add `default_device: NAME` to devices.yaml (`ltmpctl devices` shows where it is), "
                               "or pass --adb NAME")
