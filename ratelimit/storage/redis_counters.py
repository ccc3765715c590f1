"""RedisCounters: the counters of every replica in Redis, decided by one Lua script per slot.

Both Redis storages hold one: `RedisStorage` (redis.py) answers every decision from it,
`CachedRedisStorage` (redis_cached.py) decides on local copies and syncs them through it.

Every decision (check_and_report, check, report, reserve, commit) is one call of `lua/decide.lua`
over all counters of the request (the call's layout is documented once, in that file's header, and
decoded here by ScriptReply): Redis runs a script to its end before any other command, so stacked
limits are checked and charged atomically across replicas (Limitador reads, decides in Rust, then
writes each counter, and stacked limits race past their maximum).

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
StorageError and clear `status.reachable` (the `datastore_partitioned` gauge); any answer sets it
again, and so does a PING sent every PROBE_INTERVAL seconds once `start()` ran (so readiness follows
Redis with no traffic too). A Redis unreachable at start-up is logged (ERROR) and probed until it answers.

Listing (/counters, quota gauges, the exporter) reads the indexes in pages on connections of its own,
each page within `listing_timeout`: a listing never waits behind, nor delays, a decision's deadline.

Counter loss: every new connection reads the server's run id and key count. A server whose run id
changed (it restarted) and that holds no key lost every counter it had (no persistence): that is
logged and counted in `status.counters_lost`; a restart with its data is logged only.

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
import re
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, NamedTuple, TypeVar, cast
from urllib.parse import unquote

from ratelimit.counters import Commit, Counter, CounterStatus, Decision, Reservation, StorageError
from ratelimit.limits import Identity, Limit
from ratelimit.storage.base import CounterFilter, CounterPage, CounterSet, Operation, StorageStatus
from ratelimit.storage.redis_client import (
    Address,
    Client,
    RedisError,
    ReplyError,
    connect,
    pack,
    pack_arguments,
)

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 0.35
"""Seconds a decision may wait for Redis (Limitador's redis_cached --response-timeout default)."""
DEFAULT_LISTING_TIMEOUT = 5.0
"""Seconds one page of a counter listing may take."""
PROBE_INTERVAL = 0.5
"""Seconds between reachability PINGs once started (readiness follows Redis within about this)."""

SCRIPT = (resources.files("ratelimit.storage") / "lua" / "decide.lua").read_text()
SCRIPT_SHA = hashlib.sha1(SCRIPT.encode()).hexdigest()

# How decide.lua spells each operation (ARGV[1]), packed once.
_MODES = {
    operation: pack_arguments([letter])
    for operation, letter in {
        Operation.CHECK_AND_UPDATE: "A", Operation.CHECK: "C", Operation.UPDATE: "U",
        Operation.RESERVE: "R", Operation.COMMIT: "M",
    }.items()
}
_NO_RESERVATION = pack_arguments(("", 0))
_EVALSHA = pack_arguments(["EVALSHA", SCRIPT_SHA])
_EVAL = pack_arguments(["EVAL", SCRIPT])
# Sent on every new connection: the script (so EVALSHA finds it even right after Redis restarted),
# then what counter-loss detection reads (see _ServerIdentity).
_GREETING = (pack("SCRIPT", "LOAD", SCRIPT), pack("INFO", "server"), pack("DBSIZE"))

# Counters read per script call when listing, and index entries read per request.
_LIST_CHUNK = 500
# A page filtered by `match` stops after reading this many index entries per counter asked for, so
# one page's work stays bounded however few counters match (the cursor says where to go on).
_SCAN_FACTOR = 20

Clock = Callable[[], float]
T = TypeVar("T")

_FAILURES = (RedisError, OSError, TimeoutError)
_UNAVAILABLE = frozenset({"LOADING", "BUSY", "CLUSTERDOWN", "TRYAGAIN", "MASTERDOWN", "READONLY"})


# -- the script's reply ---------------------------------------------------------------------------


class CounterReply(NamedTuple):
    """One counter's part of decide.lua's reply."""

    value: int
    """Value in the running window (0 when none runs)."""
    window_end: int
    """Window end in ms, 0 when no window runs."""
    reserved: int
    live_until: int
    """The counter's new live-until time in ms, 0 when it did not grow."""


class ScriptReply:
    """decide.lua's reply, decoded by the layout in the script's header: three integers for the
    call, then four per counter."""

    __slots__ = ("raw",)

    _HEADER = 3
    _PER_COUNTER = 4

    def __init__(self, raw: list[int]) -> None:
        self.raw = raw

    @property
    def now(self) -> int:
        """Redis' time of the decision, ms."""
        return self.raw[0]

    @property
    def first_without_room(self) -> int | None:
        """The position (0-based, within the call's counters) of the first counter without room."""
        first = self.raw[1]
        return first - 1 if first else None

    @property
    def reservation_held(self) -> bool:
        """COMMIT: whether the reservation was still held."""
        return self.raw[2] == 1

    def counter(self, position: int) -> CounterReply:
        at = self._HEADER + self._PER_COUNTER * position
        return CounterReply(*self.raw[at:at + self._PER_COUNTER])


# -- calls, and how a request's counters are grouped into them -------------------------------------


@dataclass(slots=True)
class SlotGroup:
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
class RedisPlan:
    """How one CounterSet is decided; kept as its storage handle while `generation` is current."""

    counters: tuple[Counter, ...]
    groups: tuple[SlotGroup, ...]
    generation: int
    local: list[Any] | None = None
    """The holder's own per-request state (redis_cached keeps its cache entries here)."""


class KeyLayout:
    """Key names (see the module docstring); digests of limit identities are memoized."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self._digests: dict[Identity, str] = {}

    def digest(self, limit: Limit) -> str:
        digest = self._digests.get(limit.identity)
        if digest is None:
            identity = json.dumps(limit.identity, ensure_ascii=False, separators=(",", ":"))
            digest = self._digests[limit.identity] = hashlib.sha1(identity.encode()).hexdigest()[:16]
        return digest

    def counter(self, counter: Counter) -> str:
        tag = f"{_escape(counter.limit.namespace)}|{_escape(counter.qualifier())}"
        return f"{self.prefix}{{{tag}}}:{self.digest(counter.limit)}"

    def values_from_counter(self, limit: Limit, key: str) -> tuple[str, ...]:
        start = len(self.prefix) + 1 + len(_escape(limit.namespace)) + 1
        end = len(key) - len(self.digest(limit)) - 2
        return Counter.values_from_qualifier(limit, unquote(key[start:end]))

    def index(self, limit: Limit) -> str:
        return f"{self.prefix}{{{_escape(limit.namespace)}}}:i:{self.digest(limit)}"

    def marker(self, reservation_id: str) -> str:
        return f"{self.prefix}{{{_escape(reservation_id)}}}:hold"


# -- the counters ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RedisOptions:
    """Which Redis, and how to talk to it: what the `redis` and `redis_cached` storages share (each
    holds a RedisCounters made from these)."""

    url: str = field(repr=False)  # it may hold a password
    """A Redis URL (redis_client.py lists the forms: TLS, unix sockets, cluster seeds)."""
    timeout: float = DEFAULT_TIMEOUT
    """Seconds a decision may wait for Redis (`--response-timeout`)."""
    listing_timeout: float = DEFAULT_LISTING_TIMEOUT
    """Seconds one page of a counter listing may take."""
    clock: Clock | None = None
    """The time decide.lua decides at, in seconds; None: Redis' own TIME (tests pass a clock they move)."""
    key_prefix: str = "rl:"
    """Put before every key this storage writes (see KeyLayout)."""
    expiry_grace: float = 0.0
    """Seconds a counter's key outlives its window in Redis (PEXPIRE only cleans up)."""

    def __post_init__(self) -> None:
        for name, seconds in (("storage timeout", self.timeout), ("listing timeout", self.listing_timeout)):
            if not 0 < seconds < float("inf"):
                raise ValueError(f"the {name} must be a positive number of seconds, got {seconds}")


class RedisCounters:
    """Counters in Redis or Redis Cluster. Failures raise StorageError within `options.timeout` seconds."""

    def __init__(self, options: RedisOptions) -> None:
        self.options = options
        self.timeout = options.timeout
        self.listing_timeout = options.listing_timeout
        # Not reachable until Redis first answered: a service must not say it is ready before that.
        self.status = StorageStatus(reachable=False)
        self._servers = _ServerIdentity(self.status)
        self._client = connect(options.url, options.timeout, _GREETING, self._servers.connected)
        # Listing has connections of its own: its replies never queue ahead of a decision's.
        self._listing_client = connect(options.url, options.listing_timeout, _GREETING, self._servers.connected)
        self.location = str(options.url.rsplit("@", 1)[-1])
        """The URL without credentials, for log lines."""
        self._clock = options.clock
        self.keys = KeyLayout(options.key_prefix)
        self._grace_ms = round(options.expiry_grace * 1000)
        # A two-phase hold must outlive any phase 2 that can still reach Redis (each phase gives up
        # after `timeout`), with a wide margin; it only ever blocks budget, never admits past it.
        self._hold_ttl_ms = max(1000, round(10_000 * options.timeout))
        self._limits: dict[Identity, Limit] = {}
        self._generation = 0
        self._removed: list[Limit] = []
        """Limits a reload removed whose counters are still to be deleted (started by the next operation)."""
        self._deleting: dict[Identity, asyncio.Future[None]] = {}
        """Identity -> the deletion of that limit's counters, running in the background."""
        self._index_writes: set[asyncio.Future[object]] = set()
        self._failures = _Failures(self)
        self._prober: asyncio.Task[None] | None = None
        self._listing_failing = False

    @property
    def cluster(self) -> bool:
        return self._client.cluster

    # -- configuration ---------------------------------------------------------------------------

    def configure(self, limits: Sequence[Limit]) -> None:
        current = {limit.identity: limit for limit in limits}
        # Deleting a removed limit's counters needs Redis and a running loop: the next operation starts it.
        self._removed.extend(limit for identity, limit in self._limits.items() if identity not in current)
        self._limits = current
        self._generation += 1

    def is_configured_identity(self, identity: Identity) -> bool:
        return identity in self._limits

    # -- plans -----------------------------------------------------------------------------------

    def plan(self, counter_set: CounterSet) -> RedisPlan:
        """The request's plan, remembered in its CounterSet until the next reload."""
        plan = counter_set.storage_handle
        if isinstance(plan, RedisPlan) and plan.generation == self._generation:
            return plan
        # Counters of limits that a concurrent reload removed are left out: their limit is gone.
        counters = tuple(c for c in counter_set.counters if c.limit.identity in self._limits)
        plan = self._new_plan(counters, indexed=not self.cluster)
        counter_set.storage_handle = plan
        return plan

    def group_of(self, counter: Counter) -> SlotGroup:
        """One counter alone, as a script call (how redis_cached reads and writes back its copies)."""
        return self._new_plan((counter,), indexed=not self.cluster).groups[0]

    def _new_plan(self, counters: tuple[Counter, ...], indexed: bool) -> RedisPlan:
        by_slot: dict[int, list[int]] = {}
        keys = [self.keys.counter(counter) for counter in counters]
        for position, key in enumerate(keys):
            by_slot.setdefault(self._client.slot_of(key), []).append(position)
        groups = []
        for slot, positions in by_slot.items():
            group_keys = [keys[p] for p in positions]
            script_keys = [k for key in group_keys for k in (key, key + ":r")]
            if indexed:  # one server: the script keeps the index itself
                script_keys += [self.keys.index(counters[p].limit) for p in positions]
            limit_arguments = [n for p in positions for n in (counters[p].limit.max_value, counters[p].limit.seconds * 1000)]
            argument_count = 3 + len(script_keys) + 7 + len(limit_arguments)
            groups.append(SlotGroup(
                slot=slot,
                positions=tuple(positions),
                keys=tuple(group_keys),
                limits=tuple(counters[p].limit for p in positions),
                header=b"*%d\r\n" % argument_count,
                script_keys=pack_arguments([len(script_keys), *script_keys]),
                tail=pack_arguments([self._grace_ms, "1" if indexed else "0", *limit_arguments]),
            ))
        return RedisPlan(counters, tuple(groups), self._generation)

    # -- decisions -------------------------------------------------------------------------------

    def decide(
        self, plan: RedisPlan, operation: Operation, delta: int, reservation_id: str = "", ttl_ms: int = 0
    ) -> Awaitable[list[ScriptReply]]:
        """The script's replies for a request, slot by slot, in the order of plan.groups; over
        several slots CHECK_AND_UPDATE and RESERVE are two-phase (see the module docstring)."""
        if self._removed:
            self._start_deletions()
        if len(plan.groups) == 1 and not self._deleting:
            return self._round_trip(plan.groups[0], operation, delta, reservation_id, ttl_ms)  # the common case
        if not plan.groups:
            return _done([])  # no limit applies: nothing to ask Redis
        return self._bounded(self._decide_in_slots(plan, operation, delta, reservation_id, ttl_ms))

    def run(
        self, group: SlotGroup, operation: Operation, delta: int, reservation_id: str = "", ttl_ms: int = 0
    ) -> Awaitable[ScriptReply]:
        """One script call over one slot's counters."""
        return self._run(group, operation, delta, reservation_id, ttl_ms)

    async def reserve(self, plan: RedisPlan, amount: int, ttl_seconds: float) -> Reservation:
        """Hold `amount` on every counter if it fits; the answer names the reservation when admitted."""
        reservation_id = uuid.uuid4().hex
        ttl_ms = max(1, round(ttl_seconds * 1000))
        if not plan.groups:
            # Nothing to hold; a marker lets commit tell this reservation from an unknown one.
            marker = self.keys.marker(reservation_id)
            await self._bounded(self._client.request(self._client.slot_of(marker), pack("SET", marker, 1, "PX", ttl_ms)))
            return Reservation(None, [], reservation_id)
        decided = self.decision(plan, await self.decide(plan, Operation.RESERVE, amount, reservation_id, ttl_ms), True)
        return Reservation(decided.limited_by, decided.counters, None if decided.limited else reservation_id)

    async def commit(self, plan: RedisPlan, reservation_id: str, actual: int) -> Commit:
        """Release the reservation if still held and charge `actual`."""
        if not plan.groups:
            marker = self.keys.marker(reservation_id)
            held = await self._bounded(self._client.request(self._client.slot_of(marker), pack("GETDEL", marker)))
            return Commit(held is not None)
        replies = await self.decide(plan, Operation.COMMIT, actual, reservation_id)
        return Commit(any(reply.reservation_held for reply in replies), self.decision(plan, replies, True).counters)

    def decision(self, plan: RedisPlan, replies: Sequence[ScriptReply], load_counters: bool) -> Decision:
        first = self._first_without_room(plan, replies)
        limited_by = plan.counters[first].limit if first is not None else None
        if not load_counters:
            return Decision(limited_by, [])
        statuses: list[CounterStatus | None] = [None] * len(plan.counters)
        for group, reply in zip(plan.groups, replies):
            now = reply.now
            for j, position in enumerate(group.positions):
                state = reply.counter(j)
                expires_in = (state.window_end - now) / 1000 if state.window_end else 0.0
                statuses[position] = CounterStatus(plan.counters[position], state.value, expires_in, state.reserved)
        return Decision(limited_by, cast(list[CounterStatus], statuses))  # the groups cover every position

    def _first_without_room(self, plan: RedisPlan, replies: Sequence[ScriptReply]) -> int | None:
        """The request-wide position of the first counter without room, over every slot's reply."""
        if len(replies) == 1:
            first = replies[0].first_without_room
            return plan.groups[0].positions[first] if first is not None else None
        positions = [
            group.positions[first] for group, reply in zip(plan.groups, replies)
            if (first := reply.first_without_room) is not None
        ]
        return min(positions, default=None)

    async def _bounded(self, work: Awaitable[T]) -> T:
        """Work of several round trips, within the storage timeout as a whole."""
        with self._failures:
            async with asyncio.timeout(self.timeout):
                return await work

    async def _decide_in_slots(
        self, plan: RedisPlan, operation: Operation, delta: int, reservation_id: str, ttl_ms: int
    ) -> list[ScriptReply]:
        await self._deletions_done(counter.limit for counter in plan.counters)
        if len(plan.groups) <= 1 or operation in (Operation.CHECK, Operation.UPDATE, Operation.COMMIT):
            # A check or an update needs no instant common to all slots: each slot is atomic.
            return list(await asyncio.gather(
                *(self._run(g, operation, delta, reservation_id, ttl_ms) for g in plan.groups)
            ))
        # A decision over several slots: hold delta in every slot at once, then charge or give back.
        if operation == Operation.RESERVE:
            hold_id, hold_ttl_ms = reservation_id, ttl_ms
        else:
            hold_id, hold_ttl_ms = uuid.uuid4().hex, self._hold_ttl_ms
        held = await self._hold(plan, delta, hold_id, hold_ttl_ms)
        if self._first_without_room(plan, held) is not None:
            return await self._release(plan, held, hold_id)
        if operation == Operation.RESERVE:
            return held
        return list(await asyncio.gather(*(self._run(g, Operation.COMMIT, delta, hold_id) for g in plan.groups)))

    async def _hold(self, plan: RedisPlan, amount: int, hold_id: str, ttl_ms: int) -> list[ScriptReply]:
        """Phase 1: reserve `amount` in every slot at once. If a slot fails, the others' holds are
        released in the background and the failure is raised."""
        replies = await asyncio.gather(
            *(self._run(group, Operation.RESERVE, amount, hold_id, ttl_ms) for group in plan.groups),
            return_exceptions=True,
        )
        failures = [reply for reply in replies if isinstance(reply, BaseException)]
        if failures:
            held = [group for group, reply in zip(plan.groups, replies) if not isinstance(reply, BaseException)]
            self._background(asyncio.gather(
                *(self._run(g, Operation.COMMIT, 0, hold_id) for g in held), return_exceptions=True
            ))
            raise failures[0]
        return cast(list[ScriptReply], replies)

    async def _release(self, plan: RedisPlan, held: list[ScriptReply], hold_id: str) -> list[ScriptReply]:
        """Give back phase 1's holds where a slot had room (a commit of 0 charges nothing); slots
        without room keep their phase 1 reply, which names the counter."""
        releases = [
            self._run(group, Operation.COMMIT, 0, hold_id) if reply.first_without_room is None else _done(reply)
            for group, reply in zip(plan.groups, held)
        ]
        return list(await asyncio.gather(*releases))

    async def _round_trip(
        self, group: SlotGroup, operation: Operation, delta: int, reservation_id: str = "", ttl_ms: int = 0,
        client: Client | None = None,
    ) -> list[ScriptReply]:
        """One script call for one slot's counters, [its reply]: one round trip, bounded by the
        request's own deadline (a timer per decision would cost more than the rest of it)."""
        client = client or self._client
        with self._failures:
            now = b"" if self._clock is None else b"%d" % round(self._clock() * 1000)
            dynamic = _dynamic_arguments(operation, now, delta, reservation_id, ttl_ms)
            try:
                raw = await client.request(group.slot, group.command(dynamic))
            except ReplyError as exc:
                if exc.kind != "NOSCRIPT":
                    raise
                # The script cache was flushed since this connection loaded the script: EVAL caches it again.
                raw = await client.request(group.slot, group.eval_command(dynamic))
        reply = ScriptReply(cast(list[int], raw))
        if self.cluster:
            self._index_later(group, reply)
        return [reply]

    async def _run(
        self, group: SlotGroup, operation: Operation, delta: int, reservation_id: str = "", ttl_ms: int = 0,
        client: Client | None = None,
    ) -> ScriptReply:
        return (await self._round_trip(group, operation, delta, reservation_id, ttl_ms, client))[0]

    # -- listing ---------------------------------------------------------------------------------

    async def counters_page(
        self, limits: Sequence[Limit], cursor: str | None, max_counters: int,
        match: CounterFilter | None = None,
    ) -> CounterPage:
        """Live counters of these limits, at most `max_counters`, walking each limit's index in
        (live-until, key) order from `cursor`; within `listing_timeout`. Live-until times only grow,
        so a counter live through the whole walk is listed, and one whose window restarted meanwhile
        may be listed twice; only counters sharing the cursor's own live-until millisecond, added or
        gone between two pages, can shift by one. Raises ValueError for a cursor this storage did not
        make, StorageError when Redis fails."""
        if max_counters < 1:
            raise ValueError(f"a page holds at least 1 counter, asked for {max_counters}")
        position = _ListingPosition.parse(cursor)
        try:
            async with asyncio.timeout(self.listing_timeout):
                page = await self._page(limits, position, max_counters, match)
        except (StorageError, *_FAILURES) as exc:
            self.status.listing_failures += 1
            reason = f"Redis did not answer within the listing timeout ({self.listing_timeout:g}s)" \
                if isinstance(exc, TimeoutError) else str(exc)
            if not self._listing_failing:
                self._listing_failing = True
                logger.error("listing counters from Redis at %s failed: %s", self.location, reason)
            raise StorageError(f"listing counters failed: {reason}") from exc
        if self._listing_failing:
            self._listing_failing = False
            logger.error("listing counters from Redis works again, after %d failed listings",
                         self.status.listing_failures)
        return page

    async def _page(
        self, limits: Sequence[Limit], position: _ListingPosition, max_counters: int,
        match: CounterFilter | None,
    ) -> CounterPage:
        if self._removed:
            self._start_deletions()
        await self._deletions_done(limits)
        await self._index_settled()
        configured = sorted((limit for limit in limits if limit.identity in self._limits), key=self.keys.digest)
        chosen: list[Counter] = []
        scan_budget = _SCAN_FACTOR * max_counters
        next_position: _ListingPosition | None = None
        for limit in configured:
            digest = self.keys.digest(limit)
            if digest < position.digest:
                continue
            after = position if digest == position.digest else _ListingPosition(digest)
            stop = await self._walk_index(limit, after, chosen, max_counters, match, scan_budget)
            if stop is not None:
                next_position = stop
                break
        statuses: list[CounterStatus] = []
        for start in range(0, len(chosen), _LIST_CHUNK):
            plan = self._new_plan(tuple(chosen[start:start + _LIST_CHUNK]), indexed=False)
            replies = await asyncio.gather(*(
                self._run(group, Operation.CHECK, 0, client=self._listing_client) for group in plan.groups
            ))
            for status in self.decision(plan, replies, True).counters:
                if status.expires_in > 0 or status.reserved > 0:
                    statuses.append(status)
        return CounterPage(statuses, next_position.text() if next_position is not None else None)

    async def _walk_index(
        self, limit: Limit, after: _ListingPosition, chosen: list[Counter], max_counters: int,
        match: CounterFilter | None, scan_budget: int,
    ) -> _ListingPosition | None:
        """Add the limit's counters after `after` to `chosen`; the position to go on from when the
        page is full (or its scan budget spent) before the index ends, else None."""
        index = self.keys.index(limit)
        slot = self._listing_client.slot_of(index)
        low = b"-inf" if after.score is None else b"%d" % after.score
        offset = 0
        scanned = 0
        # Entries of one score are ordered by key: a position is a score and how many entries of
        # that score were already passed (a short cursor, whatever the keys' length).
        run_score, run_count = after.score, 0
        while True:
            flat = cast(list[bytes], await self._listing_client.request(slot, pack(
                "ZRANGE", index, low, "+inf", "BYSCORE", "LIMIT", offset, _LIST_CHUNK, "WITHSCORES"
            )))
            entries = [(flat[i], int(float(flat[i + 1]))) for i in range(0, len(flat), 2)]
            offset += len(entries)
            for key, score in entries:
                if score != run_score:
                    run_score, run_count = score, 0
                run_count += 1
                if score == after.score and run_count <= after.passed:
                    continue  # listed by an earlier page
                scanned += 1
                counter = Counter(limit, self.keys.values_from_counter(limit, key.decode()))
                if match is None or match(counter):
                    chosen.append(counter)
                if len(chosen) >= max_counters or scanned >= scan_budget:
                    return _ListingPosition(after.digest, score, run_count)
            if len(entries) < _LIST_CHUNK:
                return None

    async def get_counters(self, limits: Sequence[Limit], page_size: int = 1000) -> list[CounterStatus]:
        """Every live counter of these limits, page by page (each page with its own budget)."""
        statuses: list[CounterStatus] = []
        cursor: str | None = None
        while True:
            page = await self.counters_page(limits, cursor, page_size)
            statuses.extend(page.counters)
            if page.next_cursor is None:
                return statuses
            cursor = page.next_cursor

    # -- the index in a cluster, and removed limits ----------------------------------------------

    def _index_later(self, group: SlotGroup, reply: ScriptReply) -> None:
        """In a cluster the index lives in another slot than the counters, so the script reports
        counters whose live-until time grew and they are indexed right after, without waiting."""
        for j, (key, limit) in enumerate(zip(group.keys, group.limits)):
            live_until = reply.counter(j).live_until
            if live_until:
                self._index(limit, key, live_until, reply.now)

    def _index(self, limit: Limit, key: str, live_until: int, now: int) -> None:
        index = self.keys.index(limit)
        slot = self._client.slot_of(index)
        self._background(self._client.request(slot, pack("ZADD", index, "GT", live_until, key)))
        self._background(self._client.request(slot, pack("ZREMRANGEBYSCORE", index, "-inf", now)))

    def _background(self, work: Awaitable[object]) -> None:
        future = asyncio.ensure_future(work)
        self._index_writes.add(future)
        future.add_done_callback(self._index_writes.discard)
        future.add_done_callback(_log_failure)

    async def _index_settled(self) -> None:
        while self._index_writes:
            await asyncio.gather(*self._index_writes, return_exceptions=True)

    async def deletions_done(self, limits: Iterable[Limit] | None = None) -> None:
        """Start deleting removed limits' counters if a reload asked for it, and wait for the
        deletions of these limits' old counters (of any limit's, when None). Raises StorageError."""
        if self._removed:
            self._start_deletions()
        with self._failures:
            await self._deletions_done(limits)

    def _start_deletions(self) -> None:
        """Delete the counters of limits a reload removed, in the background: only decisions on a
        limit that is back with the same identity wait for its old counters to go."""
        for limit in self._removed:
            if limit.identity not in self._deleting:
                deletion = asyncio.ensure_future(self._delete_counters(limit))
                self._deleting[limit.identity] = deletion
                deletion.add_done_callback(functools.partial(self._deleted, limit))
        self._removed = []

    def _deleted(self, limit: Limit, deletion: asyncio.Future[None]) -> None:
        del self._deleting[limit.identity]
        if not deletion.cancelled() and deletion.exception() is not None:
            logger.debug("deleting the counters of removed limit %s failed, to be retried: %s",
                         limit.name or limit.identity, deletion.exception())
            self._removed.append(limit)  # tried again with the next operation

    async def _deletions_done(self, limits: Iterable[Limit] | None = None) -> None:
        if not self._deleting:
            return
        wanted = None if limits is None else {limit.identity for limit in limits}
        pending = [deletion for identity, deletion in self._deleting.items() if wanted is None or identity in wanted]
        await asyncio.gather(*(asyncio.shield(deletion) for deletion in pending))

    async def _delete_counters(self, limit: Limit) -> None:
        """Delete every counter of a removed limit, found through its index, a batch at a time."""
        await self._index_settled()
        index = self.keys.index(limit)
        slot = self._client.slot_of(index)
        while keys := cast(list[bytes], await self._client.request(slot, pack("ZRANGE", index, 0, _LIST_CHUNK - 1))):
            await asyncio.gather(*(
                self._client.request(self._client.slot_of(key.decode()), pack("DEL", key, key + b":r"))
                for key in keys
            ))
            await self._client.request(slot, pack("ZREM", index, *keys))

    # -- reachability ----------------------------------------------------------------------------

    def start(self) -> None:
        """Probe Redis now and every PROBE_INTERVAL seconds in the background (needs a running loop)."""
        if self._prober is None:
            self._prober = asyncio.get_running_loop().create_task(self._probe_periodically())

    async def probe(self) -> None:
        """PING every server now; raises StorageError (and marks the storage unreachable) on failure."""
        await self._bounded(self._client.probe())

    async def _probe_periodically(self) -> None:
        loop = asyncio.get_running_loop()
        began = loop.time()
        failed_at_start = 0
        reached = False
        while True:
            try:
                await self.probe()
            except StorageError as exc:
                if not reached:
                    if not failed_at_start:
                        logger.error("Redis at %s is unreachable at start-up (%s); retrying every %gs, "
                                     "decisions answer per --on-storage-error meanwhile",
                                     self.location, exc, PROBE_INTERVAL)
                    failed_at_start += 1
            else:
                if not reached and failed_at_start:
                    logger.error("Redis at %s reachable, %.1fs after start-up and %d failed attempts",
                                 self.location, loop.time() - began, failed_at_start)
                reached = True
            await asyncio.sleep(PROBE_INTERVAL)

    async def close(self) -> None:
        pending: list[asyncio.Future[Any]] = [*self._deleting.values(), *self._index_writes]
        if self._prober is not None:
            pending.append(self._prober)
            self._prober = None
        for work in pending:
            work.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        await self._client.close()
        await self._listing_client.close()


class _Failures:
    """`with counters._failures:` turns a Redis failure into StorageError and keeps
    `status.reachable` up to date. A plain (not async) context manager: it is entered on every decision."""

    __slots__ = ("counters", "status")

    def __init__(self, counters: RedisCounters) -> None:
        self.counters = counters
        self.status = counters.status

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, _: object) -> None:
        status = self.status
        if error is None:
            status.reachable = True
            return
        if isinstance(error, StorageError):
            return  # already turned into one by an inner call
        if isinstance(error, ReplyError):
            # Redis loading its data, a cluster without quorum or mid-failover: unavailable for now.
            self._reachable(error.kind not in _UNAVAILABLE)
            raise StorageError(f"Redis refused the request: {error}") from error
        if isinstance(error, TimeoutError):
            self._reachable(False)
            raise StorageError(f"Redis did not answer within {self.counters.timeout:g}s") from error
        if isinstance(error, _FAILURES):
            self._reachable(False)
            raise StorageError(f"Redis is unreachable: {error}") from error

    def _reachable(self, reachable: bool) -> None:
        if self.status.reachable and not reachable:
            self.status.outages += 1
        self.status.reachable = reachable


