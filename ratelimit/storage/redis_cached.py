"""Write-behind counters over Redis (`ratelimit serve LIMITS_FILE redis_cached URL`, Limitador's name).

Decisions (check_and_report, check, report) are taken on local copies of the counters and written to
Redis in the background; reserve and commit still go to Redis (their point is one budget shared
exactly by every replica) and fail while it is unreachable.

- A counter is read from Redis when this replica first sees it, or has not synced it for two flush
  periods (one script call, shared by the decisions waiting for it): unlike Limitador, which counts an
  unseen counter as 0, nothing is admitted blind. Decisions on counters in use never wait for Redis.
- Every `flush_period` (or as soon as `batch_size` counters have unwritten charges) the counters used
  since the last flush are synced in one pipelined round trip: charges made here are added in Redis
  (decide.lua's update, which starts windows exactly as the plain storage does) and every counter's
  value, window and reservations as Redis has them (other replicas' charges included) come back.
- At most `max_cached` counters are kept, least recently used first out; one with unwritten charges
  is only dropped while Redis is unreachable (counted in `evicted_pending_writes`).

Bounded overshoot: a replica sees other replicas' charges at most two flush periods (plus a round
trip) late, so with R replicas a window can admit up to max_value plus what the other R-1 replicas
admit in two flush periods, and never more than R x max_value. While Redis is unreachable each replica
keeps limiting on its own copies (up to max_value each, unseen counters counting from 0), sets
`partitioned` (the `datastore_partitioned` gauge) and retries every flush period; the first successful
flush writes back every unwritten charge and re-reads every counter in use.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from ratelimit.counters import Counter, CounterStatus, Decision
from ratelimit.limits import Limit
from ratelimit.storage.base import CounterSet
from ratelimit.storage.redis import (
    CHECK,
    DEFAULT_TIMEOUT,
    UPDATE,
    Clock,
    RedisStorage,
    Reply,
    _Group,
    _Plan,
)
from ratelimit.storage.redis_client import RedisError, pack

logger = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 100
DEFAULT_FLUSH_PERIOD = 1.0
DEFAULT_MAX_CACHED = 10_000


@dataclass(slots=True, eq=False)
class _Entry:
    """This replica's copy of one counter."""

    key: str
    window_ms: int
    group: _Group
    """The counter alone, as a script call: how it is loaded and flushed."""
    value: int = 0
    """The value in Redis when last synced (every replica's charges), in the window ending at `ends`."""
    ends: int = 0
    """Window end in ms (0: no window known); provisional until Redis confirms it."""
    reserved: int = 0
    """Redis' reservations on the counter when last synced."""
    pending: int = 0
    """Charged here and not yet written to Redis."""
    synced_at: float = float("-inf")
    """When Redis' state was last taken (local clock, seconds)."""
    loading: asyncio.Future[None] | None = None
    evicted: bool = False

    def used(self, now: int) -> int:
        return (self.value if self.ends > now else 0) + self.pending

    def charge(self, delta: int, now: int) -> None:
        if delta == 0:
            return
        if self.ends <= now:
            # The window Redis will start (or already has, on another replica) when this is flushed.
            self.value, self.ends = 0, now + self.window_ms
        self.pending += delta

    def synced(self, reply: Reply, written: int, now: float) -> None:
        """Take Redis' state of the counter; `written` of the pending charges are now part of it."""
        self.value, self.ends, self.reserved = reply[3], reply[4], reply[5]
        self.pending -= written
        self.synced_at = now

    def status(self, counter: Counter, now: int) -> CounterStatus:
        running = self.ends > now
        return CounterStatus(counter, self.used(now), (self.ends - now) / 1000 if running else 0.0, self.reserved)


@dataclass
class _Stats:
    flushes: int = 0
    evicted_pending_writes: int = 0
    """Unwritten charges dropped because the cache was full while Redis was unreachable."""


