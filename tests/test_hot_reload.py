"""Hot reload of the limits file: every way a file gets replaced, bad files, counters kept.

Most cases drive LimitsFileWatcher directly with a tiny poll interval (fast); one goes through the
real service process and its /status and /limits endpoints.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest

from ratelimit.engine import RateLimiter
from ratelimit.limits import Limit, LimitsError
from ratelimit.sources.limits_file import LimitsFileWatcher, load_limits_file_contents
from ratelimit.sources.status import ConfigStatus
from ratelimit.storage.memory import MemoryStorage
from ratelimit.storage.table import CounterTable
from tests.service_fixtures import ServiceProcess
from tests.support import wait_until

NAMESPACE = "llm-d-demo/qwen3-8b-kserve-route"
USER = [{"auth.identity.userid": "charlie"}]
POLL = 0.01
TIMEOUT = 10.0


def limits_yaml(max_value: int, seconds: int = 300, name: str = "freemium") -> str:
    return (
        f"- namespace: {NAMESPACE}\n"
        f"  name: {name}\n"
        f"  max_value: {max_value}\n"
        f"  seconds: {seconds}\n"
        f"  conditions: []\n"
        f"  variables: [\"descriptors[0]['auth.identity.userid']\"]\n"
    )


BAD_YAML = f"- namespace: {NAMESPACE}\n  max_value: lots\n  seconds: 300\n"


def max_values(engine: RateLimiter) -> list[int]:
    return [limit.max_value for limit in engine.get_limits(NAMESPACE)]


class Harness:
    """An engine, its status and a watcher on `path`, loaded once as at startup."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.engine = RateLimiter(MemoryStorage(capacity=1024))
        self.status = ConfigStatus(source=str(path))
        self.watcher = LimitsFileWatcher(path, self.engine, self.status, interval=POLL)
        self.watcher.load()

    async def eventually(self, condition: Callable[[], bool], what: str) -> None:
        """Let the watcher task run until `condition` holds."""
        deadline = time.monotonic() + TIMEOUT
        while not condition():
            if time.monotonic() > deadline:
                pytest.fail(f"timed out waiting for {what}; status: {self.status}")
            await asyncio.sleep(POLL)

    def settle(self) -> None:
        """Drive the watcher by hand (no task): enough polls to get past a fingerprint change."""
        for _ in range(3):
            self.watcher.poll()


@pytest.fixture
def limits_dir(tmp_path: Path) -> Path:
    return tmp_path


