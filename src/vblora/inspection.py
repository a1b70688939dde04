"""What is inside a saved adapter (directory or compact file), read from its files alone (no base model).

Used by ``vblora inspect``: the config, how many sub-vectors each module has, trainable versus
stored parameters and bytes, and how often each bank vector is selected by the top-k.
"""

from __future__ import annotations

import json
import pathlib
import re
from dataclasses import dataclass, field

import torch

from . import checkpoint
from .checkpoint import CONFIG_NAME, PREFIX, WEIGHTS_NAME
from .config import VBLoRAConfig
from .data import DataError

STORED_AS = {True: "top-k indices and weights (inference only)", False: "full logits (trainable)"}
COMPACT_STORED_AS = "compact file: bit-packed top-k indices, fp16 weights, {} bank (inference only)"
_FACTORS = {"A": ".vblora_logits_A", "B": ".vblora_logits_B"}


@dataclass
class AdapterSummary:
    """The facts ``vblora inspect`` prints."""

    path: pathlib.Path
    config: VBLoRAConfig
    subvectors: dict[str, dict[str, int]]  # module path -> {"A": count, "B": count}
    bank_shape: tuple[int, int]
    stored_vblora: tuple[int, int]  # (elements, bytes) of the bank and logits/top-k tensors
    stored_other: tuple[int, int]  # (elements, bytes) of modules_to_save copies and biases
    file_bytes: int
    selection: torch.Tensor  # (h,) how many sub-vector slots select each bank vector
    topk_only: bool = field(default=False)
    stored_as: str = ""  # what the file holds, for the report

    def __post_init__(self) -> None:
        self.stored_as = self.stored_as or STORED_AS[self.topk_only]

    @property
    def num_subvectors(self) -> int:
        return sum(c["A"] + c["B"] for c in self.subvectors.values())

    @property
    def trainable_vblora(self) -> int:
        """Bank plus full logits: what training optimises (the head counted apart)."""
        h, b = self.bank_shape
        return h * b + self.num_subvectors * h


def read_adapter(folder: pathlib.Path) -> AdapterSummary:
    """Read ``adapter_config.json`` and ``adapter_model.safetensors`` of one adapter folder.

    Raises:
        DataError: the folder or its files are missing or are not a VB-LoRA adapter.
    """
    from safetensors import SafetensorError, safe_open

    config_file, weights_file = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    for f in (config_file, weights_file):
        if not f.is_file():
            raise DataError(
                f"{f}: no such file; pass an adapter folder or a folder written by `vblora train`"
            )
    try:
        config = VBLoRAConfig.from_dict(json.loads(config_file.read_text(encoding="utf-8")))
    except (ValueError, TypeError, RecursionError) as err:
        raise DataError(f"{config_file}: not a VB-LoRA config ({err})") from None
    try:
        with safe_open(str(weights_file), framework="pt") as f:
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (not a mapping)
    except (SafetensorError, OSError) as err:
        raise DataError(f"{weights_file}: unreadable ({err})") from None
    bank = next((t for k, t in tensors.items() if k.endswith("vblora_vector_bank")), None)
    if bank is None:
        raise DataError(f"{weights_file}: no vblora_vector_bank tensor; not a VB-LoRA adapter")
    counts, chosen = _subvectors(tensors, config.topk)
    vblora = [t for k, t in tensors.items() if "vblora_" in k]
    other = [t for k, t in tensors.items() if "vblora_" not in k]
    return AdapterSummary(
        path=folder,
        config=config,
        subvectors=counts,
        bank_shape=(bank.shape[0], bank.shape[1]),
        stored_vblora=_size(vblora),
        stored_other=_size(other),
        file_bytes=weights_file.stat().st_size,
        selection=torch.bincount(torch.cat(chosen), minlength=bank.shape[0]) if chosen else torch.zeros(0),
        topk_only=any(k.endswith("_topk_indices") for k in tensors),
    )


def read_compact(path: pathlib.Path) -> AdapterSummary:
    """Read a compact ``.vblora`` file (``save_compact``): config and layout from its header, checked
    as ``load_compact`` checks them before it touches a model.

    Raises:
        DataError: the file is missing, unreadable, or not a well-formed compact VB-LoRA file.
    """
    if not path.is_file():
        raise DataError(f"{path}: no such file; pass a .vblora file, an adapter folder or a run folder")
    try:
        contents = checkpoint.read_compact(path)
    except ValueError as err:
        lines = str(err).splitlines()
        detail = lines[1].strip(" -") if len(lines) > 1 else lines[0]  # the first problem, or the cause
        raise DataError(f"{path}: unreadable or corrupt compact file ({detail})") from None
    adapter, other = [], []
    for key, tensor in contents.tensors.items():
        (adapter if key in checkpoint.COMPACT_ADAPTER_TENSORS else other).append(tensor)
    return AdapterSummary(
        path=path,
        config=contents.config,
        subvectors={p: {"A": slot.a_rows, "B": slot.b_rows} for p, slot in contents.layout.items()},
        bank_shape=(contents.bank.shape[0], contents.bank.shape[1]),
        stored_vblora=_size(adapter),
        stored_other=_size(other),
        file_bytes=path.stat().st_size,
        selection=torch.bincount(contents.indices.reshape(-1), minlength=contents.bank.shape[0]),
        topk_only=True,
        stored_as=COMPACT_STORED_AS.format(str(contents.stored_bank_dtype).removeprefix("torch.")),
    )


