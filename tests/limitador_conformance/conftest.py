"""Fixtures for the Limitador conformance tests: the module-scoped Redis server they share."""

from tests.redis_fixtures import redis_server  # noqa: F401  (a pytest fixture)
