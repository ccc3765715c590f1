"""The HTTP API's OpenAPI document tells the truth.

Schemathesis reads the app's own /openapi.json, sends generated requests (valid ones and, in its
negative phases, invalid ones) to every operation, and runs all its default checks on each answer:
no 5xx, every status code documented, bodies and content types as documented, invalid data
rejected, valid data accepted, and (with a token) authentication actually enforced.
"""

from __future__ import annotations

import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, settings

from ratelimit.engine import RateLimiter
from ratelimit.limits import parse_limits
from ratelimit.metrics import Metrics
from ratelimit.server.http import create_http_app
from ratelimit.server.state import Service, ServiceOptions
from ratelimit.sources.status import ConfigStatus
from ratelimit.storage.memory import MemoryStorage

# Small budgets, so the documented examples (namespace maas-demo/qwen3-14b, user alice) soon get 429s.
LIMITS = """
- namespace: maas-demo/qwen3-14b
  name: tokens-per-user
  max_value: 500
  seconds: 60
  conditions: ["descriptors[0]['tier'] == 'free'"]
  variables: ["descriptors[0]['user']"]
- namespace: maas-demo/qwen3-14b
  max_value: 3
  seconds: 3600
  conditions: []
  variables: ["descriptors[0]['user']"]
- namespace: plain
  max_value: 10
  seconds: 1
  conditions: []
  variables: []
"""

TOKEN = "openapi-test-token"

# Bounded so the whole module runs in well under a minute; every operation still gets the examples,
# coverage and fuzzing phases.
BOUNDED = settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))


def build_app(api_token: str | None = None) -> FastAPI:
    engine = RateLimiter(MemoryStorage(capacity=100_000), parse_limits(LIMITS))
    status = ConfigStatus("limits.yaml")
    status.applied()
    options = ServiceOptions(rate_limit_headers=True, api_token=api_token)
    return create_http_app(Service(engine, Metrics(limit_name_in_labels=True), status, options))


open_schema = schemathesis.openapi.from_asgi("/openapi.json", build_app())
guarded_schema = schemathesis.openapi.from_asgi("/openapi.json", build_app(TOKEN))


@open_schema.parametrize()
@BOUNDED
def test_the_api_without_a_token_conforms_to_its_document(case: schemathesis.Case) -> None:
    case.call_and_validate()


@guarded_schema.parametrize()
@BOUNDED
def test_the_api_with_a_token_conforms_to_its_document(case: schemathesis.Case) -> None:
    case.call_and_validate(headers={"Authorization": f"Bearer {TOKEN}"})
