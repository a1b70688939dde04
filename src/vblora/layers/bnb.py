"""Layer kinds for bitsandbytes' quantized linear layers: ``Linear4bit`` (nf4/fp4) and ``Linear8bitLt``
(int8), the bases of QLoRA-style training.

The classes are recognised by name and module, so importing vblora never imports bitsandbytes (about
6 s); bitsandbytes is imported only to dequantize or requantize a weight. The adapter stays in its own
dtype (fp32 by default) over the quantized base: the layer's forward is the base layer's own, plus
``B (A x)``.

Merging into a quantized weight rounds most of a small update away (an update of 0.5 % of |W| keeps
about 1 % of itself in nf4), so a kind refuses :meth:`merge_weight`; :mod:`vblora.merging` either
dequantizes the base first (the default target) or, when asked, requantizes in place with
:meth:`QuantizedKind.requantize` and restores the original bytes with :meth:`QuantizedKind.restore`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

# The saved quantized states of a base layer, one per requantizing merge (last merged, last): a plain
# attribute, not a buffer, so it never enters state_dict().
_SAVED = "_vblora_saved_quantized"


def _is_bnb(module: nn.Module, class_name: str) -> bool:
    return any(
        c.__name__ == class_name and c.__module__.startswith("bitsandbytes") for c in type(module).__mro__
    )


def _bnb_functional() -> Any:
    import bitsandbytes.functional as bnb_functional  # lazy: heavy, optional

    return bnb_functional


class QuantizedKind:
    """What the 4-bit and 8-bit kinds share: sizes, no fused matmul, merges only through the merger."""

    name = "bitsandbytes"
    class_name = ""
    fan_in_fan_out = False
    quantized = True

    def matches(self, module: nn.Module) -> bool:
        return _is_bnb(module, self.class_name)

    def features(self, module: nn.Module) -> tuple[int, int]:
        return module.in_features, module.out_features

    def is_stock(self, module: nn.Module) -> bool:
        return False  # its own quantized matmul: never fused into F.linear

    def dense_weight(self, module: nn.Module) -> Tensor:
        raise NotImplementedError

    def merge_weight(self, module: nn.Module, delta: Tensor, sign: float) -> None:
        raise TypeError(
            f"cannot merge into the quantized weight of {type(module).__name__} directly: "
            "merge_and_unload(dequantize=True) returns a full-precision model with dequant(W) + ΔW, "
            "merge_adapter(requantize=True) rounds ΔW into the quantized weight (lossy), or keep the "
            "adapter unmerged"
        )

    def requantize(self, module: nn.Module, delta: Tensor) -> tuple[float, float]:
        """Replace the weight by quant(dequant(W) + delta), keeping the current state for :meth:`restore`.

        Returns ``(<ΔW_kept, ΔW>, |ΔW|²)`` (fp64 sums), with ``ΔW_kept`` the change the requantized
        weight really makes: their ratio, summed over layers, is the share of ΔW that survived.
        """
        before = self.dense_weight(module)
        module.__dict__.setdefault(_SAVED, []).append(self._state(module))
        self._set_dense(module, before + delta.to(before.device, before.dtype))
        kept = (self.dense_weight(module) - before).double()
        d = delta.double().to(kept.device)
        return float((kept * d).sum()), float((d * d).sum())

    def restore(self, module: nn.Module) -> None:
        """Put back the quantized state saved by the last :meth:`requantize`: the original bytes."""
        saved = module.__dict__.get(_SAVED)
        if not saved:
            raise ValueError(f"{type(module).__name__}: no requantized merge to undo")
        self._load_state(module, saved.pop())

    def to_linear(self, module: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Linear:
        """A plain ``nn.Linear`` holding dequant(W) in ``dtype`` (and the bias), on the same device."""
        weight = self.dense_weight(module)
        linear = nn.Linear(
            module.in_features,
            module.out_features,
            bias=module.bias is not None,
            device=weight.device,
            dtype=dtype,
        )
        with torch.no_grad():
            linear.weight.copy_(weight)
            if module.bias is not None:
                linear.bias.copy_(module.bias.float())
        linear.requires_grad_(False)
        return linear

    # the quantization format: one pair per kind
    def _state(self, module: nn.Module) -> tuple[Any, ...]:
        raise NotImplementedError

    def _load_state(self, module: nn.Module, state: tuple[Any, ...]) -> None:
        raise NotImplementedError

    def _set_dense(self, module: nn.Module, weight: Tensor) -> None:
        raise NotImplementedError


class Linear4bitKind(QuantizedKind):
    """bitsandbytes ``Linear4bit`` (nf4 or fp4, any double quantization, compute and storage dtype)."""

    name = "bitsandbytes Linear4bit"
    class_name = "Linear4bit"

    def dense_weight(self, module: nn.Module) -> Tensor:
        """dequant(W) in fp32, (out, in): what the layer's matmul multiplies by."""
        data, state = module.weight.data, module.weight.quant_state
        if state is None:  # not quantized yet (bitsandbytes quantizes on the first .to(device))
            return data.float()
        if getattr(state, "packing_format_for_cpu", False):  # bitsandbytes' AVX512-BF16 inference layout
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse  # lazy

            data, state = _convert_weight_packed_for_cpu_inverse(data.clone(), copy.deepcopy(state))
        with torch.no_grad():
            return _bnb_functional().dequantize_4bit(data, state).float()

    def recomputed_weight(self, module: nn.Module, x: Tensor) -> Callable[[], Tensor] | None:
        """For a training step: a function giving dequant(W) in ``x``'s dtype, the weight the
        layer's own training matmul multiplies by (bitsandbytes dequantizes it in forward and again
        in backward, keeping only the 4-bit bytes); None where the layer computes otherwise (its
        packed inference layout, another compute dtype, not quantized yet, not on the CPU)."""
        state = module.weight.quant_state
        if state is None or getattr(state, "packing_format_for_cpu", False) or x.device.type != "cpu":
            return None
        if getattr(module, "compute_dtype", None) != x.dtype:
            return None
        if module.bias is not None and module.bias.dtype != x.dtype:
            return None
        data, dtype = module.weight.data, x.dtype
        return lambda: _bnb_functional().dequantize_4bit(data, state).to(dtype)

    def _state(self, module: nn.Module) -> tuple[Any, ...]:
        return module.weight.data, module.weight.quant_state, getattr(module, "quant_state", None)

    def _load_state(self, module: nn.Module, state: tuple[Any, ...]) -> None:
        data, quant_state, module_state = state
        module.weight.data = data
        module.weight.quant_state = quant_state
        if hasattr(module, "quant_state"):
            module.quant_state = module_state

    def _set_dense(self, module: nn.Module, weight: Tensor) -> None:
        old = module.weight.quant_state
        if old is None:
            raise TypeError(f"{type(module).__name__} is not quantized yet; move it to its device first")
        dtype = getattr(old, "original_dtype", old.dtype)  # the packed CPU layout keeps the original
        nested = getattr(old, "original_nested", old.nested)
        storage = getattr(old, "original_storage_type", module.weight.data.dtype)
        data, state = _bnb_functional().quantize_4bit(
            weight.to(dtype).contiguous(),
            blocksize=old.blocksize,
            compress_statistics=nested,
            quant_type=old.quant_type,
            quant_storage=storage,
        )
        self._load_state(module, (data, state, state))


