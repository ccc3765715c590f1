"""Proof on a real Prometheus.

- It scrapes the real service (with -L user/model/subscription, --quota-metrics and the model
  catalog) while a token workload runs through the HTTP API, plus a small emitter of vLLM and DCGM
  series: the seed's four queries and every dashboard query return data, tables are readable.
- It scrapes what a plain Kuadrant Limitador serves (a real HTTP target with Limitador's exposition,
  bare or `_total` names): every "MaaS External Models" query still returns data, routes placed by
  the seed's naming convention; next to the real `ratelimit-exporter` serving a model catalog, the
  catalog places the routes it lists.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from dashboards.generate import external_models, gpu_models, subscriptions
from dashboards.perses import Dashboard, all_queries
from dashboards.render import PanelData, Series, table_rows
from tests.prometheus_fixtures import (
    EXTERNAL,
    LimitadorEmitter,
    PrometheusProcess,
    all_values,
    catalog_exporter,
    require_prometheus,
    running_prometheus,
)
from tests.service_fixtures import ServiceProcess
from tests.support import wait_until

# The seed's "MaaS External Models" queries, verbatim but for its demo namespace's route names.
SEED_QUERIES = {
    "authorizedCalls": 'sum(rate(authorized_calls{limitador_namespace=~"maas-demo/.*",limitador_namespace!~".*-kserve-route"}[5m])) by (limitador_namespace)',
    "tokenUsage": 'sum(rate(authorized_hits{limitador_namespace=~"maas-demo/.*",limitador_namespace!~".*-kserve-route"}[5m])) by (limitador_namespace, model)',
    "limitedCalls": 'sum(rate(limited_calls{limitador_namespace=~"maas-demo/.*",limitador_namespace!~".*-kserve-route"}[5m])) by (limitador_namespace, user)',
    "limitadorUp": "limitador_up",
}
SCRAPE_LABELS = {"instance", "job"}


def _every_query_answers(prometheus: PrometheusProcess, queries: list[str]) -> list[str]:
    """The queries still without data (empty when all answer)."""
    return [q for q in queries if not prometheus.query(all_values(q))]


def _wait_for_every_query(prometheus: PrometheusProcess, queries: list[str]) -> None:
    wait_until(lambda: not _every_query_answers(prometheus, queries), timeout=60, interval=1.0,
               what=f"data for every query; still empty: {_every_query_answers(prometheus, queries)}")


def panel_queries(dashboard: Dashboard, key: str) -> list[str]:
    return [q["spec"]["plugin"]["spec"]["query"] for q in dashboard.spec()["panels"][key]["spec"]["queries"]]


def routes_of(prometheus: PrometheusProcess, dashboard: Dashboard, key: str) -> set[str]:
    """The routes a panel (variables at "All") shows."""
    return {r["metric"]["limitador_namespace"] for q in panel_queries(dashboard, key)
            for r in prometheus.query(all_values(q))}


def variable_values(prometheus: PrometheusProcess, dashboard: Dashboard, name: str) -> set[str]:
    variable = next(v["spec"] for v in dashboard.variables if v["spec"]["name"] == name)
    plugin = variable["plugin"]["spec"]
    return set(prometheus.label_values(plugin["labelName"], *plugin["matchers"]))


def test_seed_and_dashboard_queries_answer_on_real_prometheus(observed) -> None:
    prometheus, workload = observed
    dashboards = {build().name: build() for build in (external_models, gpu_models, subscriptions)}
    queries = [q for dashboard in dashboards.values() for q in all_queries(dashboard.spec())]
    _wait_for_every_query(prometheus, [*SEED_QUERIES.values(), *queries])
    assert workload.statuses.get(("alice", 429)), "the workload never ran into a limit"

    # The seed's four queries, unchanged, answer; limited_calls names the limited caller only.
    for key, query in SEED_QUERIES.items():
        assert prometheus.query(query), key
    limited_users = {r["metric"].get("user") for r in prometheus.query(SEED_QUERIES["limitedCalls"])}
    assert limited_users == {"alice"}
    tokens = prometheus.query(SEED_QUERIES["tokenUsage"])
    assert {(r["metric"]["limitador_namespace"], r["metric"]["model"]) for r in tokens} == {(EXTERNAL, "gpt-4o")}

    # Every variable of every dashboard offers values.
    for dashboard in dashboards.values():
        for variable in dashboard.variables:
            assert variable_values(prometheus, dashboard, variable["spec"]["name"]), variable["spec"]["name"]

    # Remaining quota of the busiest users: present, and within [0, limit].
    remaining = prometheus.query('ratelimit_quota_remaining{user="alice"}')
    assert remaining
    assert not prometheus.query("ratelimit_quota_remaining > ratelimit_quota_limit")
    assert not prometheus.query("ratelimit_quota_remaining < 0")


def test_quota_table_is_readable(observed) -> None:
    """"Users closest to exhaustion": one row per counter, every column named, no scrape labels,
    no `user` repeating `counter`, the share used as a percentage."""
    prometheus, _ = observed
    dashboard = subscriptions()
    panel = dashboard.spec()["panels"]["closestToExhaustion"]
    queries = panel_queries(dashboard, "closestToExhaustion")
    _wait_for_every_query(prometheus, queries)
    settings = panel["spec"]["plugin"]["spec"]["columnSettings"]
    named = {s["name"] for s in settings if not s.get("hide")}
    for query in queries:
        answer = prometheus.query(all_values(query))
        labels = {k for r in answer for k in r["metric"]}
        assert labels == {"limitador_namespace", "limit_name", "counter"}, query
        assert labels <= named and not labels & SCRAPE_LABELS
    answers: list[tuple[str | None, Series]] = [(None, [(r["metric"], [(float(r["value"][0]), float(r["value"][1]))])
                       for r in prometheus.query(all_values(q))]) for q in queries]
    headers, rows = table_rows(PanelData("closestToExhaustion", panel, answers))
    assert headers == ["Route", "Limit", "User", "Used", "Tokens used", "Tokens left", "Resets in"]
    assert rows and all(row[3].endswith("%") and row[6].endswith(" s") for row in rows)
    alice = [row for row in rows if row[2] == "alice"]
    assert alice and float(alice[0][3].rstrip("%")) > 50, "alice ran into her free limit"


@pytest.mark.parametrize("suffix", ["", "_total"])
def test_external_models_on_plain_limitador(start_prometheus, suffix: str) -> None:
    """Only Limitador's series (no catalog, no quota gauges): every panel answers, and shows the
    routes the seed's naming convention calls external."""
    dashboard = external_models()
    with LimitadorEmitter(suffix) as limitador:
        prometheus = start_prometheus({"limitador": [limitador.address]})
        _wait_for_every_query(prometheus, all_queries(dashboard.spec()))
        assert not prometheus.query('{__name__=~"ratelimit_.*"}'), "a plain Limitador has no ratelimit_ series"
        external = {"maas-demo/qwen3-14b", "maas-demo/maas-gpt-4o", "maas-demo/granite"}
        for key in ("authorizedCalls", "tokenUsage", "limitedCalls", "ratio429"):
            assert routes_of(prometheus, dashboard, key) == external, key
        assert variable_values(prometheus, dashboard, "namespace") == external
        limited = prometheus.query(all_values(panel_queries(dashboard, "limitedCalls")[0]))
        assert {r["metric"]["user"] for r in limited} == {"alice"}
        top = prometheus.query(all_values(panel_queries(dashboard, "topUsers")[0]))
        assert {r["metric"]["user"] for r in top} == {"alice", "bob"}
        # alice: 1 refused of 4 calls per scrape on each route.
        ratio = prometheus.query(all_values(panel_queries(dashboard, "refusedNow")[0]))
        assert [round(float(r["value"][1]), 3) for r in ratio] == [0.167]


