"""The HTTP API, end to end over the real engine and memory storage.

Each test reads as a specification of one behaviour a Limitador client (or our reserve/commit
client) relies on.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

import ratelimit.metrics
from ratelimit.counters import Counter, CounterStatus, Decision, StorageError
from ratelimit.engine import MAX_DELTA, InvalidRequest, RateLimiter
from ratelimit.limits import Limit, parse_limits
from ratelimit.metrics import Metrics
from ratelimit.server.http import _counters_json, create_http_app
from ratelimit.server.state import Service, ServiceOptions
from ratelimit.sources.status import ConfigStatus
from ratelimit.storage.base import CounterPage
from ratelimit.storage.memory import MemoryStorage

NS = "maas-demo/qwen3-14b"
NS_ENCODED = "maas-demo%2Fqwen3-14b"

LIMITS = f"""
- namespace: {NS}
  name: tokens-per-user
  max_value: 300
  seconds: 60
  conditions: ["descriptors[0]['kind'] == 'tokens'"]
  variables: ["descriptors[0]['user']"]
- namespace: {NS}
  max_value: 5
  seconds: 60
  conditions: ["descriptors[0]['kind'] == 'requests'"]
  variables: ["descriptors[0]['user']"]
- namespace: {NS}
  name: hourly
  max_value: 3
  seconds: 3600
  conditions: ["descriptors[0]['kind'] == 'requests'"]
  variables: ["descriptors[0]['user']"]
"""

TOKEN = "s3cret-token"
JSON = {"content-type": "application/json"}
# The app runs on the test's own event loop, as it runs on the server's.
Client = httpx.AsyncClient


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_service(limits: str = LIMITS, *, storage: MemoryStorage | None = None, **options: Any) -> Service:
    engine = RateLimiter(storage or MemoryStorage(), parse_limits(limits))
    status = ConfigStatus("limits.yaml")
    status.applied()
    metrics = Metrics(limit_name_in_labels=options.pop("limit_name_in_labels", False))
    return Service(engine, metrics, status, ServiceOptions(**options))


@pytest.fixture
def service() -> Service:
    return make_service()


def http_client(service: Service) -> Client:
    return httpx.AsyncClient(transport=httpx.ASGITransport(create_http_app(service)), base_url="http://ratelimit")


@pytest.fixture
async def client(service: Service) -> AsyncIterator[Client]:
    async with http_client(service) as test_client:
        yield test_client


def tokens(user: str, delta: object, **extra: Any) -> dict[str, Any]:
    """A body for user's request of `delta` (anything, to test the refusals of bad ones)."""
    return {"namespace": NS, "values": {"kind": "tokens", "user": user}, "delta": delta, **extra}


def requests_of(user: str, **extra: Any) -> dict[str, Any]:
    return {"namespace": NS, "values": {"kind": "requests", "user": user}, "delta": 1, **extra}


async def counters(client: Client, limit_name: str | None = None) -> list[dict[str, Any]]:
    response = await client.get(f"/counters/{NS_ENCODED}")
    assert response.status_code == 200
    return [c for c in response.json() if limit_name is None or c["limit"]["name"] == limit_name]


async def only_counter(client: Client, limit_name: str | None) -> dict[str, Any]:
    found = await counters(client, limit_name)
    assert len(found) == 1, found
    return found[0]


async def counter_field(client: Client, limit_name: str, field: str) -> Any:
    return (await only_counter(client, limit_name))[field]


async def post_status(client: Client, path: str, body: dict[str, Any], **kwargs: Any) -> int:
    return (await client.post(path, json=body, **kwargs)).status_code


# -- Limitador's decisions ----------------------------------------------------------------------


async def test_a_300_token_budget_admits_three_calls_of_100_then_refuses(client: Client) -> None:
    statuses = [await post_status(client, "/check_and_report", tokens("alice", 100)) for _ in range(4)]

    assert statuses == [200, 200, 200, 429]
    assert await counter_field(client, "tokens-per-user", "remaining") == 0


