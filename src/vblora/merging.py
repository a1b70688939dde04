"""Merging adapters into base weights and back: ``W += ΔW`` per layer, as the layer's kind merges.

Arithmetic is fp32; each layer's kind (see :mod:`vblora.layers.base`) says how an update enters
its weight. A weight shared with another module (tied embeddings) is refused, since merging would
change both.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import nn

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


def merge(root: nn.Module, layers: Sequence[VBLoRALayer], names: Sequence[str], safe_merge: bool) -> None:
    """Add ΔW of adapters ``names`` into the weights of ``layers``; with ``safe_merge`` every merged
    weight is checked for NaN/inf before any weight is written. Already merged ones are skipped."""
    already = [n for n in names if n in merged_names(layers)]
    if already:
        warnings.warn(f"adapter(s) {already} already merged; nothing to do for them", stacklevel=3)
    names = [n for n in names if n not in already]
    plan = [
        (layer, name, layer.delta_weight(name)) for layer in layers for name in names if name in layer.banks
    ]
    refuse_tied(root, [layer for layer, _, _ in plan])
    if safe_merge:
        for layer, name, delta in plan:
            weight = layer.kind.dense_weight(layer.base_layer)
            if layer.fan_in_fan_out:
                weight = weight.T  # delta is laid out like the stored weight
            if not torch.isfinite(weight.float() + delta.to(weight.device)).all():
                raise ValueError(
                    f"merging adapter {name!r} would put NaN or inf into {layer.path}; nothing was merged"
                )
    for layer, name, delta in plan:
        layer.merge_delta(delta, +1.0)
        layer.merged_adapters.append(name)


def unmerge(layers: Sequence[VBLoRALayer]) -> None:
    """Subtract every merged adapter's ΔW again (last merged first)."""
    merged = [layer for layer in layers if layer.merged_adapters]
    if not merged:
        warnings.warn("no adapter is merged; nothing to unmerge", stacklevel=3)
    for layer in merged:
        while layer.merged_adapters:
            name = layer.merged_adapters.pop()
            layer.merge_delta(layer.delta_weight(name), -1.0)
