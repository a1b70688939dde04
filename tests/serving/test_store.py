"""The adapter store: lazy index, loads checked, LRU by count and by bytes, pins, threads."""

from __future__ import annotations

import concurrent.futures
import pathlib
import random
import shutil

import pytest
import torch
from serving_helpers import base_model, write_adapters

from vblora.files import load_compact
from vblora.serving.store import AdapterLoadError, AdapterStore, UnknownAdapter, adapter_bytes


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    root = tmp_path_factory.mktemp("store")
    write_adapters(root, ["a", "b", "c", "d"])
    return root


def logits(model: torch.nn.Module, names: list[str]) -> torch.Tensor:
    ids = torch.arange(1, 9).repeat(len(names), 1)
    with torch.no_grad():
        return model(input_ids=ids, adapter_names=names).logits


def alone(folder: pathlib.Path, name: str) -> torch.Tensor:
    model = load_compact(base_model(), folder / f"{name}.vblora", name)
    return logits(model, [name])


def test_ten_thousand_entries_open_nothing_until_asked(tmp_path: pathlib.Path, folder: pathlib.Path) -> None:
    for i in range(10_000):  # not adapters at all: the index must not read them
        (tmp_path / f"junk{i}.vblora").write_bytes(b"not safetensors")
    shutil.copy(folder / "a.vblora", tmp_path / "real.vblora")
    store = AdapterStore(base_model(), [tmp_path])
    assert len(store.names()) == 10_001 and store.stats.loads == 0
    with pytest.raises(AdapterLoadError, match="junk7"), store.pinned(["junk7"]):
        pass
    with store.pinned(["real"]) as model:
        torch.testing.assert_close(logits(model, ["real"]), alone(folder, "a"))
    assert store.resident() == ["real"]


def test_unknown_and_unsafe_names(folder: pathlib.Path) -> None:
    store = AdapterStore(base_model(), [folder])
    for name in ("zz", "../store/a", "a/../a", ".hidden", "__base__", ""):
        assert store.locate(name) is None
        if name != "__base__":
            with pytest.raises(UnknownAdapter), store.pinned([name]):
                pass


def test_lru_by_count_keeps_the_most_recent(folder: pathlib.Path) -> None:
    store = AdapterStore(base_model(), [folder], max_adapters=2)
    for name in ["a", "b", "a", "c"]:
        with store.pinned([name]):
            pass
    assert store.resident() == ["a", "c"] and store.stats.evictions == 1
    assert set(store.model.peft_config) == {"a", "c"}  # evicted means deleted from the model


def test_lru_by_bytes(folder: pathlib.Path) -> None:
    probe = AdapterStore(base_model(), [folder])
    with probe.pinned(["a"]):
        one = adapter_bytes(probe.model, "a")
    assert one == probe.resident_bytes() > 0
    store = AdapterStore(base_model(), [folder], max_bytes=int(one * 2.5))
    for name in "abcd":
        with store.pinned([name]):
            pass
    assert store.resident() == ["c", "d"] and store.resident_bytes() <= one * 2.5


def test_pinned_adapters_are_never_evicted(folder: pathlib.Path) -> None:
    store = AdapterStore(base_model(), [folder], max_adapters=1)
    with store.pinned(["a", "b"]) as model:  # a batch of two adapters goes past the bound
        with store.pinned(["c"]):
            assert {"a", "b", "c"} <= set(model.peft_config)
        assert "c" not in store.resident()  # released: the only one the bound may take
        torch.testing.assert_close(logits(model, ["a", "b"])[1:], alone(folder, "b"))
    assert store.resident() == ["b"]  # released last (after a)


def test_mixed_rows_equal_each_adapter_alone(folder: pathlib.Path) -> None:
    store = AdapterStore(base_model(), [folder])
    names = ["b", "__base__", "a", "b", "d"]
    with store.pinned(names) as model:
        mixed = logits(model, names)
    for row, name in enumerate(names):
        want = logits(base_model(), ["x"])[0] if name == "__base__" else alone(folder, name)[0]
        torch.testing.assert_close(mixed[row], want, msg=name)


def test_register_checks_the_file_at_once(tmp_path: pathlib.Path, folder: pathlib.Path) -> None:
    store = AdapterStore(base_model(), [])
    bad = tmp_path / "bad.vblora"
    bad.write_bytes((folder / "a.vblora").read_bytes()[:-10])
    with pytest.raises(AdapterLoadError):
        store.register("bad", bad)
    assert store.names() == [] and store.model is None  # the base is still unwrapped
    store.register("mine", folder / "c.vblora")
    with pytest.raises(ValueError, match="already"):
        store.register("mine", folder / "d.vblora")
    assert store.names() == ["mine"] and store.resident() == ["mine"]
    store.unregister("mine")
    assert store.names() == [] and store.resident() == []
    with pytest.raises(UnknownAdapter):
        store.unregister("mine")


def test_peft_directories_are_adapters_too(tmp_path: pathlib.Path, folder: pathlib.Path) -> None:
    model = load_compact(base_model(), folder / "b.vblora")
    model.save_pretrained(tmp_path / "dir_b")  # our top-k directory
    store = AdapterStore(base_model(), [tmp_path])
    assert store.names() == ["dir_b"]
    with store.pinned(["dir_b"]) as served:
        torch.testing.assert_close(logits(served, ["dir_b"]), alone(folder, "b"))


def test_threads_loading_and_evicting_at_once(folder: pathlib.Path) -> None:
    """Eight threads pin random adapters through a store bounded to two: every pass sees its
    adapters, and each row's output equals that adapter alone."""
    store = AdapterStore(base_model(), [folder], max_adapters=2)
    want = {n: alone(folder, n)[0] for n in "abcd"}

    def work(seed: int) -> int:
        rng = random.Random(seed)
        checked = 0
        for _ in range(6):
            names = rng.sample("abcd", 2)
            with store.pinned(names) as model, store.lock:
                out = logits(model, names)
            for row, name in enumerate(names):
                torch.testing.assert_close(out[row], want[name])
                checked += 1
        return checked

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        assert sum(pool.map(work, range(8))) == 8 * 6 * 2
    assert len(store.resident()) <= 2 and store.stats.evictions > 0
