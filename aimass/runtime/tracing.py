"""OpenTelemetry traces for every aimass process that serves requests (``telemetry`` in the config).

One trace follows a request from the client through the gateway (its server span, the routing decision, the call
to the replica) into the replica (its server span, the time queued in a batcher, the batch execution and the model
inference inside it). W3C trace context (``traceparent``/``tracestate``) travels in gRPC metadata: the gateway
forwards raw bytes, so it replaces the caller's trace headers with its own (``with_trace_context``) and the
replica's span becomes a child of the gateway's.

Off (the default: ``telemetry.otlp_endpoint`` empty) nothing is installed: no interceptor, no exporter, no
per-request work. On, ``setup_process`` builds a TracerProvider per process (resource ``service.name`` =
``aimass-<kind>``, or ``OTEL_SERVICE_NAME``), samples ParentBased(TraceIdRatioBased(sample_ratio)) and exports
through a BatchSpanProcessor to OTLP/gRPC. Exports run in the processor's own thread with a bounded queue and a
bounded timeout, so a collector that is down costs dropped spans, never a blocked request; ``Tracing.shutdown``
flushes within ``export_timeout_s`` and then gives up.

Server spans come from opentelemetry-instrumentation-grpc's aio server interceptor, outermost in the server's
interceptor chain so admission refusals and mapped errors record their code on it (``rpc.grpc.status_code``; the
span's status is ERROR for server faults only, as the semantic conventions have it). Health, reflection and the
control plane (registry heartbeats, scheduler reports and watches) are not traced: they are not requests and would
drown them.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Final

import grpc
from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.trace import Span, Status, StatusCode, Tracer

from aimass import __version__
from aimass.runtime.config import TelemetryConfig

if TYPE_CHECKING:
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import SpanProcessor

__all__ = [
    "BATCH_SPAN",
    "INFERENCE_SPAN",
    "QUEUE_SPAN",
    "ROUTE_SPAN",
    "UNTRACED_PREFIXES",
    "Tracing",
    "install",
    "installed",
    "make_tracing",
    "set_rpc_error",
    "setup_process",
    "tracer",
    "with_trace_context",
]

log = logging.getLogger(__name__)

# Span names (low cardinality; what varies goes into attributes).
ROUTE_SPAN: Final = "route"
QUEUE_SPAN: Final = "queue wait"
BATCH_SPAN: Final = "batch execution"
INFERENCE_SPAN: Final = "model inference"

# Calls that get no server span: health and reflection, and the mesh's own control plane.
UNTRACED_PREFIXES: Final = (
    "/grpc.health.v1.",
    "/grpc.reflection.",
    "/aimass.v1.RegistryService/",
    "/aimass.v1.SchedulerService/",
)

Metadata = tuple[tuple[str, str | bytes], ...]


def _traced(details: grpc.HandlerCallDetails) -> bool:
    return not details.method.startswith(UNTRACED_PREFIXES)


def resource_for(kind: str) -> Resource:
    """``aimass-<kind>`` unless OTEL_SERVICE_NAME names the process (OTEL_RESOURCE_ATTRIBUTES is honoured too)."""
    from opentelemetry.sdk.environment_variables import OTEL_SERVICE_NAME
    from opentelemetry.sdk.resources import (
        SERVICE_INSTANCE_ID,
        SERVICE_NAME,
        SERVICE_NAMESPACE,
        SERVICE_VERSION,
        Resource,
    )

    attributes: dict[str, str] = {
        SERVICE_NAMESPACE: "aimass",
        SERVICE_VERSION: __version__,
        SERVICE_INSTANCE_ID: f"{kind}-{socket.gethostname()}-{os.getpid()}",
    }
    if not os.environ.get(OTEL_SERVICE_NAME):
        attributes[SERVICE_NAME] = f"aimass-{kind}"
    return Resource.create(attributes)


def otlp_exporter(config: TelemetryConfig) -> OTLPSpanExporter:
    """OTLP/gRPC to ``config.otlp_endpoint``: TLS for https://, plaintext for http:// and a bare host:port."""
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    secure = config.otlp_endpoint.startswith("https://")
    return OTLPSpanExporter(endpoint=config.otlp_endpoint, insecure=not secure, timeout=config.export_timeout_s)


