"""Counters in Redis, shared by every replica (`ratelimit serve LIMITS_FILE redis URL`).

Every decision (check_and_report, check, report, reserve, commit) is one Lua script call,
`lua/decide.lua`, over all counters of the request: Redis runs a script to its end before any other
command, so stacked limits are checked and charged atomically across replicas (Limitador reads,
decides in Rust, then writes each counter, and stacked limits race past their maximum).

Keys (`rl:` is the default prefix; <limit> is a digest of the limit's identity, so a reload that
only changes max_value or name keeps the counters):

    rl:{<namespace>|<values>}:<limit>     counter, a hash: v value, e window end (ms), r reserved,
                                          n reservations held, r:<id> the amount reservation <id> holds
    rl:{<namespace>|<values>}:<limit>:r   its reservations, a sorted set: id -> expiry (ms)
    rl:{<namespace>}:i:<limit>            the limit's index for /counters, a sorted set:
                                          counter key -> when it stops being live (ms)
    rl:{<id>}:hold                        a reservation that holds no counter at all

Hash tag: `{<namespace>|<values>}`, the namespace and the counter's variable values (`{`, `}` and `%`
percent-escaped). In the MaaS layout a namespace is one model route and every window of a
subscription is a limit with the same variables (the user id), so all windows of one user on one
model share a slot and their decision is one script on one node, while users spread over the cluster.
A counter with other variables (say user and model) or none lands elsewhere.

Redis Cluster, decisions whose counters span slots: a script may only touch one slot, so the counters
are grouped by slot and decided in two phases built from reservations. Phase 1 runs a reserve of
`delta` in every slot at once (a short-lived hold that every other decision counts, exactly like a
reservation); if every slot had room, phase 2 commits the hold as a charge in every slot, otherwise
the holds are released. No interleaving can admit past a limit: between the phases the budget is
held. Concurrent decisions may see a hold that is later released and be refused although a serial
order would have admitted them (never the other way round), and a replica dying between the phases
leaves holds that expire after 10x the storage timeout (at least 1 s). Such decisions cost two round
trips; single-slot ones one. Checks and reports need no common instant: each slot is one script.
The index lives in the namespace's slot, so in a cluster the script reports counters whose
live-until time grew and the client indexes them right after (not waiting; /counters waits for it).

Failures: every request carries a deadline of `timeout` (one timer per connection, not per
decision); a connection silent that long is dropped and the next request reconnects. Failures raise
StorageError (`partitioned` set); FailureMode below turns them into `--on-storage-error` answers.

Reloads: a limit whose identity is gone has its counters deleted, as Limitador does, in the
background from its index; only decisions on a limit that comes back meanwhile wait for that.

Time: scripts read Redis' own clock (TIME), so all replicas agree on windows. Tests inject a clock;
window ends and reservation expiries are stored in the keys, so logic never depends on when Redis
evicts a key: PEXPIRE only cleans up, `expiry_grace` after a counter stops being live.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import logging
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any, Literal, TypeVar, cast
from urllib.parse import unquote

from ratelimit.counters import Commit, Counter, CounterStatus, Decision, Reservation, StorageError
from ratelimit.limits import Limit
from ratelimit.storage.base import CounterSet, Storage, StorageWrapper
from ratelimit.storage.redis_client import (
    RedisError,
    ReplyError,
    connect,
    pack,
    pack_arguments,
)

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 0.35
"""Seconds a decision may wait for Redis (Limitador's redis_cached --response-timeout default)."""

SCRIPT = (resources.files("ratelimit.storage") / "lua" / "decide.lua").read_text()
SCRIPT_SHA = hashlib.sha1(SCRIPT.encode()).hexdigest()

# Script modes (see decide.lua).
CHECK_AND_UPDATE, CHECK, UPDATE, RESERVE, COMMIT = "A", "C", "U", "R", "M"
_MODES = {mode: pack_arguments([mode]) for mode in (CHECK_AND_UPDATE, CHECK, UPDATE, RESERVE, COMMIT)}
_NO_RESERVATION = pack_arguments(("", 0))
_EVALSHA = pack_arguments(["EVALSHA", SCRIPT_SHA])
_EVAL = pack_arguments(["EVAL", SCRIPT])

# Counters read per script call when listing /counters.
_LIST_CHUNK = 500

Clock = Callable[[], float]
T = TypeVar("T")

_FAILURES = (RedisError, OSError, TimeoutError)
_UNAVAILABLE = frozenset({"LOADING", "BUSY", "CLUSTERDOWN", "TRYAGAIN", "MASTERDOWN", "READONLY"})


@dataclass(slots=True)
class _Group:
    """The counters of a request that live in one cluster slot (all of them on a single server),
    with the script call's constant parts packed once."""

    slot: int
    positions: tuple[int, ...]
    """Where these counters are in the request's counter tuple."""
    keys: tuple[str, ...]
    """Counter keys, in `positions` order."""
    limits: tuple[Limit, ...]
    header: bytes
    """The command's RESP array header."""
    script_keys: bytes
    """numkeys and KEYS."""
    tail: bytes
    """The ARGV after the per-call ones: grace, index flag, max_value and window per counter."""
    evalsha: bytes = b""
    """header, EVALSHA and the script's sha, numkeys, KEYS: everything before the per-call ARGV."""

    def __post_init__(self) -> None:
        self.evalsha = self.header + _EVALSHA + self.script_keys

    def command(self, dynamic: bytes) -> bytes:
        return self.evalsha + dynamic + self.tail

    def eval_command(self, dynamic: bytes) -> bytes:
        """The same call as EVAL with the script's text, for a server that lost its script cache."""
        return self.header + _EVAL + self.script_keys + dynamic + self.tail


@dataclass(slots=True)
class _Plan:
    """How one CounterSet is decided; kept as its storage handle while `generation` is current."""

    counters: tuple[Counter, ...]
    groups: tuple[_Group, ...]
    generation: int
    local: list[Any] | None = None
    """A local cache's own per-request state (redis_cached keeps its cache entries here)."""


Reply = list[int]
"""decide.lua's reply: now, first without room (1-based), held, then value, end, reserved, live-until per counter."""


class RedisStorage(Storage):
    """Counters in Redis or Redis Cluster. Failures raise StorageError within `timeout` seconds."""

    def __init__(
        self,
        url: str,
        timeout: float = DEFAULT_TIMEOUT,
        *,
        clock: Clock | None = None,
        key_prefix: str = "rl:",
        expiry_grace: float = 0.0,
    ) -> None:
        if not 0 < timeout < float("inf"):
            raise ValueError(f"the storage timeout must be a positive number of seconds, got {timeout}")
        self.timeout = timeout
        # Every new connection loads the script, so EVALSHA finds it even right after Redis restarted.
        self._client = connect(url, timeout, greeting=[pack("SCRIPT", "LOAD", SCRIPT)])
        self._clock = clock
        self._prefix = key_prefix
        self._grace_ms = round(expiry_grace * 1000)
        # A two-phase hold must outlive any phase 2 that can still reach Redis (each phase gives up
        # after `timeout`), with a wide margin; it only ever blocks budget, never admits past it.
        self._hold_ttl_ms = max(1000, round(10_000 * timeout))
        self._limits: set[Limit] = set()
        self._digests: dict[Limit, str] = {}
        self._generation = 0
        self._removed: list[Limit] = []
        """Limits a reload removed whose counters are still to be deleted (started by the next operation)."""
        self._deleting: dict[Limit, asyncio.Future[None]] = {}
        """Limit -> the deletion of that limit's counters, running in the background."""
        self._index_writes: set[asyncio.Future[object]] = set()
        self.partitioned = False
        """True while Redis cannot be reached (the `datastore_partitioned` gauge)."""
        self._failures = _Failures(self)

    # -- configuration ---------------------------------------------------------------------------

    def configure(self, limits: Sequence[Limit]) -> None:
        current = set(limits)
        # Deleting a removed limit's counters needs Redis and a running loop: the next operation starts it.
        self._removed.extend(limit for limit in self._limits if limit not in current)
        self._limits = current
        self._generation += 1

    # -- decisions -------------------------------------------------------------------------------

    async def check_and_update(self, counters: CounterSet, delta: int, load_counters: bool) -> Decision:
        plan = self._plan(counters)
        return self._decision(plan, await self._replies(plan, CHECK_AND_UPDATE, delta), load_counters)

    async def is_within_limits(self, counters: CounterSet, delta: int) -> Decision:
        plan = self._plan(counters)
        return self._decision(plan, await self._replies(plan, CHECK, delta), True)

    async def update_counters(self, counters: CounterSet, delta: int) -> Decision:
        plan = self._plan(counters)
        return self._decision(plan, await self._replies(plan, UPDATE, delta), True)

    async def reserve(self, counters: CounterSet, amount: int, ttl_seconds: float) -> Reservation:
        plan = self._plan(counters)
        reservation_id = uuid.uuid4().hex
        ttl_ms = max(1, round(ttl_seconds * 1000))
        if not plan.groups:
            # Nothing to hold; a marker lets commit tell this reservation from an unknown one.
            marker = self._marker_key(reservation_id)
            await self._bounded(self._client.request(self._client.slot_of(marker), pack("SET", marker, 1, "PX", ttl_ms)))
            return Reservation(None, [], reservation_id)
        decided = self._decision(plan, await self._replies(plan, RESERVE, amount, reservation_id, ttl_ms), True)
        return Reservation(decided.limited_by, decided.counters, None if decided.limited else reservation_id)

    async def commit(self, reservation_id: str, counters: CounterSet, actual: int) -> Commit:
        plan = self._plan(counters)
        if not plan.groups:
            marker = self._marker_key(reservation_id)
            held = await self._bounded(self._client.request(self._client.slot_of(marker), pack("GETDEL", marker)))
            return Commit(held is not None)
        replies = await self._replies(plan, COMMIT, actual, reservation_id)
        return Commit(any(reply[2] for reply in replies), self._decision(plan, replies, True).counters)

    async def get_counters(self, limits: Sequence[Limit]) -> list[CounterStatus]:
        return await self._bounded(self._get_counters(limits))

    async def close(self) -> None:
        pending: list[asyncio.Future[Any]] = [*self._deleting.values(), *self._index_writes]
        for work in pending:
            work.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        await self._client.close()

    # -- the work behind each decision -----------------------------------------------------------

    def _replies(
        self, plan: _Plan, mode: str, delta: int, reservation_id: str = "", ttl_ms: int = 0
    ) -> Awaitable[list[Reply]]:
        """The script's replies for a request, slot by slot, in the order of plan.groups."""
        if self._removed:
            self._start_deletions()
        if len(plan.groups) == 1 and not self._deleting:
            return self._round_trip(plan.groups[0], mode, delta, reservation_id, ttl_ms)  # the common case
        if not plan.groups:
            return _done([])  # no limit applies: nothing to ask Redis
        return self._bounded(self._decide_in_slots(plan, mode, delta, reservation_id, ttl_ms))

    async def _bounded(self, work: Awaitable[T]) -> T:
        """Work of several round trips, within the storage timeout as a whole."""
        with self._failures:
            async with asyncio.timeout(self.timeout):
                return await work

    async def _decide_in_slots(
        self, plan: _Plan, mode: str, delta: int, reservation_id: str, ttl_ms: int
    ) -> list[Reply]:
        await self._deletions_done(counter.limit for counter in plan.counters)
        if len(plan.groups) <= 1 or mode in (CHECK, UPDATE, COMMIT):
            # A check or an update needs no instant common to all slots: each slot is atomic.
            return list(await asyncio.gather(*(self._run(g, mode, delta, reservation_id, ttl_ms) for g in plan.groups)))
        # A decision over several slots: hold delta in every slot at once, then charge or give back.
        hold_id, hold_ttl_ms = (reservation_id, ttl_ms) if mode == RESERVE else (uuid.uuid4().hex, self._hold_ttl_ms)
        held = await self._hold(plan, delta, hold_id, hold_ttl_ms)
        if self._first_without_room(plan, held) is not None:
            return await self._release(plan, held, hold_id)
        if mode == RESERVE:
            return held
        return list(await asyncio.gather(*(self._run(g, COMMIT, delta, hold_id) for g in plan.groups)))

    async def _hold(self, plan: _Plan, amount: int, hold_id: str, ttl_ms: int) -> list[Reply]:
        """Phase 1: reserve `amount` in every slot at once. If a slot fails, the others' holds are
        released in the background and the failure is raised."""
        replies = await asyncio.gather(
            *(self._run(group, RESERVE, amount, hold_id, ttl_ms) for group in plan.groups), return_exceptions=True
        )
        failures = [reply for reply in replies if isinstance(reply, BaseException)]
        if failures:
            held = [group for group, reply in zip(plan.groups, replies) if not isinstance(reply, BaseException)]
            self._background(asyncio.gather(*(self._run(g, COMMIT, 0, hold_id) for g in held), return_exceptions=True))
            raise failures[0]
        return replies  # type: ignore[return-value]  # no failures: every reply is a Reply

    async def _release(self, plan: _Plan, held: list[Reply], hold_id: str) -> list[Reply]:
        """Give back phase 1's holds where a slot had room (a commit of 0 charges nothing); slots
        without room keep their phase 1 reply, which names the counter."""
        releases = [
            self._run(group, COMMIT, 0, hold_id) if reply[1] == 0 else _done(reply)
            for group, reply in zip(plan.groups, held)
        ]
        return list(await asyncio.gather(*releases))

    async def _round_trip(
        self, group: _Group, mode: str, delta: int, reservation_id: str = "", ttl_ms: int = 0
    ) -> list[Reply]:
        """One script call for one slot's counters, [its reply]: one round trip, bounded by the
        request's own deadline (a timer per decision would cost more than the rest of it)."""
        with self._failures:
            now = b"" if self._clock is None else b"%d" % round(self._clock() * 1000)
            dynamic = _dynamic_arguments(mode, now, delta, reservation_id, ttl_ms)
            try:
                # The client answers any RESP value; decide.lua always answers an integer array.
                reply: Reply = await self._client.request(group.slot, group.command(dynamic))  # type: ignore[assignment]
            except ReplyError as exc:
                if exc.kind != "NOSCRIPT":
                    raise
                # The script cache was flushed since this connection loaded the script: EVAL caches it again.
                reply = await self._client.request(group.slot, group.eval_command(dynamic))  # type: ignore[assignment]  # as above
        if self._client.cluster:
            self._index_later(group, reply)
        return [reply]

    async def _run(self, group: _Group, mode: str, delta: int, reservation_id: str = "", ttl_ms: int = 0) -> Reply:
        return (await self._round_trip(group, mode, delta, reservation_id, ttl_ms))[0]

    # -- answers ---------------------------------------------------------------------------------

    def _first_without_room(self, plan: _Plan, replies: list[Reply]) -> int | None:
        """The request-wide position of the first counter without room, over every slot's reply."""
        if len(replies) == 1:
            first = replies[0][1]
            return plan.groups[0].positions[first - 1] if first else None
        positions = [group.positions[reply[1] - 1] for group, reply in zip(plan.groups, replies) if reply[1]]
        return min(positions, default=None)

    def _decision(self, plan: _Plan, replies: list[Reply], load_counters: bool) -> Decision:
        first = self._first_without_room(plan, replies)
        limited_by = plan.counters[first].limit if first is not None else None
        if not load_counters:
            return Decision(limited_by, [])
        statuses: list[CounterStatus | None] = [None] * len(plan.counters)
        for group, reply in zip(plan.groups, replies):
            now = reply[0]
            for j, position in enumerate(group.positions):
                value, ends, reserved = reply[3 + 4 * j: 6 + 4 * j]
                expires_in = (ends - now) / 1000 if ends else 0.0
                statuses[position] = CounterStatus(plan.counters[position], value, expires_in, reserved)
        return Decision(limited_by, cast(list[CounterStatus], statuses))  # the groups cover every position

    # -- /counters -------------------------------------------------------------------------------

    async def _get_counters(self, limits: Sequence[Limit]) -> list[CounterStatus]:
        if self._removed:
            self._start_deletions()
        await self._deletions_done(limits)
        await self._index_settled()
        configured = [limit for limit in limits if limit in self._limits]
        indexes = [self._index_key(limit) for limit in configured]
        members = await asyncio.gather(*(self._index_members(index) for index in indexes))
        counters = [
            Counter(limit, self._values_from_key(limit, key.decode()))
            for limit, keys in zip(configured, members) for key in keys
        ]
        statuses: list[CounterStatus] = []
        for start in range(0, len(counters), _LIST_CHUNK):
            plan = self._new_plan(tuple(counters[start:start + _LIST_CHUNK]), indexed=False)
            replies = await self._decide_in_slots(plan, CHECK, 0, "", 0)
            for status in self._decision(plan, replies, True).counters:
                if status.expires_in > 0 or status.reserved > 0:
                    statuses.append(status)
        return statuses

    # -- keys and plans --------------------------------------------------------------------------

    def _plan(self, counter_set: CounterSet) -> _Plan:
        plan = counter_set.storage_handle
        if isinstance(plan, _Plan) and plan.generation == self._generation:
            return plan
        # Counters of limits that a concurrent reload removed are left out: their limit is gone.
        counters = tuple(c for c in counter_set.counters if c.limit in self._limits)
        plan = self._new_plan(counters, indexed=not self._client.cluster)
        counter_set.storage_handle = plan
        return plan

    def _new_plan(self, counters: tuple[Counter, ...], indexed: bool) -> _Plan:
        by_slot: dict[int, list[int]] = {}
        keys = [self._counter_key(counter) for counter in counters]
        for position, key in enumerate(keys):
            by_slot.setdefault(self._client.slot_of(key), []).append(position)
        groups = []
        for slot, positions in by_slot.items():
            group_keys = [keys[p] for p in positions]
            script_keys = [k for key in group_keys for k in (key, key + ":r")]
            if indexed:  # one server: the script keeps the index itself
                script_keys += [self._index_key(counters[p].limit) for p in positions]
            limit_arguments = [n for p in positions for n in (counters[p].limit.max_value, counters[p].limit.seconds * 1000)]
            argument_count = 3 + len(script_keys) + 7 + len(limit_arguments)
            groups.append(_Group(
                slot=slot,
                positions=tuple(positions),
                keys=tuple(group_keys),
                limits=tuple(counters[p].limit for p in positions),
                header=b"*%d\r\n" % argument_count,
                script_keys=pack_arguments([len(script_keys), *script_keys]),
                tail=pack_arguments([self._grace_ms, "1" if indexed else "0", *limit_arguments]),
            ))
        return _Plan(counters, tuple(groups), self._generation)

    def _digest(self, limit: Limit) -> str:
        digest = self._digests.get(limit)
        if digest is None:
            identity = json.dumps(limit.identity, ensure_ascii=False, separators=(",", ":"))
            digest = self._digests[limit] = hashlib.sha1(identity.encode()).hexdigest()[:16]
        return digest

    def _counter_key(self, counter: Counter) -> str:
        tag = f"{_escape(counter.limit.namespace)}|{_escape(counter.qualifier())}"
        return f"{self._prefix}{{{tag}}}:{self._digest(counter.limit)}"

    def _values_from_key(self, limit: Limit, key: str) -> tuple[str, ...]:
        start = len(self._prefix) + 1 + len(_escape(limit.namespace)) + 1
        end = len(key) - len(self._digest(limit)) - 2
        return Counter.values_from_qualifier(limit, unquote(key[start:end]))

    def _index_key(self, limit: Limit) -> str:
        return f"{self._prefix}{{{_escape(limit.namespace)}}}:i:{self._digest(limit)}"

    def _marker_key(self, reservation_id: str) -> str:
        return f"{self._prefix}{{{_escape(reservation_id)}}}:hold"

    # -- the index in a cluster, and removed limits ------------------------------------------------

    def _index_later(self, group: _Group, reply: Reply) -> None:
        """In a cluster the index lives in another slot than the counters, so the script reports
        counters whose live-until time grew and they are indexed right after, without waiting."""
        for j, (key, limit) in enumerate(zip(group.keys, group.limits)):
            live_until = reply[6 + 4 * j]
            if live_until:
                self._index(limit, key, live_until, reply[0])

    def _index(self, limit: Limit, key: str, live_until: int, now: int) -> None:
        index = self._index_key(limit)
        slot = self._client.slot_of(index)
        self._background(self._client.request(slot, pack("ZADD", index, "GT", live_until, key)))
        self._background(self._client.request(slot, pack("ZREMRANGEBYSCORE", index, "-inf", now)))

    def _background(self, work: Awaitable[object]) -> None:
        future = asyncio.ensure_future(work)
        self._index_writes.add(future)
        future.add_done_callback(self._index_writes.discard)
        future.add_done_callback(_log_failure)

    async def _index_members(self, index: str) -> list[bytes]:
        return cast(list[bytes], await self._client.request(self._client.slot_of(index), pack("ZRANGE", index, 0, -1)))

    async def _index_settled(self) -> None:
        while self._index_writes:
            await asyncio.gather(*self._index_writes, return_exceptions=True)

    def _start_deletions(self) -> None:
        """Delete the counters of limits a reload removed, in the background: only decisions on a
        limit that is back with the same identity wait for its old counters to go."""
        for limit in self._removed:
            if limit not in self._deleting:
                deletion = asyncio.ensure_future(self._delete_counters(limit))
                self._deleting[limit] = deletion
                deletion.add_done_callback(functools.partial(self._deleted, limit))
        self._removed = []

    def _deleted(self, limit: Limit, deletion: asyncio.Future[None]) -> None:
        del self._deleting[limit]
        if not deletion.cancelled() and deletion.exception() is not None:
            logger.debug("deleting the counters of removed limit %s failed, to be retried: %s",
                         limit.name or limit.identity, deletion.exception())
            self._removed.append(limit)  # tried again with the next operation

    async def _deletions_done(self, limits: Iterable[Limit] | None = None) -> None:
        """Wait for the deletions of these limits' old counters (of any limit's, when None)."""
        if not self._deleting:
            return
        wanted = None if limits is None else set(limits)
        pending = [deletion for limit, deletion in self._deleting.items() if wanted is None or limit in wanted]
        await asyncio.gather(*(asyncio.shield(deletion) for deletion in pending))

    async def _delete_counters(self, limit: Limit) -> None:
        """Delete every counter of a removed limit, found through its index, a batch at a time."""
        await self._index_settled()
        index = self._index_key(limit)
        slot = self._client.slot_of(index)
        while keys := cast(list[bytes], await self._client.request(slot, pack("ZRANGE", index, 0, _LIST_CHUNK - 1))):
            await asyncio.gather(*(
                self._client.request(self._client.slot_of(key.decode()), pack("DEL", key, key + b":r"))
                for key in keys
            ))
            await self._client.request(slot, pack("ZREM", index, *keys))


class _Failures:
    """`with storage._failures:` turns a Redis failure into StorageError and keeps `partitioned`
    up to date. A plain (not async) context manager: it is entered on every decision."""

    __slots__ = ("storage",)

    def __init__(self, storage: RedisStorage) -> None:
        self.storage = storage

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, _: object) -> None:
        if error is None:
            self.storage.partitioned = False
            return
        if isinstance(error, ReplyError):
            # Redis loading its data, a cluster without quorum or mid-failover: unavailable for now.
            self.storage.partitioned = error.kind in _UNAVAILABLE
            raise StorageError(f"Redis refused the request: {error}") from error
        if isinstance(error, TimeoutError):
            self.storage.partitioned = True
            raise StorageError(f"Redis did not answer within {self.storage.timeout:g}s") from error
        if isinstance(error, _FAILURES):
            self.storage.partitioned = True
            raise StorageError(f"Redis is unreachable: {error}") from error


