"""Which model a raw request names, read straight from its wire bytes, so the gateway can send it to a replica
that holds the model (several LLM processes, one model each) without deserialising the whole request.

Only the top level of the message is walked, skipping every other field by its length; images and audio are
never copied. The ModelRef itself is a few bytes and is parsed normally.
"""

from __future__ import annotations

from google.protobuf.descriptor import Descriptor
from google.protobuf.message import DecodeError

from aimass.v1 import common_pb2

MODEL_REF = "aimass.v1.ModelRef"

# Wire types (https://protobuf.dev/programming-guides/encoding/).
VARINT, I64, LEN, I32 = 0, 1, 2, 5


def model_field_number(request_type: Descriptor) -> int | None:
    """The number of the request's ``model`` field (a ModelRef), or None when it names no model."""
    field = request_type.fields_by_name.get("model")
    if field is None or field.message_type is None or field.message_type.full_name != MODEL_REF:
        return None
    return int(field.number)


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("truncated or overlong varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def requested_model(data: bytes, field_number: int) -> str:
    """ModelRef.name of field ``field_number`` in the serialized message ``data``; "" when absent or unreadable
    (the replica then parses the request itself and answers any error)."""
    pos = 0
    name = ""
    try:
        while pos < len(data):
            key, pos = _varint(data, pos)
            number, wire_type = key >> 3, key & 7
            if wire_type == VARINT:
                _, pos = _varint(data, pos)
            elif wire_type == I64:
                pos += 8
            elif wire_type == I32:
                pos += 4
            elif wire_type == LEN:
                length, pos = _varint(data, pos)
                if number == field_number:
                    # Protobuf merges repeated occurrences of a message field; the last name set wins.
                    name = common_pb2.ModelRef.FromString(data[pos : pos + length]).name or name
                pos += length
            else:
                return ""
    except (ValueError, DecodeError):
        return ""
    return name
