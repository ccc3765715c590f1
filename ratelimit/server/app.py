"""The service process: the HTTP API, the gRPC servers and the limits-file watcher on one event loop.

Everything shares one Service (engine, metrics, config status). SIGTERM / SIGINT stop every server
gracefully (in-flight requests finish); a second signal forces them down.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import socket
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, Protocol

import uvicorn
from fastapi import FastAPI

from ratelimit.engine import RateLimiter
from ratelimit.metrics import (
    Metrics,
    StorageHealth,
    TimedStorage,
    load_custom_labels,
    parse_default_labels,
)
from ratelimit.server.errors import ServerError
from ratelimit.server.ext_proc import MeterConfigError, load_meter_config
from ratelimit.server.grpc import GrpcServer
from ratelimit.server.guards import (
    DEFAULT_HEADER_TIMEOUT,
    MAX_REQUEST_HEAD_BYTES,
    default_max_connections,
    guarded_http_protocol,
    raise_file_limit,
)
from ratelimit.server.http import create_http_app
from ratelimit.server.state import Service, ServiceOptions
from ratelimit.server.tracing import DecisionTracing
from ratelimit.sources.limits_file import (
    DEFAULT_INTERVAL,
    LimitsFileWatcher,
    load_limits_file_contents,
)
from ratelimit.sources.maas import limits_from_files
from ratelimit.sources.metric_labels import load_custom_labels_contents
from ratelimit.sources.parser_process import ParserProcess
from ratelimit.sources.status import ConfigStatus
from ratelimit.storage.base import Storage
from ratelimit.storage.failure import FailureMode, OnStorageError
from ratelimit.storage.memory import DEFAULT_CAPACITY, MemoryStorage
from ratelimit.storage.redis import DEFAULT_TIMEOUT, RedisOptions, RedisStorage
from ratelimit.storage.redis_cached import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_FLUSH_PERIOD,
    DEFAULT_MAX_CACHED,
    CachedRedisStorage,
)
from ratelimit.storage.table import CounterTable

logger = logging.getLogger(__name__)

STORAGES = ("memory", "redis", "redis_cached")
"""Storages run_service can build; the CLI recognises more words and refuses them."""

RATE_LIMIT_HEADER_MODES = ("NONE", "DRAFT_VERSION_03")

# uvicorn waits this long for in-flight requests after SIGTERM (Kubernetes grants 30 s by default).
GRACEFUL_SHUTDOWN_SECONDS = 10


@dataclass(frozen=True)
class ServiceConfig:
    """Everything `ratelimit serve` was told, after command line and environment were merged."""

    limits_file: str
    maas: bool = False
    """`limits_file` is a directory (or file) of MaaS custom resources to translate (`--maas DIR`)."""
    http_ip: str = "0.0.0.0"
    http_port: int = 8080
    rls_ip: str = "0.0.0.0"
    """gRPC (Envoy RLS v3, Kuadrant RLS v1, health) address."""
    rls_port: int = 8081
    grpc_reflection: bool = False
    """Register gRPC server reflection (`--grpc-reflection-service`)."""
    storage: str = "memory"
    cache_size: int | None = None
    """Memory storage capacity in counters (`memory -c N`); None means the storage's default."""
    storage_url: str | None = None
    """`redis URL` / `redis_cached URL`."""
    on_storage_error: OnStorageError = "closed"
    """What a decision answers when the storage cannot: closed (503 / UNAVAILABLE) or open (admitted)."""
    response_timeout: float = DEFAULT_TIMEOUT
    """Seconds a decision may wait for Redis."""
    batch_size: int = DEFAULT_BATCH_SIZE
    flush_period: float = DEFAULT_FLUSH_PERIOD
    """redis_cached: seconds between write-backs."""
    max_cached: int = DEFAULT_MAX_CACHED
    rate_limit_headers: str = "NONE"
    limit_name_in_labels: bool = False
    custom_metric_labels: str | None = None
    """`-L FILE`: YAML map of metric label -> CEL expression over `descriptors` (Limitador's option),
    hot-reloaded like the limits file."""
    metric_labels_default: str | None = None
    """`--metric-labels-default EXPR`: CEL giving a map of labels for every call series."""
    metrics_total_suffix: bool = False
    """Name counters `<name>_total` (OpenMetrics style) instead of Limitador's bare names."""
    quota_metrics: bool = False
    """Serve the exporter's quota gauges on /metrics."""
    model_catalog: tuple[str, ...] = ()
    """Model CR / models files for `ratelimit_model_info`."""
    api_token: str | None = None
    openai_errors: bool = False
    """`--openai-errors`: OVER_LIMIT answers carry an OpenAI-shaped error body and Retry-After."""
    ext_proc_config: str | None = None
    """`--ext-proc-config FILE`: how the ext_proc token meter maps requests to limits (server/ext_proc.py)."""
    log_level: str = "error"
    """One of ratelimit.logs.LEVELS: off, error, warning, info, debug, trace."""
    structured_logs: bool = False
    """JSON lines (`--structured-logs`)."""
    tracing_endpoint: str = ""
    """OTLP/gRPC collector for a span per decision (`--tracing-endpoint`); empty: no tracing."""
    reload_interval: float = DEFAULT_INTERVAL
    http_max_connections: int | None = None
    """Open HTTP connections allowed; None: what the open-file limit leaves (at most 10,000)."""
    http_header_timeout: float = DEFAULT_HEADER_TIMEOUT
    """Seconds a client may take to send a request head."""
    workers: int = 1
    """Processes serving the same ports and one shared memory table (`--workers`; ratelimit.server.workers)."""
    reuse_port: bool = False
    """Bind with SO_REUSEPORT (set for each worker by the supervisor)."""
    shared_table: str | None = None
    """The memory storage's shared table to attach to (set for each worker by the supervisor)."""
    metrics_dir: str | None = None
    """prometheus_client's multiprocess directory every worker writes its metric values to, so a
    scrape of any worker sums them all (set by the supervisor, with PROMETHEUS_MULTIPROC_DIR)."""


