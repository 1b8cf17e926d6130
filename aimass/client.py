"""A small typed client for the aimass mesh (its gateway), sync and async.

    with Client("127.0.0.1:50051") as client:   # the API key: api_key=, else $AIMASS_API_KEY, else the admin key file
        vectors = client.embeddings(["a cat", "a kitten"], normalize=True)
    async with AsyncClient("127.0.0.1:50051") as client:
        reply = await client.classify(["Book me a flight to Rome"], ["travel", "cooking"])
    print(reply.results[0].scores[0].label)  # "travel"

Both clients hold one long-lived channel. UNAVAILABLE (replica down or draining, connection refused) and
RESOURCE_EXHAUSTED (a full queue, a tenant's quota) are retried by gRPC itself, through the channel's service config
(``channel_options``): after the delay the mesh asks for (``grpc-retry-pushback-ms``), else with exponential backoff;
a wait too long to retry on its own (a daily quota) and other codes reach the caller as ``grpc.RpcError``
(``error_info`` decodes the machine-readable detail the mesh attaches: reason, quota, retry_after_ms). Methods not
wrapped here are on the raw generated stubs: ``client.nlp``, ``client.llm``, ``client.admin``.

The API key: ``api_key=``, else the ``AIMASS_API_KEY`` environment variable, else the admin key file `aimass up`
wrote (``auth.admin_key_file``, readable by its owner only). A gateway with TLS on its front door: pass
``tls=True`` (the system's roots) or ``root_certificates=`` (PEM bytes of a private CA).

    for piece in client.chat("What is the capital of France?", temperature=0):
        print(piece.delta, end="")

Traces: a call made while an OpenTelemetry span is current (the caller's own tracing) carries its W3C trace
context (``traceparent``), so the mesh's spans join the caller's trace.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Iterator, Sequence
from types import TracebackType
from typing import Any, Final, NamedTuple, Self, TypedDict, Unpack

import grpc
import grpc.aio
from opentelemetry import propagate

from aimass.runtime.metadata import ERROR_INFO_KEY, REQUEST_ID_KEY
from aimass.v1 import admin_pb2_grpc, common_pb2, llm_pb2, llm_pb2_grpc, nlp_pb2, nlp_pb2_grpc

__all__ = [
    "DEFAULT_TARGET",
    "RETRIED_SERVICES",
    "AsyncClient",
    "Client",
    "channel_options",
    "error_info",
    "keyed_aio_channel",
    "keyed_channel",
    "resolve_api_key",
    "service_config",
]

DEFAULT_TARGET: Final = "127.0.0.1:50051"
API_KEY_ENV: Final = "AIMASS_API_KEY"
# The public aimass.v1 services the retry policy covers (control-plane services are for mesh processes only).
RETRIED_SERVICES: Final = tuple(
    f"aimass.v1.{name}"
    for name in ("NlpService", "LlmService", "VisionService", "SpeechService", "ModelService", "AdminService")
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


class CallOptions(TypedDict):
    """Keyword arguments every wrapped call passes to the generated stub."""

    timeout: float | None
    metadata: Metadata


# -- channel configuration ---------------------------------------------------------------------------------------


def service_config(max_attempts: int) -> dict[str, Any]:
    """The gRPC service config: retry UNAVAILABLE and RESOURCE_EXHAUSTED (after the server's pushback) on every public
    aimass.v1 service, up to ``max_attempts`` tries.

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
    return {"methodConfig": [method_config]}


def channel_options(max_attempts: int) -> ChannelOptions:
    """Channel arguments that install ``service_config(max_attempts)`` and turn retries on."""
    return (("grpc.service_config", json.dumps(service_config(max_attempts))), ("grpc.enable_retries", 1))


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


def _credentials(tls: bool, root_certificates: bytes | None) -> grpc.ChannelCredentials | None:
    if not tls and root_certificates is None:
        return None
    return grpc.ssl_channel_credentials(root_certificates=root_certificates)


def _sync_channel(
    target: str, credentials: grpc.ChannelCredentials | None, options: Sequence[tuple[str, Any]]
) -> grpc.Channel:
    if credentials is None:
        return grpc.insecure_channel(target, options=list(options))
    return grpc.secure_channel(target, credentials, options=list(options))


def _aio_channel(
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


# -- request builders (shared by Client and AsyncClient) --------------------------------------------------------


def _text_list(values: Sequence[str], field: str) -> list[str]:
    """``values`` as a list of str; a bare str is refused (it would be sent as one text per character)."""
    if isinstance(values, str | bytes):
        preview = values[:40]
        raise TypeError(
            f"{field} must be a sequence of str, not a single {type(values).__name__}; "
            f"wrap one text in a list: {field}=[{preview!r}]"
        )
    items = list(values)
    for index, item in enumerate(items):
        if not isinstance(item, str):
            raise TypeError(f"{field}[{index}] must be str, not {type(item).__name__}")
    return items


def _meta(request_id: str | None) -> common_pb2.RequestMeta:
    return common_pb2.RequestMeta(request_id=request_id or "")


def embed_request(
    texts: Sequence[str], *, normalize: bool = False, model: str = "", request_id: str | None = None
) -> nlp_pb2.EmbedRequest:
    return nlp_pb2.EmbedRequest(
        meta=_meta(request_id),
        model=common_pb2.ModelRef(name=model),
        texts=_text_list(texts, "texts"),
        normalize=normalize,
    )


def sentiment_request(
    texts: Sequence[str], *, model: str = "", request_id: str | None = None
) -> nlp_pb2.SentimentRequest:
    return nlp_pb2.SentimentRequest(
        meta=_meta(request_id), model=common_pb2.ModelRef(name=model), texts=_text_list(texts, "texts")
    )


def entities_request(
    texts: Sequence[str], *, model: str = "", request_id: str | None = None
) -> nlp_pb2.EntitiesRequest:
    return nlp_pb2.EntitiesRequest(
        meta=_meta(request_id), model=common_pb2.ModelRef(name=model), texts=_text_list(texts, "texts")
    )


def classify_request(
    texts: Sequence[str],
    labels: Sequence[str],
    *,
    multi_label: bool = False,
    hypothesis_template: str = "",
    model: str = "",
    request_id: str | None = None,
) -> nlp_pb2.ClassifyRequest:
    return nlp_pb2.ClassifyRequest(
        meta=_meta(request_id),
        model=common_pb2.ModelRef(name=model),
        texts=_text_list(texts, "texts"),
        labels=_text_list(labels, "labels"),
        multi_label=multi_label,
        hypothesis_template=hypothesis_template,
    )


CHAT_ROLES: Final = {
    "system": llm_pb2.CHAT_ROLE_SYSTEM,
    "user": llm_pb2.CHAT_ROLE_USER,
    "assistant": llm_pb2.CHAT_ROLE_ASSISTANT,
}
PRIORITIES: Final = {
    "low": common_pb2.PRIORITY_LOW,
    "normal": common_pb2.PRIORITY_NORMAL,
    "high": common_pb2.PRIORITY_HIGH,
    "critical": common_pb2.PRIORITY_CRITICAL,
}
# A chat is one user message (str) or (role, content) pairs, roles "system", "user", "assistant".
Chat = str | Sequence[tuple[str, str]]


def chat_request(
    messages: Chat,
    *,
    temperature: float | None = None,
    max_tokens: int = 0,
    stop: Sequence[str] = (),
    seed: int | None = None,
    priority: str = "normal",
    model: str = "",
    request_id: str | None = None,
) -> llm_pb2.ChatRequest:
    pairs = [("user", messages)] if isinstance(messages, str) else list(messages)
    chat: list[llm_pb2.ChatMessage] = []
    for index, (role, content) in enumerate(pairs):
        if role not in CHAT_ROLES:
            raise ValueError(f"messages[{index}] has role {role!r}; use one of {', '.join(CHAT_ROLES)}")
        chat.append(llm_pb2.ChatMessage(role=CHAT_ROLES[role], content=content))
    if priority not in PRIORITIES:
        raise ValueError(f"priority {priority!r} is not one of {', '.join(PRIORITIES)}")
    sampling = llm_pb2.SamplingParams(max_tokens=max_tokens, stop=_text_list(stop, "stop"))
    if temperature is not None:
        sampling.temperature = temperature
    if seed is not None:
        sampling.seed = seed
    return llm_pb2.ChatRequest(
        meta=common_pb2.RequestMeta(request_id=request_id or "", priority=PRIORITIES[priority]),
        model=common_pb2.ModelRef(name=model),
        messages=chat,
        sampling=sampling,
    )


def _vectors(response: nlp_pb2.EmbedResponse) -> list[list[float]]:
    return [list(embedding.values) for embedding in response.embeddings]


class _ClientBase:
    """Settings and per-call options common to both clients."""

    def __init__(
        self,
        target: str,
        *,
        api_key: str | None = None,
        timeout_s: float | None = 30.0,
        max_attempts: int = 4,
        tls: bool = False,
        root_certificates: bytes | None = None,
    ) -> None:
        if timeout_s is not None and timeout_s <= 0:
            raise ValueError(f"timeout_s is {timeout_s}; use a positive number of seconds, or None for no deadline")
        self.target = target
        self.timeout_s = timeout_s
        self.max_attempts = max_attempts
        self.channel_options = channel_options(max_attempts)
        self.channel_credentials = _credentials(tls, root_certificates)
        self._auth = _auth_metadata(api_key)

    def call_options(self, timeout_s: float | None = None, request_id: str | None = None) -> CallOptions:
        """Deadline (the call's, else the client's) and metadata (api key, request id, the caller's current trace
        context if any) for one call."""
        metadata = self._auth + (((REQUEST_ID_KEY, request_id),) if request_id else ())
        trace_context: dict[str, str] = {}
        propagate.inject(trace_context)
        if trace_context:
            metadata += tuple(trace_context.items())
        return CallOptions(timeout=self.timeout_s if timeout_s is None else timeout_s, metadata=metadata)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.target!r}, timeout_s={self.timeout_s}, max_attempts={self.max_attempts})"


