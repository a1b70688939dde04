"""Hugging Face ``Trainer`` integration: VB-LoRA's learning rates and adapter-only checkpoints.

Importing this module imports transformers; ``import vblora`` does not.

    from vblora.hf import VBLoRATrainer

    trainer = VBLoRATrainer(model=vblora_model, args=TrainingArguments(...), train_dataset=...,
                            logits_lr=1e-2, bank_lr=1e-3)   # the head trains at args.learning_rate
    trainer.train()
    trainer.model.save_pretrained("adapter/", save_only_topk_weights=True)
"""

from __future__ import annotations

import inspect
import os
from typing import Any

import torch
from transformers import Trainer
from transformers.trainer import TRAINING_ARGS_NAME
from transformers.utils import can_return_loss, find_labels

from ..model import VBLoRAModel
from ..optim import optimizer_param_groups

__all__ = ["VBLoRATrainer"]


class VBLoRATrainer(Trainer):
    """A ``transformers.Trainer`` for a :class:`~vblora.VBLoRAModel`.

    - The optimizer (``args.optim``, e.g. AdamW) gets :func:`~vblora.optimizer_param_groups`: the
      logits at ``logits_lr`` and the bank at ``bank_lr``, neither decayed; everything else trainable
      (``modules_to_save`` heads, biases) at ``other_lr`` (default ``args.learning_rate``) with
      ``args.weight_decay``. The scheduler scales every group alike.
    - Every checkpoint (``checkpoint-N/``, ``save_model()``) holds the adapter directory with the full
      logits (so training can resume) plus the tokenizer and training arguments, never the base model.
    - ``resume_from_checkpoint`` and ``load_best_model_at_end`` copy the saved adapter back into the
      live one, so the optimizer keeps pointing at the same parameters.

    Args:
        model: the VB-LoRA model to train (its active adapter).
        logits_lr: learning rate of the logits tables.
        bank_lr: learning rate of the vector banks.
        other_lr: learning rate of the other trainable parameters; defaults to ``args.learning_rate``.
        **kwargs: everything else ``Trainer`` takes (``args``, datasets, collator, ``compute_metrics``, ...).
    """

    def __init__(
        self,
        model: VBLoRAModel,
        *args: Any,
        logits_lr: float = 1e-2,
        bank_lr: float = 1e-3,
        other_lr: float | None = None,
        **kwargs: Any,
    ) -> None:
        if not isinstance(model, VBLoRAModel):
            raise TypeError(f"VBLoRATrainer needs a VBLoRAModel, got {type(model).__name__}; wrap it first")
        if not any(p.requires_grad for p in model.parameters()):
            raise ValueError(
                f"the model has nothing to train: its active adapter(s) {model.active_adapters} were loaded "
                "for inference (is_trainable=False, or a top-k checkpoint). Load a full-logits adapter "
                "with is_trainable=True, or add a new one"
            )
        self.vblora_lrs = {"logits_lr": logits_lr, "bank_lr": bank_lr, "other_lr": other_lr}
        super().__init__(model, *args, **kwargs)
        # Trainer reads these from forward signatures; ours is (*args, **kwargs), so ask the base model.
        base = model.get_base_model()
        accepts = getattr(base, "accepts_loss_kwargs", None)
        if accepts is None:
            params = inspect.signature(base.forward).parameters.values()
            accepts = any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params)
        self.model_accepts_loss_kwargs = bool(accepts)
        if self.args.label_names is None:
            self.label_names = find_labels(type(base))
        self.can_return_loss = can_return_loss(type(base))

    def _set_signature_columns_if_needed(self) -> None:
        if self._signature_columns is None:
            params = inspect.signature(self.model.get_base_model().forward).parameters
            self._signature_columns = [*params, "label", "label_ids", *self.label_names]

    # ------------------------------------------------------------------ optimizer
    def create_optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
        """``args.optim`` over VB-LoRA's parameter groups (a user-given optimizer is kept)."""
        if self.optimizer is None:
            opt_model = self.model if model is None else model
            other_lr = self.vblora_lrs["other_lr"]
            groups = optimizer_param_groups(
                opt_model,
                logits_lr=self.vblora_lrs["logits_lr"],
                bank_lr=self.vblora_lrs["bank_lr"],
                other_lr=self.args.learning_rate if other_lr is None else other_lr,
                weight_decay=self.args.weight_decay,
            )
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            optimizer_kwargs.pop("lr", None)  # every group brings its own
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    # ------------------------------------------------------------------ checkpoints
    def _save(self, output_dir: str | None = None, state_dict: dict[str, Any] | None = None) -> None:
        """Write the adapter directory (full logits), the tokenizer and the training arguments."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        model = self.accelerator.unwrap_model(self.model)
        if model.adapters_sharded():
            # Trainer calls _save on the main process only; gathering sharded tensors there would hang.
            raise RuntimeError(
                "VBLoRATrainer saves single-process and DDP models; this one is sharded (FSDP). "
                "Call model.save_pretrained(folder) on every rank instead (rank 0 writes)"
            )
        os.makedirs(output_dir, exist_ok=True)
        model.save_pretrained(output_dir, save_only_topk_weights=False)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_from_checkpoint(
        self, resume_from_checkpoint: str, model: torch.nn.Module | None = None
    ) -> None:
        self._copy_adapter_from(resume_from_checkpoint)

    def _load_best_model(self) -> None:
        assert self.state.best_model_checkpoint is not None
        self._copy_adapter_from(self.state.best_model_checkpoint)

    def _copy_adapter_from(self, folder: str) -> None:
        """Copy the saved tensors of every trained (active) adapter back into it, in place."""
        model: VBLoRAModel = self.accelerator.unwrap_model(self.model)
        model.restore_adapters(folder, [n for n in model.active_adapters if model.is_trainable_adapter(n)])
