"""The wrapper around one adapted base layer (``nn.Linear`` and subclasses, transformers' ``Conv1D``).

The layer owns no adapter parameters: it holds plain references to the adapters' banks and asks
them for its factors, so each bank and logits table appears once in ``state_dict()``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.modules import module as torch_module

from . import functional as VF
from .bank import AdapterBank
from .serving import RowRouting, mixed_delta


def is_conv1d(module: nn.Module) -> bool:
    """True for transformers' ``Conv1D`` (weight stored as (in, out)), found without importing it."""
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers")


def is_supported(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def layer_features(module: nn.Module) -> tuple[int, int, bool]:
    """(in_features, out_features, fan_in_fan_out) of a supported layer, read from the layer itself."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features, False
    if is_conv1d(module):
        in_features, out_features = module.weight.shape
        return in_features, out_features, True
    raise TypeError(f"unsupported layer type {type(module).__name__}")


def _unobserved(module: nn.Module) -> bool:
    """A plain ``nn.Linear``/``Conv1D`` whose call can be skipped: no hooks, its own ``forward``."""
    return (
        (type(module) is nn.Linear or is_conv1d(module))
        and "forward" not in module.__dict__  # e.g. accelerate's device-map hooks replace it
        and not (module._forward_hooks or module._forward_pre_hooks)
        and not (module._backward_hooks or module._backward_pre_hooks)
        and not (torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks)
        and not (torch_module._global_backward_hooks or torch_module._global_backward_pre_hooks)
    )


def _autocast(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4 has no device argument
        return torch.is_autocast_enabled() or torch.is_autocast_cpu_enabled()


class VBLoRALayer(nn.Module):
    """``y = base(x) + sum_adapters B (A dropout(x))`` with A, B composed from a shared bank.

    Args:
        base_layer: the wrapped ``nn.Linear`` or ``Conv1D``; kept as ``base_layer`` (as PEFT does).
        path: the module's path in the base model; the key of its slot in every bank's layout.
    """

    def __init__(self, base_layer: nn.Module, path: str) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.path = path
        self.in_features, self.out_features, self.fan_in_fan_out = layer_features(base_layer)
        # Plain dicts: the banks are owned (and registered) by the model, not by each layer, and a
        # dropout rate needs no module (thousands of adapters would add thousands of submodules,
        # and every traversal of the model would walk them).
        self.banks: dict[str, AdapterBank] = {}
        self.dropout_rates: dict[str, float] = {}
        self.active_adapters: tuple[str, ...] = ()
        self.merged_adapters: list[str] = []
        self.disabled = False
        self.routing: RowRouting | None = None  # set by the model for mixed-adapter batches

    # ------------------------------------------------------------------ adapters
    def add_adapter(self, name: str, bank: AdapterBank, dropout: float) -> None:
        self.banks[name] = bank
        self.dropout_rates[name] = dropout

    def remove_adapter(self, name: str) -> None:
        self.banks.pop(name, None)
        self.dropout_rates.pop(name, None)
        self.active_adapters = tuple(a for a in self.active_adapters if a != name)

    @property
    def weight(self) -> Tensor:
        """The base layer's weight (models such as T5 read ``module.weight.dtype``)."""
        return self.base_layer.weight

    @property
    def bias(self) -> Tensor | None:
        return self.base_layer.bias

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor, *args: object, **kwargs: object) -> Tensor:
        base = self.base_layer
        # Nobody observes the base layer: call its forward directly (skipping its __call__ costs
        # several microseconds per layer, which a merged or disabled model would pay for nothing).
        plain = not (args or kwargs) and _unobserved(base)
        if plain:
            fused = self._fusable(x, base)
            if fused is not None:
                return VF.linear_with_adapter(x, *fused)
        result = base.forward(x) if plain else base(x, *args, **kwargs)
        if self.disabled:
            return result
        if self.routing is not None:
            return self._forward_mixed(x, result, self.routing)
        for name in self.active_adapters:
            if name in self.merged_adapters or name not in self.banks:
                continue
            a, b = self.banks[name].factors(self.path)
            h = self._dropout(name, x).to(a.dtype)  # adapter math in the bank's dtype
            result = result + VF.adapter_delta(h, a, b).to(result.dtype)
        return result

    def _fusable(self, x: Tensor, base: nn.Module) -> tuple[Tensor, Tensor | None, Tensor, Tensor] | None:
        """(weight (out, in), bias, A, B) when the one adapter to apply can be fused into the matmul
        of ``base`` (:func:`~vblora.functional.linear_with_adapter`), a plain linear layer that nobody
        observes (no hooks, no replaced forward): no dropout, no autocast and a single dtype."""
        if len(self.active_adapters) != 1 or self.disabled or self.merged_adapters:
            return None
        name = self.active_adapters[0]
        if self.routing is not None or name not in self.banks:
            return None
        if (self.training and self.dropout_rates[name] > 0) or _autocast(x.device.type):
            return None
        a, b = self.banks[name].factors(self.path)
        weight = base.weight.T if self.fan_in_fan_out else base.weight
        if not x.dtype == weight.dtype == a.dtype:
            return None
        return weight, base.bias, a, b

    def _forward_mixed(self, x: Tensor, result: Tensor, routing: RowRouting) -> Tensor:
        """One adapter per row: each adapter's branch runs on its own rows only."""
        for name in routing.rows:  # the batch's adapters, not every adapter loaded
            bank = self.banks.get(name)
            if bank is None:
                continue
            rows = routing.rows_for(name, x.shape[0], self.path)
            a, b = bank.factors(self.path)
            result = mixed_delta(
                result,
                x,
                rows,
                lambda h, a=a, b=b, n=name: VF.adapter_delta(self._dropout(n, h).to(a.dtype), a, b),
            )
        return result

    def _dropout(self, name: str, x: Tensor) -> Tensor:
        p = self.dropout_rates[name]
        return F.dropout(x, p, training=True) if p > 0 and self.training else x

    # ------------------------------------------------------------------ merging
    def delta_weight(self, name: str) -> Tensor:
        """ΔW of adapter ``name`` in fp32, laid out like ``base_layer.weight``."""
        return self.banks[name].delta_weight(self.path, self.fan_in_fan_out)

    def _weight(self) -> Tensor:
        weight = self.base_layer.weight
        if not weight.is_floating_point():
            raise TypeError(
                f"{self.path}: cannot merge into a {weight.dtype} weight (quantized layer); "
                "keep the adapter unmerged"
            )
        return weight

    @torch.no_grad()
    def add_delta(self, delta: Tensor, sign: float) -> None:
        """weight += sign * delta, in fp32 arithmetic, written back in the weight's dtype."""
        weight = self._weight()
        merged = weight.float() + sign * delta.to(weight.device)
        weight.copy_(merged.to(weight.dtype))

    def extra_repr(self) -> str:
        return f"path={self.path!r}, adapters={list(self.banks)}, merged={self.merged_adapters}"


