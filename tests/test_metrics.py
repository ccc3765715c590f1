"""Metrics: custom CEL labels (-L), limit_name on every call series (-l), `_total` names, the quota
collector's cap and clamping, the model catalog, and `promtool check metrics` on real output."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Sequence
from unittest import mock

import pytest
from prometheus_client.parser import text_string_to_metric_families

from exporter.catalog import CatalogCollector
from exporter.quota import OTHER, QuotaCollector, ReadSummary
from ratelimit import pacing
from ratelimit.counters import Counter, CounterStatus
from ratelimit.limits import Limit
from ratelimit.metrics import (
    LATENCY_BUCKETS,
    RENDER_LINES,
    MetricLabelsError,
    Metrics,
    TimedStorage,
    parse_custom_labels,
)
from ratelimit.server.app import ServiceConfig, build_service
from ratelimit.sources.maas_naming import entries_from_documents
from ratelimit.storage.summary import CounterSummary, summarize
from tests.support import EXAMPLES

LABELS = parse_custom_labels("user: descriptors[0]['user']\nmodel: descriptors[0].model\n")
FREE = Limit("ns/gpt", 1000, 60, variables=("descriptors[0].user",), name="free-tokens")


def text(metrics: Metrics) -> str:
    return metrics.render()[0].decode()


def test_custom_labels_and_limit_name_on_every_call_series() -> None:
    metrics = Metrics(limit_name_in_labels=True, custom_labels=LABELS, limits_of=lambda ns, d: [FREE])
    metrics.record_authorized("ns/gpt", [{"user": "alice", "model": "gpt-4o"}], 120)
    metrics.record_limited("ns/gpt", [{"user": "bob"}], FREE)  # no model: the label is left out
    out = text(metrics)
    labels = 'limit_name="free-tokens",limitador_namespace="ns/gpt",model="gpt-4o",user="alice"'
    assert f"authorized_calls{{{labels}}} 1\n" in out
    assert f"authorized_hits{{{labels}}} 120\n" in out
    assert 'limited_calls{limit_name="free-tokens",limitador_namespace="ns/gpt",user="bob"} 1\n' in out


def test_total_suffix_names_counters_only() -> None:
    metrics = Metrics(total_suffix=True)
    metrics.record_authorized("ns", [{}], 5)
    out = text(metrics)
    assert "# TYPE authorized_hits_total counter\nauthorized_hits_total{limitador_namespace=\"ns\"} 5\n" in out
    assert "limitador_up 1\n" in out and "limitador_up_total" not in out


@pytest.mark.parametrize("document", ["[a]", "limitador_namespace: descriptors[0].x", "bad-name: descriptors[0].x",
                                      "user: 'descriptors[0].'"])


def test_invalid_custom_labels_are_refused(document: str) -> None:
    with pytest.raises(MetricLabelsError):
        parse_custom_labels(document)


def statuses(values: Sequence[int], limit: Limit = FREE) -> list[CounterStatus]:
    return [CounterStatus(Counter(limit, (f"user{i}",)), value, 30.0) for i, value in enumerate(values)]


def reading(counters: list[CounterStatus]) -> ReadSummary:
    """A collector's reader over these statuses (what Storage.counter_summary does by default)."""

    async def read(top_n: int, thresholds: Sequence[float]) -> CounterSummary:
        return summarize(counters, top_n, thresholds)

    return read


async def collect(collector: QuotaCollector) -> dict[str, list]:
    await collector.refresh()
    return {family.name: family.samples for family in collector.collect()}


async def test_quota_cap_keeps_busiest_and_sums_the_rest() -> None:
    counters = statuses([10, 900, 50, 1500, 5])  # 1500: overshoot by unconditional reports
    families = await collect(QuotaCollector(reading(counters), LABELS, top_n=2))
    used = {s.labels["counter"]: s.value for s in families["ratelimit_quota_used"]}
    assert used == {"user3": 1500, "user1": 900, OTHER: 65}
    remaining = {s.labels["counter"]: s.value for s in families["ratelimit_quota_remaining"]}
    limits = {s.labels["counter"]: s.value for s in families["ratelimit_quota_limit"]}
    assert all(0 <= remaining[c] <= limits[c] for c in remaining)
    assert remaining["user3"] == 0 and limits[OTHER] == 3000
    # The per-user variable fills the `user` label, so quota joins the call series.
    assert {s.labels.get("user") for s in families["ratelimit_quota_used"]} == {"user3", "user1", None}
    utilisation = {s.labels["counter"]: s.value for s in families["ratelimit_quota_utilisation"]}
    assert utilisation == {"user3": 1.5, "user1": 0.9, OTHER: 65 / 3000}
    # Every counter (the capped ones too) by share of its limit used: 900 and 1500 of 1000.
    reached = {s.labels["threshold"]: s.value for s in families["ratelimit_quota_counters_at_or_above"]}
    assert reached == {"0.5": 2, "0.75": 2, "0.9": 2, "1.0": 1}


