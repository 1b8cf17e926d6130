"""Forwards any aimass.v1 method to a replica as raw bytes: no deserialisation, no re-serialisation.

A generic handler answers every method of the contract with a handler of the method's own call kind (so unary
calls take grpc's fast unary path), picks a replica through the Router, and passes the deadline, the caller's
metadata and cancellation through. Errors from the replica reach the client unchanged, trailers included.

Every routing decision is counted (``aimass_gateway_routed_total``), and so is every retry. With tracing on
(aimass.runtime.tracing) the gateway's server span gets a "route" child (the router, the candidates, the chosen
replica and the figures it was chosen on) and a CLIENT span per call to a replica; the caller's trace headers are
replaced by that span's, so the replica's server span is its child and the trace stays connected.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import grpc
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer
from prometheus_client import Counter

from aimass.runtime import contract, tracing
from aimass.runtime.catalogue import default_model_label
from aimass.runtime.interceptors import Handler
from aimass.runtime.metadata import INTERNAL_PREFIX, REQUEST_ID_KEY, TENANT_KEY, new_request_id, request_id_of
from aimass.runtime.scope import current_scope
from gateway.model_routing import model_field_number, requested_model
from gateway.replicas import Replica, ReplicaSet
from gateway.router import ExplainsChoice, Router

log = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[bytes, bytes]
Metadata = tuple[tuple[str, str | bytes], ...]

ROUTED = Counter(
    "aimass_gateway_routed_total",
    "Routing decisions: the replica (registry instance id) chosen for a call, by service and router",
    ["service", "router", "replica"],
)
RETRIES = Counter(
    "aimass_gateway_retries_total",
    "Unary calls sent again to another replica, by service and the status of the failed attempt",
    ["service", "code"],
)
# The route span lists the candidates' instance ids up to this many (beyond, only their number).
LISTED_CANDIDATES = 16

# Transport headers that grpc sets per hop, and the caller's credentials (verified here, never passed on); everything
# else the caller sent (traceparent, x-request-id, its own labels) passes through, except the mesh's own x-aimass-*
# headers, which the gateway writes from the call's verified scope.
HOP_BY_HOP = frozenset(
    {"user-agent", "content-type", "te", "grpc-accept-encoding", "grpc-encoding", "grpc-timeout"}
    | {"authorization", "x-api-key"}
)


def forwarded_metadata(context: Context) -> Metadata:
    """The caller's metadata minus per-hop headers, credentials and x-aimass-* headers, plus the call's verified
    scope (tenant, weight, priority cap, key id) and a request id when the caller sent none."""
    incoming = context.invocation_metadata() or ()
    kept: Metadata = tuple(
        (key, value)
        for key, value in incoming
        if not key.startswith(":") and key not in HOP_BY_HOP and not key.startswith(INTERNAL_PREFIX)
    )
    scope = current_scope().metadata()
    if request_id_of(incoming):
        return (*kept, *scope)
    return (*kept, *scope, (REQUEST_ID_KEY, new_request_id()))


def with_tenant(trailers: Metadata) -> Metadata:
    """A replica's trailers plus the tenant the call was served for (the key's, whatever the caller claimed)."""
    return (*trailers, (TENANT_KEY, current_scope().tenant))


async def relay_trailers(context: Context, call: grpc.aio.Call) -> None:
    """Ends the caller's call with the replica's trailers (after its last response), plus the tenant."""
    context.set_trailing_metadata(with_tenant(tuple(await call.trailing_metadata() or ())))


async def relay_error(context: Context, err: grpc.aio.AioRpcError) -> None:
    trailers = tuple((k, v) for k, v in (err.trailing_metadata() or ()) if not k.startswith("grpc-status"))
    await context.abort(err.code(), err.details() or "", trailing_metadata=with_tenant(trailers))


class Forwarder(grpc.GenericRpcHandler):
    def __init__(
        self,
        replicas: ReplicaSet,
        router: Router,
        *,
        local_services: frozenset[str],
        internal_services: frozenset[str] = frozenset(),
        retry_unavailable: bool = True,
        router_name: str = "",
        tracer: Tracer | None = None,
    ) -> None:
        self.replicas = replicas
        self.router = router
        self.router_name = router_name or type(router).__name__
        self.retry_unavailable = retry_unavailable
        # None: tracing is off and no span work is done.
        self._tracer = tracer
        self._trace_headers = tracing.trace_header_names() if tracer is not None else frozenset()
        # (service, instance id) → its routed counter, bound once.
        self._routed: dict[tuple[str, str], Counter] = {}
        self.internal_services = internal_services
        self.forwarded_services = frozenset(contract.services()) - local_services - internal_services
        self._handlers: dict[str, Handler] = {}
        # Methods whose (single) request names a model: the field number of its ModelRef, and the registry label
        # naming each replica's default model for requests that name none.
        self._model_fields: dict[str, int] = {}
        self._default_labels: dict[str, str] = {}
        for service_descriptor in contract.services().values():
            for method_descriptor in service_descriptor.methods:
                number = model_field_number(method_descriptor.input_type)
                if number is not None and not method_descriptor.client_streaming:
                    path = f"/{service_descriptor.full_name}/{method_descriptor.name}"
                    self._model_fields[path] = number
                    self._default_labels[path] = default_model_label(path)
        for method, kind in contract.methods().items():
            service = method.split("/")[1]
            if service in self.forwarded_services:
                self._handlers[method] = self._make_handler(method, service, kind)

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Handler | None:
        method = handler_call_details.method
        handler = self._handlers.get(method)
        if handler is not None:
            return handler
        return grpc.stream_stream_rpc_method_handler(self._unknown_method(method))

    def _unknown_method(self, method: str) -> Callable[[AsyncIterator[bytes], Context], Any]:
        service, _, name = method.lstrip("/").partition("/")
        descriptor = contract.services().get(service)
        if service in self.internal_services:
            message = (
                f"{service} is internal to the mesh; the gateway serves {', '.join(sorted(self.forwarded_services))}"
            )
        elif descriptor is not None:
            message = f"{service} has no method {name!r}; it has {', '.join(m.name for m in descriptor.methods)}"
        else:
            message = f"unknown service {service!r}; the gateway serves {', '.join(sorted(self.forwarded_services))}"

        async def reject(requests: AsyncIterator[bytes], context: Context) -> None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, message)

        return reject

    def _pick(
        self, service: str, exclude: Replica | None = None, *, method: str = "", request: bytes = b""
    ) -> Replica | None:
        started_ns = time.time_ns() if self._tracer is not None else 0
        candidates: Sequence[Replica] = self.replicas.healthy(service)
        if len(candidates) > 1 and method in self._model_fields and _models_differ(candidates):
            # Replicas hold different models (e.g. one LLM per process, or a model unloaded from one): only those
            # holding the named one qualify; with none named, those holding their own default for the method.
            # A model none holds goes to any replica, which answers NOT_FOUND listing what it serves (or UNAVAILABLE
            # for one of its models it has not loaded: LoadModel loads it).
            model = requested_model(request, self._model_fields[method])
            default_label = self._default_labels[method]
            holding = [
                r for r in candidates if (model or r.instance.labels.get(default_label, "")) in r.instance.models
            ]
            candidates = holding or candidates
        if exclude is not None and len(candidates) > 1:
            candidates = [r for r in candidates if r is not exclude]
        choice = self.router.choose(service, candidates) if candidates else None
        if choice is not None:
            routed = self._routed.get((service, choice.instance.instance_id))
            if routed is None:
                routed = ROUTED.labels(service, self.router_name, choice.instance.instance_id)
                self._routed[(service, choice.instance.instance_id)] = routed
            routed.inc()
        if self._tracer is not None:
            self._trace_route(self._tracer, started_ns, service, candidates, choice, exclude)
        return choice

    def _trace_route(
        self,
        tracer: Tracer,
        started_ns: int,
        service: str,
        candidates: Sequence[Replica],
        choice: Replica | None,
        exclude: Replica | None,
    ) -> None:
        """The routing decision as a span under the gateway's server span: the scheduler's part in a request (its
        pushed view, read by the router) and the router's choice."""
        span = tracer.start_span(
            tracing.ROUTE_SPAN,
            start_time=started_ns,
            attributes={
                "aimass.service": service,
                "aimass.router": self.router_name,
                "aimass.route.candidates": len(candidates),
                "aimass.route.retry": exclude is not None,
            },
        )
        if span.is_recording():
            if len(candidates) <= LISTED_CANDIDATES:
                span.set_attribute("aimass.route.candidate_ids", [r.instance.instance_id for r in candidates])
            if exclude is not None:
                span.set_attribute("aimass.route.excluded", exclude.instance.instance_id)
            if choice is None:
                span.set_status(Status(StatusCode.ERROR, f"no healthy replica serves {service}"))
            else:
                span.set_attribute("aimass.replica", choice.instance.instance_id)
                span.set_attribute("aimass.replica.address", choice.instance.address)
                if isinstance(self.router, ExplainsChoice):
                    span.set_attributes(self.router.explain(choice))
        span.end()

    def _call_span(
        self, method: str, replica: Replica, attempt: int, metadata: Metadata
    ) -> tuple[Span | None, Metadata]:
        """With tracing on: a CLIENT span for one call to ``replica``, and ``metadata`` carrying its context."""
        tracer = self._tracer
        if tracer is None:
            return None, metadata
        service, _, name = method.lstrip("/").partition("/")
        span = tracer.start_span(
            method,
            kind=SpanKind.CLIENT,
            attributes={
                "rpc.system": "grpc",
                "rpc.service": service,
                "rpc.method": name,
                "server.address": replica.instance.address,
                "aimass.replica": replica.instance.instance_id,
                "aimass.attempt": attempt,
            },
        )
        return span, tracing.with_trace_context(metadata, trace.set_span_in_context(span), self._trace_headers)

    @staticmethod
    def _end_call_span(span: Span | None, error: grpc.aio.AioRpcError | None) -> None:
        if span is None:
            return
        if error is not None:
            tracing.set_rpc_error(span, error.code(), error.details())
        span.end()

    @staticmethod
    async def _no_replica(context: Context, service: str) -> None:
        await context.abort(
            grpc.StatusCode.UNAVAILABLE,
            f"no healthy replica serves {service} right now; start one (aimass up) or check `aimass status`",
        )

    def _make_handler(self, method: str, service: str, kind: contract.MethodKind) -> Handler:
        if not kind.client_streaming and not kind.server_streaming:
            return grpc.unary_unary_rpc_method_handler(self._unary_unary(method, service))
        if not kind.client_streaming:
            return grpc.unary_stream_rpc_method_handler(self._streaming(method, service, client_streaming=False))
        if not kind.server_streaming:
            return grpc.stream_unary_rpc_method_handler(self._stream_unary(method, service))
        return grpc.stream_stream_rpc_method_handler(self._streaming(method, service, client_streaming=True))

    def _unary_unary(self, method: str, service: str) -> Callable[[bytes, Context], Any]:
        async def forward(request: bytes, context: Context) -> bytes:
            replica = self._pick(service, method=method, request=request)
            if replica is None:
                await self._no_replica(context, service)
                raise AssertionError("unreachable")
            metadata = forwarded_metadata(context)
            for attempt in (1, 2):
                target = replica
                span, call_metadata = self._call_span(method, target, attempt, metadata)
                call = target.unary_unary(method)(request, timeout=context.time_remaining(), metadata=call_metadata)
                target.inflight += 1
                error: grpc.aio.AioRpcError | None = None
                try:
                    response: bytes = await call
                except grpc.aio.AioRpcError as err:
                    error = err
                    # UNAVAILABLE: the replica is down, draining, cut off or without the model. It may have started
                    # the call before dying, but inference has no side effects, so running it again is safe.
                    retry = (
                        self._pick(service, target, method=method, request=request)
                        if attempt == 1 and err.code() == grpc.StatusCode.UNAVAILABLE and self.retry_unavailable
                        else None
                    )
                    if retry is not None:
                        log.info(
                            "%s unavailable on %s; retrying on %s",
                            method,
                            target.instance.address,
                            retry.instance.address,
                        )
                        RETRIES.labels(service, err.code().name).inc()
                        replica = retry
                        continue
                    await relay_error(context, err)
                    raise AssertionError("unreachable") from err
                finally:
                    target.inflight -= 1
                    self._end_call_span(span, error)
                await relay_trailers(context, call)
                return response
            raise AssertionError("unreachable")

        return forward

    def _stream_unary(self, method: str, service: str) -> Callable[[AsyncIterator[bytes], Context], Any]:
        async def forward(requests: AsyncIterator[bytes], context: Context) -> bytes:
            replica = self._pick(service)
            if replica is None:
                await self._no_replica(context, service)
                raise AssertionError("unreachable")
            span, metadata = self._call_span(method, replica, 1, forwarded_metadata(context))
            call = replica.stream_unary(method)(requests, timeout=context.time_remaining(), metadata=metadata)
            replica.inflight += 1
            error: grpc.aio.AioRpcError | None = None
            try:
                response: bytes = await call
            except grpc.aio.AioRpcError as err:
                error = err
                await relay_error(context, err)
                raise AssertionError("unreachable") from err
            finally:
                replica.inflight -= 1
                call.cancel()
                self._end_call_span(span, error)
            await relay_trailers(context, call)
            return response

        return forward

    def _streaming(self, method: str, service: str, *, client_streaming: bool) -> Callable[[Any, Context], Any]:
        async def forward(request: Any, context: Context) -> AsyncIterator[bytes]:
            replica = self._pick(service, method=method, request=b"" if client_streaming else request)
            if replica is None:
                await self._no_replica(context, service)
                return
            timeout = context.time_remaining()
            span, metadata = self._call_span(method, replica, 1, forwarded_metadata(context))
            call: Any
            if client_streaming:
                call = replica.stream_stream(method)(request, timeout=timeout, metadata=metadata)
            else:
                call = replica.unary_stream(method)(request, timeout=timeout, metadata=metadata)
            replica.inflight += 1
            error: grpc.aio.AioRpcError | None = None
            try:
                initial = await call.initial_metadata()
                if initial:
                    await context.send_initial_metadata(initial)
                async for response in call:
                    yield response
                await relay_trailers(context, call)
            except grpc.aio.AioRpcError as err:
                error = err
                await relay_error(context, err)
            finally:
                replica.inflight -= 1
                # The client went away or the deadline passed: stop the replica's work too.
                call.cancel()
                self._end_call_span(span, error)

        return forward


def _models_differ(replicas: Sequence[Replica]) -> bool:
    first = replicas[0].instance.models
    return any(replica.instance.models != first for replica in replicas[1:])
