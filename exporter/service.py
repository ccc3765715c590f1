"""Wiring of the exporter's collectors, into the service's `Metrics` or the standalone exporter."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from exporter.catalog import CatalogCollector
from exporter.quota import DEFAULT_TOP_N, QuotaCollector, ReadSummary
from ratelimit.cel import Expression
from ratelimit.engine import RateLimiter
from ratelimit.metrics import Metrics
from ratelimit.sources.maas_naming import load_catalog
from ratelimit.storage.summary import CounterSummary


def engine_summary(engine: RateLimiter) -> ReadSummary:
    async def read_summary(top_n: int, thresholds: Sequence[float]) -> CounterSummary:
        return await engine.storage.counter_summary(engine.all_limits(), top_n, thresholds)

    return read_summary


def install_quota_metrics(
    metrics: Metrics, engine: RateLimiter, custom_labels: Mapping[str, Expression] | None = None,
    top_n: int = DEFAULT_TOP_N,
) -> QuotaCollector:
    """Quota gauges over every counter the engine's storage holds, refreshed before each scrape."""
    collector = QuotaCollector(engine_summary(engine), custom_labels, top_n)
    metrics.on_custom_labels(collector.set_custom_labels)  # a reloaded -L file labels the gauges too
    metrics.registry.register(collector)
    metrics.add_refresher(collector.refresh)
    return collector


def install_model_catalog(metrics: Metrics, paths: Sequence[str | Path]) -> CatalogCollector:
    """`ratelimit_model_info` from model CR / models files; raises CatalogError when one is invalid."""
    collector = CatalogCollector(load_catalog(paths))
    metrics.registry.register(collector)
    return collector
