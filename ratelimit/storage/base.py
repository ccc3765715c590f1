"""What every counter storage provides. The engine talks to storages only through this interface.

Every method decides over *all* counters of one request at once, so a storage can make the whole
decision atomic (one numba kernel call under a lock in memory, one Lua script in Redis).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, TypeVar

from ratelimit.counters import Commit, Counter, CounterStatus, Decision, Reservation
from ratelimit.limits import Limit
from ratelimit.pacing import Pace
from ratelimit.storage.summary import CounterSummary, summarize

SUMMARY_PAGE = 250
"""Counters one listing page reads while summarizing (about a millisecond of work for most storages)."""

T = TypeVar("T")


class Operation(IntEnum):
    """What a decision does to its counters; each backend encodes it its own way (the memory
    kernels take the number, decide.lua a letter)."""

    CHECK_AND_UPDATE = 0
    """Charge every counter if every one has room, else nothing."""
    CHECK = 1
    """Read-only: would the delta fit?"""
    UPDATE = 2
    """Charge unconditionally (may overshoot)."""
    RESERVE = 3
    """Hold the amount on every counter if every one has room."""
    COMMIT = 4
    """Release a reservation (if still held) and charge the actual amount."""


@dataclass
class StorageStatus:
    """What a storage tells about its own health, as plain numbers (the metrics module turns them
    into series; the core never imports a metrics library).

    A storage in this process (memory) is always reachable and never changes it."""

    reachable: bool = True
    """False while the storage's backend (Redis) cannot be reached (`datastore_partitioned`)."""
    decision_errors: int = 0
    """Decisions the storage could not answer, answered per --on-storage-error (`datastore_errors`)."""
    outages: int = 0
    """Times the backend became unreachable."""
    counters_lost: int = 0
    """Times the backend came back without the counters it held (restarted without persistence)."""
    listing_failures: int = 0
    """Counter listings (/counters pages, quota scrapes) that failed."""
    unwritten_hits: int = 0
    """Hits a write-behind storage could not write back (dropped when full while unreachable, or at shutdown)."""


class CounterSet:
    """The counters one kind of request touches, memoized by the engine per distinct descriptors.

    Held compactly, as the limits and each counter's variable values, not as one `Counter` object
    per counter: the memo holds many sets, and tuples of strings are not tracked by Python's cyclic
    garbage collector while every object of a class is. With a Counter per counter, 300k memoized
    counters made each full collection take ~0.3 s, a stall of every decision (`counters` builds the
    Counter objects when asked).

    `storage_handle` lets a storage remember how it finds these counters (for example their slots in
    the memory table) between requests; only the storage reads or writes it.
    """

    __slots__ = ("limits", "values", "storage_handle")

    def __init__(self, counters: Iterable[Counter]) -> None:
        listed = tuple(counters)
        self.limits: tuple[Limit, ...] = tuple(counter.limit for counter in listed)
        self.values: tuple[tuple[str, ...], ...] = tuple(counter.values for counter in listed)
        self.storage_handle: Any = None

    @property
    def counters(self) -> tuple[Counter, ...]:
        return tuple(map(Counter, self.limits, self.values))

    def __len__(self) -> int:
        return len(self.limits)


CounterFilter = Callable[[Counter], bool]
"""Which counters a listing keeps (for example: those whose user variable is "alice")."""


@dataclass(slots=True)
class CounterPage:
    """One page of a counter listing."""

    counters: list[CounterStatus]
    next_cursor: str | None
    """Opaque text to pass back for the next page; None when the listing is complete."""


