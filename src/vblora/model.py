"""VBLoRAModel: injects VB-LoRA into any ``nn.Module`` and manages its adapters.

The model owns one :class:`~vblora.bank.AdapterBank` per adapter (``vblora_banks.<name>``);
wrapped layers hold plain references to them. A forward pre-hook on the base model refreshes
the active banks once per pass: one batched composition per adapter, cached in inference.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence
from os import PathLike
from typing import Any

import torch
from torch import nn

from .bank import AdapterBank, build_layout
from .config import VBLoRAConfig
from .layer import ModulesToSaveWrapper, VBLoRALayer, layer_features
from .serving import BASE_ADAPTER, RowRouting
from .targeting import SEQ_CLS_HEAD_NAMES, find_modules_to_save, find_targets, walk_modules


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, module)


def adapter_name_problem(name: object) -> str | None:
    """Why ``name`` cannot name an adapter, or None. Names become state-dict keys and folder names."""
    if not isinstance(name, str) or not name or any(c in name for c in "./\\\0"):
        return f"adapter name {name!r} must be a non-empty string without '.', '/', '\\' or NUL"
    if name == BASE_ADAPTER:
        return f"adapter name {name!r} is reserved: adapter_names uses it for rows without an adapter"
    return None


def save_path_problem(root: nn.Module, save_paths: list[str]) -> str | None:
    """Why a module to save cannot be: it holds other adapters' layers (its copies would hold copies)."""
    for path in save_paths:
        module = root.get_submodule(path)
        if isinstance(module, ModulesToSaveWrapper):
            continue  # another adapter saves it too: it holds no adapter layer (checked then)
        if isinstance(module, VBLoRALayer):
            return f"modules_to_save {path!r} is a layer another adapter adapts; save another module"
        inner = [
            f"{path}.{name}"
            for name, m in module.named_modules()
            if name and isinstance(m, (VBLoRALayer, ModulesToSaveWrapper))
        ]
        if inner:
            return (
                f"modules_to_save {path!r} contains modules that other adapters adapt or save "
                f"({inner[0]}); a trainable copy of it would copy them too. Save a smaller module, "
                "or leave those modules out of the other adapters"
            )
    return None


def _warn_untrained_head(model: nn.Module, config: VBLoRAConfig, save_paths: list[str]) -> None:
    """PEFT adds ``classifier``/``score`` to ``modules_to_save`` for ``task_type="SEQ_CLS"``; this
    library does not change a config behind the user's back, so it says what stays frozen."""
    if str(config.task_type).upper() != "SEQ_CLS":
        return
    heads = [n for n in SEQ_CLS_HEAD_NAMES if isinstance(getattr(model, n, None), nn.Module)]
    frozen = [n for n in heads if not any(n == p or n.startswith(p + ".") for p in save_paths)]
    if frozen:
        warnings.warn(
            f"task_type='SEQ_CLS' but the classifier head {frozen[0]!r} is not in modules_to_save, so it "
            "is neither trained nor saved (PEFT would add it). Pass "
            "modules_to_save=['classifier', 'score'] to train it with the adapter",
            stacklevel=4,
        )


def _divisibility_error(path: str, in_features: int, out_features: int, b: int) -> ValueError:
    import math

    g = math.gcd(in_features, out_features)
    options = [d for d in (512, 256, 128, 64, 32, 16, 8, 4, 2, 1) if g % d == 0][:3]
    side = "in_features" if in_features % b else "out_features"
    size = in_features if in_features % b else out_features
    return ValueError(
        f"{path}: {side} {size} is not divisible by vector_length {b} (layer is {in_features} -> "
        f"{out_features}); choose a vector_length that divides every targeted dimension, e.g. "
        f"{options}, or leave this module out with exclude_modules"
    )


