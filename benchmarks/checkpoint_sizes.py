"""Bytes on disk of every checkpoint format, for three adapter shapes; prints a Markdown table.
The last two rows are the memory a loaded top-k adapter holds (its tensors, not the base model).

Formats: our full-logits directory, PEFT's top-k directory (written by ``peft``), our top-k
directory, the compact file with an fp32 / fp16 / bf16 / int8 bank, and the exact LoRA export. The error
column is the relative (Frobenius) error of all composed A and B factors read back from the file,
against the top-k directory's (which is exact).

Shapes (r=4, k=2 throughout):
- tiny: Llama, hidden 64, FFN 128, 2 layers, all 7 projections; h=64, b=16.
- MiniLM: BERT, hidden 384, FFN 1536, 6 layers, query/key/value/dense; h=256, b=128.
- Llama-2-7B: 32 layers x q,k,v,o (4096->4096), gate, up (4096->11008), down (11008->4096);
  h=2048, b=256. Layer-only model whose weights are zero-stride views: the 6.5B base weights
  never exist, only the adapter does.

Run: .venv/bin/python benchmarks/checkpoint_sizes.py   (about a minute on 2 cores; ~3 GB RAM)
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import peft
import torch
import transformers
from torch import nn

from vblora import VBLoRAConfig, VBLoRAModel, export_lora, get_vblora_model, load_compact, save_compact

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ---------------------------------------------------------------------------- base models
def _weightless_linear(in_features: int, out_features: int) -> nn.Linear:
    """An nn.Linear whose weight is a zero-stride view of one zero: right shape, no memory."""
    with torch.device("meta"):
        layer = nn.Linear(in_features, out_features, bias=False)
    layer.weight = nn.Parameter(torch.zeros(()).expand(out_features, in_features), requires_grad=False)
    return layer


def llama7b() -> nn.Module:
    def block() -> nn.Module:
        m = nn.Module()
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(m, name, _weightless_linear(4096, 4096))
        m.gate_proj, m.up_proj = _weightless_linear(4096, 11008), _weightless_linear(4096, 11008)
        m.down_proj = _weightless_linear(11008, 4096)
        return m

    base = nn.Module()
    base.layers = nn.ModuleList(block() for _ in range(32))
    return base


def tiny_llama() -> nn.Module:
    cfg = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4
    )
    return transformers.LlamaForCausalLM(cfg)


def minilm() -> nn.Module:
    cfg = transformers.BertConfig(
        vocab_size=1000, hidden_size=384, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=12
    )
    return transformers.BertModel(cfg, add_pooling_layer=False)


SHAPES: dict[str, tuple[Callable[[], nn.Module], dict]] = {
    "tiny Llama (h=64, b=16)": (
        tiny_llama,
        dict(num_vectors=64, vector_length=16, target_modules=LLAMA_TARGETS),
    ),
    "MiniLM shape (h=256, b=128)": (
        minilm,
        dict(num_vectors=256, vector_length=128, target_modules=["query", "key", "value", "dense"]),
    ),
    "Llama-2-7B shape (h=2048, b=256)": (
        llama7b,
        dict(num_vectors=2048, vector_length=256, target_modules=LLAMA_TARGETS),
    ),
}


# ---------------------------------------------------------------------------- measuring
def folder_bytes(folder: Path) -> int:
    """Adapter files only (PEFT also writes a README.md model card, not counted)."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and p.name != "README.md")


def composed(bank: nn.Module) -> torch.Tensor:
    return bank.subvectors()  # every sub-vector in fp32, from the logits or the kept selection


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def rel_error(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a - ref).norm() / ref.norm()).item()


def measure(
    factory: Callable[[], nn.Module], fields: dict, work: Path
) -> dict[str, tuple[int, float | None]]:
    cfg = dict(r=4, topk=2, **fields)
    torch.manual_seed(0)
    ours = get_vblora_model(factory(), VBLoRAConfig(**cfg))
    ours.save_pretrained(work / "full", save_only_topk_weights=False)
    ours.save_pretrained(work / "topk", save_only_topk_weights=True)
    served = VBLoRAModel.from_pretrained(factory(), work / "topk").vblora_banks["default"]
    exact = composed(served)
    held = tensor_bytes([*served.parameters(), *served.buffers()])
    theirs = peft.PeftModel.from_pretrained(factory(), work / "topk")
    held_by_peft = tensor_bytes(p for n, p in theirs.named_parameters() if "vblora_" in n)
    del served, theirs
    theirs = peft.get_peft_model(factory(), peft.VBLoRAConfig(**cfg, save_only_topk_weights=True))
    theirs.save_pretrained(work / "peft")
    del theirs
    rows: dict[str, tuple[int, float | None]] = {
        "full directory (ours)": (folder_bytes(work / "full"), None),
        "top-k directory (peft)": (folder_bytes(work / "peft"), None),
        "top-k directory (ours)": (folder_bytes(work / "topk"), 0.0),
    }
    dtypes = (
        ("fp32", torch.float32),
        ("fp16", torch.float16),
        ("bf16", torch.bfloat16),
        ("int8", torch.int8),
    )
    for label, dtype in dtypes:
        path = work / f"{label}.vblora"
        save_compact(ours, path, bank_dtype=dtype)
        loaded = load_compact(factory(), path).vblora_banks["default"]
        rows[f"compact, {label} bank"] = (path.stat().st_size, rel_error(composed(loaded), exact))
    rows["of which compact header"] = (header_bytes(work / "fp16.vblora"), None)
    export_lora(ours, work / "lora")
    rows["LoRA export (fp32)"] = (folder_bytes(work / "lora"), None)
    rows["in memory, top-k directory loaded (ours: bank + selection)"] = (held, None)
    rows["in memory, top-k directory loaded (peft: bank + full logits)"] = (held_by_peft, None)
    return rows


def human(n: int) -> str:
    return f"{n / 2**20:,.2f} MiB" if n >= 2**17 else f"{n / 2**10:,.1f} KiB"


def header_bytes(path: Path) -> int:
    """Size of a safetensors file's JSON header (tensor table, config and layout)."""
    return 8 + int.from_bytes(path.read_bytes()[:8], "little")


def main() -> None:
    results = {}
    start = time.perf_counter()
    for name, (factory, fields) in SHAPES.items():
        with tempfile.TemporaryDirectory() as tmp:
            results[name] = measure(factory, fields, Path(tmp))
    formats = list(next(iter(results.values())))
    print("| format | " + " | ".join(results) + " |")
    print("|---" * (len(results) + 1) + "|")
    for fmt in formats:
        cells = []
        for rows in results.values():
            size, err = rows[fmt]
            cells.append(f"{size:,d} B ({human(size)})" + (f", err {err:.1e}" if err else ""))
        print(f"| {fmt} | " + " | ".join(cells) + " |")
    elapsed = time.perf_counter() - start
    print(f"\nerr: relative error of the composed A/B factors vs. the top-k directory ({elapsed:.0f} s)")


if __name__ == "__main__":
    main()
