"""Step time and samples/s of `vblora train` with 1 and N processes (torchrun's launcher, DDP or FSDP2).

Run from the repository root:

    python benchmarks/distributed.py                         # 1 and 2 CPU processes, 3 rounds
    python benchmarks/distributed.py --procs 1 1x1 2         # also 1 process on 1 thread
    python benchmarks/distributed.py --procs 1 2 --fsdp      # FSDP2 instead of DDP
    python benchmarks/distributed.py --device cuda --procs 1 2 4   # one GPU per process

Each measurement is one `vblora train` run (the packaged MiniLM-L6 on Rotten Tomatoes by default)
at the same global batch, so every process count computes the same steps; its ``metrics.json``
gives the training seconds (evaluation excluded) and the steps. The process counts alternate, the
first one rotating each round; a time is the median over rounds, and a ratio the median over rounds
of (1 process / N processes) within the same round, which cancels most of a shared machine's drift.
On CPU the cores are shared out: N processes get ``cores / N`` threads each (``NxT``: T threads
each), so the table shows what more processes buy on the same machine, not on more machines. The
last lines are a Markdown table for ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch


def contender(spec: str) -> tuple[int, int]:
    """``N`` (N processes, the cores shared out) or ``NxT`` (N processes of T threads each)."""
    procs, _, threads = spec.partition("x")
    n = int(procs)
    return n, int(threads) if threads else max(1, (os.cpu_count() or 1) // n)


def run_once(spec: str, args: argparse.Namespace, folder: Path) -> dict[str, float]:
    """One `vblora train` run of contender ``spec``; its step time and samples/s."""
    procs, threads = contender(spec)
    output = folder / f"p{spec}"
    cmd = [
        sys.executable, "-m", "vblora", "train", "--model", args.model, "--data", args.data,
        "--train-size", str(args.batch_size * args.steps), "--test-size", str(args.test_size),
        "--epochs", "1", "--batch-size", str(args.batch_size), "--eval-batch-size", "64",
        "--quiet", "--overwrite", "--output", str(output), "--device", args.device,
    ]  # fmt: skip
    if procs > 1 or args.launcher_for_one:
        cmd += ["--nproc-per-node", str(procs)] + (["--fsdp"] if args.fsdp and procs > 1 else [])
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    m = json.loads((output / "metrics.json").read_text())
    seconds = m["train_seconds"]
    return {"step_ms": 1e3 * seconds / m["steps"], "samples_s": m["steps"] * args.batch_size / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--procs", nargs="+", default=["1", "2"], help="N or NxT (T threads each)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20, help="training steps per run")
    parser.add_argument("--batch-size", type=int, default=32, help="the global batch")
    parser.add_argument("--test-size", type=int, default=64)
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--data", default="rotten-tomatoes")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--fsdp", action="store_true", help="FSDP2 for N > 1 (default: DDP)")
    parser.add_argument("--launcher-for-one", action="store_true", help="run 1 process under torchrun too")
    parser.add_argument("--timeout", type=int, default=900)
    args = parser.parse_args()
    results: dict[str, list[dict[str, float]]] = {p: [] for p in args.procs}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            order = args.procs[r % len(args.procs) :] + args.procs[: r % len(args.procs)]
            for procs in order:
                results[procs].append(run_once(procs, args, Path(tmp)))
                print(f"round {r + 1}, {procs} process(es): {results[procs][-1]}", flush=True)
    base = args.procs[0]
    mode = "fsdp2" if args.fsdp else "ddp"
    cores = os.cpu_count()
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"\n{args.model} / {args.data}, global batch {args.batch_size}, {args.steps} steps, {args.device}")
    print(f"{cores} cores (load average at the end {load}), torch {torch.__version__}, ", end="")
    print(f"python {platform.python_version()}, {args.rounds} rounds")
    print(f"\n| processes | parallel | threads each | step (ms) | samples/s | speed-up vs {base} |")
    print("|---|---|---|---|---|---|")
    for spec, rows in results.items():
        procs, threads = contender(spec)
        step = statistics.median(row["step_ms"] for row in rows)
        rate = statistics.median(row["samples_s"] for row in rows)
        ratio = statistics.median(b["step_ms"] / row["step_ms"] for b, row in zip(results[base], rows))
        shown = threads if args.device == "cpu" else "-"
        print(f"| {procs} | {mode if procs > 1 else '-'} | {shown} | {step:.0f} | {rate:.1f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
