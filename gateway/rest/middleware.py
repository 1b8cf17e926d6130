"""Plain ASGI middleware of the REST front door: body size limits (413 before the body is read on) and one SERVER
span per HTTP request when tracing is on. Pure ASGI, not BaseHTTPMiddleware: streams and disconnects pass through
untouched."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from opentelemetry import propagate
from opentelemetry.trace import SpanKind, Status, StatusCode, Tracer
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.rest.errors import OpenAIError
from gateway.rest.metrics import REFUSED_BYTES_KEY

Headers = Sequence[tuple[bytes, bytes]]


class ResponseHeaders:
    """Adds ``headers_for(scope)`` to every HTTP response (called as the response starts, when the request's state
    is filled in)."""

    def __init__(self, app: ASGIApp, headers_for: Callable[[Scope], Headers]) -> None:
        self.app = app
        self.headers_for = headers_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(event: Message) -> None:
            if event["type"] == "http.response.start":
                event["headers"] = [*event.get("headers", []), *self.headers_for(scope)]
            await send(event)

        await self.app(scope, receive, with_headers)


def request_id_header(scope: Scope) -> Headers:
    """The request id (the caller's X-Request-Id, or the one made for it), echoed on every response."""
    known = (scope.get("state") or {}).get("request_id")
    return [(b"x-request-id", known.encode())] if known else []


class BodyTooLarge(HTTPException):
    """Raised from ``receive`` when a body passes its limit mid-read; an HTTPException so FastAPI's body parsing
    lets it through (it turns other errors into 400) and the app's handler answers 413."""


class BodyLimit:
    """JSON bodies up to ``max_body_bytes``, uploads (multipart) up to ``max_upload_bytes``: refused on the
    Content-Length when it says more, else counted as the body arrives (chunked uploads)."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        max_body_bytes: int,
        max_upload_bytes: int,
        upload_types: tuple[bytes, ...] = (b"multipart/",),
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.max_upload_bytes = max_upload_bytes
        # Content types counted as uploads (the console also takes a dataset file as the raw body).
        self.upload_types = upload_types

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        upload = headers.get(b"content-type", b"").lower().startswith(self.upload_types)
        limit = self.max_upload_bytes if upload else self.max_body_bytes
        what = "upload" if upload else "request body"
        message = f"the {what} is larger than {limit:,} bytes, the limit of this server"
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            scope[REFUSED_BYTES_KEY] = int(declared)
            await OpenAIError(413, message, code="request_too_large").response()(scope, receive, send)
            return
        received = 0

        async def limited() -> Message:
            nonlocal received
            event = await receive()
            if event["type"] == "http.request":
                received += len(event.get("body", b""))
                if received > limit:
                    scope[REFUSED_BYTES_KEY] = received
                    raise BodyTooLarge(413, message)
            return event

        await self.app(scope, limited, send)


class Traced:
    """A SERVER span per HTTP request, continuing the caller's W3C trace context; current while the request is
    served (its streamed body included), so calls to the gateway carry it and the gateway's span is its child."""

    def __init__(self, app: ASGIApp, tracer: Tracer) -> None:
        self.app = app
        self.tracer = tracer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in ("/healthz", "/metrics"):
            await self.app(scope, receive, send)
            return
        carrier = {key.decode("latin-1"): value.decode("latin-1") for key, value in scope["headers"]}
        method = scope["method"]
        status = 0

        async def watched(event: Message) -> None:
            nonlocal status
            if event["type"] == "http.response.start":
                status = int(event["status"])
            await send(event)

        with self.tracer.start_as_current_span(
            f"{method} {scope['path']}",
            context=propagate.extract(carrier),
            kind=SpanKind.SERVER,
            attributes={"http.request.method": method, "url.path": scope["path"]},
        ) as span:
            try:
                await self.app(scope, receive, watched)
            finally:
                route: Any = scope.get("route")
                template = getattr(route, "path", None)
                if template:
                    span.update_name(f"{method} {template}")
                    span.set_attribute("http.route", template)
                if status:
                    span.set_attribute("http.response.status_code", status)
                    if status >= 500:
                        span.set_status(Status(StatusCode.ERROR))