async def test_check_and_report_answers_json_null_and_a_429_names_the_limit(client: Client) -> None:
    admitted = await client.post("/check_and_report", json=tokens("alice", 300))
    refused = await client.post("/check_and_report", json=tokens("alice", 1))

    assert admitted.headers["content-type"] == "application/json"
    assert admitted.content == b"null"
    assert refused.status_code == 429
    assert refused.json() == {"error": "Too Many Requests", "limit_name": "tokens-per-user"}


async def test_a_report_past_the_limit_leaves_remaining_at_zero_and_shows_the_overshoot(client: Client) -> None:
    assert await post_status(client, "/report", tokens("alice", 250)) == 200
    response = await client.post("/report", json=tokens("alice", 100))

    assert response.status_code == 200
    assert response.content == b"null"
    counter = await only_counter(client, "tokens-per-user")
    assert counter["remaining"] == 0  # Limitador's u64 would wrap to 18446744073709551566
    assert counter["overshoot"] == 50
    assert counter["set_variables"] == {"descriptors[0]['user']": "alice"}


async def test_stacked_limits_admit_the_tightest_and_charge_only_admitted_calls(client: Client) -> None:
    statuses = [await post_status(client, "/check_and_report", requests_of("bob")) for _ in range(5)]

    assert statuses == [200, 200, 200, 429, 429]
    per_minute = [c for c in await counters(client) if c["limit"]["seconds"] == 60]
    assert len(per_minute) == 1
    assert per_minute[0]["remaining"] == 2  # 3 used: refused calls charge no counter
    assert await counter_field(client, "hourly", "remaining") == 0


async def test_check_is_read_only(client: Client) -> None:
    await client.post("/check_and_report", json=tokens("carol", 100))

    for _ in range(5):
        assert await post_status(client, "/check", tokens("carol", 200)) == 200
    refused = await client.post("/check", json=tokens("carol", 201))

    assert refused.status_code == 429
    assert refused.json()["limit_name"] == "tokens-per-user"
    assert await counter_field(client, "tokens-per-user", "remaining") == 200


async def test_check_of_a_fresh_counter_creates_nothing(client: Client) -> None:
    assert await post_status(client, "/check", tokens("dave", 0)) == 200
    assert await counters(client) == []


# -- X-RateLimit headers -----------------------------------------------------------------------


async def test_draft03_headers_report_the_tightest_counter_in_limitadors_format(client: Client) -> None:
    response = await client.post("/check_and_report", json=requests_of("erin", response_headers="DraftVersion03"))

    assert response.status_code == 200
    assert response.headers["X-RateLimit-Limit"] == '3, 3;w=3600;name="hourly", 5;w=60'
    assert response.headers["X-RateLimit-Remaining"] == "2"
    assert response.headers["X-RateLimit-Reset"] == "3600"


async def test_draft03_headers_come_with_a_429_too(client: Client) -> None:
    for _ in range(3):
        await client.post("/check_and_report", json=requests_of("erin"))
    response = await client.post("/check_and_report", json=requests_of("erin", response_headers="DraftVersion03"))

    assert response.status_code == 429
    assert response.headers["X-RateLimit-Remaining"] == "0"


async def test_no_headers_unless_asked(client: Client) -> None:
    response = await client.post("/check_and_report", json=requests_of("frank"))

    assert response.status_code == 200
    assert "X-RateLimit-Limit" not in response.headers


async def test_the_service_option_leaves_http_headers_to_the_body() -> None:
    """As in Limitador, -H/--rate-limit-headers is for the RLS: the HTTP API adds headers only
    when the body's `response_headers` asks for them."""
    unnamed = f"- {{namespace: {NS}, max_value: 3, seconds: 3600, conditions: [], variables: []}}\n" + (
        f"- {{namespace: {NS}, max_value: 5, seconds: 60, conditions: [], variables: []}}"
    )
    async with http_client(make_service(unnamed, rate_limit_headers=True)) as client:
        plain = await client.post("/check_and_report", json={"namespace": NS, "values": {}, "delta": 1})
        asked = await client.post(
            "/check_and_report", json={"namespace": NS, "values": {}, "delta": 1, "response_headers": "DraftVersion03"}
        )

    assert "X-RateLimit-Limit" not in plain.headers
    assert asked.headers["X-RateLimit-Limit"] == "3, 3;w=3600, 5;w=60"
    assert asked.headers["X-RateLimit-Remaining"] == "1"


