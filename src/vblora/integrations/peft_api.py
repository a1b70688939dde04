"""PEFT's public surface for VB-LoRA, on vblora's model: code written for PEFT's VB-LoRA runs by
changing its import line to ``from vblora.peft import ...``.

:class:`PeftModel` is a :class:`~vblora.model.VBLoRAModel` with PEFT's ``PeftModel`` attributes
(``base_model``, ``prefix``, ``vblora_vector_bank``, PEFT's ``unload()``...); the module-level
functions are PEFT's (``get_peft_model``, ``inject_adapter_in_model``, the state-dict helpers,
``convert_to_lora``). Where vblora differs on purpose, it warns or raises (README, "Coming from
PEFT"); it never gives other numbers silently.
"""

from __future__ import annotations

import dataclasses
from collections import namedtuple
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..core.config import TASK_TYPES, VBLoRAConfig
from ..formats.lora_export import lora_state
from ..formats.peft_dir import adapter_tensors, decode_directory
from ..injection.apply import save_wrappers
from ..injection.plan import plan_adapter
from ..layers.wrapper import AdapterView
from ..model import VBLoRAModel

IncompatibleKeys = namedtuple("IncompatibleKeys", ["missing_keys", "unexpected_keys"])
_OWNER = "_vblora_model"  # a plain attribute of a model that inject_adapter_in_model adapted


