"""A small OpenAI-compatible upstream that reports token `usage`, for tests and demos behind Envoy.

    python -m ratelimit.tools.openai_upstream --port 9000

`POST /v1/chat/completions` answers a chat.completion whose `usage.total_tokens` is predictable:
`prompt_tokens` is the number of whitespace-separated words in the messages, `completion_tokens` is
`max_completion_tokens` (or `max_tokens`, default 16), and the reply has that many words. With
`"stream": true` it answers server-sent events, one chunk per word, and, as OpenAI does only when
`stream_options.include_usage` is true, a last chunk carrying `usage` before `data: [DONE]`.
`GET /v1/models` lists the one model; `POST /v1/audio/speech` answers audio bytes, a response without
`usage`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
import uuid
from collections.abc import Iterator, Mapping
from typing import Any, Literal

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

DEFAULT_MODEL = "qwen3-8b"
DEFAULT_COMPLETION_TOKENS = 16
MAX_COMPLETION_TOKENS = 100_000
_WORDS = ("the", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog")
SSE_DONE = "data: [DONE]\n\n"
"""The event that ends an OpenAI stream."""


def sse_event(body: Mapping[str, Any]) -> str:
    """One server-sent event carrying `body` as JSON, the frame each OpenAI stream chunk travels in."""
    return f"data: {json.dumps(body)}\n\n"


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return " ".join(part.text for part in self.content)
        return self.content or ""


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # temperature, top_p, ...: accepted and ignored

    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_COMPLETION_TOKENS)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_COMPLETION_TOKENS)
    stream: bool = False
    stream_options: StreamOptions | None = None

    def usage(self) -> dict[str, int]:
        prompt = sum(len(message.text().split()) for message in self.messages)
        completion = self.max_completion_tokens or self.max_tokens or DEFAULT_COMPLETION_TOKENS
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _error(status: int, message: str) -> JSONResponse:
    """OpenAI's error shape."""
    return JSONResponse({"error": {"message": message, "type": "invalid_request_error"}}, status_code=status)


def _field(location: tuple[Any, ...]) -> str:
    """("body", "messages", 0, "role") -> "messages[0].role"; the body itself (bad JSON) -> "body"."""
    path = ""
    for part in location[1:]:
        path += f"[{part}]" if isinstance(part, int) else f".{part}"
    return path.lstrip(".") if path.startswith(".") else "body"


def create_app(model: str = DEFAULT_MODEL) -> FastAPI:
    app = FastAPI(title="OpenAI-compatible test upstream")

    async def invalid(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        first = exc.errors()[0]
        return _error(400, f"{_field(first['loc'])}: {first['msg']}")

    app.add_exception_handler(RequestValidationError, invalid)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model, "object": "model", "created": 0, "owned_by": "ratelimit"}]}

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatRequest) -> JSONResponse | StreamingResponse:
        usage = body.usage()
        words = list(itertools.islice(itertools.cycle(_WORDS), usage["completion_tokens"]))
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            events = _stream(completion_id, body.model, words, usage if include_usage else None)
            return StreamingResponse(events, media_type="text/event-stream")
        return JSONResponse({
            "id": completion_id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.model,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": " ".join(words)},
                "finish_reason": "length",
            }],
            "usage": usage,
        })

    @app.post("/v1/audio/speech", response_model=None)
    async def speech(request: Request) -> Response:
        """A response without token usage (audio bytes), as a non-chat endpoint answers."""
        await request.body()
        return Response(b"ID3" + bytes(253), media_type="audio/mpeg")

    return app


def _stream(completion_id: str, model: str, words: list[str], usage: dict[str, int] | None) -> Iterator[str]:
    """OpenAI's chunk sequence: role, one word per chunk, finish_reason, [usage chunk], [DONE]."""
    created = int(time.time())

    def chunk(choices: list[dict[str, Any]], **extra: Any) -> str:
        return sse_event({"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
                          "choices": choices, **extra})

    # With include_usage, every chunk carries "usage": null and the last one the totals.
    pending = {"usage": None} if usage is not None else {}
    yield chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}], **pending)
    for n, word in enumerate(words):
        delta = {"content": word if n == 0 else f" {word}"}
        yield chunk([{"index": 0, "delta": delta, "finish_reason": None}], **pending)
    yield chunk([{"index": 0, "delta": {}, "finish_reason": "length"}], **pending)
    if usage is not None:
        yield chunk([], usage=usage)
    yield SSE_DONE


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"the model /v1/models lists (default {DEFAULT_MODEL})")
    args = parser.parse_args(argv)
    uvicorn.run(create_app(args.model), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
