"""The OIP tensor codec (gateway/oip/tensors.py) on its own, and the contract against tritonclient's.

Requests are built the way tritonclient builds them (its InferInput and its request builder), so what is decoded
here is what a Triton user sends; malformed contents are built by hand.
"""

from __future__ import annotations

import struct

import numpy as np
import pytest
import tritonclient.grpc as triton  # type: ignore[import-untyped]
from google.protobuf.descriptor import Descriptor
from tritonclient.grpc import _utils as triton_utils
from tritonclient.grpc import service_pb2 as triton_pb2

from aimass.oip.v2 import grpc_predict_v2_pb2 as oip
from aimass.runtime.errors import InvalidArgument
from gateway.oip.reflection import OIP_SERVICE, reflection_pool, wire_file
from gateway.oip.tensors import Outputs, decode_bytes, decode_inputs, encode_bytes


def as_ours(request: triton_pb2.ModelInferRequest) -> oip.ModelInferRequest:
    """tritonclient's request, as the gateway receives it: only its bytes travel."""
    return oip.ModelInferRequest.FromString(request.SerializeToString())


def triton_request(*inputs: triton.InferInput, outputs: list[str] | None = None) -> oip.ModelInferRequest:
    request = triton_utils._get_inference_request(
        model_name="m",
        inputs=list(inputs),
        model_version="",
        request_id="r-1",
        outputs=[triton.InferRequestedOutput(name) for name in outputs or []],
        sequence_id=0,
        sequence_start=False,
        sequence_end=False,
        priority=0,
        timeout=None,
        parameters=None,
    )
    return as_ours(request)


def text_input(name: str, texts: list[str]) -> triton.InferInput:
    tensor = triton.InferInput(name, [len(texts)], "BYTES")
    tensor.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=object))
    return tensor


def test_raw_bytes_and_fp32_as_tritonclient_sends_them() -> None:
    vectors = np.arange(6, dtype=np.float32).reshape(2, 3)
    numbers = triton.InferInput("X", [2, 3], "FP32")
    numbers.set_data_from_numpy(vectors)
    request = triton_request(text_input("TEXT", ["héllo", "", "a b"]), numbers)
    decoded = decode_inputs(request, max_elements=16)
    assert decoded["TEXT"].data == ["héllo".encode(), b"", b"a b"]
    assert decoded["TEXT"].shape == (3,)
    assert np.array_equal(decoded["X"].data, vectors)


def test_typed_contents() -> None:
    request = oip.ModelInferRequest(
        inputs=[
            oip.ModelInferRequest.InferInputTensor(
                name="TEXT", datatype="BYTES", shape=[2], contents=oip.InferTensorContents(bytes_contents=[b"a", b"b"])
            ),
            oip.ModelInferRequest.InferInputTensor(
                name="N", datatype="INT64", shape=[1, 2], contents=oip.InferTensorContents(int64_contents=[7, -1])
            ),
        ]
    )
    decoded = decode_inputs(request, max_elements=16)
    assert decoded["TEXT"].data == [b"a", b"b"]
    assert np.asarray(decoded["N"].data).tolist() == [[7, -1]]


@pytest.mark.parametrize(
    ("raw", "count", "said"),
    [
        (b"\x05\x00", 1, "end inside the 4-byte length"),  # a truncated prefix
        (struct.pack("<I", 1_000_000) + b"abc", 1, "says it is 1000000 bytes long, but only 3"),  # a size lie
        (encode_bytes([b"a", b"b"]), 1, "go on past its 1 element"),  # more elements than the shape
        (encode_bytes([b"a"]), 2, "hold 1 element(s); its shape says 2"),  # fewer
        (encode_bytes([b"a"]) + b"\x00", 1, "go on past"),  # trailing garbage
    ],
)
def test_malformed_bytes_are_refused_naming_the_input(raw: bytes, count: int, said: str) -> None:
    with pytest.raises(InvalidArgument, match="TEXT") as refused:
        decode_bytes("TEXT", raw, count)
    assert said in str(refused.value)


