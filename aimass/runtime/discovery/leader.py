"""Leadership through a Consul session lock, so a second scheduler can stand by behind the active one.

The holder owns a Consul session (TTL ``session_ttl_s``, renewed every third of it) and holds the KV key
``leader_key`` acquired with it; the key's value names the holder. A standby follows the key with blocking queries
and tries to acquire it once no session holds it:

* the leader shuts down cleanly → it releases the key and destroys its session: the standby takes over at once;
* the leader crashes or hangs → Consul invalidates its session after the TTL, the key is released and, after the
  lock delay (``lock_delay_s``, Consul's guard against two leaders), the standby acquires it;
* Consul is unreachable → a leader keeps leading while its session may still be valid (one TTL since the last
  renewal), then steps down; a standby keeps standing by.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from aimass.runtime.config import ConsulConfig
from aimass.runtime.discovery.consul import (
    RETRY_MAX_S,
    RETRY_MIN_S,
    ConsulClient,
    ConsulError,
    ConsulRefused,
    MalformedConsulAnswer,
    go_duration,
)
from aimass.runtime.tasks import cancel_and_wait

log = logging.getLogger(__name__)

# After a failed acquire while the key looks free (Consul's lock delay), ask again this often.
LOCK_DELAY_POLL_S = 0.5


def _lock_entry(data: object) -> tuple[str, str]:
    """A KV answer for the lock key → (session holding it or "", holder's identity)."""
    if data is None:
        return "", ""
    if not isinstance(data, dict):
        raise MalformedConsulAnswer(f"the lock key's entry is a {type(data).__name__}, not an object")
    session, value = data.get("Session") or "", data.get("Value") or b""
    if not isinstance(session, str) or not isinstance(value, bytes | str):
        raise MalformedConsulAnswer("the lock key's Session or Value has the wrong type")
    holder = value.decode(errors="replace") if isinstance(value, bytes) else value
    return session, holder


class ConsulLeader:
    """Campaigns for ``config.leader_key`` as ``identity`` until ``resign``; ``on_change(True/False)`` follows."""

    def __init__(self, config: ConsulConfig, *, client: ConsulClient | None = None) -> None:
        self.config = config
        self.key = config.leader_key
        self.client = client or ConsulClient(config)
        self.leading = False
        # Who holds the lock as last seen ("" when free or not known yet).
        self.holder = ""
        self.identity = ""
        self.session = ""
        self._renewed_at = 0.0
        self._on_change: Callable[[bool], Awaitable[None]] | None = None
        self._task: asyncio.Task[None] | None = None
        self._standby_logged = ""

    def start(self, identity: str, on_change: Callable[[bool], Awaitable[None]]) -> None:
        self.identity = identity
        self._on_change = on_change
        self._task = asyncio.get_running_loop().create_task(self._campaign(), name="consul-leader")

    async def _set_leading(self, leading: bool) -> None:
        if leading == self.leading:
            return
        self.leading = leading
        if leading:
            self.holder = self.identity
            log.info("leading: holds the Consul lock %s as %s", self.key, self.identity)
        if self._on_change is not None:
            try:
                await self._on_change(leading)
            except Exception:
                log.exception("leadership change handler failed")

    async def _campaign(self) -> None:
        retry_s = RETRY_MIN_S
        while True:
            try:
                await self._ensure_session()
                if await self._acquire():
                    await self._set_leading(True)
                    await self._hold()
                    await self._set_leading(False)
                else:
                    await self._stand_by()
                retry_s = RETRY_MIN_S
                continue
            except MalformedConsulAnswer as err:
                self.client.malformed("leader lock", str(err))
            except ConsulError as err:
                if self.leading and time.monotonic() - self._renewed_at > self.config.session_ttl_s:
                    log.error(
                        "stepping down: the Consul session could not be renewed for %ds (%s); it has expired",
                        self.config.session_ttl_s,
                        err,
                    )
                    self.session = ""
                    await self._set_leading(False)
            pause = retry_s
            if self.leading:
                # Check again no later than when the session may expire: Consul invalidates it one TTL after the
                # last renewal at the earliest, and a standby takes the lock only a lock delay after that.
                pause = min(pause, max(0.05, self._renewed_at + self.config.session_ttl_s - time.monotonic()))
            await asyncio.sleep(pause)
            retry_s = min(retry_s * 2, RETRY_MAX_S)

    async def _acquire(self) -> bool:
        session = self.session
        acquired = await self.client.call("lock acquire", lambda c: c.kv.put(self.key, self.identity, acquire=session))
        if not isinstance(acquired, bool):
            raise MalformedConsulAnswer(f"lock acquire returned {acquired!r}, not true or false")
        return acquired

    async def _ensure_session(self) -> None:
        if self.session:
            try:
                await self._renew()
                return
            except ConsulRefused:
                log.warning("the Consul session %s is gone (expired or destroyed); creating another", self.session)
                self.session = ""
        created = await self.client.call(
            "session create",
            lambda c: c.session.create(
                name=f"aimass leader {self.identity}"[:128],
                lock_delay=self.config.lock_delay_s,
                ttl=self.config.session_ttl_s,
                behavior="release",
            ),
        )
        if not isinstance(created, str) or not created:
            raise MalformedConsulAnswer(f"session create returned {created!r}, not a session ID")
        self.session = created
        self._renewed_at = time.monotonic()

    async def _read_lock(self, index: int, wait_s: float) -> tuple[int, str, str]:
        raw_index, data = await self.client.call(
            "lock read",
            lambda c: c.kv.get(self.key, index=str(index) if index else None, wait=go_duration(wait_s)),
            timeout_s=self.client.blocking_timeout_s(wait_s) if index else None,
        )
        text = str(raw_index)
        if not text.isdigit():
            raise MalformedConsulAnswer(f"X-Consul-Index {raw_index!r} is not a non-negative number")
        session, holder = _lock_entry(data)
        return int(text), session, holder

    async def _hold(self) -> None:
        """While leading: follow the key (returns as soon as another session holds it, or none), renew the session."""
        renew_every = self.config.session_ttl_s / 3
        index = 0
        while True:
            wait_s = max(0.05, self._renewed_at + renew_every - time.monotonic())
            new_index, session, holder = await self._read_lock(index, wait_s)
            if session != self.session:
                log.warning(
                    "lost leadership: the lock %s is now %s", self.key, f"held by {holder}" if session else "free"
                )
                return
            index = max(new_index, 1) if new_index >= index else 0
            if time.monotonic() - self._renewed_at >= renew_every:
                try:
                    await self._renew()
                except ConsulRefused:
                    log.warning("lost leadership: the Consul session %s expired", self.session)
                    self.session = ""
                    return

    async def _renew(self) -> None:
        session = self.session
        await self.client.call("session renew", lambda c: c.session.renew(session))
        self._renewed_at = time.monotonic()

    async def _stand_by(self) -> None:
        """Until the key looks free. Right after a refused acquire the key may look free during the lock delay."""
        index, first = 0, True
        while True:
            new_index, session, holder = await self._read_lock(index, self.config.wait_s)
            self.holder = holder if session else ""
            if not session:
                if first:
                    await asyncio.sleep(LOCK_DELAY_POLL_S)
                return
            if self._standby_logged != holder:
                self._standby_logged = holder
                log.info("standing by: %s holds the Consul lock %s", holder or "another session", self.key)
            index = max(new_index, 1) if new_index >= index else 0
            first = False

    async def resign(self) -> None:
        """Stop campaigning; release the lock (the standby takes over without the lock delay) and end the session."""
        await cancel_and_wait(self._task)
        self._task = None
        session, self.session = self.session, ""
        if not session:
            return
        with contextlib.suppress(ConsulError):
            if self.leading:
                await self.client.call("lock release", lambda c: c.kv.put(self.key, self.identity, release=session))
                log.info("resigned leadership (released %s)", self.key)
            await self.client.call("session destroy", lambda c: c.session.destroy(session))
        self.leading = False

    async def close(self) -> None:
        await self.resign()
        await self.client.close()
