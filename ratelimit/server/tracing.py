"""OpenTelemetry spans for decisions, exported over OTLP/gRPC (`--tracing-endpoint`).

Limitador exports with `opentelemetry-otlp`'s tonic (gRPC) exporter to `--tracing-endpoint`
(`scheme://host:port`, e.g. `http://jaeger:4317`; Kuadrant's docs write `rpc://...:4317`), names
the service `limitador`, and parents each decision's span on the W3C `traceparent` the caller sent.
The same here, one SERVER span per decision:

- gRPC: `should_rate_limit`, `check_rate_limit`, `report`, `reserve`, `commit`, with Limitador's
  attributes `ratelimit.namespace`, `ratelimit.hits_addend` and `ratelimit.limited`;
- HTTP: `check`, `report`, `check_and_report`, `reserve`, `commit`, with `ratelimit.namespace`,
  `ratelimit.limited` and `http.response.status_code`.

Off the hot path when disabled: nothing here is imported, and the servers run without the
interceptor and middleware, unless an endpoint is given. Spans leave in batches from a background
thread (the SDK's BatchSpanProcessor), never on the event loop.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import grpc

SERVICE_NAME = "limitador"
"""The `service.name` Limitador reports, so trace queries written for it find these spans.
OTEL_SERVICE_NAME overrides it, as for any OpenTelemetry SDK."""

DEFAULT_OTLP_PORT = 4317

# How long spans wait before they are sent, in milliseconds (the SDK's default is 5000).
EXPORT_DELAY_MS = 1000

HTTP_DECISIONS = {
    "/check": "check", "/report": "report", "/check_and_report": "check_and_report",
    "/reserve": "reserve", "/commit": "commit",
}
"""HTTP paths that decide, and their span names (Limitador's handler names)."""

# The part of an HTTP body read for attributes: the namespace comes first in every client we know.
_BODY_PEEK_BYTES = 64 * 1024

_OVER_LIMIT = 2  # envoy.service.ratelimit.v3.RateLimitResponse.Code.OVER_LIMIT
_CAMEL = re.compile(r"(?<!^)(?=[A-Z])")

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
AsgiApp = Callable[[Scope, Receive, Send], Awaitable[None]]


@dataclass(frozen=True)
class Endpoint:
    target: str
    """`host:port`, what the gRPC exporter dials."""
    secure: bool


def parse_endpoint(text: str) -> Endpoint:
    """`http://host:port`, `https://host:port`, `rpc://host:port` (plain gRPC, as Kuadrant's docs
    write it) or `host:port`; the port defaults to OTLP's 4317. Raises ValueError."""
    raw = text.strip()
    if not raw:
        raise ValueError("empty tracing endpoint")
    parts = urlsplit(raw if "://" in raw else f"rpc://{raw}")
    if parts.scheme not in ("http", "https", "rpc", "grpc"):
        raise ValueError(f"tracing endpoint {text!r}: scheme must be http, https, rpc or grpc (OTLP over gRPC)")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"tracing endpoint {text!r}: OTLP over gRPC takes no path (give scheme://host:port)")
    try:
        port = parts.port or DEFAULT_OTLP_PORT
    except ValueError:
        raise ValueError(f"tracing endpoint {text!r}: bad port") from None
    if not parts.hostname:
        raise ValueError(f"tracing endpoint {text!r}: no host")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return Endpoint(f"{host}:{port}", secure=parts.scheme == "https")


