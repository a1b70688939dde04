"""The ``vblora`` command: ``train``, ``eval``, ``merge``, ``export-lora`` and ``inspect``.

``vblora train`` with no arguments fine-tunes the packaged MiniLM-L6 on the packaged Rotten Tomatoes
snippets, offline, in a few minutes on two CPU cores. Every command that writes a folder writes it
under a temporary name and renames it into place at the end, so a failed or interrupted run leaves
no half-written output. Bad inputs end with a one-line message and exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

from . import data as D
from . import runs as R
from . import train as T
from .checkpoint import COMPACT_BANK_DTYPES, save_compact
from .runs import ADAPTER_DIR, COMPACT_NAME, METRICS_NAME
from .train import CAUSAL_LM, SEQ_CLS, RunError, RunSettings

EXIT_BAD_INPUT = 2


# =========================================================================== argument parsing


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


def _default(name: str) -> str:
    """The default of a RunSettings field for --help, per task when the task decides it."""
    per_task = {t: d[name] for t, d in T.TASK_DEFAULTS.items() if name in d}
    if per_task:
        shown = {t: _show(v, name) for t, v in per_task.items()}
        if len(set(shown.values())) == 1:  # the same for every task
            return next(iter(shown.values()))
        return ", ".join(f"{t}: {v}" for t, v in shown.items())
    per_data = {k: d[name] for k, d in T.DATA_DEFAULTS.items() if name in d}
    if per_data:
        return ", ".join(f"{k}: {'all' if v is None else v}" for k, v in per_data.items())
    return _show(next(f.default for f in dataclasses.fields(RunSettings) if f.name == name), name)


_NONE_MEANS = {"max_steps": "no limit", "labels": "the distinct labels, sorted", "modules_to_save": "none"}


def _show(value: Any, name: str = "") -> str:
    if value is None or value == []:
        return _NONE_MEANS.get(name, "none")
    return ",".join(value) if isinstance(value, list) else str(value)


def _add(
    group: argparse._ArgumentGroup, flag: str, help: str, default: str | None = None, **kwargs: Any
) -> None:
    """An option whose absence leaves the RunSettings default (argparse.SUPPRESS keeps it unset).

    ``default`` describes that default in --help; by default it is read from RunSettings.
    """
    name = flag.lstrip("-").replace("-", "_")
    if kwargs.get("action") != "store_true":
        help = f"{help} (default: {default or _default(name)})"
    group.add_argument(flag, default=argparse.SUPPRESS, help=help, **kwargs)


def _add_data_options(parser: argparse.ArgumentParser, default: str | None = None) -> argparse._ArgumentGroup:
    """The data options of train (defaults from RunSettings) and eval (``default``: the run's)."""
    g = parser.add_argument_group("data")
    data_help = "'rotten-tomatoes', 'chatterbot', 'hamlet', or a .csv/.tsv/.jsonl file"
    _add(g, "--data", data_help, default, metavar="NAME|FILE")
    _add(g, "--text-column", "file column with the text (causal-lm: the prompt)", default, metavar="NAME")
    label_help = "file column with the label (causal-lm: the answer the loss is taken on)"
    _add(g, "--label-column", label_help, default, metavar="NAME")
    labels_help = "label names in class order, comma-separated; others are an error"
    _add(g, "--labels", labels_help, default, type=_csv_list)
    size_help = "held-out examples: a count or a fraction of the data"
    _add(g, "--test-size", size_help, default, type=_test_size, metavar="N")
    seed_help = "seed of the train/test shuffle (fixed, so runs share a test set)"
    _add(g, "--split-seed", seed_help, default, type=int)
    _add(
        g, "--max-length", "tokens per example; longer ones are cut (hamlet: block length)", default, type=int
    )
    return g


def _add_train_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="fine-tune a model with VB-LoRA",
        description="Fine-tune a transformers model with VB-LoRA and write the adapter (top-k), metrics.json "
        "and training.png to --output. Without arguments: the packaged MiniLM-L6 on Rotten Tomatoes "
        "(binary sentiment), 2 to 5 minutes on 2 CPU cores.",
    )
    p.add_argument(
        "--task",
        choices=T.TASKS,
        default=SEQ_CLS,
        help="sequence classification or causal LM (default: seq-cls)",
    )
    p.add_argument(
        "--model",
        default=argparse.SUPPRESS,
        metavar="PATH|NAME",
        help="a local transformers folder, a hub-style name (from the local cache), or the packaged "
        f"'minilm' / 'smollm2' (default: {_default('model')})",
    )
    p.add_argument(
        "--output",
        type=pathlib.Path,
        default=None,
        help="output folder, written atomically (default: runs/<data name>)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    g = _add_data_options(p)
    _add(g, "--train-size", "training examples used (a budget cap)", type=int)
    g = p.add_argument_group("VB-LoRA")
    _add(g, "--r", "rank of every A (r x in) and B (out x r)", type=int)
    _add(g, "--num-vectors", "vectors in the shared bank (h)", type=int)
    _add(
        g, "--vector-length", "length of each bank vector (b); must divide every targeted dimension", type=int
    )
    _add(g, "--topk", "bank vectors mixed per sub-vector (k)", type=int)
    _add(g, "--dropout", "dropout on the adapter branch's input", type=float)
    _add(
        g,
        "--target-modules",
        "modules to adapt: comma-separated names or suffixes, 'all-linear', or re:<regex>",
        type=_targets,
    )
    _add(
        g,
        "--exclude-modules",
        "modules left out of --target-modules: comma-separated names or suffixes, or re:<regex>",
        type=_targets,
    )
    _add(
        g,
        "--modules-to-save",
        "modules trained in full and saved, comma-separated, or 'none'",
        type=_modules_to_save,
    )
    _add(g, "--init-logits-std", "logits start from N(0, std)", type=float)
    _add(g, "--init-bank-bound", "the bank starts from U(-bound, bound)", type=float)
    _add(
        g,
        "--save-full-logits",
        "save the full logits (resumable) instead of top-k (inference only)",
        action="store_true",
    )
    _add(
        g,
        "--compact",
        f"also write {COMPACT_NAME}, one compact file for serving (bit-packed indices, fp16 weights, "
        "the bank in this precision; int8 is about a third of the top-k adapter's VB-LoRA bytes)",
        "none",
        choices=list(COMPACT_BANK_DTYPES),
    )
    g = p.add_argument_group("optimisation (AdamW, linear warm-up then linear decay)")
    _add(g, "--epochs", "passes over the training set", type=int)
    _add(g, "--max-steps", "stop after this many optimizer steps", type=int)
    _add(g, "--batch-size", "training batch size", type=int)
    _add(g, "--eval-batch-size", "evaluation batch size", type=int)
    _add(g, "--logits-lr", "learning rate of the logits", type=float, metavar="LR")
    _add(g, "--bank-lr", "learning rate of the vector bank", type=float, metavar="LR")
    _add(g, "--head-lr", "learning rate of modules_to_save (the classifier head)", type=float, metavar="LR")
    _add(g, "--weight-decay", "weight decay of the head (never of logits or bank)", type=float)
    _add(g, "--warmup-ratio", "fraction of the steps spent warming up", type=float)
    _add(g, "--max-grad-norm", "gradient clipping norm; 0 disables it", type=float)
    _add(g, "--seed", "seed of initialisation, dropout and batch order", type=int)
    g = p.add_argument_group("causal LM")
    _add(g, "--num-generations", "held-out prompts answered greedily before and after training", type=int)
    _add(g, "--max-new-tokens", "tokens generated per prompt", type=int)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_train)


