"""MaaS custom resources -> Limitador limits (`ratelimit translate`, `serve --maas`), enforced by the real engine."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from ratelimit.engine import RateLimiter
from ratelimit.limits import LimitsError, parse_limits
from ratelimit.sources.limits_file import LimitsFileWatcher
from ratelimit.sources.maas import (
    MaasError,
    attributes_to_descriptors,
    limits_from_files,
    read_files,
    translate_paths,
)
from ratelimit.sources.status import ConfigStatus
from ratelimit.storage.memory import MemoryStorage
from tests.service_fixtures import ServiceProcess
from tests.support import EXAMPLES, REPO, wait_until

SUB_NS = "models-as-a-service"
GPU_ROUTE = "llm-d-demo/qwen3-8b-kserve-route"
EXTERNAL_ROUTE = "llm-d-demo/qwen3-14b"
PATH_CONDITION = "!('request.path' in descriptors[0]) || !descriptors[0]['request.path'].endsWith('/v1/models')"
USER_VARIABLE = "descriptors[0]['auth.identity.userid']"

MODELS = """
apiVersion: serving.kserve.io/v1alpha1
kind: LLMInferenceService
metadata: {name: qwen3-8b, namespace: llm-d-demo}
---
apiVersion: maas.opendatahub.io/v1alpha1
kind: MaaSModelRef
metadata: {name: qwen3-8b, namespace: llm-d-demo}
spec: {modelRef: {kind: LLMInferenceService, name: qwen3-8b}}
---
apiVersion: maas.opendatahub.io/v1alpha1
kind: ExternalModel
metadata: {name: qwen3-14b, namespace: llm-d-demo}
spec: {provider: openai, endpoint: api.example.com, targetModel: qwen3-14b, credentialRef: {name: creds}}
---
apiVersion: v1
kind: Secret
metadata:
  name: creds
  namespace: llm-d-demo
  labels: {inference.networking.k8s.io/bbr-managed: "true"}
---
apiVersion: maas.opendatahub.io/v1alpha1
kind: MaaSModelRef
metadata: {name: qwen3-14b, namespace: llm-d-demo}
spec: {modelRef: {kind: ExternalModel, name: qwen3-14b}}
"""

# team-a: stacked windows (burst cap + daily cap) on both models; team-b: no rates, so the default.
SUBSCRIPTIONS = """
apiVersion: maas.opendatahub.io/v1alpha1
kind: MaaSSubscription
metadata: {name: team-a, namespace: models-as-a-service}
spec:
  owner: {groups: [{name: team-a}]}
  modelRefs:
    - name: qwen3-8b
      namespace: llm-d-demo
      tokenRateLimits: [{limit: 100, window: 1m}, {limit: 150, window: 24h}]
    - name: qwen3-14b
      namespace: llm-d-demo
      tokenRateLimits: [{limit: 1000, window: 1h}]
---
apiVersion: maas.opendatahub.io/v1alpha1
kind: MaaSSubscription
metadata: {name: team-b, namespace: models-as-a-service}
spec:
  owner: {groups: [{name: team-b}]}
  modelRefs:
    - {name: qwen3-8b, namespace: llm-d-demo}