def _subvectors(
    tensors: dict[str, torch.Tensor], k: int
) -> tuple[dict[str, dict[str, int]], list[torch.Tensor]]:
    """Per module, its A and B sub-vector counts; and the bank indices every sub-vector selects."""
    counts: dict[str, dict[str, int]] = {}
    chosen: list[torch.Tensor] = []
    for key, tensor in tensors.items():
        for factor, marker in _FACTORS.items():
            if marker not in key or key.endswith("_topk_weights"):
                continue
            module = (
                key[len(PREFIX) : key.index(marker)] if key.startswith(PREFIX) else key[: key.index(marker)]
            )
            if key.endswith("_topk_indices"):
                indices = tensor.long().reshape(-1, tensor.shape[-1])
            else:
                indices = tensor.float().reshape(-1, tensor.shape[-1]).topk(k, dim=-1).indices
            counts.setdefault(module, {"A": 0, "B": 0})[factor] = indices.shape[0]
            chosen.append(indices.reshape(-1))
    return counts, chosen


def _natural(path: str) -> list[int | str]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path)]


def _size(tensors: list[torch.Tensor]) -> tuple[int, int]:
    return sum(t.numel() for t in tensors), sum(t.numel() * t.element_size() for t in tensors)


def describe(s: AdapterSummary, all_modules: bool = False, shown: int = 12) -> str:
    """The text report of ``vblora inspect``."""
    c = s.config
    h, b = s.bank_shape
    targets = c.target_modules if isinstance(c.target_modules, str) else list(c.target_modules or [])
    lines = [
        f"adapter: {s.path}",
        f"config: r={c.r} num_vectors={c.num_vectors} vector_length={c.vector_length} topk={c.topk} "
        f"dropout={c.vblora_dropout} task_type={c.task_type}",
        f"  target_modules={targets} modules_to_save={list(c.modules_to_save or [])} bias={c.bias}",
        f"  base_model={c.base_model_name_or_path}",
        f"  stored as: {s.stored_as}",
        "",
        f"modules: {len(s.subvectors)}, sub-vectors: {s.num_subvectors:,} (A + B; {b} values each)",
        f"  {'module':<60} {'A':>6} {'B':>6}",
    ]
    items = sorted(s.subvectors.items(), key=lambda item: _natural(item[0]))  # layer 10 after layer 9
    for module, n in items if all_modules else items[:shown]:
        lines.append(f"  {module:<60} {n['A']:>6} {n['B']:>6}")
    if not all_modules and len(items) > shown:
        lines.append(f"  ... {len(items) - shown} more (--modules lists all)")
    lines += [
        "",
        "parameters:",
        f"  trainable VB-LoRA (bank {h}x{b} + logits {s.num_subvectors:,}x{h}): {s.trainable_vblora:,}"
        f" = {4 * s.trainable_vblora:,} bytes in float32",
        f"  stored VB-LoRA tensors: {s.stored_vblora[0]:,} elements, {s.stored_vblora[1]:,} bytes",
        f"  stored other tensors (modules_to_save, biases): {s.stored_other[0]:,} elements, "
        f"{s.stored_other[1]:,} bytes",
        f"  {s.path.name if s.path.is_file() else WEIGHTS_NAME}: {s.file_bytes:,} bytes",
        "",
    ]
    return "\n".join(lines + selection_report(s.selection, c.topk))


def selection_report(selection: torch.Tensor, k: int, per_line: int = 8) -> list[str]:
    """How often each bank vector is selected: summary, a grid of counts, and the busiest vectors."""
    counts = selection.tolist()
    if not counts:
        return ["bank-vector selection: no sub-vectors"]
    used = sum(1 for n in counts if n)
    ordered = sorted(counts)
    lines = [
        f"bank-vector selection ({sum(counts):,} picks = sub-vectors x k={k}; "
        f"{used}/{len(counts)} vectors used; "
        f"min {ordered[0]}, median {ordered[len(ordered) // 2]}, max {ordered[-1]}):",
    ]
    for start in range(0, len(counts), per_line):
        cells = [f"{i:>4}:{counts[i]:>6}" for i in range(start, min(start + per_line, len(counts)))]
        lines.append("  " + "  ".join(cells))
    top = sorted(range(len(counts)), key=lambda i: -counts[i])[:5]
    lines.append("  most selected: " + ", ".join(f"#{i} ({counts[i]})" for i in top))
    return lines


def plot_selection(s: AdapterSummary, path: pathlib.Path) -> None:
    """A bar chart of the selection counts per bank vector."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = s.selection.tolist()
    fig, ax = plt.subplots(figsize=(max(6.0, min(16.0, len(counts) / 8)), 3.5))
    ax.bar(range(len(counts)), counts, width=1.0, color="C0")
    mean = sum(counts) / max(len(counts), 1)
    ax.axhline(mean, color="C1", linestyle="--", label=f"uniform ({mean:.1f})")
    ax.set(xlabel="bank vector", ylabel="times selected", title=f"bank-vector selection: {s.path}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