class ManagedServer(Protocol):
    """What run_service needs from each server it runs side by side."""

    name: str

    async def serve(self) -> None:
        """Serve until stop() is called; raise ServerError when it cannot start."""

    def stop(self, force: bool = False) -> None:
        """Begin a graceful shutdown (or an immediate one when forced); serve() then returns."""


class _EmbeddedUvicorn(uvicorn.Server):
    """uvicorn normally takes over SIGINT/SIGTERM and re-raises the signal after it stops, which would
    kill the other servers on this loop mid-shutdown. run_service owns the signals instead."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class HttpServer:
    name = "HTTP API"

    def __init__(
        self, app: FastAPI | Any, host: str, port: int, max_connections: int,
        header_timeout: float = DEFAULT_HEADER_TIMEOUT, reuse_port: bool = False,
    ) -> None:
        self.address = f"{host}:{port}"
        self._socket: socket.socket | None = None
        if reuse_port:
            # Workers share the port; the kernel spreads new connections over them.
            self._socket = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
            self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            try:
                self._socket.bind((host, port))
            except OSError as exc:
                raise ServerError(f"{self.name} could not start on {self.address}: {exc.strerror}") from None
        # No log config and no level of uvicorn's own: its loggers go through ratelimit.logs.
        config = uvicorn.Config(
            app, host=host, port=port, log_config=None, log_level=None,
            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
            http=guarded_http_protocol(max_connections, header_timeout),
            h11_max_incomplete_event_size=MAX_REQUEST_HEAD_BYTES,
        )
        self._server = _EmbeddedUvicorn(config)

    async def serve(self) -> None:
        try:
            await self._server.serve(sockets=[self._socket] if self._socket is not None else None)
        except SystemExit:
            # uvicorn calls sys.exit(1) when it cannot bind; that must not unwind the shared loop.
            raise ServerError(f"{self.name} could not start on {self.address} (see the log above)") from None

    def stop(self, force: bool = False) -> None:
        self._server.should_exit = True
        self._server.force_exit = force


def build_service(
    config: ServiceConfig, parser: ParserProcess | None = None
) -> tuple[Service, LimitsFileWatcher]:
    """The shared Service with the limits file loaded, and the watcher that keeps it loaded
    (parsing reloads in `parser`, or in a parser process of its own).

    Raises LimitsError when the file is invalid: at startup there are no old limits to keep.
    """
    if config.storage not in STORAGES:
        raise ValueError(f"storage {config.storage!r} is not supported yet; supported: {', '.join(STORAGES)}")
    if config.rate_limit_headers not in RATE_LIMIT_HEADER_MODES:
        raise ValueError(f"rate limit headers must be one of {', '.join(RATE_LIMIT_HEADER_MODES)}")
    engine = RateLimiter(build_storage(config))
    status = ConfigStatus(source=config.limits_file)
    loader = limits_from_files if config.maas else load_limits_file_contents
    watcher = LimitsFileWatcher(config.limits_file, engine, status, config.reload_interval, loader, parser=parser)
    watcher.load()
    options = ServiceOptions(
        rate_limit_headers=config.rate_limit_headers == "DRAFT_VERSION_03",
        api_token=config.api_token,
        openai_errors=config.openai_errors,
    )
    metrics = build_metrics(config, engine)
    health = StorageHealth(engine.storage, shared=config.metrics_dir is not None)
    metrics.registry.register(health)
    metrics.add_publisher(health.publish)
    if isinstance(engine.storage, TimedStorage):
        metrics.registry.register(engine.storage.latency)
    return Service(engine=engine, metrics=metrics, status=status, options=options), watcher


class _CustomLabelsTarget:
    """Where a reloaded `-L` file goes: the metrics' custom labels."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def configure_with(self, labels: dict[str, Any]) -> None:
        self.metrics.set_custom_labels(labels)


