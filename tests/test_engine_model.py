"""The engine over the memory storage behaves exactly like the plain reference model.

A hypothesis state machine sends random decisions, reports, reservations, commits, reloads and clock
jumps to both and compares every answer and every live counter.
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any, TypeVar

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, rule

from ratelimit import engine as engine_module
from ratelimit.counters import Commit, Decision
from ratelimit.engine import RateLimiter
from ratelimit.limits import Limit
from ratelimit.storage.memory import MemoryStorage
from tests.reference_model import ModelAnswer, ReferenceModel
from tests.support import OwnLoop

NS = "maas/model"
PER_USER_MINUTE = Limit(NS, 5, 60, ("descriptors[0]['model'] == 'a'",), ("descriptors[0]['user']",), name="minute")
PER_USER_HOUR = Limit(NS, 9, 3600, (), ("descriptors[0]['user']",), name="hour")
GLOBAL_BURST = Limit(NS, 12, 10, (), (), name="burst")
MODEL_B = Limit(NS, 7, 30, ("descriptors[0]['model'] == 'b'",), ("descriptors[0]['user']", "descriptors[0]['model']"))
OTHER_NS = Limit("other", 2, 5, (), ("descriptors[0]['user']",))

users = st.sampled_from(["alice", "bob", "carol"])
models = st.sampled_from(["a", "b", "c"])
small = st.integers(min_value=0, max_value=6)
T = TypeVar("T")


class EngineMatchesModel(RuleBasedStateMachine):
    reservations = Bundle("reservations")
    committed = Bundle("committed")
    keeps_removed_counters = True
    """The memory storage keeps counters of removed limits (for a window); subclasses may not."""
    retried_commit_charges_once = True
    """The memory storage remembers committed reservations until their ttl; subclasses may not yet."""

    def __init__(self) -> None:
        super().__init__()
        self.now_ms = 1_000_000
        self.storage = self.make_storage()
        self.limits = [PER_USER_MINUTE, PER_USER_HOUR, GLOBAL_BURST, MODEL_B, OTHER_NS]
        self.engine = RateLimiter(self.storage, self.limits)
        self.model = ReferenceModel(keeps_removed_counters=self.keeps_removed_counters)
        self.model.configure(self.limits)
        self.loop = OwnLoop()
        self.next_id = 0

    def make_storage(self) -> MemoryStorage:
        """The storage under test, on the machine's clock (subclasses test other storages)."""
        # A tiny capacity makes the storage reuse rows of expired counters all the time.
        return MemoryStorage(capacity=6, clock=lambda: self.now_ms / 1000)

    def teardown(self) -> None:
        self.loop.close()

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return self.loop.run(coroutine)

    def request(self, user: str, model: str, namespace: str = NS) -> tuple[list[dict[str, str]], list[tuple]]:
        descriptors = [{"user": user, "model": model}]
        return descriptors, self.model.keys_for(namespace, descriptors)

    def compare(self, decision: Decision | Commit, expected: ModelAnswer) -> None:
        limiting = decision.limited_by if isinstance(decision, Decision) else None  # a commit never limits
        limited_by = limiting.identity if limiting is not None else None
        assert limited_by == expected.limited_by
        assert states_of(decision.counters) == expected.states

    def storage_full(self, keys: list[tuple]) -> bool:
        """A capacity-6 table may be full (counters keep their rows for a window after their window
        ends, and new keys are refused); then the model's answer is not comparable."""
        occupied = {key for key in self.model.counters if self.model.occupies_row(key, self.now_ms)}
        return len(occupied | set(keys)) > self.storage.capacity

    @rule(ms=st.integers(min_value=0, max_value=70_000))
    def time_passes(self, ms: int) -> None:
        self.now_ms += ms

    @rule(user=users, model=models, delta=small)
    def check_and_report(self, user: str, model: str, delta: int) -> None:
        descriptors, keys = self.request(user, model)
        if self.storage_full(keys):
            return
        decision = self.run(self.engine.check_and_report(NS, descriptors, delta, load_counters=True))
        self.compare(decision, self.model.check_and_report(keys, delta, self.now_ms))

    @rule(user=users, model=models, delta=small)
    def check(self, user: str, model: str, delta: int) -> None:
        descriptors, keys = self.request(user, model)
        decision = self.run(self.engine.check(NS, descriptors, delta))
        self.compare(decision, self.model.check(keys, delta, self.now_ms))

    @rule(user=users, model=models, delta=st.integers(min_value=0, max_value=20))
    def report(self, user: str, model: str, delta: int) -> None:
        descriptors, keys = self.request(user, model)
        if self.storage_full(keys):
            return
        decision = self.run(self.engine.report(NS, descriptors, delta))
        self.compare(decision, self.model.report(keys, delta, self.now_ms))

    @rule(user=users)
    def other_namespace(self, user: str) -> None:
        descriptors, keys = self.request(user, "a", "other")
        if self.storage_full(keys):
            return
        decision = self.run(self.engine.check_and_report("other", descriptors, 1, load_counters=True))
        self.compare(decision, self.model.check_and_report(keys, 1, self.now_ms))

    @rule(target=reservations, user=users, model=models, amount=small, ttl_ms=st.integers(1, 90_000))
    def reserve(self, user: str, model: str, amount: int, ttl_ms: int):
        descriptors, keys = self.request(user, model)
        if self.storage_full(keys):
            return (None, user, model)
        decision = self.run(self.engine.reserve(NS, descriptors, amount, ttl_ms / 1000))
        expected = self.model.reserve(decision.reservation_id or "", keys, amount, ttl_ms, self.now_ms)
        self.compare(decision, expected)
        assert (decision.reservation_id is not None) == (expected.limited_by is None)
        return (decision.reservation_id, user, model)

    @rule(target=committed, reservation=consumes(reservations), actual=st.integers(0, 8))
    def commit(self, reservation: tuple, actual: int) -> tuple:
        self.commit_and_compare(reservation, actual)
        return reservation

    @rule(reservation=committed, actual=st.integers(0, 8))
    def retry_commit(self, reservation: tuple, actual: int) -> None:
        """A commit retried (a gateway that did not see the answer): charged once within the ttl."""
        if self.retried_commit_charges_once:
            self.commit_and_compare(reservation, actual)

    def commit_and_compare(self, reservation: tuple, actual: int) -> None:
        reservation_id, user, model = reservation
        if reservation_id is None:
            return
        descriptors, keys = self.request(user, model)
        if self.storage_full(keys):
            return
        decision = self.run(self.engine.commit(NS, descriptors, reservation_id, actual))
        held, expected = self.model.commit(reservation_id, keys, actual, self.now_ms)
        assert decision.held == held
        self.compare(decision, expected)

    @rule(max_value=st.integers(0, 10), drop_burst=st.booleans())
    def reload(self, max_value: int, drop_burst: bool) -> None:
        """A new max_value keeps the minute counters; dropping the burst limit hides its counters (the
        memory storage keeps them for a window: the limit resumes its counts when it comes back)."""
        minute = Limit(NS, max_value, 60, PER_USER_MINUTE.conditions, PER_USER_MINUTE.variables, name="minute")
        self.limits = [minute, PER_USER_HOUR, MODEL_B, OTHER_NS] + ([] if drop_burst else [GLOBAL_BURST])
        self.engine.configure_with(self.limits)
        self.model.configure(self.limits)

    @invariant()
    def live_counters_match(self) -> None:
        for namespace in (NS, "other"):
            counters = self.run(self.engine.get_counters(namespace))
            assert states_of(counters) == self.model.live_counters(namespace, self.now_ms)
            for status in counters:
                assert 0 <= status.remaining <= status.limit.max_value


def states_of(statuses) -> dict[tuple, tuple[int, int, int]]:
    return {
        (s.limit.identity, s.counter.values): (s.value, round(s.expires_in * 1000), s.reserved) for s in statuses
    }


EngineMatchesModel.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
TestEngineMatchesModel = EngineMatchesModel.TestCase


class EngineWithATinyMemoMatchesModel(EngineMatchesModel):
    """The same with a memo of a few sets a generation: sets are forgotten, and moved from the older
    generation to the young one, every few requests; no answer may differ for it."""

    def __init__(self) -> None:
        self.memo_bytes = engine_module.MEMO_BYTES
        engine_module.MEMO_BYTES = 4000  # ~800 bytes a set here: a generation holds two or three
        super().__init__()

    def teardown(self) -> None:
        super().teardown()
        engine_module.MEMO_BYTES = self.memo_bytes


EngineWithATinyMemoMatchesModel.TestCase.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
TestEngineWithATinyMemoMatchesModel = EngineWithATinyMemoMatchesModel.TestCase
