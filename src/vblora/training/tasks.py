"""What a run trains on: its data (built-in corpora or a table), tokenised and split, and its base
model, loaded (optionally quantized) and wrapped with the adapter."""

from __future__ import annotations

import pathlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..core.config import VBLoRAConfig
from ..model import VBLoRAModel
from . import data as D

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


from .settings import BUILTIN_DATA, COMPUTE_DTYPES, SEQ_CLS, RunError, RunSettings


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
