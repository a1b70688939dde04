"""Adapter directories on a model: ``save_pretrained``, ``from_pretrained``, ``load_adapter`` and
resuming (``restore_adapters``), as methods of :class:`~vblora.model.VBLoRAModel`.

The formats read, check and write (:mod:`vblora.formats`); these methods gather what the formats
write from the model, and apply what the formats read to it: a load is checked in full first
(every problem in one error), then added, and removed again if anything fails on the way.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .core.adapters import AdapterSet
from .core.config import VBLoRAConfig
from .core.functional import topk_compress
from .distributed import any_sharded, writer_rank
from .formats.contents import Loaded, base_parameters
from .formats.peft_dir import (
    AdapterExport,
    decode_directory,
    export_adapter,
    refuse_training,
    write_directories,
)
from .formats.readers import read_directory
from .injection.plan import AdapterPlan, plan_adapter, unwrapped
from .layers.wrapper import VBLoRALayer


def load_options(model: nn.Module, options: dict[str, Any]) -> bool:
    """Check PEFT's ``from_pretrained``/``load_adapter`` options; returns ``autocast_adapter_dtype``.

    ``low_cpu_mem_usage`` changes nothing (a load never initialises what it overwrites).
    ``torch_device`` / ``device_map`` must name where the model already is: the adapter lives on
    the device of the layers it adapts (move the model with ``.to()``). ``ephemeral_gpu_offload``
    and ``key_mapping`` are not supported, and are refused rather than ignored.
    """
    options = {k: v for k, v in options.items() if v is not None}
    autocast = options.pop("autocast_adapter_dtype", True)
    options.pop("low_cpu_mem_usage", None)
    if options.pop("ephemeral_gpu_offload", False):
        raise ValueError("ephemeral_gpu_offload is not supported: the adapter lives where its layers are")
    if options.pop("key_mapping", None):
        raise ValueError("key_mapping is not supported: rename the base model's modules, or the saved keys")
    devices = {p.device for p in model.parameters()}
    for name in ("torch_device", "device_map"):
        value = options.pop(name, None)
        if value is None or value == "auto":
            continue
        wanted = set(value.values()) if isinstance(value, dict) else {value}
        wanted_types = {torch.device(f"cuda:{w}" if isinstance(w, int) else w).type for w in wanted}
        if wanted_types != {d.type for d in devices}:
            raise ValueError(
                f"{name}={value!r}: the model is on {sorted(str(d) for d in devices)}, and the adapter "
                "is placed on the device of the layers it adapts; move the model with .to() first"
            )
    if options:
        raise TypeError(f"unexpected arguments {sorted(options)}")
    return bool(autocast)


class CheckpointMethods:
    """The checkpoint half of :class:`~vblora.model.VBLoRAModel` (which provides these attributes)."""

    model: nn.Module
    peft_config: dict[str, VBLoRAConfig]
    vblora_banks: nn.ModuleDict
    adapters: AdapterSet

    if TYPE_CHECKING:  # the model's own methods, declared for type checkers only

        def vblora_layers(self) -> Iterator[VBLoRALayer]: ...
        def trained_biases(self, adapter_name: str) -> dict[str, nn.Parameter]: ...
        def delete_adapter(self, adapter_name: str) -> None: ...
        def eval(self) -> Any: ...
        def _inject(self, plan: AdapterPlan, initialise: bool, trainable: bool) -> None: ...

    def save_pretrained(
        self,
        save_directory: str | PathLike[str],
        adapter_name: str | Sequence[str] | None = None,
        save_only_topk_weights: bool | None = None,
        *,
        selected_adapters: Sequence[str] | None = None,
        safe_serialization: bool = True,
        save_embedding_layers: bool | str = "auto",
        is_main_process: bool = True,
    ) -> None:
        """Write adapters as PEFT-compatible directories: ``"default"`` into ``save_directory``,
        any other adapter into ``save_directory/<name>/`` (PEFT's layout).

        ``adapter_name``: one adapter, several, or None for all. ``save_only_topk_weights``
        overrides the config's choice: True writes k indices and k-1 weights per sub-vector (small,
        inference only), False the full logits (resumable). All files of all adapters are
        serialised and written aside before any target is replaced, so a failed save leaves the
        previous adapter readable. With FSDP2 (``fully_shard``) every rank must call this (the
        tensors are gathered) and rank 0 alone writes.

        ``selected_adapters`` and ``safe_serialization`` are PEFT's names, accepted so that code
        written for PEFT runs unchanged: the first is ``adapter_name``; the files are always
        safetensors (``safe_serialization=False``, a pickle file, is refused).
        ``save_embedding_layers`` is PEFT's: ``"auto"`` also saves the base weight of an adapted
        ``lm_head``/``embed_tokens`` (with PEFT's warning), ``False`` does not. ``is_main_process=False``
        writes nothing (PEFT's multi-process convention).
        """
        if not safe_serialization:
            raise ValueError("vblora writes safetensors only (no pickle); drop safe_serialization=False")
        if selected_adapters is not None:
            if adapter_name is not None:
                raise ValueError("pass adapter_name or PEFT's selected_adapters, not both")
            adapter_name = list(selected_adapters)
        exports = []
        for name in self.adapter_names(adapter_name):
            config = self.peft_config[name]
            topk = config.save_only_topk_weights if save_only_topk_weights is None else save_only_topk_weights
            exports.append(
                self.export_adapter(
                    name, save_embedding_layers=save_embedding_layers, save_only_topk_weights=topk
                )
            )
        write = writer_rank(self.adapters_sharded()) and is_main_process
        write_directories(Path(save_directory), exports, write=write)

    def adapter_names(self, adapter_name: str | Sequence[str] | None) -> list[str]:
        """The adapters a save names: one, several, or None for all; unknown ones are refused."""
        if adapter_name is None:
            names = list(self.peft_config)
        elif isinstance(adapter_name, str):
            names = [adapter_name]
        elif isinstance(adapter_name, (list, tuple)):
            names = list(adapter_name)
        else:  # e.g. save_pretrained(folder, True): PEFT's second argument is safe_serialization
            raise ValueError(
                f"adapter_name must be a name or a list of names, got {adapter_name!r} "
                "(PEFT's second argument is safe_serialization: pass it by keyword)"
            )
        if not names:
            raise ValueError(f"no adapter to save: adapter_name is empty; existing: {list(self.peft_config)}")
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(f"unknown adapter(s) {unknown}; existing: {list(self.peft_config)}")
        return names

    def export_adapter(
        self, name: str, save_embedding_layers: bool | str = "auto", **changes: Any
    ) -> AdapterExport:
        """Adapter ``name`` gathered for the formats to write (``changes``: config fields to set)."""
        layers = [layer for layer in self.vblora_layers() if name in layer.banks]
        fan_in_fan_out = bool(layers) and all(layer.fan_in_fan_out for layer in layers)
        config, bank = self.peft_config[name], self.vblora_banks[name]
        biases = self.trained_biases(name)
        return export_adapter(
            self.model, name, config, bank, biases, fan_in_fan_out, save_embedding_layers, **changes
        )

    def adapters_sharded(self) -> bool:
        """True when the adapters are sharded DTensors (FSDP2's ``fully_shard``)."""
        return any_sharded(bank.bank for bank in self.vblora_banks.values())

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        path: str | PathLike[str],
        adapter_name: str = "default",
        is_trainable: bool = False,
        config: VBLoRAConfig | None = None,
        **options: Any,
    ) -> Any:
        """Wrap ``model`` with the adapter saved in ``path`` (ours or PEFT's).

        With ``is_trainable=False`` every parameter is frozen and the model is put in eval mode.
        ``config`` replaces the saved config (then ``peft_config[adapter_name] is config``).
        PEFT's loading options are accepted (see :func:`load_options`).

        Raises:
            ValueError: as :meth:`load_adapter`; ``model`` is then left unwrapped and unchanged.
        """
        if isinstance(model, cls):
            raise TypeError("base_model is already a VBLoRAModel; use its load_adapter(path, name) instead")
        if options.get("subfolder"):
            path = Path(path) / options.pop("subfolder")
        autocast = load_options(model, options)
        loaded = cls._read_directory(model, path, adapter_name, {}, is_trainable, config)
        wrapped = cls.wrap_loaded(model, loaded, is_trainable)
        if not autocast:
            wrapped.cast_to_base_dtype(adapter_name)
        return wrapped

    def load_adapter(
        self,
        path: str | PathLike[str],
        adapter_name: str,
        is_trainable: bool = False,
        torch_device: str | torch.device | None = None,
        *,
        config: VBLoRAConfig | None = None,
        **options: Any,
    ) -> None:
        """Add the adapter saved in ``path`` (ours or PEFT's), inactive until set_adapter.

        ``config`` replaces the saved config; PEFT's loading options are accepted (see
        :func:`load_options`).

        Raises:
            ValueError: the directory is not readable, does not fit the model (every problem listed),
                or is a top-k checkpoint and ``is_trainable`` is True. The model is unchanged.
        """
        if options.get("subfolder"):
            path = Path(path) / options.pop("subfolder")
        autocast = load_options(self.model, {**options, "torch_device": torch_device})
        loaded = self._read_directory(self.model, path, adapter_name, self.peft_config, is_trainable, config)
        self.add_loaded(loaded, is_trainable)
        if not autocast:
            self.cast_to_base_dtype(adapter_name)
        if not is_trainable:
            self.eval()  # as PEFT: an inference load disables dropout

    def cast_to_base_dtype(self, adapter_name: str) -> None:
        """Give adapter ``adapter_name`` the dtype of its half-precision base layers (PEFT's
        ``autocast_adapter_dtype=False``); an fp32 base keeps an fp32 adapter."""
        layer = next((layer for layer in self.vblora_layers() if adapter_name in layer.banks), None)
        if layer is not None and layer.weight.dtype in (torch.float16, torch.bfloat16):
            self.vblora_banks[adapter_name].to(layer.weight.dtype)

    @staticmethod
    def _read_directory(
        root: nn.Module,
        path: Any,
        name: str,
        existing: dict,
        is_trainable: bool,
        given: VBLoRAConfig | None = None,
    ) -> Loaded:
        config, tensors, folder = read_directory(path)
        if given is not None:
            if not isinstance(given, VBLoRAConfig):
                raise TypeError(f"config must be a VBLoRAConfig, got {type(given).__name__}")
            # The one field a load sets on a given config, as PEFT does; informational (it is not
            # compared and changes no number), so the frozen config may carry it.
            object.__setattr__(given, "inference_mode", not is_trainable)
            config = given
        if is_trainable and config.save_only_topk_weights:
            raise refuse_training(folder, name)
        loaded = decode_directory(root, plan_adapter(root, config, name, existing), tensors)
        loaded.fail_if_problems(folder, name)
        if is_trainable and loaded.inference_only:
            raise refuse_training(folder, name)
        return loaded

    def add_loaded(self, loaded: Loaded, trainable: bool) -> None:
        """Add a validated load as a new adapter; on any failure the half-added adapter is removed."""
        try:
            self._install(loaded, trainable)
        except BaseException:
            if loaded.plan.name in self.peft_config:
                self.delete_adapter(loaded.plan.name)
            raise

    @classmethod
    def wrap_loaded(cls, base_model: nn.Module, loaded: Loaded, is_trainable: bool) -> Any:
        """Wrap ``base_model`` with a validated load; on any failure it is left as it was."""
        flags = [(p, p.requires_grad) for p in base_model.parameters()]
        with warnings.catch_warnings():
            # PEFT writes fan_in_fan_out to suit Conv1D; each layer's own layout is used regardless.
            warnings.filterwarnings("ignore", message="fan_in_fan_out=")
            # Uninitialised (_install fills it); an inference load stays frozen, even when set active.
            model = cls(base_model, loaded.config, loaded.plan.name, initialise=False, trainable=is_trainable)
        try:
            model._install(loaded, is_trainable)
        except BaseException:  # e.g. Ctrl-C or out of memory mid-copy: the base model as it was
            model.unload()
            for p, flag in flags:
                p.requires_grad_(flag)
            raise
        if is_trainable:
            model.set_adapter(loaded.plan.name)  # re-derive trainability now that the adapter is filled
        else:
            model.requires_grad_(False)
            model.eval()
        return model

    def _install(self, loaded: Loaded, trainable: bool) -> None:
        name = loaded.plan.name
        if name not in self.peft_config:  # _inject warns of nothing: no fan_in_fan_out filter here
            self._inject(loaded.plan, initialise=False, trainable=trainable)  # filled below
        self._fill(name, loaded)
        self.vblora_banks[name].inference_only = loaded.inference_only

    def fill(self, name: str, loaded: Loaded) -> None:
        """Copy a validated load (same layout) into the existing adapter ``name``, in place."""
        self._fill(name, loaded)

    @torch.inference_mode(False)  # as _inject: normal tensors even when loaded in inference mode
    @torch.no_grad()
    def _fill(self, name: str, loaded: Loaded) -> None:
        """Copy a validated load's tensors into adapter ``name`` (same layout) and the base model."""
        assert loaded.bank is not None and (loaded.logits is not None or loaded.selection is not None)
        bank = self.vblora_banks[name]
        bank.bank.copy_(loaded.bank)
        if loaded.selection is not None:  # inference only: the selection, never a (P, h) table
            bank.keep_topk(*loaded.selection)
        elif loaded.inference_only:  # full logits with -inf entries: keep their selection only
            bank.keep_topk(*topk_compress(loaded.logits, bank.topk))
        else:
            bank.logits.copy_(loaded.logits)
        for path, state in loaded.copies.items():
            self.model.get_submodule(path).modules_to_save[name].load_state_dict(state)
        params = base_parameters(self.model, []) if loaded.biases else {}
        for key, value in loaded.biases.items():
            params[key].copy_(value)
        for path, value in loaded.base_weights.items():
            unwrapped(self.model.get_submodule(path)).weight.copy_(value)
        bank.clear_cache()

    def restore_adapters(self, path: str | PathLike[str], names: list[str]) -> None:
        """Copy the saved tensors of adapters ``names`` back into the same adapters, in place (an
        optimizer keeps pointing at them): resuming training, or the best checkpoint.

        ``path`` is a directory :meth:`save_pretrained` wrote with full logits. Every adapter is read
        and checked against the live one (same layout, heads, biases) before any tensor is copied.

        Raises:
            ValueError: a directory is missing, unreadable, top-k only, or does not fit its adapter.
        """
        loads = []
        for name in names:
            folder = Path(path) if name == "default" else Path(path) / name
            config, tensors, folder = read_directory(folder)
            loaded = decode_directory(self.model, plan_adapter(self.model, config, name, {}), tensors)
            loaded.fail_if_problems(folder, name)  # {} above: no clash with itself
            if loaded.logits is None or loaded.inference_only:
                raise ValueError(
                    f"{folder}: adapter {name!r} was saved without its full logits; cannot resume it"
                )
            if loaded.layout != self.vblora_banks[name].layout:
                raise ValueError(f"{folder}: adapter {name!r} was saved with other modules than the live one")
            loads.append((name, loaded))
        for name, loaded in loads:
            self._fill(name, loaded)