class _ServerIdentity:
    """Counter-loss detection from what every new connection reads (INFO server's run id, DBSIZE):
    a server with a new run id restarted; one that restarted holding no key lost its counters."""

    def __init__(self, status: StorageStatus) -> None:
        self.status = status
        self._run_ids: dict[str, str] = {}

    def connected(self, address: Address, replies: list[object]) -> None:
        _, info, key_count = replies
        run_id = _info_field(cast(bytes, info), "run_id")
        where = str(address)
        before = self._run_ids.get(where)
        self._run_ids[where] = run_id
        if before is None or before == run_id:
            return
        if key_count == 0:
            self.status.counters_lost += 1
            logger.error("Redis at %s restarted without its data (run id %s -> %s): every counter it held "
                         "is gone, so callers get their budget again this window; persistence (AOF) or a "
                         "replica that takes over avoids this (see README)", where, before[:8], run_id[:8])
        else:
            logger.error("Redis at %s restarted (run id %s -> %s) and kept its %d keys", where,
                         before[:8], run_id[:8], key_count)


@dataclass(frozen=True)
class _ListingPosition:
    """Where a listing goes on: the limit (by digest, the order limits are walked in) and, within
    its index, the live-until score reached and how many entries of that score were passed.
    Written into a short opaque cursor, `<digest>:<score>:<passed>`."""

    digest: str = ""
    score: int | None = None
    passed: int = 0

    def text(self) -> str:
        return f"{self.digest}:{self.score}:{self.passed}"

    @classmethod
    def parse(cls, cursor: str | None) -> _ListingPosition:
        if cursor is None:
            return cls()
        found = _CURSOR.fullmatch(cursor)
        if found is None:
            raise ValueError(f"invalid cursor {cursor[:40]!r}: pass back a next_cursor this service gave")
        return cls(found[1], int(found[2]), int(found[3]))


