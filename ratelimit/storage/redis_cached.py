"""Write-behind counters over Redis (`ratelimit serve LIMITS_FILE redis_cached URL`, Limitador's name).

Decisions (check_and_report, check, report) are taken on local copies of the counters and written to
Redis in the background; reserve and commit still go to Redis (their point is one budget shared
exactly by every replica) and fail while it is unreachable.

- A counter is read from Redis when this replica first sees it, or has not synced it for two flush
  periods (one script call, shared by the decisions waiting for it): unlike Limitador, which counts an
  unseen counter as 0, nothing is admitted blind. Decisions on counters in use never wait for Redis.
- Every `flush_period` (or as soon as `batch_size` counters have unwritten charges) the counters used
  since the last flush are synced, `batch_size` of them per round trip: charges made here are added in
  Redis (decide.lua's update, which starts windows exactly as the plain storage does) and every
  counter's value, window and reservations as Redis has them (other replicas' charges included) come
  back. A write-back that timed out may still have reached Redis; it is written again, so such hits
  may count twice (a stricter limit, never a looser one).
- At most `max_cached` counters are kept, least recently used first out; one with unwritten charges
  is only dropped while Redis is unreachable (counted in `evicted_pending_writes`).

Bounded overshoot: a replica sees other replicas' charges at most two flush periods (plus a round
trip) late, so with R replicas a window can admit up to max_value plus what the other R-1 replicas
admit in two flush periods, and never more than R x max_value. While Redis is unreachable each replica
keeps limiting on its own copies (up to max_value each, unseen counters counting from 0), clears
`status.reachable` (the `datastore_partitioned` gauge) and retries every flush period; the first
successful flush writes back every unwritten charge and re-reads every counter in use. At the onset
of an outage a decision waits at most `timeout` (reading a counter new here); from then on none waits.
The outage is logged twice: when it starts, and when it ends with how many write-backs and reads
failed meanwhile. The service stays ready throughout (it keeps answering). Shutting down while Redis
is unreachable logs how many hits could not be written back (`status.unwritten_hits`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from ratelimit.counters import Commit, Counter, CounterStatus, Decision, Reservation, StorageError
from ratelimit.limits import Identity, Limit
from ratelimit.storage.base import CounterFilter, CounterPage, CounterSet, Operation, Storage, StorageStatus
from ratelimit.storage.redis_counters import RedisCounters, RedisOptions, RedisPlan, ScriptReply, SlotGroup

logger = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 100
DEFAULT_FLUSH_PERIOD = 1.0
DEFAULT_MAX_CACHED = 10_000
SHUTDOWN_WRITE_BACK = 1.0
"""Seconds shutdown keeps trying to write back unwritten hits before it logs them as lost."""


@dataclass(slots=True, eq=False)
class _Entry:
    """This replica's copy of one counter."""

    key: str
    identity: Identity
    """Its limit's identity (a reload that removes the limit drops the copy)."""
    window_ms: int
    group: SlotGroup
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

    def synced(self, reply: ScriptReply, written: int, now: float) -> None:
        """Take Redis' state of the counter; `written` of the pending charges are now part of it."""
        state = reply.counter(0)
        self.value, self.ends, self.reserved = state.value, state.window_end, state.reserved
        self.pending -= written
        self.synced_at = now

    def status(self, counter: Counter, now: int) -> CounterStatus:
        running = self.ends > now
        return CounterStatus(counter, self.used(now), (self.ends - now) / 1000 if running else 0.0, self.reserved)


@dataclass
class _Outage:
    """Redis unreachable from this replica's point of view, since `since` (monotonic seconds)."""

    since: float
    failures: int = 0
    """Write-backs and reads that failed during it (the first one included)."""


@dataclass
class _Stats:
    flushes: int = 0
    evicted_pending_writes: int = 0
    """Unwritten charges dropped because the cache was full while Redis was unreachable."""


