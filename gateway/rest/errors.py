"""Errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}`` with the HTTP status its SDKs map
to exception classes (400 BadRequestError, 401 AuthenticationError, 403 PermissionDeniedError, 404 NotFoundError,
409 ConflictError, 413, 429 RateLimitError, 5xx InternalServerError).

Routers raise ``OpenAIError`` for what they refuse themselves and let ``grpc.aio.AioRpcError`` from the gateway
propagate: the app's handlers (``install``) render both, and FastAPI's request-validation errors, the same way.
Once a stream has started its status is sent, so a later error goes out as one SSE event (``sse_error``), which the
OpenAI SDKs raise as ``APIError``.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any, Final

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from aimass.client import error_info
from gateway.rest.metrics import upstream_error

log = logging.getLogger(__name__)

# gRPC status → HTTP status. The OpenAI SDKs retry 408, 409, 429 and 5xx (after Retry-After), nothing else.
HTTP_STATUS: Final[dict[grpc.StatusCode, int]] = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    # A model not loaded (yet): a state that may change, so 409 (retried by the SDKs), not 400.
    grpc.StatusCode.FAILED_PRECONDITION: 409,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    # The server gave up waiting (a deadline), as a proxy says it: 504, with x-should-retry: false.
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    # The caller went away; nobody reads this answer (nginx's 499 in logs).
    grpc.StatusCode.CANCELLED: 499,
}

# HTTP status → OpenAI's error "type".
ERROR_TYPE: Final[dict[int, str]] = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "permission_error",
    404: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}


class OpenAIError(Exception):
    """An error a REST caller sees as ``status`` with ``{"error": {message, type, param, code}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or error_type(status)
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def error_type(status: int) -> str:
    return ERROR_TYPE.get(status, "server_error" if status >= 500 else "invalid_request_error")


def bad_request(message: str, param: str | None = None, code: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, param=param, code=code)


def from_rpc_error(err: grpc.aio.AioRpcError) -> OpenAIError:
    """The gateway's (or a replica's) refusal as the REST caller sees it: status, message, the ErrorInfo's reason as
    ``code`` and its field as ``param``; RESOURCE_EXHAUSTED with Retry-After (and retry-after-ms, which the OpenAI
    SDKs read first) from the ErrorInfo's retry_after_ms, and no retry asked for when that wait is too long."""
    upstream_error(err)  # every gateway error the front door answers with passes here, once
    code = err.code()
    status = HTTP_STATUS.get(code, 500)
    info = error_info(err)
    facts = dict(info.metadata) if info is not None else {}
    reason = info.reason.lower() if info is not None and info.reason else code.name.lower()
    headers: dict[str, str] = {}
    retry_after_ms = facts.get("retry_after_ms", "")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and retry_after_ms.lstrip("-").isdigit():
        wait_ms = int(retry_after_ms)
        headers["retry-after-ms"] = str(max(wait_ms, 0))
        headers["retry-after"] = str(max(math.ceil(wait_ms / 1000), 1))
        pushback = dict(err.trailing_metadata() or ()).get("grpc-retry-pushback-ms")
        # The gateway asks for no automatic retry (-1) when the wait is hours (a day's token quota).
        if pushback == "-1":
            headers["x-should-retry"] = "false"
    elif code == grpc.StatusCode.UNAUTHENTICATED and reason != "too_many_failures":
        # OpenAI's code for a bad key; the bad-key throttle keeps its own (the key may be good: retry after the window).
        reason = "invalid_api_key"
    elif code == grpc.StatusCode.DEADLINE_EXCEEDED:
        # One code whichever hop noticed first (grpc's own deadline has no reason, a server's says SERVER_DEADLINE);
        # the message says which deadline it was.
        reason = "deadline_exceeded"
        # The same work under the same deadline would run out again: the SDKs should not repeat it by themselves.
        headers["x-should-retry"] = "false"
    message = err.details() or code.name
    if code == grpc.StatusCode.UNAVAILABLE and message.startswith("failed to connect"):
        # grpc's own words for a gateway that does not answer: say which hop failed.
        message = f"the aimass gateway is not reachable from the REST front door ({message})"
    # The replica names fields as in aimass.v1 ("sampling.temperature"); OpenAI's are flat ("temperature").
    param = (facts.get("field") or facts.get("param") or "").removeprefix("sampling.") or None
    return OpenAIError(status, message, param=param, code=reason, headers=headers)


def _validation_param(location: Sequence[Any]) -> str | None:
    """("body", "messages", 0, "content") → "messages[0].content"."""
    parts = list(location)
    if parts and parts[0] in ("body", "query", "path", "header", "form"):
        parts = parts[1:]
    text = ""
    for part in parts:
        if isinstance(part, int):
            text += f"[{part}]"
        elif not str(part).startswith(("function-", "union[", "list[", "literal[")):
            text += f".{part}" if text else str(part)
    return text or None


def from_validation_error(err: RequestValidationError) -> OpenAIError:
    """FastAPI's request validation as OpenAI's 400: the first problem, with the parameter it concerns."""
    problems = list(err.errors())
    if not problems:
        return bad_request("the request is not valid")
    first = problems[0]
    param = _validation_param(first.get("loc", ()))
    if first.get("type") == "json_invalid":
        return bad_request(f"the body is not valid JSON: {first.get('msg', '')}", code="invalid_json")
    if param is None and first.get("type") in ("model_attributes_type", "dict_type"):
        return bad_request(
            "the request body must be a JSON object (Content-Type: application/json)", code="invalid_json"
        )
    if first.get("type") == "missing":
        return bad_request(f"'{param}' is a required property", param=param, code="missing_required_parameter")
    message = str(first.get("msg", "invalid value"))
    more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
    where = f"{param}: " if param else ""
    return bad_request(f"{where}{message}{more}", param=param, code="invalid_value")


def sse_error(error: OpenAIError | grpc.aio.AioRpcError) -> str:
    """One SSE event with the error in OpenAI's shape, for an error after a stream's first bytes went out."""
    openai_error = from_rpc_error(error) if isinstance(error, grpc.aio.AioRpcError) else error
    return f"data: {json.dumps(openai_error.body())}\n\n"


async def _openai_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, OpenAIError)
    return exc.response()


async def _rpc_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, grpc.aio.AioRpcError)
    return from_rpc_error(exc).response()


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return from_validation_error(exc).response()


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    message = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
    if exc.status_code == 404 and message == "Not Found":
        message = f"no such endpoint: {request.method} {request.url.path}"
    elif exc.status_code == 405:
        message = f"{request.method} is not allowed on {request.url.path}"
    code = "request_too_large" if exc.status_code == 413 else None
    return OpenAIError(exc.status_code, message, code=code, headers=exc.headers).response()


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unexpected error serving %s %s", request.method, request.url.path, exc_info=exc)
    return OpenAIError(500, "internal error in the REST front door (logged there)", code="internal").response()


def install(app: FastAPI) -> None:
    """Every error the app answers, in OpenAI's shape."""
    app.add_exception_handler(OpenAIError, _openai_error)
    app.add_exception_handler(grpc.aio.AioRpcError, _rpc_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
