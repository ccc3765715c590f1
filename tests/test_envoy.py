"""Through a real Envoy 1.40: the bootstraps in examples/envoy/ in front of `ratelimit serve` and the
project's OpenAI-compatible upstream."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from envoy.extensions.common.ratelimit.v3.ratelimit_pb2 import RateLimitDescriptor
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc

from tests.envoy_fixtures import ENVOY, ENVOY_EXAMPLES, Envoy, Upstream
from tests.service_fixtures import ServiceProcess
from tests.support import wait_until

LIMITS = ENVOY_EXAMPLES / "limits.yaml"
BOOTSTRAPS = sorted(path for path in ENVOY_EXAMPLES.glob("*.yaml") if path != LIMITS)

# The examples give the service 100 ms. Here Envoy, the service, the upstream and pytest share two
# cores: a slow moment must not turn into a fail-open 200 where a 429 is expected.
ROOMY = {"timeout": "2s"}

# 10 prompt words + max_tokens 30: the upstream reports usage.total_tokens = 40.
CHAT = {
    "model": "qwen3-8b",
    "max_tokens": 30,
    "messages": [{"role": "user", "content": "one two three four five six seven eight nine ten"}],
}


@pytest.fixture(scope="module")
def service() -> Iterator[ServiceProcess]:
    """`ratelimit serve examples/envoy/limits.yaml`, its storage kernels warmed up: the first decision
    loads them, which takes longer than Envoy waits."""
    service = ServiceProcess(LIMITS)
    try:
        yield _warmed_up(service.start())
    finally:
        service.close()


def _warmed_up(service: ServiceProcess) -> ServiceProcess:
    warm_up = rls_pb2.RateLimitRequest(domain="requests", descriptors=[_user("warm-up")])
    rls_pb2_grpc.RateLimitServiceStub(service.grpc).ShouldRateLimit(warm_up, timeout=30)
    return service


def _user(name: str) -> RateLimitDescriptor:
    return RateLimitDescriptor(entries=[RateLimitDescriptor.Entry(key="user_id", value=name)])


def _remaining(service: ServiceProcess, namespace: str, user: str) -> int | None:
    for counter in service.http.get(f"/counters/{namespace}").json():
        if counter["set_variables"] == {"descriptors[0]['user_id']": user}:
            return counter["remaining"]
    return None


@pytest.mark.parametrize("path", BOOTSTRAPS, ids=lambda path: path.name)
def test_example_bootstrap_passes_envoy_validation(path: Path) -> None:
    command = [str(ENVOY), "--mode", "validate", "-c", str(path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"configuration '{path}' OK" in result.stdout + result.stderr


def test_three_requests_a_minute_per_user(
    service: ServiceProcess, openai_upstream: Upstream, envoy: Callable[..., Envoy]
) -> None:
    proxy = envoy("requests-per-user.yaml", service.rls_port, openai_upstream.port, **ROOMY)
    with httpx.Client(base_url=proxy.url) as client:
        alice = [client.get("/v1/models", headers={"x-user-id": "alice"}) for _ in range(4)]
        assert [response.status_code for response in alice] == [200, 200, 200, 429]
        # Envoy's own draft-03 headers, written from the statuses the service fills.
        assert [response.headers["x-ratelimit-remaining"] for response in alice] == ["2", "1", "0", "0"]
        assert {response.headers["x-ratelimit-limit"] for response in alice} == {'3, 3;w=60;name="per-user"'}
        assert 0 < int(alice[-1].headers["x-ratelimit-reset"]) <= 60

        bob = client.get("/v1/models", headers={"x-user-id": "bob"})
        assert (bob.status_code, bob.headers["x-ratelimit-remaining"]) == (200, "2")
        # Without x-user-id Envoy sends no descriptor, so there is nothing to limit.
        assert all(client.get("/v1/models").status_code == 200 for _ in range(4))
    assert proxy.stat("cluster.upstream.ratelimit.error") == 0


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_token_budget_is_charged_the_usage_of_each_response(
    service: ServiceProcess, openai_upstream: Upstream, envoy: Callable[..., Envoy], stream: bool
) -> None:
    """100 tokens per user; each response uses 40. Envoy checks on the request (hits_addend 0) and
    charges usage.total_tokens when the response has ended: the third request crosses the budget
    and completes, the fourth is refused."""
    proxy = envoy("tokens-per-user.yaml", service.rls_port, openai_upstream.port, **ROOMY)
    user = f"tokens-{'sse' if stream else 'json'}"
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}} if stream else CHAT
    responses = []
    with httpx.Client(base_url=proxy.url, headers={"x-user-id": user}) as client:
        for left_after in (60, 20, 0, None):
            response = client.post("/v1/chat/completions", json=body)
            responses.append(response)
            if response.status_code != 200:
                break
            assert _usage(response.text, stream) == 40
            # The charge is fire-and-forget after the response ends: wait until it has landed.
            def landed(left: int | None = left_after) -> bool:
                return _remaining(service, "tokens", user) == left

            wait_until(landed, timeout=10, what=f"{user}'s charge of 40 tokens")
    assert [response.status_code for response in responses] == [200, 200, 200, 429]
    assert [response.headers["x-ratelimit-remaining"] for response in responses] == ["100", "60", "20", "0"]
    # A 5-minute window has no Envoy unit: the limit is stated without a `w=` that would be false.
    assert {response.headers["x-ratelimit-limit"] for response in responses} == {"100"}
    assert 0 < int(responses[-1].headers["x-ratelimit-reset"]) <= 300
    [counter] = [c for c in service.http.get("/counters/tokens").json()
                 if c["set_variables"] == {"descriptors[0]['user_id']": user}]
    assert (counter["remaining"], counter["overshoot"]) == (0, 20)  # 3 x 40 charged: the spent tokens count


def _usage(text: str, stream: bool) -> int:
    if not stream:
        return json.loads(text)["usage"]["total_tokens"]
    events = [line.removeprefix("data: ") for line in text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return json.loads(events[-2])["usage"]["total_tokens"]


def test_failure_mode_applies_while_the_service_is_down(
    start_service: Callable[..., ServiceProcess], openai_upstream: Upstream, envoy: Callable[..., Envoy]
) -> None:
    service = _warmed_up(start_service(LIMITS))
    deny = envoy("requests-per-user.yaml", service.rls_port, openai_upstream.port, failure_mode_deny=True, **ROOMY)
    allow = envoy("requests-per-user.yaml", service.rls_port, openai_upstream.port, failure_mode_deny=False, **ROOMY)
    user = {"x-user-id": "down"}
    assert httpx.get(f"{deny.url}/v1/models", headers=user).status_code == 200
    service.stop()
    assert httpx.get(f"{deny.url}/v1/models", headers=user).status_code == 500
    assert httpx.get(f"{allow.url}/v1/models", headers=user).status_code == 200
    assert deny.stat("cluster.upstream.ratelimit.error") == 1
    assert allow.stat("cluster.upstream.ratelimit.failure_mode_allowed") == 1


def test_openai_upstream_reports_usage_as_openai_does(openai_upstream: Upstream) -> None:
    with httpx.Client(base_url=openai_upstream.url) as client:
        plain = client.post("/v1/chat/completions", json=CHAT).json()
        assert plain["usage"] == {"prompt_tokens": 10, "completion_tokens": 30, "total_tokens": 40}
        assert len(plain["choices"][0]["message"]["content"].split()) == 30
        # Streamed: a usage chunk only when asked for, as OpenAI does.
        silent = client.post("/v1/chat/completions", json={**CHAT, "stream": True})
        assert '"total_tokens"' not in silent.text and silent.text.endswith("data: [DONE]\n\n")
        bad = client.post("/v1/chat/completions", json={**CHAT, "messages": []})
        assert bad.status_code == 400
        assert bad.json()["error"]["message"].startswith("messages: ")