def _add_adapter_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", type=pathlib.Path, help="a folder written by `vblora train`, or an adapter folder")
    p.add_argument(
        "--model",
        default=argparse.SUPPRESS,
        metavar="PATH|NAME",
        help="the base model (default: the one recorded in the run, else base_model_name_or_path)",
    )


def _add_output_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", type=pathlib.Path, required=True, help="output folder, written atomically")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")


def _add_from_compact_argument(p: argparse.ArgumentParser, verb: str) -> None:
    p.add_argument(
        "--from-compact",
        action="store_true",
        help=f"{verb} the run's {COMPACT_NAME} (from `vblora train --compact`) instead of adapter/",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vblora",
        description="VB-LoRA fine-tuning for Hugging Face models, offline. `vblora train` runs the demo.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_train_parser(sub)

    p = sub.add_parser(
        "eval",
        help="reload a saved adapter and recompute its held-out metric",
        description="Rebuild the run's held-out split, load the base model plus the saved adapter, and "
        "print the metric next to the one recorded after training. Data options override the run's.",
    )
    _add_adapter_argument(p)
    _add_data_options(p, default="the run's")
    p.add_argument("--batch-size", type=int, help="evaluation batch size (default: the run's)")
    _add_from_compact_argument(p, "evaluate")
    p.add_argument("--json", action="store_true", help="print the result as one JSON line")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "merge",
        help="write the base model with the adapter merged in (transformers format)",
        description="Merge the adapter into the base weights and save the plain transformers model and "
        "its tokenizer with save_pretrained, loadable without vblora.",
    )
    _add_adapter_argument(p)
    _add_output_arguments(p)
    _add_from_compact_argument(p, "merge")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser(
        "export-lora",
        help="write the adapter as an exact LoRA adapter in PEFT's format",
        description="Export the adapter as rank-r LoRA factors (lora_alpha = r), loadable by peft, vLLM or "
        "LoRAX; exact, no SVD.",
    )
    _add_adapter_argument(p)
    _add_output_arguments(p)
    _add_from_compact_argument(p, "export")
    p.set_defaults(func=cmd_export_lora)

    p = sub.add_parser(
        "inspect",
        help="describe an adapter: config, sub-vectors, parameters, bytes, bank usage",
        description="Print an adapter's config, per-module sub-vector counts, trainable vs stored parameters "
        "and bytes, and how often each bank vector is selected. Reads the files only.",
    )
    p.add_argument(
        "run",
        type=pathlib.Path,
        help="a folder written by `vblora train`, an adapter folder, or a compact .vblora file",
    )
    p.add_argument(
        "--plot", type=pathlib.Path, metavar="PNG", help="also write the selection histogram as a PNG"
    )
    p.add_argument(
        "--modules", action="store_true", help="list every module (default: the first 12 and totals)"
    )
    p.set_defaults(func=cmd_inspect)
    return parser


