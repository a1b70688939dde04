"""How loading and switching cost grow with the adapters already loaded (serving per-user adapters).

Loads one saved top-k adapter N times under different names into one model and prints the CPU time
per adapter over each hundred, then the time of one ``set_adapter`` and one mixed-adapter batch
with all N loaded, and the composed factors held with ``max_cached_adapters`` at its default.
A flat column is the goal: the k-th adapter should load as fast as the first.

Models (tiny, random, built from configs):
- llama: 2 layers, hidden 256, FFN 512, all 7 projections; h=64, b=64, r=4.
- bert-heads: 2 layers, hidden 64, query/value, with a classifier head per adapter
  (``modules_to_save``), the case where each adapter also adds a module copy.

Our library only: PEFT's loading is timed against ours in ``speed.py --cases adapters`` (it is
quadratic, and N=800 would take many minutes).

Run: .venv/bin/python benchmarks/adapter_growth.py [--adapters 800]   (about 15 s per model)
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable

import torch
import transformers
from torch import nn

from vblora import VBLoRAConfig, VBLoRAModel

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def llama() -> tuple[nn.Module, VBLoRAConfig]:
    cfg = transformers.LlamaConfig(
        vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4
    )
    adapter = VBLoRAConfig(r=4, num_vectors=64, vector_length=64, target_modules=LLAMA_TARGETS)
    return transformers.LlamaForCausalLM(cfg), adapter


def bert_heads() -> tuple[nn.Module, VBLoRAConfig]:
    cfg = transformers.BertConfig(
        vocab_size=1024, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128
    )
    adapter = VBLoRAConfig(
        r=2,
        num_vectors=16,
        vector_length=32,
        target_modules=["query", "value"],
        modules_to_save=["classifier"],
    )
    return transformers.BertForSequenceClassification(cfg), adapter


def cached_bytes(model: VBLoRAModel) -> int:
    return sum(
        a.numel() * a.element_size() + b.numel() * b.element_size()
        for bank in model.vblora_banks.values()
        if bank._factors is not None
        for a, b in bank._factors.values()
    )


def measure(name: str, build: Callable[[], tuple[nn.Module, VBLoRAConfig]], n: int) -> None:
    torch.manual_seed(0)
    base, config = build()
    with tempfile.TemporaryDirectory() as folder:
        VBLoRAModel(base, config).save_pretrained(folder, save_only_topk_weights=True)
        model = VBLoRAModel.from_pretrained(build()[0], folder, "user0")
        print(f"\n{name}: CPU ms per adapter loaded, by hundred")
        last = time.process_time()
        for i in range(1, n):
            model.load_adapter(folder, f"user{i}")
            if (i + 1) % 100 == 0:
                now = time.process_time()
                print(f"  adapters {i - 98:>4}-{i + 1:<4} {(now - last) * 10:6.1f} ms")
                last = now
    start = time.process_time()
    model.set_adapter(f"user{n // 2}")
    print(f"  set_adapter with {n} loaded: {(time.process_time() - start) * 1e3:.2f} ms")
    ids = torch.randint(0, 1024, (8, 16))
    with torch.no_grad():
        for step in range(4):  # 4 batches of 8 rows, each row a different adapter
            names = [f"user{(8 * step + row) % n}" for row in range(8)]
            start = time.process_time()
            model(input_ids=ids, adapter_names=names)
            elapsed = time.process_time() - start
    print(f"  mixed batch of 8 rows (8 adapters) with {n} loaded: {elapsed * 1e3:.1f} ms")
    held = sum(bank._factors is not None for bank in model.vblora_banks.values())
    print(
        f"  after 32 adapters were used: {held} hold composed factors "
        f"({cached_bytes(model) / 1e6:.2f} MB; max_cached_adapters={model.max_cached_adapters})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", type=int, default=800)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {args.threads} thread(s)")
    measure("llama (2 layers, hidden 256, all 7 projections)", llama, args.adapters)
    measure("bert-heads (2 layers, hidden 64, query/value + classifier head)", bert_heads, args.adapters)


if __name__ == "__main__":
    main()
