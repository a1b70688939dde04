"""Serving many adapters: mixed-adapter batches (one adapter per row).

``model(**batch, adapter_names=["a", "b", "__base__", ...])`` runs every row of the batch through its
own adapter (``"__base__"``: no adapter) in one forward pass. Each adapter's bank is composed once
for the pass; each layer applies an adapter only to that adapter's rows (``index_select`` +
``index_add``), so the cost grows with the rows, not with the number of adapters loaded.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

BASE_ADAPTER = "__base__"


@dataclass
class RowRouting:
    """Which rows of the batch go through which adapter.

    Args:
        batch_size: the number of rows the names were given for.
        rows: adapter name -> (n,) long tensor of row indices (``__base__`` rows are absent).
        repeat: how many times ``generate`` repeats each row, consecutively (beams, or
            ``num_return_sequences``); 1 in a plain forward.
    """

    batch_size: int
    rows: dict[str, Tensor]
    repeat: int = 1
    _expanded: dict[str, Tensor] = field(default_factory=dict)

    @classmethod
    def from_names(cls, names: Sequence[str], device: torch.device, repeat: int = 1) -> RowRouting:
        groups: dict[str, list[int]] = {}
        for row, name in enumerate(names):
            if name != BASE_ADAPTER:
                groups.setdefault(name, []).append(row)
        rows = {name: torch.tensor(idx, dtype=torch.long, device=device) for name, idx in groups.items()}
        return cls(len(names), rows, repeat)

    def rows_for(self, name: str, n: int, where: str = "a layer") -> Tensor | None:
        """Row indices of adapter ``name`` in an input of ``n`` rows at ``where``: the batch, or in
        ``generate`` the batch with each row repeated ``repeat`` times.

        Rows are told apart by their position along the first dimension, so any other first
        dimension (a mixture-of-experts layer's routed tokens, a sequence-first layer) is refused:
        from its shape alone, nothing says which row a slice belongs to.
        """
        idx = self.rows.get(name)
        if n == self.batch_size:
            return idx
        if n != self.batch_size * self.repeat:
            expected = f"{self.batch_size}" + (
                f" (or {self.batch_size * self.repeat})" if self.repeat > 1 else ""
            )
            raise ValueError(
                f"mixed-adapter batch: {where} saw an input of {n} rows, not the batch's {expected}; "
                "adapter_names needs layers whose inputs are batch-major (one name per input row, "
                "mixture-of-experts and sequence-first layers are not): leave such layers out of "
                "target_modules, or run each adapter's rows as its own batch"
            )
        if idx is None:
            return None
        if name not in self._expanded:
            m = self.repeat
            self._expanded[name] = (idx[:, None] * m + torch.arange(m, device=idx.device)).reshape(-1)
        return self._expanded[name]


def mixed_delta(result: Tensor, x: Tensor, rows: Tensor, delta_fn: object) -> Tensor:
    """Add ``delta_fn(x[rows])`` to ``result[rows]`` (out of place, autograd-safe)."""
    part = delta_fn(x.index_select(0, rows))  # type: ignore[operator]
    return result.index_add(0, rows, part.to(result.dtype))
