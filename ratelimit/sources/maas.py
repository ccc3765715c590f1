"""MaaS custom resources -> Limitador limits, as maas-controller and Kuadrant would produce them.

    ratelimit translate examples/maas/          # prints the limits YAML
    ratelimit serve --maas examples/maas/       # serves them, hot-reloaded

Each MaaSSubscription model reference becomes what the maas-controller puts in the model's
TokenRateLimitPolicy and Kuadrant then gives Limitador, one limit per window:

    - namespace: <route-namespace>/<route-name>        # the model's HTTPRoute (see below)
      name: <subscription-namespace>-<subscription>-<model>-tokens
      max_value: <limit>                               # default 100 tokens / 1m
      seconds: <window>
      conditions:
        - descriptors[0]['auth.identity.selected_subscription_key'] == '<sub-ns>/<sub>@<model-ns>/<model>'
        - "!('request.path' in descriptors[0]) || !descriptors[0]['request.path'].endsWith('/v1/models')"
      variables: ["descriptors[0]['auth.identity.userid']"]

The route comes from the model's MaaSModelRef (the exporter's model catalog reads it): a route named
in its status wins, else `<name>-kserve-route` for an LLMInferenceService and the ExternalModel's own
name for an ExternalModel (seed 003, 11.7), unless that ExternalModel's status names another.

Descriptor convention (for callers other than the wasm-shim, which evaluates `when` itself and
sends a hashed key): descriptor entry keys are the attribute names (`auth.identity.userid`,
`auth.identity.selected_subscription_key`, `request.path`, ...), as examples/envoy/maas.yaml
sends them. The `/v1/models` condition is written so that it still applies when a caller leaves
`request.path` out: Limitador makes a condition naming a missing key false, which would silently
stop counting. TokenRateLimitPolicy documents are translated literally (attribute -> descriptor
entry), so their callers must send every attribute a predicate names.

Bad input raises MaasError naming the file, the resource (kind namespace/name) and the field. The
seed's pitfalls are warnings (`Translation.warnings`): they break a cluster, not the translation.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ratelimit.limits import MAX_LIMIT_VALUE, InvalidLimit, Limit, LimitsError, unique_limits
from ratelimit.sources.limits_file import yaml_files
from ratelimit.sources.maas_naming import entries_from_documents

logger = logging.getLogger(__name__)

# maas-controller's validation of MaaSSubscription windows; days are refused (use 24h).
MAAS_WINDOW = re.compile(r"^[1-9]\d{0,3}(s|m|h)$")
# Kuadrant's rate windows (it also has `ms`, which Limitador's whole-second windows cannot hold).
KUADRANT_WINDOW = re.compile(r"^[0-9]{1,5}(s|m|h)$")
UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600}
DEFAULT_RATE: Mapping[str, Any] = {"limit": 100, "window": "1m"}

USERID = "auth.identity.userid"
SUBSCRIPTION_KEY = "auth.identity.selected_subscription_key"
PATH = "request.path"
BBR_LABEL = "inference.networking.k8s.io/bbr-managed"

# Kinds read by translate; anything else in a directory (Deployments, Groups, ...) is skipped.
KINDS = frozenset({
    "MaaSSubscription", "MaaSAuthPolicy", "MaaSModelRef", "ExternalModel", "LLMInferenceService", "Secret",
    "TokenRateLimitPolicy",
})


@dataclass
class MaasError(LimitsError):
    """A CR that cannot be translated. A LimitsError, so a bad directory is handled like a bad file."""

    resource: str | None = None
    """`<kind> <namespace>/<name>`."""

    def __str__(self) -> str:
        parts = [self.source] + [p for p in (self.resource, self.field and f"field '{self.field}'") if p]
        return ": ".join(parts) + f": {self.message}"


@dataclass(frozen=True)
class Resource:
    """One Kubernetes object read from a file."""

    kind: str
    namespace: str
    name: str
    body: Mapping[str, Any]
    source: str

    @property
    def spec(self) -> Mapping[str, Any]:
        return _mapping(self, "spec", self.body.get("spec"))

    @property
    def status(self) -> Mapping[str, Any]:
        return _mapping(self, "status", self.body.get("status"))

    def __str__(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name}"

    def error(self, field_name: str | None, message: str) -> MaasError:
        return MaasError(self.source, message, field=field_name, resource=str(self))


@dataclass
class Translation:
    limits: list[Limit]
    warnings: list[str] = field(default_factory=list)


# -- reading ----------------------------------------------------------------------------------------


def read_files(paths: Iterable[str | Path]) -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    for path in paths:
        for file in yaml_files(path):
            try:
                files[file] = Path(file).read_bytes()
            except OSError as exc:
                raise MaasError(file, f"cannot read: {exc}") from None
    return files


def parse_resources(files: Mapping[str, bytes]) -> list[Resource]:
    """The objects of the kinds translate reads, from multi-document YAML files (and `kind: List`)."""
    resources: list[Resource] = []
    for source, data in files.items():
        try:
            documents = list(yaml.safe_load_all(data.decode("utf-8")))
        except UnicodeDecodeError as exc:
            raise MaasError(source, f"not UTF-8: {exc}") from None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            raise MaasError(source, f"not valid YAML: {getattr(exc, 'problem', None) or exc}",
                            line=mark.line + 1 if mark else None) from None
        resources.extend(_objects(documents, source))
    return resources


def _objects(documents: Iterable[Any], source: str) -> Iterator[Resource]:
    for document in documents:
        if not isinstance(document, Mapping):
            continue
        kind = document.get("kind")
        if kind == "List":
            yield from _objects(document.get("items") or [], source)
        elif kind in KINDS:
            metadata = document.get("metadata")
            if not isinstance(metadata, Mapping):
                metadata = {}
            name = metadata.get("name")
            if not isinstance(name, str) or not name:
                raise MaasError(source, f"a {kind} needs metadata.name", field="metadata.name", resource=kind)
            namespace = metadata.get("namespace") or "default"  # as kubectl applies it
            yield Resource(kind, str(namespace), name, document, source)


# -- translating ------------------------------------------------------------------------------------


def translate(resources: Iterable[Resource]) -> Translation:
    """The limits the CRs give Limitador; raises MaasError on the first resource that is invalid."""
    by_kind: dict[str, dict[tuple[str, str], Resource]] = {kind: {} for kind in KINDS}
    for resource in resources:
        by_kind[resource.kind].setdefault((resource.namespace, resource.name), resource)
    routes = _model_routes(by_kind["MaaSModelRef"], by_kind["ExternalModel"])
    limits: list[Limit] = []
    for subscription in by_kind["MaaSSubscription"].values():
        limits.extend(_subscription_limits(subscription, routes))
    for policy in by_kind["TokenRateLimitPolicy"].values():
        limits.extend(_policy_limits(policy))
    warnings = _lint(by_kind)  # after translating: the resources it reads are known to be well-formed
    # Limitador keeps one limit per identity: a TokenRateLimitPolicy exported from the cluster next
    # to the subscription it came from gives each limit twice.
    return Translation(unique_limits(limits), warnings)


def translate_paths(paths: Iterable[str | Path]) -> Translation:
    return translate(parse_resources(read_files(paths)))


def limits_from_files(files: Mapping[str, bytes]) -> list[Limit]:
    """The loader `serve --maas` hot-reloads with; lint warnings go to the log."""
    translation = translate(parse_resources(files))
    for warning in translation.warnings:
        logger.warning("%s", warning)
    return translation.limits


def descriptor(attribute: str) -> str:
    """The CEL for a request attribute under the descriptor convention: `descriptors[0]['<attribute>']`."""
    return f"descriptors[0]['{attribute}']"


def subscription_key(subscription: Resource, model_namespace: str, model: str) -> str:
    return f"{subscription.namespace}/{subscription.name}@{model_namespace}/{model}"


def _model_routes(
    model_refs: Mapping[tuple[str, str], Resource], external_models: Mapping[tuple[str, str], Resource]
) -> dict[tuple[str, str], str]:
    """(MaaSModelRef namespace, name) -> Limitador namespace `<route-ns>/<route-name>`."""
    routes = {}
    for key, ref in model_refs.items():
        target = _mapping(ref, "spec.modelRef", ref.spec.get("modelRef"))
        target_kind = target.get("kind")
        if target_kind not in ("LLMInferenceService", "ExternalModel"):
            raise ref.error("spec.modelRef.kind", f"must be LLMInferenceService or ExternalModel, got {target_kind!r}")
        if not isinstance(target.get("name"), str) or not target["name"]:
            raise ref.error("spec.modelRef.name", "is required")
        [entry] = entries_from_documents([ref.body])
        route = entry.limitador_namespace
        external = external_models.get((ref.namespace, target["name"]))
        if target_kind == "ExternalModel" and not ref.status.get("httpRouteName") and external is not None:
            route = f"{ref.namespace}/{external.status.get('httpRouteName') or external.name}"
        routes[key] = route
    return routes


def _subscription_limits(subscription: Resource, routes: Mapping[tuple[str, str], str]) -> list[Limit]:
    model_refs = subscription.spec.get("modelRefs")
    if not isinstance(model_refs, list) or not model_refs:
        raise subscription.error("spec.modelRefs", "must be a non-empty list of {name, namespace, tokenRateLimits}")
    limits: list[Limit] = []
    for i, ref in enumerate(model_refs):
        where = f"spec.modelRefs[{i}]"
        ref = _mapping(subscription, where, ref)
        model, model_namespace = _text(subscription, f"{where}.name", ref), _text(subscription, f"{where}.namespace", ref)
        rates = ref.get("tokenRateLimits") or [DEFAULT_RATE]
        if not isinstance(rates, list):
            raise subscription.error(f"{where}.tokenRateLimits", "must be a list of {limit, window}")
        windows = [_rate(subscription, f"{where}.tokenRateLimits[{j}]", rate, MAAS_WINDOW) for j, rate in enumerate(rates)]
        route = routes.get((model_namespace, model))
        if route is None:
            continue  # linted: the maas-controller creates no policy for a model it cannot find
        conditions = (
            f"{descriptor(SUBSCRIPTION_KEY)} == '{subscription_key(subscription, model_namespace, model)}'",
            f"!('{PATH}' in descriptors[0]) || !{descriptor(PATH)}.endsWith('/v1/models')",
        )
        name = f"{subscription.namespace}-{subscription.name}-{model}-tokens"
        try:
            limits.extend(
                Limit(route, max_value, seconds, conditions, (descriptor(USERID),), name=name)
                for max_value, seconds in windows
            )
        except InvalidLimit as exc:  # names that cannot be written into CEL (a quote in a name, say)
            raise subscription.error(where, f"cannot be translated to a limit: {exc}") from None
    return limits


def _policy_limits(policy: Resource) -> list[Limit]:
    """A Kuadrant TokenRateLimitPolicy: `when` predicates and `counters` expressions are CEL over
    request attributes, rewritten to descriptor entries."""
    target = _mapping(policy, "spec.targetRef", policy.spec.get("targetRef"))
    if target.get("kind") != "HTTPRoute":
        raise policy.error("spec.targetRef.kind", f"only HTTPRoute targets are translated, got {target.get('kind')!r}")
    namespace = f"{policy.namespace}/{_text(policy, 'spec.targetRef.name', target)}"
    sections = [("spec.limits", policy.spec.get("limits"))] + [
        (f"spec.{s}.limits", _mapping(policy, f"spec.{s}", policy.spec.get(s)).get("limits")) for s in ("defaults", "overrides")
    ]
    limits: list[Limit] = []
    for where, entries in sections:
        for key, spec in _mapping(policy, where, entries).items():
            here = f"{where}.{key}"
            spec = _mapping(policy, here, spec)
            rates = spec.get("rates")
            if not isinstance(rates, list) or not rates:
                raise policy.error(f"{here}.rates", "must be a non-empty list of {limit, window}")
            windows = [_rate(policy, f"{here}.rates[{j}]", rate, KUADRANT_WINDOW) for j, rate in enumerate(rates)]
            when = [_cel(policy, f"{here}.when[{j}].predicate", item, "predicate")
                    for j, item in enumerate(spec.get("when") or [])]
            counters = [_cel(policy, f"{here}.counters[{j}].expression", item, "expression")
                        for j, item in enumerate(spec.get("counters") or [])]
            conditions = tuple(translated for _, translated in when)
            variables = tuple(translated for _, translated in counters)
            try:
                limits.extend(Limit(namespace, m, s, conditions, variables, name=str(key)) for m, s in windows)
            except InvalidLimit as exc:  # the Limit compiles the CEL: say which policy field it came from
                items, where, key_name = (when, "when", "predicate") if exc.field.startswith("conditions") else (
                    counters, "counters", "expression")
                j = int(exc.field.partition("[")[2].rstrip("]"))
                raise policy.error(f"{here}.{where}[{j}].{key_name}",
                                   f"{exc.message} (translated from {items[j][0]!r})") from None
    return limits


# A dotted request attribute (auth.identity.userid, request.path) outside string literals, not
# counting a trailing method name (`.endsWith(`), which stays a call on the looked-up value.
_STRING_LITERAL = re.compile(r""""(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'""")
_ATTRIBUTE = re.compile(
    r"(?<![\w.])(?:auth|request|source|destination|connection|metadata|filter_state|response)"
    r"(?:\.[A-Za-z_]\w*(?!\w)(?!\s*\())+"
)


