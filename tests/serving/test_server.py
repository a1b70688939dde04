"""``vblora serve`` end to end: a real server on 127.0.0.1, the ``openai`` client and raw HTTP.

Every answer is checked against ``generate`` on a fresh model holding that one adapter alone.
"""

from __future__ import annotations

import concurrent.futures
import json
import pathlib
import shutil
import threading
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from serving_helpers import (  # noqa: E402
    base_model,
    char_tokenizer,
    free_port,
    make_adapter,
    reference_generate,
    write_adapters,
)

from vblora.files import save_compact  # noqa: E402
from vblora.serving.batcher import Batcher  # noqa: E402
from vblora.serving.server import Engine, create_app  # noqa: E402
from vblora.serving.store import AdapterStore  # noqa: E402

BASE = "tiny-llama"
NAMES = ["alice", "bob", "carol"]


class Running:
    """A server in a thread of this process; stopped by the fixture."""

    def __init__(self, engine: Engine) -> None:
        import uvicorn

        self.engine = engine
        self.port = free_port()
        config = uvicorn.Config(create_app(engine), host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"
        self.client = openai.OpenAI(base_url=f"{self.url}/v1", api_key="none", max_retries=0, timeout=60)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(20)
        self.engine.batcher.close(timeout=20)


def start(folder: pathlib.Path, *, step_seconds: float = 0.0, max_tokens: int = 24, **bounds: int) -> Running:
    """A server over ``folder``; ``step_seconds`` slows every forward pass (to catch a batch mid-way)."""
    tokenizer = char_tokenizer()
    base = base_model()
    if step_seconds:
        base.register_forward_pre_hook(lambda *_: time.sleep(step_seconds))
    store = AdapterStore(base, [folder], max_adapters=bounds.pop("max_adapters", 8))
    batcher = Batcher(
        store, tokenizer, max_batch=bounds.pop("max_batch", 8), max_queue=bounds.pop("max_queue", 64)
    )
    return Running(Engine(store, batcher, tokenizer, BASE, max_tokens=max_tokens, max_model_len=64))


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, pathlib.Path]:
    return write_adapters(tmp_path_factory.mktemp("adapters"), NAMES)


@pytest.fixture(scope="module")
def server(adapters: dict[str, pathlib.Path]):
    running = start(next(iter(adapters.values())).parent)
    yield running
    running.stop()


def ids(text: str) -> list[int]:
    return char_tokenizer()(text, add_special_tokens=False)["input_ids"]


def expected(adapters: dict, model: str, prompt: str, tokens: int) -> str:
    path = None if model == BASE else adapters[model]
    return char_tokenizer().decode(reference_generate(path, ids(prompt), tokens), skip_special_tokens=True)


def test_models_lists_base_and_every_adapter(server: Running) -> None:
    cards = {m.id: m for m in server.client.models.list().data}
    assert set(cards) == {BASE, *NAMES}
    assert cards["alice"].parent == BASE and cards[BASE].parent is None


@pytest.mark.parametrize("model", [BASE, *NAMES])
def test_completion_equals_generate_on_that_adapter_alone(
    server: Running, adapters: dict, model: str
) -> None:
    out = server.client.completions.create(model=model, prompt="hello", max_tokens=10, temperature=0)
    assert out.choices[0].text == expected(adapters, model, "hello", 10)
    assert out.choices[0].finish_reason == "length"
    assert out.usage.prompt_tokens == 5 and out.usage.completion_tokens == 10


def test_adapters_answer_differently(server: Running) -> None:
    texts = {
        m: server.client.completions.create(model=m, prompt="abc", max_tokens=8, temperature=0)
        .choices[0]
        .text
        for m in [BASE, *NAMES]
    }
    assert len(set(texts.values())) == 4


def test_chat_uses_the_chat_template(server: Running, adapters: dict) -> None:
    messages = [{"role": "user", "content": "hi"}]
    out = server.client.chat.completions.create(model="bob", messages=messages, max_tokens=6, temperature=0)
    prompt = char_tokenizer().apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == "<user>hi\n<assistant>"
    assert out.choices[0].message.content == expected(adapters, "bob", prompt, 6)
    assert out.choices[0].message.role == "assistant"


def test_streaming_equals_the_whole_answer(server: Running, adapters: dict) -> None:
    stream = server.client.completions.create(
        model="carol", prompt="stream me", max_tokens=12, temperature=0, stream=True
    )
    pieces, reasons = [], []
    for chunk in stream:
        pieces.append(chunk.choices[0].text)
        reasons.append(chunk.choices[0].finish_reason)
    assert len(pieces) > 2  # token by token, not one piece
    assert "".join(pieces) == expected(adapters, "carol", "stream me", 12)
    assert reasons[-1] == "length" and set(reasons[:-1]) == {None}


