"""The adapter store: folders of adapters on disk, loaded by name on first use into one live model.

An adapter is a compact ``<folder>/<name>.vblora`` file or an adapter directory
``<folder>/<name>/adapter_config.json`` (ours or PEFT's, full or top-k), or a path registered by
name (:meth:`AdapterStore.register`, vLLM's ``/v1/load_lora_adapter``). Nothing is read when the
store opens: a name is looked up with two ``stat`` calls when it is asked for, so folders of 10,000
adapters cost no start-up time, and files added, replaced or removed while serving are seen on the
next request without a restart.

Resident adapters (loaded into the model) are bounded by a count and by bytes; the least recently
used one that no batch is using is evicted first. Every load is checked as ``load_compact`` and
``load_adapter`` check it, so a bad file is that request's error (:class:`AdapterLoadError`) and
leaves the model as it was. Every method is thread-safe (one lock); a batch pins the adapters it
runs with (:meth:`AdapterStore.pinned`) so that no other thread evicts or replaces them mid-pass.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from ..core.routing import BASE_ADAPTER
from ..files import load_compact
from ..formats.readers import CONFIG_NAME, WEIGHTS_NAME
from ..model import VBLoRAModel
from .metrics import Histogram

COMPACT_SUFFIX = ".vblora"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,199}")


class UnknownAdapter(LookupError):
    """No adapter of that name in the store's folders or registrations (HTTP 404)."""


class AdapterLoadError(ValueError):
    """The adapter exists but cannot be loaded into the model (a bad or mismatched file)."""


@dataclass
class _Resident:
    path: Path
    stamp: tuple[int, ...]  # what the files looked like when loaded (inode, mtime, size)
    nbytes: int
    pins: int = 0
    stale: bool = field(default=False)  # replaced or removed on disk: drop once unpinned


LOAD_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)


@dataclass
class StoreStats:
    loads: int = 0
    evictions: int = 0
    load_failures: int = 0
    load_seconds: Histogram = field(default_factory=lambda: Histogram(LOAD_SECONDS))


def valid_name(name: object) -> bool:
    """A name a request may use: letters, digits and ``._@+-``, no path separators, no ``..``."""
    return isinstance(name, str) and bool(_NAME.fullmatch(name)) and ".." not in name


def find_adapter(folders: Sequence[Path], name: str) -> Path | None:
    """``<folder>/<name>.vblora`` or ``<folder>/<name>/`` (an adapter directory) in the first folder
    that holds one; None for an unsafe name or none found. Two ``stat`` calls per folder."""
    if not valid_name(name) or name == BASE_ADAPTER:
        return None
    for folder in folders:
        for path in (folder / f"{name}{COMPACT_SUFFIX}", folder / name):
            if stamp_of(path) is not None:
                return path
    return None


def stamp_of(path: Path) -> tuple[int, ...] | None:
    """(inode, mtime_ns, size) of the file(s) an adapter is read from, or None when absent."""
    files = [path] if path.suffix == COMPACT_SUFFIX else [path / CONFIG_NAME, path / WEIGHTS_NAME]
    stamp: tuple[int, ...] = ()
    for f in files:
        try:
            st = f.stat()
        except OSError:
            return None
        stamp += (st.st_ino, st.st_mtime_ns, st.st_size)
    return stamp


def adapter_bytes(model: VBLoRAModel, name: str) -> int:
    """Memory an adapter holds in the model: its bank, selection (or logits), copies and biases."""
    tensors = list(model.vblora_banks[name].state_dict().values())
    tensors += [p for _, p in model.trained_biases(name).items()]
    return sum(t.numel() * t.element_size() for t in tensors)


