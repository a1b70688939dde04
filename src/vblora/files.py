"""One adapter of a :class:`~vblora.model.VBLoRAModel` as a single file: compact ``.vblora`` files
(:func:`save_compact`, :func:`load_compact`) and exact LoRA export (:func:`export_lora`)."""

from __future__ import annotations

from os import PathLike
from pathlib import Path

import torch
from torch import nn

from .formats.atomic import write_files
from .formats.compact import COMPACT_BANK_DTYPES, compact_bytes, config_of_header, decode_compact
from .formats.lora_export import lora_files
from .formats.readers import read_safetensors
from .injection.plan import plan_adapter
from .model import VBLoRAModel

StrPath = str | PathLike[str]


def _one_adapter(model: VBLoRAModel, adapter_name: object) -> str:
    if not isinstance(adapter_name, str):
        raise ValueError(f"adapter_name must be one adapter's name (a file holds one), got {adapter_name!r}")
    return model.adapter_names(adapter_name)[0]


def save_compact(
    model: VBLoRAModel, path: StrPath, adapter_name: str = "default", bank_dtype: torch.dtype = torch.float32
) -> None:
    """Write one adapter as a compact ``.vblora`` file (inference only, like a top-k directory).

    Stored: the bank in ``bank_dtype`` (fp32; fp16/bf16 for about half the size; int8 with one fp32
    scale per bank vector, ``bank_scale``, for about a quarter; the errors are in
    ``benchmarks/RESULTS.md``), per sub-vector k indices bit-packed to ceil(log2 h) bits and k-1
    fp16 weights, ``modules_to_save`` copies and trained biases, and the config and the module
    layout ``[[path, in, out], ...]`` once as JSON in the header.
    """
    if bank_dtype not in COMPACT_BANK_DTYPES.values():
        raise ValueError(f"bank_dtype must be torch.float32, float16, bfloat16 or int8, got {bank_dtype}")
    name = _one_adapter(model, adapter_name)
    config = model.peft_config[name]  # as given: the header holds the layout, no resolved target list
    export = model.export_adapter(
        name, save_embedding_layers=False, save_only_topk_weights=True, target_modules=config.target_modules
    )
    data = compact_bytes(export, bank_dtype)
    write_files({Path(path): data})


def load_compact(base: nn.Module, path: StrPath, adapter_name: str = "default") -> VBLoRAModel:
    """Load a ``.vblora`` file for inference.

    Args:
        base: a plain base model (wrapped and returned) or a :class:`VBLoRAModel` (the adapter is
            added to it, inactive until ``set_adapter``, and the same model returned).
        path: the file written by :func:`save_compact`.
        adapter_name: the name of the loaded adapter.

    Raises:
        ValueError: the file is unreadable or does not fit the model (every problem listed); the
            model is unchanged.
    """
    source = Path(path)
    tensors, metadata = read_safetensors(source)
    existing = base.peft_config if isinstance(base, VBLoRAModel) else {}
    root = base.model if isinstance(base, VBLoRAModel) else base
    plan = plan_adapter(root, config_of_header(metadata), adapter_name, existing)
    loaded = decode_compact(root, plan, tensors, metadata)
    loaded.fail_if_problems(source, adapter_name)
    if not isinstance(base, VBLoRAModel):
        return VBLoRAModel.wrap_loaded(base, loaded, is_trainable=False)
    base.add_loaded(loaded, trainable=False)
    return base


def export_lora(model: VBLoRAModel, save_directory: StrPath, adapter_name: str = "default") -> None:
    """Write one adapter as an exact PEFT LoRA adapter (``lora_A``/``lora_B`` per module, fp32).

    ``lora_alpha = r`` makes PEFT's scaling 1, so ``B @ A`` is exactly our update; the target list
    is the adapted modules' paths; ``modules_to_save`` copies and trained biases are carried over.
    """
    name = _one_adapter(model, adapter_name)
    write_files(lora_files(Path(save_directory), model.export_adapter(name, save_embedding_layers=False)))