class Tracing:
    """One process's tracer provider and what is built from it."""

    def __init__(self, config: TelemetryConfig, kind: str, *, processor: SpanProcessor | None = None) -> None:
        """``processor`` replaces the OTLP batch exporter (tests pass an in-memory one)."""
        # The SDK and the exporter load only where tracing is on.
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

        self.config = config
        self.kind = kind
        self._exporter: SpanExporter | None = None
        if processor is None:
            self._exporter = otlp_exporter(config)
            processor = BatchSpanProcessor(
                self._exporter,
                max_queue_size=config.max_queued_spans,
                schedule_delay_millis=config.export_interval_ms,
                max_export_batch_size=min(512, config.max_queued_spans),
            )
        # Shut down by the process (serve_process), within a bound; an atexit hook could wait out 30 s of retries.
        self.provider = TracerProvider(
            sampler=ParentBased(TraceIdRatioBased(config.sample_ratio)),
            resource=resource_for(kind),
            shutdown_on_exit=False,
        )
        self.provider.add_span_processor(processor)
        self.tracer = self.provider.get_tracer("aimass", __version__)

    def server_interceptor(self) -> grpc.aio.ServerInterceptor:
        """A SERVER span per call (the instrumentation's aio interceptor), continuing the caller's trace."""
        from opentelemetry.instrumentation.grpc import aio_server_interceptor

        # The instrumentation's factories carry no annotations.
        interceptor: grpc.aio.ServerInterceptor = aio_server_interceptor(  # type: ignore[no-untyped-call]
            tracer_provider=self.provider, filter_=_traced
        )
        return interceptor

    def shutdown(self) -> bool:
        """Flush what is queued and stop exporting, within ``export_timeout_s``; True when it all went out in time.

        The SDK's own shutdown waits up to 30 s (and retries each batch for ``export_timeout_s``), so it runs in a
        daemon thread; past the bound the exporter is shut down, which abandons its retries, and spans still queued
        are dropped.
        """
        flushing = threading.Thread(target=self.provider.shutdown, name="aimass-trace-flush", daemon=True)
        flushing.start()
        flushing.join(self.config.export_timeout_s)
        if not flushing.is_alive():
            return True
        log.warning(
            "traces: the collector at %s took longer than %.1fs to take the last spans; dropping them",
            self.config.otlp_endpoint,
            self.config.export_timeout_s,
        )
        if self._exporter is not None:
            self._exporter.shutdown()
        flushing.join(0.5)
        return False


def make_tracing(config: TelemetryConfig, kind: str) -> Tracing | None:
    """The process's tracing, or None when ``otlp_endpoint`` is empty (tracing off)."""
    return Tracing(config, kind) if config.otlp_endpoint else None


_installed: Tracing | None = None


def install(tracing: Tracing | None) -> None:
    """Make ``tracing`` the one servers, batchers and the gateway in this process use (None: off)."""
    global _installed
    _installed = tracing


def installed() -> Tracing | None:
    return _installed


def tracer() -> Tracer | None:
    """The process's tracer, or None when tracing is off (callers then skip all span work)."""
    return _installed.tracer if _installed is not None else None


def setup_process(config: TelemetryConfig, kind: str) -> Tracing | None:
    """For a process's main: build, install and make global (for any library that traces) the process's tracing."""
    tracing = make_tracing(config, kind)
    if tracing is None:
        return None
    install(tracing)
    trace.set_tracer_provider(tracing.provider)
    log.info(
        "traces to %s (sample ratio %g of traces starting here; callers' sampling decisions are followed)",
        config.otlp_endpoint,
        config.sample_ratio,
    )
    return tracing


def trace_header_names() -> frozenset[str]:
    """The metadata keys the configured propagators write (traceparent, tracestate, baggage by default)."""
    return frozenset(propagate.get_global_textmap().fields)


def with_trace_context(metadata: Iterable[tuple[str, Any]], context: Context, replaced: frozenset[str]) -> Metadata:
    """``metadata`` with its trace headers (keys in ``replaced``) swapped for those of ``context``."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=context)
    kept = tuple((key, value) for key, value in metadata if key not in replaced)
    return (*kept, *carrier.items())


def set_rpc_error(span: Span, code: grpc.StatusCode, details: str | None) -> None:
    """Mark ``span`` failed with a gRPC status, as the instrumentation does for its own spans."""
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    span.set_status(Status(StatusCode.ERROR, f"{code.name}: {details or ''}"))
