"""RedisStorage and CachedRedisStorage against real Redis: a single node and a 3-node Redis Cluster.

What the stateful model test (test_redis_model) cannot see: concurrency (many decisions in flight),
the key and slot layout, one script call per decision, URLs (password, database, TLS), script-cache
loss, slot migration in the cluster, timeouts, failure modes and the write-behind cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio
import pytest

from ratelimit.counters import CounterStatus, StorageError
from ratelimit.engine import RateLimiter
from ratelimit.limits import Limit
from ratelimit.storage.base import CounterFilter, Storage
from ratelimit.storage.failure import FailureMode
from ratelimit.storage.redis import RedisOptions, RedisStorage
from ratelimit.storage.redis_cached import CachedRedisStorage
from ratelimit.storage.redis_client import key_slot, parse_url
from tests.redis_fixtures import RedisCluster, RedisServer

NS = "maas/model"
USER = "descriptors[0]['user']"
MODEL = "descriptors[0]['model']"
# The stacked pair: 50 per 10 minutes and 30 per day, per user.
SHORT = Limit(NS, 50, 600, (), (USER,), name="short")
DAY = Limit(NS, 30, 86400, (), (USER,), name="day")
# Limits whose counters hash to other slots than the per-user ones: per user and model, and global.
PER_MODEL = Limit(NS, 40, 3600, (), (MODEL, USER), name="per-model")
GLOBAL = Limit(NS, 50, 60, (), (), name="global")
HANG_GUARD = 10.0
"""Only so that a broken storage fails the test instead of hanging it; never a timing assertion."""
UNHURRIED = 5.0
"""The decision timeout of tests about correctness, not timeouts: a loaded machine can hold the first
concurrent decisions (slot map, connections) past the 0.35 s default."""


def request(user: str, model: str = "m") -> list[dict[str, str]]:
    return [{"user": user, "model": model}]


@contextlib.asynccontextmanager
async def limiter(storage: Storage, *limits: Limit) -> AsyncIterator[RateLimiter]:
    try:
        yield RateLimiter(storage, limits)
    finally:
        await storage.close()


def script_calls(*servers: RedisServer) -> int:
    """Script calls Redis ran (EVALSHA or EVAL), on every server."""
    total = 0
    for server in servers:
        with server.client() as client:
            stats = client.info("commandstats")
        for name in ("evalsha", "eval"):
            calls = stats.get(f"cmdstat_{name}", {})
            total += calls.get("calls", 0) - calls.get("failed_calls", 0) - calls.get("rejected_calls", 0)
    return total


def commands_called(*servers: RedisServer) -> set[str]:
    names = set()
    for server in servers:
        with server.client() as client:
            names |= {name.removeprefix("cmdstat_") for name in client.info("commandstats")}
    return names


@pytest.fixture
def single(redis_server: RedisServer) -> RedisServer:
    """The module's Redis node, emptied and with fresh command statistics."""
    with redis_server.client() as client:
        client.flushall()
        client.config_resetstat()
    return redis_server


@pytest.fixture
def cluster(redis_cluster: RedisCluster) -> RedisCluster:
    redis_cluster.flush()
    for node in redis_cluster.nodes:
        with node.client() as client:
            client.config_resetstat()
    return redis_cluster


# -- atomic decisions ---------------------------------------------------------------------------


async def admitted_concurrently(engine: RateLimiter, requests: list[list[dict[str, str]]]) -> int:
    decisions = await asyncio.gather(*(engine.check_and_report(NS, r, 1) for r in requests))
    return sum(not d.limited for d in decisions)


async def test_stacked_limits_admit_exactly_the_tightest_under_concurrency(single: RedisServer) -> None:
    with anyio.fail_after(HANG_GUARD):
        async with limiter(RedisStorage(RedisOptions(single.url, timeout=UNHURRIED)), SHORT, DAY) as engine:
            assert await admitted_concurrently(engine, [request("alice")] * 200) == 30
            counters = {c.limit.name: c for c in await engine.get_counters(NS)}
            # Nothing was charged for a refused request, on either window.
            assert (counters["short"].value, counters["day"].value) == (30, 30)


