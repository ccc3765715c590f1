"""Writes dashboards/generated/: three dashboards (PersesDashboard CR and plain Dashboard each),
a ServiceMonitor and a PrometheusRule (plus the same rules as a plain file for promtool).

    python -m dashboards.generate
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from dashboards.perses import Dashboard, Row, label_variable, query, stat, table, time_series
from dashboards.promql import of_kind, rate, series

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
    namespace as a variable and the catalog instead of route-name regexes, then more panels."""
    ext = lambda e: of_kind(e, "external")  # noqa: E731 - reads better inline in the queries below
    calls, hits, limited = (series(n, *CALL_FILTERS) for n in ("authorized_calls", "authorized_hits", "limited_calls"))
    named_hits = series("authorized_hits", *CALL_FILTERS, 'user!=""')
    ratio = refused_ratio(ext(rate(limited)), ext(rate(calls)))
    used = series("ratelimit_quota_used", NS, 'user=~"$user"', 'counter!="__other__"', counter=False)
    limit = series("ratelimit_quota_limit", NS, 'user=~"$user"', 'counter!="__other__"', counter=False)
    return Dashboard(
        "llm-d-external-models", "MaaS External Models",
        "Rate limiting and authorization metrics for ExternalModel endpoints (excludes LLMInferenceService)",
        variables=[
            label_variable("namespace", "Route", "limitador_namespace", 'ratelimit_model_info{kind="external"}'),
            label_variable("model", "Model", "model", series("authorized_hits")),
            label_variable("subscription", "Subscription", "subscription", series("authorized_hits")),
            label_variable("user", "User", "user", series("authorized_hits")),
        ],
        rows=[
            Row("Request & Token Rates", {
                "authorizedCalls": time_series("Request Rate (req/s)", "Admitted calls per route", query(
                    f"sum({ext(rate(calls))}) by (limitador_namespace)", "{{limitador_namespace}}")),
                "tokenUsage": time_series("Token Rate (tok/s)", "Tokens charged per model", query(
                    f"sum({ext(rate(hits))}) by (limitador_namespace, model)", "{{model}} ({{limitador_namespace}})")),
            }),
            Row("Rate Limiting & Health", {
                "limitedCalls": time_series("Rate Limited Rate (429/s)", "Refused calls per user", query(
                    f"sum({ext(rate(limited))}) by (limitador_namespace, user)", "{{user}} - {{limitador_namespace}}")),
                "limitadorUp": time_series("Limitador Status", "1 while the rate limiter runs",
                                           query("limitador_up", "Limitador")),
            }),
            Row("Users & Quota", {
                "topUsers": time_series("Top Users by Tokens (tok/s)", "The ten users spending most tokens", query(
                    f"topk(10, sum by (user) ({ext(rate(named_hits))}))", "{{user}}")),
                "ratio429": time_series("429 Ratio", "Share of calls refused", query(ratio, "{{limitador_namespace}}"),
                                        unit="percent-decimal"),
                "quotaUtilisation": time_series(
                    "Quota Utilisation (busiest users)", "used / limit of each user's counter (top N exported)",
                    query(f"max by (limitador_namespace, limit_name, user) ({ext(used)} / {ext(limit)})",
                          "{{user}} {{limit_name}}"), unit="percent-decimal"),
                "refusedNow": stat("429 Ratio (all external)", "Share of calls refused over 5 minutes", query(
                    refused_ratio(ext(rate(limited)), ext(rate(calls)), by="")), unit="percent-decimal"),
            }),
        ],
    )


def gpu_models() -> Dashboard:
    """Rate limiter series of GPU-served routes next to vLLM and DCGM series of the same models."""
    gpu = lambda e: of_kind(e, "gpu", 'model=~"$model"')  # noqa: E731
    hits = series("authorized_hits", NS)
    limited = series("limited_calls", NS)
    model = 'model_name=~"$model"'
    # KServe prefixes vLLM's names with `kserve_`.
    vllm = lambda name: series(f"(kserve_)?vllm:{name}", model, counter=False)  # noqa: E731
    return Dashboard(
        "ratelimit-gpu-models", "MaaS GPU-served Models",
        "Token use and 429s of LLMInferenceService routes next to vLLM and DCGM metrics",
        variables=[
            label_variable("namespace", "Route", "limitador_namespace", 'ratelimit_model_info{kind="gpu"}'),
            label_variable("model", "Model", "model", 'ratelimit_model_info{kind="gpu"}'),
        ],
        rows=[
            Row("Rate Limiter", {
                "tokenRate": time_series("Token Rate (tok/s)", "Tokens charged per route",
                                         query(f"sum by (limitador_namespace) ({gpu(rate(hits))})",
                                               "{{limitador_namespace}}")),
                "limitedRate": time_series("Rate Limited Rate (429/s)", "Refused calls per route",
                                           query(f"sum by (limitador_namespace) ({gpu(rate(limited))})",
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


def subscriptions() -> Dashboard:
    q_filters = ('limitador_namespace=~"$namespace"', 'limit_name=~"$limit"')
    used = series("ratelimit_quota_used", *q_filters, counter=False)
    limit = series("ratelimit_quota_limit", *q_filters, counter=False)
    remaining = series("ratelimit_quota_remaining", *q_filters, counter=False)
    per_user = lambda s: s.replace("}", ',counter!="__other__"}')  # noqa: E731
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
                "closestToExhaustion": table("Users Closest to Exhaustion", "used / limit, highest first", query(
                    f"topk(10, {per_user(used)} / {per_user(limit)})")),
                "remainingVsLimit": time_series(
                    "Remaining vs Limit", "Summed over the counters of each limit",
                    query(f"sum by (limit_name) ({remaining})", "remaining {{limit_name}}"),
                    query(f"sum by (limit_name) ({limit})", "limit {{limit_name}}")),
                "utilisationP90": time_series("Utilisation p90 (all counters)", "", query(
                    "histogram_quantile(0.9, sum by (le, limitador_namespace) "
                    '(ratelimit_quota_utilisation_bucket{limitador_namespace=~"$namespace"}))',
                    "{{limitador_namespace}}"), unit="percent-decimal"),
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
        # Counters under the top-N cap only: a subscription whose busiest users are nearly out.
        {"alert": "SubscriptionUsersNearExhaustion",
         "expr": ('count by (limitador_namespace, limit_name) (ratelimit_quota_used{counter!="__other__"} '
                  '/ ratelimit_quota_limit{counter!="__other__"} >= 0.9) >= 3'),
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
    out["servicemonitor.yaml"] = service_monitor()
    out["prometheusrule.yaml"] = prometheus_rule()
    out["rules.yaml"] = {"groups": rule_groups()}
    return out


def render(content: Any) -> str:
    return "# Generated by `python -m dashboards.generate`; edit dashboards/*.py instead.\n" + yaml.safe_dump(
        content, sort_keys=False, width=200, allow_unicode=True)


def main() -> None:
    OUT.mkdir(exist_ok=True)
    for name, content in files().items():
        (OUT / name).write_text(render(content), encoding="utf-8")


if __name__ == "__main__":
    main()
