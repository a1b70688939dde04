"""Applying an injection plan to a model, and undoing it: wrapping target layers, adding
``modules_to_save`` copies, removing an adapter's traces, unwrapping everything."""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

from ..core.bank import AdapterBank
from ..layers.save import ModulesToSaveWrapper
from ..layers.wrapper import VBLoRALayer
from .plan import AdapterPlan
from .targeting import walk_modules


def set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, module)


def vblora_layers(root: nn.Module) -> Iterator[VBLoRALayer]:
    for _, module in walk_modules(root, with_save_wrappers=True):
        if isinstance(module, VBLoRALayer):
            yield module


def save_wrappers(root: nn.Module) -> Iterator[ModulesToSaveWrapper]:
    # Not walking into the wrappers: with a head copy per adapter, thousands of adapters would
    # make every walk (and so every load) grow with the number of adapters.
    for _, module in walk_modules(root, with_save_wrappers=True):
        if isinstance(module, ModulesToSaveWrapper):
            yield module


def inject(root: nn.Module, plan: AdapterPlan, bank: AdapterBank, active: tuple[str, ...]) -> None:
    """Wrap the plan's targets (once per layer, whatever the number of adapters) and give each the
    adapter's bank; add a frozen copy of every module to save."""
    for path in plan.targets:
        layer = plan.modules.get(path)  # wrapped already: the planned layer (the plan is fresh)
        if not isinstance(layer, VBLoRALayer):
            layer = root.get_submodule(path)
        if not isinstance(layer, VBLoRALayer):
            layer = VBLoRALayer(layer, path)
            set_submodule(root, path, layer)
        layer.add_adapter(plan.name, bank, plan.config.vblora_dropout)
        if active:
            layer.set_adapter(list(active))  # names the layer lacks are skipped in its forward
    for path in plan.save_paths:
        wrapper = root.get_submodule(path)
        if not isinstance(wrapper, ModulesToSaveWrapper):
            wrapper = ModulesToSaveWrapper(wrapper)
            set_submodule(root, path, wrapper)
        wrapper.add_adapter(plan.name)
        wrapper.modules_to_save[plan.name].requires_grad_(False)


def eject(root: nn.Module, name: str) -> None:
    """Remove adapter ``name`` from every layer and wrapper; those left without adapters are unwrapped."""
    for layer in list(vblora_layers(root)):
        layer.remove_adapter(name)
        if not layer.banks:
            set_submodule(root, layer.path, layer.base_layer)
    for wrapper in list(save_wrappers(root)):
        wrapper.remove_adapter(name)
    for path, module in list(walk_modules(root, with_save_wrappers=True)):
        if isinstance(module, ModulesToSaveWrapper) and not module.modules_to_save:
            set_submodule(root, path, module.original_module)


def unwrap_all(root: nn.Module, keep_trained_copies: bool) -> None:
    """Put every base layer back; a saved module becomes its active copy (``keep_trained_copies``)
    or its original."""
    for layer in list(vblora_layers(root)):
        set_submodule(root, layer.path, layer.base_layer)
    for path, wrapper in list(walk_modules(root, with_save_wrappers=True)):
        if isinstance(wrapper, ModulesToSaveWrapper):
            active = wrapper.active_adapter
            use_copy = keep_trained_copies and active is not None
            chosen = wrapper.modules_to_save[active] if use_copy else wrapper.original_module
            set_submodule(root, path, chosen)


def trained_biases(root: nn.Module, name: str, bias: str) -> dict[str, nn.Parameter]:
    """The biases adapter ``name`` trains per its ``bias`` setting, by path in ``root``."""
    if bias == "vblora_only":
        return {
            f"{layer.path}.base_layer.bias": layer.base_layer.bias
            for layer in vblora_layers(root)
            if name in layer.banks and getattr(layer.base_layer, "bias", None) is not None
        }
    if bias == "all":
        wrappers = [p for p, m in root.named_modules() if isinstance(m, ModulesToSaveWrapper)]
        return {
            key: p
            for key, p in root.named_parameters()
            if key.rsplit(".", 1)[-1] == "bias" and not any(key.startswith(w + ".") for w in wrappers)
        }
    return {}
