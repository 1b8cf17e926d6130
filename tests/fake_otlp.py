"""A fake OpenTelemetry collector: an OTLP/gRPC trace receiver on loopback that keeps every span it is sent.

It is a real grpc.aio server implementing opentelemetry.proto.collector.trace.v1.TraceService/Export, run on its own
event loop in a thread, so a test or a benchmark can block (starting a mesh, waiting on a client) while processes
export to it. ``stop()`` closes the port: exporters then find the collector down.

    with FakeCollector() as collector:
        ...  # AIMASS_TELEMETRY__OTLP_ENDPOINT=collector.endpoint
        spans = collector.wait_for(lambda spans: len(spans) >= 5, timeout_s=10)

As a process of its own (benchmarks/tracing.py), counting spans without keeping them, until SIGTERM:

    python -m tests.fake_otlp --count-only    # prints "port N", and "spans S exports E" when it stops
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2

Attribute = str | bool | int | float | list[Any]


@dataclass(frozen=True)
class ReceivedSpan:
    service: str  # the resource's service.name
    name: str
    trace_id: str  # hex
    span_id: str
    parent_span_id: str  # "" for a root
    kind: int  # trace_pb2.Span.SpanKind
    start_ns: int
    end_ns: int
    status: int  # trace_pb2.Status.StatusCode
    attributes: dict[str, Attribute] = field(default_factory=dict)
    events: tuple[str, ...] = ()
    resource: dict[str, Attribute] = field(default_factory=dict)

    @property
    def duration_ms(self) -> float:
        return (self.end_ns - self.start_ns) / 1e6


def attribute_value(value: common_pb2.AnyValue) -> Attribute:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [attribute_value(item) for item in value.array_value.values]
    if kind is None:
        return ""
    plain: Attribute = getattr(value, kind)
    return plain


def attributes_of(pairs: Any) -> dict[str, Attribute]:
    return {pair.key: attribute_value(pair.value) for pair in pairs}


def received_spans(request: trace_service_pb2.ExportTraceServiceRequest) -> list[ReceivedSpan]:
    spans = []
    for resource_spans in request.resource_spans:
        resource = attributes_of(resource_spans.resource.attributes)
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                spans.append(
                    ReceivedSpan(
                        service=str(resource.get("service.name", "")),
                        name=span.name,
                        trace_id=span.trace_id.hex(),
                        span_id=span.span_id.hex(),
                        parent_span_id=span.parent_span_id.hex(),
                        kind=span.kind,
                        start_ns=span.start_time_unix_nano,
                        end_ns=span.end_time_unix_nano,
                        status=span.status.code,
                        attributes=attributes_of(span.attributes),
                        events=tuple(event.name for event in span.events),
                        resource=resource,
                    )
                )
    return spans


class _Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, collector: FakeCollector) -> None:
        self.collector = collector

    async def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        if self.collector.keep_spans:
            self.collector._received(received_spans(request))
        else:
            self.collector._counted(sum(len(s.spans) for r in request.resource_spans for s in r.scope_spans))
        return trace_service_pb2.ExportTraceServiceResponse()


class FakeCollector:
    def __init__(self, *, port: int = 0, keep_spans: bool = True) -> None:
        """``keep_spans=False`` only counts them (``span_count``): a collector that costs little to run beside a
        benchmark."""
        self.port = port
        self.keep_spans = keep_spans
        self.exports = 0
        self.span_count = 0
        self._spans: list[ReceivedSpan] = []
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        """What AIMASS_TELEMETRY__OTLP_ENDPOINT takes (a bare host:port is plaintext gRPC)."""
        return f"127.0.0.1:{self.port}"

    def start(self) -> Self:
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            try:
                asyncio.run(self._serve(ready))
            except BaseException as exc:  # reported to start()'s caller
                failure.append(exc)
                ready.set()

        self._thread = threading.Thread(target=run, name="fake-otlp-collector", daemon=True)
        self._thread.start()
        if not ready.wait(10) or failure:
            raise RuntimeError(f"the fake OTLP collector did not start: {failure}")
        return self

    async def _serve(self, ready: threading.Event) -> None:
        server = grpc.aio.server()
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_Receiver(self), server)  # type: ignore[no-untyped-call]
        self.port = server.add_insecure_port(f"127.0.0.1:{self.port}")
        await server.start()
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        ready.set()
        await self._stop.wait()
        await server.stop(0)

    def stop(self) -> None:
        """Close the port (exporters find the collector down); the spans received stay readable."""
        if self._loop is not None and self._stop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(10)
        self._loop = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _received(self, spans: list[ReceivedSpan]) -> None:
        with self._changed:
            self.exports += 1
            self.span_count += len(spans)
            self._spans.extend(spans)
            self._changed.notify_all()

    def _counted(self, spans: int) -> None:
        with self._lock:
            self.exports += 1
            self.span_count += spans

    def spans(self) -> list[ReceivedSpan]:
        with self._lock:
            return list(self._spans)

    def clear(self) -> None:
        with self._lock:
            self._spans.clear()

    def wait_for(self, done: Callable[[list[ReceivedSpan]], bool], timeout_s: float) -> list[ReceivedSpan]:
        """The spans received once ``done(spans)`` holds; TimeoutError (listing what came) if it does not in time."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while not done(list(self._spans)):
                left = deadline - time.monotonic()
                if left <= 0:
                    seen = "\n".join(f"  {s.service} {s.name!r} trace={s.trace_id[:8]}" for s in self._spans)
                    raise TimeoutError(f"spans received in {timeout_s}s did not complete the wait:\n{seen}")
                self._changed.wait(left)
            return list(self._spans)


def trace_of(spans: list[ReceivedSpan], trace_id: str) -> list[ReceivedSpan]:
    return [span for span in spans if span.trace_id == trace_id]


def main(argv: list[str] | None = None) -> None:
    cli = argparse.ArgumentParser(prog="python -m tests.fake_otlp", description="a fake OTLP/gRPC trace collector")
    cli.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default: a free one)")
    cli.add_argument("--count-only", action="store_true", help="count spans instead of keeping them")
    args = cli.parse_args(argv)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    with FakeCollector(port=args.port, keep_spans=not args.count_only) as collector:
        print(f"port {collector.port}", flush=True)
        stop.wait()
    print(f"spans {collector.span_count} exports {collector.exports}", flush=True)
    sys.stdout.close()


if __name__ == "__main__":
    main()
