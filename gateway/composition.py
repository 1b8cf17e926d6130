"""Stages: the aimass.v1 calls a composite front door (the assistant, scenarios) makes for its caller, in the gateway.

A composite call (AssistantService.Converse, ScenarioService.RunScenario) was authenticated and admitted by the
gateway's interceptors like any call. Each of its stages is then an ordinary aimass.v1 call of the same caller:
its key must allow the method (the key's scopes), it is counted against the tenant's quotas, and it runs through the
gateway's own Forwarder handlers in this process, so it is routed, retried, hedged and traced exactly as the same
call from outside would be, with the caller's verified scope (tenant, weight, priority cap) and request id. Nothing
is re-serialised on the way: a stage sends the bytes of its request and reads the replica's bytes back.

The handlers were written for a caller's ``ServicerContext``; a stage hands them a ``StageContext`` instead. It reads
the caller's metadata, and it bounds the stage by its own deadline (a step's ``timeout``) within the caller's. What
would end the caller's call (``abort``) raises ``StageFailed`` instead, so the composite decides: name the failed
step, or go on. Headers and trailers a replica sends belong to the stage, not to the composite's caller.
Cancelling the task that reads a stage cancels the replica's work (the forwarder cancels its call), which is how a
barge-in stops a reply's generation in the engine.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, TypeVar, cast

import grpc
from google.protobuf.message import Message

from aimass.runtime.errors import AimassError
from aimass.runtime.metadata import ERROR_INFO_KEY
from aimass.runtime.scope import Metadata, deadline_of, held_to, loop_time
from aimass.v1 import common_pb2
from gateway.forwarder import Forwarder

Context = grpc.aio.ServicerContext[Any, Any]
Resp = TypeVar("Resp", bound=Message)

# ``admit(method)``: the stage's scope and quota check for the current caller, held while the stage runs (the
# gateway's ApiKeyInterceptor.stage); raises an AimassError when the caller may not make this call.
Admit = Callable[[str], contextlib.AbstractContextManager[None]]


def _no_admission(method: str) -> contextlib.AbstractContextManager[None]:
    return contextlib.nullcontext()


class StageFailed(Exception):
    """A stage's call ended with an error status: the replica's (or the gateway's, e.g. no replica serves it)."""

    def __init__(self, code: grpc.StatusCode, message: str, trailers: Metadata = ()) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.trailers = tuple(trailers)

    @property
    def info(self) -> common_pb2.ErrorInfo:
        """The ErrorInfo the error carried (empty when none)."""
        for key, value in self.trailers:
            if key == ERROR_INFO_KEY and isinstance(value, bytes):
                return common_pb2.ErrorInfo.FromString(value)
        return common_pb2.ErrorInfo()

    def as_error(self, step: str, method: str) -> AimassError:
        """The composite's error for this stage: the stage's status, reason and facts, naming the step."""
        info = self.info
        name = method.lstrip("/")
        error = AimassError(
            f"step {step!r} ({name}) failed: {self.message}",
            reason=info.reason or "STEP_FAILED",
            metadata={**info.metadata, "step": step, "method": name},
        )
        error.code = self.code
        return error

    @classmethod
    def from_rpc_error(cls, err: grpc.aio.AioRpcError) -> StageFailed:
        return cls(err.code(), err.details() or err.code().name, tuple(err.trailing_metadata() or ()))

    @classmethod
    def refused(cls, err: AimassError) -> StageFailed:
        """The gateway's own refusal of a stage (the caller's key or quotas), as the stage's failure."""
        info = common_pb2.ErrorInfo(reason=err.reason, metadata=err.metadata)
        return cls(err.code, err.message, ((ERROR_INFO_KEY, info.SerializeToString()),))


class StageContext:
    """What a Forwarder handler needs of a ServicerContext, for one stage of a composite call (see the module)."""

    def __init__(self, outer: Context, deadline: float | None) -> None:
        self._outer = outer
        self.deadline = deadline
        self._trailers: Metadata = ()
        self.initial_metadata: Metadata = ()

    def invocation_metadata(self) -> Metadata:
        return tuple(self._outer.invocation_metadata() or ())

    def time_remaining(self) -> float | None:
        return None if self.deadline is None else max(0.0, self.deadline - loop_time())

    async def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata: Metadata = ()) -> None:
        raise StageFailed(code, details or code.name, trailing_metadata)

    async def send_initial_metadata(self, metadata: Metadata) -> None:
        self.initial_metadata = tuple(metadata)

    def set_trailing_metadata(self, metadata: Metadata) -> None:
        self._trailers = tuple(metadata)

    def trailing_metadata(self) -> Metadata:
        return self._trailers

    def peer(self) -> str:
        return str(self._outer.peer())

    def auth_context(self) -> Any:
        return self._outer.auth_context()

    def cancelled(self) -> bool:
        return bool(self._outer.cancelled())

    def done(self) -> bool:
        return bool(self._outer.done())


