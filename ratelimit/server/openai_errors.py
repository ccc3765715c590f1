"""429 answers that OpenAI clients understand, for the Envoy RLS (`raw_body`, `response_headers_to_add`)
and the ext_proc token meter (`ImmediateResponse`).

The official `openai` SDK turns a 429's JSON `{"error": {"message", "type", "code"}}` into its
`RateLimitError` (message, code), and waits `Retry-After` seconds before a retry when that is at most
120 s (it does not retry at all beyond that; `x-should-retry: false` stops it too).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass

from ratelimit.counters import CounterStatus, Decision


@dataclass(frozen=True, slots=True)
class LimitedAnswer:
    body: bytes
    headers: dict[str, str]
    retry_after: int
    """Seconds until every counter that refused has room again (its window resets)."""


def blocking(counters: Sequence[CounterStatus], amount: int) -> list[CounterStatus]:
    """The counters without room for `amount` (outstanding reservations count)."""
    return [status for status in counters if status.value + status.reserved + amount > status.limit.max_value]


def limited_answer(decision: Decision, amount: int = 1, kind: str = "requests") -> LimitedAnswer:
    """The 429 body and headers for a refused decision of `amount` hits or tokens.

    Retry-After is the latest reset among the counters that refused, whole seconds rounded up (at
    least 1): by then each has started a new window. Reservations released earlier may make room
    sooner; the header is never too early. An amount larger than a limit allows in any window can
    never pass: the answer says so and sets `x-should-retry: false`. `kind` is OpenAI's error type,
    "requests" or "tokens".
    """
    refused = blocking(decision.counters, amount) or list(decision.counters)
    retry_after = max(1, math.ceil(max((status.expires_in for status in refused), default=1.0)))
    never = [status for status in refused if amount > status.limit.max_value]
    limit = refused[0].limit if refused else decision.limited_by
    name = (limit.name or f"{limit.max_value} per {limit.seconds}s") if limit is not None else "a rate limit"
    if never:
        too_small = never[0].limit
        message = (f"Rate limit {name!r} allows {too_small.max_value} per {too_small.seconds}s; this request "
                   f"needs {amount}, more than the limit allows in any window. Lower max_tokens.")
    elif limit is not None:
        message = (f"Rate limit {name!r} reached ({limit.max_value} per {limit.seconds}s). "
                   f"Try again in {retry_after}s.")
    else:
        message = f"Rate limit reached. Try again in {retry_after}s."
    document = {"error": {"message": message, "type": kind, "param": None, "code": "rate_limit_exceeded"}}
    headers = {"content-type": "application/json", "retry-after": str(retry_after)}
    if never:
        headers["x-should-retry"] = "false"
    return LimitedAnswer(json.dumps(document).encode("utf-8"), headers, retry_after)
