"""``vblora train`` under torchrun: the launch read from the environment, each rank's share of the
data, and two gloo processes on CPU against one process (parameters, losses, metrics, files, errors).

Tolerance of the comparisons: 2 processes compute the same sums in another order (each rank's rows,
then the ranks' gradients averaged in float32), so results differ by a few float32 ulps per step
(measured: 1e-7 after 8 AdamW steps); ``rtol=1e-5, atol=1e-6`` leaves a hundredfold margin and is
far below what one step moves a parameter (about 1e-3), or what a wrong weighting of the shards does.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from conftest import tiny_llama
from vblora.training import launch as L
from vblora.training.launch import Launch, LaunchError

# --------------------------------------------------------------------------- the launch


def test_read_launch_reads_torchrun_variables_and_refuses_partial_or_bad_ones() -> None:
    assert L.read_launch("cpu", environ={}) == L.SINGLE
    env = {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4"}
    got = L.read_launch("cpu", fsdp=True, environ=env)
    assert (got.rank, got.local_rank, got.world_size, got.fsdp, got.backend) == (3, 1, 4, True, "gloo")
    assert (
        not got.is_main
        and got.distributed
        and L.read_launch("cpu", environ={**env, "RANK": "0", "LOCAL_RANK": "0"}).is_main
    )
    cases = {
        "not LOCAL_RANK, WORLD_SIZE": {"RANK": "0"},
        "is not an integer": {**env, "RANK": "one"},
        "do not fit together": {**env, "RANK": "4"},
    }
    for message, environ in cases.items():
        with pytest.raises(LaunchError, match=message):
            L.read_launch("cpu", environ=environ)
    with pytest.raises(LaunchError, match="--fsdp shards the model across processes"):
        L.read_launch("cpu", fsdp=True, environ={})


def test_fsdp_with_a_quantized_base_is_refused_with_the_reason() -> None:
    fsdp = Launch(rank=0, world_size=2, fsdp=True)
    with pytest.raises(LaunchError, match="FSDP2 cannot shard bitsandbytes' packed 4/8-bit weights"):
        L.check_options(fsdp, quantize="nf4")
    L.check_options(fsdp)
    L.check_options(Launch(rank=0, world_size=2), quantize="nf4")  # DDP: each rank the whole base


def test_devices_are_checked_against_the_machine() -> None:
    assert L.pick_device("cpu") == torch.device("cpu")
    with pytest.raises(LaunchError, match="runs on cpu or cuda"):
        L.pick_device("meta")
    with pytest.raises(LaunchError, match="not a device"):
        L.pick_device("gpu please")
    with pytest.raises(LaunchError, match="pass --device cuda"):
        L.pick_device("cuda:0", local_rank=0, world_size=2)
    assert L.pick_device(None) == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(LaunchError, match=r"needs cuda:1, and the machine has 0 GPU\(s\)"):
            L.pick_device("cuda", local_rank=1, world_size=2)


# --------------------------------------------------------------------------- each rank's share


def cls_loss(w: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """A classifier's loss as transformers computes it: the mean cross-entropy over rows."""
    return F.cross_entropy(batch["x"].sum(1) @ w, batch["labels"])


