"""OpenAI chat-completion bodies for the token meter: what a request may cost, what a response used.

Pure (bytes in, numbers out), so it is tested without Envoy; `ext_proc.py` feeds it what Envoy sends.

- `parse_request` reads a request body: model, stream, whether the client asked for the usage chunk,
  its max tokens, and an estimate of the prompt's tokens (`Estimator`).
- `UsageScanner` reads a response body chunk by chunk as it passes, JSON or server-sent events, and
  finds `usage` (never buffering a stream: only an incomplete SSE line is kept between chunks). It
  also counts the streamed content, the basis of the estimate for a stream the client left before
  any usage arrived, and can take the final usage chunk out of a stream whose client did not ask
  for it (the meter asked on its behalf).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import cel as cel_library

USAGE_FIELDS = ("prompt_tokens", "completion_tokens", "total_tokens")

# A JSON (non-streamed) response is kept whole to read its usage at the end; past this it is not
# read (and is charged its estimate): a chat completion is far smaller.
MAX_JSON_RESPONSE_BYTES = 8 << 20
# An SSE line longer than this is not an OpenAI chunk: stop looking into it (and stop stripping).
MAX_SSE_LINE_BYTES = 1 << 20


class NotOpenAI(ValueError):
    """A request body that is not an OpenAI chat/completions request; the meter passes it through."""


@dataclass(frozen=True, slots=True)
class Estimator:
    """How many tokens a request may use before its response says: the reservation's size.

    prompt estimate = per message, ceil(UTF-8 bytes of its text / bytes_per_token) + tokens_per_message;
    reservation = prompt estimate + (max_completion_tokens or max_tokens or default_completion_tokens),
    at most max_reservation. A smaller bytes_per_token reserves more (safer against overshoot);
    OpenAI's tokenizers average about 4 bytes of English per token.
    """

    bytes_per_token: float = 4.0
    tokens_per_message: int = 4
    default_completion_tokens: int = 256
    max_reservation: int = 16384

    def __post_init__(self) -> None:
        if not self.bytes_per_token > 0:
            raise ValueError(f"bytes_per_token must be more than 0, got {self.bytes_per_token}")
        for name in ("tokens_per_message", "default_completion_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be 0 or more, got {getattr(self, name)}")
        if self.max_reservation < 1:
            raise ValueError(f"max_reservation must be at least 1, got {self.max_reservation}")

    def tokens(self, text_bytes: int) -> int:
        return math.ceil(text_bytes / self.bytes_per_token)

    def reservation(self, prompt_tokens: int, max_tokens: int | None) -> int:
        completion = max_tokens if max_tokens is not None else self.default_completion_tokens
        return max(1, min(prompt_tokens + completion, self.max_reservation))

    def streamed(self, prompt_tokens: int, content_bytes: int) -> int:
        """What a stream the client left before any usage arrived is charged: the prompt estimate and
        the content streamed so far, at least 1 (the upstream did work)."""
        return max(1, prompt_tokens + self.tokens(content_bytes))


@dataclass(frozen=True, slots=True)
class ChatRequest:
    document: dict[str, Any]
    model: str | None
    stream: bool
    client_wants_usage: bool
    """The client itself set stream_options.include_usage (then its usage chunk is left alone)."""
    max_tokens: int | None
    prompt_tokens: int
    """The estimate of the prompt's tokens."""


def parse_request(body: bytes, estimator: Estimator) -> ChatRequest:
    """The request's fields the meter needs; NotOpenAI when the body is no chat/completions request."""
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError) as error:
        raise NotOpenAI(f"request body is not JSON: {error}") from None
    if not isinstance(document, dict):
        raise NotOpenAI("request body is not a JSON object")
    model = document.get("model")
    if model is not None and not isinstance(model, str):
        raise NotOpenAI("model is not a string")
    max_tokens = document.get("max_completion_tokens")
    if max_tokens is None:
        max_tokens = document.get("max_tokens")
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 0):
        raise NotOpenAI(f"max tokens is not a whole number: {max_tokens!r}")
    stream = document.get("stream") is True
    options = document.get("stream_options")
    wants_usage = stream and isinstance(options, dict) and options.get("include_usage") is True
    return ChatRequest(document, model, stream, wants_usage, max_tokens, _prompt_tokens(document, estimator))


def _prompt_tokens(document: dict[str, Any], estimator: Estimator) -> int:
    messages = document.get("messages")
    if isinstance(messages, list):
        return sum(estimator.tokens(_text_bytes(m)) + estimator.tokens_per_message for m in messages)
    prompt = document.get("prompt", document.get("input"))  # completions / responses shapes
    return estimator.tokens(_text_bytes(prompt)) if prompt is not None else 0


def _text_bytes(value: Any) -> int:
    """UTF-8 bytes of the text in a message (content strings, content parts, tool arguments)."""
    if isinstance(value, str):
        return len(value.encode("utf-8"))
    if isinstance(value, dict):
        return sum(_text_bytes(item) for key, item in value.items() if key != "role")
    if isinstance(value, list):
        return sum(_text_bytes(item) for item in value)
    return 0


def with_usage_requested(request: ChatRequest) -> bytes:
    """The request body with stream_options.include_usage set, so the stream ends with its usage."""
    options = request.document.get("stream_options")
    document = {**request.document, "stream_options": {**(options if isinstance(options, dict) else {}),
                                                      "include_usage": True}}
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


