"""One run of a trace through a simulated mesh, with the production control plane in the loop.

What is real code here, not a model of it:
- Routers: ``gateway.router.make_router`` over real ``gateway.replicas.Replica`` objects whose ``inflight`` each
  gateway raises at dispatch and lowers at the answer (or the deadline), as gateway/forwarder.py does.
- The view: replicas' ``ReportLoadRequest``s and node agents' ``ReportNodeRequest``s (``SimulatedFleet.read()``)
  go into a ``scheduler.service.SchedulerState``, whose ``view()`` each gateway's ``LoadView.apply`` takes every
  view interval. Routers read exactly what they read in production, as stale as the intervals make it.
- Placement: the scheduler state's ``PlacementTable`` over ``SchedulerState.devices(model)``, as PlaceModel calls
  it (best fit, least-recently-used eviction of idle models), at start and whenever a request names a model no
  replica holds; the replicas' load reports then move placements to LOADED and the LRU clock along.

Simulated: arrivals, queues, batch execution times (calibration / device speed), load times and memory.
Candidates for a request are the replicas holding its model: the forwarder's rule when replicas' registry entries
list different models. Here a replica's entry lists the models placed on it (in the mesh today it lists the whole
catalogue of its service, so the forwarder cannot tell where a model is loaded).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import grpc

from aimass.runtime.discovery import Instance
from aimass.runtime.errors import FailedPrecondition, ResourceExhausted
from aimass.v1 import common_pb2, models_pb2, scheduler_pb2
from gateway.replicas import Replica
from gateway.router import Router, make_router
from gateway.view import LoadView
from scheduler.devices import SimulatedFleet
from scheduler.placement import Device
from scheduler.service import SchedulerState
from simulator.engine import EventLoop
from simulator.fleet import MODEL_VERSION, SimReplica
from simulator.reference import REFERENCES, make_reference
from simulator.scenario import ModelSpec, Scenario
from simulator.workload import Outcome, Request

KIND = "sim"


def ms(seconds: float) -> int:
    return round(seconds * 1000)


@dataclass
class ReplicaStats:
    instance_id: str
    gpu: str
    speed: float
    memory_bytes: int
    busy_s: float
    batches: int
    models: tuple[str, ...]


@dataclass
class RunResult:
    scenario: str
    router: str
    duration_s: float
    requests: list[Request]
    replicas: list[ReplicaStats]
    tenant_busy_s: dict[str, float]
    placements_initial: int
    placements_on_demand: int
    evictions: int
    placement_failures: int
    events: int
    wall_s: float
    views_applied: int


class SimGateway:
    """One gateway: its own Replica objects (own in-flight counts), its own copy of the view, its own router."""

    def __init__(
        self, index: int, router: str, seed: int, instances: Sequence[Instance], speeds: Mapping[str, float]
    ) -> None:
        self.index = index
        rng = random.Random(f"{seed}:gateway{index}")
        self.view: LoadView
        self.router: Router
        if router in REFERENCES:
            self.router, self.view = make_reference(router, speeds)
        else:
            self.view = LoadView()
            self.router = make_router(router, self.view, rng)
        # The watch stream is up for the whole run (a scheduler outage is another scenario).
        self.view.connected = True
        # The channel is never dialled (grpc.aio connects lazily): a Replica needs one, the simulator sends nothing.
        self.replicas = {
            i.instance_id: Replica(i, grpc.aio.insecure_channel(f"{i.instance_id}.sim.invalid:1")) for i in instances
        }
        self._by_service: dict[str, list[Replica]] = {}
        self._reindex()

    def _reindex(self) -> None:
        by_service: dict[str, list[Replica]] = {}
        for replica in sorted(self.replicas.values(), key=lambda r: r.instance.instance_id):
            for service in replica.instance.services:
                by_service.setdefault(service, []).append(replica)
        self._by_service = by_service

    def update(self, instance: Instance) -> None:
        """A registry change (ReplicaSet.apply keeps the Replica and swaps its instance)."""
        self.replicas[instance.instance_id].instance = instance

    def candidates(self, service: str, model: str) -> list[Replica]:
        return [r for r in self._by_service.get(service, []) if model in r.instance.models]

    async def close(self) -> None:
        for replica in self.replicas.values():
            await replica.channel.close()


class Simulation:
    def __init__(self, scenario: Scenario, router: str, trace: Sequence[Request], *, seed: int = 0) -> None:
        self.scenario = scenario
        self.router = router
        self.trace = list(trace)
        self.seed = seed
        self.loop = EventLoop()
        self.aio = asyncio.new_event_loop()
        self.state = SchedulerState(report_interval_s=scenario.report_interval_s)
        self.nodes = [SimulatedFleet(f"node{i}", [gpu]) for i, gpu in enumerate(scenario.gpus)]
        served = {spec.profile.name: spec.batching for spec in scenario.models}
        admission = {t.name: t.weight for t in scenario.tenants} if scenario.admission else None
        self.replicas = {
            f"node{i}-replica": SimReplica(
                f"node{i}-replica", node, self.loop, self._answered, served, admission=admission
            )
            for i, node in enumerate(self.nodes)
        }
        self.services = tuple(sorted({m.profile.service for m in scenario.models}))
        self.instances = {
            iid: Instance(iid, KIND, self.services, f"{iid}.sim.invalid:1") for iid in sorted(self.replicas)
        }
        self.gateways: list[SimGateway] = []
        self._pids = iter(range(1000, 1 << 30))
        self.placements_initial = 0
        self.placements_on_demand = 0
        self.evictions = 0
        self.placement_failures = 0
        self.views_applied = 0
        for spec in scenario.models:
            self.state.table.footprints.record(
                _ref(spec.profile.name),
                common_pb2.DEVICE_KIND_GPU,
                spec.profile.footprint_bytes,
                measured=spec.profile.measured,
            )

    # -- control plane -----------------------------------------------------------------------------------------

    def _changed(self) -> None:
        # The servicer's own step after every report (bumps the view's version and wakes watchers).
        self.aio.run_until_complete(self.state.changed())

    def _report_load(self, replica: SimReplica) -> None:
        models, window = replica.model_loads()
        self.state.record_load(
            scheduler_pb2.ReportLoadRequest(
                instance_id=replica.instance_id,
                node_id=replica.node.node_id,
                state=common_pb2.SERVING_STATE_SERVING,
                models=models,
                window_seconds=window,
                observed_unix_ms=ms(self.loop.now),
            )
        )
        self._changed()

    def _report_node(self, replica: SimReplica) -> None:
        utilization = replica.utilization_since_last()
        replica.node.set_utilization(0, utilization * 100)
        self.state.record_node(
            scheduler_pb2.ReportNodeRequest(
                node_id=replica.node.node_id,
                host=replica.node.node_id,
                devices=replica.node.read(),
                source=replica.node.source,
                observed_unix_ms=ms(self.loop.now),
            )
        )
        self._changed()

    def _push_view(self, gateway: SimGateway) -> None:
        if gateway.view.apply(self.state.view()):
            self.views_applied += 1

    def _gpu_devices(self, model: str) -> list[Device]:
        # As PlaceModel asks: the devices of replicas that serve ``model``; the GPUs (a node's CPU is no GPU).
        return [d for d in self.state.devices(model) if d.kind == common_pb2.DEVICE_KIND_GPU]

    def _is_busy(self, model: common_pb2.ModelRef, device_id: str) -> bool:
        # What the scheduler knows from reports, or work the replica holds right now: a replica does not unload a
        # model with requests queued (its reports lag by up to one interval).
        if self.state.is_busy(model, device_id):
            return True
        return any(r.device_id == device_id and r.busy_with(model.name) for r in self.replicas.values())

    def _registry_update(self, replica: SimReplica) -> None:
        instance = dataclasses.replace(self.instances[replica.instance_id], models=tuple(sorted(replica.models)))
        self.instances[replica.instance_id] = instance
        self.state.set_instances(list(self.instances.values()))
        for gateway in self.gateways:
            gateway.update(instance)

    def _place(
        self, spec: ModelSpec, *, target_node: str = "", allow_eviction: bool, preload: bool = False
    ) -> SimReplica | None:
        """PlacementTable.place (PENDING), then the replica loads it (``preload``: already loaded, the deployment
        before the trace starts); its next load report makes the placement LOADED, as in production."""
        name = spec.profile.name
        ref = _ref(name)
        target = models_pb2.PlacementTarget(node_id=target_node) if target_node else None
        try:
            result = self.state.table.place(
                ref,
                0,
                self._gpu_devices(name),
                target=target,
                allow_eviction=allow_eviction,
                is_busy=self._is_busy,
                now_ms=ms(self.loop.now),
            )
        except (ResourceExhausted, FailedPrecondition):
            self.placement_failures += 1
            return None
        placement = result.placement
        replica = self.replicas[placement.instance_id]
        if result.already_placed:
            return replica
        for victim in result.evicted:
            evicted = self.replicas[victim.instance_id]
            evicted.remove_model(victim.model.name)
            self.evictions += 1
            self._registry_update(evicted)
        replica.add_model(spec.profile, spec.batching, next(self._pids), loaded=preload)
        if not preload:
            self.loop.after(spec.profile.load_seconds, functools.partial(replica.finish_loading, name))
        self._registry_update(replica)
        self._changed()
        return replica

    def _deploy(self) -> None:
        """The copies each model starts with, spread over the replicas holding the fewest models (fastest first)."""
        for spec in self.scenario.models:
            for _ in range(min(spec.copies, len(self.replicas))):
                free = [r for r in self.replicas.values() if spec.profile.name not in r.models]
                free.sort(key=lambda r: (len(r.models), -r.speed, r.instance_id))
                for replica in free:
                    placed = self._place(spec, target_node=replica.node.node_id, allow_eviction=False, preload=True)
                    if placed is not None:
                        self.placements_initial += 1
                        break
        # Placements not yet reported LOADED reserve their bytes in the table, so one round of reports at the end
        # is enough to keep the table's memory accounting right throughout.
        self._report_all()

    def _report_all(self) -> None:
        for replica in self.replicas.values():
            self._report_load(replica)
            self._report_node(replica)

    # -- data plane --------------------------------------------------------------------------------------------

    def _arrive(self, request: Request) -> None:
        spec = self.scenario.model(request.model)
        gateway = self.gateways[request.gateway]
        candidates = gateway.candidates(spec.profile.service, request.model)
        if not candidates:
            placed = self._place(spec, allow_eviction=True)
            if placed is None:
                request.outcome, request.finished = Outcome.REJECTED, self.loop.now
                return
            self.placements_on_demand += 1
            candidates = gateway.candidates(spec.profile.service, request.model)
        chosen = gateway.router.choose(spec.profile.service, candidates)
        chosen.inflight += 1
        request.replica = chosen.instance.instance_id
        accepted = self.replicas[request.replica].submit(request)
        others = [c for c in candidates if c is not chosen]
        if not accepted and "retry_after_s" in request.extra and others:
            # Refused as unmeetable: the gateway tries once more on another replica (gateway/forwarder.py).
            chosen.inflight -= 1
            del request.extra["retry_after_s"]
            chosen = gateway.router.choose(spec.profile.service, others)
            chosen.inflight += 1
            request.replica = chosen.instance.instance_id
            accepted = self.replicas[request.replica].submit(request)
        if not accepted:
            refused = "retry_after_s" in request.extra
            request.outcome = Outcome.REFUSED if refused else Outcome.REJECTED
            request.finished = self.loop.now
            chosen.inflight -= 1
            return
        self.loop.at(request.arrival + request.deadline_s, lambda: self._deadline(request))

    def _answered(self, request: Request) -> None:
        self.gateways[request.gateway].replicas[request.replica].inflight -= 1

    def _deadline(self, request: Request) -> None:
        if request.outcome is not Outcome.PENDING:
            return
        request.outcome, request.finished = Outcome.TIMED_OUT, self.loop.now
        self.gateways[request.gateway].replicas[request.replica].inflight -= 1
        self.replicas[request.replica].cancel(request)

    def _next_arrival(self, index: int) -> None:
        self._arrive(self.trace[index])
        if index + 1 < len(self.trace):
            self.loop.at(self.trace[index + 1].arrival, lambda: self._next_arrival(index + 1))

    # -- the run -----------------------------------------------------------------------------------------------

    def run(self) -> RunResult:
        started = time.perf_counter()
        asyncio.set_event_loop(self.aio)
        try:
            return self._run(started)
        finally:
            for gateway in self.gateways:
                self.aio.run_until_complete(gateway.close())
            asyncio.set_event_loop(None)
            self.aio.close()

    def _run(self, started: float) -> RunResult:
        scenario = self.scenario
        self.state.set_instances(list(self.instances.values()))
        self._report_all()
        self._deploy()
        speeds = {iid: replica.speed for iid, replica in self.replicas.items()}
        self.gateways = [
            SimGateway(i, self.router, self.seed, list(self.instances.values()), speeds)
            for i in range(scenario.gateways)
        ]
        for gateway in self.gateways:
            self._push_view(gateway)
        last_deadline = max((r.deadline_s for r in self.trace), default=0.0)
        end = scenario.duration_s + last_deadline + 1.0
        phases = random.Random(f"{self.seed}:phases")
        interval = scenario.report_interval_s
        for replica in self.replicas.values():
            replica.measure_until = scenario.duration_s
            # Each reporter on its own phase, as independent processes are.
            load_report = functools.partial(self._report_load, replica)
            node_report = functools.partial(self._report_node, replica)
            self.loop.every(interval, load_report, start=phases.uniform(0, interval), until=end)
            self.loop.every(interval, node_report, start=phases.uniform(0, interval), until=end)
        for gateway in self.gateways:
            self.loop.every(
                scenario.view_interval_s,
                functools.partial(self._push_view, gateway),
                start=phases.uniform(0, scenario.view_interval_s),
                until=end,
            )
        if self.trace:
            self.loop.at(self.trace[0].arrival, lambda: self._next_arrival(0))
        self.loop.run(until=end)
        tenant_busy: dict[str, float] = {}
        for replica in self.replicas.values():
            for tenant, seconds in replica.tenant_busy_s.items():
                tenant_busy[tenant] = tenant_busy.get(tenant, 0.0) + seconds
        return RunResult(
            scenario=scenario.name,
            router=self.router,
            duration_s=scenario.duration_s,
            requests=self.trace,
            replicas=[
                ReplicaStats(
                    r.instance_id, r.gpu.name, r.speed, r.gpu.memory_bytes, r.busy_s, r.batches, tuple(sorted(r.models))
                )
                for r in self.replicas.values()
            ],
            tenant_busy_s=tenant_busy,
            placements_initial=self.placements_initial,
            placements_on_demand=self.placements_on_demand,
            evictions=self.evictions,
            placement_failures=self.placement_failures,
            events=self.loop.processed,
            wall_s=time.perf_counter() - started,
            views_applied=self.views_applied,
        )


def _ref(name: str) -> common_pb2.ModelRef:
    return common_pb2.ModelRef(name=name, version=MODEL_VERSION)


def simulate(scenario: Scenario, router: str, trace: Sequence[Request], *, seed: int = 0) -> RunResult:
    """Runs ``trace`` (fresh requests: see workload.fresh_copy) through ``scenario`` with ``router``."""
    return Simulation(scenario, router, trace, seed=seed).run()
