"""Writes dashboards/generated/: three dashboards (PersesDashboard CR, plain Perses Dashboard and
Grafana JSON each), a ServiceMonitor and a PrometheusRule (plus the same rules as a plain file for
promtool).

    python -m dashboards.generate
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from dashboards.grafana import grafana_dashboard
from dashboards.perses import (
    Column,
    Dashboard,
    Row,
    Spec,
    gauge,
    label_variable,
    query,
    stat,
    table,
    time_series,
    value_column,
)
from dashboards.promql import Selector, of_kind, rate, route_matchers, series
from exporter.quota import OTHER

OUT = Path(__file__).resolve().parent / "generated"
K8S_NAMESPACE = "redhat-ods-monitoring"
PERSES_PROJECT = "maas"

NS = 'limitador_namespace=~"$namespace"'
CALL_FILTERS = (NS, 'model=~"$model"', 'subscription=~"$subscription"', 'user=~"$user"')


def refused_ratio(limited: str, authorized: str, by: str = "limitador_namespace") -> str:
    """limited / (authorized + limited) per `by`, 0 where nothing was refused. The two counters are
    rated separately: one rate() over both names would drop the names and collide on equal labels."""
    refused = f"(sum by ({by}) ({limited}) or 0 * sum by ({by}) ({authorized}))"
    return f"{refused} / (sum by ({by}) ({authorized}) + {refused})"


def external_models() -> Dashboard:
    """The seed's "MaaS External Models" (four panels, same keys, titles and legends), with the
    namespace as a variable, then more panels. Only Limitador's own series are needed: a route is
    placed by the model catalog when it lists the route, else by the seed's route-naming convention."""
    calls, hits, limited = (Selector(n, CALL_FILTERS) for n in ("authorized_calls", "authorized_hits", "limited_calls"))
    ext = lambda selector: of_kind("external", selector)  # noqa: E731 - reads better inline below
    named_hits = hits.where('user!=""')
    return Dashboard(
        "llm-d-external-models", "MaaS External Models",
        "Rate limiting and authorization metrics for ExternalModel endpoints (excludes LLMInferenceService)",
        variables=[
            label_variable("namespace", "Route", "limitador_namespace",
                           *route_matchers("external", Selector("authorized_calls"))),
            label_variable("model", "Model", "model", series("authorized_hits")),
            label_variable("subscription", "Subscription", "subscription", series("authorized_hits")),
            label_variable("user", "User", "user", series("authorized_hits")),
        ],
        rows=[
            Row("Request & Token Rates", {
                "authorizedCalls": time_series("Request Rate (req/s)", "Admitted calls per route", query(
                    f"sum({ext(calls)}) by (limitador_namespace)", "{{limitador_namespace}}")),
                "tokenUsage": time_series("Token Rate (tok/s)", "Tokens charged per model", query(
                    f"sum({ext(hits)}) by (limitador_namespace, model)", "{{model}} ({{limitador_namespace}})")),
            }),
            Row("Rate Limiting & Health", {
                "limitedCalls": time_series("Rate Limited Rate (429/s)", "Refused calls per user", query(
                    f"sum({ext(limited)}) by (limitador_namespace, user)", "{{user}} - {{limitador_namespace}}")),
                "limitadorUp": time_series("Limitador Status", "1 while the rate limiter runs",
                                           query("limitador_up", "Limitador")),
            }),
            Row("Users & Refusals", {
                "topUsers": time_series("Top Users by Tokens (tok/s)", "The ten users spending most tokens", query(
                    f"topk(10, sum by (user) ({ext(named_hits)}))", "{{user}}")),
                "ratio429": time_series("429 Ratio", "Share of calls refused",
                                        query(refused_ratio(ext(limited), ext(calls)), "{{limitador_namespace}}"),
                                        unit="percent-decimal"),
                "tokensPerSubscription": time_series(
                    "Tokens per Subscription (tok/s)", "Tokens charged per subscription", query(
                        f"sum by (subscription) ({ext(hits)})", "{{subscription}}"), stacked=True),
                "refusedNow": stat("429 Ratio (all external)", "Share of calls refused over 5 minutes", query(
                    refused_ratio(ext(limited), ext(calls), by="")), unit="percent-decimal"),
            }),
        ],
    )