# -- namespaces containing "/" ----------------------------------------------------------------


@pytest.mark.parametrize("path_namespace", [NS_ENCODED, NS])
async def test_limits_and_counters_accept_the_namespace_encoded_or_raw(client: Client, path_namespace: str) -> None:
    await client.post("/check_and_report", json=tokens("gina", 7))

    limits = await client.get(f"/limits/{path_namespace}")
    found = await client.get(f"/counters/{path_namespace}")

    assert limits.status_code == 200
    assert {limit["name"] for limit in limits.json()} == {"tokens-per-user", "hourly", None}
    assert limits.json()[0].keys() == {"id", "namespace", "max_value", "seconds", "name", "conditions", "variables"}
    assert found.status_code == 200
    assert [c["remaining"] for c in found.json()] == [293]


async def test_an_unknown_namespace_has_no_limits_and_no_counters(client: Client) -> None:
    assert (await client.get("/limits/nobody%2Fhere")).json() == []
    assert (await client.get("/counters/nobody")).json() == []


# -- reserve / commit -------------------------------------------------------------------------


def reserve_body(user: str, amount: int, ttl_seconds: float = 30) -> dict[str, Any]:
    return {"namespace": NS, "values": {"kind": "tokens", "user": user}, "amount": amount, "ttl_seconds": ttl_seconds}


def commit_body(user: str, reservation_id: str, actual: int) -> dict[str, Any]:
    values = {"kind": "tokens", "user": user}
    return {"namespace": NS, "values": values, "reservation_id": reservation_id, "actual": actual}


async def test_a_reservation_blocks_admission_until_commit_replaces_it_by_the_actual_use(
    client: Client,
) -> None:
    reserved = await client.post("/reserve", json=reserve_body("hank", 250))
    assert reserved.status_code == 200
    reservation_id = reserved.json()["reservation_id"]

    assert await post_status(client, "/check_and_report", tokens("hank", 100)) == 429
    held = await only_counter(client, "tokens-per-user")
    assert (held["reserved"], held["remaining"]) == (250, 50)

    committed = await client.post("/commit", json=commit_body("hank", reservation_id, 120))
    assert committed.status_code == 200
    assert committed.json() == {"reservation_held": True}
    after = await only_counter(client, "tokens-per-user")
    assert (after["reserved"], after["remaining"]) == (0, 180)
    assert await post_status(client, "/check_and_report", tokens("hank", 100)) == 200


async def test_a_reservation_that_does_not_fit_is_refused(client: Client) -> None:
    await client.post("/check_and_report", json=tokens("ivan", 200))

    refused = await client.post("/reserve", json=reserve_body("ivan", 101))

    assert refused.status_code == 429
    assert refused.json()["limit_name"] == "tokens-per-user"
    assert await counter_field(client, "tokens-per-user", "reserved") == 0


async def test_committing_an_expired_reservation_still_charges_the_actual_use() -> None:
    clock = FakeClock()
    async with http_client(make_service(storage=MemoryStorage(clock=clock))) as client:
        reserved = await client.post("/reserve", json=reserve_body("judy", 200, ttl_seconds=5))
        reservation_id = reserved.json()["reservation_id"]
        clock.now += 6

        committed = await client.post("/commit", json=commit_body("judy", reservation_id, 40))

        assert committed.json() == {"reservation_held": False}
        assert await counter_field(client, "tokens-per-user", "remaining") == 260


