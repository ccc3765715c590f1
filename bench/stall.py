"""Stall benchmark: does control-plane work delay decisions?

A load generator (its own process) sends ShouldRateLimit over gRPC at a fixed rate to one
`ratelimit serve --quota-metrics` (memory storage) holding 300k live counters, and records each
call's latency from its *scheduled* send time (so a stalled server is not hidden by the generator
waiting too: no coordinated omission). Meanwhile this process runs the control-plane phases:

- walk: paged `GET /counters/{ns}?limit=1000` walks over all counters, one after another;
- scrape: `GET /metrics` (quota gauges over every counter) every second;
- reload: the limits file swapped between the bench limits and a 2,000-limit version of them;

each split into `--rounds` segments (default 3 of 8 s), and every segment after an idle one
(nothing but the decisions): idle, walk, idle, scrape, idle, reload, then again.

Decision p50 / p99 / max per phase (its segments together), and each phase's p99 against idle's
(all idle segments together). Target: p99 <= 2x idle, no decision over 50 ms. Why idle and load
alternate in short segments: on a shared 2-core VM the machine's own speed drifts (the idle p99 of
runs minutes apart went from 2.4 to 5.4 ms), and a p99 of 4,800 decisions is set by its 48 slowest,
which one hiccup moves. With one 12 s idle phase at the start the same code measured 1.4x-2.8x in
the reload phase; with one 24 s idle phase before each 24 s phase, 1.5x-2.2x in the walk phase.
Each segment's p99 is in the JSON, to show the drift.

    flock /tmp/bench.lock .venv/bin/python -m bench.stall [--quick] [--phase-seconds S] [--rounds N] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import httpx
from envoy.extensions.common.ratelimit.v3.ratelimit_pb2 import RateLimitDescriptor
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc

from bench.report import machine_facts, write_results
from ratelimit.tools.processes import free_ports, running

REPO = Path(__file__).resolve().parent.parent
DEFAULT_JSON = REPO / "bench" / "results" / "stall.json"
HOST = "127.0.0.1"
NAMESPACE = "bench"
FILL_DESCRIPTORS = 64
# Limit k counts per user of descriptors[k]: a request with 64 descriptors makes 64 counters, so
# 300k counters take ~4.7k requests. Decisions send one descriptor and touch limit 0 only.
BENCH_LIMITS = "".join(
    f"- {{namespace: {NAMESPACE}, name: per-user-{k}, max_value: 1000000000000, seconds: 3600,"
    f" variables: [\"descriptors[{k}]['user']\"]}}\n"
    for k in range(FILL_DESCRIPTORS)
)
RELOAD_LIMITS = BENCH_LIMITS + "".join(
    f"- {{namespace: other-{i % 50}, name: extra-{i}, max_value: {100 + i}, seconds: 60,"
    f" conditions: [\"descriptors[0]['tier'] == 't{i}'\"], variables: [\"descriptors[0]['user']\"]}}\n"
    for i in range(2000 - FILL_DESCRIPTORS)
)


def request(users: list[str]) -> rls_pb2.RateLimitRequest:
    return rls_pb2.RateLimitRequest(domain=NAMESPACE, descriptors=[
        RateLimitDescriptor(entries=[RateLimitDescriptor.Entry(key="user", value=user)]) for user in users
    ])


# -- the load generator (a process of its own) -------------------------------------------------------


async def generate(target: str, rate: float, seconds: float, out: Path) -> None:
    """Open loop: call k is due at start + k/rate, whether or not earlier calls have answered.

    The generator's own garbage collector is off: its full collections (over the growing list of
    samples and pending calls) would be counted as the service's latency."""
    gc.disable()
    async with grpc.aio.insecure_channel(target) as channel:
        stub = rls_pb2_grpc.RateLimitServiceStub(channel)
        requests = [request([f"decider-{i}"]) for i in range(1000)]
        samples: list[tuple[float, float]] = []
        errors = 0

        async def call(due: float, message: rls_pb2.RateLimitRequest) -> None:
            nonlocal errors
            try:
                await stub.ShouldRateLimit(message, timeout=10)
            except grpc.RpcError:
                errors += 1
                return
            samples.append((due, time.monotonic() - due))

        for message in requests[:50]:  # warm up the channel and the memo
            await stub.ShouldRateLimit(message, timeout=10)
        start = time.monotonic()
        tasks = []
        for k in range(int(rate * seconds)):
            due = start + k / rate
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(call(due, requests[k % len(requests)])))
        await asyncio.gather(*tasks)
    out.write_text(json.dumps({"samples": samples, "errors": errors, "cpu_seconds": time.process_time()}))


# -- the phases ----------------------------------------------------------------------------------------