def lm_loss(w: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """A causal LM's: the mean over labelled tokens after the shift by one."""
    logits = batch["x"] @ w  # (rows, tokens, vocab)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100)


def test_weighted_shards_average_to_the_whole_batch_gradient() -> None:
    """What DDP and FSDP do (average the ranks' gradients) to each rank's weighted loss gives the
    gradient of the whole batch's mean loss, for rows and for tokens, including shards of unequal
    size and a rank with no row at all (a last batch smaller than the world)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 5, generator=g, requires_grad=True)
    for rows in (1, 2, 7):
        labels = torch.randint(0, 5, (rows, 6), generator=g)
        labels[torch.rand(rows, 6, generator=g) < 0.4] = -100  # uneven token counts per row
        labels[:, 1] = 0  # at least one labelled token per row (as the data preparation ensures)
        lm_batch = {"x": torch.randn(rows, 6, 4, generator=g), "labels": labels}
        cls_batch = {"x": lm_batch["x"], "labels": labels[:, 1].clone().random_(0, 5, generator=g)}
        for loss_fn, batch in ((cls_loss, cls_batch), (lm_loss, lm_batch)):
            (want,) = torch.autograd.grad(loss_fn(w, batch), w)
            for world in (2, 3):
                total = torch.zeros_like(w)
                for rank in range(world):
                    launch = Launch(rank=rank, world_size=world)
                    shard, real = L.shard_rows(batch, launch)
                    weight = L.loss_weight(shard, real, batch, launch)
                    total += torch.autograd.grad(loss_fn(w, shard) * weight, w)[0]
                torch.testing.assert_close(total / world, want, rtol=1e-5, atol=1e-7)
    assert rows == 7  # uneven token counts: the plain mean of the ranks' mean losses is not it
    with pytest.raises(AssertionError):
        shards = [L.shard_rows(lm_batch, Launch(rank=r, world_size=2))[0] for r in range(2)]
        (plain,) = torch.autograd.grad(sum(lm_loss(w, s) for s in shards) / 2, w)
        torch.testing.assert_close(plain, torch.autograd.grad(lm_loss(w, lm_batch), w)[0])


def test_eval_shards_cover_every_example_once_in_equal_batch_counts() -> None:
    assert L.eval_shards(10, 4, L.SINGLE) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    for n, batch, world in ((9, 4, 2), (10, 3, 3), (2, 8, 4), (1, 1, 2)):
        shards = [L.eval_shards(n, batch, Launch(rank=r, world_size=world)) for r in range(world)]
        assert sorted(i for s in shards for b in s for i in b) == list(range(n))
        assert len({len(s) for s in shards}) == 1 and all(len(b) <= batch for s in shards for b in s)


def test_fsdp_units_are_the_transformer_blocks() -> None:
    model = tiny_llama()
    assert L.transformer_blocks(model) == list(model.model.layers)


def test_together_in_one_process_is_transparent() -> None:
    with pytest.raises(KeyError), L.together(L.SINGLE):
        raise KeyError("x")
    assert L.sum_across([1, 2.5], L.SINGLE) == [1, 2.5]


# --------------------------------------------------------------------------- two processes
LIMIT_S = 300  # a hang fails the test after this long, instead of waiting for gloo's 30 minutes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny dropout-free BERT classifier and Llama with the MiniLM tokenizer, and their data."""
    pytest.importorskip("transformers")
    from transformers import (
        AutoTokenizer,
        BertConfig,
        BertForSequenceClassification,
        LlamaConfig,
        LlamaForCausalLM,
    )

    from vblora.training import data

    root = tmp_path_factory.mktemp("launch")
    tokenizer = AutoTokenizer.from_pretrained(data.minilm_path())
    torch.manual_seed(0)
    small = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
    # no dropout in the base: its masks would differ between one process and two (see the README)
    bert = BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **small
    )
    llama = LlamaConfig(
        vocab_size=tokenizer.vocab_size, num_key_value_heads=1, max_position_embeddings=128, **small
    )
    for name, model in (("bert", BertForSequenceClassification(bert)), ("llama", LlamaForCausalLM(llama))):
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    rng = random.Random(0)
    good, bad = ["good", "great", "fun", "lovely", "superb"], ["bad", "awful", "boring", "dull", "poor"]
    words = [" ".join(rng.sample(good if i % 2 else bad, rng.randint(1, 4))) for i in range(40)]
    rows = [f"a {w} movie,{'pos' if i % 2 else 'neg'}" for i, w in enumerate(words)]
    (root / "reviews.csv").write_text("text,label\n" + "\n".join(rows) + "\n")
    qa = [
        {"question": f"what is {i} plus one", "answer": "it is " * rng.randint(1, 4) + str(i + 1)}
        for i in range(24)
    ]
    (root / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in qa))
    return root


def bert_args(assets: Path, output: Path) -> list[str]:
    # 25 examples at batch 8: the last batch has one row, so rank 1 keeps in step with no row;
    # 9 held-out examples at eval batch 4: rank 1 runs out of evaluation batches first
    return [
        "train", "--model", str(assets / "bert"), "--data", str(assets / "reviews.csv"),
        "--output", str(output), "--vector-length", "16", "--num-vectors", "8", "--epochs", "2",
        "--batch-size", "8", "--train-size", "25", "--test-size", "9", "--eval-batch-size", "4",
        "--seed", "3", "--quiet",
    ]  # fmt: skip


def llama_args(assets: Path, output: Path) -> list[str]:
    # answers of 3 to 6 tokens: the ranks' shares hold different token counts
    return [
        "train", "--task", "causal-lm", "--model", str(assets / "llama"), "--data", str(assets / "qa.jsonl"),
        "--output", str(output), "--vector-length", "16", "--num-vectors", "8", "--batch-size", "5",
        "--train-size", "16", "--test-size", "7", "--eval-batch-size", "2", "--num-generations", "1",
        "--max-new-tokens", "3", "--seed", "3", "--quiet",
    ]  # fmt: skip


