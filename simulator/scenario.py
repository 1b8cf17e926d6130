"""What a simulation is given: the fleet, the models (with how many copies are deployed up front), the tenants and
the report cadence. Named scenarios are built in simulator/scenarios.py."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from aimass.runtime.config import SchedulerConfig
from scheduler.devices import SimulatedGpu
from scheduler.service import DEFAULT_VIEW_INTERVAL_MS
from simulator.calibration import ModelProfile
from simulator.fleet import BatchingSpec
from simulator.workload import Tenant, zipf_weights


@dataclass(frozen=True)
class ModelSpec:
    profile: ModelProfile
    batching: BatchingSpec = field(default_factory=BatchingSpec)
    # Copies placed before the trace starts (loaded); 0: placed on demand at its first request (cold load).
    copies: int = 1


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    # One single-GPU node (and one replica) per entry.
    gpus: tuple[SimulatedGpu, ...]
    models: tuple[ModelSpec, ...]
    tenants: tuple[Tenant, ...]
    duration_s: float
    # Gateways behind a load balancer; each routes with its own in-flight counts and its own copy of the view.
    gateways: int = 1
    # Replicas' load reports and node agents' readings, each at this interval (production's default
    # scheduler.report_interval_s).
    report_interval_s: float = SchedulerConfig().report_interval_s
    # The scheduler pushes the view to each gateway at most this often (WatchView's default min_interval_ms).
    view_interval_s: float = DEFAULT_VIEW_INTERVAL_MS / 1000
    # SLO-aware admission at the replicas, a refusal retried once elsewhere (simulator/admission.py).
    admission: bool = False

    def model(self, name: str) -> ModelSpec:
        for spec in self.models:
            if spec.profile.name == name:
                return spec
        raise KeyError(f"scenario {self.name} has no model {name!r}")

    @property
    def offered_rate(self) -> float:
        return sum(t.mean_rate for t in self.tenants)

    @property
    def capacity(self) -> float:
        """Device seconds the fleet has per second, in calibration-host units (the sum of the GPUs' speeds)."""
        return sum(gpu.speed for gpu in self.gpus)

    def offered_work(self, batch: int = 8) -> float:
        """Host-device seconds per second the tenants ask for on average, each request costed at ``batch``."""
        work = 0.0
        for tenant in self.tenants:
            for name, share in zip(tenant.models, zipf_weights(len(tenant.models), tenant.zipf_s), strict=True):
                work += tenant.mean_rate * share * self.model(name).profile.seconds(batch) / batch
        return work

    def scaled(self, factor: float) -> Scenario:
        """Every tenant's rates (bursts included) times ``factor``."""
        return dataclasses.replace(self, tenants=tuple(t.scaled(factor) for t in self.tenants))

    def loaded_to(self, fraction: float, batch: int = 8) -> Scenario:
        """Rates scaled so the average offered work, costed at ``batch``, is ``fraction`` of the fleet's capacity:
        a load level that holds whatever the calibration measured."""
        return self.scaled(fraction * self.capacity / self.offered_work(batch))