async def test_every_decision_is_one_script_call(single: RedisServer) -> None:
    before = script_calls(single)
    with anyio.fail_after(HANG_GUARD):
        async with limiter(RedisStorage(RedisOptions(single.url)), SHORT, DAY, PER_MODEL, GLOBAL) as engine:
            await engine.check_and_report(NS, request("alice"), 1)  # 4 counters
            await engine.check(NS, request("alice"))
            await engine.report(NS, request("alice"), 5)
            reservation = await engine.reserve(NS, request("alice"), 3, 60)
            await engine.commit(NS, request("alice"), reservation.reservation_id or "", 2)
    assert script_calls(single) - before == 5


async def test_all_windows_of_a_user_on_a_model_share_a_slot(cluster: RedisCluster) -> None:
    with anyio.fail_after(HANG_GUARD):
        async with limiter(RedisStorage(RedisOptions(cluster.url, timeout=UNHURRIED)), SHORT, DAY) as engine:
            for user in ("alice", "bob", "carol", "dave"):
                await engine.check_and_report(NS, request(user), 1)
    counter_keys = []
    for node in cluster.nodes:
        with node.client() as client:
            counter_keys += [k for k in client.keys("rl:{maas/model|*") if not k.endswith(b":r")]
    slots_by_user: dict[bytes, set[int]] = {}
    for key in counter_keys:
        user = key.split(b"|", 1)[1].split(b"}", 1)[0]
        slots_by_user.setdefault(user, set()).add(key_slot(key))
    assert len(counter_keys) == 8
    assert all(len(slots) == 1 for slots in slots_by_user.values())  # both windows of a user: one slot
    assert len({slot for slots in slots_by_user.values() for slot in slots}) > 1  # users spread out
    # Only script calls reached Redis for the decisions: one per request, on the users' own slots.
    assert script_calls(*cluster.nodes) == 4


async def test_hash_tag_cannot_be_cut_short_by_braces(single: RedisServer) -> None:
    with anyio.fail_after(HANG_GUARD):
        limit = Limit("ns{x}", 1, 60, (), (USER,))
        async with limiter(RedisStorage(RedisOptions(single.url)), limit) as engine:
            for user in ("a}b", "a}c", "{d}"):
                assert not (await engine.check_and_report("ns{x}", request(user), 1)).limited
                assert (await engine.check_and_report("ns{x}", request(user), 1)).limited
            listed = {c.counter.values for c in await engine.get_counters("ns{x}")}
            assert listed == {("a}b",), ("a}c",), ("{d}",)}
    with single.client() as client:
        slots = {key_slot(key) for key in client.keys("rl:{ns%7Bx%7D|*")}
    assert len(slots) > 1  # each user's own tag, not a shared "{x}"


async def test_cluster_decisions_spanning_slots_never_admit_past_a_limit(cluster: RedisCluster) -> None:
    """Per-user 30/day and a global 50/min hash to different slots (different nodes, mostly): two-phase
    decisions must respect both, leave no hold behind, and still fill every budget exactly."""
    users = ["alice", "bob", "carol"]

    with anyio.fail_after(HANG_GUARD):
        async with limiter(RedisStorage(RedisOptions(cluster.url, timeout=UNHURRIED)), DAY, GLOBAL) as engine:
            admitted = await admitted_concurrently(engine, [request(u) for u in users for _ in range(40)])
            counters = await engine.get_counters(NS)
            per_user = [c.value for c in counters if c.limit.name == "day"]
            [global_counter] = [c for c in counters if c.limit.name == "global"]
            assert all(value <= 30 for value in per_user)
            assert global_counter.value == admitted <= 50
            assert all(c.reserved == 0 for c in counters)  # every phase-1 hold was committed or released
            # What concurrency left unused (a request may be refused by another's short-lived hold) is
            # still there: one at a time, the requests fill the global budget exactly.
            for user in users * 20:
                await engine.check_and_report(NS, request(user), 1)
            [global_counter] = [c for c in await engine.get_counters(NS) if c.limit.name == "global"]
            assert global_counter.value == 50


