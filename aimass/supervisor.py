"""Runs the mesh's processes: starts them, restarts one that crashes, stops all cleanly.

Each child runs in its own session so a terminal's Ctrl-C reaches only the supervisor, which then stops the
services first (SIGTERM: they drain) and the gateway last, escalating to SIGKILL after the grace period. The
gateway's own workers (gateway/workers.py) run under the same restart policy, stopped all at once instead.
Children can be added and removed while it runs (`aimass up --autoscale`, aimass/autoscale.py).
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from aimass.runtime.tasks import cancel_and_wait

log = logging.getLogger("aimass.supervisor")

PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def _die_with_parent() -> None:
    """In the child before exec: ask Linux to SIGTERM it if the supervisor dies, so no replica is orphaned."""
    if sys.platform == "linux":
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass(frozen=True)
class ProcessSpec:
    name: str
    module: str
    env: Mapping[str, str] = field(default_factory=dict)

    def argv(self) -> list[str]:
        return [sys.executable, "-m", self.module]


class Supervised:
    """One child process and its restart policy: exponential backoff, reset after a minute of stable running."""

    def __init__(
        self, spec: ProcessSpec, *, max_backoff_s: float = 30.0, on_exit: Callable[[int], None] | None = None
    ) -> None:
        self.spec = spec
        self.max_backoff_s = max_backoff_s
        # Called with the pid of a child that exited: always when it exits on its own, not always when stop() ends it.
        self.on_exit = on_exit
        self.process: asyncio.subprocess.Process | None = None
        self.restarts = 0
        self._stopping = False
        self._task: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    async def _spawn(self) -> asyncio.subprocess.Process:
        env = {**os.environ, **self.spec.env}
        return await asyncio.create_subprocess_exec(
            *self.spec.argv(), env=env, start_new_session=True, preexec_fn=_die_with_parent
        )

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._keep_running(), name=f"supervise-{self.spec.name}")

    async def _keep_running(self) -> None:
        backoff = 1.0
        while not self._stopping:
            started = time.monotonic()
            self.process = await self._spawn()
            log.info("started %s (pid %d)", self.spec.name, self.process.pid)
            code = await self.process.wait()
            if self.on_exit is not None:
                self.on_exit(self.process.pid)
            if self._stopping:
                return
            if time.monotonic() - started > 60:
                backoff = 1.0
            self.restarts += 1
            log.warning(
                "%s exited with code %s; restarting in %.0fs (restart #%d)",
                self.spec.name,
                code,
                backoff,
                self.restarts,
            )
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.max_backoff_s)

    async def stop(self, grace_s: float) -> None:
        self._stopping = True
        process = self.process
        if process is not None and process.returncode is None:
            process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), grace_s)
            except TimeoutError:
                log.warning("%s did not stop within %.0fs; killing it", self.spec.name, grace_s)
                process.kill()
                await process.wait()
        await cancel_and_wait(self._task)


class Supervisor:
    def __init__(
        self,
        specs: Sequence[ProcessSpec],
        *,
        grace_s: float = 35.0,
        together: bool = False,
        on_exit: Callable[[int], None] | None = None,
    ) -> None:
        self.on_exit = on_exit
        self.children = [Supervised(spec, on_exit=on_exit) for spec in specs]
        self.grace_s = grace_s
        # Stop every child at once (peers such as gateway workers) rather than one after another.
        self.together = together

    def start(self) -> None:
        for child in self.children:
            child.start()

    def add(self, spec: ProcessSpec) -> Supervised:
        """One more child under the same policy, started now (aimass.autoscale's replicas); stopped with the rest."""
        child = Supervised(spec, on_exit=self.on_exit)
        self.children.append(child)
        child.start()
        return child

    async def remove(self, child: Supervised) -> None:
        """Stops one child (SIGTERM: a replica drains) and forgets it; forgotten only once stopped, so a stop of the
        whole supervisor meanwhile still reaches it."""
        await child.stop(self.grace_s)
        self.children.remove(child)

    async def stop(self) -> None:
        if self.together:
            await asyncio.gather(*(child.stop(self.grace_s) for child in self.children))
            return
        # Reverse start order: services drain while the gateway still routes their in-flight replies.
        for child in reversed(self.children):
            await child.stop(self.grace_s)
