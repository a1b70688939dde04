"""``vblora serve``: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over an adapter store.

``model`` in a request names an adapter of the store; the base model's name means no adapter.
Endpoints: ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions`` (``stream: true`` as
server-sent events), vLLM's ``/v1/load_lora_adapter`` and ``/v1/unload_lora_adapter``, ``/health``
and ``/metrics`` (Prometheus text). Errors are JSON in OpenAI's shape ``{"error": {"message",
"type", "param", "code"}}``: 400 for a bad body, 404 for an unknown model (vLLM's ``NotFoundError``),
429 with ``Retry-After`` when the queue is full, 503 while shutting down. SIGTERM stops accepting
connections, finishes the requests in flight, then exits.

FastAPI and uvicorn are imported when an app is built (``pip install vblora[serve]``), never when
the package is imported.
"""

# No `from __future__ import annotations`: FastAPI reads the endpoints' annotations at run time, and
# `Request` is imported inside create_app (FastAPI is optional).
import asyncio
import json
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from ..core.routing import BASE_ADAPTER
from .batcher import Batcher, Closing, Event, Job, QueueFull
from .metrics import escape, metric
from .requests import BadRequest, Parsed, messages, parse
from .store import AdapterLoadError, AdapterStore, UnknownAdapter

MAX_BODY = 4 * 2**20  # bytes of a request body
POLL = 0.25  # seconds between checks that a waiting client is still connected


