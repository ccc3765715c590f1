"""The memory table's control-plane side and its key index, in one process with a controllable clock:
paged listing, filtering by a variable's value, sweeping, counters of removed limits, and many keys
coming and going through the open-addressing index (compared with the reference model)."""

from __future__ import annotations

import asyncio
import random
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ratelimit.counters import StorageError, StorageFullError
from ratelimit.engine import RateLimiter
from ratelimit.limits import Limit
from ratelimit.storage import kernels, memory
from ratelimit.storage.memory import MemoryStorage
from ratelimit.storage.summary import summarize
from ratelimit.storage.table import CounterTable
from tests.reference_model import ReferenceModel

NS = "ns"
USER = "descriptors[0]['user']"
MODEL = "descriptors[0]['model']"


class Clock:
    def __init__(self) -> None:
        self.now = 5000.0

    def __call__(self) -> float:
        return self.now


def engine_with(*limits: Limit, capacity: int = 10_000) -> tuple[RateLimiter, MemoryStorage, Clock]:
    clock = Clock()
    storage = MemoryStorage(capacity=capacity, clock=clock)
    return RateLimiter(storage, limits), storage, clock


async def test_listing_pages_through_every_counter_once() -> None:
    per_user = Limit(NS, 100, 60, (), (USER,), name="per-user")
    engine, storage, _ = engine_with(per_user)
    for i in range(2500):
        await engine.report(NS, [{"user": f"u{i}"}], 1 + i % 7)
    seen = {}
    cursor: str | None = None
    pages = 0
    while pages == 0 or cursor is not None:
        page = storage.list_counters([per_user], cursor=cursor, max_counters=1000)
        assert len(page.counters) <= 1000
        for status in page.counters:
            assert status.counter.values not in seen
            seen[status.counter.values] = status.value
        cursor = page.next_cursor
        pages += 1
    assert pages >= 3
    assert seen == {(f"u{i}",): 1 + i % 7 for i in range(2500)}


async def test_get_counters_page_takes_text_cursors_and_a_match() -> None:
    per_user = Limit(NS, 100, 60, (), (USER,))
    engine, storage, _ = engine_with(per_user)
    for i in range(300):
        await engine.report(NS, [{"user": f"u{i}"}], 1)
    found: list[str] = []
    cursor = None
    while True:
        page = await storage.get_counters_page([per_user], cursor, 50, lambda c: c.values[0].endswith("7"))
        found.extend(status.counter.values[0] for status in page.counters)
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
        assert isinstance(cursor, str)
    assert sorted(found) == sorted(f"u{i}" for i in range(300) if str(i).endswith("7"))
    with pytest.raises(ValueError, match="invalid cursor"):
        await storage.get_counters_page([per_user], "not-a-cursor", 10)


async def test_listing_filters_by_a_variable_value() -> None:
    per_user = Limit(NS, 100, 60, (), (USER,), name="per-user")
    per_user_model = Limit(NS, 100, 60, (), (USER, MODEL), name="per-user-model")
    global_limit = Limit(NS, 1000, 60, (), (), name="global")
    engine, storage, _ = engine_with(per_user, per_user_model, global_limit)
    for user in ("alice", "bob", "malice"):
        for model in ("alice", "gpt"):  # a model named like a user must not match the user filter
            await engine.report(NS, [{"user": user, "model": model}], 1)
    page = storage.list_counters(engine.all_limits(), variable=USER, value="alice")
    assert page.next_cursor is None
    found = sorted((status.limit.name, status.counter.set_variables[MODEL] if MODEL in status.limit.variables
                    else None, status.value) for status in page.counters)
    assert found == [("per-user", None, 2), ("per-user-model", "alice", 1), ("per-user-model", "gpt", 1)]


async def test_counters_of_a_removed_limit_resume_within_a_window_and_restart_after() -> None:
    minute = Limit(NS, 10, 60, (), (USER,), name="minute")
    hour = Limit(NS, 10, 3600, (), (USER,), name="hour")
    engine, storage, clock = engine_with(minute, hour)
    await engine.report(NS, [{"user": "alice"}], 4)
    engine.configure_with([hour])  # the minute limit disappears (a bad reload, say)
    assert [s.limit.name for s in await engine.get_counters(NS)] == ["hour"]
    clock.now += 30
    engine.configure_with([minute, hour])  # and comes back within its window: it resumes
    decision = await engine.check_and_report(NS, [{"user": "alice"}], 1, load_counters=True)
    assert {s.limit.name: s.value for s in decision.counters} == {"minute": 5, "hour": 5}
    engine.configure_with([hour])
    clock.now += 61
    engine.configure_with([minute, hour])  # back after its window: a fresh window
    decision = await engine.check_and_report(NS, [{"user": "alice"}], 1, load_counters=True)
    assert {s.limit.name: s.value for s in decision.counters} == {"minute": 1, "hour": 6}