def custom_labels_watcher(
    path: str, metrics: Metrics, interval: float, parser: ParserProcess | None = None
) -> LimitsFileWatcher:
    """Limitador reloads the `-L` file like the limits file; a bad version keeps the labels in use
    and is logged (the file's own status is not in /status, which is the limits file's)."""
    watcher = LimitsFileWatcher(
        path, _CustomLabelsTarget(metrics), ConfigStatus(source=path), interval, load_custom_labels_contents,
        what="custom metric labels", parser=parser,
    )
    watcher.load()  # what build_metrics loaded: the watcher starts from that content
    return watcher


METRICS_EXTENSIONS = "ratelimit.metrics_extensions"
"""The entry-point group of the collectors other packages add to the service's /metrics: the
exporter's quota gauges (`quota_metrics`) and model catalog (`model_catalog`), declared in
pyproject.toml. ratelimit finds them by name and never imports the exporter; the exporter imports
ratelimit."""


class MetricsExtension(Protocol):
    """An entry point of METRICS_EXTENSIONS: registers its collectors on the service's metrics, at start."""

    def __call__(self, metrics: Metrics, engine: RateLimiter, config: ServiceConfig) -> None: ...


def metrics_extension(name: str, option: str) -> MetricsExtension:
    """The installed extension `name`, which `option` asks for; ServerError when none is installed."""
    found = entry_points(group=METRICS_EXTENSIONS, name=name)
    if not found:
        raise ServerError(
            f"cannot start: {option} needs the {METRICS_EXTENSIONS} entry point {name!r} (the exporter package),"
            " which is not installed; reinstall the package (pip install .) so that its entry points are registered"
        )
    extension: MetricsExtension = next(iter(found)).load()
    return extension


