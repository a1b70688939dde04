"""The batcher: requests for different adapters decoded together, one forward pass per step.

Requests wait in a bounded queue. One worker thread takes up to ``max_batch`` rows (a request with
``n`` choices is ``n`` rows), pins their adapters in the store, left-pads the prompts into one
batch and decodes it token by token; every forward pass is one mixed-adapter pass
(``adapter_names=``, one name per row). Each row samples with its own parameters and its own
generator, so a row's tokens do not depend on the rows beside it. Rows that finish (a stop
string, the end-of-sequence token, ``max_tokens``, or a client that left) leave the batch at once
(their cache rows are dropped) and their request is answered then.

Continuous batching (the default): between two decoding steps, requests waiting in the queue join
the batch already decoding, up to ``max_batch`` rows. Their prompts are prefilled in one pass of
their own, and their key/value cache is then joined to the batch's (the shorter one left-padded,
masked out). With ``continuous=False``, or a model whose cache is not transformers' plain
``DynamicCache``, new requests wait for the next batch instead.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..core.routing import BASE_ADAPTER
from ..model import VBLoRAModel
from .metrics import Histogram
from .store import AdapterLoadError, AdapterStore, UnknownAdapter


class QueueFull(RuntimeError):
    """The request queue is at its bound (HTTP 429 with Retry-After)."""


class Closing(RuntimeError):
    """The batcher is shutting down and takes no new requests (HTTP 503)."""


@dataclass(frozen=True)
class SamplingParams:
    """OpenAI's sampling fields. ``temperature == 0`` is greedy decoding."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    n: int = 1
    ignore_eos: bool = False  # vLLM's extension: run to max_tokens (benchmarks)


@dataclass
class Event:
    """What the worker tells a request: ``kind`` is ``"text"`` (a piece of ``choice``'s text),
    ``"finish"`` (``choice`` ended with ``reason``), ``"done"`` (every choice ended; ``usage``) or
    ``"error"`` (``error``: the request failed, nothing more follows)."""

    kind: str
    choice: int = 0
    text: str = ""
    reason: str | None = None
    usage: dict[str, int] | None = None
    error: BaseException | None = None


@dataclass
class Job:
    """One request: a tokenised prompt for one adapter (``__base__``: none), ``params.n`` choices.

    ``sink`` receives the events, from the worker thread; ``first_choice`` numbers the choices
    (a completion with several prompts is several jobs)."""

    adapter: str
    prompt_ids: list[int]
    params: SamplingParams
    sink: Callable[[Event], None]
    first_choice: int = 0
    cancelled: threading.Event = field(default_factory=threading.Event)
    queued_at: float = field(default_factory=time.perf_counter)

    def cancel(self) -> None:
        """The client left: its rows leave the batch at the next step (or it is never run)."""
        self.cancelled.set()


@dataclass
class _Batch:
    """The rows decoding together and their next step's inputs."""

    rows: list[_Row]  # live rows, in the cache's row order
    ids: Tensor  # (rows, t): the prompts before the first step, then each row's last token
    mask: Tensor  # (rows, cached + t) attention mask, left-padded
    positions: Tensor  # (rows, t) positions of ``ids``
    cache: Any = None


@dataclass
class _Pending:
    """A request in a batch: its rows, and the pin that keeps its adapter loaded until it ends."""

    job: Job
    rows: list[_Row]
    pin: contextlib.ExitStack


@dataclass
class _Row:
    job: Job
    choice: int
    generator: torch.Generator
    ids: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0  # characters of text already sent
    done: bool = False


BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128)


@dataclass
class BatcherStats:
    batches: int = 0
    rows: int = 0
    batch_sizes: Histogram = field(default_factory=lambda: Histogram(BATCH_SIZES))
    joined_rows: int = 0  # rows that joined a batch already decoding (continuous batching)
    generated_tokens: int = 0
    cancelled_rows: int = 0  # rows that left their batch because the client went away
    decode_seconds: float = 0.0
    last_tokens_per_second: float = 0.0


def _safe_length(text: str, stops: Sequence[str]) -> int:
    """How much of ``text`` may be sent: all but a tail that could begin a stop string, or an
    unfinished multi-byte character (decoded as U+FFFD)."""
    hold = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:size]):
                hold = max(hold, size)
                break
    end = len(text) - hold
    while end > 0 and text[end - 1] == "\ufffd":
        end -= 1
    return end


def _find_stop(text: str, stops: Sequence[str]) -> int | None:
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(hits) if hits else None


