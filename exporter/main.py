"""`ratelimit-exporter`: quota gauges and the model catalog for every replica at once.

    ratelimit-exporter LIMITS_FILE redis redis://redis:6379 [-L labels.yaml] [--model-catalog FILE]

With Redis storage each replica's /metrics would report the same shared counters, and summing
them over replicas would count every counter once per replica; one exporter reading Redis
reports each counter once. The limits file is loaded once and never reloaded: configuring a
storage with changed limits deletes the removed limits' counters, which is the service's job.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import Any

import uvicorn
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest

from exporter.catalog import CatalogCollector
from exporter.quota import DEFAULT_TOP_N, QuotaCollector
from exporter.service import engine_summary
from ratelimit.engine import RateLimiter
from ratelimit.limits import LimitsError, load_limits_file
from ratelimit.metrics import MetricLabelsError, StorageHealth, load_custom_labels
from ratelimit.sources.maas_naming import CatalogError, load_catalog
from ratelimit.storage.base import Storage
from ratelimit.storage.memory import MemoryStorage
from ratelimit.storage.redis import RedisOptions, RedisStorage

Scope = MutableMapping[str, Any]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


DEFAULT_PORT = 8082


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("ratelimit-exporter", description=__doc__.split("\n\n")[0])
    parser.add_argument("limits_file", metavar="LIMITS_FILE")
    parser.add_argument("storage", nargs="*", metavar="STORAGE",
                        help="`redis URL` (the service's Redis); `memory` only serves the catalog")
    parser.add_argument("-B", "--host", default="0.0.0.0")
    # 8082: next to the service's 8080 (HTTP) and 8081 (gRPC), clear of Prometheus' own 9090.
    parser.add_argument("-P", "--port", type=int, default=DEFAULT_PORT, help=f"default {DEFAULT_PORT}")
    parser.add_argument("-L", "--custom-metric-labels", metavar="FILE")
    parser.add_argument("--model-catalog", metavar="FILE", action="append", default=[])
    parser.add_argument("--top-n", type=int, default=DEFAULT_TOP_N, help="counters with their own series")
    return parser


def build_storage(parser: argparse.ArgumentParser, words: Sequence[str]) -> Storage:
    match list(words):
        case [] | ["memory"]:
            return MemoryStorage()
        case ["redis" | "redis_cached", url]:
            # redis_cached writes back to the same keys, so reading them plainly is right for both.
            # Listing reads pages on connections of their own, each page within the listing timeout.
            return RedisStorage(RedisOptions(url))
    parser.error("storage must be `memory` or `redis URL`")


class ExporterApp:
    """A minimal ASGI app: GET /metrics refreshes the snapshot, then renders the registry."""

    def __init__(self, registry: CollectorRegistry, quota: QuotaCollector) -> None:
        self.registry = registry
        self.quota = quota

    async def __call__(self, scope: Scope, receive: Callable[[], Awaitable[Any]], send: Send) -> None:
        if scope["type"] != "http":
            return
        if scope["path"] != "/metrics":
            await self._answer(send, 404, b"not found\n", "text/plain")
            return
        await self.quota.refresh()
        await self._answer(send, 200, generate_latest(self.registry), CONTENT_TYPE_PLAIN_0_0_4)

    @staticmethod
    async def _answer(send: Send, status: int, body: bytes, content_type: str) -> None:
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", content_type.encode())]})
        await send({"type": "http.response.body", "body": body})


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        limits = load_limits_file(args.limits_file)
        labels = load_custom_labels(args.custom_metric_labels) if args.custom_metric_labels else {}
        catalog = load_catalog(args.model_catalog)
    except (LimitsError, MetricLabelsError, CatalogError) as exc:
        print(f"ratelimit-exporter: {exc}", file=sys.stderr)
        return 1
    engine = RateLimiter(build_storage(parser, args.storage), limits)
    registry = CollectorRegistry(auto_describe=False)
    quota = QuotaCollector(engine_summary(engine), labels, args.top_n)
    registry.register(quota)
    registry.register(CatalogCollector(catalog))
    registry.register(StorageHealth(engine.storage))  # datastore_listing_failures, datastore_partitioned
    server = uvicorn.Server(uvicorn.Config(ExporterApp(registry, quota), host=args.host, port=args.port,
                                           log_level="warning"))

    async def serve() -> None:
        try:
            await engine.storage.start()  # Redis: reachability probe (datastore_partitioned), start-up log
            await server.serve()
        finally:  # the Redis client belongs to this loop: close it here
            await engine.storage.close()

    asyncio.run(serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
