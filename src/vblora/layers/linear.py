"""Layer kinds for full-precision linear layers: ``nn.Linear`` (and subclasses) and transformers'
``Conv1D`` (GPT-2), whose weight is stored transposed as (in, out)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class LinearKind:
    """``nn.Linear`` and its subclasses (weight (out, in))."""

    name = "nn.Linear"
    fan_in_fan_out = False

    def matches(self, module: nn.Module) -> bool:
        return isinstance(module, nn.Linear)

    def features(self, module: nn.Module) -> tuple[int, int]:
        return module.in_features, module.out_features

    def is_stock(self, module: nn.Module) -> bool:
        """Whether the module computes exactly ``F.linear(x, weight, bias)`` (its own class's forward)."""
        return type(module) is nn.Linear

    def dense_weight(self, module: nn.Module) -> Tensor:
        """The weight as ``F.linear`` reads it, (out, in); may be a view."""
        return module.weight

    def merge_weight(self, module: nn.Module, delta: Tensor, sign: float) -> None:
        """weight += sign * delta (delta laid out like the weight), in fp32, in the weight's dtype."""
        _add_in_fp32(module.weight, delta, sign, module)


class Conv1DKind(LinearKind):
    """transformers' ``Conv1D`` (weight (in, out)), recognised without importing transformers."""

    name = "transformers Conv1D"
    fan_in_fan_out = True

    def matches(self, module: nn.Module) -> bool:
        cls = type(module)
        return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers")

    def features(self, module: nn.Module) -> tuple[int, int]:
        in_features, out_features = module.weight.shape
        return in_features, out_features

    def is_stock(self, module: nn.Module) -> bool:
        return self.matches(module)

    def dense_weight(self, module: nn.Module) -> Tensor:
        return module.weight.T


@torch.no_grad()
def _add_in_fp32(weight: Tensor, delta: Tensor, sign: float, module: nn.Module) -> None:
    if not weight.is_floating_point():
        raise TypeError(
            f"cannot merge into a {weight.dtype} weight of {type(module).__name__}; keep the adapter unmerged"
        )
    merged = weight.float() + sign * delta.to(weight.device)
    weight.copy_(merged.to(weight.dtype))


LINEAR = LinearKind()
CONV1D = Conv1DKind()
