"""ScenarioService: the shipped scenarios and each tenant's own, and runs of either (see
protos/aimass/v1/scenarios.proto for what a caller sees, docs/scenarios.md for the format).

- The shipped scenarios (gateway/scenarios/catalogue.py) are parsed when the gateway starts. A tenant's own are kept
  in the store (``scenarios`` table) as their source, validated when put and parsed again when run (parsing is far
  cheaper than any step). The tenant is the caller's (``current_scope().tenant``); another tenant's scenario is
  simply NOT_FOUND, and a tenant's scenario may not take a shipped name.
- A run is gateway/scenarios/runner.py's DAG; each step is an ordinary call of the caller's through the gateway's
  forwarder (gateway/composition.py ``Stages``): its key must allow the method, it counts against the tenant's
  quotas, and it carries the caller's RequestMeta (priority, request id) and is bounded by the caller's deadline
  and the step's own ``timeout``. A failed step fails the run with the step's status, its ErrorInfo naming the
  step (``step``, ``method``). The caller cancelling the run cancels the steps still running.
- Each step's start and result, and each output, are sent as they happen; ScenarioEnd ends a successful run.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any, Final

import grpc
from google.protobuf.message import Message

from aimass.runtime.config import ScenariosConfig
from aimass.runtime.errors import AimassError, FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from aimass.runtime.scope import current_scope
from aimass.store.records import ScenarioRecord, now_ms
from aimass.store.sql import SqlStore
from aimass.v1 import common_pb2, scenarios_pb2, scenarios_pb2_grpc
from gateway.composition import StageFailed, Stages
from gateway.scenarios import runner
from gateway.scenarios.catalogue import load_shipped
from gateway.scenarios.format import Scenario, ScenarioError, Step, parse

Context = grpc.aio.ServicerContext[Any, Any]

# ScenarioValue's oneof members as the runner's input kinds.
VALUE_KINDS: Final = {"text": "text", "data": "bytes", "number": "number", "flag": "flag", "json": "json"}


def info(scenario: Scenario, *, shipped: bool, updated_unix_ms: int = 0) -> scenarios_pb2.ScenarioInfo:
    return scenarios_pb2.ScenarioInfo(
        name=scenario.name,
        description=scenario.description,
        shipped=shipped,
        inputs=[
            scenarios_pb2.ScenarioInput(name=i.name, type=i.type, description=i.description, required=i.required)
            for i in scenario.inputs
        ],
        outputs=[o.name for o in scenario.outputs],
        steps=[f"{s.id}: {s.display.removeprefix('aimass.v1.').replace('/', '.')}" for s in scenario.steps],
        updated_unix_ms=updated_unix_ms,
    )


def to_value(value: Any) -> scenarios_pb2.ScenarioValue:
    """An output's value: text, bytes, a number or a flag as such; messages, lists and mappings as JSON."""
    if isinstance(value, str):
        return scenarios_pb2.ScenarioValue(text=value)
    if isinstance(value, bytes):
        return scenarios_pb2.ScenarioValue(data=value)
    if isinstance(value, bool):
        return scenarios_pb2.ScenarioValue(flag=value)
    if isinstance(value, int | float):
        return scenarios_pb2.ScenarioValue(number=float(value))
    return scenarios_pb2.ScenarioValue(json=json.dumps(runner.as_json(value)))


def given_inputs(values: Mapping[str, scenarios_pb2.ScenarioValue]) -> dict[str, runner.Given]:
    given: dict[str, runner.Given] = {}
    for name, value in values.items():
        kind = value.WhichOneof("kind")
        if kind is None:
            raise InvalidArgument(f"input {name!r} has no value", metadata={"input": name})
        given[name] = (VALUE_KINDS[kind], getattr(value, kind))
    return given


