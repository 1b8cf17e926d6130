"""Hypothesis strategies for any protobuf message, built from its descriptor: every field gets random and boundary
values (empty, huge, NaN and infinities, negative, out-of-range enums, unicode, long repeated fields), and raw
requests are sometimes random bytes, truncated or padded messages instead of valid ones.

Nothing here knows a service by hand: tests list the methods from the generated descriptors (aimass.runtime.contract),
so a new method is fuzzed the day it is added.
"""

from __future__ import annotations

from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from hypothesis import strategies as st

from tests.fuzz.seeds import seed_blobs

INT32 = (-(2**31), 2**31 - 1)
INT64 = (-(2**63), 2**63 - 1)
UINT32 = (0, 2**32 - 1)
UINT64 = (0, 2**64 - 1)
# Strings and lists are usually short (the interesting bounds are small), sometimes past every documented limit.
SHORT_TEXT = st.text(max_size=40)
HUGE_TEXT = st.sampled_from(["x" * 10_001, "not good " * 3_000, "{}" * 5_000, "\u00e9" * 50_000])
MAX_DEPTH = 3


def _bounded_int(low: int, high: int) -> st.SearchStrategy[int]:
    edges = [low, high, 0, 1, -1, 2, 7, 8, 16, 64, 256, 1000, 1024, 4096, 100_000]
    return st.one_of(st.sampled_from([v for v in edges if low <= v <= high]), st.integers(low, high))


SCALARS: dict[int, st.SearchStrategy[Any]] = {
    FieldDescriptor.TYPE_INT32: _bounded_int(*INT32),
    FieldDescriptor.TYPE_SINT32: _bounded_int(*INT32),
    FieldDescriptor.TYPE_SFIXED32: _bounded_int(*INT32),
    FieldDescriptor.TYPE_INT64: _bounded_int(*INT64),
    FieldDescriptor.TYPE_SINT64: _bounded_int(*INT64),
    FieldDescriptor.TYPE_SFIXED64: _bounded_int(*INT64),
    FieldDescriptor.TYPE_UINT32: _bounded_int(*UINT32),
    FieldDescriptor.TYPE_FIXED32: _bounded_int(*UINT32),
    FieldDescriptor.TYPE_UINT64: _bounded_int(*UINT64),
    FieldDescriptor.TYPE_FIXED64: _bounded_int(*UINT64),
    FieldDescriptor.TYPE_BOOL: st.booleans(),
    FieldDescriptor.TYPE_FLOAT: st.one_of(
        st.sampled_from([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e38, -1.0, 0.5, 2.0, 1e-45]),
        st.floats(width=32),
    ),
    FieldDescriptor.TYPE_DOUBLE: st.one_of(
        st.sampled_from([float("nan"), float("inf"), -float("inf"), 0.0, 1e308, -1.0, 0.5]), st.floats()
    ),
    FieldDescriptor.TYPE_STRING: st.one_of(SHORT_TEXT, SHORT_TEXT, SHORT_TEXT, HUGE_TEXT),
}


def _bytes_strategy() -> st.SearchStrategy[bytes]:
    # Real media (a small PNG, a WAV) now and then, so decoders get past their first check, often mangled.
    seeds = seed_blobs()
    mangled = st.tuples(st.sampled_from(seeds), st.integers(0, 4096), st.binary(max_size=16)).map(
        lambda t: t[0][: t[1]] + t[2]
    )
    return st.one_of(st.binary(max_size=64), st.sampled_from(seeds), mangled)


def _field_value(field: FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
    if field.message_type is not None:
        return message_of(field.message_type, depth + 1)
    if field.enum_type is not None:
        known = [value.number for value in field.enum_type.values]
        return st.one_of(st.sampled_from(known), st.integers(-5, 100))
    if field.type == FieldDescriptor.TYPE_BYTES:
        return _bytes_strategy()
    return SCALARS[field.type]


def message_of(descriptor: Descriptor, depth: int = 0) -> st.SearchStrategy[Message]:
    """Messages of ``descriptor`` with any subset of fields set to random or boundary values."""
    message_class = _class_of(descriptor)
    if depth >= MAX_DEPTH:
        return st.just(message_class())
    fields: dict[str, st.SearchStrategy[Any]] = {}
    for field in descriptor.fields:
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            key, value = field.message_type.fields_by_name["key"], field.message_type.fields_by_name["value"]
            fields[field.name] = st.dictionaries(_field_value(key, depth), _field_value(value, depth), max_size=4)
        elif field.is_repeated:
            few = st.lists(_field_value(field, depth), max_size=4)
            many = st.lists(_field_value(field, MAX_DEPTH - 1), min_size=5, max_size=300)
            fields[field.name] = st.one_of(few, few, few, many)
        else:
            fields[field.name] = _field_value(field, depth)

    @st.composite
    def build(draw: st.DrawFn) -> Message:
        message = message_class()
        for name, strategy in fields.items():
            if not draw(st.booleans()):
                continue
            value = draw(strategy)
            _assign(message, descriptor.fields_by_name[name], value)
        return message

    return build()


def _assign(message: Message, field: FieldDescriptor, value: Any) -> None:
    target = getattr(message, field.name)
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        value_field = field.message_type.fields_by_name["value"]
        for key, item in value.items():
            if value_field.type == FieldDescriptor.TYPE_MESSAGE:
                target[key].CopyFrom(item)
            else:
                target[key] = item
    elif field.is_repeated:
        target.extend(value)
    elif field.type == FieldDescriptor.TYPE_MESSAGE:
        target.CopyFrom(value)
    else:
        setattr(message, field.name, value)


def _class_of(descriptor: Descriptor) -> type[Message]:
    from google.protobuf import message_factory

    return message_factory.GetMessageClass(descriptor)


def raw_request(descriptor: Descriptor) -> st.SearchStrategy[bytes]:
    """Bytes a caller could send for a request of ``descriptor``: usually a valid message, sometimes random bytes,
    a truncated one, or a valid one with junk appended."""
    valid = message_of(descriptor).map(lambda m: m.SerializeToString())
    truncated = st.tuples(valid, st.integers(0, 64)).map(lambda t: t[0][: max(0, len(t[0]) - 1 - t[1])])
    junk = st.tuples(valid, st.binary(min_size=1, max_size=32)).map(lambda t: t[0] + t[1])
    return st.one_of(valid, valid, valid, valid, truncated, junk, st.binary(max_size=256))
