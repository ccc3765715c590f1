"""The engine's promises, stated on the memory storage with a controllable clock."""

from __future__ import annotations

import asyncio
import threading

import pytest

from ratelimit.counters import StorageFullError
from ratelimit.engine import MAX_DELTA, InvalidRequest, RateLimiter
from ratelimit.limits import Limit
from ratelimit.storage.memory import MemoryStorage

USER = ("descriptors[0]['user']",)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def limiter(*limits: Limit, capacity: int = 1000) -> tuple[RateLimiter, Clock]:
    clock = Clock()
    return RateLimiter(MemoryStorage(capacity=capacity, clock=clock), limits), clock


def alice(**extra: str) -> list[dict[str, str]]:
    return [{"user": "alice", **extra}]


async def test_token_budget_admits_until_spent_and_a_limited_request_charges_nothing() -> None:
    engine, _ = limiter(Limit("ns", 300, 300, (), USER))

    async def scenario() -> list[bool]:
        return [(await engine.check_and_report("ns", alice(), 100)).limited for _ in range(4)]

    assert await scenario() == [False, False, False, True]
    (status,) = await engine.get_counters("ns")
    assert (status.value, status.remaining) == (300, 0)


async def test_overshooting_report_keeps_remaining_at_zero_and_shows_the_overshoot() -> None:
    engine, _ = limiter(Limit("ns", 300, 300, (), USER))
    await engine.report("ns", alice(), 1000)
    (status,) = await engine.get_counters("ns")
    assert (status.remaining, status.overshoot) == (0, 700)


async def test_stacked_limits_admit_the_tightest_and_charge_every_counter_only_when_admitted() -> None:
    minute = Limit("ns", 5, 60, (), USER, name="minute")
    hour = Limit("ns", 3, 3600, (), USER, name="hour")
    engine, _ = limiter(minute, hour)

    async def scenario() -> list[Limit | None]:
        return [(await engine.check_and_report("ns", alice())).limited_by for _ in range(5)]

    assert [limit.name if limit else None for limit in await scenario()] == [None, None, None, "hour", "hour"]
    used = {status.limit.name: status.value for status in await engine.get_counters("ns")}
    assert used == {"minute": 3, "hour": 3}


async def test_window_restarts_after_its_seconds() -> None:
    engine, clock = limiter(Limit("ns", 1, 60, (), USER))
    assert not (await engine.check_and_report("ns", alice())).limited
    assert (await engine.check_and_report("ns", alice())).limited
    clock.now += 59.999
    assert (await engine.check_and_report("ns", alice())).limited
    clock.now += 0.001
    assert not (await engine.check_and_report("ns", alice())).limited


async def test_check_is_read_only_and_passes_while_budget_is_left() -> None:
    engine, _ = limiter(Limit("ns", 2, 60, (), USER))
    assert not (await engine.check("ns", alice(), 0)).limited
    await engine.report("ns", alice(), 1)
    assert not (await engine.check("ns", alice(), 0)).limited
    await engine.report("ns", alice(), 1)
    assert (await engine.check("ns", alice(), 0)).limited
    (status,) = await engine.get_counters("ns")
    assert status.value == 2


async def test_unresolvable_variable_or_false_condition_means_the_limit_does_not_apply() -> None:
    engine, _ = limiter(Limit("ns", 0, 60, ("descriptors[0]['model'] == 'm'",), USER))
    assert not (await engine.check_and_report("ns", [{"user": "alice", "model": "other"}])).limited
    assert not (await engine.check_and_report("ns", [{"model": "m"}])).limited
    assert (await engine.check_and_report("ns", [{"user": "alice", "model": "m"}])).limited
    assert not (await engine.check_and_report("unknown-namespace", alice())).limited


