"""Redis killed under load, then restarted, under a real service process (R2).

No crash; while Redis is down every request is answered per the failure mode (`closed`: 503,
`open`: admitted; `redis_cached`: limited locally), `datastore_partitioned` is 1 and failures are
counted; once Redis is back the service is served from it again. How long recovery took is printed
(`-s`), not asserted (the limit below only stops a broken build from hanging the run).
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx
import pytest
from envoy.extensions.common.ratelimit.v3.ratelimit_pb2 import RateLimitDescriptor
from envoy.service.ratelimit.v3 import rls_pb2_grpc
from envoy.service.ratelimit.v3.rls_pb2 import RateLimitRequest

from tests.conftest import ServiceProcess, wait_until
from tests.redis_fixtures import RedisServer, fresh_redis  # noqa: F401  (fixture)

NS = "maas/model"
CLIENTS = 16
HANG_GUARD = 15.0


@dataclass
class Answer:
    sent: float
    status: int
    took: float


@dataclass
class Load:
    """CLIENTS concurrent callers sending check_and_report in a loop from a thread, until stopped."""

    service: ServiceProcess
    answers: list[Answer] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Load:
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)
        self._thread.start()
        return self

    async def _run(self) -> None:
        async with httpx.AsyncClient(base_url=self.service.url, timeout=10) as client:
            async def caller(user: str) -> None:
                while not self._stop.is_set():
                    sent = time.monotonic()
                    try:
                        response = await client.post(
                            "/check_and_report", json={"namespace": NS, "values": {"user": user}, "delta": 1})
                        status = response.status_code
                    except httpx.TransportError:
                        status = 0  # the service did not answer at all
                    self.answers.append(Answer(sent, status, time.monotonic() - sent))

            await asyncio.gather(*(caller(f"user-{i}") for i in range(CLIENTS)))

    def since(self, moment: float) -> list[int]:
        return [a.status for a in list(self.answers) if a.sent >= moment]

    def slowest_since(self, moment: float) -> float:
        return max(a.took for a in list(self.answers) if a.sent >= moment)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(HANG_GUARD)


@pytest.fixture
def limits_path(tmp_path: Path) -> Path:
    path = tmp_path / "limits.yaml"
    path.write_text(f"- namespace: {NS}\n  max_value: 1000000\n  seconds: 600\n  conditions: []\n"
                    f"  variables: [\"descriptors[0]['user']\"]\n")
    return path


@pytest.fixture
def load() -> Iterator[Callable[[ServiceProcess], Load]]:
    started: list[Load] = []

    def start(service: ServiceProcess) -> Load:
        started.append(Load(service).start())
        return started[-1]

    yield start
    for running in started:
        running.stop()


def metric(service: ServiceProcess, name: str) -> float:
    text = service.http.get("/metrics").text
    found = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    assert found, f"{name} missing from /metrics"
    return float(found.group(1))


def should_rate_limit(service: ServiceProcess) -> grpc.StatusCode:
    """Envoy's RLS call over gRPC: its status (OK, or UNAVAILABLE when the storage failed closed)."""
    entry = RateLimitDescriptor.Entry(key="user", value="grpc-user")
    request = RateLimitRequest(domain=NS, descriptors=[RateLimitDescriptor(entries=[entry])], hits_addend=1)
    try:
        rls_pb2_grpc.RateLimitServiceStub(service.grpc).ShouldRateLimit(request, timeout=HANG_GUARD)
    except grpc.RpcError as error:
        return error.code()
    return grpc.StatusCode.OK


def wait_for_answers(load: Load, since: float, count: int = 50) -> list[int]:
    wait_until(lambda: len(load.since(since)) >= count, timeout=HANG_GUARD, what=f"{count} answers")
    return load.since(since)


@pytest.mark.parametrize(("storage", "mode", "while_down", "grpc_while_down"), [
    ("redis", "closed", {503}, grpc.StatusCode.UNAVAILABLE),
    ("redis", "open", {200}, grpc.StatusCode.OK),
    ("redis_cached", "closed", {200}, grpc.StatusCode.OK),  # limits on its local copies: no Redis needed
])
def test_redis_killed_under_load_then_restarted(
    fresh_redis: RedisServer, limits_path: Path, start_service: Callable[..., ServiceProcess],  # noqa: F811
    load: Callable[[ServiceProcess], Load], storage: str, mode: str, while_down: set[int],
    grpc_while_down: grpc.StatusCode,
) -> None:
    options = ["--on-storage-error", mode, "--response-timeout", "200"]
    if storage == "redis_cached":
        options += ["--flush-period", "100"]
    service = start_service(limits_path, storage, fresh_redis.url, *options)
    running = load(service)
    assert set(wait_for_answers(running, 0)) == {200}

    fresh_redis.kill()
    down = time.monotonic()
    wait_until(lambda: metric(service, "datastore_partitioned") == 1, timeout=HANG_GUARD, what="the partition")
    settled = time.monotonic()  # requests in flight at the kill are over
    assert set(wait_for_answers(running, settled)) == while_down
    assert should_rate_limit(service) == grpc_while_down
    assert service.process is not None and service.process.poll() is None  # no crash
    if storage == "redis":
        assert metric(service, "datastore_errors") > 0
    print(f"\n{storage} {mode}: partition seen {settled - down:.3f}s after the kill; slowest answer while down "
          f"{running.slowest_since(settled):.3f}s")

    fresh_redis.start()  # a new, empty Redis on the same port
    back = time.monotonic()
    wait_until(lambda: metric(service, "datastore_partitioned") == 0, timeout=HANG_GUARD, what="recovery")
    recovered = time.monotonic()
    assert set(wait_for_answers(running, recovered)) == {200}
    assert should_rate_limit(service) == grpc.StatusCode.OK
    assert service.http.get(f"/counters/{NS}").status_code == 200  # served from Redis again
    with fresh_redis.client() as client:
        assert client.keys("rl:{maas/model|user-*")  # charges reach the new Redis
    print(f"{storage} {mode}: served from Redis again {recovered - back:.3f}s after it came back")
