"""Mixed-adapter batches: which rows of a batch go through which adapter.

``model(**batch, adapter_names=["a", "b", "__base__", ...])`` runs every row of the batch through its
own adapter (``"__base__"``: no adapter) in one forward pass. Each adapter's bank is composed once
for the pass; each layer applies an adapter only to that adapter's rows (``index_select`` +
``index_add``), so the cost grows with the rows, not with the number of adapters loaded.

The routing travels with the pass (thread-local, set for the duration of the call), never as state
on the layers: two threads running passes on one model at once each see their own rows.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

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
    # the model's cache of stacked factors per layer, kept across passes (core.adapters.AdapterSet)
    stacks: dict[str, Any] | None = None
    _expanded: dict[str, Tensor] = field(default_factory=dict)
    _index: dict[tuple[tuple[str, ...], int], Tensor | None] = field(default_factory=dict)

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

    def adapter_index(self, names: Sequence[str], n: int, where: str = "a layer") -> Tensor | None:
        """(n,) long: each input row's position in ``names``, ``len(names)`` for rows of no adapter
        among them; None when row i is the only row of ``names[i]`` for every i (a batch of one
        request per adapter: nothing to gather). Cached per pass, as layers of one shape share it."""
        key = (tuple(names), n)
        if key not in self._index:
            device = next(iter(self.rows.values())).device if self.rows else None
            index = torch.full((n,), len(names), dtype=torch.long, device=device)
            for i, name in enumerate(names):
                rows = self.rows_for(name, n, where)
                if rows is not None:
                    index[rows] = i
            in_order = n == len(names) and bool((index == torch.arange(n, device=device)).all())
            self._index[key] = None if in_order else index
        return self._index[key]


# transformers model types whose adapted layers all see (batch, ...) inputs: dense decoders and
# encoders that never transpose the batch away (no mixture-of-experts, no sequence-first layers).
# llama, bert, gpt2 and t5 are tested row by row in tests/core/test_routing.py.
BATCH_MAJOR_MODEL_TYPES = frozenset(
    {
        "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi", "phi3", "gpt2", "gpt_neox",
        "gptj", "opt", "falcon", "bloom", "bert", "roberta", "xlm-roberta", "distilbert", "electra",
        "t5", "mt5", "bart", "mbart",
    }
)  # fmt: skip


def mixed_batch_problem(root: torch.nn.Module, batch_major: bool | None) -> str | None:
    """Why ``root`` cannot run a mixed-adapter batch, or None.

    Rows are told apart by position along the first dimension of each adapted layer's input, and
    a shape alone cannot tell a batch from a sequence of equal length. So a model is routed only
    when it is known to be batch-major: a transformers ``model_type`` of
    :data:`BATCH_MAJOR_MODEL_TYPES`, or ``batch_major=True`` declared by the user; and never when
    it holds a module marked ``batch_first=False`` (torch's Transformer layers, attention, RNNs).
    ``batch_major=False`` refuses any model.
    """
    model_type = getattr(getattr(root, "config", None), "model_type", None)
    if batch_major is False:
        return "this model is declared not batch-major (batch_major=False)"
    if batch_major is None and model_type in BATCH_MAJOR_MODEL_TYPES:
        return None
    seq_first = next((n for n, m in root.named_modules() if getattr(m, "batch_first", None) is False), None)
    if seq_first is not None:
        return f"{seq_first} is sequence-first (batch_first=False): its inputs are (seq, batch, ...)"
    if batch_major is None:
        return (
            f"model type {model_type!r} is not one known to be batch-major "
            f"({', '.join(sorted(BATCH_MAJOR_MODEL_TYPES))}); if every adapted layer of this model "
            "sees (batch, ...) inputs, declare it with model.batch_major = True"
        )
    return None


def mixed_delta(result: Tensor, x: Tensor, rows: Tensor, delta_fn: object) -> Tensor:
    """Add ``delta_fn(x[rows])`` to ``result[rows]`` (out of place, autograd-safe)."""
    part = delta_fn(x.index_select(0, rows))  # type: ignore[operator]
    return result.index_add(0, rows, part.to(result.dtype))


_STATE = threading.local()  # .routing: the mixed-adapter pass running in this thread (torch.compile reads it)


def current_routing() -> RowRouting | None:
    """The routing of the mixed-adapter pass running in this thread, if any."""
    return getattr(_STATE, "routing", None)


@contextlib.contextmanager
def routed(routing: RowRouting) -> Iterator[RowRouting]:
    """Run the block as one mixed-adapter pass: layers called inside it, in this thread, see
    ``routing``; the routing before it is restored on exit."""
    previous = current_routing()
    _STATE.routing = routing
    try:
        yield routing
    finally:
        _STATE.routing = previous


def input_rows(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int | None:
    """The batch size of a forward's input: ``input_ids``/``inputs_embeds``, else the first tensor."""
    named = [kwargs.get("input_ids"), kwargs.get("inputs_embeds")]
    for value in (*named, *args, *kwargs.values()):
        if isinstance(value, Tensor) and value.dim() > 0:
            return value.shape[0]
    return None


def generate_repeat(kwargs: dict[str, Any], model_config: object) -> int:
    """How many times ``generate`` repeats each input row: the beams of a beam search, else
    ``num_return_sequences`` (transformers' expansion of the inputs). ``model_config``: the model's
    own generation config."""
    configs = (kwargs.get("generation_config"), model_config)

    def setting(name: str) -> int:  # the first one given: the call, its config, the model's
        values = (kwargs.get(name), *(getattr(c, name, None) for c in configs))
        return int(next((v for v in values if v is not None), 1))

    return max(setting("num_beams"), setting("num_return_sequences"))


def routing_for(
    adapter_names: Sequence[str],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    known: list[str],
    device: torch.device,
    repeat: int = 1,
) -> RowRouting:
    """Check ``adapter_names`` (one per row of the input, or one name for every row) against the
    ``known`` adapters and the input's rows, and route them."""
    rows = input_rows(args, kwargs)
    if isinstance(adapter_names, str):
        names = [adapter_names] * (rows or 1)
    elif not isinstance(adapter_names, (list, tuple)):
        raise ValueError(f"adapter_names must be a list of names, got {type(adapter_names).__name__}")
    else:
        names = list(adapter_names)
        if rows is not None and len(names) != rows:
            raise ValueError(
                f"adapter_names has {len(names)} entries for an input of {rows} rows; "
                "pass one adapter name per row (or one name for every row)"
            )
    bad = [n for n in names if not isinstance(n, str)]
    if bad:
        raise ValueError(f"adapter_names must hold adapter names (strings), got {bad[0]!r}")
    unknown = sorted({n for n in names if n != BASE_ADAPTER and n not in known})
    if unknown:
        shown = f"{known[:10]} and {len(known) - 10} more" if len(known) > 10 else f"{known}"
        raise ValueError(f"adapter_names: unknown adapter(s) {unknown[:10]}; use {shown} or {BASE_ADAPTER!r}")
    return RowRouting.from_names(names, device, repeat)
