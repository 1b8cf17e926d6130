"""Service discovery: the Registry interface, the embedded backend (default), Consul, and replica membership."""

from __future__ import annotations

from aimass.runtime.config import RegistryConfig
from aimass.runtime.discovery.base import (
    CONTROL_PLANE_KINDS,
    CONTROL_PLANE_SERVICES,
    DISCOVERY_HEALTH_SERVICE,
    LISTENER_LABEL,
    Instance,
    Registry,
    ReportsReachability,
)
from aimass.runtime.discovery.embedded import InMemoryRegistry, RegistryServicer, RemoteRegistry
from aimass.runtime.discovery.membership import Membership
from aimass.runtime.identity import MeshCredentials


def make_registry(config: RegistryConfig, *, credentials: MeshCredentials | None, address: str = "") -> Registry:
    """The registry client a process uses: Consul's agent with ``backend = "consul"``, otherwise the embedded
    registry at ``address`` (default ``config.address``, the scheduler), dialled with this process's mesh
    ``credentials``."""
    if config.backend == "consul":
        # Imported here: the embedded default never loads the Consul client (aiohttp).
        from aimass.runtime.discovery.consul import ConsulRegistry

        return ConsulRegistry(config.consul)
    return RemoteRegistry(address or config.address, credentials)


__all__ = [
    "CONTROL_PLANE_KINDS",
    "CONTROL_PLANE_SERVICES",
    "DISCOVERY_HEALTH_SERVICE",
    "LISTENER_LABEL",
    "InMemoryRegistry",
    "Instance",
    "Membership",
    "Registry",
    "RegistryServicer",
    "RemoteRegistry",
    "ReportsReachability",
    "make_registry",
]
