"""Compact ``.vblora`` files: one safetensors file per adapter, inference only.

The bank (fp32, fp16, bf16, or int8 with a scale per vector), the top-k indices bit-packed to
ceil(log2 h) bits, the k-1 weights in fp16, and the config and module layout once, as JSON in the
header.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from os import PathLike
from pathlib import Path

import torch
from torch import Tensor, nn

from ..core.bank import Slot, build_layout
from ..core.config import VBLoRAConfig
from ..injection.plan import AdapterPlan
from .contents import FLOAT_DTYPES, Loaded, Rows, assemble, check_aux, check_bank, topk_weights
from .peft_dir import AdapterExport, safetensors_bytes
from .readers import BANK_KEY, PREFIX, config_from_json, read_safetensors, split_peft_keys

COMPACT_FORMAT = "vblora-compact/1"
COMPACT_ADAPTER_TENSORS = ("bank", "bank_scale", "topk_indices", "topk_weights")  # the rest: head, biases
MAX_FEATURES = 2**31  # a layer size in a header beyond this is corrupt (and would not fit in memory)
COMPACT_BANK_DTYPES = {  # save_compact's bank precisions, by name
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int8": torch.int8,
}

StrPath = str | PathLike[str]


def index_bits(num_vectors: int) -> int:
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
    if bits == 8:  # h = 256: one byte per value (a serving load's hot path)
        return packed.reshape(-1)[:count].long()
    shifts = torch.arange(8, dtype=torch.uint8)
    stream = ((packed.reshape(-1, 1) >> shifts) & 1).flatten()[: count * bits]  # uint8: 8x less than int64
    return (stream.reshape(count, bits).long() << torch.arange(bits)).sum(dim=-1)


def _compact_config(config: VBLoRAConfig) -> str:
    """The config as JSON, only fields that differ from the defaults (the header stays small)."""
    defaults = VBLoRAConfig().to_dict()
    full = config.to_dict()
    always = ("peft_type", "r", "num_vectors", "vector_length", "topk", "target_modules")
    kept = {k: v for k, v in full.items() if k in always or v != defaults.get(k)}
    return json.dumps(kept, separators=(",", ":"))


def compact_bytes(export: AdapterExport, bank_dtype: torch.dtype = torch.float32) -> bytes:
    """One adapter as a compact ``.vblora`` file (inference only, like a top-k directory).

    Stored: the bank in ``bank_dtype`` (fp32; fp16/bf16 for about half the size; int8 with one fp32
    scale per bank vector, ``bank_scale``, for about a quarter), per sub-vector k indices bit-packed
    to ceil(log2 h) bits and k-1 fp16 weights, ``modules_to_save`` copies and trained biases, and the
    config and the module layout ``[[path, in, out], ...]`` once as JSON in the header.
    """
    if bank_dtype not in COMPACT_BANK_DTYPES.values():
        raise ValueError(f"bank_dtype must be torch.float32, float16, bfloat16 or int8, got {bank_dtype}")
    bank = export.bank
    indices, weights = bank.selection()  # (P, k) each
    bits = index_bits(bank.num_vectors)
    tensors = {
        **stored_bank(bank.bank.detach(), bank_dtype),
        "topk_indices": pack_bits(indices, bits),
        "topk_weights": weights[:, :-1].half(),  # the k-th weight is 1 - sum of the others
        **export.aux,
    }
    layout = [[p, s.in_features, s.out_features] for p, s in bank.layout.items()]
    metadata = {
        "vblora_format": COMPACT_FORMAT,
        "config": _compact_config(export.config),
        "layout": json.dumps(layout, separators=(",", ":")),
        "index_bits": str(bits),
    }
    return safetensors_bytes(tensors, metadata)


def stored_bank(bank: Tensor, dtype: torch.dtype) -> dict[str, Tensor]:
    """The compact file's bank tensors: ``bank`` in ``dtype``; for int8 also ``bank_scale`` (h,),
    each vector quantised symmetrically to [-127, 127] by its own absolute maximum."""
    if dtype != torch.int8:
        return {"bank": bank.to(dtype)}
    bank = bank.float()
    scale = bank.abs().amax(dim=1) / 127.0
    q = bank / scale.clamp_min(torch.finfo(torch.float32).tiny)[:, None]  # an all-zero vector stays 0
    return {"bank": q.round().clamp(-127, 127).to(torch.int8), "bank_scale": scale}


def _check_compact_bank(plan: Loaded, tensors: dict[str, Tensor]) -> None:
    """``_check_bank`` for a compact file's bank, dequantised first when it is stored as int8."""
    bank, scale = tensors.pop("bank", None), tensors.pop("bank_scale", None)
    h = plan.config.num_vectors
    problem = None
    if bank is not None and bank.dtype not in COMPACT_BANK_DTYPES.values():
        problem = f"bank: dtype {bank.dtype}; a compact bank is one of {', '.join(COMPACT_BANK_DTYPES)}"
    elif bank is None or bank.dtype != torch.int8:
        if scale is not None:
            problem = "bank_scale: present, but the bank is not int8; the file is corrupt"
    elif scale is None:
        problem = "bank_scale: missing (an int8 bank needs one scale per vector)"
    elif tuple(scale.shape) != (h,) or scale.dtype not in FLOAT_DTYPES:
        problem = f"bank_scale: shape {tuple(scale.shape)} {scale.dtype}, expected ({h},) float"
    elif not torch.isfinite(scale.float()).all() or (scale < 0).any():
        problem = "bank_scale: negative, NaN or inf scales; the file is corrupt"
    elif bank.dim() == 2 and bank.shape[0] == h:
        bank = bank.float() * scale.float()[:, None]
    else:  # the wrong shape: _check_bank reports it
        bank = bank.float()
    if problem:
        plan.add(problem)
    else:
        check_bank(plan, bank)