async def test_cluster_reserve_and_commit_span_slots(cluster: RedisCluster) -> None:
    with anyio.fail_after(HANG_GUARD):
        async with limiter(RedisStorage(RedisOptions(cluster.url, timeout=UNHURRIED)), DAY, GLOBAL) as engine:
            first = await engine.reserve(NS, request("alice"), 20, 60)
            refused = await engine.reserve(NS, request("bob"), 31, 60)  # over bob's day, under global
            assert first.reservation_id and not first.limited
            assert refused.limited and refused.limited_by == DAY and refused.reservation_id is None
            # The refused reservation's hold on the global counter was given back.
            assert {c.limit.name: c.reserved for c in await engine.get_counters(NS)} == {"day": 20, "global": 20}
            committed = await engine.commit(NS, request("alice"), first.reservation_id, 12)
            assert committed.held
            assert {c.limit.name: (c.value, c.reserved) for c in committed.counters} == {
                "day": (12, 0), "global": (12, 0)}


async def test_cluster_follows_a_slot_moved_to_another_node(cluster: RedisCluster) -> None:
    """Resharding while serving: the slot of alice's counters moves to another node (keys migrated
    with MIGRATE, as `redis-cli --cluster reshard` does); the next decision gets MOVED and follows."""

    with anyio.fail_after(HANG_GUARD):
        async with limiter(RedisStorage(RedisOptions(cluster.url, timeout=UNHURRIED)), DAY) as engine:
            for _ in range(3):
                await engine.check_and_report(NS, request("alice"), 1)
            move_slot(cluster, key_slot(b"{maas/model|alice}"))
            decision = await engine.check_and_report(NS, request("alice"), 1, load_counters=True)
            assert decision.counters[0].value == 4


def move_slot(cluster: RedisCluster, slot: int) -> None:
    clients = [node.client() for node in cluster.nodes]
    try:
        ids = [client.execute_command("CLUSTER MYID").decode() for client in clients]
        source = next(i for i, c in enumerate(clients) if c.execute_command("CLUSTER COUNTKEYSINSLOT", slot) > 0)
        target = (source + 1) % len(clients)
        clients[target].execute_command("CLUSTER SETSLOT", slot, "IMPORTING", ids[source])
        clients[source].execute_command("CLUSTER SETSLOT", slot, "MIGRATING", ids[target])
        keys = clients[source].execute_command("CLUSTER GETKEYSINSLOT", slot, 100)
        clients[source].execute_command("MIGRATE", "127.0.0.1", cluster.nodes[target].port, "", 0, 5000, "KEYS", *keys)
        for client in clients:
            client.execute_command("CLUSTER SETSLOT", slot, "NODE", ids[target])
    finally:
        for client in clients:
            client.close()


# -- counters, windows and the script cache ---------------------------------------------------------


async def test_counters_are_listed_from_the_index_without_scanning(single: RedisServer) -> None:
    with anyio.fail_after(HANG_GUARD):
        async with limiter(RedisStorage(RedisOptions(single.url)), SHORT, DAY) as engine:
            for user in ("alice", "bob"):
                await engine.check_and_report(NS, request(user), 2)
            await engine.reserve(NS, request("carol"), 4, 60)
            listed = {(c.limit.name, c.counter.values): (c.value, c.reserved) for c in await engine.get_counters(NS)}
            assert listed == {
                ("short", ("alice",)): (2, 0), ("day", ("alice",)): (2, 0),
                ("short", ("bob",)): (2, 0), ("day", ("bob",)): (2, 0),
                ("short", ("carol",)): (0, 4), ("day", ("carol",)): (0, 4),
            }
    assert not {"scan", "keys"} & commands_called(single)


