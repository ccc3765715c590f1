"""Envoy RLS v3: `envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit` over the engine.

How a request's descriptors become engine calls
------------------------------------------------
Each descriptor's amount is its own `hits_addend` when it has one, else the request's (0 means 1).
Descriptors with the same own amount are decided together, as one list bound as CEL `descriptors`
(in request order), so a request without per-descriptor amounts is exactly Limitador's single
decision. The groups run in this order:

1. own `hits_addend` 0, **check only**: read-only, passes while every counter has budget left
   (Envoy's token pattern sends this on the request path);
2. no own `hits_addend`, **check and charge** the request's amount atomically: limited means
   nothing is charged (Limitador's ShouldRateLimit; a request with no descriptors is this group);
3. own `hits_addend` N > 0, **charge N** unconditionally, as envoyproxy/ratelimit does: the tokens
   were spent, so the charge sticks even past the limit (Envoy's `apply_on_stream_done` usage),
   and the answer is OVER_LIMIT when a counter is now past its limit.

The first refusal in steps 1-2 answers OVER_LIMIT and stops: a refused request charges nothing.
Only step 2 is conditional and it is one atomic engine call, and every descriptor is validated
before any group runs, so no partial charge can happen.
Envoy's token pattern sends one descriptor per call, where all of this reduces to "0 checks,
N charges".
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from envoy.extensions.common.ratelimit.v3.ratelimit_pb2 import RateLimitDescriptor
from envoy.service.ratelimit.v3.rls_pb2 import RateLimitRequest, RateLimitResponse

from ratelimit.counters import Decision
from ratelimit.engine import InvalidRequest
from ratelimit.server.rls import (
    UNKNOWN,
    Outcome,
    checked_amount,
    descriptor_maps,
    namespace_of,
    renumbered,
    request_delta,
    rls_response,
)
from ratelimit.server.state import Service


class Group(NamedTuple):
    """Descriptors decided by one engine call."""

    own_hits: int | None
    """Their own `hits_addend`: 0 checks, N charges N; None: the request's amount, checked and charged."""
    positions: Sequence[int]

    @property
    def decides(self) -> bool:
        """Whether this group can refuse the request (as opposed to recording usage)."""
        return self.own_hits is None or self.own_hits == 0


def plan(descriptors: Sequence[RateLimitDescriptor]) -> list[Group]:
    """The groups of a request, in the order they run (see the module docstring)."""
    for descriptor in descriptors:
        if descriptor.HasField("hits_addend"):
            break
    else:  # Limitador's case, and the usual one: a single decision
        return [Group(None, range(len(descriptors)))]
    positions: dict[int | None, list[int]] = {}
    for i, descriptor in enumerate(descriptors):
        own = None
        if descriptor.HasField("hits_addend"):
            own = checked_amount(descriptor.hits_addend.value, f"descriptors[{i}].hits_addend")
        positions.setdefault(own, []).append(i)
    order = sorted(positions, key=lambda own: (0, 0) if own == 0 else (1, 0) if own is None else (2, own))
    return [Group(own, positions[own]) for own in order]


class EnvoyRateLimitService:
    def __init__(self, service: Service) -> None:
        self.service = service

    async def should_rate_limit(self, request: RateLimitRequest) -> RateLimitResponse:
        namespace = namespace_of(request.domain)
        if namespace is None:
            return RateLimitResponse(overall_code=UNKNOWN)
        maps = descriptor_maps(request.descriptors)
        delta = request_delta(request)
        groups = [(group, [maps[i] for i in group.positions]) for group in plan(request.descriptors)]
        if len(groups) > 1:
            for group, descriptors in groups:  # all refused up front, before a group charges anything
                self._validate(namespace, descriptors, group)
        outcomes: list[Outcome] = []
        charged, decided, refused_amount = 0, False, 1
        for group, descriptors in groups:
            try:
                decision = await self._decide(namespace, descriptors, group.own_hits, delta)
            except InvalidRequest as error:
                raise renumbered(error, group.positions) from None
            outcomes.append(Outcome(group.positions, decision))
            charged += _charged(group, decision, delta)
            decided = decided or group.decides
            if decision.limited and group.decides:
                refused_amount = delta if group.own_hits is None else 1  # a check asks for room for 1
                break
        self._record(namespace, maps, outcomes, charged, decided)
        options = self.service.options
        return rls_response(len(maps), outcomes, options.rate_limit_headers, refused_amount if options.openai_errors else None)

    def _validate(self, namespace: str, descriptors: list[dict[str, str]], group: Group) -> None:
        """Refuse bad descriptors (the engine validates while it finds a request's counters)."""
        try:
            self.service.engine.counters_for(namespace, descriptors)
        except InvalidRequest as error:
            raise renumbered(error, group.positions) from None

    async def _decide(
        self, namespace: str, descriptors: list[dict[str, str]], own_hits: int | None, delta: int
    ) -> Decision:
        engine = self.service.engine
        if own_hits is None:
            return await engine.check_and_report(namespace, descriptors, delta, load_counters=True)
        if own_hits == 0:
            return await engine.check(namespace, descriptors)
        decision = await engine.report(namespace, descriptors, own_hits)
        # Past the limit as admission sees it: outstanding reservations count.
        past = [status for status in decision.counters if status.value + status.reserved > status.limit.max_value]
        if past:
            decision.limited_by = past[0].limit
        return decision

    def _record(
        self, namespace: str, maps: list[dict[str, str]], outcomes: list[Outcome], charged: int, decided: bool
    ) -> None:
        """Limitador's metrics: a call that could refuse counts as authorized or limited; hits are
        what was charged. A call that only charges (Envoy's usage on stream done) adds hits alone,
        like Kuadrant's Report."""
        metrics = self.service.metrics
        refusals = [decision for _, decision in outcomes if decision.limited]
        if refusals:
            metrics.record_limited(namespace, maps, refusals[0].limited_by)
        elif decided:
            metrics.record_authorized(namespace, maps, charged)
            return
        if charged:
            metrics.record_reported(namespace, maps, charged)


def _charged(group: Group, decision: Decision, delta: int) -> int:
    if group.own_hits is None:
        return 0 if decision.limited else delta
    return group.own_hits  # 0 for a check
