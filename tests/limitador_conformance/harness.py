"""What the Limitador conformance tests share: a service per storage, and small HTTP helpers.

Limitador's own tests drive its library or its servers in-process; these drive the real
`ratelimit serve` process from outside, over its HTTP API and gRPC services, as a client of a
Limitador deployment would. Limitador's library tests bind descriptor entries as CEL root names
(`req_method == 'GET'`); through the servers those entries are `descriptors[0]`, so the ported
limits say `descriptors[0]['req_method'] == 'GET'`, exactly what the Limitador server would need.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import yaml

from tests.service_fixtures import ServiceProcess
from tests.support import wait_until

GET = {"req_method": "GET", "app_id": "test_app_id"}
"""The descriptor most of Limitador's library tests send."""

# Generous: these modules start a dozen services, on a machine that may be running much else.
STARTUP_TIMEOUT = 120.0

METHOD_IS_GET = "descriptors[0]['req_method'] == 'GET'"
APP_ID = "descriptors[0]['app_id']"
# Limitador's server tests name the entries with dots (`req.method`, `app.id`).
REQ_METHOD_IS_GET = "descriptors[0]['req.method'] == 'GET'"
REQ_APP_ID = "descriptors[0]['app.id']"


def limit(
    namespace: str, max_value: int, seconds: int = 60, conditions: tuple[str, ...] = (METHOD_IS_GET,),
    variables: tuple[str, ...] = (APP_ID,), **extra: Any,
) -> dict[str, Any]:
    """One limits-file entry; by default Limitador's test limit: GETs, counted per app_id."""
    return {"namespace": namespace, "max_value": max_value, "seconds": seconds,
            "conditions": list(conditions), "variables": list(variables), **extra}


def app_limit(namespace: str, max_value: int) -> dict[str, Any]:
    """Limitador's server tests' `create_test_limit`: GETs, counted per `app.id`, 60 s."""
    return limit(namespace, max_value, conditions=(REQ_METHOD_IS_GET,), variables=(REQ_APP_ID,))


def write_limits(path: Path, limits: list[dict[str, Any]]) -> None:
    """Replace the limits file as operators do: a new file renamed over the old one."""
    staging = path.with_name(f".{path.name}.staging")
    staging.write_text(yaml.safe_dump(limits, sort_keys=False))
    os.replace(staging, path)


def start_on(storage: str, limits_path: Path, request: pytest.FixtureRequest, *args: str) -> ServiceProcess:
    """A started service on `storage`: memory, or redis / redis_cached on the module's redis-server."""
    # Limitador's tests build their in-memory limiters with room for 10,000 counters; so do these
    # (a default 2M-counter table would make the first listing of a fresh service slow).
    storage_args = ["memory", "-c", "10000"]
    if storage != "memory":
        redis_server = request.getfixturevalue("redis_server")
        storage_args = [storage, redis_server.url]
    return ServiceProcess(limits_path, *args, *storage_args).start(timeout=STARTUP_TIMEOUT)


def storage_of(service: ServiceProcess) -> str:
    """The storage a service from `start_on` runs on."""
    return next((arg for arg in service.args if arg in ("redis", "redis_cached")), "memory")


@contextmanager
def serving(
    storage: str, limits: list[dict[str, Any]], request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory, *args: str,
) -> Iterator[ServiceProcess]:
    """A service on `storage` serving `limits` (for module-scoped fixtures: one per storage)."""
    path = tmp_path_factory.mktemp(f"limits-{storage}") / "limits.yaml"
    write_limits(path, limits)
    if storage != "memory":
        # The module's storages share one redis-server: each starts from an empty one.
        with request.getfixturevalue("redis_server").client() as client:
            client.flushall()
    service = start_on(storage, path, request, *args)
    try:
        yield service
    finally:
        service.close()


class Api:
    """Limitador's HTTP API, as its clients call it."""

    def __init__(self, service: ServiceProcess) -> None:
        self.service = service
        self.http: httpx.Client = service.http

    def call(
        self, endpoint: str, namespace: str, values: Mapping[str, str], delta: int = 1,
        response_headers: str | None = None,
    ) -> httpx.Response:
        body: dict[str, Any] = {"namespace": namespace, "values": dict(values), "delta": delta}
        if response_headers is not None:
            body["response_headers"] = response_headers
        return self.http.post(f"/{endpoint}", json=body)

    def check(self, namespace: str, values: Mapping[str, str], delta: int = 1) -> int:
        return self._status(self.call("check", namespace, values, delta))

    def report(self, namespace: str, values: Mapping[str, str], delta: int = 1) -> int:
        return self._status(self.call("report", namespace, values, delta))

    def check_and_report(self, namespace: str, values: Mapping[str, str], delta: int = 1) -> int:
        return self._status(self.call("check_and_report", namespace, values, delta))

    @staticmethod
    def _status(response: httpx.Response) -> int:
        assert response.status_code in (200, 429), f"{response.status_code}: {response.text}"
        return response.status_code

    def limits(self, namespace: str) -> list[dict[str, Any]]:
        response = self.http.get(f"/limits/{quote(namespace, safe='')}")
        response.raise_for_status()
        return response.json()

    def counters(self, namespace: str) -> list[dict[str, Any]]:
        response = self.http.get(f"/counters/{quote(namespace, safe='')}")
        response.raise_for_status()
        return response.json()

    def remaining_by(self, namespace: str, variable: str = APP_ID) -> dict[str, int]:
        """The namespace's counters as {value of `variable`: remaining}."""
        return {c["set_variables"][variable]: c["remaining"] for c in self.counters(namespace)}


class ReloadableLimits:
    """A service's limits file that tests rewrite, each test owning its namespaces.

    Every rewrite waits until the service has applied it (`/status` config_version moves on), so a
    test never races the file watcher.
    """

    def __init__(self, path: Path, service: ServiceProcess, limits: list[dict[str, Any]]) -> None:
        self.path = path
        self.service = service
        self.by_namespace: dict[str, list[dict[str, Any]]] = {}
        for entry in limits:
            self.by_namespace.setdefault(entry["namespace"], []).append(entry)

    def replace(self, namespace: str, limits: list[dict[str, Any]]) -> None:
        """Give `namespace` these limits (none: the namespace goes) and wait for the reload."""
        version = self.service.status()["config_version"]
        if limits:
            self.by_namespace[namespace] = limits
        else:
            self.by_namespace.pop(namespace, None)
        write_limits(self.path, [entry for group in self.by_namespace.values() for entry in group])
        wait_until(lambda: self.service.status()["config_version"] > version, timeout=20,
                   what=f"the reload changing {namespace!r}")