async def test_sweep_frees_rows_idle_for_a_window_and_nothing_else() -> None:
    short = Limit(NS, 10, 10, (), (USER,))
    engine, storage, clock = engine_with(short, capacity=1000)
    for i in range(500):
        await engine.report(NS, [{"user": f"u{i}"}], 1)
    clock.now += 15  # windows over, but each counter keeps its row for one more window
    for i in range(100):
        await engine.report(NS, [{"user": f"u{i}"}], 1)  # these start new windows
    assert storage.sweep(max_rows=10_000) == 0
    clock.now += 10
    assert storage.sweep(max_rows=10_000) == 400
    assert storage.counter_count == 100
    assert storage.stats().freed_rows == 400


async def test_reservation_holds_keep_rows_and_release_on_expiry() -> None:
    limit = Limit(NS, 10, 10, (), (USER,))
    engine, storage, clock = engine_with(limit, capacity=1)
    decision = await engine.reserve(NS, [{"user": "alice"}], 4, 100.0)
    assert decision.reservation_id
    clock.now += 50  # long past the (never started) window: the hold keeps the row
    with pytest.raises(StorageFullError):
        await engine.report(NS, [{"user": "bob"}], 1)
    clock.now += 51  # the reservation expired and released itself: bob gets the row
    await engine.report(NS, [{"user": "bob"}], 1)
    assert [s.counter.values for s in await engine.get_counters(NS)] == [("bob",)]


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_many_keys_coming_and_going_match_the_model(seed: int) -> None:
    """Hundreds of users through a 64-row table with short windows: rows are reclaimed and reused
    all the time, so index entries are deleted (backward shift) and re-added in every probe pattern,
    and key blocks of long keys are freed and reused."""
    rng = random.Random(seed)
    limits = [Limit(NS, 5, 2, (), (USER,), name="short"), Limit(NS, 50, 7, (), (USER, MODEL), name="pair")]
    clock = Clock()
    # Room for every key's bytes (the model knows nothing of key bytes; their refusal is tested below).
    storage = MemoryStorage(clock=clock, table=CounterTable.create(64, key_bytes_per_counter=256))
    engine = RateLimiter(storage, limits)
    model = ReferenceModel(keeps_removed_counters=True)
    model.configure(limits)
    compared = 0
    for _ in range(3000):
        clock.now += rng.choice([0, 0, 0.1, 0.5, 1.3])
        now_ms = round(clock.now * 1000)
        user = rng.randrange(150)
        # Short keys live in their row; longer ones take one or several key blocks.
        descriptors = [{"user": f"user-{user}" + "-é" * (user % 4 * 9), "model": rng.choice("ab")}]
        keys = model.keys_for(NS, descriptors)
        occupied = {key for key in model.counters if model.occupies_row(key, now_ms)}
        delta = rng.randrange(1, 4)
        if len(occupied | set(keys)) > storage.capacity:
            continue  # the table may be full: the answer is not comparable
        decision = await engine.check_and_report(NS, descriptors, delta, load_counters=True)
        expected = model.check_and_report(keys, delta, now_ms)
        assert (decision.limited_by.identity if decision.limited_by else None) == expected.limited_by
        assert {(s.limit.identity, s.counter.values): (s.value, round(s.expires_in * 1000), s.reserved)
                for s in decision.counters} == expected.states
        compared += 1
    assert compared > 1000
    listed = {(s.limit.identity, s.counter.values): (s.value, round(s.expires_in * 1000), s.reserved)
              for s in await engine.get_counters(NS)}
    assert listed == model.live_counters(NS, round(clock.now * 1000))


async def test_keys_longer_than_the_key_room_are_refused_with_their_own_reason() -> None:
    clock = Clock()
    storage = MemoryStorage(clock=clock, table=CounterTable.create(8, key_bytes_per_counter=24))
    engine = RateLimiter(storage, [Limit(NS, 5, 60, (), (USER,))])
    await engine.report(NS, [{"user": "u" * 24 * 8}], 1)  # takes every key block of the table
    await engine.report(NS, [{"user": "short"}], 1)  # short keys live in their row
    with pytest.raises(StorageFullError, match="keys"):
        await engine.report(NS, [{"user": "v" * 30}], 1)
    assert storage.refusals == {"rows": 0, "key_bytes": 1, "reservations": 0}
    assert sorted(len(s.counter.values[0]) for s in await engine.get_counters(NS)) == [5, 192]


