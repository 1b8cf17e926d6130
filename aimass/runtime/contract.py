"""The public contract as data: every ``aimass.v1`` service and method, read from the generated descriptors.

The gateway uses it to know each method's call kind (so it forwards raw bytes with the right handler) and to
offer reflection for all services; tools use it to list what the mesh can serve. Which methods may safely run twice
(the gateway hedges them) is the proto's own ``option idempotency_level`` on the rpc, read here and nowhere else.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from dataclasses import dataclass

from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.descriptor_pb2 import MethodOptions

import aimass.v1

PACKAGE = "aimass.v1"


@dataclass(frozen=True)
class MethodKind:
    client_streaming: bool
    server_streaming: bool


@functools.cache
def services() -> dict[str, ServiceDescriptor]:
    """Fully-qualified service name → descriptor, for every service in protos/aimass/v1."""
    found: dict[str, ServiceDescriptor] = {}
    for module_info in pkgutil.iter_modules(aimass.v1.__path__):
        if not module_info.name.endswith("_pb2"):
            continue
        module = importlib.import_module(f"{PACKAGE}.{module_info.name}")
        for service in module.DESCRIPTOR.services_by_name.values():
            found[service.full_name] = service
    return found


@functools.cache
def methods() -> dict[str, MethodKind]:
    """gRPC path ("/aimass.v1.NlpService/Embed") → its call kind."""
    return {
        f"/{service.full_name}/{method.name}": MethodKind(method.client_streaming, method.server_streaming)
        for service in services().values()
        for method in service.methods
    }


@functools.cache
def idempotent_methods() -> frozenset[str]:
    """gRPC paths of the methods whose rpc declares ``option idempotency_level = NO_SIDE_EFFECTS`` (or
    ``IDEMPOTENT``): running one twice changes nothing the caller could see, so a copy may be sent to another
    replica."""
    safe = (MethodOptions.NO_SIDE_EFFECTS, MethodOptions.IDEMPOTENT)
    return frozenset(
        f"/{service.full_name}/{method.name}"
        for service in services().values()
        for method in service.methods
        if method.GetOptions().idempotency_level in safe
    )
