"""The token meter: Envoy external processing (`envoy.service.ext_proc.v3.ExternalProcessor/Process`)
over the engine's reserve / commit, served on the gRPC port next to the RLS services.

One gRPC stream per HTTP request (examples/envoy/ext-proc-tokens.yaml sets the filter up):

1. request headers: kept for the descriptors; a request without a body is not metered.
2. request body (BUFFERED): an OpenAI chat/completions body gives the model, max tokens and
   `stream`; the namespace and descriptors come from the configuration (`MeterConfig`); the meter
   **reserves** the estimate (`Estimator`) on every applicable counter, or answers an OpenAI-shaped
   429 at once. A streamed request gets `stream_options.include_usage: true`, so its usage arrives.
3. response headers: an error status releases the reservation (nothing is charged); a body that is
   neither JSON nor an event stream is not OpenAI's and is charged the estimate (and counted in
   `token_meter_estimated_charges`).
4. response body (STREAMED, never buffered by Envoy): `usage` is found as the chunks pass; the usage
   chunk the client did not ask for is taken out again.
5. the stream's end, or its close when the client goes away, whichever comes first: **commit** the
   cost of the usage (`CostExpression`, default total_tokens); without usage, a stream the client
   left is charged the prompt estimate plus the content streamed so far (at least 1), a response
   that ended without usage its reservation's estimate. Each exchange commits exactly once.

The route's namespace can be set per Envoy route with the gRPC initial metadata
`x-ratelimit-namespace` (ExtProcPerRoute overrides.grpc_initial_metadata).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from weakref import WeakKeyDictionary

import grpc
import yaml
from envoy.config.core.v3.base_pb2 import HeaderValue, HeaderValueOption
from envoy.extensions.filters.http.ext_proc.v3.processing_mode_pb2 import ProcessingMode
from envoy.service.ext_proc.v3 import external_processor_pb2 as ext_proc_pb2
from envoy.service.ext_proc.v3.external_processor_pb2 import (
    BodyMutation,
    BodyResponse,
    CommonResponse,
    HeaderMutation,
    HeadersResponse,
    ImmediateResponse,
    ProcessingRequest,
    ProcessingResponse,
)
from envoy.type.v3.http_status_pb2 import HttpStatus
from google.protobuf.message import DecodeError
from prometheus_client import CollectorRegistry
from prometheus_client import Counter as PrometheusCounter

from ratelimit.counters import StorageError
from ratelimit.engine import MAX_RESERVATION_TTL, InvalidRequest
from ratelimit.server.openai_errors import limited_answer
from ratelimit.server.openai_usage import (
    ChatRequest,
    CostExpression,
    Estimator,
    NotOpenAI,
    UsageScanner,
    parse_request,
    with_usage_requested,
)
from ratelimit.server.state import Service
from ratelimit.server.tasks import run_in_background

logger = logging.getLogger(__name__)

EXT_PROC_SERVICE = ext_proc_pb2.DESCRIPTOR.services_by_name["ExternalProcessor"].full_name
NAMESPACE_METADATA = "x-ratelimit-namespace"
"""gRPC initial metadata naming the namespace for one Envoy route (overrides the configured one)."""

# The descriptor the meter sends when no configuration says otherwise: the user from x-user-id or
# from the MaaS headers Authorino's stand-in sets (examples/envoy/maas.yaml), the model from the body.
DEFAULT_DESCRIPTOR: dict[str, dict[str, str]] = {
    "user_id": {"header": "x-user-id"},
    "model": {"body": "model"},
    "auth.identity.userid": {"header": "x-maas-userid"},
    "auth.identity.selected_subscription_key": {"header": "x-maas-subscription-key"},
    "request.path": {"header": ":path"},
}
_SOURCES = ("header", "body", "value")

# No more of the response is worth sending to the meter.
_SKIP_RESPONSE = ProcessingMode(
    response_header_mode=ProcessingMode.SKIP, response_body_mode=ProcessingMode.NONE,
    response_trailer_mode=ProcessingMode.SKIP,
)
_SKIP_BODY = ProcessingMode(response_body_mode=ProcessingMode.NONE, response_trailer_mode=ProcessingMode.SKIP)


class MeterConfigError(ValueError):
    """A bad token-meter configuration: names the file and the field."""


@dataclass(frozen=True)
class EntrySource:
    """Where one descriptor entry's value comes from: a request header, a top-level string field of
    the request body, or a fixed value. An entry whose source is absent is left out."""

    kind: str
    name: str

    def value(self, headers: Mapping[str, str], body: Mapping[str, Any]) -> str | None:
        if self.kind == "header":
            return headers.get(self.name)
        if self.kind == "body":
            found = body.get(self.name)
            return found if isinstance(found, str) else None
        return self.name


@dataclass(frozen=True)
class MeterConfig:
    namespace: str = "tokens"
    """Used when the route sends no `x-ratelimit-namespace` gRPC metadata."""
    descriptors: tuple[dict[str, EntrySource], ...] = field(
        default_factory=lambda: (_entries(DEFAULT_DESCRIPTOR, "descriptors[0]", "<default>"),)
    )
    estimator: Estimator = field(default_factory=Estimator)
    cost: CostExpression = field(default_factory=CostExpression)
    reservation_ttl: float = 600.0
    """Seconds a reservation holds before it releases itself (a commit after that still charges)."""
    strip_usage_chunk: bool = True
    """Take the usage chunk the meter asked for out of streams whose client did not ask for it."""

    def descriptors_of(self, headers: Mapping[str, str], body: Mapping[str, Any]) -> list[dict[str, str]]:
        descriptors = []
        for entries in self.descriptors:
            values = {key: source.value(headers, body) for key, source in entries.items()}
            descriptors.append({key: value for key, value in values.items() if value is not None})
        return descriptors


_CONFIG_KEYS = {"namespace", "descriptors", "estimate", "cost", "reservation_ttl_seconds", "strip_usage_chunk"}
_ESTIMATE_KEYS = {"bytes_per_token", "tokens_per_message", "default_completion_tokens", "max_reservation"}


def load_meter_config(path: str | Path | None) -> MeterConfig:
    """The configuration in a YAML file (examples/envoy/README.md); the defaults when None."""
    if path is None:
        return MeterConfig()
    where = str(path)
    try:
        document = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise MeterConfigError(f"{where}: cannot read the token-meter configuration: {error}") from None
    if document is None:
        document = {}
    if not isinstance(document, dict):
        raise MeterConfigError(f"{where}: must be a YAML map, got {type(document).__name__}")
    unknown = sorted(set(document) - _CONFIG_KEYS)
    if unknown:
        raise MeterConfigError(f"{where}: unknown settings {unknown}; known: {sorted(_CONFIG_KEYS)}")
    defaults = MeterConfig()
    namespace = document.get("namespace", defaults.namespace)
    if not isinstance(namespace, str) or not namespace:
        raise MeterConfigError(f"{where}: namespace must be a non-empty string")
    descriptors = defaults.descriptors
    if "descriptors" in document:
        raw = document["descriptors"]
        if not isinstance(raw, list) or not raw:
            raise MeterConfigError(f"{where}: descriptors must be a non-empty list of maps")
        descriptors = tuple(_entries(entries, f"descriptors[{i}]", where) for i, entries in enumerate(raw))
    estimate = document.get("estimate") or {}
    if not isinstance(estimate, dict) or set(estimate) - _ESTIMATE_KEYS:
        raise MeterConfigError(f"{where}: estimate must be a map with keys among {sorted(_ESTIMATE_KEYS)}")
    try:
        estimator = Estimator(**estimate)
        cost = CostExpression(str(document.get("cost", "total_tokens")))
    except (TypeError, ValueError) as error:
        raise MeterConfigError(f"{where}: {error}") from None
    ttl = document.get("reservation_ttl_seconds", defaults.reservation_ttl)
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not 0 < ttl <= MAX_RESERVATION_TTL:
        raise MeterConfigError(f"{where}: reservation_ttl_seconds must be more than 0 and at most {MAX_RESERVATION_TTL:g}")
    strip = document.get("strip_usage_chunk", True)
    if not isinstance(strip, bool):
        raise MeterConfigError(f"{where}: strip_usage_chunk must be true or false")
    return MeterConfig(namespace, descriptors, estimator, cost, float(ttl), strip)


def _entries(raw: Any, where: str, source: str) -> dict[str, EntrySource]:
    if not isinstance(raw, dict) or not raw:
        raise MeterConfigError(f"{source}: {where} must be a map of entry key -> {{header|body|value: NAME}}")
    entries = {}
    for key, spec in raw.items():
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in _SOURCES:
            raise MeterConfigError(f"{source}: {where}[{key!r}] must be one of {{header: NAME}}, {{body: FIELD}}, "
                                   f"{{value: TEXT}}, got {spec!r}")
        [(kind, name)] = spec.items()
        if not isinstance(name, str) or not name:
            raise MeterConfigError(f"{source}: {where}[{key!r}].{kind} must be a non-empty string")
        entries[str(key)] = EntrySource(kind, name.lower() if kind == "header" else name)
    return entries


# -- metrics ----------------------------------------------------------------------------------------

_ESTIMATE_COUNTERS: WeakKeyDictionary[CollectorRegistry, PrometheusCounter] = WeakKeyDictionary()


def _estimated_charges(registry: CollectorRegistry) -> PrometheusCounter:
    """One counter per registry (a test process may build several servers on one service)."""
    counter = _ESTIMATE_COUNTERS.get(registry)
    if counter is None:
        counter = PrometheusCounter(
            "token_meter_estimated_charges",
            "Responses the token meter charged an estimate because they carried no usage "
            "(reason: no_usage, not_openai, client_left, cost_failed)",
            ["limitador_namespace", "reason"], registry=registry,
        )
        _ESTIMATE_COUNTERS[registry] = counter
    return counter


# -- one HTTP request -------------------------------------------------------------------------------


@dataclass
class _Reservation:
    namespace: str
    descriptors: list[dict[str, str]]
    reservation_id: str
    amount: int
    request: ChatRequest


class _Exchange:
    """The meter's state for one HTTP request (one gRPC stream)."""

    def __init__(self, meter: TokenMeter, namespace: str) -> None:
        self.meter = meter
        self.namespace = namespace
        self.headers: dict[str, str] = {}
        self.reservation: _Reservation | None = None
        self.scanner: UsageScanner | None = None
        self.upstream_failed = False
        self.ended = False
        self.unmetered_kind: str | None = None
        self.settled = False

    async def answer(self, request: ProcessingRequest) -> ProcessingResponse:
        kind = request.WhichOneof("request")
        if kind == "request_headers":
            self.headers = _header_map(request.request_headers.headers)
            if request.request_headers.end_of_stream:  # no body: nothing to meter
                return ProcessingResponse(request_headers=HeadersResponse(), mode_override=_SKIP_RESPONSE)
            return ProcessingResponse(request_headers=HeadersResponse())
        if kind == "request_body":
            return await self._request_body(request.request_body.body)
        if kind == "response_headers":
            return await self._response_headers(request.response_headers)
        if kind == "response_body":
            return await self._response_body(request.response_body.body, request.response_body.end_of_stream)
        if kind == "request_trailers":
            return ProcessingResponse(request_trailers=ext_proc_pb2.TrailersResponse())
        if kind == "response_trailers":
            await self.settle()
            return ProcessingResponse(response_trailers=ext_proc_pb2.TrailersResponse())
        raise InvalidRequest("request", f"unexpected ProcessingRequest {kind!r}")

    async def _request_body(self, body: bytes) -> ProcessingResponse:
        config = self.meter.config
        try:
            chat = parse_request(body, config.estimator)
        except NotOpenAI as error:
            logger.debug("token meter: passing through a request that is not OpenAI's: %s", error)
            return ProcessingResponse(request_body=BodyResponse(), mode_override=_SKIP_RESPONSE)
        descriptors = config.descriptors_of(self.headers, chat.document)
        engine = self.meter.service.engine
        if not len(engine.counters_for(self.namespace, descriptors)):  # no limit applies
            return ProcessingResponse(request_body=BodyResponse(), mode_override=_SKIP_RESPONSE)
        amount = config.estimator.reservation(chat.prompt_tokens, chat.max_tokens)
        decision = await engine.reserve(self.namespace, descriptors, amount, config.reservation_ttl)
        metrics = self.meter.service.metrics
        if decision.limited:
            metrics.record_limited(self.namespace, descriptors, decision.limited_by)
            answer = limited_answer(decision, amount, kind="tokens")
            return ProcessingResponse(immediate_response=ImmediateResponse(
                status=HttpStatus(code=429), headers=_set_headers(answer.headers), body=answer.body,
                details="token_meter_over_limit",
            ))
        metrics.record_authorized(self.namespace, descriptors, 0)
        assert decision.reservation_id is not None
        self.reservation = _Reservation(self.namespace, descriptors, decision.reservation_id, amount, chat)
        if not chat.stream or chat.client_wants_usage:
            return ProcessingResponse(request_body=BodyResponse())
        new_body = with_usage_requested(chat)
        mutation = CommonResponse(
            header_mutation=_set_headers({"content-length": str(len(new_body))}),
            body_mutation=BodyMutation(body=new_body),
        )
        return ProcessingResponse(request_body=BodyResponse(response=mutation))

    async def _response_headers(self, headers: ext_proc_pb2.HttpHeaders) -> ProcessingResponse:
        response = ProcessingResponse(response_headers=HeadersResponse())
        reservation = self.reservation
        if reservation is None:
            response.mode_override.CopyFrom(_SKIP_BODY)
            return response
        values = _header_map(headers.headers)
        status = values.get(":status", "200")
        content_type = values.get("content-type", "").split(";")[0].strip().lower()
        if not status.isdigit() or int(status) >= 400:
            self.upstream_failed = True  # no tokens were served: release the hold
        elif content_type == "text/event-stream":
            strip = self.meter.config.strip_usage_chunk and reservation.request.stream \
                and not reservation.request.client_wants_usage
            self.scanner = UsageScanner(sse=True, strip_usage=strip)
        elif content_type == "application/json" or content_type.endswith("+json"):
            self.scanner = UsageScanner(sse=False)
        else:
            self.unmetered_kind = "not_openai"
        if headers.end_of_stream or self.scanner is None:
            self.ended = self.ended or headers.end_of_stream
            await self.settle()
            response.mode_override.CopyFrom(_SKIP_BODY)
        return response

    async def _response_body(self, body: bytes, end_of_stream: bool) -> ProcessingResponse:
        response = ProcessingResponse(response_body=BodyResponse())
        if self.scanner is not None and not self.settled:
            replacement = self.scanner.feed(body, end_of_stream)
            if replacement is not None and replacement != body:
                response.response_body.response.body_mutation.body = replacement
        if end_of_stream:
            self.ended = True
            await self.settle()
        return response

    def charge(self) -> tuple[int, str | None]:
        """What the request is charged, and why it is an estimate (None: the real usage)."""
        reservation = self.reservation
        assert reservation is not None
        if self.upstream_failed:
            return 0, None
        scanner = self.scanner
        if scanner is not None and scanner.usage is not None:
            try:
                return self.meter.config.cost.of(scanner.usage), None
            except ValueError as error:  # e.g. a division by a count that is 0 in this response
                logger.warning("token meter: %s; charged the estimate of %d", error, reservation.amount)
                return reservation.amount, "cost_failed"
        if self.unmetered_kind is not None:
            return reservation.amount, self.unmetered_kind
        if self.ended:  # a complete response without usage: not OpenAI-shaped after all
            return reservation.amount, "no_usage"
        # The client left first. The upstream is reset too, so what it produced is what was streamed.
        estimator = self.meter.config.estimator
        streamed = scanner.content_bytes if scanner is not None and scanner.sse else 0
        if scanner is not None and not scanner.sse:
            return reservation.amount, "client_left"  # the whole answer was likely generated
        return estimator.streamed(reservation.request.prompt_tokens, streamed), "client_left"

    async def settle(self) -> None:
        """Commit once: at the response's end, or when the stream closes before it."""
        if self.settled or self.reservation is None:
            return
        self.settled = True
        reservation = self.reservation
        actual, estimated = self.charge()
        if estimated is not None:
            _estimated_charges(self.meter.service.metrics.registry).labels(reservation.namespace, estimated).inc()
            if estimated != "client_left":
                logger.warning("token meter: %s response in %s carried no usage; charged the estimate of %d",
                               estimated, reservation.namespace, actual)
        try:
            await self.meter.service.engine.commit(
                reservation.namespace, reservation.descriptors, reservation.reservation_id, actual
            )
        except (StorageError, InvalidRequest) as error:
            # The reservation releases itself at its ttl; the tokens of this request are lost.
            logger.error("token meter: could not commit %d tokens in %s: %s", actual, reservation.namespace, error)
            return
        if actual:
            self.meter.service.metrics.record_reported(reservation.namespace, reservation.descriptors, actual)