class DecisionTracing:
    """The tracer provider, its OTLP exporter, and the hooks that put spans around decisions."""

    def __init__(self, endpoint: str) -> None:
        # Imported here: only a service with --tracing-endpoint pays for the SDK.
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import OTELResourceDetector, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.trace import SpanKind
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        parsed = parse_endpoint(endpoint)
        self.endpoint = endpoint
        resource = Resource({"service.name": SERVICE_NAME}).merge(OTELResourceDetector().detect())
        self.provider = TracerProvider(resource=resource)
        exporter = OTLPSpanExporter(endpoint=parsed.target, insecure=not parsed.secure)
        self.provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=EXPORT_DELAY_MS))
        self.tracer = self.provider.get_tracer("ratelimit")
        self._propagator = TraceContextTextMapPropagator()
        self._server_kind = SpanKind.SERVER

    def _parent(self, carrier: dict[str, str]) -> Any:
        return self._propagator.extract(carrier)

    # -- HTTP ------------------------------------------------------------------------------------

    def http_middleware(self, app: AsgiApp) -> AsgiApp:
        """ASGI middleware: a span around each decision request, parented on its `traceparent`."""

        async def traced(scope: Scope, receive: Receive, send: Send) -> None:
            name = HTTP_DECISIONS.get(scope.get("path", "")) if scope["type"] == "http" else None
            if name is None:
                await app(scope, receive, send)
                return
            headers = {key.decode("latin-1"): value.decode("latin-1") for key, value in scope["headers"]}
            body = bytearray()
            status: list[int] = []

            async def peeking_receive() -> MutableMapping[str, Any]:
                message = await receive()
                if message["type"] == "http.request" and len(body) < _BODY_PEEK_BYTES:
                    body.extend(message.get("body", b"")[: _BODY_PEEK_BYTES - len(body)])
                return message

            async def status_send(message: MutableMapping[str, Any]) -> None:
                if message["type"] == "http.response.start":
                    status.append(message["status"])
                await send(message)

            with self.tracer.start_as_current_span(name, context=self._parent(headers), kind=self._server_kind) as span:
                try:
                    await app(scope, peeking_receive, status_send)
                finally:
                    namespace = _json_namespace(bytes(body))
                    if namespace is not None:
                        span.set_attribute("ratelimit.namespace", namespace)
                    if status:
                        span.set_attribute("http.response.status_code", status[0])
                        span.set_attribute("ratelimit.limited", status[0] == 429)

        return traced

    # -- gRPC ------------------------------------------------------------------------------------

    def grpc_interceptor(self) -> grpc.aio.ServerInterceptor:
        return _TracingInterceptor(self)

    def shutdown(self) -> None:
        """Send what is still queued, then stop the exporter (bounded by the SDK's export timeout)."""
        self.provider.shutdown()


class _TracingInterceptor(grpc.aio.ServerInterceptor):
    """A span around each rate-limit RPC, parented on the `traceparent` metadata."""

    def __init__(self, tracing: DecisionTracing) -> None:
        self._tracing = tracing

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or handler.unary_unary is None or method.startswith("/grpc."):
            return handler  # health checks and reflection are not decisions
        name = _CAMEL.sub("_", method.rsplit("/", 1)[-1]).lower()
        metadata = {
            key: value for key, value in (handler_call_details.invocation_metadata or ())
            if isinstance(value, str)
        }
        inner = handler.unary_unary
        tracing = self._tracing

        async def traced(request: Any, context: grpc.aio.ServicerContext) -> Any:
            with tracing.tracer.start_as_current_span(
                name, context=tracing._parent(metadata), kind=tracing._server_kind
            ) as span:
                domain = getattr(request, "domain", None)
                if isinstance(domain, str):
                    span.set_attribute("ratelimit.namespace", domain)
                hits_addend = getattr(request, "hits_addend", None)
                if isinstance(hits_addend, int):
                    span.set_attribute("ratelimit.hits_addend", max(hits_addend, 1))
                response = await inner(request, context)
                code = getattr(response, "overall_code", None)
                if isinstance(code, int):
                    span.set_attribute("ratelimit.limited", code == _OVER_LIMIT)
                return response

        return grpc.unary_unary_rpc_method_handler(
            traced, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
        )


def _json_namespace(body: bytes) -> str | None:
    try:
        document = json.loads(body)
    except ValueError:
        return None
    namespace = document.get("namespace") if isinstance(document, dict) else None
    return namespace if isinstance(namespace, str) else None
