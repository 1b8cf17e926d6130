"""Prometheus metrics of the REST front door, served on ``rest.metrics_port`` (its own port, as every mesh process
serves its metrics; not a route of the public app): requests by route template, method and HTTP status, latency
and in-flight requests by route, time to the first body byte of streamed responses (chat and completion SSE,
speech), streams the client left before their end, bytes of bodies refused for size, and the gateway's gRPC errors
by code.

Label values are bounded: a route is the template the request matched (``/v1/models/{model:path}``), or UNKNOWN_ROUTE
for any path the app does not serve; a method outside METHODS is OTHER_METHOD; gRPC codes are grpc.StatusCode
names. Callers choose paths and methods, and a series each would grow /metrics forever (as
aimass/runtime/interceptors.py bounds gRPC method names).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Final

import grpc
from prometheus_client import Counter, Gauge, Histogram
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

UNKNOWN_ROUTE: Final = "(unknown route)"
OTHER_METHOD: Final = "(other)"
METHODS: Final = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# BodyLimit leaves the size of a body it refused here, for Metered to count under the request's route.
REFUSED_BYTES_KEY: Final = "aimass.refused_body_bytes"

# Streams (SSE, speech) last as long as their generation: the buckets reach minutes.
DURATION_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

REQUESTS = Counter(
    "aimass_rest_requests_total",
    "HTTP requests finished, by route template, method and status",
    ["route", "method", "status"],
)
LATENCY = Histogram(
    "aimass_rest_request_duration_seconds",
    "HTTP request wall time from arrival to the last response byte (a stream's end included)",
    ["route"],
    buckets=DURATION_BUCKETS,
)
INFLIGHT = Gauge("aimass_rest_inflight_requests", "HTTP requests arrived and not yet answered in full", ["route"])
TIME_TO_FIRST_BYTE = Histogram(
    "aimass_rest_stream_time_to_first_byte_seconds",
    "Streamed responses (chat/completion SSE, speech): from the request's arrival to the first body byte sent",
    ["route"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
STREAMS_DISCONNECTED = Counter(
    "aimass_rest_stream_client_disconnects_total",
    "Streamed responses that ended because the client went away before their last byte",
    ["route"],
)
REFUSED_BODY_BYTES = Counter(
    "aimass_rest_refused_body_bytes_total",
    "Bytes of request bodies and uploads refused with 413 for their size (the declared Content-Length, else the "
    "bytes read until the limit passed)",
    ["route"],
)
UPSTREAM_ERRORS = Counter(
    "aimass_rest_upstream_errors_total", "gRPC calls to the gateway that failed, by status code", ["code"]
)


def upstream_error(err: grpc.aio.AioRpcError) -> None:
    """Counts a failed call to the gateway (its code is one of grpc.StatusCode's, a bounded set)."""
    UPSTREAM_ERRORS.labels(err.code().name).inc()


def route_of(routes: Sequence[BaseRoute], scope: Scope) -> str:
    """The template of the route ``scope`` matches, as the router picks it (the first full match, else the first
    partial one: a path served under another method); UNKNOWN_ROUTE when none does."""
    partial = None
    for route in routes:
        match, _ = route.matches(scope)
        if match == Match.FULL:
            return str(getattr(route, "path", UNKNOWN_ROUTE))
        if match == Match.PARTIAL and partial is None:
            partial = route
    return str(getattr(partial, "path", UNKNOWN_ROUTE)) if partial is not None else UNKNOWN_ROUTE


class Metered:
    """Outermost middleware: times and counts every HTTP request, 413s refused before routing included. A response
    is streamed when its first body event says more is to come (StreamingResponse; JSON answers come whole)."""

    def __init__(self, app: ASGIApp, routes: Sequence[BaseRoute]) -> None:
        self.app = app
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        route = route_of(self.routes, scope)
        method = scope["method"] if scope["method"] in METHODS else OTHER_METHOD
        status = bodies = 0
        streamed = first_byte = completed = disconnected = False

        async def watched_receive() -> Message:
            nonlocal disconnected
            event = await receive()
            if event["type"] == "http.disconnect" and not completed:
                disconnected = True
            return event

        async def watched_send(event: Message) -> None:
            nonlocal status, bodies, streamed, first_byte, completed, disconnected
            if event["type"] == "http.response.start":
                status = int(event["status"])
            elif event["type"] == "http.response.body":
                more = bool(event.get("more_body", False))
                if not bodies:
                    streamed = more
                bodies += 1
                if streamed and not first_byte and event.get("body"):
                    first_byte = True
                    TIME_TO_FIRST_BYTE.labels(route).observe(time.perf_counter() - started)
                if not more:
                    completed = True
            try:
                await send(event)
            except OSError:
                disconnected = True  # ASGI 2.4 servers say a client is gone by failing the send
                raise

        gauge = INFLIGHT.labels(route)
        gauge.inc()
        try:
            await self.app(scope, watched_receive, watched_send)
        finally:
            gauge.dec()
            if not status:
                # Nothing was sent: the server answers 500 for an app that raised; nobody reads a left client's.
                status = 499 if disconnected else 500
            REQUESTS.labels(route, method, str(status)).inc()
            LATENCY.labels(route).observe(time.perf_counter() - started)
            if streamed and disconnected and not completed:
                STREAMS_DISCONNECTED.labels(route).inc()
            refused = scope.get(REFUSED_BYTES_KEY)
            if refused:
                REFUSED_BODY_BYTES.labels(route).inc(refused)
