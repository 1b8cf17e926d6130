"""Channels to the gateway: the retry policy (gRPC service config), the API key, TLS, and the mesh's error detail.

Both clients use these; ``keyed_channel``/``keyed_aio_channel`` give the same key handling to code that calls the
raw generated stubs (load tests, the local mesh's tools).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any, Final, NamedTuple, TypedDict

import grpc
import grpc.aio

from aimass.client.codegen import INTERNAL_SERVICES
from aimass.runtime import contract
from aimass.runtime.metadata import ERROR_INFO_KEY
from aimass.v1 import common_pb2

__all__ = [
    "API_KEY_ENV",
    "DEFAULT_TARGET",
    "RETRIED_SERVICES",
    "UNRETRIED_METHODS",
    "ChannelOptions",
    "ClientOptions",
    "Metadata",
    "auth_metadata",
    "channel_options",
    "credentials",
    "error_info",
    "keyed_aio_channel",
    "keyed_channel",
    "resolve_api_key",
    "service_config",
]

DEFAULT_TARGET: Final = "127.0.0.1:50051"
API_KEY_ENV: Final = "AIMASS_API_KEY"
# The retry policy covers every public aimass.v1 service (the internal ones are for mesh processes only).
RETRIED_SERVICES: Final = tuple(sorted(name for name in contract.services() if name not in INTERNAL_SERVICES))
# ... except client streams (uploads): grpcio 1.85's core aborts the whole process ("ILLEGAL STATE: FORWARDED_BATCH")
# when it retries a client stream that the server refused after its first message, and a stream past gRPC's 256 KiB
# retry buffer could not be replayed anyway.
UNRETRIED_METHODS: Final = tuple(
    (name, method.name)
    for name in RETRIED_SERVICES
    for method in contract.services()[name].methods
    if method.client_streaming
)
# gRPC caps a retry policy's maxAttempts at 5 (silently); we refuse more instead of pretending.
MAX_ATTEMPTS_LIMIT: Final = 5

Metadata = tuple[tuple[str, str], ...]
ChannelOptions = tuple[tuple[str, str | int], ...]


class ClientOptions(TypedDict, total=False):
    """Keyword arguments of ``Client`` and ``AsyncClient``: the API key (default: $AIMASS_API_KEY, else the admin key
    file), the default deadline per call (None: none), tries per call (1-5), TLS to the gateway."""

    api_key: str | None
    timeout_s: float | None
    max_attempts: int
    tls: bool
    root_certificates: bytes | None


# -- channel configuration ---------------------------------------------------------------------------------------


def service_config(max_attempts: int) -> dict[str, Any]:
    """The gRPC service config: retry UNAVAILABLE and RESOURCE_EXHAUSTED (after the server's pushback) on every public
    aimass.v1 service, up to ``max_attempts`` tries; client-streaming methods are not retried (UNRETRIED_METHODS).

    ``max_attempts=1`` means no retries (the policy is left out: gRPC requires at least 2 attempts in one).
    """
    if not 1 <= max_attempts <= MAX_ATTEMPTS_LIMIT:
        raise ValueError(f"max_attempts is {max_attempts}; gRPC allows 1 to {MAX_ATTEMPTS_LIMIT} (1 disables retries)")
    method_config: dict[str, Any] = {"name": [{"service": service} for service in RETRIED_SERVICES]}
    if max_attempts > 1:
        method_config["retryPolicy"] = {
            "maxAttempts": max_attempts,
            "initialBackoff": "0.1s",
            "maxBackoff": "2s",
            "backoffMultiplier": 2,
            "retryableStatusCodes": ["UNAVAILABLE", "RESOURCE_EXHAUSTED"],
        }
    # The most specific name wins: these methods get this config (no retry policy) instead of their service's.
    unretried = {"name": [{"service": service, "method": method} for service, method in UNRETRIED_METHODS]}
    return {"methodConfig": [method_config, unretried]}


def channel_options(max_attempts: int) -> ChannelOptions:
    """Channel arguments that install ``service_config(max_attempts)`` and turn retries on, with a 1 MiB stream
    window so a reply larger than grpc's 64 KiB default (speech audio, a long transcript) needs no WINDOW_UPDATE
    round trip (as the mesh's own servers: ServerConfig.stream_window_bytes)."""
    return (
        ("grpc.service_config", json.dumps(service_config(max_attempts))),
        ("grpc.enable_retries", 1),
        ("grpc.http2.lookahead_bytes", 1 << 20),
    )


def resolve_api_key(api_key: str | None = None) -> str | None:
    """``api_key``, else ``$AIMASS_API_KEY``, else the admin key file of this host's mesh when it is readable."""
    if api_key:
        return api_key
    from_env = os.environ.get(API_KEY_ENV, "").strip()
    if from_env:
        return from_env
    from aimass.runtime.config import load_settings  # only when needed: settings read files and the environment

    try:
        return load_settings().admin_key_file.read_text().strip() or None
    except OSError:
        return None


def credentials(tls: bool, root_certificates: bytes | None) -> grpc.ChannelCredentials | None:
    if not tls and root_certificates is None:
        return None
    return grpc.ssl_channel_credentials(root_certificates=root_certificates)


def sync_channel(
    target: str, credentials: grpc.ChannelCredentials | None, options: Sequence[tuple[str, Any]]
) -> grpc.Channel:
    if credentials is None:
        return grpc.insecure_channel(target, options=list(options))
    return grpc.secure_channel(target, credentials, options=list(options))


def aio_channel(
    target: str,
    credentials: grpc.ChannelCredentials | None,
    options: Sequence[tuple[str, Any]],
    interceptors: Sequence[grpc.aio.ClientInterceptor] | None = None,
) -> grpc.aio.Channel:
    if credentials is None:
        return grpc.aio.insecure_channel(target, options=list(options), interceptors=interceptors)
    return grpc.aio.secure_channel(target, credentials, options=list(options), interceptors=interceptors)


def error_info(error: grpc.RpcError) -> common_pb2.ErrorInfo | None:
    """The ``aimass.v1.ErrorInfo`` (stable reason code, facts like limits) the mesh attaches to an error, if any.

    Works for errors from both clients (``grpc.Call`` errors of the sync API and ``grpc.aio.AioRpcError``).
    """
    if isinstance(error, grpc.aio.AioRpcError):
        trailers: Any = error.trailing_metadata()
    elif isinstance(error, grpc.Call):
        trailers = error.trailing_metadata()
    else:
        return None
    for key, value in trailers or ():
        if key == ERROR_INFO_KEY and isinstance(value, bytes):
            return common_pb2.ErrorInfo.FromString(value)
    return None


# -- channels that carry the API key on every call (for the raw generated stubs) ---------------------------------


class _KeyedDetails(NamedTuple):
    method: str
    timeout: float | None
    metadata: Any
    credentials: Any
    wait_for_ready: bool | None
    compression: Any


def _with_key(metadata: Any, auth: Metadata) -> list[tuple[str, str | bytes]]:
    return [*(tuple(metadata) if metadata else ()), *auth]


class _KeyInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds ``authorization: Bearer <key>`` to every call of a blocking channel."""

    def __init__(self, auth: Metadata) -> None:
        self.auth = auth

    def _details(self, details: Any) -> _KeyedDetails:
        return _KeyedDetails(
            details.method,
            details.timeout,
            _with_key(details.metadata, self.auth),
            details.credentials,
            getattr(details, "wait_for_ready", None),
            getattr(details, "compression", None),
        )

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)

    def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)


class _AioKeyed:
    """Adds ``authorization: Bearer <key>`` to the calls of an asyncio channel (one subclass per call kind: grpc.aio
    files an interceptor under the first kind it implements only)."""

    def __init__(self, auth: Metadata) -> None:
        self.auth = auth

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        return grpc.aio.ClientCallDetails(
            details.method,
            details.timeout,
            grpc.aio.Metadata(*_with_key(details.metadata, self.auth)),
            details.credentials,
            details.wait_for_ready,
        )


class _AioKeyedUnaryUnary(_AioKeyed, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)


class _AioKeyedUnaryStream(_AioKeyed, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)


class _AioKeyedStreamUnary(_AioKeyed, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(self._details(details), requests)


class _AioKeyedStreamStream(_AioKeyed, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(self._details(details), requests)


def auth_metadata(api_key: str | None) -> Metadata:
    key = resolve_api_key(api_key)
    return (("authorization", f"Bearer {key}"),) if key else ()


def keyed_channel(
    target: str = DEFAULT_TARGET,
    api_key: str | None = None,
    *,
    root_certificates: bytes | None = None,
    tls: bool = False,
    options: Sequence[tuple[str, Any]] = (),
) -> grpc.Channel:
    """A blocking channel to the gateway whose every call carries the API key (resolved as ``Client`` does), for
    the generated stubs: ``NlpServiceStub(keyed_channel()).Sentiment(...)``."""
    channel = sync_channel(target, credentials(tls, root_certificates), options)
    return grpc.intercept_channel(channel, _KeyInterceptor(auth_metadata(api_key)))


def keyed_aio_channel(
    target: str = DEFAULT_TARGET,
    api_key: str | None = None,
    *,
    root_certificates: bytes | None = None,
    tls: bool = False,
    options: Sequence[tuple[str, Any]] = (),
) -> grpc.aio.Channel:
    """``keyed_channel`` for asyncio (create it inside the event loop)."""
    auth = auth_metadata(api_key)
    interceptors: list[grpc.aio.ClientInterceptor] = [
        kind(auth) for kind in (_AioKeyedUnaryUnary, _AioKeyedUnaryStream, _AioKeyedStreamUnary, _AioKeyedStreamStream)
    ]
    return aio_channel(target, credentials(tls, root_certificates), options, interceptors)
