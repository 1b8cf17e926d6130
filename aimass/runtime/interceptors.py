"""Server interceptors: admission control, error mapping, access log and metrics, kept out of the handlers.

Each interceptor wraps the RPC's behaviour the same way for all four call kinds (see ``wrap_handler``), so a
handler only parses, calls its engine and returns; what the client sees on failure is decided here.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from prometheus_client import Counter, Gauge, Histogram

from aimass.runtime.errors import ERROR_INFO_METADATA_KEY, AimassError
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
# Registry heartbeats and polls are counted in metrics but would drown the access log.
UNLOGGED_PREFIXES = ("/aimass.v1.RegistryService/",)

Behavior = Callable[..., Any]
# Runs one call: gets the method name, the context and a thunk that performs the real behaviour.
UnaryAround = Callable[[str, grpc.aio.ServicerContext[Any, Any], Callable[[], Awaitable[Any]]], Awaitable[Any]]


def wrap_handler(
    handler: grpc.RpcMethodHandler,
    method: str,
    around_unary: UnaryAround,
    around_stream: Callable[
        [str, grpc.aio.ServicerContext[Any, Any], Callable[[], AsyncIterator[Any]]], AsyncIterator[Any]
    ],
) -> grpc.RpcMethodHandler:
    """Return ``handler`` with its behaviour run through ``around_unary``/``around_stream``."""

    def unary_response(behavior: Behavior) -> Behavior:
        async def run(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            return await around_unary(method, context, lambda: behavior(request, context))

        return run

    def stream_response(behavior: Behavior) -> Behavior:
        # Must itself be an async generator function: grpc.aio inspects it to pick how to read the responses.
        async def run(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            async for item in around_stream(method, context, lambda: behavior(request, context)):
                yield item

        return run

    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(
            unary_response(handler.unary_unary), handler.request_deserializer, handler.response_serializer
        )
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(
            unary_response(handler.stream_unary), handler.request_deserializer, handler.response_serializer
        )
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(
            stream_response(handler.unary_stream), handler.request_deserializer, handler.response_serializer
        )
    assert handler.stream_stream is not None
    return grpc.stream_stream_rpc_method_handler(
        stream_response(handler.stream_stream), handler.request_deserializer, handler.response_serializer
    )


async def _stream_of(behavior_result: Any) -> AsyncIterator[Any]:
    # aio streaming handlers are async generators, or coroutines that write through context.write().
    if hasattr(behavior_result, "__aiter__"):
        async for item in behavior_result:
            yield item
    else:
        await behavior_result


class ErrorMappingInterceptor(grpc.aio.ServerInterceptor):
    """AimassError → its status and message (+ ErrorInfo trailer); anything unexpected → INTERNAL, logged."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        return wrap_handler(handler, handler_call_details.method, self._unary, self._stream)

    async def _unary(
        self, method: str, context: grpc.aio.ServicerContext[Any, Any], call: Callable[[], Awaitable[Any]]
    ) -> Any:
        try:
            return await call()
        except (grpc.aio.AbortError, asyncio.CancelledError):
            raise
        except Exception as exc:
            await abort_with(context, method, exc)

    async def _stream(
        self, method: str, context: grpc.aio.ServicerContext[Any, Any], call: Callable[[], Any]
    ) -> AsyncIterator[Any]:
        try:
            async for item in _stream_of(call()):
                yield item
        except (grpc.aio.AbortError, asyncio.CancelledError):
            raise
        except Exception as exc:
            await abort_with(context, method, exc)


async def abort_with(context: grpc.aio.ServicerContext[Any, Any], method: str, exc: Exception) -> None:
    if isinstance(exc, AimassError):
        info = common_pb2.ErrorInfo(reason=exc.reason, metadata=exc.metadata)
        trailers: list[tuple[str, str | bytes]] = [(ERROR_INFO_METADATA_KEY, info.SerializeToString())]
        retry_after = exc.metadata.get("retry_after_ms")
        if retry_after is not None:
            # gRPC's standard pushback header: clients with retry policies wait this long.
            trailers.append(("grpc-retry-pushback-ms", retry_after))
        await context.abort(exc.code, exc.message, trailing_metadata=tuple(trailers))
    log.exception("unexpected error in %s", method, exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method}: {type(exc).__name__}; see server log")


