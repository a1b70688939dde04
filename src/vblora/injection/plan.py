"""The injection plan: what adding one adapter to a model would do, with every reason it cannot.

:func:`plan_adapter` reads the model and changes nothing. :meth:`VBLoRAModel.add_adapter` and
every loader (PEFT directory, top-k directory, compact file) build the same plan, so targeting,
shapes, divisibility, save paths and conflicts are checked once, in one place, with one wording.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, field

from torch import nn

from ..core.bank import Slot, build_layout
from ..core.config import VBLoRAConfig
from ..core.routing import BASE_ADAPTER
from ..layers.base import kind_of
from ..layers.save import ModulesToSaveWrapper
from ..layers.wrapper import VBLoRALayer
from .targeting import SEQ_CLS_HEAD_NAMES, find_modules_to_save, find_target_modules

MAX_LISTED = 25  # problems listed in one error message


@dataclass
class Problem:
    """One reason a plan cannot be applied; ``kind`` is the exception it raises on its own."""

    message: str
    kind: type[Exception] = ValueError


@dataclass
class AdapterPlan:
    """Where one adapter would go in a model: its target layers, their rows in the logits table,
    its trainable copies (``modules_to_save``), and every problem found."""

    name: str
    config: VBLoRAConfig
    targets: list[str] = field(default_factory=list)
    layout: dict[str, Slot] = field(default_factory=dict)
    save_paths: list[str] = field(default_factory=list)
    flipped: list[str] = field(default_factory=list)  # layers whose layout differs from fan_in_fan_out
    problems: list[Problem] = field(default_factory=list)
    # the target modules as planned (adapter layers where already wrapped), by path, so that applying
    # the plan right after planning (as every caller does) walks the model no second time
    modules: dict[str, nn.Module] = field(default_factory=dict, repr=False)

    def add_problem(self, message: str, kind: type[Exception] = ValueError) -> None:
        self.problems.append(Problem(message, kind))

    def raise_problems(self, what: str | None = None) -> None:
        """Raise if there is any problem: a single one as itself, several as one ``ValueError``
        listing them. ``what`` (e.g. ``"load adapter 'a' from x/"``) heads the listing."""
        if not self.problems:
            return
        if len(self.problems) == 1 and what is None:
            raise self.problems[0].kind(self.problems[0].message)
        raise ValueError(problem_listing(what or f"add adapter {self.name!r}", self.problems))


def problem_listing(what: str, problems: list[Problem], changed: bool = False) -> str:
    """``cannot <what>: n problem(s); the model was not changed:`` and one line per problem."""
    listed = [f"  - {p.message}" for p in problems[:MAX_LISTED]]
    if len(problems) > MAX_LISTED:
        listed.append(f"  - ... and {len(problems) - MAX_LISTED} more")
    unchanged = "" if changed else "; the model was not changed"
    return f"cannot {what}: {len(problems)} problem(s){unchanged}:\n" + "\n".join(listed)


def adapter_name_problem(name: object) -> str | None:
    """Why ``name`` cannot name an adapter, or None. Names become state-dict keys and folder names."""
    if not isinstance(name, str) or not name or any(c in name for c in "./\\\0"):
        return f"adapter name {name!r} must be a non-empty string without '.', '/', '\\' or NUL"
    if name == BASE_ADAPTER:
        return f"adapter name {name!r} is reserved: adapter_names uses it for rows without an adapter"
    if len(name.encode("utf-8", "surrogatepass")) > 255:  # a folder name, when saved
        return (
            f"adapter name {name[:32]!r}... is {len(name)} characters; a file system allows at most 255 bytes"
        )
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


def divisibility_problem(path: str, in_features: int, out_features: int, b: int) -> str | None:
    """Why a layer cannot take sub-vectors of length ``b``, with the lengths that would fit."""
    if not (in_features % b or out_features % b):
        return None
    g = math.gcd(in_features, out_features)
    options = [d for d in (512, 256, 128, 64, 32, 16, 8, 4, 2, 1) if g % d == 0][:3]
    side = "in_features" if in_features % b else "out_features"
    size = in_features if in_features % b else out_features
    return (
        f"{path}: `{side}` {size} must be divisible by `vector_length` {b} (layer is {in_features} -> "
        f"{out_features}); choose a vector_length that divides every targeted dimension, e.g. "
        f"{options}, or leave this module out with exclude_modules"
    )


def unwrapped(module: nn.Module) -> nn.Module:
    """The base module under an adapter layer or a ``modules_to_save`` wrapper."""
    if isinstance(module, VBLoRALayer):
        return module.base_layer
    if isinstance(module, ModulesToSaveWrapper):
        return module.original_module
    return module


def plan_adapter(
    root: nn.Module, config: VBLoRAConfig, name: str, existing: dict[str, VBLoRAConfig]
) -> AdapterPlan:
    """Plan adapter ``name`` with ``config`` in ``root`` next to the ``existing`` adapters.

    Reads the model only. Every problem found is in ``plan.problems``; the targets and layout are
    those of the layers that fit.
    """
    plan = AdapterPlan(name, config)
    if not isinstance(config, VBLoRAConfig):
        plan.add_problem(f"config must be a VBLoRAConfig, got {type(config).__name__}", TypeError)
        return plan
    if name in existing:
        plan.add_problem(f"adapter {name!r} already exists; delete it first or pick a new name")
    problem = adapter_name_problem(name)
    if problem:
        plan.add_problem(problem)
    if config.bias != "none" and any(c.bias != "none" for c in existing.values()):
        plan.add_problem("only one adapter may train biases (bias != 'none')")
    try:
        plan.save_paths = find_modules_to_save(root, config.modules_to_save or ())
        problem = save_path_problem(root, plan.save_paths)
        if problem:
            raise ValueError(problem)
        targets = find_target_modules(root, config, exclude=plan.save_paths)
    except (TypeError, ValueError) as err:
        plan.add_problem(str(err), type(err))
        return plan
    shapes = []
    indivisible: list[str] = []
    for path, module in targets:
        base = unwrapped(module)
        kind = kind_of(base)
        assert kind is not None  # find_target_modules returns supported layers only
        in_features, out_features = kind.features(base)
        problem = divisibility_problem(path, in_features, out_features, config.vector_length)
        if problem:
            indivisible.append(problem)
            continue
        if config.fan_in_fan_out and not kind.fan_in_fan_out:  # Conv1D with the default False is silent
            plan.flipped.append(path)
        shapes.append((path, in_features, out_features))
    if indivisible:  # one problem, not one per layer: a wrong vector_length usually hits them all
        more = len(indivisible) - 1
        plan.add_problem(indivisible[0] + (f" ({more} more layer(s) likewise)" if more else ""))
    plan.targets = [path for path, _, _ in shapes]
    found = dict(targets)
    plan.modules = {path: found[path] for path in plan.targets}
    plan.layout = build_layout(shapes, config.r, config.vector_length)
    problem = size_problem(plan)
    if problem:
        plan.add_problem(problem)
    return plan


def memory_bytes() -> int:
    """This machine's physical memory (2**62 where it cannot be read)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 2**62


