"""Runs a ``Scenario`` (gateway/scenarios/format.py) as a DAG, reporting each step as it starts and finishes.

- The inputs are bound first (``bind_inputs``): each given value must be a declared input of the declared type, each
  required input given, defaults fill the rest. A fault is INVALID_ARGUMENT naming the input (ErrorInfo ``input``).
- A step starts as soon as every step it reads has finished, so steps that read only the inputs start together and
  independent branches run in parallel (asyncio tasks). Its request is its template with the references replaced
  (``build_request``), parsed by ``json_format.ParseDict`` (bytes as base64, enums by name or number, messages as
  mappings), and its ``meta`` is the caller's (priority, request id, labels).
- ``call(step, request)`` makes the step's call and returns its response; for a streaming method ``collect`` joins
  the responses into one (an LLM's deltas joined into one text, a synthesis's audio chunks into one audio).
- Each output is resolved as soon as the steps it reads are done. A reference that reads past what a response holds
  (``results[0]`` of an empty list) is INVALID_ARGUMENT naming the step (or output) that read it.
- The first failure ends the run: the steps still running are cancelled (their calls, and the replicas' work, with
  them), and the error propagates. The runner does not name a failed call's step itself: ``call`` does (it knows
  the status), see gateway/scenarios/servicer.py.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any, cast

from google.protobuf import json_format
from google.protobuf.message import Message

from aimass.runtime.errors import InvalidArgument
from aimass.v1 import llm_pb2, speech_pb2
from gateway.scenarios.format import Interpolated, Ref, Scenario, Step, Template, field_named

# A given input: the kind of value it came as ("text", "bytes", "number", "flag", "json") and the value.
Given = tuple[str, Any]
Call = Callable[[Step, Message], Coroutine[Any, Any, Message]]


@dataclass(frozen=True)
class StepStarted:
    step: Step


@dataclass(frozen=True)
class StepFinished:
    step: Step
    result: Message
    duration_ms: float


@dataclass(frozen=True)
class OutputReady:
    name: str
    value: Any


Event = StepStarted | StepFinished | OutputReady


def bind_inputs(scenario: Scenario, given: Mapping[str, Given]) -> dict[str, Any]:
    """The run's input values: ``given`` checked against the declared inputs, with the defaults (see the module)."""
    declared = {i.name: i for i in scenario.inputs}
    for name in given:
        if name not in declared:
            raise InvalidArgument(
                f"{scenario.name!r} has no input {name!r}; its inputs: {', '.join(declared) or 'none'}",
                metadata={"input": name},
            )
    values: dict[str, Any] = {}
    for name, declared_input in declared.items():
        if name not in given:
            if declared_input.required:
                about = f": {declared_input.description}" if declared_input.description else ""
                raise InvalidArgument(
                    f"input {name!r} ({declared_input.type}) is required{about}", metadata={"input": name}
                )
            values[name] = declared_input.default
            continue
        kind, value = given[name]
        if kind != declared_input.type:
            raise InvalidArgument(
                f"input {name!r} is {declared_input.type}; it was given as {kind}", metadata={"input": name}
            )
        if kind == "json":
            try:
                value = json.loads(value)
            except ValueError as err:
                raise InvalidArgument(f"input {name!r} is not valid JSON: {err}", metadata={"input": name}) from None
        values[name] = value
    return values


class _ReadFault(Exception):
    """A reference read past what its value holds (the caller names the step or output)."""


def _read(ref: Ref, values: Mapping[str, Mapping[str, Any]]) -> Any:
    value: Any = values[ref.root][ref.name]
    for part in ref.path:
        if isinstance(value, Message):
            fd = field_named(cast(Any, value.DESCRIPTOR), str(part))
            if fd is None:  # the format checked the path; a json value reaches here only through a dict
                raise _ReadFault(f"{ref.text}: {value.DESCRIPTOR.name} has no field {part!r}")
            raw = getattr(value, fd.name)
            if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
                value = {k: raw[k] for k in raw}
            elif fd.is_repeated:
                value = list(raw)
            elif fd.enum_type is not None:
                number = fd.enum_type.values_by_number.get(raw)
                value = number.name if number is not None else raw
            else:
                value = raw
        elif isinstance(value, list) and isinstance(part, int):
            if part >= len(value):
                raise _ReadFault(f"{ref.text}: [{part}] of a list of {len(value)}")
            value = value[part]
        elif isinstance(value, dict) and isinstance(part, str):
            if part not in value:
                raise _ReadFault(f"{ref.text}: no key {part!r} (it has {', '.join(map(str, value)) or 'none'})")
            value = value[part]
        else:
            raise _ReadFault(f"{ref.text}: {part!r} of {type(value).__name__}")
    return [value] if ref.wrap else value


