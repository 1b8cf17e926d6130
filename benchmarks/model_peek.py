"""Reading a request's model name from its wire bytes on the gateway: protobuf's C parser vs the Python walk.

    python -m benchmarks.model_peek [--rounds 5] [--write docs/benchmarks.md]

The gateway reads ``model`` from every forwarded request that has one, on its event loop. The Python walk it used
before stepped over each top-level field in Python (kept here as the reference it is measured against); the
gateway now parses the bytes as a message with only the ``model`` field (gateway/model_routing.py), which skips the
rest in C. Requests: a 1 MiB image, 1 MiB of two-character texts (the worst case for a field-by-field walk), and a
long chat. Both read the same name from each, and both are timed in the same process, alternating.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from google.protobuf.message import DecodeError

from aimass.v1 import common_pb2, llm_pb2, nlp_pb2, vision_pb2
from benchmarks.common import machine, median, publish
from gateway.model_routing import model_field_number, requested_model

NAME = "Model peek on the gateway"
MIB = 1024 * 1024
VARINT, I64, LEN, I32 = 0, 1, 2, 5


def python_walk(data: bytes, field_number: int) -> str:
    """The previous gateway code: the top level walked field by field in Python."""

    def varint(pos: int) -> tuple[int, int]:
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

    pos, name = 0, ""
    try:
        while pos < len(data):
            key, pos = varint(pos)
            number, wire_type = key >> 3, key & 7
            if wire_type == VARINT:
                _, pos = varint(pos)
            elif wire_type == I64:
                pos += 8
            elif wire_type == I32:
                pos += 4
            elif wire_type == LEN:
                length, pos = varint(pos)
                if number == field_number:
                    name = common_pb2.ModelRef.FromString(data[pos : pos + length]).name or name
                pos += length
            else:
                return ""
    except (ValueError, DecodeError):
        return ""
    return name


def requests() -> dict[str, tuple[bytes, int]]:
    """Serialized requests with their model field's number."""
    model = common_pb2.ModelRef(name="all-MiniLM-L6-v2")
    image = vision_pb2.VisionServiceClassifyRequest(model=model, images=[vision_pb2.Image(data=b"\x89" * MIB)])
    texts = nlp_pb2.EmbedRequest(texts=["ab"] * (MIB // 4), model=model)
    chat = llm_pb2.ChatRequest(
        model=common_pb2.ModelRef(name="smollm2-135m-instruct"),
        messages=[llm_pb2.ChatMessage(role=llm_pb2.CHAT_ROLE_USER, content="hello there " * 8) for _ in range(2000)],
    )
    found: dict[str, tuple[bytes, int]] = {}
    for label, message in (("1 MiB image", image), ("1 MiB of short texts", texts), ("chat, 2,000 messages", chat)):
        number = model_field_number(message.DESCRIPTOR)
        assert number is not None
        found[label] = (message.SerializeToString(), number)
    return found


def seconds_per_call(peek: Callable[[bytes, int], str], data: bytes, number: int, rounds: int) -> float:
    samples = []
    for _ in range(rounds):
        started = time.perf_counter()
        peek(data, number)
        samples.append(time.perf_counter() - started)
    return median(samples)


def main(argv: Sequence[str] | None = None) -> None:
    cli = argparse.ArgumentParser(prog="python -m benchmarks.model_peek", description=(__doc__ or "").split("\n")[0])
    cli.add_argument("--rounds", type=int, default=5, help="timed calls per request and method (default 5)")
    cli.add_argument("--write", type=Path, default=None, help="update this markdown file's section")
    args = cli.parse_args(argv)
    if not 1 <= args.rounds <= 50:
        cli.error("rounds must be 1..50")
    lines = [
        f"`python -m benchmarks.model_peek --rounds {args.rounds}`; {machine()}. Median seconds per request, both",
        "methods in one process, alternating; both read the same model name.",
        "",
        "| request | size | Python walk (before) | C parse (now) | walk / parse |",
        "|---|---:|---:|---:|---:|",
    ]
    for label, (data, number) in requests().items():
        assert python_walk(data, number) == requested_model(data, number) != ""
        walk = parse = 0.0
        for _ in range(2):  # alternate, so drift on a shared machine hits both
            walk += seconds_per_call(python_walk, data, number, args.rounds)
            parse += seconds_per_call(requested_model, data, number, args.rounds)
        lines.append(
            f"| {label} | {len(data) / MIB:.2f} MiB | {walk / 2 * 1e6:,.0f} µs | {parse / 2 * 1e6:,.0f} µs |"
            f" {walk / parse:.1f}x |"
        )
    publish("\n".join(lines), args.write, NAME)


if __name__ == "__main__":
    main()