def build_metrics(config: ServiceConfig, engine: RateLimiter) -> Metrics:
    """Raises MetricLabelsError / CatalogError (ValueErrors) when a metrics file is invalid, and
    ServerError when an option's metrics extension is not installed."""
    custom_labels = load_custom_labels(config.custom_metric_labels) if config.custom_metric_labels else {}
    default_labels = parse_default_labels(config.metric_labels_default) if config.metric_labels_default else None
    metrics = Metrics(
        limit_name_in_labels=config.limit_name_in_labels, custom_labels=custom_labels,
        default_labels=default_labels, total_suffix=config.metrics_total_suffix,
        limits_of=lambda namespace, descriptors: list(engine.counters_for(namespace, descriptors).limits),
        multiprocess_dir=config.metrics_dir,
    )
    if config.quota_metrics:
        metrics_extension("quota_metrics", "--quota-metrics")(metrics, engine, config)
    if config.model_catalog:
        metrics_extension("model_catalog", "--model-catalog")(metrics, engine, config)
    return metrics


def build_storage(config: ServiceConfig) -> Storage:
    if config.storage == "memory":
        if config.shared_table is not None:
            return MemoryStorage(table=CounterTable.attach(config.shared_table))
        return MemoryStorage(capacity=config.cache_size or DEFAULT_CAPACITY)
    assert config.storage_url is not None
    redis = RedisOptions(config.storage_url, config.response_timeout)
    storage: Storage
    if config.storage == "redis":
        storage = RedisStorage(redis)
    else:
        storage = CachedRedisStorage(
            redis, batch_size=config.batch_size, flush_period=config.flush_period, max_cached=config.max_cached,
        )
    # Timed outside FailureMode: a decision answered open after a Redis timeout took that long too.
    return TimedStorage(FailureMode(storage, config.on_storage_error))


def build_servers(
    service: Service, config: ServiceConfig, tracing: DecisionTracing | None = None
) -> list[ManagedServer]:
    """The HTTP and gRPC servers; with `tracing`, each decision runs in a span (and only then is
    the tracing middleware / interceptor there at all)."""
    try:
        meter_config = load_meter_config(config.ext_proc_config)
    except MeterConfigError as error:
        raise ServerError(f"cannot start the ext_proc token meter: {error}") from None
    max_connections = config.http_max_connections or default_max_connections(raise_file_limit())
    http_app: Any = create_http_app(service)
    interceptors = []
    if tracing is not None:
        http_app = tracing.http_middleware(http_app)
        interceptors.append(tracing.grpc_interceptor())
    servers: list[ManagedServer] = [
        HttpServer(http_app, config.http_ip, config.http_port, max_connections, config.http_header_timeout,
                   config.reuse_port),
        GrpcServer(service, config.rls_ip, config.rls_port, config.grpc_reflection, GRACEFUL_SHUTDOWN_SECONDS,
                   meter_config=meter_config, interceptors=interceptors, reuse_port=config.reuse_port),
    ]
    return servers


# While another thread of the process (the watcher's stat and read, the tracing exporter) holds the
# GIL, the event loop waits up to the switch interval (5 ms by default) for it: 1 ms keeps decisions
# within a millisecond of their own time. The extra switches only happen while such a thread runs.
GIL_SWITCH_INTERVAL = 0.001