def attributes_to_descriptors(source: str) -> str:
    """`auth.identity.userid == "a"` -> `descriptors[0]['auth.identity.userid'] == "a"`."""
    pieces, last = [], 0
    for literal in _STRING_LITERAL.finditer(source):
        pieces.append(_ATTRIBUTE.sub(lambda m: descriptor(m.group()), source[last:literal.start()]))
        pieces.append(literal.group())
        last = literal.end()
    pieces.append(_ATTRIBUTE.sub(lambda m: descriptor(m.group()), source[last:]))
    return "".join(pieces)


def _cel(resource: Resource, where: str, item: Any, key: str) -> tuple[str, str]:
    """A CEL string over request attributes, and its translation over descriptors (compiled by the Limit)."""
    text = item.get(key) if isinstance(item, Mapping) else None
    if not isinstance(text, str) or not text.strip():
        raise resource.error(where, f"must be a CEL string (`{key}: ...`)")
    return text, attributes_to_descriptors(text)


def _rate(resource: Resource, where: str, rate: Any, pattern: re.Pattern[str]) -> tuple[int, int]:
    """(max_value, seconds) of a `{limit, window}`."""
    rate = _mapping(resource, where, rate)
    limit = rate.get("limit")
    if isinstance(limit, bool) or not isinstance(limit, int) or not 0 < limit <= MAX_LIMIT_VALUE:
        raise resource.error(f"{where}.limit", f"must be a whole number between 1 and {MAX_LIMIT_VALUE}, got {limit!r}")
    window = rate.get("window")
    if not isinstance(window, str) or not pattern.match(window):
        hint = ""
        if isinstance(window, str) and window.endswith("d") and window[:-1].isdigit():
            hint = f"; days are not supported, use {int(window[:-1]) * 24}h"
        raise resource.error(f"{where}.window", f"must match {pattern.pattern}, got {window!r}{hint}")
    return limit, int(window[:-1]) * UNIT_SECONDS[window[-1]]