# -- bad input: 422 from the schema, 400 from the engine, 503 from the storage; never 500 -------


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (tokens("x", -1), "delta"),
        (tokens("x", MAX_DELTA + 1), "delta"),
        (tokens("x", 2**64), "delta"),
        (tokens("x", 1.5), "delta"),
        (tokens("x", "5"), "delta"),  # strict, as Limitador's u64: a string is not a number
        (tokens("x", True), "delta"),
        ({"namespace": NS, "values": {f"k{i}": "v" for i in range(10_000)}, "delta": 1}, "values"),
        ({"namespace": NS, "values": {"user": 7}, "delta": 1}, "values"),
        ({"namespace": NS, "values": {"user": ["a"]}, "delta": 1}, "values"),
        ({"namespace": NS, "values": {"": "empty key"}, "delta": 1}, "values"),
        ({"namespace": NS, "values": {"user": "x" * 5000}, "delta": 1}, "values"),
        ({"namespace": NS, "values": [], "delta": 1}, "values"),
        ({"values": {}, "delta": 1}, "namespace"),
        (tokens("x", 1, response_headers="DRAFT_VERSION_03"), "response_headers"),
    ],
)
async def test_malformed_bodies_get_422_naming_the_field(client: Client, body: dict[str, Any], field: str) -> None:
    for path in ("/check", "/report", "/check_and_report"):
        response = await client.post(path, json=body)

        assert response.status_code == 422, response.text
        assert any(error["loc"][:2] == ["body", field] for error in response.json()["detail"]), response.text


async def test_a_whole_number_written_as_a_float_is_a_delta(client: Client) -> None:
    # JSON Schema (and some JSON encoders) treat 100.0 as the integer 100.
    assert await post_status(client, "/check_and_report", tokens("x", 100.0)) == 200
    assert await counter_field(client, "tokens-per-user", "remaining") == 200


async def test_the_422_does_not_echo_a_huge_input(client: Client) -> None:
    body = {"namespace": NS, "values": {f"k{i}": "v" * 100 for i in range(10_000)}, "delta": 1}

    response = await client.post("/check_and_report", json=body)

    assert response.status_code == 422
    assert len(response.content) < 1000


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/reserve", reserve_body("x", -5), "amount"),
        ("/reserve", reserve_body("x", 5, ttl_seconds=0), "ttl_seconds"),
        ("/reserve", reserve_body("x", 5, ttl_seconds=10**9), "ttl_seconds"),
        ("/commit", commit_body("x", "", 5), "reservation_id"),
        ("/commit", commit_body("x", "id", MAX_DELTA + 1), "actual"),
    ],
)
async def test_malformed_reservations_get_422_naming_the_field(
    client: Client, path: str, body: dict[str, Any], field: str
) -> None:
    response = await client.post(path, json=body)

    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", field]


async def test_text_that_cannot_be_utf8_is_refused_before_it_reaches_counters_or_metrics(client: Client) -> None:
    body = b'{"namespace": "ns\\ud800", "values": {"user": "\\udfff"}, "delta": 1}'

    response = await client.post("/check_and_report", content=body, headers=JSON)

    assert response.status_code == 422
    assert (await client.get("/metrics")).status_code == 200


async def test_invalid_json_gets_422(client: Client) -> None:
    response = await client.post("/check_and_report", content=b"{not json", headers=JSON)

    assert response.status_code == 422


async def test_a_body_over_the_size_bound_gets_413_before_it_is_parsed(client: Client) -> None:
    response = await client.post("/report", content=b" " * (5 * 1024 * 1024), headers=JSON)

    assert response.status_code == 413
    assert "larger than" in response.json()["error"]


async def test_an_engine_refusal_is_a_400_naming_the_http_field(client: Client, service: Service) -> None:
    async def refuse(*args: Any, **kwargs: Any) -> Decision:
        raise InvalidRequest("descriptors[0]['user']", "value is too long")

    service.engine.check_and_report = refuse  # type: ignore[method-assign]

    response = await client.post("/check_and_report", json=tokens("x", 1))

    assert response.status_code == 400
    assert response.json() == {"error": "value is too long", "field": "values['user']"}


