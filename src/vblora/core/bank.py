"""Per-adapter state: one vector bank, one logits table, and the layout that maps modules to rows.

All sub-vectors of all adapted modules live in one ``(P, h)`` logits table, so a forward pass
composes every A and B of the model with one top-k, one softmax and one weighted gather. In
inference (no autograd graph needed) the composed factors are cached and reused until a
parameter changes (tracked through the parameters' version counters and storage).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from . import functional as VF


@dataclass(frozen=True)
class Slot:
    """Where one module's sub-vectors sit in the logits table, and the module's shapes."""

    a_offset: int
    b_offset: int
    r: int
    in_features: int
    out_features: int
    vector_length: int

    @property
    def a_rows(self) -> int:
        return self.r * self.in_features // self.vector_length

    @property
    def b_rows(self) -> int:
        return self.out_features // self.vector_length * self.r

    @property
    def end(self) -> int:
        return self.b_offset + self.b_rows


def smallest_index_dtype(num_vectors: int) -> torch.dtype:
    """The smallest integer dtype that holds every index of a bank of ``num_vectors`` vectors."""
    if num_vectors <= 2**8:
        return torch.uint8
    if num_vectors <= 2**15:
        return torch.int16
    if num_vectors <= 2**31:
        return torch.int32
    return torch.int64


def build_layout(shapes: Iterable[tuple[str, int, int]], r: int, vector_length: int) -> dict[str, Slot]:
    """Assign table rows to modules in order: A rows (r, in/b), then B rows (out/b, r)."""
    layout: dict[str, Slot] = {}
    offset = 0
    for path, in_features, out_features in shapes:
        a_rows = r * in_features // vector_length
        slot = Slot(offset, offset + a_rows, r, in_features, out_features, vector_length)
        layout[path] = slot
        offset = slot.end
    return layout


def _table_plan(layout: dict[str, Slot], rows: int) -> tuple[Tensor | None, list[int], dict[str, int]]:
    """How :meth:`AdapterBank.compose` cuts the composed table: (row order, split sizes, segment index).

    The order puts each module's B rows rank-major, ``(r, out/b)`` instead of PEFT's ``(out/b, r)``,
    so that B^T is one contiguous ``(r, out)`` block and B a free transposed view (``None``: nothing
    moves). Each module owns two consecutive segments, A then B; rows no module uses get their own.
    """
    sizes: list[int] = []
    index: dict[str, int] = {}
    starts, blocks, ranks = [], [], []  # every module's B block: first row, out/b, r
    cursor = 0
    for path, s in sorted(layout.items(), key=lambda item: item[1].a_offset):
        if s.a_offset > cursor:
            sizes.append(s.a_offset - cursor)
        index[path] = len(sizes)
        sizes += [s.b_offset - s.a_offset, s.b_rows]
        starts.append(s.b_offset)
        blocks.append(s.out_features // s.vector_length)
        ranks.append(s.r)
        cursor = s.end
    if rows > cursor:
        sizes.append(rows - cursor)
    order = torch.arange(rows)
    if starts:  # all blocks at once (a serving load plans hundreds of modules)
        start, nb, r = torch.tensor(starts), torch.tensor(blocks), torch.tensor(ranks)
        counts = nb * r
        block = torch.repeat_interleave(torch.arange(len(starts)), counts)
        j = torch.arange(int(counts.sum())) - torch.repeat_interleave(counts.cumsum(0) - counts, counts)
        # row j of the rank-major (r, out/b) block is row (j % (out/b), j // (out/b)) of (out/b, r)
        order[start[block] + j] = start[block] + (j % nb[block]) * r[block] + j // nb[block]
    return (None if order.equal(torch.arange(rows)) else order), sizes, index


_PLANS: OrderedDict[tuple[Any, ...], tuple[dict[str, Slot], tuple[Tensor | None, list[int], dict[str, int]]]]
_PLANS = OrderedDict()  # the last few layouts and their table plans, shared by every bank that has one
_PLANS_KEPT = 8
_PLANS_LOCK = threading.Lock()


def shared_table_plan(
    layout: dict[str, Slot], rows: int
) -> tuple[dict[str, Slot], tuple[Tensor | None, list[int], dict[str, int]]]:
    """``layout`` and its :func:`_table_plan`, one copy for every bank with that layout (read only):
    a thousand served adapters of one model would otherwise hold a thousand (P,) row orders."""
    key = (rows, tuple(layout.items()))
    with _PLANS_LOCK:
        found = _PLANS.get(key)
        if found is not None:
            _PLANS.move_to_end(key)
            return found
    with torch.inference_mode(False):  # the order is saved for backward: no inference tensor
        found = dict(layout), _table_plan(layout, rows)
    with _PLANS_LOCK:
        _PLANS[key] = found
        while len(_PLANS) > _PLANS_KEPT:
            _PLANS.popitem(last=False)
    return found


def derived_last(partial: Tensor) -> Tensor:
    """The k-th top-k weight from the k-1 others, as PEFT's files and ours store them: 1 - their sum
    (in fp32, at least 0), in their dtype."""
    return (1.0 - partial.float().sum(dim=-1, keepdim=True)).clamp_min(0.0).to(partial.dtype)


def _stored_weights(weights: Tensor) -> Tensor:
    """(P, k) weights as a bank keeps them: the first k-1 when the k-th is exactly (bit for bit)
    :func:`derived_last` of them, as for every selection read from a file (4 bytes a sub-vector
    fewer at k = 2, lossless), else all k."""
    partial = weights[:, :-1]
    return partial.contiguous() if torch.equal(derived_last(partial), weights[:, -1:]) else weights


class AdapterBank(nn.Module):
    """The trainable state of one adapter: ``bank (h, b)`` and ``logits (P, h)``.

    Layers never register this module; they ask it for their factors with :meth:`factors`.
    The owning model calls :meth:`refresh` once per forward pass. ``layout`` is shared, read only,
    by every bank with the same layout (:func:`shared_table_plan`).
    """

    def __init__(
        self,
        layout: dict[str, Slot],
        num_vectors: int,
        vector_length: int,
        topk: int,
        init_bank_bound: float = 0.02,
        init_logits_std: float = 0.1,
        device: torch.device | str | None = None,
        initialise: bool = True,
    ) -> None:
        super().__init__()
        rows = max((s.end for s in layout.values()), default=0)
        self.layout, (self._order, self._sizes, self._segment) = shared_table_plan(layout, rows)
        self.topk = topk
        self._rows = rows
        self.bank = nn.Parameter(torch.empty(num_vectors, vector_length, device=device))
        self.logits = nn.Parameter(torch.empty(rows, num_vectors, device=device))
        if initialise:  # a loader that overwrites both skips this (a 7B-shaped table: 0.6 s)
            nn.init.uniform_(self.bank, -init_bank_bound, init_bank_bound)
            nn.init.normal_(self.logits, 0.0, init_logits_std)
        # Set to True when the logits hold only top-k entries (-inf elsewhere): inference only.
        self.inference_only = False
        # An inference-only adapter keeps only its selection, (P, k) indices and weights, instead
        # of the (P, h) logits (at h = 2048, 12 bytes a sub-vector instead of 8 KB): see keep_topk.
        self.register_buffer("topk_indices", None)
        self.register_buffer("topk_weights", None)
        self._factors: dict[str, tuple[Tensor, Tensor]] | None = None
        self._cache_key: tuple[Any, ...] | None = None
        self._composed_at: tuple[Any, ...] | None = None  # what _outdated() compares, at composition
        self.in_pass = False  # set by the model while a pass that refreshed this bank runs

    @property
    def num_vectors(self) -> int:
        return self.bank.shape[0]

    @property
    def vector_length(self) -> int:
        return self.bank.shape[1]

    @property
    def num_subvectors(self) -> int:
        return self._rows

    # ------------------------------------------------------------------ selection
    def keep_topk(self, indices: Tensor, weights: Tensor) -> None:
        """Serve from a fixed selection, (P, k) indices and their (P, k) softmax weights, and drop
        the (P, h) logits: for inference-only adapters (top-k checkpoints, compact files)."""
        device = self.bank.device
        # the smallest integer type that addresses the bank: 2 bytes a sub-vector at h <= 256
        self.topk_indices = indices.to(device, smallest_index_dtype(self.num_vectors))
        self.topk_weights = _stored_weights(weights.to(device, self.bank.dtype))
        self.logits = nn.Parameter(self.bank.new_empty(0, self.num_vectors), requires_grad=False)
        self.inference_only = True
        self.clear_cache()

    def _weights(self, start: int = 0, end: int | None = None) -> Tensor:
        """Rows ``start:end`` of the (P, k) weights of a selection-only adapter (``topk_weights``
        may hold only the first k-1: see :func:`_stored_weights`)."""
        w = self.topk_weights[start:end]
        return w if w.shape[-1] == self.topk else torch.cat([w, derived_last(w)], dim=-1)

    def selection(self) -> tuple[Tensor, Tensor]:
        """The (P, k) indices and (P, k) softmax weights that compose every sub-vector."""
        if self.topk_indices is not None:
            return self.topk_indices.long(), self._weights().float()
        return VF.topk_compress(self.logits.detach(), self.topk)

    def full_logits(self) -> Tensor:
        """The (P, h) logits; for a selection-only adapter, logits that compose the same (log-weights,
        -inf elsewhere), built on demand."""
        if self.topk_indices is None:
            return self.logits
        return VF.logits_from_topk(*self.selection(), self.num_vectors).to(self.bank.device)

    def subvectors(self, start: int = 0, end: int | None = None) -> Tensor:
        """Rows ``start:end`` of the (P, b) sub-vector table in fp32, without autograd."""
        with torch.no_grad():
            if self.topk_indices is not None:
                idx, w = self.topk_indices[start:end], self._weights(start, end)
                return VF.admixture_from_topk(idx, w.float(), self.bank.float())
            return VF.topk_admixture(self.logits[start:end].float(), self.bank.float(), self.topk)

    def extra_repr(self) -> str:
        h, b = self.bank.shape
        return f"modules={len(self.layout)}, subvectors={self.num_subvectors}, h={h}, b={b}, k={self.topk}"

    # ------------------------------------------------------------------ composition
    def compose(self) -> dict[str, tuple[Tensor, Tensor]]:
        """A and B of every module, from one batched top-k admixture over the whole table.

        B is a transposed view of a rank-major block (no copy). The table is cut with one ``split``:
        slicing it per module would give every slice a dense (P, b) gradient in backward.
        """
        order = self._order_on(self.bank.device)
        if self.topk_indices is not None:
            idx, w = self.topk_indices, self._weights()
            if order is not None:
                idx, w = idx[order], w[order]
            sub = VF.admixture_from_topk(idx, w, self.bank)
        else:
            sub = VF.topk_admixture(self.logits, self.bank, self.topk, order)
        parts = sub.split(self._sizes)  # (P, b) -> per module (r * in/b, b) and (r * out/b, b)
        factors = {}
        for path, s in self.layout.items():
            i = self._segment[path]
            factors[path] = (
                VF.factor_a(parts[i], s.r, s.in_features),
                VF.factor_b_t(parts[i + 1], s.r, s.out_features),
            )
        return factors

    def _order_on(self, device: torch.device) -> Tensor | None:
        if self._order is not None and self._order.device != device:
            with torch.inference_mode(False):
                self._order = self._order.to(device)
        return self._order

    def _needs_graph(self) -> bool:
        return torch.is_grad_enabled() and (self.bank.requires_grad or self.logits.requires_grad)

    def _stamp(self) -> tuple[int, ...]:
        """The version counters of the tensors the factors come from (in-place changes bump them)."""
        stamp = (self.bank._version, self.logits._version)
        if self.topk_indices is not None:
            stamp += (self.topk_indices._version, self.topk_weights._version)
        return stamp

    def refresh(self) -> dict[str, tuple[Tensor, Tensor]]:
        """Compose for this forward pass; reuse the cached factors when no graph is needed.

        Returns the factors, so that a caller holds them even if another thread clears the cache.
        """
        stamp, graph = self._stamp(), self._needs_graph()
        if graph:
            # A fresh graph every pass (gradient accumulation frees the previous one).
            factors = self.compose()
            self._factors, self._cache_key = factors, None
            self._composed_at = (stamp, True, False)  # grad mode: never inference mode
            return factors
        key = (
            *stamp,
            self.bank.data_ptr(),
            self.logits.data_ptr(),
            self.bank.dtype,
            self.bank.device,
            torch.is_inference_mode_enabled(),
        )
        factors = self._factors
        if key != self._cache_key or factors is None:
            with torch.no_grad():
                factors = self.compose()
            self._factors, self._cache_key = factors, key
            self._composed_at = (stamp, False, torch.is_inference_mode_enabled())
        return factors

    def factors(self, path: str) -> tuple[Tensor, Tensor]:
        """The (A, B) of module ``path`` for the current pass: A (r, in), B (out, r).

        B is a transposed view (``B.T`` is contiguous); call ``.contiguous()`` before serialising it.
        The model composes once per pass, before its forward (``in_pass``: nothing to check); a
        layer reached another way (an encoder that ``generate`` calls directly) still gets factors
        that are current and carry a graph when one is needed.
        """
        factors = self._factors  # one read: another thread may clear the cache meanwhile
        if factors is None or (not self.in_pass and not torch.compiler.is_compiling() and self._outdated()):
            factors = self.refresh()
        return factors[path]

    def _outdated(self) -> bool:
        """Whether the cached factors no longer fit: a tensor changed, or the graph or inference
        mode they were made in differs from now."""
        return self._composed_at != (self._stamp(), self._needs_graph(), torch.is_inference_mode_enabled())

    def clear_cache(self) -> None:
        """Drop the composed factors (needed only after edits through ``.data``, which bypass the
        version counters the cache checks)."""
        self._factors, self._cache_key, self._composed_at = None, None, None

    def delta_weight(self, path: str, fan_in_fan_out: bool = False) -> Tensor:
        """ΔW = B @ A of one module in fp32, computed without autograd."""
        s = self.layout[path]
        sub = self.subvectors(s.a_offset, s.end)
        a = VF.factor_a(sub[: s.a_rows], s.r, s.in_features)
        b = VF.factor_b(sub[s.a_rows :], s.r, s.out_features)
        return VF.delta_weight(a, b, fan_in_fan_out)  # no graph: the sub-vectors carry none

    # ------------------------------------------------------------------ copy / pickle
    def __getstate__(self) -> dict[str, Any]:
        # The cache may hold graph tensors, which cannot be deep-copied or pickled.
        state = self.__dict__.copy()
        state["_factors"], state["_cache_key"], state["_composed_at"] = None, None, None
        return state

    def _apply(self, fn: Any, recurse: bool = True) -> AdapterBank:
        self.clear_cache()  # .to(), .half(), .cuda() change storage and dtype
        if self.topk_weights is None or self.topk_weights.shape[-1] == self.topk:
            return super()._apply(fn, recurse)
        self.topk_weights = self._weights()  # all k, so that a cast rounds each weight once, as ever
        out = super()._apply(fn, recurse)
        self.topk_weights = _stored_weights(self.topk_weights)
        return out

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        # topk_weights holds k or k-1 columns (see _stored_weights): a state dict with the other
        # width loads as all k
        key = prefix + "topk_weights"
        given, ours = state_dict.get(key), self.topk_weights
        if isinstance(given, Tensor) and ours is not None and given.dim() == ours.dim() == 2:
            if given.shape[-1] == self.topk - 1 and ours.shape[-1] == self.topk:
                state_dict[key] = torch.cat([given, derived_last(given)], dim=-1)
            elif given.shape[-1] == self.topk and ours.shape[-1] == self.topk - 1:
                self.topk_weights = self._weights()
        super()._load_from_state_dict(state_dict, prefix, *args)
