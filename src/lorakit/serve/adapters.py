"""The adapters a server knows and the ones resident in the model, with LRU eviction.

Every adapter the server can serve is an :class:`Entry` (public name + folder under the adapter
root). Requests hold their entry from the moment they are accepted until they finish, so
deleting an adapter (``remove``) only takes it out of the catalog: new requests get a 404, and
the weights leave the model once no accepted request still uses them. With a resident limit,
loading one more evicts the least recently used adapter that no running row uses; an evicted
adapter is reloaded from disk when a request needs it again.

Names inside the model are internal (``srv0``, ``srv1``, ...), one per load, so a public name
may be deleted and added again while old requests still run on the old weights.
All methods that touch the model run on the engine's worker thread; ``acquire`` / ``remove`` and
the listings are safe from any thread.
"""

from __future__ import annotations

import itertools
import json
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from ..config import LoraError

__all__ = ["AdapterError", "Entry", "Adapters", "check_name", "resolve_under", "discover"]

NAME = re.compile(r"[A-Za-z0-9_-]{1,128}")


class AdapterError(Exception):
    """A client error about adapters: ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str, code: str = "invalid_adapter", param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param


@dataclass(eq=False)
class Entry:
    """One servable adapter; ``internal`` is its name inside the model while resident."""

    name: str
    path: Path
    internal: str | None = None
    holders: int = 0        # accepted requests (queued or running) that use it
    rows: int = 0           # rows of the decode batch (or the prefill) using it now
    removed: bool = False   # deleted from the catalog; unloaded once holders == 0
    last_used: float = field(default_factory=time.monotonic)


def check_name(name: object, param: str = "name") -> str:
    """A public adapter name: letters, digits, '_' and '-' only (no path separators, no dots)."""
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise AdapterError(400, f"invalid adapter name {name!r}: use 1-128 letters, digits, '_' or '-'",
                           param=param)
    return name


def resolve_under(root: Path, path: str) -> Path:
    """``path`` (relative to ``root``, or absolute) resolved, symlinks included; must stay inside ``root``
    and be an adapter folder."""
    if not isinstance(path, str) or not path or "\x00" in path:
        raise AdapterError(400, "path must be a non-empty string", param="path")
    root = root.resolve()
    target = (root / path).resolve()
    if not target.is_relative_to(root) or target == root:
        raise AdapterError(400, f"path {path!r} is outside the adapter root", code="path_outside_root",
                           param="path")
    if not (target / "adapter_config.json").is_file():
        raise AdapterError(400, f"path {path!r} is not an adapter folder (no adapter_config.json)", param="path")
    return target


def discover(root: Path) -> dict[str, Path]:
    """``{folder name: folder}`` for every adapter folder directly under ``root`` with a valid name."""
    found = {}
    for sub in sorted(root.iterdir()) if root.is_dir() else ():
        if NAME.fullmatch(sub.name):
            try:
                found[sub.name] = resolve_under(root, sub.name)  # symlinks leaving the root are skipped
            except AdapterError:
                pass
    return found


class Adapters:
    """Catalog (public names) and resident set (in the model) of one served model."""

    def __init__(self, model: nn.Module, root: Path | None, max_resident: int = 0, metrics=None) -> None:
        self.model, self.root, self.max_resident, self.metrics = model, root, max_resident, metrics
        self.catalog: dict[str, Entry] = {}
        self.resident: list[Entry] = []
        self.version = 0            # bumped whenever the model's adapters change (routing must be rebuilt)
        self._dropped: list[Entry] = []
        self._ids = itertools.count()
        self._lock = threading.Lock()

    # -- any thread ------------------------------------------------------------------------------
    def names(self) -> list[str]:
        with self._lock:
            return sorted(self.catalog)

    def listing(self) -> list[dict]:
        with self._lock:
            return [{"name": e.name, "path": str(e.path), "resident": e.internal is not None}
                    for e in sorted(self.catalog.values(), key=lambda e: e.name)]

    def acquire(self, name: str) -> Entry:
        """The entry of adapter ``name``, held for one request (release it when the request ends)."""
        with self._lock:
            entry = self.catalog.get(name)
            if entry is None:
                raise KeyError(name)
            entry.holders += 1
            return entry

    def release(self, entry: Entry) -> None:
        with self._lock:
            entry.holders -= 1

    def remove(self, name: str) -> Entry:
        """Take ``name`` out of the catalog now; its weights go once no request holds it."""
        with self._lock:
            entry = self.catalog.pop(name, None)
            if entry is None:
                raise KeyError(name)
            entry.removed = True
            self._dropped.append(entry)
            return entry

    def register(self, name: str, path: Path) -> Entry:
        """List an adapter without loading it (it loads on first use)."""
        with self._lock:
            entry = self.catalog[check_name(name)] = Entry(name, path)
            return entry

    # -- worker thread -----------------------------------------------------------------------------
    def add(self, name: str, path: Path) -> Entry:
        """Load a new adapter (validating its file) and list it. Raises AdapterError."""
        with self._lock:
            if name in self.catalog:
                raise AdapterError(409, f"adapter {name!r} already exists; delete it first", code="adapter_exists")
        entry = Entry(name, path)
        self._load(entry)
        with self._lock:
            self.catalog[name] = entry
        self.evict_over_limit()
        return entry

    def ensure(self, entry: Entry) -> bool:
        """Make ``entry`` resident (evicting the LRU idle adapter at the limit); False if it cannot be now."""
        entry.last_used = time.monotonic()
        if entry.internal is not None:
            return True
        if self.max_resident and len(self.resident) >= self.max_resident:
            idle = [e for e in self.resident if e.rows == 0]
            if not idle:
                return False
            self._unload(min(idle, key=lambda e: e.last_used), evicted=True)
        self._load(entry)
        return True

    def collect(self) -> None:
        """Unload deleted adapters that no request holds any more."""
        for entry in list(self._dropped):
            if entry.holders <= 0 and entry.rows == 0:
                self._dropped.remove(entry)
                if entry.internal is not None:
                    self._unload(entry)

    def evict_over_limit(self) -> None:
        while self.max_resident and len(self.resident) > self.max_resident:
            idle = [e for e in self.resident if e.rows == 0]
            if not idle:
                return
            self._unload(min(idle, key=lambda e: e.last_used), evicted=True)

    def _load(self, entry: Entry) -> None:
        import lorakit
        internal = f"srv{next(self._ids)}"
        try:
            config = json.loads((entry.path / "adapter_config.json").read_text())
            if config.get("modules_to_save"):
                raise LoraError("adapters with modules_to_save cannot be served in mixed batches")
            lorakit.load(self.model, entry.path, adapter=internal)
        except (LoraError, OSError, ValueError) as e:
            raise AdapterError(400, f"cannot load adapter {entry.name!r}: {e}") from None
        finally:
            if "lorakit_registry" in self.model.__dict__:
                lorakit.set_active(self.model, [])  # rows choose adapters through lorakit.mixed only
        entry.internal = internal
        self.resident.append(entry)
        self.version += 1
        if self.metrics:
            self.metrics.inc("lorakit_adapter_loads_total")

    def _unload(self, entry: Entry, evicted: bool = False) -> None:
        import lorakit
        lorakit.delete(self.model, entry.internal)
        entry.internal = None
        self.resident.remove(entry)
        self.version += 1
        if evicted and self.metrics:
            self.metrics.inc("lorakit_adapter_evictions_total")