async def test_a_full_storage_is_a_503_not_a_500() -> None:
    async with http_client(make_service(storage=MemoryStorage(capacity=1))) as client:
        assert await post_status(client, "/check_and_report", tokens("first", 1)) == 200

        response = await client.post("/check_and_report", json=tokens("second", 1))

    assert response.status_code == 503
    assert "full" in response.json()["error"]


async def test_counters_page_with_a_cursor_and_filter_by_variable(client: Client) -> None:
    users = [f"user-{i:02d}" for i in range(25)]
    for user in users:
        assert await post_status(client, "/check_and_report", tokens(user, 10)) == 200
    seen: list[str] = []
    cursor: str | None = None
    pages = 0
    while True:
        params: dict[str, Any] = {"limit": 10, **({"cursor": cursor} if cursor else {})}
        response = await client.get(f"/counters/{NS_ENCODED}", params=params)
        assert response.status_code == 200
        page = response.json()
        assert len(page) <= 10
        seen.extend(c["set_variables"]["descriptors[0]['user']"] for c in page)
        pages += 1
        cursor = response.headers.get("x-next-cursor")
        if cursor is None:
            break
    assert sorted(seen) == users and pages == 3

    alice = await client.get(f"/counters/{NS_ENCODED}", params={"variable": "user:user-07"})
    assert [c["set_variables"] for c in alice.json()] == [{"descriptors[0]['user']": "user-07"}]
    assert "x-next-cursor" not in alice.headers
    by_source = await client.get(
        f"/counters/{NS_ENCODED}", params={"variable": "descriptors[0]['user']:user-08"}
    )
    assert len(by_source.json()) == 1
    nobody = await client.get(f"/counters/{NS_ENCODED}", params={"variable": ["user:user-07", "user:user-08"]})
    assert nobody.json() == []


async def test_an_unpaged_counters_call_is_capped(client: Client, monkeypatch: pytest.MonkeyPatch) -> None:
    """One call without `limit` returns at most MAX_COUNTERS_PER_CALL counters and a cursor to the rest."""
    import ratelimit.server.http as http_module

    monkeypatch.setattr(http_module, "MAX_COUNTERS_PER_CALL", 4)  # read when the app is built
    monkeypatch.setattr(http_module, "PAGE_CHUNK", 3)
    service = make_service()
    async with http_client(service) as capped:
        for i in range(6):
            assert await post_status(capped, "/check_and_report", tokens(f"u{i}", 1)) == 200
        first = await capped.get(f"/counters/{NS_ENCODED}")
        assert len(first.json()) == 4
        rest = await capped.get(f"/counters/{NS_ENCODED}", params={"cursor": first.headers["x-next-cursor"]})
        assert len(rest.json()) == 2 and "x-next-cursor" not in rest.headers


async def test_counters_refuses_a_bad_filter_or_cursor(client: Client) -> None:
    bad_filter = await client.get(f"/counters/{NS_ENCODED}", params={"variable": "no-colon"})
    assert bad_filter.status_code == 422
    typo = await client.get(f"/counters/{NS_ENCODED}", params={"limt": "10"})
    assert typo.status_code == 422 and typo.json()["detail"][0]["loc"] == ["query", "limt"]
    bad_cursor = await client.get(f"/counters/{NS_ENCODED}", params={"cursor": "not-a-cursor"})
    assert bad_cursor.status_code == 409 and bad_cursor.json()["field"] == "cursor"


async def test_a_failing_storage_on_counters_is_a_503(client: Client, service: Service) -> None:
    async def unreachable(*args: Any, **kwargs: Any) -> CounterPage:
        raise StorageError("redis is unreachable")

    service.engine.get_counters_page = unreachable  # type: ignore[method-assign]

    response = await client.get(f"/counters/{NS_ENCODED}")

    assert response.status_code == 503
    assert response.json()["error"] == "counter storage unavailable: redis is unreachable"


# -- bearer token ----------------------------------------------------------------------------


@pytest.fixture
async def guarded_client() -> AsyncIterator[Client]:
    async with http_client(make_service(api_token=TOKEN)) as test_client:
        yield test_client


