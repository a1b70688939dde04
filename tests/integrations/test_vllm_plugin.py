"""The vLLM resolver plugin without vLLM: the model-free LoRA export equals ``export_lora`` on a
loaded model, is written once per file version, and resolves names as vLLM asks for them."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import pathlib
import sys
import time

import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "serving"))
from serving_helpers import base_model, make_adapter, write_adapters

from vblora.files import export_lora, load_compact, save_compact
from vblora.formats.readers import read_safetensors
from vblora.integrations import vllm_plugin as P


@dataclasses.dataclass
class FakeRequest:  # vLLM's LoRARequest fields
    lora_name: str
    lora_int_id: int
    lora_path: str


def tensors(folder: pathlib.Path) -> dict[str, torch.Tensor]:
    return read_safetensors(folder / "adapter_model.safetensors")[0]


def test_model_free_export_equals_export_lora(tmp_path: pathlib.Path) -> None:
    path = write_adapters(tmp_path / "ad", ["a"])["a"]
    export_lora(load_compact(base_model(), path), tmp_path / "reference")
    folder = P.export_once(path, tmp_path / "cache", "my/base")
    want, got = tensors(tmp_path / "reference"), tensors(folder)
    assert set(got) == set(want)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0, msg=key)
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["lora_alpha"] == config["r"]
    assert config["base_model_name_or_path"] == "my/base"  # vLLM's resolvers check it


def test_vblora_directories_export_too(tmp_path: pathlib.Path) -> None:
    for topk in (True, False):
        model = make_adapter(3)
        model.save_pretrained(tmp_path / f"dir{topk}", save_only_topk_weights=topk)
        export_lora(model, tmp_path / f"reference{topk}")
        folder = P.export_once(tmp_path / f"dir{topk}", tmp_path / "cache", "base")
        want, got = tensors(tmp_path / f"reference{topk}"), tensors(folder)
        assert set(got) == set(want)
        for key in want:
            torch.testing.assert_close(got[key], want[key], msg=key)


def test_a_corrupt_file_is_a_format_error(tmp_path: pathlib.Path) -> None:
    path = write_adapters(tmp_path / "ad", ["a"])["a"]
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError):
        P.export_once(path, tmp_path / "cache", "base")
    cache = tmp_path / "cache"
    assert not cache.exists() or not list(cache.iterdir())  # nothing half-written left


def test_resolver_exports_once_and_follows_replacements(tmp_path: pathlib.Path) -> None:
    folder = tmp_path / "adapters"
    write_adapters(folder, ["alice"])
    resolver = P.Resolver([folder], tmp_path / "cache", FakeRequest)
    assert asyncio.run(resolver.resolve_lora("base", "nobody")) is None
    assert resolver.resolve("base", "../adapters/alice") is None
    first = asyncio.run(resolver.resolve_lora("base", "alice"))
    assert first.lora_name == "alice" and first.lora_int_id > 0
    written = (pathlib.Path(first.lora_path) / "adapter_model.safetensors").stat().st_mtime_ns
    again = resolver.resolve("base", "alice")
    assert again == first  # the cached export, not a second one
    assert (pathlib.Path(again.lora_path) / "adapter_model.safetensors").stat().st_mtime_ns == written
    time.sleep(0.01)
    save_compact(make_adapter(5), folder / "alice.vblora")  # a new version under the same name
    replaced = resolver.resolve("base", "alice")
    assert replaced.lora_path != first.lora_path and replaced.lora_int_id != first.lora_int_id


def test_resolver_from_env(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(P.ADAPTERS_ENV, raising=False)
    assert P.resolver_from_env(FakeRequest) is None
    monkeypatch.setenv(P.ADAPTERS_ENV, str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="not a folder"):
        P.resolver_from_env(FakeRequest)
    (tmp_path / "ad").mkdir()
    monkeypatch.setenv(P.ADAPTERS_ENV, str(tmp_path / "ad"))
    monkeypatch.setenv(P.CACHE_ENV, str(tmp_path / "c"))
    resolver = P.resolver_from_env(FakeRequest)
    assert resolver.cache == tmp_path / "c" and resolver.cache.is_dir()


def test_the_entry_point_names_the_plugin() -> None:
    from importlib.metadata import entry_points

    found = [e for e in entry_points(group="vllm.general_plugins") if e.name == "vblora"]
    if not found:
        pytest.skip("the package's metadata predates the entry point; reinstall with pip install -e .")
    assert found[0].value == "vblora.integrations.vllm_plugin:register"