def test_size_lies_and_bounds_before_decoding() -> None:
    def one(datatype: str, shape: list[int], raw: bytes) -> oip.ModelInferRequest:
        tensor = oip.ModelInferRequest.InferInputTensor(name="X", datatype=datatype, shape=shape)
        return oip.ModelInferRequest(inputs=[tensor], raw_input_contents=[raw])

    with pytest.raises(InvalidArgument, match="are 8 bytes; shape \\[3\\] of FP32 needs 12"):
        decode_inputs(one("FP32", [3], b"\x00" * 8), max_elements=16)
    with pytest.raises(InvalidArgument, match="1000000000 elements; the most one input may hold is 16"):
        decode_inputs(one("BYTES", [1000, 1000, 1000], b""), max_elements=16)
    with pytest.raises(InvalidArgument, match="every dimension must be 0 or more"):
        decode_inputs(one("BYTES", [-1], b""), max_elements=16)
    with pytest.raises(InvalidArgument, match="datatype 'STRING'"):
        decode_inputs(one("STRING", [1], b""), max_elements=16)
    # One raw entry per input, and never both kinds of contents.
    two = oip.ModelInferRequest(
        inputs=[oip.ModelInferRequest.InferInputTensor(name=n, datatype="BYTES", shape=[1]) for n in ("A", "B")],
        raw_input_contents=[encode_bytes([b"a"])],
    )
    with pytest.raises(InvalidArgument, match="2 input\\(s\\) and 1 raw_input_contents"):
        decode_inputs(two, max_elements=16)
    typed = oip.ModelInferRequest.InferInputTensor(
        name="X", datatype="BYTES", shape=[1], contents=oip.InferTensorContents(bytes_contents=[b"a", b"b"])
    )
    with pytest.raises(InvalidArgument, match=r"2 element\(s\) in contents.bytes_contents; shape \[1\] needs 1"):
        decode_inputs(oip.ModelInferRequest(inputs=[typed]), max_elements=16)


def test_outputs_as_tritonclient_reads_them() -> None:
    outputs = Outputs.empty()
    vectors = np.random.default_rng(0).random((2, 4), dtype=np.float32)
    outputs.add_array("EMBEDDING", "FP32", vectors)
    outputs.add_bytes("LABEL", [2], [b"bon", "día".encode()])
    request = triton_request(text_input("TEXT", ["x"]), outputs=["LABEL"])
    response = outputs.response(request, "1")
    assert response.id == "r-1" and response.model_version == "1"
    assert [o.name for o in response.outputs] == ["LABEL"]  # only what was asked for
    result = triton.InferResult(
        triton_pb2.ModelInferResponse.FromString(
            outputs.response(as_ours(triton_pb2.ModelInferRequest(model_name="m")), "1").SerializeToString()
        )
    )
    assert np.array_equal(result.as_numpy("EMBEDDING"), vectors)
    assert result.as_numpy("LABEL").tolist() == [b"bon", "día".encode()]


def _fields(descriptor: Descriptor) -> dict[str, tuple[int, int, bool, str]]:
    return {
        f.name: (f.number, f.type, f.is_repeated, f.message_type.name if f.message_type else "")
        for f in descriptor.fields
    }


def test_contract_matches_tritonclients_field_for_field() -> None:
    """Our aimass.oip.v2 messages are wire-identical to tritonclient's inference.* ones (names, numbers, types)."""
    theirs = triton_pb2.DESCRIPTOR
    for name, ours in oip.DESCRIPTOR.message_types_by_name.items():
        assert _fields(ours) == _fields(theirs.message_types_by_name[name]), name
        for nested in ours.nested_types:
            assert _fields(nested) == _fields(theirs.message_types_by_name[name].nested_types_by_name[nested.name])
    service = theirs.services_by_name["GRPCInferenceService"]
    for method in oip.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods:
        assert service.methods_by_name[method.name].input_type.name == method.input_type.name


def test_reflection_describes_it_under_its_wire_name() -> None:
    pool = reflection_pool(["aimass.v1.NlpService", OIP_SERVICE])
    service = pool.FindServiceByName(OIP_SERVICE)
    assert service.methods_by_name["ModelInfer"].input_type.full_name == "inference.ModelInferRequest"
    assert pool.FindFileContainingSymbol("aimass.v1.NlpService").name == "aimass/v1/nlp.proto"
    assert wire_file().package == "inference"


def test_random_raw_contents_decode_or_are_refused_cleanly() -> None:
    """Whatever bytes and shapes a caller sends, decoding gives the elements or INVALID_ARGUMENT, nothing else."""
    rng = np.random.default_rng(15)
    for _ in range(2000):
        datatype = str(rng.choice(["BYTES", "FP32", "INT64", "BOOL", "FP16"]))
        shape = [int(d) for d in rng.integers(-1, 4, size=int(rng.integers(0, 3)))]
        raw = rng.bytes(int(rng.integers(0, 40)))
        if datatype == "BYTES" and rng.random() < 0.5:
            raw = encode_bytes([rng.bytes(int(n)) for n in rng.integers(0, 6, size=int(rng.integers(0, 4)))])
        tensor = oip.ModelInferRequest.InferInputTensor(name="X", datatype=datatype, shape=shape)
        request = oip.ModelInferRequest(inputs=[tensor], raw_input_contents=[raw])
        try:
            decoded = decode_inputs(request, max_elements=8)["X"]
        except InvalidArgument:
            continue
        assert len(np.asarray(decoded.data, dtype=object).ravel()) == int(np.prod(shape))
