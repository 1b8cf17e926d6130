"""Conveniences over the generated methods, each written once for both clients.

A convenience is a ``prepare`` function (friendly arguments → the request of one generated method, plus the call's
deadline and request id) and a ``finish`` function (the response → what the caller wants). ``Unary`` and
``Streamed`` bind the pair to a client as a method: a plain method on ``Client``, a coroutine (``Unary``) or an
async iterator (``Streamed``) on ``AsyncClient``; mypy sees the right one through ``__get__``'s overloads.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import os
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Generic, ParamSpec, Self, TypeVar, overload

from aimass.client import generated
from aimass.client.calls import AsyncSession, SyncSession
from aimass.client.generated import DatasetService, LlmService, NlpService, SpeechService
from aimass.v1 import common_pb2, datasets_pb2, llm_pb2, nlp_pb2, speech_pb2

__all__ = [
    "CHAT_ROLES",
    "CHUNK_BYTES",
    "EXTENSION_FORMATS",
    "FORMATS",
    "PRIORITIES",
    "TASKS",
    "Chat",
    "Conveniences",
    "Planned",
    "Streamed",
    "Unary",
    "chat_request",
    "classify_request",
    "embed_request",
    "entities_request",
    "file_sha256",
    "sentiment_request",
    "upload_requests",
]

P = ParamSpec("P")
Req = TypeVar("Req")
Resp = TypeVar("Resp")
Out = TypeVar("Out")
T = TypeVar("T")

# Upload chunks: well under the contract's 4 MiB per message, and what is in memory at once.
CHUNK_BYTES: Final = 1 << 20
# Dataset tasks and formats by the names people use (the CLI's choices too).
TASKS: Final = {
    "text-classification": datasets_pb2.TRAINING_TASK_TEXT_CLASSIFICATION,
    "image-classification": datasets_pb2.TRAINING_TASK_IMAGE_CLASSIFICATION,
}
FORMATS: Final = {
    "csv": datasets_pb2.DATASET_FORMAT_CSV,
    "jsonl": datasets_pb2.DATASET_FORMAT_JSONL,
    "zip": datasets_pb2.DATASET_FORMAT_IMAGE_FOLDERS_ZIP,
}
# No format given: from the file's extension, else the server decides (the task, the file's first bytes).
EXTENSION_FORMATS: Final = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".zip": "zip"}


@dataclass(frozen=True)
class Planned(Generic[Req]):
    """One call, prepared: the request (or requests, for a client stream), its deadline and request id."""

    request: Req
    timeout_s: float | None = None
    request_id: str | None = None


def same(response: T) -> T:
    return response


def _rpc_attribute(rpc: Callable[..., Any]) -> tuple[str, str]:
    """``NlpService.embed`` → ("nlp", "embed"): where the method sits on either client."""
    owner, _, name = rpc.__qualname__.partition(".")
    service: str = getattr(generated, owner).service
    return generated.PUBLIC_SERVICES[service], name


def _like(wrapper: Callable[..., Any], prepare: Callable[..., Any], name: str, doc: str | None) -> None:
    """``help()`` shows the convenience's own name, arguments and docstring."""
    functools.update_wrapper(wrapper, prepare)
    wrapper.__name__ = wrapper.__qualname__ = name
    wrapper.__doc__ = doc
    wrapper.__signature__ = inspect.signature(prepare).replace(  # type: ignore[attr-defined]
        return_annotation=inspect.Signature.empty
    )


class Unary(Generic[P, Req, Resp, Out]):
    """A convenience over one unary or client-streaming generated method: prepare, call, finish."""

    def __init__(
        self,
        rpc: Callable[[Any, Req], Resp],
        prepare: Callable[P, Planned[Req]],
        finish: Callable[[Resp], Out],
        doc: str | None = None,
    ) -> None:
        self.group, self.name = _rpc_attribute(rpc)
        self.prepare, self.finish = prepare, finish
        self.__doc__ = doc or prepare.__doc__
        self.attribute = prepare.__name__.lstrip("_")

    def __set_name__(self, owner: type[Any], name: str) -> None:
        self.attribute = name

    @overload
    def __get__(self, client: None, owner: type[Any]) -> Self: ...
    @overload
    def __get__(self, client: SyncSession, owner: type[Any]) -> Callable[P, Out]: ...
    @overload
    def __get__(self, client: AsyncSession, owner: type[Any]) -> Callable[P, Coroutine[Any, Any, Out]]: ...
    def __get__(self, client: object, owner: type[Any]) -> Any:
        if client is None:
            return self
        method = getattr(getattr(client, self.group), self.name)
        prepare, finish = self.prepare, self.finish
        if isinstance(client, AsyncSession):

            async def call_async(*args: P.args, **kwargs: P.kwargs) -> Out:
                plan = prepare(*args, **kwargs)
                return finish(await method(plan.request, timeout_s=plan.timeout_s, request_id=plan.request_id or ""))

            _like(call_async, prepare, self.attribute, self.__doc__)
            return call_async

        def call(*args: P.args, **kwargs: P.kwargs) -> Out:
            plan = prepare(*args, **kwargs)
            return finish(method(plan.request, timeout_s=plan.timeout_s, request_id=plan.request_id or ""))

        _like(call, prepare, self.attribute, self.__doc__)
        return call


