"""A small pipelined Redis client for the storages: one connection per Redis node, RESP parsed by hiredis.

Why not redis-py on the decision path: with 64 concurrent callers on 2 cores its per-command
overhead (pool, retries, a timer per reply) held a Python process to about 18k commands/s, and its
pipelines to about 40k/s. Here commands issued in one event-loop turn share a few writes on one
connection and replies resolve their futures in order: concurrent decisions ride in pipelines for
free while each still costs exactly one round trip.

URLs (Limitador's, plus cluster): `redis://[[user]:password@]host[:port][/db]`, `rediss://...` (TLS;
`#insecure` (Limitador's) or `?ssl_cert_reqs=none` skips certificate checks, `?ssl_ca_certs=PATH` trusts a CA),
`unix:///path/redis.sock[?db=N]`, and `redis-cluster://` / `rediss-cluster://` naming one seed node of
a Redis Cluster (the others are discovered with CLUSTER SLOTS).
"""

from __future__ import annotations

import asyncio
import binascii
import collections
import ssl
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any, cast
from urllib.parse import parse_qs, unquote, urlsplit

import hiredis

SLOTS = 16384
DEFAULT_PORT = 6379
# After a failed connection attempt, requests fail at once for this long instead of each trying
# again: answers stay fast during an outage, and recovery is still noticed within a fraction of a second.
RECONNECT_PAUSE = 0.1
# Commands issued in one event-loop turn are written in pieces of about this many bytes (a handful of
# decisions) rather than all at its end: Redis starts on the first piece while Python still builds the
# next, so the two work side by side instead of taking turns. With 64 callers on 2 cores this took one
# Redis call per decision from about 60k/s to 90-100k/s when the machine was otherwise idle.
WRITE_SIZE = 2048


class RedisError(Exception):
    """Redis could not be reached or did not answer."""


class ReplyError(RedisError):
    """An error reply from Redis (`-ERR ...`, `-NOSCRIPT ...`, `-MOVED ...`)."""

    @property
    def kind(self) -> str:
        return str(self).split(" ", 1)[0]

    @property
    def redirects(self) -> bool:
        """A cluster node's answer that another node serves the slot (MOVED), or this one command
        while the slot migrates (ASK)."""
        return self.kind in ("MOVED", "ASK")


class ConnectionLost(RedisError):
    """The connection closed or was aborted before the reply arrived."""


class RequestTimeout(RedisError, TimeoutError):
    """No reply within the timeout."""


@dataclass(frozen=True)
class Address:
    """Where one Redis node listens and how to log in."""

    host: str = "localhost"
    port: int = DEFAULT_PORT
    unix_path: str | None = None
    username: str | None = None
    password: str | None = None
    db: int = 0
    tls: ssl.SSLContext | None = None

    def __str__(self) -> str:
        return self.unix_path or f"{self.host}:{self.port}"


@dataclass(frozen=True)
class RedisUrl:
    address: Address
    cluster: bool


