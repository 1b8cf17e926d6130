"""Arrival traces: who sends what, when, and how soon they need the answer.

- Arrivals per tenant: a Poisson process, or an on/off Markov-modulated Poisson process (bursts at ``burst_rate``
  for exponentially distributed "on" periods, ``rate`` in between), the usual model of bursty API traffic.
- Which model a request names: Zipf over the tenant's models (the first is the most popular).
- Request classes carry the latency SLO (a request finished later misses it) and the gRPC deadline (after which the
  gateway gives up: DEADLINE_EXCEEDED, also a miss). An LLM class's SLO is on time to first token (TTFT) and time
  per output token after the first (TPOT) instead.
- LLM requests carry prompt and output token counts: drawn from a tenant's ``TokenShape`` (lognormal, clipped), or
  replayed with their arrivals from a recorded trace (``Tenant.replay``, see simulator/trace.py).

A trace is generated once per seed and replayed for every router, so they are compared on identical requests.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum


@dataclass(frozen=True)
class RequestClass:
    name: str
    # Finished within this many seconds of arrival: the SLO is met.
    slo_s: float
    # The caller's deadline: the gateway cancels the call after it (counts as a miss).
    deadline_s: float
    # LLM classes (both > 0): the SLO is TTFT <= slo_ttft_s and TPOT <= slo_tpot_s, not the whole latency.
    slo_ttft_s: float = 0.0
    slo_tpot_s: float = 0.0
    # vLLM's priority: lower runs first (aimass.runtime.scope ranks interactive before batch).
    priority: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.slo_s <= self.deadline_s:
            raise ValueError(f"class {self.name}: need 0 < slo_s <= deadline_s, got {self.slo_s}, {self.deadline_s}")
        if (self.slo_ttft_s > 0) != (self.slo_tpot_s > 0) or self.slo_ttft_s < 0 or self.slo_tpot_s < 0:
            raise ValueError(f"class {self.name}: set both slo_ttft_s and slo_tpot_s (> 0) or neither")


@dataclass(frozen=True)
class TokenShape:
    """Prompt and output tokens of a tenant's LLM requests: lognormal around the medians (``sigma`` the log's spread),
    clipped to [1, max]."""

    prompt_median: float
    output_median: float
    sigma: float = 0.6
    max_prompt: int = 2048
    max_output: int = 512

    def draw(self, rng: random.Random) -> tuple[int, int]:
        prompt = round(self.prompt_median * math.exp(rng.gauss(0.0, self.sigma)))
        output = round(self.output_median * math.exp(rng.gauss(0.0, self.sigma)))
        return max(1, min(prompt, self.max_prompt)), max(1, min(output, self.max_output))


@dataclass(frozen=True)
class Replayed:
    """One recorded request: arrival (seconds from the replay's start), prompt and output tokens."""

    arrival: float
    prompt_tokens: int
    output_tokens: int


@dataclass(frozen=True)
class Bursts:
    """On/off modulation: ``burst_rate`` requests/s during "on" periods (mean ``mean_on_s``), base rate otherwise."""

    burst_rate: float
    mean_on_s: float
    mean_off_s: float


@dataclass(frozen=True)
class Tenant:
    name: str
    # Requests per second (outside bursts).
    rate: float
    request_class: RequestClass
    # Most popular first; drawn by Zipf with exponent ``zipf_s``.
    models: tuple[str, ...]
    zipf_s: float = 1.1
    bursts: Bursts | None = None
    # LLM tenants: token counts drawn per request; or ``replay``: recorded arrivals and tokens, replacing the
    # Poisson/MMPP arrivals (rate is then only the recorded mean, for offered-load estimates).
    tokens: TokenShape | None = None
    replay: tuple[Replayed, ...] = ()
    # Fair-share weight (as an API key's tenant's): SLO-aware admission splits an overloaded queue by it.
    weight: float = 1.0

    def scaled(self, factor: float) -> Tenant:
        if self.replay:
            # A replayed tenant's load changes by compressing its time (simulator.trace), not by rate.
            raise ValueError(f"tenant {self.name} replays a trace: scale it with the trace window's time scaling")
        bursts = self.bursts
        if bursts is not None:
            bursts = dataclasses.replace(bursts, burst_rate=bursts.burst_rate * factor)
        return dataclasses.replace(self, rate=self.rate * factor, bursts=bursts)

    @property
    def mean_rate(self) -> float:
        if self.bursts is None:
            return self.rate
        b = self.bursts
        on = b.mean_on_s / (b.mean_on_s + b.mean_off_s)
        return on * b.burst_rate + (1 - on) * self.rate


class Outcome(Enum):
    PENDING = "pending"
    OK = "ok"
    # Refused at admission: the replica's queue was full (RESOURCE_EXHAUSTED).
    REJECTED = "rejected"
    # The deadline passed before an answer (DEADLINE_EXCEEDED).
    TIMED_OUT = "timed_out"
    # Refused at once by SLO-aware admission (simulator/admission.py), on every replica tried: RESOURCE_EXHAUSTED
    # with a retry delay (DEADLINE_UNMEETABLE), not a late answer.
    REFUSED = "refused"


@dataclass(eq=False)
class Request:
    id: int
    tenant: str
    model: str
    arrival: float
    slo_s: float
    deadline_s: float
    # Which of the scenario's gateways receives it (a load balancer in front spreads clients over them).
    gateway: int = 0
    outcome: Outcome = Outcome.PENDING
    finished: float | None = None
    replica: str = ""
    # Device seconds spent on it: its share of each batch it ran in (for per-tenant shares of service).
    service_s: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)
    # LLM requests (simulator.llm): tokens in and out, SLOs on TTFT and TPOT, priority (lower first), and what the
    # engine recorded (first token's time, tokens generated, times preempted).
    prompt_tokens: int = 0
    output_tokens: int = 0
    slo_ttft_s: float = 0.0
    slo_tpot_s: float = 0.0
    priority: int = 0
    first_token: float | None = None
    tokens_out: int = 0
    preemptions: int = 0

    @property
    def latency(self) -> float | None:
        return None if self.finished is None else self.finished - self.arrival

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.arrival

    @property
    def tpot(self) -> float | None:
        """Seconds per output token after the first (0 for a one-token answer)."""
        if self.first_token is None or self.finished is None:
            return None
        return (self.finished - self.first_token) / (self.tokens_out - 1) if self.tokens_out > 1 else 0.0

    @property
    def met_slo(self) -> bool:
        if self.outcome is not Outcome.OK:
            return False
        if self.slo_ttft_s > 0:
            ttft, tpot = self.ttft, self.tpot
            return (
                ttft is not None
                and tpot is not None
                and ttft <= self.slo_ttft_s + 1e-12
                and tpot <= self.slo_tpot_s + 1e-12
            )
        latency = self.latency
        return latency is not None and latency <= self.slo_s + 1e-12


