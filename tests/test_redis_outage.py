"""Redis faults under a real service process and a real `redis-server`: killed, hung (SIGSTOP),
restarted with and without its data, down at start-up, down at shutdown.

No crash; while Redis is down every request is answered per the failure mode (`closed`: 503,
`open`: admitted; `redis_cached`: limited locally), `datastore_partitioned` is 1 and failures are
counted, readiness (`/ready`, gRPC health) says whether decisions can be answered, each outage is
logged once; once Redis is back the service is served from it again. How long detection and
recovery took is printed (`-s`); only the issue's own bound (2 s) is asserted, with a wide margin
for a loaded machine (READINESS_BOUND).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
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
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.redis_fixtures import RedisServer, require_redis
from tests.service_fixtures import ServiceProcess
from tests.support import wait_until

NS = "maas/model"
CLIENTS = 16
HANG_GUARD = 15.0
READINESS_BOUND = 2.0 + 3.0
"""The issue's 2 s for readiness to follow Redis, plus a margin for 8 test runs sharing 2 cores."""


@dataclass
class Answer:
    sent: float
    status: int
    took: float


@dataclass
class Load:
    """CLIENTS concurrent callers sending check_and_report in a loop from a thread, until stopped."""

    service: ServiceProcess
    new_user_every: int = 0
    """When > 0, every caller switches to a user never seen before after this many requests (so
    decisions keep needing counters the service has not read yet)."""
    answers: list[Answer] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Load:
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)
        self._thread.start()
        return self

    async def _run(self) -> None:
        async with httpx.AsyncClient(base_url=self.service.url, timeout=10) as client:
            async def caller(name: str) -> None:
                sent_count = 0
                while not self._stop.is_set():
                    user = f"{name}-{sent_count // self.new_user_every}" if self.new_user_every else name
                    sent_count += 1
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
def load() -> Iterator[Callable[..., Load]]:
    started: list[Load] = []

    def start(service: ServiceProcess, new_user_every: int = 0) -> Load:
        started.append(Load(service, new_user_every).start())
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
    fresh_redis: RedisServer, limits_path: Path, start_service: Callable[..., ServiceProcess],
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


# -- hangs, restarts, start-up and shutdown ---------------------------------------------------------


def health(service: ServiceProcess) -> int:
    answer = health_pb2_grpc.HealthStub(service.grpc).Check(health_pb2.HealthCheckRequest(), timeout=HANG_GUARD)
    return int(answer.status)


SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


def ready(service: ServiceProcess) -> int:
    return service.http.get("/ready").status_code


def seconds_until(condition: Callable[[], bool], bound: float, what: str) -> float:
    """Poll until `condition` holds; fail past `bound` seconds; how long it took."""
    start = time.monotonic()
    wait_until(condition, timeout=bound, what=what)
    return time.monotonic() - start


