"""OpenAI request bodies, checked field by field: what the server accepts, and the 400s it gives.

Pure Python (no HTTP library), so the rules are tested without a server. Fields that OpenAI
defines but this server does not implement are refused when set to anything but their default
(a client never silently gets a different meaning); fields OpenAI does not define are ignored, as
vLLM ignores them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .batcher import SamplingParams

MAX_STOPS = 16
ROLES = ("system", "user", "assistant", "developer", "tool")
# OpenAI fields not implemented here, with the value that means "off".
UNSUPPORTED = {
    "logprobs": (None, False, 0),
    "top_logprobs": (None, 0),
    "echo": (None, False),
    "best_of": (None, 1),
    "suffix": (None, ""),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}),
    "tools": (None, []),
    "tool_choice": (None, "none", "auto"),
    "response_format": (None, {"type": "text"}),
}


class BadRequest(ValueError):
    """A request the server refuses with 400; ``param`` names the field (OpenAI's error shape)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class Parsed:
    """A checked request: the model (adapter) name, the prompts (text or token ids), sampling."""

    model: str
    prompts: list[str | list[int]]
    params: SamplingParams
    stream: bool
    include_usage: bool
    max_tokens_given: bool


def _int(
    body: dict[str, Any], key: str, default: int | None, low: int, high: int | None = None
) -> int | None:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"'{key}' must be an integer, got {value!r}", key)
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise BadRequest(f"'{key}' must be {bound}, got {value}", key)
    return value


def _float(body: dict[str, Any], key: str, default: float, low: float, high: float, open_low: bool) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BadRequest(f"'{key}' must be a number, got {value!r}", key)
    if value > high or value < low or (open_low and value == low):
        side = ">" if open_low else ">="
        raise BadRequest(f"'{key}' must be {side} {low} and <= {high}, got {value}", key)
    return float(value)


def _stops(body: dict[str, Any]) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise BadRequest("'stop' must be a non-empty string or a list of them", "stop")
    if len(stops) > MAX_STOPS:
        raise BadRequest(f"'stop' holds {len(stops)} strings; at most {MAX_STOPS}", "stop")
    return tuple(stops)


def _prompts(body: dict[str, Any]) -> list[str | list[int]]:
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return list(prompt)
        if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return [list(prompt)]
        if all(isinstance(p, list) and p and all(type(t) is int for t in p) for p in prompt):
            return [list(p) for p in prompt]
    raise BadRequest(
        "'prompt' must be a string, a list of strings, a list of token ids or a list of such lists",
        "prompt",
    )


def messages(body: dict[str, Any]) -> list[dict[str, str]]:
    """Chat messages as the tokenizer's template takes them: role and text content."""
    given = body.get("messages")
    if not isinstance(given, list) or not given:
        raise BadRequest("'messages' must be a non-empty list of {role, content} objects", "messages")
    out = []
    for i, m in enumerate(given):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise BadRequest(f"messages[{i}]: needs a 'role', one of {list(ROLES)}", "messages")
        content = m.get("content")
        if isinstance(content, list):  # content parts: only text ones are served
            if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                raise BadRequest(f"messages[{i}]: only text content parts are supported", "messages")
            content = "".join(str(p.get("text", "")) for p in content)
        if not isinstance(content, str):
            raise BadRequest(f"messages[{i}]: 'content' must be a string or a list of text parts", "messages")
        out.append({"role": m["role"], "content": content})
    return out


def parse(body: Any, *, chat: bool, max_tokens: int, max_n: int) -> Parsed:
    """Check a completion (or chat completion) body. ``max_tokens``: the server's bound."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("'model' must name the base model or an adapter", "model")
    for key, off in UNSUPPORTED.items():
        if body.get(key) is not None and body[key] not in off:
            raise BadRequest(f"'{key}' is not supported by this server (only {off[1]!r})", key)
    prompts: list[str | list[int]] = [] if chat else _prompts(body)
    if chat:
        messages(body)  # checked here; rendered by the caller's tokenizer
    key = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    given = _int(body, key, None, 1)
    if given is not None and given > max_tokens:
        raise BadRequest(f"'{key}' is {given}, more than this server's bound of {max_tokens}", key)
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise BadRequest("'stream' must be true or false", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise BadRequest("'stream_options' must be an object", "stream_options")
    ignore_eos = body.get("ignore_eos", False)  # vLLM's extension
    if not isinstance(ignore_eos, bool):
        raise BadRequest("'ignore_eos' must be true or false", "ignore_eos")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise BadRequest(f"'seed' must be an integer, got {seed!r}", "seed")
    params = SamplingParams(
        max_tokens=given if given is not None else (max_tokens if chat else min(16, max_tokens)),
        temperature=_float(body, "temperature", 1.0, 0.0, 2.0, open_low=False),
        top_p=_float(body, "top_p", 1.0, 0.0, 1.0, open_low=True),
        stop=_stops(body),
        seed=seed,
        n=_int(body, "n", 1, 1, max_n) or 1,
        ignore_eos=ignore_eos,
    )
    return Parsed(model, prompts, params, stream, bool(options.get("include_usage")), given is not None)