def test_catalog_places_the_routes_it_lists(start_prometheus, tmp_path: Path) -> None:
    """A plain Limitador next to the real `ratelimit-exporter` serving a catalog: `granite`, GPU-served
    behind a route without the -kserve-route suffix, leaves the external dashboard for the GPU one;
    `maas-gpt-4o`, which the catalog does not list, is still placed by the convention."""
    external, gpu = external_models(), gpu_models()
    with LimitadorEmitter() as limitador, catalog_exporter(tmp_path) as exporter:
        prometheus = start_prometheus({"limitador": [limitador.address], "exporter": [exporter]})
        rate_limiter_panels = [q for key in ("tokenRate", "limitedRate") for q in panel_queries(gpu, key)]
        _wait_for_every_query(prometheus, ["ratelimit_model_info", *all_queries(external.spec()), *rate_limiter_panels])
        for key in ("authorizedCalls", "tokenUsage", "limitedCalls", "ratio429"):
            assert routes_of(prometheus, external, key) == {"maas-demo/qwen3-14b", "maas-demo/maas-gpt-4o"}, key
        for key in ("tokenRate", "limitedRate"):
            assert routes_of(prometheus, gpu, key) == {"maas-demo/qwen3-8b-kserve-route", "maas-demo/granite"}, key
        assert {"maas-demo/qwen3-14b", "maas-demo/maas-gpt-4o"} <= variable_values(prometheus, external, "namespace")
        assert variable_values(prometheus, gpu, "model") == {"qwen3-8b", "granite"}


