"""The real service process over HTTP, `ratelimit validate` as a command, and option wiring."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import yaml

from ratelimit.cli import Serve, parse_command
from ratelimit.server.app import build_service
from ratelimit.server.state import ServiceOptions
from ratelimit.storage.memory import MemoryStorage
from tests.service_fixtures import ServiceProcess
from tests.support import EXAMPLES, REPO

TIERS_NAMESPACE = "llm-d-demo/qwen3-8b-kserve-route"


def subscription(tier: str) -> str:
    return f"models-as-a-service/{tier}-subscription@llm-d-demo/qwen3-8b"


def tokens_used(tier: str, user: str, tokens: int) -> dict:
    """What the gateway reports after a response: `tokens` spent by `user` under `tier`."""
    return {
        "namespace": TIERS_NAMESPACE,
        "values": {"auth.identity.selected_subscription_key": subscription(tier), "auth.identity.userid": user},
        "delta": tokens,
    }


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ratelimit.cli", *args], cwd=REPO, capture_output=True, text=True, timeout=60
    )


# -- serving --------------------------------------------------------------------------------------


def test_freemium_user_is_refused_after_300_tokens(start_service: Callable[..., ServiceProcess]) -> None:
    service = start_service(EXAMPLES / "tiers.yaml")
    codes = [service.http.post("/check_and_report", json=tokens_used("freemium", "charlie", 100)).status_code
             for _ in range(4)]
    assert codes == [200, 200, 200, 429]
    # Counters are per user and per tier: bob (pro) and another freemium user are untouched.
    assert service.http.post("/check_and_report", json=tokens_used("pro", "bob", 2000)).status_code == 200
    assert service.http.post("/check_and_report", json=tokens_used("freemium", "dave", 300)).status_code == 200
    [charlie] = [c for c in service.http.get(f"/counters/{TIERS_NAMESPACE}").json()
                 if c["set_variables"] == {"descriptors[0]['auth.identity.userid']": "charlie"}]
    assert (charlie["limit"]["max_value"], charlie["remaining"]) == (300, 0)


def test_concurrent_requests_admit_exactly_the_limit(
    tmp_path: Path, start_service: Callable[..., ServiceProcess]
) -> None:
    limits = tmp_path / "limits.yaml"
    limits.write_text(
        "- namespace: load\n  max_value: 1000\n  seconds: 3600\n"
        "  conditions: []\n  variables: [\"descriptors[0]['user']\"]\n"
    )
    service = start_service(limits)
    url = f"{service.url}/check_and_report"
    body = {"namespace": "load", "values": {"user": "alice"}, "delta": 1}
    local = threading.local()

    def call(_: int) -> int:
        if not hasattr(local, "client"):  # one connection per thread: 64 really concurrent callers
            local.client = httpx.Client(timeout=30.0)
        return local.client.post(url, json=body).status_code

    with ThreadPoolExecutor(max_workers=64) as pool:
        codes = Counter(pool.map(call, range(1600)))
    assert codes == {200: 1000, 429: 600}


def test_serves_the_tier_example_when_no_file_is_given(start_service: Callable[..., ServiceProcess]) -> None:
    service = start_service(None)
    names = [limit["name"] for limit in service.http.get(f"/limits/{TIERS_NAMESPACE}").json()]
    assert len(names) == 3 and all("subscription" in name for name in names)
    assert service.status()["limits_source"].endswith("ratelimit/default_limits.yaml")
    assert "serving the example" in service.output()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_gracefully(signum: int, start_service: Callable[..., ServiceProcess]) -> None:
    service = start_service(EXAMPLES / "tiers.yaml", "-vv")
    assert service.stop(signum) == 0
    assert f"{signal.Signals(signum).name} received, shutting down" in service.output()


def test_invalid_limits_at_startup_exit_1(tmp_path: Path) -> None:
    limits = tmp_path / "limits.yaml"
    limits.write_text("- namespace: a\n  max_value: 10\n  seconds: 60\n  colour: blue\n")
    service = ServiceProcess(limits)
    try:
        with pytest.raises(RuntimeError, match="exited with 1"):
            service.start()
        assert f"{limits}:4" in service.output() and "colour" in service.output()
    finally:
        service.close()


# -- validate --------------------------------------------------------------------------------------


@pytest.mark.parametrize("example", ["tiers.yaml", "stacked.yaml"])
def test_examples_validate(example: str) -> None:
    result = run_cli("validate", str(EXAMPLES / example))
    assert result.returncode == 0, result.stderr
    normalized = yaml.safe_load(result.stdout)
    assert normalized == yaml.safe_load((EXAMPLES / example).read_text())


def test_validate_names_the_field_and_line(tmp_path: Path) -> None:
    limits = tmp_path / "limits.yaml"
    limits.write_text("- namespace: a\n  seconds: 60\n  max_value: lots\n")
    result = run_cli("validate", str(limits))
    assert result.returncode == 1
    assert result.stdout == ""
    assert "max_value" in result.stderr and f"{limits}:3" in result.stderr


def test_validate_shows_the_2x_form_of_a_1x_condition(tmp_path: Path) -> None:
    limits = tmp_path / "limits.yaml"
    limits.write_text(
        "- namespace: a\n  max_value: 5\n  seconds: 60\n  conditions: [\"req.method == 'POST'\"]\n  variables: []\n"
    )
    for args in (("validate", str(limits)), ("serve", "--validate", str(limits))):
        result = run_cli(*args)
        assert result.returncode == 1
        assert "descriptors[0]['req.method'] == 'POST'" in result.stderr


def test_options_reach_the_service() -> None:
    """Every parsed option ends up where the servers read it (in-process: no port needed)."""
    command = parse_command(
        ["serve", str(EXAMPLES / "tiers.yaml"), "memory", "-c", "100", "-H", "DRAFT_VERSION_03", "-l",
         "--reload-interval", "3"],
        {"RATELIMIT_API_TOKEN": "secret"},
    )
    assert isinstance(command, Serve)
    service, watcher = build_service(command.config)
    assert service.options == ServiceOptions(rate_limit_headers=True, api_token="secret")
    assert service.metrics.limit_name_in_labels is True
    assert isinstance(service.engine.storage, MemoryStorage) and service.engine.storage.capacity == 100
    assert (watcher.interval, service.status.config_version) == (3.0, 1)
    assert len(service.engine.get_limits(TIERS_NAMESPACE)) == 3
