"""Forwards any aimass.v1 method to a replica as raw bytes: no deserialisation, no re-serialisation.

A generic handler answers every method of the contract with a handler of the method's own call kind (so unary
calls take grpc's fast unary path), picks a replica through the Router, and passes the deadline, the caller's
metadata and cancellation through. Errors from the replica reach the client unchanged, trailers included.

A unary call (or a server stream before its first response) whose replica answers UNAVAILABLE is sent once more to
another replica. When the replica did not answer at all (the connection broke: it crashed, was killed or cut off),
the request may have been what killed it: each such crash is counted against the request's fingerprint (method and
a hash of its bytes) in a ``CrashTable``. A first crash may be a bystander of a kill, so the call is retried; once
``poison_max_crashes`` replicas died under the same bytes the caller gets INTERNAL (reason POISON_REQUEST) and
identical requests are refused here, unsent, until the entry expires. Every other call a dead replica had is
answered UNAVAILABLE (reason REPLICA_CRASHED, naming it), logged and counted, never dropped: streams after their
first response, client streams, calls with no other replica to go to.

A unary call to an idempotent method (its rpc says ``idempotency_level = NO_SIDE_EFFECTS``) with no answer after
the method's hedge delay is sent once more, to another replica (gateway/hedging.py states when and how often): the
first success wins and the other attempt is cancelled at once. The second attempt also serves as the retry: an
attempt failing UNAVAILABLE (or crashing) while the other runs is accounted as above (crash, poison) and the call
waits for the other; a replica's own answer of any other status ends the call with it, as without hedging. A
replica that answered nothing since a call past its delay was sent is left out of routing until it answers a health
check (``_until_answers``).

Every routing decision is counted (``aimass_gateway_routed_total``), and so is every retry and hedge. With tracing on
(aimass.runtime.tracing) the gateway's server span gets a "route" child (the router, the candidates, the chosen
replica and the figures it was chosen on) and a CLIENT span per call to a replica (a hedge's marked
``aimass.hedge``, a cancelled loser's ``aimass.attempt.cancelled``); the caller's trace headers are
replaced by that span's, so the replica's server span is its child and the trace stays connected.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn, cast

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer
from prometheus_client import Counter

from aimass.client import error_info
from aimass.runtime import contract, tracing
from aimass.runtime.batcher import UNMEETABLE_REASON
from aimass.runtime.catalogue import default_model_label
from aimass.runtime.config import GatewayConfig
from aimass.runtime.errors import AimassError
from aimass.runtime.errors import relay_error as relay_replica_error
from aimass.runtime.interceptors import Handler
from aimass.runtime.metadata import TENANT_KEY
from aimass.runtime.scope import Metadata, current_scope, forwarded_metadata, time_remaining
from gateway.hedging import HedgingPolicy, MethodHedging
from gateway.model_routing import model_field_number, requested_model
from gateway.poison import (
    CrashRecord,
    CrashTable,
    Fingerprint,
    PoisonRequest,
    ReplicaCrashed,
    answered_by_replica,
    crashed_under,
    fingerprint,
)
from gateway.prefix_affinity import prompt_prefix
from gateway.replicas import Replica, ReplicaSet
from gateway.router import ExplainsChoice, Router, RoutesByPrefix

log = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[bytes, bytes]

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
REPLICA_FAILURES = Counter(
    "aimass_gateway_replica_failures_total",
    "Calls whose replica gave no answer (the connection broke: it crashed, was killed or cut off), by service and "
    "what the caller got: retried (on another replica), reported (UNAVAILABLE, reason REPLICA_CRASHED) or poison "
    "(INTERNAL, reason POISON_REQUEST)",
    ["service", "outcome"],
)
POISON_REFUSALS = Counter(
    "aimass_gateway_poison_refusals_total",
    "Requests refused at the gateway without being sent: the same bytes crashed gateway.poison_max_crashes replicas",
    ["service"],
)
HEDGES = Counter(
    "aimass_gateway_hedges_total",
    "Hedges sent: unary calls of an idempotent method sent once more, to another replica, after the hedge delay",
    ["method"],
)
HEDGES_WON = Counter(
    "aimass_gateway_hedges_won_total", "Hedged calls the hedge (the second attempt) answered first", ["method"]
)
HEDGES_DENIED = Counter(
    "aimass_gateway_hedges_denied_total",
    "Calls past their hedge delay that were not hedged: the method's budget was spent (budget) or no other replica "
    "could take the call (no_other_replica)",
    ["method", "reason"],
)
STALLS = Counter(
    "aimass_gateway_stalled_replicas_total",
    "Replicas left out of routing (until they answer a health check): a call they held passed its hedge delay and "
    "they had answered nothing since it was sent",
    ["service"],
)
# The route span lists the candidates' instance ids up to this many (beyond, only their number).
LISTED_CANDIDATES = 16


def with_tenant(trailers: Metadata) -> Metadata:
    """A replica's trailers plus the tenant the call was served for (the key's, whatever the caller claimed)."""
    return (*trailers, (TENANT_KEY, current_scope().tenant))


async def relay_trailers(context: Context, call: grpc.aio.Call) -> None:
    """Ends the caller's call with the replica's trailers (after its last response), plus the tenant."""
    context.set_trailing_metadata(with_tenant(tuple(await call.trailing_metadata() or ())))


async def relay_error(context: Context, err: grpc.aio.AioRpcError) -> None:
    """Ends the caller's call with the replica's error, plus the tenant (as relay_trailers does)."""
    await relay_replica_error(context, err, with_tenant)


@dataclass(slots=True)
class Attempt:
    """One call's tries: the request's fingerprint once computed, and the replicas tried."""

    method: str
    service: str
    request: bytes | None  # None: a client stream (its requests cannot be fingerprinted nor sent again)
    key: Fingerprint | None = None
    tried: list[Replica] = field(default_factory=list)

    async def fingerprint(self) -> Fingerprint | None:
        if self.key is None and self.request is not None:
            self.key = await fingerprint(self.method, self.request)
        return self.key


@dataclass(slots=True, eq=False)
class Flight:
    """One attempt of a unary call on a replica: its call, CLIENT span and start; ``end`` settles the replica's
    in-flight count and the span once."""

    replica: Replica
    call: grpc.aio.UnaryUnaryCall[bytes, bytes]
    span: Span | None
    started: float
    ended: bool = False

    def end(self, error: grpc.aio.AioRpcError | None) -> None:
        if self.ended:
            return
        self.ended = True
        self.replica.inflight -= 1
        Forwarder._end_call_span(self.span, error)

    def cancel(self) -> None:
        """Stops the attempt (the replica's work too, as the call's cancellation reaches it)."""
        if not self.ended and not self.call.done():
            self.call.cancel()
            if self.span is not None:
                self.span.set_attribute("aimass.attempt.cancelled", True)
        self.end(None)


def refused_as_unmeetable(err: grpc.aio.AioRpcError) -> bool:
    """Whether a replica refused the call because the work queued there would outlast its deadline."""
    info = error_info(err)
    return info is not None and info.reason == UNMEETABLE_REASON


async def settled_within(call: grpc.aio.Call, delay_s: float) -> bool:
    """Whether ``call`` finished within ``delay_s``, without cancelling it (unlike ``asyncio.wait_for``)."""
    return await first_settled((call,), delay_s)


async def first_settled(calls: Sequence[grpc.aio.Call], timeout_s: float | None = None) -> bool:
    """Waits until one of ``calls`` is done (or ``timeout_s`` passed); whether one is."""
    if any(call.done() for call in calls):
        return True
    waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def wake(_: object = None) -> None:
        if not waiter.done():
            waiter.set_result(None)

    for call in calls:
        call.add_done_callback(wake)
    timer = None if timeout_s is None else asyncio.get_running_loop().call_later(timeout_s, wake)
    try:
        await waiter
    finally:
        if timer is not None:
            timer.cancel()
    return any(call.done() for call in calls)


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
        config: GatewayConfig | None = None,
    ) -> None:
        self.replicas = replicas
        self.router = router
        self.router_name = router_name or type(router).__name__
        # A router that weighs prefix affinity gets LLM prompts' prefixes (gateway/prefix_affinity.py).
        self._by_prefix = router if isinstance(router, RoutesByPrefix) else None
        self.retry_unavailable = retry_unavailable
        # Poison containment and crash ejection (the gateway's config; its defaults when none is given).
        config = config or GatewayConfig()
        self.crashes = CrashTable(
            max_crashes=config.poison_max_crashes, ttl_s=config.poison_ttl_s, max_entries=config.poison_max_entries
        )
        self.eject_s = config.crash_eject_s
        self.hedging = HedgingPolicy(config.hedging)
        # Stalled replicas being health-checked until they answer (one task each).
        self._stall_probes: dict[Replica, asyncio.Task[None]] = {}
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

    async def call_unary(self, method: str, request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        """Forwards one unary aimass.v1 call made in this process for another front door's call (the OIP's), with
        that call's ``context``: the same routing, retries, tracing and trailers as a call that came in as
        ``method``; an error ends ``context``'s call with the replica's status (``context.abort`` raises)."""
        handler = self._handlers.get(method)
        if handler is None or handler.unary_unary is None:
            raise ValueError(f"{method} is not a unary method this gateway forwards")
        # The stubs type a handler's context as the sync one; grpc.aio passes (and the forwarder takes) the aio one.
        response: bytes = await handler.unary_unary(request, cast(Any, context))
        return response

    def call_unary_stream(
        self, method: str, request: bytes, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[bytes]:
        """``call_unary`` for a server-streaming method (gateway/composition.py): the replica's responses as they
        come; closing the iterator early cancels the replica's call."""
        handler = self._handlers.get(method)
        if handler is None or handler.unary_stream is None:
            raise ValueError(f"{method} is not a server-streaming method this gateway forwards")
        responses: AsyncIterator[bytes] = cast(Any, handler.unary_stream)(request, context)
        return responses

    def call_stream_stream(
        self, method: str, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[bytes]:
        """``call_unary`` for a bidirectional method: ``requests`` are sent as the replica reads them."""
        handler = self._handlers.get(method)
        if handler is None or handler.stream_stream is None:
            raise ValueError(f"{method} is not a bidirectional method this gateway forwards")
        responses: AsyncIterator[bytes] = cast(Any, handler.stream_stream)(requests, context)
        return responses

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
        if len(candidates) > 1 and self.eject_s:
            # Replicas whose connection just broke are left out while others serve (likely dead: the registry
            # drops them after its TTL).
            now = time.monotonic()
            candidates = [r for r in candidates if not r.down_at(now, self.eject_s)] or candidates
        if len(candidates) > 1 and self.hedging.stalls:
            # Replicas silent past a call's hedge delay (frozen?) are left out too, until they answer a health check.
            now = time.monotonic()
            candidates = [r for r in candidates if not self.hedging.stalls.stalled(r, now)] or candidates
        prefix = prompt_prefix(method, request) if self._by_prefix is not None and candidates else None
        if prefix is not None and self._by_prefix is not None:
            choice: Replica | None = self._by_prefix.choose_by_prefix(service, candidates, prefix)
        else:
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
            return grpc.unary_stream_rpc_method_handler(self._unary_stream(method, service))
        if not kind.server_streaming:
            return grpc.stream_unary_rpc_method_handler(self._stream_unary(method, service))
        return grpc.stream_stream_rpc_method_handler(self._stream_stream(method, service))

    async def _refuse_poison(self, attempt: Attempt, context: Context) -> None:
        """Refuses, unsent, a request whose bytes crashed ``max_crashes`` replicas (INTERNAL, POISON_REQUEST)."""
        request = attempt.request
        if request is None or not self.crashes.may_be_poison(attempt.method, len(request)):
            return
        key = await attempt.fingerprint()
        record = None if key is None else self.crashes.get(key)
        if key is None or record is None or not self.crashes.is_poison(record):
            return
        POISON_REFUSALS.labels(attempt.service).inc()
        ago = time.monotonic() - record.last_s
        log.warning(
            "%s refused unsent: fingerprint %s crashed %s", attempt.method, key.short, ", ".join(record.replicas)
        )
        self._fail(
            context,
            PoisonRequest(
                f"{attempt.method} refused without being sent: this exact request ({key.size} bytes, fingerprint "
                f"{key.short}) crashed {len(record.replicas)} replicas ({', '.join(record.replicas)}), the last "
                f"{ago:.0f} s ago; the gateway refuses it for {self.crashes.expires_in(record):.0f} s more. It likely "
                f"triggers a bug in {attempt.service}: change the request, or report it with this fingerprint",
                metadata=self._poison_facts(key, record),
            ),
        )

    def _poison_facts(self, key: Fingerprint, record: CrashRecord) -> dict[str, str]:
        return {
            "fingerprint": key.short,
            "replicas": ",".join(record.replicas),
            "retry_after_s": f"{self.crashes.expires_in(record):.0f}",
        }

    @staticmethod
    def _fail(context: Context, error: AimassError) -> NoReturn:
        """Ends the call with ``error`` (the error interceptor maps it), the tenant trailer included."""
        context.set_trailing_metadata(with_tenant(()))
        raise error

    async def _answered(self, attempt: Attempt, replica: Replica) -> None:
        """The replica answered the request itself (any status): it is up, and the request did not crash it."""
        replica.answered()
        self.hedging.stalls.answered(replica, time.monotonic())
        request = attempt.request
        if request is not None and self.crashes.may_hold(attempt.method, len(request)):
            key = await attempt.fingerprint()
            if key is not None:
                self.crashes.forget(key)

    async def _after_failure(
        self,
        attempt: Attempt,
        err: grpc.aio.AioRpcError,
        started: float,
        context: Context,
        *,
        responses: int = 0,
        target: Replica | None = None,
        pending: bool = False,
    ) -> Replica | None:
        """After a try on ``target`` (the last one tried unless given) failed with ``err``: the replica to try next,
        None when another attempt of the call still runs (``pending``, a hedge) and takes over, or the caller's
        answer (this raises).

        The replica's own UNAVAILABLE (draining, without the model), and its refusal of a deadline its backlog would
        outlast (RESOURCE_EXHAUSTED, DEADLINE_UNMEETABLE), are retried once elsewhere; any other answer of
        its own is relayed unchanged. No answer at all (the connection broke) is a crash, counted against the
        request unless the replica was already known down when the call began; poison after ``max_crashes``.
        While another attempt runs, it is the retry (and a full replica's RESOURCE_EXHAUSTED waits for it too)."""
        target = attempt.tried[-1] if target is None else target
        if not crashed_under(err):
            if answered_by_replica(err):
                await self._answered(attempt, target)
            if pending and err.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED):
                log.info(
                    "%s: %s on %s; the other attempt goes on", attempt.method, err.code().name, target.instance.address
                )
                return None
            # A replica whose backlog would outlast the deadline refused it on arrival (aimass.runtime.batcher's
            # deadline admission): another replica's may not.
            unmeetable = err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and refused_as_unmeetable(err)
            unavailable = (err.code() == grpc.StatusCode.UNAVAILABLE or unmeetable) and responses == 0
            retry = self._retry(attempt, crashed=False) if unavailable else None
            if retry is None:
                await relay_error(context, err)
                raise AssertionError("unreachable") from err
            log.info(
                "%s unavailable on %s; retrying on %s", attempt.method, target.instance.address, retry.instance.address
            )
            RETRIES.labels(attempt.service, err.code().name).inc()
            return retry
        now = time.monotonic()
        bystander = target.down_at(started, self.eject_s)
        if target.mark_down(now, self.eject_s):
            log.warning(
                "replica %s at %s gave no answer (%s): left out of routing for %.0f s while others serve",
                target.instance.instance_id,
                target.instance.address,
                err.details(),
                self.eject_s,
            )
        record: CrashRecord | None = None
        key = None if bystander else await attempt.fingerprint()
        if key is not None:
            record = self.crashes.record(key, target.instance.instance_id, target.instance.address)
            if self.crashes.is_poison(record):
                REPLICA_FAILURES.labels(attempt.service, "poison").inc()
                log.error(
                    "%s: fingerprint %s crashed %d replicas (%s); refusing it for %.0f s",
                    attempt.method,
                    key.short,
                    len(record.replicas),
                    ", ".join(record.replicas),
                    self.crashes.ttl_s,
                )
                self._fail(
                    context,
                    PoisonRequest(
                        f"{attempt.method} failed: replicas {', '.join(record.replicas)} each crashed while serving "
                        f"this exact request ({key.size} bytes, fingerprint {key.short}), so it is not sent again; "
                        f"the gateway refuses it for the next {self.crashes.ttl_s:.0f} s. It likely triggers a bug in "
                        f"{attempt.service}: change the request, or report it with this fingerprint",
                        metadata=self._poison_facts(key, record),
                    ),
                )
        # A request with no crash before this one may have been a bystander of a kill: it is run again elsewhere.
        first_crash = record is None or len(record.replicas) == 1
        if pending and first_crash:
            REPLICA_FAILURES.labels(attempt.service, "retried").inc()
            log.info(
                "%s: replica %s gave no answer (%s); the other attempt goes on",
                attempt.method,
                target.instance.instance_id,
                err.details(),
            )
            return None
        retry = self._retry(attempt, crashed=True) if responses == 0 and first_crash else None
        if retry is not None:
            REPLICA_FAILURES.labels(attempt.service, "retried").inc()
            RETRIES.labels(attempt.service, err.code().name).inc()
            log.info(
                "%s unavailable on %s; retrying on %s (replica %s gave no answer: %s)",
                attempt.method,
                target.instance.address,
                retry.instance.address,
                target.instance.instance_id,
                err.details(),
            )
            return retry
        REPLICA_FAILURES.labels(attempt.service, "reported").inc()
        why = self._why_not_retried(attempt, responses, record)
        log.warning(
            "%s: replica %s gave no answer (%s); %s", attempt.method, target.instance.instance_id, err.details(), why
        )
        self._fail(
            context,
            ReplicaCrashed(
                f"replica {target.instance.instance_id} at {target.instance.address} stopped answering while serving "
                f"{attempt.method} (the connection broke: {err.details()}); {why}",
                metadata={"replica": target.instance.instance_id},
            ),
        )

    async def _next_replica(
        self, attempt: Attempt, err: grpc.aio.AioRpcError, started: float, context: Context
    ) -> Replica:
        """``_after_failure`` of a call with no other attempt running: the replica to try next (or it raises)."""
        retry = await self._after_failure(attempt, err, started, context)
        if retry is None:
            raise AssertionError("unreachable: no other attempt runs")
        return retry

    def _retry(self, attempt: Attempt, *, crashed: bool) -> Replica | None:
        """A replica for a request's second and last try, or None. After a crash, never the same one."""
        if len(attempt.tried) > 1 or attempt.request is None or not self.retry_unavailable:
            return None
        target = attempt.tried[-1]
        retry = self._pick(attempt.service, target, method=attempt.method, request=attempt.request)
        if retry is None or (crashed and retry is target):
            return None
        return retry

    def _why_not_retried(self, attempt: Attempt, responses: int, record: CrashRecord | None) -> str:
        if attempt.request is None:
            return "a client stream is not sent again (its requests were consumed): start it again"
        if responses:
            return (
                f"{responses} response(s) of the stream had reached you, and a stream is not sent again once data "
                "flowed: start it again"
            )
        if record is not None and len(record.replicas) > 1:
            others = [iid for iid in record.replicas if iid != attempt.tried[-1].instance.instance_id]
            return f"this exact request had crashed {', '.join(others)} before, so it is not sent again"
        if len(attempt.tried) > 1:
            return f"it had been tried on {attempt.tried[0].instance.instance_id} first; retry later"
        if not self.retry_unavailable:
            return "retries are off (gateway.retry_unavailable): retry it"
        return f"no other replica of {attempt.service} could take it: retry when one is up"

    def _try(self, attempt: Attempt, replica: Replica, metadata: Metadata) -> tuple[Span | None, Metadata]:
        attempt.tried.append(replica)
        return self._call_span(attempt.method, replica, len(attempt.tried), metadata)

    def _send(self, attempt: Attempt, target: Replica, request: bytes, metadata: Metadata, context: Context) -> Flight:
        span, call_metadata = self._try(attempt, target, metadata)
        started = time.monotonic()
        call = target.unary_unary(attempt.method)(request, timeout=time_remaining(context), metadata=call_metadata)
        target.inflight += 1
        return Flight(target, call, span, started)

    def _check_silent(self, attempt: Attempt, flight: Flight) -> None:
        """The first attempt is past its hedge delay: a replica that answered nothing since it was sent is asked a
        health check (``_until_answers``), unless one is under way."""
        replica = flight.replica
        if (
            replica not in self._stall_probes
            and len(self.replicas.healthy(attempt.service)) > 1
            and self.hedging.stalls.silent_since(replica, flight.started, time.monotonic())
        ):
            task = asyncio.get_running_loop().create_task(
                self._until_answers(replica, attempt, flight.started), name="stall-probe"
            )
            self._stall_probes[replica] = task
            task.add_done_callback(lambda _: self._stall_probes.pop(replica, None))

    async def _until_answers(self, replica: Replica, attempt: Attempt, sent_at: float) -> None:
        """Health-checks a silent replica: one that does not answer SERVING within ``stall_probe_s`` is left out of
        routing while others serve, and asked again every ``stall_probe_s`` until it answers (routed to again) or
        ``stall_eject_s`` is over."""
        stub = health_pb2_grpc.HealthStub(replica.channel)
        every_s = self.hedging.config.stall_probe_s
        stalls = self.hedging.stalls
        first = True
        while True:
            asked = time.monotonic()
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=every_s)
            except grpc.aio.AioRpcError:
                reply = None
            now = time.monotonic()
            if reply is not None and reply.status == health_pb2.HealthCheckResponse.SERVING:
                if stalls.stalled(replica, now):
                    log.info("replica %s answers again: routed to", replica.instance.instance_id)
                stalls.answered(replica, now)
                return
            if first:
                first = False
                stalls.exclude(replica, now)
                STALLS.labels(attempt.service).inc()
                log.warning(
                    "replica %s at %s answered nothing for %.0f ms (holding %s) nor a health check: left out of "
                    "routing while others serve, until it answers one",
                    replica.instance.instance_id,
                    replica.instance.address,
                    (now - sent_at) * 1000,
                    attempt.method,
                )
            elif not stalls.stalled(replica, now):
                return  # stall_eject_s is over (or the replica left the view)
            await asyncio.sleep(max(0.0, asked + every_s - time.monotonic()))

    def _unary_unary(self, method: str, service: str) -> Callable[[bytes, Context], Any]:
        hedging = self.hedging.for_method(method)

        async def forward(request: bytes, context: Context) -> bytes:
            attempt = Attempt(method, service, request)
            await self._refuse_poison(attempt, context)
            replica = self._pick(service, method=method, request=request)
            if replica is None:
                await self._no_replica(context, service)
                raise AssertionError("unreachable")
            metadata = forwarded_metadata(context)
            while True:
                flight = self._send(attempt, replica, request, metadata, context)
                try:
                    if hedging is not None and len(attempt.tried) == 1:
                        delay = hedging.should_wait(time_remaining(context))
                        checks = 0
                        while delay is not None and not await settled_within(flight.call, delay):
                            self._check_silent(attempt, flight)
                            hedge = self._hedge_target(attempt, hedging, count_denial=checks == 0)
                            if hedge is not None:
                                return await self._race(attempt, hedging, flight, hedge, delay, metadata, context)
                            # Not now (budget, no other replica): looked at again after another delay.
                            checks += 1
                            remaining = time_remaining(context)
                            if remaining is not None and remaining <= delay:
                                break
                    response: bytes = await flight.call
                except grpc.aio.AioRpcError as err:
                    flight.end(err)
                    # UNAVAILABLE: the replica is down, draining, cut off or without the model. It may have started
                    # the call before dying, but inference has no side effects, so running it again is safe.
                    replica = await self._next_replica(attempt, err, flight.started, context)
                    continue
                finally:
                    # Also when the caller went away while the hedge delay ran: the replica's work stops too.
                    flight.cancel()
                if hedging is not None:
                    hedging.latencies.observe(time.monotonic() - flight.started)
                await self._answered(attempt, flight.replica)
                await relay_trailers(context, flight.call)
                return response

        return forward

    def _hedge_target(self, attempt: Attempt, hedging: MethodHedging, *, count_denial: bool = True) -> Replica | None:
        """The replica for a hedge of a call whose first attempt is past its delay, its budget token taken; None
        when the budget is spent or no other replica (not left out) could take the call."""
        first = attempt.tried[0]
        if not hedging.budget.available():
            if count_denial:
                HEDGES_DENIED.labels(attempt.method, "budget").inc()
            return None
        target = None
        if len(self.replicas.healthy(attempt.service)) > 1:
            target = self._pick(attempt.service, first, method=attempt.method, request=attempt.request or b"")
        if target is None or target is first or self.hedging.stalls.stalled(target, time.monotonic()):
            if count_denial:
                HEDGES_DENIED.labels(attempt.method, "no_other_replica").inc()
            return None
        hedging.budget.take()
        return target

    async def _race(
        self,
        attempt: Attempt,
        hedging: MethodHedging,
        first: Flight,
        target: Replica,
        delay_s: float,
        metadata: Metadata,
        context: Context,
    ) -> bytes:
        """The call's first attempt ran past its hedge delay: the same request goes to ``target`` too, and the
        first success is the answer (the other attempt is cancelled at once)."""
        assert attempt.request is not None
        HEDGES.labels(attempt.method).inc()
        second = self._send(attempt, target, attempt.request, metadata, context)
        if second.span is not None:
            second.span.set_attributes({"aimass.hedge": True, "aimass.hedge.delay_ms": delay_s * 1000})
        log.debug(
            "%s: no answer from %s after %.0f ms; hedged on %s",
            attempt.method,
            first.replica.instance.address,
            delay_s * 1000,
            target.instance.address,
        )
        running = [first, second]
        try:
            while running:
                await first_settled([flight.call for flight in running])
                for flight in [f for f in running if f.call.done()]:
                    running.remove(flight)
                    try:
                        response: bytes = await flight.call
                    except grpc.aio.AioRpcError as err:
                        flight.end(err)
                        # Raises (relays the answer, or fails) unless the other attempt goes on.
                        await self._after_failure(
                            attempt, err, flight.started, context, target=flight.replica, pending=bool(running)
                        )
                        continue
                    flight.end(None)
                    now = time.monotonic()
                    hedging.latencies.observe(now - flight.started)
                    for loser in running:
                        # A lower bound of the loser's latency: the slow tail stays in the estimate.
                        hedging.latencies.observe(now - loser.started)
                        loser.cancel()
                    running.clear()
                    if flight is second:
                        HEDGES_WON.labels(attempt.method).inc()
                    await self._answered(attempt, flight.replica)
                    await relay_trailers(context, flight.call)
                    return response
            raise AssertionError("unreachable: the last failed attempt's answer was relayed")
        finally:
            for flight in running:
                flight.cancel()

    def _stream_unary(self, method: str, service: str) -> Callable[[AsyncIterator[bytes], Context], Any]:
        async def forward(requests: AsyncIterator[bytes], context: Context) -> bytes:
            attempt = Attempt(method, service, None)
            replica = self._pick(service)
            if replica is None:
                await self._no_replica(context, service)
                raise AssertionError("unreachable")
            span, metadata = self._try(attempt, replica, forwarded_metadata(context))
            started = time.monotonic()
            call = replica.stream_unary(method)(requests, timeout=time_remaining(context), metadata=metadata)
            replica.inflight += 1
            error: grpc.aio.AioRpcError | None = None
            try:
                response: bytes = await call
            except grpc.aio.AioRpcError as err:
                error = err
                await self._after_failure(attempt, err, started, context)
                raise AssertionError("unreachable") from err
            finally:
                replica.inflight -= 1
                call.cancel()
                self._end_call_span(span, error)
            replica.answered()
            await relay_trailers(context, call)
            return response

        return forward

    def _unary_stream(self, method: str, service: str) -> Callable[[bytes, Context], AsyncIterator[bytes]]:
        async def forward(request: bytes, context: Context) -> AsyncIterator[bytes]:
            attempt = Attempt(method, service, request)
            await self._refuse_poison(attempt, context)
            replica = self._pick(service, method=method, request=request)
            if replica is None:
                await self._no_replica(context, service)
                return
            metadata = forwarded_metadata(context)
            while True:
                target = replica
                span, call_metadata = self._try(attempt, target, metadata)
                started = time.monotonic()
                call = target.unary_stream(method)(request, timeout=time_remaining(context), metadata=call_metadata)
                target.inflight += 1
                error: grpc.aio.AioRpcError | None = None
                responses = 0
                try:
                    try:
                        message = await call.read()
                    except grpc.aio.AioRpcError as err:
                        # Nothing reached the caller yet: the stream may go to another replica, as a unary call.
                        error = err
                        replica = await self._next_replica(attempt, err, started, context)
                        continue
                    initial = await call.initial_metadata()
                    if initial:
                        await context.send_initial_metadata(initial)
                    # Raw bytes until grpc.aio.EOF (no deserialiser: the replica's messages pass through as written).
                    while isinstance(message, bytes):
                        yield message
                        responses += 1
                        message = await call.read()
                    await self._answered(attempt, target)
                    await relay_trailers(context, call)
                    return
                except grpc.aio.AioRpcError as err:
                    error = err
                    await self._after_failure(attempt, err, started, context, responses=responses)
                finally:
                    target.inflight -= 1
                    # The client went away or the deadline passed: stop the replica's work too.
                    call.cancel()
                    self._end_call_span(span, error)

        return forward

    def _stream_stream(self, method: str, service: str) -> Callable[[AsyncIterator[bytes], Context], Any]:
        async def forward(requests: AsyncIterator[bytes], context: Context) -> AsyncIterator[bytes]:
            attempt = Attempt(method, service, None)
            replica = self._pick(service)
            if replica is None:
                await self._no_replica(context, service)
                return
            span, metadata = self._try(attempt, replica, forwarded_metadata(context))
            started = time.monotonic()
            call = replica.stream_stream(method)(requests, timeout=time_remaining(context), metadata=metadata)
            replica.inflight += 1
            error: grpc.aio.AioRpcError | None = None
            try:
                initial = await call.initial_metadata()
                if initial:
                    await context.send_initial_metadata(initial)
                async for response in call:
                    yield response
                replica.answered()
                await relay_trailers(context, call)
            except grpc.aio.AioRpcError as err:
                error = err
                # Never sent again (the requests were consumed); a crash is reported naming the replica.
                await self._after_failure(attempt, err, started, context)
            finally:
                replica.inflight -= 1
                # The client went away or the deadline passed: stop the replica's work too.
                call.cancel()
                self._end_call_span(span, error)

        return forward


def _models_differ(replicas: Sequence[Replica]) -> bool:
    first = replicas[0].instance.models
    return any(replica.instance.models != first for replica in replicas[1:])
