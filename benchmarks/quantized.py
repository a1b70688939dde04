"""VB-LoRA over quantized bases (bitsandbytes nf4 and int8) against PEFT, side by side (CPU).

Run from the repository root (bitsandbytes installed: ``pip install -e ".[quant,test,cli]"``):

    python benchmarks/quantized.py                 # everything (about 30 minutes on 2 busy CPU cores)
    python benchmarks/quantized.py --quick         # the Llama-shaped case only, no demo runs
    python benchmarks/quantized.py --parts speed,merge --no-smollm2   # what RESULTS.md shows
    python benchmarks/quantized.py --threads 1 --clock cpu   # steadier on a shared machine

1. Speed and memory, for fp32, nf4 and int8 bases (every projection quantized, the embeddings
   and the head fp32, as QLoRA does), of a Llama-shaped model from config and of the packaged
   SmolLM2-135M: the base weights' bytes, one training step (forward, backward, AdamW) and its peak
   memory (torch.profiler's CPU allocator events), and an unmerged inference forward. Contenders on
   the same quantized base in the same process: ``ours``, ``PEFT VB-LoRA`` (our bank and logits
   copied in; PEFT has no quantization support, its layers wrap bitsandbytes' because they subclass
   nn.Linear) and ``PEFT LoRA`` at the same rank (QLoRA). Round-robin after warm-up; medians, and
   ratios as medians of same-round ratios (benchmarks/speed.py's method and helpers).
2. Merging on the Llama-shaped case: ΔW scaled to a given |ΔW|/|W|, merged by requantizing in place
   (``merge_adapter(requantize=True)``) or into a dequantized fp32 copy (``merge_and_unload(
   dequantize=True)``): the share of ΔW the merged weights keep (projection of their change on ΔW),
   the output error against the unmerged model, and whether unmerging restores the quantized bytes.
   Outputs are compared in training mode, where bitsandbytes' CPU int8 path multiplies by the
   dequantized weight (in eval mode LLM.int8() also quantizes the activations).
3. The causal-LM demo (``vblora train --task causal-lm``: SmolLM2 on chatterbot) with an fp32 base
   and with ``--quantize nf4``: held-out loss and perplexity after training, and the run's time.

The last lines are Markdown tables and issue 16's goals with their verdicts.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

import speed  # benchmarks/speed.py: timing, the Llama case, the contenders
from vblora.layers.bnb import LINEAR_8BIT, quantized_kind

QUANTS = ("none", "nf4", "int8")  # none: the unquantized base, in the setup's dtype
ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------- quantized bases
def quantize(model: nn.Module, quant: str, targets: list[str]) -> nn.Module:
    """Every targeted projection as bitsandbytes quantizes it (on its move to the device); in place."""
    import bitsandbytes as bnb

    if quant == "none":
        return model
    for path, module in list(model.named_modules()):
        if type(module) is not nn.Linear or path.rsplit(".", 1)[-1] not in targets:
            continue
        args = (module.in_features, module.out_features, module.bias is not None)
        if quant == "int8":
            q = bnb.nn.Linear8bitLt(*args, has_fp16_weights=False)
        else:
            q = bnb.nn.Linear4bit(*args, compute_dtype=module.weight.dtype, quant_type=quant)
        q.load_state_dict(module.state_dict())
        q = q.to(module.weight.device).train(module.training)
        parent, _, name = path.rpartition(".")
        setattr(model.get_submodule(parent), name, q)
    return model


def tensor_bytes(t: Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def weight_bytes(model: nn.Module, targets: list[str]) -> tuple[int, int]:
    """(bytes of the targeted layers' weights and quantization state, bytes of every other parameter)."""
    layers, counted = 0, set()
    for path, module in model.named_modules():
        if path.rsplit(".", 1)[-1] not in targets or not isinstance(module, nn.Linear):
            continue
        counted.update(id(p) for p in module.parameters())
        layers += sum(tensor_bytes(p) for p in module.parameters())
        state = getattr(module.weight, "quant_state", None)
        if state is not None:  # absmax (or its 8-bit copy, its scales and code), the code book
            layers += sum(tensor_bytes(v) for v in state.as_dict(packed=True).values() if torch.is_tensor(v))
        if quantized_kind(module) is LINEAR_8BIT:
            layers += tensor_bytes(LINEAR_8BIT.scales(module))
    other = sum(tensor_bytes(p) for p in model.parameters() if id(p) not in counted)
    return layers, other


# ---------------------------------------------------------------------- 1. speed and memory
def llama_case(setup: speed.Setup) -> speed.Case:
    """A Llama-shaped model from config: 2 layers, hidden 512, FFN 1536, all 7 projections, vocab 4k."""
    case = speed._llama(setup, 2, hidden=512, ffn=1536, heads=8, vocab=4096, batch=4, seq=64)
    case.vector_length = 128  # divides 512 and 1536
    return case


def smollm2_case(setup: speed.Setup) -> speed.Case:
    """The packaged SmolLM2-135M-Instruct (Llama architecture, 30 layers, hidden 576)."""
    from transformers import AutoModelForCausalLM

    from vblora.training import data

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(data.smollm2_path(), dtype=torch.float32)
    batch, seq = 2, 64
    ids = torch.randint(0, base.config.vocab_size, (batch, seq))
    return speed.Case(
        f"SmolLM2-135M ({batch}x{seq})",
        base,
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        vector_length=64,  # divides 576, 192 and 1536
        num_vectors=256,
        batch={"input_ids": ids, "labels": ids},
    ).to(setup)


def bench_case(case: speed.Case, quant: str, setup: speed.Setup) -> list[speed.Row]:
    base = quantize(copy.deepcopy(case.base), quant, case.targets)
    layers, other = weight_bytes(base, case.targets)
    qcase = copy.copy(case)
    qcase.base = base
    name = f"{case.name}, {str(setup.dtype).removeprefix('torch.') if quant == 'none' else quant}"
    ours = speed.ours_model(qcase)
    models = {
        speed.OURS: ours,
        speed.PEFT_VB: speed.peft_vblora_model(qcase, ours),
        speed.PEFT_LORA: speed.peft_lora_model(qcase),
    }
    diff = speed.max_output_diff(ours, models[speed.PEFT_VB], case.batch)
    print(f"\n== {name}: ours vs PEFT VB-LoRA max |output diff| = {diff:.2e}", flush=True)
    rows = [speed.Row(name, "targeted weights", "MiB", {"base": layers / 2**20})]
    rows[0].values["rest of the base"] = other / 2**20
    steps = {n: speed.make_train_step(m, case.batch, speed.optimizer_for(m, n)) for n, m in models.items()}
    for step in steps.values():  # AdamW state exists before the peak is taken
        step()
    rows.append(speed.timing_row(name, "training step", speed.alternate(steps, setup.rounds, setup)))
    peaks = {n: setup.peak_memory(step) for n, step in steps.items()}
    rows.append(
        speed.Row(
            name,
            "training peak memory",
            "MiB",
            peaks,
            {n: peaks[speed.OURS] / v for n, v in peaks.items() if n != speed.OURS},
        )
    )
    infer = {n: speed.make_infer_step(m, case.batch) for n, m in models.items()}
    rows.append(speed.timing_row(name, "inference forward", speed.alternate(infer, setup.rounds, setup)))
    for row in rows:
        speed.report(row)
    return rows


# ---------------------------------------------------------------------- 2. merging
def relative_update(model: nn.Module) -> float:
    """|ΔW| / |W| over every adapted layer (Frobenius norms of all layers together)."""
    d2 = w2 = 0.0
    for layer in model.vblora_layers():
        delta = layer.delta_weight("default")
        weight = layer.kind.dense_weight(layer.base_layer)
        d2, w2 = d2 + float(delta.double().pow(2).sum()), w2 + float(weight.double().pow(2).sum())
    return (d2 / w2) ** 0.5


def scaled_adapter(base: nn.Module, case: speed.Case, size: float) -> nn.Module:
    """Our adapter on ``base`` with its bank scaled so that |ΔW|/|W| = ``size`` (ΔW is quadratic in it)."""
    qcase = copy.copy(case)
    qcase.base = base
    model = speed.ours_model(qcase).train()  # training-mode forward: see the module docstring
    bank = model.vblora_banks["default"].bank
    with torch.no_grad():
        bank.mul_((size / relative_update(model)) ** 0.5)
        model.vblora_banks["default"].clear_cache()
    return model


def logits_of(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    with torch.no_grad():
        return model(input_ids=batch["input_ids"]).logits


def merge_rows(case: speed.Case, sizes: tuple[float, ...]) -> list[dict[str, object]]:
    batch = {"input_ids": case.batch["input_ids"][:2]}
    rows = []
    for quant in ("nf4", "int8"):
        base = quantize(copy.deepcopy(case.base), quant, case.targets)
        for size in sizes:
            model = scaled_adapter(copy.deepcopy(base), case, size)
            unmerged = logits_of(model, batch)
            layers = list(model.vblora_layers())
            before = [
                (layer.base_layer.weight.data.clone(), layer.kind.dense_weight(layer.base_layer))
                for layer in layers
            ]
            deltas = [layer.delta_weight("default") for layer in layers]
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                model.merge_adapter(requantize=True)
            message = next(str(w.message) for w in caught if "survived" in str(w.message))
            kept = share_kept([layer.kind.dense_weight(layer.base_layer) for layer in layers], before, deltas)
            error = rel_error(logits_of(model, batch), unmerged)
            model.unmerge_adapter()
            restored = all(
                torch.equal(layer.base_layer.weight.data, b[0]) for layer, b in zip(layers, before)
            )
            restored_out = torch.equal(logits_of(model, batch), unmerged)
            stated = message.split("only ")[1].split("%")[0]
            rows.append(
                dict(
                    base=quant,
                    size=size,
                    merge="requantize",
                    kept=kept,
                    stated=stated,
                    error=error,
                    restored=restored and restored_out,
                )
            )
            merged = model.merge_and_unload(dequantize=True)
            weights = [merged.get_submodule(layer.path).weight for layer in layers]
            kept = share_kept(weights, before, deltas)
            rows.append(
                dict(
                    base=quant,
                    size=size,
                    merge="dequantize",
                    kept=kept,
                    stated="-",
                    error=rel_error(logits_of(merged, batch), unmerged),
                    restored=None,
                )
            )
            print(
                f"   merge {quant} |ΔW|/|W| {size:.3f}: requantize kept {rows[-2]['kept']:.3f} "
                f"(error {rows[-2]['error']:.1e}), dequantize kept {kept:.4f} "
                f"(error {rows[-1]['error']:.1e})",
                flush=True,
            )
    return rows


def share_kept(after: list[Tensor], before: list[tuple[Tensor, Tensor]], deltas: list[Tensor]) -> float:
    """<W_merged - dequant(W), ΔW> / |ΔW|², over every layer: the share of ΔW the merged weights hold."""
    dot = norm = 0.0
    for w, (_, w0), d in zip(after, before, deltas):
        change, d = (w.detach().double() - w0.double()), d.double()
        dot, norm = dot + float((change * d).sum()), norm + float((d * d).sum())
    return dot / norm


def rel_error(a: Tensor, ref: Tensor) -> float:
    return float((a - ref).abs().max() / ref.abs().max())


# ---------------------------------------------------------------------- 3. the causal-LM demo
def demo_runs(threads: int) -> dict[str, dict[str, float]]:
    """``vblora train --task causal-lm`` (the demo's defaults) with an fp32 and an nf4 base."""
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for quant in ("none", "nf4"):
            out = Path(tmp) / quant
            cmd = [sys.executable, "-m", "vblora", "train", "--task", "causal-lm", "--quantize", quant]
            cmd += ["--output", str(out), "--quiet"]
            print(f"\n== demo: {' '.join(cmd[2:])}", flush=True)
            env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
            subprocess.run(cmd, check=True, cwd=ROOT, env=env, stdout=subprocess.DEVNULL)
            m = json.loads((out / "metrics.json").read_text())
            results["fp32" if quant == "none" else quant] = {
                "before": m["before"],
                "after": m["after"],
                "perplexity": m["perplexity_after"],
                "steps": m["steps"],
                "train_seconds": m["train_seconds"],
            }
            print(f"   {results}", flush=True)
    return results


# ---------------------------------------------------------------------- report
def print_tables(
    rows: list[speed.Row], merges: list[dict[str, object]], demo: dict[str, dict[str, float]]
) -> None:
    contenders = [speed.OURS, speed.PEFT_VB, speed.PEFT_LORA]
    print("\n| case | metric | " + " | ".join(contenders) + " | ours / PEFT VB-LoRA | ours / PEFT LoRA |")
    print("|---|---|" + "---|" * (len(contenders) + 2))
    for row in rows:
        if row.metric == "targeted weights":
            continue
        cells = [f"{row.values[c]:.1f} {row.unit}" for c in contenders]
        ratios = [f"{row.ratios.get(c, float('nan')):.2f}" for c in (speed.PEFT_VB, speed.PEFT_LORA)]
        print(f"| {row.case} | {row.metric} | " + " | ".join(cells + ratios) + " |")
    print("\n| case | targeted weights (MiB) | × fp32 | rest of the base (MiB) |\n|---|---|---|---|")
    fp32 = {}
    for row in rows:
        if row.metric != "targeted weights":
            continue
        case = row.case.rsplit(", ", 1)[0]
        fp32.setdefault(case, row.values["base"])
        ratio = row.values["base"] / fp32[case]
        print(
            f"| {row.case} | {row.values['base']:.2f} | {ratio:.3f} | {row.values['rest of the base']:.2f} |"
        )
    if merges:
        print(
            "\n| base | \\|ΔW\\|/\\|W\\| | merge | share of ΔW kept | (warning says) | output error "
            "| unmerge restores bytes |"
        )
        print("|---|---|---|---|---|---|---|")
        for m in merges:
            restored = "-" if m["restored"] is None else ("yes" if m["restored"] else "NO")
            print(
                f"| {m['base']} | {100 * m['size']:.1f}% | {m['merge']} | {100 * m['kept']:.2f}% | "
                f"{m['stated']}% | {m['error']:.1e} | {restored} |"
            )
    if demo:
        print(
            "\n| demo base | held-out loss before | after | perplexity after | steps | train s |"
            "\n|---|---|---|---|---|---|"
        )
        for quant, d in demo.items():
            print(
                f"| {quant} | {d['before']:.4f} | {d['after']:.4f} | {d['perplexity']:.3f} | {d['steps']} | "
                f"{d['train_seconds']:.0f} |"
            )
    print_goals(rows, merges, demo)


def verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def print_goals(
    rows: list[speed.Row], merges: list[dict[str, object]], demo: dict[str, dict[str, float]]
) -> None:
    print("\nissue 16 goals:")
    for row in rows:
        if row.metric == "training step" and row.case.endswith("nf4"):
            vb, lora = row.ratios[speed.PEFT_VB], row.ratios[speed.PEFT_LORA]
            print(
                f"- {row.case}: train step {vb:.2f} x PEFT VB-LoRA (goal <= 0.9: {verdict(vb <= 0.9)}), "
                f"{lora:.2f} x PEFT LoRA (goal <= 1.0: {verdict(lora <= 1.0)})"
            )
    by_case: dict[str, float] = {}
    for row in rows:
        if row.metric == "targeted weights":
            case, quant = row.case.rsplit(", ", 1)
            by_case.setdefault(case, row.values["base"])
            if quant == "nf4":
                r = row.values["base"] / by_case[case]
                print(
                    f"- {row.case}: targeted base weights {r:.3f} x fp32 (goal <= 0.3: {verdict(r <= 0.3)})"
                )
    deq = [float(m["error"]) for m in merges if m["merge"] == "dequantize"]
    if deq:
        print(
            f"- dequantized merge: worst output error {max(deq):.1e} "
            f"(goal <= 1e-5: {verdict(max(deq) <= 1e-5)})"
        )
    if {"fp32", "nf4"} <= set(demo):
        r = demo["nf4"]["perplexity"] / demo["fp32"]["perplexity"]
        print(
            f"- demo on nf4: perplexity {r:.3f} x the fp32 run's "
            f"(goal within 5%: {verdict(abs(r - 1) <= 0.05)})"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="the Llama-shaped case only, small; no demo runs"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--parts", default="speed,merge,demo", help="comma-separated: speed, merge, demo (default: all)"
    )
    parser.add_argument("--no-smollm2", action="store_true", help="skip the SmolLM2 speed case")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    setup = speed.Setup(
        measure=speed.cpu_time if args.clock == "cpu" else speed.wall_time,
        quick=True,
        rounds=3 if args.quick else args.rounds,
        warmup=1,
        compile=False,
    )
    import bitsandbytes
    import peft
    import transformers

    print(
        f"torch {torch.__version__}, bitsandbytes {bitsandbytes.__version__}, transformers "
        f"{transformers.__version__}, peft {peft.__version__}; {platform.processor() or platform.machine()}, "
        f"{args.threads} threads, clock {args.clock}",
        flush=True,
    )
    started = time.perf_counter()
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # its per-call int8 casting notices
    warnings.filterwarnings("ignore", category=FutureWarning)
    parts = set(args.parts.split(","))
    cases = [llama_case(setup)]
    if not (args.quick or args.no_smollm2):
        cases.append(smollm2_case(setup))
    rows = []
    if "speed" in parts:
        rows = [row for case in cases for quant in QUANTS for row in bench_case(case, quant, setup)]
    merges = []
    if "merge" in parts:
        print("\n== merging (Llama-shaped case)", flush=True)
        merges = merge_rows(cases[0], (0.005, 0.1) if args.quick else (0.005, 0.02, 0.1))
    demo = {} if (args.quick or "demo" not in parts) else demo_runs(args.threads)
    print_tables(rows, merges, demo)
    print(f"\n({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
