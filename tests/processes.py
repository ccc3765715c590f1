"""Stopping the real processes tests start (service, Redis, Envoy, Prometheus), pass or fail."""

from __future__ import annotations

import signal
import subprocess

STOP_TIMEOUT = 10.0


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