def zipf_weights(n: int, s: float) -> list[float]:
    """P(rank k) ∝ 1 / k^s for k = 1..n, normalised."""
    if n <= 0:
        raise ValueError(f"need at least one item, got {n}")
    raw = [1.0 / (k**s) for k in range(1, n + 1)]
    total = sum(raw)
    return [w / total for w in raw]


class ZipfSampler:
    def __init__(self, items: Sequence[str], s: float, rng: random.Random) -> None:
        self.items = tuple(items)
        self.weights = zipf_weights(len(self.items), s)
        self._cumulative = list(itertools.accumulate(self.weights))
        self._rng = rng

    def draw(self) -> str:
        index = bisect.bisect_left(self._cumulative, self._rng.random() * self._cumulative[-1])
        return self.items[min(index, len(self.items) - 1)]


def poisson_arrivals(rate: float, duration_s: float, rng: random.Random, start: float = 0.0) -> list[float]:
    """Arrival times of a Poisson process of ``rate`` per second on [start, start + duration_s)."""
    if rate < 0:
        raise ValueError(f"rate must be >= 0, got {rate}")
    times: list[float] = []
    if rate == 0:
        return times
    t = start
    end = start + duration_s
    while True:
        t += rng.expovariate(rate)
        if t >= end:
            return times
        times.append(t)


