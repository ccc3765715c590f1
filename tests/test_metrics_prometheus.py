"""Proof on a real Prometheus: it scrapes the real service (with -L user/model/subscription and
--quota-metrics) while a token workload runs through the HTTP API, plus a small emitter of vLLM
and DCGM series; the seed's four queries and every dashboard query must return data."""

from __future__ import annotations

from dashboards.generate import DASHBOARDS, external_models, gpu_models, subscriptions
from dashboards.perses import all_queries, with_all_values
from tests.conftest import wait_until
from tests.prometheus_fixtures import EXTERNAL, observed, start_prometheus  # noqa: F401 - fixtures

# The seed's "MaaS External Models" queries, verbatim but for its demo namespace's route names.
SEED_QUERIES = {
    "authorizedCalls": 'sum(rate(authorized_calls{limitador_namespace=~"maas-demo/.*",limitador_namespace!~".*-kserve-route"}[5m])) by (limitador_namespace)',
    "tokenUsage": 'sum(rate(authorized_hits{limitador_namespace=~"maas-demo/.*",limitador_namespace!~".*-kserve-route"}[5m])) by (limitador_namespace, model)',
    "limitedCalls": 'sum(rate(limited_calls{limitador_namespace=~"maas-demo/.*",limitador_namespace!~".*-kserve-route"}[5m])) by (limitador_namespace, user)',
    "limitadorUp": "limitador_up",
}


def all_values(query: str) -> str:
    """A dashboard query as Perses sends it with every variable at "All" (`.*`)."""
    return with_all_values(query, [v for build in DASHBOARDS for v in build().variables])


def _every_query_answers(prometheus, queries: list[str]) -> list[str]:
    """The queries still without data (empty when all answer)."""
    return [q for q in queries if not prometheus.query(all_values(q))]


def test_seed_and_dashboard_queries_answer_on_real_prometheus(observed) -> None:  # noqa: F811 - a fixture
    prometheus, workload = observed
    dashboards = {build().name: build() for build in (external_models, gpu_models, subscriptions)}
    queries = [q for dashboard in dashboards.values() for q in all_queries(dashboard.spec())]
    wait_until(lambda: not _every_query_answers(prometheus, [*SEED_QUERIES.values(), *queries]), timeout=60,
               interval=1.0, what=f"data for every query; still empty: {_every_query_answers(prometheus, queries)}")
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
            plugin = variable["spec"]["plugin"]["spec"]
            assert prometheus.label_values(plugin["labelName"], plugin["matchers"][0]), variable["spec"]["name"]

    # Remaining quota of the busiest users: present, and within [0, limit].
    remaining = prometheus.query('ratelimit_quota_remaining{user="alice"}')
    assert remaining
    assert not prometheus.query("ratelimit_quota_remaining > ratelimit_quota_limit")
    assert not prometheus.query("ratelimit_quota_remaining < 0")
