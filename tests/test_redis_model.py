"""The core's stateful property test, against real Redis: a single node and a 3-node Redis Cluster.

The machine from test_engine_model drives the engine over RedisStorage and the plain reference model
side by side (random decisions, reports, reservations, commits, reloads, clock jumps) and compares
every answer and every live counter. In the cluster, most requests span slots (per-user, per-user-
and-model and global limits hash apart), so the two-phase path is compared with the model too.
"""

from __future__ import annotations

from collections.abc import Callable

from hypothesis import settings
from hypothesis.stateful import run_state_machine_as_test

from ratelimit.storage.redis import RedisOptions, RedisStorage
from tests.redis_fixtures import RedisCluster, RedisServer
from tests.test_engine_model import EngineMatchesModel

# Redis evicts keys on its own clock, while the machine's clock jumps ahead at will: keep keys for an
# hour past their window, so only the stored window ends (the logic) decide, never eviction.
GRACE_SECONDS = 3600


def machine_on(url: str, flush: Callable[[], None]) -> type[EngineMatchesModel]:
    class RedisMatchesModel(EngineMatchesModel):
        keeps_removed_counters = False  # RedisStorage deletes a removed limit's counters
        # decide.lua marks committed ids, but a retry at exactly the ttl is still treated as retried there
        # (the model: expired, charged): the boundary differs, so the retry rule stays off for Redis.
        retried_commit_charges_once = False
        def make_storage(self) -> RedisStorage:  # type: ignore[override]
            flush()  # every example starts from an empty Redis
            return RedisStorage(
                RedisOptions(url, timeout=10, clock=lambda: self.now_ms / 1000, expiry_grace=GRACE_SECONDS)
            )

        def storage_full(self, keys: list[tuple]) -> bool:
            return False  # Redis has no counter capacity

        def teardown(self) -> None:
            self.run(self.storage.close())
            super().teardown()

    return RedisMatchesModel


def test_single_node_matches_model(redis_server: RedisServer) -> None:
    def flush() -> None:
        with redis_server.client() as client:
            client.flushall()

    run_state_machine_as_test(
        machine_on(redis_server.url, flush),
        settings=settings(max_examples=150, stateful_step_count=40, deadline=None),
    )


def test_cluster_matches_model(redis_cluster: RedisCluster) -> None:
    run_state_machine_as_test(
        machine_on(redis_cluster.url, redis_cluster.flush),
        settings=settings(max_examples=100, stateful_step_count=40, deadline=None),
    )