class Linear8bitKind(QuantizedKind):
    """bitsandbytes ``Linear8bitLt`` with int8 weights (``has_fp16_weights=False``, row-wise scales)."""

    name = "bitsandbytes Linear8bitLt"
    class_name = "Linear8bitLt"

    def dense_weight(self, module: nn.Module) -> Tensor:
        """CB * SCB / 127 in fp32, (out, in): the weight the layer dequantizes."""
        data = module.weight.data
        if data.dtype != torch.int8:  # fp16 weights, or not quantized yet
            return data.float()
        scales = self.scales(module)
        return data.float() * (scales.float().unsqueeze(1) / 127.0)

    @staticmethod
    def scales(module: nn.Module) -> Tensor:
        """The (out,) row scales (SCB), wherever bitsandbytes keeps them now."""
        # bitsandbytes moves CB/SCB from the weight to the layer's state on the first forward
        scales = getattr(module.weight, "SCB", None)
        return scales if scales is not None else module.state.SCB

    def _state(self, module: nn.Module) -> tuple[Any, ...]:
        w, s = module.weight, module.state
        return w.data, getattr(w, "CB", None), getattr(w, "SCB", None), s.CB, s.SCB

    def _load_state(self, module: nn.Module, state: tuple[Any, ...]) -> None:
        w, s = module.weight, module.state
        w.data, w.CB, w.SCB, s.CB, s.SCB = state

    def _set_dense(self, module: nn.Module, weight: Tensor) -> None:
        if module.weight.data.dtype != torch.int8:
            raise TypeError(f"{type(module).__name__} holds no int8 weight; move it to its device first")
        # as bitsandbytes quantizes (Int8Params._quantize): row-wise absmax of the fp16 weight
        cb, scb, _ = _bnb_functional().int8_vectorwise_quant(weight.to(torch.float16).contiguous())
        in_state = module.state.CB is not None
        self._load_state(module, (cb, None, None, cb, scb) if in_state else (cb, cb, scb, None, None))


LINEAR_4BIT = Linear4bitKind()
LINEAR_8BIT = Linear8bitKind()
QUANTIZED_KINDS: tuple[QuantizedKind, ...] = (LINEAR_4BIT, LINEAR_8BIT)


def quantized_kind(module: nn.Module) -> QuantizedKind | None:
    """The quantized kind of ``module``, or None for any other module."""
    return next((kind for kind in QUANTIZED_KINDS if kind.matches(module)), None)


def prepare_model_for_kbit_training(
    model: nn.Module,
    use_gradient_checkpointing: bool = True,
    gradient_checkpointing_kwargs: dict[str, Any] | None = None,
) -> nn.Module:
    """Make a quantized model ready to train an adapter over it, as PEFT's function of that name does.

    Freezes every parameter, casts the half-precision parameters that are not quantized weights (norms,
    embeddings, biases, the head) to fp32 for stable training, and with ``use_gradient_checkpointing``
    turns on activation checkpointing (non-reentrant unless ``gradient_checkpointing_kwargs`` says
    otherwise) and makes the input embeddings' output require grad, so checkpointed layers see a graph.
    Call it on the base model before :func:`~vblora.get_vblora_model`; returns ``model``.
    """
    quantized_weights = {id(m.weight) for m in model.modules() if quantized_kind(m) is not None}
    for param in model.parameters():
        param.requires_grad_(False)
        if param.dtype in (torch.float16, torch.bfloat16) and id(param) not in quantized_weights:
            param.data = param.data.float()
    if not use_gradient_checkpointing:
        return model
    if hasattr(model, "enable_input_require_grads"):  # transformers' models
        model.enable_input_require_grads()
    elif hasattr(model, "get_input_embeddings"):
        model.get_input_embeddings().register_forward_hook(lambda _m, _i, out: out.requires_grad_(True))
    kwargs = {"use_reentrant": False, **(gradient_checkpointing_kwargs or {})}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        raise TypeError(
            f"{type(model).__name__} has no gradient_checkpointing_enable(); pass "
            "use_gradient_checkpointing=False, or checkpoint its blocks with torch.utils.checkpoint"
        )
    return model
