"""The rate limiter: which limits apply to a request, and what the storage says about them.

Storage-agnostic and protocol-agnostic: servers translate wire messages into these calls.
`descriptors` is a list of string maps, one per Envoy RLS descriptor (the HTTP API's `values` is
`descriptors[0]`), bound as CEL `descriptors` when conditions and variables are evaluated.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, cast

import numpy as np

from ratelimit.counters import Commit, Counter, CounterStatus, Decision, Reservation
from ratelimit.limits import Limit, unique_limits
from ratelimit.pacing import Pace
from ratelimit.storage.base import CounterFilter, CounterPage, CounterSet, Storage

# Input bounds: a request beyond these is a mistake or an attack, never a real gateway call.
MAX_NAMESPACE_LENGTH = 4096
MAX_DESCRIPTORS = 64
MAX_ENTRIES = 64
MAX_KEY_LENGTH = 256
MAX_VALUE_LENGTH = 4096
MAX_DELTA = 2**32 - 1  # Envoy's request-level hits_addend is a uint32; tokens per request fit easily
MAX_RESERVATION_TTL = 24 * 3600.0

# The memo of resolved descriptor sets is bounded in bytes, not entries: a descriptor set can be a
# few bytes or megabytes (64 descriptors of 64 entries of 4 KiB values), and every distinct one is
# remembered. It keeps two generations of at most MEMO_BYTES / 2 each (see _DescriptorMemo): when
# the young one is full the older one is forgotten (both on reload). A set larger than
# MEMO_ENTRY_BYTES is resolved on every request instead: no real gateway call is that large, and
# remembering a few of them would take the whole budget.
MEMO_BYTES = 64 * 1024 * 1024
MEMO_ENTRY_BYTES = 64 * 1024
_MEMO_ENTRY_OVERHEAD = 400  # the dict slot, key tuples and CounterSet; each entry adds ~160 (two str headers, a pair)

Descriptors = Sequence[Mapping[str, str]]
MemoKey = tuple[object, ...]
"""The namespace and the descriptors' content, hashable (see _memo_key)."""


