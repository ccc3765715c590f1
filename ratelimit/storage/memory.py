"""In-memory counters: a numba-compiled table with bounded capacity (the embedded default storage).

Every decision runs one kernel call under one lock, so a request's counters are checked and charged
atomically even when the HTTP API's worker threads and the gRPC server call at the same time.
Rows of counters whose window is over are reused before the table grows; a full table answers
StorageFullError instead of growing without bound.
"""

from __future__ import annotations

import heapq
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from ratelimit.counters import Authorization, Counter, CounterStatus, StorageFullError
from ratelimit.limits import Limit
from ratelimit.storage import kernels
from ratelimit.storage.base import CounterSet, Storage
from ratelimit.storage.kernels import EXPIRES_AT, LIMIT_NO, RESERVED, VALUE

DEFAULT_CAPACITY = 2_000_000
_INITIAL_ROWS = 1024

Clock = Callable[[], float]


@dataclass(slots=True)
class _Reservation:
    rows: np.ndarray
    amount: int
    expires_at_ms: int


@dataclass(slots=True)
class _Lookup:
    """Where a request's counters are: table rows (-1 = not in the table) and limit numbers.

    Kept on the CounterSet as its storage handle while `generation` is current, so a repeated
    request skips building keys and dictionary look-ups."""

    rows: np.ndarray
    limit_nos: np.ndarray
    counters: Sequence[Counter]
    generation: int
    plan: int = -1
    """This set's number in the plan table of its generation, once a batch has used it."""


class _PlanTable:
    """The row lists of the counter sets that batches used in one generation, packed for the kernel,
    so that a batch is one plan number per request."""

    MAX_PLANS = 1 << 20  # past this many (old memo entries' sets pile up), start a fresh table

    def __init__(self, generation: int) -> None:
        self.generation = generation
        self.rows = np.empty(4096, dtype=np.int64)
        self.limit_nos = np.empty(4096, dtype=np.int64)
        self.starts = np.empty(1024, dtype=np.int64)
        self.ends = np.empty(1024, dtype=np.int64)
        self.used = 0
        self.count = 0

    def add(self, rows: np.ndarray, limit_nos: np.ndarray) -> int:
        end = self.used + len(rows)
        if end > len(self.rows):
            self.rows = _grown(self.rows, end)
            self.limit_nos = _grown(self.limit_nos, end)
        if self.count == len(self.starts):
            self.starts = _grown(self.starts, self.count + 1)
            self.ends = _grown(self.ends, self.count + 1)
        self.rows[self.used:end] = rows
        self.limit_nos[self.used:end] = limit_nos
        self.starts[self.count], self.ends[self.count] = self.used, end
        self.used = end
        self.count += 1
        return self.count - 1


def _grown(array: np.ndarray, at_least: int) -> np.ndarray:
    bigger = np.empty(max(at_least, 2 * len(array)), dtype=array.dtype)
    bigger[: len(array)] = array
    return bigger


