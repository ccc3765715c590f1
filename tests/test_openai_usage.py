"""The token meter's pure parts: OpenAI request estimates, usage found in JSON and SSE bodies split
anywhere, the usage chunk taken out again, cost expressions, the meter's configuration, and the
OpenAI-shaped 429."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ratelimit.counters import Counter, CounterStatus, Decision
from ratelimit.limits import Limit
from ratelimit.server.ext_proc import MeterConfigError, load_meter_config
from ratelimit.server.openai_errors import limited_answer
from ratelimit.server.openai_usage import (
    CostExpression,
    Estimator,
    NotOpenAI,
    UsageScanner,
    parse_request,
    with_usage_requested,
)
from ratelimit.tools.openai_upstream import SSE_DONE, sse_event

ESTIMATOR = Estimator(bytes_per_token=4, tokens_per_message=4, default_completion_tokens=100, max_reservation=1000)
USAGE = {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}


def _chat(**fields: object) -> bytes:
    return json.dumps({"model": "m", "messages": [{"role": "user", "content": "hello world!"}], **fields}).encode()


def test_request_fields_and_estimate() -> None:
    chat = parse_request(_chat(max_tokens=20, stream=True), ESTIMATOR)
    assert (chat.model, chat.stream, chat.client_wants_usage, chat.max_tokens) == ("m", True, False, 20)
    assert chat.prompt_tokens == 3 + 4  # ceil(12 bytes / 4) + 4 per message
    assert ESTIMATOR.reservation(chat.prompt_tokens, chat.max_tokens) == 27
    # max_completion_tokens wins over the deprecated max_tokens; none: the default; capped.
    assert parse_request(_chat(max_tokens=20, max_completion_tokens=7), ESTIMATOR).max_tokens == 7
    assert ESTIMATOR.reservation(7, None) == 107
    assert ESTIMATOR.reservation(7, 5000) == 1000
    wants = parse_request(_chat(stream=True, stream_options={"include_usage": True}), ESTIMATOR)
    assert wants.client_wants_usage
    # Content parts count too (multi-byte text by its UTF-8 bytes).
    parts = json.dumps({"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "ééé"}]}]})
    assert parse_request(parts.encode(), ESTIMATOR).prompt_tokens == 2 + 4 + 1  # "text" + "ééé" (6 bytes)


@pytest.mark.parametrize("body", [b"not json", b"[1, 2]", b'{"model": 3}', b'{"max_tokens": -1}', b'{"max_tokens": "9"}'])
def test_bodies_that_are_not_openai_requests(body: bytes) -> None:
    with pytest.raises(NotOpenAI):
        parse_request(body, ESTIMATOR)


def test_usage_is_requested_keeping_the_clients_stream_options() -> None:
    chat = parse_request(_chat(stream=True, stream_options={"continuous_usage_stats": False}), ESTIMATOR)
    document = json.loads(with_usage_requested(chat))
    assert document["stream_options"] == {"continuous_usage_stats": False, "include_usage": True}
    assert document["messages"] == chat.document["messages"]


def _sse(usage: bool = True) -> bytes:
    events: list[dict[str, object]] = [
        {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}], "usage": None},
        {"choices": [{"index": 0, "delta": {"content": "héllo"}}], "usage": None},
        {"choices": [{"index": 0, "delta": {"content": " world"}, "finish_reason": "stop"}], "usage": None},
    ]
    if usage:
        events.append({"choices": [], "usage": USAGE})
    return ("".join(map(sse_event, events)) + SSE_DONE).encode()


@pytest.mark.parametrize("size", [1, 2, 7, 64, 10_000])
def test_sse_usage_is_found_wherever_the_chunks_split(size: int) -> None:
    body = _sse()
    scanner = UsageScanner(sse=True)
    chunks = [body[i:i + size] for i in range(0, len(body), size)]
    for n, chunk in enumerate(chunks):
        assert scanner.feed(chunk, n == len(chunks) - 1) is None  # not stripping: forwarded unchanged
    assert scanner.usage == USAGE and scanner.done
    assert scanner.content_bytes == len("héllo world".encode())


@pytest.mark.parametrize("size", [1, 5, 33, 10_000])
def test_the_usage_chunk_the_client_did_not_ask_for_is_taken_out(size: int) -> None:
    body = _sse()
    scanner = UsageScanner(sse=True, strip_usage=True)
    chunks = [body[i:i + size] for i in range(0, len(body), size)]
    forwarded = b"".join(scanner.feed(chunk, n == len(chunks) - 1) or b"" for n, chunk in enumerate(chunks))
    assert scanner.usage == USAGE
    assert forwarded == _sse(usage=False)


def test_json_usage_and_a_json_body_without_it() -> None:
    body = json.dumps({"choices": [{"message": {"content": "hi"}}], "usage": USAGE}).encode()
    scanner = UsageScanner(sse=False)
    scanner.feed(body[:10])
    assert scanner.usage is None
    scanner.feed(body[10:], end_of_stream=True)
    assert scanner.usage == USAGE
    other = UsageScanner(sse=False)
    other.feed(b'{"result": "not openai"}', end_of_stream=True)
    assert other.usage is None
    # total_tokens left out by some servers: the sum.
    partial = UsageScanner(sse=False)
    partial.feed(b'{"usage": {"prompt_tokens": 2, "completion_tokens": 3}}', end_of_stream=True)
    assert partial.usage == {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}


def test_a_stream_left_early_is_never_charged_zero() -> None:
    assert ESTIMATOR.streamed(0, 0) == 1
    assert ESTIMATOR.streamed(7, 9) == 7 + 3


def test_cost_expressions() -> None:
    assert CostExpression().of(USAGE) == 8
    assert CostExpression("prompt_tokens + 4 * completion_tokens").of(USAGE) == 23
    assert CostExpression("double(total_tokens) * 0.5").of(USAGE) == 4
    with pytest.raises(ValueError, match="unknown names"):
        CostExpression("input_tokens * 2")
    with pytest.raises(ValueError, match="not a number"):
        CostExpression("'x'")
    with pytest.raises(ValueError, match="cost expression"):
        CostExpression("total_tokens +")


def test_meter_configuration(tmp_path: Path) -> None:
    default = load_meter_config(None)
    assert default.namespace == "tokens"
    assert default.descriptors_of({"x-user-id": "ann"}, {"model": "m"}) == [{"user_id": "ann", "model": "m"}]
    path = tmp_path / "meter.yaml"
    path.write_text(
        "namespace: llm\n"
        "descriptors:\n  - {user: {header: X-User}, model: {body: model}, tier: {value: gold}}\n"
        "estimate: {bytes_per_token: 3, default_completion_tokens: 64}\n"
        "cost: prompt_tokens + 4 * completion_tokens\n"
        "reservation_ttl_seconds: 60\n"
    )
    config = load_meter_config(path)
    assert config.namespace == "llm" and config.reservation_ttl == 60
    assert config.descriptors_of({"x-user": "bo"}, {}) == [{"user": "bo", "tier": "gold"}]
    assert config.estimator.bytes_per_token == 3 and config.cost.of(USAGE) == 23


@pytest.mark.parametrize(("text", "message"), [
    ("namespaces: x\n", "unknown settings"),
    ("descriptors: [{user: {cookie: x}}]\n", r"descriptors\[0\]\['user'\]"),
    ("estimate: {bytes_per_token: 0}\n", "bytes_per_token"),
    ("estimate: {tokens: 3}\n", "estimate must be"),
    ("cost: tokens\n", "unknown names"),
    ("reservation_ttl_seconds: 0\n", "reservation_ttl_seconds"),
    ("- a\n", "YAML map"),
])
def test_bad_meter_configuration_is_refused_naming_the_field(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "meter.yaml"
    path.write_text(text)
    with pytest.raises(MeterConfigError, match=message) as error:
        load_meter_config(path)
    assert str(path) in str(error.value)


def _status(max_value: int, value: int, expires_in: float, name: str = "per-user", seconds: int = 60) -> CounterStatus:
    limit = Limit(namespace="ns", max_value=max_value, seconds=seconds, name=name, variables=("descriptors[0]['u']",))
    return CounterStatus(Counter(limit, ("ann",)), value, expires_in)


def test_limited_answer_names_the_limit_and_when_it_has_room() -> None:
    roomy, full = _status(1000, 10, 50.5, "daily", 86400), _status(100, 95, 12.2)
    answer = limited_answer(Decision(full.limit, [roomy, full]), amount=10, kind="tokens")
    error = json.loads(answer.body)["error"]
    assert error["code"] == "rate_limit_exceeded" and error["type"] == "tokens"
    assert "'per-user'" in error["message"] and "13s" in error["message"]
    assert answer.headers["retry-after"] == "13" and "x-should-retry" not in answer.headers
    # Two counters without room: the later reset is when both have it.
    both = limited_answer(Decision(full.limit, [_status(1000, 995, 50.5, "daily"), full]), amount=10)
    assert both.retry_after == 51
    # More than the limit holds in any window: retrying cannot help.
    never = limited_answer(Decision(full.limit, [full]), amount=500)
    assert never.headers["x-should-retry"] == "false" and "Lower max_tokens" in json.loads(never.body)["error"]["message"]
