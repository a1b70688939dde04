"""Which modules to adapt, with PEFT's matching semantics.

- a list matches a module whose path equals a name or ends with ``"." + name``;
- a string is a regex matched against the full module path;
- ``"all-linear"`` takes every linear layer except the output head (with ``task_type="SEQ_CLS"``,
  the ``score`` or ``classifier`` head);
- ``exclude_modules`` uses the same rules; ``layers_to_transform``/``layers_pattern`` filter by
  the layer index found in the path, except for a module named by its full path;
- ``modules_to_save`` names match as plain suffixes (PEFT's rule: ``"norm"`` takes ``input_layernorm``).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence

from torch import nn

from ..core.config import VBLoRAConfig
from ..layers.base import kind_of, supported_names
from ..layers.save import ModulesToSaveWrapper
from ..layers.wrapper import VBLoRALayer

ALL_LINEAR = "all-linear"

# Default targets when target_modules is None, per transformers model_type (PEFT's mapping).
DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    "t5": ("q", "k", "v", "o", "wi", "wo"),
    "mt5": ("q", "k", "v", "o", "wi_0", "wi_1", "wo"),
    "bart": ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
    "opt": ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
    "gpt2": ("c_attn",),
    "gpt_bigcode": ("c_attn",),
    "bloom": ("query_key_value",),
    "gpt_neox": ("query_key_value",),
    "gptj": ("q_proj", "v_proj"),
    "gpt_neo": ("q_proj", "v_proj"),
    "llama": ("q_proj", "v_proj"),
    "mistral": ("q_proj", "v_proj"),
    "mixtral": ("q_proj", "v_proj"),
    "qwen2": ("q_proj", "v_proj"),
    "qwen3": ("q_proj", "v_proj"),
    "gemma": ("q_proj", "v_proj"),
    "gemma2": ("q_proj", "v_proj"),
    "gemma3_text": ("q_proj", "v_proj"),
    "phi": ("q_proj", "v_proj"),
    "bert": ("query", "value"),
    "roberta": ("query", "value"),
    "xlm-roberta": ("query", "value"),
    "deberta-v2": ("query_proj", "key_proj", "value_proj", "dense"),
    "deberta": ("in_proj",),
}


def _matches(path: str, rule: str | tuple[str, ...]) -> bool:
    if isinstance(rule, str):
        return re.fullmatch(rule, path) is not None
    return any(path == name or path.endswith("." + name) for name in rule)


def _layer_index(path: str, patterns: str | tuple[str, ...] | None) -> int | None:
    """PEFT's rule: the first ``<name>.<index>.`` in the path, with ``name`` any module name, or one
    of ``patterns``. (PEFT also needs a dot before the name; a root-level list such as
    ``layers.0.q`` finds nothing there and is accepted here.)"""
    if not patterns:
        match = re.match(r"(?:^|.*?\.)[^.]*\.(\d+)\.", path)
    else:
        names = (patterns,) if isinstance(patterns, str) else patterns
        found = (re.match(rf"(?:^|.*?\.){re.escape(name)}\.(\d+)\.", path) for name in names)
        match = next((m for m in found if m is not None), None)
    return int(match.group(1)) if match else None


SEQ_CLS_HEAD_NAMES = ("score", "classifier")  # PEFT's names for a sequence classifier's head


def _output_head(model: nn.Module, task_type: str | None) -> nn.Module | None:
    """The layer ``all-linear`` leaves out: the output embeddings, else (PEFT's rule) with
    ``task_type="SEQ_CLS"`` the model's ``score`` or ``classifier``."""
    get = getattr(model, "get_output_embeddings", None)
    try:
        head = get() if callable(get) else None
    except (NotImplementedError, AttributeError):
        head = None
    if head is None and str(task_type).upper() == "SEQ_CLS":
        heads = (getattr(model, name, None) for name in SEQ_CLS_HEAD_NAMES)
        head = next((h for h in heads if isinstance(h, nn.Module)), None)
    return head


def default_targets(model: nn.Module) -> tuple[str, ...]:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in DEFAULT_TARGETS:
        return DEFAULT_TARGETS[model_type]
    known = ", ".join(sorted(DEFAULT_TARGETS))
    raise ValueError(
        f"target_modules is None and there are no default targets for model_type {model_type!r} "
        f"(known: {known}); pass target_modules, e.g. ['q_proj', 'v_proj'] or 'all-linear'"
    )


def walk_modules(model: nn.Module, with_save_wrappers: bool = False) -> Iterator[tuple[str, nn.Module]]:
    """Named modules in ``named_modules`` order, not descending into adapter wrappers (their base
    layer or trainable copies), so a model with many adapters is walked as fast as one with one.

    The walk is done before the first item is returned (a list, not nested generators: a serving
    load walks the model several times), so the caller may change the model while iterating."""
    seen = {id(model)}
    found: list[tuple[str, nn.Module]] = []

    def walk(module: nn.Module, prefix: str) -> None:
        for name, child in module._modules.items():
            if child is None or id(child) in seen:  # a shared module is listed once, as named_modules
                continue
            seen.add(id(child))
            path = f"{prefix}.{name}" if prefix else name
            opaque = isinstance(child, (ModulesToSaveWrapper, VBLoRALayer))
            if with_save_wrappers or not isinstance(child, ModulesToSaveWrapper):
                found.append((path, child))
            if not opaque:
                walk(child, path)

    walk(model, "")
    return iter(found)


def find_target_modules(
    model: nn.Module, config: VBLoRAConfig, exclude: Sequence[str] = ()
) -> list[tuple[str, nn.Module]]:
    """The modules ``config`` selects in ``model`` (adapter layers where already wrapped), with their
    paths, in model order.

    Modules at or under a path in ``exclude`` (the trainable copies of ``modules_to_save``) are skipped.

    Raises:
        ValueError: no module matched (the message lists some of the model's module names).
        TypeError: a matched module is not a linear layer.
    """
    rule = config.target_modules if config.target_modules is not None else default_targets(model)
    head = _output_head(model, config.task_type) if rule == ALL_LINEAR else None
    found: list[tuple[str, nn.Module]] = []
    matched = saved = 0  # before the filters, for the error messages
    for path, module in walk_modules(model):
        if any(path == e or path.startswith(e + ".") for e in exclude):
            saved += int(rule != ALL_LINEAR and _matches(path, rule))
            continue
        if rule == ALL_LINEAR:
            if module is head or not (kind_of(module) is not None or isinstance(module, VBLoRALayer)):
                continue
        elif not _matches(path, rule):
            continue
        matched += 1
        if config.exclude_modules is not None and _matches(path, config.exclude_modules):
            continue
        named_in_full = isinstance(rule, tuple) and path in rule  # PEFT: kept whatever the layers
        if config.layers_to_transform is not None and not named_in_full and not _in_layers(path, config):
            continue
        if not (kind_of(module) is not None or isinstance(module, VBLoRALayer)):
            raise TypeError(
                f"{path}: {type(module).__name__} is not supported by VB-LoRA; target layers of a "
                f"supported kind ({supported_names()}), e.g. the attention projections"
            )
        found.append((path, module))
    if not found and saved and not matched:
        raise ValueError(
            f"target_modules {rule!r} matched only modules that modules_to_save trains in full "
            f"({', '.join(exclude)}); a module is adapted or saved, not both: change one of the two"
        )
    if not found and matched:
        raise ValueError(
            f"target_modules {rule!r} matched {matched} module(s) of {type(model).__name__}, but "
            f"exclude_modules={config.exclude_modules!r}, layers_to_transform="
            f"{config.layers_to_transform!r} and layers_pattern={config.layers_pattern!r} left none; "
            "loosen those filters"
        )
    if not found:
        names = [p for p, m in walk_modules(model) if kind_of(m) is not None or isinstance(m, VBLoRALayer)][
            :12
        ]
        raise ValueError(
            f"target_modules {rule!r} matched no module of {type(model).__name__}; "
            f"some of its linear layers: {names}"
        )
    return found


def _in_layers(path: str, config: VBLoRAConfig) -> bool:
    index = _layer_index(path, config.layers_pattern)
    wanted = config.layers_to_transform
    wanted = (wanted,) if isinstance(wanted, int) else wanted
    return index is not None and index in (wanted or ())


def _save_match(path: str, names: str | tuple[str, ...]) -> bool:
    """PEFT's rule for ``modules_to_save``: the path ends with a name (a plain string suffix, so
    ``"norm"`` also takes ``input_layernorm``); a single string is a regex over the full path."""
    if isinstance(names, str):
        return re.fullmatch(names, path) is not None
    return any(path.endswith(name) for name in names)


def find_modules_to_save(model: nn.Module, names: str | tuple[str, ...]) -> list[str]:
    """Paths of the modules named (by PEFT's suffix rule, or by a regex) in ``modules_to_save``."""
    found = [path for path, _ in walk_modules(model, with_save_wrappers=True) if _save_match(path, names)]
    if names and not found:  # a typo would otherwise leave the head untrained and unsaved, silently
        children = [name for name, _ in model.named_children()]
        shown = list(names) if isinstance(names, tuple) else repr(names)
        raise ValueError(
            f"modules_to_save {shown} matched no module of {type(model).__name__}; "
            f"its top-level modules: {children}"
        )
    # Keep outermost matches only (a classifier and its inner dense would otherwise both match).
    return [p for p in found if not any(p.startswith(q + ".") for q in found if q != p)]
