"""The settings of a ``vblora train`` run: defaults per task and data set, validated once."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..core.config import VBLoRAConfig
from ..formats.compact import COMPACT_BANK_DTYPES

if TYPE_CHECKING:
    pass


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
