"""Real `redis-server` processes for tests: a single node and a 3-node Redis Cluster.

    def test_something(redis_server): ...   # tests/conftest.py loads these fixtures for every test

Every server listens on free loopback ports with persistence off (`--save '' --appendonly no`) and
is stopped at teardown, pass or fail. Servers run in the foreground as our own child processes, so
a test can kill one (`kill()`) and start it again on the same port (`start()`) to simulate an outage.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from ratelimit.tools.processes import free_ports, stop_process
from tests.support import wait_until

HOST = "127.0.0.1"


class RedisServer:
    """One `redis-server` child process on a fixed free port; restartable on that port."""

    def __init__(self, port: int | None = None, *extra: str, directory: Path | None = None) -> None:
        self.port = port if port is not None else free_ports(1, HOST)[0]
        self.extra = extra
        self._own_directory = directory is None
        self.directory = directory if directory is not None else Path(tempfile.mkdtemp(prefix="redis-test-"))
        self.process: subprocess.Popen[bytes] | None = None
        self._log = (self.directory / f"redis-{self.port}.log").open("ab")

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}"

    @property
    def command(self) -> list[str]:
        return [
            "redis-server", "--port", str(self.port), "--bind", HOST, "--save", "", "--appendonly", "no",
            "--dir", str(self.directory), *self.extra,
        ]

    def client(self, **kwargs: object) -> redis.Redis:
        # No retries: redis-py's default backoff would turn a "not up yet" probe into seconds of waiting.
        kwargs.setdefault("retry", Retry(NoBackoff(), 0))
        return redis.Redis(host=HOST, port=self.port, socket_timeout=5, **kwargs)  # type: ignore[arg-type]

    def start(self) -> RedisServer:
        self.process = subprocess.Popen(self.command, stdout=self._log, stderr=subprocess.STDOUT)
        wait_until(self._answers, timeout=10, what=f"redis-server on port {self.port}")
        return self

    def _answers(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            pytest.fail(f"redis-server exited with {self.process.returncode}: {self.log()}")
        try:
            with self.client(socket_connect_timeout=0.5) as client:
                return bool(client.ping())
        except redis.exceptions.AuthenticationError:
            return True  # a password-protected server answers: it is up
        except redis.exceptions.RedisError:
            return False

    def kill(self) -> None:
        """Stop it abruptly (SIGKILL), as a crash would: clients see their connections drop."""
        self._stop(signal.SIGKILL)

    def stop(self) -> None:
        self._stop(signal.SIGTERM)

    def _stop(self, signum: int) -> None:
        process, self.process = self.process, None
        stop_process(process, signum)

    def log(self) -> str:
        return (self.directory / f"redis-{self.port}.log").read_text(errors="replace")[-4000:]

    def close(self) -> None:
        self.stop()
        self._log.close()
        if self._own_directory:
            shutil.rmtree(self.directory, ignore_errors=True)


class RedisCluster:
    """Three master nodes joined by `redis-cli --cluster create` (no replicas): all 16384 slots served."""

    size = 3

    def __init__(self) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="redis-cluster-test-"))
        ports = free_ports(2 * self.size, HOST)
        self.nodes = [
            RedisServer(
                port, "--cluster-enabled", "yes", "--cluster-port", str(bus),
                "--cluster-config-file", f"nodes-{port}.conf", "--cluster-node-timeout", "5000",
                directory=self.directory,
            )
            for port, bus in zip(ports[: self.size], ports[self.size:])
        ]

    @property
    def url(self) -> str:
        """A `redis-cluster://` URL naming one seed node, as the storage takes it."""
        return f"redis-cluster://{HOST}:{self.nodes[0].port}"

    def start(self) -> RedisCluster:
        for node in self.nodes:
            node.start()
        subprocess.run(
            ["redis-cli", "--cluster", "create", *(f"{HOST}:{n.port}" for n in self.nodes),
             "--cluster-replicas", "0", "--cluster-yes"],
            check=True, capture_output=True, timeout=60,
        )
        wait_until(self._ready, timeout=30, what="the Redis Cluster to serve all slots")
        return self

    def _ready(self) -> bool:
        for node in self.nodes:
            with node.client() as client:
                info = client.cluster("INFO")
                if info.get("cluster_state") != "ok" or int(info.get("cluster_slots_ok", 0)) != 16384:
                    return False
                if int(info.get("cluster_known_nodes", 0)) != self.size:
                    return False
        return True

    def flush(self) -> None:
        for node in self.nodes:
            with node.client() as client:
                client.flushall()

    def close(self) -> None:
        for node in self.nodes:
            node.close()
        shutil.rmtree(self.directory, ignore_errors=True)


def require_redis() -> None:
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        pytest.fail("redis-server and redis-cli are needed: apt-get install -y redis-server")


def _running(redis: RedisServer | RedisCluster) -> Iterator[Any]:
    """Start `redis` (with redis-server installed), yield it, close it pass or fail."""
    try:
        require_redis()
        yield redis.start()
    finally:
        redis.close()


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    """A single Redis node for the module; tests flush it themselves when they need it empty."""
    yield from _running(RedisServer())


@pytest.fixture(scope="module")
def redis_cluster() -> Iterator[RedisCluster]:
    """A 3-node Redis Cluster for the module."""
    yield from _running(RedisCluster())


@pytest.fixture
def fresh_redis() -> Iterator[RedisServer]:
    """A single Redis node of the test's own, which the test may kill and restart."""
    yield from _running(RedisServer())