async def test_reservations_hold_budget_and_commit_replaces_them_by_the_actual_amount() -> None:
    engine, clock = limiter(Limit("ns", 100, 300, (), USER))
    first = await engine.reserve("ns", alice(), 60, ttl_seconds=30)
    assert first.reservation_id and not first.limited
    second = await engine.reserve("ns", alice(), 60, ttl_seconds=30)
    assert second.limited and second.reservation_id is None
    committed = await engine.commit("ns", alice(), first.reservation_id, 25)
    assert committed.held
    assert [(s.value, s.reserved, s.remaining) for s in committed.counters] == [(25, 0, 75)]
    # An expired reservation releases itself; committing it later still charges what was used.
    late = await engine.reserve("ns", alice(), 70, ttl_seconds=10)
    clock.now += 10
    assert not (await engine.check_and_report("ns", alice(), 70)).limited
    answer = await engine.commit("ns", alice(), late.reservation_id or "", 5)
    assert answer.held is False
    assert [s.value for s in answer.counters] == [100]


async def test_rate_limit_headers_follow_limitadors_format() -> None:
    engine, _ = limiter(Limit("ns", 5, 60, (), USER, name="minute"), Limit("ns", 3, 3600, (), USER))
    decision = await engine.check_and_report("ns", alice(), load_counters=True)
    assert decision.rate_limit_headers() == {
        "X-RateLimit-Limit": '3, 3;w=3600, 5;w=60;name="minute"',
        "X-RateLimit-Remaining": "2",
        "X-RateLimit-Reset": "3600",
    }


def test_64_threads_get_exactly_the_limit_admitted() -> None:
    engine, _ = limiter(Limit("ns", 1000, 3600, (), ()))
    admitted = []

    def worker() -> None:
        async def calls() -> int:
            return sum([not (await engine.check_and_report("ns", alice())).limited for _ in range(25)])

        admitted.append(asyncio.run(calls()))

    threads = [threading.Thread(target=worker) for _ in range(64)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(admitted) == 1000


async def test_full_table_refuses_new_keys_first_and_reuses_rows_idle_for_a_window() -> None:
    engine, clock = limiter(Limit("ns", 5, 60, (), USER), capacity=2)
    await engine.report("ns", [{"user": "a"}], 1)
    await engine.report("ns", [{"user": "b"}], 1)
    with pytest.raises(StorageFullError, match="full"):
        await engine.report("ns", [{"user": "c"}], 1)
    clock.now += 60  # a's and b's windows just ended: they keep their rows, the new key is refused
    with pytest.raises(StorageFullError, match="new keys are refused"):
        await engine.check_and_report("ns", [{"user": "c"}], 1)
    assert not (await engine.check_and_report("ns", [{"user": "a"}], 1)).limited
    clock.now += 60  # b idle for a whole window after its window: its row goes to the new key
    await engine.report("ns", [{"user": "c"}], 1)
    assert [s.counter.values for s in await engine.get_counters("ns")] == [("c",)]
    assert not (await engine.check_and_report("ns", [{"user": "a"}], 1)).limited  # a still has its row
    with pytest.raises(StorageFullError):
        await engine.report("ns", [{"user": "b"}], 1)  # b is a new key again, and the table is full
    assert engine.storage.refusals["rows"] == 3  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("descriptors", "delta", "field"),
    [
        ([{}] * 65, 1, "descriptors"),
        ([{f"k{i}": "v" for i in range(65)}], 1, "descriptors[0]"),
        ([{"k" * 257: "v"}], 1, "descriptors[0]"),
        ([{"k": "v" * 4097}], 1, "descriptors[0]['k']"),
        ([{"k": 5}], 1, "descriptors[0]"),
        ([{"k": "\ud800"}], 1, "descriptors[0]"),
        (["not a map"], 1, "descriptors[0]"),
        ("not a list", 1, "descriptors"),
        ([{"k": ["unhashable"]}], 1, "descriptors[0]"),
        ([{"k": "v"}], -1, "delta"),
        ([{"k": "v"}], MAX_DELTA + 1, "delta"),
        ([{"k": "v"}], 2**64 - 1, "delta"),
    ],
)


