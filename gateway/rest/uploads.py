"""Multipart uploads (audio files, images): the caller's key is checked before the body is read, then the form is
read under the front door's upload limit.

A bad key must not cost the server a 25 MiB read, so upload routes depend on ``infer_caller``: it asks the
gateway who the key is (AdminService.WhoAmI, the gateway's own verification) and whether it has the ``infer``
scope, before any body byte is read (WhoAmI is outside the tenant's request quotas: the upload's own call is what
counts). Answers are kept briefly per key hash, so a client sending many files costs the gateway one WhoAmI per
``KEY_CACHE_S``, not one per file; a body that declares at most ``CHECK_ABOVE_BYTES`` is cheap to read and skips
the extra call (the gateway refuses a bad key on the real call, with the same status). The key is still verified
again by the gateway on the real call: the cache only decides who may upload, never who is served.
The body itself is bounded by the app's BodyLimit middleware (413 before it is read on).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Annotated, Final

import grpc
from fastapi import Depends, Request
from starlette.datastructures import FormData, UploadFile

from aimass.v1 import admin_pb2
from gateway.rest.errors import OpenAIError, from_rpc_error
from gateway.rest.upstream import Upstream, call_metadata, call_timeout, upstream

KEY_CACHE_S: Final = 10.0
# Bodies declared this small are read before the gateway judges the key (on the call itself).
CHECK_ABOVE_BYTES: Final = 1 << 20
MAX_CACHED_KEYS: Final = 10_000
SCOPE_INFER: Final = "infer"
# Form fields other than files are short (a model name, a language, a prompt).
MAX_FIELD_BYTES: Final = 64 * 1024


@dataclass(frozen=True, slots=True)
class Caller:
    tenant: str
    scopes: frozenset[str]


# key hash -> (monotonic expiry, the caller, or the refusal the gateway gave); one per app (per gateway behind it).
KeyCache = dict[str, tuple[float, "Caller | OpenAIError"]]


def _cache_of(request: Request) -> KeyCache:
    cache: KeyCache | None = getattr(request.app.state, "upload_key_cache", None)
    if cache is None:
        cache = request.app.state.upload_key_cache = {}
    return cache


def _key_hash(request: Request) -> str:
    presented = request.headers.get("authorization", "") + "\0" + request.headers.get("x-api-key", "")
    return hashlib.sha256(presented.encode("utf-8", "surrogateescape")).hexdigest()


async def _who(request: Request, up: Upstream) -> Caller | OpenAIError | None:
    """The key's caller, the gateway's refusal, or None when the gateway does not verify keys (auth off)."""
    try:
        reply: admin_pb2.WhoAmIResponse = await up.admin.WhoAmI(
            admin_pb2.WhoAmIRequest(), metadata=call_metadata(request), timeout=min(call_timeout(request) or 10, 10)
        )
    except grpc.aio.AioRpcError as err:
        if err.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
            return from_rpc_error(err)
        if err.code() == grpc.StatusCode.FAILED_PRECONDITION:
            return None  # auth off: there are no keys to check
        raise  # the gateway is down or busy: the caller sees that (503/429), as on any call
    return Caller(reply.tenant_id, frozenset(reply.scopes))


async def infer_caller(request: Request, up: Annotated[Upstream, Depends(upstream)]) -> Caller | None:
    """FastAPI dependency of upload routes: 401 for a missing or bad key and 403 for a key without the ``infer``
    scope, before the body is read. None with auth off, and for small bodies (left to the call itself)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) <= CHECK_ABOVE_BYTES:
        return None
    key, cache = _key_hash(request), _cache_of(request)
    now = time.monotonic()
    cached = cache.get(key)
    if cached is not None and cached[0] > now:
        found: Caller | OpenAIError | None = cached[1]
    else:
        found = await _who(request, up)
        if found is not None:
            if len(cache) >= MAX_CACHED_KEYS:
                for stale in [k for k, (expiry, _) in cache.items() if expiry <= now] or list(cache)[:1000]:
                    cache.pop(stale, None)
            cache[key] = (now + KEY_CACHE_S, found)
    if isinstance(found, OpenAIError):
        raise found
    if found is not None and SCOPE_INFER not in found.scopes:
        raise OpenAIError(
            403,
            f"this key of tenant {found.tenant!r} lacks the {SCOPE_INFER!r} scope that calling models needs "
            f"(it has: {', '.join(sorted(found.scopes)) or 'none'})",
            code="permission_denied",
        )
    return found


# What a route that reads an upload declares (``dependencies=[KEY_CHECKED]``): the check runs before the body is read.
KEY_CHECKED = Depends(infer_caller)


async def read_form(request: Request, *, max_files: int) -> FormData:
    """The multipart form, files spooled by Starlette (memory up to 1 MiB each, then a temporary file) and the
    whole body bounded by the BodyLimit middleware. Anything but multipart/form-data is a clear 400."""
    content_type = request.headers.get("content-type", "")
    if not content_type.lower().startswith("multipart/form-data"):
        raise OpenAIError(
            400,
            f"send this request as multipart/form-data (it came as {content_type.split(';')[0] or 'no content type'})",
            code="invalid_content_type",
        )
    return await request.form(max_files=max_files, max_fields=64, max_part_size=MAX_FIELD_BYTES)


def text_field(form: FormData, name: str, default: str = "") -> str:
    value = form.get(name)
    if value is None:
        return default
    if not isinstance(value, str):
        raise OpenAIError(400, f"'{name}' must be a form field, not a file", param=name)
    return value.strip()


def files_of(form: FormData, name: str) -> list[UploadFile]:
    """The files sent under ``name`` (a text field there is refused: it would be a file's path or URL)."""
    found: list[UploadFile] = []
    for value in form.getlist(name):
        if not isinstance(value, UploadFile):
            raise OpenAIError(
                400,
                f"'{name}' must be a file upload (multipart file part), not a text field; this server never fetches "
                "URLs or reads paths",
                param=name,
            )
        found.append(value)
    return found