def write_atomically(path: Path, text: str) -> None:
    """What editors, `kubectl cp`-style tools and config managers do: write a temp file, rename it."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


class ConfigMapVolume:
    """The layout kubelet gives a mounted ConfigMap, and its update procedure (atomic_writer.go):

        limits.yaml -> ..data/limits.yaml
        ..data -> ..2026_11_22_14_00_00.000000001
        ..2026_11_22_14_00_00.000000001/limits.yaml

    An update writes a new timestamped directory, points a new `..data_tmp` symlink at it, renames
    that over `..data`, then deletes the old directory. The file `limits.yaml` itself never changes.
    """

    def __init__(self, root: Path, text: str) -> None:
        self.root = root
        self.generation = 0
        self.current = self._write_generation(text)
        (root / "..data").symlink_to(self.current.name)
        (root / "limits.yaml").symlink_to("..data/limits.yaml")

    @property
    def path(self) -> Path:
        return self.root / "limits.yaml"

    def _write_generation(self, text: str) -> Path:
        self.generation += 1
        directory = self.root / f"..2026_11_22_14_00_00.{self.generation:09d}"
        directory.mkdir()
        (directory / "limits.yaml").write_text(text)
        return directory

    def update(self, text: str) -> None:
        old, self.current = self.current, self._write_generation(text)
        (self.root / "..data_tmp").symlink_to(self.current.name)
        os.replace(self.root / "..data_tmp", self.root / "..data")
        (old / "limits.yaml").unlink()
        old.rmdir()


# -- each kind of replacement takes effect ------------------------------------------------------------


def in_place(path: Path, text: str) -> None:
    path.write_text(text)


@pytest.mark.parametrize("replace", [in_place, write_atomically], ids=["in-place write", "atomic rename"])
async def test_replacement_takes_effect(limits_dir: Path, replace: Callable[[Path, str], None]) -> None:
    path = limits_dir / "limits.yaml"
    path.write_text(limits_yaml(300))
    harness = Harness(path)

    async with harness.watcher:
        replace(path, limits_yaml(3000))
        await harness.eventually(lambda: max_values(harness.engine) == [3000], "the new max_value")
    assert harness.status.config_version == 2
    assert harness.status.config_err_since == 0


async def test_configmap_symlink_swap_takes_effect(limits_dir: Path) -> None:
    volume = ConfigMapVolume(limits_dir, limits_yaml(300))
    harness = Harness(volume.path)

    async with harness.watcher:
        volume.update(limits_yaml(3000))
        await harness.eventually(lambda: max_values(harness.engine) == [3000], "the first swap")
        volume.update(limits_yaml(30000))
        await harness.eventually(lambda: max_values(harness.engine) == [30000], "the second swap")
    assert harness.status.config_version == 3


async def test_changed_max_value_keeps_counters(limits_dir: Path) -> None:
    """Identity is (namespace, seconds, conditions, variables): raising max_value keeps what was spent."""
    path = limits_dir / "limits.yaml"
    path.write_text(limits_yaml(300))
    harness = Harness(path)

    assert not (await harness.engine.check_and_report(NAMESPACE, USER, 250)).limited
    async with harness.watcher:
        write_atomically(path, limits_yaml(500, name="freemium-raised"))
        await harness.eventually(lambda: max_values(harness.engine) == [500], "the raised limit")
    [counter] = await harness.engine.get_counters(NAMESPACE)
    assert (counter.value, counter.remaining, counter.limit.name) == (250, 250, "freemium-raised")
    assert (await harness.engine.check_and_report(NAMESPACE, USER, 251)).limited
    assert not (await harness.engine.check_and_report(NAMESPACE, USER, 250)).limited


async def test_changed_window_is_a_new_limit_with_fresh_counters(limits_dir: Path) -> None:
    path = limits_dir / "limits.yaml"
    path.write_text(limits_yaml(300, seconds=300))
    harness = Harness(path)

    await harness.engine.check_and_report(NAMESPACE, USER, 250)
    write_atomically(path, limits_yaml(300, seconds=60))
    harness.settle()
    assert await harness.engine.get_counters(NAMESPACE) == []
    assert harness.status.config_version == 2


# -- bad files keep the old limits ----------------------------------------------------------------------


async def test_bad_file_keeps_old_limits_and_is_reported(limits_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = limits_dir / "limits.yaml"
    path.write_text(limits_yaml(300))
    harness = Harness(path)
    caplog.set_level(logging.INFO, logger="ratelimit.sources.limits_file")

    async with harness.watcher:
        write_atomically(path, BAD_YAML)
        await harness.eventually(lambda: harness.status.config_err_since == 1, "the failed reload")
        assert max_values(harness.engine) == [300]
        # Polling on does not count the same bad content again.
        for _ in range(5):
            await asyncio.sleep(POLL)
        assert harness.status.config_err_since == 1
        write_atomically(path, limits_yaml(400))
        await harness.eventually(lambda: max_values(harness.engine) == [400], "the fixed file")
    assert harness.status.config_err_since == 0
    assert harness.status.last_error is None
    assert harness.status.config_version == 2
    [failure] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert f"{path}:2" in failure.getMessage() and "max_value" in failure.getMessage()


def test_status_names_file_line_and_field(limits_dir: Path) -> None:
    path = limits_dir / "limits.yaml"
    path.write_text(limits_yaml(300))
    harness = Harness(path)
    write_atomically(path, BAD_YAML)
    harness.settle()
    assert harness.status.config_version == 1
    assert harness.status.config_err_since == 1
    assert harness.status.last_error is not None
    assert f"{path}:2" in harness.status.last_error
    assert "field 'max_value'" in harness.status.last_error


def test_deleted_file_keeps_old_limits(limits_dir: Path) -> None:
    path = limits_dir / "limits.yaml"
    path.write_text(limits_yaml(300))
    harness = Harness(path)
    path.unlink()
    harness.settle()
    assert max_values(harness.engine) == [300]
    assert harness.status.config_err_since == 1
    assert "cannot read" in (harness.status.last_error or "")
    path.write_text(limits_yaml(300))
    harness.settle()
    assert harness.status.config_err_since == 0


def test_invalid_file_at_startup_raises(limits_dir: Path) -> None:
    path = limits_dir / "limits.yaml"
    path.write_text(BAD_YAML)
    engine = RateLimiter(MemoryStorage(capacity=16))
    status = ConfigStatus(source=str(path))
    with pytest.raises(LimitsError) as raised:
        LimitsFileWatcher(path, engine, status).load()
    assert raised.value.field == "max_value" and raised.value.line == 2
    assert status.config_version == 0


# -- what must not trigger a reload ---------------------------------------------------------------------


def test_unchanged_content_does_not_bump_version(limits_dir: Path) -> None:
    path = limits_dir / "limits.yaml"
    text = limits_yaml(300)
    path.write_text(text)
    harness = Harness(path)
    os.utime(path)  # touch
    harness.settle()
    write_atomically(path, text)  # new inode, same bytes (a ConfigMap resync does this)
    harness.settle()
    assert harness.status.config_version == 1


def test_half_written_file_is_not_applied(limits_dir: Path) -> None:
    """An in-place write truncates first: a poll in between must not apply the empty file (which
    would drop every limit and its counters)."""
    path = limits_dir / "limits.yaml"
    path.write_text(limits_yaml(300))
    harness = Harness(path)
    path.write_text("")  # the truncation, seen by one poll
    assert harness.watcher.poll() is False
    path.write_text(limits_yaml(3000))  # the write completes before the next poll
    harness.settle()
    assert max_values(harness.engine) == [3000]
    assert harness.status.config_version == 2
    assert harness.status.config_err_since == 0


async def test_empty_file_is_never_applied(limits_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A 0-byte file that stays 0 bytes (a stalled writer, a full disk) keeps the old limits and
    counters; it is reported in the status and logged once as a probable partial write."""
    path = limits_dir / "limits.yaml"
    path.write_text(limits_yaml(300))
    harness = Harness(path)
    await harness.engine.report(NAMESPACE, USER, 120)
    path.write_text("")
    with caplog.at_level(logging.ERROR, logger="ratelimit.sources.limits_file"):
        for _ in range(5):
            harness.settle()
    assert max_values(harness.engine) == [300]
    assert harness.status.config_version == 1 and harness.status.config_err_since == 1
    assert harness.status.last_error is not None and "partial write" in harness.status.last_error
    assert [r.message for r in caplog.records].count(caplog.records[0].message) == 1
    assert "0 bytes" in caplog.records[0].message
    [counter] = await harness.engine.get_counters(NAMESPACE)
    assert counter.value == 120
    path.write_text(limits_yaml(300))  # the writer finishes: same limits, counters kept
    harness.settle()
    assert harness.status.last_error is None
    [counter] = await harness.engine.get_counters(NAMESPACE)
    assert counter.value == 120


