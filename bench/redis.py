"""P4: decisions/s over Redis with 64 concurrent callers, ours against the `limits` package, in one run.

    python -m bench.redis [--quick] [--json PATH] [--url redis://HOST:PORT]

Starts its own `redis-server` on a free loopback port (`--save '' --appendonly no`; stopped at the
end) unless --url names one. Prints the machine and a Markdown table, writes every raw figure as JSON
(default bench/results/redis.json). Timings are reported, never asserted. See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import redis
from limits import RateLimitItem
from limits.aio.strategies import FixedWindowRateLimiter
from limits.storage import storage_from_string

from bench.core import (
    NAMESPACE,
    WINDOWS,
    Descriptors,
    Timing,
    Windows,
    build_requests,
    limits_items,
    machine,
    machine_line,
    measure_side_by_side,
    request_stream,
    stacked_limits,
)
from bench.report import write_results
from ratelimit.engine import RateLimiter
from ratelimit.storage.redis import RedisOptions, RedisStorage

CONCURRENCY = 64
DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "redis.json"
TARGET_RATIO = 4.0


@dataclass(frozen=True)
class Config:
    mode: str
    requests: int
    """Requests per timed pass (the same fixed-seed stream for every contestant)."""
    repeats: int


FULL = Config("full", requests=30_000, repeats=5)
QUICK = Config("quick", requests=6_000, repeats=2)

WORKLOADS: dict[str, Windows] = {
    "3 stacked windows (P1's workload)": WINDOWS,
    "1 window (one Redis call each side)": WINDOWS[2:],
}

Decide = Callable[[Descriptors], Awaitable[bool]]
"""One contestant's decision for one request: True when denied."""


async def run_callers(decide: Decide, requests: list[Descriptors]) -> int:
    """CONCURRENCY callers take the requests in order until none is left; returns how many were denied."""
    position = 0
    denied = 0

    async def caller() -> None:
        nonlocal position, denied
        while position < len(requests):
            descriptors = requests[position]
            position += 1
            denied += await decide(descriptors)

    await asyncio.gather(*(caller() for _ in range(CONCURRENCY)))
    return denied


def limits_contestant(url: str, windows: Windows) -> Decide:
    """`limits` FixedWindow on async Redis (redis-py, its only async Redis client that works with
    limits 5.8 here): the condition in Python, then hit() on each window in order, stopping at the
    first refusal. One EVALSHA per window; not atomic across windows."""
    limiter = FixedWindowRateLimiter(storage_from_string(f"async+{url}", implementation="redispy"))
    items: list[RateLimitItem] = limits_items(windows)

    async def decide(descriptors: Descriptors) -> bool:
        entries = descriptors[0]
        if entries["model"] != "gpt":
            return False
        for item in items:
            if not await limiter.hit(item, entries["user"]):
                return True
        return False

    return decide


def our_contestant(url: str, windows: Windows) -> tuple[Decide, RedisStorage]:
    """Ours: one engine call per request, all windows in one Lua script (one round trip)."""
    storage = RedisStorage(RedisOptions(url))
    engine = RateLimiter(storage, stacked_limits(windows))

    async def decide(descriptors: Descriptors) -> bool:
        return (await engine.check_and_report(NAMESPACE, descriptors, 1)).limited

    return decide, storage


@dataclass
class Row:
    workload: str
    contestant: str
    median: float
    best: float
    round_trips_per_decision: float
    """Script calls Redis served per decision."""
    vs_limits: float | None
    met: bool | None
    seconds: list[float]
    requests: int
    denied: int


def round_trips_per_decision(loop: asyncio.AbstractEventLoop, client: redis.Redis, decide: Decide, count: int) -> float:
    """Script calls (EVALSHA or EVAL) Redis served per decision: each is one request the client sent and
    waited for. (INFO's total_commands_processed would also count the commands the scripts run.)"""

    def script_calls() -> int:
        stats = client.info("commandstats")
        return sum(stats.get(f"cmdstat_{name}", {}).get("calls", 0) for name in ("evalsha", "eval"))

    requests = build_requests(request_stream(count))
    before = script_calls()
    loop.run_until_complete(run_callers(decide, requests))
    return (script_calls() - before) / count