def _mapping(resource: Resource, where: str, value: Any) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise resource.error(where, f"must be a mapping, got {type(value).__name__}")
    return value


def _text(resource: Resource, where: str, mapping: Mapping[str, Any]) -> str:
    value = mapping.get(where.rsplit(".", 1)[-1])
    if not isinstance(value, str) or not value:
        raise resource.error(where, "is required (a non-empty string)")
    return value


# -- lint -------------------------------------------------------------------------------------------


def _lint(by_kind: Mapping[str, Mapping[tuple[str, str], Resource]]) -> list[str]:
    """The seed's pitfalls (003 sections 10-11): each silently breaks a cluster."""
    warnings = []
    for ref in by_kind["MaaSModelRef"].values():
        target = ref.spec["modelRef"]
        if target.get("kind") == "ExternalModel" and target.get("name") != ref.name:
            warnings.append(
                f"{ref.source}: {ref}: field 'spec.modelRef.name': ExternalModel {target.get('name')!r} differs from "
                f"the MaaSModelRef's name; an ExternalModel's MaaSModelRef must have exactly its name")
    for model in by_kind["ExternalModel"].values():
        credential = _mapping(model, "spec.credentialRef", model.spec.get("credentialRef"))
        secret_name = credential.get("name")
        secret = by_kind["Secret"].get((model.namespace, secret_name)) if isinstance(secret_name, str) else None
        labels = _mapping(secret, "metadata.labels", secret.body["metadata"].get("labels")) if secret else {}
        if secret is not None and labels.get(BBR_LABEL) != "true":
            warnings.append(
                f"{secret.source}: {secret}: field 'metadata.labels': credential of {model} lacks "
                f'{BBR_LABEL}: "true"; without it every call fails with "credentials not found"')
    for kind in ("MaaSSubscription", "MaaSAuthPolicy"):
        for resource in by_kind[kind].values():
            model_refs = resource.spec.get("modelRefs")
            for i, ref in enumerate(model_refs if isinstance(model_refs, list) else []):
                key = (ref.get("namespace"), ref.get("name")) if isinstance(ref, Mapping) else None
                if key is not None and key not in by_kind["MaaSModelRef"]:
                    outcome = "no limit is generated for it" if kind == "MaaSSubscription" else "it grants nothing"
                    warnings.append(
                        f"{resource.source}: {resource}: field 'spec.modelRefs[{i}]': no MaaSModelRef "
                        f"{key[0]}/{key[1]}; the maas-controller marks it Failed and {outcome}")
    return warnings