class InvalidRequest(ValueError):
    """A request the engine refuses: names the field and why. Servers map it to 400 / INVALID_ARGUMENT."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name
        self.message = message


class InvalidCursor(InvalidRequest):
    """A listing cursor the storage did not hand out, or no longer understands."""

    def __init__(self, message: str) -> None:
        super().__init__("cursor", message)


class RateLimiter:
    def __init__(self, storage: Storage, limits: Iterable[Limit] = ()) -> None:
        self.storage = storage
        self._limits_by_namespace: dict[str, tuple[Limit, ...]] = {}
        self._memo = _DescriptorMemo()
        self.configure_with(limits)

    # -- configuration ---------------------------------------------------------------------------

    def configure_with(self, limits: Iterable[Limit]) -> None:
        """Replace the limits. Counters of limits whose identity is unchanged are kept."""
        unique = unique_limits(limits)
        self.storage.configure(unique)
        by_namespace: dict[str, list[Limit]] = {}
        for limit in unique:
            by_namespace.setdefault(limit.namespace, []).append(limit)
        replaced, self._limits_by_namespace = self._limits_by_namespace, {
            ns: tuple(group) for ns, group in by_namespace.items()
        }
        # The memo (keys too: they hold the descriptors) and the replaced limits (each with its
        # compiled CEL: thousands of objects to free) go a chunk per turn, not in this one.
        _release_later(*self._memo.generations, [limit for group in replaced.values() for limit in group])
        self._memo = _DescriptorMemo()

    @property
    def namespaces(self) -> list[str]:
        return sorted(self._limits_by_namespace)

    def get_limits(self, namespace: str) -> list[Limit]:
        return list(self._limits_by_namespace.get(namespace, ()))

    def all_limits(self) -> list[Limit]:
        return [limit for group in self._limits_by_namespace.values() for limit in group]

    # -- which counters a request touches ---------------------------------------------------------

    def counters_for(self, namespace: str, descriptors: Descriptors) -> CounterSet:
        """The counters of every limit in the namespace that applies to these descriptors.

        Conditions and variables are pure functions of the descriptors, so the answer is memoized by
        the descriptors' content; validation runs only when the content is new.
        """
        try:
            key = _memo_key(namespace, descriptors)
            found = self._memo.get(key)
        except (AttributeError, TypeError):  # not a list of maps, or unhashable values
            _validate_descriptors(descriptors)
            raise InvalidRequest("descriptors", "must be a list of maps of string to string") from None
        if found is None:
            return self._memoize(key, namespace, descriptors)
        return found

    def _memoize(self, key: MemoKey, namespace: str, descriptors: Descriptors) -> CounterSet:
        if not isinstance(namespace, str) or len(namespace) > MAX_NAMESPACE_LENGTH:
            raise InvalidRequest("namespace", f"must be a string of at most {MAX_NAMESPACE_LENGTH} characters")
        _validate_descriptors(descriptors)
        found = CounterSet(self._resolve(namespace, descriptors))
        self._memo.remember(key, found)
        return found

    def _resolve(self, namespace: str, descriptors: Descriptors) -> tuple[Counter, ...]:
        counters = []
        for limit in self._limits_by_namespace.get(namespace, ()):
            binding = limit.cel_binding
            if not all(predicate.test(descriptors, binding) for predicate in limit.predicates):
                continue
            values = []
            for expression in limit.expressions:
                value = expression.evaluate(descriptors, binding)
                if value is None:  # an unresolvable variable means the limit does not apply
                    break
                values.append(value)
            else:
                counters.append(Counter(limit, tuple(values)))
        return tuple(counters)

    # -- decisions -------------------------------------------------------------------------------

    async def check(self, namespace: str, descriptors: Descriptors, delta: int = 1) -> Decision:
        """Read-only: within limits while every counter has room for `delta` (0 counts as 1: a pure
        check passes while any budget is left)."""
        counters = self.counters_for(namespace, descriptors)
        return await self.storage.is_within_limits(counters, max(1, _checked_delta(delta)))

    async def report(self, namespace: str, descriptors: Descriptors, delta: int) -> Decision:
        """Charge `delta` to every applicable counter, even past the limit (the overshoot is kept);
        never limited."""
        counters = self.counters_for(namespace, descriptors)
        answer = await self.storage.update_counters(counters, _checked_delta(delta))
        return Decision(None, answer.counters)

    async def check_and_report(
        self, namespace: str, descriptors: Descriptors, delta: int = 1, load_counters: bool = False
    ) -> Decision:
        """Atomically: limited (charging nothing) if any counter lacks room for `delta`, else charge all."""
        counters = self.counters_for(namespace, descriptors)
        return await self.storage.check_and_update(counters, _checked_delta(delta), load_counters)

    async def reserve(self, namespace: str, descriptors: Descriptors, amount: int, ttl_seconds: float) -> Reservation:
        """Hold `amount` on every counter if it fits; the answer carries the reservation id.
        An amount of 0 holds 1: holding nothing would admit a caller whose budget is spent."""
        if not 0 < ttl_seconds <= MAX_RESERVATION_TTL:
            raise InvalidRequest("ttl_seconds", f"must be more than 0 and at most {MAX_RESERVATION_TTL:g} seconds")
        counters = self.counters_for(namespace, descriptors)
        answer = await self.storage.reserve(counters, max(1, _checked_delta(amount, "amount")), ttl_seconds)
        if answer.reservation_id is not None:
            answer.reservation_id = f"{answer.reservation_id}{_DIGEST_SEPARATOR}{_request_digest(namespace, descriptors)}"
        return answer

    async def commit(self, namespace: str, descriptors: Descriptors, reservation_id: str, actual: int) -> Commit:
        """Replace a reservation by the amount really used. The amount is charged even when the
        reservation has expired meanwhile: tokens spent are never lost.

        The id carries a digest of the namespace and descriptors it was reserved for: a commit naming
        others is refused (it would release one hold and charge other counters). An id without one
        (not from reserve) is charged and reported not held, as an expired one."""
        if not reservation_id or len(reservation_id) > MAX_KEY_LENGTH:
            raise InvalidRequest("reservation_id", "must be a non-empty id from reserve")
        storage_id, separator, digest = reservation_id.rpartition(_DIGEST_SEPARATOR)
        if separator and not _DIGEST_FORMAT.fullmatch(digest):
            # Not a digest this engine wrote (a client's own id that happens to hold the separator).
            storage_id, separator = reservation_id, ""
        if separator and digest != _request_digest(namespace, descriptors):
            raise InvalidRequest(
                "reservation_id",
                "was reserved for another namespace or other descriptors; commit with those of its reserve",
            )
        counters = self.counters_for(namespace, descriptors)
        return await self.storage.commit(
            storage_id if separator else reservation_id, counters, _checked_delta(actual, "actual")
        )

    async def get_counters(self, namespace: str) -> list[CounterStatus]:
        return await self.storage.get_counters(self.get_limits(namespace))

    async def get_counters_page(
        self, namespace: str, cursor: str | None, max_counters: int, match: CounterFilter | None = None
    ) -> CounterPage:
        """One page of the namespace's live counters (see Storage.get_counters_page)."""
        try:
            return await self.storage.get_counters_page(self.get_limits(namespace), cursor, max_counters, match)
        except InvalidRequest:
            raise
        except ValueError as error:  # a cursor the storage did not hand out
            raise InvalidCursor(str(error)) from None


