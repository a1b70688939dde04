"""VBLoRAModel: injects VB-LoRA into any ``nn.Module`` and manages its adapters.

A facade: it plans (:mod:`vblora.injection.plan`), applies plans (:mod:`vblora.injection.apply`),
and passes calls through to the adapters (:mod:`vblora.core.adapters`), the merge
(:mod:`vblora.merging`) and the formats (:mod:`vblora.formats`). The model owns one
:class:`~vblora.core.bank.AdapterBank` per adapter (``vblora_banks.<name>``); wrapped layers hold
plain references to them. Each forward pass composes the banks it uses once (cached in inference).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from . import merging
from .checkpoints import CheckpointMethods
from .core.adapters import AdapterSet
from .core.bank import AdapterBank
from .core.config import VBLoRAConfig
from .core.routing import (
    RowRouting,
    current_routing,
    generate_repeat,
    mixed_batch_problem,
    routed,
    routing_for,
)
from .formats.readers import index_dtype
from .injection.apply import eject, inject, save_wrappers, trained_biases, unwrap_all, vblora_layers
from .injection.plan import AdapterPlan, plan_adapter, warn_flipped, warn_untrained_head
from .layers.save import ModulesToSaveWrapper
from .layers.wrapper import VBLoRALayer
from .passthrough import BaseModelMethods


class VBLoRAModel(CheckpointMethods, BaseModelMethods, nn.Module):
    """A base model with VB-LoRA adapters.

    Args:
        model: the base model; adapted in place (its target layers are wrapped).
        config: the first adapter's configuration.
        adapter_name: the first adapter's name.
    """

    def __init__(
        self,
        model: nn.Module,
        config: VBLoRAConfig,
        adapter_name: str = "default",
        *,
        initialise: bool = True,
        trainable: bool = True,
    ) -> None:
        if isinstance(model, VBLoRAModel):
            raise TypeError("model is already a VBLoRAModel; use its add_adapter(name, config) instead")
        if any(isinstance(m, (VBLoRALayer, ModulesToSaveWrapper)) for m in model.modules()):
            raise ValueError(
                "model already holds VB-LoRA layers (another VBLoRAModel wraps it); add adapters with "
                "that model's add_adapter(name, config), or call its unload() first"
            )
        super().__init__()
        self.model = model
        self.peft_config: dict[str, VBLoRAConfig] = {}
        self.vblora_banks = nn.ModuleDict()
        self.adapters = AdapterSet(self.vblora_banks)
        self._disabled = False  # inside disable_adapter()
        # Mixed-adapter batches route rows by position: None trusts the known batch-major model
        # types only (routing.BATCH_MAJOR_MODEL_TYPES); True declares this model batch-major.
        self.batch_major: bool | None = None
        self.add_adapter(adapter_name, config, initialise=initialise, trainable=trainable)
        for p in model.parameters():  # after add_adapter: a refused config leaves the model as it was
            p.requires_grad_(False)
        self.set_adapter(adapter_name)
        self._hook = model.register_forward_pre_hook(self._begin_pass)
        self._end_hook = model.register_forward_hook(self._end_pass, always_call=True)

    # ------------------------------------------------------------------ passes
    def forward(self, *args: Any, adapter_names: Sequence[str] | None = None, **kwargs: Any) -> Any:
        """The base model's forward; ``adapter_names`` (one per row, or one name for every row) runs
        a mixed-adapter batch."""
        try:
            if adapter_names is None:
                return self.model(*args, **kwargs)
            with routed(self._routing(adapter_names, args, kwargs)):
                return self.model(*args, **kwargs)
        finally:
            self._end_pass()  # also after Ctrl-C, which the end hook does not see

    def generate(self, *args: Any, adapter_names: Sequence[str] | None = None, **kwargs: Any) -> Any:
        """The base model's ``generate``; ``adapter_names`` gives each row its own adapter."""
        self._end_pass()  # the encoder of an encoder-decoder runs outside the model's forward
        if adapter_names is None:
            return self.model.generate(*args, **kwargs)
        with routed(
            self._routing(
                adapter_names,
                args,
                kwargs,
                generate_repeat(kwargs, getattr(self.model, "generation_config", None)),
            )
        ):
            return self.model.generate(*args, **kwargs)

    def _routing(self, names: Sequence[str], args: tuple, kwargs: dict, repeat: int = 1) -> RowRouting:
        """The rows of a mixed-adapter batch, after refusing what cannot be routed by row."""
        device = next(iter(self.vblora_banks.values())).bank.device
        routing = routing_for(names, args, kwargs, list(self.peft_config), device, repeat)
        problem = mixed_batch_problem(self.model, self.batch_major)
        if problem:
            raise ValueError(f"adapter_names cannot route this model's rows: {problem}")
        if self.merged_adapters:
            raise ValueError("adapter_names needs unmerged adapters; call unmerge_adapter() first")
        if self._disabled:
            raise ValueError(
                "adapter_names inside disable_adapter(): leave the block, or name rows '__base__'"
            )
        checkpointed = (
            m for m in self.model.modules() if getattr(m, "gradient_checkpointing", False) is True
        )
        if torch.is_grad_enabled() and self.model.training and next(checkpointed, None) is not None:
            raise ValueError(
                "a mixed-adapter batch cannot train with gradient checkpointing: the checkpointed "
                "layers run again in backward, after the rows' routing is gone. Disable checkpointing, "
                "or train one adapter per batch"
            )
        routing.stacks = self.adapters.stacks
        return routing

    def _begin_pass(self, *_: Any) -> None:
        routing = current_routing()
        self.adapters.begin_pass(tuple(routing.rows) if routing is not None else self.adapters.active)

    def _end_pass(self, *_: Any) -> None:
        self.adapters.end_pass()

    def train(self, mode: bool = True) -> VBLoRAModel:
        """The base model's train/eval mode (dropout); the banks have no mode, so they are not
        walked: switching stays as cheap with thousands of adapters loaded as with one."""
        self.training = mode
        self.model.train(mode)
        return self

    @property
    def max_cached_adapters(self) -> int | None:
        """How many adapters keep their composed factors between forward passes (None: all).

        In inference each adapter's A and B are composed once and reused until its parameters
        change; the cache is as large as a plain LoRA adapter in fp32 (about 40 MB for a
        Llama-2-7B-shaped one). When more adapters than this have been used, the least recently used
        lose their factors and compose again when next used. The adapters of the passes in flight
        are always kept. Default 8.
        """
        return self.adapters.max_cached

    @max_cached_adapters.setter
    def max_cached_adapters(self, value: int | None) -> None:
        self.adapters.max_cached = value

    def vblora_layers(self) -> Iterator[VBLoRALayer]:
        return vblora_layers(self.model)

    # ------------------------------------------------------------------ adapter lifecycle
    @property
    def active_adapters(self) -> list[str]:
        return list(self.adapters.active)

    @property
    def active_adapter(self) -> str | list[str]:
        active = self.adapters.active
        return active[0] if len(active) == 1 else list(active)

    def add_adapter(
        self,
        adapter_name: str,
        config: VBLoRAConfig,
        *,
        initialise: bool = True,
        trainable: bool = True,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
    ) -> None:
        """Inject a new adapter (inactive until :meth:`set_adapter`, unless no adapter is active).

        ``initialise=False`` leaves its bank and logits uninitialised, for a loader that overwrites
        them (initialising a Llama-2-7B-shaped table costs more than loading it).
        ``trainable=False`` keeps the adapter frozen when it is active (an inference load).
        ``autocast_adapter_dtype`` (PEFT's): True keeps the adapter in fp32 over a half-precision
        base; False gives it the dtype of the first adapted layer's weight, as PEFT does.
        ``low_cpu_mem_usage`` (PEFT's) is accepted; it changes nothing here (loads never initialise).

        Raises:
            ValueError: the name exists, a second adapter trains biases, no module matched, or a
                module's dimensions are not divisible by ``vector_length``. The model is unchanged.
        """
        plan = plan_adapter(self.model, config, adapter_name, self.peft_config)
        plan.raise_problems()
        if initialise:  # a new adapter, not a load
            warn_untrained_head(self.model, plan, stacklevel=3)
        warn_flipped(plan, stacklevel=3)
        self._inject(plan, initialise, trainable)
        weight = getattr(self.model.get_submodule(plan.targets[0]), "weight", None)
        if (
            not autocast_adapter_dtype
            and weight is not None
            and weight.dtype in (torch.float16, torch.bfloat16)
        ):
            self.vblora_banks[adapter_name].to(weight.dtype)

    @torch.inference_mode(False)  # added inside inference mode (a server's batch), it still has
    @torch.no_grad()  # normal tensors: inference tensors have no version counters for the cache
    def _inject(self, plan: AdapterPlan, initialise: bool, trainable: bool) -> None:
        weight = next(self.model.get_submodule(plan.targets[0]).parameters(), None)
        config = plan.config
        bank = AdapterBank(
            plan.layout,
            config.num_vectors,
            config.vector_length,
            config.topk,
            config.init_vector_bank_bound,
            config.init_logits_std,
            device=weight.device if weight is not None else torch.device("cpu"),
            initialise=initialise,
        )
        bank.requires_grad_(False)
        inject(self.model, plan, bank, self.adapters.active)
        self.vblora_banks[plan.name] = bank
        self.peft_config[plan.name] = config
        if not trainable:
            self.adapters.frozen.add(plan.name)
        if self.adapters.active:
            self.set_adapter(list(self.adapters.active))
        elif len(self.peft_config) == 1:  # the first, or all others were deleted: nothing is active
            self.set_adapter(plan.name)

    def set_adapter(self, adapter_name: str | Sequence[str]) -> None:
        """Activate one adapter or several (their updates are summed); only they are trainable.

        Adapters loaded for inference (``is_trainable=False``, top-k checkpoints) stay frozen.
        """
        names = (adapter_name,) if isinstance(adapter_name, str) else tuple(dict.fromkeys(adapter_name))
        if not names:
            raise ValueError(f"set_adapter needs at least one name; existing: {list(self.peft_config)}")
        missing = [n for n in names if n not in self.peft_config]
        if missing:
            raise ValueError(f"unknown adapter(s) {missing}; existing: {list(self.peft_config)}")
        wrappers = list(save_wrappers(self.model))
        for wrapper in wrappers:
            owners = [n for n in names if n in wrapper.modules_to_save]
            if len(owners) > 1:
                raise ValueError(
                    "Only one adapter can be set at a time for ModulesToSaveWrapper: "
                    f"adapters {owners} each have a trainable copy of the same module"
                )
        previous, self.adapters.active = self.adapters.active, names
        for layer in self.vblora_layers():
            layer.set_adapter(list(names))  # as PEFT: names the layer lacks are kept, and skipped
        # Inactive adapters are frozen already: only the previous and the new active ones change,
        # so switching costs the same with thousands of adapters loaded as with two.
        for wrapper in wrappers:
            old = wrapper.active_adapter
            wrapper.set_active(names)
            if old is not None and old in wrapper.modules_to_save:
                wrapper.modules_to_save[old].requires_grad_(False)
            if wrapper.active_adapter is not None:
                wrapper.modules_to_save[wrapper.active_adapter].requires_grad_(
                    self.is_trainable_adapter(wrapper.active_adapter)
                )
        for name in dict.fromkeys((*previous, *names)):
            if name in self.vblora_banks:
                self.vblora_banks[name].requires_grad_(name in names and self.is_trainable_adapter(name))
        for name in previous:  # a base bias trains only while its adapter is active
            if name in self.peft_config:
                self._set_bias_trainable(name, False)
        for name in names:
            if self.is_trainable_adapter(name):
                self._set_bias_trainable(name, True)

    def is_trainable_adapter(self, name: str) -> bool:
        """Whether adapter ``name`` trains when active: not a top-k (selection-only) adapter, and
        not one loaded for inference (``is_trainable=False``)."""
        return name not in self.adapters.frozen and not self.vblora_banks[name].inference_only

    def _set_bias_trainable(self, name: str, trainable: bool) -> None:
        for bias in self.trained_biases(name).values():
            bias.requires_grad_(trainable)

    def trained_biases(self, adapter_name: str) -> dict[str, nn.Parameter]:
        """The biases an adapter trains (per its ``bias`` setting), by path in the base model."""
        return trained_biases(self.model, adapter_name, self.peft_config[adapter_name].bias)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove every trace of an adapter; wrappers left without adapters are unwrapped."""
        if adapter_name not in self.peft_config:
            raise ValueError(f"Adapter {adapter_name} does not exist; existing: {list(self.peft_config)}")
        if adapter_name in self.merged_adapters:  # PEFT's wording
            raise ValueError(
                f"Cannot delete adapter(s) {[adapter_name]} while they are merged. Please unmerge them first."
            )
        self._set_bias_trainable(adapter_name, False)  # the biases stay in the base model, trained
        eject(self.model, adapter_name)
        del self.vblora_banks[adapter_name]
        del self.peft_config[adapter_name]
        self.adapters.forget(adapter_name)
        remaining = [n for n in self.adapters.active if n != adapter_name]
        if not remaining and self.peft_config:
            remaining = [next(iter(self.peft_config))]
        self.adapters.active = ()
        if remaining:
            self.set_adapter(remaining)

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the base model alone; the previous state (merges included) is restored on exit."""
        merged = self.merged_adapters
        modules = [*self.vblora_layers(), *save_wrappers(self.model)]
        if merged:
            self.unmerge_adapter()
        for module in modules:
            module.disabled = True
        self._disabled = True
        try:
            yield
        finally:
            self._disabled = False
            for module in modules:
                module.disabled = False
            if merged:  # merged before, so a quantized base was requantized by request
                self.merge_adapter(merged, requantize=True)

    # ------------------------------------------------------------------ merging
    @property
    def merged_adapters(self) -> list[str]:
        return merging.merged_names(list(self.vblora_layers()))

    def merge_adapter(
        self,
        adapter_names: Sequence[str] | None = None,
        safe_merge: bool = False,
        *,
        requantize: bool = False,
    ) -> None:
        """Add ΔW of the given adapters (default: the active ones) into the base weights.

        Arithmetic is fp32. With ``safe_merge`` every merged weight is checked for NaN/inf before
        any weight is written. Adapters already merged are skipped with a warning. A quantized base
        (bitsandbytes 4/8-bit) is refused unless ``requantize``: then ΔW is rounded into the
        quantized weights (lossy; a warning states the share kept) and :meth:`unmerge_adapter`
        restores the original quantized bytes.
        """
        names = list(dict.fromkeys(self.adapters.active if adapter_names is None else adapter_names))
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(f"unknown adapter(s) {unknown}; existing: {list(self.peft_config)}")
        merging.merge(self.model, list(self.vblora_layers()), names, safe_merge, requantize)

    def unmerge_adapter(self) -> None:
        """Subtract every merged adapter's ΔW again (last merged first)."""
        merging.unmerge(list(self.vblora_layers()))

    def merge_and_unload(
        self,
        safe_merge: bool = False,
        adapter_names: Sequence[str] | None = None,
        *,
        dequantize: bool = False,
        dtype: torch.dtype = torch.float32,
        requantize: bool = False,
    ) -> nn.Module:
        """Merge the adapters into the base weights and return the plain base model.

        ``dequantize``: every quantized linear layer (bitsandbytes 4/8-bit) becomes an ``nn.Linear``
        in ``dtype`` holding dequant(W_q) + ΔW, the weights the adapter was trained against, so the
        merged model's outputs equal the unmerged one's. ``requantize``: see :meth:`merge_adapter`.
        """
        if dequantize:
            names = list(self.adapters.active if adapter_names is None else adapter_names)
            merged = self.merged_adapters
            if merged:
                self.unmerge_adapter()
            merging.dequantize_bases(self.model, list(self.vblora_layers()), dtype)
            adapter_names = list(dict.fromkeys([*merged, *names]))
        self.merge_adapter(adapter_names, safe_merge=safe_merge, requantize=requantize)
        return self._unwrap(keep_trained_copies=True)

    def unload(self, *, keep_merged: bool = False, keep_trained_copies: bool = False) -> nn.Module:
        """Remove the adapters and return the base model as it was before them: merged adapters
        are unmerged and ``modules_to_save`` modules are their originals.

        PEFT's ``unload()`` keeps both (the merged weights and the active adapter's trained head);
        ``keep_merged=True, keep_trained_copies=True`` gives its result (``vblora.peft.PeftModel``
        does so by default). Where the two results differ, a warning says so.
        """
        merged = self.merged_adapters
        copies = [w for w in save_wrappers(self.model) if w.active_adapter is not None]
        differs = [
            what
            for what, kept, present in (
                ("merged adapters are unmerged", keep_merged, merged),
                ("modules_to_save return to their originals", keep_trained_copies, copies),
            )
            if present and not kept
        ]
        if differs:
            warnings.warn(
                f"unload(): {' and '.join(differs)}, so the model is the one before the adapters; "
                "PEFT's unload() keeps them (unload(keep_merged=True, keep_trained_copies=True) "
                "does the same; merge_and_unload() keeps the fine-tune)",
                stacklevel=2,
            )
        if merged and not keep_merged:
            self.unmerge_adapter()
        return self._unwrap(keep_trained_copies=keep_trained_copies)

    def _unwrap(self, keep_trained_copies: bool) -> nn.Module:
        unwrap_all(self.model, keep_trained_copies)
        self._hook.remove()
        self._end_hook.remove()
        return self.model

    # ------------------------------------------------------------------ parameter counts
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable parameters, all parameters), each shared parameter counted once."""
        params = list(self.parameters())
        return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || "
            f"trainable%: {100 * trainable / max(total, 1):.4f}"
        )

    def get_nb_savable_parameters(self, adapter_name: str | None = None) -> tuple[int, int]:
        """(VB-LoRA parameters to save in float32-equivalents, other parameters to save).

        Counts one adapter only (PEFT mixes all adapters): the bank plus, with
        ``save_only_topk_weights``, k indices and k-1 weights per sub-vector, else the full logits.
        Other parameters are the adapter's trainable copies (``modules_to_save``) and trained biases.
        """
        name = adapter_name or self.adapters.active[0]
        config, bank = self.peft_config[name], self.vblora_banks[name]
        if config.save_only_topk_weights:
            per_row = (config.topk - 1) + config.topk * index_dtype(config.num_vectors).itemsize / 4
            vblora = int(bank.bank.numel() + bank.num_subvectors * per_row)
        else:
            vblora = bank.bank.numel() + bank.num_subvectors * bank.num_vectors
        copies = [w.modules_to_save[name] for w in save_wrappers(self.model) if name in w.modules_to_save]
        other = sum(p.numel() for copy in copies for p in copy.parameters())
        other += sum(p.numel() for p in self.trained_biases(name).values())
        return vblora, other

    def print_savable_parameters(self, adapter_name: str | None = None) -> None:
        vblora, other = self.get_nb_savable_parameters(adapter_name)
        print(
            f"VB-LoRA params to-be-saved (float32-equivalent): {vblora:,d} "
            f"|| total params to-be-saved: {vblora + other:,d}"
        )


def get_vblora_model(model: nn.Module, config: VBLoRAConfig, adapter_name: str = "default") -> VBLoRAModel:
    """Wrap ``model`` in place with a new VB-LoRA adapter and return the :class:`VBLoRAModel`."""
    return VBLoRAModel(model, config, adapter_name)
