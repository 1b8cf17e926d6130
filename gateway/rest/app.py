"""The REST front door's app and process: an OpenAI-compatible HTTP API (FastAPI on uvicorn) that translates each
request into aimass.v1 calls to the gateway, with the caller's own key (gateway/rest/upstream.py).

Routers: one module per endpoint family, each an ``APIRouter`` named ``router``; ``ROUTERS`` lists them and
``create_app`` includes those present (the modules not yet written are skipped). Errors are rendered in OpenAI's
shape by gateway/rest/errors.py, whatever raised them.

Run by `aimass up` as its own supervised process (``python -m gateway.rest``), listening on ``rest.host:rest.port``;
its Prometheus metrics (gateway/rest/metrics.py) on ``rest.metrics_port``, as every mesh process serves them.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Final

import grpc
import prometheus_client
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from grpc_health.v1 import health_pb2

from aimass import __version__
from aimass.runtime import tracing
from aimass.runtime.config import Settings, load_settings
from aimass.runtime.logs import configure_logging
from gateway.rest import errors
from gateway.rest.errors import OpenAIError
from gateway.rest.metrics import Metered, upstream_error
from gateway.rest.middleware import BodyLimit, ResponseHeaders, Traced, request_id_header
from gateway.rest.upstream import Upstream

log = logging.getLogger(__name__)

# Every router module of the front door, in order; each defines ``router`` (a FastAPI APIRouter with full paths).
ROUTERS: Final = (
    "gateway.rest.models",
    "gateway.rest.chat",
    "gateway.rest.embeddings",
    "gateway.rest.audio",
    "gateway.rest.extras",
)
HEALTH_TIMEOUT_S: Final = 2.0


async def healthz(request: Request) -> JSONResponse:
    """Ready when the gateway behind answers its health check SERVING."""
    upstream: Upstream = request.app.state.upstream
    try:
        reply = await upstream.health.Check(health_pb2.HealthCheckRequest(), timeout=HEALTH_TIMEOUT_S)
    except grpc.aio.AioRpcError as err:
        upstream_error(err)
        raise OpenAIError(503, f"the gateway at {upstream.target} does not answer: {err.code().name}") from None
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        raise OpenAIError(503, f"the gateway at {upstream.target} is not serving")
    return JSONResponse({"status": "ok", "gateway": upstream.target})


def include_routers(app: FastAPI) -> None:
    """The OpenAI-compatible routes (ROUTERS) on ``app``."""
    for name in ROUTERS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name != name:
                raise  # a module that exists but fails to import is a bug, not an absent endpoint family
            continue
        app.include_router(module.router)


def create_app(settings: Settings) -> FastAPI:
    """The front door's ASGI app; its channel to the gateway opens with the app's lifespan."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.upstream = Upstream.connect(settings)
        try:
            yield
        finally:
            await app.state.upstream.close()

    # No /docs or /redoc: their pages load assets from a CDN, and the front door must work offline. The schema
    # stays at /openapi.json.
    app = FastAPI(
        title="aimass OpenAI-compatible API",
        version=__version__,
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
    )
    app.state.settings = settings
    errors.install(app)

    app.add_api_route("/healthz", healthz, include_in_schema=False)
    include_routers(app)
    app.add_middleware(ResponseHeaders, headers_for=request_id_header)
    app.add_middleware(
        BodyLimit,
        max_body_bytes=int(settings.rest.max_body_bytes),
        max_upload_bytes=int(settings.rest.max_upload_bytes),
    )
    tracer = tracing.tracer()
    if tracer is not None:
        app.add_middleware(Traced, tracer=tracer)
    # Outermost: 413s refused before routing are counted too, under the route they were sent to.
    app.add_middleware(Metered, routes=app.router.routes)
    return app


def uvicorn_config(app: FastAPI, settings: Settings, *, host: str, port: int, grace_s: float) -> uvicorn.Config:
    """How an HTTP front door (this one, the console) serves: uvloop and httptools, no access log (a key could be
    in a URL someone pasted), the process's own logging, and a drain of ``grace_s`` on SIGTERM."""
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        log_level=settings.log_level.lower(),
        access_log=False,
        timeout_graceful_shutdown=int(grace_s),
        server_header=False,
        # The client's address is the connection's, never X-Forwarded-For (uvicorn believes it from 127.0.0.1 by
        # default): the gateway throttles and audits by it (gateway/rest/upstream.py client_peer).
        proxy_headers=False,
        # The process's own logging (configure_logging), not uvicorn's.
        log_config=None,
    )


def main() -> None:
    """``python -m gateway.rest``: serve until SIGTERM/SIGINT, then let requests in flight finish."""
    settings = load_settings()
    configure_logging(settings.log_level, "rest")
    traces = tracing.setup_process(settings.telemetry, "rest")
    config = uvicorn_config(
        create_app(settings),
        settings,
        host=settings.rest.host,
        port=settings.rest.port,
        grace_s=settings.rest.drain_grace_s,
    )
    if settings.rest.metrics_port:
        prometheus_client.start_http_server(settings.rest.metrics_port, addr=settings.rest.host)
        log.info("rest metrics at http://%s:%d/metrics", settings.rest.host, settings.rest.metrics_port)
    log.info(
        "OpenAI-compatible REST on http://%s:%d/v1, calling the gateway at %s",
        settings.rest.host,
        settings.rest.port,
        settings.rest_gateway,
    )
    try:
        uvicorn.Server(config).run()
    finally:
        if traces is not None:
            traces.shutdown()