async def run_service(config: ServiceConfig) -> None:
    """Load the limits, then serve until SIGTERM / SIGINT. Raises LimitsError or ServerError."""
    sys.setswitchinterval(GIL_SWITCH_INTERVAL)
    parser = ParserProcess()  # one child parses the reloads of every watched file
    service, watcher = build_service(config, parser)
    watchers = [watcher]
    if config.custom_metric_labels:
        watchers.append(
            custom_labels_watcher(config.custom_metric_labels, service.metrics, config.reload_interval, parser)
        )
    tracing = DecisionTracing(config.tracing_endpoint) if config.tracing_endpoint else None
    try:
        servers = build_servers(service, config, tracing)
        logger.info(
            "serving %d limits from %s with %s storage; HTTP on %s:%d, gRPC on %s:%d%s",
            len(service.engine.all_limits()), config.limits_file, config.storage, config.http_ip, config.http_port,
            config.rls_ip, config.rls_port, f"; spans to {config.tracing_endpoint}" if tracing else "",
        )
        # Background work of the storage (Redis: its reachability probe); never waits for Redis.
        await service.engine.storage.start()
        _freeze_startup_objects()
        async with contextlib.AsyncExitStack() as running:
            running.push_async_callback(parser.stop)  # after the watchers (the stack unwinds in reverse)
            for watcher in watchers:
                await running.enter_async_context(watcher)
            if config.metrics_dir is not None:
                publishing = asyncio.create_task(_publish_metrics(service.metrics), name="metrics publisher")
                running.callback(publishing.cancel)
            await serve_until_signalled(servers)
    finally:
        await service.engine.storage.close()
        if tracing is not None:
            await asyncio.to_thread(tracing.shutdown)


METRICS_PUBLISH_INTERVAL = 1.0
"""Seconds between writes of a worker's pull-only values (storage health) to the multiprocess files:
how stale another worker's `datastore_*` values can be in a scrape. Call counts are written at once."""


async def _publish_metrics(metrics: Metrics) -> None:
    while True:
        await asyncio.sleep(METRICS_PUBLISH_INTERVAL)
        try:
            metrics.publish()
        except Exception:  # a full disk must not stop the service; the next round tries again
            logger.exception("could not write this worker's metrics to %s", metrics.multiprocess_dir)


FULL_COLLECTION_THRESHOLD = 100
"""Young (generation 1) collections between two full ones; CPython's default is 10."""


def _freeze_startup_objects() -> None:
    """Move everything alive after start-up (modules, classes, the loaded limits: ~140k objects) out
    of reach of Python's cyclic garbage collector, and make its full collections rarer.

    A full collection walks every tracked object while holding the interpreter lock, and anything
    that allocates (a /counters walk, a reload) sets one off now and then: 60-90 ms without a
    decision over the start-up objects, which live as long as the process anyway. What is created
    later is collected as usual, but once the start-up objects are frozen CPython's other guard
    (a full collection only when the objects that reached the oldest generation grew by a quarter)
    no longer holds them back: a reload of 2,000 limits or a filling memo set off a full
    collection every few hundred milliseconds, each 15-45 ms over the new limits (~30k objects)
    and the memo. At 100 young collections apart instead of 10, cyclic garbage that outlives two
    young collections (about 20 objects per generation-1 collection in the stall benchmark) waits
    longer to be freed: well under a megabyte."""
    gc.collect()
    gc.freeze()
    first, second, _ = gc.get_threshold()
    gc.set_threshold(first, second, FULL_COLLECTION_THRESHOLD)


async def serve_until_signalled(servers: Sequence[ManagedServer]) -> None:
    """Run the servers together until a signal arrives or one of them stops, then stop them all."""
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()

    def on_signal(signum: int) -> None:
        force = stop_requested.is_set()  # a second signal: do not wait for in-flight requests
        logger.warning("%s received, %s", signal.Signals(signum).name, "forcing shutdown" if force else "shutting down")
        stop_requested.set()
        for server in servers:
            server.stop(force=force)

    handled = (signal.SIGTERM, signal.SIGINT)
    for signum in handled:
        loop.add_signal_handler(signum, on_signal, signum)
    tasks = [asyncio.create_task(server.serve(), name=server.name) for server in servers]
    try:
        # Whichever comes first: a signal (handled above), or a server ending on its own (failed to
        # start, crashed): the service is only useful with all of its servers up.
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for server in servers:
            server.stop()
        results = await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        for task in tasks:
            task.cancel()
        for signum in handled:
            loop.remove_signal_handler(signum)
    errors = [result for result in results if isinstance(result, BaseException)]
    if errors:
        raise errors[0]