def _header_map(headers: Any) -> dict[str, str]:
    # Envoy sends values in raw_value (bytes); older versions in value.
    return {
        header.key.lower(): header.raw_value.decode("utf-8", "replace") if header.raw_value else header.value
        for header in headers.headers
    }


def _set_headers(headers: Mapping[str, str]) -> HeaderMutation:
    return HeaderMutation(set_headers=[
        HeaderValueOption(header=HeaderValue(key=key, raw_value=value.encode("utf-8")),
                          append_action=HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD)
        for key, value in headers.items()
    ])


# -- the gRPC service -------------------------------------------------------------------------------


class TokenMeter:
    def __init__(self, service: Service, config: MeterConfig) -> None:
        self.service = service
        self.config = config
        _estimated_charges(service.metrics.registry)  # listed from the start, at 0

    async def process(
        self, requests: AsyncIterator[ProcessingRequest | DecodeError], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[ProcessingResponse]:
        metadata = dict(context.invocation_metadata() or ())
        namespace = metadata.get(NAMESPACE_METADATA)
        exchange = _Exchange(self, namespace if isinstance(namespace, str) and namespace else self.config.namespace)
        try:
            async for request in requests:
                if isinstance(request, DecodeError):
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed ProcessingRequest: {request}")
                try:
                    response = await exchange.answer(request)
                except InvalidRequest as error:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
                except StorageError as error:
                    logger.debug("counter storage unavailable: %s", error)
                    await context.abort(grpc.StatusCode.UNAVAILABLE, f"counter storage unavailable: {error}")
                yield response
        finally:
            # The stream closed: at the response's end, or because the client went away (Envoy resets
            # the stream; this generator is then cancelled). Settle in a task of its own, which a
            # cancellation of this one cannot interrupt.
            if not exchange.settled and exchange.reservation is not None:
                run_in_background(exchange.settle())


def ext_proc_handler(service: Service, config: MeterConfig) -> grpc.GenericRpcHandler:
    meter = TokenMeter(service, config)

    def decode(data: bytes) -> ProcessingRequest | DecodeError:
        try:
            return ProcessingRequest.FromString(data)
        except DecodeError as error:
            return error

    handler = grpc.stream_stream_rpc_method_handler(
        meter.process, request_deserializer=decode, response_serializer=lambda message: message.SerializeToString()
    )
    return grpc.method_handlers_generic_handler(EXT_PROC_SERVICE, {"Process": handler})

