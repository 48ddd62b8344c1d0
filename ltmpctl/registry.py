"""Compressor registry, filled from the `ltmpctl.compressors` entry-point group (built-ins included)."""
from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

from .compressor import Compressor
from .errors import PluginError

GROUP = "ltmpctl.compressors"


@dataclass(frozen=True)
class Entry:
    name: str
    cls: type[Compressor]
    source: str  # "builtin" or "<distribution> <version>"


def _source(ep: Any) -> str:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return "unknown"
    return "builtin" if dist.name == "ltmpctl" else f"{dist.name} {dist.version}"


def discover() -> dict[str, Entry]:
    """All registered compressors by name. Two registrations of one name is an error naming both sources."""
    found: dict[str, Entry] = {}
    seen: set[tuple[str, str]] = set()
    for ep in entry_points(group=GROUP):
        src = _source(ep)
        if (ep.name, ep.value) in seen:  # the same distribution seen twice on sys.path (e.g. editable + site)
            continue
        seen.add((ep.name, ep.value))
        if ep.name in found:
            raise PluginError(f"compressor {ep.name!r} is registered twice: by {found[ep.name].source} "
                              f"and by {src} ({ep.value})", "uninstall one of the two packages")
        try:
            cls = ep.load()
        except Exception as e:
            raise PluginError(f"compressor {ep.name!r} from {src} failed to load: {type(e).__name__}: {e}",
                              f"fix or uninstall {src}") from None
        if not (isinstance(cls, type) and issubclass(cls, Compressor)):
            raise PluginError(f"entry point {ep.name!r} from {src} is not a ltmpctl Compressor class",
                              f"fix or uninstall {src}")
        found[ep.name] = Entry(ep.name, cls, src)
    return found


def get(name: str) -> type[Compressor]:
    entries = discover()
    if name not in entries:
        raise PluginError(f"unknown compressor {name!r}",
                          f"choose one of: {', '.join(sorted(entries)) or 'none installed'}")
    return entries[name].cls