def run_here(argv: list[str]) -> tuple[int, str, str]:
    from vblora.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def assert_same_run(got: Path, want: Path, world: int) -> None:
    """The same files, adapter tensors, per-step losses and held-out metrics as one process's."""
    from safetensors.torch import load_file

    assert sorted(p.name for p in got.iterdir()) == sorted(p.name for p in want.iterdir())
    a, b = (load_file(p / "adapter" / "adapter_model.safetensors") for p in (got, want))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)  # indices: exact
    m, n = (json.loads((p / "metrics.json").read_text()) for p in (got, want))
    assert m["steps"] == n["steps"] and m["losses"] == pytest.approx(n["losses"], rel=1e-5)
    assert [e["step"] for e in m["evals"]] == [e["step"] for e in n["evals"]]
    metric = m["metric"]
    assert [e[metric] for e in m["evals"]] == pytest.approx([e[metric] for e in n["evals"]], rel=1e-6)
    assert (m["processes"]["world_size"], n["processes"]["world_size"]) == (world, 1)
    assert n["losses"][0] != pytest.approx(n["losses"][-1], rel=1e-3)  # it did train


def test_torchrun_ddp_run_equals_one_process_and_only_rank_0_writes(assets: Path, tmp_path: Path) -> None:
    """`vblora train --nproc-per-node 2` (torchrun's launcher, DDP, gloo) against the same run in
    this process: equal adapter, losses and accuracy; one summary, one folder, nothing else."""
    one, two = tmp_path / "one" / "run", tmp_path / "two" / "run"
    two.parent.mkdir()  # where rank 0 stages the run folder
    code, _, err = run_here(bert_args(assets, one))
    assert code == 0, err
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-m", "vblora", *bert_args(assets, two), "--nproc-per-node", "2"]
    # its own session, so that a hang can be stopped with the workers torchrun started
    launcher = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=tmp_path,
        start_new_session=True,
    )
    try:
        stdout, stderr = launcher.communicate(timeout=LIMIT_S)
    except subprocess.TimeoutExpired:
        os.killpg(launcher.pid, signal.SIGKILL)
        pytest.fail(f"torchrun did not finish within {LIMIT_S} s")
    done = subprocess.CompletedProcess(argv, launcher.returncode, stdout, stderr)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_run(two, one, world=2)
    assert done.stdout.count("wrote ") == 1 and done.stdout.count("data: ") == 1  # rank 0 alone prints
    assert "processes: 2 (ddp, gloo on cpu)" in done.stdout
    assert os.listdir(two.parent) == ["run"]  # no staging folder of any rank left beside it


class FailingShards:
    """``shard_rows`` that raises ``error`` at its ``at``-th call (a training step)."""

    def __init__(self, real: Callable[..., Any], error: Exception, at: int) -> None:
        self.real, self.error, self.at, self.calls = real, error, at, 0

    def __call__(self, batch: dict[str, torch.Tensor], launch: Launch) -> Any:
        self.calls += 1
        if self.calls == self.at:
            raise self.error
        return self.real(batch, launch)


