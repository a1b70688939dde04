"""Continuous batching: requests that arrive while a batch decodes join it between two steps, each
still answered exactly as ``generate`` on its adapter alone, answered as soon as it ends, and its
adapter unpinned then; with ``continuous=False`` they wait for the next batch."""

from __future__ import annotations

import pathlib
import threading

import pytest
from serving_helpers import base_model, char_tokenizer, reference_generate, write_adapters

from vblora.serving.batcher import Batcher, Job, SamplingParams
from vblora.serving.store import AdapterStore

TIMEOUT = 120


class Request:
    """A job and what it received."""

    def __init__(self, adapter: str, prompt: str, max_tokens: int, store: AdapterStore, tokenizer) -> None:
        self.text, self.events, self.done = "", [], threading.Event()
        self.first = threading.Event()
        self.pins_at_done: int | None = None
        self.others_done_at_end: dict[str, bool] = {}
        self.store, self.adapter, self.peers = store, adapter, {}
        self.ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        params = SamplingParams(max_tokens=max_tokens, temperature=0)
        self.job = Job(adapter, self.ids, params, self.sink)

    def sink(self, event) -> None:  # the worker thread
        self.events.append(event.kind)
        if event.kind == "text":
            self.text += event.text
            self.first.set()
        if event.kind in ("done", "error"):
            entry = self.store._resident.get(self.adapter)
            self.pins_at_done = None if entry is None else entry.pins
            self.others_done_at_end = {name: r.done.is_set() for name, r in self.peers.items()}
            self.done.set()


def expected(paths: dict, tokenizer, request: Request, max_tokens: int) -> str:
    path = paths.get(request.adapter)
    return tokenizer.decode(reference_generate(path, request.ids, max_tokens), skip_special_tokens=True)


@pytest.fixture
def served(tmp_path: pathlib.Path):
    paths = write_adapters(tmp_path / "adapters", ["a", "b", "c"])
    store = AdapterStore(base_model(), [tmp_path / "adapters"])
    tokenizer = char_tokenizer()
    yield paths, store, tokenizer


@pytest.mark.parametrize("continuous", [True, False])
def test_requests_arriving_mid_batch_join_it_and_equal_generate_alone(served, continuous) -> None:
    paths, store, tokenizer = served
    batcher = Batcher(store, tokenizer, max_batch=8, max_wait=0, continuous=continuous)
    try:
        long = Request("a", "hi", 48, store, tokenizer)  # a short prompt that decodes for long
        batcher.submit(long.job)
        assert long.first.wait(TIMEOUT)
        # b's prompt is longer than the batch so far (the batch is padded to it); it ends soon, and
        # then that padding is dropped; c joins later with a short prompt (c is padded instead)
        b = Request("b", "a much longer prompt than the first one, by far", 3, store, tokenizer)
        base = Request("__base__", "plain", 5, store, tokenizer)
        b.peers = base.peers = {"long": long}
        batcher.submit(b.job)
        batcher.submit(base.job)
        assert b.done.wait(TIMEOUT) and base.done.wait(TIMEOUT)
        c = Request("c", "xy", 4, store, tokenizer)
        c.peers = {"long": long}
        batcher.submit(c.job)
        assert long.done.wait(TIMEOUT) and c.done.wait(TIMEOUT)
    finally:
        batcher.close(TIMEOUT)
    for request, n in ((long, 48), (b, 3), (base, 5), (c, 4)):
        assert request.events[-1] == "done", request.events
        assert request.text == expected(paths, tokenizer, request, n), request.adapter
    if continuous:
        assert batcher.stats.joined_rows >= 3 and batcher.stats.batches == 1
        # answered when they ended, while the first request was still decoding, and unpinned then
        assert not b.others_done_at_end["long"] and not c.others_done_at_end["long"]
        assert b.pins_at_done == 0 and c.pins_at_done == 0
    else:  # each waited for the batch before it
        assert batcher.stats.joined_rows == 0 and batcher.stats.batches >= 3
        assert b.others_done_at_end["long"] and c.others_done_at_end["long"]


def test_a_joining_request_with_a_bad_adapter_fails_alone(served, tmp_path: pathlib.Path) -> None:
    paths, store, tokenizer = served
    (tmp_path / "adapters" / "broken.vblora").write_bytes(b"not a safetensors file")
    batcher = Batcher(store, tokenizer, max_batch=8, max_wait=0)
    try:
        long = Request("a", "hi", 30, store, tokenizer)
        batcher.submit(long.job)
        assert long.first.wait(TIMEOUT)
        bad, missing = (Request(n, "x", 3, store, tokenizer) for n in ("broken", "nobody"))
        batcher.submit(bad.job)
        batcher.submit(missing.job)
        assert long.done.wait(TIMEOUT) and bad.done.wait(TIMEOUT) and missing.done.wait(TIMEOUT)
    finally:
        batcher.close(TIMEOUT)
    assert bad.events == ["error"] and missing.events == ["error"]
    assert long.events[-1] == "done" and long.text == expected(paths, tokenizer, long, 30)
