"""The REST front door's one way in: aimass.v1 stubs over one long-lived grpc.aio channel to the gateway, and what
each call carries there (the caller's own key, trace context, request id, deadline).

The front door never judges a key itself: the gateway verifies it, applies the tenant's scopes, quotas and priority
cap, routes and traces, exactly as for a gRPC caller. Whatever tenant or priority cap a caller claims in headers
never reaches the mesh (the gateway also strips ``x-aimass-*`` metadata).

The hop: with mesh TLS on, the channel goes to the gateway's adapter listener over mesh mTLS with this process's
"rest" certificate, and each call carries its HTTP client's address (the socket's, never a header) in
``x-aimass-caller-peer``, which the gateway believes from a verified adapter only: its bad-key throttle and audit
log then see each REST client, not this process. With mesh TLS off (throwaway development) the channel goes to the
public port in plaintext (or the front door's TLS): the gateway ignores that metadata there, so every REST client
shares this process's address in the throttle and the audit log.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Final

import grpc
from fastapi import Request
from grpc_health.v1 import health_pb2_grpc
from opentelemetry import propagate

from aimass.runtime.config import Settings
from aimass.runtime.identity import ROLE_GATEWAY, ROLE_REST, mesh_channel, process_credentials
from aimass.runtime.metadata import CALLER_PEER_KEY, REQUEST_ID_KEY, new_request_id
from aimass.runtime.scope import priority_named
from aimass.v1 import (
    admin_pb2_grpc,
    common_pb2,
    llm_pb2_grpc,
    models_pb2_grpc,
    nlp_pb2_grpc,
    speech_pb2_grpc,
    vision_pb2_grpc,
)
from gateway.rest.errors import OpenAIError, bad_request

# OpenAI has no priority; this header (not under x-aimass-, which the gateway drops) asks for one: low, normal,
# high or critical. The gateway lowers it to the key's cap.
PRIORITY_HEADER: Final = "aimass-priority"
TRACE_HEADERS: Final = ("traceparent", "tracestate")
# A caller's request id is used when it is a plain token (it ends up in logs and metadata).
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
_PRINTABLE = re.compile(r"^[\x20-\x7e]*$")
# Messages as large as the gateway takes (speech and vision: 32 MiB), with room.
MAX_MESSAGE_BYTES: Final = 64 * 1024 * 1024

Metadata = tuple[tuple[str, str], ...]


class Upstream:
    """The aimass.v1 stubs the routers call, all over one channel to the gateway."""

    def __init__(self, channel: grpc.aio.Channel, target: str) -> None:
        self.channel = channel
        self.target = target
        self.nlp = nlp_pb2_grpc.NlpServiceStub(channel)
        self.vision = vision_pb2_grpc.VisionServiceStub(channel)
        self.speech = speech_pb2_grpc.SpeechServiceStub(channel)
        self.llm = llm_pb2_grpc.LlmServiceStub(channel)
        self.models = models_pb2_grpc.ModelServiceStub(channel)
        self.admin = admin_pb2_grpc.AdminServiceStub(channel)
        self.health = health_pb2_grpc.HealthStub(channel)

    @classmethod
    def connect(cls, settings: Settings, *, target: str = "", role: str = ROLE_REST) -> Upstream:
        """A channel to ``target`` (default ``settings.rest_gateway``; create it inside the event loop that uses it):
        the gateway's adapter listener over mesh mTLS as ``role`` (an adapter: "rest" or "console"), or with mesh
        TLS off its public port (TLS when the front door has it)."""
        target = target or settings.rest_gateway
        options = [
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            # Replies beyond grpc's 64 KiB stream window (audio) without a WINDOW_UPDATE round trip.
            ("grpc.http2.lookahead_bytes", settings.gateway.server.stream_window_bytes),
            # Calls from every REST client share this one connection (HTTP/2 streams); a short reconnect backoff
            # so a restarted gateway is used again quickly.
            ("grpc.min_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", 2000),
        ]
        credentials = process_credentials(settings, role)
        if credentials is not None:
            return cls(mesh_channel(target, credentials, server_role=ROLE_GATEWAY, options=options), target)
        if settings.gateway.tls_cert is None:
            return cls(grpc.aio.insecure_channel(target, options=options), target)
        ca = settings.rest.gateway_ca
        roots = Path(ca).read_bytes() if ca is not None else None
        return cls(grpc.aio.secure_channel(target, grpc.ssl_channel_credentials(roots), options=options), target)

    async def close(self) -> None:
        await self.channel.close()


def upstream(request: Request) -> Upstream:
    """FastAPI dependency: the app's Upstream."""
    found: Upstream = request.app.state.upstream
    return found


