"""Optimizer parameter groups: logits, bank and everything else trainable, each with its own lr.

The paper (and PEFT's docs) train logits with lr 1e-2 and the bank with 1e-3, neither decayed.
"""

from __future__ import annotations

import math
from typing import Any

from torch import nn

from .core.bank import AdapterBank


def optimizer_param_groups(
    model: nn.Module,
    logits_lr: float = 1e-2,
    bank_lr: float = 1e-3,
    other_lr: float | None = None,
    weight_decay: float = 0.0,
) -> list[dict[str, Any]]:
    """Parameter groups for ``torch.optim`` over the trainable parameters of ``model``.

    Args:
        model: a :class:`~vblora.VBLoRAModel` (or any module containing adapter banks).
        logits_lr: learning rate of the logits tables (no weight decay).
        bank_lr: learning rate of the vector banks (no weight decay).
        other_lr: learning rate of other trainable parameters (``modules_to_save`` copies, trained
            biases); defaults to ``bank_lr``.
        weight_decay: weight decay of the other parameters only.

    Returns:
        A list of groups with keys ``params``, ``lr``, ``weight_decay`` and ``name``; empty groups
        are left out.

    Raises:
        ValueError: a learning rate or the weight decay is negative, NaN or infinite.
    """
    rates = {"logits_lr": logits_lr, "bank_lr": bank_lr, "other_lr": other_lr, "weight_decay": weight_decay}
    for name, value in rates.items():
        if value is not None and not (
            isinstance(value, (int, float)) and math.isfinite(value) and value >= 0
        ):
            raise ValueError(f"optimizer_param_groups: {name} must be a finite number >= 0, got {value!r}")
    logits, banks = [], []
    for module in model.modules():
        if isinstance(module, AdapterBank):
            logits += [module.logits] if module.logits.requires_grad else []
            banks += [module.bank] if module.bank.requires_grad else []
    adapter_ids = {id(p) for p in logits + banks}
    others = [p for p in model.parameters() if p.requires_grad and id(p) not in adapter_ids]
    groups = [
        {"name": "vblora_logits", "params": logits, "lr": logits_lr, "weight_decay": 0.0},
        {"name": "vblora_bank", "params": banks, "lr": bank_lr, "weight_decay": 0.0},
        {
            "name": "other",
            "params": others,
            "lr": bank_lr if other_lr is None else other_lr,
            "weight_decay": weight_decay,
        },
    ]
    return [g for g in groups if g["params"]]