THRESHOLDS = (0.5, 0.75, 0.9, 1.0)


@settings(max_examples=60, deadline=None)
@given(
    hits=st.lists(st.tuples(st.integers(0, 2), st.integers(0, 30), st.integers(0, 12), st.booleans()), max_size=60),
    top_n=st.integers(0, 8),
    scan_rows=st.sampled_from([3, 7, 1 << 15]),
    chunk=st.sampled_from([1, 2, 5, 1 << 11]),
)


async def test_counter_summary_is_the_summary_of_the_listing(hits: list[tuple[int, int, int, bool]], top_n: int,
                                                        scan_rows: int, chunk: int) -> None:
    """The memory table's summary (a pass for the busiest, which lists only counters busier than
    the top_n found so far, then a pass adding up the rest, both in chunks of rows) equals
    `summarize` over the plain listing: the same busiest counters in the same order, and the same
    per-limit totals, thresholds and soonest reset of the rest; with windows at different ages
    (some ended), reservations (some lapsed, some outliving their window), overshoot and a limit of 0."""
    limits = [Limit(NS, 10, 60, (), (USER,), name="small"), Limit(NS, 0, 30, (), (USER,), name="closed"),
              Limit(NS, 25, 90, (), (USER, MODEL), name="pair")]
    engine, storage, clock = engine_with(*limits)
    for which, user, amount, reserve in hits:
        clock.now += 0.25 if amount % 4 else 12.0  # jumps: windows end, reservations lapse
        descriptors = [{"user": f"u{user}", "model": f"m{user % 3}"}]
        limit = limits[which]
        counters = engine.counters_for(NS, descriptors)
        only = type(counters)([c for c in counters.counters if c.limit is limit])
        if reserve:
            await storage.reserve(only, amount, 20)
        else:
            await storage.update_counters(only, amount)
    listing = await storage.get_counters(limits)
    with mock.patch.object(memory, "LIST_SCAN_ROWS", scan_rows), mock.patch.object(memory, "SUMMARY_CHUNK", chunk):
        got = await storage.counter_summary(limits, top_n, THRESHOLDS)
    expected = summarize(listing, top_n, THRESHOLDS)
    assert [(s.counter, s.value, s.reserved, s.expires_in) for s in got.busiest] == \
        [(s.counter, s.value, s.reserved, s.expires_in) for s in expected.busiest]
    assert got.limits == expected.limits


