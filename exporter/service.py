"""Wiring of the exporter's collectors, into the service's `Metrics` or the standalone exporter."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from exporter.catalog import CatalogCollector, load_catalog
from exporter.quota import DEFAULT_TOP_N, QuotaCollector, ReadCounters
from ratelimit.cel import Expression
from ratelimit.counters import CounterStatus
from ratelimit.engine import RateLimiter
from ratelimit.metrics import Metrics


def engine_counters(engine: RateLimiter) -> ReadCounters:
    async def read_counters() -> Sequence[CounterStatus]:
        # One call for all limits: the storage reads its table (or Redis index) once.
        return await engine.storage.get_counters(engine.all_limits())

    return read_counters


def install_quota_metrics(
    metrics: Metrics, engine: RateLimiter, custom_labels: Mapping[str, Expression] | None = None,
    top_n: int = DEFAULT_TOP_N,
) -> QuotaCollector:
    """Quota gauges over every counter the engine's storage holds, refreshed before each scrape."""
    collector = QuotaCollector(engine_counters(engine), custom_labels, top_n)
    metrics.registry.register(collector)
    metrics.add_refresher(collector.refresh)
    return collector


def install_model_catalog(metrics: Metrics, paths: Sequence[str | Path]) -> CatalogCollector:
    """`ratelimit_model_info` from model CR / models files; raises CatalogError when one is invalid."""
    collector = CatalogCollector(load_catalog(paths))
    metrics.registry.register(collector)
    return collector