def mmpp_arrivals(base_rate: float, bursts: Bursts, duration_s: float, rng: random.Random) -> list[float]:
    """On/off Markov-modulated Poisson arrivals: exponential on/off periods, each a Poisson process of its rate.

    Starts in the "off" state (a steady base before the first burst)."""
    times: list[float] = []
    t, on = 0.0, False
    while t < duration_s:
        length = rng.expovariate(1.0 / (bursts.mean_on_s if on else bursts.mean_off_s))
        length = min(length, duration_s - t)
        times.extend(poisson_arrivals(bursts.burst_rate if on else base_rate, length, rng, start=t))
        t += length
        on = not on
    return times


def build_trace(tenants: Sequence[Tenant], duration_s: float, seed: int, *, gateways: int = 1) -> list[Request]:
    """Every tenant's requests over ``duration_s``, in arrival order, ids 0..n-1. Same seed → same trace."""
    rng = random.Random(seed)
    timed: list[tuple[float, int, Tenant, str, tuple[int, int]]] = []
    for order, tenant in enumerate(tenants):
        # One stream per tenant, seeded from the trace's seed: adding a tenant leaves the others' arrivals as they were.
        tenant_rng = random.Random(f"{seed}:{tenant.name}")
        sampler = ZipfSampler(tenant.models, tenant.zipf_s, tenant_rng)
        if tenant.replay:
            timed.extend(
                (r.arrival, order, tenant, sampler.draw(), (r.prompt_tokens, r.output_tokens))
                for r in tenant.replay
                if r.arrival < duration_s
            )
            continue
        if tenant.bursts is None:
            times = poisson_arrivals(tenant.rate, duration_s, tenant_rng)
        else:
            times = mmpp_arrivals(tenant.rate, tenant.bursts, duration_s, tenant_rng)
        # Models first, then token counts: a tenant without tokens draws exactly the stream it always did.
        models = [sampler.draw() for _ in times]
        tokens = [tenant.tokens.draw(tenant_rng) if tenant.tokens else (0, 0) for _ in times]
        timed.extend((t, order, tenant, m, n) for t, m, n in zip(times, models, tokens, strict=True))
    timed.sort(key=lambda item: (item[0], item[1]))
    return [
        Request(
            id=i,
            tenant=tenant.name,
            model=model,
            arrival=t,
            slo_s=tenant.request_class.slo_s,
            deadline_s=tenant.request_class.deadline_s,
            gateway=rng.randrange(gateways) if gateways > 1 else 0,
            prompt_tokens=prompt,
            output_tokens=output,
            slo_ttft_s=tenant.request_class.slo_ttft_s,
            slo_tpot_s=tenant.request_class.slo_tpot_s,
            priority=tenant.request_class.priority,
        )
        for i, (t, _, tenant, model, (prompt, output)) in enumerate(timed)
    ]


def fresh_copy(trace: Sequence[Request]) -> list[Request]:
    """The same requests with no outcome yet, to replay a trace under another router."""
    return [
        Request(
            r.id,
            r.tenant,
            r.model,
            r.arrival,
            r.slo_s,
            r.deadline_s,
            gateway=r.gateway,
            prompt_tokens=r.prompt_tokens,
            output_tokens=r.output_tokens,
            slo_ttft_s=r.slo_ttft_s,
            slo_tpot_s=r.slo_tpot_s,
            priority=r.priority,
        )
        for r in trace
    ]


def observed_rate(times: Sequence[float], duration_s: float) -> float:
    return len(times) / duration_s if duration_s > 0 else math.nan
