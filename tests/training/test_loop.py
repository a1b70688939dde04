"""The pieces of the training loop: settings, schedule, batching, metrics (no pretrained model needed)."""

from __future__ import annotations

import pytest
import torch

from vblora.training import data as D
from vblora.training import loop as T
from vblora.training.loop import RunError, RunSettings


def test_settings_resolve_task_and_data_defaults() -> None:
    s = RunSettings().resolved()
    assert (s.model, s.data, s.vector_length, s.train_size, s.test_size) == (
        "minilm",
        "rotten-tomatoes",
        128,
        4000,
        1000,
    )
    assert s.target_modules == "all-linear" and s.modules_to_save == ["classifier", "score"]
    lm = RunSettings(task="causal-lm").resolved()
    assert (lm.model, lm.data, lm.vector_length, lm.target_modules) == (
        "smollm2",
        "chatterbot",
        64,
        "all-linear",
    )
    custom = RunSettings(data="my.csv", epochs=7, vector_length=32).resolved()
    assert (custom.train_size, custom.test_size, custom.epochs, custom.vector_length) == (None, 0.2, 7, 32)
    with pytest.raises(RunError, match="unknown task"):
        RunSettings(task="translation").resolved()


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("epochs", 0, "--epochs"),
        ("batch_size", 0, "--batch-size"),
        ("warmup_ratio", 1.0, "--warmup-ratio"),
        ("compact", "int4", "--compact must be one of float32, float16, bfloat16, int8"),
    ],
)
def test_settings_check_rejects_unusable_values(field: str, value: object, message: str) -> None:
    s = RunSettings(**{field: value}).resolved()
    with pytest.raises(RunError, match=message):
        s.check()


def test_adapter_config_errors_become_run_errors() -> None:
    with pytest.raises(RunError, match="topk=9 exceeds num_vectors=4"):
        RunSettings(topk=9, num_vectors=4).resolved().adapter_config("m")


def test_linear_schedule_warms_up_then_decays_to_zero() -> None:
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [p], "lr": 1.0}])
    sched = T.linear_schedule(opt, warmup_steps=3, total_steps=10)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[3:] == pytest.approx([(10 - k) / 7 for k in range(3, 10)])


def test_plan_steps_caps_at_max_steps() -> None:
    s = RunSettings(batch_size=8, epochs=3).resolved()
    assert T.plan_steps(30, s) == (4, 12)
    assert T.plan_steps(30, RunSettings(batch_size=8, epochs=3, max_steps=5).resolved()) == (4, 5)


def encoded(lengths: list[int]) -> D.Encoded:
    return D.Encoded([[i + 1] * n for i, n in enumerate(lengths)], list(range(len(lengths))), 0)


def test_length_grouped_batches_cover_every_example_once_in_similar_lengths() -> None:
    lengths = [(7 * i) % 23 + 1 for i in range(100)]
    enc = encoded(lengths)
    batches = list(T.length_grouped_batches(enc, batch_size=8, seed=1, group=4))
    seen = sorted(int(i) for b in batches for i in b["labels"])
    assert seen == list(range(100)) and [b["labels"].shape[0] for b in batches].count(8) == 12
    # inside a group of 4 batches the examples are sorted by length, so a batch spans few lengths
    padding = sum(int((b["attention_mask"] == 0).sum()) for b in batches)
    plain = sum(int((b["attention_mask"] == 0).sum()) for b in D.batches(enc, 8, shuffle=True, seed=1))
    assert padding < plain / 2
    again = list(T.length_grouped_batches(enc, batch_size=8, seed=1, group=4))
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(batches, again))
    other = list(T.length_grouped_batches(enc, batch_size=8, seed=2, group=4))
    assert any(not torch.equal(a["labels"], b["labels"]) for a, b in zip(batches, other))


class Echo(torch.nn.Module):
    """A "classifier" whose logits are one-hot on the first token; a "LM" with a fixed loss per token."""

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None = None
    ):
        from types import SimpleNamespace

        logits = torch.nn.functional.one_hot(input_ids[:, 0] % 3, 3).float()
        loss = None
        if labels is not None and labels.dim() == 2:
            # per-token loss = the token's position + 1; the model's loss is the mean over shifted labels
            target = labels[:, 1:]
            mask = target != D.IGNORE_INDEX
            pos = torch.arange(1, labels.shape[1]).expand_as(target).float()
            loss = (pos * mask).sum() / mask.sum()
        return SimpleNamespace(logits=logits, loss=loss)


def test_accuracy_counts_argmax_hits() -> None:
    enc = D.Encoded([[0, 5], [1], [2, 2, 2], [4]], [0, 1, 0, 1], 0)  # predictions 0, 1, 2, 1
    assert T.accuracy(Echo(), enc, batch_size=3) == 0.75


def test_lm_loss_weights_every_token_not_every_batch() -> None:
    labels = [[5, 6, 7, 8], [5, 6], [D.IGNORE_INDEX, 6, 7]]
    enc = D.Encoded([list(range(len(x))) for x in labels], labels, 0)
    tokens = [1, 2, 3, 1, 1, 2]  # positions of the labelled, shifted targets: rows 0, 1 and 2
    assert T.lm_loss(Echo(), enc, batch_size=2) == pytest.approx(sum(tokens) / len(tokens))
    assert T.lm_loss(Echo(), enc, batch_size=1) == pytest.approx(T.lm_loss(Echo(), enc, batch_size=3))


def test_qa_table_reads_prompts_and_answers(tmp_path) -> None:
    f = tmp_path / "qa.csv"
    f.write_text("q,a\nhello?,hi there\nbye?,see you\n")
    assert T.load_qa_table(str(f), "q", "a") == [D.QAPair("hello?", "hi there"), D.QAPair("bye?", "see you")]
    with pytest.raises(RunError, match="no column 'question'"):
        T.load_qa_table(str(f), "question", "a")
    with pytest.raises(D.DataError, match="no such file"):
        T.load_qa_table(str(tmp_path / "nope.jsonl"), "q", "a")
    (tmp_path / "qa.txt").write_text("q,a\nhello?,hi\n")
    with pytest.raises(D.DataError, match="unknown extension"):
        T.load_qa_table(str(tmp_path / "qa.txt"), "q", "a")


def test_builtin_data_must_match_the_task() -> None:
    with pytest.raises(RunError, match="causal-LM corpus, for a --task causal-lm run"):
        T.load_examples(RunSettings(data="hamlet").resolved())
    with pytest.raises(RunError, match="classification data set, for a --task seq-cls run"):
        T.load_examples(RunSettings(task="causal-lm", data="rotten-tomatoes").resolved())