def fill(target: str, counters: int) -> None:
    async def run() -> None:
        async with grpc.aio.insecure_channel(target) as channel:
            stub = rls_pb2_grpc.RateLimitServiceStub(channel)
            batches = (counters + FILL_DESCRIPTORS - 1) // FILL_DESCRIPTORS
            semaphore = asyncio.Semaphore(32)

            async def one(b: int) -> None:
                async with semaphore:
                    users = [f"filler-{b * FILL_DESCRIPTORS + k}" for k in range(FILL_DESCRIPTORS)]
                    answer = await stub.ShouldRateLimit(request(users), timeout=60)
                    assert answer.overall_code == rls_pb2.RateLimitResponse.OK

            await asyncio.gather(*(one(b) for b in range(batches)))

    asyncio.run(run())


class Walk:
    """Paged `GET /counters/{ns}?limit=1000` walks, one after another, resumed across rounds."""

    def __init__(self) -> None:
        self.cursor: str | None = None
        self.walks, self.pages, self.listed = 0, 0, 0

    def __call__(self, http: httpx.Client, until: float) -> None:
        while time.monotonic() < until:
            params: dict[str, Any] = {"limit": 1000, **({"cursor": self.cursor} if self.cursor else {})}
            response = http.get(f"/counters/{NAMESPACE}", params=params)
            response.raise_for_status()
            self.pages += 1
            self.listed += response.content.count(b"\"namespace\":")  # no parse: the client shares the machine
            self.cursor = response.headers.get("x-next-cursor")
            self.walks += self.cursor is None

    def details(self) -> dict[str, Any]:
        return {"complete_walks": self.walks, "pages": self.pages, "counters_listed": self.listed}


class Scrape:
    """`GET /metrics` (quota gauges over every counter) every second."""

    def __init__(self) -> None:
        self.durations: list[float] = []
        self.bytes_last = 0

    def __call__(self, http: httpx.Client, until: float) -> None:
        while time.monotonic() < until:
            started = time.monotonic()
            response = http.get("/metrics")
            response.raise_for_status()
            self.durations.append(time.monotonic() - started)
            self.bytes_last = len(response.content)
            time.sleep(max(0.0, min(1.0 - (time.monotonic() - started), until - time.monotonic())))

    def details(self) -> dict[str, Any]:
        return {"scrapes": len(self.durations), "scrape_seconds_median": _median(self.durations),
                "bytes_last": self.bytes_last}


class Reload:
    """The limits file swapped between the 2,000-limit and the bench version, each change waited
    for in `/status` (polled every 20 ms) before the next."""

    def __init__(self, limits_file: Path) -> None:
        self.limits_file = limits_file
        self.durations: list[float] = []

    def __call__(self, http: httpx.Client, until: float) -> None:
        texts = [RELOAD_LIMITS, BENCH_LIMITS]
        # Swaps come in pairs: every segment ends on the bench limits, so the other phases never
        # run against the 2,000-limit file.
        while time.monotonic() < until or len(self.durations) % 2:
            version = http.get("/status").json()["config_version"]
            started = time.monotonic()
            temporary = self.limits_file.with_name(".limits.tmp")
            temporary.write_text(texts[len(self.durations) % 2])
            os.replace(temporary, self.limits_file)
            while http.get("/status").json()["config_version"] == version:
                time.sleep(0.02)
            self.durations.append(time.monotonic() - started)

    def details(self) -> dict[str, Any]:
        return {"reloads": len(self.durations), "applied_after_seconds_median": _median(self.durations)}


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


SETTLE_SECONDS = 1.0
"""After each control-plane segment: what it leaves running (paced frees) counts for no phase."""


def idle(http: httpx.Client, until: float) -> None:
    """The control phase: nothing but the decisions."""
    time.sleep(max(0.0, until - time.monotonic()))


