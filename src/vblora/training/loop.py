"""The fine-tuning behind ``vblora train`` and ``vblora eval``: settings, data, model, loop, metrics, plot.

Two tasks share one loop:

- ``seq-cls``: a sequence classifier (default: the packaged MiniLM-L6 on Rotten Tomatoes); the
  metric is held-out accuracy.
- ``causal-lm``: answer-only supervised fine-tuning of a causal LM (default: the packaged
  SmolLM2-135M-Instruct on chatterbot question/answer pairs) or language modelling on *Hamlet*; the
  metric is held-out loss (perplexity is its exponential).

Everything is seeded: the split by ``split_seed``, the head and adapter initialisation, dropout and
the batch order by ``seed``, so the same settings give the same metrics on the same machine.
"""

from __future__ import annotations

import math
import pathlib
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..model import VBLoRAModel
from ..optim import optimizer_param_groups
from . import data as D
from . import launch as L
from .launch import SINGLE, Launch

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


# The settings and the task data are this module's names too (``loop.RunSettings``, ``loop.prepare_data``):
# the command line and the benchmarks read the whole run through one module.
from .settings import BUILTIN_DATA as BUILTIN_DATA
from .settings import CAUSAL_LM as CAUSAL_LM
from .settings import COMPUTE_DTYPES as COMPUTE_DTYPES
from .settings import DATA_DEFAULTS as DATA_DEFAULTS
from .settings import MODEL_ALIASES as MODEL_ALIASES
from .settings import QUANTIZE as QUANTIZE
from .settings import SEQ_CLS as SEQ_CLS
from .settings import TASK_DEFAULTS as TASK_DEFAULTS
from .settings import TASKS as TASKS
from .settings import RunError as RunError
from .settings import RunSettings as RunSettings
from .tasks import TaskData as TaskData
from .tasks import _subset
from .tasks import by_length as by_length
from .tasks import is_builtin as is_builtin
from .tasks import load_base_model as load_base_model
from .tasks import load_base_model_and_new_modules as load_base_model_and_new_modules
from .tasks import load_examples as load_examples
from .tasks import load_qa_table as load_qa_table
from .tasks import prepare_data as prepare_data
from .tasks import quantization_kwargs as quantization_kwargs
from .tasks import resolve_model_path as resolve_model_path
from .tasks import wrap_model as wrap_model


def make_optimizer(model: VBLoRAModel, s: RunSettings) -> torch.optim.Optimizer:
    """AdamW over the logits, bank and head groups, each with its own learning rate."""
    assert s.logits_lr is not None and s.bank_lr is not None, "resolve the settings first"
    groups = optimizer_param_groups(
        model, logits_lr=s.logits_lr, bank_lr=s.bank_lr, other_lr=s.head_lr, weight_decay=s.weight_decay
    )
    return torch.optim.AdamW(groups)


