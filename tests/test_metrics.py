"""Metrics: custom CEL labels (-L), limit_name on every call series (-l), `_total` names, the quota
collector's cap and clamping, the model catalog, and `promtool check metrics` on real output."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Sequence

import pytest

from exporter.catalog import CatalogCollector, entries_from_documents
from exporter.quota import OTHER, QuotaCollector
from ratelimit.counters import Counter, CounterStatus
from ratelimit.limits import Limit
from ratelimit.metrics import MetricLabelsError, Metrics, parse_custom_labels
from tests.conftest import EXAMPLES

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


def collect(collector: QuotaCollector) -> dict[str, list]:
    asyncio.run(collector.refresh())
    return {family.name: family.samples for family in collector.collect()}


def test_quota_cap_keeps_busiest_and_sums_the_rest() -> None:
    counters = statuses([10, 900, 50, 1500, 5])  # 1500: overshoot by unconditional reports

    async def read() -> list[CounterStatus]:
        return counters

    families = collect(QuotaCollector(read, LABELS, top_n=2))
    used = {s.labels["counter"]: s.value for s in families["ratelimit_quota_used"]}
    assert used == {"user3": 1500, "user1": 900, OTHER: 65}
    remaining = {s.labels["counter"]: s.value for s in families["ratelimit_quota_remaining"]}
    limits = {s.labels["counter"]: s.value for s in families["ratelimit_quota_limit"]}
    assert all(0 <= remaining[c] <= limits[c] for c in remaining)
    assert remaining["user3"] == 0 and limits[OTHER] == 3000
    # The per-user variable fills the `user` label, so quota joins the call series.
    assert {s.labels.get("user") for s in families["ratelimit_quota_used"]} == {"user3", "user1", None}
    count = families["ratelimit_quota_utilisation"]
    assert [s.value for s in count if s.name.endswith("_count")] == [5]
    assert [s.value for s in count if s.labels.get("le") == "1.0"] == [4]


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
    body = service.http.get("/metrics").content
    result = subprocess.run(["promtool", "check", "metrics"], input=body, capture_output=True)
    warnings = sorted(line for line in result.stdout.decode().splitlines() + result.stderr.decode().splitlines() if line)
    if total:
        assert result.returncode == 0 and warnings == []
    else:
        bare = ["authorized_calls", "authorized_hits", "datastore_errors", "limited_calls"]
        assert warnings == [f'{name} counter metrics should have "_total" suffix' for name in bare]
