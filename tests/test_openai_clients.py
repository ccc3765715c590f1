"""The official `openai` SDK, sync and async, through a real Envoy 1.40 on both token routes:
examples/envoy/ext-proc-tokens.yaml (the ext_proc token meter) and tokens-per-user.yaml (Lua + RLS),
against `ratelimit serve` and the project's OpenAI-compatible upstream.

The SDK closes a stream right after `data: [DONE]` and when the caller breaks out of it; those resets
are what lost charges before (issue 9). Every completed call must be charged exactly the usage the
SDK reports; a stream the client leaves early is charged the meter's documented estimate (ext_proc:
at least 1) or, on the Lua route, its usage if that had passed, else nothing.
"""

from __future__ import annotations

import asyncio
import gc
import math
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import pytest
import yaml

from ratelimit.server.openai_usage import Estimator
from tests.envoy_fixtures import EXT_PROC_FILTER, RATELIMIT_FILTER, Envoy, Upstream, start_envoy
from tests.service_fixtures import ServiceProcess
from tests.support import wait_until

EXT_PROC, LUA = "ext-proc-tokens.yaml", "tokens-per-user.yaml"
ROUTES = [EXT_PROC, LUA]
MODEL = "qwen3-8b"
ESTIMATE = Estimator()  # the meter's defaults, as `ratelimit serve` runs it here

LIMITS = [
    {"namespace": "tokens", "name": "per-user", "max_value": 10_000_000, "seconds": 300,
     "conditions": ["descriptors[0]['user_id'].startsWith('mix-')"], "variables": ["descriptors[0]['user_id']"]},
    # 10 requests of "count" with max_tokens 10 reserve 10 x (ceil(5 / 4) + 4 + 10) = 160.
    {"namespace": "tokens", "name": "budget-for-10", "max_value": 160, "seconds": 300,
     "conditions": ["descriptors[0]['user_id'].startsWith('ten-')"], "variables": ["descriptors[0]['user_id']"]},
    {"namespace": "tokens", "name": "short-window", "max_value": 20, "seconds": 3,
     "conditions": ["descriptors[0]['user_id'].startsWith('retry-')"], "variables": ["descriptors[0]['user_id']"]},
]


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    limits = tmp_path_factory.mktemp("limits") / "limits.yaml"
    limits.write_text(yaml.safe_dump(LIMITS))
    # A small table: the first listing of a 2M-row table takes long on a loaded machine (COMMON.md News).
    service = ServiceProcess(limits, "--openai-errors", "memory", "-c", "100000")
    try:
        yield service.start()
    finally:
        service.close()


# Roomy: Envoy, the service, the upstream and the clients share two cores, and a slow moment must
# not turn into a fail-open or a 500.
ROOMY = {EXT_PROC: {EXT_PROC_FILTER: {"message_timeout": "10s"}}, LUA: {RATELIMIT_FILTER: {"timeout": "5s"}}}


