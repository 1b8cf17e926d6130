"""The assistant's conversations, kept per tenant in the shared store (table ``assistant_sessions``).

A session holds its system prompt and its messages (user and assistant, oldest first). It expires ``ttl_s`` after
its last turn; expired sessions read as absent and are pruned as the tenant's sessions are listed. Its messages are
kept within ``max_chars`` characters: when a turn would pass that, the oldest messages go first (a whole user turn
with its reply), so a long conversation keeps its recent context and its prompt stays within the model's context
length. A tenant keeps at most ``max_per_tenant`` sessions; opening one more is RESOURCE_EXHAUSTED (delete some, or
let them expire). Sessions are the tenant's own: another tenant's id is simply not found.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence
from dataclasses import replace
from typing import Final

from aimass.runtime.errors import InvalidArgument, NotFound, ResourceExhausted
from aimass.store.records import SessionRecord, now_ms
from aimass.store.sql import SqlStore

SESSION_ID: Final = re.compile(r"[A-Za-z0-9._-]{1,64}")
ROLES: Final = frozenset({"user", "assistant"})


def check_session_id(session_id: str) -> None:
    if not SESSION_ID.fullmatch(session_id):
        raise InvalidArgument(
            f"session id {session_id[:80]!r} is not valid: use 1..64 characters from A-Z a-z 0-9 . _ -",
            reason="INVALID_SESSION_ID",
            metadata={"field": "config.session_id"},
        )


def within_budget(messages: Sequence[tuple[str, str]], max_chars: int) -> tuple[tuple[str, str], ...]:
    """``messages`` less the oldest ones, a user turn with its reply at a time, until they fit ``max_chars`` (the
    newest message is always kept)."""
    kept = list(messages)
    total = sum(len(content) for _, content in kept)
    while total > max_chars and len(kept) > 1:
        drop = 2 if len(kept) > 2 and kept[0][0] == "user" and kept[1][0] == "assistant" else 1
        total -= sum(len(content) for _, content in kept[:drop])
        del kept[:drop]
    return tuple(kept)


class Sessions:
    """Sessions of every tenant (the store's calls run in a thread: the store is synchronous)."""

    def __init__(self, store: SqlStore, *, ttl_s: float, max_chars: int, max_per_tenant: int) -> None:
        self.store = store
        self.ttl_ms = int(ttl_s * 1000)
        self.max_chars = max_chars
        self.max_per_tenant = max_per_tenant

    async def open(self, tenant: str, session_id: str, system_prompt: str) -> tuple[SessionRecord, bool]:
        """The session (created when absent), and whether it existed; a non-empty ``system_prompt`` replaces the
        session's."""
        check_session_id(session_id)
        now = now_ms()
        found = await asyncio.to_thread(self.store.get_session, tenant, session_id, now)
        if found is not None:
            if system_prompt and system_prompt != found.system_prompt:
                found = replace(found, system_prompt=system_prompt)
            return found, True
        count = await asyncio.to_thread(self.store.count_sessions, tenant, now)
        if count >= self.max_per_tenant:
            raise ResourceExhausted(
                f"this tenant keeps {count} assistant sessions, the most allowed (assistant.max_sessions_per_tenant "
                f"{self.max_per_tenant}); delete some (AssistantService.DeleteSession) or let them expire",
                reason="TOO_MANY_SESSIONS",
                metadata={"limit": str(self.max_per_tenant)},
            )
        record = SessionRecord(
            tenant_id=tenant,
            session_id=session_id,
            system_prompt=system_prompt,
            messages=(),
            created_unix_ms=now,
            updated_unix_ms=now,
            expires_unix_ms=now + self.ttl_ms,
        )
        return record, False

    async def add_turn(self, record: SessionRecord, user: str, reply: str) -> SessionRecord:
        """Stores the session with a user turn and its reply appended (within the budget), its expiry renewed."""
        now = now_ms()
        turn = (("user", user), ("assistant", reply)) if reply else (("user", user),)
        stored = replace(
            record,
            messages=within_budget((*record.messages, *turn), self.max_chars),
            updated_unix_ms=now,
            expires_unix_ms=now + self.ttl_ms,
        )
        await asyncio.to_thread(self.store.put_session, stored)
        return stored

    async def list(self, tenant: str) -> list[SessionRecord]:
        now = now_ms()
        await asyncio.to_thread(self.store.prune_sessions, tenant, now)
        return await asyncio.to_thread(self.store.list_sessions, tenant, now)

    async def get(self, tenant: str, session_id: str) -> SessionRecord:
        check_session_id(session_id)
        found = await asyncio.to_thread(self.store.get_session, tenant, session_id, now_ms())
        if found is None:
            raise self._not_found(session_id)
        return found

    async def delete(self, tenant: str, session_id: str) -> None:
        check_session_id(session_id)
        if not await asyncio.to_thread(self.store.delete_session, tenant, session_id):
            raise self._not_found(session_id)

    @staticmethod
    def _not_found(session_id: str) -> NotFound:
        return NotFound(
            f"no assistant session {session_id!r} for this tenant (it may have expired)",
            reason="SESSION_NOT_FOUND",
            metadata={"session_id": session_id},
        )
