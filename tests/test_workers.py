"""`ratelimit serve --workers 2`: two processes on the same ports and one shared memory table
decide exactly as one process would."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from ratelimit.tools.processes import free_ports
from tests.prometheus_fixtures import PrometheusProcess
from tests.redis_fixtures import RedisServer
from tests.service_fixtures import ServiceProcess
from tests.support import capacity_dev_shm_has_no_room_for, wait_until

LIMITS = """
- {namespace: w, name: per-user, max_value: 1000, seconds: 600, variables: ["descriptors[0]['user']"]}
- {namespace: s, name: burst, max_value: 5, seconds: 600, variables: ["descriptors[0]['user']"]}
- {namespace: s, name: daily, max_value: 8, seconds: 3600, variables: ["descriptors[0]['user']"]}
"""


@pytest.fixture
def workers(tmp_path: Path, start_service: Callable[..., ServiceProcess]) -> ServiceProcess:
    path = tmp_path / "limits.yaml"
    path.write_text(LIMITS)
    # A generous header timeout: on a loaded machine a client thread may stall between connecting
    # and sending its request for longer than the default 10 s (it would get a 408).
    return start_service(path, "--workers", "2", "-v", "--http-header-timeout", "120", timeout=90)


def clients_on_each_worker(service: ServiceProcess) -> dict[str, httpx.Client]:
    """Keep-alive clients, one per worker (a connection stays with the worker that accepted it)."""
    found: dict[str, httpx.Client] = {}
    for _ in range(200):
        client = httpx.Client(base_url=service.url, timeout=30)
        pid = client.get("/status").headers["x-ratelimit-pid"]
        if pid in found:
            client.close()
        else:
            found[pid] = client
        if len(found) == 2:
            return found
    raise AssertionError(f"200 connections all reached {list(found)}")


def test_exactly_the_limit_is_admitted_across_workers(workers: ServiceProcess) -> None:
    """1600 calls from 64 threads, each on a new connection (so any worker may take it): exactly
    1000 are admitted. Plain `http.client` connections: an httpx.Client per call costs an SSL
    context each, which made this the slowest test of the suite."""
    pids: set[str] = set()
    body = json.dumps({"namespace": "w", "values": {"user": "alice"}, "delta": 1})

    def one(_: int) -> int:
        connection = http.client.HTTPConnection(workers.host, workers.http_port, timeout=60)
        try:
            connection.request("POST", "/check_and_report", body, {"content-type": "application/json"})
            answer = connection.getresponse()
            answer.read()
            try:  # the same connection, so the same worker
                connection.request("GET", "/status")
                status = connection.getresponse()
                status.read()
                pids.add(status.headers["x-ratelimit-pid"])
            except (OSError, http.client.HTTPException):
                pass  # the worker closed the idle keep-alive connection meanwhile (a loaded machine)
            return answer.status
        finally:
            connection.close()

    with ThreadPoolExecutor(max_workers=64) as pool:
        statuses = list(pool.map(one, range(1600)))
    assert len(pids) == 2, "every call reached the same worker"
    assert statuses.count(200) == 1000 and statuses.count(429) == 600


def test_stacked_limits_and_cross_worker_commit(workers: ServiceProcess) -> None:
    first, second = clients_on_each_worker(workers).values()
    body = {"namespace": "s", "values": {"user": "bob"}, "delta": 1}
    answers = [(first if i % 2 else second).post("/check_and_report", json=body).status_code for i in range(7)]
    assert answers == [200] * 5 + [429] * 2  # the burst limit, whichever worker answers
    used = {c["limit"]["name"]: c["remaining"] for c in first.get("/counters/s").json()}
    assert used == {"burst": 0, "daily": 3}  # the refused calls charged neither window

    reserve = {"namespace": "w", "values": {"user": "carol"}, "amount": 600, "ttl_seconds": 60}
    reservation = first.post("/reserve", json=reserve).json()["reservation_id"]
    assert second.post("/reserve", json=reserve).status_code == 429  # the other worker sees the hold
    commit = {"namespace": "w", "values": {"user": "carol"}, "reservation_id": reservation, "actual": 100}
    assert second.post("/commit", json=commit).json() == {"reservation_held": True}
    [counter] = first.get("/counters/w", params={"variable": "user:carol"}).json()
    assert counter["remaining"] == 900 and counter["reserved"] == 0
    for client in (first, second):
        client.close()


def test_a_dead_worker_is_restarted(workers: ServiceProcess) -> None:
    pids = list(clients_on_each_worker(workers))
    os.kill(int(pids[0]), signal.SIGKILL)
    wait_until(lambda: "restarting it (1 restarts so far)" in workers.output(), timeout=30, what="the restart")

    def two_live_workers() -> bool:
        seen = set()
        for _ in range(100):
            try:
                with httpx.Client(base_url=workers.url, timeout=10) as client:
                    seen.add(client.get("/status").headers["x-ratelimit-pid"])
            except httpx.TransportError:
                continue
            if len(seen) == 2:
                return pids[0] not in seen
        return False

    wait_until(two_live_workers, timeout=90, interval=0.5, what="a new worker answering")
    assert workers.process is not None
    workers.process.send_signal(signal.SIGTERM)  # drains every worker, then the supervisor exits
    assert workers.process.wait(timeout=120) == 0


def _calls_on(client: httpx.Client, user: str, calls: int) -> None:
    body = {"namespace": "w", "values": {"user": user}, "delta": 2}
    for _ in range(calls):
        assert client.post("/check_and_report", json=body).status_code == 200


def _scraped_total(prometheus: PrometheusProcess, query: str) -> float | None:
    result = prometheus.query(query)
    return float(result[0]["value"][1]) if result else None


def test_metrics_are_the_sum_over_workers_in_one_scrape(
    workers: ServiceProcess, start_prometheus: Callable[..., PrometheusProcess],
) -> None:
    """A real Prometheus scrapes one port (its keep-alive connection stays with one worker), while
    calls reach both workers: every scrape shows the sum, before and after a worker is killed."""
    prometheus = start_prometheus({"ratelimit": [f"{workers.host}:{workers.http_port}"]})
    clients = clients_on_each_worker(workers)
    for number, client in enumerate(clients.values()):
        _calls_on(client, f"user-{number}", 30 + 10 * number)  # 30 on one worker, 40 on the other
    for client in clients.values():  # whichever worker answers, it answers for both
        text = client.get("/metrics").text
        assert 'authorized_calls{limitador_namespace="w"} 70\n' in text, text
        assert 'authorized_hits{limitador_namespace="w"} 140\n' in text
        assert "\nlimitador_up 1\n" in text  # the highest of the live workers, not their sum

    calls = 'authorized_calls{job="ratelimit"}'
    wait_until(lambda: _scraped_total(prometheus, calls) == 70, timeout=120, what="Prometheus scraping 70 calls")
    # Repeated scrapes agree: every sample of the last seconds, whichever worker served it, is 70.
    wait_until(lambda: (_scraped_total(prometheus, f"count_over_time({calls}[30s])") or 0) >= 3, timeout=120,
               what="three scrapes")
    assert _scraped_total(prometheus, f"min_over_time({calls}[30s])") == 70
    assert _scraped_total(prometheus, f"max_over_time({calls}[30s])") == 70
    assert _scraped_total(prometheus, 'limitador_up{job="ratelimit"}') == 1

    # A killed worker's counts stay (its file is kept and summed); its replacement, with a new pid,
    # starts from 0, so nothing is counted twice.
    killed = next(iter(clients))
    os.kill(int(killed), signal.SIGKILL)
    for client in clients.values():
        client.close()
    wait_until(lambda: "restarting it (1 restarts so far)" in workers.output(), timeout=120, what="the restart")
    # A new worker imports and compiles for as long as a loaded machine makes it (minutes at worst).
    wait_until(lambda: (pids := answering_workers(workers)) and killed not in pids, timeout=300, interval=0.5,
               what="two live workers again")
    for number, client in enumerate(clients_on_each_worker(workers).values()):
        _calls_on(client, f"user-{number}", 5)
        client.close()
    wait_until(lambda: _scraped_total(prometheus, calls) == 80, timeout=120, what="Prometheus scraping 80 calls")
    assert _scraped_total(prometheus, 'limitador_up{job="ratelimit"}') == 1
    assert _scraped_total(prometheus, 'resets(authorized_calls{job="ratelimit"}[5m])') == 0


def answering_workers(service: ServiceProcess) -> set[str]:
    """The pids of the workers answering now (empty while a worker is still starting)."""
    try:
        found = clients_on_each_worker(service)
    except (AssertionError, httpx.TransportError):
        return set()
    for client in found.values():
        client.close()
    return set(found)


def test_a_table_dev_shm_has_no_room_for_is_refused_at_start(tmp_path: Path) -> None:
    """Docker's default 64 MB /dev/shm holds a table of about 200k counters: asking for more than
    /dev/shm has room for fails at start with one line that says what to do, not later with SIGBUS."""
    capacity = capacity_dev_shm_has_no_room_for()
    limits = tmp_path / "limits.yaml"
    limits.write_text(LIMITS)
    http_port, rls_port = free_ports(2, "127.0.0.1")
    result = subprocess.run(
        [sys.executable, "-m", "ratelimit.cli", "serve", str(limits), "-B", "127.0.0.1", "-P", str(http_port),
         "-b", "127.0.0.1", "-p", str(rls_port), "--workers", "2", "--cache", str(capacity)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 1, result.stderr
    assert "cannot start 2 workers: the shared counter table" in result.stderr
    assert "--shm-size" in result.stderr and "medium: Memory" in result.stderr
    assert "Traceback" not in result.stderr


def test_redis_health_metrics_are_summed_over_workers(
    fresh_redis: RedisServer, tmp_path: Path, start_service: Callable[..., ServiceProcess],
) -> None:
    """With Redis, each worker has its own connections and counts its own failed decisions: a
    scrape of either worker shows the sum, and `datastore_partitioned` 1 (the worst live worker)."""
    path = tmp_path / "limits.yaml"
    path.write_text(LIMITS)
    service = start_service(path, "redis", fresh_redis.url, "--workers", "2", "--on-storage-error", "closed",
                            "--response-timeout", "200", "--http-header-timeout", "120", timeout=90)
    clients = clients_on_each_worker(service)
    fresh_redis.kill()
    body = {"namespace": "w", "values": {"user": "dave"}, "delta": 1}
    for calls, client in zip((3, 5), clients.values(), strict=True):
        for _ in range(calls):
            assert client.post("/check_and_report", json=body).status_code == 503

    def scraped(client: httpx.Client, name: str) -> float | None:
        found = re.search(rf"^{name} (\S+)$", client.get("/metrics").text, re.MULTILINE)
        return float(found.group(1)) if found else None

    for client in clients.values():  # each worker's own errors reach the files within a second or so
        def summed(client: httpx.Client = client) -> bool:
            return scraped(client, "datastore_errors") == 8

        wait_until(summed, timeout=60, interval=0.2, what="both workers' 8 failed decisions in one scrape")
        assert scraped(client, "datastore_partitioned") == 1
        client.close()