class Storage(ABC):
    """Counters for the engine. Deltas are non-negative; a delta of 0 charges nothing."""

    @abstractmethod
    def configure(self, limits: Sequence[Limit]) -> None:
        """Learn the current limits. Counters of limits whose identity is gone are deleted (the
        memory storage keeps them, hidden, for one window, so a limit that comes back resumes);
        counters of limits whose identity stays are kept (their max_value may have changed)."""

    @abstractmethod
    async def check_and_update(self, counters: CounterSet, delta: int, load_counters: bool) -> Decision:
        """Atomically: if any counter would exceed its limit after `delta` (counting reservations),
        charge nothing and name it; otherwise charge every counter `delta`."""

    @abstractmethod
    async def is_within_limits(self, counters: CounterSet, delta: int) -> Decision:
        """Read-only: would `delta` more fit in every counter? Counters' states are always loaded."""

    @abstractmethod
    async def update_counters(self, counters: CounterSet, delta: int) -> Decision:
        """Charge every counter `delta` unconditionally (may overshoot). Counters' states are loaded."""

    @abstractmethod
    async def reserve(self, counters: CounterSet, amount: int, ttl_seconds: float) -> Reservation:
        """Atomically hold `amount` on every counter if it fits (value + reserved + amount <= max).
        The answer carries a reservation id when admitted. The hold releases itself after the ttl."""

    @abstractmethod
    async def commit(self, reservation_id: str, counters: CounterSet, actual: int) -> Commit:
        """Release the reservation (if it is still held) and charge `actual` to the counters.
        Answers whether the reservation was still held, and the counters' states."""

    @abstractmethod
    async def get_counters(self, limits: Sequence[Limit]) -> list[CounterStatus]:
        """The live counters (current window not expired, or holding a reservation) of these limits."""

    async def get_counters_page(
        self, limits: Sequence[Limit], cursor: str | None, max_counters: int, match: CounterFilter | None = None
    ) -> CounterPage:
        """At most `max_counters` live counters of these limits that `match` keeps, from `cursor` (None:
        the start). Listing is not a decision: a storage should hold its decision lock (or spend its
        time) only for a bounded part of its counters per page, so a walk over all pages never stalls
        decisions. A counter that moves while the walk goes on may be missed or seen twice.

        Raises ValueError("invalid cursor ...") for a cursor it did not hand out. The default lists
        everything and slices (the cursor is an offset); storages with many counters override it.
        """
        try:
            start = 0 if cursor is None else int(cursor)
            if start < 0:
                raise ValueError
        except ValueError:
            raise ValueError(f"invalid cursor {cursor!r}") from None
        statuses = await self.get_counters(limits)
        if match is not None:
            statuses = [status for status in statuses if match(status.counter)]
        end = start + max_counters
        return CounterPage(statuses[start:end], str(end) if end < len(statuses) else None)

    async def counter_summary(self, limits: Sequence[Limit], top_n: int, thresholds: Sequence[float]) -> CounterSummary:
        """The busiest `top_n` live counters of these limits and per limit what they all add up to
        (ratelimit.storage.summary). The default walks every listing page, the event loop free
        between pages; raises StorageError when a page cannot be read (never a partial summary)."""
        statuses: list[CounterStatus] = []
        cursor: str | None = None
        pace = Pace()
        while True:
            page = await self.get_counters_page(limits, cursor, SUMMARY_PAGE)
            statuses.extend(page.counters)
            cursor = page.next_cursor
            if cursor is None:
                return summarize(statuses, top_n, thresholds)
            await pace.rest()

    @property
    def status(self) -> StorageStatus:
        """Health as plain data (one per storage, made on first use); storages with a backend that
        can fail keep it up to date."""
        status = self.__dict__.get("_storage_status")
        if status is None:
            status = self.__dict__["_storage_status"] = StorageStatus()
        return status

    def ready(self) -> bool:
        """Can decisions be answered now? (`/ready` and gRPC health follow it.)"""
        return True

    async def start(self) -> None:  # noqa: B027 - a default, not abstract: most storages start nothing
        """Begin background work that needs the running loop (Redis: its reachability probe).
        Must not wait for the backend: a service starts even while Redis is down."""

    async def close(self) -> None:  # noqa: B027 - a default, not abstract: a storage without connections has nothing to release
        """Release connections and background tasks."""


class StorageWrapper(Storage):
    """A storage around another one (timing, a failure policy): forwards everything and passes each
    decision's awaitable through `around`, so a wrapper overrides one hook, not the whole interface.
    Listing counters and configuring are not decisions and go straight through."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage

    @property
    def status(self) -> StorageStatus:
        return self.storage.status

    def ready(self) -> bool:
        return self.storage.ready()

    async def start(self) -> None:
        await self.storage.start()

    async def around(self, decision: Awaitable[T]) -> T:
        return await decision

    def configure(self, limits: Sequence[Limit]) -> None:
        self.storage.configure(limits)

    async def check_and_update(self, counters: CounterSet, delta: int, load_counters: bool) -> Decision:
        return await self.around(self.storage.check_and_update(counters, delta, load_counters))

    async def is_within_limits(self, counters: CounterSet, delta: int) -> Decision:
        return await self.around(self.storage.is_within_limits(counters, delta))

    async def update_counters(self, counters: CounterSet, delta: int) -> Decision:
        return await self.around(self.storage.update_counters(counters, delta))

    async def reserve(self, counters: CounterSet, amount: int, ttl_seconds: float) -> Reservation:
        return await self.around(self.storage.reserve(counters, amount, ttl_seconds))

    async def commit(self, reservation_id: str, counters: CounterSet, actual: int) -> Commit:
        return await self.around(self.storage.commit(reservation_id, counters, actual))

    async def get_counters(self, limits: Sequence[Limit]) -> list[CounterStatus]:
        return await self.storage.get_counters(limits)

    async def get_counters_page(
        self, limits: Sequence[Limit], cursor: str | None, max_counters: int, match: CounterFilter | None = None
    ) -> CounterPage:
        return await self.storage.get_counters_page(limits, cursor, max_counters, match)

    async def counter_summary(self, limits: Sequence[Limit], top_n: int, thresholds: Sequence[float]) -> CounterSummary:
        return await self.storage.counter_summary(limits, top_n, thresholds)

    async def close(self) -> None:
        await self.storage.close()
