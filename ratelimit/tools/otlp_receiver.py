"""A small OTLP/gRPC trace receiver: what a collector (Jaeger, Tempo, the OpenTelemetry Collector)
does on port 4317, reduced to keeping the spans it is sent.

    with OtlpReceiver() as receiver:                  # listens on a free loopback port
        ... run something with --tracing-endpoint receiver.endpoint ...
        span = receiver.wait_for(lambda s: s.name == "should_rate_limit")

It is a real `opentelemetry.proto.collector.trace.v1.TraceService/Export` server over the wire
protocol, built on the `opentelemetry-proto` messages, so what it receives is exactly what a
collector would. `python -m ratelimit.tools.otlp_receiver --port 4317` prints each span it gets.
"""

from __future__ import annotations

import argparse
import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

from ratelimit.tools.processes import free_ports


@dataclass(frozen=True)
class ReceivedSpan:
    """One span as it arrived, with ids in hex (as in a `traceparent`)."""

    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    kind: int
    attributes: dict[str, Any]
    resource: dict[str, Any] = field(default_factory=dict)


def _value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [_value(item) for item in value.array_value.values]
    if kind == "kvlist_value":
        return {item.key: _value(item.value) for item in value.kvlist_value.values}
    return getattr(value, kind)


class _TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, receiver: OtlpReceiver) -> None:
        self._receiver = receiver

    def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.ServicerContext
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        spans = []
        for resource_spans in request.resource_spans:
            resource = {item.key: _value(item.value) for item in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    spans.append(ReceivedSpan(
                        name=span.name, trace_id=span.trace_id.hex(), span_id=span.span_id.hex(),
                        parent_span_id=span.parent_span_id.hex(), kind=span.kind,
                        attributes={item.key: _value(item.value) for item in span.attributes}, resource=resource,
                    ))
        self._receiver._add(spans)
        return trace_service_pb2.ExportTraceServiceResponse()


class OtlpReceiver:
    """An OTLP/gRPC trace receiver on `host:port` (a free port unless given)."""

    def __init__(self, host: str = "127.0.0.1", port: int | None = None,
                 on_span: Callable[[ReceivedSpan], None] | None = None) -> None:
        self.host = host
        self.port = port if port is not None else free_ports(1, host)[0]
        self._on_span = on_span
        self._spans: list[ReceivedSpan] = []
        self._changed = threading.Condition()
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_TraceService(self), self._server)
        self._server.add_insecure_port(f"{host}:{self.port}")

    @property
    def endpoint(self) -> str:
        """What `--tracing-endpoint` takes."""
        return f"http://{self.host}:{self.port}"

    @property
    def spans(self) -> list[ReceivedSpan]:
        with self._changed:
            return list(self._spans)

    def _add(self, spans: list[ReceivedSpan]) -> None:
        with self._changed:
            self._spans.extend(spans)
            self._changed.notify_all()
        if self._on_span is not None:
            for span in spans:
                self._on_span(span)

    def wait_for(self, matches: Callable[[ReceivedSpan], bool], timeout: float = 30.0) -> ReceivedSpan:
        """The first span received that `matches`, waiting for it up to `timeout` seconds."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for span in self._spans:
                    if matches(span):
                        return span
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    names = sorted({span.name for span in self._spans})
                    raise TimeoutError(f"no matching span within {timeout:g}s; received {len(self._spans)}: {names}")
                self._changed.wait(remaining)

    def start(self) -> OtlpReceiver:
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop(grace=None)

    def __enter__(self) -> OtlpReceiver:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description="Print the spans sent to an OTLP/gRPC endpoint.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=4317)
    args = parser.parse_args()

    def show(span: ReceivedSpan) -> None:
        print(f"{span.trace_id} {span.span_id} parent={span.parent_span_id or '-'} {span.name} {span.attributes}",
              flush=True)

    with OtlpReceiver(args.host, args.port, on_span=show) as receiver:
        print(f"receiving OTLP/gRPC spans on {receiver.endpoint}", flush=True)
        threading.Event().wait()


if __name__ == "__main__":
    main()