class PeftModel(VBLoRAModel):
    """A :class:`~vblora.model.VBLoRAModel` with PEFT's ``PeftModel`` surface.

    ``base_model`` is the model itself (PEFT's tuner, whose ``.model`` is the transformers model);
    any other attribute is looked up on the transformers model. ``unload()`` is PEFT's: merged
    weights and the active adapter's ``modules_to_save`` copies are kept.
    """

    prefix = "vblora_"

    @property
    def base_model(self) -> PeftModel:
        return self

    @property
    def vblora_vector_bank(self) -> AdapterView:
        """Each adapter's bank, by adapter name (PEFT's ``base_model.vblora_vector_bank``), live."""
        return AdapterView(self.vblora_banks, lambda bank: bank.bank)

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        return True  # exact: see convert_to_lora

    def get_nb_savable_parameters(self, adapter_name: str | None = None) -> tuple[int, int]:
        """As PEFT counts: the VB-LoRA part of one adapter, and every other trainable parameter
        (PEFT's "other" is whatever requires grad, e.g. a head made trainable by hand)."""
        vblora, _ = super().get_nb_savable_parameters(adapter_name)
        banks = {id(p) for p in self.vblora_banks.parameters()}
        other = sum(p.numel() for p in self.parameters() if p.requires_grad and id(p) not in banks)
        return vblora, other

    @property
    def active_peft_config(self) -> VBLoRAConfig:
        return self.peft_config[self.adapters.active[0]]

    @property
    def targeted_module_names(self) -> list[str]:
        return [layer.path for layer in self.vblora_layers()]

    @property
    def modules_to_save(self) -> set[str] | None:
        names = {n for c in self.peft_config.values() for n in (c.modules_to_save or ())}
        return names or None

    def unload(self, *, keep_merged: bool = True, keep_trained_copies: bool = True) -> nn.Module:
        return super().unload(keep_merged=keep_merged, keep_trained_copies=keep_trained_copies)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """As PEFT's: a ``SEQ_2_SEQ_LM`` model takes keyword arguments only (a positional
        ``input_ids`` is a ``TypeError`` there, so it is here)."""
        if args and self.peft_config[self.adapters.active[0]].task_type == "SEQ_2_SEQ_LM":
            raise TypeError(
                "generate() of a SEQ_2_SEQ_LM model takes keyword arguments only (as PEFT's "
                "PeftModelForSeq2SeqLM): pass input_ids=..."
            )
        return super().generate(*args, **kwargs)

    def enable_adapter_layers(self) -> None:
        for module in [*self.vblora_layers(), *save_wrappers(self.model)]:
            module.disabled = False

    def disable_adapter_layers(self) -> None:
        for module in [*self.vblora_layers(), *save_wrappers(self.model)]:
            module.disabled = True

    def _init_vblora_vector_bank(self, config: VBLoRAConfig, adapter_name: str) -> None:
        """Draw the bank again from U(-bound, bound) (PEFT's private helper, used by its tests)."""
        with torch.no_grad():
            bound = config.init_vector_bank_bound
            self.vblora_banks[adapter_name].bank.uniform_(-bound, bound)

    def push_to_hub(self, *args: Any, **kwargs: Any) -> None:
        """Not supported: vblora never contacts the hub. Save with :meth:`save_pretrained` and
        upload the folder with ``huggingface_hub.upload_folder``."""
        raise NotImplementedError(
            "vblora does not upload: save_pretrained(folder), then huggingface_hub.upload_folder(...)"
        )

    def prepare_model_for_gradient_checkpointing(self, model: nn.Module) -> nn.Module:
        """PEFT's hook: inputs of a frozen embedding get ``requires_grad`` so that checkpointed
        layers see a graph (transformers' ``enable_input_require_grads``)."""
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
        elif hasattr(model, "get_input_embeddings"):
            model.get_input_embeddings().register_forward_hook(lambda _m, _i, out: out.requires_grad_(True))
        return model

    def set_requires_grad(self, adapter_names: str | list[str], requires_grad: bool = True) -> None:
        """Make adapters trainable or frozen without activating them (PEFT's ``set_requires_grad``).
        An adapter loaded for inference or from a top-k checkpoint cannot train: refused."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for name in names:
            if name not in self.peft_config:
                raise ValueError(f"unknown adapter {name!r}; existing: {list(self.peft_config)}")
            if requires_grad and not self.is_trainable_adapter(name):
                raise ValueError(f"adapter {name!r} was loaded for inference (or is top-k); it cannot train")
            self.vblora_banks[name].requires_grad_(requires_grad)
            for wrapper in save_wrappers(self.model):
                if name in wrapper.modules_to_save:
                    wrapper.modules_to_save[name].requires_grad_(requires_grad)


# PEFT's task classes: one model class serves every task (the base model's forward is called).
PeftModelForCausalLM = PeftModelForSeq2SeqLM = PeftModelForSequenceClassification = PeftModel
PeftModelForTokenClassification = PeftModelForQuestionAnswering = PeftModelForFeatureExtraction = PeftModel


def _config(peft_config: Any) -> VBLoRAConfig:
    if isinstance(peft_config, VBLoRAConfig):
        return peft_config
    if getattr(peft_config, "peft_type", None) == "VBLORA" and hasattr(peft_config, "to_dict"):
        return VBLoRAConfig.from_dict(peft_config.to_dict())  # PEFT's own VBLoRAConfig: same fields
    peft_type = getattr(
        getattr(peft_config, "peft_type", None), "value", getattr(peft_config, "peft_type", None)
    )
    raise TypeError(
        f"vblora implements VB-LoRA only: got {type(peft_config).__name__} (peft_type {peft_type!r}); "
        "use vblora.peft.VBLoRAConfig, or peft itself for other methods"
    )


def _peft_handles(config: Any) -> bool:
    """A config of another PEFT method (vblora hands it to PEFT when PEFT is installed)."""
    return type(config).__module__.startswith("peft.") and getattr(config, "peft_type", None) != "VBLORA"


def _is_peft_model(model: nn.Module) -> bool:
    return type(model).__module__.startswith("peft.")


def get_peft_model(
    model: nn.Module,
    peft_config: VBLoRAConfig,
    adapter_name: str = "default",
    mixed: bool = False,
    autocast_adapter_dtype: bool = True,
    revision: str | None = None,
    low_cpu_mem_usage: bool = False,
) -> PeftModel:
    """PEFT's ``get_peft_model``: wrap ``model`` in place and return a :class:`PeftModel`.

    ``mixed=True`` (PEFT's mixed-method model) is refused: vblora has one method. ``revision``
    sets the config's ``revision`` (PEFT writes it into the config; here the config is frozen, so
    the model gets a copy). ``autocast_adapter_dtype=False`` gives the adapter the base model's
    half-precision dtype, as PEFT does; ``low_cpu_mem_usage`` changes nothing.
    """
    if not isinstance(peft_config, VBLoRAConfig) and _peft_handles(peft_config):
        import peft  # another PEFT method: PEFT's own function

        return peft.get_peft_model(model, peft_config, adapter_name, mixed, autocast_adapter_dtype, revision)
    config = _config(peft_config)
    if mixed:
        raise ValueError("mixed=True (PeftMixedModel) is not supported: vblora implements VB-LoRA only")
    if revision is not None and revision != config.revision:
        config = dataclasses.replace(config, revision=revision)
    peft_model = PeftModel(model, config, adapter_name)
    if not autocast_adapter_dtype:
        peft_model.cast_to_base_dtype(adapter_name)
    del low_cpu_mem_usage
    return peft_model


def inject_adapter_in_model(
    peft_config: VBLoRAConfig,
    model: nn.Module,
    adapter_name: str = "default",
    low_cpu_mem_usage: bool = False,
    state_dict: Mapping[str, Tensor] | None = None,
) -> nn.Module:
    """PEFT's ``inject_adapter_in_model``: adapt ``model`` in place and return it (not wrapped).

    The adapter's bank and logits are registered on ``model`` as ``vblora_banks.<name>`` (one
    bank per adapter, not one per layer as PEFT does), so ``model.parameters()`` and optimizers
    see them; :func:`get_peft_model_state_dict` / :func:`set_peft_model_state_dict` accept the
    model. ``state_dict`` (PEFT's: targets read from a state dict) is not supported.
    """
    config = _config(peft_config)
    if state_dict is not None:
        raise ValueError("inject_adapter_in_model(state_dict=...) is not supported; pass target_modules")
    owner = getattr(model, _OWNER, None)
    if owner is not None:
        owner.add_adapter(adapter_name, config)
        owner.set_adapter([*owner.active_adapters, adapter_name])
        return model
    owner = PeftModel(model, config, adapter_name)
    model.vblora_banks = owner.vblora_banks  # registered: parameters, state_dict, .to() see them
    object.__setattr__(model, _OWNER, owner)  # not a submodule: no cycle in the module tree
    del low_cpu_mem_usage
    return model


def _owner(model: nn.Module) -> VBLoRAModel:
    while not isinstance(model, VBLoRAModel) and _OWNER not in model.__dict__ and hasattr(model, "module"):
        model = model.module  # DDP, FSDP and similar wrappers
    if isinstance(model, VBLoRAModel):
        return model
    owner = getattr(model, _OWNER, None)
    if owner is None:
        raise TypeError(
            f"{type(model).__name__} holds no VB-LoRA adapter: pass the model get_peft_model returned, "
            "or one that inject_adapter_in_model adapted"
        )
    return owner


def get_peft_model_state_dict(
    model: nn.Module,
    state_dict: Mapping[str, Tensor] | None = None,
    adapter_name: str = "default",
    unwrap_compiled: bool = False,
    save_embedding_layers: bool | str = "auto",
) -> dict[str, Tensor]:
    """PEFT's ``get_peft_model_state_dict``: adapter ``adapter_name``'s tensors under PEFT's keys
    (what ``adapter_model.safetensors`` holds): the bank, each module's logits (or top-k indices and
    weights with ``save_only_topk_weights``), ``modules_to_save`` copies and trained biases.

    ``state_dict`` (PEFT's: read from a given state dict) is not supported.
    """
    if state_dict is not None:
        raise ValueError("get_peft_model_state_dict(state_dict=...) is not supported; it reads the model")
    if unwrap_compiled:
        model = getattr(model, "_orig_mod", model)
    if _is_peft_model(model):
        import peft  # a model of another PEFT method: PEFT's own function

        return peft.get_peft_model_state_dict(model, adapter_name=adapter_name)
    owner = _owner(model)
    owner.adapter_names(adapter_name)  # unknown names refused
    return adapter_tensors(owner.export_adapter(adapter_name, save_embedding_layers=save_embedding_layers))


def set_peft_model_state_dict(
    model: nn.Module,
    peft_model_state_dict: Mapping[str, Tensor],
    adapter_name: str = "default",
    ignore_mismatched_sizes: bool = False,
    low_cpu_mem_usage: bool = False,
) -> IncompatibleKeys:
    """PEFT's ``set_peft_model_state_dict``: copy PEFT-keyed tensors (full logits or top-k) into the
    existing adapter ``adapter_name``, in place.

    Checked in full first: a missing, unexpected or mis-shaped tensor is a ``ValueError`` listing
    every problem (PEFT returns missing and unexpected keys and loads the rest), so the returned
    keys are always empty. ``ignore_mismatched_sizes=True`` is refused.
    """
    if ignore_mismatched_sizes:
        raise ValueError("ignore_mismatched_sizes=True is not supported: every tensor must fit")
    if _is_peft_model(model):
        import peft  # a model of another PEFT method: PEFT's own function

        return peft.set_peft_model_state_dict(model, peft_model_state_dict, adapter_name)
    owner = _owner(model)
    owner.adapter_names(adapter_name)
    config = owner.peft_config[adapter_name]
    tensors = {k: v for k, v in peft_model_state_dict.items()}
    loaded = decode_directory(owner.model, plan_adapter(owner.model, config, adapter_name, {}), tensors)
    loaded.fail_if_problems("state dict", adapter_name)
    if loaded.layout != owner.vblora_banks[adapter_name].layout:
        raise ValueError(f"state dict: adapter {adapter_name!r} holds other modules than the live one")
    if loaded.inference_only and owner.is_trainable_adapter(adapter_name):
        owner.adapters.frozen.add(adapter_name)  # a top-k load cannot train: frozen, as on loading
        owner.vblora_banks[adapter_name].requires_grad_(False)
    owner.fill(adapter_name, loaded)
    owner.vblora_banks[adapter_name].inference_only = loaded.inference_only
    del low_cpu_mem_usage
    return IncompatibleKeys([], [])


def get_base_model_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """PEFT's ``get_base_model_state_dict``: the base model's tensors under its own keys (before
    any adapter wrapped it), adapters left out."""
    base = _owner(model).model
    out = {}
    for key, value in base.state_dict().items():
        if key.startswith("vblora_banks.") or ".modules_to_save." in key:
            continue
        out[key.replace(".base_layer.", ".").replace(".original_module.", ".")] = value
    return out


def set_base_model_state_dict(
    model: nn.Module, state_dict: Mapping[str, Tensor], strict: bool = True
) -> IncompatibleKeys:
    """PEFT's ``set_base_model_state_dict``: load base-model tensors given under the base model's
    own keys into the adapted model."""
    base = _owner(model).model
    mapping = {}
    for key in base.state_dict():
        if key.startswith("vblora_banks.") or ".modules_to_save." in key:
            continue
        mapping[key.replace(".base_layer.", ".").replace(".original_module.", ".")] = key
    unexpected = [k for k in state_dict if k not in mapping]
    missing = [k for k in mapping if k not in state_dict]
    if strict and (unexpected or missing):
        raise RuntimeError(f"set_base_model_state_dict: missing keys {missing}, unexpected keys {unexpected}")
    result = base.load_state_dict(
        {mapping[k]: v for k, v in state_dict.items() if k in mapping}, strict=False
    )
    del result
    return IncompatibleKeys(missing, unexpected)


def convert_to_lora(
    model: nn.Module, rank: int | float | None = None, adapter_name: str = "default", **_: Any
) -> tuple[Any, dict[str, Tensor]]:
    """PEFT's ``convert_to_lora``: (``peft.LoraConfig``, LoRA state dict) of adapter ``adapter_name``.

    Exact: B @ A is the adapter's update at its own rank r (``lora_alpha = r``), where PEFT's is a
    truncated SVD. A ``rank`` below r or a float (an energy threshold) would need that
    approximation and is refused; a larger int gives the same exact rank-r result. Needs ``peft``.
    """
    owner = _owner(model)
    owner.adapter_names(adapter_name)
    r = owner.peft_config[adapter_name].r
    if rank is not None and (isinstance(rank, float) or rank < r):
        raise ValueError(
            f"convert_to_lora is exact at the adapter's rank r={r}; rank={rank!r} would need PEFT's SVD "
            "approximation. Pass rank=None (or >= r), or use peft.convert_to_lora for a smaller rank"
        )
    import peft  # lazily: peft is optional

    config, tensors = lora_state(owner.export_adapter(adapter_name, save_embedding_layers=False))
    return peft.LoraConfig(**{k: v for k, v in config.items() if k != "peft_type"}), tensors


__all__ = [
    "TASK_TYPES",
    "PeftModel",
    "PeftModelForCausalLM",
    "PeftModelForFeatureExtraction",
    "PeftModelForQuestionAnswering",
    "PeftModelForSeq2SeqLM",
    "PeftModelForSequenceClassification",
    "PeftModelForTokenClassification",
    "VBLoRAConfig",
    "convert_to_lora",
    "get_base_model_state_dict",
    "get_peft_model",
    "get_peft_model_state_dict",
    "inject_adapter_in_model",
    "set_base_model_state_dict",
    "set_peft_model_state_dict",
]