def sample(logits: Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """One token from a (vocab,) row of logits: greedy at temperature 0, else temperature and
    nucleus (top-p) sampling with ``generator``."""
    if params.temperature == 0:
        return int(logits.argmax())
    probs = (logits.float() / params.temperature).softmax(-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        keep = sorted_probs.cumsum(-1) - sorted_probs < params.top_p  # the first always kept
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


class Batcher:
    """Queues requests and decodes them in mixed-adapter batches on one worker thread.

    Args:
        store: the adapter store whose model runs the batches.
        tokenizer: a transformers tokenizer (decodes the generated tokens).
        max_batch: most rows decoded together.
        max_queue: most requests waiting; beyond it :meth:`submit` raises :class:`QueueFull`.
        max_wait: seconds the worker waits for more requests once one arrived (0: run at once).
        continuous: let waiting requests join the batch already decoding (else they wait for it
            to finish).
        eos_token_ids: tokens that end a choice (default: the model's and the tokenizer's).
    """

    def __init__(
        self,
        store: AdapterStore,
        tokenizer: Any,
        *,
        max_batch: int = 8,
        max_queue: int = 64,
        max_wait: float = 0.002,
        eos_token_ids: Sequence[int] | None = None,
        continuous: bool = True,
    ) -> None:
        if max_batch < 1 or max_queue < 1:
            raise ValueError(f"max_batch and max_queue must be positive, got {max_batch}, {max_queue}")
        self.store = store
        self.tokenizer = tokenizer
        self.tokenizer_lock = threading.Lock()  # a fast tokenizer refuses use from two threads at once
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.max_wait = max_wait
        self.continuous = continuous
        self.eos = set(eos_token_ids if eos_token_ids is not None else _eos_ids(store.base, tokenizer))
        self.pad_id = _pad_id(tokenizer, self.eos)
        self.stats = BatcherStats()
        self._queue: deque[Job] = deque()
        self._cond = threading.Condition()
        self._closing = False
        self._running = 0  # rows in the batch being decoded
        accepted = inspect.signature(store.base.forward).parameters
        self._keep_logits = "logits_to_keep" in accepted
        self._cache_kwarg = "cache" if "cache" in accepted else "past_key_values"  # transformers >= 5.2x
        self._thread = threading.Thread(target=self._work, name="vblora-batcher", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ the queue
    def submit(self, job: Job) -> None:
        """Queue a request.

        Raises:
            ValueError: the request has more choices than a batch holds.
            QueueFull: ``max_queue`` requests are waiting already.
            Closing: the batcher is shutting down.
        """
        if job.params.n > self.max_batch:
            raise ValueError(f"n={job.params.n} is more than the server's batch size {self.max_batch}")
        with self._cond:
            if self._closing:
                raise Closing("the server is shutting down")
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"{len(self._queue)} requests are waiting (the queue's bound)")
            self._queue.append(job)
            self._cond.notify()

    @property
    def queue_depth(self) -> int:
        with self._cond:
            return len(self._queue)

    @property
    def running_rows(self) -> int:
        return self._running

    def close(self, timeout: float | None = None) -> None:
        """Refuse new requests, finish the queued and running ones, stop the worker."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(timeout)

    # ------------------------------------------------------------------ the worker
    def _take(self) -> list[Job] | None:
        """The next batch's jobs (a job's choices stay together), or None when closed and empty."""
        with self._cond:
            while not self._queue:
                if self._closing:
                    return None
                self._cond.wait()
            if self.max_wait > 0 and len(self._queue) < self.max_batch:
                self._cond.wait_for(lambda: len(self._queue) >= self.max_batch, self.max_wait)
            return self._pop(self.max_batch)

    def _pop(self, room: int) -> list[Job]:
        """Waiting jobs of at most ``room`` rows, in order (the caller holds ``_cond``)."""
        jobs, rows = [], 0
        while self._queue and rows + self._queue[0].params.n <= room:
            job = self._queue.popleft()
            if not job.cancelled.is_set():
                jobs.append(job)
                rows += job.params.n
        return jobs

    def _work(self) -> None:
        while True:
            jobs = self._take()
            if jobs is None:
                return
            if jobs:
                self._run(jobs)
            self._running = 0

    def _run(self, jobs: list[Job]) -> None:
        pending: dict[int, _Pending] = {}  # the batch's unanswered requests, by id(job)
        try:
            batch = self._admit(jobs, pending)
            if batch is not None:
                self._decode(batch, pending)
        except Exception as err:  # a bug or an out-of-memory: those requests fail, serving goes on
            for entry in pending.values():
                entry.job.sink(Event("error", error=err))
        finally:
            for entry in pending.values():
                entry.pin.close()

    def _admit(self, jobs: list[Job], pending: dict[int, _Pending]) -> _Batch | None:
        """Pin the jobs' adapters (a bad file fails only its requests) and lay out their prompts as
        a batch's first step; None when no job is left. Each job is in ``pending`` from its start,
        so any failure answers it."""
        ready = []
        for job in jobs:
            entry = pending[id(job)] = _Pending(job, [], contextlib.ExitStack())
            try:
                entry.pin.enter_context(self.store.pinned([job.adapter]))
            except (UnknownAdapter, AdapterLoadError) as err:
                del pending[id(job)]
                job.sink(Event("error", error=err))
                continue
            ready.append(entry)
        if not ready:
            return None
        rows = self._rows([entry.job for entry in ready])
        for entry in ready:
            entry.rows = [r for r in rows if r.job is entry.job]
        prompts = [r.job.prompt_ids for r in rows]
        width = max(len(p) for p in prompts)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, p in enumerate(prompts):  # left padding: every row's next token is at the end
            ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p) :] = 1
        device = next(self.store.base.parameters()).device
        ids, mask = ids.to(device), mask.to(device)
        return _Batch(rows, ids, mask, (mask.cumsum(-1) - 1).clamp_min(0))

    def _rows(self, jobs: list[Job]) -> list[_Row]:
        rows = []
        for job in jobs:
            for i in range(job.params.n):
                seed = job.params.seed + i if job.params.seed is not None else random.getrandbits(63)
                rows.append(_Row(job, job.first_choice + i, torch.Generator().manual_seed(seed)))
        return rows

    @torch.inference_mode()
    def _decode(self, batch: _Batch, pending: dict[int, _Pending]) -> None:
        self.stats.batches += 1
        self.stats.rows += len(batch.rows)
        self.stats.batch_sizes.observe(len(batch.rows))
        start, tokens = time.perf_counter(), 0
        while batch.rows:
            self._running = len(batch.rows)
            tokens += self._step(batch)
            self._answer(pending)
            room = self.max_batch - len(batch.rows)
            if self.continuous and room > 0 and batch.rows and _joinable(batch.cache):
                with self._cond:
                    jobs = self._pop(room)
                joining = self._admit(jobs, pending) if jobs else None
                if joining is not None:
                    tokens += self._step(joining)  # their prefill, in a pass of their own
                    self._answer(pending)
                    if joining.rows:
                        _join(batch, joining)
                        self.stats.rows += len(joining.rows)
                        self.stats.joined_rows += len(joining.rows)
                        self.stats.batch_sizes.observe(len(batch.rows))
        elapsed = time.perf_counter() - start
        self.stats.generated_tokens += tokens
        self.stats.decode_seconds += elapsed
        self.stats.last_tokens_per_second = tokens / elapsed if elapsed > 0 else 0.0

    def _step(self, batch: _Batch) -> int:
        """One forward pass of the batch: every row samples and advances one token; finished rows
        leave it (and its cache). Returns the tokens generated."""
        out = self._forward(batch.rows, batch.ids, batch.mask, batch.positions, batch.cache)
        batch.cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
        logits = out.logits[:, -1, :].float().cpu()  # one copy per step: rows sample on the CPU
        step = []
        for pos, row in enumerate(batch.rows):
            token = sample(logits[pos], row.job.params, row.generator)
            step.append(token)
            self._advance(row, token)
        keep = [pos for pos, row in enumerate(batch.rows) if not row.done]
        mask, positions = batch.mask, batch.positions
        if keep and len(keep) < len(batch.rows):  # finished rows leave the batch and the cache
            index = torch.tensor(keep, dtype=torch.long, device=mask.device)
            batch.cache.batch_select_indices(index)
            mask, positions = mask[index], positions[index]
            # drop the padding no live row needs any more: a batch that rows keep joining stays
            # as long as its longest row, not as long as it has run
            first = int(mask.any(dim=0).nonzero()[0])
            if first > 0 and _joinable(batch.cache):
                for layer in batch.cache.layers:
                    layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]
                mask = mask[:, first:]
        rows = len(batch.rows)
        batch.rows = [batch.rows[pos] for pos in keep]
        if keep:
            batch.ids = torch.tensor([[step[pos]] for pos in keep], dtype=torch.long, device=mask.device)
            batch.mask = torch.cat([mask, mask.new_ones((len(keep), 1))], dim=1)
            batch.positions = positions[:, -1:] + 1
        return rows

    def _answer(self, pending: dict[int, _Pending]) -> None:
        """Answer the requests whose choices have all ended (at once, not when the batch ends), and
        unpin their adapters."""
        for key in [k for k, entry in pending.items() if all(r.done for r in entry.rows)]:
            entry = pending.pop(key)
            entry.pin.close()
            job, mine = entry.job, entry.rows
            if not job.cancelled.is_set():
                usage = {
                    "prompt_tokens": len(job.prompt_ids),
                    "completion_tokens": sum(len(r.ids) for r in mine),
                }
                usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
                job.sink(Event("done", usage=usage))

    def _forward(self, rows: list[_Row], ids: Tensor, mask: Tensor, positions: Tensor, cache: Any) -> Any:
        kwargs: dict[str, Any] = {
            "input_ids": ids,
            "attention_mask": mask,
            "position_ids": positions,
            self._cache_kwarg: cache,
            "use_cache": True,
        }
        if self._keep_logits:
            kwargs["logits_to_keep"] = 1  # no (batch, prompt, vocab) logits for the prompt
        with self.store.lock:  # loads and evictions happen between steps, never during one
            model = self.store.model if self.store.model is not None else self.store.base
            if isinstance(model, VBLoRAModel) and model.peft_config:
                return model(**kwargs, adapter_names=[r.job.adapter for r in rows])
            if any(r.job.adapter != BASE_ADAPTER for r in rows):
                raise RuntimeError("an adapter row reached a model without adapters")  # pins prevent it
            return model(**kwargs)

    def _advance(self, row: _Row, token: int) -> None:
        """Add one token to a row; send what can be sent; finish the row when it is done."""
        params = row.job.params
        if row.job.cancelled.is_set():
            row.done = True
            self.stats.cancelled_rows += 1
            return
        reason = None
        if token in self.eos and not params.ignore_eos:
            reason = "stop"
        else:
            row.ids.append(token)
            with self.tokenizer_lock:
                row.text = self.tokenizer.decode(row.ids, skip_special_tokens=True)
            cut = _find_stop(row.text, params.stop)
            if cut is not None:
                row.text, reason = row.text[:cut], "stop"
            elif len(row.ids) >= params.max_tokens:
                reason = "length"
        end = len(row.text) if reason else _safe_length(row.text, params.stop)
        if end > row.sent:
            row.job.sink(Event("text", row.choice, row.text[row.sent : end]))
            row.sent = end
        if reason:
            row.done = True
            row.job.sink(Event("finish", row.choice, reason=reason))


def _joinable(cache: Any) -> bool:
    """Whether rows can join ``cache``: transformers' plain ``DynamicCache`` (a (rows, heads, seq,
    dim) key and value tensor per layer), not a sliding-window, quantized or static one."""
    layers = getattr(cache, "layers", None)
    return (
        type(cache).__name__ == "DynamicCache"
        and bool(layers)
        and all(type(layer).__name__ == "DynamicLayer" and layer.is_initialized for layer in layers)
    )


def _left_pad(t: Tensor, length: int, dim: int) -> Tensor:
    """``t`` padded with zeros at the start of ``dim`` to ``length``."""
    missing = length - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def _join(batch: _Batch, joining: _Batch) -> None:
    """Append ``joining``'s rows to ``batch`` (both past a step): the shorter cache is left-padded
    with masked-out zeros, so every row's next token stays at the end."""
    width = max(batch.mask.shape[1], joining.mask.shape[1])  # the cache holds width - 1 positions
    for layer, new in zip(batch.cache.layers, joining.cache.layers):
        layer.keys = torch.cat([_left_pad(layer.keys, width - 1, -2), _left_pad(new.keys, width - 1, -2)])
        layer.values = torch.cat(
            [_left_pad(layer.values, width - 1, -2), _left_pad(new.values, width - 1, -2)]
        )
    batch.mask = torch.cat([_left_pad(batch.mask, width, 1), _left_pad(joining.mask, width, 1)])
    batch.ids = torch.cat([batch.ids, joining.ids])
    batch.positions = torch.cat([batch.positions, joining.positions])
    batch.rows = batch.rows + joining.rows


def _eos_ids(model: nn.Module, tokenizer: Any) -> list[int]:
    ids: list[int] = []
    config = getattr(model, "generation_config", None)
    for value in (getattr(config, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(value, int):
            ids.append(value)
        elif isinstance(value, (list, tuple)):
            ids.extend(int(v) for v in value)
    return list(dict.fromkeys(ids))


def _pad_id(tokenizer: Any, eos: set[int]) -> int:
    pad = getattr(tokenizer, "pad_token_id", None)
    return int(pad) if pad is not None else next(itertools.chain(sorted(eos), [0]))
