"""Which model a raw request names, read straight from its wire bytes, so the gateway can send it to a replica
that holds the model (several LLM processes, one model each) without deserialising the whole request in Python.

The request is parsed as a message type that has only the ``model`` field (a ModelRef at the request's own field
number): protobuf's C parser reads that field and skips every other one by its length, so images and audio cost a
copy at C speed, not a walk in Python (which took ~0.4 s per MiB of small fields on the gateway's event loop).
"""

from __future__ import annotations

import functools

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.descriptor import Descriptor
from google.protobuf.message import DecodeError, Message

from aimass.v1 import common_pb2

MODEL_REF = "aimass.v1.ModelRef"
PEEK_PACKAGE = "aimass.gateway.peek"


def model_field_number(request_type: Descriptor) -> int | None:
    """The number of the request's ``model`` field (a ModelRef), or None when it names no model."""
    field = request_type.fields_by_name.get("model")
    if field is None or field.message_type is None or field.message_type.full_name != MODEL_REF:
        return None
    return int(field.number)


@functools.cache
def _peek_type(field_number: int) -> type[Message]:
    """A message type whose only field is ``ModelRef model = field_number`` (one per field number in use)."""
    name = f"ModelAt{field_number}"
    file = descriptor_pb2.FileDescriptorProto(
        name=f"aimass/gateway/peek/model_at_{field_number}.proto",
        package=PEEK_PACKAGE,
        syntax="proto3",
        dependency=[common_pb2.DESCRIPTOR.name],
    )
    file.message_type.add(name=name).field.add(
        name="model",
        number=field_number,
        type=descriptor_pb2.FieldDescriptorProto.TYPE_MESSAGE,
        label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL,
        type_name=f".{MODEL_REF}",
    )
    pool = descriptor_pool.Default()
    pool.AddSerializedFile(file.SerializeToString())
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{PEEK_PACKAGE}.{name}"))


def requested_model(data: bytes, field_number: int) -> str:
    """ModelRef.name of field ``field_number`` in the serialized message ``data``; "" when absent or unreadable
    (the replica then parses the request itself and answers any error). Repeated occurrences of the field merge,
    as protobuf merges them: the last name set wins."""
    try:
        peeked = _peek_type(field_number).FromString(data)
    except (DecodeError, RuntimeError, ValueError):
        return ""
    return str(peeked.model.name)  # type: ignore[attr-defined]
