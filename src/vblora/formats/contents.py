"""What a load would write into a model, checked in full before anything is written.

A loader (PEFT directory, top-k directory, compact file) decodes its file into a :class:`Loaded`:
the adapter's :class:`~vblora.injection.plan.AdapterPlan` plus the bank, the logits table or top-k
selection, the ``modules_to_save`` copies and the biases, each checked against the model. Problems
are collected, never raised one by one, so a user sees everything wrong with a file at once.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..core import functional as VF
from ..core.bank import Slot, build_layout
from ..core.config import VBLoRAConfig
from ..injection.plan import AdapterPlan, Problem, problem_listing, unwrapped
from ..layers.save import ModulesToSaveWrapper
from ..layers.wrapper import VBLoRALayer
from .readers import BANK_KEY, FormatError, PeftKeys

Rows = Tensor | tuple[Tensor, Tensor]  # table rows: dense logits (n, h), or (n, k) indices and weights
# The floating dtypes an adapter file may store (PEFT writes fp32, or bf16/fp16 for a half model);
# float8 and complex tensors are refused. Values are checked for finiteness in the dtype the model
# holds them in (the adapter's fp32, a head's own dtype): 1e300 in float64 is inf in float32.
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
INDEX_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


@dataclass
class Loaded:
    """Everything a load will write into the model, validated against it beforehand."""

    plan: AdapterPlan  # where the adapter goes; for a read without a model, an empty plan
    bank: Tensor | None = None
    logits: Tensor | None = None  # the (P, h) table; or, when every module stored top-k entries:
    selection: tuple[Tensor, Tensor] | None = None  # (P, k) indices and (P, k) weights
    inference_only: bool = False
    copies: dict[str, dict[str, Tensor]] = field(default_factory=dict)  # wrapper path -> state dict
    biases: dict[str, Tensor] = field(default_factory=dict)  # unwrapped parameter name -> value
    # PEFT also saves the full weight of an adapted embed_tokens/lm_head (vocabularies get resized)
    base_weights: dict[str, Tensor] = field(default_factory=dict)  # adapted module path -> weight

    @property
    def config(self) -> VBLoRAConfig:
        return self.plan.config

    @property
    def layout(self) -> dict[str, Slot]:
        return self.plan.layout

    @property
    def save_paths(self) -> list[str]:
        return self.plan.save_paths

    @property
    def problems(self) -> list[Problem]:
        return self.plan.problems

    def add(self, message: str) -> None:
        self.plan.add_problem(message)

    def fail_if_problems(self, source: object, adapter_name: str | None) -> None:
        """Raise one :class:`FormatError` listing every problem; ``adapter_name`` None: a read."""
        if not self.problems:
            return
        what = f"read {source}" if adapter_name is None else f"load adapter {adapter_name!r} from {source}"
        raise FormatError(problem_listing(what, self.problems, changed=adapter_name is None))


def check_bank(plan: Loaded, bank: Tensor | None) -> None:
    h, b = plan.config.num_vectors, plan.config.vector_length
    if bank is None:
        plan.add(f"{BANK_KEY}: missing (the vector bank)")
    elif tuple(bank.shape) != (h, b):
        plan.add(
            f"vector bank has shape {tuple(bank.shape)} but the config says num_vectors={h}, "
            f"vector_length={b} (expected {(h, b)}); the config and the weights come from different adapters"
        )
    elif bank.dtype not in FLOAT_DTYPES:
        plan.add(f"vector bank has dtype {bank.dtype}; expected {dtype_names(FLOAT_DTYPES)}")
    elif not torch.isfinite(bank.float()).all():
        plan.add(
            "vector bank contains NaN or inf values (in float32, the adapter's dtype); "
            "the checkpoint is corrupt"
        )
    else:
        plan.bank = bank


def check_full(plan: Loaded, name: str, logits: Tensor, lead: tuple[int, ...]) -> Tensor | None:
    """Full logits (*lead, h) as table rows (n, h), or None after recording the problem."""
    h = plan.config.num_vectors
    if tuple(logits.shape) != (*lead, h) or logits.dtype not in FLOAT_DTYPES:
        plan.add(
            f"{name}: shape {tuple(logits.shape)} {logits.dtype}, but this model and config need "
            f"{(*lead, h)} floating point (num_vectors={h}); the checkpoint was saved for a different "
            "base model or config"
        )
        return None
    rows = logits.reshape(-1, h).float()
    if torch.isnan(rows).any() or torch.isposinf(rows).any():
        plan.add(f"{name}: contains NaN or +inf logits (in float32); the checkpoint is corrupt")
        return None
    if logits.dtype == torch.float64 and (torch.isinf(rows) != torch.isinf(logits.reshape(-1, h))).any():
        plan.add(f"{name}: logits beyond the float32 range; the checkpoint is corrupt")
        return None
    if torch.isneginf(rows).all(dim=-1).any():
        plan.add(f"{name}: a sub-vector has only -inf logits; the checkpoint is corrupt")
        return None
    # -inf logits come from a top-k checkpoint re-saved in full: the adapter is inference only.
    plan.inference_only |= bool(torch.isneginf(rows).any())
    return rows


def topk_weights(plan: Loaded, name: str, indices: Tensor, partial: Tensor) -> Tensor | None:
    """All k weights (n, k) from valid indices (n, k) and k-1 stored weights (n, k-1), else None."""
    h, problems = plan.config.num_vectors, len(plan.problems)
    if indices.dtype not in INDEX_DTYPES:
        plan.add(f"{name}topk_indices: dtype {indices.dtype}; expected {dtype_names(INDEX_DTYPES)}")
        return None
    if partial.dtype not in FLOAT_DTYPES:
        plan.add(f"{name}topk_weights: dtype {partial.dtype}; expected {dtype_names(FLOAT_DTYPES)}")
        return None
    indices, partial = indices.long(), partial.float()  # fp16/bf16 weights load too (PEFT's do not)
    if indices.numel() and (indices.min() < 0 or indices.max() >= h):
        plan.add(
            f"{name}topk_indices: values {int(indices.min())}..{int(indices.max())} out of range "
            f"[0, {h}) for num_vectors={h}; the checkpoint is corrupt or belongs to a larger bank"
        )
    ordered = indices.sort(dim=-1).values
    if (ordered[:, 1:] == ordered[:, :-1]).any():
        plan.add(f"{name}topk_indices: a sub-vector repeats an index; the checkpoint is corrupt")
    last = 1.0 - partial.sum(dim=-1, keepdim=True)
    if not torch.isfinite(partial).all():
        plan.add(f"{name}topk_weights: contains NaN or inf; the checkpoint is corrupt")
    elif (partial < 0).any() or (last < -1e-3).any():  # 1e-3: rounding of fp16 weights
        plan.add(
            f"{name}topk_weights: weights must be >= 0 and the k-1 stored ones sum to at most 1; "
            "the checkpoint is corrupt"
        )
    if len(plan.problems) > problems:
        return None
    return torch.cat([partial, last.clamp_min(0.0)], dim=-1)


def check_topk(
    plan: Loaded, name: str, indices: Tensor, weights: Tensor, lead: tuple[int, ...]
) -> Rows | None:
    """Top-k indices (*lead, k) and weights (*lead, k-1) as (n, k) indices and all k weights, or None."""
    k = plan.config.topk
    for suffix, tensor, width in (("_topk_indices", indices, k), ("_topk_weights", weights, k - 1)):
        if tuple(tensor.shape) != (*lead, width):
            plan.add(
                f"{name}{suffix}: shape {tuple(tensor.shape)}, but this model and config need "
                f"{(*lead, width)} (topk={k}); the checkpoint was saved for a different base model or config"
            )
            return None
    n = math.prod(lead)  # explicit: reshape(-1, 0) is ambiguous when k = 1
    indices = indices.reshape(n, k)
    full = topk_weights(plan, f"{name}_", indices, weights.reshape(n, k - 1))
    if full is None:
        return None
    plan.inference_only = True
    return indices.long(), full


def module_rows(plan: Loaded, path: str, parts: dict[tuple[str, str], Tensor]) -> Rows | None:
    """The table rows (A rows, then B rows) of one module from its stored tensors."""
    slot = plan.layout[path]
    b = slot.vector_length
    leads = {"A": (slot.r, slot.in_features // b), "B": (slot.out_features // b, slot.r)}
    blocks: list[Rows | None] = []
    for factor in "AB":
        name = f"{path}.vblora_logits_{factor}"
        full, indices, weights = (parts.get((factor, kind)) for kind in ("full", "indices", "weights"))
        if full is not None and (indices is not None or weights is not None):
            plan.add(f"{name}: both full logits and top-k entries are stored; keep one")
            block = None
        elif full is not None:
            block = check_full(plan, name, full, leads[factor])
        elif indices is None and weights is None:
            plan.add(f"{name}: missing from the checkpoint (neither full logits nor top-k)")
            block = None
        elif indices is None or weights is None:
            lacking = "_topk_indices" if indices is None else "_topk_weights"
            plan.add(f"{name}{lacking}: missing from the checkpoint (its partner is there)")
            block = None
        else:
            block = check_topk(plan, name, indices, weights, leads[factor])
        blocks.append(block)
    if any(block is None for block in blocks):
        return None
    return cat_rows([block for block in blocks if block is not None], plan.config.num_vectors)


def cat_rows(blocks: list[Rows], num_vectors: int) -> Rows:
    """Blocks of rows stacked: a selection if every block is one, else dense logits."""
    if all(isinstance(b, tuple) for b in blocks):
        return torch.cat([b[0] for b in blocks]), torch.cat([b[1] for b in blocks])
    return torch.cat([dense_rows(b, num_vectors) for b in blocks])


def dense_rows(rows: Rows, num_vectors: int) -> Tensor:
    """Table rows as dense logits: a selection becomes log-weights, -inf elsewhere."""
    return VF.logits_from_topk(*rows, num_vectors) if isinstance(rows, tuple) else rows


def assemble(plan: Loaded, rows: dict[str, Rows | None]) -> None:
    """Check the stored modules against the layout and build the (P, k) selection when every module
    stored top-k entries (no (P, h) table is ever built then), else the (P, h) logits table."""
    for path in plan.layout:
        if path not in rows:
            plan.add(
                f"{path}: targeted by the config in this model but missing from the checkpoint; "
                "it was saved for a different base model or target_modules"
            )
    for path in rows:
        if path not in plan.layout:
            plan.add(
                f"{path}: stored in the checkpoint but not targeted by the config in this model "
                "(no such module, or excluded); it was saved for a different base model"
            )
    if plan.problems:  # the load is refused: allocate nothing (the plan may be absurdly large)
        return
    total, h = max((s.end for s in plan.layout.values()), default=0), plan.config.num_vectors
    blocks = [(slot, rows.get(path)) for path, slot in plan.layout.items()]
    if all(isinstance(block, tuple) for _, block in blocks):
        indices = torch.zeros(total, plan.config.topk, dtype=torch.long)
        weights = torch.zeros(total, plan.config.topk)
        for slot, block in blocks:
            assert isinstance(block, tuple)
            indices[slot.a_offset : slot.end], weights[slot.a_offset : slot.end] = block
        plan.selection = indices, weights
        return
    table = torch.empty(total, h)
    for slot, block in blocks:
        if block is not None:
            table[slot.a_offset : slot.end] = dense_rows(block, h)
    plan.logits = table


# ---------------------------------------------------------------------------- a directory without a model
def stored_shapes(plan: Loaded, path: str, parts: dict[tuple[str, str], Tensor]) -> tuple[int, int] | None:
    """A module's (in, out) features read from its stored tensors: A is (r, in/b, h or k), B is
    (out/b, r, h or k); None after recording why they fit no layer of this config."""
    c = plan.config
    a = parts.get(("A", "full"), parts.get(("A", "indices")))
    b = parts.get(("B", "full"), parts.get(("B", "indices")))
    if a is None or b is None or a.dim() != 3 or b.dim() != 3 or a.shape[0] != c.r or b.shape[1] != c.r:
        shapes = {f"{f}_{kind}": tuple(t.shape) for (f, kind), t in parts.items()}
        plan.add(
            f"{path}: stored shapes {shapes} fit no layer with r={c.r} (A: (r, in/b, ...), "
            "B: (out/b, r, ...)); the checkpoint is corrupt or its config is not its own"
        )
        return None
    return a.shape[1] * c.vector_length, b.shape[0] * c.vector_length


def check_alone(config: VBLoRAConfig, keys: PeftKeys) -> tuple[Loaded, Tensor]:
    """Check a PEFT-format adapter against its own config, no model needed (``vblora inspect``):
    the bank and every module's tensors, with the checks of a load. Returns the checks (their
    ``problems``) and the (P, k) bank indices every stored sub-vector selects (the selection rule
    of :func:`~vblora.core.functional.select_topk` for full logits)."""
    plan = Loaded(AdapterPlan("", config))
    check_bank(plan, keys.bank)
    shapes = {path: stored_shapes(plan, path, parts) for path, parts in keys.modules.items()}
    fitting = [(path, *shape) for path, shape in shapes.items() if shape is not None]
    plan.plan.layout = build_layout(fitting, config.r, config.vector_length)
    chosen = []
    for path, *_ in fitting:
        rows = module_rows(plan, path, keys.modules[path])
        if rows is not None:
            chosen.append(rows[0] if isinstance(rows, tuple) else VF.select_topk(rows, config.topk)[1])
    indices = torch.cat(chosen) if chosen else torch.zeros(0, config.topk, dtype=torch.long)
    return plan, indices


# ---------------------------------------------------------------------------- modules_to_save and biases
def unwrapped_name(name: str, wrapped: set[str] | None = None) -> str:
    """``x.base_layer.bias`` -> ``x.bias`` where ``x`` is an adapter layer (any ``x`` if ``wrapped`` is None).

    Checkpoints name the biases of adapted layers ``<path>.base_layer.bias`` (PEFT's wrapper);
    matching on unwrapped names lets them load whether or not this model wraps the layer.
    """
    owner, _, leaf = name.rpartition(".")
    layer = owner.removesuffix(".base_layer")
    if layer != owner and (wrapped is None or layer in wrapped):
        return f"{layer}.{leaf}"
    return name


def base_parameters(root: nn.Module, skip: list[str]) -> dict[str, nn.Parameter]:
    """The base model's parameters by unwrapped name, outside ``modules_to_save`` wrappers and the
    ``skip`` paths (which are not walked: a model with many trainable copies costs no more)."""
    found: dict[str, nn.Parameter] = {}
    wrapped: set[str] = set()
    seen: set[int] = set()

    def walk(module: nn.Module, prefix: str) -> None:
        if isinstance(module, ModulesToSaveWrapper) or prefix in skip:
            return
        if isinstance(module, VBLoRALayer):
            wrapped.add(prefix)
        for name, p in module._parameters.items():  # named_parameters(recurse=False), without its cost
            if p is not None and id(p) not in seen:  # a shared parameter under its first name
                seen.add(id(p))
                found[f"{prefix}.{name}" if prefix else name] = p
        for name, child in module._modules.items():
            if child is not None:
                walk(child, f"{prefix}.{name}" if prefix else name)

    walk(root, "")
    return {unwrapped_name(name, wrapped): p for name, p in found.items()}


def _expected_biases(plan: Loaded, params: dict[str, nn.Parameter]) -> set[str]:
    if plan.config.bias == "vblora_only":
        return {f"{path}.bias" for path in plan.layout if f"{path}.bias" in params}
    if plan.config.bias == "all":
        return {name for name in params if name.rsplit(".", 1)[-1] == "bias"}
    return set()


def check_aux(plan: Loaded, root: nn.Module, aux: dict[str, Tensor]) -> None:
    """Sort the non-VB-LoRA tensors into ``modules_to_save`` copies and biases, and check them."""
    # a walk of the whole model: skipped when nothing can be a bias (a serving load's usual case)
    params = base_parameters(root, plan.save_paths) if aux or plan.config.bias != "none" else {}
    plan.copies = {path: {} for path in plan.save_paths}
    for key, tensor in aux.items():
        owner = next((w for w in plan.save_paths if key.startswith(w + ".")), None)
        if owner is not None:
            rest = key[len(owner) + 1 :]
            # PEFT with bias="all" also writes the wrapper's inner biases: duplicates, skipped.
            if rest.split(".", 1)[0] not in ("modules_to_save", "original_module"):
                plan.copies[owner][rest] = tensor
            continue
        name = unwrapped_name(key)
        module, _, leaf = name.rpartition(".")
        if plan.config.bias != "none" and leaf == "bias" and name in params:
            _check_tensor(plan, key, tensor, params[name])
            plan.biases[name] = tensor
        elif leaf == "weight" and module in plan.layout:
            weight = unwrapped(root.get_submodule(module)).weight  # tied: listed under another name
            _check_tensor(plan, key, tensor, weight)
            plan.base_weights[module] = tensor  # loaded into the base layer, as PEFT does
        else:
            plan.add(
                f"{key}: unexpected tensor (not an adapted module, a modules_to_save "
                f"entry, or a bias the config trains (bias={plan.config.bias!r}))"
            )
    for path in plan.save_paths:
        _check_copy(plan, path, unwrapped(root.get_submodule(path)).state_dict())
    missing = sorted(_expected_biases(plan, params) - set(plan.biases))
    if missing:
        warnings.warn(
            f"bias={plan.config.bias!r} but {len(missing)} bias(es) are not in the checkpoint (e.g. "
            f"{missing[0]}; PEFT <= 0.20 did not save them); the base model's values are kept",
            stacklevel=4,
        )


def dtype_names(dtypes: tuple[torch.dtype, ...]) -> str:
    return ", ".join(str(d).removeprefix("torch.") for d in dtypes)


def _check_tensor(plan: Loaded, key: str, tensor: Tensor, like: Tensor) -> None:
    """A stored tensor that replaces the model's ``like``: same shape, a dtype that can hold it, and
    (floating) finite in ``like``'s dtype, or (integer, bool) values that ``like``'s dtype keeps."""
    if tensor.shape != like.shape:
        plan.add(
            f"{key}: shape {tuple(tensor.shape)}, but the model's tensor is {tuple(like.shape)}; "
            "the checkpoint was saved for a different base model"
        )
    elif like.is_floating_point():
        if tensor.dtype not in FLOAT_DTYPES:
            plan.add(
                f"{key}: dtype {tensor.dtype}, but the model holds {like.dtype}; "
                f"expected {dtype_names(FLOAT_DTYPES)}"
            )
        elif not torch.isfinite(tensor.to(like.dtype)).all():
            plan.add(
                f"{key}: contains NaN or inf (in {like.dtype}, the model's dtype); the checkpoint is corrupt"
            )
    elif tensor.dtype != like.dtype and (
        tensor.is_floating_point()
        or tensor.is_complex()
        or (like.dtype == torch.bool) != (tensor.dtype == torch.bool)
        or not torch.equal(tensor.to(like.dtype).to(tensor.dtype), tensor)
    ):
        plan.add(
            f"{key}: dtype {tensor.dtype} cannot hold the model's {like.dtype} values; "
            "the checkpoint is corrupt"
        )


def _check_copy(plan: Loaded, path: str, reference: dict[str, Tensor]) -> None:
    stored = plan.copies[path]
    for key in sorted(set(reference) - set(stored)):
        plan.add(f"{path}.{key}: modules_to_save entry missing from the checkpoint")
    for key in sorted(set(stored) - set(reference)):
        plan.add(f"{path}.{key}: unexpected modules_to_save entry (the module has no such tensor)")
    for key in sorted(set(stored) & set(reference)):
        _check_tensor(plan, f"{path}.{key}", stored[key], reference[key])
