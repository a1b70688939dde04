"""``vblora serve`` as a process: started from the command line, stopped with SIGTERM."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from serving_helpers import char_tokenizer, free_port, write_adapters  # noqa: E402

from vblora.cli.main import build_parser  # noqa: E402


def slow_model(folder: pathlib.Path) -> None:
    """A Llama wide and deep enough that 150 tokens take a few seconds on a CPU."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=6,
        num_attention_heads=4,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=None,  # no early stop: the stream runs its full length
    )
    LlamaForCausalLM(cfg).save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)


def test_serve_is_a_command_with_bounds() -> None:
    args = build_parser().parse_args(["serve", "--model", "m", "--adapters", "a", "--max-batch-size", "4"])
    assert args.command == "serve" and args.max_batch_size == 4 and args.host == "127.0.0.1"
    assert args.batching == "continuous"
    static = build_parser().parse_args(["serve", "--model", "m", "--batching", "static"])
    assert static.batching == "static"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--model", "m", "--batching", "sometimes"])


def test_sigterm_finishes_the_request_in_flight_and_refuses_new_ones(tmp_path: pathlib.Path) -> None:
    slow_model(tmp_path / "model")
    write_adapters(tmp_path / "adapters", [])
    port = free_port()
    command = [sys.executable, "-m", "vblora", "serve", "--model", str(tmp_path / "model")]
    command += ["--adapters", str(tmp_path / "adapters"), "--port", str(port), "--served-model-name", "base"]
    command += ["--max-tokens", "150", "--log-level", "warning"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "the server did not come up"
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        body = {"model": "base", "prompt": "go", "max_tokens": 150, "temperature": 0, "stream": True}
        body["stream_options"] = {"include_usage": True}
        lines = []
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
            stream = r.iter_lines()
            lines.append(next(stream))
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            with pytest.raises(httpx.ConnectError):  # no new connections while draining
                httpx.get(f"{url}/health", timeout=2)
            lines += list(stream)
        events = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
        assert [line for line in lines if line][-1] == "data: [DONE]"  # ran to its end, not cut
        assert events[-2]["choices"][0]["finish_reason"] in ("length", "stop")
        assert events[-1]["usage"]["completion_tokens"] > 10
        assert proc.wait(60) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once drained
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