def settings_from_args(args: argparse.Namespace) -> RunSettings:
    names = {f.name for f in dataclasses.fields(RunSettings)}
    return RunSettings(**{k: v for k, v in vars(args).items() if k in names})


def run_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The data and model options given to eval/merge/export-lora (eval's --batch-size is not a run's)."""
    names = {f.name for f in dataclasses.fields(RunSettings)} - {"batch_size"}
    return {k: v for k, v in vars(args).items() if k in names}


# =========================================================================== train


def cmd_train(args: argparse.Namespace) -> None:
    s = settings_from_args(args).resolved()
    s.check()
    assert s.data is not None
    output = args.output or pathlib.Path("runs") / pathlib.Path(s.data).stem
    R.check_output(output, args.overwrite)
    progress = not args.quiet
    started = time.perf_counter()
    s, model, tokenizer, task_data = _prepare_training(s)
    with R.staged_output(output, args.overwrite) as tmp:
        generations = _generate_before(model, tokenizer, task_data, s)
        metric = T.metric_name(s.task)
        optimizer = T.make_optimizer(model, s)
        evaluate = T.evaluator(model, task_data.test, s, progress)
        history = T.train_steps(model, optimizer, task_data.train, s, evaluate, metric, progress)
        model.save_pretrained(tmp / ADAPTER_DIR, save_only_topk_weights=not s.save_full_logits)
        if s.compact:
            save_compact(model, tmp / COMPACT_NAME, bank_dtype=COMPACT_BANK_DTYPES[s.compact])
        if generations is not None:
            _generate_after(model, tokenizer, task_data, s, generations, tmp)
        metrics = R.train_metrics(s, history, model, tmp / ADAPTER_DIR, time.perf_counter() - started)
        R.write_json(tmp / METRICS_NAME, metrics)
        T.plot_history(history, metric, "before training", tmp / "training.png")
    R.print_summary(metrics, output)


def _prepare_training(s: RunSettings) -> tuple[RunSettings, Any, Any, T.TaskData]:
    """Check and load everything a run needs, in the order that fails fastest on bad inputs."""
    import torch

    assert s.model is not None
    R.quiet_transformers()
    T.resolve_model_path(s.model)  # a missing model folder fails before anything is read
    examples, label_names = T.load_examples(s)  # bad data fails before the model is loaded
    data = s.data if T.is_builtin(s.data) else str(pathlib.Path(s.data).expanduser().resolve())
    s = dataclasses.replace(s, model=R.portable(s.model), data=data, labels=label_names or None)
    torch.manual_seed(s.seed)  # the classifier head's initialisation
    base, tokenizer, new_modules = T.load_base_model_and_new_modules(s.task, s.model, label_names=label_names)
    _check_new_modules_are_saved(base, new_modules, s)
    task_data = T.prepare_data(s, tokenizer, examples, label_names)
    print(f"data: {s.data}: {len(task_data.train)} training and {len(task_data.test)} held-out examples")
    dropped = task_data.train.dropped + task_data.test.dropped
    if dropped:
        print(f"  ({dropped} left out: the prompt alone fills --max-length {s.max_length}; raise it)")
    torch.manual_seed(s.seed)  # the bank and logits
    model = T.wrap_model(base, s.adapter_config(T.resolve_model_path(s.model)))
    model.print_trainable_parameters()
    model.print_savable_parameters()
    return s, model, tokenizer, task_data


def _check_new_modules_are_saved(base: Any, new_modules: list[str], s: RunSettings) -> None:
    """A module the checkpoint lacks (a new classifier head) starts random: unless it is trained and
    saved (modules_to_save), the adapter would give other results each time it is loaded."""
    from .targeting import find_modules_to_save

    if not new_modules:
        return
    try:
        saved = find_modules_to_save(base, tuple(s.modules_to_save or ()))
    except ValueError as err:
        raise RunError(str(err)) from None
    unsaved = [m for m in new_modules if not any(m == p or m.startswith(p + ".") for p in saved)]
    if unsaved:
        raise RunError(
            f"{', '.join(unsaved)} of --model {s.model} start(s) random (not in its checkpoint, or sized "
            f"for another label count), and --modules-to-save {_show(s.modules_to_save, 'modules_to_save')} "
            "leaves it untrained and unsaved, so the adapter could not be evaluated again; add it to "
            "--modules-to-save (the default, classifier,score, covers the usual heads)"
        )


def _generate_before(
    model: Any, tokenizer: Any, task_data: T.TaskData, s: RunSettings
) -> list[dict[str, str]] | None:
    """Greedy answers of the base model (adapter disabled) to the first held-out prompts."""
    if s.task != CAUSAL_LM or s.num_generations == 0:
        return None
    prompts = task_data.prompts[: s.num_generations]
    with model.disable_adapter():
        before = T.generate(model, tokenizer, prompts, s.data != "hamlet", s.max_new_tokens)
    refs = task_data.references[: s.num_generations]
    return [{"prompt": p, "reference": r, "before": b} for p, r, b in zip(prompts, refs, before)]


def _generate_after(
    model: Any,
    tokenizer: Any,
    task_data: T.TaskData,
    s: RunSettings,
    rows: list[dict[str, str]],
    out: pathlib.Path,
) -> None:
    after = T.generate(model, tokenizer, [r["prompt"] for r in rows], s.data != "hamlet", s.max_new_tokens)
    for row, text in zip(rows, after):
        row["after"] = text
        print(f"\nprompt: {row['prompt']}\n  before: {row['before']}\n  after:  {text}")
    R.write_json(out / "generations.json", rows)


# =========================================================================== eval / merge / export


def cmd_eval(args: argparse.Namespace) -> None:
    run = R.open_run(args.run, run_overrides(args))
    s = run.settings
    if args.batch_size is not None:
        if args.batch_size < 1:
            raise RunError(f"--batch-size must be at least 1, got {args.batch_size}")
        s = dataclasses.replace(s, eval_batch_size=args.batch_size)
    s.check()
    if "data" not in vars(args) and not T.is_builtin(s.data) and not pathlib.Path(s.data).is_file():
        raise RunError(f"the run's data file {s.data} is gone; pass --data FILE to evaluate on another")
    examples, label_names = T.load_examples(s)  # a file is read with the run's label names
    model, tokenizer = R.load_saved_model(run, compact=args.from_compact, label_names=label_names)
    task_data = T.prepare_data(s, tokenizer, examples, label_names)
    value = T.evaluator(model, task_data.test, s, not args.quiet)()
    metric = T.metric_name(s.task)
    recorded = run.metrics.get("after") if run.metrics else None
    result = {"metric": metric, "value": value, "recorded": recorded, "examples": len(task_data.test)}
    if s.task == CAUSAL_LM:
        result["perplexity"] = R.perplexity(value)
    if args.json:
        print(json.dumps(result))
        return
    note = f" (recorded after training: {recorded:.4f})" if recorded is not None else ""
    print(f"{metric}: {value:.4f} on {len(task_data.test)} held-out examples{note}")


def cmd_merge(args: argparse.Namespace) -> None:
    run = R.open_run(args.run, run_overrides(args))
    R.check_output(args.output, args.overwrite, keep=(args.run,))
    model, tokenizer = R.load_saved_model(run, compact=args.from_compact)
    merged = model.merge_and_unload(safe_merge=True)
    with R.staged_output(args.output, args.overwrite) as tmp:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    print(f"wrote the merged model to {args.output}/ (load it with transformers' from_pretrained)")


def cmd_export_lora(args: argparse.Namespace) -> None:
    from .checkpoint import export_lora

    run = R.open_run(args.run, run_overrides(args))
    R.check_output(args.output, args.overwrite, keep=(args.run,))
    model, _ = R.load_saved_model(run, compact=args.from_compact)
    with R.staged_output(args.output, args.overwrite) as tmp:
        export_lora(model, tmp)
    print(f"wrote a LoRA adapter (r={model.peft_config['default'].r}, lora_alpha=r) to {args.output}/")


# =========================================================================== inspect


def cmd_inspect(args: argparse.Namespace) -> None:
    from .inspection import describe, plot_selection, read_adapter, read_compact

    path = args.run
    plot = _plot_path(args.plot) if args.plot else None  # a bad name fails before any output
    adapter = path / ADAPTER_DIR if (path / ADAPTER_DIR / "adapter_config.json").is_file() else path
    summary = read_compact(path) if path.is_file() else read_adapter(adapter)
    print(describe(summary, all_modules=args.modules))
    if plot:
        try:
            plot.parent.mkdir(parents=True, exist_ok=True)
            plot_selection(summary, plot)
        except OSError as err:
            raise RunError(f"--plot {args.plot}: cannot write it ({err.strerror})") from None
        print(f"wrote {plot}")


def _plot_path(path: pathlib.Path) -> pathlib.Path:
    """The PNG file --plot names (``.png`` added when the name has no extension)."""
    if path.is_dir():
        raise RunError(f"--plot {path} is a folder; pass a file name such as {path / 'selection.png'}")
    if not path.suffix:
        path = path.with_suffix(".png")
    if path.suffix.lower() != ".png":
        raise RunError(f"--plot {path}: the plot is a PNG; use a name ending in .png")
    anchor = R.existing_ancestor(path.resolve().parent)
    if not anchor.is_dir():
        raise RunError(f"--plot {path}: {anchor} is a file, not a folder")
    try:  # an unwritable place fails here, before the description is printed
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".vblora-plot-"):
            pass
    except OSError as err:
        raise RunError(f"--plot {path}: cannot write there ({err.strerror})") from None
    return path


# =========================================================================== entry point


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (2 for bad inputs)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (RunError, D.DataError) as err:
        message = " ".join(str(err).split())  # one line, whatever the source wrote
        print(f"vblora {args.command}: error: {message}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"vblora {args.command}: interrupted; nothing was written", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `vblora inspect ... | head`: the reader left, which is no error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
