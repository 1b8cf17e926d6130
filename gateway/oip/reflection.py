"""Server reflection for the gateway with the OIP service under its wire name, ``inference.GRPCInferenceService``.

Our generated code declares the protocol under package aimass.oip.v2 (protos/aimass/oip/v2 says why), so
protobuf's default pool knows no ``inference.*`` symbol; reflection (grpcurl list/describe) must show the names
clients use. The gateway's reflection service reads its own pool instead: every file the served services need,
copied from the default pool, plus the OIP file declared again under package ``inference``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import FileDescriptor

from aimass.oip.v2 import grpc_predict_v2_pb2

WIRE_PACKAGE: Final = "inference"
OIP_SERVICE: Final = f"{WIRE_PACKAGE}.GRPCInferenceService"
_OURS: Final = grpc_predict_v2_pb2.DESCRIPTOR.package


def _rename_types(message: descriptor_pb2.DescriptorProto, old: str, new: str) -> None:
    for field in message.field:
        if field.type_name.startswith(old):
            field.type_name = new + field.type_name[len(old) :]
    for nested in message.nested_type:
        _rename_types(nested, old, new)


def wire_file() -> descriptor_pb2.FileDescriptorProto:
    """The OIP file as the protocol names it: package ``inference``, every type reference renamed to match."""
    proto = descriptor_pb2.FileDescriptorProto()
    grpc_predict_v2_pb2.DESCRIPTOR.CopyToProto(proto)
    old, new = f".{_OURS}.", f".{WIRE_PACKAGE}."
    proto.name = f"{WIRE_PACKAGE}/grpc_predict_v2.proto"
    proto.package = WIRE_PACKAGE
    for message in proto.message_type:
        _rename_types(message, old, new)
    for service in proto.service:
        for method in service.method:
            method.input_type = new + method.input_type[len(old) :]
            method.output_type = new + method.output_type[len(old) :]
    return proto


def reflection_pool(service_names: Iterable[str]) -> descriptor_pool.DescriptorPool:
    """A pool with the files of ``service_names`` (found in the default pool; OIP_SERVICE by its wire name) and
    everything they import."""
    pool = descriptor_pool.DescriptorPool()
    added: set[str] = set()

    def add(file: FileDescriptor) -> None:
        if file.name in added:
            return
        for dependency in file.dependencies:
            add(dependency)
        pool.AddSerializedFile(file.serialized_pb)
        added.add(file.name)

    for name in service_names:
        if name == OIP_SERVICE:
            pool.AddSerializedFile(wire_file().SerializeToString())
        else:
            add(descriptor_pool.Default().FindFileContainingSymbol(name))
    return pool