class Client(_ClientBase):
    """Blocking client. ``timeout_s`` is the default deadline per call (None: none); every method can override it.

    Errors are ``grpc.RpcError`` with the mesh's status code and message (e.g. INVALID_ARGUMENT, NOT_FOUND).
    """

    def __init__(self, target: str = DEFAULT_TARGET, **options: Unpack[ClientOptions]) -> None:
        super().__init__(target, **options)
        self.channel = _sync_channel(target, self.channel_credentials, self.channel_options)
        self.nlp = nlp_pb2_grpc.NlpServiceStub(self.channel)
        self.llm = llm_pb2_grpc.LlmServiceStub(self.channel)
        self.admin = admin_pb2_grpc.AdminServiceStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def embed(
        self,
        texts: Sequence[str],
        *,
        normalize: bool = False,
        model: str = "",
        timeout_s: float | None = None,
        request_id: str | None = None,
    ) -> nlp_pb2.EmbedResponse:
        """Sentence embeddings, one per text in order (default model: 384 dimensions)."""
        request = embed_request(texts, normalize=normalize, model=model, request_id=request_id)
        return self.nlp.Embed(request, **self.call_options(timeout_s, request_id))

    def embeddings(
        self,
        texts: Sequence[str],
        *,
        normalize: bool = False,
        model: str = "",
        timeout_s: float | None = None,
        request_id: str | None = None,
    ) -> list[list[float]]:
        """``embed`` as plain lists of floats."""
        return _vectors(self.embed(texts, normalize=normalize, model=model, timeout_s=timeout_s, request_id=request_id))

    def sentiment(
        self, texts: Sequence[str], *, model: str = "", timeout_s: float | None = None, request_id: str | None = None
    ) -> nlp_pb2.SentimentResponse:
        """Polarity of each text: label "positive" / "negative" / "neutral" and a compound score in -1..1."""
        request = sentiment_request(texts, model=model, request_id=request_id)
        return self.nlp.Sentiment(request, **self.call_options(timeout_s, request_id))

    def entities(
        self, texts: Sequence[str], *, model: str = "", timeout_s: float | None = None, request_id: str | None = None
    ) -> nlp_pb2.EntitiesResponse:
        """Named entities (PERSON, GPE, ORG, ...) with character offsets, one document per text."""
        request = entities_request(texts, model=model, request_id=request_id)
        return self.nlp.Entities(request, **self.call_options(timeout_s, request_id))

    def classify(
        self,
        texts: Sequence[str],
        labels: Sequence[str],
        *,
        multi_label: bool = False,
        hypothesis_template: str = "",
        model: str = "",
        timeout_s: float | None = None,
        request_id: str | None = None,
    ) -> nlp_pb2.ClassifyResponse:
        """Zero-shot classification of each text against ``labels``; scores sorted highest first."""
        request = classify_request(
            texts,
            labels,
            multi_label=multi_label,
            hypothesis_template=hypothesis_template,
            model=model,
            request_id=request_id,
        )
        return self.nlp.Classify(request, **self.call_options(timeout_s, request_id))

    def chat(
        self,
        messages: Chat,
        *,
        temperature: float | None = None,
        max_tokens: int = 0,
        stop: Sequence[str] = (),
        seed: int | None = None,
        priority: str = "normal",
        model: str = "",
        timeout_s: float | None = None,
        request_id: str | None = None,
    ) -> Iterator[llm_pb2.ChatResponse]:
        """Streams the reply: ``delta`` text pieces, the last with ``finish_reason`` and ``usage``. Stop iterating
        (or let the deadline pass) and generation stops in the engine too."""
        request = chat_request(
            messages,
            temperature=temperature,
            max_tokens=max_tokens,
            stop=stop,
            seed=seed,
            priority=priority,
            model=model,
            request_id=request_id,
        )
        call = self.llm.Chat(request, **self.call_options(timeout_s, request_id))
        try:
            yield from call
        finally:
            call.cancel()


