"""Child processes on loopback ports, for the demo, the benches and the tests: started, waited for
until they answer, and always stopped."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

STOP_TIMEOUT = 10.0
STARTUP_TIMEOUT = 60.0


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """Distinct ports nothing listens on right now: the kernel's picks for port 0, all held open
    together so it cannot hand out the same one twice."""
    probes = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for probe in probes:
            probe.bind((host, 0))
        return [probe.getsockname()[1] for probe in probes]
    finally:
        for probe in probes:
            probe.close()


def stop_process(process: subprocess.Popen | None, signum: int = signal.SIGTERM) -> int | None:
    """Signal a process, kill it if it lingers past STOP_TIMEOUT; returns its exit code."""
    if process is None:
        return None
    if process.poll() is None:
        process.send_signal(signum)
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


@contextlib.contextmanager
def running(
    name: str,
    command: Sequence[str],
    ready: Callable[[], bool],
    log: Path,
    not_ready_yet: tuple[type[BaseException], ...] = (OSError,),
    cwd: Path | None = None,
) -> Iterator[subprocess.Popen[bytes]]:
    """A child process writing to `log`, yielded once `ready()` is true (`not_ready_yet` errors
    from it mean "ask again"), stopped on the way out. If it dies or never gets ready, RuntimeError
    with the end of its log."""
    with log.open("wb") as output:
        process = subprocess.Popen(command, cwd=cwd, stdout=output, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + STARTUP_TIMEOUT
            while not _answers(ready, not_ready_yet):
                if process.poll() is not None or time.monotonic() > deadline:
                    tail = log.read_text(errors="replace")[-4000:]
                    raise RuntimeError(f"{name} did not start ({' '.join(command)}):\n{tail}")
                time.sleep(0.05)
            yield process
        finally:
            stop_process(process)


def _answers(ready: Callable[[], bool], not_ready_yet: tuple[type[BaseException], ...]) -> bool:
    try:
        return ready()
    except not_ready_yet:
        return False