class Streamed(Generic[P, Req, Resp, Out]):
    """A convenience over one server-streaming generated method: prepare, call, finish each response."""

    def __init__(
        self,
        rpc: Callable[[Any, Req], Iterator[Resp]],
        prepare: Callable[P, Planned[Req]],
        finish: Callable[[Resp], Out],
        doc: str | None = None,
    ) -> None:
        self.group, self.name = _rpc_attribute(rpc)
        self.prepare, self.finish = prepare, finish
        self.__doc__ = doc or prepare.__doc__
        self.attribute = prepare.__name__.lstrip("_")

    def __set_name__(self, owner: type[Any], name: str) -> None:
        self.attribute = name

    @overload
    def __get__(self, client: None, owner: type[Any]) -> Self: ...
    @overload
    def __get__(self, client: SyncSession, owner: type[Any]) -> Callable[P, Iterator[Out]]: ...
    @overload
    def __get__(self, client: AsyncSession, owner: type[Any]) -> Callable[P, AsyncIterator[Out]]: ...
    def __get__(self, client: object, owner: type[Any]) -> Any:
        if client is None:
            return self
        method = getattr(getattr(client, self.group), self.name)
        prepare, finish = self.prepare, self.finish
        if isinstance(client, AsyncSession):

            async def stream_async(*args: P.args, **kwargs: P.kwargs) -> AsyncIterator[Out]:
                plan = prepare(*args, **kwargs)
                responses = method(plan.request, timeout_s=plan.timeout_s, request_id=plan.request_id or "")
                try:
                    async for response in responses:
                        yield finish(response)
                finally:
                    await responses.aclose()  # cancels the call now, not when the garbage collector gets to it

            _like(stream_async, prepare, self.attribute, self.__doc__)
            return stream_async

        def stream(*args: P.args, **kwargs: P.kwargs) -> Iterator[Out]:
            plan = prepare(*args, **kwargs)
            responses = method(plan.request, timeout_s=plan.timeout_s, request_id=plan.request_id or "")
            try:
                for response in responses:
                    yield finish(response)
            finally:
                responses.close()

        _like(stream, prepare, self.attribute, self.__doc__)
        return stream


# -- request builders -------------------------------------------------------------------------------------------


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


def file_sha256(path: Path) -> tuple[int, str]:
    """The file's size and SHA-256 (hex), read once in blocks (never whole into memory)."""
    with path.open("rb") as file:
        digest = hashlib.file_digest(file, "sha256")
        return file.tell(), digest.hexdigest()


def upload_requests(
    path: Path,
    header: datasets_pb2.UploadDatasetHeader,
    sent: Callable[[int], None] = lambda _: None,
    chunk_bytes: int = CHUNK_BYTES,
) -> Iterator[datasets_pb2.UploadDatasetRequest]:
    """The UploadDataset stream: ``header``, then the file in ``chunk_bytes`` chunks, read as gRPC takes them.
    ``sent`` is told the bytes handed over so far each time gRPC asks for more."""
    yield datasets_pb2.UploadDatasetRequest(header=header)
    done = 0
    with path.open("rb") as file:
        while chunk := file.read(chunk_bytes):
            yield datasets_pb2.UploadDatasetRequest(chunk=chunk)
            done += len(chunk)
            sent(done)


def _choice(table: Mapping[str, int], name: str, argument: str) -> int:
    if name not in table:
        raise ValueError(f"{argument} {name!r} is not one of {', '.join(sorted(table))}")
    return table[name]


# -- the conveniences, each as prepare → generated method → finish ----------------------------------------------


def _embed(
    texts: Sequence[str],
    *,
    normalize: bool = False,
    model: str = "",
    timeout_s: float | None = None,
    request_id: str | None = None,
) -> Planned[nlp_pb2.EmbedRequest]:
    """Sentence embeddings, one per text in order (default model: 384 dimensions)."""
    return Planned(embed_request(texts, normalize=normalize, model=model, request_id=request_id), timeout_s, request_id)


def _vectors(response: nlp_pb2.EmbedResponse) -> list[list[float]]:
    return [list(embedding.values) for embedding in response.embeddings]