class HTTPError(Exception):
    """An error response: status, message, OpenAI's ``type`` and ``param``; extra headers."""

    def __init__(
        self, status: int, message: str, kind: str, param: str | None = None, headers: dict | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {
            "error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.status}
        }


def not_found(name: str) -> HTTPError:
    return HTTPError(404, f"The model `{name}` does not exist.", "NotFoundError", "model")


@dataclass
class Engine:
    """What the HTTP layer serves: the store, the batcher, the tokenizer and the limits.

    Args:
        base_name: the name that means "no adapter" in ``model``.
        max_tokens: the most tokens one request may generate.
        max_model_len: the most tokens of prompt plus completion (the model's positions).
    """

    store: AdapterStore
    batcher: Batcher
    tokenizer: Any
    base_name: str
    max_tokens: int = 256
    max_model_len: int = 2048
    started: float = field(default_factory=time.time)
    draining: bool = False
    requests: Counter = field(default_factory=Counter)  # (path, status) -> count

    def adapter_of(self, model: str) -> str:
        """The adapter a request's ``model`` names (``__base__`` for the base), or a 404."""
        if model == self.base_name:
            return BASE_ADAPTER
        if self.store.locate(model) is None:
            self.store.forget_missing(model)
            raise not_found(model)
        return model

    def encode(self, prompt: str | list[int], special: bool) -> list[int]:
        if isinstance(prompt, list):
            vocab = len(self.tokenizer)
            if any(t < 0 or t >= vocab for t in prompt):
                raise BadRequest(f"'prompt' holds token ids outside the vocabulary [0, {vocab})", "prompt")
            return prompt
        with self.batcher.tokenizer_lock:
            return list(self.tokenizer(prompt, add_special_tokens=special)["input_ids"])

    def chat_prompt(self, body: dict[str, Any]) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise BadRequest("this model's tokenizer has no chat template; use /v1/completions", "messages")
        with self.batcher.tokenizer_lock:
            text = self.tokenizer.apply_chat_template(
                messages(body), tokenize=False, add_generation_prompt=True
            )
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def fit(self, ids: list[int], parsed: Parsed) -> int:
        """The request's max_tokens, after checking that prompt plus completion fit the model."""
        if not ids:
            raise BadRequest("the prompt is empty", "prompt")
        room = self.max_model_len - len(ids)
        if (parsed.max_tokens_given and parsed.params.max_tokens > room) or room < 1:
            raise BadRequest(
                f"the prompt has {len(ids)} tokens; with max_tokens={parsed.params.max_tokens} it exceeds "
                f"the model's {self.max_model_len} positions",
                "max_tokens",
            )
        return min(parsed.params.max_tokens, room)

    # ------------------------------------------------------------------ metrics
    def metrics_text(self) -> str:
        s, b = self.store.stats, self.batcher.stats
        rate = b.generated_tokens / b.decode_seconds if b.decode_seconds else 0.0
        requests = [
            f'vblora_requests_total{{path="{escape(p)}",status="{st}"}} {n}'
            for (p, st), n in sorted(self.requests.items())
        ]
        simple = [  # (name, kind, help, value)
            ("vblora_queue_depth", "gauge", "requests waiting", self.batcher.queue_depth),
            ("vblora_running_rows", "gauge", "rows in the batch decoding", self.batcher.running_rows),
            ("vblora_generated_tokens_total", "counter", "tokens generated", b.generated_tokens),
            ("vblora_joined_rows_total", "counter", "rows that joined a batch already decoding",
             b.joined_rows),
            ("vblora_tokens_per_second", "gauge", "generated tokens per decoding second", f"{rate:.6g}"),
            ("vblora_last_batch_tokens_per_second", "gauge", "tokens per second of the last batch",
             f"{b.last_tokens_per_second:.6g}"),
            ("vblora_adapter_loads_total", "counter", "adapters loaded into the model", s.loads),
            ("vblora_adapter_load_failures_total", "counter", "adapter loads refused", s.load_failures),
            ("vblora_adapter_evictions_total", "counter", "adapters evicted (LRU)", s.evictions),
            ("vblora_resident_adapters", "gauge", "adapters in the model", len(self.store.resident())),
            ("vblora_resident_adapter_bytes", "gauge", "bytes of adapter state", self.store.resident_bytes()),
        ]  # fmt: skip
        families = [
            metric("vblora_requests_total", "counter", "HTTP requests by path and status", requests),
            metric(
                "vblora_batch_size", "histogram", "rows per batch", b.batch_sizes.lines("vblora_batch_size")
            ),
            metric(
                "vblora_adapter_load_seconds",
                "histogram",
                "seconds per adapter load",
                s.load_seconds.lines("vblora_adapter_load_seconds"),
            ),
            *(metric(name, kind, text, [f"{name} {value}"]) for name, kind, text, value in simple),
        ]
        return "\n".join(families) + "\n"

    def model_cards(self) -> dict[str, Any]:
        card = {"object": "model", "created": int(self.started), "owned_by": "vblora"}
        base = {"id": self.base_name, **card, "root": self.base_name, "parent": None}
        data = [{**base, "max_model_len": self.max_model_len}]
        for name in self.store.names():
            path = self.store.locate(name)
            data.append({"id": name, **card, "root": str(path), "parent": self.base_name})
        return {"object": "list", "data": data}


# --------------------------------------------------------------------------- responses


def _choice(chat: bool, index: int, text: str, reason: str | None, delta: bool = False) -> dict[str, Any]:
    if not chat:
        return {"index": index, "text": text, "logprobs": None, "finish_reason": reason}
    if delta:
        return {
            "index": index,
            "delta": {"content": text} if text else {},
            "logprobs": None,
            "finish_reason": reason,
        }
    message = {"role": "assistant", "content": text}
    return {"index": index, "message": message, "logprobs": None, "finish_reason": reason}


@dataclass
class _Call:
    """One HTTP request's jobs and the events they send back to the event loop."""

    jobs: list[Job]
    events: asyncio.Queue
    pending: int

    def cancel(self) -> None:
        for job in self.jobs:
            job.cancel()


def _submit(
    engine: Engine, adapter: str, prompts: list[list[int]], parsed: Parsed, limits: list[int]
) -> _Call:
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()

    def sink(event: Event) -> None:  # called on the worker thread
        loop.call_soon_threadsafe(events.put_nowait, event)

    n = parsed.params.n
    jobs = []
    for i, (ids, limit) in enumerate(zip(prompts, limits)):
        params = type(parsed.params)(**{**parsed.params.__dict__, "max_tokens": limit})
        jobs.append(Job(adapter, ids, params, sink, first_choice=i * n))
    call = _Call(jobs, events, len(jobs))
    try:
        for job in jobs:
            engine.batcher.submit(job)
    except QueueFull as err:
        call.cancel()
        raise HTTPError(
            429, f"server busy: {err}; retry later", "rate_limit_error", headers={"Retry-After": "1"}
        ) from None
    except Closing:
        call.cancel()
        raise HTTPError(
            503, "the server is shutting down", "service_unavailable", headers={"Retry-After": "5"}
        ) from None
    return call


def _job_error(err: BaseException | None, model: str) -> HTTPError:
    if isinstance(err, UnknownAdapter):
        return not_found(model)
    if isinstance(err, AdapterLoadError):
        return HTTPError(400, str(err), "invalid_request_error", "model")
    if isinstance(err, ValueError):
        return HTTPError(400, str(err), "invalid_request_error")
    return HTTPError(500, f"generation failed: {type(err).__name__}: {err}", "internal_error")


def create_app(engine: Engine) -> Any:
    """The FastAPI application serving ``engine``."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

    app = FastAPI(title="vblora serve", docs_url=None, redoc_url=None)

    def error_response(err: HTTPError) -> Response:
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.middleware("http")
    async def count(request: Request, call_next: Any) -> Response:
        response = await call_next(request)
        engine.requests[(request.url.path, str(response.status_code))] += 1
        return response

    @app.exception_handler(HTTPError)
    async def http_error(_: Request, err: HTTPError) -> Response:
        return error_response(err)

    @app.exception_handler(404)
    async def unknown_path(request: Request, _: Exception) -> Response:
        return error_response(HTTPError(404, f"no such endpoint: {request.url.path}", "NotFoundError"))

    @app.exception_handler(405)
    async def wrong_method(request: Request, _: Exception) -> Response:
        message = f"{request.method} is not allowed on {request.url.path}"
        return error_response(HTTPError(405, message, "invalid_request_error"))

    async def read_json(request: Request) -> Any:
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > MAX_BODY:
            raise HTTPError(413, f"the request body is over {MAX_BODY} bytes", "invalid_request_error")
        raw = await request.body()
        if len(raw) > MAX_BODY:
            raise HTTPError(413, f"the request body is over {MAX_BODY} bytes", "invalid_request_error")
        try:
            return json.loads(raw)
        except (ValueError, RecursionError) as err:
            raise HTTPError(400, f"the body is not valid JSON: {err}", "invalid_request_error") from None

    @app.get("/health")
    async def health() -> Response:
        if engine.draining:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        return PlainTextResponse(engine.metrics_text(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> Response:
        return JSONResponse(engine.model_cards())

    async def complete(request: Request, chat: bool) -> Response:
        body = await read_json(request)
        try:
            parsed = parse(body, chat=chat, max_tokens=engine.max_tokens, max_n=engine.batcher.max_batch)
            adapter = engine.adapter_of(parsed.model)
            prompts = [engine.chat_prompt(body)] if chat else [engine.encode(p, True) for p in parsed.prompts]
            limits = [engine.fit(ids, parsed) for ids in prompts]
        except BadRequest as err:
            raise HTTPError(400, str(err), "invalid_request_error", err.param) from None
        if len(prompts) * parsed.params.n > engine.batcher.max_batch:
            rows, size = len(prompts) * parsed.params.n, engine.batcher.max_batch
            message = (
                f"{len(prompts)} prompts x n={parsed.params.n} = {rows} rows, more than the batch size {size}"
            )
            raise HTTPError(400, message, "invalid_request_error", "n")
        call = _submit(engine, adapter, prompts, parsed, limits)
        head = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        frame = {
            "id": head,
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": parsed.model,
        }
        try:
            first = await _next_event(call, request)
        except BaseException:
            call.cancel()
            raise
        if first is not None and first.kind == "error":
            call.cancel()
            raise _job_error(first.error, parsed.model)
        if parsed.stream:
            return StreamingResponse(
                _stream(call, request, first, frame, chat, parsed), media_type="text/event-stream"
            )
        try:
            return JSONResponse(await _collect(call, request, first, frame, chat, parsed))
        finally:
            call.cancel()

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await complete(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await complete(request, chat=True)

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: Request) -> Response:
        from starlette.concurrency import run_in_threadpool

        body = await read_json(request)
        name, path = (body.get(k) if isinstance(body, dict) else None for k in ("lora_name", "lora_path"))
        if not isinstance(name, str) or not isinstance(path, str) or not name or not path:
            raise HTTPError(400, "both 'lora_name' and 'lora_path' must be provided", "InvalidUserInput")
        if name == engine.base_name:
            raise HTTPError(400, f"'{name}' is the base model's name", "InvalidUserInput", "lora_name")
        try:
            await run_in_threadpool(engine.store.register, name, path)
        except AdapterLoadError as err:
            raise HTTPError(400, str(err), "BadRequestError", "lora_path") from None
        except ValueError as err:
            status = 400 if "already" in str(err) or "name" in str(err) else 404
            raise HTTPError(
                status, str(err), "BadRequestError" if status == 400 else "NotFoundError"
            ) from None
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: Request) -> Response:
        from starlette.concurrency import run_in_threadpool

        body = await read_json(request)
        name = body.get("lora_name") if isinstance(body, dict) else None
        if not isinstance(name, str) or not name:
            raise HTTPError(400, "'lora_name' must be provided", "InvalidUserInput", "lora_name")
        try:
            await run_in_threadpool(engine.store.unregister, name)
        except UnknownAdapter:
            raise HTTPError(
                404, f"The lora adapter '{name}' cannot be found.", "NotFoundError", "lora_name"
            ) from None
        return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")

    return app


async def _next_event(call: _Call, request: Any) -> Event | None:
    """The next event of the call; None once every job is done. Cancels the jobs (and raises
    CancelledError) when the client has gone."""
    while call.pending:
        try:
            event = await asyncio.wait_for(call.events.get(), POLL)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                call.cancel()
                raise asyncio.CancelledError from None
            continue
        if event.kind in ("done", "error"):
            call.pending -= 1
        return event
    return None


async def _collect(
    call: _Call, request: Any, first: Event | None, frame: dict, chat: bool, parsed: Parsed
) -> dict:
    n = parsed.params.n
    texts = {i: [] for i in range(len(call.jobs) * n)}
    reasons: dict[int, str | None] = dict.fromkeys(texts)
    usage = Counter()
    event = first
    while event is not None:
        if event.kind == "error":
            raise _job_error(event.error, parsed.model)
        if event.kind == "text":
            texts[event.choice].append(event.text)
        elif event.kind == "finish":
            reasons[event.choice] = event.reason
        elif event.kind == "done":
            usage.update(event.usage or {})
        event = await _next_event(call, request)
    choices = [_choice(chat, i, "".join(texts[i]), reasons[i]) for i in texts]
    return {**frame, "choices": choices, "usage": dict(usage)}


async def _stream(
    call: _Call, request: Any, first: Event | None, frame: dict, chat: bool, parsed: Parsed
) -> Any:
    chunk = {**frame, "object": "chat.completion.chunk" if chat else "text_completion"}

    def sse(data: dict) -> str:
        return f"data: {json.dumps(data)}\n\n"

    usage = Counter()
    try:
        if chat:  # OpenAI opens every choice with the assistant's role
            for i in range(len(call.jobs) * parsed.params.n):
                opening = {
                    "index": i,
                    "delta": {"role": "assistant", "content": ""},
                    "logprobs": None,
                    "finish_reason": None,
                }
                yield sse({**chunk, "choices": [opening]})
        event = first
        while event is not None:
            if event.kind == "error":
                yield sse(_job_error(event.error, parsed.model).body())
                break
            if event.kind == "text":
                yield sse({**chunk, "choices": [_choice(chat, event.choice, event.text, None, delta=True)]})
            elif event.kind == "finish":
                yield sse({**chunk, "choices": [_choice(chat, event.choice, "", event.reason, delta=True)]})
            elif event.kind == "done":
                usage.update(event.usage or {})
            event = await _next_event(call, request)
        if parsed.include_usage:
            yield sse({**chunk, "choices": [], "usage": dict(usage)})
        yield "data: [DONE]\n\n"
    finally:  # the client left (the response was cancelled) or the stream ended: free the rows
        call.cancel()


def run_server(engine: Engine, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Serve until SIGINT/SIGTERM: then stop accepting, finish what is in flight, close the batcher."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            engine.draining = True  # /health says so; uvicorn stops listening and drains
            super().handle_exit(sig, frame)

    config = uvicorn.Config(
        create_app(engine), host=host, port=port, log_level=log_level, timeout_graceful_shutdown=60
    )
    try:
        Server(config).run()
    finally:
        engine.batcher.close(timeout=60)