def test_chat_streaming(server: Running, adapters: dict) -> None:
    messages = [{"role": "user", "content": "yo"}]
    stream = server.client.chat.completions.create(
        model="alice",
        messages=messages,
        max_tokens=6,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    prompt = char_tokenizer().apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == expected(adapters, "alice", prompt, 6)
    assert chunks[-1].usage.completion_tokens == 6


def test_stop_strings_cut_the_text(server: Running, adapters: dict) -> None:
    full = expected(adapters, "alice", "hello", 20)
    stop = full[5:7]
    out = server.client.completions.create(
        model="alice", prompt="hello", max_tokens=20, temperature=0, stop=[stop]
    )
    assert out.choices[0].text == full[: full.index(stop)]
    assert out.choices[0].finish_reason == "stop"
    stream = server.client.completions.create(
        model="alice", prompt="hello", max_tokens=20, temperature=0, stop=stop, stream=True
    )
    assert "".join(c.choices[0].text for c in stream) == full[: full.index(stop)]


def test_seeded_sampling_repeats_and_n_gives_distinct_choices(server: Running) -> None:
    def draw() -> list[str]:
        out = server.client.completions.create(
            model="bob", prompt="x", max_tokens=12, temperature=1.5, top_p=0.95, n=3, seed=7
        )
        return [c.text for c in sorted(out.choices, key=lambda c: c.index)]

    first = draw()
    assert draw() == first
    assert len(set(first)) > 1


def test_concurrent_requests_equal_sequential_ones(server: Running) -> None:
    """Threads send mixed-adapter requests at once; each answer equals the same request alone."""
    work = [(m, p) for m in [BASE, *NAMES] for p in ("one", "two three", "four five six")]

    def ask(item: tuple[str, str]) -> str:
        model, prompt = item
        return (
            server.client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0)
            .choices[0]
            .text
        )

    sequential = [ask(item) for item in work]
    batches_before = server.engine.batcher.stats.batches
    with concurrent.futures.ThreadPoolExecutor(len(work)) as pool:
        concurrent_answers = list(pool.map(ask, work))
    assert concurrent_answers == sequential
    assert server.engine.batcher.stats.batches - batches_before < len(work)  # some ran together


def test_multiple_prompts_in_one_completion(server: Running, adapters: dict) -> None:
    out = server.client.completions.create(model="carol", prompt=["ab", "cde"], max_tokens=5, temperature=0)
    texts = [c.text for c in sorted(out.choices, key=lambda c: c.index)]
    assert texts == [expected(adapters, "carol", p, 5) for p in ("ab", "cde")]


# ------------------------------------------------------------------------------------------ errors