async def test_out_of_bounds_input_is_refused_naming_the_field(descriptors, delta, field) -> None:
    engine, _ = limiter(Limit("ns", 5, 60, (), USER))
    with pytest.raises(InvalidRequest) as caught:
        await engine.check_and_report("ns", descriptors, delta)
    assert caught.value.field == field


async def test_reload_keeps_counters_of_unchanged_identity_and_drops_removed_ones() -> None:
    minute = Limit("ns", 5, 60, (), USER)
    burst = Limit("ns", 50, 10, (), ())
    engine, _ = limiter(minute, burst)
    await engine.report("ns", alice(), 4)
    engine.configure_with([Limit("ns", 10, 60, (), USER, name="raised")])
    (status,) = await engine.get_counters("ns")
    assert (status.limit.name, status.value, status.remaining) == ("raised", 4, 6)


async def test_a_set_resolved_before_a_reload_decides_only_on_the_limits_still_configured() -> None:
    """A request resolved its counters, then a reload removed one of their limits before it reached
    the storage: it is decided on the counters that remain, and reports only those."""
    minute = Limit("ns", 2, 60, (), USER, name="minute")
    hour = Limit("ns", 3, 3600, (), USER, name="hour")
    engine, _ = limiter(minute, hour)
    resolved = engine.counters_for("ns", alice())
    assert (await engine.storage.check_and_update(resolved, 1, True)).counters[1].value == 1
    engine.configure_with([hour])
    decisions = [await engine.storage.check_and_update(resolved, 1, True) for _ in range(3)]
    assert [(d.limited_by, [(s.limit.name, s.value) for s in d.counters]) for d in decisions] == [
        (None, [("hour", 2)]), (None, [("hour", 3)]), (hour, [("hour", 3)])  # "minute" (2 a minute) is gone
    ]
    # Back within its window, "minute" resumes its count (1); "hour" is raised, keeping its count (3).
    engine.configure_with([minute, Limit("ns", 10, 3600, (), USER, name="hour")])
    again = [await engine.check_and_report("ns", alice(), 1, load_counters=True) for _ in range(2)]
    assert [(d.limited_by, [s.value for s in d.counters]) for d in again] == [(None, [2, 4]), (minute, [2, 4])]


async def test_a_reload_frees_the_old_memo_after_its_own_step_in_slices_on_the_loop() -> None:
    """Freeing a large memo at once is milliseconds of deallocation in the reload's one step; it is
    handed over whole (no copy) and emptied a slice per turn of the loop afterwards."""
    engine, _ = limiter(Limit("ns", 100, 60, (), USER))
    for i in range(2000):
        engine.counters_for("ns", [{"user": f"u{i}"}])
    old = engine._memo.young
    engine.configure_with([Limit("ns", 100, 60, (), USER)])
    assert len(old) == 2000 and engine._memo.bytes == 0
    for _ in range(400):
        if not old:
            break
        await asyncio.sleep(0.005)
    assert not old


async def test_a_commit_naming_other_descriptors_than_its_reservation_is_refused() -> None:
    engine = RateLimiter(MemoryStorage(capacity=100), [Limit("ns", 100, 60, variables=("descriptors[0]['user']",))])
    reservation = await engine.reserve("ns", [{"user": "ann"}], 30, 60)
    assert reservation.reservation_id is not None
    for namespace, descriptors in (("ns", [{"user": "bob"}]), ("other", [{"user": "ann"}]), ("ns", [])):
        with pytest.raises(InvalidRequest, match="reserved for another namespace or other descriptors") as error:
            await engine.commit(namespace, descriptors, reservation.reservation_id, 5)
        assert error.value.field == "reservation_id"
    # Nothing was released or charged by the refused commits: ann's hold is intact, bob has nothing.
    [ann] = await engine.get_counters("ns")
    assert (ann.value, ann.reserved) == (0, 30)
    committed = await engine.commit("ns", [{"user": "ann"}], reservation.reservation_id, 5)
    assert committed.held and [(s.value, s.reserved) for s in committed.counters] == [(5, 0)]
