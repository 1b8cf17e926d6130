"""A replica's membership in the registry: register, heartbeat with its state, re-register, leave."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging

import grpc

from aimass.runtime.discovery.base import Instance, Registry
from aimass.runtime.tasks import cancel_and_wait
from aimass.v1 import common_pb2

log = logging.getLogger(__name__)


class Membership:
    """Keeps ``instance`` registered while the process runs, surviving registry restarts."""

    def __init__(self, registry: Registry, instance: Instance, *, heartbeat_s: float, ttl_s: float) -> None:
        self.registry = registry
        self.instance = instance
        self.heartbeat_s = heartbeat_s
        self.ttl_s = ttl_s
        self.state: common_pb2.ServingState.ValueType = instance.state
        self._task: asyncio.Task[None] | None = None
        self._registered = False

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"membership-{self.instance.instance_id}")

    async def set_state(self, state: common_pb2.ServingState.ValueType) -> None:
        self.state = state
        await self._beat()

    async def set_models(self, models: tuple[str, ...]) -> None:
        """Re-registers with a new model list (a model was loaded or unloaded), so gateways route by it at once."""
        self.instance = dataclasses.replace(self.instance, models=models)
        self._registered = False
        await self._beat()

    async def _beat(self) -> None:
        try:
            if self._registered and await self.registry.heartbeat(self.instance.instance_id, self.state):
                return
            await self.registry.register(dataclasses.replace(self.instance, state=self.state), self.ttl_s)
            if not self._registered:
                log.info("registered with the registry as %s", self.instance.instance_id)
            self._registered = True
        except (grpc.aio.AioRpcError, OSError) as err:
            # The registry may be starting or restarting; the next beat tries again.
            if self._registered:
                log.warning("registry unreachable (%s); will re-register", err)
            self._registered = False

    async def _run(self) -> None:
        while True:
            try:
                await self._beat()
            except Exception:
                log.exception("registry heartbeat failed unexpectedly; retrying")
            await asyncio.sleep(self.heartbeat_s)

    async def leave(self) -> None:
        """Stop heartbeating and deregister, so routers stop sending before the server drains."""
        await cancel_and_wait(self._task)
        self._task = None
        with contextlib.suppress(grpc.aio.AioRpcError, OSError):
            await self.registry.deregister(self.instance.instance_id)