def parse_url(url: str) -> RedisUrl:
    """Read a storage URL (see the module docstring); ValueError names what is wrong."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    schemes = {"redis": (False, False), "rediss": (True, False), "unix": (False, False), "redis+unix": (False, False),
               "redis-cluster": (False, True), "rediss-cluster": (True, True)}
    if scheme not in schemes:
        raise ValueError(f"unsupported Redis URL scheme {parts.scheme!r} in {_redacted(url)}; "
                         f"expected one of {', '.join(schemes)}")
    tls, cluster = schemes[scheme]
    query = {key: values[-1] for key, values in parse_qs(parts.query).items()}
    unix = "unix" in scheme
    db_text = query.get("db") or ("" if unix else parts.path.strip("/"))
    try:
        db = int(db_text or 0)
    except ValueError:
        raise ValueError(f"the database in {_redacted(url)} must be a number, got {db_text!r}") from None
    if cluster and db != 0:
        raise ValueError("Redis Cluster only has database 0")
    context = None
    if tls:
        context = ssl.create_default_context(cafile=query.get("ssl_ca_certs"))
        if parts.fragment == "insecure" or query.get("ssl_cert_reqs", "").lower() == "none":
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
    address = Address(
        host=parts.hostname or "localhost",
        port=parts.port or DEFAULT_PORT,
        unix_path=parts.path if unix else None,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password is not None else None,
        db=db,
        tls=context,
    )
    return RedisUrl(address, cluster)


def _redacted(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return url.replace(f":{parts.password}@", ":***@", 1)


def key_slot(key: bytes) -> int:
    """The Redis Cluster slot of a key: CRC16 of its hash tag (the first `{...}`), or of the whole key."""
    start = key.find(b"{")
    if start >= 0:
        end = key.find(b"}", start + 1)
        if end > start + 1:
            key = key[start + 1:end]
    return binascii.crc_hqx(key, 0) % SLOTS


def pack(*args: str | bytes | int) -> bytes:
    """A RESP command."""
    return b"*%d\r\n%b" % (len(args), pack_arguments(args))


def pack_arguments(args: Iterable[str | bytes | int]) -> bytes:
    """RESP bulk strings, to splice into a command whose array header is written elsewhere."""
    out = []
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        out.append(b"$%d\r\n%b\r\n" % (len(data), data))
    return b"".join(out)


class Connection(asyncio.Protocol):
    """One pipelined connection. Commands issued in one event-loop turn leave together, in writes of
    about WRITE_SIZE bytes; replies resolve their futures in order.

    Each request carries a deadline `timeout` seconds ahead, checked by one timer per connection
    (a timer per request costs more than the rest of a decision): a late request fails with
    RequestTimeout, its reply is skipped when it comes. A connection that sent no reply at all for
    `timeout` while requests are owed is aborted, so the next request reconnects."""

    def __init__(self, timeout: float) -> None:
        self._timeout = timeout
        self._reader = hiredis.Reader(replyError=ReplyError)
        self._waiting: collections.deque[tuple[asyncio.Future[object], float]] = collections.deque()
        self._outgoing: list[bytes] = []
        self._outgoing_bytes = 0
        self._transport: asyncio.Transport | None = None
        self._loop = asyncio.get_running_loop()
        self._progress = 0.0
        self._watchdog: asyncio.TimerHandle | None = None
        self.closed = False
        self.greeting_replies: list[object] = []
        """The replies to the greeting commands sent when the connection opened."""

    @classmethod
    async def open(cls, address: Address, timeout: float, greeting: Sequence[bytes] = ()) -> Connection:
        """Connect, log in, select the database, then send `greeting` (say, SCRIPT LOAD)."""
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(timeout):
            if address.unix_path:
                _, connection = await loop.create_unix_connection(lambda: cls(timeout), address.unix_path)
            else:
                _, connection = await loop.create_connection(
                    lambda: cls(timeout), address.host, address.port, ssl=address.tls,
                    server_hostname=address.host if address.tls else None,
                )
            try:
                if address.password is not None:
                    credentials = [address.username, address.password] if address.username else [address.password]
                    await connection.request(pack("AUTH", *credentials))
                if address.db:
                    await connection.request(pack("SELECT", address.db))
                for command in greeting:
                    connection.greeting_replies.append(await connection.request(command))
            except BaseException:
                connection.close()
                raise
        return connection

    def request(self, command: bytes) -> asyncio.Future[object]:
        """Send one packed command; the future gets its reply (a ReplyError is raised from it)."""
        future = self._loop.create_future()
        if self.closed:
            future.set_exception(ConnectionLost("connection to Redis closed"))
            return future
        now = self._loop.time()
        if not self._waiting:
            self._progress = now
        if self._watchdog is None:
            self._watchdog = self._loop.call_at(now + self._timeout, self._check_deadlines)
        self._waiting.append((future, now + self._timeout))
        if not self._outgoing:
            self._loop.call_soon(self._flush)
        self._outgoing.append(command)
        self._outgoing_bytes += len(command)
        if self._outgoing_bytes >= WRITE_SIZE:
            self._flush()
        return future

    def _flush(self) -> None:
        if self._transport is not None and self._outgoing and not self.closed:
            self._transport.write(b"".join(self._outgoing))
        self._outgoing.clear()
        self._outgoing_bytes = 0

    def _check_deadlines(self) -> None:
        self._watchdog = None
        if self.closed:
            return
        now = self._loop.time()
        if self._waiting and now - self._progress >= self._timeout:
            self.abort(f"Redis sent no reply for {now - self._progress:.2f}s")
            return
        next_deadline = None
        for future, deadline in self._waiting:  # oldest first, so deadlines only grow
            if deadline > now:
                next_deadline = deadline
                break
            if not future.done():
                future.set_exception(RequestTimeout(f"Redis did not answer within {self._timeout:g}s"))
        if next_deadline is not None:
            self._watchdog = self._loop.call_at(next_deadline, self._check_deadlines)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # a stream connection's transport is a Transport

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        self._progress = self._loop.time()
        waiting = self._waiting
        while (reply := self._reader.gets()) is not False:
            future = waiting.popleft()[0]
            if future.done():  # its deadline passed; the reply is dropped
                continue
            if isinstance(reply, ReplyError):
                future.set_exception(reply)
            else:
                future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(ConnectionLost(f"connection to Redis lost: {exc or 'closed by the server'}"))

    def abort(self, reason: str) -> None:
        self._fail(ConnectionLost(reason))
        if self._transport is not None:
            self._transport.abort()

    def close(self) -> None:
        """Our own shutdown: requests still waiting are cancelled."""
        self._fail(None)
        if self._transport is not None:
            self._transport.close()

    def _fail(self, error: RedisError | None) -> None:
        self.closed = True
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        while self._waiting:
            future = self._waiting.popleft()[0]
            if future.done():
                continue
            if error is None:
                future.cancel()
            else:
                future.set_exception(error)


OnConnect = Callable[[Address, list[object]], None]
"""Called with a node's address and the replies to the greeting each time a connection to it opens."""


