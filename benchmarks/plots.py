"""Plots for the docs, drawn from recorded results (benchmarks/RESULTS.md), not from new runs.

    python benchmarks/plots.py        # writes docs/img/accuracy_vs_bytes.png and serving_batch.png

The numbers below are the means of RESULTS.md § "Accuracy (MiniLM / Rotten Tomatoes)" (seeds 42–47
for the rank-1 LoRAs and VB-LoRA r=8 at equal bytes, 12 seeds for the r=8 LoRAs): held-out accuracy
against the bytes each adapter stores (the classifier head excluded).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

OUT = Path(__file__).resolve().parents[1] / "docs" / "img"

# (label, stored bytes, accuracy %, family)
ACCURACY = [
    ("VB-LoRA r=8, int8 compact file", 17_688, 80.08, "vblora"),
    ("VB-LoRA r=8, top-k directory", 48_608, 80.07, "vblora"),
    ("VB-LoRA r=4 (the demo), int8 compact", 13_068, 79.7, "vblora"),
    ("LoRA r=1 query/value", 36_864, 79.36, "lora"),
    ("LoRA r=1 all linear", 168_960, 79.63, "lora"),
    ("LoRA r=8 query/value", 294_912, 80.6, "lora"),
    ("LoRA r=8 all linear", 1_351_680, 81.2, "lora"),
]


# RESULTS.md § "Serving many adapters" (2026-12-07): a 32-row decode batch on SmolLM2-135M, one
# thread, 16 new tokens, load average 9-12: tokens/s by how many adapters the rows use.
SERVING_BATCH = [  # benchmarks/RESULTS.md, "Serving many adapters, after the load, memory, ..." (quiet)
    ("base model", 100),
    ("1 adapter", 93),
    ("32 adapters, per-adapter loop\n(0.31x of one adapter, earlier run)", 93 * 0.31),
    ("32 adapters, factors restacked\nevery step (0.78x, probe)", 93 * 0.78),
    ("32 adapters", 85),
]


def serving_batch(path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7.5, 3.8), dpi=110)
    labels = [label for label, _ in SERVING_BATCH]
    values = [value for _, value in SERVING_BATCH]
    bars = ax.barh(labels, values, color=["tab:gray", "tab:blue", "tab:red", "tab:orange", "tab:blue"])
    ax.bar_label(bars, fmt="%.1f", padding=3, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("tokens/s, one 32-row batch (CPU, 1 thread)")
    ax.set_title("SmolLM2-135M decoding: 32 rows")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def accuracy_vs_bytes(path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for family, colour, marker, name in (
        ("vblora", "tab:blue", "o", "VB-LoRA (vblora)"),
        ("lora", "tab:orange", "s", "LoRA (PEFT)"),
    ):
        rows = [r for r in ACCURACY if r[3] == family]
        ax.scatter(
            [r[1] for r in rows], [r[2] for r in rows], c=colour, marker=marker, s=50, label=name, zorder=3
        )
        for label, size, acc, _ in rows:
            dy = {"VB-LoRA r=8, int8 compact file": 5, "VB-LoRA r=8, top-k directory": -11}.get(label, -3)
            ax.annotate(label, (size, acc), textcoords="offset points", xytext=(6, dy), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("stored adapter bytes (log scale, head excluded)")
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_title("MiniLM-L6 on Rotten Tomatoes, 250 steps")
    ax.set_xlim(8e3, 5e6)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    OUT.mkdir(parents=True, exist_ok=True)
    accuracy_vs_bytes(OUT / "accuracy_vs_bytes.png")
    serving_batch(OUT / "serving_batch.png")
    print(f"wrote {OUT / 'accuracy_vs_bytes.png'} and {OUT / 'serving_batch.png'}")