async def test_quota_families_are_gauges_that_go_down_when_windows_reset() -> None:
    """A snapshot: when a window resets its counter leaves, and every count drops with it."""
    counters = statuses([950, 990])
    collector = QuotaCollector(reading(counters), LABELS)
    await collector.refresh()
    assert {family.type for family in collector.collect()} == {"gauge"}
    before = {s.labels["threshold"]: s.value for s in (await collect(collector))["ratelimit_quota_counters_at_or_above"]}
    counters.pop()
    after = {s.labels["threshold"]: s.value for s in (await collect(collector))["ratelimit_quota_counters_at_or_above"]}
    assert before["0.9"] == 2 and after["0.9"] == 1


async def test_quota_series_are_built_at_refresh_with_the_loop_free_between_slices() -> None:
    """The series of the busiest counters are thousands of samples: built in one go at collect,
    they held every decision ~8 ms a scrape. With every slice one row long (SLICE_SECONDS 0),
    another task runs between each row; collect then only hands the families out."""
    counters = statuses(list(range(100, 150)))
    collector = QuotaCollector(reading(counters), LABELS, top_n=40)
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    ticker = asyncio.get_running_loop().create_task(tick())
    await asyncio.sleep(0)
    with mock.patch.object(pacing, "SLICE_SECONDS", 0.0):
        await collector.refresh()
    during = ticks
    families = collector.collect()
    ticker.cancel()
    assert during > 40  # a turn of the loop after each of the 40 busiest (and the summed row)
    assert collector.collect() is families  # built once, at refresh: nothing left to do at collect
    [used_family] = [family for family in families if family.name == "ratelimit_quota_used"]
    used = {s.labels["counter"]: s.value for s in used_family.samples}
    assert len(used) == 41 and used[OTHER] == sum(range(100, 110))


def test_catalog_from_model_objects_and_models_file() -> None:
    documents = [
        {"apiVersion": "inference.opendatahub.io/v1alpha1", "kind": "ExternalModel",
         "metadata": {"name": "gpt-4o", "namespace": "maas"}, "spec": {"provider": "openai"}},
        {"apiVersion": "maas.opendatahub.io/v1alpha1", "kind": "ExternalModel",
         "metadata": {"name": "claude", "namespace": "maas"}, "spec": {"provider": "anthropic"}},
        {"kind": "LLMInferenceService", "metadata": {"name": "qwen3", "namespace": "maas"}},
        {"kind": "MaaSModelRef", "metadata": {"name": "ref", "namespace": "maas"},
         "spec": {"modelRef": {"kind": "ExternalModel", "name": "mistral"}},
         "status": {"httpRouteName": "mistral-route", "httpRouteNamespace": "gw"}},
        {"models": [{"limitador_namespace": "x/y", "model": "y", "kind": "gpu"}]},
    ]
    samples = CatalogCollector(entries_from_documents(documents)).collect()[0].samples
    got = {(s.labels["limitador_namespace"], s.labels["kind"], s.labels["provider"]) for s in samples}
    assert got == {("maas/gpt-4o", "external", "openai"), ("maas/maas-claude", "external", "anthropic"),
                   ("maas/qwen3-kserve-route", "gpu", "vllm"), ("gw/mistral-route", "external", ""),
                   ("x/y", "gpu", "")}


