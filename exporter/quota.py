"""Quota gauges: limit, used, remaining, used / limit and seconds to reset per counter (Limitador issue 447).

A counter exists per (limit, variable values), i.e. per user and subscription window, so one
series per counter can run into the hundreds of thousands. Only the `top_n` counters by use get
their own series; the rest of each (namespace, limit) are summed into one series whose `counter`
label is `OTHER`, so totals stay right. Every family is a gauge: a snapshot of now, which goes down
when windows reset (a histogram's counts must only grow). `ratelimit_quota_counters_at_or_above`
counts every counter, capped or not, by how much of its limit it used.

Custom labels whose CEL expression is one of a limit's variables (`user: descriptors[0]['user']`
next to a per-user limit) are set to that counter's value, so quota series join the call series.
"""

from __future__ import annotations

import heapq
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from prometheus_client.core import Metric

from ratelimit.cel import Expression
from ratelimit.counters import CounterStatus, StorageError

logger = logging.getLogger(__name__)

NAMESPACE_LABEL = "limitador_namespace"
OTHER = "__other__"
DEFAULT_TOP_N = 500
# used / limit; 1 is "exhausted" (overshoot by unconditional reports counts there too).
UTILISATION_THRESHOLDS = (0.5, 0.75, 0.9, 1.0)

ReadCounters = Callable[[], Awaitable[Sequence[CounterStatus]]]


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

    @property
    def utilisation(self) -> float:
        return _utilisation(self.used, self.limit)


class QuotaCollector:
    """A prometheus_client collector over a snapshot taken by `refresh` (async: storages are)."""

    def __init__(self, read_counters: ReadCounters, custom_labels: Mapping[str, Expression] | None = None,
                 top_n: int = DEFAULT_TOP_N) -> None:
        self._read = read_counters
        self._custom = dict(sorted((custom_labels or {}).items()))
        self.top_n = top_n
        self._statuses: Sequence[CounterStatus] = ()
        self.listing_ok = True
        """Whether the last refresh read the counters (`ratelimit_quota_listing_ok`)."""
        self.failed_listings = 0

    def set_custom_labels(self, custom_labels: Mapping[str, Expression]) -> None:
        self._custom = dict(sorted(custom_labels.items()))

    async def refresh(self) -> None:
        try:
            self._statuses = await self._read()
        except StorageError as exc:
            # The call series must still be scraped while Redis is away; stale quota would mislead,
            # so no quota series, and ratelimit_quota_listing_ok 0 says why (not "no counters").
            self.failed_listings += 1
            if self.listing_ok:
                logger.error("quota metrics: cannot read counters (ratelimit_quota_listing_ok is 0 until "
                             "they can be read again): %s", exc)
            self.listing_ok = False
            self._statuses = ()
            return
        if not self.listing_ok:
            logger.error("quota metrics: counters read again, after %d failed listings", self.failed_listings)
        self.listing_ok = True

    def describe(self) -> list[Metric]:
        return []  # the families depend on the snapshot; nothing to reserve up front

    def collect(self) -> list[Metric]:
        label_names = (NAMESPACE_LABEL, "limit_name", "window_seconds", "counter", *self._custom)
        families = {
            "limit": Metric("ratelimit_quota_limit", "Counter's max_value in its window", "gauge"),
            "used": Metric("ratelimit_quota_used", "Hits charged in the current window (reserved included)", "gauge"),
            "remaining": Metric("ratelimit_quota_remaining", "Budget left, clamped to [0, limit]", "gauge"),
            "reset": Metric("ratelimit_quota_reset_seconds", "Seconds until the window resets", "gauge"),
            "utilisation": Metric("ratelimit_quota_utilisation", "used / limit (1 is exhausted)", "gauge"),
        }
        listing_ok = Metric("ratelimit_quota_listing_ok", "1 when the last scrape could read the counters", "gauge")
        listing_ok.add_sample(listing_ok.name, {}, 1 if self.listing_ok else 0)
        counts = Metric("ratelimit_quota_counters", "Live counters per limit (before the top-N cap)", "gauge")
        for row in self._rows():
            labels = dict(zip(label_names, (row.namespace, row.limit_name, row.window, row.counter, *row.labels)))
            labels = {name: value for name, value in labels.items() if value != ""}
            for key, family in families.items():
                family.add_sample(family.name, labels, getattr(row, key))
        for (namespace, name, window), number in self._counter_counts().items():
            counts.add_sample(counts.name, {NAMESPACE_LABEL: namespace, "limit_name": name,
                                            "window_seconds": window}, number)
        return [listing_ok, *families.values(), counts, self._at_or_above()]

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

    def _at_or_above(self) -> Metric:
        """Per limit, how many of its counters (all of them, not only the top N) used at least
        each threshold of their limit."""
        family = Metric("ratelimit_quota_counters_at_or_above",
                        "Live counters whose used / limit is at least `threshold`", "gauge")
        by_limit: dict[tuple[str, str, str], list[CounterStatus]] = {}
        for status in self._statuses:
            by_limit.setdefault(_limit_key(status), []).append(status)
        thresholds = np.array(UTILISATION_THRESHOLDS, dtype=np.float64)
        for (namespace, name, window), group in sorted(by_limit.items()):
            ratios = np.array([_utilisation(self._used(s), s.limit.max_value) for s in group], dtype=np.float64)
            reached = np.count_nonzero(ratios[:, np.newaxis] >= thresholds, axis=0)
            for threshold, number in zip(UTILISATION_THRESHOLDS, reached):
                family.add_sample(family.name, {NAMESPACE_LABEL: namespace, "limit_name": name, "window_seconds": window,
                                                "threshold": repr(threshold)}, int(number))
        return family


def _utilisation(used: int, limit: int) -> float:
    # A limit of 0 admits nothing: its counters are exhausted from the start.
    return used / limit if limit > 0 else 1.0


def _limit_key(status: CounterStatus) -> tuple[str, str, str]:
    limit = status.limit
    return limit.namespace, limit.name or "", str(limit.seconds)


def _normalise(source: str) -> str:
    """`descriptors[0]['user']`, `descriptors[0]["user"]` and `descriptors[0].user` are one variable."""
    text = "".join(source.split()).replace('"', "'")
    return text.replace("['", ".").replace("']", "")
