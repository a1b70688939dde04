"""The wrapper around one adapted base layer: any kind :func:`~vblora.layers.base.kind_of` knows.

The layer owns no adapter parameters: it holds plain references to the adapters' banks and asks
them for its factors, so each bank and logits table appears once in ``state_dict()``.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.modules import module as torch_module

from ..core import functional as VF
from ..core.bank import AdapterBank
from ..core.routing import RowRouting, current_routing, mixed_delta
from .base import LayerKind, kind_of


class AdapterView(Mapping[str, Tensor]):
    """A read-only, live mapping adapter name -> tensor of one adapter's state (PEFT's per-layer
    ``ParameterDict`` names, read from the banks; an adapter deleted later is gone from it too)."""

    def __init__(self, banks: Mapping[str, AdapterBank], get: Callable[[AdapterBank], Tensor | None]) -> None:
        self._banks, self._get = banks, get

    def __getitem__(self, name: str) -> Tensor:
        value = self._get(self._banks[name])
        if value is None:
            raise KeyError(name)
        return value

    def __iter__(self) -> Iterator[str]:
        return (name for name, bank in self._banks.items() if self._get(bank) is not None)

    def __len__(self) -> int:
        return sum(1 for _ in self)


def layer_features(module: nn.Module) -> tuple[int, int, bool]:
    """(in_features, out_features, fan_in_fan_out) of a supported layer, read from the layer itself."""
    kind = kind_of(module)
    if kind is None:
        raise TypeError(f"unsupported layer type {type(module).__name__}")
    return (*kind.features(module), kind.fan_in_fan_out)


def _unobserved(kind: LayerKind, module: nn.Module) -> bool:
    """A stock layer whose call can be skipped: no hooks, its own ``forward``."""
    return kind.is_stock(module) and _hookless(module)


def _hookless(module: nn.Module) -> bool:
    """Nobody observes the layer's call: no hooks, its own ``forward``."""
    return (
        "forward" not in module.__dict__  # e.g. accelerate's device-map hooks replace it
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
        base_layer: the wrapped layer, of a kind :func:`~vblora.layers.base.kind_of` knows; kept as
            ``base_layer`` (as PEFT does).
        path: the module's path in the base model; the key of its slot in every bank's layout.
    """

    def __init__(self, base_layer: nn.Module, path: str) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.path = path
        kind = kind_of(base_layer)
        if kind is None:
            raise TypeError(f"{path}: unsupported layer type {type(base_layer).__name__}")
        self.kind = kind
        self.in_features, self.out_features = kind.features(base_layer)
        self.fan_in_fan_out = kind.fan_in_fan_out
        # Plain dicts: the banks are owned (and registered) by the model, not by each layer, and a
        # dropout rate needs no module (thousands of adapters would add thousands of submodules,
        # and every traversal of the model would walk them).
        self.banks: dict[str, AdapterBank] = {}
        self.dropout_rates: dict[str, float] = {}
        self._active: tuple[str, ...] = ()  # the adapters this layer applies, in order
        self.merged_adapters: list[str] = []
        self.disabled = False

    # ------------------------------------------------------------------ adapters
    def add_adapter(self, name: str, bank: AdapterBank, dropout: float) -> None:
        self.banks[name] = bank
        self.dropout_rates[name] = dropout

    def remove_adapter(self, name: str) -> None:
        self.banks.pop(name, None)
        self.dropout_rates.pop(name, None)
        self._active = tuple(a for a in self._active if a != name)

    def replace_base_layer(self, module: nn.Module) -> None:
        """Wrap ``module`` instead (same sizes and layout), e.g. a dequantized copy of the base layer."""
        kind = kind_of(module)
        if kind is None or kind.features(module) != (self.in_features, self.out_features):
            raise TypeError(
                f"{self.path}: {type(module).__name__} cannot replace {type(self.base_layer).__name__}"
            )
        if kind.fan_in_fan_out != self.fan_in_fan_out:
            raise TypeError(f"{self.path}: {type(module).__name__} stores its weight in another layout")
        self.base_layer, self.kind = module, kind

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

    # ------------------------------------------------------------------ PEFT's tuner-layer API
    adapter_layer_names = ("vblora_logits_A", "vblora_logits_B", "vblora_vector_bank")
    other_param_names: tuple[str, ...] = ()

    def get_base_layer(self) -> nn.Module:
        return self.base_layer

    @property
    def active_adapter(self) -> str | list[str]:
        return self._active[0] if len(self._active) == 1 else list(self._active)

    @property
    def active_adapters(self) -> list[str]:
        """The adapters this layer applies (a list, as PEFT's)."""
        return list(self._active)

    @active_adapters.setter
    def active_adapters(self, names: tuple[str, ...] | list[str]) -> None:
        self.set_adapter(list(names))

    def set_adapter(self, adapter_names: str | list[str]) -> None:
        """Apply these adapters in this layer only (PEFT's per-layer call; names this layer lacks
        are kept and skipped, as in PEFT). Trainability stays the model's: one bank serves every
        layer, so only the model's ``set_adapter`` changes it."""
        names = (adapter_names,) if isinstance(adapter_names, str) else tuple(dict.fromkeys(adapter_names))
        # a plain attribute: object's setattr skips nn.Module's parameter/module bookkeeping, which
        # costs more than the rest of activating an adapter on hundreds of layers
        object.__setattr__(self, "_active", names)

    @property
    def disable_adapters(self) -> bool:
        return self.disabled

    def enable_adapters(self, enabled: bool) -> None:
        self.disabled = not enabled

    @property
    def vblora_vector_bank(self) -> AdapterView:
        """Each adapter's bank (the model's one parameter, shared by every layer, as in PEFT)."""
        return AdapterView(self.banks, lambda bank: bank.bank)

    @property
    def vblora_logits_A(self) -> AdapterView:
        """Views of this layer's rows of each adapter's logits table, shaped as PEFT's (r, in/b, h);
        a selection-only (top-k) adapter has no logits and is left out."""
        return AdapterView(self.banks, lambda bank: self._logits(bank, 0))

    @property
    def vblora_logits_B(self) -> AdapterView:
        """As :attr:`vblora_logits_A`, PEFT's (out/b, r, h)."""
        return AdapterView(self.banks, lambda bank: self._logits(bank, 1))

    def _logits(self, bank: AdapterBank, factor: int) -> Tensor | None:
        if bank.topk_indices is not None:
            return None
        slot, h = bank.layout[self.path], bank.num_vectors
        b = slot.vector_length
        if factor == 0:
            return bank.logits[slot.a_offset : slot.b_offset].view(slot.r, slot.in_features // b, h)
        return bank.logits[slot.b_offset : slot.end].view(slot.out_features // b, slot.r, h)

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor, *args: object, **kwargs: object) -> Tensor:
        base = self.base_layer
        # Nobody observes the base layer: call its forward directly (skipping its __call__ costs
        # several microseconds per layer, which a merged or disabled model would pay for nothing).
        routing = current_routing()
        plain = not (args or kwargs) and _unobserved(self.kind, base)
        if plain and routing is None:
            fused = self._fusable(x, base)
            if fused is not None:
                return VF.linear_with_adapter(x, *fused)
        elif routing is None and not (args or kwargs) and torch.is_grad_enabled() and _hookless(base):
            recomputed = self._fusable_quantized(x, base)
            if recomputed is not None:
                return VF.linear_with_adapter_recomputed(x, *recomputed)
        result = base.forward(x) if plain else base(x, *args, **kwargs)
        if self.disabled:
            return result
        if routing is not None:
            return self._forward_mixed(x, result, routing)
        for name in self._active:
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
        factors = self._single_factors(x)
        if factors is None:
            return None
        weight = self.kind.dense_weight(base)
        if not x.dtype == weight.dtype == factors[0].dtype:
            return None
        return weight, base.bias, *factors

    def _fusable_quantized(
        self, x: Tensor, base: nn.Module
    ) -> tuple[Callable[[], Tensor], Tensor | None, Tensor, Tensor] | None:
        """(dequantizing function, bias, A, B) when a training step through a quantized layer
        whose kind multiplies by a dequantized weight (bitsandbytes 4-bit) can fuse the adapter into
        that matmul (:func:`~vblora.functional.linear_with_adapter_recomputed`). Inference keeps the
        layer's own kernels."""
        recompute = getattr(self.kind, "recomputed_weight", None)
        factors = self._single_factors(x) if recompute is not None else None
        if factors is None or not (x.requires_grad or factors[0].requires_grad):
            return None
        weight_fn = recompute(base, x)
        if weight_fn is None or factors[0].dtype != x.dtype:
            return None
        return weight_fn, base.bias, *factors

    def _single_factors(self, x: Tensor) -> tuple[Tensor, Tensor] | None:
        """(A, B) of the one adapter this layer applies, when it may be fused into the base matmul:
        nothing merged or disabled, no dropout in training, no autocast."""
        if len(self._active) != 1 or self.disabled or self.merged_adapters:
            return None
        name = self._active[0]
        if name not in self.banks:
            return None
        if (self.training and self.dropout_rates[name] > 0) or _autocast(x.device.type):
            return None
        return self.banks[name].factors(self.path)

    def _forward_mixed(self, x: Tensor, result: Tensor, routing: RowRouting) -> Tensor:
        """One adapter per row. Two or more adapters here: every row's branch at once, from the
        rows' gathered factors (:func:`~vblora.core.functional.gathered_delta`); else, and with
        dropout in training (each adapter has its own rate), each adapter on its own rows."""
        names = [n for n in routing.rows if n in self.banks]
        if len(names) > 1 and not (self.training and any(self.dropout_rates[n] > 0 for n in names)):
            factors = [self.banks[n].factors(self.path) for n in names]
            if all(a.dtype == factors[0][0].dtype for a, _ in factors):
                a, bt = self._stacked(tuple(names), factors, routing.stacks)
                index = routing.adapter_index(names, x.shape[0], self.path)
                return result + VF.gathered_delta(x.to(a.dtype), a, bt, index).to(result.dtype)
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

    def _stacked(
        self, names: tuple[str, ...], factors: list[tuple[Tensor, Tensor]], cache: dict[str, Any] | None
    ) -> tuple[Tensor, Tensor]:
        """:func:`~vblora.core.functional.stack_factors` of the batch's adapters, reused from the
        previous pass while they are the same adapters with the same composed factors (a decode
        step would otherwise copy every factor of the batch again, in every layer)."""
        if cache is None or torch.compiler.is_compiling() or any(a.requires_grad for a, _ in factors):
            return VF.stack_factors(factors)  # factors with a graph are composed anew each pass
        entry = cache.get(self.path)
        if entry is not None and entry[0] == names and all(r() is a for r, (a, _) in zip(entry[1], factors)):
            return entry[2], entry[3]
        a, bt = VF.stack_factors(factors)
        # weak references: the entry never keeps a bank's evicted factors alive
        cache[self.path] = (names, tuple(weakref.ref(a) for a, _ in factors), a, bt)
        return a, bt

    def _dropout(self, name: str, x: Tensor) -> Tensor:
        p = self.dropout_rates[name]
        return F.dropout(x, p, training=True) if p > 0 and self.training else x

    # ------------------------------------------------------------------ merging
    def delta_weight(self, name: str) -> Tensor:
        """ΔW of adapter ``name`` in fp32, laid out like ``base_layer.weight``."""
        return self.banks[name].delta_weight(self.path, self.fan_in_fan_out)

    def merge_delta(self, delta: Tensor, sign: float) -> None:
        """weight += sign * delta, as the layer's kind merges (fp32 arithmetic for float weights)."""
        try:
            self.kind.merge_weight(self.base_layer, delta, sign)
        except TypeError as err:  # e.g. a quantized weight with no merge of its own
            raise TypeError(f"{self.path}: {err}") from None

    def extra_repr(self) -> str:
        return f"path={self.path!r}, adapters={list(self.banks)}, merged={self.merged_adapters}"
