"""PEFT-compatible adapter directories: ``adapter_config.json`` plus ``adapter_model.safetensors``
with PEFT's keys, so ``peft`` reads our directories and we read its.

Either the full logits (trainable) or, per sub-vector, k indices and k-1 softmax weights
(``save_only_topk_weights``: inference only). The default adapter goes at the top, any other
adapter into ``<dir>/<name>/``, as PEFT does.
"""

from __future__ import annotations

import dataclasses
import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from ..core import functional as VF
from ..core.bank import AdapterBank, Slot
from ..core.config import VBLoRAConfig
from ..distributed import full_tensor
from ..injection.plan import AdapterPlan
from ..layers.save import ModulesToSaveWrapper
from .atomic import check_target, write_files
from .contents import Loaded, assemble, check_aux, check_bank, module_rows
from .readers import BANK_KEY, CONFIG_NAME, PREFIX, WEIGHTS_NAME, index_dtype, split_peft_keys

MODEL_CARD = "README.md"


@dataclass
class AdapterExport:
    """One adapter as the formats write it, gathered from the model (never the model itself)."""

    name: str
    config: VBLoRAConfig  # as written: inference_mode=True, fan_in_fan_out per the layers
    bank: AdapterBank
    aux: dict[str, Tensor]  # modules_to_save copies and trained biases, under PEFT's keys
    model_name: str | None = None  # the base model's config._name_or_path; None: it has no config


def export_adapter(
    root: nn.Module,
    name: str,
    config: VBLoRAConfig,
    bank: AdapterBank,
    biases: dict[str, Tensor],
    fan_in_fan_out: bool,
    save_embedding_layers: bool | str = "auto",
    **changes: Any,
) -> AdapterExport:
    """Gather adapter ``name``: its ``modules_to_save`` copies (found under ``root``) and its trained
    ``biases``, full tensors (a sharded one is gathered, so every rank must call this).

    As PEFT writes it: ``target_modules`` given as None is saved as the adapted modules' names,
    ``"all-linear"`` as their full paths, ``base_model_name_or_path`` (when not set) as the model's
    ``name_or_path``, and an adapted ``lm_head``/``embed_tokens`` also saves its base weight
    (PEFT's ``save_embedding_layers="auto"``, with its warning; ``False`` leaves it out).
    """
    aux: dict[str, Tensor] = {}
    for path, module in root.named_modules():
        if isinstance(module, ModulesToSaveWrapper) and name in module.modules_to_save:
            for key, tensor in module.modules_to_save[name].state_dict().items():
                aux[f"{PREFIX}{path}.{key}"] = full_tensor(
                    tensor
                )  # PEFT drops the "modules_to_save.<name>" infix
    for key, tensor in biases.items():
        aux[PREFIX + key] = full_tensor(tensor)
    embeddings = [p for p in bank.layout if re.search(r"(^|\.)(embed_tokens|lm_head)$", p)]
    if embeddings and save_embedding_layers:
        if save_embedding_layers == "auto":
            warnings.warn(
                "Setting `save_embedding_layers` to `True` as embedding layers found in `target_modules`.",
                stacklevel=4,
            )
        for path in embeddings:
            weight = getattr(root.get_submodule(path), "weight", None)
            if weight is not None:
                aux[f"{PREFIX}{path}.base_layer.weight"] = full_tensor(weight)
    if config.target_modules is None:  # PEFT: the model type's default names
        changes.setdefault("target_modules", sorted({p.rsplit(".", 1)[-1] for p in bank.layout}))
    elif config.target_modules == "all-linear":  # PEFT: the adapted modules' full paths
        changes.setdefault("target_modules", sorted(bank.layout))
    name_or_path = getattr(root, "name_or_path", None)
    if config.base_model_name_or_path is None and isinstance(name_or_path, str) and name_or_path:
        changes.setdefault("base_model_name_or_path", name_or_path)
    # PEFT records Conv1D targets as fan_in_fan_out=True
    saved = dataclasses.replace(config, fan_in_fan_out=fan_in_fan_out, inference_mode=True, **changes)
    model_name = getattr(getattr(root, "config", None), "_name_or_path", None)
    return AdapterExport(name, saved, bank, aux, model_name if isinstance(model_name, str) else None)


