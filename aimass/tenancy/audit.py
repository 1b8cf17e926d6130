"""The audit log: every admin action (keys, limits, model loads) and every refused credential, kept in the store.

Events are queued in memory and written in batches by a background task, never on a request's path. Refusals are
coalesced: the first of a kind (same action, outcome, peer, key and target) is written at once, the same refusal
repeated within ``coalesce_s`` becomes one more event with a count, so a flood of bad keys costs one row per
``coalesce_s`` per kind, not one per attempt. The queue is bounded (``max_pending``): past it, events are dropped
and counted (``aimass_audit_dropped_total``), so a store that is down cannot grow memory.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections import OrderedDict
from typing import Protocol

import prometheus_client

from aimass.runtime.scope import RequestScope
from aimass.runtime.tasks import cancel_and_wait
from aimass.store.records import AuditEvent, now_ms

log = logging.getLogger(__name__)

AUDIT_WRITTEN = prometheus_client.Counter("aimass_audit_events_written_total", "Audit events written to the store.")
AUDIT_DROPPED = prometheus_client.Counter(
    "aimass_audit_dropped_total", "Audit events dropped because the queue was full or the store refused them."
)
MAX_WINDOWS = 10_000


class AuditStore(Protocol):
    def add_audit(self, events: list[AuditEvent]) -> None: ...


def peer_host(peer: str) -> str:
    """ "ipv4:10.0.0.7:51234" → "10.0.0.7": who called, without the connection's ephemeral port."""
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        return rest.rsplit(":", 1)[0].strip("[]")
    return peer


@dataclasses.dataclass
class _Window:
    ends: float
    # The repeats seen since the first was written; written when the window ends.
    repeats: AuditEvent | None = None


class AuditLog:
    def __init__(
        self, store: AuditStore, *, coalesce_s: float = 10.0, flush_s: float = 0.5, max_pending: int = 10_000
    ) -> None:
        self.store = store
        self.coalesce_s = coalesce_s
        self.flush_s = flush_s
        self.max_pending = max_pending
        self._pending: list[AuditEvent] = []
        self._windows: OrderedDict[tuple[str, ...], _Window] = OrderedDict()
        self._task: asyncio.Task[None] | None = None
        self._failing = False

    def record(self, event: AuditEvent) -> None:
        """Queues ``event`` (an admin action) for writing; the peer is kept as its host."""
        if len(self._pending) >= self.max_pending:
            AUDIT_DROPPED.inc()
            return
        self._pending.append(dataclasses.replace(event, peer=peer_host(event.peer)))

    def record_action(
        self, scope: RequestScope, action: str, target: str, *, peer: str, outcome: str = "ok", detail: str = ""
    ) -> None:
        """Queues an admin action taken by the caller of ``scope`` (its tenant and key), from ``peer``."""
        self.record(
            AuditEvent(
                at_unix_ms=now_ms(),
                action=action,
                outcome=outcome,
                tenant_id=scope.tenant,
                key_id=scope.key_id,
                target=target,
                detail=detail,
                peer=peer,
            )
        )

    def refused(self, event: AuditEvent) -> None:
        """Queues a refusal, coalescing repeats of the same refusal (the same reason, from the same host, with the
        same key, for the same method) within ``coalesce_s``."""
        event = dataclasses.replace(event, peer=peer_host(event.peer))
        key = (event.action, event.outcome, event.detail, event.peer, event.key_id, event.target)
        now = time.monotonic()
        window = self._windows.get(key)
        if window is None or now >= window.ends:
            if window is not None:
                self._close(key)
            self.record(event)
            self._windows[key] = _Window(now + self.coalesce_s)
            while len(self._windows) > MAX_WINDOWS:
                self._close(next(iter(self._windows)))
        elif window.repeats is None:
            window.repeats = dataclasses.replace(event, count=1, detail=f"{event.detail} (repeated)".strip())
        else:
            window.repeats = dataclasses.replace(window.repeats, count=window.repeats.count + 1)

    def _close(self, key: tuple[str, ...]) -> None:
        window = self._windows.pop(key)
        if window.repeats is not None:
            self.record(window.repeats)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="audit-log")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.flush_s)
            await self.flush(final=False)

    async def flush(self, *, final: bool = True) -> None:
        """Writes what is queued (with ``final``, also the repeats of windows still open)."""
        now = time.monotonic()
        for key in [key for key, window in self._windows.items() if final or now >= window.ends]:
            self._close(key)
        if not self._pending:
            return
        batch, self._pending = self._pending, []
        try:
            await asyncio.to_thread(self.store.add_audit, batch)
        except Exception as err:  # the store is down or refused: count, log once per failure streak
            AUDIT_DROPPED.inc(len(batch))
            if not self._failing:
                log.error("audit log: writing %d events to the store failed (%s); dropping them", len(batch), err)
            self._failing = True
            return
        AUDIT_WRITTEN.inc(len(batch))
        if self._failing:
            log.info("audit log: the store takes events again")
        self._failing = False

    async def close(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None
        await self.flush(final=True)