_DIGEST_SEPARATOR = "~"
_DIGEST_FORMAT = re.compile(r"[0-9a-f]{16}")  # what _request_digest writes


def _request_digest(namespace: str, descriptors: Descriptors) -> str:
    """A short digest of what a reservation was made for; entry order does not matter."""
    content = [namespace, *(sorted(descriptor.items()) for descriptor in descriptors)]
    return hashlib.blake2b(json.dumps(content).encode("utf-8"), digest_size=8).hexdigest()


RELEASE_BATCH = 10
"""Forgotten memo entries (or replaced limits) freed at a time, until a slice of work is done."""


def _release_later(*containers: list[Any] | dict[Any, Any]) -> None:
    """Free forgotten memo generations and replaced limits in paced slices on the running event
    loop (ratelimit.pacing), one container after the other: dropping a memo of hundreds of
    thousands of counters, or a few thousand limits, at once is milliseconds to tens of
    milliseconds of deallocation, a stall of every decision (a reload forgets the whole memo and
    the old limits); freed back to back, a slice per turn, they still kept the loop busy for 60 ms.
    Without a running loop, or when there is little to free, they go with the caller's reference."""
    pending = [container for container in containers if len(container) > RELEASE_BATCH]
    if not pending:
        return
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return
    pace = Pace()

    def release() -> None:
        pace.begin()
        while pending and not pace.worked_a_slice():
            container = pending[-1]
            if isinstance(container, dict):
                for _ in range(min(RELEASE_BATCH, len(container))):
                    container.popitem()
            else:
                del container[-RELEASE_BATCH:]
            if not container:
                pending.pop()
        if pending:
            loop.call_later(pace.rest_seconds(), release)

    loop.call_soon(release)


class _DescriptorMemo:
    """The counter sets of the descriptor contents seen lately, bounded in bytes, in two
    generations: new sets go to the young one; when it would pass MEMO_BYTES / 2, the older
    generation is forgotten whole and the young one becomes it. A set found in the older
    generation moves to the young one, so a working set that fits survives every turn.

    Forgetting is one step however large the memo (the forgotten generation is freed in paced
    slices by _release_later): forgetting the older half entry by entry held the loop 40-100 ms
    in the request that filled the memo. Values are the sets alone, sizes are computed from the
    keys: a (set, size) pair per entry was one more object for the cyclic GC to walk."""

    def __init__(self) -> None:
        self.young: dict[MemoKey, CounterSet] = {}
        self.older: dict[MemoKey, CounterSet] = {}
        self.young_bytes = 0
        self.older_bytes = 0
        """What the older generation held when it was young: an upper bound (sets moved out since
        are counted in both until it is forgotten)."""
        self._limit_tuples: dict[tuple[Limit, ...], tuple[Limit, ...]] = {}
        """One tuple per distinct combination of limits the sets hold (see remember)."""

    @property
    def generations(self) -> tuple[dict[MemoKey, CounterSet], dict[MemoKey, CounterSet]]:
        return self.young, self.older

    @property
    def bytes(self) -> int:
        return self.young_bytes + self.older_bytes

    def get(self, key: MemoKey) -> CounterSet | None:
        found = self.young.get(key)
        if found is None and self.older:
            found = self.older.pop(key, None)
            if found is not None:
                self._add(key, found, _memo_entry_bytes(key))
        return found

    def remember(self, key: MemoKey, found: CounterSet) -> None:
        """Keep `found` for `key`, unless it is larger than one entry may be."""
        # Sets of the same limits share one tuple of them: Python's cyclic garbage collector walks
        # every element of every tracked tuple on each full collection, and 4,700 memoized sets of
        # 64 limits each made that 15 ms (a stall of every decision); shared, it is one tuple.
        found.limits = self._limit_tuples.setdefault(found.limits, found.limits)
        size = _memo_entry_bytes(key)
        if size <= MEMO_ENTRY_BYTES:
            self._add(key, found, size)

    def _add(self, key: MemoKey, found: CounterSet, size: int) -> None:
        if self.young_bytes + size > MEMO_BYTES // 2:
            _release_later(self.older)
            self.older, self.older_bytes = self.young, self.young_bytes
            self.young, self.young_bytes = {}, 0
            self._limit_tuples = {}  # bounded by what the memo holds: sets made from now on share anew
        self.young[key] = found
        self.young_bytes += size


