"""What every call of both clients shares: settings, per-call options, building a request from keywords.

The generated service groups (aimass/client/generated.py) and the conveniences (shortcuts.py) call through these;
nothing here knows a particular RPC.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Iterator, Mapping
from typing import Any, TypedDict, TypeVar

import grpc
import grpc.aio
from google.protobuf.message import Message
from opentelemetry import propagate

from aimass.client.channels import Metadata, auth_metadata, channel_options, credentials
from aimass.runtime.metadata import REQUEST_ID_KEY
from aimass.v1 import common_pb2, datasets_pb2

__all__ = ["AsyncGroup", "AsyncSession", "CallOptions", "ClientBase", "Group", "SyncSession", "build", "iterate"]

M = TypeVar("M", bound=Message)
T = TypeVar("T")

# Reference messages a caller may name with a plain string (codegen.NAMED_REFS says the same for the annotations).
NAMED_REFS: dict[str, Callable[..., Message]] = {
    common_pb2.ModelRef.DESCRIPTOR.full_name: common_pb2.ModelRef,
    datasets_pb2.DatasetRef.DESCRIPTOR.full_name: datasets_pb2.DatasetRef,
}


class CallOptions(TypedDict):
    """Keyword arguments every call passes to the generated stub."""

    timeout: float | None
    metadata: Metadata


class ClientBase:
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
        self.channel_credentials = credentials(tls, root_certificates)
        self._auth = auth_metadata(api_key)

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


class SyncSession(ClientBase):
    """A client on a blocking channel (``Client``)."""

    channel: grpc.Channel


class AsyncSession(ClientBase):
    """A client on an asyncio channel (``AsyncClient``)."""

    channel: grpc.aio.Channel


class Group:
    """One service's methods on a blocking client."""

    def __init__(self, session: SyncSession) -> None:
        self.options = session.call_options


class AsyncGroup:
    """One service's methods on an asyncio client."""

    def __init__(self, session: AsyncSession) -> None:
        self.options = session.call_options


def _is_set(field: Any, value: object) -> bool:  # field: a FieldDescriptor (pure Python or upb)
    """Whether a keyword was given: not None, not an empty sequence/mapping, not a proto3 scalar's default."""
    if value is None:
        return False
    if field.is_repeated:
        return len(value) > 0  # type: ignore[arg-type]
    if field.has_presence:
        return True
    return bool(value != field.default_value)


def build(
    message_type: type[M],
    request: M | None,
    fields: Mapping[str, object],
    *,
    request_id: str = "",
    priority: int = 0,
) -> M:
    """The request of one call: ``request`` as given, or a new ``message_type`` of the keyword ``fields`` given;
    ``request_id``/``priority`` go into its ``meta``. Refuses, before anything is sent, what protobuf would take
    wrongly or silently: both a request and fields, a bare str for a repeated field, two members of one oneof."""
    descriptor = message_type.DESCRIPTOR
    given = {name: value for name, value in fields.items() if _is_set(descriptor.fields_by_name[name], value)}
    if request is not None:
        if not isinstance(request, message_type):
            raise TypeError(f"request must be a {descriptor.full_name}, not {type(request).__name__}")
        if given:
            raise TypeError(
                f"pass either a {descriptor.name} or its fields as keywords, not both (got {', '.join(given)})"
            )
        message = request
    else:
        kwargs: dict[str, Any] = {}
        for name, value in given.items():
            field = descriptor.fields_by_name[name]
            if field.is_repeated and isinstance(value, str | bytes) and not field.message_type:
                raise TypeError(
                    f"{name} must be a sequence, not a single {type(value).__name__}; wrap one item in a list: "
                    f"{name}=[{value[:40]!r}]"
                )
            if field.message_type is not None and isinstance(value, str):
                ref = NAMED_REFS.get(field.message_type.full_name)
                if ref is None:
                    raise TypeError(f"{name} must be a {field.message_type.full_name}, not str")
                value = ref(name=value)
            kwargs[name] = value
        for oneof in descriptor.oneofs:
            members = [f.name for f in oneof.fields if f.name in kwargs]
            if len(members) > 1 and not oneof.name.startswith("_"):  # "_x": proto3 optional's synthetic oneof
                raise TypeError(f"{', '.join(members)} are alternatives ({oneof.name}): set one of them")
        message = message_type(**kwargs)
    if (request_id or priority) and "meta" in descriptor.fields_by_name:
        if request is not None:
            message = message_type()  # a copy: the caller's request stays as it was
            message.CopyFrom(request)
        meta = getattr(message, "meta")  # noqa: B009 - not every request type has one; mypy cannot see it
        if request_id:
            meta.request_id = request_id
        if priority:
            meta.priority = priority
    return message


def iterate(requests: Iterable[T] | AsyncIterable[T]) -> Iterator[T] | AsyncIterator[T]:
    """A client stream's requests as grpc.aio takes them: a plain or an async iterable, as the caller has them."""
    return aiter(requests) if isinstance(requests, AsyncIterable) else iter(requests)
