"""Kuadrant RLS v1: `kuadrant.service.ratelimit.v1.RateLimitService` over the engine.

The Kuadrant wasm-shim checks on the request path (CheckRateLimit, `hits_addend` 0) and reports the
used tokens when the response ends (Report); Reserve / Commit close the race in which many in-flight
requests all pass the check (ratelimit/proto/kuadrantrls.proto). Every descriptor is decided together,
bound as CEL `descriptors`, with the request-level `hits_addend`.

Unlike Limitador, CheckRateLimit honours `hits_addend` (room for that many, 0 and 1 alike), and
CheckRateLimit and Report fill `statuses` (and, with `-H DRAFT_VERSION_03`, the rate-limit headers),
which Limitador leaves empty (Kuadrant/limitador#436).
"""

from __future__ import annotations

from envoy.service.ratelimit.v3.rls_pb2 import RateLimitRequest, RateLimitResponse

from ratelimit.counters import Decision
from ratelimit.engine import InvalidRequest
from ratelimit.proto.kuadrantrls_pb2 import CommitRequest, CommitResponse, ReserveRequest, ReserveResponse
from ratelimit.server.rls import (
    OK,
    OVER_LIMIT,
    UNKNOWN,
    Outcome,
    checked_amount,
    descriptor_maps,
    namespace_of,
    request_delta,
    rls_response,
)
from ratelimit.server.state import Service


def _descriptors(request: RateLimitRequest | ReserveRequest | CommitRequest) -> list[dict[str, str]]:
    for i, descriptor in enumerate(request.descriptors):
        # Silently ignoring it would charge an amount the caller did not ask for.
        if descriptor.HasField("hits_addend"):
            raise InvalidRequest(
                f"descriptors[{i}].hits_addend", "not used by the Kuadrant service; set the request's hits_addend"
            )
    return descriptor_maps(request.descriptors)


class KuadrantRateLimitService:
    def __init__(self, service: Service) -> None:
        self.service = service

    async def check_rate_limit(self, request: RateLimitRequest) -> RateLimitResponse:
        """Read-only: OK while every counter has room for `hits_addend` (0 counts as 1)."""
        namespace = namespace_of(request.domain)
        if namespace is None:
            return RateLimitResponse(overall_code=UNKNOWN)
        descriptors = _descriptors(request)
        decision = await self.service.engine.check(namespace, descriptors, request_delta(request))
        if decision.limited:
            self.service.metrics.record_limited(namespace, descriptors, decision.limited_by)
        else:
            self.service.metrics.record_authorized(namespace, descriptors, 0)
        return self._response(descriptors, decision)

    async def report(self, request: RateLimitRequest) -> RateLimitResponse:
        """Charge `hits_addend` (0 counts as 1), even past the limit; always OK."""
        namespace = namespace_of(request.domain)
        if namespace is None:
            return RateLimitResponse(overall_code=UNKNOWN)
        descriptors = _descriptors(request)
        hits = request_delta(request)
        decision = await self.service.engine.report(namespace, descriptors, hits)
        self.service.metrics.record_reported(namespace, descriptors, hits)
        return self._response(descriptors, decision)

    async def reserve(self, request: ReserveRequest) -> ReserveResponse:
        """Hold `amount` if it fits. An amount of 0 counts as 1: holding nothing would admit a caller
        whose budget is spent."""
        namespace = namespace_of(request.domain)
        if namespace is None:
            return ReserveResponse(code=UNKNOWN)
        descriptors = _descriptors(request)
        amount = checked_amount(request.amount, "amount")  # the engine holds at least 1
        ttl = request.ttl.seconds + request.ttl.nanos / 1e9
        try:
            decision = await self.service.engine.reserve(namespace, descriptors, amount, ttl)
        except InvalidRequest as error:
            if error.field == "ttl_seconds":  # the HTTP API's name for it
                raise InvalidRequest("ttl", error.message) from None
            raise
        if decision.limited:
            self.service.metrics.record_limited(namespace, descriptors, decision.limited_by)
            return ReserveResponse(code=OVER_LIMIT)
        self.service.metrics.record_authorized(namespace, descriptors, 0)
        return ReserveResponse(code=OK, reservation_id=decision.reservation_id)

    async def commit(self, request: CommitRequest) -> CommitResponse:
        """Charge `actual_amount` (exactly: 0 when nothing was used) and release the hold."""
        namespace = namespace_of(request.domain)
        if namespace is None:
            raise InvalidRequest("domain", "must name the namespace the reservation was made in")
        descriptors = _descriptors(request)
        actual = checked_amount(request.actual_amount, "actual_amount")
        committed = await self.service.engine.commit(namespace, descriptors, request.reservation_id, actual)
        if actual:
            self.service.metrics.record_reported(namespace, descriptors, actual)
        return CommitResponse(reservation_released=committed.held)

    def _response(self, descriptors: list[dict[str, str]], decision: Decision) -> RateLimitResponse:
        outcome = Outcome(range(len(descriptors)), decision)
        return rls_response(len(descriptors), [outcome], self.service.options.rate_limit_headers)