@contextlib.contextmanager
def hung(server: RedisServer) -> Iterator[None]:
    """Redis alive but answering nothing (SIGSTOP), as a stalled node or a network partition looks."""
    assert server.process is not None
    os.kill(server.process.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(server.process.pid, signal.SIGCONT)


def test_redis_cached_keeps_deciding_through_a_hang_and_logs_it_once(
    fresh_redis: RedisServer, limits_path: Path, start_service: Callable[..., ServiceProcess],
    load: Callable[..., Load],
) -> None:
    service = start_service(limits_path, "redis_cached", fresh_redis.url, "--on-storage-error", "closed",
                            "--flush-period", "100")
    running = load(service, new_user_every=3)  # mostly counters this replica has never read
    assert set(wait_for_answers(running, 0)) == {200}
    with hung(fresh_redis):
        hang = time.monotonic()
        seen = seconds_until(lambda: metric(service, "datastore_partitioned") == 1, HANG_GUARD, "the partition")
        wait_for_answers(running, time.monotonic(), count=200)
        during = running.since(hang)
        assert set(during) == {200}, f"answers during the hang: {sorted(set(during))}"  # none UNAVAILABLE
        assert should_rate_limit(service) == grpc.StatusCode.OK
        assert health(service) == SERVING and ready(service) == 200  # it answers: it is ready
        print(f"\nredis_cached hang: {len(during)} answers, all 200; partition seen after {seen:.3f}s; "
              f"slowest answer {running.slowest_since(hang):.3f}s")
    back = seconds_until(lambda: metric(service, "datastore_partitioned") == 0, HANG_GUARD, "recovery")
    print(f"redis_cached hang: served from Redis again {back:.3f}s after SIGCONT")
    assert set(wait_for_answers(running, time.monotonic())) == {200}
    running.stop()
    output = service.output()
    assert output.count("Partition to Redis detected") == 1, output[-3000:]
    assert output.count("Redis reachable again after") == 1, output[-3000:]
    assert "Traceback" not in output


def test_redis_closed_is_unavailable_and_not_serving_through_a_hang(
    fresh_redis: RedisServer, limits_path: Path, start_service: Callable[..., ServiceProcess],
    load: Callable[..., Load],
) -> None:
    service = start_service(limits_path, "redis", fresh_redis.url, "--on-storage-error", "closed")
    running = load(service)
    assert set(wait_for_answers(running, 0)) == {200}
    assert health(service) == SERVING and ready(service) == 200
    with hung(fresh_redis):
        not_serving = seconds_until(lambda: health(service) == NOT_SERVING, READINESS_BOUND, "NOT_SERVING")
        not_ready = seconds_until(lambda: ready(service) == 503, READINESS_BOUND, "/ready 503")
        settled = time.monotonic()
        assert set(wait_for_answers(running, settled)) == {503}
        assert should_rate_limit(service) == grpc.StatusCode.UNAVAILABLE
        assert service.http.get("/status").status_code == 200  # liveness stays up
        print(f"\nredis closed hang: NOT_SERVING after {not_serving:.3f}s, /ready 503 {not_ready:.3f}s later; "
              f"slowest answer while hung {running.slowest_since(settled):.3f}s")
    serving = seconds_until(lambda: health(service) == SERVING and ready(service) == 200, READINESS_BOUND,
                            "SERVING again")
    recovered = time.monotonic()
    assert set(wait_for_answers(running, recovered)) == {200}
    print(f"redis closed hang: SERVING and ready {serving:.3f}s after SIGCONT")
    running.stop()
    output = service.output()
    assert output.count("counter storage failing") == 1, output[-3000:]
    assert output.count("counter storage answering again after") == 1, output[-3000:]


def limited_user_limits(tmp_path: Path) -> Path:
    path = tmp_path / "small.yaml"
    path.write_text(f"- namespace: {NS}\n  max_value: 5\n  seconds: 600\n  conditions: []\n"
                    f"  variables: [\"descriptors[0]['user']\"]\n")
    return path


def spend(service: ServiceProcess, user: str, times: int) -> list[int]:
    return [service.http.post("/check_and_report", json={"namespace": NS, "values": {"user": user}, "delta": 1})
            .status_code for _ in range(times)]


@pytest.mark.parametrize("storage", ["redis", "redis_cached"])
def test_a_restart_without_persistence_is_logged_and_counted_as_counter_loss(
    fresh_redis: RedisServer, tmp_path: Path, start_service: Callable[..., ServiceProcess],
    storage: str,
) -> None:
    options = ["--flush-period", "50"] if storage == "redis_cached" else []
    service = start_service(limited_user_limits(tmp_path), storage, fresh_redis.url, *options)
    assert spend(service, "alice", 6) == [200] * 5 + [429]
    assert metric(service, "datastore_counters_lost") == 0
    fresh_redis.kill()
    fresh_redis.start()  # no persistence: an empty Redis
    wait_until(lambda: metric(service, "datastore_counters_lost") == 1, timeout=HANG_GUARD, what="the loss")
    output = service.output()
    assert output.count("restarted without its data") == 1, output[-3000:]
    if storage == "redis":
        # What the loss means for users: a spent budget is whole again (the README says so).
        wait_until(lambda: spend(service, "alice", 1) == [200], timeout=HANG_GUARD, what="alice admitted again")


def test_a_restart_with_persistence_keeps_counters_and_is_not_a_loss(
    tmp_path: Path, start_service: Callable[..., ServiceProcess],
) -> None:
    require_redis()
    server = RedisServer(None, "--appendonly", "yes", "--appendfsync", "always").start()
    try:
        service = start_service(limited_user_limits(tmp_path), "redis", server.url)
        assert spend(service, "alice", 6) == [200] * 5 + [429]
        server.stop()  # SIGTERM: Redis writes its AOF and exits
        server.start()
        wait_until(lambda: "restarted (run id" in service.output(), timeout=HANG_GUARD, what="the restart")
        assert spend(service, "alice", 1) == [429]  # the counter survived
        assert metric(service, "datastore_counters_lost") == 0
    finally:
        server.close()


def test_sigterm_with_redis_down_exits_0_and_logs_the_hits_not_written_back(
    fresh_redis: RedisServer, limits_path: Path, start_service: Callable[..., ServiceProcess],
) -> None:
    service = start_service(limits_path, "redis_cached", fresh_redis.url, "--flush-period", "600000")
    assert spend(service, "alice", 17) == [200] * 17  # read from Redis once, then charged locally only
    fresh_redis.kill()
    assert service.process is not None
    service.process.send_signal(signal.SIGTERM)
    assert service.process.wait(timeout=60) == 0  # generous: a loaded machine shuts down slowly
    output = service.output()
    assert "17 hits on 1 counters could not be written back" in output, output[-3000:]
    assert "Traceback" not in output


class _NotWaitingForServing(ServiceProcess):
    """Started with Redis down and failing closed, the service is rightly NOT_SERVING: wait for HTTP only."""

    def _grpc_serving(self) -> bool:
        return True


def test_redis_down_at_start_up_is_logged_retried_and_not_ready(
    fresh_redis: RedisServer, limits_path: Path,
) -> None:
    fresh_redis.kill()
    service = _NotWaitingForServing(limits_path, "redis", fresh_redis.url, "--on-storage-error", "closed")
    try:
        service.start()
        wait_until(lambda: "unreachable at start-up" in service.output(), timeout=HANG_GUARD, what="the log line")
        wait_until(lambda: ready(service) == 503 and health(service) == NOT_SERVING, timeout=HANG_GUARD,
                   what="/ready 503 and NOT_SERVING")
        assert service.http.get("/status").status_code == 200  # alive: Kubernetes must not restart it
        fresh_redis.start()
        took = seconds_until(lambda: ready(service) == 200 and health(service) == SERVING, READINESS_BOUND,
                             "ready once Redis is up")
        print(f"\nRedis up after a start without it: ready {took:.3f}s later")
        assert spend(service, "alice", 1) == [200]
        assert service.output().count("unreachable at start-up") == 1
    finally:
        service.close()


@pytest.mark.slow
async def test_counters_over_30k_redis_counters_answer_in_full(
    fresh_redis: RedisServer, limits_path: Path, start_service: Callable[..., ServiceProcess],
) -> None:
    """The issue's case: 30k counters in a healthy Redis, /counters with the default decision timeout.
    One call answers at most MAX_COUNTERS_PER_CALL with a cursor to the rest; following it lists
    every counter once."""
    from ratelimit.engine import RateLimiter
    from ratelimit.limits import load_limits_file
    from ratelimit.server.http import MAX_COUNTERS_PER_CALL, NEXT_CURSOR_HEADER
    from ratelimit.storage.redis import RedisOptions, RedisStorage

    storage = RedisStorage(RedisOptions(fresh_redis.url, timeout=30))
    engine = RateLimiter(storage, load_limits_file(limits_path))
    try:
        for start in range(0, 30_000, 1000):
            await asyncio.gather(*(engine.report(NS, [{"user": f"u{i}"}], 1) for i in range(start, start + 1000)))
    finally:
        await storage.close()
    service = start_service(limits_path, "redis", fresh_redis.url)
    began = time.monotonic()
    users: list[str] = []
    params: dict[str, str] = {}
    for _ in range(30_000 // MAX_COUNTERS_PER_CALL + 2):  # a cursor that never ends fails the test
        response = service.http.get(f"/counters/{NS}", params=params, timeout=120)
        assert response.status_code == 200, response.text[:500]
        page = response.json()
        assert len(page) == min(MAX_COUNTERS_PER_CALL, 30_000 - len(users))
        users += [counter["set_variables"]["descriptors[0]['user']"] for counter in page]
        cursor = response.headers.get(NEXT_CURSOR_HEADER)
        if cursor is None:
            break
        params = {"cursor": cursor}
    else:
        pytest.fail(f"the listing still had a cursor after {len(users)} counters")
    assert sorted(users) == sorted(f"u{i}" for i in range(30_000))
    print(f"\n/counters over 30k Redis counters, {MAX_COUNTERS_PER_CALL} a call: {time.monotonic() - began:.2f}s")