def watch_writes(stack: contextlib.ExitStack, root: str) -> list[str]:
    """The paths under ``root`` that this process opens for writing, creates or renames onto."""
    log: list[str] = []
    real_open, real_mkdir, real_replace, real_rename = io.open, os.mkdir, os.replace, os.rename

    def opened(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if any(c in mode for c in "wxa+") and str(file).startswith(root):
            log.append(str(file))
        return real_open(file, mode, *args, **kwargs)

    def touching(real: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            log.extend(str(a) for a in args[:2] if str(a).startswith(root))
            return real(*args, **kwargs)

        return call

    stack.enter_context(mock.patch("builtins.open", opened))
    stack.enter_context(mock.patch("io.open", opened))
    stack.enter_context(mock.patch("os.mkdir", touching(real_mkdir)))
    stack.enter_context(mock.patch("os.replace", touching(real_replace)))
    stack.enter_context(mock.patch("os.rename", touching(real_rename)))
    return log


def test_watch_writes_sees_the_ways_a_run_writes(tmp_path: Path) -> None:
    import tempfile

    from vblora.formats.atomic import write_files

    with contextlib.ExitStack() as stack:
        log = watch_writes(stack, str(tmp_path))
        (tmp_path / "a.json").write_text("{}")
        write_files({tmp_path / "b" / "c.bin": b"x"})  # the adapter's and compact file's writer
        tempfile.mkdtemp(dir=tmp_path)  # a staging folder
        (tmp_path / "a.json").read_text()  # reading is not writing
    assert any(p.endswith("a.json") for p in log) and any(p.endswith("c.bin") for p in log)
    assert any(p.endswith(os.sep + "b") for p in log) and len(log) >= 5


def cli_worker(rank: int, world: int, jobs: list[tuple[str, int, list[str]]], folder: str) -> None:
    """One rank of several `vblora train` runs in a row, as torchrun would start it. On rank 1 the
    job ``broken`` fails while loading the data and ``stopped`` at its second training step; rank 1
    records every write it makes under ``folder`` (there should be none)."""
    from vblora.training import loop as T

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1")
    for name, port, argv in jobs:
        os.environ["MASTER_PORT"] = str(port)
        with contextlib.ExitStack() as stack:
            writes = watch_writes(stack, folder) if rank == 1 else []
            if rank == 1 and name == "broken":
                error = T.D.DataError("reviews.csv: unreadable on this machine")
                stack.enter_context(mock.patch.object(T, "load_examples", side_effect=error))
            if rank == 1 and name == "stopped":
                failing = FailingShards(L.shard_rows, T.RunError("this rank ran out of memory"), at=2)
                stack.enter_context(mock.patch.object(L, "shard_rows", failing))
            code, out, err = run_here(argv)
        result = {"code": code, "out": out, "err": err, "writes": writes}
        Path(folder, f"{name}-{rank}.json").write_text(json.dumps(result))


def test_gloo_ranks_fsdp_and_nf4_runs_equal_one_process_and_errors_stop_every_rank(
    assets: Path, tmp_path: Path
) -> None:
    """Two ranks on gloo run a few jobs: an FSDP2 causal-LM run (equal to one process's, token-
    weighted), then rank 1 fails loading data, then at its second step (each failure ends both
    ranks with exit 2 and one line each, and leaves no output or staging folder), then a DDP run
    on an nf4 base (bitsandbytes) equal to one process's."""
    names = ("fsdp", "broken", "stopped", "nf4")
    fsdp, broken, stopped, nf4 = (tmp_path / name / "run" for name in names)
    for output in (broken, stopped):
        output.parent.mkdir()  # where rank 0 would stage the run folder
    quantized = importlib.util.find_spec("bitsandbytes") is not None
    jobs = {
        "fsdp": [*llama_args(assets, fsdp), "--fsdp"],
        "broken": bert_args(assets, broken),
        # DDP with a bitsandbytes nf4 base (FSDP2 refuses it)
        **(
            {"nf4": [*llama_args(assets, nf4), "--quantize", "nf4", "--num-generations", "0"]}
            if quantized
            else {}
        ),
        # last: rank 1's process then ends, which is what closes its connections (as a failed rank's
        # does); a process that lives on keeps them open until its garbage is collected
        "stopped": bert_args(assets, stopped),
    }
    work = [(name, free_port(), argv) for name, argv in jobs.items()]
    ranks = mp.start_processes(cli_worker, args=(2, work, str(tmp_path)), nprocs=2, join=False)
    deadline = time.monotonic() + LIMIT_S
    while not ranks.join(timeout=1):  # re-raises a rank's exception
        if time.monotonic() > deadline:
            for process in ranks.processes:
                process.kill()
            pytest.fail(f"the ranks did not finish within {LIMIT_S} s")
    results = {
        name: [json.loads((tmp_path / f"{name}-{r}.json").read_text()) for r in range(2)] for name in jobs
    }
    assert all(r1["writes"] == [] for _, r1 in results.values())  # rank 0 alone writes

    (r0, r1), one = results["fsdp"], tmp_path / "one" / "run"
    assert (r0["code"], r1["code"], r1["out"]) == (0, 0, ""), (r0["err"], r1["err"])
    code, _, err = run_here(llama_args(assets, one))
    assert code == 0, err
    assert_same_run(fsdp, one, world=2)
    got, want = (json.loads((p / "generations.json").read_text()) for p in (fsdp, one))
    assert got == want

    (r0, r1) = results["broken"]  # rank 0 says why; rank 1 stops silently
    assert (r0["code"], r1["code"], r1["err"]) == (2, 2, "")
    assert r0["err"].splitlines() == [
        "vblora train: error: rank 1 of 2: reviews.csv: unreadable on this machine"
    ]
    (r0, r1) = results["stopped"]  # mid-training: no collective to agree in, so each rank says its part
    assert (r0["code"], r1["code"]) == (2, 2)
    assert r1["err"].splitlines() == ["vblora train: error: rank 1 of 2: this rank ran out of memory"]
    assert len(r0["err"].splitlines()) == 1 and "rank 0 of 2: stopped: another process failed" in r0["err"]
    for output in (broken, stopped):
        assert os.listdir(output.parent) == []

    if quantized:
        assert [r["code"] for r in results["nf4"]] == [0, 0], results["nf4"][0]["err"]
        code, _, err = run_here(
            [*llama_args(assets, one), "--quantize", "nf4", "--num-generations", "0", "--overwrite"]
        )
        assert code == 0, err
        assert_same_run(nf4, one, world=2)
        settings = json.loads((nf4 / "metrics.json").read_text())["settings"]
        assert settings["quantize"] == "nf4"
