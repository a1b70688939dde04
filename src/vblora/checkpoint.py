"""Save and load VB-LoRA adapters: PEFT-compatible directories, compact files and exact LoRA export.

- **Directory** (:func:`save_pretrained`, :func:`from_pretrained`, :func:`load_adapter`):
  ``adapter_config.json`` plus ``adapter_model.safetensors`` with PEFT's keys, so ``peft`` reads our
  directories and we read its. Either the full logits (trainable) or, per sub-vector, k indices and
  k-1 softmax weights (``save_only_topk_weights``: inference only). The default adapter goes at the
  top, any other adapter into ``<dir>/<name>/``, as PEFT does.
- **Compact file** (:func:`save_compact`, :func:`load_compact`): one safetensors file holding the bank
  (fp32, fp16 or bf16), the top-k indices bit-packed to ceil(log2 h) bits, the k-1 weights in fp16,
  and the config and module layout once, as JSON in the header.
- **LoRA export** (:func:`export_lora`): A and B of every module as PEFT LoRA factors with
  ``lora_alpha = r`` (scaling 1). Exact: the factors are the composed A and B, no SVD.

Every write goes to temporary files in the target folder, renamed over the targets only once all
are written, so an interrupted save leaves the previous files intact. Only JSON and safetensors are
ever read (never pickle). A checkpoint is checked against the model in full before the model is
touched; all problems are reported in one ``ValueError`` and the model is left as it was.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import secrets
import warnings
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from . import functional as VF
from .bank import AdapterBank, Slot, build_layout
from .config import VBLoRAConfig
from .layer import ModulesToSaveWrapper, VBLoRALayer, layer_features
from .targeting import find_modules_to_save, find_targets

if TYPE_CHECKING:
    from .model import VBLoRAModel

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
PREFIX = "base_model.model."  # PEFT's prefix for every per-module key
BANK_KEY = "base_model.vblora_vector_bank"
COMPACT_FORMAT = "vblora-compact/1"
COMPACT_ADAPTER_TENSORS = ("bank", "bank_scale", "topk_indices", "topk_weights")  # the rest: head, biases
COMPACT_BANK_DTYPES = {  # save_compact's bank precisions, by name
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int8": torch.int8,
}
# Key suffix -> (factor, kind) of PEFT's per-module VB-LoRA tensors.
_LOGIT_KEYS = {
    f".vblora_logits_{factor}{suffix}": (factor, kind)
    for factor in "AB"
    for suffix, kind in (("", "full"), ("_topk_indices", "indices"), ("_topk_weights", "weights"))
}
_MAX_LISTED = 25  # problems listed in one error message

StrPath = str | PathLike[str]


# ---------------------------------------------------------------------------- writing files
def _write_all(handle: IO[bytes], data: bytes) -> None:
    """Write ``data`` to ``handle`` (a seam for tests that simulate a crash mid-write)."""
    handle.write(data)


def _atomic_write(files: dict[Path, bytes]) -> None:
    """Write every file to a temporary in its folder (created if missing), then rename each over
    its target.

    Nothing is replaced until all temporaries are written and synced, so an exception or crash
    while writing leaves every old file intact (only a crash between the final renames, a few
    microseconds, could leave some files new and others old).
    """
    for path in files:  # bad targets are refused before anything is written
        if path.is_dir():
            raise ValueError(f"{path}: is a directory; name the file to write")
        for folder in (path.parent, *path.parent.parents):
            if folder.exists() and not folder.is_dir():
                raise ValueError(f"{folder}: exists and is not a directory")
    for folder in {path.parent for path in files}:
        folder.mkdir(parents=True, exist_ok=True)
    temps: dict[Path, Path] = {}
    try:
        for path, data in files.items():
            temps[path] = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
            with open(temps[path], "xb") as handle:  # "x": never follow or clobber an existing file
                _write_all(handle, data)
                handle.flush()
                os.fsync(handle.fileno())
        for path, tmp in temps.items():
            os.replace(tmp, path)
    finally:
        for tmp in temps.values():  # left over only if something failed
            with contextlib.suppress(OSError):
                tmp.unlink()
    for folder in {path.parent for path in files}:
        _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    # Makes the rename itself durable on POSIX; not possible (and not needed) everywhere.
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _safetensors_bytes(tensors: dict[str, Tensor], metadata: dict[str, str]) -> bytes:
    from safetensors.torch import save

    # safetensors refuses views that share storage (slices of one logits table): copy each one.
    owned = {k: t.detach().to("cpu", copy=True).contiguous() for k, t in tensors.items()}
    return save(owned, metadata={"format": "pt", **metadata})


# ---------------------------------------------------------------------------- reading files
def _read_safetensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """All tensors and the metadata of a safetensors file; a damaged file is a ``ValueError``."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (not a dict)
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except (SafetensorError, OSError) as err:
        raise ValueError(
            f"{path}: not a readable safetensors file ({err}); it is truncated or corrupt. "
            "Save the adapter again, or restore the file from a backup"
        ) from None
    return tensors, metadata


def _config_from_json(text: str, source: str) -> VBLoRAConfig:
    try:
        return VBLoRAConfig.from_json(text)
    except (TypeError, ValueError, RecursionError) as err:  # RecursionError: absurdly nested JSON
        raise ValueError(f"{source}: not a valid VB-LoRA adapter config: {err}") from None


def _read_directory(path: StrPath) -> tuple[VBLoRAConfig, dict[str, Tensor], Path]:
    """The config and tensors of an adapter directory (ours or PEFT's); refuses pickle files."""
    folder = Path(path)
    if not folder.is_dir():
        raise ValueError(f"{folder}: not an adapter directory (expected a folder with {CONFIG_NAME})")
    weights = folder / WEIGHTS_NAME
    if not weights.is_file() and (folder / PICKLE_NAME).is_file():
        raise ValueError(
            f"{folder / PICKLE_NAME}: pickle checkpoints are never loaded (unpickling can run arbitrary "
            f"code). If you trust the file, convert it once to {WEIGHTS_NAME}:\n"
            "  import torch, safetensors.torch as st\n"
            f"  st.save_file(torch.load('{PICKLE_NAME}', weights_only=True), '{WEIGHTS_NAME}')\n"
            "or load it with peft and call save_pretrained(..., safe_serialization=True)"
        )
    config_path = folder / CONFIG_NAME
    if not config_path.is_file():
        raise ValueError(f"{folder}: no {CONFIG_NAME}; is this an adapter directory?")
    try:
        text = config_path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{config_path}: not UTF-8 JSON ({err})") from None
    config = _config_from_json(text, str(config_path))
    tensors, _ = _read_safetensors(weights)
    return config, tensors, folder


