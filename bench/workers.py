"""Decisions/s across worker processes (issue #13), side by side in one run:

- `ratelimit serve --workers N` (memory storage, one shared counter table) for N = 1, 2, ... up to
  the usable cores, under h2load sending gRPC ShouldRateLimit;
- next to a bare grpc.aio servicer (answers OK at once) run as the same number of processes on
  one SO_REUSEPORT port, measured the same way in the same run.

    python -m bench.workers [--quick] [--workers 1,2] [--json PATH]   (from the repository root)

Needs h2load (Debian nghttp2-client). Prints the machine, the share of the machine h2load itself
took (its CPU seconds over the wall time and the usable cores: with few cores the generator
competes with the servers), a Markdown table, and writes every raw figure as JSON (default
bench/results/workers.json). Timings are reported, never asserted. Targets (issue #13): 2 workers
>= 1.3x one worker, and >= 0.9x the bare servicer with the same number of processes.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from grpc_health.v1 import health_pb2_grpc

from bench.grpc import (
    HOST,
    LIMITS,
    NAMESPACE,
    NOT_READY,
    REPO,
    SHOULD_RATE_LIMIT,
    BareServicer,
    Load,
    Row,
    grpc_arguments,
    grpc_serving,
    h2load,
    in_turns,
    markdown_table,
    should_rate_limit,
)
from bench.report import machine_facts, write_results
from ratelimit.tools.processes import free_ports, running

DEFAULT_JSON = REPO / "bench" / "results" / "workers.json"


@dataclass(frozen=True)
class Config:
    mode: str
    rounds: int
    seconds: int
    connections: int
    """HTTP/2 connections (h2load -c): SO_REUSEPORT spreads connections, not requests, over the
    processes, so there must be enough of them for an even split."""
    streams: int
    """Concurrent streams per connection (h2load -m)."""
    warm_up_seconds: int = 1


# Many short rounds in turns: on a shared machine the load drifts, and interleaving spreads that
# drift over every contestant.
FULL = Config("full", rounds=5, seconds=5, connections=16, streams=8)
QUICK = Config("quick", rounds=1, seconds=3, connections=16, streams=8)


# -- the bare servicer, N processes on one port ----------------------------------------------------


async def serve_bare(port: int, own_port: int) -> None:
    """The bare servicer on `port`, shared with its sibling processes (SO_REUSEPORT), and on
    `own_port` of its own, which only says that this process is up."""
    from grpc_health.v1.health import aio as health_aio

    server = grpc.aio.server(options=[("grpc.so_reuseport", 1)])
    rls_pb2_grpc.add_RateLimitServiceServicer_to_server(BareServicer(), server)
    health_pb2_grpc.add_HealthServicer_to_server(health_aio.HealthServicer(), server)
    server.add_insecure_port(f"{HOST}:{port}")
    server.add_insecure_port(f"{HOST}:{own_port}")
    await server.start()
    await server.wait_for_termination()


def workers_answering(http_port: int, workers: int) -> Callable[[], bool]:
    """Ready once `workers` distinct worker processes answer /status (each on a new connection)."""
    def check() -> bool:
        pids = set()
        for _ in range(20 * workers):
            pids.add(httpx.get(f"http://{HOST}:{http_port}/status", timeout=2).headers["x-ratelimit-pid"])
            if len(pids) == workers:
                return True
        return False

    return check


# -- measuring -------------------------------------------------------------------------------------


@dataclass
class Measured:
    load: Load
    generator_cpu_seconds: float

    def generator_share(self, cores: int) -> float:
        """The share of the machine h2load took: its CPU time over the wall time and the cores."""
        return self.generator_cpu_seconds / (self.load.seconds * cores) if self.load.seconds else float("nan")


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measure(port: int, arguments: Sequence[str]) -> Measured:
    before = children_cpu_seconds()  # h2load is a child that has exited when h2load() returns
    load = h2load(f"http://{HOST}:{port}{SHOULD_RATE_LIMIT}", arguments)
    return Measured(load, children_cpu_seconds() - before)


def contestants(counts: Sequence[int]) -> list[str]:
    return [f"{kind}-{n}" for n in counts for kind in ("ours", "bare")]


def bench(config: Config, work: Path, ports: dict[str, int], counts: Sequence[int], cores: int) -> list[Row]:
    arguments = [
        "-t", "1", "-c", str(config.connections), "-m", str(config.streams),
        "-D", str(config.seconds), f"--warm-up-time={config.warm_up_seconds}", *grpc_arguments(work),
    ]
    runs: dict[str, list[Measured]] = {name: [] for name in ports}
    for _, name in in_turns(list(ports), config.rounds):
        runs[name].append(measure(ports[name], arguments))
        print(f"  {name}: {runs[name][-1].load.rate:,.0f} req/s", flush=True)
    for name, measured in runs.items():
        failed = [m.load for m in measured if m.load.succeeded != m.load.requests]
        if failed:
            raise RuntimeError(f"{name}: h2load saw failed requests: {failed}")

    def rates(name: str) -> list[float]:
        return [m.load.rate for m in runs[name]]

    def per_round(top: str, bottom: str) -> float:
        # Judged on the runs of one round, taken close together: the load from elsewhere drifts.
        return statistics.median(a / b for a, b in zip(rates(top), rates(bottom), strict=True))

    def detail(name: str) -> dict[str, Any]:
        return {"runs": [asdict(m.load) | {"generator_cpu_seconds": m.generator_cpu_seconds,
                                            "generator_share": m.generator_share(cores)} for m in runs[name]],
                "generator_share_median": statistics.median(m.generator_share(cores) for m in runs[name])}

    concurrency = f"{config.connections} connections x {config.streams} streams"
    rows = []
    for n in counts:
        ours, bare = f"ours-{n}", f"bare-{n}"
        processes = "1 process" if n == 1 else f"{n} processes"
        target, met = ("", None) if n == 1 else (">= 0.9x bare", per_round(ours, bare) >= 0.9)
        rows.append(Row(f"W{n}", f"ratelimit serve --workers {n}, ShouldRateLimit, memory ({concurrency})", "req/s",
                        statistics.median(rates(ours)), max(rates(ours)), per_round(ours, bare),
                        target or "vs bare, same processes", met, detail(ours)))
        rows.append(Row(f"W{n}", f"bare grpc.aio servicer, {processes} on one SO_REUSEPORT port", "req/s",
                        statistics.median(rates(bare)), max(rates(bare)), None, "baseline", None, detail(bare)))
    for n in counts[1:]:
        scaling = per_round(f"ours-{n}", "ours-1")
        rows.append(Row(f"W{n}/W1", f"ratelimit serve: {n} workers over 1 worker", "req/s",
                        statistics.median(rates(f"ours-{n}")), None, scaling,
                        ">= 1.3x" if n == 2 else "", scaling >= 1.3 if n == 2 else None,
                        {"bare_scaling": per_round(f"bare-{n}", "bare-1")}))
    return rows


def generator_line(rows: Sequence[Row]) -> str:
    shares = {f"{row.id} {'ours' if row.what.startswith('ratelimit') else 'bare'}": row.detail["generator_share_median"]
              for row in rows if "generator_share_median" in row.detail}
    return "h2load's share of the machine (median per contestant): " + ", ".join(
        f"{what}: {share:.0%}" for what, share in shares.items())


# -- the run ---------------------------------------------------------------------------------------


def start_contestants(stack: ExitStack, work: Path, counts: Sequence[int]) -> tuple[dict[str, int], dict[str, int]]:
    """Every contestant running, ready, and answering OK once: (gRPC port, HTTP port of ours)."""
    limits = work / "limits.yaml"
    limits.write_text(LIMITS)
    grpc_ports: dict[str, int] = {}
    http_ports: dict[str, int] = {}
    for n in counts:
        http_port, ours_port, bare_port = free_ports(3, HOST)
        command = [sys.executable, "-m", "ratelimit.cli", "serve", str(limits), "-B", HOST, "-P", str(http_port),
                   "-b", HOST, "-p", str(ours_port), "--workers", str(n)]
        stack.enter_context(running(f"ratelimit serve --workers {n}", command, workers_answering(http_port, n),
                                    work / f"ours-{n}.log", NOT_READY, REPO))
        for i, own_port in enumerate(free_ports(n, HOST)):
            bare = [sys.executable, "-m", "bench.workers", "--bare-servicer", str(bare_port), str(own_port)]
            stack.enter_context(running(f"bare servicer {i + 1}/{n}", bare, grpc_serving(own_port),
                                        work / f"bare-{n}-{i}.log", NOT_READY, REPO))
        grpc_ports[f"ours-{n}"], grpc_ports[f"bare-{n}"] = ours_port, bare_port
        http_ports[f"ours-{n}"] = http_port
    for name, port in grpc_ports.items():
        if should_rate_limit(port).overall_code != rls_pb2.RateLimitResponse.OK:
            raise RuntimeError(f"{name}: the warm-up request was not answered OK")
    return grpc_ports, http_ports


def check_charged(rows: Sequence[Row], http_ports: dict[str, int], counts: Sequence[int]) -> None:
    """Every request h2load counted as done was really decided: the shared counter holds at least as many."""
    for n in counts:
        [counter] = httpx.get(f"http://{HOST}:{http_ports[f'ours-{n}']}/counters/{NAMESPACE}", timeout=30).json()
        charged = 10**12 - counter["remaining"]
        [row] = [row for row in rows if row.id == f"W{n}" and row.what.startswith("ratelimit")]
        done = sum(run["requests"] for run in row.detail["runs"])
        if charged < done:
            raise RuntimeError(f"--workers {n}: {done} requests done but only {charged} charged")


def parse_counts(text: str) -> list[int]:
    counts = sorted({int(part) for part in text.split(",") if part.strip()})
    if not counts or counts[0] != 1 or any(n < 1 for n in counts):
        raise SystemExit(f"--workers {text!r}: a comma-separated list of worker counts starting with 1")
    return counts


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.workers", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one short round each, a smoke run (~1 min)")
    parser.add_argument("--workers", metavar="1,2,...", help="worker counts to measure (default: 1 up to the usable "
                        "cores, at least 1,2)")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"where to write results (default {DEFAULT_JSON})")
    parser.add_argument("--bare-servicer", type=int, nargs=2, metavar=("PORT", "OWN_PORT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.bare_servicer:
        asyncio.run(serve_bare(*args.bare_servicer))
        return
    if shutil.which("h2load") is None:
        raise SystemExit("missing h2load: apt-get install nghttp2-client")
    cores = len(os.sched_getaffinity(0))
    counts = parse_counts(args.workers or ",".join(str(n) for n in range(1, max(2, cores) + 1)))
    config = QUICK if args.quick else FULL
    info = machine_facts(grpcio=grpc.__version__)
    print(f"machine: {info}", flush=True)
    if info["load_average_at_start"][0] > 0.5:
        print(f"warning: load average {info['load_average_at_start'][0]:.2f} at start; figures will be noisy",
              flush=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-workers-") as directory, ExitStack() as stack:
        work = Path(directory)
        grpc_ports, http_ports = start_contestants(stack, work, counts)
        print(f"contestants ready in {time.perf_counter() - started:.0f} s: {', '.join(grpc_ports)}", flush=True)
        rows = bench(config, work, {name: grpc_ports[name] for name in contestants(counts)}, counts, cores)
        check_charged(rows, http_ports, counts)
    total = time.perf_counter() - started
    load_at_end = os.getloadavg()
    print(f"\n{config.mode} run, {total:.0f} s; median and best of {config.rounds} x {config.seconds} s per contestant; "
          f"load average at end {load_at_end[0]:.2f}\n")
    print(markdown_table(rows))
    print(f"\n{generator_line(rows)}")
    write_results(args.json, {"machine": info, "config": asdict(config), "worker_counts": counts,
                              "total_seconds": total, "load_average_at_end": load_at_end,
                              "results": [asdict(row) for row in rows]})


if __name__ == "__main__":
    main()