def _memo_key(namespace: str, descriptors: Descriptors) -> MemoKey:
    """The descriptors' content as a hashable key; one descriptor (Envoy's usual call) is the fast case."""
    if len(descriptors) == 1:
        return (namespace, tuple(descriptors[0].items()))
    return (namespace, *[tuple(d.items()) for d in descriptors])


def _memo_entry_bytes(key: MemoKey) -> int:
    """The memo's estimate of one entry's size, from its key (the namespace, then each descriptor's
    (name, value) pairs)."""
    namespace = cast(str, key[0])
    descriptors = cast("tuple[tuple[tuple[str, str], ...], ...]", key[1:])
    pairs = (pair for descriptor in descriptors for pair in descriptor)
    return _MEMO_ENTRY_OVERHEAD + len(namespace) + sum(len(k) + len(v) + 160 for k, v in pairs)


def _checked_delta(delta: int, field_name: str = "delta") -> int:
    if isinstance(delta, bool) or not isinstance(delta, (int, np.integer)):
        raise InvalidRequest(field_name, f"must be a whole number, got {delta!r}")
    if not 0 <= delta <= MAX_DELTA:
        raise InvalidRequest(field_name, f"must be between 0 and {MAX_DELTA}, got {delta}")
    return int(delta)


def _validate_descriptors(descriptors: Descriptors) -> None:
    if not isinstance(descriptors, Sequence) or isinstance(descriptors, str):
        raise InvalidRequest("descriptors", "must be a list of maps of string to string")
    if len(descriptors) > MAX_DESCRIPTORS:
        raise InvalidRequest("descriptors", f"{len(descriptors)} descriptors, at most {MAX_DESCRIPTORS} allowed")
    for i, entries in enumerate(descriptors):
        if not isinstance(entries, Mapping):
            raise InvalidRequest(f"descriptors[{i}]", f"must be a map of string to string, got {type(entries).__name__}")
        if len(entries) > MAX_ENTRIES:
            raise InvalidRequest(f"descriptors[{i}]", f"{len(entries)} entries, at most {MAX_ENTRIES} allowed")
        for key, value in entries.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise InvalidRequest(f"descriptors[{i}]", f"keys and values must be strings, got {key!r}: {value!r}")
            if not key or len(key) > MAX_KEY_LENGTH:
                raise InvalidRequest(f"descriptors[{i}]", f"key must be 1 to {MAX_KEY_LENGTH} characters, got {len(key)}")
            if len(value) > MAX_VALUE_LENGTH:
                raise InvalidRequest(
                    f"descriptors[{i}][{key[:64]!r}]", f"value is {len(value)} characters, at most {MAX_VALUE_LENGTH}"
                )
            if not (key.isascii() and value.isascii()):
                try:  # storages key counters by UTF-8 bytes; lone surrogates have none
                    key.encode("utf-8")
                    value.encode("utf-8")
                except UnicodeEncodeError:
                    raise InvalidRequest(f"descriptors[{i}]", "keys and values must be valid Unicode text") from None