def as_json(value: Any) -> Any:
    """``value`` as ParseDict and json.dumps take it: bytes as base64, messages as mappings."""
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    if isinstance(value, Message):
        return json_format.MessageToDict(value, preserving_proto_field_name=True)
    if isinstance(value, list):
        return [as_json(v) for v in value]
    if isinstance(value, dict):
        return {str(k): as_json(v) for k, v in value.items()}
    return value


def _as_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, int | float):
        return str(value)
    return json.dumps(as_json(value))


def resolve(template: Template, values: Mapping[str, Mapping[str, Any]]) -> Any:
    """``template`` with its references replaced by what they read (raises _ReadFault)."""
    if isinstance(template, Ref):
        return _read(template, values)
    if isinstance(template, Interpolated):
        return "".join(p if isinstance(p, str) else _as_text(_read(p, values)) for p in template.parts)
    if isinstance(template, dict):
        return {k: resolve(v, values) for k, v in template.items()}
    if isinstance(template, list):
        return [resolve(v, values) for v in template]
    return template


def build_request(step: Step, values: Mapping[str, Mapping[str, Any]], meta: Message | None) -> Message:
    """The step's request: its template resolved and parsed, with the caller's ``meta``."""
    where = {"step": step.id, "method": step.display}
    try:
        resolved = resolve(step.request, values)
    except _ReadFault as fault:
        raise InvalidArgument(f"step {step.id!r}: {fault}", metadata=where) from None
    request = step.request_type()
    try:
        json_format.ParseDict(as_json(resolved), request)
    except json_format.ParseError as err:
        raise InvalidArgument(
            f"step {step.id!r}: its request is not a valid {request.DESCRIPTOR.name}: {err}", metadata=where
        ) from None
    if meta is not None and "meta" in request.DESCRIPTOR.fields_by_name:
        cast(Any, request).meta.CopyFrom(meta)
    return request


async def collect(step: Step, responses: AsyncIterator[Message]) -> Message:
    """A streaming step's responses as one (see the module)."""
    merged = step.response_type()
    texts: list[str] = []
    chunks: list[bytes] = []
    async with contextlib.aclosing(cast(Any, responses)):  # closed early (a run cancelled), it cancels the call
        async for response in responses:
            if isinstance(response, speech_pb2.SynthesizeResponse):
                # The first chunk's format (rate, encoding) with every chunk's bytes; the end message is not kept.
                if response.HasField("audio"):
                    if not chunks:
                        merged.MergeFrom(response)
                    chunks.append(response.audio.data)
                continue
            if isinstance(response, llm_pb2.ChatResponse | llm_pb2.GenerateResponse):
                texts.append(response.delta)
            merged.MergeFrom(response)
    if isinstance(merged, llm_pb2.ChatResponse | llm_pb2.GenerateResponse):
        merged.delta = "".join(texts)
    if isinstance(merged, speech_pb2.SynthesizeResponse) and chunks:
        merged.audio.data = b"".join(chunks)
    return merged


async def run(
    scenario: Scenario, inputs: Mapping[str, Any], call: Call, meta: Message | None = None
) -> AsyncIterator[Event]:
    """Runs ``scenario`` on bound ``inputs`` (``bind_inputs``), yielding its events (see the module)."""
    values: dict[str, dict[str, Any]] = {"inputs": dict(inputs), "steps": {}}
    done: set[str] = set()
    waiting = list(scenario.steps)
    outputs = list(scenario.outputs)
    running: dict[asyncio.Task[Message], tuple[Step, float]] = {}
    try:
        while True:
            for output in [o for o in outputs if o.needs <= done]:
                outputs.remove(output)
                try:
                    value = resolve(output.value, values)
                except _ReadFault as fault:
                    raise InvalidArgument(
                        f"output {output.name!r}: {fault}", metadata={"output": output.name}
                    ) from None
                yield OutputReady(output.name, value)
            for step in [s for s in waiting if s.needs <= done]:
                waiting.remove(step)
                request = build_request(step, values, meta)
                running[asyncio.create_task(call(step, request), name=f"scenario step {step.id}")] = (
                    step,
                    time.perf_counter(),
                )
                yield StepStarted(step)
            if not running:
                return
            finished, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
            ended = time.perf_counter()
            # Several may finish at once: report them in the document's order.
            for task in sorted(finished, key=lambda t: scenario.steps.index(running[t][0])):
                step, started = running.pop(task)
                result = task.result()
                values["steps"][step.id] = result
                done.add(step.id)
                yield StepFinished(step, result, (ended - started) * 1000.0)
    finally:
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)
