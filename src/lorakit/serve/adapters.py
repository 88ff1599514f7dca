"""The adapters a server knows and the ones resident in the model, with LRU eviction.

Every adapter the server can serve is an :class:`Entry` (public name + folder under the adapter
root). Requests hold their entry from the moment they are accepted until they finish, so
deleting an adapter (``remove``) only takes it out of the catalog: new requests get a 404, and
the weights leave the model once no accepted request still uses them. With a resident limit,
loading one more evicts the least recently used adapter that no running row uses; an evicted
adapter is reloaded from disk when a request needs it again.

Names inside the model are internal (``srv0``, ``srv1``, ...), one per load, so a public name
may be deleted and added again while old requests still run on the old weights. Each public name
also has vLLM's ``lora_int_id`` (1, 2, ... in the order of loading), kept across in-place reloads.

In-place reload (``replace``, vLLM's ``load_inplace``): the new version is loaded (and checked)
under a fresh internal name while the old one keeps serving, then the catalog entry is swapped on
the worker between two decode steps. Rows already generating finish on the version they started
with (never a mix); requests still waiting move to the new version when they are admitted
(``current``); the old weights leave once no row uses them. A failed load leaves the old version
serving, untouched.

Containment: every file an adapter is read from (not only its folder) must resolve, symlinks
included, inside the adapter root. Clients only ever see paths relative to the root.
All methods that touch the model run on the engine's worker thread; ``acquire`` / ``remove`` and
the listings are safe from any thread.
"""

from __future__ import annotations

import itertools
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from ..api import delete, load, set_active, verify
from ..config import ADAPTER_NAME, LoraError
from ..config import check_name as _check_name
from ..state import has_adapters
from ..variants.rewriting_inits import rewrites

__all__ = ["AdapterError", "Entry", "Adapters", "check_name", "resolve_under", "discover", "shown"]

log = logging.getLogger("lorakit.serve")


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
    int_id: int = 0         # vLLM's lora_int_id of the public name (kept by in-place reloads)
    replaced_by: Entry | None = None  # the newer version an in-place reload swapped in


def check_name(name: object, param: str = "name") -> str:
    """A public adapter name, by lorakit's one rule (:func:`lorakit.config.check_name`); else a 400."""
    try:
        return _check_name(name)
    except LoraError as e:
        raise AdapterError(400, str(e), param=param) from None


def shown(root: Path, path: Path | str) -> str:
    """``path`` as a client may see it: relative to the adapter root (never the server's absolute path)."""
    root, path = Path(root).resolve(), Path(path)
    return str(path.relative_to(root)) if path.is_relative_to(root) else path.name


def _outside(root: Path, text: str) -> str:
    """``text`` (e.g. a LoraError message) with the adapter root's absolute path left out."""
    return text.replace(f"{Path(root).resolve()}/", "").replace(str(Path(root).resolve()), ".")


def resolve_under(root: Path, path: str) -> Path:
    """``path`` (relative to ``root``, or absolute) resolved, symlinks included; must stay inside ``root``
    and be an adapter folder whose files all resolve inside ``root`` too."""
    if not isinstance(path, str) or not path or "\x00" in path:
        raise AdapterError(400, "path must be a non-empty string", param="path")
    root = root.resolve()
    target = (root / path).resolve()
    if not target.is_relative_to(root) or target == root:
        raise AdapterError(400, f"path {path!r} is outside the adapter root", code="path_outside_root",
                           param="path")
    if not (target / "adapter_config.json").is_file():
        raise AdapterError(400, f"path {path!r} is not an adapter folder (no adapter_config.json)",
                           code="adapter_not_found", param="path")
    check_contained(root, target)
    return target


def check_contained(root: Path, folder: Path) -> None:
    """Every entry of ``folder`` (the files an adapter is read from) must resolve inside ``root``:
    a file symlinked to somewhere else is refused (AdapterError 400)."""
    root = root.resolve()
    for item in sorted(folder.iterdir()):
        if not item.resolve().is_relative_to(root):
            raise AdapterError(400, f"{shown(root, item)} is a link to a file outside the adapter root",
                               code="path_outside_root", param="path")


def discover(root: Path, log=log.warning, bad: dict[str, str] | None = None) -> dict[str, Path]:
    """``{folder name: folder}`` for every adapter folder directly under ``root`` with a valid name;
    every other entry is reported through ``log`` with the reason, or, given ``bad``, an entry that
    holds an adapter_config.json (an adapter that cannot be served) goes into ``bad`` as
    ``{name: reason}`` instead."""
    found = {}
    for sub in sorted(root.iterdir()) if root.is_dir() else ():
        adapter = (sub / "adapter_config.json").exists() or (sub / "adapter_config.json").is_symlink()
        if not ADAPTER_NAME.fullmatch(sub.name):
            reason = "not a valid adapter name (letters, digits, '_', '-')"
        else:
            try:
                found[sub.name] = resolve_under(root, sub.name)
                continue
            except AdapterError as e:
                reason = e.message
        if bad is not None and adapter:
            bad[sub.name] = reason
        else:
            log(f"lorakit serve: skipping {sub.name!r}: {reason}")
    return found


