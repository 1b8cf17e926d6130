"""The request scope: who a call is for and on what terms, built once per call and read by every handler.

The gateway builds it from the caller's verified API key (gateway/auth.py) and hands it to replicas as metadata
(``x-aimass-tenant``, ``x-aimass-tenant-weight``, ``x-aimass-max-priority``, ``x-aimass-key-id``) that only the
gateway may send: replicas accept calls from gateways alone (mesh mTLS, aimass.runtime.identity) and drop nothing a
caller wrote, because callers never reach them. On a replica, ``ScopeInterceptor`` (aimass.runtime.interceptors)
reads that metadata and the call's deadline into a context variable; handlers, batchers and engines call
``current_scope()`` instead of re-reading metadata by hand.

Priorities live here too, in one table: ``RequestMeta.priority`` → rank, 0 the most urgent. Batchers keep a queue
per rank; the LLM engine (vLLM, lower first) takes the rank as its priority class.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Final, TypedDict

import grpc

from aimass.runtime.errors import InvalidArgument
from aimass.runtime.metadata import (
    INTERNAL_PREFIX,
    KEY_ID_KEY,
    MAX_PRIORITY_KEY,
    REQUEST_ID_KEY,
    TENANT_KEY,
    TENANT_WEIGHT_KEY,
    metadata_values,
    new_request_id,
    request_id_of,
)
from aimass.v1 import common_pb2

# RequestMeta.priority → rank, most urgent first. Unset is NORMAL.
PRIORITY_RANK: Final[dict[int, int]] = {
    common_pb2.PRIORITY_CRITICAL: 0,
    common_pb2.PRIORITY_HIGH: 1,
    common_pb2.PRIORITY_NORMAL: 2,
    common_pb2.PRIORITY_UNSPECIFIED: 2,
    common_pb2.PRIORITY_LOW: 3,
}
RANK_NAMES: Final = ("CRITICAL", "HIGH", "NORMAL", "LOW")
# Rank → the Priority value it stands for (unset reads as NORMAL).
PRIORITY_OF_RANK: Final = (
    common_pb2.PRIORITY_CRITICAL,
    common_pb2.PRIORITY_HIGH,
    common_pb2.PRIORITY_NORMAL,
    common_pb2.PRIORITY_LOW,
)


def priority_rank(priority: int) -> int:
    """The rank of a ``RequestMeta.priority`` value, INVALID_ARGUMENT (saying which exist) for anything else."""
    rank = PRIORITY_RANK.get(priority)
    if rank is None:
        raise InvalidArgument(
            f"meta.priority is {priority}, which is not a Priority value; send PRIORITY_LOW (1), PRIORITY_NORMAL (2),"
            " PRIORITY_HIGH (3), PRIORITY_CRITICAL (4) or leave it unset (NORMAL)",
            reason="BAD_PRIORITY",
        )
    return rank


def priority_named(name: str) -> int:
    """ "HIGH" (or "PRIORITY_HIGH", any case) → ``PRIORITY_HIGH``; ValueError listing the names otherwise."""
    key = name.strip().upper().removeprefix("PRIORITY_")
    if key not in RANK_NAMES:
        raise ValueError(f"priority {name!r} is not one of {', '.join(reversed(RANK_NAMES))}")
    return PRIORITY_OF_RANK[RANK_NAMES.index(key)]


def priority_name(priority: int) -> str:
    """``PRIORITY_HIGH`` → "HIGH" (unset reads NORMAL)."""
    return RANK_NAMES[priority_rank(priority)]


class QueueTerms(TypedDict):
    """How a call waits in a replica's queues (DynamicBatcher.submit's keywords)."""

    priority: int
    deadline: float | None
    tenant: str
    weight: float


@dataclass(frozen=True, slots=True)
class RequestScope:
    """One call's terms. The defaults are a call nobody vouched for: anonymous, weight 1, any priority."""

    tenant: str = ""
    # Fair-share weight of the tenant (a tenant of weight 2 is due twice the service).
    weight: float = 1.0
    # The most urgent priority the tenant may use; higher asks are lowered to it.
    max_priority: int = common_pb2.PRIORITY_CRITICAL
    # The API key the call came with (its public id, never the key), and what it may do; gateway side only.
    key_id: str = ""
    scopes: frozenset[str] = field(default_factory=frozenset)
    request_id: str = ""
    # Absolute, on the event loop's clock; None: no deadline.
    deadline: float | None = None

    def rank(self, priority: int) -> int:
        """The rank this call runs at: ``priority`` checked, then lowered to the tenant's ``max_priority``."""
        return max(priority_rank(priority), priority_rank(self.max_priority))

    def priority(self, priority: int) -> int:
        """``priority`` checked and capped, as a ``Priority`` value."""
        return PRIORITY_OF_RANK[self.rank(priority)]

    def queue_terms(self, priority: int) -> QueueTerms:
        """This call's terms in a queue, asking for ``priority`` (checked and capped)."""
        return QueueTerms(
            priority=self.priority(priority), deadline=self.deadline, tenant=self.tenant, weight=self.weight
        )

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """The scope as the metadata a gateway sends replicas (read back by ``from_metadata``)."""
        entries = [(TENANT_KEY, self.tenant), (TENANT_WEIGHT_KEY, repr(self.weight))]
        entries.append((MAX_PRIORITY_KEY, str(self.max_priority)))
        if self.key_id:
            entries.append((KEY_ID_KEY, self.key_id))
        return tuple(entries)

    @classmethod
    def from_metadata(cls, metadata: Iterable[Any] | None, *, deadline: float | None) -> RequestScope:
        """What a replica knows of a call: the gateway's metadata (values out of range read as the defaults)."""
        found = metadata_values(metadata, (TENANT_KEY, TENANT_WEIGHT_KEY, MAX_PRIORITY_KEY, KEY_ID_KEY, REQUEST_ID_KEY))
        return cls(
            tenant=found[TENANT_KEY],
            weight=_weight(found[TENANT_WEIGHT_KEY]),
            max_priority=_max_priority(found[MAX_PRIORITY_KEY]),
            key_id=found[KEY_ID_KEY],
            request_id=found[REQUEST_ID_KEY],
            deadline=deadline,
        )


