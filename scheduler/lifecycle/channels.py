"""The control plane's channels to mesh processes (trainers, replicas): one long-lived channel per instance, dialled
with the scheduler's mesh certificate and closed when the instance leaves the registry."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

import grpc

from aimass.runtime.discovery import Instance
from aimass.runtime.identity import MeshCredentials, mesh_channel

# Keepalive pings notice a host that vanished or froze: a job's stream then fails and the job is queued again.
CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.ping_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.max_receive_message_length", 32 << 20),
    ("grpc.max_send_message_length", 32 << 20),
]


class MeshChannels:
    def __init__(self, credentials: MeshCredentials | None) -> None:
        self.credentials = credentials
        self._channels: dict[str, tuple[str, grpc.aio.Channel]] = {}
        # Closes of channels replaced by a new address, kept referenced until done.
        self._closing: set[asyncio.Task[None]] = set()

    def channel_for(self, instance: Instance) -> grpc.aio.Channel:
        known = self._channels.get(instance.instance_id)
        if known is not None and known[0] == instance.address:
            return known[1]
        channel = mesh_channel(instance.address, self.credentials, server_role=instance.kind, options=CHANNEL_OPTIONS)
        self._channels[instance.instance_id] = (instance.address, channel)
        if known is not None:
            task = asyncio.get_running_loop().create_task(known[1].close())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)
        return channel

    async def keep(self, instances: Iterable[Instance]) -> None:
        """Closes the channels of instances no longer listed."""
        live = {i.instance_id for i in instances}
        for instance_id in set(self._channels) - live:
            _, channel = self._channels.pop(instance_id)
            await channel.close()

    async def close(self) -> None:
        for _, channel in self._channels.values():
            await channel.close()
        self._channels.clear()
