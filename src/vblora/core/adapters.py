"""The set of adapters one model holds: which are active, which stay frozen, which keep their
composed factors (an LRU bound), and the passes in flight.

Each forward pass begins by composing the factors of the adapters it uses (one batched
composition per adapter, cached in inference) and ends by releasing them. Passes are tracked per
thread, so two threads running passes on one model at once never end or evict each other's.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

import torch
from torch import nn

from .bank import AdapterBank


def _alive(thread: weakref.ref[threading.Thread] | None) -> bool:
    if thread is None:
        return True
    t = thread()
    return t is not None and t.is_alive()


class AdapterSet:
    """The adapters of one model, by name; ``banks`` is the model's own (registered) ModuleDict."""

    def __init__(self, banks: nn.ModuleDict) -> None:
        self.banks = banks
        self.active: tuple[str, ...] = ()
        self.frozen: set[str] = set()  # adapters loaded for inference: never made trainable
        self._max_cached: int | None = 8
        self._recent: dict[str, None] = {}  # adapters with composed factors, least recent first
        # Per layer path, the stacked factors of the last mixed batch there (routing.RowRouting's
        # ``stacks``): kept while that batch's adapters keep their factors, so decoding steps do not
        # restack them; dropped with any eviction or deletion, so they never outlive the factors.
        self.stacks: dict[str, Any] = {}
        self._init_passes()

    def _init_passes(self) -> None:
        # Each thread records its pass in its own cell (a one-item list), so passes need no lock
        # (torch.compile traces none) and one thread never ends or evicts another's pass. _cells
        # holds one per live thread that ran a pass; _owners, in the same order, those threads
        # (weakly). Both lists are replaced together, never changed in place.
        self._cells: list[list[tuple[str, ...]]] = []
        self._owners: list[weakref.ref[threading.Thread] | None] = []  # None: not known, kept
        self._cells_lock = threading.Lock()  # taken once per new thread, never during a pass
        self._local = threading.local()  # .cell: this thread's

    def __getstate__(self) -> dict[str, Any]:  # deepcopy/pickle: thread state and stacks stay behind
        state = self.__dict__.copy()
        del state["_cells"], state["_owners"], state["_local"], state["_cells_lock"]
        state["stacks"] = {}  # weak references cannot be pickled, and the copy composes its own
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_passes()

    def _cell(self) -> list[tuple[str, ...]]:
        cell = getattr(self._local, "cell", None)
        if cell is None:
            cell = self._local.cell = [()]
            if torch.compiler.is_compiling():  # no lock, no thread object in a traced graph: kept
                self._owners, self._cells = [*self._owners, None], [*self._cells, cell]
                return cell
            me = weakref.ref(threading.current_thread())
            with self._cells_lock:  # a thread that has ended leaves its cell: dropped here, so a
                # thread-per-request server does not grow the list (or the walk of _in_flight)
                live = [(t, c) for t, c in zip(self._owners, self._cells) if _alive(t)]
                self._owners = [*(t for t, _ in live), me]
                self._cells = [*(c for _, c in live), cell]
        return cell

    def _in_flight(self) -> set[str]:
        return {name for cell in self._cells for name in cell[0]}  # the list is replaced, never changed

    def bank(self, name: str) -> AdapterBank:
        return self.banks[name]  # type: ignore[return-value]

    # ------------------------------------------------------------------ the factor cache
    @property
    def max_cached(self) -> int | None:
        return self._max_cached

    @max_cached.setter
    def max_cached(self, value: int | None) -> None:
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"max_cached_adapters must be a positive int or None, got {value!r}")
        self._max_cached = value
        self._evict()

    def _evict(self) -> None:
        """Drop the composed factors of the least recently used adapters beyond the bound; the
        adapters of passes in flight are kept."""
        if self._max_cached is None or len(self._recent) <= self._max_cached:
            return
        in_flight = self._in_flight()
        for name in list(self._recent):
            if len(self._recent) <= self._max_cached:
                break
            if name not in in_flight:
                del self._recent[name]
                self.bank(name).clear_cache()
                self.stacks.clear()

    # ------------------------------------------------------------------ passes
    def begin_pass(self, names: tuple[str, ...]) -> None:
        """Compose the factors of ``names`` for a pass of this thread (ending its previous one:
        a pass stopped by Ctrl-C never ran its end)."""
        self.end_pass()
        names = tuple(dict.fromkeys(n for n in names if n in self.banks))
        self._cell()[0] = names
        for name in names:
            bank = self.bank(name)
            bank.refresh()
            bank.in_pass = True  # its layers need not check the factors again during this pass
            self._recent.pop(name, None)
            self._recent[name] = None  # most recent last
        self._evict()

    def end_pass(self) -> None:
        """Release the adapters of this thread's pass, if one is in flight."""
        cell = self._cell()
        names, cell[0] = cell[0], ()
        if not names:
            return
        in_flight = self._in_flight()
        for name in names:
            if name not in in_flight and name in self.banks:
                # Another thread starting a pass meanwhile sees in_pass False: its layers then
                # check their factors, slower but correct.
                self.bank(name).in_pass = False

    def forget(self, name: str) -> None:
        """Drop every record of a deleted adapter."""
        self.frozen.discard(name)
        self._recent.pop(name, None)
        self.stacks.clear()