"""


def write(directory: Path, **files: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / name).write_text(textwrap.dedent(text))
    return directory


@pytest.fixture
def crs(tmp_path: Path) -> Path:
    return write(tmp_path / "crs", **{"models.yaml": MODELS, "subscriptions.yaml": SUBSCRIPTIONS})


def expected(route: str, subscription: str, model: str, max_value: int, seconds: int) -> dict[str, Any]:
    return {
        "namespace": route,
        "name": f"{SUB_NS}-{subscription}-{model}-tokens",
        "max_value": max_value,
        "seconds": seconds,
        "conditions": sorted([
            PATH_CONDITION,
            f"descriptors[0]['auth.identity.selected_subscription_key'] == '{SUB_NS}/{subscription}@llm-d-demo/{model}'",
        ]),
        "variables": [USER_VARIABLE],
    }


def as_dicts(limits: list) -> list[dict[str, Any]]:
    return sorted(({k: v for k, v in limit.to_dict().items() if k != "id"} for limit in limits),
                  key=lambda d: (d["namespace"], d["name"], d["seconds"]))


def test_a_directory_translates_to_one_limit_per_window_per_subscription_and_model(crs: Path) -> None:
    translation = translate_paths([crs])
    assert translation.warnings == []
    assert as_dicts(translation.limits) == sorted([
        expected(GPU_ROUTE, "team-a", "qwen3-8b", 100, 60),
        expected(GPU_ROUTE, "team-a", "qwen3-8b", 150, 86400),
        expected(EXTERNAL_ROUTE, "team-a", "qwen3-14b", 1000, 3600),
        expected(GPU_ROUTE, "team-b", "qwen3-8b", 100, 60),  # the default: 100 tokens / 1m
    ], key=lambda d: (d["namespace"], d["name"], d["seconds"]))


async def test_served_limits_enforce_each_subscription_per_user_and_never_count_model_listing(crs: Path) -> None:
    engine = RateLimiter(MemoryStorage(), translate_paths([crs]).limits)

    def request(user: str, subscription: str, path: str = "/llm-d-demo/qwen3-8b/v1/chat/completions") -> list[dict]:
        key = f"{SUB_NS}/{subscription}@llm-d-demo/qwen3-8b"
        return [{"auth.identity.userid": user, "auth.identity.selected_subscription_key": key, "request.path": path}]

    async def tokens(descriptors: list[dict], delta: int) -> bool:
        """True when admitted (and charged)."""
        return not (await engine.check_and_report(GPU_ROUTE, descriptors, delta)).limited

    # team-a: the 1m burst cap (100) admits 60 + 40, then refuses; another user is unaffected.
    assert await tokens(request("ann", "team-a"), 60)
    assert await tokens(request("ann", "team-a"), 40)
    assert not await tokens(request("ann", "team-a"), 1)
    assert await tokens(request("amy", "team-a"), 100)
    # team-b has its own budget (default 100 / 1m), per user too.
    assert await tokens(request("ann", "team-b"), 100)
    assert not await tokens(request("ann", "team-b"), 1)
    assert await tokens(request("bea", "team-b"), 100)
    # Listing models is never counted, even for a user whose budget is spent.
    models = request("ann", "team-a", "/llm-d-demo/qwen3-8b/v1/models")
    assert engine.counters_for(GPU_ROUTE, models).counters == ()
    assert await tokens(models, 10_000)
    # A caller that sends no request.path is still counted (the condition holds without it).
    [no_path] = request("ann", "team-a")
    del no_path["request.path"]
    assert not await tokens([no_path], 1)


def test_a_day_window_is_rejected_naming_the_subscription_and_suggesting_24h(tmp_path: Path) -> None:
    write(tmp_path, **{"models.yaml": MODELS, "subs.yaml": SUBSCRIPTIONS.replace("window: 24h", "window: 1d")})
    with pytest.raises(MaasError) as caught:
        translate_paths([tmp_path])
    message = str(caught.value)
    assert "MaaSSubscription models-as-a-service/team-a" in message
    assert "spec.modelRefs[0].tokenRateLimits[1].window" in message
    assert "use 24h" in message
    assert str(tmp_path / "subs.yaml") in message


@pytest.mark.parametrize(("document", "field", "hint"), [
    ("kind: MaaSSubscription\nmetadata: {name: s, namespace: ns}\nspec: {modelRefs: []}", "spec.modelRefs", "non-empty"),
    ("kind: MaaSSubscription\nmetadata: {name: s, namespace: ns}\nspec:\n  modelRefs: [{name: m}]",
     "spec.modelRefs[0].namespace", "required"),
    ("kind: MaaSSubscription\nmetadata: {name: s, namespace: ns}\nspec:\n  modelRefs:\n"
     "    - {name: m, namespace: n, tokenRateLimits: [{limit: '10', window: 1m}]}",
     "spec.modelRefs[0].tokenRateLimits[0].limit", "whole number"),
    ("kind: MaaSSubscription\nmetadata: {name: s, namespace: ns}\nspec:\n  modelRefs:\n"
     "    - {name: m, namespace: n, tokenRateLimits: [{limit: 10, window: 90m0s}]}",
     "spec.modelRefs[0].tokenRateLimits[0].window", "must match"),
    ("kind: MaaSModelRef\nmetadata: {name: s, namespace: ns}\nspec: {modelRef: {kind: InferenceService, name: x}}",
     "spec.modelRef.kind", "LLMInferenceService or ExternalModel"),
    ("kind: TokenRateLimitPolicy\nmetadata: {name: s, namespace: ns}\nspec:\n  targetRef: {kind: HTTPRoute, name: r}\n"
     "  limits: {l: {rates: [{limit: 1, window: 1m}], when: [{predicate: 'auth.identity.userid =='}]}}",
     "spec.limits.l.when[0].predicate", "translated from"),
])


def test_errors_name_kind_namespace_name_and_field(tmp_path: Path, document: str, field: str, hint: str) -> None:
    write(tmp_path, **{"bad.yaml": document})
    with pytest.raises(MaasError) as caught:
        translate_paths([tmp_path])
    kind = document.split("\n")[0].removeprefix("kind: ")
    assert f"{kind} ns/s" in str(caught.value)
    assert f"field '{field}'" in str(caught.value)
    assert hint in str(caught.value)
    assert isinstance(caught.value, LimitsError)  # so `serve --maas` treats it like a bad limits file


def test_seed_pitfalls_are_linted(tmp_path: Path) -> None:
    models = (MODELS.replace("labels: {inference.networking.k8s.io/bbr-managed: \"true\"}", "labels: {}")
              .replace("spec: {modelRef: {kind: ExternalModel, name: qwen3-14b}}",
                       "spec: {modelRef: {kind: ExternalModel, name: qwen3-14b-ext}}"))
    missing = SUBSCRIPTIONS.replace("- {name: qwen3-8b, namespace: llm-d-demo}", "- {name: gone, namespace: llm-d-demo}")
    write(tmp_path, **{"models.yaml": models, "subs.yaml": missing})
    warnings = translate_paths([tmp_path]).warnings
    assert len(warnings) == 3, warnings
    [name, secret, model] = warnings
    assert "MaaSModelRef llm-d-demo/qwen3-14b" in name and "'spec.modelRef.name'" in name
    assert "Secret llm-d-demo/creds" in secret and 'inference.networking.k8s.io/bbr-managed: "true"' in secret
    assert "MaaSSubscription models-as-a-service/team-b" in model and "llm-d-demo/gone" in model


def test_a_route_named_in_status_wins(tmp_path: Path) -> None:
    models = MODELS.replace(
        "spec: {modelRef: {kind: LLMInferenceService, name: qwen3-8b}}",
        "spec: {modelRef: {kind: LLMInferenceService, name: qwen3-8b}}\n"
        "status: {httpRouteName: custom-route, httpRouteNamespace: gateways}",
    ).replace("spec: {provider: openai", "status: {httpRouteName: maas-qwen3-14b}\nspec: {provider: openai")
    write(tmp_path, **{"models.yaml": models, "subs.yaml": SUBSCRIPTIONS})
    namespaces = {limit.namespace for limit in translate_paths([tmp_path]).limits}
    assert namespaces == {"gateways/custom-route", "llm-d-demo/maas-qwen3-14b"}


SEED_POLICY = """
apiVersion: kuadrant.io/v1alpha1
kind: TokenRateLimitPolicy
metadata: {name: maas-trlp-qwen3-8b, namespace: llm-d-demo}
spec:
  targetRef: {group: gateway.networking.k8s.io, kind: HTTPRoute, name: qwen3-8b-kserve-route}
  limits:
    models-as-a-service-freemium-subscription-qwen3-8b-tokens:
      counters: [{expression: auth.identity.userid}]
      rates: [{limit: 300, window: 5m}]
      when:
      - predicate: auth.identity.selected_subscription_key == "models-as-a-service/freemium-subscription@llm-d-demo/qwen3-8b"
          && !request.path.endsWith("/v1/models")
