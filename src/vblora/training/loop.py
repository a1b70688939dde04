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

import dataclasses
import math
import pathlib
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..core.config import VBLoRAConfig
from ..formats.compact import COMPACT_BANK_DTYPES
from ..model import VBLoRAModel
from ..optim import optimizer_param_groups
from . import data as D
from . import launch as L
from .launch import SINGLE, Launch

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

SEQ_CLS, CAUSAL_LM = "seq-cls", "causal-lm"
TASKS = (SEQ_CLS, CAUSAL_LM)
BUILTIN_DATA = ("rotten-tomatoes", "chatterbot", "hamlet")
MODEL_ALIASES = ("minilm", "smollm2")

# The recipe of the default run, chosen by measurement on 2 CPU cores (see benchmarks/RESULTS.md).
# Each task's defaults fill in whatever the user leaves unset (None) in RunSettings.
TASK_DEFAULTS: dict[str, dict[str, Any]] = {
    SEQ_CLS: {
        "model": "minilm",
        "data": "rotten-tomatoes",
        "text_column": "text",
        "label_column": "label",
        "target_modules": "all-linear",  # on BERT: query, key, value and every dense layer
        "modules_to_save": ["classifier", "score"],  # BERT's head and Llama's, Qwen's, ...
        "vector_length": 128,
        "max_length": 64,
        "batch_size": 32,
        "eval_batch_size": 64,
        "logits_lr": 5e-2,
        "bank_lr": 1e-2,
    },
    CAUSAL_LM: {
        "model": "smollm2",
        "data": "chatterbot",
        "text_column": "question",
        "label_column": "answer",
        "target_modules": "all-linear",
        "modules_to_save": [],
        "vector_length": 64,  # SmolLM2's 576 and 192 are not multiples of 128
        "max_length": 96,
        "batch_size": 8,
        "eval_batch_size": 16,  # 16 x 96 tokens x 49k-word logits is already 300 MB
        "logits_lr": 1e-1,  # the best of a sweep on the 40-step chatterbot run (RESULTS.md)
        "bank_lr": 2e-2,
    },
}
# Per data set, the default budget (training examples, epochs) and the held-out size; the built-in
# data sets' budgets fit a few minutes on 2 CPU cores (None: all of it).
DATA_DEFAULTS: dict[str, dict[str, Any]] = {
    "rotten-tomatoes": {"train_size": 4000, "epochs": 2, "test_size": 1000},
    "chatterbot": {"train_size": 320, "epochs": 1, "test_size": 100},
    "hamlet": {"train_size": 240, "epochs": 1, "test_size": 40},
    "file": {"train_size": None, "epochs": 3, "test_size": 0.2},
}


QUANTIZE = ("nf4", "fp4", "int8")
COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class RunError(ValueError):
    """A bad setting or input; the message is one line that says what to change."""