def percentiles(latencies: list[float]) -> dict[str, float]:
    ordered = sorted(latencies)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000

    return {"count": len(ordered), "p50_ms": at(0.5), "p99_ms": at(0.99), "max_ms": ordered[-1] * 1000}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer counters, shorter phases")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    parser.add_argument("--rate", type=float, default=200.0, help="decisions per second")
    parser.add_argument("--phases", default="walk,scrape,reload",
                        help="comma-separated control-plane phases to run after idle (default: all)")
    parser.add_argument("--phase-seconds", type=float, help="how long each phase lasts in all (default 24, --quick 6)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="segments each phase is split into, interleaved with idle ones (default 3)")
    parser.add_argument("--generator", nargs=4, metavar=("TARGET", "RATE", "SECONDS", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.generator:
        target, rate, seconds, out = args.generator
        asyncio.run(generate(target, float(rate), float(seconds), Path(out)))
        return 0
    counters = 30_000 if args.quick else 300_000
    phase_seconds = args.phase_seconds or (6.0 if args.quick else 24.0)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    segment_seconds = phase_seconds / args.rounds
    wanted = args.phases.split(",")
    unknown = sorted(set(wanted) - {"walk", "scrape", "reload"})
    if unknown:
        parser.error(f"unknown phases: {', '.join(unknown)} (known: walk, scrape, reload)")
    facts = machine_facts()
    with tempfile.TemporaryDirectory(prefix="bench-stall-") as tmp:
        work = Path(tmp)
        limits_file = work / "limits.yaml"
        limits_file.write_text(BENCH_LIMITS)
        http_port, grpc_port = free_ports(2, HOST)
        command = [sys.executable, "-m", "ratelimit.cli", "serve", str(limits_file), "-B", HOST, "-P", str(http_port),
                   "-b", HOST, "-p", str(grpc_port), "--quota-metrics", "--reload-interval", "0.2", "memory"]
        target = f"{HOST}:{grpc_port}"
        http = httpx.Client(base_url=f"http://{HOST}:{http_port}", timeout=120)

        def ready() -> bool:
            return http.get("/status").status_code == 200

        with running("ratelimit serve", command, ready, work / "serve.log", (httpx.TransportError,), REPO) as serve:
            print(f"filling {counters} counters ...", flush=True)
            started = time.monotonic()
            fill(target, counters)
            print(f"  filled in {time.monotonic() - started:.1f}s", flush=True)
            actions: dict[str, Walk | Scrape | Reload] = {
                "walk": Walk(), "scrape": Scrape(), "reload": Reload(limits_file),
            }
            segments: list[tuple[str, Callable[[httpx.Client, float], None]]] = [
                segment for _ in range(args.rounds) for name in wanted for segment in (("idle", idle), (name, actions[name]))
            ]
            # Segments overrun their end a little (a page, a scrape, a reload waited for): slack,
            # so that the generator still sends during the last one.
            total = segment_seconds * len(segments) + SETTLE_SECONDS * len(segments) / 2 + 2 + 10
            out = work / "latencies.json"
            generator = subprocess.Popen([sys.executable, "-m", "bench.stall", "--generator", target,
                                          str(args.rate), str(total), str(out)], cwd=REPO)
            serve_cpu_before = _cpu_seconds(serve.pid)
            windows: dict[str, list[tuple[float, float]]] = {}
            time.sleep(1.0)  # the generator's start-up and warm-up
            for name, action in segments:
                begin = time.monotonic()
                action(http, begin + segment_seconds)
                windows.setdefault(name, []).append((begin, time.monotonic()))
                if name != "idle":
                    time.sleep(SETTLE_SECONDS)
            details: dict[str, dict[str, Any]] = {
                name: action.details() for name, action in actions.items() if name in wanted
            }
            for name, row in details.items():
                print(f"  {name}: {row}", flush=True)
            generator.wait(timeout=total + 120)
            serve_cpu = _cpu_seconds(serve.pid) - serve_cpu_before
            load_average = os.getloadavg()
        http.close()
        result = json.loads(out.read_text())
    samples = result["samples"]

    def latencies_in(spans: list[tuple[float, float]]) -> list[float]:
        return [latency for due, latency in samples if any(begin <= due < end for begin, end in spans)]

    rows: dict[str, dict[str, Any]] = {}
    for name, spans in windows.items():
        latencies = latencies_in(spans)
        rows[name] = percentiles(latencies) if latencies else {"count": 0}
    idle_p99 = rows["idle"]["p99_ms"]
    for name, spans in windows.items():  # the drift, and how each segment compares
        details.setdefault(name, {})["p99_ms_of_each_segment"] = [
            percentiles(latencies)["p99_ms"] if (latencies := latencies_in([span])) else None for span in spans
        ]
    print(f"\nDecision latency over gRPC at {args.rate:g}/s, {counters} live counters "
          f"(load average after: {load_average[0]:.2f} {load_average[1]:.2f} {load_average[2]:.2f})\n")
    print("| phase | decisions | p50 ms | p99 ms | max ms | p99 / idle p99 | target met |")
    print("|---|---|---|---|---|---|---|")
    for name, row in rows.items():
        if not row["count"]:
            print(f"| {name} | 0 | | | | | |")
            continue
        ratio = row["p99_ms"] / idle_p99
        row["p99_ratio"] = ratio
        row["met"] = ratio <= 2.0 and row["max_ms"] <= 50.0
        print(f"| {name} | {row['count']} | {row['p50_ms']:.2f} | {row['p99_ms']:.2f} | {row['max_ms']:.1f} | "
              f"{ratio:.2f}x | {'yes' if row['met'] else 'no'} |")
    print(f"\ngenerator: {result['errors']} errors, {result['cpu_seconds']:.1f} CPU s; "
          f"service: {serve_cpu:.1f} CPU s over the phases")
    write_results(args.json, {
        "machine": facts, "load_average_after": load_average, "rate": args.rate, "counters": counters,
        "phase_seconds": phase_seconds, "rounds": args.rounds, "phases": rows, "details": details,
        "generator_errors": result["errors"], "generator_cpu_seconds": result["cpu_seconds"],
        "service_cpu_seconds": serve_cpu,
    })
    return 0


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


if __name__ == "__main__":
    sys.exit(main())
