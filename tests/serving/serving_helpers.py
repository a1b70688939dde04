"""A tiny causal LM with a character-level tokenizer and a chat template, and adapters for it on disk,
shared by the serving tests (no downloads: everything is built from configs)."""

from __future__ import annotations

import pathlib
import socket

import torch

from conftest import tiny_llama
from vblora import VBLoRAConfig, VBLoRAModel
from vblora.files import save_compact

CHARS = [chr(c) for c in (*range(32, 127), *range(192, 222))]  # ids 3..127: tiny_llama's vocab of 128
CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def char_tokenizer():
    """Ids 0-2 are <pad>, <s>, </s> (tiny_llama's bos 1 and eos 2), then one id per character."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(CHARS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<pad>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def base_model(seed: int = 0) -> torch.nn.Module:
    return tiny_llama(seed)


def make_adapter(seed: int, *, num_vectors: int = 32) -> VBLoRAModel:
    cfg = VBLoRAConfig(
        r=4,
        num_vectors=num_vectors,
        vector_length=16,
        topk=2,
        target_modules=["q_proj", "v_proj", "down_proj"],
    )
    model = VBLoRAModel(base_model(), cfg, "default")
    torch.manual_seed(1000 + seed)
    with torch.no_grad():  # far from the init, so adapters change the greedy output
        bank = model.vblora_banks["default"]
        bank.bank.uniform_(-0.5, 0.5)
        bank.logits.normal_(0, 3.0)
    return model


def write_adapters(folder: pathlib.Path, names: list[str]) -> dict[str, pathlib.Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for i, name in enumerate(names):
        paths[name] = folder / f"{name}.vblora"
        save_compact(make_adapter(i), paths[name])
    return paths


def reference_generate(path: pathlib.Path | None, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy ``generate`` on a fresh base with that one adapter (or none): the independent reference."""
    from vblora.files import load_compact

    model = base_model() if path is None else load_compact(base_model(), path, "only")
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=2,
        )
    new = out[0, ids.shape[1] :].tolist()
    return new[: new.index(2)] if 2 in new else new


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
