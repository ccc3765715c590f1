"""Counters in Redis, shared by every replica (`ratelimit serve LIMITS_FILE redis URL`).

Every decision is answered by Redis, through RedisCounters (redis_counters.py: key layout, slot
groups, the Lua script and its reply, two-phase decisions across cluster slots, listing, counter-loss
detection). This class only maps the Storage interface onto it. Failures raise StorageError within
`timeout`; FailureMode (failure.py) turns them into `--on-storage-error` answers, and `ready()` is
False while Redis is unreachable.
"""

from __future__ import annotations

from collections.abc import Sequence

from ratelimit.counters import Commit, CounterStatus, Decision, Reservation
from ratelimit.limits import Limit
from ratelimit.storage.base import CounterFilter, CounterPage, CounterSet, Operation, Storage, StorageStatus
from ratelimit.storage.redis_counters import DEFAULT_LISTING_TIMEOUT, DEFAULT_TIMEOUT, RedisCounters, RedisOptions

__all__ = ["DEFAULT_LISTING_TIMEOUT", "DEFAULT_TIMEOUT", "RedisOptions", "RedisStorage"]


class RedisStorage(Storage):
    """Counters in Redis or Redis Cluster, every decision one script call per slot."""

    def __init__(self, options: RedisOptions) -> None:
        self.redis = RedisCounters(options)

    @property
    def timeout(self) -> float:
        return self.redis.timeout

    @property
    def status(self) -> StorageStatus:
        return self.redis.status

    def ready(self) -> bool:
        return self.redis.status.reachable

    async def start(self) -> None:
        self.redis.start()

    def configure(self, limits: Sequence[Limit]) -> None:
        self.redis.configure(limits)

    async def check_and_update(self, counters: CounterSet, delta: int, load_counters: bool) -> Decision:
        plan = self.redis.plan(counters)
        replies = await self.redis.decide(plan, Operation.CHECK_AND_UPDATE, delta)
        return self.redis.decision(plan, replies, load_counters)

    async def is_within_limits(self, counters: CounterSet, delta: int) -> Decision:
        plan = self.redis.plan(counters)
        return self.redis.decision(plan, await self.redis.decide(plan, Operation.CHECK, delta), True)

    async def update_counters(self, counters: CounterSet, delta: int) -> Decision:
        plan = self.redis.plan(counters)
        return self.redis.decision(plan, await self.redis.decide(plan, Operation.UPDATE, delta), True)

    async def reserve(self, counters: CounterSet, amount: int, ttl_seconds: float) -> Reservation:
        return await self.redis.reserve(self.redis.plan(counters), amount, ttl_seconds)

    async def commit(self, reservation_id: str, counters: CounterSet, actual: int) -> Commit:
        return await self.redis.commit(self.redis.plan(counters), reservation_id, actual)

    async def get_counters(self, limits: Sequence[Limit]) -> list[CounterStatus]:
        return await self.redis.get_counters(limits)

    async def get_counters_page(
        self, limits: Sequence[Limit], cursor: str | None, max_counters: int,
        match: CounterFilter | None = None,
    ) -> CounterPage:
        return await self.redis.counters_page(limits, cursor, max_counters, match)

    async def close(self) -> None:
        await self.redis.close()
