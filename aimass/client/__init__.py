"""A typed client for the aimass mesh (its gateway), blocking and asyncio: every public RPC, plus conveniences.

    with Client("127.0.0.1:50051") as client:   # the API key: api_key=, else $AIMASS_API_KEY, else the admin key file
        vectors = client.embeddings(["a cat", "a kitten"], normalize=True)
        me = client.admin.who_am_i()             # any public RPC: client.<service>.<rpc in snake_case>(fields...)
    async with AsyncClient("127.0.0.1:50051") as client:
        reply = await client.classify(["Book me a flight to Rome"], ["travel", "cooking"])
    print(reply.results[0].scores[0].label)  # "travel"

Every public aimass.v1 service is an attribute (``nlp``, ``vision``, ``speech``, ``llm``, ``models``, ``admin``,
``datasets``, ``training``, ``deployments``) whose methods are generated from the protos by codegen.py at build
time: keyword arguments typed from the request's fields, or a whole request message; the response (unary), an
iterator of responses (server streams), an iterable of requests in (client streams); ``timeout_s=`` and
``request_id=`` on every call. Conveniences written once for both clients (shortcuts.py): ``embed``,
``embeddings``, ``sentiment``, ``entities``, ``classify``, ``chat``, ``transcribe`` (a file), ``upload_dataset``
(a file, with progress).

Both clients hold one long-lived channel. UNAVAILABLE (replica down or draining, connection refused) and
RESOURCE_EXHAUSTED (a full queue, a tenant's quota) are retried by gRPC itself on every public service, through the
channel's service config (``channel_options``): after the delay the mesh asks for (``grpc-retry-pushback-ms``), else
with exponential backoff; a wait too long to retry on its own (a daily quota) and other codes reach the caller as
``grpc.RpcError`` (``error_info`` decodes the machine-readable detail the mesh attaches: reason, quota,
retry_after_ms). A stream is retried only until its first response arrives: a failure midway reaches the caller.

The API key: ``api_key=``, else the ``AIMASS_API_KEY`` environment variable, else the admin key file `aimass up`
wrote (``auth.admin_key_file``, readable by its owner only). A gateway with TLS on its front door: pass
``tls=True`` (the system's roots) or ``root_certificates=`` (PEM bytes of a private CA).

    for piece in client.chat("What is the capital of France?", temperature=0):
        print(piece.delta, end="")

Traces: a call made while an OpenTelemetry span is current (the caller's own tracing) carries its W3C trace
context (``traceparent``), so the mesh's spans join the caller's trace.
"""

from aimass.client.calls import CallOptions
from aimass.client.channels import (
    API_KEY_ENV,
    DEFAULT_TARGET,
    MAX_ATTEMPTS_LIMIT,
    RETRIED_SERVICES,
    ClientOptions,
    channel_options,
    error_info,
    keyed_aio_channel,
    keyed_channel,
    resolve_api_key,
    service_config,
)
from aimass.client.clients import AsyncClient, Client
from aimass.client.shortcuts import (
    CHAT_ROLES,
    PRIORITIES,
    Chat,
    chat_request,
    classify_request,
    embed_request,
    entities_request,
    sentiment_request,
)

__all__ = [
    "API_KEY_ENV",
    "CHAT_ROLES",
    "DEFAULT_TARGET",
    "MAX_ATTEMPTS_LIMIT",
    "PRIORITIES",
    "RETRIED_SERVICES",
    "AsyncClient",
    "CallOptions",
    "Chat",
    "Client",
    "ClientOptions",
    "channel_options",
    "chat_request",
    "classify_request",
    "embed_request",
    "entities_request",
    "error_info",
    "keyed_aio_channel",
    "keyed_channel",
    "resolve_api_key",
    "sentiment_request",
    "service_config",
]