# -- subscription selection -------------------------------------------------------------------------


@dataclass(frozen=True)
class Subscription:
    """Who a MaaSSubscription is for, and which models it covers."""

    namespace: str
    name: str
    priority: int
    groups: frozenset[str]
    users: frozenset[str]
    models: frozenset[tuple[str, str]]

    def key(self, model_namespace: str, model: str) -> str:
        """`auth.identity.selected_subscription_key`: `<sub-ns>/<sub>@<model-ns>/<model>`."""
        return f"{self.namespace}/{self.name}@{model_namespace}/{model}"


def subscriptions(resources: Iterable[Resource]) -> list[Subscription]:
    found = []
    for resource in resources:
        if resource.kind != "MaaSSubscription":
            continue
        owner = _mapping(resource, "spec.owner", resource.spec.get("owner"))
        refs = [r for r in resource.spec.get("modelRefs") or [] if isinstance(r, Mapping)]
        found.append(Subscription(
            resource.namespace, resource.name, int(resource.spec.get("priority") or 0),
            frozenset(g["name"] for g in owner.get("groups") or [] if isinstance(g, Mapping) and "name" in g),
            frozenset(str(u) for u in owner.get("users") or []),
            frozenset((str(r.get("namespace")), str(r.get("name"))) for r in refs),
        ))
    return found


def select_subscription(
    candidates: Iterable[Subscription], user: str, groups: Iterable[str], model_namespace: str, model: str,
    requested: str | None = None,
) -> Subscription:
    """The subscription a request runs under, as the seed describes it (9.4): the one named by the
    `x-maas-subscription` header (`requested`), else the first of the user's subscriptions for the
    model by priority, highest first (ties by name, so the choice is stable)."""
    groups = set(groups)
    eligible = sorted(
        (s for s in candidates
         if (model_namespace, model) in s.models and (user in s.users or s.groups & groups)),
        key=lambda s: (-s.priority, s.namespace, s.name),
    )
    if requested is not None:
        eligible = [s for s in eligible if requested in (s.name, f"{s.namespace}/{s.name}")]
    if not eligible:
        wanted = f"subscription {requested!r}" if requested else "any subscription"
        raise LookupError(f"{user} (groups {sorted(groups)}) has no access to {model_namespace}/{model} through {wanted}")
    return eligible[0]