@dataclass(frozen=True)
class RunSettings:
    """Everything that defines a training run; ``None`` means "the task's default".

    Stored in ``metrics.json`` so ``vblora eval`` rebuilds the same split and model.
    """

    task: str = SEQ_CLS
    model: str | None = None
    data: str | None = None
    text_column: str | None = None
    label_column: str | None = None
    labels: list[str] | None = None
    train_size: int | None = None
    test_size: int | float | None = None
    split_seed: int = 0
    max_length: int | None = None
    # VB-LoRA
    r: int = 4
    num_vectors: int = 64
    vector_length: int | None = None
    topk: int = 2
    dropout: float = 0.0
    init_logits_std: float = 0.1
    init_bank_bound: float = 0.02
    target_modules: str | list[str] | None = None
    exclude_modules: str | list[str] | None = None
    modules_to_save: list[str] | None = None
    save_full_logits: bool = False
    compact: str | None = None  # also write adapter.vblora with the bank in this precision (a name)
    # a bitsandbytes-quantized base (QLoRA style): nf4, fp4 or int8; the adapter stays fp32
    quantize: str | None = None
    double_quant: bool = False  # 4-bit: quantize the block scales too
    compute_dtype: str = "float32"  # 4-bit: the dtype of the dequantized matmul
    # optimisation
    epochs: int | None = None
    batch_size: int | None = None
    eval_batch_size: int | None = None
    max_steps: int | None = None
    # per task (TASK_DEFAULTS): well above the paper's 1e-2 and 1e-3, which learn far more slowly at a
    # budget of tens to hundreds of steps (measured in benchmarks/RESULTS.md)
    logits_lr: float | None = None
    bank_lr: float | None = None
    head_lr: float = 5e-3
    weight_decay: float = 0.0
    warmup_ratio: float = 0.06
    max_grad_norm: float = 1.0
    seed: int = 42
    # causal LM generations
    num_generations: int = 4
    max_new_tokens: int = 40

    def resolved(self) -> RunSettings:
        """A copy with every ``None`` replaced by the task's and the data set's default."""
        if self.task not in TASKS:
            raise RunError(f"unknown task {self.task!r}; choose one of {', '.join(TASKS)}")
        values = dataclasses.asdict(self)
        for key, value in TASK_DEFAULTS[self.task].items():
            if values[key] is None:
                values[key] = value
        kind = values["data"] if values["data"] in BUILTIN_DATA else "file"
        for key, value in DATA_DEFAULTS[kind].items():
            if values[key] is None:
                values[key] = value
        return RunSettings(**values)

    def adapter_config(self, base_model_name: str) -> VBLoRAConfig:
        """The VB-LoRA config these settings describe."""
        task_type = "SEQ_CLS" if self.task == SEQ_CLS else "CAUSAL_LM"
        try:
            return VBLoRAConfig(
                r=self.r,
                num_vectors=self.num_vectors,
                vector_length=self.vector_length or 0,
                topk=self.topk,
                target_modules=self.target_modules,
                exclude_modules=self.exclude_modules or None,
                modules_to_save=self.modules_to_save or None,
                save_only_topk_weights=not self.save_full_logits,
                vblora_dropout=self.dropout,
                init_vector_bank_bound=self.init_bank_bound,
                init_logits_std=self.init_logits_std,
                task_type=task_type,
                base_model_name_or_path=base_model_name,
            )
        except ValueError as err:
            raise RunError(str(err)) from None

    def check(self) -> None:
        """Reject settings no run can use, before anything is loaded."""
        lowest = {"epochs": 1, "eval_batch_size": 1, "num_generations": 0, "max_new_tokens": 1}
        for name, low in lowest.items():
            if getattr(self, name) < low:
                raise RunError(
                    f"--{name.replace('_', '-')} must be at least {low}, got {getattr(self, name)}"
                )
        for name in ("batch_size", "max_length", "max_steps", "train_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise RunError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        for name in ("logits_lr", "bank_lr", "head_lr", "weight_decay", "max_grad_norm"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value >= 0):  # NaN fails both
                raise RunError(f"--{name.replace('_', '-')} must be >= 0 and finite, got {value}")
        for name in ("dropout", "init_logits_std", "init_bank_bound", "warmup_ratio", "test_size"):
            value = getattr(self, name)
            if isinstance(value, float) and not math.isfinite(value):
                raise RunError(f"--{name.replace('_', '-')} must be a finite number, got {value}")
        for name in ("seed", "split_seed"):
            if not 0 <= getattr(self, name) < 2**63:
                raise RunError(f"--{name.replace('_', '-')} must be in [0, 2**63), got {getattr(self, name)}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise RunError(f"--warmup-ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.quantize is not None and self.quantize not in QUANTIZE:
            raise RunError(f"--quantize must be one of {', '.join(QUANTIZE)} or none, got {self.quantize!r}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise RunError(
                f"--compute-dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {self.compute_dtype!r}"
            )
        if self.compact is not None and self.compact not in COMPACT_BANK_DTYPES:
            raise RunError(f"--compact must be one of {', '.join(COMPACT_BANK_DTYPES)}, got {self.compact!r}")


# --------------------------------------------------------------------------- data


@dataclass
class TaskData:
    """The encoded train and test sets, plus what generation and reporting need."""

    train: D.Encoded
    test: D.Encoded
    label_names: list[str] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)  # causal LM: held-out prompts to generate from
    references: list[str] = field(default_factory=list)


def is_builtin(data: str) -> bool:
    return data in BUILTIN_DATA


def load_examples(s: RunSettings) -> tuple[list[Any], list[str]]:
    """The raw examples of ``s.data`` for ``s.task``: (TextExample or QAPair or text, label names)."""
    assert s.data is not None and s.text_column is not None and s.label_column is not None
    if s.task == SEQ_CLS:
        if s.data == "rotten-tomatoes":
            return D.load_rotten_tomatoes()
        if is_builtin(s.data):
            raise RunError(f"--data {s.data} is a causal-LM corpus, for a --task causal-lm run")
        return D.load_table(s.data, s.text_column, s.label_column, s.labels)
    if s.data == "chatterbot":
        return D.load_chatterbot(), []
    if s.data == "hamlet":
        return [D.load_hamlet()], []
    if is_builtin(s.data):
        raise RunError(
            f"--data {s.data} is a classification data set, for a --task seq-cls run, not causal-lm"
        )
    return load_qa_table(s.data, s.text_column, s.label_column), []


def load_qa_table(path: str, prompt_column: str, answer_column: str) -> list[D.QAPair]:
    """Prompt/answer pairs from a CSV/TSV/JSONL file (the text and label columns of the causal-LM task)."""
    p = pathlib.Path(path)
    rows = D.read_rows(p)
    pairs = []
    for line, row in rows:
        for column, flag in ((prompt_column, "text"), (answer_column, "label")):
            if column not in row:
                columns = ", ".join(c for c in row if isinstance(c, str))
                raise RunError(
                    f"{p}:{line}: no column '{column}'; columns are: {columns}; pass --{flag}-column"
                )
        question, answer = row[prompt_column], row[answer_column]
        if not (
            isinstance(question, str) and isinstance(answer, str) and question.strip() and answer.strip()
        ):
            raise RunError(f"{p}:{line}: prompt and answer must be non-empty strings")
        pairs.append(D.QAPair(question.strip(), answer.strip()))
    if not pairs:
        raise RunError(f"{p}: the file holds no examples")
    return pairs


def prepare_data(
    s: RunSettings, tokenizer: PreTrainedTokenizerBase, examples: list[Any], label_names: list[str]
) -> TaskData:
    """Split ``examples`` (seeded), cap the training set at ``train_size`` and tokenise both sides."""
    assert s.test_size is not None and s.max_length is not None
    if s.data == "hamlet":
        return _prepare_blocks(s, tokenizer, examples[0])
    train, test = D.split_examples(examples, s.test_size, s.split_seed)
    train = train[: s.train_size] if s.train_size else train
    if s.task == SEQ_CLS:
        encoded_train = D.encode_classification(train, tokenizer, s.max_length)
        return TaskData(encoded_train, D.encode_classification(test, tokenizer, s.max_length), label_names)
    return TaskData(
        D.encode_chat_sft(train, tokenizer, s.max_length),
        D.encode_chat_sft(test, tokenizer, s.max_length),
        prompts=[p.question for p in test],
        references=[p.answer for p in test],
    )


def _prepare_blocks(s: RunSettings, tokenizer: PreTrainedTokenizerBase, text: str) -> TaskData:
    """Language modelling on one long text: blocks of ``max_length`` tokens, split (seeded)."""
    assert s.test_size is not None and s.max_length is not None
    blocks = D.encode_lm_chunks(text, tokenizer, s.max_length)
    train_idx, test_idx = D.split_examples(list(range(len(blocks))), s.test_size, s.split_seed)
    train_idx = train_idx[: s.train_size] if s.train_size else train_idx
    test = _subset(blocks, test_idx)
    cut = min(32, s.max_length // 2)  # prompt: the first tokens of a held-out block; reference: the rest
    prompts = [tokenizer.decode(ids[:cut]) for ids in test.input_ids]
    references = [tokenizer.decode(ids[cut:]) for ids in test.input_ids]
    return TaskData(_subset(blocks, train_idx), test, prompts=prompts, references=references)


def _subset(encoded: D.Encoded, indices: list[int]) -> D.Encoded:
    labels = [encoded.labels[i] for i in indices]
    return D.Encoded([encoded.input_ids[i] for i in indices], labels, encoded.pad_token_id)


def by_length(encoded: D.Encoded) -> D.Encoded:
    """The same examples sorted by length, so evaluation batches carry little padding."""
    order = sorted(range(len(encoded)), key=lambda i: len(encoded.input_ids[i]))
    return _subset(encoded, order)


# --------------------------------------------------------------------------- model


def resolve_model_path(name: str) -> str:
    """A local folder for the packaged aliases, else the name as given (a folder or a hub name)."""
    if name == "minilm":
        return str(D.minilm_path())
    if name == "smollm2":
        return str(D.smollm2_path())
    path = pathlib.Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise RunError(f"--model {name}: the folder has no config.json; pass a transformers model folder")
        return str(path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name:
        raise RunError(f"--model {name}: no such folder; pass a local model folder, 'minilm' or 'smollm2'")
    return name  # a hub-style name: loaded from the local Hugging Face cache, never downloaded


def load_base_model(
    task: str,
    name: str,
    num_labels: int = 2,
    label_names: list[str] | None = None,
    quantization: RunSettings | None = None,
) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """The transformers model for ``task`` and its tokenizer, in float32 and eval mode; quantized by
    bitsandbytes as ``quantization``'s ``quantize`` says (if set)."""
    model, tokenizer, _ = load_base_model_and_new_modules(task, name, num_labels, label_names, quantization)
    return model, tokenizer


def quantization_kwargs(s: RunSettings | None) -> dict[str, Any]:
    """``from_pretrained`` arguments that load the base quantized by bitsandbytes (on the CPU, where
    the layers are quantized; a run on a GPU moves them), or none."""
    if s is None or s.quantize is None:
        return {}
    try:
        import bitsandbytes  # noqa: F401  (lazy: heavy, optional)
        from transformers import BitsAndBytesConfig
    except ImportError as err:
        raise RunError(
            f"--quantize {s.quantize} needs bitsandbytes ({err}); pip install 'vblora[quant]'"
        ) from None
    if s.quantize == "int8":
        config = BitsAndBytesConfig(load_in_8bit=True)
    else:
        config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=s.quantize,
            bnb_4bit_use_double_quant=s.double_quant,
            bnb_4bit_compute_dtype=COMPUTE_DTYPES[s.compute_dtype],
        )
    return {"quantization_config": config, "device_map": "cpu"}


def load_base_model_and_new_modules(
    task: str,
    name: str,
    num_labels: int = 2,
    label_names: list[str] | None = None,
    quantization: RunSettings | None = None,
) -> tuple[nn.Module, PreTrainedTokenizerBase, list[str]]:
    """As :func:`load_base_model`, and the modules the checkpoint did not hold (freshly initialised:
    a new classifier head, or one whose label count differs from the checkpoint's)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    path = resolve_model_path(name)
    dtype = {D.dtype_kwarg(): torch.float32}  # `dtype` since transformers 4.56, `torch_dtype` before
    dtype.update(quantization_kwargs(quantization))
    try:
        # never download: a hub-style name must already be in the local Hugging Face cache
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        if task == SEQ_CLS:
            names = label_names or [str(i) for i in range(num_labels)]
            model, info = AutoModelForSequenceClassification.from_pretrained(
                path,
                num_labels=len(names),
                id2label=dict(enumerate(names)),
                label2id={n: i for i, n in enumerate(names)},
                ignore_mismatched_sizes=True,  # a head for another label count is replaced by a new one
                output_loading_info=True,
                local_files_only=True,
                **dtype,
            )
        else:
            model, info = AutoModelForCausalLM.from_pretrained(
                path, local_files_only=True, output_loading_info=True, **dtype
            )
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        if path == name and not pathlib.Path(name).exists():
            raise RunError(
                f"--model {name}: not a local folder and not in the local Hugging Face cache (vblora never "
                "downloads); pass a local model folder, 'minilm' or 'smollm2'"
            ) from None
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RunError(f"--model {name}: could not load it with transformers ({first})") from None
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = D.pad_token_id(tokenizer)  # classifiers find the last token by padding
    mismatched = (k[0] if isinstance(k, tuple) else k for k in info.get("mismatched_keys", ()))
    new_modules = sorted({key.rsplit(".", 1)[0] for key in (*info.get("missing_keys", ()), *mismatched)})
    return model.eval(), tokenizer, new_modules


def wrap_model(base: nn.Module, config: VBLoRAConfig) -> VBLoRAModel:
    """Inject VB-LoRA; configuration problems (targets, divisibility) become RunErrors."""
    try:
        return VBLoRAModel(base, config)
    except (ValueError, TypeError) as err:
        raise RunError(str(err)) from None


# --------------------------------------------------------------------------- optimisation


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
