"""Server interceptors: admission control, error mapping, access log and metrics, kept out of the handlers.

Each interceptor is one async context manager, ``around(method, context)``, that every call of any kind (unary or
streaming) runs inside (see ``wrap_handler``). Handlers only validate, call their engine and return; what the
client sees on failure is decided here.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import grpc
from google.protobuf import descriptor_pool
from prometheus_client import Counter, Gauge, Histogram

from aimass.runtime.config import DeadlineConfig
from aimass.runtime.errors import AimassError, DeadlineExceeded, InvalidArgument, ResourceExhausted
from aimass.runtime.metadata import (
    ERROR_INFO_KEY,
    REPLICA_KEY,
    REQUEST_ID_KEY,
    new_request_id,
    request_id_of,
)
from aimass.runtime.scope import RequestScope, current_scope, deadline_of, entered, held_deadline, held_to, loop_time
from aimass.v1 import common_pb2

access_log = logging.getLogger("aimass.access")
log = logging.getLogger(__name__)

REQUESTS = Counter("aimass_requests_total", "RPCs finished, by method and status code", ["method", "code"])
LATENCY = Histogram(
    "aimass_request_duration_seconds",
    "RPC wall time from arrival to the last response byte",
    ["method"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
# Summed over live processes where several share one endpoint (gateway workers, prometheus multiprocess mode).
INFLIGHT = Gauge("aimass_inflight_requests", "RPCs admitted and not yet finished", multiprocess_mode="livesum")
REJECTED = Counter(
    "aimass_admission_rejected_total",
    "RPCs refused at admission: the server was full (SERVER_FULL) or the caller held its share (TENANT_INFLIGHT_LIMIT)",
    ["reason"],
)

# Health and reflection must answer even when the server is saturated or draining.
UNMETERED_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")
# Registry heartbeats and polls, and the reports every process sends the scheduler each interval, are counted in
# metrics but would drown the access log (several lines a second from an idle mesh).
UNLOGGED_PREFIXES = (
    "/aimass.v1.RegistryService/",
    "/aimass.v1.SchedulerService/ReportLoad",
    "/aimass.v1.SchedulerService/ReportNode",
    # The scheduler re-syncs every replica's custom models every few seconds (a no-op when nothing changed).
    "/aimass.v1.ModelHostService/SyncCustomModels",
)

# Bounds the per-interceptor handler cache: unknown method names (which clients choose) must not grow it forever.
MAX_CACHED_METHODS = 1024
# Bounds the per-tenant counts a replica keeps between load reports (none are taken without a scheduler): past it,
# further tenants are counted together as OTHER_TENANTS.
MAX_TENANT_COUNTS = 10_000
OTHER_TENANTS = "(other tenants)"

if TYPE_CHECKING:
    Handler = grpc.RpcMethodHandler[Any, Any]
else:  # the stubs make it generic; the runtime class is not subscriptable
    Handler = grpc.RpcMethodHandler
Context = grpc.aio.ServicerContext[Any, Any]
Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]]
Behavior = Callable[..., Any]
Around = Callable[[str, Context], contextlib.AbstractAsyncContextManager[None]]


def wrap_handler(
    handler: Handler, method: str, around: Around, *, parse_requests: bool = False, bounded: bool = False
) -> Handler:
    """Return ``handler`` with its behaviour run inside ``around(method, context)``.

    With ``parse_requests`` the handler receives raw bytes and deserialises them inside ``around``, so a
    malformed message becomes a clear INVALID_ARGUMENT instead of grpc's generic deserialisation failure.
    With ``bounded`` the behaviour is cancelled at the deadline ``around`` holds the call to (``held_deadline``):
    ``around`` sees a TimeoutError.
    """
    deserialize = handler.request_deserializer
    parse: Callable[[Any], Any] = _parser(deserialize) if parse_requests and deserialize else (lambda raw: raw)
    client_streaming = bool(handler.stream_unary or handler.stream_stream)

    def arguments(request: Any) -> Any:
        return _parsed_stream(request, parse) if client_streaming else parse(request)

    # The innermost wrapper (the one that parses) reads what is left of a client stream before a failure goes out.
    drains = parse_requests and client_streaming

    def unary_response(behavior: Behavior) -> Behavior:
        async def run(request: Any, context: Context) -> Any:
            started = False
            try:
                async with around(method, context):
                    started = True
                    try:
                        if not bounded:
                            return await behavior(arguments(request), context)
                        async with asyncio.timeout_at(held_deadline()):
                            return await behavior(arguments(request), context)
                    except Exception:
                        if drains:
                            await _drain(request)
                        raise
            except Exception as exc:
                if not started:
                    await _refused(method, context, exc, request if client_streaming else None)
                raise

        return run

    def stream_response(behavior: Behavior) -> Behavior:
        # Must itself be an async generator function: grpc.aio inspects it to pick how to read the responses.
        async def run(request: Any, context: Context) -> AsyncIterator[Any]:
            started = False
            try:
                async with around(method, context):
                    started = True
                    try:
                        responses = _stream_of(behavior(arguments(request), context))
                        if bounded:
                            responses = _until(responses, held_deadline())
                        async for item in responses:
                            yield item
                    except Exception:
                        if drains:
                            await _drain(request)
                        raise
            except Exception as exc:
                if not started:
                    await _refused(method, context, exc, request if client_streaming else None)
                raise

        return run

    request_deserializer = None if parse_requests else deserialize
    serializer = handler.response_serializer
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(
            unary_response(handler.unary_unary), request_deserializer, serializer
        )
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(
            unary_response(handler.stream_unary), request_deserializer, serializer
        )
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(
            stream_response(handler.unary_stream), request_deserializer, serializer
        )
    assert handler.stream_stream is not None
    return grpc.stream_stream_rpc_method_handler(
        stream_response(handler.stream_stream), request_deserializer, serializer
    )


def _parser(deserialize: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    message_class = getattr(deserialize, "__self__", None)
    type_name = getattr(getattr(message_class, "DESCRIPTOR", None), "full_name", "the method's request type")

    def parse(raw: bytes) -> Any:
        try:
            return deserialize(raw)
        except Exception as exc:  # protobuf raises DecodeError, or others on invalid UTF-8
            raise InvalidArgument(
                f"request bytes are not a valid {type_name} ({len(raw)} bytes): {exc}", reason="MALFORMED_REQUEST"
            ) from exc

    return parse


async def _parsed_stream(requests: AsyncIterator[bytes], parse: Callable[[bytes], Any]) -> AsyncIterator[Any]:
    async for raw in requests:
        yield parse(raw)


# A call refused mid-stream reads at most this much more of its caller's stream before its status goes out.
DRAIN_S = 0.25
DRAIN_MESSAGES = 256


async def _drain(requests: AsyncIterator[Any]) -> None:
    """Reads (and drops) what the caller is still sending, briefly, before an error status goes out.

    A server that answers a client stream before the caller has half-closed races the caller's next write, and
    grpc.aio clients (the gateway's calls to replicas among them) then report INTERNAL "Internal error from Core"
    instead of the status that was sent (grpc/grpc#36066). Callers that send a few messages and half-close (the
    common case) get the real status; a caller still streaming past the bound takes its chances as before.
    """
    with contextlib.suppress(Exception):  # the bound passed, or the caller's stream failed: answer now
        async with asyncio.timeout(DRAIN_S):
            for _ in range(DRAIN_MESSAGES):
                if await anext(aiter(requests), None) is None:
                    return


async def _refused(method: str, context: Context, exc: Exception, requests: AsyncIterator[Any] | None) -> None:
    """A call an interceptor refused before its handler ran (a key without the scope, a full server): what is left
    of a client stream is read first (see ``_drain``; after an abort it could no longer be), then an AimassError
    goes out as its status."""
    if requests is not None:
        await _drain(requests)
    if isinstance(exc, AimassError):
        await abort_with(context, method, exc)


async def _until(items: AsyncIterator[Any], deadline: float | None) -> AsyncIterator[Any]:
    """``items``, each awaited under ``deadline`` (TimeoutError past it). The timeout covers only the wait for the
    next item, never the ``yield``: grpc writes the item in between, and a cancellation must not land there."""
    iterator = aiter(items)
    while True:
        async with asyncio.timeout_at(deadline):
            try:
                item = await anext(iterator)
            except StopAsyncIteration:
                return
        yield item


async def _stream_of(behavior_result: Any) -> AsyncIterator[Any]:
    # aio streaming handlers are async generators, or coroutines that write through context.write().
    if hasattr(behavior_result, "__aiter__"):
        async for item in behavior_result:
            yield item
    else:
        await behavior_result


UNKNOWN_METHOD = "(unknown method)"
# Methods served under names protobuf's default pool does not hold (the OIP's /inference.GRPCInferenceService/*,
# gateway/oip): added by whoever serves them, before the server starts.
SERVED_ELSEWHERE: set[str] = set()


@functools.lru_cache(maxsize=4096)
def metric_method(method: str) -> str:
    """``method`` as a metric label when it names a method of a service this process knows (its generated code
    is imported), else UNKNOWN_METHOD: callers choose method names, and a series each would grow /metrics forever."""
    if method in SERVED_ELSEWHERE:
        return method
    service, _, name = method.lstrip("/").rpartition("/")
    try:
        descriptor_pool.Default().FindServiceByName(service).methods_by_name[name]
    except KeyError:
        return UNKNOWN_METHOD
    return method


_Rule = TypeVar("_Rule")


def rule_for(rules: Mapping[str, _Rule], method: str) -> _Rule | None:
    """A method's entry in a table keyed by method ("/aimass.v1.X/Y") or whole service ("/aimass.v1.X/"): its own,
    else its service's, else None."""
    found = rules.get(method)
    if found is None:
        found = rules.get(method[: method.rfind("/") + 1])
    return found


class AroundInterceptor(grpc.aio.ServerInterceptor):
    """Runs every call except health and reflection inside ``self.around(method, context)``."""

    parse_requests = False
    # Whether the handler is cancelled at the deadline this interceptor holds the call to (see wrap_handler).
    bounds_deadline = False

    def __init__(self) -> None:
        # gRPC asks the interceptors for every call; services hand out the same handler object per method each
        # time, so its wrapped twin is built once and reused (building it per call costs as much as the call).
        self._wrapped: dict[str, tuple[Handler, Handler]] = {}

    def around(self, method: str, context: Context) -> contextlib.AbstractAsyncContextManager[None]:
        raise NotImplementedError

    def wrap(self, handler: Handler, method: str) -> Handler:
        """``handler`` run inside ``around``; interceptors that treat streams apart bind the call kind here."""
        return wrap_handler(
            handler, method, self.around, parse_requests=self.parse_requests, bounded=self.bounds_deadline
        )

    async def intercept_service(self, continuation: Continuation, details: grpc.HandlerCallDetails) -> Handler | None:
        handler = await continuation(details)
        method = details.method
        if handler is None or method.startswith(UNMETERED_PREFIXES):
            return handler
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self.wrap(handler, method)
        if len(self._wrapped) < MAX_CACHED_METHODS:
            self._wrapped[method] = (handler, wrapped)
        return wrapped


class ErrorMappingInterceptor(AroundInterceptor):
    """AimassError → its status and message (+ ErrorInfo trailer); anything unexpected → INTERNAL, logged.

    It also parses request bytes, so a malformed message is an INVALID_ARGUMENT like any other bad input.
    """

    parse_requests = True

    @contextlib.asynccontextmanager
    async def around(self, method: str, context: Context) -> AsyncIterator[None]:
        try:
            yield
        except (grpc.aio.AbortError, asyncio.CancelledError, GeneratorExit):
            raise
        except Exception as exc:  # every failure must reach the client as a status
            await abort_with(context, method, exc)


async def abort_with(context: Context, method: str, exc: Exception) -> NoReturn:
    if isinstance(exc, AimassError):
        info = common_pb2.ErrorInfo(reason=exc.reason, metadata=exc.metadata)
        trailers: list[tuple[str, str | bytes]] = [(ERROR_INFO_KEY, info.SerializeToString())]
        if exc.pushback_ms is not None:
            # gRPC's standard pushback header: clients with retry policies wait this long (negative: no retry).
            trailers.append(("grpc-retry-pushback-ms", str(exc.pushback_ms)))
        # Keep trailers already set (e.g. x-request-id) next to the error's own.
        await context.abort(exc.code, exc.message, trailing_metadata=(*(context.trailing_metadata() or ()), *trailers))
    log.exception("unexpected error in %s", method, exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method}: {type(exc).__name__}; see server log")


@dataclass
class SlotPool:
    """Slots of one kind of call (unary calls, or streams): at most ``limit`` held at once, and at most
    ``per_holder`` by any one holder (a tenant, or a connection)."""

    kind: str
    limit: int
    per_holder: int
    held: int = 0
    by_holder: collections.Counter[str] = field(default_factory=collections.Counter)

    def refusal(self, holder: str, method: str) -> ResourceExhausted | None:
        """Why a call of ``holder`` may not take a slot now, or None when it may."""
        # A holder at its share (when that is less than the whole pool) is told so first, whatever else is in
        # flight: waiting on its own calls is what frees a slot for it, and the reason does not depend on which
        # tenant's calls happened to arrive first.
        if self.by_holder[holder] >= self.per_holder and self.per_holder < self.limit:
            return self._share_refusal(holder, method)
        if self.held >= self.limit:
            return ResourceExhausted(
                f"server is at capacity ({self.held} {self.kind} in flight, limit {self.limit}); "
                f"{method} was not started, retry later",
                reason="SERVER_FULL",
                metadata={"limit": str(self.limit)},
            )
        if self.by_holder[holder] >= self.per_holder:
            return self._share_refusal(holder, method)
        return None

    def _share_refusal(self, holder: str, method: str) -> ResourceExhausted:
        who = f"tenant {holder.removeprefix('tenant:')!r}" if holder.startswith("tenant:") else "this connection"
        return ResourceExhausted(
            f"{who} already has {self.by_holder[holder]} {self.kind} in flight on this server, its fair share of "
            f"the {self.limit} there are; {method} was not started: retry when some of them have finished",
            reason="TENANT_INFLIGHT_LIMIT",
            metadata={"limit": str(self.per_holder)},
        )

    def take(self, holder: str) -> None:
        self.held += 1
        self.by_holder[holder] += 1

    def give_back(self, holder: str) -> None:
        self.held -= 1
        self.by_holder[holder] -= 1
        if not self.by_holder[holder]:
            del self.by_holder[holder]  # bounded by the calls in flight, not by every holder ever seen


def per_holder_limit(limit: int, share: float) -> int:
    return max(1, int(limit * share))


class AdmissionInterceptor(AroundInterceptor):
    """Bounded, fair admission: at most ``max_inflight`` unary calls and ``max_streams`` streaming calls at once,
    each holder (a tenant, or a connection where no tenant is vouched for) at most ``tenant_share`` of either;
    beyond that RESOURCE_EXHAUSTED at once, before any work starts.

    Streams live long (an LLM generation, a live transcription), so they have their own pool: a flood of idle
    streams cannot take the slots unary calls need, and the other way round. Queues deeper in the stack
    (batchers) have their own bounds; this one protects the process as a whole.
    """

    def __init__(
        self,
        max_inflight: int,
        *,
        max_streams: int | None = None,
        tenant_share: float = 1.0,
        trust_tenant: bool = True,
    ) -> None:
        super().__init__()
        self.max_inflight = max_inflight
        self.unary = SlotPool("requests", max_inflight, per_holder_limit(max_inflight, tenant_share))
        streams = max_streams or max_inflight
        self.streams = SlotPool("streams", streams, per_holder_limit(streams, tenant_share))
        # Replicas trust the tenant in the gateway's metadata (only mesh peers reach them); a gateway trusts only a
        # tenant it verified from an API key: with auth off a caller names its own tenant, so it counts per
        # connection instead.
        self.trust_tenant = trust_tenant
        # RPCs finished (any status) and when the last did: load reports turn these into rates and recency.
        self.completed = 0
        self.last_completed_unix_ms = 0
        # The same per method ("/aimass.v1.NlpService/Embed"), so load reports can say which model is busy.
        self.inflight_by_method: collections.Counter[str] = collections.Counter()
        self.completed_by_method: collections.Counter[str] = collections.Counter()
        self.last_completed_unix_ms_by_method: dict[str, int] = {}
        # (method, tenant) → RPCs finished since a load report last took them: the scheduler accounts each tenant's
        # work (taken every report, so it stays as small as the tenants of one report window).
        self._completed_by_method_tenant: collections.Counter[tuple[str, str]] = collections.Counter()

    @property
    def inflight(self) -> int:
        """Calls admitted and not yet finished, unary and streaming."""
        return self.unary.held + self.streams.held

    def take_completed_by_method_tenant(self) -> collections.Counter[tuple[str, str]]:
        """RPCs finished per (method, tenant) since the previous call."""
        taken, self._completed_by_method_tenant = self._completed_by_method_tenant, collections.Counter()
        return taken

    def wrap(self, handler: Handler, method: str) -> Handler:
        pool = self.unary if handler.unary_unary else self.streams
        return wrap_handler(handler, method, functools.partial(self._admitted, pool=pool))

    def around(self, method: str, context: Context) -> contextlib.AbstractAsyncContextManager[None]:
        return self._admitted(method, context, pool=self.unary)

    def _holder(self, context: Context) -> str:
        scope = current_scope()
        if scope.tenant and (self.trust_tenant or scope.key_id):
            return f"tenant:{scope.tenant}"
        return f"peer:{context.peer()}"

    @contextlib.asynccontextmanager
    async def _admitted(self, method: str, context: Context, *, pool: SlotPool) -> AsyncIterator[None]:
        holder = self._holder(context)
        refusal = pool.refusal(holder, method)
        if refusal is not None:
            REJECTED.labels(refusal.reason).inc()
            raise refusal  # wrap_handler answers it, after reading what is left of a client stream
        pool.take(holder)
        self.inflight_by_method[method] += 1
        INFLIGHT.inc()
        try:
            yield
        finally:
            pool.give_back(holder)
            self.inflight_by_method[method] -= 1
            self.completed += 1
            self.completed_by_method[method] += 1
            key = (method, current_scope().tenant)
            if (
                key not in self._completed_by_method_tenant
                and len(self._completed_by_method_tenant) >= MAX_TENANT_COUNTS
            ):
                key = (method, OTHER_TENANTS)
            self._completed_by_method_tenant[key] += 1
            self.last_completed_unix_ms = self.last_completed_unix_ms_by_method[method] = int(time.time() * 1000)
            INFLIGHT.dec()


class DeadlineInterceptor(AroundInterceptor):
    """Every call runs under a deadline: the caller's, cut to its method's maximum, or the method's default when the
    caller set none (``ServerConfig.unary_deadline`` / ``stream_deadline`` / ``method_deadlines``). Past it the
    handler is cancelled and the caller gets DEADLINE_EXCEEDED; batchers and forwarded calls see the same deadline
    (``scope.deadline_of``)."""

    bounds_deadline = True

    def __init__(
        self,
        unary: DeadlineConfig,
        stream: DeadlineConfig,
        by_method: Mapping[str, DeadlineConfig] | None = None,
    ) -> None:
        super().__init__()
        self.unary_rule = unary
        self.stream_rule = stream
        self.by_method = dict(by_method or {})

    def wrap(self, handler: Handler, method: str) -> Handler:
        rule = rule_for(self.by_method, method) or (self.unary_rule if handler.unary_unary else self.stream_rule)
        return wrap_handler(handler, method, functools.partial(self._held, rule=rule), bounded=True)

    def around(self, method: str, context: Context) -> contextlib.AbstractAsyncContextManager[None]:
        return self._held(method, context, rule=rule_for(self.by_method, method) or self.unary_rule)

    @contextlib.asynccontextmanager
    async def _held(self, method: str, context: Context, *, rule: DeadlineConfig) -> AsyncIterator[None]:
        now = loop_time()
        asked = context.time_remaining()
        if asked is None:
            allowed = rule.default_s or None
            source = f"the server's default for {method} ({rule.default_s:g} s; set a deadline to choose another)"
        elif rule.max_s and asked > rule.max_s:
            allowed = rule.max_s
            source = f"the most {method} may run ({rule.max_s:g} s; the call asked for {asked:.0f} s)"
        else:
            allowed = asked
            source = "the caller's deadline"
        with held_to(None if allowed is None else now + allowed):
            try:
                yield
            except TimeoutError:
                await abort_with(
                    context,
                    method,
                    DeadlineExceeded(f"{method} ran past {source} and was stopped", reason="SERVER_DEADLINE"),
                )


class TelemetryInterceptor(AroundInterceptor):
    """Access log line and Prometheus metrics per RPC, with the status the client saw.

    It also sets the trailers that say who answered: the request id and, on replicas, the replica's own name
    (``x-aimass-replica``). They are set before the handler runs, so errors carry them too (aborts keep them).
    """

    def __init__(
        self,
        *,
        access_log_enabled: bool = True,
        echo_request_id: bool = True,
        replica_id: Callable[[], str] | None = None,
    ) -> None:
        super().__init__()
        self.access_log_enabled = access_log_enabled
        # Replicas answer with the request id (the caller's, or a new one) as a trailer, for support requests.
        self.echo_request_id = echo_request_id
        # The replica's instance id, asked for at the first call (it includes the port, bound after this is built);
        # None in processes that serve no models (gateway, scheduler): the gateway relays the replica's own.
        self._replica_id = replica_id
        self._replica_trailer: tuple[tuple[str, str], ...] | None = None

    def _set_trailers(self, context: Context) -> str:
        """Set this call's trailers; returns its request id ("" when not echoed)."""
        trailers = self._replica_trailer
        if trailers is None:
            trailers = ((REPLICA_KEY, self._replica_id()),) if self._replica_id is not None else ()
            self._replica_trailer = trailers
        request_id = ""
        if self.echo_request_id:
            request_id = request_id_of(context.invocation_metadata()) or new_request_id()
            trailers = ((REQUEST_ID_KEY, request_id), *trailers)
        if trailers:
            context.set_trailing_metadata(trailers)
        return request_id

    @contextlib.asynccontextmanager
    async def around(self, method: str, context: Context) -> AsyncIterator[None]:
        started = time.perf_counter()
        request_id = self._set_trailers(context)
        logged = (
            self.access_log_enabled
            and access_log.isEnabledFor(logging.INFO)
            and not method.startswith(UNLOGGED_PREFIXES)
        )
        # Read now, and only when logged: context.peer() on a call the client has cancelled can crash the process
        # (grpcio segfault), and unlogged calls need not pay for it.
        peer = context.peer() if logged else None
        failure: BaseException | None = None
        try:
            yield
        except BaseException as exc:
            failure = exc
            raise
        finally:
            self._record(method, peer, started, self._code_of(context, failure), request_id)

    def _record(self, method: str, peer: str | None, started: float, code: str, request_id: str) -> None:
        """Metrics always; the access-log line when ``peer`` was read for it."""
        elapsed = time.perf_counter() - started
        label = metric_method(method)
        REQUESTS.labels(label, code).inc()
        LATENCY.labels(label).observe(elapsed)
        if peer is not None:
            access_log.info("%s %s %.2fms peer=%s request_id=%s", method, code, elapsed * 1000, peer, request_id or "-")

    @staticmethod
    def _code_of(context: Context, exc: BaseException | None) -> str:
        if isinstance(exc, asyncio.CancelledError | GeneratorExit):
            return "CANCELLED"
        code = context.code()
        if isinstance(code, grpc.StatusCode):
            return str(code.name)
        return "UNKNOWN" if exc is not None else "OK"


class ScopeInterceptor(AroundInterceptor):
    """On replicas: every call runs inside the request scope its gateway sent (tenant, weight, priority cap, request
    id) and its deadline (aimass.runtime.scope)."""

    @contextlib.asynccontextmanager
    async def around(self, method: str, context: Context) -> AsyncIterator[None]:
        with entered(RequestScope.from_metadata(context.invocation_metadata(), deadline=deadline_of(context))):
            yield