class Node:
    """One Redis server: a lazily (re)opened pipelined connection to it."""

    def __init__(
        self, address: Address, timeout: float, greeting: Sequence[bytes] = (), on_connect: OnConnect | None = None
    ) -> None:
        self.address = address
        self._timeout = timeout
        self._greeting = greeting
        self._on_connect = on_connect
        self._connection: Connection | None = None
        self._connecting: asyncio.Task[Connection] | None = None
        self._retry_at = 0.0
        self._last_error: BaseException | None = None

    def request(self, command: bytes) -> Awaitable[object]:
        connection = self._connection
        if connection is not None and not connection.closed:
            return connection.request(command)
        return self._request_when_connected(command)

    async def _request_when_connected(self, command: bytes) -> object:
        try:
            async with asyncio.timeout(self._timeout):  # connecting and answering, together
                connection = await self._connect()
                return await connection.request(command)
        except TimeoutError as exc:
            raise RequestTimeout(f"Redis at {self.address} did not answer within {self._timeout:g}s") from exc

    async def _connect(self) -> Connection:
        loop = asyncio.get_running_loop()
        if self._connecting is None:
            if loop.time() < self._retry_at:
                raise ConnectionLost(f"Redis at {self.address} is unreachable: {self._last_error}")
            self._connecting = loop.create_task(Connection.open(self.address, self._timeout, self._greeting))
            # Its waiters may all have given up (timed out) before it fails: its error is read here too.
            self._connecting.add_done_callback(lambda task: task.cancelled() or task.exception())
        task = self._connecting
        try:
            # Shielded: a caller timing out must not cancel the attempt others are waiting on.
            connection = await asyncio.shield(task)
        except (OSError, TimeoutError, RedisError) as exc:
            if self._connecting is task:
                self._connecting = None
                self._retry_at = loop.time() + RECONNECT_PAUSE
                self._last_error = exc
            raise ConnectionLost(f"cannot connect to Redis at {self.address}: {str(exc) or type(exc).__name__}") from exc
        if self._connecting is task:
            self._connecting = None
            self._connection = connection
            if self._on_connect is not None:
                self._on_connect(self.address, connection.greeting_replies)
        return connection

    async def close(self) -> None:
        if self._connecting is not None:
            self._connecting.cancel()
            self._connecting = None
        if self._connection is not None:
            self._connection.close()
            self._connection = None


class Client(ABC):
    """Where commands go: `request(slot, command)`, to one server or to a cluster's slot owner."""

    cluster: bool

    @abstractmethod
    def request(self, slot: int, command: bytes) -> Awaitable[object]:
        """Send a packed command; the awaitable gives its reply (ReplyError and RedisError raised)."""

    @abstractmethod
    def slot_of(self, key: str) -> int:
        """The slot a key's commands go to (always 0 on a single server)."""

    @abstractmethod
    async def probe(self) -> None:
        """PING every server that serves slots; raises RedisError when one does not answer."""

    @abstractmethod
    async def close(self) -> None:
        """Close every connection; requests still waiting are cancelled."""


class ServerClient(Client):
    """A single Redis server."""

    cluster = False

    def __init__(self, server: Node) -> None:
        self._server = server

    def request(self, slot: int, command: bytes) -> Awaitable[object]:
        return self._server.request(command)

    async def probe(self) -> None:
        await self._server.request(pack("PING"))

    def slot_of(self, key: str) -> int:
        return 0

    async def close(self) -> None:
        await self._server.close()


