"""The web console's process: its pages (gateway/console/static, every asset served from here: it works offline) and
a JSON API under /api (gateway/console/rpc.py, transfers.py) that calls the gateway with the signed-in user's own
API key, over the same adapter hop as the REST front door with a "console" mesh certificate. The OpenAI-compatible
routes are served here too (/v1), so a page can use what a REST client would.

The key lives in the page's session storage and travels in the Authorization header of each call: never in a URL,
never in a cookie (so no request can be forged from another site), never logged (no access log).

Run by `aimass up` as its own supervised process (``python -m gateway.console``) on ``console.host:console.port``.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Final

import uvicorn
from fastapi import FastAPI, Request
from fastapi.staticfiles import StaticFiles
from starlette.types import Scope

from aimass import __version__
from aimass.runtime import tracing
from aimass.runtime.config import Settings, load_settings
from aimass.runtime.identity import ROLE_CONSOLE
from aimass.runtime.logs import configure_logging
from gateway.console import rpc, transfers
from gateway.rest import errors
from gateway.rest.app import healthz, include_routers, uvicorn_config
from gateway.rest.middleware import BodyLimit, Headers, ResponseHeaders, Traced, request_id_header
from gateway.rest.upstream import Upstream

log = logging.getLogger(__name__)

STATIC: Final = Path(__file__).parent / "static"
# Everything from this origin; media and images may also be blobs the page made (recordings, uploaded photos).
SECURITY_HEADERS: Final = (
    (
        b"content-security-policy",
        b"default-src 'self'; img-src 'self' blob: data:; media-src 'self' blob:; connect-src 'self'; "
        b"object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
)


def security_headers(scope: Scope) -> Headers:
    """The console's pages may load and call nothing but this origin (the CSP), and never be framed."""
    return SECURITY_HEADERS


def info(settings: Settings) -> dict[str, Any]:
    """Where users reach the mesh, for the pages' code samples."""
    gateway = settings.console.public_gateway or f"127.0.0.1:{settings.gateway.server.port}"
    rest = settings.console.public_rest or f"http://127.0.0.1:{settings.rest.port}/v1"
    return {"version": __version__, "gateway": gateway, "rest": rest if settings.rest.enabled else ""}


def create_app(settings: Settings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.upstream = Upstream.connect(settings, target=settings.console_gateway, role=ROLE_CONSOLE)
        try:
            yield
        finally:
            await app.state.upstream.close()

    app = FastAPI(title="aimass console API", version=__version__, docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.settings = settings
    errors.install(app)
    app.add_api_route("/healthz", healthz, include_in_schema=False)
    where = info(settings)

    @app.get("/api/info")
    async def api_info(request: Request) -> dict[str, Any]:
        return where

    app.include_router(rpc.router)
    app.include_router(transfers.router)
    include_routers(app)
    # Last: the pages (index.html at /).
    app.mount("/", StaticFiles(directory=STATIC, html=True), name="static")
    app.add_middleware(ResponseHeaders, headers_for=request_id_header)
    app.add_middleware(
        BodyLimit,
        max_body_bytes=int(settings.rest.max_body_bytes),
        max_upload_bytes=max(int(settings.rest.max_upload_bytes), int(settings.console.max_dataset_bytes)),
        upload_types=(b"multipart/", b"application/octet-stream"),
    )
    tracer = tracing.tracer()
    if tracer is not None:
        app.add_middleware(Traced, tracer=tracer)
    app.add_middleware(ResponseHeaders, headers_for=security_headers)
    return app


def main() -> None:
    """``python -m gateway.console``: serve until SIGTERM/SIGINT, then let requests in flight finish."""
    settings = load_settings()
    configure_logging(settings.log_level, "console")
    traces = tracing.setup_process(settings.telemetry, "console")
    config = uvicorn_config(
        create_app(settings),
        settings,
        host=settings.console.host,
        port=settings.console.port,
        grace_s=settings.console.drain_grace_s,
    )
    log.info(
        "console on http://%s:%d, calling the gateway at %s",
        settings.console.host,
        settings.console.port,
        settings.console_gateway,
    )
    try:
        uvicorn.Server(config).run()
    finally:
        if traces is not None:
            traces.shutdown()