def request_id(request: Request) -> str:
    """The caller's X-Request-Id when it is a plain token, else a new one; the same for the whole request (it is
    echoed in the response's X-Request-Id and sent to the gateway)."""
    known: str | None = getattr(request.state, "request_id", None)
    if known is None:
        given = request.headers.get(REQUEST_ID_KEY, "")
        known = given if _REQUEST_ID.match(given) else new_request_id()
        request.state.request_id = known
    return known


def _presented_key(request: Request) -> tuple[str, str] | None:
    """The caller's credential as the gateway reads it: ``authorization: Bearer <key>`` or ``x-api-key``."""
    for header in ("authorization", "x-api-key"):
        value = request.headers.get(header)
        if value:
            if not _PRINTABLE.match(value):
                raise OpenAIError(401, f"the {header} header is malformed", code="invalid_api_key")
            return header, value
    return None


def call_metadata(request: Request) -> Metadata:
    """gRPC metadata for a call made for this request: the caller's key, the W3C trace context (this process's
    span when tracing is on, else the caller's own headers), the request id."""
    metadata: list[tuple[str, str]] = []
    key = _presented_key(request)
    if key is not None:
        metadata.append(key)
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    if not carrier:
        carrier = {h: v for h in TRACE_HEADERS if (v := request.headers.get(h, "")) and _PRINTABLE.match(v)}
    metadata.extend(carrier.items())
    metadata.append((REQUEST_ID_KEY, request_id(request)))
    peer = client_peer(request)
    if peer:
        metadata.append((CALLER_PEER_KEY, peer))
    return tuple(metadata)


def client_peer(request: Request) -> str:
    """The HTTP client's address as grpc writes a peer ("ipv4:10.0.0.7:51234"), from the connection (uvicorn runs
    without proxy headers, so no caller can write it); "" when it is not an IP (a unix socket)."""
    client = request.client
    if client is None:
        return ""
    try:
        address = ipaddress.ip_address(client.host)
    except ValueError:
        return ""
    if address.version == 4:
        return f"ipv4:{address}:{client.port}"
    return f"ipv6:[{address}]:{client.port}"


def call_timeout(request: Request) -> float | None:
    """The deadline of a call to the gateway (``rest.request_timeout_s``; None leaves it to the gateway)."""
    settings: Settings = request.app.state.settings
    return settings.rest.request_timeout_s or None


def priority(request: Request) -> common_pb2.Priority.ValueType:
    """The priority the caller asks for in ``aimass-priority`` (unset: the method's default)."""
    asked = request.headers.get(PRIORITY_HEADER, "").strip()
    if not asked:
        return common_pb2.PRIORITY_UNSPECIFIED
    try:
        return common_pb2.Priority.ValueType(priority_named(asked))
    except ValueError:
        raise bad_request(
            f"the {PRIORITY_HEADER} header is {asked[:40]!r}; use low, normal, high or critical",
            param=PRIORITY_HEADER,
        ) from None


def request_meta(request: Request) -> common_pb2.RequestMeta:
    """RequestMeta for a call made for this request: its request id and the priority asked for."""
    return common_pb2.RequestMeta(request_id=request_id(request), priority=priority(request))
