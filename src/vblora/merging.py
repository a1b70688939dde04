"""Merging adapters into base weights and back: ``W += ΔW`` per layer, as the layer's kind merges.

Arithmetic is fp32; each layer's kind (see :mod:`vblora.layers.base`) says how an update enters
its weight. A weight shared with another module (tied embeddings) is refused, since merging would
change both.

Quantized bases (bitsandbytes 4-bit and 8-bit) are not merged into as they are: rounding ΔW into
4-bit weights loses most of a small update. :func:`dequantize_bases` first gives each such layer a
full-precision copy, dequant(W_q), which then merges exactly (the weights the adapter was trained
against); requantizing in place is opt-in (``requantize=True``), warns with the share of ΔW that
survived, and :func:`unmerge` restores the original quantized bytes.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import nn

from .layers.bnb import QuantizedKind, quantized_kind
from .layers.wrapper import VBLoRALayer


def merged_names(layers: Sequence[VBLoRALayer]) -> list[str]:
    seen: dict[str, None] = {}
    for layer in layers:
        seen.update(dict.fromkeys(layer.merged_adapters))
    return list(seen)


def refuse_tied(root: nn.Module, layers: Sequence[VBLoRALayer]) -> None:
    """A weight shared with another module (a tied lm_head) would change there too."""
    if not layers:
        return
    uses: dict[int, int] = {}
    for _, p in root.named_parameters(remove_duplicate=False):
        uses[id(p)] = uses.get(id(p), 0) + 1
    for layer in layers:
        if uses.get(id(layer.base_layer.weight), 0) > 1:
            raise ValueError(
                f"{layer.path}: its weight is shared with another module (tied weights, e.g. "
                "lm_head and the input embeddings), so merging would change both; nothing was "
                "merged. Serve the adapter unmerged, or untie the weights first (clone the "
                "weight and set config.tie_word_embeddings=False)"
            )


def merge(
    root: nn.Module,
    layers: Sequence[VBLoRALayer],
    names: Sequence[str],
    safe_merge: bool,
    requantize: bool = False,
) -> None:
    """Add ΔW of adapters ``names`` into the weights of ``layers``; with ``safe_merge`` every merged
    weight is checked for NaN/inf before any weight is written. Already merged ones are skipped.

    A quantized base is refused unless ``requantize``: then its weight becomes quant(dequant(W) + ΔW)
    (lossy, with a warning stating the share of ΔW kept) and unmerging restores the original bytes."""
    already = [n for n in names if n in merged_names(layers)]
    if already:
        message = (  # PEFT's wording when every adapter asked for is merged
            "All adapters are already merged, nothing to do."
            if len(already) == len(names)
            else f"adapter(s) {already} already merged; nothing to do for them"
        )
        warnings.warn(message, stacklevel=3)
    names = [n for n in names if n not in already]
    plan = [
        (layer, name, layer.delta_weight(name)) for layer in layers for name in names if name in layer.banks
    ]
    refuse_tied(root, [layer for layer, _, _ in plan])
    quantized = [layer.path for layer, _, _ in plan if _quantized(layer)]
    if quantized and not requantize:
        raise TypeError(
            f"{quantized[0]} (and {len(quantized) - 1} more) has a quantized weight "
            f"({type(_base(layers, quantized[0])).__name__}); nothing was merged. "
            "merge_and_unload(dequantize=True) returns a full-precision model with dequant(W) + ΔW "
            "(outputs equal the unmerged model's); merge_adapter(requantize=True) rounds ΔW into the "
            "quantized weights, losing most of a small update; or serve the adapter unmerged"
        )
    if safe_merge:
        for layer, name, delta in plan:
            weight = layer.kind.dense_weight(layer.base_layer)
            if layer.fan_in_fan_out:
                weight = weight.T  # delta is laid out like the stored weight
            if not torch.isfinite(weight.float() + delta.to(weight.device)).all():
                raise ValueError(
                    f"NaNs detected in the merged weights. The adapter {name} seems to be broken: "
                    f"merging it would put NaN or inf into {layer.path}; nothing was merged"
                )
    kept, total = 0.0, 0.0
    for layer, name, delta in plan:
        if _quantized(layer):
            dot, norm2 = layer.kind.requantize(layer.base_layer, delta)
            kept, total = kept + dot, total + norm2
        else:
            layer.merge_delta(delta, +1.0)
        layer.merged_adapters.append(name)
    if quantized:
        warnings.warn(
            f"merged {names} into {len(quantized)} quantized weights by requantizing: only "
            f"{100 * kept / max(total, 1e-30):.1f}% of ΔW survived the rounding (its projection on the "
            "update); outputs differ from the unmerged model's. unmerge_adapter() restores the "
            "original quantized weights exactly; merge_and_unload(dequantize=True) keeps all of ΔW",
            stacklevel=3,
        )


def _base(layers: Sequence[VBLoRALayer], path: str) -> nn.Module:
    return next(layer.base_layer for layer in layers if layer.path == path)


def unmerge(layers: Sequence[VBLoRALayer]) -> None:
    """Subtract every merged adapter's ΔW again (last merged first)."""
    merged = [layer for layer in layers if layer.merged_adapters]
    if not merged:
        warnings.warn("no adapter is merged; nothing to unmerge", stacklevel=3)
    for layer in merged:
        while layer.merged_adapters:
            name = layer.merged_adapters.pop()
            if _quantized(layer):
                layer.kind.restore(layer.base_layer)  # the bytes before that merge, not a second rounding
            else:
                layer.merge_delta(layer.delta_weight(name), -1.0)


def dequantize_bases(
    root: nn.Module, layers: Sequence[VBLoRALayer], dtype: torch.dtype = torch.float32
) -> int:
    """Replace every quantized linear layer of ``root`` (adapted or not) by an ``nn.Linear`` holding
    dequant(W) in ``dtype``; returns how many. A transformers model also loses its quantization
    config, so ``save_pretrained`` writes a plain full-precision model.

    Raises:
        ValueError: an adapter is merged into a quantized weight (unmerge first).
    """
    requantized = [layer.path for layer in layers if layer.merged_adapters and _quantized(layer)]
    if requantized:
        raise ValueError(
            f"{requantized[0]}: an adapter is merged into its quantized weight; unmerge_adapter() "
            "first, so that the dequantized weight is the one the adapter was trained against"
        )
    count = 0
    for layer in layers:
        kind = quantized_kind(layer.base_layer)
        if kind is not None:
            layer.replace_base_layer(kind.to_linear(layer.base_layer, dtype))
            count += 1
    for path, module in list(root.named_modules()):  # quantized layers no adapter wraps
        kind = quantized_kind(module)
        if kind is not None:
            parent, _, name = path.rpartition(".")
            setattr(root.get_submodule(parent), name, kind.to_linear(module, dtype))
            count += 1
    if count:
        _forget_quantization(root)
    return count


def _quantized(layer: VBLoRALayer) -> bool:
    return isinstance(layer.kind, QuantizedKind)


def _forget_quantization(root: nn.Module) -> None:
    """transformers' own clean-up after dequantizing (its quantizers' remove_quantization_config)."""
    quantizer = getattr(root, "hf_quantizer", None)
    if quantizer is not None and hasattr(quantizer, "remove_quantization_config"):
        quantizer.remove_quantization_config(root)
        return
    config = getattr(root, "config", None)
    if config is not None and hasattr(config, "quantization_config"):
        del config.quantization_config
    if getattr(root, "is_quantized", False):
        root.is_quantized = False
