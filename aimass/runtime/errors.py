"""Errors that carry their gRPC status, so handlers and engines raise and the error interceptor maps.

A handler raises e.g. ``InvalidArgument("texts[3] is 12001 characters; the limit is 10000")`` and the client sees
INVALID_ARGUMENT with exactly that message, plus an ``aimass.v1.ErrorInfo`` in the trailing metadata
``aimass-error-bin`` with a stable reason code and facts it can act on.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import grpc


class AimassError(Exception):
    """Base: an error a client should see with ``code`` and ``message``."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    default_reason: str = "INTERNAL"
    # gRPC's retry pushback (grpc-retry-pushback-ms): clients with a retry policy wait this long before trying
    # again, or do not retry at all when it is negative. None: no pushback.
    pushback_ms: int | None = None

    def __init__(self, message: str, *, reason: str | None = None, metadata: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        self.metadata = dict(metadata or {})


class InvalidArgument(AimassError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    default_reason = "INVALID_ARGUMENT"


class NotFound(AimassError):
    code = grpc.StatusCode.NOT_FOUND
    default_reason = "NOT_FOUND"


class Unauthenticated(AimassError):
    code = grpc.StatusCode.UNAUTHENTICATED
    default_reason = "UNAUTHENTICATED"


class PermissionDenied(AimassError):
    code = grpc.StatusCode.PERMISSION_DENIED
    default_reason = "PERMISSION_DENIED"


class ResourceExhausted(AimassError):
    """Queue or quota full. ``retry_after_ms`` goes in the ErrorInfo and, unless ``pushback_ms`` says otherwise
    (-1: a wait too long for an automatic retry), in gRPC's pushback so clients back off."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    default_reason = "RESOURCE_EXHAUSTED"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
        retry_after_ms: int = 100,
        pushback_ms: int | None = None,
    ) -> None:
        super().__init__(message, reason=reason, metadata={**(metadata or {}), "retry_after_ms": str(retry_after_ms)})
        self.retry_after_ms = retry_after_ms
        self.pushback_ms = retry_after_ms if pushback_ms is None else pushback_ms


class DeadlineExceeded(AimassError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED
    default_reason = "DEADLINE_EXCEEDED"


class Unavailable(AimassError):
    """Replica down or draining: safe to retry elsewhere."""

    code = grpc.StatusCode.UNAVAILABLE
    default_reason = "UNAVAILABLE"


class FailedPrecondition(AimassError):
    code = grpc.StatusCode.FAILED_PRECONDITION
    default_reason = "FAILED_PRECONDITION"


class Unimplemented(AimassError):
    code = grpc.StatusCode.UNIMPLEMENTED
    default_reason = "UNIMPLEMENTED"


Trailers = tuple[tuple[str, str | bytes], ...]


def relayed_trailers(err: grpc.aio.AioRpcError) -> Trailers:
    """Another server's trailers (its ErrorInfo among them), without the status gRPC sets itself."""
    return tuple((k, v) for k, v in (err.trailing_metadata() or ()) if not k.startswith("grpc-status"))


async def relay_error(
    context: grpc.aio.ServicerContext[Any, Any],
    err: grpc.aio.AioRpcError,
    trailers: Callable[[Trailers], Trailers] = lambda kept: kept,
) -> None:
    """Ends the call with the error another server answered a call made for it (a replica, the scheduler): its
    status, message and trailers, passed through ``trailers`` (e.g. the gateway adds the tenant)."""
    await context.abort(err.code(), err.details() or "", trailing_metadata=trailers(relayed_trailers(err)))
