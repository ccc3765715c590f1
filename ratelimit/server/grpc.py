"""The gRPC server: Envoy RLS v3 and Kuadrant RLS v1 on one `grpc.aio` server, with gRPC health
checking and optional reflection. run_service runs it on the HTTP API's event loop, so both share
one engine.

The services are plain `async def method(request) -> response` objects (envoy_rls.py, kuadrant.py);
this module adds the wire: decoding, and turning the engine's errors into gRPC status codes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import NoReturn, TypeVar

import grpc
from envoy.service.ratelimit.v3 import rls_pb2
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import SERVICE_NAME as HEALTH_SERVICE_NAME
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from ratelimit.counters import StorageError
from ratelimit.engine import InvalidRequest
from ratelimit.proto import kuadrantrls_pb2
from ratelimit.server.envoy_rls import EnvoyRateLimitService
from ratelimit.server.errors import ServerError
from ratelimit.server.ext_proc import EXT_PROC_SERVICE, MeterConfig, ext_proc_handler
from ratelimit.server.kuadrant import KuadrantRateLimitService
from ratelimit.server.state import Service
from ratelimit.server.tasks import run_in_background

logger = logging.getLogger(__name__)

ENVOY_SERVICE = rls_pb2.DESCRIPTOR.services_by_name["RateLimitService"].full_name
KUADRANT_SERVICE = kuadrantrls_pb2.DESCRIPTOR.services_by_name["RateLimitService"].full_name
RATE_LIMIT_SERVICES = (ENVOY_SERVICE, KUADRANT_SERVICE)

MAX_MESSAGE_BYTES = 4 * 1024 * 1024
"""Largest request accepted (gRPC's default, made explicit); larger ones get RESOURCE_EXHAUSTED
before they are decoded. An Envoy RLS request is usually well under 1 KiB."""
MAX_CONCURRENT_STREAMS = 1024
"""Calls in flight per connection (an ext_proc stream lasts a whole proxied request); further calls wait
in the client."""

_SERVER_OPTIONS = [
    # grpc sets SO_REUSEPORT by default: a second service on a taken port would then share it
    # silently instead of failing to start.
    ("grpc.so_reuseport", 0),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_metadata_size", 16 * 1024),
    ("grpc.max_concurrent_streams", MAX_CONCURRENT_STREAMS),
    # Keepalive: ping idle connections every 60 s and drop ones that do not answer within 20 s, so
    # vanished clients do not hold connections; refuse clients that ping more often than every 10 s
    # (a ping flood) by closing their connection (GOAWAY) after 2 strikes.
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_ping_strikes", 2),
    # A connection nobody uses for 10 minutes is closed (clients reconnect transparently).
    ("grpc.max_connection_idle_ms", 600_000),
]

RequestT = TypeVar("RequestT", bound=Message)
ResponseT = TypeVar("ResponseT", bound=Message)


class _Undecodable:
    """A request body that is not the expected message (for example invalid UTF-8 in a string).

    grpc answers a deserializer's exception with INTERNAL; carrying the error to the handler lets
    it answer INVALID_ARGUMENT and say why.
    """

    def __init__(self, error: DecodeError) -> None:
        self.error = error


async def _abort(context: grpc.aio.ServicerContext, code: grpc.StatusCode, details: str) -> NoReturn:
    """`context.abort`, typed as what it does (grpc ships no types): it raises, ending the call."""
    await context.abort(code, details)
    raise AssertionError("context.abort raises")  # pragma: no cover


def _unary(
    method: Callable[[RequestT], Awaitable[ResponseT]], request_type: type[RequestT]
) -> grpc.RpcMethodHandler:
    def decode(data: bytes) -> RequestT | _Undecodable:
        try:
            return request_type.FromString(data)
        except DecodeError as error:
            return _Undecodable(error)

    async def call(request: RequestT | _Undecodable, context: grpc.aio.ServicerContext) -> ResponseT:
        if isinstance(request, _Undecodable):
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"malformed request: {request.error}")
        try:
            return await method(request)
        except InvalidRequest as error:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(error))
        except StorageError as error:
            # Not an OVER_LIMIT or UNKNOWN answer: Envoy applies failure_mode_deny to errors only.
            # Debug only: during an outage every call fails, and the storage reports its own health.
            logger.debug("counter storage unavailable: %s", error)
            await _abort(context, grpc.StatusCode.UNAVAILABLE, f"counter storage unavailable: {error}")

    return grpc.unary_unary_rpc_method_handler(
        call, request_deserializer=decode, response_serializer=lambda message: message.SerializeToString()
    )


def rate_limit_handlers(service: Service) -> list[grpc.GenericRpcHandler]:
    envoy = EnvoyRateLimitService(service)
    kuadrant = KuadrantRateLimitService(service)
    return [
        grpc.method_handlers_generic_handler(
            ENVOY_SERVICE, {"ShouldRateLimit": _unary(envoy.should_rate_limit, rls_pb2.RateLimitRequest)}
        ),
        grpc.method_handlers_generic_handler(
            KUADRANT_SERVICE,
            {
                "CheckRateLimit": _unary(kuadrant.check_rate_limit, rls_pb2.RateLimitRequest),
                "Report": _unary(kuadrant.report, rls_pb2.RateLimitRequest),
                "Reserve": _unary(kuadrant.reserve, kuadrantrls_pb2.ReserveRequest),
                "Commit": _unary(kuadrant.commit, kuadrantrls_pb2.CommitRequest),
            },
        ),
    ]


READINESS_POLL_SECONDS = 0.2
"""How often gRPC health reads the storage's readiness (a property read: costs nothing)."""


class GrpcServer:
    """The gRPC server as run_service runs it (a ManagedServer): `serve()` until `stop()`."""

    name = "gRPC"

    def __init__(
        self, service: Service, host: str, port: int, reflection: bool = False, grace: float = 10.0,
        meter_config: MeterConfig | None = None, interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
        reuse_port: bool = False,
    ) -> None:
        self.reuse_port = reuse_port
        """Share the port with the other workers (`--workers`); otherwise a taken port fails the start."""
        self.service = service
        self.meter_config = meter_config or MeterConfig()
        self.interceptors = list(interceptors)
        """Only when asked for (tracing): grpc.aio runs even a pass-through interceptor per call."""
        self.address = f"{host}:{port}"
        self.reflection = reflection
        self.grace = grace
        self.port: int | None = None
        """The port bound once serving (differs from the one asked for when that was 0)."""
        self._stop_requested = asyncio.Event()
        self._force = False
        self._server: grpc.aio.Server | None = None

    async def serve(self) -> None:
        options = _SERVER_OPTIONS
        if self.reuse_port:
            options = [option for option in options if option[0] != "grpc.so_reuseport"] + [("grpc.so_reuseport", 1)]
        server = grpc.aio.server(options=options, interceptors=self.interceptors or None)
        server.add_generic_rpc_handlers(rate_limit_handlers(self.service))
        server.add_generic_rpc_handlers([ext_proc_handler(self.service, self.meter_config)])
        health = health_aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health, server)
        if self.reflection:
            names = (*RATE_LIMIT_SERVICES, EXT_PROC_SERVICE, HEALTH_SERVICE_NAME, reflection.SERVICE_NAME)
            reflection.enable_server_reflection(names, server)
        try:
            self.port = server.add_insecure_port(self.address)
        except RuntimeError as error:
            raise ServerError(f"{self.name} could not start on {self.address}: {error}") from None
        await health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        await server.start()
        self._server = server
        # run_service loads the limits before starting any server: once up, this one can answer,
        # as long as its storage can (health follows the storage's readiness).
        follower = asyncio.ensure_future(self._follow_readiness(health))
        logger.info("gRPC (Envoy RLS v3, Kuadrant RLS v1, ext_proc token meter) on %s", self.address)
        try:
            await self._stop_requested.wait()
        finally:
            follower.cancel()
            await asyncio.gather(follower, return_exceptions=True)
            await health.enter_graceful_shutdown()
            await server.stop(None if self._force else self.grace)

    async def _follow_readiness(self, health: health_aio.HealthServicer) -> None:
        """SERVING while the storage can answer decisions, NOT_SERVING while it cannot (Redis down
        with --on-storage-error closed), so Envoy and Kubernetes route around this replica."""
        serving: bool | None = None
        while True:
            ready = self.service.engine.storage.ready()
            if ready != serving:
                serving = ready
                state = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
                for name in ("", *RATE_LIMIT_SERVICES, EXT_PROC_SERVICE):
                    await health.set(name, state)
            await asyncio.sleep(READINESS_POLL_SECONDS)

    def stop(self, force: bool = False) -> None:
        """Begin a graceful shutdown: NOT_SERVING, in-flight calls get `grace` seconds; forced, they are
        cancelled at once (also when a graceful shutdown is already under way)."""
        self._force = self._force or force
        self._stop_requested.set()
        if force and self._server is not None:
            run_in_background(self._server.stop(None))