@pytest.mark.parametrize("total", [False, True])
def test_promtool_check_metrics_on_the_service(start_service, total: bool) -> None:
    """Clean with `--metrics-total-suffix`; without it, the only warnings are the counters' bare
    names, which Limitador uses and dashboards written for it query."""
    observability = EXAMPLES / "observability"
    service = start_service(observability / "limits.yaml", "-L", str(observability / "metric-labels.yaml"),
                            "--quota-metrics", "--model-catalog", str(observability / "models.yaml"),
                            *(["--metrics-total-suffix"] if total else []))
    for _ in range(8):
        service.http.post("/check_and_report", json={
            "namespace": "maas-demo/gpt-4o", "delta": 300,
            "values": {"user": "alice", "model": "gpt-4o", "subscription": "free"}})
    # Families longer than the slices /metrics is formatted in (RENDER_LINES): Prometheus's parser
    # and prometheus_client's both read them whole across the slice boundaries.
    users = [f"user-{i}" for i in range(3 * RENDER_LINES)]
    for user in users:
        service.http.post("/check_and_report", json={
            "namespace": "maas-demo/gpt-4o", "delta": 1,
            "values": {"user": user, "model": "gpt-4o", "subscription": "free"}})
    body = service.http.get("/metrics").content
    authorized = {sample.labels["user"] for family in text_string_to_metric_families(body.decode())
                  if family.name == "authorized_calls" for sample in family.samples}
    assert authorized == {"alice", *users}
    result = subprocess.run(["promtool", "check", "metrics"], input=body, capture_output=True)
    warnings = sorted(line for line in result.stdout.decode().splitlines() + result.stderr.decode().splitlines() if line)
    if total:
        assert result.returncode == 0 and warnings == []
    else:
        bare = ["authorized_calls", "authorized_hits", "datastore_counters_lost", "datastore_errors",
                "datastore_listing_failures", "datastore_unwritten_hits", "limited_calls"]
        assert warnings == [f'{name} counter metrics should have "_total" suffix' for name in bare]


def latency_samples(body: str) -> dict[str, float]:
    """`datastore_latency` samples of a /metrics body: `_bucket{le="..."}`, `_count`, `_sum` -> value."""
    return {line.split(" ")[0]: float(line.split(" ")[1])
            for line in body.splitlines() if line.startswith("datastore_latency")}


def test_datastore_latency_histogram_on_a_real_redis(start_service, redis_server) -> None:
    """Every decision on Redis is one observation of Limitador's `datastore_latency`, rendered as a
    Prometheus histogram (buckets, `_count`, `_sum`, in seconds; no `_created`), lint-clean."""
    redis_server.client().flushall()
    service = start_service(EXAMPLES / "observability" / "limits.yaml", "redis", redis_server.url)

    def decide(times: int) -> str:
        for _ in range(times):
            answer = service.http.post("/check_and_report", json={
                "namespace": "maas-demo/gpt-4o", "delta": 10, "values": {"user": "bob", "subscription": "premium"}})
            assert answer.status_code == 200
        return service.http.get("/metrics").text

    before = latency_samples(decide(1))
    assert "# TYPE datastore_latency histogram" in decide(0)
    after = latency_samples(decide(5))
    assert after["datastore_latency_count"] == before["datastore_latency_count"] + 5
    assert after['datastore_latency_bucket{le="+Inf"}'] == after["datastore_latency_count"]
    buckets = [value for name, value in after.items() if name.startswith("datastore_latency_bucket")]
    assert len(buckets) == len(LATENCY_BUCKETS) + 1 and buckets == sorted(buckets)  # cumulative
    assert 0 < after["datastore_latency_sum"] < after["datastore_latency_count"]  # seconds, not ms
    assert not any("_created" in name for name in after)

    lint = subprocess.run(["promtool", "check", "metrics"], input=decide(0).encode(), capture_output=True, check=False)
    assert "datastore_latency" not in (lint.stdout + lint.stderr).decode()


def test_memory_storage_has_no_datastore_latency() -> None:
    """As in Limitador, only a datastore (Redis) is timed; memory decisions are not wrapped."""
    service, _ = build_service(ServiceConfig(limits_file=str(EXAMPLES / "observability" / "limits.yaml")))
    assert not isinstance(service.engine.storage, TimedStorage)
    assert b"datastore_latency" not in service.metrics.render()[0]


def test_metrics_across_processes_need_the_multiprocess_environment(tmp_path) -> None:
    """Without PROMETHEUS_MULTIPROC_DIR at import, every value would stay in this process: refused."""
    with pytest.raises(RuntimeError, match="PROMETHEUS_MULTIPROC_DIR="):
        Metrics(multiprocess_dir=str(tmp_path))