_CURSOR = re.compile(r"([0-9a-f]{16}):(\d{1,19}):(\d{1,19})")


def _info_field(info: bytes, name: str) -> str:
    for line in info.decode(errors="replace").splitlines():
        if line.startswith(name + ":"):
            return line.split(":", 1)[1].strip()
    return ""


def _dynamic_arguments(operation: Operation, now: bytes, delta: int, reservation_id: str, ttl_ms: int) -> bytes:
    """The ARGV that change per call (mode, now, delta, reservation id, ttl), packed in one go."""
    delta_text = b"%d" % delta
    if reservation_id:
        reservation = pack_arguments((reservation_id, ttl_ms))
    else:
        reservation = _NO_RESERVATION
    return b"%b$%d\r\n%b\r\n$%d\r\n%b\r\n%b" % (_MODES[operation], len(now), now, len(delta_text), delta_text, reservation)


def _escape(text: str) -> str:
    """Keep `{` and `}` out of a hash tag, so a tag never ends early (reversible with unquote)."""
    return text.replace("%", "%25").replace("{", "%7B").replace("}", "%7D")


async def _done(value: T) -> T:
    return value


def _log_failure(future: asyncio.Future[object]) -> None:
    if not future.cancelled() and future.exception() is not None:
        logger.warning("Redis index update failed (the counter shows in /counters after its next write): %s",
                       future.exception())
