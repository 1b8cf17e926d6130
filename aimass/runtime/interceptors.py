"""Server interceptors: admission control, error mapping, access log and metrics, kept out of the handlers.

Each interceptor is one async context manager, ``around(method, context)``, that every call of any kind (unary or
streaming) runs inside (see ``wrap_handler``). Handlers only validate, call their engine and return; what the
client sees on failure is decided here.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import grpc
from prometheus_client import Counter, Gauge, Histogram

from aimass.runtime.errors import AimassError, InvalidArgument, ResourceExhausted
from aimass.runtime.metadata import (
    ERROR_INFO_KEY,
    REPLICA_KEY,
    REQUEST_ID_KEY,
    new_request_id,
    request_id_of,
)
from aimass.runtime.scope import RequestScope, current_scope, deadline_of, entered
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
INFLIGHT = Gauge("aimass_inflight_requests", "RPCs admitted and not yet finished")
REJECTED = Counter("aimass_admission_rejected_total", "RPCs refused because the server was full")

# Health and reflection must answer even when the server is saturated or draining.
UNMETERED_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")
# Registry heartbeats and polls, and the reports every process sends the scheduler each interval, are counted in
# metrics but would drown the access log (several lines a second from an idle mesh).
UNLOGGED_PREFIXES = (
    "/aimass.v1.RegistryService/",
    "/aimass.v1.SchedulerService/ReportLoad",
    "/aimass.v1.SchedulerService/ReportNode",
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


def wrap_handler(handler: Handler, method: str, around: Around, *, parse_requests: bool = False) -> Handler:
    """Return ``handler`` with its behaviour run inside ``around(method, context)``.

    With ``parse_requests`` the handler receives raw bytes and deserialises them inside ``around``, so a
    malformed message becomes a clear INVALID_ARGUMENT instead of grpc's generic deserialisation failure.
    """
    deserialize = handler.request_deserializer
    parse: Callable[[Any], Any] = _parser(deserialize) if parse_requests and deserialize else (lambda raw: raw)
    client_streaming = bool(handler.stream_unary or handler.stream_stream)

    def arguments(request: Any) -> Any:
        return _parsed_stream(request, parse) if client_streaming else parse(request)

    def unary_response(behavior: Behavior) -> Behavior:
        async def run(request: Any, context: Context) -> Any:
            async with around(method, context):
                return await behavior(arguments(request), context)

        return run

    def stream_response(behavior: Behavior) -> Behavior:
        # Must itself be an async generator function: grpc.aio inspects it to pick how to read the responses.
        async def run(request: Any, context: Context) -> AsyncIterator[Any]:
            async with around(method, context):
                async for item in _stream_of(behavior(arguments(request), context)):
                    yield item

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


async def _stream_of(behavior_result: Any) -> AsyncIterator[Any]:
    # aio streaming handlers are async generators, or coroutines that write through context.write().
    if hasattr(behavior_result, "__aiter__"):
        async for item in behavior_result:
            yield item
    else:
        await behavior_result


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

    def __init__(self) -> None:
        # gRPC asks the interceptors for every call; services hand out the same handler object per method each
        # time, so its wrapped twin is built once and reused (building it per call costs as much as the call).
        self._wrapped: dict[str, tuple[Handler, Handler]] = {}

    def around(self, method: str, context: Context) -> contextlib.AbstractAsyncContextManager[None]:
        raise NotImplementedError

    async def intercept_service(self, continuation: Continuation, details: grpc.HandlerCallDetails) -> Handler | None:
        handler = await continuation(details)
        method = details.method
        if handler is None or method.startswith(UNMETERED_PREFIXES):
            return handler
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = wrap_handler(handler, method, self.around, parse_requests=self.parse_requests)
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


class AdmissionInterceptor(AroundInterceptor):
    """Bounded admission: at most ``max_inflight`` RPCs at once, beyond that RESOURCE_EXHAUSTED at once.

    Queues deeper in the stack (batchers) have their own bounds; this one protects the process as a whole.
    """

    def __init__(self, max_inflight: int) -> None:
        super().__init__()
        self.max_inflight = max_inflight
        self.inflight = 0
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

    def take_completed_by_method_tenant(self) -> collections.Counter[tuple[str, str]]:
        """RPCs finished per (method, tenant) since the previous call."""
        taken, self._completed_by_method_tenant = self._completed_by_method_tenant, collections.Counter()
        return taken

    @contextlib.asynccontextmanager
    async def around(self, method: str, context: Context) -> AsyncIterator[None]:
        if self.inflight >= self.max_inflight:
            REJECTED.inc()
            await abort_with(
                context,
                method,
                ResourceExhausted(
                    f"server is at capacity ({self.inflight} requests in flight, limit {self.max_inflight}); "
                    f"{method} was not started, retry later",
                    reason="SERVER_FULL",
                    metadata={"limit": str(self.max_inflight)},
                ),
            )
        self.inflight += 1
        self.inflight_by_method[method] += 1
        INFLIGHT.inc()
        try:
            yield
        finally:
            self.inflight -= 1
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
        REQUESTS.labels(method, code).inc()
        LATENCY.labels(method).observe(elapsed)
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
