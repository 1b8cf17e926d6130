"""Open Inference Protocol v2 tensors: decoding a ModelInferRequest's inputs and encoding a response's outputs.

Pure functions, no I/O. An input's elements come either from ``raw_input_contents`` (one entry per input, in the
order of ``inputs``: the elements flattened row-major; a BYTES element is its length as 4 bytes little-endian, then
its bytes) or from its typed ``contents``, never both in one request. Every size is checked against the shape before
anything is allocated from it: a length prefix that runs past its buffer, bytes left over, a count that disagrees
with the shape, are each refused with INVALID_ARGUMENT naming the input and what was expected. Outputs always go as
``raw_output_contents`` (what tritonclient's ``InferResult.as_numpy`` reads).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from aimass.oip.v2 import grpc_predict_v2_pb2 as oip
from aimass.runtime.errors import InvalidArgument

# Datatype → numpy dtype (little-endian, as the protocol's raw contents are). BYTES is a list of bytes instead;
# BF16 has no numpy type: it is known (so its message says so) but not decoded.
NUMPY_TYPES: Final[Mapping[str, str]] = {
    "BOOL": "?",
    "UINT8": "<u1",
    "UINT16": "<u2",
    "UINT32": "<u4",
    "UINT64": "<u8",
    "INT8": "<i1",
    "INT16": "<i2",
    "INT32": "<i4",
    "INT64": "<i8",
    "FP16": "<f2",
    "FP32": "<f4",
    "FP64": "<f8",
}
DATATYPES: Final = (*NUMPY_TYPES, "BF16", "BYTES")
# Which field of InferTensorContents carries each datatype (FP16 and BF16 travel raw only).
TYPED_FIELD: Final[Mapping[str, str]] = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
_PREFIX = struct.Struct("<I")


@dataclass(frozen=True, slots=True)
class Tensor:
    """One decoded input: BYTES as a list of bytes, every other datatype as a numpy array of its shape."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: list[bytes] | npt.NDArray[Any]

    def __len__(self) -> int:
        return len(self.data)


def element_count(name: str, shape: Sequence[int], max_elements: int) -> int:
    """The number of elements ``shape`` holds, refused when a dimension is negative or the count passes
    ``max_elements`` (checked before anything is allocated for it)."""
    if any(dim < 0 for dim in shape):
        raise InvalidArgument(
            f"input {name!r} has shape {list(shape)}; every dimension must be 0 or more (-1 is for metadata only)",
            reason="BAD_SHAPE",
        )
    count = math.prod(shape)
    if count > max_elements:
        raise InvalidArgument(
            f"input {name!r} has shape {list(shape)}: {count} elements; the most one input may hold is {max_elements}",
            reason="TOO_MANY_ELEMENTS",
            metadata={"input": name, "limit": str(max_elements)},
        )
    return count


def decode_bytes(name: str, raw: bytes, count: int) -> list[bytes]:
    """``count`` BYTES elements from raw contents (each a 4-byte little-endian length, then that many bytes)."""
    items: list[bytes] = []
    offset, size = 0, len(raw)
    while offset < size:
        if len(items) == count:
            raise InvalidArgument(
                f"raw contents of input {name!r} go on past its {count} element(s) ({size - offset} bytes left over);"
                " each BYTES element is a 4-byte little-endian length followed by that many bytes",
                reason="BAD_RAW_CONTENTS",
            )
        if size - offset < _PREFIX.size:
            raise InvalidArgument(
                f"raw contents of input {name!r} end inside the 4-byte length of element {len(items)} "
                f"({size - offset} byte(s) left)",
                reason="BAD_RAW_CONTENTS",
            )
        (length,) = _PREFIX.unpack_from(raw, offset)
        offset += _PREFIX.size
        if length > size - offset:
            raise InvalidArgument(
                f"element {len(items)} of input {name!r} says it is {length} bytes long, but only {size - offset} "
                "bytes follow",
                reason="BAD_RAW_CONTENTS",
            )
        items.append(raw[offset : offset + length])
        offset += length
    if len(items) != count:
        raise InvalidArgument(
            f"raw contents of input {name!r} hold {len(items)} element(s); its shape says {count}",
            reason="BAD_RAW_CONTENTS",
        )
    return items


def encode_bytes(items: Sequence[bytes]) -> bytes:
    """BYTES elements as raw contents: each one's length (4 bytes, little-endian), then its bytes."""
    return b"".join(_PREFIX.pack(len(item)) + item for item in items)


def _decode_raw(tensor: oip.ModelInferRequest.InferInputTensor, raw: bytes, count: int) -> Tensor:
    shape = tuple(tensor.shape)
    if tensor.datatype == "BYTES":
        return Tensor(tensor.name, "BYTES", shape, decode_bytes(tensor.name, raw, count))
    dtype = np.dtype(NUMPY_TYPES[tensor.datatype])
    if len(raw) != count * dtype.itemsize:
        raise InvalidArgument(
            f"raw contents of input {tensor.name!r} are {len(raw)} bytes; shape {list(shape)} of {tensor.datatype} "
            f"needs {count * dtype.itemsize}",
            reason="BAD_RAW_CONTENTS",
        )
    return Tensor(tensor.name, tensor.datatype, shape, np.frombuffer(raw, dtype=dtype).reshape(shape))