@pytest.fixture(scope="module")
def proxies(
    service: ServiceProcess, openai_upstream: Upstream, tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[dict[str, Envoy]]:
    """One Envoy per route, with roomy timeouts."""
    started: dict[str, Envoy] = {}
    try:
        for name in ROUTES:
            directory = tmp_path_factory.mktemp(name.removesuffix(".yaml"))
            started[name] = start_envoy(name, service.rls_port, openai_upstream.port, directory, ROOMY[name])
        yield started
    finally:
        for envoy in started.values():
            envoy.stop()


def _value(service: ServiceProcess, user: str) -> int | None:
    """The user's charged tokens (reservations still held count too, so a settled counter is exact)."""
    for counter in service.http.get("/counters/tokens").json():
        if counter["set_variables"] == {"descriptors[0]['user_id']": user}:
            max_value, remaining = counter["limit"]["max_value"], counter["remaining"]
            if remaining > 0:
                return max_value - remaining
            return max_value + counter["overshoot"]
    return None


def _settled(service: ServiceProcess, user: str) -> bool:
    return not any(counter["reserved"] for counter in service.http.get("/counters/tokens").json()
                   if counter["set_variables"] == {"descriptors[0]['user_id']": user})


# -- the mixed workload ------------------------------------------------------------------------------

KINDS = ("json", "sse-usage", "sse", "break")


@dataclass
class Call:
    kind: str
    prompt: str
    max_tokens: int
    reported: int | None = None
    """usage.total_tokens as the SDK returned it (None: the client did not ask, or left)."""

    @property
    def usage(self) -> int:
        """What the upstream uses: a token per prompt word, max_tokens completion tokens."""
        return len(self.prompt.split()) + self.max_tokens

    @property
    def aborted(self) -> bool:
        return self.kind == "break"

    def request(self) -> dict[str, Any]:
        body: dict[str, Any] = {"model": MODEL, "max_tokens": self.max_tokens,
                                "messages": [{"role": "user", "content": self.prompt}]}
        if self.kind != "json":
            body["stream"] = True
        if self.kind == "sse-usage":
            body["stream_options"] = {"include_usage": True}
        return body

    def estimate_bounds(self) -> tuple[int, int]:
        """The ext_proc meter's charge for a stream left early: its usage if that passed the meter,
        else the prompt estimate plus the streamed content (at least 1); at most the larger."""
        prompt = math.ceil(len(self.prompt.encode()) / ESTIMATE.bytes_per_token) + ESTIMATE.tokens_per_message
        most_content = math.ceil(7 * self.max_tokens / ESTIMATE.bytes_per_token)  # words of at most 6 bytes + space
        return 1, max(self.usage, prompt + most_content)


def _calls(user_no: int) -> list[Call]:
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
    calls = []
    for n in range(8):
        kind = KINDS[(user_no + n) % len(KINDS)]
        prompt = " ".join(words[: 1 + (user_no * 3 + n) % len(words)])
        calls.append(Call(kind, prompt, 300 if kind == "break" else 3 + (user_no + 2 * n) % 20))
    return calls


def _sync_user(client: openai.OpenAI, user: str, calls: list[Call]) -> None:
    headers = {"x-user-id": user}
    for call in calls:
        body = call.request()
        if call.kind == "json":
            completion = client.chat.completions.create(**body, extra_headers=headers)
            call.reported = completion.usage.total_tokens if completion.usage else None
            continue
        with client.chat.completions.create(**body, extra_headers=headers) as stream:
            for n, chunk in enumerate(stream):
                if call.aborted and n == 2:
                    break  # leaving the `with` closes the response mid-stream
                if chunk.usage is not None:
                    call.reported = chunk.usage.total_tokens


async def _async_user(client: openai.AsyncOpenAI, user: str, calls: list[Call]) -> None:
    headers = {"x-user-id": user}
    for call in calls:
        body = call.request()
        if call.kind == "json":
            completion = await client.chat.completions.create(**body, extra_headers=headers)
            call.reported = completion.usage.total_tokens if completion.usage else None
            continue
        async with await client.chat.completions.create(**body, extra_headers=headers) as stream:
            n = 0
            async for chunk in stream:
                if call.aborted and n == 2:
                    break
                if chunk.usage is not None:
                    call.reported = chunk.usage.total_tokens
                n += 1


@pytest.mark.parametrize("route", ROUTES)
def test_every_sdk_call_is_charged_its_usage(service: ServiceProcess, proxies: dict[str, Envoy], route: str) -> None:
    """8 users at once (4 sync in threads, 4 async), 8 calls each: JSON, SSE with and without
    include_usage, and streams left after 3 chunks. Afterwards each user's counter holds exactly
    the usage of its completed calls, plus what the route charges for the streams left early."""
    _check_workload(service, proxies, route, users=8, rounds=1, prefix="mix")


@pytest.mark.slow
@pytest.mark.parametrize("route", ROUTES)
def test_every_sdk_call_is_charged_its_usage_in_a_soak(
    service: ServiceProcess, proxies: dict[str, Envoy], route: str
) -> None:
    """The same, 32 users at once, 5 rounds of 8 calls each: 1,280 calls per route."""
    _check_workload(service, proxies, route, users=32, rounds=5, prefix="mix-soak")


def _check_workload(
    service: ServiceProcess, proxies: dict[str, Envoy], route: str, users: int, rounds: int, prefix: str
) -> None:
    base_url = f"{proxies[route].url}/v1"
    tag = "x" if route == EXT_PROC else "l"
    workload = {f"{prefix}-{tag}-{n}": _calls(n) * rounds for n in range(users)}
    names = list(workload)
    half = users // 2
    sync_client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=60)
    async_client = openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=60)

    async def async_users() -> None:
        try:
            await asyncio.gather(*(_async_user(async_client, user, workload[user]) for user in names[half:]))
        finally:
            # On this loop: left to the garbage collector, its connections close on a loop that is
            # gone, and the error lands in whichever later test runs a loop (it failed one).
            await async_client.close()

    with ThreadPoolExecutor(half) as pool:
        futures = [pool.submit(_sync_user, sync_client, user, workload[user]) for user in names[:half]]
        asyncio.run(async_users())
        for future in futures:
            future.result()
    sync_client.close()

    assert sum(len(calls) for calls in workload.values()) == users * 8 * rounds
    for user, calls in workload.items():
        for call in calls:
            if call.kind in ("json", "sse-usage"):
                assert call.reported == call.usage, (user, call)  # the SDK saw the upstream's usage
            elif call.kind == "sse":
                # ext_proc takes out the usage chunk it asked for; the Lua route cannot.
                assert call.reported == (None if route == EXT_PROC else call.usage), (user, call)
        exact = sum(call.usage for call in calls if not call.aborted)
        left = [call for call in calls if call.aborted]
        if route == EXT_PROC:
            low = exact + sum(call.estimate_bounds()[0] for call in left)
            high = exact + sum(call.estimate_bounds()[1] for call in left)
        else:  # a stream left before its usage passed the Lua filter is not charged
            low, high = exact, exact + sum(call.usage for call in left)
        def landed(user: str = user, low: int = low) -> bool:
            return (_value(service, user) or 0) >= low and _settled(service, user)

        wait_until(landed, timeout=20, what=f"{user}'s charges to land")
        charged = _value(service, user)
        assert charged is not None and low <= charged <= high, (user, charged, low, high, calls)
        if not left:
            assert charged == exact, (user, charged, exact)


