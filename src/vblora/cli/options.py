"""Options shared by the ``vblora`` commands, and how they become a run's settings."""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
from typing import Any

from ..training import loop as T
from ..training.loop import RunSettings
from ..training.runs import COMPACT_NAME


def _csv_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _targets(text: str) -> str | list[str]:
    """``all-linear``, ``re:<regex>`` (matched against full module paths) or a comma-separated list."""
    if text == "all-linear":
        return text
    if text.startswith("re:"):
        return text[3:]
    return _csv_list(text)


def _modules_to_save(text: str) -> list[str]:
    return [] if text.lower() == "none" else _csv_list(text)


def _test_size(text: str) -> int | float:
    """A count (``1000``) or a fraction (``0.2``)."""
    try:
        return int(text)
    except ValueError:
        return float(text)


def default_of(name: str) -> str:
    """The default of a RunSettings field for --help, per task when the task decides it."""
    per_task = {t: d[name] for t, d in T.TASK_DEFAULTS.items() if name in d}
    if per_task:
        shown = {t: show(v, name) for t, v in per_task.items()}
        if len(set(shown.values())) == 1:  # the same for every task
            return next(iter(shown.values()))
        return ", ".join(f"{t}: {v}" for t, v in shown.items())
    per_data = {k: d[name] for k, d in T.DATA_DEFAULTS.items() if name in d}
    if per_data:
        return ", ".join(f"{k}: {'all' if v is None else v}" for k, v in per_data.items())
    return show(next(f.default for f in dataclasses.fields(RunSettings) if f.name == name), name)


NONE_MEANS = {"max_steps": "no limit", "labels": "the distinct labels, sorted", "modules_to_save": "none"}


def show(value: Any, name: str = "") -> str:
    if value is None or value == []:
        return NONE_MEANS.get(name, "none")
    return ",".join(value) if isinstance(value, list) else str(value)


def add(
    group: argparse._ArgumentGroup, flag: str, help: str, default: str | None = None, **kwargs: Any
) -> None:
    """An option whose absence leaves the RunSettings default (argparse.SUPPRESS keeps it unset).

    ``default`` describes that default in --help; by default it is read from RunSettings.
    """
    name = flag.lstrip("-").replace("-", "_")
    if kwargs.get("action") != "store_true":
        help = f"{help} (default: {default or default_of(name)})"
    group.add_argument(flag, default=argparse.SUPPRESS, help=help, **kwargs)


def add_data_options(parser: argparse.ArgumentParser, default: str | None = None) -> argparse._ArgumentGroup:
    """The data options of train (defaults from RunSettings) and eval (``default``: the run's)."""
    g = parser.add_argument_group("data")
    data_help = "'rotten-tomatoes', 'chatterbot', 'hamlet', or a .csv/.tsv/.jsonl file"
    add(g, "--data", data_help, default, metavar="NAME|FILE")
    add(g, "--text-column", "file column with the text (causal-lm: the prompt)", default, metavar="NAME")
    label_help = "file column with the label (causal-lm: the answer the loss is taken on)"
    add(g, "--label-column", label_help, default, metavar="NAME")
    labels_help = "label names in class order, comma-separated; others are an error"
    add(g, "--labels", labels_help, default, type=_csv_list)
    size_help = "held-out examples: a count or a fraction of the data"
    add(g, "--test-size", size_help, default, type=_test_size, metavar="N")
    seed_help = "seed of the train/test shuffle (fixed, so runs share a test set)"
    add(g, "--split-seed", seed_help, default, type=int)
    add(
        g, "--max-length", "tokens per example; longer ones are cut (hamlet: block length)", default, type=int
    )
    return g


def _quantize(text: str) -> str | None:
    return None if text.lower() == "none" else text


def add_quantize_options(parser: argparse.ArgumentParser, default: str | None = None) -> None:
    """A bitsandbytes-quantized base (train; eval/merge/export-lora override the run's, ``default``)."""
    g = parser.add_argument_group("quantized base (bitsandbytes; pip install 'vblora[quant]')")
    choices = [*T.QUANTIZE, None]
    add(
        g,
        "--quantize",
        "quantize the base model's linear layers: nf4, fp4, int8 or none",
        default,
        type=_quantize,
        choices=choices,
        metavar="|".join([*T.QUANTIZE, "none"]),
    )
    add(
        g,
        "--double-quant",
        "4-bit: quantize the block scales too (QLoRA's double quantization)",
        action="store_true",
    )
    add(
        g,
        "--compute-dtype",
        "4-bit: dtype of the dequantized matmul",
        default,
        choices=list(T.COMPUTE_DTYPES),
    )


def add_adapter_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", type=pathlib.Path, help="a folder written by `vblora train`, or an adapter folder")
    p.add_argument(
        "--model",
        default=argparse.SUPPRESS,
        metavar="PATH|NAME",
        help="the base model (default: the one recorded in the run, else base_model_name_or_path)",
    )


def add_output_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", type=pathlib.Path, required=True, help="output folder, written atomically")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")


def add_from_compact_argument(p: argparse.ArgumentParser, verb: str) -> None:
    p.add_argument(
        "--from-compact",
        action="store_true",
        help=f"{verb} the run's {COMPACT_NAME} (from `vblora train --compact`) instead of adapter/",
    )


def settings_from_args(args: argparse.Namespace) -> RunSettings:
    names = {f.name for f in dataclasses.fields(RunSettings)}
    return RunSettings(**{k: v for k, v in vars(args).items() if k in names})


def run_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The data and model options given to eval/merge/export-lora (eval's --batch-size is not a run's)."""
    names = {f.name for f in dataclasses.fields(RunSettings)} - {"batch_size"}
    return {k: v for k, v in vars(args).items() if k in names}
