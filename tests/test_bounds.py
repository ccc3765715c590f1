"""Every resource a client can make the service hold is bounded: memory per distinct request,
message and label sizes, connections and how long a connection may take to send its request."""

from __future__ import annotations

import asyncio
import gc
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import httpx
import pytest
from envoy.extensions.common.ratelimit.v3.ratelimit_pb2 import RateLimitDescriptor
from envoy.service.ratelimit.v3 import rls_pb2_grpc
from envoy.service.ratelimit.v3.rls_pb2 import RateLimitRequest, RateLimitResponse

from ratelimit.engine import MEMO_BYTES, RateLimiter, _memo_entry_bytes
from ratelimit.limits import parse_limits
from ratelimit.metrics import MAX_LABEL_VALUE_LENGTH, TOO_LONG_LABEL, Metrics
from ratelimit.server.grpc import MAX_MESSAGE_BYTES
from ratelimit.storage.memory import MemoryStorage
from tests.service_fixtures import ServiceProcess
from tests.support import wait_until

LIMITS = """
- {namespace: limited, name: per-user, max_value: 3, seconds: 60, variables: ["descriptors[0]['user']"]}
"""
MiB = 1024 * 1024


@pytest.fixture
def limits_file(tmp_path: Path) -> Path:
    path = tmp_path / "limits.yaml"
    path.write_text(LIMITS)
    return path


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def big_request(i: int, size: int) -> RateLimitRequest:
    """A request of about `size` bytes, distinct per `i`, within the engine's per-field bounds."""
    value = f"{i:08d}".ljust(4000, "x")
    entries_per_descriptor = 60
    descriptors: list[dict[str, str]] = []
    while len(descriptors) * entries_per_descriptor * 4010 < size:
        d = len(descriptors)
        descriptors.append(RateLimitDescriptor(entries=[
            RateLimitDescriptor.Entry(key=f"k{d}-{e}", value=value) for e in range(entries_per_descriptor)
        ]))
    return RateLimitRequest(domain="no-limits-here", descriptors=descriptors)


def should_rate_limit(service: ServiceProcess, user: str) -> int:
    stub = rls_pb2_grpc.RateLimitServiceStub(service.grpc)
    request = RateLimitRequest(domain="limited", descriptors=[
        RateLimitDescriptor(entries=[RateLimitDescriptor.Entry(key="user", value=user)])
    ])
    return stub.ShouldRateLimit(request, timeout=10).overall_code


def test_distinct_large_requests_do_not_grow_memory(start_service, limits_file: Path) -> None:
    """120 distinct 3.5 MB requests to a namespace without limits: nothing needs remembering them."""
    service = start_service(limits_file)
    assert service.process is not None
    stub = rls_pb2_grpc.RateLimitServiceStub(service.grpc)
    options = [("grpc.max_send_message_length", 8 * MiB)]
    with grpc.insecure_channel(service.grpc_target, options=options) as channel:
        stub = rls_pb2_grpc.RateLimitServiceStub(channel)
        for i in range(5):  # warm up: first-call allocations, thread pools
            stub.ShouldRateLimit(big_request(-i - 1, int(3.5 * MiB)), timeout=30)
        before = rss_bytes(service.process.pid)
        for i in range(120):
            request = big_request(i, int(3.5 * MiB))
            assert request.ByteSize() > 3.4 * MiB
            assert stub.ShouldRateLimit(request, timeout=30).overall_code == RateLimitResponse.OK
        after = rss_bytes(service.process.pid)
        assert after - before < 64 * MiB, f"resident size grew {(after - before) / MiB:.0f} MiB"
        # Past the message bound: refused before decoding, with a status that says so.
        with pytest.raises(grpc.RpcError) as refused:
            stub.ShouldRateLimit(big_request(0, MAX_MESSAGE_BYTES + MiB), timeout=30)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert should_rate_limit(service, "alice") == RateLimitResponse.OK