def _stored_layout(plan: Loaded, text: str | None) -> dict[str, Slot]:
    """The layout from the header: ``[[path, in, out], ...]`` in table order."""
    try:
        entries = json.loads(text or "")
        shapes = [(p, i, o) for p, i, o in entries]
        if not all(isinstance(p, str) and type(i) is int and type(o) is int for p, i, o in shapes):
            shapes = []  # a path and two integer sizes per module, nothing else
    except (TypeError, ValueError, RecursionError):
        shapes = []
    if not shapes or len({p for p, _, _ in shapes}) != len(shapes):
        plan.add("header 'layout' is missing or malformed; the file is corrupt")
        return {}
    b = plan.config.vector_length
    huge = [p for p, i, o in shapes if max(i, o) > MAX_FEATURES]
    if huge:
        plan.add(f"header layout: {huge[0]} has sizes above {MAX_FEATURES:,}; the file is corrupt")
        return {}
    bad = [p for p, i, o in shapes if i <= 0 or o <= 0 or i % b or o % b]
    if bad:
        plan.add(f"header layout: {bad[0]} has sizes not divisible by vector_length {b}")
        return {}
    return build_layout(shapes, plan.config.r, b)


def _compact_selection(
    plan: Loaded, tensors: dict[str, Tensor], stored: dict[str, Slot], bits: int
) -> tuple[Tensor, Tensor] | None:
    """A compact file's top-k selection: the bank indices (P, k) every stored sub-vector picks and
    their k weights (P, k), from the bit-packed indices and the k-1 fp16 weights."""
    k, h = plan.config.topk, plan.config.num_vectors
    count = max((s.end for s in stored.values()), default=0)
    packed, weights = tensors.pop("topk_indices", None), tensors.pop("topk_weights", None)
    if packed is None or weights is None:
        plan.add("topk_indices or topk_weights missing; the file is corrupt")
        return None
    if bits != index_bits(h):
        plan.add(f"header index_bits={bits}, but num_vectors={h} needs {index_bits(h)}")
        return None
    expected = -(-count * k * bits // 8)  # exact for any size (a float would overflow)
    if packed.dtype != torch.uint8 or packed.numel() != expected:
        plan.add(
            f"topk_indices: {packed.numel()} {packed.dtype} bytes, expected "
            f"{expected} uint8 for {count} sub-vectors; the file is corrupt"
        )
        return None
    if tuple(weights.shape) != (count, k - 1):
        plan.add(f"topk_weights: shape {tuple(weights.shape)}, expected {(count, k - 1)}")
        return None
    indices = unpack_bits(packed, bits, count * k).reshape(count, k)
    full = topk_weights(plan, "", indices, weights)  # the file's own keys
    return None if full is None else (indices, full)


def config_of_header(metadata: dict[str, str]) -> VBLoRAConfig:
    if metadata.get("vblora_format") != COMPACT_FORMAT:
        raise ValueError(
            f"not a compact VB-LoRA file (header vblora_format={metadata.get('vblora_format')!r}, "
            f"expected {COMPACT_FORMAT!r}); load adapter directories with from_pretrained/load_adapter"
        )
    return config_from_json(metadata.get("config", ""), "header 'config'")


def _check_compact_contents(
    plan: Loaded, tensors: dict[str, Tensor], metadata: dict[str, str]
) -> tuple[dict[str, Slot], tuple[Tensor, Tensor] | None]:
    """Check a compact file against its own header, no model needed: the bank (into ``plan.bank``),
    the stored layout and the top-k selection. Pops the adapter tensors from ``tensors``."""
    _check_compact_bank(plan, tensors)
    stored = _stored_layout(plan, metadata.get("layout"))
    try:
        bits = int(metadata.get("index_bits", ""))
    except ValueError:
        plan.add("header index_bits is missing or malformed; the file is corrupt")
        bits = index_bits(plan.config.num_vectors)
    return stored, _compact_selection(plan, tensors, stored, bits)


def _other_tensors(plan: Loaded, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """The file's tensors besides the adapter's own: ``modules_to_save`` copies and biases, by
    unprefixed key. A directory's keys (bank, per-module logits) do not belong in a compact file."""
    keys = split_peft_keys(tensors)
    misplaced = keys.unexpected + ([BANK_KEY] if keys.bank is not None else [])
    misplaced += [f"{PREFIX}{path}.vblora_logits_*" for path in keys.modules]
    for key in misplaced:
        plan.add(f"{key}: unexpected key (keys are {list(COMPACT_ADAPTER_TENSORS)} or start with {PREFIX!r})")
    return keys.other


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
    tensors, metadata = read_safetensors(source)
    plan = Loaded(AdapterPlan("", config_of_header(metadata)))
    rest = dict(tensors)
    stored, selection = _check_compact_contents(plan, rest, metadata)
    _other_tensors(plan, rest)  # heads and biases are checked against a model by decode_compact
    plan.fail_if_problems(source, None)
    assert plan.bank is not None and selection is not None
    return CompactContents(plan.config, stored, plan.bank, *selection, tensors=tensors)


def decode_compact(
    root: nn.Module, adapter: AdapterPlan, tensors: dict[str, Tensor], metadata: dict[str, str]
) -> Loaded:
    """Check a compact file against its header and against the model (as planned)."""
    plan = Loaded(adapter)
    tensors = dict(tensors)
    stored, selection = _check_compact_contents(plan, tensors, metadata)
    plan.inference_only = True
    if selection is not None and stored == plan.layout:  # the model has the file's layout: no re-cutting
        plan.selection = selection
        check_aux(plan, root, _other_tensors(plan, tensors))
        return plan
    rows: dict[str, Rows | None] = {}
    for path, slot in stored.items():
        target = plan.layout.get(path)
        fits = target is not None and (target.in_features, target.out_features) == (
            slot.in_features,
            slot.out_features,
        )
        if target is not None and not fits:
            plan.add(
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
    assemble(plan, rows)
    check_aux(plan, root, _other_tensors(plan, tensors))
    return plan