def _sentiment(
    texts: Sequence[str], *, model: str = "", timeout_s: float | None = None, request_id: str | None = None
) -> Planned[nlp_pb2.SentimentRequest]:
    """Polarity of each text: label "positive" / "negative" / "neutral" and a compound score in -1..1."""
    return Planned(sentiment_request(texts, model=model, request_id=request_id), timeout_s, request_id)


def _entities(
    texts: Sequence[str], *, model: str = "", timeout_s: float | None = None, request_id: str | None = None
) -> Planned[nlp_pb2.EntitiesRequest]:
    """Named entities (PERSON, GPE, ORG, ...) with character offsets, one document per text."""
    return Planned(entities_request(texts, model=model, request_id=request_id), timeout_s, request_id)


def _classify(
    texts: Sequence[str],
    labels: Sequence[str],
    *,
    multi_label: bool = False,
    hypothesis_template: str = "",
    model: str = "",
    timeout_s: float | None = None,
    request_id: str | None = None,
) -> Planned[nlp_pb2.ClassifyRequest]:
    """Zero-shot classification of each text against ``labels``; scores sorted highest first."""
    request = classify_request(
        texts,
        labels,
        multi_label=multi_label,
        hypothesis_template=hypothesis_template,
        model=model,
        request_id=request_id,
    )
    return Planned(request, timeout_s, request_id)


def _chat(
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
) -> Planned[llm_pb2.ChatRequest]:
    """Streams the reply to a prompt (str) or (role, content) pairs: ``delta`` text pieces, the last with
    ``finish_reason`` and ``usage``. Stop iterating (or let the deadline pass) and generation stops in the engine
    too. Not retried once the first piece has arrived (gRPC commits a stream then)."""
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
    return Planned(request, timeout_s, request_id)


def _transcribe(
    audio: str | os.PathLike[str] | bytes,
    *,
    language: str = "",
    model: str = "",
    timeout_s: float | None = None,
    request_id: str | None = None,
) -> Planned[speech_pb2.TranscribeRequest]:
    """The text spoken in an audio file (WAV, FLAC or OGG): a path, or the file's bytes. ``language``: a hint
    ("en"); empty detects it."""
    data = audio if isinstance(audio, bytes) else Path(audio).read_bytes()
    request = speech_pb2.TranscribeRequest(
        meta=_meta(request_id), model=common_pb2.ModelRef(name=model), audio=data, language=language
    )
    return Planned(request, timeout_s, request_id)


def _upload_dataset(
    path: str | os.PathLike[str],
    *,
    name: str,
    task: str = "text-classification",
    format: str = "",
    text_column: str = "",
    label_column: str = "",
    progress: Callable[[int, int], None] | None = None,
    timeout_s: float | None = None,
    request_id: str | None = None,
) -> Planned[Iterable[datasets_pb2.UploadDatasetRequest]]:
    """Uploads a dataset file (CSV, JSONL, or a ZIP of image folders) in 1 MiB chunks, with its size and SHA-256
    so the mesh refuses an upload past the quota before any byte is sent and checks what arrived. ``task``:
    text-classification or image-classification; ``format``: csv, jsonl or zip (empty: from the file's extension,
    else the server decides from the task and the file's first bytes); ``progress(sent_bytes, total_bytes)`` is
    called as chunks go out. Returns the stored dataset with its validation report. Never retried (a client
    stream): on an error, run it again; an interrupted upload stores nothing."""
    file = Path(path)
    fmt = format or EXTENSION_FORMATS.get(file.suffix.lower(), "")
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no such file")
    total, sha256 = file_sha256(file)
    if total == 0:
        raise ValueError(f"{file} is empty: nothing to upload")
    header = datasets_pb2.UploadDatasetHeader(
        meta=_meta(request_id),
        name=name,
        task=_choice(TASKS, task, "task"),  # type: ignore[arg-type]
        format=_choice(FORMATS, fmt, "format") if fmt else datasets_pb2.DATASET_FORMAT_UNSPECIFIED,  # type: ignore[arg-type]
        size_bytes=total,
        sha256=sha256,
        text_column=text_column,
        label_column=label_column,
    )
    told = progress or (lambda _done, _total: None)
    return Planned(upload_requests(file, header, lambda done: told(done, total)), timeout_s, request_id)


class Conveniences:
    """The conveniences both clients have (``Client`` blocking, ``AsyncClient`` coroutines/async iterators)."""

    embed = Unary(NlpService.embed, _embed, same)
    embeddings = Unary(NlpService.embed, _embed, _vectors, doc="``embed`` as plain lists of floats.")
    sentiment = Unary(NlpService.sentiment, _sentiment, same)
    entities = Unary(NlpService.entities, _entities, same)
    classify = Unary(NlpService.classify, _classify, same)
    chat = Streamed(LlmService.chat, _chat, same)
    transcribe = Unary(SpeechService.transcribe, _transcribe, same)
    upload_dataset = Unary(DatasetService.upload_dataset, _upload_dataset, same)
