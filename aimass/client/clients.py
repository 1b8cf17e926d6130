"""``Client`` (blocking) and ``AsyncClient`` (asyncio): one long-lived channel each, every public RPC as a typed
method per service (generated), plus the conveniences (written once in shortcuts.py)."""

from __future__ import annotations

from types import TracebackType
from typing import Self, Unpack

from aimass.client.calls import AsyncSession, SyncSession
from aimass.client.channels import DEFAULT_TARGET, ClientOptions, aio_channel, sync_channel
from aimass.client.generated import AsyncServices, Services
from aimass.client.shortcuts import Conveniences

__all__ = ["AsyncClient", "Client"]


class Client(SyncSession, Services, Conveniences):
    """Blocking client. ``timeout_s`` is the default deadline per call (None: none); every method can override it.

    ``client.nlp``, ``client.vision``, ``client.speech``, ``client.llm``, ``client.models``, ``client.admin``,
    ``client.datasets``, ``client.training``, ``client.deployments``: each public service's RPCs as snake_case
    methods (``client.admin.who_am_i()``). Errors are ``grpc.RpcError`` with the mesh's status code and message.
    """

    def __init__(self, target: str = DEFAULT_TARGET, **options: Unpack[ClientOptions]) -> None:
        super().__init__(target, **options)
        self.channel = sync_channel(target, self.channel_credentials, self.channel_options)
        self.open_services(self)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class AsyncClient(AsyncSession, AsyncServices, Conveniences):
    """asyncio client (grpc.aio); the same methods as ``Client``, as coroutines (server streams: async iterators).
    Create it inside the event loop."""

    def __init__(self, target: str = DEFAULT_TARGET, **options: Unpack[ClientOptions]) -> None:
        super().__init__(target, **options)
        self.channel = aio_channel(target, self.channel_credentials, self.channel_options)
        self.open_services(self)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
