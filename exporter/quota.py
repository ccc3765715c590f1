"""Quota gauges: limit, used, remaining and seconds to reset per counter (Limitador issue 447).

A counter exists per (limit, variable values), i.e. per user and subscription window, so one
series per counter can run into the hundreds of thousands. Only the `top_n` counters by use get
their own series; the rest of each (namespace, limit) are summed into one series whose `counter`
label is `OTHER`, so totals stay right. The utilisation histogram covers every counter.

Custom labels whose CEL expression is one of a limit's variables (`user: descriptors[0]['user']`
next to a per-user limit) are set to that counter's value, so quota series join the call series.
"""

from __future__ import annotations

import heapq
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass

import numba
import numpy as np
from prometheus_client.core import HistogramMetricFamily, Metric

from ratelimit.cel import Expression
from ratelimit.counters import CounterStatus, StorageError

logger = logging.getLogger(__name__)

NAMESPACE_LABEL = "limitador_namespace"
OTHER = "__other__"
DEFAULT_TOP_N = 500
# used / limit; 1 is "exhausted", and overshoot past the limit lands in +Inf.
UTILISATION_BUCKETS = (0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 1.0)

ReadCounters = Callable[[], Awaitable[Sequence[CounterStatus]]]


@numba.njit(cache=True)
def _bucket_counts(used: np.ndarray, limits: np.ndarray, bounds: np.ndarray) -> tuple[np.ndarray, float]:
    """Cumulative counts of used/limit per bucket bound (+Inf last), and the sum of the ratios."""
    counts = np.zeros(bounds.shape[0] + 1, dtype=np.int64)
    total = 0.0
    for i in range(used.shape[0]):
        ratio = used[i] / limits[i] if limits[i] > 0 else 1.0
        total += ratio
        for b in range(bounds.shape[0]):
            if ratio <= bounds[b]:
                counts[b] += 1
        counts[bounds.shape[0]] += 1
    return counts, total


@dataclass(frozen=True)
class _Row:
    namespace: str
    limit_name: str
    window: str
    counter: str
    labels: tuple[str, ...]
    limit: int
    used: int
    remaining: int
    reset: float


class QuotaCollector:
    """A prometheus_client collector over a snapshot taken by `refresh` (async: storages are)."""

    def __init__(self, read_counters: ReadCounters, custom_labels: Mapping[str, Expression] | None = None,
                 top_n: int = DEFAULT_TOP_N) -> None:
        self._read = read_counters
        self._custom = dict(sorted((custom_labels or {}).items()))
        self.top_n = top_n
        self._statuses: Sequence[CounterStatus] = ()

    async def refresh(self) -> None:
        try:
            self._statuses = await self._read()
        except StorageError as exc:
            # The call series must still be scraped while Redis is away; stale quota would mislead.
            logger.warning("quota metrics: cannot read counters: %s", exc)
            self._statuses = ()

    def describe(self) -> list[Metric]:
        return []  # the families depend on the snapshot; nothing to reserve up front

    def collect(self) -> list[Metric]:
        label_names = (NAMESPACE_LABEL, "limit_name", "window_seconds", "counter", *self._custom)
        families = {
            "limit": Metric("ratelimit_quota_limit", "Counter's max_value in its window", "gauge"),
            "used": Metric("ratelimit_quota_used", "Hits charged in the current window (reserved included)", "gauge"),
            "remaining": Metric("ratelimit_quota_remaining", "Budget left, clamped to [0, limit]", "gauge"),
            "reset": Metric("ratelimit_quota_reset_seconds", "Seconds until the window resets", "gauge"),
        }
        counts = Metric("ratelimit_quota_counters", "Live counters per limit (before the top-N cap)", "gauge")
        for row in self._rows():
            labels = dict(zip(label_names, (row.namespace, row.limit_name, row.window, row.counter, *row.labels)))
            labels = {name: value for name, value in labels.items() if value != ""}
            for key, family in families.items():
                family.add_sample(family.name, labels, getattr(row, key))
        for (namespace, name, window), number in self._counter_counts().items():
            counts.add_sample(counts.name, {NAMESPACE_LABEL: namespace, "limit_name": name,
                                            "window_seconds": window}, number)
        return [*families.values(), counts, *self._histograms()]

    def _rows(self) -> list[_Row]:
        """The top_n busiest counters, then one summed row per (namespace, limit) for the rest."""
        busiest = heapq.nlargest(self.top_n, range(len(self._statuses)),
                                 key=lambda i: self._used(self._statuses[i]))
        chosen = set(busiest)
        rows = [self._row(self._statuses[i]) for i in busiest]
        others: dict[tuple[str, str, str], list[CounterStatus]] = {}
        for i, status in enumerate(self._statuses):
            if i not in chosen:
                others.setdefault(_limit_key(status), []).append(status)
        for (namespace, name, window), group in others.items():
            rows.append(_Row(
                namespace, name, window, OTHER, ("",) * len(self._custom),
                limit=sum(s.limit.max_value for s in group), used=sum(self._used(s) for s in group),
                remaining=sum(s.remaining for s in group), reset=min(s.expires_in for s in group),
            ))
        return rows

    def _row(self, status: CounterStatus) -> _Row:
        namespace, name, window = _limit_key(status)
        return _Row(namespace, name, window, status.counter.qualifier(), self._custom_values(status),
                    limit=status.limit.max_value, used=self._used(status), remaining=status.remaining,
                    reset=status.expires_in)

    @staticmethod
    def _used(status: CounterStatus) -> int:
        # What admission counts against the limit, so used + remaining == limit until overshoot.
        return status.value + status.reserved

    def _custom_values(self, status: CounterStatus) -> tuple[str, ...]:
        by_source = {_normalise(source): value for source, value in status.counter.set_variables.items()}
        return tuple(by_source.get(_normalise(expr.source), "") for expr in self._custom.values())

    def _counter_counts(self) -> dict[tuple[str, str, str], int]:
        counts: dict[tuple[str, str, str], int] = {}
        for status in self._statuses:
            key = _limit_key(status)
            counts[key] = counts.get(key, 0) + 1
        return counts

    def _histograms(self) -> list[Metric]:
        """A snapshot (not a running count) of used/limit across every counter, per namespace."""
        family = HistogramMetricFamily("ratelimit_quota_utilisation", "Counters by used/limit, now",
                                       labels=[NAMESPACE_LABEL])
        by_namespace: dict[str, list[CounterStatus]] = {}
        for status in self._statuses:
            by_namespace.setdefault(status.limit.namespace, []).append(status)
        bounds = np.array(UTILISATION_BUCKETS, dtype=np.float64)
        for namespace, group in sorted(by_namespace.items()):
            used = np.array([self._used(s) for s in group], dtype=np.float64)
            limits = np.array([s.limit.max_value for s in group], dtype=np.float64)
            counts, total = _bucket_counts(used, limits, bounds)
            buckets = [(_bound(b), int(c)) for b, c in zip((*UTILISATION_BUCKETS, float("inf")), counts)]
            family.add_metric([namespace], buckets, total)
        return [family]


def _limit_key(status: CounterStatus) -> tuple[str, str, str]:
    limit = status.limit
    return limit.namespace, limit.name or "", str(limit.seconds)


def _normalise(source: str) -> str:
    """`descriptors[0]['user']`, `descriptors[0]["user"]` and `descriptors[0].user` are one variable."""
    text = "".join(source.split()).replace('"', "'")
    return text.replace("['", ".").replace("']", "")


def _bound(value: float) -> str:
    return "+Inf" if value == float("inf") else repr(value)
