"""Service discovery: the Registry interface, the embedded backend (default) and replica membership."""

from aimass.runtime.discovery.base import CONTROL_PLANE_KINDS, Instance, Registry
from aimass.runtime.discovery.embedded import InMemoryRegistry, RegistryServicer, RemoteRegistry
from aimass.runtime.discovery.membership import Membership

__all__ = [
    "CONTROL_PLANE_KINDS",
    "InMemoryRegistry",
    "Instance",
    "Membership",
    "Registry",
    "RegistryServicer",
    "RemoteRegistry",
]
