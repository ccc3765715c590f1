"""Two real service processes (`ratelimit serve LIMITS redis URL`) on one real Redis, 64 concurrent
clients split between them: they admit exactly the limit, for a single limit, stacked limits and
reserve/commit token flows, and a restarted replica still sees the exhausted counter."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.redis_fixtures import RedisServer
from tests.service_fixtures import ServiceProcess

CLIENTS = 64
# One namespace per scenario, so the replicas are started once for the module.
LIMITS = {
    "single": [(1000, 600)],
    "stacked": [(50, 600), (30, 86400)],
    "tokens": [(1000, 600)],
    "restart": [(5, 600)],
}


@pytest.fixture(scope="module")
def limits_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("replicas") / "limits.yaml"
    path.write_text("".join(
        f"- namespace: {namespace}\n  max_value: {max_value}\n  seconds: {seconds}\n  conditions: []\n"
        f"  variables: [\"descriptors[0]['user']\"]\n"
        for namespace, windows in LIMITS.items() for max_value, seconds in windows
    ))
    return path


@pytest.fixture(scope="module")
def replicas(redis_server: RedisServer, limits_path: Path) -> Iterator[list[ServiceProcess]]:
    """Two services on one (emptied) Redis."""
    with redis_server.client() as client:
        client.flushall()
    services = [ServiceProcess(limits_path, "redis", redis_server.url) for _ in range(2)]
    try:
        for service in services:
            service.start()
        yield services
    finally:
        for service in services:
            service.close()


def body(namespace: str, user: str = "alice", **fields: object) -> dict[str, object]:
    return {"namespace": namespace, "values": {"user": user}, **fields}


async def post_all(services: list[ServiceProcess], path: str, bodies: list[dict[str, object]]) -> list[httpx.Response]:
    """POST every body, CLIENTS at a time, alternating between the replicas."""
    clients = [httpx.AsyncClient(base_url=s.url, timeout=30, limits=httpx.Limits(max_connections=CLIENTS))
               for s in services]
    gate = asyncio.Semaphore(CLIENTS)

    async def post(i: int, json: dict[str, object]) -> httpx.Response:
        async with gate:
            return await clients[i % len(clients)].post(path, json=json)

    try:
        return list(await asyncio.gather(*(post(i, b) for i, b in enumerate(bodies))))
    finally:
        for client in clients:
            await client.aclose()


def statuses(responses: list[httpx.Response]) -> dict[int, int]:
    counts: dict[int, int] = {}
    for response in responses:
        counts[response.status_code] = counts.get(response.status_code, 0) + 1
    return counts


async def test_two_replicas_admit_exactly_the_limit(replicas: list[ServiceProcess]) -> None:
    responses = await post_all(replicas, "/check_and_report", [body("single", delta=1)] * 1300)
    assert statuses(responses) == {200: 1000, 429: 300}


async def test_two_replicas_admit_exactly_the_tightest_of_stacked_limits(replicas: list[ServiceProcess]) -> None:
    responses = await post_all(replicas, "/check_and_report", [body("stacked", delta=1)] * 200)
    assert statuses(responses) == {200: 30, 429: 170}
    counters = replicas[1].http.get("/counters/stacked").json()
    assert sorted(c["limit"]["max_value"] - c["remaining"] for c in counters) == [30, 30]


async def test_two_replicas_share_reservations(replicas: list[ServiceProcess]) -> None:
    """1000 tokens, requests reserving 50 each: exactly 20 reservations fit; after each committed 30
    tokens, 400 are left, so exactly 8 more fit."""

    reserved = await post_all(replicas, "/reserve", [body("tokens", amount=50, ttl_seconds=60)] * 100)
    assert statuses(reserved) == {200: 20, 429: 80}
    ids = [r.json()["reservation_id"] for r in reserved if r.status_code == 200]
    committed = await post_all(replicas, "/commit", [body("tokens", reservation_id=i, actual=30) for i in ids])
    assert all(r.status_code == 200 and r.json() == {"reservation_held": True} for r in committed)
    [counter] = replicas[0].http.get("/counters/tokens").json()
    assert (counter["remaining"], counter["reserved"]) == (400, 0)
    again = await post_all(replicas, "/reserve", [body("tokens", amount=50, ttl_seconds=60)] * 40)
    assert statuses(again) == {200: 8, 429: 32}


def test_a_restarted_replica_still_sees_the_exhausted_counter(
    redis_server: RedisServer, limits_path: Path, start_service: Callable[..., ServiceProcess],
) -> None:
    replica = start_service(limits_path, "redis", redis_server.url)
    for _ in range(5):
        assert replica.http.post("/check_and_report", json=body("restart", delta=1)).status_code == 200
    replica.stop()
    restarted = start_service(limits_path, "redis", redis_server.url)
    assert restarted.http.post("/check_and_report", json=body("restart", delta=1)).status_code == 429
    [counter] = restarted.http.get("/counters/restart").json()
    assert counter["remaining"] == 0