def test_parallel_streams_of_one_user_never_overshoot_on_the_ext_proc_route(
    service: ServiceProcess, proxies: dict[str, Envoy]
) -> None:
    # Its own loop (asyncio.run), not anyio's runner: the SDK may close a refused stream's connection
    # from its finalizer after the test, which anyio's runner reports as the test's error (2 of 4 runs).
    asyncio.run(_parallel_streams(service, proxies))


async def _parallel_streams(service: ServiceProcess, proxies: dict[str, Envoy]) -> None:
    """32 streamed requests at once, a budget for 10: the meter reserves each request's estimate, so
    what is admitted is what the budget holds, and the charged usage never passes it."""
    client = openai.AsyncOpenAI(base_url=f"{proxies[EXT_PROC].url}/v1", api_key="unused", max_retries=0, timeout=60)
    user = "ten-parallel"
    body: dict[str, Any] = {"model": MODEL, "max_tokens": 10, "messages": [{"role": "user", "content": "count"}],
                            "stream": True}

    async def one() -> int | None:
        try:
            async with await client.chat.completions.create(**body, extra_headers={"x-user-id": user}) as stream:
                return len([chunk async for chunk in stream])
        except openai.RateLimitError as error:
            assert error.code == "rate_limit_exceeded"
            return None

    async def all_at_once() -> list[int | None]:
        return await asyncio.gather(*(one() for _ in range(32)))

    outcomes = await all_at_once()
    # Closed on this loop: left to the garbage collector, its connections would close on a loop
    # that is gone, and the test runner reports that error.
    await client.close()
    # A refused stream's response may still wait for the garbage collector; collected here, its
    # connection closes on this loop (after the test the loop is closed, and the runner reports it).
    gc.collect()
    await asyncio.sleep(0.1)
    admitted = sum(outcome is not None for outcome in outcomes)
    wait_until(lambda: _settled(service, user), timeout=20, what="every reservation to be committed")
    charged = _value(service, user)
    assert charged == 11 * admitted  # 1 prompt word + 10 completion tokens each
    assert charged <= 160, f"overshoot: {admitted} admitted, {charged} tokens charged of 160"
    assert admitted >= 10  # reservations of 16 fit 10 at once; commits of 11 free room for more
    assert admitted < 32


