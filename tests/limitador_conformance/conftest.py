"""The conformance modules' shared fixture: `api`, Limitador's HTTP API on the module's `service`
(each module starts its own service, with its own limits, through harness.serving)."""

from __future__ import annotations

import pytest

from tests.limitador_conformance.harness import Api
from tests.service_fixtures import ServiceProcess


@pytest.fixture
def api(service: ServiceProcess) -> Api:
    return Api(service)