class CachedRedisStorage(Storage):
    """`redis_cached URL [--batch-size N] [--flush-period SECONDS] [--max-cached N] [--response-timeout S]`:
    a local cache of counters over RedisCounters."""

    def __init__(
        self,
        options: RedisOptions,
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        flush_period: float = DEFAULT_FLUSH_PERIOD,
        max_cached: int = DEFAULT_MAX_CACHED,
    ) -> None:
        if batch_size < 1 or max_cached < 1 or not 0 < flush_period < float("inf"):
            raise ValueError("batch size and max cached must be at least 1, the flush period more than 0 seconds")
        self.redis = RedisCounters(options)
        self.timeout = options.timeout
        self.batch_size = batch_size
        self.flush_period = flush_period
        self.max_cached = max_cached
        self._local_clock = options.clock or time.time  # windows are Redis' (TIME): the wall clock is closest
        self._stale_after = 2 * flush_period
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._touched: dict[str, _Entry] = {}
        """Counters decided on since the last flush: the next flush writes and re-reads them."""
        self._dirty = 0
        self._flusher: asyncio.Task[None] | None = None
        self._flush_now = asyncio.Event()
        self._flush_lock: asyncio.Lock | None = None
        self._outage: _Outage | None = None
        self.stats = _Stats()

    @property
    def status(self) -> StorageStatus:
        return self.redis.status

    @property
    def partitioned(self) -> bool:
        """Whether this replica is deciding on its own copies alone (Redis unreachable)."""
        return self._outage is not None

    # ready() stays True: decisions are answered from the local copies whether Redis answers or not.

    async def start(self) -> None:
        self.redis.start()  # logs a Redis unreachable at start-up, and keeps `status.reachable` current
        self._start_flusher()

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
        # Marked again here, not only when the request found its copies: a flush that ran while the
        # request awaited the copies' first read took them out of `_touched` before this charge, and
        # the charge would never be written back (one hit per new counter lost, every replica short).
        self._touched[entry.key] = entry
        if self._dirty >= self.batch_size:
            self._flush_now.set()

    async def _local(self, counters: CounterSet) -> tuple[RedisPlan, list[_Entry], int]:
        """The request's plan, its counters' local copies (loaded from Redis when new) and now in ms."""
        self._start_flusher()
        plan = self.redis.plan(counters)
        entries: list[_Entry] | None = plan.local
        if entries is None or any(entry.evicted for entry in entries):
            entries = plan.local = [self._entry(counter) for counter in plan.counters]
        for entry in entries:
            self._entries.move_to_end(entry.key)
            self._touched[entry.key] = entry
        now = self._local_clock()
        if self._outage is None:
            # Counters in use are re-read by every flush; one not synced for two flush periods (new
            # here, or idle) is read before deciding, so no decision rests on an older view of Redis.
            stale = [entry for entry in entries if now - entry.synced_at > self._stale_after]
            if stale:
                await self._load(stale)
        return plan, entries, round(now * 1000)

    def _entry(self, counter: Counter) -> _Entry:
        key = self.redis.keys.counter(counter)
        entry = self._entries.get(key)
        if entry is None:
            self._make_room()
            entry = self._entries[key] = _Entry(
                key, counter.limit.identity, counter.limit.seconds * 1000, self.redis.group_of(counter)
            )
        return entry

    def _make_room(self) -> None:
        while len(self._entries) >= self.max_cached:
            victim = next((e for e in self._entries.values() if not e.pending), None)
            if victim is None:
                if self._outage is None:
                    self._flush_now.set()
                    return  # over the bound until the flush writes them back; never lose charges needlessly
                victim = next(iter(self._entries.values()))
                self.stats.evicted_pending_writes += victim.pending
                self.status.unwritten_hits += victim.pending
                self._dirty -= 1
            del self._entries[victim.key]
            self._touched.pop(victim.key, None)
            victim.evicted = True

    async def _load(self, entries: list[_Entry]) -> None:
        """Read counters this replica has not seen yet; decisions waiting for the same one share the
        read. When Redis fails, the decision goes on with the local copy alone (the outage begins)."""
        try:
            await self.redis.deletions_done()  # a limit back after a reload must not read its old counters
            waits = []
            for entry in entries:
                if entry.loading is None:
                    entry.loading = asyncio.ensure_future(self._read(entry))
                waits.append(entry.loading)
            results = await asyncio.gather(*waits, return_exceptions=True)
        except StorageError as exc:
            self._failed(exc)
            return
        failure = next((result for result in results if isinstance(result, BaseException)), None)
        if isinstance(failure, StorageError):
            self._failed(failure)  # decide on the local copy alone: the flusher re-syncs it later
        elif failure is not None:
            raise failure

    async def _read(self, entry: _Entry) -> None:
        try:
            entry.synced(await self.redis.run(entry.group, Operation.CHECK, 0), 0, self._local_clock())
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
            except StorageError as exc:
                self._failed(exc)
            except Exception:
                logger.exception("flushing counters to Redis failed")

    async def flush(self) -> None:
        """Write every unwritten charge and re-read every counter used since the last flush, in
        batches of `batch_size` counters (one round trip each). Raises StorageError.

        One flush at a time: a second one (a listing's, the last one at shutdown) would find the
        counters the first one took out of `_touched` missing, and could succeed without them."""
        if self._flush_lock is None:
            self._flush_lock = asyncio.Lock()  # bound to the running loop
        async with self._flush_lock:
            await self._flush_touched()

    async def _flush_touched(self) -> None:
        touched, self._touched = list(self._touched.values()), {}
        written = sum(entry.pending for entry in touched)
        try:
            await self.redis.deletions_done()  # a limit back after a reload must not get its old counters
            if self._outage is not None:
                # One PING says whether Redis is back; retrying every counter's write-back each
                # period would cost a failed call per counter in use, on the decisions' event loop.
                await self.redis.probe()
            # Batch after batch: a backlog (thousands of counters after an outage) sent at once would
            # queue past the per-request timeout, and a write that timed out here but ran in Redis
            # would be written again by the retry.
            for start in range(0, len(touched), self.batch_size):
                await self._sync(touched[start:start + self.batch_size])
        except BaseException:
            for entry in touched:  # retried with the next flush
                if not entry.evicted:
                    self._touched.setdefault(entry.key, entry)
            raise
        if self._outage is not None:
            logger.error(
                "Redis reachable again after %.1fs: %d write-backs and reads failed meanwhile; %d hits "
                "charged here written back and every counter in use re-read",
                time.monotonic() - self._outage.since, self._outage.failures, written,
            )
            self._outage = None
        self.stats.flushes += 1

    async def _sync(self, entries: list[_Entry]) -> None:
        written = [entry.pending for entry in entries]
        replies = await asyncio.gather(*(
            self.redis.run(entry.group, Operation.UPDATE, amount) if amount
            else self.redis.run(entry.group, Operation.CHECK, 0)
            for entry, amount in zip(entries, written)
        ), return_exceptions=True)
        now = self._local_clock()
        failure: BaseException | None = None
        for entry, amount, reply in zip(entries, written, replies):
            if isinstance(reply, BaseException):
                failure = failure or reply
                continue
            # Applied even when others in the batch failed: writing it again would count it twice.
            if amount and entry.pending == amount:
                self._dirty -= 1
            entry.synced(reply, amount, now)
        if failure is not None:
            raise failure

    def _failed(self, error: StorageError) -> None:
        """A read or a write-back failed: logged once per outage, counted in it."""
        if self._outage is None:
            self._outage = _Outage(time.monotonic())
            logger.error("Partition to Redis detected! Limiting on local counters (up to max_value each, "
                         "until Redis answers again): %s", error)
        self._outage.failures += 1

    # -- the rest ----------------------------------------------------------------------------------

    def configure(self, limits: Sequence[Limit]) -> None:
        self.redis.configure(limits)
        for key in [key for key, entry in self._entries.items() if not self.redis.is_configured_identity(entry.identity)]:
            entry = self._entries.pop(key)
            self._touched.pop(key, None)
            entry.evicted = True
            if entry.pending:
                self._dirty -= 1

    async def reserve(self, counters: CounterSet, amount: int, ttl_seconds: float) -> Reservation:
        # Reservations are exact across replicas only in Redis: they go there, as with `redis`.
        return await self.redis.reserve(self.redis.plan(counters), amount, ttl_seconds)

    async def commit(self, reservation_id: str, counters: CounterSet, actual: int) -> Commit:
        return await self.redis.commit(self.redis.plan(counters), reservation_id, actual)

    async def get_counters(self, limits: Sequence[Limit]) -> list[CounterStatus]:
        await self._flush_for_listing()
        return await self.redis.get_counters(limits)

    async def get_counters_page(
        self, limits: Sequence[Limit], cursor: str | None, max_counters: int,
        match: CounterFilter | None = None,
    ) -> CounterPage:
        await self._flush_for_listing()
        return await self.redis.counters_page(limits, cursor, max_counters, match)

    async def _flush_for_listing(self) -> None:
        """Listings read Redis: this replica's unwritten charges go there first."""
        try:
            async with asyncio.timeout(self.redis.listing_timeout):
                await self.flush()
        except TimeoutError as exc:
            raise StorageError(f"writing back local counters before listing took over {self.redis.listing_timeout:g}s") from exc

    async def close(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            await asyncio.gather(self._flusher, return_exceptions=True)  # its counters back in _touched
            self._flusher = None
            try:
                await self._last_write_back()
            except (StorageError, TimeoutError) as exc:
                unwritten = [entry for entry in self._entries.values() if entry.pending]
                hits = sum(entry.pending for entry in unwritten)
                self.status.unwritten_hits += hits
                logger.error("shutting down with Redis unreachable: %d hits on %d counters could not be written "
                             "back (%s)", hits, len(unwritten), str(exc) or "no answer in time")
        await self.redis.close()

    async def _last_write_back(self) -> None:
        """Flush, retried for up to SHUTDOWN_WRITE_BACK seconds (Redis may be just coming back, or
        the client pausing between reconnection attempts); raises the last failure."""
        async with asyncio.timeout(max(SHUTDOWN_WRITE_BACK, self.timeout)):
            while True:
                try:
                    await self.flush()
                    return
                except StorageError as exc:
                    failure = exc
                try:
                    await asyncio.sleep(0.1)
                except asyncio.CancelledError:
                    raise failure from None

    @property
    def cache_size(self) -> int:
        return len(self._entries)

    @property
    def pending_writes(self) -> int:
        """Counters with charges not yet written to Redis (Limitador's `batcher_size`)."""
        return self._dirty