class CostExpression:
    """What a response is charged, as CEL over prompt_tokens, completion_tokens and total_tokens
    (default `total_tokens`; e.g. `prompt_tokens + 4 * completion_tokens`). The result is rounded
    up to a whole number of at least 0."""

    def __init__(self, source: str = "total_tokens") -> None:
        self.source = source
        self._identity = source.strip() == "total_tokens"
        try:
            self._program = cel_library.compile(source)
        except ValueError as error:
            raise ValueError(f"cost expression {source!r}: {error}") from None
        unknown = sorted(set(self._program.variables()) - set(USAGE_FIELDS))
        if unknown:
            raise ValueError(f"cost expression {source!r}: unknown names {unknown}; use {', '.join(USAGE_FIELDS)}")
        self.of({"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3})  # a type error shows now

    def of(self, usage: dict[str, int]) -> int:
        if self._identity:
            return usage["total_tokens"]
        try:
            value = self._program.execute(dict(usage))
        except Exception as error:
            raise ValueError(f"cost expression {self.source!r} failed on {usage}: {error}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"cost expression {self.source!r} gave {value!r}, not a number")
        return max(0, math.ceil(value))


def usage_of(value: Any) -> dict[str, int] | None:
    """An OpenAI `usage` object's counts; None unless it has whole-number token counts."""
    if not isinstance(value, dict):
        return None
    prompt, completion = value.get("prompt_tokens", 0), value.get("completion_tokens", 0)
    total = value.get("total_tokens")
    if total is None and isinstance(prompt, int) and isinstance(completion, int):
        total = prompt + completion  # some servers leave total_tokens out
    counts = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": total}
    if all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in counts.values()):
        return counts
    return None


@dataclass(slots=True)
class UsageScanner:
    """Finds `usage` in a response body as its chunks pass.

    `sse`: the body is a server-sent event stream; otherwise one JSON document. With `strip_usage`,
    `feed` returns the chunk without the final usage-only event (choices empty, usage set), which
    the client did not ask for; otherwise it returns None (forward the chunk unchanged).
    """

    sse: bool
    strip_usage: bool = False
    usage: dict[str, int] | None = None
    content_bytes: int = 0
    """UTF-8 bytes of streamed content (delta content, refusals, tool-call arguments) seen so far."""
    done: bool = False
    """`data: [DONE]` seen."""
    overflowed: bool = False
    _pending: bytearray = field(default_factory=bytearray)
    _dropping_event: bool = False

    def feed(self, chunk: bytes, end_of_stream: bool = False) -> bytes | None:
        if not self.sse:
            self._feed_json(chunk, end_of_stream)
            return None
        return self._feed_sse(chunk, end_of_stream)

    # -- JSON ------------------------------------------------------------------------------------

    def _feed_json(self, chunk: bytes, end_of_stream: bool) -> None:
        if self.overflowed:
            return
        self._pending += chunk
        if len(self._pending) > MAX_JSON_RESPONSE_BYTES:
            self.overflowed = True
            self._pending = bytearray()
            return
        if end_of_stream:
            try:
                document = json.loads(self._pending)
            except (ValueError, UnicodeDecodeError):
                document = None
            self._pending = bytearray()
            if isinstance(document, dict):
                self.usage = usage_of(document.get("usage"))

    # -- server-sent events ----------------------------------------------------------------------

    def _feed_sse(self, chunk: bytes, end_of_stream: bool) -> bytes | None:
        if self.overflowed:
            return None
        data = bytes(self._pending) + chunk if self._pending else chunk
        last_newline = data.rfind(b"\n")
        complete, rest = (data[: last_newline + 1], data[last_newline + 1:]) if last_newline >= 0 else (b"", data)
        if end_of_stream:
            complete, rest = data, b""
        if len(rest) > MAX_SSE_LINE_BYTES:
            # Not a stream of OpenAI chunks: forward what was held back and stop looking.
            self.overflowed = True
            self._pending = bytearray()
            return data if self.strip_usage else None
        self._pending = bytearray(rest)
        kept: list[bytes] = []
        for line in complete.splitlines(keepends=True):
            if self._line(line) and self.strip_usage:
                kept.append(line)
        return b"".join(kept) if self.strip_usage else None

    def _line(self, line: bytes) -> bool:
        """Reads one SSE line; whether it stays in the stream forwarded to the client."""
        stripped = line.strip()
        if not stripped:  # the blank line that ends an event
            if self._dropping_event:
                self._dropping_event = False
                return False
            return True
        if self._dropping_event:
            return False
        if not stripped.startswith(b"data:"):
            return True
        payload = stripped[5:].strip()
        if payload == b"[DONE]":
            self.done = True
            return True
        try:
            event = json.loads(payload)
        except (ValueError, UnicodeDecodeError):
            return True
        if not isinstance(event, dict):
            return True
        usage = usage_of(event.get("usage"))
        choices = event.get("choices")
        if usage is not None:
            self.usage = usage
            if self.strip_usage and not choices:
                self._dropping_event = True
                return False
        if isinstance(choices, list):
            self.content_bytes += sum(_delta_bytes(choice) for choice in choices)
        return True


def _delta_bytes(choice: Any) -> int:
    if not isinstance(choice, dict):
        return 0
    delta = choice.get("delta")
    if not isinstance(delta, dict):
        return 0
    return _text_bytes({key: delta.get(key) for key in ("content", "refusal", "reasoning_content", "tool_calls")})
