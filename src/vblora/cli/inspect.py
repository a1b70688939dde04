"""What is inside a saved adapter (directory or compact file), read from its files alone (no base model).

Used by ``vblora inspect``: the config, how many sub-vectors each module has, trainable versus
stored parameters and bytes, and how often each bank vector is selected by the top-k.
"""

from __future__ import annotations

import argparse
import pathlib
import re
import tempfile
from dataclasses import dataclass, field

import torch

from ..core.config import VBLoRAConfig
from ..formats import compact
from ..formats.atomic import existing_ancestor
from ..formats.contents import check_alone
from ..formats.readers import BANK_KEY, WEIGHTS_NAME, FormatError, read_directory, split_peft_keys
from ..training.loop import RunError
from ..training.runs import ADAPTER_DIR

STORED_AS = {True: "top-k indices and weights (inference only)", False: "full logits (trainable)"}
MAX_GRID = 4096  # bank vectors whose counts are printed one by one; beyond, the summary only
COMPACT_STORED_AS = "compact file: bit-packed top-k indices, fp16 weights, {} bank (inference only)"


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
    """Read ``adapter_config.json`` and ``adapter_model.safetensors`` of one adapter folder, checked
    as a load checks them (shapes, dtypes, finite values, indices in range), with no base model.

    Raises:
        FormatError: the folder or its files are missing, are not a VB-LoRA adapter, or are corrupt.
    """
    config, tensors, _ = read_directory(folder)
    keys = split_peft_keys(tensors)
    if keys.bank is None:
        raise FormatError(f"{folder / WEIGHTS_NAME}: no {BANK_KEY} tensor; not a VB-LoRA adapter")
    checked, chosen = check_alone(config, keys)
    checked.fail_if_problems(folder, None)
    vblora = [keys.bank, *(t for parts in keys.modules.values() for t in parts.values())]
    other = [*keys.other.values(), *(tensors[k] for k in keys.unexpected)]
    return AdapterSummary(
        path=folder,
        config=config,
        subvectors={p: {"A": slot.a_rows, "B": slot.b_rows} for p, slot in checked.layout.items()},
        bank_shape=(keys.bank.shape[0], keys.bank.shape[1]),
        stored_vblora=_size(vblora),
        stored_other=_size(other),
        file_bytes=(folder / WEIGHTS_NAME).stat().st_size,
        selection=torch.bincount(chosen.reshape(-1), minlength=keys.bank.shape[0]),
        topk_only=any(kind == "indices" for parts in keys.modules.values() for _, kind in parts),
    )


def read_compact(path: pathlib.Path) -> AdapterSummary:
    """Read a compact ``.vblora`` file (``save_compact``): config and layout from its header, checked
    as ``load_compact`` checks them before it touches a model.

    Raises:
        FormatError: the file is missing, unreadable, or not a well-formed compact VB-LoRA file.
    """
    if not path.is_file():
        raise FormatError(f"{path}: no such file; pass a .vblora file, an adapter folder or a run folder")
    try:
        contents = compact.read_compact(path)
    except ValueError as err:
        lines = str(err).splitlines()
        detail = lines[1].strip(" -") if len(lines) > 1 else lines[0]  # the first problem, or the cause
        raise FormatError(f"{path}: unreadable or corrupt compact file ({detail})") from None
    adapter, other = [], []
    for key, tensor in contents.tensors.items():
        (adapter if key in compact.COMPACT_ADAPTER_TENSORS else other).append(tensor)
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
    if len(counts) > MAX_GRID:
        lines.append(f"  (a grid of {len(counts):,} counts is not printed; --plot draws them)")
    for start in range(0, len(counts) if len(counts) <= MAX_GRID else 0, per_line):
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


# =========================================================================== the command


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "inspect",
        help="describe an adapter: config, sub-vectors, parameters, bytes, bank usage",
        description="Print an adapter's config, per-module sub-vector counts, trainable vs stored parameters "
        "and bytes, and how often each bank vector is selected. Reads the files only.",
    )
    p.add_argument(
        "run",
        type=pathlib.Path,
        help="a folder written by `vblora train`, an adapter folder, or a compact .vblora file",
    )
    p.add_argument(
        "--plot", type=pathlib.Path, metavar="PNG", help="also write the selection histogram as a PNG"
    )
    p.add_argument(
        "--modules", action="store_true", help="list every module (default: the first 12 and totals)"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    path = args.run
    plot = _plot_path(args.plot) if args.plot else None  # a bad name fails before any output
    adapter = path / ADAPTER_DIR if (path / ADAPTER_DIR / "adapter_config.json").is_file() else path
    summary = read_compact(path) if path.is_file() else read_adapter(adapter)
    print(describe(summary, all_modules=args.modules))
    if plot:
        try:
            plot.parent.mkdir(parents=True, exist_ok=True)
            plot_selection(summary, plot)
        except OSError as err:
            raise RunError(f"--plot {args.plot}: cannot write it ({err.strerror})") from None
        print(f"wrote {plot}")


def _plot_path(path: pathlib.Path) -> pathlib.Path:
    """The PNG file --plot names (``.png`` added when the name has no extension)."""
    if path.is_dir():
        raise RunError(f"--plot {path} is a folder; pass a file name such as {path / 'selection.png'}")
    if not path.suffix:
        path = path.with_suffix(".png")
    if path.suffix.lower() != ".png":
        raise RunError(f"--plot {path}: the plot is a PNG; use a name ending in .png")
    anchor = existing_ancestor(path.resolve().parent)
    if not anchor.is_dir():
        raise RunError(f"--plot {path}: {anchor} is a file, not a folder")
    try:  # an unwritable place fails here, before the description is printed
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".vblora-plot-"):
            pass
    except OSError as err:
        raise RunError(f"--plot {path}: cannot write there ({err.strerror})") from None
    return path