def size_problem(plan: AdapterPlan) -> str | None:
    """Why the adapter's tensors cannot be allocated: the (P, h) fp32 logits table and (h, b) bank
    are larger than this machine's memory. Checked before anything is allocated."""
    c = plan.config
    rows = max((s.end for s in plan.layout.values()), default=0)
    needed = 4 * (rows * c.num_vectors + c.num_vectors * c.vector_length)
    available = memory_bytes()
    if needed <= available:
        return None
    return (
        f"the adapter needs a {rows:,} x {c.num_vectors:,} logits table and a {c.num_vectors:,} x "
        f"{c.vector_length:,} bank, {needed / 2**30:,.1f} GiB in float32, more than this machine's "
        f"memory ({available / 2**30:,.1f} GiB); choose a smaller r or num_vectors"
    )


def warn_untrained_head(root: nn.Module, plan: AdapterPlan, stacklevel: int) -> None:
    """PEFT adds ``classifier``/``score`` to ``modules_to_save`` for ``task_type="SEQ_CLS"``; this
    library does not change a config behind the user's back, so it says what stays frozen."""
    if str(plan.config.task_type).upper() != "SEQ_CLS":
        return
    heads = [n for n in SEQ_CLS_HEAD_NAMES if isinstance(getattr(root, n, None), nn.Module)]
    frozen = [n for n in heads if not any(n == p or n.startswith(p + ".") for p in plan.save_paths)]
    if frozen:
        warnings.warn(
            f"task_type='SEQ_CLS' but the classifier head {frozen[0]!r} is not in modules_to_save, so it "
            "is neither trained nor saved (PEFT would add it). Pass "
            "modules_to_save=['classifier', 'score'] to train it with the adapter",
            stacklevel=stacklevel + 1,
        )


def warn_flipped(plan: AdapterPlan, stacklevel: int) -> None:
    if plan.flipped:
        warnings.warn(
            f"fan_in_fan_out={plan.config.fan_in_fan_out} does not match {len(plan.flipped)} layer(s) "
            f"(e.g. {plan.flipped[0]}); each layer's own weight layout is used (config unchanged)",
            stacklevel=stacklevel + 1,
        )
