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

import logging
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from prometheus_client.core import Metric

from ratelimit.cel import Expression
from ratelimit.counters import CounterStatus, StorageError
from ratelimit.limits import Limit
from ratelimit.pacing import Pace
from ratelimit.storage.summary import CounterSummary, LimitSummary, used, utilisation

logger = logging.getLogger(__name__)

NAMESPACE_LABEL = "limitador_namespace"
OTHER = "__other__"
DEFAULT_TOP_N = 500
# used / limit; 1 is "exhausted" (overshoot by unconditional reports counts there too).
UTILISATION_THRESHOLDS = (0.5, 0.75, 0.9, 1.0)

ReadSummary = Callable[[int, Sequence[float]], Awaitable[CounterSummary]]
"""(top_n, thresholds) -> the summary of every counter (Storage.counter_summary)."""


_Groups = dict[tuple[str, str, str], list[LimitSummary]]
"""Summaries of the limits of one (namespace, limit name, window): one set of series."""


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
        return utilisation(self.used, self.limit)


class QuotaCollector:
    """A prometheus_client collector over a summary taken by `refresh` (async: storages are)."""

    def __init__(self, read_summary: ReadSummary, custom_labels: Mapping[str, Expression] | None = None,
                 top_n: int = DEFAULT_TOP_N) -> None:
        self._read = read_summary
        self._custom = dict(sorted((custom_labels or {}).items()))
        self.top_n = top_n
        self._families: list[Metric] = []
        self.listing_ok = True
        """Whether the last refresh read the counters (`ratelimit_quota_listing_ok`)."""
        self.failed_listings = 0

    def set_custom_labels(self, custom_labels: Mapping[str, Expression]) -> None:
        self._custom = dict(sorted(custom_labels.items()))

    async def refresh(self) -> None:
        """Read the summary and build the families `collect` hands out, in paced slices
        (ratelimit.pacing): the series of 500 counters are ~8 ms of Python, which in one go (at
        collect) held every decision that long."""
        try:
            summary = await self._read(self.top_n, UTILISATION_THRESHOLDS)
        except StorageError as exc:
            # The call series must still be scraped while Redis is away; stale quota would mislead,
            # so no quota series, and ratelimit_quota_listing_ok 0 says why (not "no counters").
            self.failed_listings += 1
            if self.listing_ok:
                logger.error("quota metrics: cannot read counters (ratelimit_quota_listing_ok is 0 until "
                             "they can be read again): %s", exc)
            self.listing_ok = False
            self._families = await self._families_of(CounterSummary([], {}))
            return
        if not self.listing_ok:
            logger.error("quota metrics: counters read again, after %d failed listings", self.failed_listings)
        self.listing_ok = True
        self._families = await self._families_of(summary)

    def describe(self) -> list[Metric]:
        return []  # the families depend on the snapshot; nothing to reserve up front

    def collect(self) -> list[Metric]:
        """The families of the last refresh (none before the first)."""
        return self._families

    async def _families_of(self, summary: CounterSummary) -> list[Metric]:
        pace = Pace()
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
        groups = _by_limit_key(summary)
        for row in self._rows(summary, groups):
            labels = dict(zip(label_names, (row.namespace, row.limit_name, row.window, row.counter, *row.labels)))
            labels = {name: value for name, value in labels.items() if value != ""}
            for key, family in families.items():
                family.add_sample(family.name, labels, getattr(row, key))
            if pace.worked_a_slice():
                await pace.rest()
        for (namespace, name, window), group in groups.items():
            counts.add_sample(counts.name, {NAMESPACE_LABEL: namespace, "limit_name": name,
                                            "window_seconds": window}, sum(s.counters for s in group))
        return [listing_ok, *families.values(), counts, _at_or_above(groups)]

    def _rows(self, summary: CounterSummary, groups: _Groups) -> Iterator[_Row]:
        """The top_n busiest counters, then one summed row per (namespace, limit) for the rest."""
        for status in summary.busiest:
            yield self._row(status)
        for (namespace, name, window), group in groups.items():
            rest = [limit_summary for limit_summary in group if limit_summary.others]
            if rest:
                yield _Row(
                    namespace, name, window, OTHER, ("",) * len(self._custom),
                    limit=sum(s.others_max_value for s in rest), used=sum(s.others_used for s in rest),
                    remaining=sum(s.others_remaining for s in rest), reset=min(s.others_reset for s in rest),
                )

    def _row(self, status: CounterStatus) -> _Row:
        namespace, name, window = _limit_key(status.limit)
        return _Row(namespace, name, window, status.counter.qualifier(), self._custom_values(status),
                    limit=status.limit.max_value, used=used(status), remaining=status.remaining,
                    reset=status.expires_in)

    def _custom_values(self, status: CounterStatus) -> tuple[str, ...]:
        by_source = {_normalise(source): value for source, value in status.counter.set_variables.items()}
        return tuple(by_source.get(_normalise(expr.source), "") for expr in self._custom.values())


def _by_limit_key(summary: CounterSummary) -> _Groups:
    """Limits of one (namespace, name, window) are one set of series, whatever their conditions."""
    groups: _Groups = {}
    for limit, limit_summary in summary.limits.items():
        groups.setdefault(_limit_key(limit), []).append(limit_summary)
    return groups


def _at_or_above(groups: _Groups) -> Metric:
    """Per limit, how many of its counters (all of them, not only the top N) used at least
    each threshold of their limit."""
    family = Metric("ratelimit_quota_counters_at_or_above",
                    "Live counters whose used / limit is at least `threshold`", "gauge")
    for (namespace, name, window), group in sorted(groups.items()):
        for k, threshold in enumerate(UTILISATION_THRESHOLDS):
            family.add_sample(family.name, {NAMESPACE_LABEL: namespace, "limit_name": name, "window_seconds": window,
                                            "threshold": repr(threshold)}, sum(s.at_or_above[k] for s in group))
    return family


def _limit_key(limit: Limit) -> tuple[str, str, str]:
    return limit.namespace, limit.name or "", str(limit.seconds)


def _normalise(source: str) -> str:
    """`descriptors[0]['user']`, `descriptors[0]["user"]` and `descriptors[0].user` are one variable."""
    text = "".join(source.split()).replace('"', "'")
    return text.replace("['", ".").replace("']", "")