@pytest.mark.parametrize("route", ROUTES)
def test_a_limited_request_is_an_openai_rate_limit_error_and_its_retry_waits_retry_after(
    service: ServiceProcess, proxies: dict[str, Envoy], route: str
) -> None:
    """20 tokens per 3 s; each call uses 11. Refused: RateLimitError with OpenAI's error shape and a
    Retry-After. With the SDK's default retries, its own backoff (0.5 s, 1 s) would give up inside
    the window; waiting Retry-After, its retry lands in the next window and succeeds."""
    base_url = f"{proxies[route].url}/v1"
    user = f"retry-{'x' if route == EXT_PROC else 'l'}"
    body: dict[str, Any] = {"model": MODEL, "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}],
                            "extra_headers": {"x-user-id": user}}
    no_retries = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=30)
    attempts: list[int] = []
    lock = threading.Lock()

    def count(request: Any) -> None:
        with lock:
            attempts.append(1)

    retrying = openai.OpenAI(base_url=base_url, api_key="unused", timeout=30,
                             http_client=openai.DefaultHttpxClient(event_hooks={"request": [count]}))
    assert retrying.max_retries == 2  # the SDK's default

    with pytest.raises(openai.RateLimitError) as refused:
        for n in range(1, 4):  # ext_proc refuses the 2nd (its reservation does not fit), Lua the 3rd
            no_retries.chat.completions.create(**body)
            charged = 11 * n
            wait_until(lambda: _value(service, user) == charged and _settled(service, user), timeout=10,  # noqa: B023
                       what="the charge to land")
    error = refused.value
    assert error.status_code == 429 and error.code == "rate_limit_exceeded"
    assert "short-window" in error.message and isinstance(error.body, dict)
    retry_after = int(error.response.headers["retry-after"])
    assert 1 <= retry_after <= 3
    assert error.response.headers["content-type"] == "application/json"

    completion = retrying.chat.completions.create(**body)
    assert completion.usage is not None and completion.usage.total_tokens == 11
    assert len(attempts) >= 2  # refused at least once, then admitted after Retry-After


def test_the_lua_route_charges_streams_the_sdk_closes_right_after_done(
    service: ServiceProcess, proxies: dict[str, Envoy]
) -> None:
    """The cause of issue 9: the SDK closes at [DONE], resetting the stream before the Lua filter's
    body loop ends. With the usage set as soon as it is seen, 16 such streams are all charged."""
    client = openai.OpenAI(base_url=f"{proxies[LUA].url}/v1", api_key="unused", max_retries=0, timeout=30)
    users = [f"mix-done-{n}" for n in range(16)]
    for user in users:
        stream = client.chat.completions.create(
            model=MODEL, max_tokens=5, messages=[{"role": "user", "content": "hi there"}], stream=True,
            stream_options={"include_usage": True}, extra_headers={"x-user-id": user})
        assert [chunk.usage.total_tokens for chunk in stream if chunk.usage] == [7]
    for user in users:
        wait_until(lambda: _value(service, user) == 7, timeout=20, what=f"{user}'s 7 tokens")  # noqa: B023


def _metric(service: ServiceProcess, name: str, labels: str) -> float:
    for line in service.http.get("/metrics").text.splitlines():
        if line.startswith(f"{name}{{") and all(part in line for part in labels.split(",")):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_an_upstream_error_releases_the_reservation_and_charges_nothing(
    service: ServiceProcess, proxies: dict[str, Envoy]
) -> None:
    user = "mix-x-error"
    with httpx.Client(base_url=proxies[EXT_PROC].url, timeout=30) as client:
        # The upstream refuses a chat request without messages (400).
        refused = client.post("/v1/chat/completions", headers={"x-user-id": user},
                              json={"model": MODEL, "max_tokens": 10, "messages": []})
        assert refused.status_code == 400
        ok = client.post("/v1/chat/completions", headers={"x-user-id": user},
                         json={"model": MODEL, "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]})
        assert ok.status_code == 200
    wait_until(lambda: _value(service, user) == 11 and _settled(service, user), timeout=20,
               what="only the successful call's 11 tokens")


def test_a_response_without_usage_passes_untouched_and_is_charged_its_estimate(
    service: ServiceProcess, proxies: dict[str, Envoy]
) -> None:
    user = "mix-x-speech"
    before = _metric(service, "token_meter_estimated_charges_total", 'reason="not_openai"')
    with httpx.Client(base_url=proxies[EXT_PROC].url, timeout=30) as client:
        audio = client.post("/v1/audio/speech", headers={"x-user-id": user},
                            json={"model": "tts", "input": "hello", "voice": "alloy"})
    assert audio.status_code == 200 and audio.headers["content-type"] == "audio/mpeg"
    assert audio.content == b"ID3" + bytes(253)
    # No max tokens: ceil(5 bytes / 4) for the input + the default 256 completion tokens.
    estimate = ESTIMATE.reservation(math.ceil(5 / ESTIMATE.bytes_per_token), None)
    wait_until(lambda: _value(service, user) == estimate and _settled(service, user), timeout=20,
               what=f"the estimate of {estimate} tokens")
    assert _metric(service, "token_meter_estimated_charges_total", 'reason="not_openai"') == before + 1