def _weight(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        return 1.0
    return value if math.isfinite(value) and value > 0 else 1.0


def _max_priority(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        return common_pb2.PRIORITY_CRITICAL
    return (
        value if value in PRIORITY_RANK and value != common_pb2.PRIORITY_UNSPECIFIED else common_pb2.PRIORITY_CRITICAL
    )


Metadata = tuple[tuple[str, str | bytes], ...]
# Transport headers that grpc sets per hop, and the caller's credentials (verified at the gateway, never passed on);
# everything else the caller sent (traceparent, x-request-id, its own labels) passes through, except the mesh's own
# x-aimass-* headers, which are written from the call's verified scope.
HOP_BY_HOP = frozenset(
    {"user-agent", "content-type", "te", "grpc-accept-encoding", "grpc-encoding", "grpc-timeout"}
    | {"authorization", "x-api-key"}
)


def forwarded_metadata(context: grpc.aio.ServicerContext[Any, Any]) -> Metadata:
    """For a call made on behalf of the one being handled (the gateway forwarding it, the scheduler applying it on
    replicas): the caller's metadata minus per-hop headers, credentials and x-aimass-* headers, plus the call's
    verified scope (tenant, weight, priority cap, key id) and a request id when the caller sent none."""
    incoming = context.invocation_metadata() or ()
    kept: Metadata = tuple(
        (key, value)
        for key, value in incoming
        if not key.startswith(":") and key not in HOP_BY_HOP and not key.startswith(INTERNAL_PREFIX)
    )
    scope = current_scope().metadata()
    if request_id_of(incoming):
        return (*kept, *scope)
    return (*kept, *scope, (REQUEST_ID_KEY, new_request_id()))


# Outside any call (and on a replica called without a gateway's metadata): nobody in particular.
ANONYMOUS: Final = RequestScope()
_CURRENT: contextvars.ContextVar[RequestScope] = contextvars.ContextVar("aimass_request_scope", default=ANONYMOUS)


def current_scope() -> RequestScope:
    """The scope of the call being handled (a default, anonymous one outside any call)."""
    return _CURRENT.get()


@contextlib.contextmanager
def entered(scope: RequestScope) -> Any:
    """Makes ``scope`` the current one for the code inside (the call's handler)."""
    token = _CURRENT.set(scope)
    try:
        yield scope
    finally:
        _CURRENT.reset(token)


# The deadline the server holds the current call to (the caller's, cut to the method's maximum, or the method's
# default when the caller set none), on the event loop's clock; set by DeadlineInterceptor.
_DEADLINE: contextvars.ContextVar[float | None] = contextvars.ContextVar("aimass_call_deadline", default=None)


@contextlib.contextmanager
def held_to(deadline: float | None) -> Any:
    """Makes ``deadline`` the current call's deadline for the code inside."""
    token = _DEADLINE.set(deadline)
    try:
        yield deadline
    finally:
        _DEADLINE.reset(token)


def held_deadline() -> float | None:
    """The deadline the server holds the current call to (None outside a call, or with none)."""
    return _DEADLINE.get()


def loop_time() -> float:
    """The event loop's clock, which deadlines are on: asyncio's loop time is time.monotonic() (uvloop's is the same
    CLOCK_MONOTONIC in millisecond steps). Read directly: on Python 3.11 asyncio.get_running_loop() costs a getpid()
    system call, and a forwarded call read the clock several times."""
    return time.monotonic()


def deadline_of(context: grpc.aio.ServicerContext[Any, Any]) -> float | None:
    """The call's deadline on the event loop's clock: the one the server holds it to, else the caller's."""
    held = _DEADLINE.get()
    if held is not None:
        return held
    remaining = context.time_remaining()
    return None if remaining is None else loop_time() + remaining


def time_remaining(context: grpc.aio.ServicerContext[Any, Any]) -> float | None:
    """Seconds left before the call's deadline (``deadline_of``), for the timeout of calls made on its behalf."""
    deadline = deadline_of(context)
    return None if deadline is None else max(0.0, deadline - loop_time())
