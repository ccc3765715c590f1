"""A child process that parses reloads: `ParserProcess.call(function, *args)` runs the call there.

Why not `concurrent.futures.ProcessPoolExecutor`: its spawned child re-imports the service's main
module (`ratelimit`, and with it the whole service: grpc, numba, FastAPI; 210 MB resident) before it
runs anything, and fork is not an option in a process running gRPC's and numba's threads. This
child is `python -m ratelimit.sources.parser_process`: it imports the limits-file code only (about
55 MB), at the lowest priority (see IDLE_POLICY), and is started with the watcher, so the first
reload does not pay for starting a process on the event loop.

The protocol, on the child's stdin and stdout: each message is an 8-byte big-endian length and a
pickle. The parent sends `(function, args)`; the child answers `(True, result)` or `(False,
exception)`. A closed stdin ends the child (so does the parent's death: the pipe closes).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pickle
import resource
import struct
import sys
from collections.abc import Callable
from typing import Any, BinaryIO

logger = logging.getLogger(__name__)

_LENGTH = struct.Struct(">Q")

PRELOADED = "ratelimit.sources.limits_file"
"""What the child imports at start: what parsing a limits file needs, before the first reload does."""


class ParserProcessDied(Exception):
    """The child ended (killed, out of memory) before it answered."""


NICENESS = 10
"""How much lower than the service the parser process runs: where the service has no core to
spare (two cores, a load generator on one), a reload's parse would otherwise take CPU time from
decisions for as long as it runs; niced, it takes what decisions leave."""
IDLE_POLICY = getattr(os, "SCHED_IDLE", None) if hasattr(os, "sched_setscheduler") else None
"""The Linux scheduling policy the child runs under between its boosts: a thread of the service
that wakes up on the core the child is parsing on takes that core at once. Only niced, the child
kept its time slice, and the decisions that woke up behind it in the first ~50 ms of each
2,000-limit parse were a third to a half of the slowest 1% in the stall benchmark's reload phase."""
BOOST_AFTER_SECONDS = 2.0
"""A call still unanswered after this long: the child is put back under the normal policy (still
niced) until it answers. Under SCHED_IDLE it gets no CPU at all while both cores are busy, and a
service that is saturated must still apply its reloads."""


def idle_policy(niceness: int) -> int | None:
    """SCHED_IDLE where this process may also take a child back out of it (`idle_policy_allowed`),
    else None: the child only niced. An unprivileged process may leave SCHED_IDLE only within its
    RLIMIT_NICE (0 by default: not at all), and a child it could not boost would starve reloads."""
    if IDLE_POLICY is None or not idle_policy_allowed(niceness, os.geteuid(), resource.getrlimit(resource.RLIMIT_NICE)[0]):
        return None
    return IDLE_POLICY


def idle_policy_allowed(niceness: int, euid: int, nice_limit: int) -> bool:
    """Whether a process of this user and RLIMIT_NICE soft limit can move a child at `niceness`
    from SCHED_IDLE back to the normal policy (root can; CAP_SYS_NICE alone is not looked for)."""
    return euid == 0 or nice_limit == resource.RLIM_INFINITY or nice_limit >= 20 - niceness