@pytest.mark.parametrize(
    "authorization", [None, "Bearer wrong", f"Basic {TOKEN}", f"Bearer {TOKEN}x", "Bearer", f"Bearer {TOKEN[:-1]}"]
)
async def test_with_a_token_every_api_call_needs_it(guarded_client: Client, authorization: str | None) -> None:
    headers = {"Authorization": authorization} if authorization else {}
    calls = [
        ("POST", "/check_and_report", tokens("x", 1)),
        ("POST", "/check", tokens("x", 1)),
        ("POST", "/report", tokens("x", 1)),
        ("POST", "/reserve", reserve_body("x", 1)),
        ("POST", "/commit", commit_body("x", "id", 1)),
        ("GET", f"/limits/{NS_ENCODED}", None),
        ("GET", f"/counters/{NS_ENCODED}", None),
    ]
    for method, path, body in calls:
        response = await guarded_client.request(method, path, json=body, headers=headers)

        assert response.status_code == 401, path
        assert response.headers["WWW-Authenticate"] == "Bearer"
        assert response.json()["error"] == "missing or wrong bearer token"
    assert await counters_with_token(guarded_client) == []


async def counters_with_token(client: Client) -> list[dict[str, Any]]:
    return (await client.get(f"/counters/{NS_ENCODED}", headers={"Authorization": f"Bearer {TOKEN}"})).json()


async def test_with_the_right_token_calls_go_through(guarded_client: Client) -> None:
    headers = {"Authorization": f"bearer {TOKEN}"}  # the scheme is case-insensitive

    assert await post_status(guarded_client, "/check_and_report", tokens("x", 1), headers=headers) == 200
    assert (await counters_with_token(guarded_client))[0]["remaining"] == 299


async def test_metrics_and_status_stay_open_for_probes_and_scrapers(guarded_client: Client) -> None:
    assert (await guarded_client.get("/metrics")).status_code == 200
    assert (await guarded_client.get("/status")).status_code == 200