def bench_workload(loop: asyncio.AbstractEventLoop, url: str, client: redis.Redis, name: str, windows: Windows,
                   config: Config) -> list[Row]:
    theirs = limits_contestant(url, windows)
    ours, storage = our_contestant(url, windows)
    stream = request_stream(config.requests)

    def prepare(decide: Decide) -> Callable[[], Callable[[], int]]:
        def build() -> Callable[[], int]:
            requests = build_requests(stream)
            return lambda: loop.run_until_complete(run_callers(decide, requests))
        return build

    timings: list[Timing] = measure_side_by_side(
        [prepare(theirs), prepare(ours)], lambda denied: denied, config.requests, config.repeats
    )
    round_trips = [round_trips_per_decision(loop, client, decide, 2_000) for decide in (theirs, ours)]
    loop.run_until_complete(storage.close())
    ratio = timings[1].median_rate / timings[0].median_rate
    return [
        Row(name, contestant, timing.median_rate, timing.best_rate, trips, vs, met, timing.seconds,
            timing.operations, timing.denied)
        for contestant, timing, trips, vs, met in (
            ("limits FixedWindow, async redis", timings[0], round_trips[0], None, None),
            ("ours, RedisStorage", timings[1], round_trips[1], ratio, ratio >= TARGET_RATIO),
        )
    ]


def markdown_table(rows: Sequence[Row]) -> str:
    lines = ["| workload | contestant | median | best | round trips / decision | vs limits | P4 >= 4x |",
             "|---|---|---:|---:|---:|---:|---|"]
    for row in rows:
        lines.append("| " + " | ".join([
            row.workload, row.contestant, f"{row.median / 1e3:.1f}k/s", f"{row.best / 1e3:.1f}k/s",
            f"{row.round_trips_per_decision:.2f}",
            "" if row.vs_limits is None else f"{row.vs_limits:.2f}x",
            {True: "yes", False: "**no**", None: ""}[row.met],
        ]) + " |")
    return "\n".join(lines)


@contextlib.contextmanager
def redis_server(url: str | None) -> Iterator[str]:
    """The given Redis, or a fresh `redis-server` on a free loopback port, stopped afterwards."""
    if url is not None:
        yield url
        return
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with tempfile.TemporaryDirectory() as directory:
        process = subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", directory],
            stdout=subprocess.DEVNULL,
        )
        try:
            client = redis.Redis(port=port)
            deadline = time.monotonic() + 10
            while True:
                try:
                    client.ping()
                    break
                except redis.ConnectionError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.02)
            yield f"redis://127.0.0.1:{port}"
        finally:
            process.terminate()
            process.wait(10)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.redis", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes, a smoke run (~20 s)")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"results file (default {DEFAULT_JSON})")
    parser.add_argument("--url", help="an existing Redis to use (it is flushed!); default: start one")
    args = parser.parse_args(argv)
    config = QUICK if args.quick else FULL
    info = machine()
    print(machine_line(info), flush=True)
    started = time.perf_counter()
    rows: list[Row] = []
    loop = asyncio.new_event_loop()
    with redis_server(args.url) as url:
        client = redis.Redis.from_url(url)
        client.flushall()
        info["redis"] = client.info("server")["redis_version"]
        info["redis_py"] = redis.__version__
        for name, windows in WORKLOADS.items():
            rows += bench_workload(loop, url, client, name, windows, config)
            print(f"{name} done", flush=True)
        client.close()
    loop.close()
    total = time.perf_counter() - started
    print(f"\n{config.mode} run, {total:.0f} s; Redis {info['redis']}; {CONCURRENCY} concurrent callers; "
          f"{config.requests:,} requests per pass, median and best of {config.repeats}\n")
    print(markdown_table(rows))
    write_results(args.json, {"machine": info, "config": asdict(config), "concurrency": CONCURRENCY,
                              "total_seconds": total, "results": [asdict(row) for row in rows]})


if __name__ == "__main__":
    main()