# ---------------------------------------------------------------------------- saving
def _is_sharded(tensor: Tensor) -> bool:
    """True for a DTensor, as FSDP2's ``fully_shard`` makes of every parameter."""
    return callable(getattr(tensor, "full_tensor", None))


def _full(tensor: Tensor) -> Tensor:
    """The whole tensor, detached; a DTensor is gathered (a collective: every rank must call)."""
    tensor = tensor.detach()
    return tensor.full_tensor() if _is_sharded(tensor) else tensor


def _module_logits(logits: Tensor, slot: Slot) -> tuple[Tensor, Tensor]:
    """PEFT's ``vblora_logits_A`` (r, in/b, h) and ``vblora_logits_B`` (out/b, r, h) of one module,
    cut from the adapter's whole ``(P, h)`` logits table."""
    h, b = logits.shape[-1], slot.vector_length
    a = logits[slot.a_offset : slot.b_offset].reshape(slot.r, slot.in_features // b, h)
    b_ = logits[slot.b_offset : slot.end].reshape(slot.out_features // b, slot.r, h)
    return a, b_


def _vblora_tensors(bank: AdapterBank, topk: bool) -> dict[str, Tensor]:
    """The bank and every module's logits (or top-k indices and k-1 weights) under PEFT's keys."""
    from .model import _index_dtype

    out = {BANK_KEY: _full(bank.bank)}
    table = _full(bank.full_logits())
    for path, slot in bank.layout.items():
        for factor, logits in zip("AB", _module_logits(table, slot)):
            key = f"{PREFIX}{path}.vblora_logits_{factor}"
            if not topk:
                out[key] = logits
                continue
            indices, weights = VF.topk_compress(logits, bank.topk)
            out[key + "_topk_indices"] = indices.to(_index_dtype(bank.num_vectors))
            # The k-th weight is 1 - sum of the others. fp32 always: PEFT's loader scatters them into
            # an fp32 table, so it cannot read the bf16/fp16 weights it writes for a half model.
            out[key + "_topk_weights"] = weights[..., :-1].float()
    return out


def _aux_tensors(model: VBLoRAModel, adapter_name: str) -> dict[str, Tensor]:
    """``modules_to_save`` copies and trained biases, under PEFT's keys."""
    out: dict[str, Tensor] = {}
    for path, module in model.model.named_modules():
        if isinstance(module, ModulesToSaveWrapper) and adapter_name in module.modules_to_save:
            for key, tensor in module.modules_to_save[adapter_name].state_dict().items():
                out[f"{PREFIX}{path}.{key}"] = _full(tensor)  # PEFT drops the "modules_to_save.<name>" infix
    for key, tensor in model.trained_biases(adapter_name).items():
        out[PREFIX + key] = _full(tensor)
    return out


def _saved_config(model: VBLoRAModel, adapter_name: str, **changes: Any) -> VBLoRAConfig:
    """The config as written to disk: PEFT records Conv1D targets as ``fan_in_fan_out=True``."""
    layers = [layer for layer in model.vblora_layers() if adapter_name in layer.banks]
    fan_in_fan_out = bool(layers) and all(layer.fan_in_fan_out for layer in layers)
    config = model.peft_config[adapter_name]
    return dataclasses.replace(config, fan_in_fan_out=fan_in_fan_out, inference_mode=True, **changes)


def _adapter_names(model: VBLoRAModel, adapter_name: str | list[str] | tuple[str, ...] | None) -> list[str]:
    if adapter_name is None:
        names = list(model.peft_config)
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
        raise ValueError(f"no adapter to save: adapter_name is empty; existing: {list(model.peft_config)}")
    unknown = [n for n in names if n not in model.peft_config]
    if unknown:
        raise ValueError(f"unknown adapter(s) {unknown}; existing: {list(model.peft_config)}")
    return names


def _one_adapter(model: VBLoRAModel, adapter_name: object) -> None:
    if not isinstance(adapter_name, str):
        raise ValueError(f"adapter_name must be one adapter's name (a file holds one), got {adapter_name!r}")
    _adapter_names(model, adapter_name)


def save_pretrained(
    model: VBLoRAModel,
    save_directory: StrPath,
    adapter_name: str | list[str] | tuple[str, ...] | None = None,
    save_only_topk_weights: bool | None = None,
) -> None:
    """Write adapters as PEFT-compatible directories.

    Args:
        model: the model whose adapters to save.
        save_directory: the folder; adapter ``"default"`` is written into it, any other adapter
            into ``save_directory/<name>/`` (PEFT's layout).
        adapter_name: one adapter, several, or None for all.
        save_only_topk_weights: overrides the config's choice: True writes k indices and k-1
            weights per sub-vector (small, inference only), False the full logits (resumable).

    All files (of all adapters) are serialised and written to temporaries before any target is
    replaced, so a failed save leaves the previous adapter readable.

    A model sharded with FSDP2 (``fully_shard``) holds DTensors: then every rank must call this
    (the tensors are gathered), and rank 0 alone writes.
    """
    root = Path(save_directory)
    pending: dict[Path, bytes] = {}
    for name in _adapter_names(model, adapter_name):
        config = model.peft_config[name]
        topk = config.save_only_topk_weights if save_only_topk_weights is None else save_only_topk_weights
        tensors = {**_vblora_tensors(model.vblora_banks[name], topk), **_aux_tensors(model, name)}
        saved = _saved_config(model, name, save_only_topk_weights=topk)
        folder = root if name == "default" else root / name
        pending[folder / CONFIG_NAME] = saved.to_json().encode("utf-8")
        pending[folder / WEIGHTS_NAME] = _safetensors_bytes(tensors, {})
    if _sharded_rank(model) not in (None, 0):
        return  # the gathered tensors are the same on every rank: rank 0 writes them
    _atomic_write(pending)


def adapters_sharded(model: VBLoRAModel) -> bool:
    """True when the model's adapters are sharded DTensors (FSDP2's ``fully_shard``)."""
    return any(_is_sharded(bank.bank) for bank in model.vblora_banks.values())


def _sharded_rank(model: VBLoRAModel) -> int | None:
    """This process's rank when the adapters are sharded (FSDP2), else None."""
    if not adapters_sharded(model):
        return None
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else None


# ---------------------------------------------------------------------------- load plans
@dataclass
class _Plan:
    """Everything a load will write into the model, validated against it beforehand."""

    config: VBLoRAConfig
    layout: dict[str, Slot]
    save_paths: list[str]
    bank: Tensor | None = None
    logits: Tensor | None = None  # the (P, h) table; or, when every module stored top-k entries:
    selection: tuple[Tensor, Tensor] | None = None  # (P, k) indices and (P, k) weights
    inference_only: bool = False
    copies: dict[str, dict[str, Tensor]] = field(default_factory=dict)  # wrapper path -> state dict
    biases: dict[str, Tensor] = field(default_factory=dict)  # unwrapped parameter name -> value
    # PEFT also saves the full weight of an adapted embed_tokens/lm_head (vocabularies get resized)
    base_weights: dict[str, Tensor] = field(default_factory=dict)  # adapted module path -> weight
    problems: list[str] = field(default_factory=list)

    def fail_if_problems(self, source: object, adapter_name: str | None) -> None:
        """Raise one ValueError listing every problem; ``adapter_name`` None: a read, no model."""
        if not self.problems:
            return
        listed = [f"  - {p}" for p in self.problems[:_MAX_LISTED]]
        if len(self.problems) > _MAX_LISTED:
            listed.append(f"  - ... and {len(self.problems) - _MAX_LISTED} more")
        what = f"read {source}" if adapter_name is None else f"load adapter {adapter_name!r} from {source}"
        unchanged = "" if adapter_name is None else "; the model was not changed"
        raise ValueError(f"cannot {what}: {len(self.problems)} problem(s){unchanged}:\n" + "\n".join(listed))


def _plan_targets(
    root: nn.Module, config: VBLoRAConfig, adapter_name: str, existing: dict[str, VBLoRAConfig]
) -> _Plan:
    """The layout the config produces in this model (read-only), or the reasons it cannot."""
    from .model import adapter_name_problem, save_path_problem

    plan = _Plan(config, {}, [])
    if adapter_name in existing:
        plan.problems.append(f"adapter {adapter_name!r} already exists; delete it first or pick another name")
    problem = adapter_name_problem(adapter_name)
    if problem:
        plan.problems.append(problem)
    if config.bias != "none" and any(c.bias != "none" for c in existing.values()):
        plan.problems.append(
            f"bias={config.bias!r}, but another adapter already trains biases (only one may)"
        )
    try:
        plan.save_paths = find_modules_to_save(root, config.modules_to_save or ())
        problem = save_path_problem(root, plan.save_paths)
        if problem:
            raise ValueError(problem)
        targets = find_targets(root, config, exclude=plan.save_paths)
    except (TypeError, ValueError) as err:
        plan.problems.append(str(err))
        return plan
    shapes = []
    for path in targets:
        module = root.get_submodule(path)
        in_features, out_features, _ = layer_features(_unwrapped(module))
        b = config.vector_length
        if in_features % b or out_features % b:
            plan.problems.append(
                f"{path}: layer {in_features} -> {out_features} is not divisible by vector_length {b}; "
                "the checkpoint was made for a different base model"
            )
            continue
        shapes.append((path, in_features, out_features))
    plan.layout = build_layout(shapes, config.r, config.vector_length)
    return plan


def _unwrapped(module: nn.Module) -> nn.Module:
    if isinstance(module, VBLoRALayer):
        return module.base_layer
    if isinstance(module, ModulesToSaveWrapper):
        return module.original_module
    return module


def _check_bank(plan: _Plan, bank: Tensor | None) -> None:
    h, b = plan.config.num_vectors, plan.config.vector_length
    if bank is None:
        plan.problems.append(f"{BANK_KEY}: missing (the vector bank)")
    elif tuple(bank.shape) != (h, b):
        plan.problems.append(
            f"vector bank has shape {tuple(bank.shape)} but the config says num_vectors={h}, "
            f"vector_length={b} (expected {(h, b)}); the config and the weights come from different adapters"
        )
    elif not bank.is_floating_point():
        plan.problems.append(f"vector bank has dtype {bank.dtype}; expected a floating-point tensor")
    elif not torch.isfinite(bank).all():
        plan.problems.append("vector bank contains NaN or inf values; the checkpoint is corrupt")
    else:
        plan.bank = bank


def _check_full(plan: _Plan, name: str, logits: Tensor, lead: tuple[int, ...]) -> Tensor | None:
    """Full logits (*lead, h) as table rows (n, h), or None after recording the problem."""
    h = plan.config.num_vectors
    if tuple(logits.shape) != (*lead, h) or not logits.is_floating_point():
        plan.problems.append(
            f"{name}: shape {tuple(logits.shape)} {logits.dtype}, but this model and config need "
            f"{(*lead, h)} floating point (num_vectors={h}); the checkpoint was saved for a different "
            "base model or config"
        )
        return None
    rows = logits.reshape(-1, h).float()
    if torch.isnan(rows).any() or torch.isposinf(rows).any():
        plan.problems.append(f"{name}: contains NaN or +inf logits; the checkpoint is corrupt")
        return None
    if torch.isneginf(rows).all(dim=-1).any():
        plan.problems.append(f"{name}: a sub-vector has only -inf logits; the checkpoint is corrupt")
        return None
    # -inf logits come from a top-k checkpoint re-saved in full: the adapter is inference only.
    plan.inference_only |= bool(torch.isneginf(rows).any())
    return rows


def _topk_weights(plan: _Plan, name: str, indices: Tensor, partial: Tensor) -> Tensor | None:
    """All k weights (n, k) from valid indices (n, k) and k-1 stored weights (n, k-1), else None."""
    h, problems = plan.config.num_vectors, len(plan.problems)
    if indices.dtype == torch.bool or indices.is_floating_point() or indices.is_complex():
        plan.problems.append(f"{name}topk_indices: dtype {indices.dtype}; expected an integer dtype")
        return None
    if not partial.is_floating_point():
        plan.problems.append(f"{name}topk_weights: dtype {partial.dtype}; expected a floating-point dtype")
        return None
    indices, partial = indices.long(), partial.float()  # fp16/bf16 weights load too (PEFT's do not)
    if indices.numel() and (indices.min() < 0 or indices.max() >= h):
        plan.problems.append(
            f"{name}topk_indices: values {int(indices.min())}..{int(indices.max())} out of range "
            f"[0, {h}) for num_vectors={h}; the checkpoint is corrupt or belongs to a larger bank"
        )
    ordered = indices.sort(dim=-1).values
    if (ordered[:, 1:] == ordered[:, :-1]).any():
        plan.problems.append(f"{name}topk_indices: a sub-vector repeats an index; the checkpoint is corrupt")
    last = 1.0 - partial.sum(dim=-1, keepdim=True)
    if not torch.isfinite(partial).all():
        plan.problems.append(f"{name}topk_weights: contains NaN or inf; the checkpoint is corrupt")
    elif (partial < 0).any() or (last < -1e-3).any():  # 1e-3: rounding of fp16 weights
        plan.problems.append(
            f"{name}topk_weights: weights must be >= 0 and the k-1 stored ones sum to at most 1; "
            "the checkpoint is corrupt"
        )
    if len(plan.problems) > problems:
        return None
    return torch.cat([partial, last.clamp_min(0.0)], dim=-1)


Rows = Tensor | tuple[Tensor, Tensor]  # table rows: dense logits (n, h), or (n, k) indices and weights


def _check_topk(
    plan: _Plan, name: str, indices: Tensor, weights: Tensor, lead: tuple[int, ...]
) -> Rows | None:
    """Top-k indices (*lead, k) and weights (*lead, k-1) as (n, k) indices and all k weights, or None."""
    k = plan.config.topk
    for suffix, tensor, width in (("_topk_indices", indices, k), ("_topk_weights", weights, k - 1)):
        if tuple(tensor.shape) != (*lead, width):
            plan.problems.append(
                f"{name}{suffix}: shape {tuple(tensor.shape)}, but this model and config need "
                f"{(*lead, width)} (topk={k}); the checkpoint was saved for a different base model or config"
            )
            return None
    n = math.prod(lead)  # explicit: reshape(-1, 0) is ambiguous when k = 1
    indices = indices.reshape(n, k)
    full = _topk_weights(plan, f"{name}_", indices, weights.reshape(n, k - 1))
    if full is None:
        return None
    plan.inference_only = True
    return indices.long(), full


def _module_rows(plan: _Plan, path: str, parts: dict[tuple[str, str], Tensor]) -> Rows | None:
    """The table rows (A rows, then B rows) of one module from its stored tensors."""
    slot = plan.layout[path]
    b = slot.vector_length
    leads = {"A": (slot.r, slot.in_features // b), "B": (slot.out_features // b, slot.r)}
    blocks: list[Rows | None] = []
    for factor in "AB":
        name = f"{path}.vblora_logits_{factor}"
        full, indices, weights = (parts.get((factor, kind)) for kind in ("full", "indices", "weights"))
        if full is not None and (indices is not None or weights is not None):
            plan.problems.append(f"{name}: both full logits and top-k entries are stored; keep one")
            block = None
        elif full is not None:
            block = _check_full(plan, name, full, leads[factor])
        elif indices is None and weights is None:
            plan.problems.append(f"{name}: missing from the checkpoint (neither full logits nor top-k)")
            block = None
        elif indices is None or weights is None:
            lacking = "_topk_indices" if indices is None else "_topk_weights"
            plan.problems.append(f"{name}{lacking}: missing from the checkpoint (its partner is there)")
            block = None
        else:
            block = _check_topk(plan, name, indices, weights, leads[factor])
        blocks.append(block)
    if any(block is None for block in blocks):
        return None
    return _cat_rows([block for block in blocks if block is not None], plan.config.num_vectors)


def _cat_rows(blocks: list[Rows], num_vectors: int) -> Rows:
    """Blocks of rows stacked: a selection if every block is one, else dense logits."""
    if all(isinstance(b, tuple) for b in blocks):
        return torch.cat([b[0] for b in blocks]), torch.cat([b[1] for b in blocks])
    return torch.cat([_dense(b, num_vectors) for b in blocks])


def _dense(rows: Rows, num_vectors: int) -> Tensor:
    """Table rows as dense logits: a selection becomes log-weights, -inf elsewhere."""
    return VF.logits_from_topk(*rows, num_vectors) if isinstance(rows, tuple) else rows


def _assemble(plan: _Plan, rows: dict[str, Rows | None]) -> None:
    """Check the stored modules against the layout and build the (P, k) selection when every module
    stored top-k entries (no (P, h) table is ever built then), else the (P, h) logits table."""
    for path in plan.layout:
        if path not in rows:
            plan.problems.append(
                f"{path}: targeted by the config in this model but missing from the checkpoint; "
                "it was saved for a different base model or target_modules"
            )
    for path in rows:
        if path not in plan.layout:
            plan.problems.append(
                f"{path}: stored in the checkpoint but not targeted by the config in this model "
                "(no such module, or excluded); it was saved for a different base model"
            )
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
            table[slot.a_offset : slot.end] = _dense(block, h)
    plan.logits = table


def _strip_prefix(plan: _Plan, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    out = {}
    for key, tensor in tensors.items():
        if key.startswith(PREFIX):
            out[key[len(PREFIX) :]] = tensor
        else:
            plan.problems.append(f"{key}: unexpected key (keys are {BANK_KEY!r} or start with {PREFIX!r})")
    return out


# ---------------------------------------------------------------------------- modules_to_save and biases
def _unwrapped_name(name: str, wrapped: set[str] | None = None) -> str:
    """``x.base_layer.bias`` -> ``x.bias`` where ``x`` is an adapter layer (any ``x`` if ``wrapped`` is None).

    Checkpoints name the biases of adapted layers ``<path>.base_layer.bias`` (PEFT's wrapper);
    matching on unwrapped names lets them load whether or not this model wraps the layer.
    """
    owner, _, leaf = name.rpartition(".")
    layer = owner.removesuffix(".base_layer")
    if layer != owner and (wrapped is None or layer in wrapped):
        return f"{layer}.{leaf}"
    return name


def _base_parameters(root: nn.Module, skip: list[str]) -> dict[str, nn.Parameter]:
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
        for name, p in module.named_parameters(recurse=False):
            if id(p) not in seen:  # a shared parameter under its first name, as named_parameters
                seen.add(id(p))
                found[f"{prefix}.{name}" if prefix else name] = p
        for name, child in module.named_children():
            walk(child, f"{prefix}.{name}" if prefix else name)

    walk(root, "")
    return {_unwrapped_name(name, wrapped): p for name, p in found.items()}


def _expected_biases(plan: _Plan, params: dict[str, nn.Parameter]) -> set[str]:
    if plan.config.bias == "vblora_only":
        return {f"{path}.bias" for path in plan.layout if f"{path}.bias" in params}
    if plan.config.bias == "all":
        return {name for name in params if name.rsplit(".", 1)[-1] == "bias"}
    return set()


def _plan_aux(plan: _Plan, root: nn.Module, aux: dict[str, Tensor]) -> None:
    """Sort the non-VB-LoRA tensors into ``modules_to_save`` copies and biases, and check them."""
    params = _base_parameters(root, plan.save_paths)
    plan.copies = {path: {} for path in plan.save_paths}
    for key, tensor in aux.items():
        owner = next((w for w in plan.save_paths if key.startswith(w + ".")), None)
        if owner is not None:
            rest = key[len(owner) + 1 :]
            # PEFT with bias="all" also writes the wrapper's inner biases: duplicates, skipped.
            if rest.split(".", 1)[0] not in ("modules_to_save", "original_module"):
                plan.copies[owner][rest] = tensor
            continue
        name = _unwrapped_name(key)
        module, _, leaf = name.rpartition(".")
        if plan.config.bias != "none" and leaf == "bias" and name in params:
            _check_tensor(plan, key, tensor, params[name])
            plan.biases[name] = tensor
        elif leaf == "weight" and module in plan.layout:
            weight = _unwrapped(root.get_submodule(module)).weight  # tied: listed under another name
            _check_tensor(plan, key, tensor, weight)
            plan.base_weights[module] = tensor  # loaded into the base layer, as PEFT does
        else:
            plan.problems.append(
                f"{key}: unexpected tensor (not an adapted module, a modules_to_save "
                f"entry, or a bias the config trains (bias={plan.config.bias!r}))"
            )
    for path in plan.save_paths:
        _check_copy(plan, path, _unwrapped(root.get_submodule(path)).state_dict())
    missing = sorted(_expected_biases(plan, params) - set(plan.biases))
    if missing:
        warnings.warn(
            f"bias={plan.config.bias!r} but {len(missing)} bias(es) are not in the checkpoint (e.g. "
            f"{missing[0]}; PEFT <= 0.20 did not save them); the base model's values are kept",
            stacklevel=4,
        )


def _check_tensor(plan: _Plan, key: str, tensor: Tensor, like: Tensor) -> None:
    if tensor.shape != like.shape:
        plan.problems.append(
            f"{key}: shape {tuple(tensor.shape)}, but the model's tensor is {tuple(like.shape)}; "
            "the checkpoint was saved for a different base model"
        )
    elif tensor.is_floating_point() and not torch.isfinite(tensor).all():
        plan.problems.append(f"{key}: contains NaN or inf; the checkpoint is corrupt")


def _check_copy(plan: _Plan, path: str, reference: dict[str, Tensor]) -> None:
    stored = plan.copies[path]
    for key in sorted(set(reference) - set(stored)):
        plan.problems.append(f"{path}.{key}: modules_to_save entry missing from the checkpoint")
    for key in sorted(set(stored) - set(reference)):
        plan.problems.append(
            f"{path}.{key}: unexpected modules_to_save entry (the module has no such tensor)"
        )
    for key in sorted(set(stored) & set(reference)):
        _check_tensor(plan, f"{path}.{key}", stored[key], reference[key])


# ---------------------------------------------------------------------------- decoding sources
def _plan_directory(
    root: nn.Module, config: VBLoRAConfig, tensors: dict[str, Tensor], name: str, existing: dict
) -> _Plan:
    """Validate PEFT-format tensors against the model and turn them into a load plan."""
    plan = _plan_targets(root, config, name, existing)
    tensors = dict(tensors)
    _check_bank(plan, tensors.pop(BANK_KEY, None))
    groups: dict[str, dict[tuple[str, str], Tensor]] = {}
    aux: dict[str, Tensor] = {}
    for key, tensor in _strip_prefix(plan, tensors).items():
        suffix = next((s for s in _LOGIT_KEYS if key.endswith(s)), None)
        if suffix is None:
            aux[key] = tensor
        else:
            groups.setdefault(key[: -len(suffix)], {})[_LOGIT_KEYS[suffix]] = tensor
    rows = {
        path: _module_rows(plan, path, parts) if path in plan.layout else None
        for path, parts in groups.items()
    }
    _assemble(plan, rows)
    _plan_aux(plan, root, aux)
    return plan


def _refuse_training(source: object, adapter_name: str) -> ValueError:
    return ValueError(
        f"{source}: adapter {adapter_name!r} is a top-k checkpoint (save_only_topk_weights): it keeps "
        "only k indices and k-1 weights per sub-vector, so the logits that training updates are gone "
        "and it cannot be trained. Load it with is_trainable=False for inference or merging, or "
        "resume training from a full-logits checkpoint (save_pretrained(..., save_only_topk_weights=False))"
    )


def _install(model: VBLoRAModel, adapter_name: str, plan: _Plan, trainable: bool) -> None:
    """Add the planned adapter to ``model`` (already validated: nothing here can fail on data)."""
    if adapter_name not in model.peft_config:  # uninitialised: overwritten below
        model.add_adapter(adapter_name, plan.config, initialise=False, trainable=trainable)
    bank = model.vblora_banks[adapter_name]
    if bank.layout != plan.layout:  # both come from the same targeting code; guard anyway
        raise RuntimeError(f"internal error: layout of adapter {adapter_name!r} differs from the plan")
    _write_plan(model, adapter_name, plan)
    bank.inference_only = plan.inference_only


@torch.no_grad()
def _write_plan(model: VBLoRAModel, adapter_name: str, plan: _Plan) -> None:
    """Copy a validated plan's tensors into the adapter (same layout) and the base model, in place."""
    assert plan.bank is not None and (plan.logits is not None or plan.selection is not None)
    bank = model.vblora_banks[adapter_name]
    bank.bank.copy_(plan.bank)
    if plan.selection is not None:  # inference only: the selection, never a (P, h) table
        bank.keep_topk(*plan.selection)
    elif plan.inference_only:  # full logits with -inf entries: keep their selection only
        bank.keep_topk(*VF.topk_compress(plan.logits, bank.topk))
    else:
        bank.logits.copy_(plan.logits)
    for path, state in plan.copies.items():
        model.model.get_submodule(path).modules_to_save[adapter_name].load_state_dict(state)
    params = _base_parameters(model.model, [])
    for name, value in plan.biases.items():
        params[name].copy_(value)
    for path, value in plan.base_weights.items():
        _unwrapped(model.model.get_submodule(path)).weight.copy_(value)
    bank.clear_cache()


def _add_or_roll_back(model: VBLoRAModel, adapter_name: str, plan: _Plan, trainable: bool) -> None:
    """:func:`_install` into an existing model; on any failure the half-added adapter is removed."""
    try:
        _install(model, adapter_name, plan, trainable)
    except BaseException:
        if adapter_name in model.peft_config:
            model.delete_adapter(adapter_name)
        raise


# ---------------------------------------------------------------------------- loading directories
def load_adapter(model: VBLoRAModel, path: StrPath, adapter_name: str, is_trainable: bool = False) -> None:
    """Add the adapter saved in ``path`` (ours or PEFT's) to ``model``, inactive until set_adapter.

    Raises:
        ValueError: the directory is not readable, does not fit the model (every problem listed),
            or is a top-k checkpoint and ``is_trainable`` is True. The model is unchanged.
    """
    config, tensors, folder = _read_directory(path)
    if is_trainable and config.save_only_topk_weights:
        raise _refuse_training(folder, adapter_name)
    plan = _plan_directory(model.model, config, tensors, adapter_name, model.peft_config)
    plan.fail_if_problems(folder, adapter_name)
    if is_trainable and plan.inference_only:
        raise _refuse_training(folder, adapter_name)
    _add_or_roll_back(model, adapter_name, plan, is_trainable)
    if not is_trainable:
        model.eval()  # as PEFT: an inference load disables dropout


def restore_adapters(model: VBLoRAModel, path: StrPath, names: list[str]) -> None:
    """Copy the saved tensors of adapters ``names`` back into the same adapters of ``model``, in
    place (an optimizer keeps pointing at them): resuming training, or the best checkpoint.

    ``path`` is a directory written by :func:`save_pretrained` (``default`` at its root, any other
    adapter in ``path/<name>/``) with full logits. Every adapter is read and checked against the live
    one (same layout, heads, biases) before any tensor is copied.

    Raises:
        ValueError: a directory is missing, unreadable, top-k only, or does not fit its adapter.
    """
    plans = []
    for name in names:
        config, tensors, folder = _read_directory(Path(path) if name == "default" else Path(path) / name)
        plan = _plan_directory(model.model, config, tensors, name, {})  # {}: no clash with itself
        plan.fail_if_problems(folder, name)
        if plan.logits is None or plan.inference_only:
            raise ValueError(
                f"{folder}: adapter {name!r} was saved without its full logits; cannot resume it"
            )
        if plan.layout != model.vblora_banks[name].layout:
            raise ValueError(f"{folder}: adapter {name!r} was saved with other modules than the live one")
        plans.append((name, plan))
    for name, plan in plans:
        _write_plan(model, name, plan)


def from_pretrained(
    cls: type[VBLoRAModel],
    base_model: nn.Module,
    path: StrPath,
    adapter_name: str = "default",
    is_trainable: bool = False,
) -> VBLoRAModel:
    """Wrap ``base_model`` with the adapter saved in ``path`` (ours or PEFT's).

    With ``is_trainable=False`` every parameter is frozen and the model is put in eval mode.

    Raises:
        ValueError: as :func:`load_adapter`; ``base_model`` is then left unwrapped and unchanged.
    """
    if isinstance(base_model, cls):
        raise TypeError("base_model is already a VBLoRAModel; use its load_adapter(path, name) instead")
    config, tensors, folder = _read_directory(path)
    if is_trainable and config.save_only_topk_weights:
        raise _refuse_training(folder, adapter_name)
    plan = _plan_directory(base_model, config, tensors, adapter_name, {})
    plan.fail_if_problems(folder, adapter_name)
    if is_trainable and plan.inference_only:
        raise _refuse_training(folder, adapter_name)
    return _wrap(cls, base_model, adapter_name, plan, is_trainable)


def _wrap(
    cls: type[VBLoRAModel], base_model: nn.Module, adapter_name: str, plan: _Plan, is_trainable: bool
) -> VBLoRAModel:
    flags = [(p, p.requires_grad) for p in base_model.parameters()]
    with warnings.catch_warnings():
        # PEFT writes fan_in_fan_out to suit Conv1D; each layer's own layout is used regardless.
        warnings.filterwarnings("ignore", message="fan_in_fan_out=")
        # Uninitialised (_install fills it); an inference load stays frozen, even when set active.
        model = cls(base_model, plan.config, adapter_name, initialise=False, trainable=is_trainable)
    try:
        _install(model, adapter_name, plan, is_trainable)
    except BaseException:  # e.g. Ctrl-C or out of memory mid-copy: the base model as it was
        model.unload()
        for p, flag in flags:
            p.requires_grad_(flag)
        raise
    if is_trainable:
        model.set_adapter(adapter_name)  # re-derive trainability now that the adapter is filled
    else:
        model.requires_grad_(False)
        model.eval()
    return model


# ---------------------------------------------------------------------------- compact files
def _index_bits(num_vectors: int) -> int:
    """ceil(log2 h): the bits that address one of h bank vectors (at least 1)."""
    return max(1, (num_vectors - 1).bit_length())


def pack_bits(values: Tensor, bits: int) -> Tensor:
    """Pack non-negative integers < 2**bits into a uint8 tensor, ``bits`` bits each, LSB first."""
    shifts = torch.arange(bits)
    stream = ((values.reshape(-1, 1).long() >> shifts) & 1).flatten()  # (n * bits,) of 0/1
    stream = nn.functional.pad(stream, (0, -stream.numel() % 8)).reshape(-1, 8)
    return (stream << torch.arange(8)).sum(dim=-1).to(torch.uint8)


def unpack_bits(packed: Tensor, bits: int, count: int) -> Tensor:
    """Inverse of :func:`pack_bits`: the first ``count`` values as int64."""
    stream = ((packed.reshape(-1, 1).long() >> torch.arange(8)) & 1).flatten()[: count * bits]
    return (stream.reshape(count, bits) << torch.arange(bits)).sum(dim=-1)


def _compact_config(config: VBLoRAConfig) -> str:
    """The config as JSON, only fields that differ from the defaults (the header stays small)."""
    defaults = VBLoRAConfig().to_dict()
    full = config.to_dict()
    always = ("peft_type", "r", "num_vectors", "vector_length", "topk", "target_modules")
    kept = {k: v for k, v in full.items() if k in always or v != defaults.get(k)}
    return json.dumps(kept, separators=(",", ":"))


def save_compact(
    model: VBLoRAModel,
    path: StrPath,
    adapter_name: str = "default",
    bank_dtype: torch.dtype = torch.float32,
) -> None:
    """Write one adapter as a compact ``.vblora`` file (inference only, like a top-k directory).

    Stored: the bank in ``bank_dtype`` (fp32; fp16/bf16 for about half the size; int8 with one fp32
    scale per bank vector, ``bank_scale``, for about a quarter; the errors are in
    ``benchmarks/RESULTS.md``), per sub-vector k indices bit-packed to ceil(log2 h) bits and k-1
    fp16 weights, ``modules_to_save`` copies and trained biases, and the config and the module
    layout ``[[path, in, out], ...]`` once as JSON in the header.
    """
    if bank_dtype not in COMPACT_BANK_DTYPES.values():
        raise ValueError(f"bank_dtype must be torch.float32, float16, bfloat16 or int8, got {bank_dtype}")
    _one_adapter(model, adapter_name)
    bank = model.vblora_banks[adapter_name]
    indices, weights = bank.selection()  # (P, k) each
    bits = _index_bits(bank.num_vectors)
    tensors = {
        **_stored_bank(bank.bank.detach(), bank_dtype),
        "topk_indices": pack_bits(indices, bits),
        "topk_weights": weights[:, :-1].half(),  # the k-th weight is 1 - sum of the others
        **_aux_tensors(model, adapter_name),
    }
    layout = [[p, s.in_features, s.out_features] for p, s in bank.layout.items()]
    metadata = {
        "vblora_format": COMPACT_FORMAT,
        "config": _compact_config(_saved_config(model, adapter_name, save_only_topk_weights=True)),
        "layout": json.dumps(layout, separators=(",", ":")),
        "index_bits": str(bits),
    }
    _atomic_write({Path(path): _safetensors_bytes(tensors, metadata)})


def _stored_bank(bank: Tensor, dtype: torch.dtype) -> dict[str, Tensor]:
    """The compact file's bank tensors: ``bank`` in ``dtype``; for int8 also ``bank_scale`` (h,),
    each vector quantised symmetrically to [-127, 127] by its own absolute maximum."""
    if dtype != torch.int8:
        return {"bank": bank.to(dtype)}
    bank = bank.float()
    scale = bank.abs().amax(dim=1) / 127.0
    q = bank / scale.clamp_min(torch.finfo(torch.float32).tiny)[:, None]  # an all-zero vector stays 0
    return {"bank": q.round().clamp(-127, 127).to(torch.int8), "bank_scale": scale}


def _check_compact_bank(plan: _Plan, tensors: dict[str, Tensor]) -> None:
    """``_check_bank`` for a compact file's bank, dequantised first when it is stored as int8."""
    bank, scale = tensors.pop("bank", None), tensors.pop("bank_scale", None)
    h = plan.config.num_vectors
    problem = None
    if bank is None or bank.dtype != torch.int8:
        if scale is not None:
            problem = "bank_scale: present, but the bank is not int8; the file is corrupt"
    elif scale is None:
        problem = "bank_scale: missing (an int8 bank needs one scale per vector)"
    elif tuple(scale.shape) != (h,) or not scale.is_floating_point():
        problem = f"bank_scale: shape {tuple(scale.shape)} {scale.dtype}, expected ({h},) float"
    elif not torch.isfinite(scale).all() or (scale < 0).any():
        problem = "bank_scale: negative, NaN or inf scales; the file is corrupt"
    elif bank.dim() == 2 and bank.shape[0] == h:
        bank = bank.float() * scale.float()[:, None]
    else:  # the wrong shape: _check_bank reports it
        bank = bank.float()
    if problem:
        plan.problems.append(problem)
    else:
        _check_bank(plan, bank)


def _stored_layout(plan: _Plan, text: str | None) -> dict[str, Slot]:
    """The layout from the header: ``[[path, in, out], ...]`` in table order."""
    try:
        entries = json.loads(text or "")
        shapes = [(p, i, o) for p, i, o in entries]
        if not all(isinstance(p, str) and type(i) is int and type(o) is int for p, i, o in shapes):
            shapes = []  # a path and two integer sizes per module, nothing else
    except (TypeError, ValueError, RecursionError):
        shapes = []
    if not shapes or len({p for p, _, _ in shapes}) != len(shapes):
        plan.problems.append("header 'layout' is missing or malformed; the file is corrupt")
        return {}
    b = plan.config.vector_length
    bad = [p for p, i, o in shapes if i <= 0 or o <= 0 or i % b or o % b]
    if bad:
        plan.problems.append(f"header layout: {bad[0]} has sizes not divisible by vector_length {b}")
        return {}
    return build_layout(shapes, plan.config.r, b)


def _compact_selection(
    plan: _Plan, tensors: dict[str, Tensor], stored: dict[str, Slot], bits: int
) -> tuple[Tensor, Tensor] | None:
    """A compact file's top-k selection: the bank indices (P, k) every stored sub-vector picks and
    their k weights (P, k), from the bit-packed indices and the k-1 fp16 weights."""
    k, h = plan.config.topk, plan.config.num_vectors
    count = max((s.end for s in stored.values()), default=0)
    packed, weights = tensors.pop("topk_indices", None), tensors.pop("topk_weights", None)
    if packed is None or weights is None:
        plan.problems.append("topk_indices or topk_weights missing; the file is corrupt")
        return None
    if bits != _index_bits(h):
        plan.problems.append(f"header index_bits={bits}, but num_vectors={h} needs {_index_bits(h)}")
        return None
    if packed.dtype != torch.uint8 or packed.numel() != math.ceil(count * k * bits / 8):
        plan.problems.append(
            f"topk_indices: {packed.numel()} {packed.dtype} bytes, expected "
            f"{math.ceil(count * k * bits / 8)} uint8 for {count} sub-vectors; the file is corrupt"
        )
        return None
    if tuple(weights.shape) != (count, k - 1):
        plan.problems.append(f"topk_weights: shape {tuple(weights.shape)}, expected {(count, k - 1)}")
        return None
    indices = unpack_bits(packed, bits, count * k).reshape(count, k)
    full = _topk_weights(plan, "", indices, weights)  # the file's own keys
    return None if full is None else (indices, full)


def _config_of_header(metadata: dict[str, str]) -> VBLoRAConfig:
    if metadata.get("vblora_format") != COMPACT_FORMAT:
        raise ValueError(
            f"not a compact VB-LoRA file (header vblora_format={metadata.get('vblora_format')!r}, "
            f"expected {COMPACT_FORMAT!r}); load adapter directories with from_pretrained/load_adapter"
        )
    return _config_from_json(metadata.get("config", ""), "header 'config'")


def _check_compact_contents(
    plan: _Plan, tensors: dict[str, Tensor], metadata: dict[str, str]
) -> tuple[dict[str, Slot], tuple[Tensor, Tensor] | None]:
    """Check a compact file against its own header, no model needed: the bank (into ``plan.bank``),
    the stored layout and the top-k selection. Pops the adapter tensors from ``tensors``."""
    _check_compact_bank(plan, tensors)
    stored = _stored_layout(plan, metadata.get("layout"))
    try:
        bits = int(metadata.get("index_bits", ""))
    except ValueError:
        plan.problems.append("header index_bits is missing or malformed; the file is corrupt")
        bits = _index_bits(plan.config.num_vectors)
    return stored, _compact_selection(plan, tensors, stored, bits)


@dataclass(frozen=True)
class CompactContents:
    """A compact file read on its own and checked against its header (not against any model)."""

    config: VBLoRAConfig
    layout: dict[str, Slot]  # module path -> its rows, in the file's order
    bank: Tensor  # (h, b), dequantised to float when stored as int8
    indices: Tensor  # (P, k) the bank vectors each stored sub-vector selects
    weights: Tensor  # (P, k) their admixture weights
    tensors: dict[str, Tensor]  # every tensor in the file, as stored

    @property
    def stored_bank_dtype(self) -> torch.dtype:
        return self.tensors["bank"].dtype


def read_compact(path: StrPath) -> CompactContents:
    """Read and check a ``.vblora`` file without a model (what ``load_compact`` checks first).

    Raises:
        ValueError: the file is unreadable or inconsistent with its header (every problem listed).
    """
    source = Path(path)
    tensors, metadata = _read_safetensors(source)
    plan = _Plan(_config_of_header(metadata), {}, [])
    rest = dict(tensors)
    stored, selection = _check_compact_contents(plan, rest, metadata)
    _strip_prefix(plan, rest)  # heads and biases are checked against a model by load_compact
    plan.fail_if_problems(source, None)
    assert plan.bank is not None and selection is not None
    return CompactContents(plan.config, stored, plan.bank, *selection, tensors=tensors)


def _plan_compact(
    root: nn.Module, tensors: dict[str, Tensor], metadata: dict[str, str], name: str, existing: dict
) -> _Plan:
    plan = _plan_targets(root, _config_of_header(metadata), name, existing)
    tensors = dict(tensors)
    stored, selection = _check_compact_contents(plan, tensors, metadata)
    plan.inference_only = True
    rows: dict[str, Rows | None] = {}
    for path, slot in stored.items():
        target = plan.layout.get(path)
        fits = target is not None and (target.in_features, target.out_features) == (
            slot.in_features,
            slot.out_features,
        )
        if target is not None and not fits:
            plan.problems.append(
                f"{path}: stored for a {slot.in_features} -> {slot.out_features} layer, but the "
                f"model's is {target.in_features} -> {target.out_features}; the file belongs to a "
                "different base model"
            )
        if selection is not None and fits:
            rows[path] = (
                selection[0][slot.a_offset : slot.end].long(),
                selection[1][slot.a_offset : slot.end],
            )
        else:
            rows[path] = None
    _assemble(plan, rows)
    _plan_aux(plan, root, _strip_prefix(plan, tensors))
    return plan


def load_compact(base: nn.Module, path: StrPath, adapter_name: str = "default") -> VBLoRAModel:
    """Load a ``.vblora`` file for inference.

    Args:
        base: a plain base model (wrapped and returned) or a :class:`VBLoRAModel` (the adapter is
            added to it, inactive until ``set_adapter``, and the same model returned).
        path: the file written by :func:`save_compact`.
        adapter_name: the name of the loaded adapter.

    Raises:
        ValueError: the file is unreadable or does not fit the model (every problem listed); the
            model is unchanged.
    """
    from .model import VBLoRAModel

    source = Path(path)
    tensors, metadata = _read_safetensors(source)
    existing = base.peft_config if isinstance(base, VBLoRAModel) else {}
    root = base.model if isinstance(base, VBLoRAModel) else base
    plan = _plan_compact(root, tensors, metadata, adapter_name, existing)
    plan.fail_if_problems(source, adapter_name)
    if not isinstance(base, VBLoRAModel):
        return _wrap(VBLoRAModel, base, adapter_name, plan, is_trainable=False)
    _add_or_roll_back(base, adapter_name, plan, trainable=False)
    return base


# ---------------------------------------------------------------------------- LoRA export
_LORA_BIAS = {"none": "none", "all": "all", "vblora_only": "lora_only"}


def export_lora(model: VBLoRAModel, save_directory: StrPath, adapter_name: str = "default") -> None:
    """Write one adapter as an exact PEFT LoRA adapter (``lora_A``/``lora_B`` per module, fp32).

    ``lora_alpha = r`` makes PEFT's scaling 1, so ``B @ A`` is exactly our update; the target list
    is the adapted modules' paths; ``modules_to_save`` copies and trained biases are carried over.
    """
    _one_adapter(model, adapter_name)
    config, bank = model.peft_config[adapter_name], model.vblora_banks[adapter_name]
    sub = bank.subvectors()  # (P, b) in fp32, without autograd
    tensors: dict[str, Tensor] = {}
    for path, s in bank.layout.items():
        tensors[f"{PREFIX}{path}.lora_A.weight"] = VF.factor_a(
            sub[s.a_offset : s.b_offset], s.r, s.in_features
        )
        tensors[f"{PREFIX}{path}.lora_B.weight"] = VF.factor_b(sub[s.b_offset : s.end], s.r, s.out_features)
    tensors.update(_aux_tensors(model, adapter_name))
    saved = _saved_config(model, adapter_name)
    lora_config = {
        "peft_type": "LORA",
        "r": config.r,
        "lora_alpha": config.r,
        "target_modules": list(bank.layout),
        "lora_dropout": config.vblora_dropout,
        "fan_in_fan_out": saved.fan_in_fan_out,
        "bias": _LORA_BIAS[config.bias],
        "modules_to_save": list(config.modules_to_save) if config.modules_to_save else None,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "task_type": config.task_type,
        "base_model_name_or_path": config.base_model_name_or_path,
        "revision": config.revision,
        "inference_mode": True,
    }
    config_bytes = json.dumps(lora_config, indent=2, sort_keys=True).encode("utf-8")
    weight_bytes = _safetensors_bytes(tensors, {})
    folder = Path(save_directory)
    _atomic_write({folder / CONFIG_NAME: config_bytes, folder / WEIGHTS_NAME: weight_bytes})
