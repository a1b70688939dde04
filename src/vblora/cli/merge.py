"""``vblora merge``: the base model with the adapter merged in, saved as a plain transformers model."""

from __future__ import annotations

import argparse

from ..training import runs as R
from ..training.loop import RunError
from .options import (
    add_adapter_argument,
    add_from_compact_argument,
    add_output_arguments,
    add_quantize_options,
    run_overrides,
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "merge",
        help="write the base model with the adapter merged in (transformers format)",
        description="Merge the adapter into the base weights and save the plain transformers model and "
        "its tokenizer with save_pretrained, loadable without vblora.",
    )
    add_adapter_argument(p)
    add_output_arguments(p)
    add_from_compact_argument(p, "merge")
    add_quantize_options(p, default="the run's")
    p.add_argument(
        "--dequantize",
        action="store_true",
        help="a quantized base (--quantize): write a full-precision model whose weights are "
        "dequant(W) + ΔW, the weights the adapter was trained against",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    saved = R.open_run(args.run, run_overrides(args))
    quantize = saved.settings.quantize
    if quantize and not args.dequantize:
        raise RunError(
            f"the run's base is quantized ({quantize}); pass --dequantize to write a full-precision model "
            "with dequant(W) + ΔW (the weights the adapter was trained against), or --quantize none to "
            "merge into the original full-precision base"
        )
    R.check_output(args.output, args.overwrite, keep=(args.run,))
    model, tokenizer = R.load_saved_model(saved, compact=args.from_compact)
    merged = model.merge_and_unload(safe_merge=True, dequantize=args.dequantize)
    with R.staged_output(args.output, args.overwrite) as tmp:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    print(f"wrote the merged model to {args.output}/ (load it with transformers' from_pretrained)")
