"""Service discovery: the Registry interface, the embedded backend (default) and replica membership."""

from aimass.runtime.discovery.base import Instance, Registry
from aimass.runtime.discovery.embedded import InMemoryRegistry, RegistryServicer, RemoteRegistry
from aimass.runtime.discovery.membership import Membership

__all__ = ["InMemoryRegistry", "Instance", "Membership", "Registry", "RegistryServicer", "RemoteRegistry"]