class ParserProcess:
    """One per service: every file watcher of the service sends its parsing here, one at a time."""

    def __init__(self, niceness: int = NICENESS) -> None:
        self.niceness = niceness
        self.policy = idle_policy(niceness)
        """The child's policy between boosts (None: only niced)."""
        self._process: asyncio.subprocess.Process | None = None
        self._lock = asyncio.Lock()

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    async def start(self) -> None:
        if self._process is not None:
            if self._process.returncode is None:
                return
            logger.error("the parser process died (pid %d, exit code %d); starting a new one",
                         self._process.pid, self._process.returncode)
        # The child finds the same modules as this process (tests and editable installs included).
        paths = [path for path in sys.path if path and os.path.isdir(path)]
        inherited = os.environ.get("PYTHONPATH")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([*paths, *([inherited] if inherited else [])])}
        self._process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", __name__, str(self.niceness), "idle" if self.policy is not None else "niced",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, env=env,
        )

    async def call(self, function: Callable[..., Any], *args: Any) -> Any:
        """`function(*args)` in the child; its exception is raised here. ParserProcessDied when the
        child is gone (the next call starts a new one)."""
        async with self._lock:
            await self.start()
            process = self._process
            assert process is not None and process.stdin is not None and process.stdout is not None
            message = pickle.dumps((function, args))
            try:
                process.stdin.write(_LENGTH.pack(len(message)) + message)
                await process.stdin.drain()
                succeeded, value = await _answer(process, self.policy)
            except (asyncio.IncompleteReadError, ConnectionError) as error:
                self._discard(process)
                await process.wait()
                raise ParserProcessDied(f"the parser process died (pid {process.pid}): {error}") from None
            except BaseException:
                # Cancelled mid-call: the child would still answer, and the next call would read
                # that answer as its own. This child is done; the next call starts another.
                self._discard(process)
                raise
        if not succeeded:
            raise value
        return value

    def _discard(self, process: asyncio.subprocess.Process) -> None:
        """This child answers no more calls (the next one starts a new child)."""
        self._process = None
        with contextlib.suppress(ProcessLookupError):
            process.kill()

    async def stop(self) -> None:
        process, self._process = self._process, None
        if process is None or process.returncode is not None:
            return
        assert process.stdin is not None
        process.stdin.close()  # the child's cue to end
        try:
            await asyncio.wait_for(process.wait(), timeout=2)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()


async def _answer(process: asyncio.subprocess.Process, policy: int | None) -> tuple[bool, Any]:
    """The child's answer to the call just sent, boosting the child (under `policy`) if it is long
    in coming."""
    assert process.stdout is not None
    header = asyncio.ensure_future(process.stdout.readexactly(_LENGTH.size))
    try:
        await asyncio.wait_for(asyncio.shield(header), BOOST_AFTER_SECONDS if policy is not None else None)
    except TimeoutError:
        _set_policy(process.pid, os.SCHED_OTHER)  # starved, or just a long parse: finish it
        try:
            await header
        finally:
            _set_policy(process.pid, policy)
    finally:
        header.cancel()  # only when the call itself is cancelled: done otherwise
    (length,) = _LENGTH.unpack(header.result())
    answer: tuple[bool, Any] = pickle.loads(await process.stdout.readexactly(length))
    return answer


def _set_policy(pid: int, policy: int | None) -> None:
    if policy is None:
        return
    try:
        os.sched_setscheduler(pid, policy, os.sched_param(0))
    except ProcessLookupError:
        pass  # the child is gone: the call reports it
    except OSError as error:  # idle_policy said it was allowed; say so rather than starve quietly
        logger.warning("cannot set the parser process's (pid %d) scheduling policy to %d: %s", pid, policy, error)


def _read_message(stream: BinaryIO) -> Any | None:
    header = stream.read(_LENGTH.size)
    if len(header) < _LENGTH.size:
        return None  # stdin closed: the service is done with us
    (length,) = _LENGTH.unpack(header)
    return pickle.loads(stream.read(length))


def _write_message(stream: BinaryIO, value: Any) -> None:
    data = pickle.dumps(value)
    stream.write(_LENGTH.pack(len(data)) + data)
    stream.flush()


def main() -> None:
    os.nice(int(sys.argv[1]))
    if sys.argv[2] == "idle":
        _set_policy(0, IDLE_POLICY)
    __import__(PRELOADED)
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # anything a loader prints must not corrupt the answers
    while (message := _read_message(stdin)) is not None:
        function, args = message
        try:
            answer = (True, function(*args))
        except Exception as error:  # sent back and raised in the service
            answer = (False, error)
        try:
            _write_message(stdout, answer)
        except (pickle.PicklingError, TypeError, AttributeError) as error:
            _write_message(stdout, (False, RuntimeError(f"the parser's answer does not pickle: {error!r}")))


if __name__ == "__main__":
    main()
