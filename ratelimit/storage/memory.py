"""In-memory counters: a numba-compiled table with bounded capacity (the embedded default storage).

The table (table.py, kernels.py) keeps everything in one block: counter rows, the key index
(counter key -> row), the key bytes, the limit registry and the reservations. The block is private
by default, or in shared memory so that worker processes decide against one table exactly as one
process would (`MemoryStorage(table=CounterTable.attach(name))`).

Every decision is one kernel call that takes the table's lock, so a request's counters are
checked and charged atomically across the HTTP API's threads, the gRPC server and other processes.
This process only keeps, per memoized descriptor set, a small `plan` array (limit numbers and key
bytes), never a Python object per counter.

When the table is full, counters that have a row keep it (a counter keeps its row for one window
after its window ends) and new keys are refused (StorageFullError); `refusals` counts them by reason.
Counters of limits that a reload removes stay for one window, so a limit that comes back resumes.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable, Iterable, Sequence

import numpy as np

from ratelimit.counters import Commit, Counter, CounterStatus, Decision, Reservation, StorageError, StorageFullError
from ratelimit.limits import Limit
from ratelimit.pacing import Pace
from ratelimit.storage import kernels
from ratelimit.storage.base import CounterFilter, CounterPage, CounterSet, Storage
from ratelimit.storage.summary import CounterSummary, LimitSummary
from ratelimit.storage.table import CounterTable, TableStats, warm_up

DEFAULT_CAPACITY = 2_000_000
LIST_PAGE = 1000
"""Counters one listing call returns at most unless asked for fewer."""
LIST_SCAN_ROWS = 1 << 15
"""Rows one listing kernel call scans under the lock (a fraction of a millisecond)."""
SUMMARY_CHUNK = 1 << 11
"""Live counters the busiest pass of a summary copies out per call at most (until the busiest
`top_n` are known every counter is a candidate): a fraction of a millisecond of the event loop."""
LIST_ROWS_PER_PAGE = 1 << 18
"""Rows one page scans at most, so a page that matches little still returns (with a cursor) soon."""
SWEEP_ROWS = 1 << 16

Clock = Callable[[], float]

_FULL_MESSAGES = {
    kernels.FULL_ROWS: "memory storage is full: {capacity} counters hold a row (a counter keeps its row for one "
                       "window after its window ends) and new keys are refused; raise the capacity (--cache) or use Redis",
    kernels.FULL_KEY_BYTES: "memory storage is full: no room left for the keys (variable values) of new counters; "
                            "raise the capacity (--cache) or use shorter variable values",
    kernels.FULL_RESERVATIONS: "memory storage is full: every reservation slot is held; commit reservations "
                               "sooner or give them a shorter ttl",
}


_Plan = tuple[int, np.ndarray, "tuple[int, ...] | None"]
"""What the kernel needs to find a request's counters, built once per memoized set and kept as its
storage_handle: (the limits' generation it was built for, the int64 array kernels.py describes
[n, limit_no x n, key length x n, first key word x n, key words...], and the positions in the set
of the counters in the array, None when that is all of them). A plain tuple of an int, an array
and ints: Python's cyclic GC stops tracking such a tuple, and every memoized set has one (an
object of a class is walked on every full collection: a memo of 100k sets was 300k tracked
objects, ~50 ms a full collection)."""


def _identity_hashes(limits: Iterable[Limit]) -> np.ndarray:
    """Each limit's identity as 128 bits (two int64 words a row), the same in every process (the
    registry is shared). In one numpy call: a reload of thousands of limits runs on the event loop."""
    # A copy: frombuffer's array is read-only, a different type to numba (another compilation).
    return np.frombuffer(b"".join(limit.identity_digest for limit in limits), dtype="<i8").reshape(-1, 2).copy()


class MemoryStorage(Storage):
    def __init__(self, capacity: int = DEFAULT_CAPACITY, clock: Clock = time.monotonic, *,
                 table: CounterTable | None = None) -> None:
        """A storage on `table` (attached or created by the caller), or on a new private table of
        `capacity` counters. The clock must be the same in every process sharing a table
        (time.monotonic is: Linux's CLOCK_MONOTONIC is system-wide)."""
        warm_up()
        self.table = table if table is not None else CounterTable.create(capacity)
        self.capacity = self.table.capacity
        self._words = self.table.words
        self._clock = clock
        self._max_values = np.zeros(self.table.limit_slots, dtype=np.int64)
        self._no_by_digest: dict[bytes, int] = {}
        """Limit number of each configured limit, by its identity_digest."""
        self._limit_by_no: dict[int, Limit] = {}
        self._generation = 0

    # -- configuration ---------------------------------------------------------------------------

    def configure(self, limits: Sequence[Limit]) -> None:
        # Keyed by identity_digest, whose hash Python keeps: a reload of thousands of limits runs on
        # the event loop, and hashing identity tuples (rebuilt each time) was half of its cost.
        current = {limit.identity_digest: limit for limit in limits}
        ids = _identity_hashes(current.values())
        windows = np.array([limit.seconds * 1000 for limit in current.values()], dtype=np.int64)
        removed = [no for digest, no in self._no_by_digest.items() if digest not in current]
        retire = np.array(removed, dtype=np.int64)
        retire_ids = _identity_hashes(self._limit_by_no[no] for no in removed)
        nos = np.zeros(len(current), dtype=np.int64)
        self._call(kernels.register_limits, ids, windows, retire, retire_ids, self._now_ms(), _pid(), nos)
        if (nos < 0).any():
            raise StorageError(
                f"memory storage: the limit registry is full: {len(current)} limits asked for, and of its "
                f"{self.table.limit_slots} slots the others hold limits configured, or removed less than their "
                f"window plus {kernels.REUSE_GRACE_MS // 60_000} minutes ago or still holding counters (a "
                "removed limit's slot is freed after that); reload fewer limits, or wait"
            )
        numbers = nos.tolist()
        self._max_values[nos] = [limit.max_value for limit in current.values()]
        self._no_by_digest = dict(zip(current, numbers, strict=True))
        self._limit_by_no = dict(zip(numbers, current.values(), strict=True))
        self._generation += 1  # plans of removed limits must not be used any more

    # -- decisions -------------------------------------------------------------------------------

    async def check_and_update(self, counters: CounterSet, delta: int, load_counters: bool) -> Decision:
        return self._decide(counters, delta, kernels.CHECK_AND_UPDATE, load_counters)[0]

    async def is_within_limits(self, counters: CounterSet, delta: int) -> Decision:
        return self._decide(counters, delta, kernels.CHECK, True)[0]

    async def update_counters(self, counters: CounterSet, delta: int) -> Decision:
        return self._decide(counters, delta, kernels.UPDATE, True)[0]

    async def reserve(self, counters: CounterSet, amount: int, ttl_seconds: float) -> Reservation:
        tag = random.getrandbits(62) + 1
        expires = self._now_ms() + max(1, int(ttl_seconds * 1000))
        answer, result = self._decide(counters, amount, kernels.RESERVE, True, tag=tag, expires_at=expires)
        reservation_id = None if answer.limited else f"{int(result[kernels.R_SLOT]):x}.{tag:x}"
        return Reservation(answer.limited_by, answer.counters, reservation_id)

    async def commit(self, reservation_id: str, counters: CounterSet, actual: int) -> Commit:
        slot, tag = _parse_reservation_id(reservation_id)
        answer, result = self._decide(counters, actual, kernels.COMMIT, True, slot=slot, tag=tag)
        return Commit(int(result[kernels.R_HELD]) == kernels.HELD, answer.counters)

    # -- control plane ---------------------------------------------------------------------------

    async def get_counters(self, limits: Sequence[Limit]) -> list[CounterStatus]:
        statuses: list[CounterStatus] = []
        row: int | None = 0
        while row is not None:
            counters, row = self._page(limits, row, LIST_PAGE * 10, None, None)
            statuses.extend(counters)
        return statuses

    def list_counters(self, limits: Sequence[Limit], *, cursor: str | None = None, max_counters: int = LIST_PAGE,
                      variable: str | None = None, value: str | None = None) -> CounterPage:
        """Live counters of `limits` from `cursor` (a previous page's next_cursor; None: the start),
        at most `max_counters` of them; with `variable` and `value`, only counters whose variable
        (its CEL source text, as in `set_variables`) resolved to `value` (the table is searched for
        the value's bytes, then each candidate checked). See `_page` for how the lock is held."""
        if (variable is None) != (value is None):
            raise ValueError("variable and value go together")
        row = _cursor_row(cursor)
        if variable is None:
            counters, next_row = self._page(limits, row, max_counters, None, None)
        else:
            wanted = [limit for limit in limits if variable in limit.variables]
            counters, next_row = self._page(wanted, row, max_counters, (value or "").encode("utf-8"),
                                            lambda counter: counter.set_variables.get(variable) == value)
        return CounterPage(counters, None if next_row is None else str(next_row))

    async def get_counters_page(self, limits: Sequence[Limit], cursor: str | None, max_counters: int,
                                match: CounterFilter | None = None) -> CounterPage:
        """A page of live counters for the control plane; `match` keeps only the counters it accepts."""
        counters, next_row = self._page(limits, _cursor_row(cursor), max_counters, None, match)
        return CounterPage(counters, None if next_row is None else str(next_row))

    def _page(self, limits: Sequence[Limit], cursor: int, max_counters: int, needle: bytes | None,
              match: CounterFilter | None) -> tuple[list[CounterStatus], int | None]:
        """Live counters from row `cursor` on, until `max_counters` counters or LIST_ROWS_PER_PAGE
        rows (see `_chunks` for how the lock is held); the page may hold fewer counters than asked
        while next_cursor is not None. Counters added or freed while a listing pages through may or
        may not appear."""
        if max_counters < 1:
            raise ValueError(f"max_counters must be at least 1, got {max_counters}")
        wanted, limit_of_no = self._wanted(limits)
        statuses: list[CounterStatus] = []
        next_cursor: int | None = cursor if limit_of_no else None
        scanned_until = cursor + LIST_ROWS_PER_PAGE
        while next_cursor is not None and len(statuses) < max_counters and next_cursor < scanned_until:
            listed, key_bytes, now, next_cursor = self._chunk(wanted, needle, next_cursor, max_counters - len(statuses))
            for row in listed.tolist():
                status = _status_at(limit_of_no, row, key_bytes, now)
                if match is None or match(status.counter):
                    statuses.append(status)
        return statuses, next_cursor

    async def counter_summary(self, limits: Sequence[Limit], top_n: int, thresholds: Sequence[float]) -> CounterSummary:
        """`summarize` over every live counter of `limits`, computed in the table: a Python object
        only for the busiest `top_n` counters. Two passes over the table, LIST_SCAN_ROWS rows per
        kernel call (each under the lock for a fraction of a millisecond), the event loop free in
        between (paced: ratelimit.pacing): the busiest, then the totals (of every counter, and of
        the others). Counters that change meanwhile are seen before or after: a busiest counter's
        series shows what the first pass saw, and the second counts it as it finds it; a counter
        that takes over a busiest counter's row between the passes (the row freed meanwhile) is
        counted but not added up among the others."""
        pace = Pace()
        wanted, limit_of_no = self._wanted(limits)
        busiest = await self._busiest(wanted, limit_of_no, top_n, pace) if limit_of_no and top_n > 0 else []
        slots = self.table.limit_slots
        threshold_array = np.array(thresholds, dtype=np.float64)
        counts = np.zeros(slots, dtype=np.int64)
        reached = np.zeros((len(thresholds), slots), dtype=np.int64)
        others = np.zeros(slots, dtype=np.int64)
        sums = np.zeros((3, slots), dtype=np.int64)  # max_value, used, remaining of the others
        soonest = np.full(slots, np.inf)
        skipped = np.array(sorted(row for row, _ in busiest), dtype=np.int64)
        cursor: int | None = 0 if limit_of_no else None
        while cursor is not None:
            result = self._call(kernels.add_up_rows, wanted, self._max_values, threshold_array, skipped, cursor,
                                LIST_SCAN_ROWS, self._now_ms(), _pid(), counts, reached, others, sums, soonest)
            cursor = None if result[1] < 0 else int(result[1])
            await pace.rest()
        summaries = {
            limit_of_no[no]: LimitSummary(
                counters=int(counts[no]), at_or_above=[int(r) for r in reached[:, no]], others=int(others[no]),
                others_max_value=int(sums[0, no]), others_used=int(sums[1, no]), others_remaining=int(sums[2, no]),
                others_reset=float(soonest[no]) if others[no] else 0.0,
            )
            for no in np.flatnonzero(counts).tolist()
        }
        return CounterSummary([status for _, status in busiest], summaries)

    async def _busiest(self, wanted: np.ndarray, limit_of_no: dict[int, Limit], top_n: int,
                       pace: Pace) -> list[tuple[int, CounterStatus]]:
        """(row, status) of the `top_n` live counters using the most, ties in row (listing) order.
        Once top_n are known, the kernel lists only counters using more than the last of them (on
        a tie the earlier counter stays), so most of the table is scanned without copying a row."""
        chunks: list[tuple[np.ndarray, np.ndarray, int]] = []  # listed rows, their key bytes, when read
        candidates: list[tuple[int, int, int, int]] = []  # (-used, row, chunk, position in the chunk)
        floor = -1
        cursor: int | None = 0
        while cursor is not None:
            listed, key_bytes, now, cursor = self._chunk(wanted, None, cursor, SUMMARY_CHUNK, floor)
            if len(listed):
                chunk_used = listed[:, 2] + listed[:, 4]
                best = np.argsort(-chunk_used, kind="stable")[:top_n]
                candidates.extend(zip((-chunk_used[best]).tolist(), listed[best, 0].tolist(),
                                      [len(chunks)] * len(best), best.tolist(), strict=True))
                chunks.append((listed, key_bytes, now))
                candidates.sort()
                del candidates[top_n:]
                if len(candidates) == top_n:
                    floor = -candidates[-1][0]
            await pace.rest()
        busiest = []
        for _, row, chunk, k in candidates:
            listed, key_bytes, now = chunks[chunk]
            busiest.append((row, _status_at(limit_of_no, listed[k].tolist(), key_bytes, now)))
            if pace.worked_a_slice():
                await pace.rest()
        return busiest

    def _wanted(self, limits: Sequence[Limit]) -> tuple[np.ndarray, dict[int, Limit]]:
        """The limit numbers of `limits` in this table, as a mask for the kernels and a look-up."""
        wanted = np.zeros(self.table.limit_slots, dtype=np.bool_)
        limit_of_no: dict[int, Limit] = {}
        for limit in limits:
            no = self._no_by_digest.get(limit.identity_digest)
            if no is not None:
                wanted[no] = True
                limit_of_no[no] = limit
        return wanted, limit_of_no

    def _chunk(self, wanted: np.ndarray, needle: bytes | None, cursor: int, room: int,
               min_used: int = -1) -> tuple[np.ndarray, np.ndarray, int, int | None]:
        """At most `room` live rows of the wanted limits (using more than `min_used`) from row
        `cursor` on, within LIST_SCAN_ROWS rows, copied out under the lock (a fraction of a millisecond): (listed rows as in
        kernels.list_rows, their key bytes, the time they were read at, the next cursor or None)."""
        needle_array = np.array(bytearray(needle or b""), dtype=np.uint8)  # writable: one compiled type
        listed = np.empty((room, kernels.LISTED_WIDTH), dtype=np.int64)
        key_room = min(room * 32, 1 << 19)
        while True:
            listed_keys = np.empty(key_room + kernels.BLOCK_PAYLOAD_WORDS, dtype=np.int64)
            now = self._now_ms()
            result = self._call(kernels.list_rows, wanted, needle_array, min_used, cursor, LIST_SCAN_ROWS, now, _pid(),
                                listed, listed_keys)
            if result[0] > 0 or result[2] == 0:
                break
            key_room = int(result[2])  # the next key alone is longer than the buffer
        next_cursor = None if result[1] < 0 else int(result[1])
        return listed[: int(result[0])], listed_keys.view(np.uint8), now, next_cursor

    def sweep(self, max_rows: int = SWEEP_ROWS) -> int:
        """Release expired reservations and reclaim rows (idle for a window after their window ended)
        among the next `max_rows` rows of the sweep cycle; returns how many rows were freed. Decisions
        reclaim on their own when they need room; a control-plane task calling this now and then
        keeps the free list stocked so they rarely have to."""
        result = self._call(kernels.sweep, max_rows, self._now_ms(), _pid())
        return int(result[kernels.R_FREED])

    @property
    def counter_count(self) -> int:
        """Counters currently holding a row (live, or kept for a window after their window ended)."""
        return int(self.table.header[kernels.H_LIVE_ROWS])

    @property
    def refusals(self) -> dict[str, int]:
        """Decisions refused because the table was full, by reason (rows, key_bytes, reservations),
        counted in the table: the sum over every process sharing it."""
        return self.table.stats().refusals

    def stats(self) -> TableStats:
        return self.table.stats()

    async def close(self) -> None:
        """Nothing to release here: the table's owner closes (and, if shared, unlinks) it."""

    # -- internals -------------------------------------------------------------------------------

    def _now_ms(self) -> int:
        return round(self._clock() * 1000)

    def _call(self, kernel: Callable[..., None], *args: object) -> np.ndarray:
        """Run a kernel that takes the table lock (buf first, result last), waiting while it is busy."""
        result = np.zeros(kernels.RESULT_WORDS, dtype=np.int64)
        waited_since = 0.0
        while True:
            kernel(self._words, *args, result)
            if result[kernels.R_CODE] != kernels.BUSY:
                return result
            waited_since = waited_since or time.monotonic()
            self.table.wait_for_lock(waited_since)

    def _plan(self, counter_set: CounterSet) -> tuple[np.ndarray, tuple[Limit, ...], tuple[tuple[str, ...], ...]]:
        """The kernel's array for these counters, with the limits and values of the counters in it."""
        handle = counter_set.storage_handle
        if type(handle) is tuple and handle[0] == self._generation:
            _, array, positions = handle
        else:
            array, positions = self._new_plan(counter_set)
            plan: _Plan = (self._generation, array, positions)
            counter_set.storage_handle = plan
        if positions is None:
            return array, counter_set.limits, counter_set.values
        return (array, tuple(counter_set.limits[i] for i in positions),
                tuple(counter_set.values[i] for i in positions))

    def _new_plan(self, counter_set: CounterSet) -> tuple[np.ndarray, tuple[int, ...] | None]:
        no_by_digest = self._no_by_digest
        # Counters of limits that a concurrent reload removed are left out: their limit is gone.
        known = [(position, no) for position, limit in enumerate(counter_set.limits)
                 if (no := no_by_digest.get(limit.identity_digest)) is not None]
        keys = [Counter(counter_set.limits[position], counter_set.values[position]).qualifier().encode("utf-8")
                for position, _ in known]
        n = len(known)
        lengths = [len(key) for key in keys]
        # Each key starts on a word and is zero-padded to whole words (kernels compare words).
        padded = b"".join(key + bytes(-len(key) % 8) for key in keys)
        array = np.zeros(1 + 3 * n + len(padded) // 8, dtype=np.int64)
        array[0] = n
        array[1 : 1 + n] = [no for _, no in known]
        array[1 + n : 1 + 2 * n] = lengths
        array[1 + 2 * n : 1 + 3 * n] = np.cumsum([0] + [-(-length // 8) for length in lengths[:-1]]) if n else []
        array[1 + 3 * n :] = np.frombuffer(padded, dtype="<i8")
        return array, None if n == len(counter_set) else tuple(position for position, _ in known)

    def _decide(self, counters: CounterSet, delta: int, mode: int, load_counters: bool, *, slot: int = -1,
                tag: int = 0, expires_at: int = 0) -> tuple[Decision, np.ndarray]:
        array, limits, all_values = self._plan(counters)
        now = self._now_ms()
        n = len(limits)
        out = np.zeros(kernels.RESULT_WORDS + n * kernels.STATE_WIDTH, dtype=np.int64)
        words = self._words
        decide = kernels.decide
        pid = _pid()
        waited_since = 0.0
        while True:
            decide(words, self._max_values, array, mode, delta, now, pid, slot, tag, expires_at, out)
            code = int(out[kernels.R_CODE])
            if code != kernels.BUSY:
                break
            waited_since = waited_since or time.monotonic()
            self.table.wait_for_lock(waited_since)
        if code < kernels.WITHIN:
            raise StorageFullError(_FULL_MESSAGES[code].format(capacity=self.capacity))
        statuses = []
        if load_counters:
            states = out[kernels.RESULT_WORDS :].reshape(n, kernels.STATE_WIDTH).tolist()
            for limit, values, (_, used, expires, reserved) in zip(limits, all_values, states, strict=True):
                statuses.append(CounterStatus(Counter(limit, values), used, _expires_in(expires, now), reserved))
        return Decision(limits[code] if code >= 0 else None, statuses), out


def _status_at(limit_of_no: dict[int, Limit], row: list[int], key_bytes: np.ndarray, now: int) -> CounterStatus:
    """The CounterStatus of one row as kernels.list_rows copied it out (its key in `key_bytes`)."""
    _, no, value, expires, reserved, length, first_word = row
    limit = limit_of_no[no]
    qualifier = key_bytes[8 * first_word : 8 * first_word + length].tobytes().decode("utf-8")
    return CounterStatus(Counter(limit, Counter.values_from_qualifier(limit, qualifier)), value,
                         _expires_in(expires, now), reserved)


def _expires_in(expires_at: int, now: int) -> float:
    """Seconds until a window ends, from the table's milliseconds (0 when no window runs)."""
    return (expires_at - now) / 1000 if expires_at else 0.0


def _cursor_row(cursor: str | None) -> int:
    try:
        row = 0 if cursor is None else int(cursor)
    except ValueError:
        row = -1
    if row < 0:
        raise ValueError(f"invalid cursor {cursor!r}: pass back a next_cursor from a previous page")
    return row


def _parse_reservation_id(reservation_id: str) -> tuple[int, int]:
    """(slot, tag) from an id made by reserve; an id that is not one is simply not held."""
    slot, _, tag = reservation_id.partition(".")
    try:
        slot_no, tag_no = int(slot, 16), int(tag, 16)
    except ValueError:
        return -1, 0
    if not (0 <= slot_no < 1 << 31 and 0 < tag_no < 1 << 63):
        return -1, 0
    return slot_no, tag_no


_process_id = os.getpid()


def _pid() -> int:
    """This process's id (the lock word names its holder), cached: decisions ask for it every time."""
    return _process_id


def _forked() -> None:
    global _process_id
    _process_id = os.getpid()


os.register_at_fork(after_in_child=_forked)


__all__ = ["MemoryStorage", "CounterTable", "DEFAULT_CAPACITY"]
