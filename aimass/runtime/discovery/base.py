"""What a registry stores (``Instance``) and what every backend offers (``Registry``)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from aimass.v1 import common_pb2, registry_pb2

# Mesh processes that serve no models (the gateway, the scheduler): never routed to, never asked about models.
CONTROL_PLANE_KINDS: frozenset[str] = frozenset({"gateway", "scheduler"})
# Public services the control plane (the scheduler) serves itself, reached through the gateway like replicas' services.
CONTROL_PLANE_SERVICES: frozenset[str] = frozenset(
    {"aimass.v1.DatasetService", "aimass.v1.TrainingService", "aimass.v1.DeploymentService"}
)

# The label that says how an instance's port is secured: "mesh" (mTLS with the mesh's CA), "tls" (server TLS only: a
# gateway's front door) or "plaintext"; Consul's gRPC check dials accordingly.
LISTENER_LABEL = "listener"

# The gRPC health entry that says whether a process's registry backend answers (registries that can tell, i.e.
# Consul): NOT_SERVING while the process serves on its last view of the mesh.
DISCOVERY_HEALTH_SERVICE = "aimass.discovery"


@dataclass(frozen=True)
class Instance:
    """One running replica process and what it serves."""

    instance_id: str
    kind: str
    services: tuple[str, ...]
    address: str
    models: tuple[str, ...] = ()
    state: common_pb2.ServingState.ValueType = common_pb2.SERVING_STATE_SERVING
    labels: Mapping[str, str] = field(default_factory=dict)
    pid: int = 0

    @property
    def serving(self) -> bool:
        return self.state == common_pb2.SERVING_STATE_SERVING

    @property
    def state_name(self) -> str:
        return common_pb2.ServingState.Name(self.state).removeprefix("SERVING_STATE_")

    def to_proto(self) -> registry_pb2.ServiceInstance:
        return registry_pb2.ServiceInstance(
            instance_id=self.instance_id,
            kind=self.kind,
            services=self.services,
            address=self.address,
            models=[common_pb2.ModelRef(name=name) for name in self.models],
            state=self.state,
            labels=dict(self.labels),
            pid=self.pid,
        )

    @classmethod
    def from_proto(cls, msg: registry_pb2.ServiceInstance) -> Instance:
        return cls(
            instance_id=msg.instance_id,
            kind=msg.kind,
            services=tuple(msg.services),
            address=msg.address,
            models=tuple(m.name for m in msg.models),
            state=msg.state,
            labels=dict(msg.labels),
            pid=msg.pid,
        )


class Registry(Protocol):
    """A discovery backend. The embedded one is the default; Consul slots in behind the same methods."""

    async def register(self, instance: Instance, ttl_s: float) -> None: ...

    async def heartbeat(self, instance_id: str, state: common_pb2.ServingState.ValueType) -> bool:
        """Refresh the TTL; False when the registry no longer knows the instance (it must register again)."""
        ...

    async def deregister(self, instance_id: str) -> None: ...

    async def list_instances(self, service: str = "") -> list[Instance]: ...

    def watch(self) -> AsyncIterator[list[Instance]]:
        """The whole view now, then again after every change. Backends keep trying through outages."""
        ...

    async def close(self) -> None: ...


@runtime_checkable
class ReportsReachability(Protocol):
    """A registry that can tell when its backend stops answering and when it answers again."""

    @property
    def reachable(self) -> bool | None:
        """False while its backend does not answer; None before the first call."""
        ...

    def on_reachability(self, listener: Callable[[bool], None]) -> None: ...
