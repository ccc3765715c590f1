"""Wiring of the exporter's collectors, into the service's `Metrics` or the standalone exporter."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from pathlib import Path

from exporter.catalog import CatalogCollector
from exporter.quota import DEFAULT_TOP_N, QuotaCollector, ReadCounters
from ratelimit.cel import Expression
from ratelimit.counters import CounterStatus
from ratelimit.engine import RateLimiter
from ratelimit.metrics import Metrics
from ratelimit.sources.maas_naming import load_catalog

LISTING_PAGE = 250
"""Counters read per storage call during a scrape (about a millisecond of work); the event loop
(decisions) runs between pages."""


def engine_counters(engine: RateLimiter) -> ReadCounters:
    async def read_counters() -> Sequence[CounterStatus]:
        limits = engine.all_limits()
        statuses: list[CounterStatus] = []
        cursor: str | None = None
        while True:
            page = await engine.storage.get_counters_page(limits, cursor, LISTING_PAGE)
            statuses.extend(page.counters)
            cursor = page.next_cursor
            if cursor is None:
                return statuses
            await asyncio.sleep(0)

    return read_counters


def install_quota_metrics(
    metrics: Metrics, engine: RateLimiter, custom_labels: Mapping[str, Expression] | None = None,
    top_n: int = DEFAULT_TOP_N,
) -> QuotaCollector:
    """Quota gauges over every counter the engine's storage holds, refreshed before each scrape."""
    collector = QuotaCollector(engine_counters(engine), custom_labels, top_n)
    metrics.on_custom_labels(collector.set_custom_labels)  # a reloaded -L file labels the gauges too
    metrics.registry.register(collector)
    metrics.add_refresher(collector.refresh)
    return collector


def install_model_catalog(metrics: Metrics, paths: Sequence[str | Path]) -> CatalogCollector:
    """`ratelimit_model_info` from model CR / models files; raises CatalogError when one is invalid."""
    collector = CatalogCollector(load_catalog(paths))
    metrics.registry.register(collector)
    return collector
