"""``vblora train``: fine-tune a base model on a data set and write a run folder atomically."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import pathlib
import time
from collections.abc import Iterator
from typing import Any

import torch

from ..files import save_compact
from ..formats.compact import COMPACT_BANK_DTYPES
from ..injection.targeting import find_modules_to_save
from ..layers.bnb import prepare_model_for_kbit_training
from ..training import launch as L
from ..training import loop as T
from ..training import runs as R
from ..training.loop import CAUSAL_LM, SEQ_CLS, RunError, RunSettings
from ..training.runs import ADAPTER_DIR, COMPACT_NAME, METRICS_NAME
from .options import (
    _modules_to_save,
    _targets,
    add,
    add_data_options,
    add_quantize_options,
    default_of,
    settings_from_args,
    show,
)


def add_parser(sub: argparse._SubParsersAction) -> None:
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
        f"'minilm' / 'smollm2' (default: {default_of('model')})",
    )
    p.add_argument(
        "--output",
        type=pathlib.Path,
        default=None,
        help="output folder, written atomically (default: runs/<data name>)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    g = add_data_options(p)
    add(g, "--train-size", "training examples used (a budget cap)", type=int)
    g = p.add_argument_group("VB-LoRA")
    add(g, "--r", "rank of every A (r x in) and B (out x r)", type=int)
    add(g, "--num-vectors", "vectors in the shared bank (h)", type=int)
    add(
        g, "--vector-length", "length of each bank vector (b); must divide every targeted dimension", type=int
    )
    add(g, "--topk", "bank vectors mixed per sub-vector (k)", type=int)
    add(g, "--dropout", "dropout on the adapter branch's input", type=float)
    add(
        g,
        "--target-modules",
        "modules to adapt: comma-separated names or suffixes, 'all-linear', or re:<regex>",
        type=_targets,
    )
    add(
        g,
        "--exclude-modules",
        "modules left out of --target-modules: comma-separated names or suffixes, or re:<regex>",
        type=_targets,
    )
    add(
        g,
        "--modules-to-save",
        "modules trained in full and saved, comma-separated, or 'none'",
        type=_modules_to_save,
    )
    add(g, "--init-logits-std", "logits start from N(0, std)", type=float)
    add(g, "--init-bank-bound", "the bank starts from U(-bound, bound)", type=float)
    add(
        g,
        "--save-full-logits",
        "save the full logits (resumable) instead of top-k (inference only)",
        action="store_true",
    )
    add(
        g,
        "--compact",
        f"also write {COMPACT_NAME}, one compact file for serving (bit-packed indices, fp16 weights, "
        "the bank in this precision; int8 is about a third of the top-k adapter's VB-LoRA bytes)",
        "none",
        choices=list(COMPACT_BANK_DTYPES),
    )
    g = p.add_argument_group("optimisation (AdamW, linear warm-up then linear decay)")
    add(g, "--epochs", "passes over the training set", type=int)
    add(g, "--max-steps", "stop after this many optimizer steps", type=int)
    add(g, "--batch-size", "training batch size", type=int)
    add(g, "--eval-batch-size", "evaluation batch size", type=int)
    add(g, "--logits-lr", "learning rate of the logits", type=float, metavar="LR")
    add(g, "--bank-lr", "learning rate of the vector bank", type=float, metavar="LR")
    add(g, "--head-lr", "learning rate of modules_to_save (the classifier head)", type=float, metavar="LR")
    add(g, "--weight-decay", "weight decay of the head (never of logits or bank)", type=float)
    add(g, "--warmup-ratio", "fraction of the steps spent warming up", type=float)
    add(g, "--max-grad-norm", "gradient clipping norm; 0 disables it", type=float)
    add(g, "--seed", "seed of initialisation, dropout and batch order", type=int)
    g = p.add_argument_group("causal LM")
    add(g, "--num-generations", "held-out prompts answered greedily before and after training", type=int)
    add(g, "--max-new-tokens", "tokens generated per prompt", type=int)
    add_quantize_options(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    g = p.add_argument_group("processes and devices (see the README's multi-process training)")
    g.add_argument(
        "--device",
        default=None,
        help="cpu, cuda (each process its cuda:LOCAL_RANK) or cuda:<index> (default: cpu)",
    )
    g.add_argument(
        "--nproc-per-node",
        type=int,
        default=None,
        metavar="N",
        help="start N processes with torchrun's launcher (data parallel, DDP; each trains on its share "
        "of every batch of --batch-size, so the run equals one process's); under torchrun it is ignored",
    )
    g.add_argument("--fsdp", action="store_true", help="shard the base model with FSDP2 instead of DDP")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """One process, or under torchrun one rank of the run; with --nproc-per-node, the launcher."""
    if args.nproc_per_node is not None and not L.under_torchrun():
        try:
            return L.launch_workers(args.nproc_per_node, args.argv)
        except L.LaunchError as err:
            raise RunError(str(err)) from None
    try:
        launch = L.read_launch(args.device, args.fsdp)
    except L.LaunchError as err:
        raise RunError(str(err)) from None
    try:
        with L.process_group(launch), _quiet_unless_main(launch):
            _train(args, launch)
    except L.PeerFailed:  # rank 0 says why
        return L.EXIT_BAD_INPUT
    except KeyboardInterrupt:  # Ctrl-C reaches every rank; rank 0 says so
        if launch.is_main:
            raise
        return 130
    except L.RankFailed as err:
        raise RunError(str(err)) from None
    except ValueError as err:  # RunError, DataError, FormatError: one line that names the rank
        if not launch.distributed:
            raise
        raise RunError(f"rank {launch.rank} of {launch.world_size}: {L.one_line(err)}") from None
    except RuntimeError as err:
        if not (launch.distributed and L.lost_peer(err)):
            raise
        message = f"stopped: another process failed or was stopped ({L.one_line(err)[:200]})"
        raise RunError(f"rank {launch.rank} of {launch.world_size}: {message}") from None
    return 0


@contextlib.contextmanager
def _quiet_unless_main(launch: L.Launch) -> Iterator[None]:
    """Only rank 0 prints (progress bars are left out on the other ranks by ``progress``)."""
    if launch.is_main:
        yield
        return
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
        yield


def _train(args: argparse.Namespace, launch: L.Launch) -> None:
    """The run on this rank; rank 0 alone writes the output folder, after every rank is done."""
    started = time.perf_counter()
    s = settings_from_args(args).resolved()
    progress = not args.quiet and launch.is_main
    with contextlib.ExitStack() as stack:
        with L.together(launch):  # local work: a failure on any rank stops every rank here
            s.check()
            L.check_options(launch, quantize=s.quantize)
            if launch.distributed and launch.is_main:
                T.resolve_model_path(s.model or "")  # a packaged model is converted once, by rank 0
        with L.together(launch):
            assert s.data is not None
            output = args.output or pathlib.Path("runs") / pathlib.Path(s.data).stem
            if launch.is_main:
                R.check_output(output, args.overwrite)
            s, model, tokenizer, task_data = _prepare_training(s)
            model.to(launch.device)
            generations = _generate_before(model, tokenizer, task_data, s) if launch.is_main else None
            tmp = stack.enter_context(R.staged_output(output, args.overwrite)) if launch.is_main else None
        module = L.parallel(model, launch)  # DDP, or FSDP2 shards: collectives from here on
        metric = T.metric_name(s.task)
        optimizer = T.make_optimizer(model, s)
        evaluate = T.evaluator(model, task_data.test, s, progress, launch)
        history = T.train_steps(module, optimizer, task_data.train, s, evaluate, metric, progress, launch)
        after = _generate_after(model, tokenizer, task_data, s) if launch.is_main or launch.fsdp else []
        if launch.fsdp:
            L.gather_model(model)  # whole tensors on every rank: rank 0 saves alone
        with L.together(launch):  # then the barrier before rank 0 renames the folder into place
            if tmp is not None:
                model.save_pretrained(tmp / ADAPTER_DIR, save_only_topk_weights=not s.save_full_logits)
                if s.compact:
                    save_compact(model, tmp / COMPACT_NAME, bank_dtype=COMPACT_BANK_DTYPES[s.compact])
                if generations is not None:
                    _write_generations(generations, after, tmp)
                elapsed = time.perf_counter() - started
                metrics = R.train_metrics(s, history, model, tmp / ADAPTER_DIR, elapsed, launch)
                R.write_json(tmp / METRICS_NAME, metrics)
                T.plot_history(history, metric, "before training", tmp / "training.png")
    if launch.is_main:
        R.print_summary(metrics, output)


def _prepare_training(s: RunSettings) -> tuple[RunSettings, Any, Any, T.TaskData]:
    """Check and load everything a run needs, in the order that fails fastest on bad inputs."""

    assert s.model is not None
    R.quiet_transformers()
    T.resolve_model_path(s.model)  # a missing model folder fails before anything is read
    examples, label_names = T.load_examples(s)  # bad data fails before the model is loaded
    data = s.data if T.is_builtin(s.data) else str(pathlib.Path(s.data).expanduser().resolve())
    s = dataclasses.replace(s, model=R.portable(s.model), data=data, labels=label_names or None)
    torch.manual_seed(s.seed)  # the classifier head's initialisation
    base, tokenizer, new_modules = T.load_base_model_and_new_modules(
        s.task, s.model, label_names=label_names, quantization=s
    )
    if s.quantize:  # freeze, norms and heads in fp32 (checkpointing stays off, as without --quantize)
        prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
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
            f"for another label count), and --modules-to-save {show(s.modules_to_save, 'modules_to_save')} "
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


def _generate_after(model: Any, tokenizer: Any, task_data: T.TaskData, s: RunSettings) -> list[str]:
    """Greedy answers of the trained model to the prompts of :func:`_generate_before`."""
    if s.task != CAUSAL_LM or s.num_generations == 0:
        return []
    prompts = task_data.prompts[: s.num_generations]
    return T.generate(model, tokenizer, prompts, s.data != "hamlet", s.max_new_tokens)


def _write_generations(rows: list[dict[str, str]], after: list[str], out: pathlib.Path) -> None:
    for row, text in zip(rows, after):
        row["after"] = text
        print(f"\nprompt: {row['prompt']}\n  before: {row['before']}\n  after:  {text}")
    R.write_json(out / "generations.json", rows)