def linear_schedule(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up from 0 to each group's lr over ``warmup_steps``, then linear decay to 0."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def plan_steps(n_train: int, s: RunSettings) -> tuple[int, int]:
    """(steps per epoch, total steps): ``max_steps`` caps the epochs' steps."""
    assert s.batch_size is not None
    per_epoch = math.ceil(n_train / s.batch_size)
    total = per_epoch * s.epochs
    return per_epoch, min(total, s.max_steps) if s.max_steps else total


# --------------------------------------------------------------------------- loop


@dataclass
class History:
    """What the loop saw: one loss per step, one metric per evaluation (step 0 = before training)."""

    losses: list[float] = field(default_factory=list)
    evals: list[tuple[int, float]] = field(default_factory=list)
    train_seconds: float = 0.0


def _progress(iterable: Any, total: int, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, disable=not enabled, leave=True, dynamic_ncols=True)


def train_steps(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    train: D.Encoded,
    s: RunSettings,
    evaluate: Callable[[], float] | None = None,
    metric: str = "accuracy",
    progress: bool = True,
    launch: Launch = SINGLE,
) -> History:
    """Train for ``s.epochs`` (or ``s.max_steps``) with linear warm-up and decay.

    With ``evaluate``, the held-out metric is taken before training and after each epoch (the time
    it takes is not counted in ``History.train_seconds``). Under torchrun (``launch``), every rank
    draws the same global batches and trains on its rows of each (``model`` is the DDP or FSDP2
    module): the steps, and the losses recorded, are those of one process at ``s.batch_size``.
    """
    assert s.batch_size is not None
    per_epoch, total = plan_steps(len(train), s)
    scheduler = linear_schedule(optimizer, round(s.warmup_ratio * total), total)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    history = History()
    _evaluate(history, 0, evaluate, metric, "before training")
    step = 0
    for epoch in range(s.epochs):
        if step >= total:
            break
        todo = min(per_epoch, total - step)
        batches = _take(length_grouped_batches(train, s.batch_size, seed=s.seed + epoch), todo)
        bar = _progress(batches, todo, f"epoch {epoch + 1}/{s.epochs}", progress)
        model.train()
        start = time.perf_counter()
        for batch in bar:
            rows, real = L.shard_rows(batch, launch)
            loss = model(**to_device(rows, launch.device)).loss
            if launch.distributed:  # DDP and FSDP average the ranks' gradients
                (loss * L.loss_weight(rows, real, batch, launch)).backward()
            else:
                loss.backward()
            if s.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, s.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            history.losses.append(batch_loss(loss, rows, real, batch, launch))
            bar.set_postfix(loss=f"{_running(history.losses):.4f}")
            step += 1
        history.train_seconds += time.perf_counter() - start
        bar.close()
        _evaluate(history, step, evaluate, metric, f"epoch {epoch + 1}")
    model.eval()
    return history


def _evaluate(
    history: History, step: int, evaluate: Callable[[], float] | None, metric: str, when: str
) -> None:
    if evaluate is None:
        return
    history.evals.append((step, evaluate()))
    baseline = f" (before training {history.evals[0][1]:.4f})" if step else ""
    print(f"{when}: {metric} {history.evals[-1][1]:.4f}{baseline}")


def length_grouped_batches(
    encoded: D.Encoded, batch_size: int, seed: int, group: int = 32
) -> Iterator[dict[str, torch.Tensor]]:
    """Shuffled batches of examples of similar length (like transformers' ``group_by_length``).

    The examples are shuffled, cut into groups of ``group`` batches, sorted by length inside each
    group and batched; the batches are then shuffled. Padding to each batch's longest example then
    costs little: on Rotten Tomatoes it halves the tokens a step computes.
    """
    rng = random.Random(seed)
    order = list(range(len(encoded)))
    rng.shuffle(order)
    chunk = batch_size * group
    groups: list[list[int]] = []
    for start in range(0, len(order), chunk):
        part = sorted(order[start : start + chunk], key=lambda i: len(encoded.input_ids[i]))
        groups += [part[j : j + batch_size] for j in range(0, len(part), batch_size)]
    rng.shuffle(groups)
    for indices in groups:
        yield next(D.batches(_subset(encoded, indices), len(indices), shuffle=False))


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return batch if device.type == "cpu" else {k: v.to(device) for k, v in batch.items()}


def batch_loss(
    loss: torch.Tensor,
    rows: dict[str, torch.Tensor],
    real: bool,
    batch: dict[str, torch.Tensor],
    launch: Launch,
) -> float:
    """The mean loss of the whole global batch: the ranks' loss sums added up, over its items."""
    if not launch.distributed:
        return loss.item()
    mine = loss.item() * L.loss_items(rows) if real else 0.0
    return L.sum_across([mine], launch)[0] / max(1, L.loss_items(batch))


def _take(it: Iterator[Any], n: int) -> Iterator[Any]:
    for i, item in enumerate(it):
        if i >= n:
            return
        yield item


def _running(losses: list[float], window: int = 20) -> float:
    tail = losses[-window:]
    return sum(tail) / len(tail)


# --------------------------------------------------------------------------- evaluation


def eval_batches(
    test: D.Encoded, batch_size: int, progress: bool, launch: Launch
) -> Iterator[tuple[dict[str, torch.Tensor], bool]]:
    """This rank's batches of ``test`` in order, each with whether it counts (see L.eval_shards)."""
    shards = L.eval_shards(len(test), batch_size, launch)
    for indices in _progress(shards, len(shards), "eval", progress):
        batch = next(D.batches(_subset(test, indices or [0]), len(indices or [0]), shuffle=False))
        yield to_device(batch, launch.device), bool(indices)


@torch.no_grad()
def accuracy(
    model: nn.Module, test: D.Encoded, batch_size: int, progress: bool = False, launch: Launch = SINGLE
) -> float:
    """Fraction of ``test`` whose arg-max logit is the label (under torchrun: the ranks' shares
    counted and added up)."""
    model.eval()
    correct = 0
    for batch, counts in eval_batches(test, batch_size, progress, launch):
        labels = batch.pop("labels")
        logits = model(**batch).logits
        correct += int((logits.argmax(-1) == labels).sum()) if counts else 0
    return L.sum_across([correct], launch)[0] / len(test)


@torch.no_grad()
def lm_loss(
    model: nn.Module, test: D.Encoded, batch_size: int, progress: bool = False, launch: Launch = SINGLE
) -> float:
    """Mean next-token loss over every labelled token of ``test`` (not a mean of batch means)."""
    model.eval()
    total, count = 0.0, 0
    for batch, counts in eval_batches(test, batch_size, progress, launch):
        n = int((batch["labels"][:, 1:] != D.IGNORE_INDEX).sum()) if counts else 0  # labels shift by one
        total += float(model(**batch).loss) * n
        count += n
    total, count = L.sum_across([total, count], launch)
    return total / max(count, 1)


def metric_name(task: str) -> str:
    return "accuracy" if task == SEQ_CLS else "loss"


def evaluator(
    model: nn.Module, test: D.Encoded, s: RunSettings, progress: bool, launch: Launch = SINGLE
) -> Callable[[], float]:
    """The held-out metric of ``s.task`` as a zero-argument function (a collective under torchrun)."""
    test = by_length(test)
    if s.task == SEQ_CLS:
        return lambda: accuracy(model, test, s.eval_batch_size, progress, launch)
    return lambda: lm_loss(model, test, s.eval_batch_size, progress, launch)


@torch.no_grad()
def generate(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: list[str], chat: bool, max_new_tokens: int
) -> list[str]:
    """Greedy continuations of ``prompts`` (as chat user turns when ``chat``), one prompt at a time."""
    model.eval()
    outputs = []
    for prompt in prompts:
        if chat and getattr(tokenizer, "chat_template", None):
            user = [{"role": "user", "content": prompt}]
            prompt = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
        ids = ids.to(next(model.parameters()).device)
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=D.pad_token_id(tokenizer),
        )
        outputs.append(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip())
    return outputs


# --------------------------------------------------------------------------- plot


def plot_history(history: History, metric: str, baseline_label: str, path: pathlib.Path) -> None:
    """``training.png``: the training loss per step (and its running mean) and the held-out metric."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never open a window
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    steps = list(range(1, len(history.losses) + 1))
    left.plot(steps, history.losses, color="0.75", linewidth=0.8, label="loss per step")
    window = max(1, len(history.losses) // 20)
    smooth = [_running(history.losses[: i + 1], window) for i in range(len(history.losses))]
    left.plot(steps, smooth, color="C0", label=f"running mean ({window} steps)")
    left.set(xlabel="step", ylabel="training loss", title="training loss")
    left.legend()
    xs, ys = zip(*history.evals)
    right.plot(xs, ys, marker="o", color="C1", label=f"held-out {metric}")
    right.axhline(ys[0], color="0.5", linestyle="--", label=baseline_label)
    right.set(xlabel="step", ylabel=metric, title=f"held-out {metric}")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