def test_empty_file_refused_at_startup(limits_dir: Path) -> None:
    path = limits_dir / "limits.yaml"
    path.write_text("")
    with pytest.raises(LimitsError, match="empty"):
        Harness(path)


@pytest.mark.parametrize("text", ["[]\n", "# every limit is gone\n# for now\n"])
def test_explicit_no_limits_is_applied_with_a_warning(
    limits_dir: Path, text: str, caplog: pytest.LogCaptureFixture
) -> None:
    path = limits_dir / "limits.yaml"
    path.write_text(limits_yaml(300) + limits_yaml(100, seconds=60, name="burst"))
    harness = Harness(path)
    path.write_text(text)
    with caplog.at_level(logging.WARNING, logger="ratelimit.sources.limits_file"):
        harness.settle()
    assert max_values(harness.engine) == []
    assert harness.status.config_version == 2
    [warning] = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "removed all 2 limits" in warning.message


def _loader_noting_its_process(files: Mapping[str, bytes]) -> list[Limit]:
    """The default loader, leaving a file named after the process it ran in next to the limits."""
    [path] = files
    (Path(path).parent / f"parsed-in-{os.getpid()}").touch()
    return load_limits_file_contents(files)


async def test_reload_is_parsed_in_a_child_process(limits_dir: Path) -> None:
    """The watcher task parses a changed file in a child process (libyaml holds the interpreter lock
    for a whole document, and CEL compiles take seconds for thousands of limits); only the apply runs
    on the loop, so decisions go on meanwhile. The startup load parses in the service's process."""
    path = limits_dir / "limits.yaml"
    path.write_text(limits_yaml(300))
    engine = RateLimiter(MemoryStorage(capacity=1024))
    status = ConfigStatus(source=str(path))
    watcher = LimitsFileWatcher(path, engine, status, interval=POLL, loader=_loader_noting_its_process)
    watcher.load()
    assert [p.name for p in limits_dir.glob("parsed-in-*")] == [f"parsed-in-{os.getpid()}"]
    many = "".join(
        limits_yaml(300 + i, name=f"limit-{i}").replace(
            "conditions: []", f"conditions: [\"descriptors[0]['n'] == '{i}'\"]"
        )
        for i in range(2000)
    )

    watcher.start()
    write_atomically(path, many)
    deadline = time.monotonic() + 60
    while status.config_version < 2:
        assert time.monotonic() < deadline, f"not applied: {status}"
        await asyncio.sleep(POLL)
    await watcher.stop()
    assert len(engine.get_limits(NAMESPACE)) == 2000
    children = {p.name for p in limits_dir.glob("parsed-in-*")} - {f"parsed-in-{os.getpid()}"}
    assert len(children) == 1, children
    # Rebuilt in this process: the compiled conditions work here.
    limit = next(limit for limit in engine.get_limits(NAMESPACE) if limit.name == "limit-7")
    assert limit.predicates[0].test([{"n": "7"}], limit.cel_binding)