def post(server: Running, path: str, body: object, raw: bytes | None = None) -> httpx.Response:
    content = raw if raw is not None else json.dumps(body).encode()
    headers = {"content-type": "application/json"}
    return httpx.post(f"{server.url}{path}", content=content, headers=headers, timeout=30)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": BASE, "prompt": "x", "max_tokens": -1}, "max_tokens"),
        ({"model": BASE, "prompt": "x", "max_tokens": 10_000}, "max_tokens"),
        ({"model": BASE, "prompt": "x", "temperature": "hot"}, "temperature"),
        ({"model": BASE, "prompt": "x", "top_p": 0}, "top_p"),
        ({"model": BASE, "prompt": "x", "n": 0}, "n"),
        ({"model": BASE, "prompt": "x", "n": 99}, "n"),
        ({"model": BASE, "prompt": "x", "stop": 3}, "stop"),
        ({"model": BASE, "prompt": "x", "stream": "yes"}, "stream"),
        ({"model": BASE, "prompt": "x", "logprobs": 2}, "logprobs"),
        ({"model": BASE, "prompt": 5}, "prompt"),
        ({"model": BASE, "prompt": [999]}, "prompt"),
        ({"model": BASE, "prompt": "y" * 70}, "max_tokens"),
        ({"prompt": "x"}, "model"),
        ([1, 2], None),
    ],
)
def test_bad_fields_are_400_in_openai_shape(server: Running, body: object, param: str | None) -> None:
    r = post(server, "/v1/completions", body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"]


def test_invalid_json_is_400_and_the_server_keeps_serving(server: Running) -> None:
    for raw in (b"{not json", b"", b'{"model": "tiny-llama", "prompt": "x"', b"\xff\xfe"):
        r = post(server, "/v1/completions", None, raw=raw)
        assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = post(
        server, "/v1/chat/completions", {"model": BASE, "messages": [{"role": "wizard", "content": "x"}]}
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    assert server.client.completions.create(model=BASE, prompt="ok", max_tokens=2).choices[0].text is not None


def test_unknown_adapter_is_404_in_vllms_shape(server: Running) -> None:
    with pytest.raises(openai.NotFoundError):
        server.client.completions.create(model="nobody", prompt="x", max_tokens=2)
    for name in ("nobody", "../alice", "alice/../../etc"):
        r = post(server, "/v1/completions", {"model": name, "prompt": "x"})
        assert r.status_code == 404
        assert r.json()["error"] == {
            "message": f"The model `{name}` does not exist.",
            "type": "NotFoundError",
            "param": "model",
            "code": 404,
        }


def test_a_corrupt_adapter_is_that_requests_error(tmp_path: pathlib.Path, adapters: dict) -> None:
    folder = tmp_path / "ad"
    folder.mkdir()
    shutil.copy(adapters["alice"], folder / "good.vblora")
    (folder / "broken.vblora").write_bytes(adapters["bob"].read_bytes()[:200])
    running = start(folder)
    try:
        r = post(running, "/v1/completions", {"model": "broken", "prompt": "x", "max_tokens": 3})
        assert r.status_code == 400 and "broken" in r.json()["error"]["message"]
        out = running.client.completions.create(model="good", prompt="hello", max_tokens=10, temperature=0)
        assert out.choices[0].text == expected(adapters, "alice", "hello", 10)
        assert running.engine.store.stats.load_failures == 1
    finally:
        running.stop()


def test_files_added_replaced_and_removed_while_serving(tmp_path: pathlib.Path, adapters: dict) -> None:
    folder = tmp_path / "live"
    folder.mkdir()
    running = start(folder)
    try:

        def ask():
            return running.client.completions.create(model="new", prompt="hello", max_tokens=8, temperature=0)

        with pytest.raises(openai.NotFoundError):
            ask()
        shutil.copy(adapters["alice"], folder / "new.vblora")
        assert ask().choices[0].text == expected(adapters, "alice", "hello", 8)
        time.sleep(0.01)  # a new mtime even on coarse clocks
        save_compact(make_adapter(1), folder / "new.vblora")  # bob's adapter, under the same name
        assert ask().choices[0].text == expected(adapters, "bob", "hello", 8)
        (folder / "new.vblora").unlink()
        with pytest.raises(openai.NotFoundError):
            ask()
        assert "new" not in running.engine.store.resident()
    finally:
        running.stop()


def test_load_and_unload_lora_adapter(server: Running, adapters: dict) -> None:
    body = {"lora_name": "extra", "lora_path": str(adapters["carol"])}
    r = post(server, "/v1/load_lora_adapter", body)
    assert r.status_code == 200 and "added successfully" in r.text
    assert post(server, "/v1/load_lora_adapter", body).status_code == 400  # already loaded
    assert "extra" in {m.id for m in server.client.models.list().data}
    out = server.client.completions.create(model="extra", prompt="hello", max_tokens=6, temperature=0)
    assert out.choices[0].text == expected(adapters, "carol", "hello", 6)
    assert post(server, "/v1/unload_lora_adapter", {"lora_name": "extra"}).status_code == 200
    assert post(server, "/v1/unload_lora_adapter", {"lora_name": "extra"}).status_code == 404
    r = post(server, "/v1/load_lora_adapter", {"lora_name": "gone", "lora_path": "/no/such/file.vblora"})
    assert r.status_code == 404
    assert post(server, "/v1/load_lora_adapter", {"lora_name": "x"}).status_code == 400


def test_health_and_metrics(server: Running) -> None:
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    server.client.completions.create(model="alice", prompt="m", max_tokens=2)
    text = httpx.get(f"{server.url}/metrics").text
    for name in (
        "vblora_requests_total",
        "vblora_queue_depth",
        "vblora_batch_size_bucket",
        "vblora_generated_tokens_total",
        "vblora_joined_rows_total",
        "vblora_tokens_per_second",
        "vblora_adapter_loads_total",
        "vblora_adapter_evictions_total",
        "vblora_adapter_load_seconds_count",
    ):
        assert f"\n{name}" in f"\n{text}", name
    assert 'vblora_requests_total{path="/v1/completions",status="200"}' in text


def test_a_full_queue_is_429_with_retry_after(tmp_path: pathlib.Path, adapters: dict) -> None:
    running = start(adapters["alice"].parent, step_seconds=0.02, max_batch=1, max_queue=1)
    try:
        body = {"model": "alice", "prompt": "q", "max_tokens": 24, "temperature": 0}
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            responses = list(pool.map(lambda _: post(running, "/v1/completions", body), range(6)))
        codes = sorted(r.status_code for r in responses)
        assert 200 in codes and 429 in codes and set(codes) <= {200, 429}
        refused = next(r for r in responses if r.status_code == 429)
        assert refused.headers["retry-after"] and refused.json()["error"]["code"] == 429
    finally:
        running.stop()


def test_a_client_that_leaves_frees_its_rows(adapters: dict) -> None:
    running = start(adapters["alice"].parent, step_seconds=0.02, max_tokens=60)
    try:
        body = {"model": "bob", "prompt": "l", "max_tokens": 60, "stream": True, "temperature": 0}
        with httpx.stream("POST", f"{running.url}/v1/completions", json=body, timeout=30) as r:
            next(r.iter_lines())  # the first token arrived; now leave
        stats = running.engine.batcher.stats
        deadline = time.monotonic() + 10
        while not stats.cancelled_rows:
            assert time.monotonic() < deadline, "the abandoned row kept decoding"
            time.sleep(0.02)
        assert stats.generated_tokens < 30  # it stopped long before its 60 tokens (1.2 s)
        r = post(running, "/v1/completions", {"model": "bob", "prompt": "l", "max_tokens": 3})
        assert r.status_code == 200  # the slot is free again
    finally:
        running.stop()