class Adapters:
    """Catalog (public names) and resident set (in the model) of one served model."""

    def __init__(self, model: nn.Module, root: Path | None, max_resident: int = 0, metrics=None,
                 allow_precision_change: bool = False) -> None:
        self.model, self.root, self.max_resident, self.metrics = model, root, max_resident, metrics
        self.allow_precision_change = allow_precision_change  # lorakit.load's: another base precision is no error
        self.skipped: dict[str, str] = {}  # adapter folders under the root not served (--skip-bad-adapters): why
        self.catalog: dict[str, Entry] = {}
        self.resident: list[Entry] = []
        self.version = 0            # bumped whenever the model's adapters change (routing must be rebuilt)
        self._dropped: list[Entry] = []
        self._ids = itertools.count()
        self._int_ids = itertools.count(1)
        self._lock = threading.Lock()

    # -- any thread ------------------------------------------------------------------------------
    def names(self) -> list[str]:
        with self._lock:
            return sorted(self.catalog)

    def listing(self, detail: bool = False) -> list[dict]:
        """Name and residency of each adapter; ``detail``: also its path (relative to the root), the
        requests holding it and the batch rows using it (both 0 when idle, never negative)."""
        with self._lock:
            return [{"name": e.name, "resident": e.internal is not None, "lora_int_id": e.int_id,
                     **({"path": shown(self.root, e.path) if self.root else e.path.name, "requests": e.holders,
                         "rows": e.rows} if detail else {})}
                    for e in sorted(self.catalog.values(), key=lambda e: e.name)]

    def skipped_listing(self) -> list[dict]:
        """The adapter folders of the root not served (``--skip-bad-adapters``), each with its reason."""
        with self._lock:
            return [{"name": name, "reason": why} for name, why in sorted(self.skipped.items())]

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

    def current(self, entry: Entry) -> Entry:
        """The newest version of ``entry`` (after in-place reloads), the request's hold moved to it."""
        with self._lock:
            newest = entry
            while newest.replaced_by is not None:
                newest = newest.replaced_by
            if newest is not entry:
                entry.holders -= 1
                newest.holders += 1
            return newest

    def name_of(self, int_id: int) -> str | None:
        """The public name whose ``lora_int_id`` is ``int_id``, or None."""
        with self._lock:
            return next((e.name for e in self.catalog.values() if e.int_id == int_id), None)

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
        """Check an adapter completely (config, keys, shapes, finite values; the tensors are read and
        dropped) and list it without loading it (it loads on first use). Raises AdapterError."""
        self._guarded(name, path, lambda: verify(self.model, path, adapter="srvcheck",
                                                 allow_precision_change=self.allow_precision_change))
        with self._lock:
            entry = self.catalog[check_name(name)] = Entry(name, path, int_id=next(self._int_ids))
            return entry

    # -- worker thread -----------------------------------------------------------------------------
    def add(self, name: str, path: Path) -> Entry:
        """Load a new adapter (validating its file) and list it. Raises AdapterError."""
        with self._lock:
            if name in self.catalog:
                raise AdapterError(409, f"adapter {name!r} already exists; delete it first", code="adapter_exists")
        entry = Entry(name, path, int_id=next(self._int_ids))
        self._load(entry)
        with self._lock:
            self.catalog[name] = entry
            self.skipped.pop(name, None)
        self.evict_over_limit()
        return entry

    def replace(self, name: str, path: Path) -> Entry:
        """In-place reload (see the module doc): load ``path`` as the new version of ``name``, same
        ``lora_int_id``; a name not loaded is simply added (as vLLM's ``load_inplace`` does). Raises
        AdapterError, the old version still serving."""
        with self._lock:
            old = self.catalog.get(name)
        entry = Entry(name, path, int_id=old.int_id if old is not None else next(self._int_ids))
        self._load(entry)
        with self._lock:
            old = self.catalog.get(name)  # again: a delete may have come meanwhile
            self.catalog[name] = entry
            if old is not None:
                old.replaced_by, old.removed = entry, True
                self._dropped.append(old)
        self.collect()
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

    def _guarded(self, name: str, path: Path, action) -> None:
        """Run ``action()`` (a check or load of ``path``) after the containment check; its errors
        become AdapterError 400 with the root's absolute path left out."""
        try:
            if self.root is not None:
                check_contained(self.root, path)
            try:
                config = json.loads((path / "adapter_config.json").read_text())
            except (ValueError, UnicodeDecodeError):
                raise LoraError("adapter_config.json is not valid JSON") from None
            if not isinstance(config, dict):
                raise LoraError("adapter_config.json does not hold a JSON object")
            if isinstance(config.get("init_lora_weights"), str) and rewrites(config["init_lora_weights"]):
                raise LoraError(f"init_lora_weights={config['init_lora_weights']!r} rewrites the shared base "
                                "weights; serve it converted to plain LoRA (lorakit.save(..., convert_to_lora=True))")
            action()
        except (LoraError, OSError, ValueError) as e:
            message = str(e) if self.root is None else _outside(self.root, str(e))
            raise AdapterError(400, f"cannot load adapter {name!r}: {message}") from None

    def _load(self, entry: Entry) -> None:
        internal = f"srv{next(self._ids)}"
        try:
            self._guarded(entry.name, entry.path, lambda: load(self.model, entry.path, adapter=internal,
                                                                allow_precision_change=self.allow_precision_change))
        finally:
            if has_adapters(self.model):
                set_active(self.model, [])  # rows choose adapters through lorakit.mixed only
        entry.internal = internal
        self.resident.append(entry)
        self.version += 1
        if self.metrics:
            self.metrics.inc("lorakit_adapter_loads_total")

    def _unload(self, entry: Entry, evicted: bool = False) -> None:
        delete(self.model, entry.internal)
        entry.internal = None
        self.resident.remove(entry)
        self.version += 1
        if evicted and self.metrics:
            self.metrics.inc("lorakit_adapter_evictions_total")
