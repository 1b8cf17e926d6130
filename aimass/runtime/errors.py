"""Errors that carry their gRPC status, so handlers and engines raise and the error interceptor maps.

A handler raises e.g. ``InvalidArgument("texts[3] is 12001 characters; the limit is 10000")`` and the client sees
INVALID_ARGUMENT with exactly that message, plus an ``aimass.v1.ErrorInfo`` in the trailing metadata
``aimass-error-bin`` with a stable reason code and facts it can act on.
"""

from __future__ import annotations

from collections.abc import Mapping

import grpc


class AimassError(Exception):
    """Base: an error a client should see with ``code`` and ``message``."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    default_reason: str = "INTERNAL"

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
    """Queue or quota full. ``retry_after_ms`` becomes pushback metadata so clients back off."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    default_reason = "RESOURCE_EXHAUSTED"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
        retry_after_ms: int = 100,
    ) -> None:
        super().__init__(message, reason=reason, metadata={**(metadata or {}), "retry_after_ms": str(retry_after_ms)})
        self.retry_after_ms = retry_after_ms


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
