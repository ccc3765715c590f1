"""Envoy RLS v3 messages <-> engine: what the Envoy and the Kuadrant gRPC services share.

Both services take `envoy.service.ratelimit.v3.RateLimitRequest`s: `domain` is the namespace and each
descriptor becomes one string map, `descriptors[i]` in CEL. Both answer `RateLimitResponse`s whose
`statuses` let Envoy's own `enable_x_ratelimit_headers: DRAFT_VERSION_03` write honest headers.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import NamedTuple

from envoy.config.core.v3.base_pb2 import HeaderValue
from envoy.extensions.common.ratelimit.v3.ratelimit_pb2 import RateLimitDescriptor
from envoy.service.ratelimit.v3.rls_pb2 import RateLimitRequest, RateLimitResponse

from ratelimit.counters import CounterStatus, Decision, rate_limit_headers, tightest
from ratelimit.engine import MAX_DELTA, MAX_DESCRIPTORS, MAX_NAMESPACE_LENGTH, InvalidRequest
from ratelimit.server.openai_errors import limited_answer

OK = RateLimitResponse.OK
OVER_LIMIT = RateLimitResponse.OVER_LIMIT
UNKNOWN = RateLimitResponse.UNKNOWN

# DescriptorStatus counts are uint32; larger limits (up to 2**53) are shown saturated.
UINT32_MAX = 2**32 - 1

# Envoy writes a status's window into X-RateLimit-Limit (`10;w=60`) from its unit alone, so only
# windows equal to a unit have one. Any other window (Kuadrant's 5m, say) is sent as UNKNOWN, which
# Envoy leaves out of the `w=` list: rounding 300 s to a MINUTE or an HOUR would state a false
# window, whereas the limit, the remaining budget and the reset time stay exact either way.
_UNITS = {
    1: RateLimitResponse.RateLimit.SECOND,
    60: RateLimitResponse.RateLimit.MINUTE,
    3600: RateLimitResponse.RateLimit.HOUR,
    86400: RateLimitResponse.RateLimit.DAY,
}


class Outcome(NamedTuple):
    """One engine decision, and the positions of the request descriptors it covered."""

    positions: Sequence[int]
    decision: Decision


def namespace_of(domain: str) -> str | None:
    """The namespace a request's `domain` names; None for an empty domain (answered UNKNOWN, as
    Limitador does)."""
    if len(domain) > MAX_NAMESPACE_LENGTH:
        raise InvalidRequest("domain", f"is {len(domain)} characters, at most {MAX_NAMESPACE_LENGTH}")
    return domain or None


def descriptor_maps(descriptors: Sequence[RateLimitDescriptor]) -> list[dict[str, str]]:
    """Each descriptor as a string map (a repeated key keeps its last value, as in Limitador).

    The count is bounded here, before any work per descriptor; the engine bounds the rest.
    """
    if len(descriptors) > MAX_DESCRIPTORS:
        raise InvalidRequest("descriptors", f"{len(descriptors)} descriptors, at most {MAX_DESCRIPTORS} allowed")
    return [{entry.key: entry.value for entry in descriptor.entries} for descriptor in descriptors]


def request_delta(request: RateLimitRequest) -> int:
    """The request-level `hits_addend`: proto3 cannot tell 0 from unset, and Envoy means 1 by both."""
    return request.hits_addend or 1


def checked_amount(value: int, field_name: str) -> int:
    """A uint64 amount from the wire, within what the engine charges at once."""
    if value > MAX_DELTA:
        raise InvalidRequest(field_name, f"must be at most {MAX_DELTA}, got {value}")
    return value


def renumbered(error: InvalidRequest, positions: Sequence[int]) -> InvalidRequest:
    """The engine names `descriptors[i]` of the list it was given; say which request descriptor that is."""
    field_name = re.sub(
        r"^descriptors\[(\d+)\]", lambda match: f"descriptors[{positions[int(match[1])]}]", error.field
    )
    return InvalidRequest(field_name, error.message)


def rls_response(
    descriptor_count: int, outcomes: Sequence[Outcome], with_headers: bool, openai_errors_for: int | None = None
) -> RateLimitResponse:
    """OVER_LIMIT if any decision was limited, else OK, and one status per request descriptor (Envoy
    pairs them by index); with `with_headers` (`-H DRAFT_VERSION_03`), Limitador's X-RateLimit-*
    headers over every counter.

    Limits see all descriptors a decision covered at once (`descriptors[0]`, `descriptors[1]`, ...),
    so a counter belongs to the decision, not to one descriptor: the first descriptor of a decision
    carries its tightest counter, the others its code alone (Envoy skips statuses without
    `current_limit`, so no window is listed twice). Descriptors no decision covered stay UNKNOWN.
    """
    limited = False
    statuses: list[tuple[int, CounterStatus | None]] = [(UNKNOWN, None)] * descriptor_count
    for positions, decision in outcomes:
        limited = limited or decision.limited
        code = OVER_LIMIT if decision.limited else OK
        for n, position in enumerate(positions):
            statuses[position] = (code, tightest(decision.counters) if n == 0 else None)
    response = RateLimitResponse(overall_code=OVER_LIMIT if limited else OK)
    for code, counter in statuses:
        _add_status(response, code, counter)
    if with_headers:
        # A counter decided twice (checked, then charged) is listed once, in its latest state.
        latest = {status.counter: status for _, decision in outcomes for status in decision.counters}
        headers = rate_limit_headers(list(latest.values()))
        response.response_headers_to_add.extend(HeaderValue(key=k, value=v) for k, v in sorted(headers.items()))
    if limited and openai_errors_for is not None:
        refused = next(decision for _, decision in outcomes if decision.limited)
        answer = limited_answer(refused, openai_errors_for)
        response.raw_body = answer.body
        response.response_headers_to_add.extend(HeaderValue(key=k, value=v) for k, v in answer.headers.items())
    return response


def _add_status(response: RateLimitResponse, code: int, counter: CounterStatus | None) -> None:
    # Filled in place: building sub-messages and passing them in would copy each one.
    status = response.statuses.add(code=code)
    if counter is None:
        return
    limit, current = counter.limit, status.current_limit
    current.requests_per_unit = min(limit.max_value, UINT32_MAX)
    current.unit = _UNITS.get(limit.seconds, RateLimitResponse.RateLimit.UNKNOWN)
    current.name = limit.name or ""
    status.limit_remaining = min(counter.remaining, UINT32_MAX)
    # Envoy shows whole seconds: round up, so a client waiting that long finds the window reset.
    status.duration_until_reset.seconds = math.ceil(counter.expires_in)