def test_quota_of_more_counters_than_get_series_adds_up_on_real_prometheus(
    tmp_path: Path, start_service: Callable[..., ServiceProcess]
) -> None:
    """600 counters, of which the 500 busiest get series of their own (the memory table's summary:
    a pass for the busiest, a kernel adding up the rest): Prometheus, parsing the real service's
    exposition, sees the other 100 summed into one `__other__` series, so sums over every series
    are the table's totals, and the counts by share used cover all 600."""
    require_prometheus()
    limits = tmp_path / "limits.yaml"
    limits.write_text("- {namespace: quota, name: per-user, max_value: 1000, seconds: 3600,"
                      " variables: [\"descriptors[0]['user']\"]}\n")
    service = start_service(limits, "--quota-metrics")
    for i in range(600):  # user i has used i + 1 of 1000
        service.http.post("/report", json={"namespace": "quota", "values": {"user": f"u{i}"}, "delta": i + 1})
    with running_prometheus({"ratelimit": [f"127.0.0.1:{service.http_port}"]}) as prometheus:
        wait_until(lambda: prometheus.query('ratelimit_quota_used{counter="__other__"}'), timeout=60, interval=0.5,
                   what="the quota series")

        def value(query: str) -> float:
            [answer] = prometheus.query(query)
            return float(answer["value"][1])

        assert value('count(ratelimit_quota_used{limit_name="per-user", counter!="__other__"})') == 500
        assert value('min(ratelimit_quota_used{limit_name="per-user", counter!="__other__"})') == 101
        assert value('ratelimit_quota_used{counter="__other__"}') == sum(range(1, 101))
        assert value('ratelimit_quota_limit{counter="__other__"}') == 100 * 1000
        assert value('ratelimit_quota_remaining{counter="__other__"}') == sum(1000 - used for used in range(1, 101))
        assert value('sum(ratelimit_quota_used{limit_name="per-user"})') == sum(range(1, 601))
        assert value('ratelimit_quota_counters{limit_name="per-user"}') == 600
        assert value('ratelimit_quota_counters_at_or_above{limit_name="per-user", threshold="0.5"}') == 101
        assert 3500 < value('ratelimit_quota_reset_seconds{counter="__other__"}') <= 3600