class AsyncClient(_ClientBase):
    """asyncio client (grpc.aio); the same methods as ``Client``, as coroutines. Create it inside the event loop."""

    def __init__(self, target: str = DEFAULT_TARGET, **options: Unpack[ClientOptions]) -> None:
        super().__init__(target, **options)
        self.channel = _aio_channel(target, self.channel_credentials, self.channel_options)
        self.nlp = nlp_pb2_grpc.NlpServiceStub(self.channel)
        self.llm = llm_pb2_grpc.LlmServiceStub(self.channel)
        self.admin = admin_pb2_grpc.AdminServiceStub(self.channel)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def embed(
        self,
        texts: Sequence[str],
        *,
        normalize: bool = False,
        model: str = "",
        timeout_s: float | None = None,
        request_id: str | None = None,
    ) -> nlp_pb2.EmbedResponse:
        """See ``Client.embed``."""
        request = embed_request(texts, normalize=normalize, model=model, request_id=request_id)
        return await self.nlp.Embed(request, **self.call_options(timeout_s, request_id))

    async def embeddings(
        self,
        texts: Sequence[str],
        *,
        normalize: bool = False,
        model: str = "",
        timeout_s: float | None = None,
        request_id: str | None = None,
    ) -> list[list[float]]:
        """See ``Client.embeddings``."""
        response = await self.embed(texts, normalize=normalize, model=model, timeout_s=timeout_s, request_id=request_id)
        return _vectors(response)

    async def sentiment(
        self, texts: Sequence[str], *, model: str = "", timeout_s: float | None = None, request_id: str | None = None
    ) -> nlp_pb2.SentimentResponse:
        """See ``Client.sentiment``."""
        request = sentiment_request(texts, model=model, request_id=request_id)
        return await self.nlp.Sentiment(request, **self.call_options(timeout_s, request_id))

    async def entities(
        self, texts: Sequence[str], *, model: str = "", timeout_s: float | None = None, request_id: str | None = None
    ) -> nlp_pb2.EntitiesResponse:
        """See ``Client.entities``."""
        request = entities_request(texts, model=model, request_id=request_id)
        return await self.nlp.Entities(request, **self.call_options(timeout_s, request_id))

    async def classify(
        self,
        texts: Sequence[str],
        labels: Sequence[str],
        *,
        multi_label: bool = False,
        hypothesis_template: str = "",
        model: str = "",
        timeout_s: float | None = None,
        request_id: str | None = None,
    ) -> nlp_pb2.ClassifyResponse:
        """See ``Client.classify``."""
        request = classify_request(
            texts,
            labels,
            multi_label=multi_label,
            hypothesis_template=hypothesis_template,
            model=model,
            request_id=request_id,
        )
        return await self.nlp.Classify(request, **self.call_options(timeout_s, request_id))

    async def chat(
        self,
        messages: Chat,
        *,
        temperature: float | None = None,
        max_tokens: int = 0,
        stop: Sequence[str] = (),
        seed: int | None = None,
        priority: str = "normal",
        model: str = "",
        timeout_s: float | None = None,
        request_id: str | None = None,
    ) -> AsyncIterator[llm_pb2.ChatResponse]:
        """See ``Client.chat``."""
        request = chat_request(
            messages,
            temperature=temperature,
            max_tokens=max_tokens,
            stop=stop,
            seed=seed,
            priority=priority,
            model=model,
            request_id=request_id,
        )
        call = self.llm.Chat(request, **self.call_options(timeout_s, request_id))
        try:
            async for response in call:
                yield response
        finally:
            call.cancel()


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


def _auth_metadata(api_key: str | None) -> Metadata:
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
    channel = _sync_channel(target, _credentials(tls, root_certificates), options)
    return grpc.intercept_channel(channel, _KeyInterceptor(_auth_metadata(api_key)))


def keyed_aio_channel(
    target: str = DEFAULT_TARGET,
    api_key: str | None = None,
    *,
    root_certificates: bytes | None = None,
    tls: bool = False,
    options: Sequence[tuple[str, Any]] = (),
) -> grpc.aio.Channel:
    """``keyed_channel`` for asyncio (create it inside the event loop)."""
    auth = _auth_metadata(api_key)
    interceptors: list[grpc.aio.ClientInterceptor] = [
        kind(auth) for kind in (_AioKeyedUnaryUnary, _AioKeyedUnaryStream, _AioKeyedStreamUnary, _AioKeyedStreamStream)
    ]
    return _aio_channel(target, _credentials(tls, root_certificates), options, interceptors)
