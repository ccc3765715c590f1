"""Limitador server's HTTP API tests (`limitador-server/src/http_api/server.rs`, `mod tests`),
black-box against `ratelimit serve` on the memory storage (as Limitador runs them).

Limitador's test limit is `descriptors[0]['req.method'] == 'GET'`, counted per
`descriptors[0]['app.id']`, 60 s; each case has its own namespace here.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.limitador_conformance.harness import REQ_APP_ID, REQ_METHOD_IS_GET, Api, app_limit, limit, serving
from tests.service_fixtures import ServiceProcess

VALUES = {"req.method": "GET", "app.id": "1"}


LIMITS = [
    app_limit("test_limits_read", 10),
    app_limit("test_check_and_report", 1),
    app_limit("test_check_and_report_with_draftversion03_response_headers", 2),
    app_limit("test_check_and_report_endpoints_separately", 1),
    app_limit("check_with_delta_0", 1),
    limit("response_header_names", 2, conditions=(), variables=(), name='the "gold" tier'),
    limit("response_header_names", 5, seconds=3600, conditions=(), variables=()),
]


@pytest.fixture(scope="module")
def service(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    """With `-H DRAFT_VERSION_03`, which (as in Limitador) is for the RLS: every case here shows
    that the HTTP API adds headers only when a body asks."""
    with serving("memory", LIMITS, request, tmp_path_factory, "-H", "DRAFT_VERSION_03") as service:
        yield service


RATE_LIMIT_HEADERS = ("X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset")


def test_status(api: Api) -> None:
    """`test_status`, http_api/server.rs: `/status` answers, with Limitador's fields."""
    response = api.http.get("/status")
    assert response.status_code == 200
    assert {"started_at", "config_applied_at", "config_version", "config_err_since"} <= response.json().keys()


def test_metrics(api: Api) -> None:
    """`test_metrics`, http_api/server.rs: Prometheus text with `limitador_up` and its help text."""
    response = api.http.get("/metrics")
    assert response.status_code == 200
    assert "# HELP limitador_up Limitador is running" in response.text
    families = {family.name: family for family in text_string_to_metric_families(response.text)}
    assert [sample.value for sample in families["limitador_up"].samples] == [1.0]


def test_limits_read(api: Api) -> None:
    """`test_limits_read`, http_api/server.rs: the one limit, in Limitador's JSON shape."""
    assert api.limits("test_limits_read") == [{
        "id": None, "name": None, "namespace": "test_limits_read", "max_value": 10, "seconds": 60,
        "conditions": [REQ_METHOD_IS_GET], "variables": [REQ_APP_ID],
    }]


def test_check_and_report(api: Api) -> None:
    """`test_check_and_report`, http_api/server.rs: a limit of 1 admits one call (without
    `response_headers`, no `X-RateLimit-*` headers), then answers 429."""
    first = api.call("check_and_report", "test_check_and_report", VALUES)
    assert first.status_code == 200
    assert first.json() is None  # Limitador's body: JSON null
    assert not {name.lower() for name in RATE_LIMIT_HEADERS} & set(first.headers)
    second = api.call("check_and_report", "test_check_and_report", VALUES)
    assert second.status_code == 429
    # Limitador's 429 body is JSON null; ours says why (README.md lists the difference).
    assert second.json() == {"error": "Too Many Requests", "limit_name": None}


def test_check_and_report_with_draftversion03_response_headers(api: Api) -> None:
    """`test_check_and_report_with_draftversion03_response_headers`, http_api/server.rs: a limit
    of 2; `X-RateLimit-Limit: 2, 2;w=60` every time, remaining 1, 0, and 0 with the 429."""
    namespace = "test_check_and_report_with_draftversion03_response_headers"
    answers = [api.call("check_and_report", namespace, VALUES, response_headers="DraftVersion03") for _ in range(3)]
    assert [answer.status_code for answer in answers] == [200, 200, 429]
    assert [answer.headers["X-RateLimit-Limit"] for answer in answers] == ["2, 2;w=60"] * 3
    assert [answer.headers["X-RateLimit-Remaining"] for answer in answers] == ["1", "0", "0"]
    assert all(0 <= int(answer.headers["X-RateLimit-Reset"]) <= 60 for answer in answers)


def test_check_and_report_endpoints_separately(api: Api) -> None:
    """`test_check_and_report_endpoints_separately`, http_api/server.rs: /check is 200 before any
    hit, /report charges the one hit, /check then answers 429."""
    namespace = "test_check_and_report_endpoints_separately"
    check = api.call("check", namespace, VALUES)
    assert (check.status_code, check.json()) == (200, None)
    report = api.call("report", namespace, VALUES)
    assert (report.status_code, report.json()) == (200, None)
    assert api.check(namespace, VALUES) == 429


def test_check_with_delta_0(api: Api) -> None:
    """`counter_is_within_limits`, limitador/src/storage/in_memory.rs: Limitador admits when
    `value + delta <= max_value`, so a check of 0 passes even on a spent counter. Ours counts 0 as
    1 (as Kuadrant's CheckRateLimit sends 0 to mean "may this caller go on?"): it passes while
    budget is left and is refused once it is spent (README.md lists the difference)."""
    assert api.check("check_with_delta_0", VALUES, 0) == 200
    assert api.report("check_with_delta_0", VALUES, 1) == 200
    assert api.check("check_with_delta_0", VALUES, 0) == 429
    assert api.remaining_by("check_with_delta_0", REQ_APP_ID) == {"1": 0}


def test_response_header_names_limits_and_quotes(api: Api) -> None:
    """`CheckResult::response_header`, limitador/src/lib.rs: the tightest counter first, then
    every counter's `max;w=seconds`, with `;name="..."` for named limits and a `"` inside the
    name written as `'`, so the header stays parseable."""
    answer = api.call("check_and_report", "response_header_names", {}, response_headers="DraftVersion03")
    assert answer.status_code == 200
    assert answer.headers["X-RateLimit-Limit"] == "2, 2;w=60;name=\"the 'gold' tier\", 5;w=3600"
    assert answer.headers["X-RateLimit-Remaining"] == "1"


def test_rate_limit_headers_option_is_for_the_rls_only(api: Api) -> None:
    """Limitador's `-H DRAFT_VERSION_03` configures the RLS server only (`run_envoy_rls_server`);
    its HTTP `check_and_report` adds headers only when the body's `response_headers` asks. This
    module's service runs with `-H DRAFT_VERSION_03`."""
    plain = api.call("check_and_report", "test_limits_read", VALUES)
    assert plain.status_code == 200
    assert not {name.lower() for name in RATE_LIMIT_HEADERS} & set(plain.headers)
    asked = api.call("check_and_report", "test_limits_read", VALUES, response_headers="DraftVersion03")
    assert asked.headers["X-RateLimit-Remaining"] == "8"