def test_a_memo_filled_twice_over_by_envoy_requests_stays_bounded_and_decides_as_before(
    start_service, limits_file: Path
) -> None:
    """Distinct ~58 KB requests over Envoy's RLS protocol, each just under what one memo entry may
    be (so each is remembered), twice the memo's budget in all: the real process's resident size
    stays within the budget while the memo forgets generation after generation, and a user's
    count is the same across those turns."""
    service = start_service(limits_file)
    assert service.process is not None
    value = "x" * 4000

    def remembered(i: int) -> RateLimitRequest:
        entries = [RateLimitDescriptor.Entry(key=f"k{e}", value=f"{i:08d}{value}") for e in range(14)]
        return RateLimitRequest(domain="no-limits-here", descriptors=[RateLimitDescriptor(entries=entries)])

    stub = rls_pb2_grpc.RateLimitServiceStub(service.grpc)
    entry = _memo_entry_bytes(("no-limits-here", tuple((e.key, e.value) for e in remembered(0).descriptors[0].entries)))
    assert 16 * 1024 < entry < 64 * 1024  # remembered, and large enough to fill the memo in a few thousand
    for i in range(50):  # warm up: first-call allocations, thread pools
        stub.ShouldRateLimit(remembered(-i - 1), timeout=30)
    before = rss_bytes(service.process.pid)
    decisions = []
    for i in range(2 * MEMO_BYTES // entry):
        assert stub.ShouldRateLimit(remembered(i), timeout=30).overall_code == RateLimitResponse.OK
        if i % 500 == 0:
            decisions.append(should_rate_limit(service, "alice"))
    grown = rss_bytes(service.process.pid) - before
    print(f"\nresident size grew {grown / MiB:.0f} MiB over {2 * MEMO_BYTES // entry} requests of {entry} bytes")
    assert grown < MEMO_BYTES + 32 * MiB, f"resident size grew {grown / MiB:.0f} MiB"
    # The limit is 3 a minute: the 4th and later are refused, memo turns or not.
    assert decisions == [RateLimitResponse.OK] * 3 + [RateLimitResponse.OVER_LIMIT] * (len(decisions) - 3)


def test_the_memo_is_bounded_in_bytes_and_keeps_a_working_set_that_fits() -> None:
    engine = RateLimiter(MemoryStorage(capacity=16), parse_limits(LIMITS))
    value = "v" * 4000
    hot = [{"user": "hot"}]
    hot_set = engine.counters_for("limited", hot)
    sizes = []
    for i in range(3 * MEMO_BYTES // (16 * 4000)):  # three memos' worth of ~64 KB sets
        engine.counters_for("limited", [{"user": f"{i}", **{f"k{j}": value for j in range(15)}}])
        assert engine.counters_for("limited", hot) is hot_set  # used all along: never forgotten
        sizes.append(engine._memo.bytes)
    memo = engine._memo
    assert max(sizes) <= MEMO_BYTES and min(sizes[len(sizes) // 3:]) >= MEMO_BYTES // 2 - 64 * 1024
    assert memo.young_bytes == sum(map(_memo_entry_bytes, memo.young))  # exact for the young generation
    assert memo.older_bytes >= sum(map(_memo_entry_bytes, memo.older))  # an upper bound for the older one
    large = [{f"k{j}": value for j in range(60)}]
    engine.counters_for("limited", large)  # larger than one entry may be: resolved, not remembered
    keys = [key for generation in memo.generations for key in generation]
    assert not any(isinstance(key[1], tuple) and len(key[1]) == 60 for key in keys)


def test_a_memoized_set_is_one_object_for_the_garbage_collector() -> None:
    """A full collection of Python's cyclic GC walks every tracked object while holding the
    interpreter lock: no decision meanwhile. A memo of 100k sets at three tracked objects each (the
    set, its plan in the memory table, the memo's entry) made one take ~50 ms; together they are one."""
    engine = RateLimiter(MemoryStorage(capacity=20_000), parse_limits(LIMITS))

    async def decide(users: range) -> None:
        for user in users:
            decision = await engine.check_and_report("limited", [{"user": f"user-{user}"}], 1, load_counters=True)
            assert decision.limited_by is None and len(decision.counters) == 1

    def tracked() -> int:
        for _ in range(3):  # a collection stops tracking a tuple of untracked items, inner ones first
            gc.collect()
        return len(gc.get_objects())

    asyncio.run(decide(range(100)))  # every lazily built structure exists
    before = tracked()
    asyncio.run(decide(range(100, 5100)))
    added = tracked() - before
    assert sum(map(len, engine._memo.generations)) == 5100
    assert added <= 5000 + 100, f"5,000 memoized sets added {added} tracked objects"


def test_long_label_values_are_folded() -> None:
    metrics = Metrics()
    metrics.record_authorized("n" * (MAX_LABEL_VALUE_LENGTH + 1), [{}], 1)
    metrics.record_authorized("short", [{}], 1)
    body, _ = metrics.render()
    assert f'limitador_namespace="{TOO_LONG_LABEL}"' in body.decode()
    assert 'limitador_namespace="short"' in body.decode()
    assert "n" * (MAX_LABEL_VALUE_LENGTH + 1) not in body.decode()


def test_a_connection_that_never_finishes_its_headers_is_closed(start_service, limits_file: Path) -> None:
    service = start_service(limits_file, "--http-header-timeout", "0.5", "-v")
    with socket.create_connection((service.host, service.http_port), timeout=10) as slow:
        slow.sendall(b"GET /status HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
        answer = slow.recv(4096)
        assert answer.startswith(b"HTTP/1.1 408")
        assert slow.recv(4096) == b""  # closed
    assert service.http.get("/status").status_code == 200
    wait_until(lambda: "no complete request head" in service.output(), what="the timeout to be logged")


_HOLDER = """
import socket, sys, time, resource
resource.setrlimit(resource.RLIMIT_NOFILE, (resource.getrlimit(resource.RLIMIT_NOFILE)[1],) * 2)
host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
held = []
for i in range(count):
    s = socket.socket()
    s.setblocking(False)
    try:
        s.connect_ex((host, port))
    except OSError:
        break
    held.append(s)
time.sleep(0.5)
for s in held:
    try:
        s.send(b"GET /status HTTP/1.1\\r\\nHost: x\\r\\n")  # headers never finished
    except OSError:
        pass
print(len(held), flush=True)
sys.stdin.read()  # hold them until told to stop
"""


@pytest.mark.slow
def test_half_open_connections_do_not_stop_status_or_grpc(start_service, limits_file: Path) -> None:
    """20,000 half-open HTTP connections (two processes of 10,000: one process's file limit is
    20,000 here): /status and gRPC decisions keep answering, and the refusals are logged once per
    interval, not per connection."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard < 10_500:
        pytest.skip(f"the open-file hard limit ({hard}) is too low to hold 10,000 connections per process")
    service = start_service(limits_file, "-v")
    holders = [
        subprocess.Popen([sys.executable, "-c", _HOLDER, service.host, str(service.http_port), "10000"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    try:
        opened = [int(holder.stdout.readline()) for holder in holders]  # type: ignore[union-attr]
        assert sum(opened) >= 19_000, opened
        started = time.monotonic()
        while time.monotonic() - started < 5:
            with httpx.Client(base_url=service.url, timeout=10) as fresh:  # a new connection each time
                assert fresh.get("/status").status_code == 200
            assert should_rate_limit(service, "bob") in (RateLimitResponse.OK, RateLimitResponse.OVER_LIMIT)
            time.sleep(0.2)
    finally:
        for holder in holders:
            holder.kill()
            holder.wait()
    output = service.output()
    assert "Too many open files" not in output
    assert output.count("connections open (the cap)") < 10, output[-3000:]
