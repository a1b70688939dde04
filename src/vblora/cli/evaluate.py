"""``vblora eval``: reload a saved adapter and recompute its held-out metric."""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib

from ..training import loop as T
from ..training import runs as R
from ..training.loop import CAUSAL_LM, RunError
from .options import (
    add_adapter_argument,
    add_data_options,
    add_from_compact_argument,
    add_quantize_options,
    run_overrides,
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="reload a saved adapter and recompute its held-out metric",
        description="Rebuild the run's held-out split, load the base model plus the saved adapter, and "
        "print the metric next to the one recorded after training. Data options override the run's.",
    )
    add_adapter_argument(p)
    add_data_options(p, default="the run's")
    p.add_argument("--batch-size", type=int, help="evaluation batch size (default: the run's)")
    add_from_compact_argument(p, "evaluate")
    add_quantize_options(p, default="the run's")
    p.add_argument("--json", action="store_true", help="print the result as one JSON line")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    saved = R.open_run(args.run, run_overrides(args))
    s = saved.settings
    if args.batch_size is not None:
        if args.batch_size < 1:
            raise RunError(f"--batch-size must be at least 1, got {args.batch_size}")
        s = dataclasses.replace(s, eval_batch_size=args.batch_size)
    s.check()
    if "data" not in vars(args) and not T.is_builtin(s.data) and not pathlib.Path(s.data).is_file():
        raise RunError(f"the run's data file {s.data} is gone; pass --data FILE to evaluate on another")
    examples, label_names = T.load_examples(s)  # a file is read with the run's label names
    model, tokenizer = R.load_saved_model(saved, compact=args.from_compact, label_names=label_names)
    task_data = T.prepare_data(s, tokenizer, examples, label_names)
    value = T.evaluator(model, task_data.test, s, not args.quiet)()
    metric = T.metric_name(s.task)
    recorded = saved.metrics.get("after") if saved.metrics else None
    result = {"metric": metric, "value": value, "recorded": recorded, "examples": len(task_data.test)}
    if s.task == CAUSAL_LM:
        result["perplexity"] = R.perplexity(value)
    if args.json:
        print(json.dumps(result))
        return
    note = f" (recorded after training: {recorded:.4f})" if recorded is not None else ""
    print(f"{metric}: {value:.4f} on {len(task_data.test)} held-out examples{note}")
