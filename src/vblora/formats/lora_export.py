"""Exact LoRA export: one adapter's composed A and B as a PEFT LoRA adapter directory.

``lora_alpha = r`` makes PEFT's scaling 1, so ``B @ A`` is exactly our update (no SVD); the target
list is the adapted modules' paths; ``modules_to_save`` copies and trained biases are carried over.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import Tensor

from ..core import functional as VF
from .peft_dir import AdapterExport, safetensors_bytes
from .readers import CONFIG_NAME, PREFIX, WEIGHTS_NAME

_LORA_BIAS = {"none": "none", "all": "all", "vblora_only": "lora_only"}


def lora_state(export: AdapterExport) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """The LoRA adapter's ``adapter_config.json`` content and its tensors (fp32 factors)."""
    config, bank = export.config, export.bank
    sub = bank.subvectors()  # (P, b) in fp32, without autograd
    tensors: dict[str, Tensor] = {}
    for path, s in bank.layout.items():
        tensors[f"{PREFIX}{path}.lora_A.weight"] = VF.factor_a(
            sub[s.a_offset : s.b_offset], s.r, s.in_features
        )
        tensors[f"{PREFIX}{path}.lora_B.weight"] = VF.factor_b(sub[s.b_offset : s.end], s.r, s.out_features)
    tensors.update(export.aux)
    lora_config = {
        "peft_type": "LORA",
        "r": config.r,
        "lora_alpha": config.r,
        "target_modules": list(bank.layout),
        "lora_dropout": config.vblora_dropout,
        "fan_in_fan_out": config.fan_in_fan_out,
        "bias": _LORA_BIAS[config.bias],
        "modules_to_save": list(config.modules_to_save) if config.modules_to_save else None,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "task_type": config.task_type,
        "base_model_name_or_path": config.base_model_name_or_path,
        "revision": config.revision,
        "inference_mode": True,
    }
    return lora_config, tensors


def lora_files(folder: Path, export: AdapterExport) -> dict[Path, bytes]:
    """``adapter_config.json`` and ``adapter_model.safetensors`` of the LoRA adapter (fp32 factors)."""
    lora_config, tensors = lora_state(export)
    config_bytes = json.dumps(lora_config, indent=2, sort_keys=True).encode("utf-8")
    return {folder / CONFIG_NAME: config_bytes, folder / WEIGHTS_NAME: safetensors_bytes(tensors, {})}