class AdapterStore:
    """Adapters on disk, loaded on demand into one model, least recently used evicted.

    Args:
        base: the plain base model (wrapped in a :class:`VBLoRAModel` on the first load).
        folders: folders of ``<name>.vblora`` files and ``<name>/`` adapter directories; the first
            folder holding a name wins.
        max_adapters: most adapters resident at once (an adapter in use by a batch is never evicted,
            so a batch may exceed it briefly).
        max_bytes: most bytes of adapter state resident at once (None: no byte bound).
    """

    def __init__(
        self,
        base: nn.Module,
        folders: Sequence[str | os.PathLike[str]] = (),
        *,
        max_adapters: int = 64,
        max_bytes: int | None = None,
    ) -> None:
        if isinstance(base, VBLoRAModel):
            raise TypeError("AdapterStore takes the plain base model; it wraps it on the first load")
        if max_adapters < 1 or (max_bytes is not None and max_bytes < 1):
            raise ValueError(f"max_adapters and max_bytes must be positive, got {max_adapters}, {max_bytes}")
        self.base = base
        self.model: VBLoRAModel | None = None
        self.folders = [Path(f) for f in folders]
        for folder in self.folders:
            if not folder.is_dir():
                raise ValueError(f"{folder}: not a folder of adapters")
        self.max_adapters = max_adapters
        self.max_bytes = max_bytes
        self.stats = StoreStats()
        self.lock = threading.RLock()  # held by loads, evictions and every forward pass of a batch
        self._registered: dict[str, Path] = {}
        self._resident: OrderedDict[str, _Resident] = OrderedDict()  # least recent first

    # ------------------------------------------------------------------ the index (lazy)
    def locate(self, name: str) -> Path | None:
        """Where adapter ``name`` is on disk now, or None."""
        if not valid_name(name) or name == BASE_ADAPTER:
            return None
        registered = self._registered.get(name)  # no lock: the event loop must not wait for a batch step
        if registered is not None:
            return registered if stamp_of(registered) is not None else None
        return find_adapter(self.folders, name)

    def forget_missing(self, name: str) -> None:
        """Drop a resident adapter whose file is gone (without waiting: when a batch holds the lock,
        the next load of that name finds it gone instead)."""
        if name in self._resident and self.lock.acquire(blocking=False):
            try:
                entry = self._resident.get(name)
                if entry is not None and self.locate(name) is None:
                    entry.stale = True
                    self._drop_stale()
            finally:
                self.lock.release()

    def names(self) -> list[str]:
        """Every adapter known now: registered ones, then the folders' (one directory listing each)."""
        found = dict.fromkeys(list(self._registered))  # a snapshot, without waiting for a batch step
        for folder in self.folders:
            try:
                entries = sorted(os.scandir(folder), key=lambda e: e.name)
            except OSError:
                continue
            for entry in entries:
                if entry.name.endswith(COMPACT_SUFFIX) and entry.is_file():
                    name = entry.name[: -len(COMPACT_SUFFIX)]
                elif entry.is_dir() and os.path.isfile(os.path.join(entry.path, CONFIG_NAME)):
                    name = entry.name
                else:
                    continue
                if valid_name(name) and name != BASE_ADAPTER:
                    found.setdefault(name)
        return list(found)

    def resident(self) -> list[str]:
        """The resident adapters, least recent first (a snapshot: ``list`` of a dict is atomic)."""
        return list(self._resident)

    def resident_bytes(self) -> int:
        return sum(r.nbytes for r in list(self._resident.values()))

    # ------------------------------------------------------------------ registration (vLLM's API)
    def register(self, name: str, path: str | os.PathLike[str], *, load: bool = True) -> None:
        """Serve ``path`` (a ``.vblora`` file or an adapter directory) as ``name``; loaded now when
        ``load`` so that a bad file is refused at once.

        Raises:
            ValueError: a bad name, a name already registered, or a path that is no adapter.
            AdapterLoadError: the adapter does not load into the model (nothing registered).
        """
        if not valid_name(name) or name == BASE_ADAPTER:
            raise ValueError(f"invalid adapter name {name!r}: use letters, digits and ._@+- only")
        source = Path(path)
        if stamp_of(source) is None:
            raise ValueError(
                f"{source}: not a {COMPACT_SUFFIX} file or an adapter directory with {CONFIG_NAME}"
            )
        with self.lock:
            if name in self._registered:
                raise ValueError(f"the adapter {name!r} has already been loaded")
            self._registered[name] = source
            if load:
                try:
                    with self.pinned([name]):
                        pass
                except BaseException:
                    del self._registered[name]
                    raise

    def unregister(self, name: str) -> None:
        """Stop serving a registered adapter (or drop a folder adapter from memory until next used).

        Raises:
            UnknownAdapter: neither registered nor resident.
        """
        with self.lock:
            known = self._registered.pop(name, None) is not None or name in self._resident
            if not known:
                raise UnknownAdapter(name)
            entry = self._resident.get(name)
            if entry is not None:
                entry.stale = True
                self._drop_stale()

    # ------------------------------------------------------------------ loading and eviction
    @contextlib.contextmanager
    def pinned(self, names: Sequence[str]) -> Iterator[VBLoRAModel | nn.Module]:
        """Load every adapter of ``names`` (``__base__`` and repeats skipped) and keep them resident
        until the block ends; yields the model to run (the plain base before any adapter loads).

        Raises:
            UnknownAdapter: a name is in no folder or registration.
            AdapterLoadError: a file cannot be loaded (the model is unchanged).
        """
        wanted = [n for n in dict.fromkeys(names) if n != BASE_ADAPTER]
        pinned: list[str] = []
        with self.lock:
            try:
                for name in wanted:
                    self._ensure(name)
                    self._resident[name].pins += 1
                    pinned.append(name)
                self._evict()
                model = self.model if self.model is not None else self.base
            except BaseException:
                self._unpin(pinned)
                raise
        try:
            yield model
        finally:
            with self.lock:
                self._unpin(pinned)

    def _unpin(self, names: list[str]) -> None:
        for name in names:
            self._resident[name].pins -= 1
            self._resident.move_to_end(name)  # used until now: the most recent
        self._drop_stale()
        self._evict()

    def _ensure(self, name: str) -> None:
        """Make ``name`` resident and current (reloaded when its file changed on disk)."""
        path = self.locate(name)
        entry = self._resident.get(name)
        if path is None:
            if entry is not None:
                entry.stale = True
                self._drop_stale()
            raise UnknownAdapter(name)
        stamp = stamp_of(path)
        if entry is not None and entry.path == path and entry.stamp == stamp:
            self._resident.move_to_end(name)
            return
        if entry is not None:
            if entry.pins:  # a batch in flight uses the old version; this batch waits for neither
                self._resident.move_to_end(name)
                return
            self._remove(name)
        self._load(name, path, stamp)

    def _load(self, name: str, path: Path, stamp: tuple[int, ...] | None) -> None:
        start = time.perf_counter()
        target: nn.Module = self.model if self.model is not None else self.base
        try:
            if path.suffix == COMPACT_SUFFIX:
                model = load_compact(target, path, name)
            elif isinstance(target, VBLoRAModel):
                target.load_adapter(path, name, is_trainable=False)
                model = target
            else:
                model = VBLoRAModel.from_pretrained(target, path, name, is_trainable=False)
        except (ValueError, TypeError, OSError) as err:
            self.stats.load_failures += 1
            raise AdapterLoadError(f"adapter {name!r} ({path}): {err}") from None
        self.model = model
        nbytes = adapter_bytes(model, name)
        self._resident[name] = _Resident(path, stamp or (), nbytes)
        self.stats.loads += 1
        self.stats.load_seconds.observe(time.perf_counter() - start)

    def _remove(self, name: str) -> None:
        del self._resident[name]
        if self.model is not None and name in self.model.peft_config:
            self.model.delete_adapter(name)

    def _drop_stale(self) -> None:
        for name in [n for n, r in self._resident.items() if r.stale and not r.pins]:
            self._remove(name)

    def _evict(self) -> None:
        """Evict least recently used, unpinned adapters until both bounds hold (or only pinned
        adapters are left)."""

        def over() -> bool:
            total = sum(r.nbytes for r in self._resident.values())
            return len(self._resident) > self.max_adapters or (
                self.max_bytes is not None and total > self.max_bytes
            )

        for name in list(self._resident):
            if not over():
                break
            if not self._resident[name].pins:
                self._remove(name)
                self.stats.evictions += 1