async def test_a_summary_leaves_the_loop_free_between_chunks_of_rows() -> None:
    """Both passes of a summary go back to the loop between kernel calls of LIST_SCAN_ROWS rows:
    a scrape over 300k counters never holds the decisions for its whole length (here 64-row calls
    over 1,000 counters; another task runs between every two calls)."""
    per_user = Limit(NS, 100, 60, (), (USER,), name="per-user")
    engine, storage, _ = engine_with(per_user)
    for i in range(1000):
        await engine.report(NS, [{"user": f"u{i}"}], 1 + i % 50)
    events: list[str] = []
    call = storage._call

    def kernel_call(*args: object) -> object:
        events.append("kernel")
        return call(*args)  # type: ignore[arg-type]

    async def tick() -> None:
        while True:
            if events[-1:] != ["turn"]:
                events.append("turn")
            await asyncio.sleep(0)

    ticker = asyncio.get_running_loop().create_task(tick())
    await asyncio.sleep(0)
    with mock.patch.object(memory, "LIST_SCAN_ROWS", 64), mock.patch.object(storage, "_call", kernel_call):
        got = await storage.counter_summary([per_user], 20, THRESHOLDS)
    ticker.cancel()
    assert events.count("kernel") >= 2 * (1000 // 64)  # each pass over the rows
    assert all(a != b for a, b in zip(events, events[1:]))  # a turn of the loop between every two calls
    assert [s.value for s in got.busiest] == [50] * 20
    assert got.limits[per_user].counters == 1000 and got.limits[per_user].others == 980


def _small_registry(clock: Clock) -> MemoryStorage:
    """A table with 64 limit slots: 64 limits fill its registry."""
    return MemoryStorage(table=CounterTable.create(1000, limit_slots=64), clock=clock)


async def test_numbers_of_removed_limits_are_reused_once_their_counters_are_gone() -> None:
    """A long-running service that reloads ever new limits keeps going: 1200 distinct limits pass
    through a 64-limit registry, 12 at a time, each charged before the next reload removes it."""
    clock = Clock()
    storage = _small_registry(clock)
    engine = RateLimiter(storage)
    for reload in range(100):
        limits = [Limit(f"tenant-{reload}-{i}", 5, 60, (), (USER,), name=f"l{i}") for i in range(12)]
        engine.configure_with(limits)
        for limit in limits:
            decision = await engine.check_and_report(limit.namespace, [{"user": "alice"}], 2, load_counters=True)
            assert [s.value for s in decision.counters] == [2]  # a fresh counter, nothing inherited
        # Reloads 5 minutes apart: the limits of the last two are still within window + grace (36 slots
        # with the current ones); older ones' slots are freed for new limits.
        clock.now += 300
    stats = storage.stats()
    assert stats.limits_freed > 1000 and stats.limits <= 64


async def test_a_removed_limit_keeps_its_number_while_it_has_counters() -> None:
    """Numbers are reused only when their counters are gone: a full registry of limits removed
    within their window is refused with what the cap is, and a limit that comes back resumes."""
    clock = Clock()
    storage = _small_registry(clock)
    engine = RateLimiter(storage)
    kept = Limit("kept", 10, 3600, (), (USER,), name="hourly")
    engine.configure_with([kept])
    await engine.report("kept", [{"user": "alice"}], 7)
    others = [Limit(f"other-{i}", 5, 60, (), (USER,)) for i in range(63)]
    engine.configure_with(others)  # `kept` is removed (retired): all 64 slots taken
    engine.configure_with(others[:1])  # 62 more removed, never charged
    clock.now += 60 + kernels.REUSE_GRACE_MS / 1000 + 1  # their windows and the grace have passed...
    engine.configure_with([others[0], Limit("new", 5, 60, (), (USER,))])  # ...so their slots are freed
    assert storage.stats().limits_freed == 62
    engine.configure_with([kept])
    [counter] = await engine.get_counters("kept")
    assert counter.value == 7  # `kept`'s hour is not over: its number and counter were kept

    clock.now += 1  # a registry of limits that are all configured or counting is full, and says so
    with pytest.raises(StorageError, match="the limit registry is full: 64 limits asked for, and of its 64 slots"):
        storage.configure([Limit(f"many-{i}", 5, 60, (), (USER,)) for i in range(64)])  # + `kept`'s
    [counter] = await engine.get_counters("kept")
    assert counter.value == 7  # the refused reload changed nothing


async def test_a_stale_worker_does_not_retire_a_reused_number() -> None:
    """Two storages on one table (two workers): one still holds a limit the other removed; once its
    number is reused, the stale storage's own reload must not retire the new limit holding it."""
    clock = Clock()
    table = CounterTable.create(1000, limit_slots=64)
    first, second = MemoryStorage(table=table, clock=clock), MemoryStorage(table=table, clock=clock)
    old = Limit("old", 5, 60, (), (USER,))
    first.configure([old])
    second.configure([old])
    fillers = [Limit(f"f{i}", 5, 60, (), (USER,)) for i in range(63)]
    first.configure(fillers)  # `old` retired; the registry is full
    clock.now += 60 + kernels.REUSE_GRACE_MS / 1000 + 1
    new = Limit("new", 5, 3600, (), (USER,))
    first.configure([*fillers, new])  # `new` takes the only slot freed: `old`'s
    engine = RateLimiter(first)
    engine.configure_with([*fillers, new])
    await engine.report("new", [{"user": "bob"}], 3)
    second.configure([*fillers, new])  # `second` retires what it knew as `old`: not `new`'s number
    slot = table.words[kernels.H_OFF_LIMITS] + first._no_by_digest[new.identity_digest] * kernels.LIMIT_WIDTH
    assert table.words[slot + kernels.STATE] == kernels.LIMIT_ACTIVE  # retired, it could be freed while in use
    [counter] = await engine.get_counters("new")
    assert counter.value == 3
    engine.configure_with([new])  # the fillers go; after their window and the grace, their slots
    clock.now += 61 + kernels.REUSE_GRACE_MS / 1000  # are freed, and `new`'s is not
    engine.configure_with([new, Limit("newer", 5, 60, (), (USER,))])
    await engine.report("new", [{"user": "bob"}], 1)
    assert [c.value for c in await engine.get_counters("new")] == [4]