def _decode_typed(tensor: oip.ModelInferRequest.InferInputTensor, count: int) -> Tensor:
    shape = tuple(tensor.shape)
    field = TYPED_FIELD.get(tensor.datatype)
    if field is None:
        raise InvalidArgument(
            f"input {tensor.name!r} is {tensor.datatype}, which has no typed contents: send it in raw_input_contents",
            reason="BAD_CONTENTS",
        )
    values = getattr(tensor.contents, field)
    if len(values) != count:
        raise InvalidArgument(
            f"input {tensor.name!r} has {len(values)} element(s) in contents.{field}; shape {list(shape)} needs "
            f"{count}",
            reason="BAD_CONTENTS",
        )
    if tensor.datatype == "BYTES":
        return Tensor(tensor.name, "BYTES", shape, list(values))
    array = np.asarray(values, dtype=np.dtype(NUMPY_TYPES[tensor.datatype])).reshape(shape)
    return Tensor(tensor.name, tensor.datatype, shape, array)


def decode_inputs(request: oip.ModelInferRequest, *, max_elements: int | Mapping[str, int]) -> dict[str, Tensor]:
    """Every input of ``request`` by name, decoded from raw or typed contents; INVALID_ARGUMENT for anything
    malformed (see the module's docstring). ``max_elements``: the most any input (or each input, by name) may hold."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidArgument(
            f"the request has {len(request.inputs)} input(s) and {len(raw)} raw_input_contents; with raw contents "
            "send one entry per input, in the same order",
            reason="BAD_RAW_CONTENTS",
        )
    decoded: dict[str, Tensor] = {}
    for index, tensor in enumerate(request.inputs):
        if tensor.name in decoded:
            raise InvalidArgument(
                f"input {tensor.name!r} is sent twice; send each input once", reason="DUPLICATE_INPUT"
            )
        if tensor.datatype not in DATATYPES:
            raise InvalidArgument(
                f"input {tensor.name!r} has datatype {tensor.datatype!r}; the protocol's are {', '.join(DATATYPES)}",
                reason="BAD_DATATYPE",
            )
        limit = max_elements if isinstance(max_elements, int) else max_elements.get(tensor.name, 0)
        count = element_count(tensor.name, tensor.shape, limit)
        if raw:
            if tensor.HasField("contents"):
                raise InvalidArgument(
                    f"input {tensor.name!r} has typed contents in a request that uses raw_input_contents; use one "
                    "or the other for every input",
                    reason="BAD_CONTENTS",
                )
            if tensor.datatype == "BF16":
                raise InvalidArgument(f"input {tensor.name!r}: BF16 inputs are not taken", reason="BAD_DATATYPE")
            decoded[tensor.name] = _decode_raw(tensor, raw[index], count)
        else:
            decoded[tensor.name] = _decode_typed(tensor, count)
    return decoded


@dataclass(slots=True)
class Outputs:
    """A response's output tensors, built up in order, each with its raw contents."""

    tensors: list[oip.ModelInferResponse.InferOutputTensor]
    raw: list[bytes]

    @classmethod
    def empty(cls) -> Outputs:
        return cls([], [])

    def add_bytes(self, name: str, shape: Sequence[int], items: Sequence[bytes]) -> None:
        self._add(name, "BYTES", shape, encode_bytes(items))

    def add_array(self, name: str, datatype: str, array: npt.NDArray[Any]) -> None:
        data = np.ascontiguousarray(array, dtype=np.dtype(NUMPY_TYPES[datatype]))
        self._add(name, datatype, data.shape, data.tobytes())

    def _add(self, name: str, datatype: str, shape: Sequence[int], raw: bytes) -> None:
        self.tensors.append(oip.ModelInferResponse.InferOutputTensor(name=name, datatype=datatype, shape=shape))
        self.raw.append(raw)

    def response(self, request: oip.ModelInferRequest, model_version: str) -> oip.ModelInferResponse:
        """The response to ``request``: the outputs it asked for by name (all when it named none), its id echoed."""
        wanted = [output.name for output in request.outputs]
        indices = list(range(len(self.tensors)))
        if wanted:
            by_name = {tensor.name: i for i, tensor in enumerate(self.tensors)}
            unknown = [name for name in wanted if name not in by_name]
            if unknown:
                raise InvalidArgument(
                    f"{request.model_name} has no output {', '.join(map(repr, unknown))}; its outputs are "
                    f"{', '.join(by_name)}",
                    reason="UNKNOWN_OUTPUT",
                )
            indices = [by_name[name] for name in dict.fromkeys(wanted)]
        return oip.ModelInferResponse(
            model_name=request.model_name,
            model_version=model_version,
            id=request.id,
            outputs=[self.tensors[i] for i in indices],
            raw_output_contents=[self.raw[i] for i in indices],
        )
