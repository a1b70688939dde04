"""``vblora export-lora``: the adapter as an exact LoRA adapter in PEFT's format."""

from __future__ import annotations

import argparse

from ..files import export_lora
from ..training import runs as R
from .options import (
    add_adapter_argument,
    add_from_compact_argument,
    add_output_arguments,
    add_quantize_options,
    run_overrides,
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export-lora",
        help="write the adapter as an exact LoRA adapter in PEFT's format",
        description="Export the adapter as rank-r LoRA factors (lora_alpha = r), loadable by peft, vLLM or "
        "LoRAX; exact, no SVD.",
    )
    add_adapter_argument(p)
    add_output_arguments(p)
    add_from_compact_argument(p, "export")
    add_quantize_options(p, default="the run's")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    saved = R.open_run(args.run, run_overrides(args))
    R.check_output(args.output, args.overwrite, keep=(args.run,))
    model, _ = R.load_saved_model(saved, compact=args.from_compact)
    with R.staged_output(args.output, args.overwrite) as tmp:
        export_lora(model, tmp)
    print(f"wrote a LoRA adapter (r={model.peft_config['default'].r}, lora_alpha=r) to {args.output}/")