class Stages:
    """Makes a composite call's stages for its caller (see the module)."""

    def __init__(self, forwarder: Forwarder, admit: Admit = _no_admission) -> None:
        self.forwarder = forwarder
        self.admit = admit

    @contextlib.contextmanager
    def _admitted(self, method: str) -> Iterator[None]:
        """Holds the stage's admission while it runs; a refusal is the stage's failure (StageFailed)."""
        with contextlib.ExitStack() as held:
            try:
                held.enter_context(self.admit(method))
            except AimassError as refusal:
                raise StageFailed.refused(refusal) from None
            yield

    def _context(self, outer: Context, timeout_s: float | None) -> StageContext:
        """The stage's context: its deadline is the caller's, or ``timeout_s`` from now when that comes first."""
        deadline = deadline_of(outer)
        if timeout_s is not None:
            own = loop_time() + timeout_s
            deadline = own if deadline is None else min(deadline, own)
        return StageContext(outer, deadline)

    async def unary(
        self,
        outer: Context,
        method: str,
        request: Message,
        response_type: type[Resp],
        *,
        timeout_s: float | None = None,
    ) -> Resp:
        """One unary stage; raises StageFailed when it fails (or the caller may not make it)."""
        context = self._context(outer, timeout_s)
        with self._admitted(method), held_to(context.deadline):
            raw = await self.forwarder.call_unary(method, request.SerializeToString(), cast(Any, context))
        return response_type.FromString(raw)

    async def stream(
        self,
        outer: Context,
        method: str,
        request: Message,
        response_type: type[Resp],
        *,
        timeout_s: float | None = None,
    ) -> AsyncIterator[Resp]:
        """A server-streaming stage's responses as they come; closing the iterator early cancels the stage."""
        context = self._context(outer, timeout_s)
        with self._admitted(method):
            responses = self.forwarder.call_unary_stream(method, request.SerializeToString(), cast(Any, context))
            async for raw in _relayed(responses, context.deadline):
                yield response_type.FromString(raw)

    async def bidi(
        self,
        outer: Context,
        method: str,
        requests: AsyncIterator[Message],
        response_type: type[Resp],
        *,
        timeout_s: float | None = None,
    ) -> AsyncIterator[Resp]:
        """A bidirectional stage: ``requests`` are sent as the stage reads them, responses yielded as they come."""
        context = self._context(outer, timeout_s)

        async def encoded() -> AsyncIterator[bytes]:
            async for request in requests:
                yield request.SerializeToString()

        with self._admitted(method):
            responses = self.forwarder.call_stream_stream(method, encoded(), cast(Any, context))
            async for raw in _relayed(responses, context.deadline):
                yield response_type.FromString(raw)


async def _relayed(responses: AsyncIterator[bytes], deadline: float | None) -> AsyncIterator[bytes]:
    """``responses`` (a forwarder handler's), whose call starts under ``deadline``: the handler reads the deadline
    (held_to's context variable) when it makes the replica's call, at its first step. Only that step runs under it:
    a context variable set across a generator's yields would leak into its reader's code, and could not be reset
    from another task if the generator were closed there."""
    try:
        with held_to(deadline):
            first = await anext(responses, None)
        if first is None:
            return
        yield first
        async for raw in responses:
            yield raw
    finally:
        await cast(Any, responses).aclose()