class ClusterClient(Client):
    """A Redis Cluster: commands go to the node serving their slot, as CLUSTER SLOTS says. A MOVED
    reply (resharding, failover) reloads the slot map and sends the command again."""

    cluster = True
    _MAX_REDIRECTS = 3

    def __init__(self, seed: Address, new_node: Callable[[Address], Node]) -> None:
        self._seed = seed
        self._new_node = new_node
        """A Node for an address the slot map names (as the seed's, but for host and port)."""
        self._nodes: dict[tuple[str, int], Node] = {}
        self._by_slot: list[Node | None] = [None] * SLOTS
        self._refreshing: asyncio.Task[None] | None = None

    def slot_of(self, key: str) -> int:
        return key_slot(key.encode())

    def request(self, slot: int, command: bytes) -> Awaitable[object]:
        owner = self._by_slot[slot]
        if owner is None:
            return self._redirected(slot, command, None)
        return self._checked(slot, command, owner.request(command))

    async def _checked(self, slot: int, command: bytes, reply: Awaitable[object]) -> object:
        try:
            return await reply
        except ReplyError as exc:
            if not exc.redirects:
                raise
            return await self._redirected(slot, command, exc)
        except ConnectionLost:
            self._refresh_soon()  # the node may have failed over: learn the new map for the next requests
            raise

    async def _redirected(self, slot: int, command: bytes, error: ReplyError | None) -> object:
        for _ in range(self._MAX_REDIRECTS):
            if error is not None and error.kind == "ASK":
                # The slot is migrating: this one command goes to the importing node, announced by ASKING.
                node = self._node_at(error.args[0].split()[2])
                asking = node.request(pack("ASKING"))
                reply = node.request(command)
                await asking
            else:
                await self._refresh()
                owner = self._by_slot[slot]
                if owner is None:
                    raise RedisError(f"no Redis Cluster node serves slot {slot}")
                reply = owner.request(command)
            try:
                return await reply
            except ReplyError as exc:
                if not exc.redirects:
                    raise
                error = exc
        raise RedisError(f"Redis Cluster kept redirecting slot {slot}: {error}")

    def _node_at(self, endpoint: str) -> Node:
        host, _, port = endpoint.rpartition(":")
        return self._node(host, int(port))

    def _node(self, host: str, port: int) -> Node:
        node = self._nodes.get((host, port))
        if node is None:
            node = self._new_node(replace(self._seed, host=host, port=port))
            self._nodes[(host, port)] = node
        return node

    def _refresh_soon(self) -> None:
        if self._refreshing is None:
            self._refreshing = asyncio.get_running_loop().create_task(self._load_slots())
            self._refreshing.add_done_callback(lambda task: task.exception() if not task.cancelled() else None)

    async def _refresh(self) -> None:
        self._refresh_soon()
        assert self._refreshing is not None
        await asyncio.shield(self._refreshing)

    async def _load_slots(self) -> None:
        """Ask the known nodes (then the seed) for the slot map until one answers."""
        try:
            candidates = [*self._nodes.values(), self._node(self._seed.host, self._seed.port)]
            failure: BaseException | None = None
            for node in candidates:
                try:
                    ranges = await node.request(pack("CLUSTER", "SLOTS"))
                except RedisError as exc:
                    failure = exc
                    continue
                for first, last, primary, *_ in cast(list[list[Any]], ranges):
                    host = primary[0].decode() or node.address.host
                    owner = self._node(host, int(primary[1]))
                    for slot in range(first, last + 1):
                        self._by_slot[slot] = owner
                return
            raise RedisError(f"no Redis Cluster node answered CLUSTER SLOTS: {failure}")
        finally:
            self._refreshing = None

    async def probe(self) -> None:
        if any(owner is None for owner in self._by_slot):
            await self._refresh()
        owners = {id(owner): owner for owner in self._by_slot if owner is not None}
        await asyncio.gather(*(owner.request(pack("PING")) for owner in owners.values()))

    async def close(self) -> None:
        if self._refreshing is not None:
            self._refreshing.cancel()
        for node in self._nodes.values():
            await node.close()


def connect(url: str, timeout: float, greeting: Sequence[bytes] = (), on_connect: OnConnect | None = None) -> Client:
    """A client for a storage URL; connections open on first use and reopen on their own, each
    sending the `greeting` commands first and then telling `on_connect` their replies."""
    parsed = parse_url(url)

    def node(address: Address) -> Node:
        return Node(address, timeout, greeting, on_connect)

    if parsed.cluster:
        return ClusterClient(parsed.address, node)
    return ServerClient(node(parsed.address))
