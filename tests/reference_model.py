"""A plain-Python model of the limiter's accounting, written for clarity, not speed.

Property tests drive it side by side with the real engine and storages and compare every answer.
Time is integer milliseconds from a controllable clock, as the storages see it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ratelimit.limits import Limit


@dataclass
class ModelCounter:
    value: int = 0
    expires_at: int = 0
    reserved: int = 0


@dataclass
class ModelAnswer:
    limited_by: tuple | None  # identity of the first limit without room
    states: dict[tuple, tuple[int, int, int]]  # counter key -> (value in window, ms to reset, reserved)


@dataclass
class ReferenceModel:
    limits: list[Limit] = field(default_factory=list)
    counters: dict[tuple, ModelCounter] = field(default_factory=dict)
    reservations: dict[str, tuple[list[tuple], int, int]] = field(default_factory=dict)
    committed: dict[str, int] = field(default_factory=dict)  # reservation id -> its expiry

    keeps_removed_counters: bool = False
    """Whether counters of a limit that a reload removes stay (the memory storage keeps them for
    one window, so a limit that comes back resumes its counts) or are deleted (Redis)."""

    def configure(self, limits: list[Limit]) -> None:
        identities = {limit.identity for limit in limits}
        self.limits = list(limits)
        if self.keeps_removed_counters:
            return  # kept as they are; listings show only configured limits' counters
        self.counters = {k: c for k, c in self.counters.items() if k[0] in identities}
        for reservation_id, (keys, amount, expires) in list(self.reservations.items()):
            self.reservations[reservation_id] = ([k for k in keys if k[0] in identities], amount, expires)

    def occupies_row(self, key: tuple, now: int) -> bool:
        """Whether the memory storage keeps a row for this counter: while it holds a reservation, and
        until one window after its window ended (existing counters keep their rows before new keys)."""
        self._expire_reservations(now)
        counter = self.counters.get(key)
        if counter is None:
            return False
        return counter.reserved > 0 or (counter.expires_at > 0 and counter.expires_at + self.window_of(key) > now)

    def max_of(self, key: tuple) -> int:
        return next(limit.max_value for limit in self.limits if limit.identity == key[0])

    def window_of(self, key: tuple) -> int:
        return key[0][1] * 1000

    def keys_for(self, namespace: str, descriptors: list[dict[str, str]]) -> list[tuple]:
        keys = []
        for limit in self.limits:
            if limit.namespace != namespace:
                continue
            binding = {"name": limit.name, "id": limit.id}
            if not all(p.test(descriptors, binding) for p in limit.predicates):
                continue
            values = [e.evaluate(descriptors, binding) for e in limit.expressions]
            if None not in values:
                keys.append((limit.identity, tuple(values)))
        return keys

    # -- the semantics -----------------------------------------------------------------------------

    def _expire_reservations(self, now: int) -> None:
        for reservation_id, (keys, amount, expires) in list(self.reservations.items()):
            if expires <= now:
                self._release(keys, amount)
                del self.reservations[reservation_id]

    def _release(self, keys: list[tuple], amount: int) -> None:
        for key in keys:
            self.counters[key].reserved -= amount

    def _used(self, key: tuple, now: int) -> int:
        counter = self.counters.get(key)
        return counter.value if counter and counter.expires_at > now else 0

    def _first_without_room(self, keys: list[tuple], amount: int, now: int) -> tuple | None:
        for key in keys:
            reserved = self.counters[key].reserved if key in self.counters else 0
            if self._used(key, now) + reserved + amount > self.max_of(key):
                return key[0]
        return None

    def _charge(self, keys: list[tuple], delta: int, now: int) -> None:
        if delta == 0:
            return
        for key in keys:
            counter = self.counters.setdefault(key, ModelCounter())
            if counter.expires_at <= now:
                counter.value, counter.expires_at = delta, now + self.window_of(key)
            else:
                counter.value += delta

    def _answer(self, limited_by: tuple | None, keys: list[tuple], now: int) -> ModelAnswer:
        states = {}
        for key in keys:
            counter = self.counters.get(key, ModelCounter())
            running = counter.expires_at > now
            states[key] = (counter.value if running else 0, counter.expires_at - now if running else 0, counter.reserved)
        return ModelAnswer(limited_by, states)

    def check_and_report(self, keys: list[tuple], delta: int, now: int) -> ModelAnswer:
        self._expire_reservations(now)
        limited_by = self._first_without_room(keys, delta, now)
        if limited_by is None:
            self._charge(keys, delta, now)
        return self._answer(limited_by, keys, now)

    def check(self, keys: list[tuple], delta: int, now: int) -> ModelAnswer:
        self._expire_reservations(now)
        return self._answer(self._first_without_room(keys, max(1, delta), now), keys, now)

    def report(self, keys: list[tuple], delta: int, now: int) -> ModelAnswer:
        self._expire_reservations(now)
        self._charge(keys, delta, now)
        return self._answer(None, keys, now)

    def reserve(self, reservation_id: str, keys: list[tuple], amount: int, ttl_ms: int, now: int) -> ModelAnswer:
        self._expire_reservations(now)
        amount = max(1, amount)  # holding nothing would admit a caller whose budget is spent
        limited_by = self._first_without_room(keys, amount, now)
        if limited_by is None:
            for key in keys:
                self.counters.setdefault(key, ModelCounter()).reserved += amount
            self.reservations[reservation_id] = (list(keys), amount, now + ttl_ms)
        return self._answer(limited_by, keys, now)

    def commit(self, reservation_id: str, keys: list[tuple], actual: int, now: int) -> tuple[bool, ModelAnswer]:
        """Release the reservation and charge `actual`; a retried commit of an id committed within
        its ttl charges nothing (tokens are charged once), one that expired unreleased is charged."""
        self._expire_reservations(now)
        held = self.reservations.pop(reservation_id, None)
        if held is not None:
            self._release(held[0], held[1])
            self.committed[reservation_id] = held[2]
        elif self.committed.get(reservation_id, 0) > now:
            return False, self._answer(None, keys, now)
        self._charge(keys, actual, now)
        return held is not None, self._answer(None, keys, now)

    def live_counters(self, namespace: str, now: int) -> dict[tuple, tuple[int, int, int]]:
        self._expire_reservations(now)
        configured = {limit.identity for limit in self.limits}
        live = [
            key for key, c in self.counters.items()
            if key[0][0] == namespace and key[0] in configured and (c.expires_at > now or c.reserved > 0)
        ]
        return self._answer(None, live, now).states