class ScenarioServicer(scenarios_pb2_grpc.ScenarioServiceServicer):
    """ScenarioService (see the module)."""

    def __init__(self, stages: Stages, store: SqlStore, limits: ScenariosConfig) -> None:
        self.stages = stages
        self.store = store
        self.limits = limits
        self.shipped = load_shipped(limits.directory, max_steps=limits.max_steps, max_bytes=limits.max_source_bytes)

    def _parse(self, source: str) -> Scenario:
        return parse(source, max_steps=self.limits.max_steps, max_bytes=self.limits.max_source_bytes)

    async def _find(self, name: str) -> tuple[Scenario, ScenarioRecord | None]:
        """The scenario ``name`` the caller sees: a shipped one, or its tenant's."""
        if not name:
            raise InvalidArgument(
                "name is empty: name a scenario (ListScenarios lists them)", metadata={"field": "name"}
            )
        if name in self.shipped:
            return self.shipped[name], None
        record = await asyncio.to_thread(self.store.get_scenario, current_scope().tenant, name)
        if record is None:
            raise NotFound(f"no scenario {name!r} (ListScenarios lists them)", metadata={"scenario": name})
        return self._parse(record.source), record

    async def ListScenarios(
        self, request: scenarios_pb2.ListScenariosRequest, context: Context
    ) -> scenarios_pb2.ListScenariosResponse:
        found = [info(s, shipped=True) for s in self.shipped.values()]
        records = await asyncio.to_thread(self.store.list_scenarios, current_scope().tenant)
        for record in sorted(records, key=lambda r: r.name):
            try:
                found.append(info(self._parse(record.source), shipped=False, updated_unix_ms=record.updated_unix_ms))
            except ScenarioError as err:
                # Stored when valid, no longer so (a method gone, a limit lowered): listed, so it can be fixed.
                found.append(
                    scenarios_pb2.ScenarioInfo(
                        name=record.name,
                        description=f"not valid now: {err.message}",
                        updated_unix_ms=record.updated_unix_ms,
                    )
                )
        return scenarios_pb2.ListScenariosResponse(scenarios=found)

    async def GetScenario(
        self, request: scenarios_pb2.GetScenarioRequest, context: Context
    ) -> scenarios_pb2.GetScenarioResponse:
        scenario, record = await self._find(request.name)
        updated = record.updated_unix_ms if record is not None else 0
        return scenarios_pb2.GetScenarioResponse(
            scenario=info(scenario, shipped=record is None, updated_unix_ms=updated), source=scenario.source
        )

    async def PutScenario(
        self, request: scenarios_pb2.PutScenarioRequest, context: Context
    ) -> scenarios_pb2.PutScenarioResponse:
        scenario = self._parse(request.source)
        if scenario.name in self.shipped:
            raise FailedPrecondition(
                f"{scenario.name!r} is a shipped scenario's name; give yours another",
                reason="SHIPPED_NAME",
                metadata={"scenario": scenario.name},
            )
        tenant = current_scope().tenant
        existing = await asyncio.to_thread(self.store.get_scenario, tenant, scenario.name)
        if existing is None:
            count = await asyncio.to_thread(self.store.count_scenarios, tenant)
            if count >= self.limits.max_per_tenant:
                raise ResourceExhausted(
                    f"this tenant keeps {count} scenarios, the most allowed (scenarios.max_per_tenant); delete some",
                    reason="TOO_MANY_SCENARIOS",
                    metadata={"limit": str(self.limits.max_per_tenant)},
                    pushback_ms=-1,
                )
        now = now_ms()
        record = ScenarioRecord(
            tenant_id=tenant,
            name=scenario.name,
            source=request.source,
            created_unix_ms=existing.created_unix_ms if existing is not None else now,
            updated_unix_ms=now,
        )
        await asyncio.to_thread(self.store.put_scenario, record)
        return scenarios_pb2.PutScenarioResponse(scenario=info(scenario, shipped=False, updated_unix_ms=now))

    async def DeleteScenario(
        self, request: scenarios_pb2.DeleteScenarioRequest, context: Context
    ) -> scenarios_pb2.DeleteScenarioResponse:
        if request.name in self.shipped:
            raise FailedPrecondition(
                f"{request.name!r} is shipped with aimass; it cannot be deleted",
                reason="SHIPPED_SCENARIO",
                metadata={"scenario": request.name},
            )
        if not await asyncio.to_thread(self.store.delete_scenario, current_scope().tenant, request.name):
            raise NotFound(f"no scenario {request.name!r} of this tenant", metadata={"scenario": request.name})
        return scenarios_pb2.DeleteScenarioResponse()

    async def RunScenario(
        self, request: scenarios_pb2.RunScenarioRequest, context: Context
    ) -> AsyncIterator[scenarios_pb2.RunScenarioResponse]:
        started = time.perf_counter()
        scenario, _ = await self._find(request.name)
        inputs = runner.bind_inputs(scenario, given_inputs(request.inputs))
        meta = common_pb2.RequestMeta()
        meta.CopyFrom(request.meta)
        if not meta.request_id:
            meta.request_id = current_scope().request_id

        async def call(step: Step, step_request: Message) -> Message:
            try:
                if step.streaming:
                    responses = self.stages.stream(
                        context, step.method, step_request, step.response_type, timeout_s=step.timeout_s
                    )
                    return await runner.collect(step, responses)
                return await self.stages.unary(
                    context, step.method, step_request, step.response_type, timeout_s=step.timeout_s
                )
            except StageFailed as failed:
                raise failed.as_error(step.id, step.method) from None
            except AimassError as refused:  # the caller may not make this step's call (its key's scopes, quotas)
                refused.metadata.setdefault("step", step.id)
                refused.metadata.setdefault("method", step.display)
                refused.message = f"step {step.id!r} ({step.display}): {refused.message}"
                refused.args = (refused.message,)
                raise

        async for event in runner.run(scenario, inputs, call, meta):
            if isinstance(event, runner.StepStarted):
                yield scenarios_pb2.RunScenarioResponse(
                    step_started=scenarios_pb2.StepStarted(step=event.step.id, method=event.step.display)
                )
            elif isinstance(event, runner.StepFinished):
                finished = scenarios_pb2.StepFinished(
                    step=event.step.id, method=event.step.display, duration_ms=event.duration_ms
                )
                finished.result.Pack(event.result)
                yield scenarios_pb2.RunScenarioResponse(step_finished=finished)
            else:
                yield scenarios_pb2.RunScenarioResponse(
                    output=scenarios_pb2.ScenarioOutput(name=event.name, value=to_value(event.value))
                )
        yield scenarios_pb2.RunScenarioResponse(
            end=scenarios_pb2.ScenarioEnd(duration_ms=(time.perf_counter() - started) * 1000.0)
        )
