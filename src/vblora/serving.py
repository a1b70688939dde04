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
    """

    batch_size: int
    rows: dict[str, Tensor]
    _expanded: dict[tuple[str, int], Tensor] = field(default_factory=dict)

    @classmethod
    def from_names(cls, names: Sequence[str], device: torch.device) -> RowRouting:
        groups: dict[str, list[int]] = {}
        for row, name in enumerate(names):
            if name != BASE_ADAPTER:
                groups.setdefault(name, []).append(row)
        rows = {name: torch.tensor(idx, dtype=torch.long, device=device) for name, idx in groups.items()}
        return cls(len(names), rows)

    def rows_for(self, name: str, n: int) -> Tensor | None:
        """Row indices of adapter ``name`` in a batch of ``n`` rows.

        ``n`` may be a multiple of the original batch (beam search and ``num_return_sequences``
        repeat each row consecutively); the indices are expanded accordingly.
        """
        idx = self.rows.get(name)
        if idx is None or n == self.batch_size:
            return idx
        if n % self.batch_size:
            raise ValueError(
                f"adapter_names has {self.batch_size} entries but a layer saw a batch of {n} rows; "
                "pass one adapter name per row of the input"
            )
        key = (name, n)
        if key not in self._expanded:
            m = n // self.batch_size
            self._expanded[key] = (idx[:, None] * m + torch.arange(m, device=idx.device)).reshape(-1)
        return self._expanded[key]


def mixed_delta(result: Tensor, x: Tensor, rows: Tensor, delta_fn: object) -> Tensor:
    """Add ``delta_fn(x[rows])`` to ``result[rows]`` (out of place, autograd-safe)."""
    part = delta_fn(x.index_select(0, rows))  # type: ignore[operator]
    return result.index_add(0, rows, part.to(result.dtype))
