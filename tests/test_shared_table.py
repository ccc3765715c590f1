"""One memory counter table in shared memory, decided against by several processes at once.

Worker processes attach to the table by name (as `ratelimit serve --workers N` does) and run
decisions through their own engine; the tests check that the answers are exactly those of one
table: admissions never exceed a limit, stacked limits charge all or nothing, a reservation made
in one process is committed in another, and interleaved decisions of two processes are
linearizable against the plain reference model.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import threading
from collections.abc import Iterator
from multiprocessing.connection import Connection
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ratelimit.counters import StorageFullError
from ratelimit.engine import RateLimiter
from ratelimit.limits import Limit
from ratelimit.storage.memory import MemoryStorage
from ratelimit.storage.table import CounterTable, TableError
from tests.reference_model import ReferenceModel
from tests.support import capacity_dev_shm_has_no_room_for

NS = "maas/model"
USER = "descriptors[0]['user']"
MODEL = "descriptors[0]['model']"
LimitFields = tuple[str, int, int, tuple[str, ...], tuple[str, ...], str]
"""(namespace, max_value, seconds, conditions, variables, name): Limits cross processes as fields."""
REPLY_TIMEOUT = 300.0  # seconds; generous, the machine is shared and loaded


def limits_from(fields: list[LimitFields]) -> list[Limit]:
    return [Limit(ns, max_value, seconds, conditions, variables, name=name)
            for ns, max_value, seconds, conditions, variables, name in fields]


def states_of(statuses: Any) -> dict[tuple, tuple[int, int, int]]:
    return {(s.limit.identity, s.counter.values): (s.value, round(s.expires_in * 1000), s.reserved) for s in statuses}


# -- the worker process ----------------------------------------------------------------------------


def _worker(conn: Connection) -> None:
    """Serve commands from the test: attach to a table, run decisions, report what they answered."""
    now = [0.0]
    storage: MemoryStorage | None = None
    engine: RateLimiter | None = None
    while True:
        command, *args = conn.recv()
        if command == "exit":
            break
        try:
            if command == "attach":
                name, fields, clock = args
                if storage is not None:
                    storage.table.close()
                table = CounterTable.attach(name)
                storage = MemoryStorage(table=table, clock=(lambda: now[0]) if clock == "fixed" else _monotonic())
                engine = RateLimiter(storage, limits_from(fields))
                conn.send(("ok", None))
            elif command == "ops":
                ops, now[0] = args
                assert engine is not None
                conn.send(("ok", [_run_op(engine, op) for op in ops]))
            elif command == "clients":
                assert engine is not None
                conn.send(("ok", _clients(engine, *args)))
            elif command == "reserve":
                assert engine is not None
                descriptors, amount, ttl = args
                decision = asyncio.run(engine.reserve(NS, descriptors, amount, ttl))
                conn.send(("ok", (decision.reservation_id, decision.limited)))
            elif command == "commit":
                assert engine is not None
                descriptors, reservation_id, actual = args
                committed = asyncio.run(engine.commit(NS, descriptors, reservation_id, actual))
                conn.send(("ok", (committed.held, states_of(committed.counters))))
            elif command == "counters":
                assert engine is not None
                conn.send(("ok", states_of(asyncio.run(engine.get_counters(NS)))))
            else:
                conn.send(("error", f"unknown command {command!r}"))
        except Exception as exc:  # the test shows it; the worker keeps serving
            conn.send(("error", repr(exc)))
    if storage is not None:
        storage.table.close()


def _monotonic() -> Any:
    import time

    return time.monotonic


def _run_op(engine: RateLimiter, op: tuple[str, str, str, int]) -> tuple[str, tuple | None, dict]:
    kind, user, model, delta = op
    descriptors = [{"user": user, "model": model}]
    if kind == "check_and_report":
        decision = asyncio.run(engine.check_and_report(NS, descriptors, delta, load_counters=True))
    elif kind == "report":
        decision = asyncio.run(engine.report(NS, descriptors, delta))
    else:
        decision = asyncio.run(engine.check(NS, descriptors, delta))
    limited_by = decision.limited_by.identity if decision.limited_by is not None else None
    return kind, limited_by, states_of(decision.counters)


def _clients(engine: RateLimiter, clients: int, calls: int, users: list[str], start: Any) -> list[int]:
    """`clients` threads, each its own event loop, each making `calls` check_and_report calls
    (cycling through `users`); returns how many each admitted. All start together."""
    admitted = [0] * clients
    barrier = threading.Barrier(clients)

    def client(i: int) -> None:
        async def calls_of_one_client() -> int:
            count = 0
            for call in range(calls):
                user = users[(i + call) % len(users)]
                decision = await engine.check_and_report(NS, [{"user": user, "model": "a"}], 1)
                count += not decision.limited
            return count

        barrier.wait()
        admitted[i] = asyncio.run(calls_of_one_client())

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return admitted


class Workers:
    """Two worker processes, started once per module (spawned: nothing inherited but the name)."""

    def __init__(self, count: int) -> None:
        context = multiprocessing.get_context("spawn")
        self.pipes: list[Connection] = []
        self.processes = []
        for _ in range(count):
            ours, theirs = context.Pipe()
            process = context.Process(target=_worker, args=(theirs,), daemon=True)
            process.start()
            theirs.close()
            self.pipes.append(ours)
            self.processes.append(process)

    def send(self, worker: int, *command: Any) -> None:
        self.pipes[worker].send(command)

    def receive(self, worker: int) -> Any:
        if not self.pipes[worker].poll(REPLY_TIMEOUT):
            raise TimeoutError(f"worker {worker} did not answer within {REPLY_TIMEOUT} s")
        status, value = self.pipes[worker].recv()
        assert status == "ok", f"worker {worker}: {value}"
        return value

    def all(self, *command: Any) -> list[Any]:
        """The same command to every worker at once; their answers."""
        for worker in range(len(self.pipes)):
            self.send(worker, *command)
        return [self.receive(worker) for worker in range(len(self.pipes))]

    def close(self) -> None:
        for pipe in self.pipes:
            try:
                pipe.send(("exit",))
            except OSError:
                pass
        for process in self.processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
                process.join()


@pytest.fixture(scope="module")
def workers() -> Iterator[Workers]:
    pool = Workers(2)
    try:
        yield pool
    finally:
        pool.close()


class SharedTable:
    def __init__(self, capacity: int = 10_000) -> None:
        self.table = CounterTable.create(capacity, shared=True)
        assert self.table.name is not None
        self.name: str = self.table.name

    def close(self) -> None:
        self.table.close()
        self.table.unlink()


@pytest.fixture
def shared() -> Iterator[SharedTable]:
    table = SharedTable()
    try:
        yield table
    finally:
        table.close()


# -- exactness under contention --------------------------------------------------------------------


def test_64_clients_in_two_processes_admit_exactly_the_limit(workers: Workers, shared: SharedTable) -> None:
    fields: list[LimitFields] = [(NS, 1000, 3600, (), (), "global")]
    workers.all("attach", shared.name, fields, "monotonic")
    admitted = workers.all("clients", 32, 25, ["alice"], None)  # 2 x 32 clients x 25 calls = 1600
    assert sum(map(sum, admitted)) == 1000
    assert all(sum(per_process) > 0 for per_process in admitted)  # both processes took part
    [global_counter] = workers.all("counters")[0].values()
    assert global_counter[0] == 1000


def test_stacked_limits_charge_all_or_nothing_across_processes(workers: Workers, shared: SharedTable) -> None:
    """Ten users of 15 each under a global 100: the global limit binds, and every admitted call was
    charged on both its counters (the user counters add up to the global one, exactly 100)."""
    fields: list[LimitFields] = [(NS, 15, 3600, (), (USER,), "per-user"), (NS, 100, 3600, (), (), "global")]
    workers.all("attach", shared.name, fields, "monotonic")
    users = [f"user-{i}" for i in range(10)]
    admitted = workers.all("clients", 32, 25, users, None)
    counters = workers.all("counters")[1]
    by_name = {}
    for (_, values), (value, _, _) in counters.items():
        by_name[values[0] if values else "global"] = value
    assert sum(map(sum, admitted)) == 100
    assert by_name.pop("global") == 100
    assert sum(by_name.values()) == 100
    assert max(by_name.values()) <= 15


def test_reserve_in_one_process_commit_in_the_other(workers: Workers, shared: SharedTable) -> None:
    fields: list[LimitFields] = [(NS, 100, 3600, (), (USER,), "tokens")]
    workers.all("attach", shared.name, fields, "monotonic")
    alice = [{"user": "alice", "model": "a"}]
    workers.send(0, "reserve", alice, 70, 60.0)
    reservation_id, limited = workers.receive(0)
    assert not limited and reservation_id
    workers.send(1, "reserve", alice, 40, 60.0)  # 70 held + 40 > 100, whichever process asks
    assert workers.receive(1) == (None, True)
    workers.send(1, "commit", alice, reservation_id, 25)
    held, states = workers.receive(1)
    assert held
    assert [(value, reserved) for value, _, reserved in states.values()] == [(25, 0)]
    workers.send(0, "commit", alice, reservation_id, 25)  # a retried commit: charged once
    held, states = workers.receive(0)
    assert not held
    assert [(value, reserved) for value, _, reserved in states.values()] == [(25, 0)]


# -- linearizable against the reference model ------------------------------------------------------

PARALLEL_LIMITS: list[LimitFields] = [
    (NS, 1_000_000, 3600, (), (), "global"),  # every request: its value after a change orders the changes
    (NS, 6, 60, ("descriptors[0]['model'] == 'a'",), (USER,), "minute"),
    (NS, 9, 3600, (), (USER,), "hour"),
    (NS, 5, 30, ("descriptors[0]['model'] == 'b'",), (USER, MODEL), "user-model"),
]
operations = st.tuples(
    st.sampled_from(["check_and_report", "check_and_report", "report", "check"]),
    st.sampled_from(["alice", "bob", "carol"]),
    st.sampled_from(["a", "b", "c"]),
    st.integers(min_value=1, max_value=4),
)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(bursts=st.lists(st.tuples(st.lists(operations, max_size=60), st.lists(operations, max_size=60)),
                       min_size=1, max_size=3))


def test_two_processes_deciding_in_parallel_match_the_model(workers: Workers, bursts: list) -> None:
    """Both processes run their burst at the same time. Every change charges the global counter
    (deltas >= 1), so its value after each answer tells where the decision fell in the table's order;
    replaying the decisions in that order into the model must give every answer exactly."""
    limits = limits_from(PARALLEL_LIMITS)
    model = ReferenceModel(keeps_removed_counters=True)
    model.configure(limits)
    global_key = (limits[0].identity, ())
    shared = SharedTable(capacity=1000)
    try:
        workers.all("attach", shared.name, PARALLEL_LIMITS, "fixed")
        now_s = 1000.0
        for first, second in bursts:
            workers.send(0, "ops", first, now_s)
            workers.send(1, "ops", second, now_s)
            answers = [(op, answer) for ops, worker in ((first, 0), (second, 1))
                       for op, answer in zip(ops, workers.receive(worker), strict=True)]
            # Changes in the order of the global value they produced; non-changes after the change
            # whose value they saw (they saw the table between that change and the next).
            def position(item: tuple) -> tuple[int, int]:
                (kind, *_), (_, limited_by, states) = item
                changed = kind == "report" or (kind == "check_and_report" and limited_by is None)
                return states[global_key][0], 0 if changed else 1

            for (kind, user, model_name, delta), (_, limited_by, states) in sorted(answers, key=position):
                keys = model.keys_for(NS, [{"user": user, "model": model_name}])
                now_ms = round(now_s * 1000)
                if kind == "check_and_report":
                    expected = model.check_and_report(keys, delta, now_ms)
                elif kind == "report":
                    expected = model.report(keys, delta, now_ms)
                else:
                    expected = model.check(keys, delta, now_ms)
                assert limited_by == expected.limited_by
                assert states == expected.states
            now_s += 45.0  # minute windows end between bursts
        listed = workers.all("counters")
        assert listed[0] == listed[1] == model.live_counters(NS, round(now_s * 1000) - 45_000)
    finally:
        shared.close()


# -- the table's own API ---------------------------------------------------------------------------


def test_attach_refuses_a_name_that_is_not_a_table() -> None:
    with pytest.raises(TableError, match="cannot attach"):
        CounterTable.attach("ratelimit-no-such-table")
    with pytest.raises(TableError, match="not a shared memory block name"):
        CounterTable.attach("../etc/passwd")


async def test_a_full_shared_table_refuses_new_keys_and_counts_refusals_for_every_process() -> None:
    shared = SharedTable(capacity=2)
    try:
        limit = Limit(NS, 5, 60, (), (USER,))
        first = RateLimiter(MemoryStorage(table=CounterTable.attach(shared.name)), [limit])
        second = RateLimiter(MemoryStorage(table=CounterTable.attach(shared.name)), [limit])
        await first.report(NS, [{"user": "a"}], 1)
        await second.report(NS, [{"user": "b"}], 1)
        with pytest.raises(StorageFullError, match="new keys are refused"):
            await first.report(NS, [{"user": "c"}], 1)
        assert not (await second.check_and_report(NS, [{"user": "a"}], 1)).limited
        assert first.storage.refusals == second.storage.refusals == {"rows": 1, "key_bytes": 0,  # type: ignore[attr-defined]
                                                                     "reservations": 0}
        assert [s.value for s in await first.get_counters(NS)] == [2, 1]
    finally:
        shared.close()


def test_a_table_bigger_than_dev_shm_is_refused_at_creation() -> None:
    """The block is sparse, so creating it would succeed and a worker die of SIGBUS later, once
    counters fill pages /dev/shm has no room for: refused up front, with the remedy."""
    capacity = capacity_dev_shm_has_no_room_for()
    with pytest.raises(TableError, match=r"needs [\d,]+ MiB of /dev/shm, which has [\d,]+ MiB free .*--shm-size"):
        CounterTable.create(capacity, shared=True)