async def walk_pages(storage: Storage, limits: list[Limit], size: int,
                     match: CounterFilter | None = None) -> list[list[CounterStatus]]:
    pages, cursor = [], None
    while True:
        page = await storage.get_counters_page(limits, cursor, size, match)
        assert len(page.counters) <= size
        pages.append(page.counters)
        if page.next_cursor is None:
            return pages
        cursor = page.next_cursor


async def test_paged_listing_covers_every_counter_once_within_its_own_budget(single: RedisServer) -> None:
    """10k counters listed in pages, although one decision may only wait 50 ms: each page has the
    listing timeout, on connections of its own. A variable filter and bad cursors too. (30k through
    the service's /counters: test_redis_faults, marked slow.)"""
    users = [f"user-{i:05d}" for i in range(5_000)]

    with anyio.fail_after(120):
        async with limiter(RedisStorage(RedisOptions(single.url, timeout=10)), SHORT, DAY) as filler:
            for start in range(0, len(users), 1000):
                await asyncio.gather(*(filler.report(NS, request(u), 1) for u in users[start:start + 1000]))
        storage = RedisStorage(RedisOptions(single.url, timeout=0.05))
        async with limiter(storage, SHORT, DAY):
            limits = [SHORT, DAY]
            pages = await walk_pages(storage, limits, 1000)
            listed = [(s.limit.name, s.counter.values[0]) for page in pages for s in page]
            assert len(listed) == len(set(listed)) == 10_000
            # Full pages; the walk may need one more (empty) page to learn that nothing follows.
            assert [len(page) for page in pages[:10]] == [1000] * 10 and (not pages[10:] or pages[10:] == [[]])
            assert len(await storage.get_counters(limits)) == 10_000  # the whole listing, page by page
            alice = await walk_pages(storage, limits, 7, match=lambda c: c.values == ("user-00042",))
            assert sorted(str(s.limit.name) for page in alice for s in page) == ["day", "short"]
            assert all(s.value == 1 for page in alice for s in page)
            with pytest.raises(ValueError, match="invalid cursor"):
                await storage.get_counters_page(limits, "not-a-cursor", 10)
            assert storage.status.listing_failures == 0
    assert not {"scan", "keys"} & commands_called(single)


async def test_a_failed_listing_raises_and_is_counted(fresh_redis: RedisServer) -> None:
    with anyio.fail_after(HANG_GUARD):
        storage = RedisStorage(RedisOptions(fresh_redis.url, listing_timeout=0.3))
        async with limiter(storage, DAY) as engine:
            await engine.check_and_report(NS, request("alice"), 1)
            fresh_redis.kill()
            with pytest.raises(StorageError, match="listing counters failed"):
                await engine.get_counters(NS)
            assert storage.status.listing_failures == 1


async def test_a_window_starts_at_the_first_hit_and_expires_in_redis(single: RedisServer) -> None:
    with anyio.fail_after(HANG_GUARD):
        async with limiter(RedisStorage(RedisOptions(single.url)), SHORT) as engine:
            assert not (await engine.check(NS, request("alice"))).limited  # a check starts no window
            with single.client() as client:
                assert client.keys("rl:*") == []
            await engine.check_and_report(NS, request("alice"), 1)
    with single.client() as client:
        [counter] = [k for k in client.keys("rl:{maas/model|alice}*")]
        assert 0 < client.pttl(counter) <= 600_000  # Redis removes it once its window is over


async def test_decisions_survive_the_script_cache_being_flushed(single: RedisServer) -> None:
    with anyio.fail_after(HANG_GUARD):
        async with limiter(RedisStorage(RedisOptions(single.url)), DAY) as engine:
            await engine.check_and_report(NS, request("alice"), 1)
            with single.client() as client:
                client.script_flush()
            decision = await engine.check_and_report(NS, request("alice"), 1, load_counters=True)
            assert decision.counters[0].value == 2