class CachedRedisStorage(RedisStorage):
    """`redis_cached URL [--batch-size N] [--flush-period SECONDS] [--max-cached N] [--response-timeout S]`."""

    def __init__(
        self,
        url: str,
        timeout: float = DEFAULT_TIMEOUT,
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        flush_period: float = DEFAULT_FLUSH_PERIOD,
        max_cached: int = DEFAULT_MAX_CACHED,
        clock: Clock | None = None,
        key_prefix: str = "rl:",
        expiry_grace: float = 0.0,
    ) -> None:
        if batch_size < 1 or max_cached < 1 or not 0 < flush_period < float("inf"):
            raise ValueError("batch size and max cached must be at least 1, the flush period more than 0 seconds")
        super().__init__(url, timeout, clock=clock, key_prefix=key_prefix, expiry_grace=expiry_grace)
        self.batch_size = batch_size
        self.flush_period = flush_period
        self.max_cached = max_cached
        self._local_clock = clock or time.time  # windows are Redis' (TIME): the wall clock is closest
        self._stale_after = 2 * flush_period
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._touched: dict[str, _Entry] = {}
        """Counters decided on since the last flush: the next flush writes and re-reads them."""
        self._dirty = 0
        self._flusher: asyncio.Task[None] | None = None
        self._flush_now = asyncio.Event()
        self.stats = _Stats()

    # -- decisions on the local copies -----------------------------------------------------------

    async def check_and_update(self, counters: CounterSet, delta: int, load_counters: bool) -> Decision:
        return await self._decide_locally(counters, delta, charge_if_room=True, load_counters=load_counters)

    async def is_within_limits(self, counters: CounterSet, delta: int) -> Decision:
        return await self._decide_locally(counters, delta, charge_if_room=False, load_counters=True)

    async def update_counters(self, counters: CounterSet, delta: int) -> Decision:
        plan, entries, now = await self._local(counters)
        for entry in entries:
            self._charge(entry, delta, now)
        return Decision(None, [e.status(c, now) for c, e in zip(plan.counters, entries)])

    async def _decide_locally(
        self, counters: CounterSet, delta: int, charge_if_room: bool, load_counters: bool
    ) -> Decision:
        plan, entries, now = await self._local(counters)
        limited_by = None
        for counter, entry in zip(plan.counters, entries):
            if entry.used(now) + entry.reserved + delta > counter.limit.max_value:
                limited_by = counter.limit
                break
        if limited_by is None and charge_if_room:
            for entry in entries:
                self._charge(entry, delta, now)
        statuses = [e.status(c, now) for c, e in zip(plan.counters, entries)] if load_counters else []
        return Decision(limited_by, statuses)

    def _charge(self, entry: _Entry, delta: int, now: int) -> None:
        if delta and not entry.pending:
            self._dirty += 1
        entry.charge(delta, now)
        if self._dirty >= self.batch_size:
            self._flush_now.set()

    async def _local(self, counters: CounterSet) -> tuple[_Plan, list[_Entry], int]:
        """The request's plan, its counters' local copies (loaded from Redis when new) and now in ms."""
        self._start_flusher()
        plan = self._plan(counters)
        entries: list[_Entry] | None = plan.local
        if entries is None or any(entry.evicted for entry in entries):
            entries = plan.local = [self._entry(plan, i) for i in range(len(plan.counters))]
        for entry in entries:
            self._entries.move_to_end(entry.key)
            self._touched[entry.key] = entry
        now = self._local_clock()
        if not self.partitioned:
            # Counters in use are re-read by every flush; one not synced for two flush periods (new
            # here, or idle) is read before deciding, so no decision rests on an older view of Redis.
            stale = [entry for entry in entries if now - entry.synced_at > self._stale_after]
            if stale:
                await self._load(stale)
        return plan, entries, round(now * 1000)

    def _entry(self, plan: _Plan, position: int) -> _Entry:
        counter = plan.counters[position]
        key = self._counter_key(counter)
        entry = self._entries.get(key)
        if entry is None:
            self._make_room()
            group = self._new_plan((counter,), indexed=not self._client.cluster).groups[0]
            entry = self._entries[key] = _Entry(key, counter.limit.seconds * 1000, group)
        return entry

    def _make_room(self) -> None:
        while len(self._entries) >= self.max_cached:
            victim = next((e for e in self._entries.values() if not e.pending), None)
            if victim is None:
                if not self.partitioned:
                    self._flush_now.set()
                    return  # over the bound until the flush writes them back; never lose charges needlessly
                victim = next(iter(self._entries.values()))
                self.stats.evicted_pending_writes += victim.pending
                self._dirty -= 1
            del self._entries[victim.key]
            self._touched.pop(victim.key, None)
            victim.evicted = True

    async def _load(self, entries: list[_Entry]) -> None:
        """Read counters this replica has not seen yet; decisions waiting for the same one share the read."""
        if self._removed:
            self._start_deletions()
        try:
            await self._deletions_done()  # a limit back after a reload must not read its old counters
        except RedisError as exc:
            self._partition(exc)
            return
        waits = []
        for entry in entries:
            if entry.loading is None:
                entry.loading = asyncio.ensure_future(self._read(entry))
            waits.append(entry.loading)
        results = await asyncio.gather(*waits, return_exceptions=True)
        failure = next((result for result in results if isinstance(result, BaseException)), None)
        if isinstance(failure, RedisError):
            self._partition(failure)  # decide on the local copy alone: the flusher re-syncs it later
        elif failure is not None:
            raise failure

    async def _read(self, entry: _Entry) -> None:
        try:
            entry.synced(await self._run(entry.group, CHECK, 0), 0, self._local_clock())
        finally:
            entry.loading = None

    # -- the background flush --------------------------------------------------------------------

    def _start_flusher(self) -> None:
        if self._flusher is None:
            self._flush_now = asyncio.Event()  # bound to the running loop
            self._flusher = asyncio.get_running_loop().create_task(self._flush_periodically())

    async def _flush_periodically(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._flush_now.wait(), self.flush_period)
            except TimeoutError:
                pass
            self._flush_now.clear()
            try:
                await self.flush()
            except RedisError as exc:
                self._partition(exc)
            except Exception:
                logger.exception("flushing counters to Redis failed")

    async def flush(self) -> None:
        """Write every unwritten charge and re-read every counter used since the last flush, in
        batches of `batch_size` counters, all sent at once (one round trip). Raises RedisError."""
        touched, self._touched = list(self._touched.values()), {}
        try:
            if self._removed:
                self._start_deletions()
            await self._deletions_done()  # a limit back after a reload must not get its old counters
            batches = [touched[i:i + self.batch_size] for i in range(0, len(touched), self.batch_size)]
            if not batches and self.partitioned:
                await self._client.request(0, pack("PING"))  # nothing to write: is Redis back?
            await asyncio.gather(*(self._sync(batch) for batch in batches))
        except BaseException:
            for entry in touched:  # retried with the next flush
                if not entry.evicted:
                    self._touched.setdefault(entry.key, entry)
            raise
        if self.partitioned:
            logger.warning("Redis reachable again: local counters written back and re-read")
        self.partitioned = False
        self.stats.flushes += 1

    async def _sync(self, entries: list[_Entry]) -> None:
        written = [entry.pending for entry in entries]
        replies = await asyncio.gather(*(
            self._run(entry.group, UPDATE, amount) if amount else self._run(entry.group, CHECK, 0)
            for entry, amount in zip(entries, written)
        ))
        now = self._local_clock()
        for entry, amount, reply in zip(entries, written, replies):
            if amount and entry.pending == amount:
                self._dirty -= 1
            entry.synced(reply, amount, now)

    def _partition(self, error: BaseException) -> None:
        if not self.partitioned:
            logger.error("Partition to Redis detected! Limiting on local counters: %s", error)
        self.partitioned = True

    # -- the rest ----------------------------------------------------------------------------------

    def configure(self, limits: Sequence[Limit]) -> None:
        super().configure(limits)
        digests = {self._digest(limit) for limit in limits}
        for key in [key for key in self._entries if key.rsplit(":", 1)[1] not in digests]:
            entry = self._entries.pop(key)
            self._touched.pop(key, None)
            entry.evicted = True
            if entry.pending:
                self._dirty -= 1

    async def get_counters(self, limits: Sequence[Limit]) -> list[CounterStatus]:
        await self._bounded(self.flush())
        return await super().get_counters(limits)

    async def close(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            self._flusher = None
            try:
                async with asyncio.timeout(self.timeout):
                    await self.flush()  # a last write-back, best effort
            except (RedisError, TimeoutError) as exc:
                logger.warning("could not write back local counters on close: %s", exc)
        await super().close()

    @property
    def cache_size(self) -> int:
        return len(self._entries)

    @property
    def pending_writes(self) -> int:
        """Counters with charges not yet written to Redis (Limitador's `batcher_size`)."""
        return self._dirty