async def test_a_reload_keeps_unchanged_limits_as_they_are(limits_dir: Path) -> None:
    """A reload rebuilds only the limits that changed: the others stay the very objects in use (no
    CEL compiled again, nothing new for the garbage collector), through the start-up load and
    through reloads parsed in the child; a changed one is new and in effect."""
    path = limits_dir / "limits.yaml"
    texts = [limits_yaml(100 + i, seconds=60 + i, name=f"limit-{i}") for i in range(3)]  # three identities
    path.write_text("".join(texts))
    harness = Harness(path)
    before = {limit.name: limit for limit in harness.engine.get_limits(NAMESPACE)}
    harness.watcher.start()
    try:
        for version, changed in ((2, 1), (3, 2)):
            texts[changed] = limits_yaml(900 + version, seconds=60 + changed, name=f"limit-{changed}")
            write_atomically(path, "".join(texts))
            deadline = time.monotonic() + 60
            while harness.status.config_version < version:
                assert time.monotonic() < deadline, f"not applied: {harness.status}"
                await asyncio.sleep(POLL)
            after = {limit.name: limit for limit in harness.engine.get_limits(NAMESPACE)}
            assert after[f"limit-{changed}"].max_value == 900 + version
            assert after[f"limit-{changed}"] is not before[f"limit-{changed}"]
            kept = [name for name in after if after[name] is before[name]]
            assert kept == [f"limit-{k}" for k in range(3) if k != changed]
            before = after
    finally:
        await harness.watcher.stop()