async def test_a_reload_deletes_removed_limits_counters_without_blocking_the_others(single: RedisServer) -> None:
    with anyio.fail_after(HANG_GUARD):
        async with limiter(RedisStorage(RedisOptions(single.url)), SHORT, DAY) as engine:
            for user in ("alice", "bob"):
                await engine.check_and_report(NS, request(user), 3)
            engine.configure_with([DAY])  # SHORT is gone: its counters are deleted in the background
            decision = await engine.check_and_report(NS, request("alice"), 1, load_counters=True)
            assert [(c.limit.name, c.value) for c in decision.counters] == [("day", 4)]
            engine.configure_with([SHORT, DAY])  # back with the same identity: counting from zero
            decision = await engine.check_and_report(NS, request("alice"), 1, load_counters=True)
            assert sorted((c.limit.name, c.value) for c in decision.counters) == [("day", 5), ("short", 1)]
            assert {c.counter.values for c in await engine.get_counters(NS) if c.limit.name == "short"} == {("alice",)}
    with single.client() as client:
        assert len(client.keys("rl:{maas/model|bob}:*")) == 1  # bob's day counter; his short one is deleted


# -- URLs -------------------------------------------------------------------------------------------


async def test_password_and_database_from_the_url(tmp_path: Path) -> None:
    server = RedisServer(None, "--requirepass", "s3cret:/@", directory=tmp_path)
    try:
        server.start()

        async def scenario() -> None:
            url = f"redis://:s3cret%3A%2F%40@127.0.0.1:{server.port}/3"
            async with limiter(RedisStorage(RedisOptions(url)), DAY) as engine:
                assert not (await engine.check_and_report(NS, request("alice"), 1)).limited
            async with limiter(RedisStorage(RedisOptions(f"redis://:wrong@127.0.0.1:{server.port}/3")), DAY) as engine:
                with pytest.raises(StorageError, match="WRONGPASS"):
                    await engine.check_and_report(NS, request("alice"), 1)

        await asyncio.wait_for(scenario(), HANG_GUARD)
        with server.client(password="s3cret:/@", db=3) as client:
            assert client.dbsize() > 0
        with server.client(password="s3cret:/@", db=0) as client:
            assert client.dbsize() == 0
    finally:
        server.close()


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[tuple[RedisServer, Path]]:
    if shutil.which("openssl") is None:
        pytest.fail("openssl is needed to make the TLS test's certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert, "-days", "1",
         "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True,
    )
    from ratelimit.tools.processes import free_ports

    tls_port = free_ports(1)[0]
    server = RedisServer(None, "--tls-port", str(tls_port), "--tls-cert-file", str(cert), "--tls-key-file", str(key),
                         "--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no", directory=tmp_path)
    server.tls_port = tls_port  # type: ignore[attr-defined]
    try:
        yield server.start(), cert
    finally:
        server.close()


async def test_tls_with_a_trusted_ca_or_insecure(tls_redis: tuple[RedisServer, Path]) -> None:
    server, cert = tls_redis
    port = server.tls_port  # type: ignore[attr-defined]

    with anyio.fail_after(HANG_GUARD):
        for url in (f"rediss://localhost:{port}?ssl_ca_certs={cert}", f"rediss://127.0.0.1:{port}#insecure"):
            async with limiter(RedisStorage(RedisOptions(url)), DAY) as engine:
                assert not (await engine.check_and_report(NS, request("alice"), 1)).limited
        async with limiter(RedisStorage(RedisOptions(f"rediss://127.0.0.1:{port}")), DAY) as engine:
            with pytest.raises(StorageError, match="CERTIFICATE_VERIFY_FAILED"):
                await engine.check_and_report(NS, request("alice"), 1)
    with server.client() as client:
        [counter] = client.keys("rl:{maas/model|alice}*")
        assert client.hget(counter, "v") == b"2"


def test_url_forms() -> None:
    parsed = parse_url("redis://user:p%40ss@host.example:6380/2")
    assert (parsed.cluster, parsed.address.host, parsed.address.port, parsed.address.db) == (False, "host.example", 6380, 2)
    assert (parsed.address.username, parsed.address.password, parsed.address.tls) == ("user", "p@ss", None)
    assert parse_url("rediss://h").address.tls is not None
    assert parse_url("redis-cluster://h:7000").cluster
    assert parse_url("unix:///run/redis.sock?db=1").address.unix_path == "/run/redis.sock"
    with pytest.raises(ValueError, match="scheme"):
        parse_url("http://h")
    with pytest.raises(ValueError, match="database 0"):
        parse_url("redis-cluster://h/1")