def gpu_models() -> Dashboard:
    """Rate limiter series of GPU-served routes next to vLLM and DCGM series of the same models."""
    gpu = lambda selector: of_kind("gpu", selector, 'model=~"$model"')  # noqa: E731
    hits = Selector("authorized_hits", (NS,))
    limited = Selector("limited_calls", (NS,))
    model = 'model_name=~"$model"'
    # KServe prefixes vLLM's names with `kserve_`.
    vllm = lambda name: series(f"(kserve_)?vllm:{name}", model, counter=False)  # noqa: E731
    return Dashboard(
        "ratelimit-gpu-models", "MaaS GPU-served Models",
        "Token use and 429s of LLMInferenceService routes next to vLLM and DCGM metrics",
        variables=[
            label_variable("namespace", "Route", "limitador_namespace",
                           *route_matchers("gpu", Selector("authorized_calls"))),
            label_variable("model", "Model", "model", *route_matchers("gpu", Selector("authorized_hits"))),
        ],
        rows=[
            Row("Rate Limiter", {
                "tokenRate": time_series("Token Rate (tok/s)", "Tokens charged per route",
                                         query(f"sum by (limitador_namespace) ({gpu(hits)})",
                                               "{{limitador_namespace}}")),
                "limitedRate": time_series("Rate Limited Rate (429/s)", "Refused calls per route",
                                           query(f"sum by (limitador_namespace) ({gpu(limited)})",
                                                 "{{limitador_namespace}}")),
            }),
            Row("vLLM", {
                "vllmTokens": time_series(
                    "vLLM Tokens (tok/s)", "Prompt and generation tokens",
                    query(f"sum by (model_name) ({rate(vllm('prompt_tokens_total'))})", "prompt {{model_name}}"),
                    query(f"sum by (model_name) ({rate(vllm('generation_tokens_total'))})", "generation {{model_name}}")),
                "ttftP95": time_series("Time to First Token p95", "", query(
                    f"histogram_quantile(0.95, sum by (le, model_name) "
                    f"({rate(vllm('time_to_first_token_seconds_bucket'))}))", "{{model_name}} p95"), unit="seconds"),
                "queueDepth": time_series(
                    "Queue Depth", "Requests waiting and running",
                    query(f"sum by (model_name) ({vllm('num_requests_waiting')})", "waiting {{model_name}}"),
                    query(f"sum by (model_name) ({vllm('num_requests_running')})", "running {{model_name}}")),
                # gpu_cache_usage_perc is the pre-0.10 name of the same value.
                "kvCache": time_series("KV-cache Use", "", query(
                    f"max by (model_name) ({vllm('(kv|gpu)_cache_usage_perc')})", "{{model_name}}"),
                    unit="percent-decimal"),
            }),
            Row("GPUs (DCGM)", {
                "gpuUtil": time_series("GPU Utilisation (%)", "",
                                       query("avg by (Hostname, gpu) (DCGM_FI_DEV_GPU_UTIL)", "{{Hostname}} GPU {{gpu}}")),
                "gpuMemory": time_series("GPU Memory Used (MiB)", "",
                                         query("sum by (Hostname, gpu) (DCGM_FI_DEV_FB_USED)", "{{Hostname}} GPU {{gpu}}")),
                "gpuPower": time_series("GPU Power (W)", "",
                                        query("sum by (Hostname, gpu) (DCGM_FI_DEV_POWER_USAGE)", "{{Hostname}} GPU {{gpu}}")),
            }, width=8),
        ],
    )


QUOTA_ROW = ("limitador_namespace", "limit_name", "counter")
"""What identifies a counter's row: its route, its limit and its variable values (the user, for a
per-user limit). `user` would repeat `counter`, and `instance`/`job` say nothing to the reader."""