class MemoryStorage(Storage):
    def __init__(self, capacity: int = DEFAULT_CAPACITY, clock: Clock = time.monotonic) -> None:
        if capacity < 1:
            raise ValueError(f"memory storage capacity must be at least 1 counter, got {capacity}")
        self.capacity = capacity
        kernels.warm_up()
        self._clock = clock
        self._lock = threading.Lock()
        self._table = self._new_rows(min(_INITIAL_ROWS, capacity))
        self._rows_used = 0  # rows below this mark have been handed out at least once
        self._free_rows: list[int] = []
        self._allocations = 0  # rows handed out so far, to tell whether a batch added any
        self._row_of_key: dict[str, int] = {}
        self._key_of_row: list[str | None] = []
        self._next_sweep_ms = 0
        self._shortest_window_ms = 0
        # Bumped whenever rows are freed, so row numbers cached in CounterSet handles are looked up again.
        self._generation = 0
        self._limit_no_by_identity: dict[tuple, int] = {}
        self._limit_no_by_limit: dict[Limit, int] = {}
        self._limit_by_no: list[Limit | None] = []
        self._limits = np.zeros((0, 2), dtype=np.int64)
        self._reservations: dict[str, _Reservation] = {}
        self._reservation_expiries: list[tuple[int, str]] = []
        self._plans = _PlanTable(self._generation)
        # Scratch arguments for one-request kernel calls (always used under the lock): plan 0 is
        # rows[0:n] of the request's own row array.
        self._one_start = np.zeros(1, dtype=np.int64)
        self._one_end = np.zeros(1, dtype=np.int64)
        self._one_plan = np.zeros(1, dtype=np.int64)
        self._one_delta = np.zeros(1, dtype=np.int64)
        self._one_first = np.zeros(1, dtype=np.int64)

    # -- configuration ---------------------------------------------------------------------------

    def configure(self, limits: Sequence[Limit]) -> None:
        with self._lock:
            current = {limit.identity: limit for limit in limits}
            removed = [no for identity, no in self._limit_no_by_identity.items() if identity not in current]
            for identity, limit in current.items():
                if identity not in self._limit_no_by_identity:
                    self._limit_no_by_identity[identity] = len(self._limit_by_no)
                    self._limit_by_no.append(limit)
            table = np.zeros((len(self._limit_by_no), 2), dtype=np.int64)
            table[: len(self._limits)] = self._limits
            self._limits = table
            self._limit_no_by_limit = {}
            for identity, limit in current.items():
                no = self._limit_no_by_identity[identity]
                self._limit_by_no[no] = limit
                self._limits[no] = (limit.max_value, limit.seconds * 1000)
                self._limit_no_by_limit[limit] = no
            for no in removed:
                del self._limit_no_by_identity[self._limit_by_no[no].identity]
                self._limit_by_no[no] = None
            if removed:
                self._free_rows_at(np.flatnonzero(np.isin(self._table[: self._rows_used, LIMIT_NO], removed)))
            self._generation += 1  # limit numbers of cached handles may name removed limits
            self._plans = _PlanTable(self._generation)  # its plans are stale now: free them
            self._shortest_window_ms = min((limit.seconds * 1000 for limit in current.values()), default=0)
            self._next_sweep_ms = 0

    # -- decisions -------------------------------------------------------------------------------

    async def check_and_update(self, counters: CounterSet, delta: int, load_counters: bool) -> Authorization:
        return self._decide_one(counters, delta, kernels.CHECK_AND_UPDATE, load_counters)

    async def is_within_limits(self, counters: CounterSet, delta: int) -> Authorization:
        return self._decide_one(counters, delta, kernels.CHECK, True)

    async def update_counters(self, counters: CounterSet, delta: int) -> Authorization:
        return self._decide_one(counters, delta, kernels.UPDATE, True)

    async def reserve(self, counters: CounterSet, amount: int, ttl_seconds: float) -> Authorization:
        with self._lock:
            now = self._now_ms()
            self._release_expired_reservations(now)
            lookup, fresh = self._lookup(counters, allocate=True, now=now)
            first = self._run(lookup, amount, kernels.RESERVE, now)
            answer = self._authorization(lookup, first, now, load_counters=True)
            if first < 0:
                reservation_id = uuid.uuid4().hex
                expires = now + max(1, int(ttl_seconds * 1000))
                # A reservation of 0 holds nothing, so it keeps no rows (they may be given back below).
                held_rows = lookup.rows.copy() if amount > 0 else np.zeros(0, dtype=np.int64)
                self._reservations[reservation_id] = _Reservation(held_rows, amount, expires)
                heapq.heappush(self._reservation_expiries, (expires, reservation_id))
                answer.reservation_id = reservation_id
            self._drop_untouched(fresh, counters)
            return answer

    async def commit(self, reservation_id: str, counters: CounterSet, actual: int) -> tuple[bool, Authorization]:
        with self._lock:
            now = self._now_ms()
            self._release_expired_reservations(now)
            held = self._reservations.pop(reservation_id, None)
            if held is not None:
                self._release(held)
            lookup, fresh = self._lookup(counters, allocate=True, now=now)
            first = self._run(lookup, actual, kernels.UPDATE, now)
            answer = self._authorization(lookup, first, now, load_counters=True)
            self._drop_untouched(fresh, counters)
            return held is not None, answer

    async def check_and_update_batch(self, sets: Sequence[CounterSet], deltas: np.ndarray) -> np.ndarray:
        with self._lock:
            now = self._now_ms()
            self._release_expired_reservations(now)
            allocations_before = self._allocations
            plans = self._batch_plans(sets, now)
            first = np.empty(len(sets), dtype=np.int64)
            table = self._plans
            kernels.decide(self._table, self._limits, table.rows, table.limit_nos, table.starts, table.ends,
                           plans, np.asarray(deltas, dtype=np.int64), kernels.CHECK_AND_UPDATE, now, first)
            if self._allocations != allocations_before:
                self._next_sweep_ms = 0  # rows added but left uncharged (limited, delta 0) wait for a sweep
            return first >= 0

    async def get_counters(self, limits: Sequence[Limit]) -> list[CounterStatus]:
        with self._lock:
            now = self._now_ms()
            self._release_expired_reservations(now)
            wanted = np.zeros(len(self._limit_by_no), dtype=np.bool_)
            for limit in limits:
                no = self._limit_no(limit)
                if no is not None:
                    wanted[no] = True
            statuses = []
            for row in kernels.live_rows(self._table, self._rows_used, wanted, now):
                limit = self._limit_by_no[self._table[row, LIMIT_NO]]
                key = self._key_of_row[row]
                values = Counter.values_from_qualifier(limit, key.split("|", 1)[1])
                statuses.append(self._status(Counter(limit, values), int(row), now))
            return statuses

    @property
    def counter_count(self) -> int:
        """Counters currently holding a row (live or awaiting reuse)."""
        return len(self._row_of_key)

    # -- internals -------------------------------------------------------------------------------

    def _now_ms(self) -> int:
        return round(self._clock() * 1000)

    def _decide_one(self, counters: CounterSet, delta: int, mode: int, load_counters: bool) -> Authorization:
        with self._lock:
            now = self._now_ms()
            self._release_expired_reservations(now)
            lookup, fresh = self._lookup(counters, allocate=mode != kernels.CHECK, now=now)
            first = self._run(lookup, delta, mode, now)
            answer = self._authorization(lookup, first, now, load_counters)
            self._drop_untouched(fresh, counters)
            return answer

    def _run(self, lookup: _Lookup, delta: int, mode: int, now: int) -> int:
        self._one_end[0] = len(lookup.rows)
        self._one_delta[0] = delta
        kernels.decide(self._table, self._limits, lookup.rows, lookup.limit_nos, self._one_start, self._one_end,
                       self._one_plan, self._one_delta, mode, now, self._one_first)
        return int(self._one_first[0])

    def _authorization(self, lookup: _Lookup, first: int, now: int, load_counters: bool) -> Authorization:
        statuses = []
        if load_counters:
            statuses = [self._status(c, int(row), now) for c, row in zip(lookup.counters, lookup.rows)]
        return Authorization(lookup.counters[first] if first >= 0 else None, statuses)

    def _status(self, counter: Counter, row: int, now: int) -> CounterStatus:
        if row < 0:
            return CounterStatus(counter, 0, 0.0, 0)
        value, expires_at, reserved, _ = self._table[row]
        running = expires_at > now
        return CounterStatus(
            counter,
            int(value) if running else 0,
            (int(expires_at) - now) / 1000 if running else 0.0,
            int(reserved),
        )

    def _limit_no(self, limit: Limit) -> int | None:
        no = self._limit_no_by_limit.get(limit)
        if no is None:  # a Limit object from before a reload whose identity is still configured
            no = self._limit_no_by_identity.get(limit.identity)
        return no

    def _key(self, counter: Counter, limit_no: int) -> str:
        return f"{limit_no}|{counter.qualifier()}"

    def _lookup(self, counter_set: CounterSet, allocate: bool, now: int) -> tuple[_Lookup, list[int]]:
        """Find (and, for writes, add) the rows of a request's counters; also returns the rows added.
        Counters of limits that a concurrent reload removed are left out: their limit is gone."""
        cached = counter_set.storage_handle
        if cached is not None and cached.generation == self._generation:
            return cached, []
        counters = counter_set.counters
        known = [(c, no) for c in counters if (no := self._limit_no(c.limit)) is not None]
        keys = [self._key(c, no) for c, no in known]
        if allocate:
            self._ensure_free_rows(sum(1 for k in keys if k not in self._row_of_key), now)
        rows = np.empty(len(keys), dtype=np.int64)
        fresh = []
        for i, key in enumerate(keys):
            row = self._row_of_key.get(key, -1)
            if row < 0 and allocate:
                row = self._allocate(key, known[i][1])
                fresh.append(row)
            rows[i] = row
        limit_nos = np.array([no for _, no in known], dtype=np.int64)
        lookup = _Lookup(rows, limit_nos, [c for c, _ in known] if len(known) != len(counters) else counters,
                         self._generation)
        if not (rows < 0).any():
            counter_set.storage_handle = lookup
        return lookup, fresh

    def _drop_untouched(self, fresh: list[int], counter_set: CounterSet) -> None:
        """Give back rows this decision added but did not charge (a limited request, a delta of 0),
        so they do not take room until the next sweep. Only this set's handle can name a fresh row."""
        untouched = [r for r in fresh if self._table[r, EXPIRES_AT] == 0 and self._table[r, RESERVED] == 0]
        if untouched:
            self._forget_rows(untouched)
            counter_set.storage_handle = None

    def _batch_plans(self, sets: Sequence[CounterSet], now: int) -> np.ndarray:
        """The plan number of every set; sets new to this generation are looked up and added."""
        while True:
            generation = self._generation
            if self._plans.generation != generation or self._plans.count > _PlanTable.MAX_PLANS:
                self._plans = _PlanTable(generation)
            plans = np.array(
                [h.plan if (h := s.storage_handle) is not None and h.generation == generation else -1 for s in sets],
                dtype=np.int64,
            )
            stale = np.flatnonzero(plans < 0)
            if len(stale) == 0:
                return plans
            # Make room for the whole batch before the first row is added: a sweep in the middle
            # would reclaim rows just added for this batch (still uncharged) and redo every lookup.
            missing = {
                self._key(c, no)
                for i in stale for c in sets[i].counters if (no := self._limit_no(c.limit)) is not None
            }
            self._ensure_free_rows(sum(1 for k in missing if k not in self._row_of_key), now)
            if self._generation != generation:
                continue  # making room freed rows: every handle is stale, look all of them up again
            for i in stale:
                lookup, _ = self._lookup(sets[i], allocate=True, now=now)
                if lookup.plan < 0:
                    lookup.plan = self._plans.add(lookup.rows, lookup.limit_nos)
                plans[i] = lookup.plan
            if self._generation == generation:
                return plans

    def _allocate(self, key: str, limit_no: int) -> int:
        if self._free_rows:
            row = self._free_rows.pop()
        else:
            row = self._rows_used
            self._rows_used += 1
            self._key_of_row.append(None)
        self._table[row] = (0, 0, 0, limit_no)
        self._allocations += 1
        self._row_of_key[key] = row
        self._key_of_row[row] = key
        return row

    def _ensure_free_rows(self, needed: int, now: int) -> None:
        """Make room for `needed` new counters: reuse expired rows first, then grow up to capacity."""
        if needed <= len(self._free_rows) + len(self._table) - self._rows_used:
            return
        if now >= self._next_sweep_ms:
            freed, next_expiry = kernels.reclaimable_rows(self._table, self._rows_used, now)
            self._free_rows_at(freed)
            # Nothing can expire before the earliest running window ends, nor before a window started
            # after this sweep (at least the shortest window away) ends.
            self._next_sweep_ms = min(next_expiry, now + self._shortest_window_ms)
        while needed > len(self._free_rows) + len(self._table) - self._rows_used:
            if len(self._table) >= self.capacity:
                raise StorageFullError(
                    f"memory storage is full: {self.capacity} counters are live and none has expired; "
                    "raise the capacity (--cache) or use Redis"
                )
            grown = self._new_rows(min(self.capacity, 2 * len(self._table)))
            grown[: len(self._table)] = self._table
            self._table = grown

    def _free_rows_at(self, rows: np.ndarray) -> None:
        """Free rows that cached handles may name (a sweep, removed limits): bumps the generation."""
        if len(rows) == 0:
            return
        self._generation += 1
        self._forget_rows(rows.tolist())
        # A reservation never holds a reusable row, except on a limit a reload removed: forget those rows.
        for reservation in self._reservations.values():
            kept = ~np.isin(reservation.rows, rows)
            if not kept.all():
                reservation.rows = reservation.rows[kept]

    def _forget_rows(self, rows: list[int]) -> None:
        """Unlink rows from their counters' keys and put them on the free list."""
        for row in rows:
            del self._row_of_key[self._key_of_row[row]]
            self._key_of_row[row] = None
        self._table[rows] = (0, 0, 0, -1)
        self._free_rows.extend(rows)

    def _release_expired_reservations(self, now: int) -> None:
        expiries = self._reservation_expiries
        while expiries and expiries[0][0] <= now:
            _, reservation_id = heapq.heappop(expiries)
            held = self._reservations.pop(reservation_id, None)
            if held is not None:
                self._release(held)

    def _release(self, reservation: _Reservation) -> None:
        kernels.release(self._table, reservation.rows, reservation.amount)
        self._next_sweep_ms = 0  # rows it held may be reusable now

    @staticmethod
    def _new_rows(count: int) -> np.ndarray:
        table = np.zeros((count, kernels.ROW_WIDTH), dtype=np.int64)
        table[:, LIMIT_NO] = -1
        return table


__all__ = ["MemoryStorage", "DEFAULT_CAPACITY", "VALUE", "EXPIRES_AT", "RESERVED"]
