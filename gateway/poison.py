"""Poison-request containment at the gateway: which requests crashed replicas, told apart from replicas that answered.

A replica that died under a call (the connection broke: it crashed, was killed or cut off) may have been killed by
that very request. ``CrashTable`` counts such crashes per request fingerprint (method, size and a hash of its
bytes): a first crash may be a bystander of a kill, so the forwarder retries it elsewhere; once
``max_crashes`` replicas died under the same bytes, they are poison and refused unsent until the entry expires.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc

from aimass.runtime.errors import AimassError, Unavailable
from aimass.runtime.metadata import REPLICA_KEY

# Requests from this size on are hashed in a thread (blake2b: ~1 ms per MiB), off the event loop.
HASH_IN_THREAD_BYTES = 1 << 20


class PoisonRequest(AimassError):
    """INTERNAL: the same request bytes crashed replicas; sending them again would crash more."""

    default_reason = "POISON_REQUEST"


class ReplicaCrashed(Unavailable):
    """UNAVAILABLE: the replica serving the call died under it and the call could not be run elsewhere."""

    default_reason = "REPLICA_CRASHED"


@dataclass(frozen=True, slots=True)
class Fingerprint:
    """One request's identity: its method, size and a 128-bit blake2b of its bytes."""

    method: str
    size: int
    digest: bytes

    @property
    def short(self) -> str:
        """What messages and logs show (enough to match reports to each other)."""
        return self.digest.hex()[:16]


async def fingerprint(method: str, request: bytes) -> Fingerprint:
    if len(request) >= HASH_IN_THREAD_BYTES:
        digest = await asyncio.to_thread(lambda: hashlib.blake2b(request, digest_size=16).digest())
    else:
        digest = hashlib.blake2b(request, digest_size=16).digest()
    return Fingerprint(method, len(request), digest)


@dataclass(slots=True)
class CrashRecord:
    # The replicas (instance id → address) that died serving these bytes, in order.
    replicas: dict[str, str] = field(default_factory=dict)
    last_s: float = 0.0


class CrashTable:
    """Per request fingerprint, the distinct replicas that died while serving it; an entry is forgotten ``ttl_s``
    after its last crash, when a replica answers the same bytes, or (the oldest first) past ``max_entries``.

    A fingerprint is poison once ``max_crashes`` replicas died under it. Most requests never need hashing: the
    table also counts its entries by (method, size), and only a request whose method and size match one is hashed.
    """

    def __init__(
        self, *, max_crashes: int, ttl_s: float, max_entries: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.max_crashes = max_crashes
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self.clock = clock
        # Least recent crash first (an entry moves to the end when it crashes again).
        self._entries: collections.OrderedDict[Fingerprint, CrashRecord] = collections.OrderedDict()
        self._shapes: collections.Counter[tuple[str, int]] = collections.Counter()
        self._poison_shapes: collections.Counter[tuple[str, int]] = collections.Counter()

    def __len__(self) -> int:
        self._expire()
        return len(self._entries)

    def is_poison(self, record: CrashRecord) -> bool:
        return len(record.replicas) >= self.max_crashes

    def may_hold(self, method: str, size: int) -> bool:
        """Whether a request of ``method`` and ``size`` bytes may have an entry (a cheap test before hashing)."""
        if not self._entries:
            return False
        self._expire()
        return self._shapes[(method, size)] > 0

    def may_be_poison(self, method: str, size: int) -> bool:
        if not self._poison_shapes:
            return False
        self._expire()
        return self._poison_shapes[(method, size)] > 0

    def get(self, key: Fingerprint) -> CrashRecord | None:
        self._expire()
        return self._entries.get(key)

    def record(self, key: Fingerprint, instance_id: str, address: str) -> CrashRecord:
        """Counts a crash of replica ``instance_id`` under ``key`` (once per replica) and returns the entry."""
        self._expire()
        record = self._entries.get(key)
        if record is None:
            while len(self._entries) >= self.max_entries:
                self._remove(*self._entries.popitem(last=False))
            record = self._entries[key] = CrashRecord()
            self._shapes[(key.method, key.size)] += 1
        else:
            self._entries.move_to_end(key)
        was_poison = self.is_poison(record)
        record.replicas.setdefault(instance_id, address)
        record.last_s = self.clock()
        if self.is_poison(record) and not was_poison:
            self._poison_shapes[(key.method, key.size)] += 1
        return record

    def forget(self, key: Fingerprint) -> None:
        record = self._entries.pop(key, None)
        if record is not None:
            self._remove(key, record)

    def expires_in(self, record: CrashRecord) -> float:
        return max(0.0, record.last_s + self.ttl_s - self.clock())

    def _expire(self) -> None:
        horizon = self.clock() - self.ttl_s
        while self._entries:
            key, record = next(iter(self._entries.items()))
            if record.last_s > horizon:
                return
            del self._entries[key]
            self._remove(key, record)

    def _remove(self, key: Fingerprint, record: CrashRecord) -> None:
        shape = (key.method, key.size)
        for counts in (self._shapes, self._poison_shapes) if self.is_poison(record) else (self._shapes,):
            counts[shape] -= 1
            if counts[shape] <= 0:
                del counts[shape]


def answered_by_replica(err: grpc.aio.AioRpcError) -> bool:
    """Whether the replica itself answered (its servers name themselves in a trailer on every status), as opposed
    to the call failing under it (the connection broke, or it was never reached)."""
    return any(key == REPLICA_KEY for key, _ in err.trailing_metadata() or ())


def crashed_under(err: grpc.aio.AioRpcError) -> bool:
    """UNAVAILABLE with no answer from the replica: it died, was killed or cut off while the call was on it (a
    draining replica answers UNAVAILABLE itself, with its trailer and a reason)."""
    return err.code() == grpc.StatusCode.UNAVAILABLE and not answered_by_replica(err)
