"""Compressor registry, filled once per process from the `ltmpctl.compressors` entry-point group (built-ins
included).

A plugin that fails to load, or a name two distributions register, is recorded, not raised: `ltmpctl plugins`
lists it with its error, and only asking for that name fails. Every other compressor keeps working.
"""
from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, Optional

from .compressor import Compressor
from .errors import PluginError

GROUP = "ltmpctl.compressors"


@dataclass(frozen=True)
class Entry:
    name: str
    cls: Optional[type[Compressor]]  # None when broken
    source: str  # "builtin" or "<distribution> <version>"
    error: Optional[PluginError] = None  # why it can't be used

    @property
    def ok(self) -> bool:
        return self.error is None


_entries: Optional[dict[str, Entry]] = None


def _source(ep: Any) -> str:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return "unknown"
    return "builtin" if dist.name == "ltmpctl" else f"{dist.name} {dist.version}"


def _load(ep: Any, src: str) -> Entry:
    try:
        cls = ep.load()
    except Exception as e:  # a third-party import can raise anything; it must not take the others down
        return Entry(ep.name, None, src, PluginError(
            f"compressor {ep.name!r} from {src} failed to load: {type(e).__name__}: {e}", f"fix or uninstall {src}"))
    if not (isinstance(cls, type) and issubclass(cls, Compressor)):
        return Entry(ep.name, None, src, PluginError(
            f"entry point {ep.name!r} from {src} is not a ltmpctl Compressor class", f"fix or uninstall {src}"))
    return Entry(ep.name, cls, src)


def _scan() -> dict[str, Entry]:
    found: dict[str, Entry] = {}
    first: dict[str, str] = {}  # name -> source of its first registration
    seen: set[tuple[str, str]] = set()
    for ep in entry_points(group=GROUP):
        if (ep.name, ep.value) in seen:  # the same distribution seen twice on sys.path (e.g. editable + site)
            continue
        seen.add((ep.name, ep.value))
        src = _source(ep)
        if ep.name in first:  # ambiguous: neither registration is used
            found[ep.name] = Entry(ep.name, None, f"{first[ep.name]} (and {src})", PluginError(
                f"compressor {ep.name!r} is registered twice: by {first[ep.name]} and by {src} ({ep.value})",
                "uninstall one of the two packages"))
            continue
        first[ep.name] = src
        found[ep.name] = _load(ep, src)
    return found


def entries() -> dict[str, Entry]:
    """Every registration by name, working or broken, scanned and imported once per process."""
    global _entries
    if _entries is None:
        _entries = _scan()
    return _entries


def reload() -> dict[str, Entry]:
    """Scan the entry points again (after installing a plugin into a running process, e.g. in tests)."""
    global _entries
    _entries = None
    return entries()


def discover() -> dict[str, Entry]:
    """The working compressors by name."""
    return {name: e for name, e in entries().items() if e.ok}


def get(name: str) -> type[Compressor]:
    """The compressor class registered as `name`; a broken registration raises its own error."""
    entry = entries().get(name)
    if entry is None:
        raise PluginError(f"unknown compressor {name!r}",
                          f"choose one of: {', '.join(sorted(discover())) or 'none installed'}")
    if entry.error is not None:
        raise entry.error
    assert entry.cls is not None
    return entry.cls


def create(name: str) -> Compressor:
    """An instance of the compressor registered as `name` (what the stages call the contract on)."""
    return get(name)()
