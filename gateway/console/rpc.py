"""The console's JSON API over the mesh's public RPCs (gRPC-JSON transcoding, as grpc-gateway and Envoy do it):
``POST /api/rpc/{service}/{method}`` takes the request message as proto3 JSON and answers the response the same way;
``POST /api/stream/{service}/{method}`` answers a server stream as server-sent events, one message per event.

Only the public services (what a client may call on the gateway's public port) are reachable, every call carries the
caller's own key to the gateway (gateway/rest/upstream.py), so the console can do exactly what any client can and
nothing more: auth, scopes, quotas, tenancy, priorities and tracing are the gateway's.
"""

from __future__ import annotations

import importlib
import json
import pkgutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import cache
from typing import Annotated, Any, Final, TypeVar

import grpc
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse
from google.protobuf import json_format, message_factory
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import Message

import aimass.v1
from aimass.client.codegen import INTERNAL_SERVICES
from gateway.rest.errors import OpenAIError, sse_error
from gateway.rest.upstream import Upstream, call_metadata, call_timeout, upstream

router = APIRouter(prefix="/api")
Reply = TypeVar("Reply", bound=Message)

# Streams the console relays (live views: a training job, the cluster; chat tokens; synthesized audio).
SSE_HEADERS: Final = {"cache-control": "no-store", "x-accel-buffering": "no"}


@dataclass(frozen=True)
class Rpc:
    """One public method: its path on the gateway, its messages, and how it streams."""

    service: str
    method: str
    request: type[Message]
    response: type[Message]
    client_streaming: bool
    server_streaming: bool

    @property
    def path(self) -> str:
        return f"/{self.service}/{self.method}"

    def describe(self) -> dict[str, Any]:
        return {
            "service": self.service,
            "method": self.method,
            "request": self.request.DESCRIPTOR.full_name,
            "response": self.response.DESCRIPTOR.full_name,
            "python_module": self.request.DESCRIPTOR.file.name.removesuffix(".proto").replace("/", ".") + "_pb2",
            "client_streaming": self.client_streaming,
            "server_streaming": self.server_streaming,
        }


@cache
def public_rpcs() -> dict[str, Rpc]:
    """Every method of every public aimass.v1 service, by "Service/Method" (the service's short or full name)."""
    found: dict[str, Rpc] = {}
    for module in pkgutil.iter_modules(aimass.v1.__path__):
        if not module.name.endswith("_pb2"):
            continue
        file = importlib.import_module(f"aimass.v1.{module.name}").DESCRIPTOR
        for service in file.services_by_name.values():
            if service.full_name in INTERNAL_SERVICES:
                continue
            for method in service.methods:
                rpc = _rpc(service.full_name, method)
                found[f"{service.full_name}/{method.name}"] = rpc
                found[f"{service.name}/{method.name}"] = rpc
    return found


def _rpc(service: str, method: MethodDescriptor) -> Rpc:
    return Rpc(
        service=service,
        method=method.name,
        request=message_factory.GetMessageClass(method.input_type),
        response=message_factory.GetMessageClass(method.output_type),
        client_streaming=method.client_streaming,
        server_streaming=method.server_streaming,
    )


def find_rpc(service: str, method: str) -> Rpc:
    rpc = public_rpcs().get(f"{service}/{method}")
    if rpc is None:
        raise OpenAIError(404, f"no public method {service}/{method}; GET /api/services lists them", code="not_found")
    return rpc


def as_json(reply: Message) -> dict[str, Any]:
    """A message as proto3 JSON with the .proto's field names, defaults included (a score of 0 is a score)."""
    return json_format.MessageToDict(reply, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


async def parsed(request: Request, rpc: Rpc) -> Message:
    """The request message from the body's JSON (an empty body is the empty message)."""
    raw = await request.body()
    try:
        body = json.loads(raw) if raw.strip() else {}
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise OpenAIError(400, f"the body is not JSON: {err}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise OpenAIError(400, f"the body must be a JSON object: the fields of {rpc.request.DESCRIPTOR.full_name}")
    try:
        return json_format.ParseDict(body, rpc.request())
    except json_format.ParseError as err:
        raise OpenAIError(400, f"{rpc.request.DESCRIPTOR.full_name}: {err}", code="invalid_value") from None


@router.get("/services")
async def services() -> dict[str, Any]:
    """The public methods the console can call, with their message types (for the pages' code samples)."""
    unique = {rpc.path: rpc for rpc in public_rpcs().values()}
    return {"methods": [rpc.describe() for _, rpc in sorted(unique.items())]}


@router.post("/rpc/{service}/{method}")
async def unary(
    service: str, method: str, request: Request, up: Annotated[Upstream, Depends(upstream)]
) -> JSONResponse:
    rpc = find_rpc(service, method)
    if rpc.client_streaming or rpc.server_streaming:
        raise OpenAIError(400, f"{rpc.path} streams: call it through /api/stream (server streams) or its own route")
    message = await parsed(request, rpc)
    call = up.channel.unary_unary(
        rpc.path, request_serializer=rpc.request.SerializeToString, response_deserializer=rpc.response.FromString
    )
    reply = await call(message, metadata=call_metadata(request), timeout=call_timeout(request))
    return JSONResponse(as_json(reply))


@router.post("/stream/{service}/{method}")
async def server_stream(
    service: str, method: str, request: Request, up: Annotated[Upstream, Depends(upstream)]
) -> StreamingResponse:
    rpc = find_rpc(service, method)
    if rpc.client_streaming or not rpc.server_streaming:
        raise OpenAIError(400, f"{rpc.path} does not stream its answer: call it through /api/rpc")
    message = await parsed(request, rpc)
    call = up.channel.unary_stream(
        rpc.path, request_serializer=rpc.request.SerializeToString, response_deserializer=rpc.response.FromString
    )(message, metadata=call_metadata(request), timeout=call_timeout(request))
    first, replies = await first_reply(call)
    return StreamingResponse(_events(call, replies, first), media_type="text/event-stream", headers=SSE_HEADERS)


async def first_reply(call: grpc.aio.UnaryStreamCall[Any, Reply]) -> tuple[Reply | None, AsyncIterator[Reply]]:
    """A server stream's first message (None when it ended without one) and the rest. Awaited before the HTTP answer
    starts, so a refusal (a bad key, bad input) becomes an HTTP error status; the call is cancelled if it fails."""
    replies = call.__aiter__()
    try:
        return await anext(replies), replies
    except StopAsyncIteration:
        return None, replies
    except BaseException:
        call.cancel()
        raise


async def _events(call: Any, replies: AsyncIterator[Message], first: Message | None) -> AsyncIterator[str]:
    """``data: {message}`` per message, then ``data: [DONE]``; an error after the first: ``event: error``. The
    caller going away (the page's stop button) cancels the call on the gateway."""
    try:
        if first is not None:
            yield f"data: {json.dumps(as_json(first))}\n\n"
            async for reply in replies:
                yield f"data: {json.dumps(as_json(reply))}\n\n"
        yield "data: [DONE]\n\n"
    except grpc.aio.AioRpcError as err:
        yield "event: error\n" + sse_error(err)
    finally:
        call.cancel()