# -- failures -------------------------------------------------------------------------------------


async def test_a_stalled_redis_fails_the_decision_within_the_timeout_then_recovers(fresh_redis: RedisServer) -> None:
    with anyio.fail_after(HANG_GUARD):
        async with limiter(RedisStorage(RedisOptions(fresh_redis.url, timeout=0.2)), DAY) as engine:
            await engine.check_and_report(NS, request("alice"), 1)
            assert fresh_redis.process is not None
            os.kill(fresh_redis.process.pid, signal.SIGSTOP)  # alive, but answers nothing
            try:
                with pytest.raises(StorageError, match="did not answer|no reply"):
                    await engine.check_and_report(NS, request("alice"), 1)
                assert not engine.storage.status.reachable
            finally:
                os.kill(fresh_redis.process.pid, signal.SIGCONT)
            decision = await until_answered(engine)  # the stalled connection was dropped; a new one is made
            assert decision.counters[0].value >= 2
            assert engine.storage.status.reachable


@pytest.mark.parametrize("mode", ["open", "closed"])
async def test_failure_mode_when_redis_is_down(fresh_redis: RedisServer, mode: str) -> None:
    with anyio.fail_after(HANG_GUARD):
        storage = FailureMode(RedisStorage(RedisOptions(fresh_redis.url)), mode)  # type: ignore[arg-type]
        engine = RateLimiter(storage, [DAY])
        try:
            await engine.check_and_report(NS, request("alice"), 1)
            fresh_redis.kill()
            for call in (
                engine.check_and_report(NS, request("alice"), 1),
                engine.check(NS, request("alice")),
                engine.report(NS, request("alice"), 1),
                engine.reserve(NS, request("alice"), 1, 10),
            ):
                if mode == "closed":
                    with pytest.raises(StorageError):
                        await call
                else:
                    assert not (await call).limited
            assert storage.status.decision_errors == 4 and not storage.status.reachable and storage.ready() == (mode == "open")
            fresh_redis.start()
            decision = await until_answered(engine)
            assert decision.counters[0].value == 1  # a new Redis (no persistence): counting again from 0
            assert storage.status.reachable and storage.ready()
        finally:
            await storage.close()


async def until_answered(engine: RateLimiter):
    """The first decision the storage really answers (open mode answers a failure with no counters)."""
    while True:
        with contextlib.suppress(StorageError):
            decision = await engine.check_and_report(NS, request("alice"), 1, load_counters=True)
            if decision.counters:
                return decision
        await asyncio.sleep(0.05)


# -- redis_cached -----------------------------------------------------------------------------------


async def test_cached_replicas_share_counters_through_redis(single: RedisServer) -> None:
    with anyio.fail_after(HANG_GUARD):
        first = CachedRedisStorage(RedisOptions(single.url), flush_period=0.1)
        second = CachedRedisStorage(RedisOptions(single.url), flush_period=0.1)
        async with limiter(first, DAY) as a, limiter(second, DAY) as b:
            assert not any([(await a.check_and_report(NS, request("alice"), 1)).limited for _ in range(20)])
            before = script_calls(single)
            for _ in range(5):  # nothing here yields to the background flush
                await a.check_and_report(NS, request("alice"), 1)
            assert script_calls(single) == before  # decisions on the local copy: Redis untouched
            await first.flush()
            # The second replica reads alice's counter when it first sees it: 25 already used.
            admitted = [not (await b.check_and_report(NS, request("alice"), 1)).limited for _ in range(10)]
            assert admitted == [True] * 5 + [False] * 5
            await second.flush()
            await asyncio.sleep(0.25)  # two flush periods: the first replica's copy is re-read before use
            assert (await a.check_and_report(NS, request("alice"), 1)).limited
            [counter] = await a.get_counters(NS)
            assert counter.value == 30