class FailureMode(StorageWrapper):
    """`--on-storage-error open|closed` around any storage.

    closed: a StorageError reaches the server, which answers HTTP 503 / gRPC UNAVAILABLE.
    open:   the request is admitted (nothing is charged: the storage could not count it).
    Either way the failure is counted in `errors` (for a metric) and logged when the storage starts
    and stops failing; listing counters is not a decision and always raises.
    """

    def __init__(self, storage: Storage, mode: Literal["open", "closed"]) -> None:
        if mode not in ("open", "closed"):
            raise ValueError(f"on storage error must be open or closed, got {mode!r}")
        super().__init__(storage)
        self.mode = mode
        self._errors = 0
        self._failing = False

    @property
    def errors(self) -> int:
        return self._errors

    async def around(self, decision: Awaitable[T]) -> T:
        # check_and_update, is_within_limits and update_counters answer a Decision; the
        # decisions with other answers are overridden below.
        return cast(T, await self._decide(cast(Awaitable[Decision], decision)))

    async def reserve(self, counters: CounterSet, amount: int, ttl_seconds: float) -> Reservation:
        # Admitted open, the reservation holds nothing; its commit will find it not held.
        try:
            answer = await self.storage.reserve(counters, amount, ttl_seconds)
        except StorageError as exc:
            self._failed(exc)
            return Reservation(None, [], uuid.uuid4().hex)
        self._recovered()
        return answer

    async def commit(self, reservation_id: str, counters: CounterSet, actual: int) -> Commit:
        try:
            answer = await self.storage.commit(reservation_id, counters, actual)
        except StorageError as exc:
            self._failed(exc)
            return Commit(False)
        self._recovered()
        return answer

    async def _decide(self, decision: Awaitable[Decision]) -> Decision:
        try:
            answer = await decision
        except StorageError as exc:
            self._failed(exc)
            return Decision()
        self._recovered()
        return answer

    def _failed(self, error: StorageError) -> None:
        """Count and log the failure; closed re-raises it, open lets the caller admit."""
        self._errors += 1
        if not self._failing:
            self._failing = True
            logger.error("counter storage failing, answering %s: %s",
                         "within limits (open)" if self.mode == "open" else "unavailable (closed)", error)
        if self.mode == "closed":
            raise error

    def _recovered(self) -> None:
        if self._failing:
            self._failing = False
            logger.warning("counter storage answering again after %d failed requests", self._errors)


def _dynamic_arguments(mode: str, now: bytes, delta: int, reservation_id: str, ttl_ms: int) -> bytes:
    """The ARGV that change per call (mode, now, delta, reservation id, ttl), packed in one go."""
    delta_text = b"%d" % delta
    if reservation_id:
        reservation = pack_arguments((reservation_id, ttl_ms))
    else:
        reservation = _NO_RESERVATION
    return b"%b$%d\r\n%b\r\n$%d\r\n%b\r\n%b" % (_MODES[mode], len(now), now, len(delta_text), delta_text, reservation)


def _escape(text: str) -> str:
    """Keep `{` and `}` out of a hash tag, so a tag never ends early (reversible with unquote)."""
    return text.replace("%", "%25").replace("{", "%7B").replace("}", "%7D")


async def _done(value: T) -> T:
    return value


def _log_failure(future: asyncio.Future[object]) -> None:
    if not future.cancelled() and future.exception() is not None:
        logger.warning("Redis index update failed (the counter shows in /counters after its next write): %s",
                       future.exception())