class VBLoRAModel(nn.Module):
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
        self._active: tuple[str, ...] = ()
        self._routed: tuple[str, ...] = ()  # adapters of the mixed batch in flight, if any
        self._frozen: set[str] = set()  # adapters loaded for inference: never made trainable
        self._recent: dict[str, None] = {}  # adapters with composed factors, least recent first
        self._max_cached = 8
        self._disabled = False  # inside disable_adapter()
        self._in_pass: tuple[str, ...] = ()  # banks flagged in_pass by the forward in flight
        self.add_adapter(adapter_name, config, initialise=initialise, trainable=trainable)
        for p in model.parameters():  # after add_adapter: a refused config leaves the model as it was
            p.requires_grad_(False)
        self.set_adapter(adapter_name)
        self._hook = model.register_forward_pre_hook(self._refresh_banks)
        self._end_hook = model.register_forward_hook(self._end_pass, always_call=True)

    # ------------------------------------------------------------------ pass-through
    def forward(self, *args: Any, adapter_names: Sequence[str] | None = None, **kwargs: Any) -> Any:
        """The base model's forward; ``adapter_names`` (one per row, or one name for every row) runs
        a mixed-adapter batch."""
        try:
            if adapter_names is None:
                return self.model(*args, **kwargs)
            with self._mixed_batch(adapter_names, _input_rows(args, kwargs)):
                return self.model(*args, **kwargs)
        finally:
            self._end_pass()  # also after Ctrl-C, which the end hook does not see

    def generate(self, *args: Any, adapter_names: Sequence[str] | None = None, **kwargs: Any) -> Any:
        """The base model's ``generate``; ``adapter_names`` gives each row its own adapter."""
        self._end_pass()  # the encoder of an encoder-decoder runs outside the model's forward
        if adapter_names is None:
            return self.model.generate(*args, **kwargs)
        with self._mixed_batch(adapter_names, _input_rows(args, kwargs), self._generate_repeat(kwargs)):
            return self.model.generate(*args, **kwargs)

    def _generate_repeat(self, kwargs: dict[str, Any]) -> int:
        """How many times ``generate`` repeats each input row: the beams of a beam search, else
        ``num_return_sequences`` (transformers' expansion of the inputs)."""
        configs = (kwargs.get("generation_config"), getattr(self.model, "generation_config", None))

        def setting(name: str) -> int:  # the first one given: the call, its config, the model's
            values = (kwargs.get(name), *(getattr(c, name, None) for c in configs))
            return int(next((v for v in values if v is not None), 1))

        return max(setting("num_beams"), setting("num_return_sequences"))

    @contextlib.contextmanager
    def _mixed_batch(self, adapter_names: Sequence[str], rows: int | None, repeat: int = 1) -> Iterator[None]:
        """Route each row of the input (``rows`` of them, None if unknown) through its adapter;
        ``generate`` repeats each row ``repeat`` times."""
        if isinstance(adapter_names, str):
            names = [adapter_names] * (rows or 1)
        elif not isinstance(adapter_names, (list, tuple)):
            raise ValueError(f"adapter_names must be a list of names, got {type(adapter_names).__name__}")
        else:
            names = list(adapter_names)
            if rows is not None and len(names) != rows:
                raise ValueError(
                    f"adapter_names has {len(names)} entries for an input of {rows} rows; "
                    "pass one adapter name per row (or one name for every row)"
                )
        bad = [n for n in names if not isinstance(n, str)]
        if bad:
            raise ValueError(f"adapter_names must hold adapter names (strings), got {bad[0]!r}")
        unknown = sorted({n for n in names if n != BASE_ADAPTER and n not in self.peft_config})
        if unknown:
            known = list(self.peft_config)
            shown = f"{known[:10]} and {len(known) - 10} more" if len(known) > 10 else f"{known}"
            raise ValueError(
                f"adapter_names: unknown adapter(s) {unknown[:10]}; use {shown} or {BASE_ADAPTER!r}"
            )
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
        device = next(iter(self.vblora_banks.values())).bank.device
        routing = RowRouting.from_names(names, device, repeat)
        modules = [*self.vblora_layers(), *self._save_wrappers()]
        self._routed = tuple(routing.rows)
        for module in modules:
            module.routing = routing
        try:
            yield
        finally:
            for module in modules:
                module.routing = None
            self._routed = ()

    def train(self, mode: bool = True) -> VBLoRAModel:
        """The base model's train/eval mode (dropout); the banks have no mode, so they are not
        walked: switching stays as cheap with thousands of adapters loaded as with one."""
        self.training = mode
        self.model.train(mode)
        return self

    def get_base_model(self) -> nn.Module:
        return self.model

    @property
    def config(self) -> Any:
        return getattr(self.model, "config", None)

    @property
    def max_cached_adapters(self) -> int | None:
        """How many adapters keep their composed factors between forward passes (None: all).

        In inference each adapter's A and B are composed once and reused until its parameters
        change; the cache is as large as a plain LoRA adapter in fp32 (about 40 MB for a
        Llama-2-7B-shaped one). When more adapters than this have been used, the least recently used
        lose their factors and compose again when next used. The adapters of the pass in flight are
        always kept. Default 8.
        """
        return self._max_cached

    @max_cached_adapters.setter
    def max_cached_adapters(self, value: int | None) -> None:
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"max_cached_adapters must be a positive int or None, got {value!r}")
        self._max_cached = value
        self._evict(keep=())

    # ------------------------------------------------------------------ transformers' model API
    # The few base-model methods transformers' Trainer calls on the model it trains, said
    # explicitly (no attribute forwarding): activation checkpointing, NEFTune's embedding hook.
    def activation_checkpointing_enable(
        self, activation_checkpointing_kwargs: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        """The base model's activation (gradient) checkpointing, non-reentrant: the only kind
        VB-LoRA supports, since every layer's factors come from one composition per pass, whose
        graph a reentrant checkpoint would run backward through twice. ``kwargs``
        (``every_n_layers``, ``offload``) go to the base model's method as they are."""
        options = {"use_reentrant": False, **(activation_checkpointing_kwargs or {})}
        if options["use_reentrant"]:
            raise ValueError(
                "VB-LoRA needs non-reentrant gradient checkpointing: pass {'use_reentrant': False} "
                "(the default here) as the checkpointing kwargs"
            )
        if hasattr(self.model, "activation_checkpointing_enable"):  # transformers >= 5.x
            self.model.activation_checkpointing_enable(activation_checkpointing_kwargs=options, **kwargs)
        else:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options, **kwargs)

    def gradient_checkpointing_enable(
        self, gradient_checkpointing_kwargs: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        """transformers' older name of :meth:`activation_checkpointing_enable`."""
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **kwargs)

    def activation_checkpointing_disable(self) -> None:
        disable = getattr(self.model, "activation_checkpointing_disable", None)
        (disable or self.model.gradient_checkpointing_disable)()

    gradient_checkpointing_disable = activation_checkpointing_disable

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module | None:
        return self.model.get_output_embeddings()

    def _refresh_banks(self, *_: Any) -> None:
        self._end_pass()  # a pass stopped by Ctrl-C never ran its end hook
        names = tuple(dict.fromkeys(self._routed or self._active))
        for name in names:
            bank = self.vblora_banks[name]
            bank.refresh()
            bank.in_pass = True  # its layers need not check the factors again during this pass
            self._in_pass += (name,)
            self._recent.pop(name, None)
            self._recent[name] = None  # most recent last
        self._evict(keep=names)

    def _end_pass(self, *_: Any) -> None:
        for name in self._in_pass:
            if name in self.vblora_banks:
                self.vblora_banks[name].in_pass = False
        self._in_pass = ()

    def _evict(self, keep: tuple[str, ...]) -> None:
        """Drop the composed factors of the least recently used adapters beyond the limit."""
        if self._max_cached is None:
            return
        for name in list(self._recent):
            if len(self._recent) <= self._max_cached:
                break
            if name not in keep:
                del self._recent[name]
                self.vblora_banks[name].clear_cache()

    # ------------------------------------------------------------------ iteration helpers
    def vblora_layers(self) -> Iterator[VBLoRALayer]:
        for _, module in walk_modules(self.model, with_save_wrappers=True):
            if isinstance(module, VBLoRALayer):
                yield module

    def _save_wrappers(self) -> Iterator[ModulesToSaveWrapper]:
        # Not walking into the wrappers: with a head copy per adapter, thousands of adapters would
        # make every walk (and so every load) grow with the number of adapters.
        for _, module in walk_modules(self.model, with_save_wrappers=True):
            if isinstance(module, ModulesToSaveWrapper):
                yield module

    # ------------------------------------------------------------------ adapter lifecycle
    @property
    def active_adapters(self) -> list[str]:
        return list(self._active)

    @property
    def active_adapter(self) -> str | list[str]:
        return self._active[0] if len(self._active) == 1 else list(self._active)

    def add_adapter(
        self, adapter_name: str, config: VBLoRAConfig, *, initialise: bool = True, trainable: bool = True
    ) -> None:
        """Inject a new adapter (inactive until :meth:`set_adapter`, unless no adapter is active).

        ``initialise=False`` leaves its bank and logits uninitialised, for a loader that overwrites
        them (initialising a Llama-2-7B-shaped table costs more than loading it).
        ``trainable=False`` keeps the adapter frozen when it is active (an inference load).

        Raises:
            ValueError: the name exists, a second adapter trains biases, no module matched, or a
                module's dimensions are not divisible by ``vector_length``. The model is unchanged.
        """
        if not isinstance(config, VBLoRAConfig):
            raise TypeError(f"config must be a VBLoRAConfig, got {type(config).__name__}")
        if adapter_name in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} already exists; delete it first or pick a new name")
        problem = adapter_name_problem(adapter_name)
        if problem:
            raise ValueError(problem)
        if config.bias != "none" and any(c.bias != "none" for c in self.peft_config.values()):
            raise ValueError("only one adapter may train biases (bias != 'none')")
        save_paths = find_modules_to_save(self.model, config.modules_to_save or ())
        self._check_save_paths(save_paths)
        if initialise:  # a new adapter, not a load
            _warn_untrained_head(self.model, config, save_paths)
        targets = find_targets(self.model, config, exclude=save_paths)
        shapes = self._check_shapes(targets, config)
        device = self._device_of(targets[0])
        layout = build_layout(shapes, config.r, config.vector_length)
        bank = AdapterBank(
            layout,
            config.num_vectors,
            config.vector_length,
            config.topk,
            config.init_vector_bank_bound,
            config.init_logits_std,
            device=device,
            initialise=initialise,
        )
        bank.requires_grad_(False)
        for path in targets:
            layer = self.model.get_submodule(path)
            if not isinstance(layer, VBLoRALayer):
                layer = VBLoRALayer(layer, path)
                _set_submodule(self.model, path, layer)
            layer.add_adapter(adapter_name, bank, config.vblora_dropout)
            if self._active:
                layer.active_adapters = self._active
        for path in save_paths:
            wrapper = self.model.get_submodule(path)
            if not isinstance(wrapper, ModulesToSaveWrapper):
                wrapper = ModulesToSaveWrapper(wrapper)
                _set_submodule(self.model, path, wrapper)
            wrapper.add_adapter(adapter_name)
            wrapper.modules_to_save[adapter_name].requires_grad_(False)
        self.vblora_banks[adapter_name] = bank
        self.peft_config[adapter_name] = config
        if not trainable:
            self._frozen.add(adapter_name)
        if self._active:
            self.set_adapter(list(self._active))
        elif len(self.peft_config) == 1:  # the first, or all others were deleted: nothing is active
            self.set_adapter(adapter_name)

    def _check_save_paths(self, save_paths: list[str]) -> None:
        problem = save_path_problem(self.model, save_paths)
        if problem:
            raise ValueError(problem)

    def _check_shapes(self, targets: list[str], config: VBLoRAConfig) -> list[tuple[str, int, int]]:
        b = config.vector_length
        shapes, flipped = [], []
        for path in targets:
            module = self.model.get_submodule(path)
            base = module.base_layer if isinstance(module, VBLoRALayer) else module
            in_features, out_features, fan_in_fan_out = layer_features(base)
            if in_features % b or out_features % b:
                raise _divisibility_error(path, in_features, out_features, b)
            if config.fan_in_fan_out and not fan_in_fan_out:  # Conv1D with the default False is silent
                flipped.append(path)
            shapes.append((path, in_features, out_features))
        if flipped:
            warnings.warn(
                f"fan_in_fan_out={config.fan_in_fan_out} does not match {len(flipped)} layer(s) "
                f"(e.g. {flipped[0]}); each layer's own weight layout is used (config unchanged)",
                stacklevel=3,
            )
        return shapes

    def _device_of(self, path: str) -> torch.device:
        module = self.model.get_submodule(path)
        weight = next(module.parameters(), None)
        return weight.device if weight is not None else torch.device("cpu")

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
        self._check_save_conflicts(names)
        previous, self._active = self._active, names
        for layer in self.vblora_layers():
            layer.active_adapters = tuple(n for n in names if n in layer.banks)
        # Inactive adapters are frozen already: only the previous and the new active ones change,
        # so switching costs the same with thousands of adapters loaded as with two.
        for wrapper in self._save_wrappers():
            old = wrapper.active_adapter
            wrapper.set_active(names)
            if old is not None and old in wrapper.modules_to_save:
                wrapper.modules_to_save[old].requires_grad_(False)
            new = wrapper.active_adapter
            if new is not None:
                wrapper.modules_to_save[new].requires_grad_(self._trainable(new))
        for name in dict.fromkeys((*previous, *names)):
            if name in self.vblora_banks:
                bank = self.vblora_banks[name]
                trainable = name in names and self._trainable(name)
                bank.bank.requires_grad_(trainable)
                bank.logits.requires_grad_(trainable)
        for name in previous:  # a base bias trains only while its adapter is active
            if name in self.peft_config:
                self._set_bias_trainable(name, False)
        for name in names:
            if self._trainable(name):
                self._set_bias_trainable(name, True)

    def _trainable(self, name: str) -> bool:
        """Whether adapter ``name`` trains when active: not a top-k (selection-only) adapter, and
        not one loaded for inference (``is_trainable=False``)."""
        return name not in self._frozen and not self.vblora_banks[name].inference_only

    def _check_save_conflicts(self, names: tuple[str, ...]) -> None:
        for wrapper in self._save_wrappers():
            owners = [n for n in names if n in wrapper.modules_to_save]
            if len(owners) > 1:
                raise ValueError(
                    f"adapters {owners} each have a trainable copy of the same module; "
                    "only one of them can be active at a time"
                )

    def _set_bias_trainable(self, name: str, trainable: bool) -> None:
        for bias in self.trained_biases(name).values():
            bias.requires_grad_(trainable)

    def trained_biases(self, adapter_name: str) -> dict[str, nn.Parameter]:
        """The biases an adapter trains (per its ``bias`` setting), by path in the base model."""
        bias = self.peft_config[adapter_name].bias
        if bias == "vblora_only":
            return {
                f"{layer.path}.base_layer.bias": layer.base_layer.bias
                for layer in self.vblora_layers()
                if adapter_name in layer.banks and getattr(layer.base_layer, "bias", None) is not None
            }
        if bias == "all":
            wrappers = [p for p, m in self.model.named_modules() if isinstance(m, ModulesToSaveWrapper)]
            return {
                name: p
                for name, p in self.model.named_parameters()
                if name.rsplit(".", 1)[-1] == "bias" and not any(name.startswith(w + ".") for w in wrappers)
            }
        return {}

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove every trace of an adapter; wrappers left without adapters are unwrapped."""
        if adapter_name not in self.peft_config:
            raise ValueError(f"unknown adapter {adapter_name!r}; existing: {list(self.peft_config)}")
        layers = list(self.vblora_layers())
        if any(adapter_name in layer.merged_adapters for layer in layers):
            raise ValueError(f"adapter {adapter_name!r} is merged; unmerge_adapter() before deleting it")
        self._set_bias_trainable(adapter_name, False)  # the biases stay in the base model, trained
        for layer in layers:
            layer.remove_adapter(adapter_name)
            if not layer.banks:
                _set_submodule(self.model, layer.path, layer.base_layer)
        for wrapper in list(self._save_wrappers()):
            wrapper.remove_adapter(adapter_name)
        self._drop_empty_save_wrappers()
        del self.vblora_banks[adapter_name]
        del self.peft_config[adapter_name]
        self._frozen.discard(adapter_name)
        self._recent.pop(adapter_name, None)
        remaining = [n for n in self._active if n != adapter_name]
        if not remaining and self.peft_config:
            remaining = [next(iter(self.peft_config))]
        self._active = ()
        if remaining:
            self.set_adapter(remaining)

    def _drop_empty_save_wrappers(self) -> None:
        for path, module in list(walk_modules(self.model, with_save_wrappers=True)):
            if isinstance(module, ModulesToSaveWrapper) and not module.modules_to_save:
                _set_submodule(self.model, path, module.original_module)

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the base model alone; the previous state (merges included) is restored on exit."""
        merged = self.merged_adapters
        layers = list(self.vblora_layers())
        wrappers = list(self._save_wrappers())
        if merged:
            self.unmerge_adapter()
        for module in (*layers, *wrappers):
            module.disabled = True
        self._disabled = True
        try:
            yield
        finally:
            self._disabled = False
            for module in (*layers, *wrappers):
                module.disabled = False
            if merged:
                self.merge_adapter(merged)

    # ------------------------------------------------------------------ merging
    @property
    def merged_adapters(self) -> list[str]:
        seen: dict[str, None] = {}
        for layer in self.vblora_layers():
            seen.update(dict.fromkeys(layer.merged_adapters))
        return list(seen)

    def merge_adapter(self, adapter_names: Sequence[str] | None = None, safe_merge: bool = False) -> None:
        """Add ΔW of the given adapters (default: the active ones) into the base weights.

        Arithmetic is fp32. With ``safe_merge`` every merged weight is checked for NaN/inf before
        any weight is written. Adapters already merged are skipped with a warning.
        """
        names = list(dict.fromkeys(self._active if adapter_names is None else adapter_names))
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(f"unknown adapter(s) {unknown}; existing: {list(self.peft_config)}")
        already = [n for n in names if n in self.merged_adapters]
        if already:
            warnings.warn(f"adapter(s) {already} already merged; nothing to do for them", stacklevel=2)
        names = [n for n in names if n not in already]
        plan = [
            (layer, name, layer.delta_weight(name))
            for layer in self.vblora_layers()
            for name in names
            if name in layer.banks
        ]
        self._refuse_tied([layer for layer, _, _ in plan])
        if safe_merge:
            for layer, name, delta in plan:
                if not torch.isfinite(layer._weight().float() + delta.to(layer._weight().device)).all():
                    raise ValueError(
                        f"merging adapter {name!r} would put NaN or inf into {layer.path}; nothing was merged"
                    )
        for layer, name, delta in plan:
            layer.add_delta(delta, +1.0)
            layer.merged_adapters.append(name)

    def _refuse_tied(self, layers: list[VBLoRALayer]) -> None:
        """A weight shared with another module (a tied lm_head) would change there too."""
        if not layers:
            return
        uses: dict[int, int] = {}
        for _, p in self.model.named_parameters(remove_duplicate=False):
            uses[id(p)] = uses.get(id(p), 0) + 1
        for layer in layers:
            if uses.get(id(layer._weight()), 0) > 1:
                raise ValueError(
                    f"{layer.path}: its weight is shared with another module (tied weights, e.g. "
                    "lm_head and the input embeddings), so merging would change both; nothing was "
                    "merged. Serve the adapter unmerged, or untie the weights first (clone the "
                    "weight and set config.tie_word_embeddings=False)"
                )

    def unmerge_adapter(self) -> None:
        """Subtract every merged adapter's ΔW again (last merged first)."""
        layers = [layer for layer in self.vblora_layers() if layer.merged_adapters]
        if not layers:
            warnings.warn("no adapter is merged; nothing to unmerge", stacklevel=2)
        for layer in layers:
            while layer.merged_adapters:
                name = layer.merged_adapters.pop()
                layer.add_delta(layer.delta_weight(name), -1.0)

    def merge_and_unload(
        self, safe_merge: bool = False, adapter_names: Sequence[str] | None = None
    ) -> nn.Module:
        """Merge the adapters into the base weights and return the plain base model."""
        self.merge_adapter(adapter_names, safe_merge=safe_merge)
        return self._unwrap(keep_trained_copies=True)

    def unload(self) -> nn.Module:
        """Remove the adapters without merging and return the plain base model."""
        if self.merged_adapters:
            self.unmerge_adapter()
        return self._unwrap(keep_trained_copies=False)

    def _unwrap(self, keep_trained_copies: bool) -> nn.Module:
        for layer in list(self.vblora_layers()):
            _set_submodule(self.model, layer.path, layer.base_layer)
        for path, wrapper in list(walk_modules(self.model, with_save_wrappers=True)):
            if isinstance(wrapper, ModulesToSaveWrapper):
                active = wrapper.active_adapter
                use_copy = keep_trained_copies and active is not None
                chosen = wrapper.modules_to_save[active] if use_copy else wrapper.original_module
                _set_submodule(self.model, path, chosen)
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
        name = adapter_name or self._active[0]
        config, bank = self.peft_config[name], self.vblora_banks[name]
        if config.save_only_topk_weights:
            index_bytes = _index_dtype(config.num_vectors).itemsize
            per_row = (config.topk - 1) + config.topk * index_bytes / 4
            vblora = int(bank.bank.numel() + bank.num_subvectors * per_row)
        else:
            vblora = bank.bank.numel() + bank.num_subvectors * bank.num_vectors
        other = sum(
            p.numel()
            for w in self._save_wrappers()
            if name in w.modules_to_save
            for p in w.modules_to_save[name].parameters()
        )
        other += sum(p.numel() for p in self.trained_biases(name).values())
        return vblora, other

    def print_savable_parameters(self, adapter_name: str | None = None) -> None:
        vblora, other = self.get_nb_savable_parameters(adapter_name)
        print(
            f"VB-LoRA params to-be-saved (float32-equivalent): {vblora:,d} "
            f"|| total params to-be-saved: {vblora + other:,d}"
        )

    # ------------------------------------------------------------------ checkpoints
    def save_pretrained(
        self,
        save_directory: str | PathLike[str],
        adapter_name: str | Sequence[str] | None = None,
        save_only_topk_weights: bool | None = None,
        *,
        selected_adapters: Sequence[str] | None = None,
        safe_serialization: bool = True,
    ) -> None:
        """Write a PEFT-compatible adapter directory (see :mod:`vblora.checkpoint`).

        ``selected_adapters`` and ``safe_serialization`` are PEFT's names, accepted so that code
        written for PEFT runs unchanged: the first is ``adapter_name``; the files are always
        safetensors (``safe_serialization=False``, a pickle file, is refused).
        """
        from .checkpoint import save_pretrained

        if not safe_serialization:
            raise ValueError("vblora writes safetensors only (no pickle); drop safe_serialization=False")
        if selected_adapters is not None:
            if adapter_name is not None:
                raise ValueError("pass adapter_name or PEFT's selected_adapters, not both")
            adapter_name = list(selected_adapters)
        save_pretrained(self, save_directory, adapter_name, save_only_topk_weights)

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        path: str | PathLike[str],
        adapter_name: str = "default",
        is_trainable: bool = False,
    ) -> VBLoRAModel:
        """Wrap ``model`` with the adapter saved in ``path`` (ours or PEFT's)."""
        from .checkpoint import from_pretrained

        return from_pretrained(cls, model, path, adapter_name, is_trainable)

    def load_adapter(self, path: str | PathLike[str], adapter_name: str, is_trainable: bool = False) -> None:
        """Add the adapter saved in ``path`` under ``adapter_name`` (inactive until set_adapter)."""
        from .checkpoint import load_adapter

        load_adapter(self, path, adapter_name, is_trainable)


def _index_dtype(num_vectors: int) -> torch.dtype:
    """PEFT's dtype for stored top-k indices."""
    if num_vectors < 2**8:
        return torch.uint8
    if num_vectors < 2**15:
        return torch.int16
    if num_vectors < 2**31:
        return torch.int32
    return torch.int64


def get_vblora_model(model: nn.Module, config: VBLoRAConfig, adapter_name: str = "default") -> VBLoRAModel:
    """Wrap ``model`` in place with a new VB-LoRA adapter and return the :class:`VBLoRAModel`."""
    return VBLoRAModel(model, config, adapter_name)


def _input_rows(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int | None:
    """The batch size of a forward's input: ``input_ids``/``inputs_embeds``, else the first tensor."""
    named = [kwargs.get("input_ids"), kwargs.get("inputs_embeds")]
    for value in (*named, *args, *kwargs.values()):
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value.shape[0]
    return None
