"""The protocol every adapted base-layer kind implements, and the one dispatch that picks a kind.

A kind says how to read a base layer: its sizes, its weight layout, whether it is the stock layer
whose matmul the adapter may be fused into, and how to merge an update into its weight. Adding a
kind (a quantized layer, say) is one module under ``layers/`` and one entry in :data:`KINDS`;
targeting, shape checks, merging and the loaders all ask :func:`kind_of`.
"""

from __future__ import annotations

from typing import Protocol

from torch import Tensor, nn

from .bnb import LINEAR_4BIT, LINEAR_8BIT
from .linear import CONV1D, LINEAR


class LayerKind(Protocol):
    """How VB-LoRA reads and merges into one kind of base layer."""

    name: str
    fan_in_fan_out: bool  # the weight is stored (in, out), as transformers' Conv1D stores it

    def matches(self, module: nn.Module) -> bool: ...

    def features(self, module: nn.Module) -> tuple[int, int]:
        """(in_features, out_features)."""
        ...

    def is_stock(self, module: nn.Module) -> bool:
        """The module computes exactly ``F.linear(x, dense_weight, bias)`` (fusable)."""
        ...

    def dense_weight(self, module: nn.Module) -> Tensor:
        """The (out, in) weight in a floating dtype (dequantized where the layer is quantized)."""
        ...

    def merge_weight(self, module: nn.Module, delta: Tensor, sign: float) -> None:
        """Add ``sign * delta`` (laid out like the stored weight) into the layer's weight."""
        ...


# First match wins: more specific kinds before the kinds they subclass (bitsandbytes' layers are
# nn.Linear subclasses).
KINDS: tuple[LayerKind, ...] = (LINEAR_4BIT, LINEAR_8BIT, CONV1D, LINEAR)


_KIND_OF_TYPE: dict[type, LayerKind | None] = {}  # every kind matches on the type alone


def kind_of(module: nn.Module) -> LayerKind | None:
    """The kind of a base layer VB-LoRA can adapt, or None."""
    cls = type(module)
    if cls not in _KIND_OF_TYPE:  # a model walk asks once per module: once per type is enough
        _KIND_OF_TYPE[cls] = next((kind for kind in KINDS if kind.matches(module)), None)
    return _KIND_OF_TYPE[cls]


def supported_names() -> str:
    return ", ".join(kind.name for kind in KINDS)