class ModulesToSaveWrapper(nn.Module):
    """A module trained in full (e.g. a classifier head): one trainable copy per adapter.

    Keeps PEFT's attribute names (``original_module``, ``modules_to_save.<adapter>``).
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.original_module = module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.disabled = False
        self.routing: RowRouting | None = None

    def add_adapter(self, name: str) -> None:
        import copy

        trainable = copy.deepcopy(self.original_module)
        trainable.requires_grad_(True)
        self.modules_to_save[name] = trainable

    def remove_adapter(self, name: str) -> None:
        if name in self.modules_to_save:
            del self.modules_to_save[name]
        if self.active_adapter == name:
            self.active_adapter = None

    def set_active(self, names: tuple[str, ...]) -> None:
        chosen = [n for n in names if n in self.modules_to_save]
        self.active_adapter = chosen[0] if chosen else None

    def in_use(self) -> nn.Module:
        """The module a plain call runs: the active adapter's copy, else the original."""
        if self.disabled or self.active_adapter is None:
            return self.original_module
        return self.modules_to_save[self.active_adapter]

    @property
    def weight(self) -> Tensor:  # code such as get_output_embeddings().weight reads the head's
        return self.in_use().weight  # type: ignore[return-value]

    @property
    def bias(self) -> Tensor | None:
        return self.in_use().bias  # type: ignore[return-value]

    def forward(self, *args: object, **kwargs: object) -> object:
        if self.routing is not None and not self.disabled:
            if len(args) != 1 or any(v is not None for v in kwargs.values()):
                raise ValueError(
                    f"a mixed-adapter batch routes a modules_to_save module by rows of its one input; "
                    f"this {type(self.original_module).__name__} is called with more (e.g. an attention "
                    "mask), which cannot be split safely. Save a head (classifier, lm_head) instead, "
                    "or run each adapter's rows as its own batch"
                )
            return self._forward_mixed(args[0], self.routing)  # type: ignore[arg-type]
        return self.in_use()(*args, **kwargs)

    def _forward_mixed(self, x: Tensor, routing: RowRouting) -> Tensor:
        """Rows of adapters with a trained copy use it; the other rows use the original module."""
        result = self.original_module(x)
        for name in routing.rows:  # the batch's adapters, not every adapter loaded
            if name in self.modules_to_save:
                module = self.modules_to_save[name]
                rows = routing.rows_for(name, x.shape[0], f"the saved {type(module).__name__}")
                result = result.index_copy(0, rows, module(x.index_select(0, rows)).to(result.dtype))
        return result