"""


def test_a_token_rate_limit_policy_translates_its_cel_to_descriptor_entries(tmp_path: Path) -> None:
    write(tmp_path, **{"trlp.yaml": SEED_POLICY})
    [limit] = translate_paths([tmp_path]).limits
    assert (limit.namespace, limit.name, limit.max_value, limit.seconds) == (
        GPU_ROUTE, "models-as-a-service-freemium-subscription-qwen3-8b-tokens", 300, 300)
    assert limit.variables == (USER_VARIABLE,)
    assert limit.conditions == (
        "descriptors[0]['auth.identity.selected_subscription_key'] == "
        '"models-as-a-service/freemium-subscription@llm-d-demo/qwen3-8b" && '
        "!descriptors[0]['request.path'].endsWith(\"/v1/models\")",
    )
    engine = RateLimiter(MemoryStorage(), [limit])
    key = "models-as-a-service/freemium-subscription@llm-d-demo/qwen3-8b"
    chat = {"auth.identity.selected_subscription_key": key, "auth.identity.userid": "c", "request.path": "/v1/chat"}
    assert len(engine.counters_for(GPU_ROUTE, [chat]).counters) == 1
    assert engine.counters_for(GPU_ROUTE, [{**chat, "request.path": "/x/v1/models"}]).counters == ()


def test_attribute_rewrite_leaves_string_literals_and_method_names_alone() -> None:
    assert attributes_to_descriptors('request.path.endsWith("auth.identity.userid") && auth.identity.x == \'request.y\'') == (
        "descriptors[0]['request.path'].endsWith(\"auth.identity.userid\") && "
        "descriptors[0]['auth.identity.x'] == 'request.y'")
    assert attributes_to_descriptors("size(request.headers.foo) > 0") == "size(descriptors[0]['request.headers.foo']) > 0"


def test_the_examples_translate_without_warnings_and_match_the_tier_limits_file() -> None:
    translation = translate_paths([EXAMPLES / "maas"])
    assert translation.warnings == []
    tiers = {limit.name: limit for limit in parse_limits((EXAMPLES / "tiers.yaml").read_text())}
    for limit in translation.limits:
        if limit.name in tiers:
            known = tiers[limit.name]
            assert (limit.namespace, limit.max_value, limit.seconds, limit.variables) == (
                known.namespace, known.max_value, known.seconds, known.variables)
            assert set(known.conditions) < set(limit.conditions)  # ours also exempts /v1/models
    assert {"models-as-a-service-freemium-subscription-qwen3-8b-tokens",
            "models-as-a-service-external-premium-subscription-qwen3-14b-tokens"} <= {limit.name for limit in translation.limits}


def test_translate_command_prints_limits_yaml_and_fails_clearly(tmp_path: Path, crs: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "ratelimit.cli", "translate", str(crs / "models.yaml"),
                           str(crs / "subscriptions.yaml")], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert len(parse_limits(done.stdout)) == 4
    write(tmp_path / "bad", **{"subs.yaml": SUBSCRIPTIONS.replace("window: 24h", "window: 7d")})
    done = subprocess.run([sys.executable, "-m", "ratelimit.cli", "translate", str(tmp_path / "bad")],
                          capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 1
    assert "MaaSSubscription models-as-a-service/team-a" in done.stderr and "use 168h" in done.stderr
    assert done.stdout == ""


def test_watcher_hot_reloads_a_directory_of_crs(crs: Path) -> None:
    engine = RateLimiter(MemoryStorage())
    status = ConfigStatus(source=str(crs))
    watcher = LimitsFileWatcher(crs, engine, status, interval=0.01, loader=limits_from_files)
    watcher.load()
    assert len(engine.all_limits()) == 4

    def change_subscriptions(change: str) -> None:
        (crs / "subscriptions.yaml").write_text(change)
        wait_until(lambda: watcher.poll() or status.config_err_since, timeout=10, what="the change to be seen")

    change_subscriptions(SUBSCRIPTIONS.replace("limit: 1000", "limit: 2000"))
    assert {limit.max_value for limit in engine.all_limits() if limit.namespace == EXTERNAL_ROUTE} == {2000}
    change_subscriptions(SUBSCRIPTIONS.replace("window: 1h", "window: 2d"))
    assert status.last_error is not None and "MaaSSubscription models-as-a-service/team-a" in status.last_error
    assert {limit.max_value for limit in engine.all_limits() if limit.namespace == EXTERNAL_ROUTE} == {2000}  # kept
    write(crs, **{"nested/extra.yml": SUBSCRIPTIONS.replace("team-", "team-x-")})
    (crs / "subscriptions.yaml").write_text(SUBSCRIPTIONS)
    wait_until(lambda: watcher.poll(), timeout=10, what="the new file to be applied")
    assert len(engine.all_limits()) == 8


def test_serve_maas_serves_the_translated_limits(start_service: Any) -> None:
    service: ServiceProcess = start_service(None, "--maas", str(EXAMPLES / "maas"))
    limits = service.http.get(f"/limits/{GPU_ROUTE.replace('/', '%2F')}").json()
    assert {limit["name"] for limit in limits} == {
        f"{SUB_NS}-{tier}-subscription-qwen3-8b-tokens" for tier in ("freemium", "pro", "premium")}
    assert service.status()["config_version"] == 1


def test_read_files_skips_hidden_configmap_entries(tmp_path: Path) -> None:
    write(tmp_path, **{"a.yaml": "", "..2024_01_01/a.yaml": "", "notes.txt": ""})
    assert list(read_files([tmp_path])) == [str(tmp_path / "a.yaml")]