def closest_to_exhaustion(filters: Sequence[str], top: int = 10) -> Spec:
    """The `top` counters by share of their limit used, with the tokens used, what is left and
    when the window resets; one row per counter (the queries' series merged by QUOTA_ROW)."""
    by = ", ".join(QUOTA_ROW)
    gauge_of = lambda family: series(family, *filters, f'counter!="{OTHER}"', counter=False)  # noqa: E731
    busiest = f"topk({top}, max by ({by}) ({gauge_of('ratelimit_quota_utilisation')}))"
    queries = [query(busiest)] + [
        query(f"max by ({by}) ({gauge_of(family)}) and on ({by}) {busiest}")
        for family in ("ratelimit_quota_used", "ratelimit_quota_remaining", "ratelimit_quota_reset_seconds")]
    count = len(queries)
    return table("Users Closest to Exhaustion", "Counters by share of their limit used, highest first", *queries,
                 columns=[
                     Column("limitador_namespace", "Route"),
                     Column("limit_name", "Limit", "The limit (a subscription's token limit)"),
                     Column("counter", "User", "The limit's variable values: the user, for a per-user limit"),
                     Column(value_column(0, count), "Used", "used / limit", "percent-decimal"),
                     Column(value_column(1, count), "Tokens used", unit="decimal"),
                     Column(value_column(2, count), "Tokens left", unit="decimal"),
                     Column(value_column(3, count), "Resets in", unit="seconds"),
                 ])


def subscriptions() -> Dashboard:
    q_filters = ('limitador_namespace=~"$namespace"', 'limit_name=~"$limit"')
    limit = series("ratelimit_quota_limit", *q_filters, counter=False)
    remaining = series("ratelimit_quota_remaining", *q_filters, counter=False)
    utilisation = series("ratelimit_quota_utilisation", *q_filters, f'counter!="{OTHER}"', counter=False)
    reached = lambda threshold: series(  # noqa: E731
        "ratelimit_quota_counters_at_or_above", *q_filters, f'threshold="{threshold}"', counter=False)
    hits = series("authorized_hits", NS, 'subscription=~"$subscription"')
    return Dashboard(
        "ratelimit-subscriptions-quota", "Subscriptions & Quota",
        "Token use per subscription and what is left of each user's quota",
        variables=[
            label_variable("namespace", "Route", "limitador_namespace", "ratelimit_quota_limit"),
            label_variable("subscription", "Subscription", "subscription", series("authorized_hits")),
            label_variable("limit", "Limit", "limit_name", "ratelimit_quota_limit"),
        ],
        rows=[
            Row("Usage", {
                "usagePerSubscription": time_series("Tokens per Subscription (tok/s)", "", query(
                    f"sum by (subscription) ({rate(hits)})", "{{subscription}}"), stacked=True),
                "activeCounters": stat("Live Counters", "Counters with a running window",
                                       query(f"sum({series('ratelimit_quota_counters', *q_filters, counter=False)})")),
            }),
            Row("Quota", {
                "closestToExhaustion": closest_to_exhaustion(q_filters),
                "busiestUser": gauge("Busiest User's Quota Used", "The highest used / limit of any counter now",
                                     query(f"max({utilisation})")),
                "quotaUtilisation": time_series(
                    "Quota Utilisation (busiest users)", "used / limit of each user's counter (top N exported)",
                    query(f"topk(10, max by (limitador_namespace, limit_name, counter) ({utilisation}))",
                          "{{counter}} {{limit_name}}"), unit="percent-decimal"),
                "nearExhaustion": time_series(
                    "Counters Near Exhaustion", "Counters (all of them) that used 90% or all of their limit",
                    query(f"sum by (limit_name) ({reached('0.9')})", ">= 90% {{limit_name}}"),
                    query(f"sum by (limit_name) ({reached('1.0')})", "exhausted {{limit_name}}")),
                "remainingVsLimit": time_series(
                    "Remaining vs Limit", "Summed over the counters of each limit",
                    query(f"sum by (limit_name) ({remaining})", "remaining {{limit_name}}"),
                    query(f"sum by (limit_name) ({limit})", "limit {{limit_name}}")),
            }),
        ],
    )