async def test_cached_keeps_limiting_through_a_partition_and_writes_back(fresh_redis: RedisServer) -> None:
    with anyio.fail_after(HANG_GUARD):
        storage = CachedRedisStorage(RedisOptions(fresh_redis.url, timeout=0.2), flush_period=0.05)
        async with limiter(storage, DAY) as engine:
            for _ in range(10):
                await engine.check_and_report(NS, request("alice"), 1)
            await storage.flush()
            fresh_redis.kill()
            admitted = [not (await engine.check_and_report(NS, request("alice"), 1)).limited for _ in range(25)]
            assert admitted == [True] * 20 + [False] * 5  # still limiting, on the local copy
            while not storage.partitioned:
                await asyncio.sleep(0.02)  # the background flush noticed
            fresh_redis.start()  # empty: it had no persistence
            while storage.partitioned:
                await asyncio.sleep(0.02)
            with fresh_redis.client() as client:
                [key] = client.keys("rl:{maas/model|alice}*")
                # What was charged during the partition (and not yet written before it) was written back.
                assert int(client.hget(key, "v")) == 20


async def test_cached_holds_at_most_max_cached_counters(single: RedisServer) -> None:
    with anyio.fail_after(HANG_GUARD):
        storage = CachedRedisStorage(RedisOptions(single.url), max_cached=10, flush_period=3600)
        async with limiter(storage, DAY) as engine:
            for i in range(50):
                await engine.check(NS, request(f"user-{i}"))
            assert storage.cache_size == 10
            for i in range(50):
                await engine.check_and_report(NS, request(f"user-{i}"), 1)
                if storage.pending_writes >= 10:
                    await storage.flush()
            assert storage.cache_size <= 10


async def test_a_retried_commit_charges_once(single: RedisServer) -> None:
    """A client that retries Commit (its first answer was lost) must not pay twice; other
    reservations of the same counters are untouched by the marks."""
    await asyncio.wait_for(_commit_twice(single.url), HANG_GUARD)


async def test_a_retried_commit_charges_once_across_cluster_slots(cluster: RedisCluster) -> None:
    await asyncio.wait_for(_commit_twice(cluster.url), HANG_GUARD)


async def _commit_twice(url: str) -> None:
    async with limiter(RedisStorage(RedisOptions(url)), DAY, GLOBAL) as engine:
        first = await engine.reserve(NS, request("alice"), 20, 60)
        other = await engine.reserve(NS, request("alice"), 5, 60)
        assert first.reservation_id and other.reservation_id
        committed = await engine.commit(NS, request("alice"), first.reservation_id, 12)
        again = await engine.commit(NS, request("alice"), first.reservation_id, 12)
        assert committed.held and not again.held
        assert {c.limit.name: (c.value, c.reserved) for c in again.counters} == {
            "day": (12, 5), "global": (12, 5)}
        last = await engine.commit(NS, request("alice"), other.reservation_id, 3)
        assert last.held
        assert {c.limit.name: (c.value, c.reserved) for c in last.counters} == {"day": (15, 0), "global": (15, 0)}


# -- structure ----------------------------------------------------------------------------------------


def test_no_storage_class_calls_another_ones_underscore_methods_or_imports_metrics() -> None:
    """Composition, not reaching into each other: `x._method(...)` only on `self` (or `cls`), and the
    storage core hands state out as plain data (metrics live in ratelimit/metrics.py)."""
    import ast

    storage_dir = Path(__file__).resolve().parent.parent / "ratelimit" / "storage"
    offences = []
    for path in sorted(storage_dir.glob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                name, owner = node.func.attr, node.func.value
                private = name.startswith("_") and not name.startswith("__")
                if private and not (isinstance(owner, ast.Name) and owner.id in ("self", "cls")):
                    offences.append(f"{path.name}:{node.lineno} calls {ast.unparse(node.func)}")
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                offences += [f"{path.name}:{node.lineno} imports {n}" for n in names if n.startswith("prometheus_client")]
    assert offences == []