def module_logits(logits: Tensor, slot: Slot) -> tuple[Tensor, Tensor]:
    """PEFT's ``vblora_logits_A`` (r, in/b, h) and ``vblora_logits_B`` (out/b, r, h) of one module,
    cut from the adapter's whole ``(P, h)`` logits table."""
    h, b = logits.shape[-1], slot.vector_length
    a = logits[slot.a_offset : slot.b_offset].reshape(slot.r, slot.in_features // b, h)
    b_ = logits[slot.b_offset : slot.end].reshape(slot.out_features // b, slot.r, h)
    return a, b_


def vblora_tensors(bank: AdapterBank, topk: bool) -> dict[str, Tensor]:
    """The bank and every module's logits (or top-k indices and k-1 weights) under PEFT's keys."""
    out = {BANK_KEY: full_tensor(bank.bank)}
    table = full_tensor(bank.full_logits())
    for path, slot in bank.layout.items():
        for factor, logits in zip("AB", module_logits(table, slot)):
            key = f"{PREFIX}{path}.vblora_logits_{factor}"
            if not topk:
                out[key] = logits
                continue
            indices, weights = VF.topk_compress(logits, bank.topk)
            out[key + "_topk_indices"] = indices.to(index_dtype(bank.num_vectors))
            # The k-th weight is 1 - sum of the others. fp32 always: PEFT's loader scatters them into
            # an fp32 table, so it cannot read the bf16/fp16 weights it writes for a half model.
            out[key + "_topk_weights"] = weights[..., :-1].float()
    return out


def safetensors_bytes(tensors: dict[str, Tensor], metadata: dict[str, str]) -> bytes:
    from safetensors.torch import save

    # safetensors refuses views that share storage (slices of one logits table): copy each one.
    owned = {k: t.detach().to("cpu", copy=True).contiguous() for k, t in tensors.items()}
    return save(owned, metadata={"format": "pt", **metadata})


def adapter_tensors(export: AdapterExport) -> dict[str, Tensor]:
    """Every tensor of one adapter under PEFT's keys (PEFT's ``get_peft_model_state_dict``)."""
    return {**vblora_tensors(export.bank, export.config.save_only_topk_weights), **export.aux}


def model_card(exports: list[AdapterExport]) -> bytes:
    """A minimal ``README.md`` in the shape of PEFT's model card (the hub and vLLM read its header)."""
    bases = sorted({e.config.base_model_name_or_path for e in exports if e.config.base_model_name_or_path})
    header = ["---", "library_name: peft"]
    if exports[0].model_name is not None:  # as PEFT: the model's own name, for models with a config
        header.append(f"base_model: {json.dumps(exports[0].model_name)}")
    header += ["tags:", *[f"- base_model:adapter:{b}" for b in bases], "- vblora", "---", ""]
    names = ", ".join(e.name for e in exports)
    body = [
        "# VB-LoRA adapter",
        "",
        f"Adapters: {names}. Written by vblora in PEFT's VBLORA format: load it with",
        "`peft.PeftModel.from_pretrained(base, path)` or `vblora.VBLoRAModel.from_pretrained(base, path)`.",
        "",
    ]
    return "\n".join(header + body).encode("utf-8")


def directory_files(root: Path, exports: list[AdapterExport]) -> dict[Path, bytes]:
    """The files of adapter directories under ``root``: ``default`` at the top, others in ``<name>/``;
    a ``README.md`` model card at the top unless one exists (PEFT updates its own card there)."""
    files: dict[Path, bytes] = {}
    for export in exports:
        folder = root if export.name == "default" else root / export.name
        files[folder / CONFIG_NAME] = export.config.to_json().encode("utf-8")
        files[folder / WEIGHTS_NAME] = safetensors_bytes(adapter_tensors(export), {})
    if exports and not (root / MODEL_CARD).exists():
        files[root / MODEL_CARD] = model_card(exports)
    return files


def write_directories(root: Path, exports: list[AdapterExport], write: bool = True) -> None:
    """Serialise every adapter, then (``write``: this rank writes) publish all files at once."""
    check_target(root / CONFIG_NAME)  # a name too long or a link loop: a ValueError, first
    files = directory_files(root, exports)
    if write:
        write_files(files)


def decode_directory(root: nn.Module, plan: AdapterPlan, tensors: dict[str, Tensor]) -> Loaded:
    """Check PEFT-format tensors against the model (as planned) and turn them into a load."""
    loaded = Loaded(plan)
    keys = split_peft_keys(tensors)
    for key in keys.unexpected:
        loaded.add(f"{key}: unexpected key (keys are {BANK_KEY!r} or start with {PREFIX!r})")
    check_bank(loaded, keys.bank)
    rows = {
        path: module_rows(loaded, path, parts) if path in loaded.layout else None
        for path, parts in keys.modules.items()
    }
    assemble(loaded, rows)
    check_aux(loaded, root, keys.other)
    return loaded


def refuse_training(source: object, adapter_name: str) -> ValueError:
    return ValueError(
        f"{source}: adapter {adapter_name!r} is a top-k checkpoint (save_only_topk_weights): it keeps "
        "only k indices and k-1 weights per sub-vector, so the logits that training updates are gone "
        "and it cannot be trained. Load it with is_trainable=False for inference or merging, or "
        "resume training from a full-logits checkpoint (save_pretrained(..., save_only_topk_weights=False))"
    )