async def test_a_killed_parser_process_costs_no_reload(limits_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The parser child is killed (-9) between reloads: the next change is applied as usual (parsed
    by a new child, or here if the death is noticed mid-call), the death is logged, and later
    reloads are parsed by a new child."""
    path = limits_dir / "limits.yaml"
    path.write_text(limits_yaml(10))
    engine = RateLimiter(MemoryStorage(capacity=1024))
    status = ConfigStatus(source=str(path))
    watcher = LimitsFileWatcher(path, engine, status, interval=POLL)
    watcher.load()

    async def applied(max_value: int, version: int) -> None:
        write_atomically(path, limits_yaml(max_value))
        deadline = time.monotonic() + 60
        while status.config_version < version:
            assert time.monotonic() < deadline, f"not applied: {status}"
            await asyncio.sleep(POLL)
        assert engine.get_limits(NAMESPACE)[0].max_value == max_value

    async def scenario() -> set[int]:
        watcher.start()
        await applied(20, 2)
        child = watcher._parser.pid
        assert child is not None
        os.kill(child, signal.SIGKILL)
        await applied(30, 3)  # parsed here: the child was gone
        await applied(40, 4)  # a new child
        again = watcher._parser.pid
        assert again is not None
        await watcher.stop()
        return {child} & {again}

    assert await scenario() == set()
    assert "parser process died" in caplog.text


# -- lifecycle ---------------------------------------------------------------------------------------


def test_watcher_stops_cleanly(limits_dir: Path) -> None:
    path = limits_dir / "limits.yaml"
    path.write_text(limits_yaml(300))
    harness = Harness(path)

    async def scenario() -> None:
        harness.watcher.start()
        harness.watcher.start()  # idempotent: still one task
        assert len(asyncio.all_tasks()) == 2
        await asyncio.sleep(POLL * 3)
        await harness.watcher.stop()
        await harness.watcher.stop()  # stopping twice is harmless
        assert asyncio.all_tasks() == {asyncio.current_task()}

    # It counts every task of its loop, so it runs on a loop of its own rather than as an async test
    # (the test runner keeps tasks of its own on that loop).
    asyncio.run(scenario())


# -- through the real process ------------------------------------------------------------------------


@pytest.fixture
def reload_service(
    tmp_path: Path, start_service: Callable[..., ServiceProcess]
) -> Iterator[tuple[Path, ServiceProcess]]:
    path = tmp_path / "limits.yaml"
    path.write_text(limits_yaml(300))
    yield path, start_service(path, "--reload-interval", "0.05")


def test_service_hot_reload(reload_service: tuple[Path, ServiceProcess]) -> None:
    path, service = reload_service
    limits_url = f"/limits/{NAMESPACE}"

    def served_max_values() -> list[int]:
        return [limit["max_value"] for limit in service.http.get(limits_url).json()]

    assert served_max_values() == [300]
    assert service.status()["config_version"] == 1

    write_atomically(path, limits_yaml(3000))
    wait_until(lambda: served_max_values() == [3000], what="the renamed file to be served")
    assert service.status()["config_version"] == 2

    write_atomically(path, BAD_YAML)
    status = wait_until(lambda: (s := service.status())["config_err_since"] == 1 and s, what="the failed reload")
    assert "max_value" in status["config_error"] and f"{path}:2" in status["config_error"]
    assert status["config_version"] == 2
    assert served_max_values() == [3000]


def test_service_keeps_limits_and_counters_through_a_truncated_file(
    reload_service: tuple[Path, ServiceProcess],
) -> None:
    """An in-place write that truncates, stalls 2 s, then writes the same limits back: every limit
    and every counter survive (a spent user stays spent), and the empty file shows in /status."""
    path, service = reload_service
    check = {"namespace": NAMESPACE, "values": USER[0], "delta": 100}
    assert [service.http.post("/check_and_report", json=check).status_code for _ in range(4)] == [200, 200, 200, 429]
    text = path.read_text()
    with path.open("w"):
        pass  # truncated to 0 bytes
    status = wait_until(lambda: (s := service.status())["config_err_since"] >= 1 and s, what="the empty file reported")
    assert "partial write" in status["config_error"]
    time.sleep(2)
    assert [limit["max_value"] for limit in service.http.get(f"/limits/{NAMESPACE}").json()] == [300]
    assert service.http.post("/check_and_report", json=check).status_code == 429  # still spent
    path.write_text(text)
    wait_until(lambda: service.status()["config_error"] is None, what="the restored file applied")
    [counter] = service.http.get(f"/counters/{NAMESPACE}").json()
    assert counter["remaining"] == 0
    assert service.http.post("/check_and_report", json=check).status_code == 429



async def test_limits_the_storage_cannot_take_are_reported_once_and_the_old_stay(
    limits_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A reload past the memory table's limit registry (64 slots here) is refused like a bad file:
    once in the log and in /status, the old limits in force, until the file changes."""
    path = limits_dir / "limits.yaml"
    path.write_text(limits_yaml(300))
    engine = RateLimiter(MemoryStorage(table=CounterTable.create(1000, limit_slots=64)))
    status = ConfigStatus(source=str(path))
    watcher = LimitsFileWatcher(path, engine, status, interval=POLL)
    watcher.load()
    too_many = "".join(limits_yaml(300, seconds=60 + i, name=f"limit-{i}") for i in range(80))  # 80 identities
    async with watcher:
        write_atomically(path, too_many)
        deadline = time.monotonic() + 30
        while status.last_error is None:
            assert time.monotonic() < deadline, f"not refused: {status}"
            await asyncio.sleep(POLL)
        await asyncio.sleep(10 * POLL)  # more polls of the same content
    assert status.last_error is not None and "limit registry is full" in status.last_error
    assert max_values(engine) == [300]
    refusals = [r for r in caplog.records if "cannot apply these limits" in r.getMessage()]
    assert len(refusals) == 1 and refusals[0].exc_info is None


def _parser_children(pid: int) -> list[int]:
    """The parser processes whose parent is `pid`, read from /proc."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:  # gone meanwhile
            continue
        if int(fields[1]) == pid and b"ratelimit.sources.parser_process" in cmdline:
            children.append(int(stat.parent.name))
    return children


def test_one_light_parser_child_that_ends_with_a_killed_service(
    tmp_path: Path, start_service: Callable[..., ServiceProcess]
) -> None:
    """`ratelimit serve` with a limits file and an `-L` file runs one parser child for both. After
    reloads of each, that child has loaded neither gRPC's nor numba's compiled libraries (the
    kernel's memory maps say so: it never imported the service). Killed with -9, the service
    cannot stop it; the child ends on its own when its stdin closes."""
    path = tmp_path / "limits.yaml"
    path.write_text(limits_yaml(300))
    labels = tmp_path / "labels.yaml"
    labels.write_text("user: descriptors[0]['auth.identity.userid']\n")
    service = start_service(path, "-L", str(labels), "--reload-interval", "0.05")
    assert service.process is not None
    write_atomically(path, limits_yaml(400))
    labels.write_text("tier: descriptors[0]['tier']\n")
    wait_until(lambda: service.status()["config_version"] == 2, timeout=TIMEOUT, what="the limits reload")
    wait_until(lambda: service.output().count("applied 1 custom metric labels") >= 2, timeout=TIMEOUT,
               what="the labels reload")
    [child] = _parser_children(service.process.pid)
    maps = Path(f"/proc/{child}/maps").read_text()
    assert "_cygrpc" not in maps and "llvmlite" not in maps

    service.process.kill()
    service.process.wait()
    wait_until(lambda: _ended(child), timeout=TIMEOUT, what="the parser child to end")


def _ended(pid: int) -> bool:
    """Gone, or a zombie waiting for whoever adopted it to reap it."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True
