"""SLO-aware admission in the simulated mesh: the live replicas' policy, so that past saturation the requests that
cannot meet their SLO are refused at once instead of all going late.

The live batcher (aimass.runtime.batcher ``_check_meetable``) refuses on arrival, RESOURCE_EXHAUSTED with reason
DEADLINE_UNMEETABLE and a retry delay, a request the work queued ahead of it would keep past its deadline; the
gateway tries such a refusal once on another replica (gateway/forwarder.py). Here the same, at three places:

- A simulated replica's batched queue: ``BatchedAdmission`` is aimass.runtime.backlog's ``DrainEstimate`` itself,
  learning seconds per unit from the simulated batches, and refuses what would finish past the request's target
  (``finish x HEADROOM > time left``), never a request that finds nothing ahead, never before ``MIN_BATCHES``.
  The work ahead is counted by tenant share, as live (weighted by ``Tenant.weight``); the simulated queue itself
  stays first come first served (fleet.py), so what makes shares follow weights under overload is who is refused.
  Two additions to the live estimate, both found needed here: the newcomer's batch is at least the k-th whole
  batch (k = ceil(units ahead / max batch size), each a mean batch long: a per-unit mean undercounts a queue of a
  few batches when batches have a large fixed cost), and once the queue is half way to refusing everyone
  (``CONGESTED``) a tenant admitted beyond its weighted share lately is refused while a tenant under its share is
  being refused (max-min: nothing is taken from a tenant when the others ask for no more). Candidates for the
  live batcher too; not ported there (aimass/ is not this change's).
  The simulated GPU runs one batch at a time for all the models on it, longest waiting first: the other models'
  queued work (their queued units at their learnt pace) and a batch of another model running now come first too,
  and an LLM engine with work there takes a step between batches (a live batcher has its device to itself).
- A simulated LLM engine: ``LlmAdmission`` estimates time to first token from the prefill tokens that run before
  the newcomer (waiting requests of its priority or a higher one, ahead in vLLM's order, and running ones still
  prefilling) at the step's token budget less the decodes riding along, at the current step time; when the KV
  cache or ``max_num_seqs`` leaves no room, it adds the time until the first running request ends; higher
  priorities' recent requests (at the device seconds a request has cost lately) stretch it by 1 / (1 - their
  share of the engine), as the live estimate does.
  It refuses when that TTFT x HEADROOM is past the TTFT SLO.
- The simulated gateway (simulator/mesh.py): a refusal is retried once on another replica chosen by the same
  router; refused again, the request is answered at once with the retry delay (``Outcome.REFUSED``): a miss of
  the SLO for attainment, not a late answer, and no device time spent on it.

The target is the request's SLO (for an LLM request its TTFT SLO), not its gRPC deadline: in the mesh a caller
who needs the answer within its SLO sets its deadline to it, and an answer after the SLO counts for nothing in
goodput (requests meeting SLO per second). Admission is off unless the scenario turns it on (``Scenario.admission``),
so existing scenarios' results are unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from aimass.runtime.backlog import EWMA_ALPHA, HEADROOM, MAX_HIGHER_SHARE, DecayingRate, DrainEstimate
from simulator.llm import LlmEngineModel
from simulator.workload import Request

# A queue this far towards the point of refusing everyone (finish past CONGESTED x the time left, with headroom)
# refuses the tenants admitted beyond their weighted share lately: shares follow weights before the queue is full.
CONGESTED = 0.5

# Floor and default of the retry delay a refusal names (as the live batcher: at least 10 ms; 1 s when no wait can
# be named).
MIN_RETRY_S = 0.010
UNKNOWN_RETRY_S = 1.0


def retry_after(finish_s: float, time_left_s: float) -> float:
    """The retry delay a refusal names: when the backlog would have drained enough for the request to fit."""
    if math.isinf(finish_s):
        return UNKNOWN_RETRY_S
    return max(MIN_RETRY_S, finish_s - time_left_s / HEADROOM)


@dataclass
class BatchedAdmission:
    """One model's queue on one simulated replica, judged as aimass.runtime.batcher judges its own.

    Work ahead counts by tenant share as the live batcher's ``_units_ahead`` does, with the tenants' weights: all of
    the newcomer's own tenant's queued units, and of each other tenant as much as a weighted fair share runs
    meanwhile (at most its queue, and ``weight_other / weight_own`` times the newcomer's tenant's queue plus the
    newcomer). So under overload a tenant over its weighted share sees the longest wait and is the one refused; the
    admitted (and so the served) work splits by weight."""

    weights: Mapping[str, float] = field(default_factory=dict)
    max_batch_size: int = 1
    drain: DrainEstimate = field(default_factory=DrainEstimate)
    # Units admitted and not yet taken into a batch (or cancelled), per tenant.
    queued: dict[str, int] = field(default_factory=dict)
    # Units admitted and refused lately, per tenant (for shares under congestion).
    tenant_rates: dict[str, DecayingRate] = field(default_factory=dict)
    tenant_refusals: dict[str, DecayingRate] = field(default_factory=dict)
    refused: int = 0

    def weight(self, tenant: str) -> float:
        return self.weights.get(tenant, 1.0)

    def observe(self, units: int, seconds: float) -> None:
        self.drain.observe(units, seconds)

    def left_queue(self, request: Request) -> None:
        """``request`` was taken into a batch or cancelled while queued."""
        self.queued[request.tenant] = self.queued.get(request.tenant, 0) - 1

    def units_ahead(self, tenant: str) -> int:
        own = self.queued.get(tenant, 0)
        w = self.weight(tenant)
        return own + sum(
            min(n, math.ceil((own + 1) * self.weight(t) / w)) for t, n in self.queued.items() if t != tenant
        )

    def check(
        self,
        request: Request,
        now: float,
        running_for_s: float | None,
        device_s: float = 0.0,
        between_batches_s: float = 0.0,
    ) -> float | None:
        """The retry delay (seconds) when ``request`` would miss its SLO behind the work ahead, the batch of this
        model running for ``running_for_s`` (None: none runs) and ``device_s`` of other models' work the device
        runs first, and ``between_batches_s`` (an LLM engine's step on the same device) before each of the batches
        ahead; None when it is admitted."""
        level = request.priority
        ahead = self.units_ahead(request.tenant)
        if self.drain.ready and (ahead > 0 or device_s > 0):
            higher = self.drain.higher_share(level, now, 1)
            finish = self.drain.seconds_to_finish(ahead, 1, running_for_s, 1, higher)
            # Batches run whole: the newcomer's is the k-th to start, each about a mean batch long (the per-unit
            # mean alone undercounts a queue of a few batches when batches have a large fixed cost).
            batches = math.ceil((ahead + 1) / self.max_batch_size)
            finish = max(finish, batches * self.drain.batch_s / (1.0 - higher) if higher < 1.0 else math.inf)
            finish += (device_s + batches * between_batches_s) / (1.0 - higher) if higher < 1.0 else math.inf
            left = request.arrival + request.slo_s - now
            congested = self.drain.would_miss(finish / CONGESTED, left)
            if self.drain.would_miss(finish, left) or (congested and self.over_share(request.tenant, now)):
                self.refused += 1
                self.tenant_refusals.setdefault(request.tenant, DecayingRate()).add(1, now)
                return retry_after(finish, left)
        self.drain.admitted(level, 1, now)
        self.queued[request.tenant] = self.queued.get(request.tenant, 0) + 1
        self.tenant_rates.setdefault(request.tenant, DecayingRate()).add(1, now)
        return None

    def over_share(self, tenant: str, now: float) -> bool:
        """Whether ``tenant`` was admitted more than its weighted share of the units admitted lately (among the
        tenants admitted lately) while a tenant under its own share was refused lately: max-min fairness, which
        takes nothing from a tenant when the others ask for no more."""
        rates = {t: r.per_second(now) for t, r in self.tenant_rates.items()}
        total = sum(rates.values())
        if total <= 0:
            return False
        active = sum(self.weight(t) for t, rate in rates.items() if rate > 0.01 * total) or 1.0

        def over(t: str) -> bool:
            return rates.get(t, 0.0) / total > self.weight(t) / active

        if not over(tenant):
            return False
        return any(
            t != tenant and not over(t) and r.per_second(now) > 0.01 * total for t, r in self.tenant_refusals.items()
        )


@dataclass
class LlmAdmission:
    """One LLM engine's time-to-first-token estimate and refusals."""

    refused: int = 0
    # Admitted requests per second, by priority (lower first): higher priorities' work arriving while a newcomer
    # waits runs first, stretching its wait by 1 / (1 - their share), as DrainEstimate.higher_share.
    arrivals: dict[int, DecayingRate] = field(default_factory=dict)
    # Device seconds a request costs the engine (its share of every step it ran in), a running mean of those that
    # ended: DrainEstimate's unit cost, with a request as the unit.
    request_s: float = 0.0
    ended: int = 0
    # Seconds per engine step, a running mean (other models' batches on the device wait for a step between them).
    step_s: float = 0.0

    def observe_step(self, seconds: float) -> None:
        self.step_s = seconds if self.step_s == 0 else self.step_s + EWMA_ALPHA * (seconds - self.step_s)

    def observe(self, request: Request) -> None:
        """``request`` ended, having cost ``request.service_s`` of the device."""
        if self.ended == 0:
            self.request_s = request.service_s
        else:
            self.request_s += EWMA_ALPHA * (request.service_s - self.request_s)
        self.ended += 1

    def higher_share(self, priority: int, now: float) -> float:
        """The fraction of the engine that higher priorities' requests keep busy lately."""
        rate = sum(r.per_second(now) for p, r in self.arrivals.items() if p < priority)
        return rate * self.request_s

    def ttft_estimate(self, engine: LlmEngineModel, request: Request) -> float | None:
        """Seconds until ``request``'s first token if queued now; None when nothing runs before it (never refused)."""
        profile = engine.profile
        key = (request.priority, request.arrival, request.id)
        ahead = [s for s in engine.waiting if s.key < key]
        prefilling = [s for s in engine.running if s.computed < s.prompt]
        if not ahead and not prefilling:
            return None
        tokens = sum(s.length - s.computed for s in ahead) + sum(s.prompt - s.computed for s in prefilling)
        tokens += request.prompt_tokens
        decodes = len(engine.running) - len(prefilling)
        budget = max(1, profile.max_num_batched_tokens - decodes)
        steps = math.ceil(tokens / budget)
        step_s = profile.step_seconds(min(tokens, budget), decodes, engine.speed)
        seconds = steps * step_s
        blocks_needed = sum(math.ceil((s.length + 1) / profile.block_size) for s in ahead)
        blocks_needed += math.ceil((request.prompt_tokens + 1) / profile.block_size)
        full = len(engine.running) + len(ahead) >= profile.max_num_seqs or blocks_needed > engine.free_blocks
        if full and engine.running:
            # No room until a running request ends: the one closest to its last token.
            tokens_left = min(s.output - s.generated for s in engine.running)
            seconds += tokens_left * profile.step_seconds(0, max(1, decodes), engine.speed)
        return seconds

    def check(self, engine: LlmEngineModel, request: Request, now: float) -> float | None:
        """The retry delay (seconds) when ``request`` would miss its TTFT SLO; None when it is admitted."""
        if request.slo_ttft_s <= 0:
            return None
        ttft = self.ttft_estimate(engine, request)
        if ttft is not None:
            higher = self.higher_share(request.priority, now)
            ttft = ttft / (1.0 - higher) if higher < MAX_HIGHER_SHARE else math.inf
            left = request.arrival + request.slo_ttft_s - now
            if ttft * HEADROOM > left:
                self.refused += 1
                return retry_after(ttft, left)
        self.arrivals.setdefault(request.priority, DecayingRate()).add(1, now)
        return None