class AdmissionInterceptor(grpc.aio.ServerInterceptor):
    """Bounded admission: at most ``max_inflight`` RPCs at once, beyond that RESOURCE_EXHAUSTED at once.

    Queues deeper in the stack (batchers) have their own bounds; this one protects the process as a whole.
    """

    def __init__(self, max_inflight: int) -> None:
        self.max_inflight = max_inflight
        self.inflight = 0

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(UNMETERED_PREFIXES):
            return handler
        return wrap_handler(handler, handler_call_details.method, self._unary, self._stream)

    def _admit(self, method: str) -> str | None:
        if self.inflight >= self.max_inflight:
            REJECTED.inc()
            return (
                f"server is at capacity ({self.inflight} requests in flight, limit {self.max_inflight}); "
                f"{method} was not started, retry later"
            )
        self.inflight += 1
        INFLIGHT.inc()
        return None

    def _release(self) -> None:
        self.inflight -= 1
        INFLIGHT.dec()

    async def _reject(self, context: grpc.aio.ServicerContext[Any, Any], message: str) -> None:
        info = common_pb2.ErrorInfo(reason="SERVER_FULL", metadata={"limit": str(self.max_inflight)})
        await context.abort(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            message,
            trailing_metadata=((ERROR_INFO_METADATA_KEY, info.SerializeToString()), ("grpc-retry-pushback-ms", "100")),
        )

    async def _unary(
        self, method: str, context: grpc.aio.ServicerContext[Any, Any], call: Callable[[], Awaitable[Any]]
    ) -> Any:
        refused = self._admit(method)
        if refused:
            await self._reject(context, refused)
        try:
            return await call()
        finally:
            self._release()

    async def _stream(
        self, method: str, context: grpc.aio.ServicerContext[Any, Any], call: Callable[[], Any]
    ) -> AsyncIterator[Any]:
        refused = self._admit(method)
        if refused:
            await self._reject(context, refused)
        try:
            async for item in _stream_of(call()):
                yield item
        finally:
            self._release()


class TelemetryInterceptor(grpc.aio.ServerInterceptor):
    """Access log line and Prometheus metrics per RPC, with the status the client saw."""

    def __init__(self, *, access_log_enabled: bool = True) -> None:
        self.access_log_enabled = access_log_enabled

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(UNMETERED_PREFIXES):
            return handler
        return wrap_handler(handler, handler_call_details.method, self._unary, self._stream)

    def _record(self, method: str, context: grpc.aio.ServicerContext[Any, Any], started: float, code: str) -> None:
        elapsed = time.perf_counter() - started
        REQUESTS.labels(method, code).inc()
        LATENCY.labels(method).observe(elapsed)
        if (
            self.access_log_enabled
            and access_log.isEnabledFor(logging.INFO)
            and not method.startswith(UNLOGGED_PREFIXES)
        ):
            access_log.info("%s %s %.2fms peer=%s", method, code, elapsed * 1000, context.peer())

    @staticmethod
    def _code_of(context: grpc.aio.ServicerContext[Any, Any], exc: BaseException | None) -> str:
        if isinstance(exc, asyncio.CancelledError):
            return "CANCELLED"
        code = context.code()
        if isinstance(code, grpc.StatusCode):
            return str(code.name)
        return "UNKNOWN" if exc is not None else "OK"

    async def _unary(
        self, method: str, context: grpc.aio.ServicerContext[Any, Any], call: Callable[[], Awaitable[Any]]
    ) -> Any:
        started = time.perf_counter()
        failure: BaseException | None = None
        try:
            return await call()
        except BaseException as exc:
            failure = exc
            raise
        finally:
            self._record(method, context, started, self._code_of(context, failure))

    async def _stream(
        self, method: str, context: grpc.aio.ServicerContext[Any, Any], call: Callable[[], Any]
    ) -> AsyncIterator[Any]:
        started = time.perf_counter()
        failure: BaseException | None = None
        try:
            async for item in _stream_of(call()):
                yield item
        except BaseException as exc:
            failure = exc
            raise
        finally:
            self._record(method, context, started, self._code_of(context, failure))