DASHBOARDS = (external_models, gpu_models, subscriptions)


def rule_groups() -> list[dict[str, Any]]:
    """The alerts, shared by the PrometheusRule and the plain rules file promtool tests."""
    return [{"name": "ratelimit", "rules": [
        {"alert": "RateLimiterDown", "expr": 'up{job=~".*(ratelimit|limitador).*"} == 0 or limitador_up == 0',
         "for": "2m", "labels": {"severity": "critical"},
         "annotations": {"summary": "Rate limiter {{ $labels.instance }} is down"}},
        {"alert": "RateLimiterRedisPartitioned", "expr": "max by (job, instance) (datastore_partitioned) == 1",
         "for": "1m", "labels": {"severity": "warning"},
         "annotations": {"summary": "Rate limiter {{ $labels.instance }} cannot reach Redis"}},
        {"alert": "RateLimiterHigh429Ratio", "expr": f"{refused_ratio(rate(series('limited_calls')), rate(series('authorized_calls')))} > 0.3",
         "for": "10m", "labels": {"severity": "warning"},
         "annotations": {"summary": "Over 30% of calls to {{ $labels.limitador_namespace }} are refused"}},
        # Every counter, capped or not: a subscription many of whose users are nearly out.
        {"alert": "SubscriptionUsersNearExhaustion",
         "expr": ('sum by (limitador_namespace, limit_name) '
                  '(ratelimit_quota_counters_at_or_above{threshold="0.9"}) >= 3'),
         "for": "5m", "labels": {"severity": "info"},
         "annotations": {"summary": "{{ $value }} users of {{ $labels.limit_name }} used 90% of their quota"}},
    ]}]


def service_monitor() -> dict[str, Any]:
    endpoints = [{"port": port, "path": "/metrics", "interval": "30s", "scheme": "http"}
                 for port in ("http", "exporter")]
    return {"apiVersion": "monitoring.coreos.com/v1", "kind": "ServiceMonitor",
            "metadata": {"name": "ratelimit", "namespace": "kuadrant-system",
                         "labels": {"app.kubernetes.io/name": "ratelimit"}},
            # The service's and the standalone exporter's Services both carry this label; each
            # exposes only one of the two ports, so nothing is scraped twice.
            "spec": {"selector": {"matchLabels": {"app.kubernetes.io/part-of": "ratelimit"}},
                     "endpoints": endpoints}}


def prometheus_rule() -> dict[str, Any]:
    return {"apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule",
            "metadata": {"name": "ratelimit", "namespace": "kuadrant-system",
                         "labels": {"app.kubernetes.io/name": "ratelimit"}},
            "spec": {"groups": rule_groups()}}


def files() -> dict[str, Any]:
    """Generated file name -> content."""
    out: dict[str, Any] = {}
    for build in DASHBOARDS:
        dashboard = build()
        out[f"{dashboard.name}.persesdashboard.yaml"] = dashboard.custom_resource(K8S_NAMESPACE)
        out[f"{dashboard.name}.dashboard.yaml"] = dashboard.plain(PERSES_PROJECT)
        out[f"{dashboard.name}.grafana.json"] = grafana_dashboard(dashboard)
    out["servicemonitor.yaml"] = service_monitor()
    out["prometheusrule.yaml"] = prometheus_rule()
    out["rules.yaml"] = {"groups": rule_groups()}
    return out


def render(name: str, content: Any) -> str:
    if name.endswith(".json"):  # JSON has no comments: Grafana imports it as it is
        return json.dumps(content, indent=2, ensure_ascii=False) + "\n"
    return "# Generated by `python -m dashboards.generate`; edit dashboards/*.py instead.\n" + yaml.safe_dump(
        content, sort_keys=False, width=200, allow_unicode=True)


def main() -> None:
    OUT.mkdir(exist_ok=True)
    for name, content in files().items():
        (OUT / name).write_text(render(name, content), encoding="utf-8")


if __name__ == "__main__":
    main()