async def test_the_openapi_document_declares_the_scheme_only_when_it_is_enforced(
    client: Client, guarded_client: Client
) -> None:
    open_doc = (await client.get("/openapi.json")).json()
    guarded_doc = (await guarded_client.get("/openapi.json")).json()

    assert "securitySchemes" not in open_doc.get("components", {})
    assert guarded_doc["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    assert "401" in guarded_doc["paths"]["/check_and_report"]["post"]["responses"]
    assert "401" not in guarded_doc["paths"]["/metrics"]["get"]["responses"]


# -- metrics and status -----------------------------------------------------------------------


async def test_metrics_use_limitadors_names_and_count_only_check_and_report(client: Client) -> None:
    await client.post("/check_and_report", json=tokens("kim", 100))
    await client.post("/check_and_report", json=tokens("kim", 150))
    await client.post("/check_and_report", json=tokens("kim", 100))  # limited
    await client.post("/check", json=tokens("kim", 1))  # Limitador: /check and /report record nothing
    await client.post("/report", json=tokens("kim", 1))

    response = await client.get("/metrics")
    text = response.text

    assert response.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert f'authorized_calls{{limitador_namespace="{NS}"}} 2\n' in text
    assert f'authorized_hits{{limitador_namespace="{NS}"}} 250\n' in text
    assert f'limited_calls{{limitador_namespace="{NS}"}} 1\n' in text
    assert "# TYPE authorized_calls counter\n" in text
    assert "limitador_up 1\n" in text
    assert "_total" not in text
    families = {family.name: family.type for family in text_string_to_metric_families(text)}
    assert families == {
        "authorized_calls": "counter", "authorized_hits": "counter", "limited_calls": "counter", "limitador_up": "gauge"
    }


async def test_the_limit_name_label_is_added_with_the_option() -> None:
    async with http_client(make_service(limit_name_in_labels=True)) as client:
        for _ in range(4):
            await client.post("/check_and_report", json=requests_of("lee"))
        await client.post("/check_and_report", json=tokens("lee", 301))
        text = (await client.get("/metrics")).text

    assert f'limited_calls{{limit_name="hourly",limitador_namespace="{NS}"}} 1\n' in text
    assert f'limited_calls{{limit_name="tokens-per-user",limitador_namespace="{NS}"}} 1\n' in text
    assert f'authorized_calls{{limitador_namespace="{NS}"}} 3\n' in text


async def test_metrics_fold_namespaces_past_the_series_bound_into_one(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Namespaces come from requests: without a bound, a client could grow /metrics without end.
    monkeypatch.setattr(ratelimit.metrics, "MAX_SERIES", 2)
    for namespace in ("a", "b", "c", "d"):
        await client.post("/check_and_report", json={"namespace": namespace, "values": {}, "delta": 1})

    text = (await client.get("/metrics")).text

    assert 'authorized_calls{limitador_namespace="b"} 1\n' in text
    assert 'authorized_calls{limitador_namespace="c"}' not in text
    assert 'authorized_calls{limitador_namespace="__overflow__"} 2\n' in text


async def test_status_has_limitadors_fields_and_ours(client: Client, service: Service) -> None:
    service.status.failed("limits.yaml:3: limit #0: field 'seconds': must be a whole number")

    body = (await client.get("/status")).json()

    assert body.keys() == {
        "started_at", "config_applied_at", "config_version", "config_err_since", "config_error", "limits_source"
    }
    assert (body["config_version"], body["config_err_since"]) == (1, 1)
    assert body["config_error"].startswith("limits.yaml:3")
    assert body["limits_source"] == "limits.yaml"
    assert "+" not in body["started_at"] and not body["started_at"].endswith("Z")  # naive, as Limitador's


_TEXT = st.text(st.characters(codec="utf-8"), max_size=12)  # quotes, backslashes, controls, emoji


@settings(max_examples=200, deadline=None)
@given(
    rows=st.lists(st.tuples(st.integers(0, 2), st.lists(_TEXT, min_size=3, max_size=3), st.integers(0, 3000),
                            st.integers(0, 500), st.floats(0, 7200, allow_nan=False)), max_size=12),
    names=st.lists(_TEXT, min_size=3, max_size=3),
)
def test_counters_json_is_limitadors_shape_of_each_status(
    rows: list[tuple[int, list[str], int, int, float]], names: list[str]
) -> None:
    """/counters objects, written out directly, parse to exactly Limitador's shape built from each
    status; with limits of 0 to 2 variables, any value text, overshoot and reservations, and a limit
    replaced by a reload (equal identity, another max_value) between two chunks of one call."""
    limits = [
        Limit("ns", 1000, 60, (), (), name=names[0]),
        Limit("ns", 0, 3600, ("descriptors[0].tier == 'free'",), ("descriptors[0].user",), name=names[1]),
        Limit("ns", 2000, 30, (), ("descriptors[0].user", "descriptors[0]['model \"x\"']"), name=names[2]),
    ]
    reloaded = Limit("ns", 5, 60, (), (), name="reloaded")  # the same identity as limits[0]
    statuses = [
        CounterStatus(Counter(limits[which], tuple(values[: len(limits[which].variables)])), value, expires, reserved)
        for which, values, value, reserved, expires in rows
    ]
    later = [CounterStatus(Counter(reloaded, ()), 7, 30.0)]
    formatted: dict[int, Any] = {}
    text = f"[{_counters_json(statuses, formatted)},{_counters_json(later, formatted)}]" if statuses else \
        f"[{_counters_json(later, formatted)}]"
    assert json.loads(text) == [
        {
            "limit": status.limit.to_dict(),
            "set_variables": dict(zip(status.limit.variables, status.counter.values, strict=True)),
            "remaining": status.remaining,
            "expires_in_seconds": int(status.expires_in + 0.999),  # Limitador rounds up
            "overshoot": status.overshoot,
            "reserved": status.reserved,
        }
        for status in [*statuses, *later]
    ]
