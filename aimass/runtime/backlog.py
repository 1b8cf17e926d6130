"""How long a batcher's backlog takes to clear, learnt from the batches it ran: what deadline admission needs.

A batcher that queues a request it cannot finish before the caller's deadline makes it wait only to fail
(DEADLINE_EXCEEDED) and spends the queue slot and, often, the model's work on an answer nobody reads; past
saturation every queued request goes late that way and goodput collapses. Refusing such a request on arrival
(RESOURCE_EXHAUSTED with a retry delay) keeps the queue to work that can still succeed, answers the refused caller
at once, and lets a gateway try a replica with a shorter backlog.

The estimate is deliberately simple and conservative only where it matters: the seconds a unit of work costs when
batched (an exponentially weighted mean of each batch's execution time divided by its units, so at saturation,
when batches are full, it is the full-batch cost), times the units that run before the newcomer, plus what is
left of the batch executing now. Work of a higher priority that arrives while the newcomer waits also runs first:
if higher priorities keep a fraction rho of the replica busy (their recent arrival rate times the unit cost), the
newcomer's wait stretches by 1 / (1 - rho), as in a priority queue. It knows nothing until it has seen
``MIN_BATCHES`` batches, and a batcher never refuses a request that finds nothing ahead of it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

# Weight of the newest batch in the running means: ~the last ten batches count.
EWMA_ALPHA = 0.2
# Batches seen before the estimate is trusted (the first ones include warm-up).
MIN_BATCHES = 3
# The estimate is a mean, and a call also needs time to reach the batcher and for its answer to get back: a request
# is admitted only if it would finish this much inside its deadline (finish x HEADROOM <= time left). Under
# overload the host's other processes (gateway, clients) slow the model below the pace it learnt.
HEADROOM = 1.25


# Arrival rates are counts decayed with this time constant (seconds): the last few seconds of traffic.
RATE_TAU_S = 5.0
# Higher priorities keeping the replica this busy leave no time for lower ones: their requests are refused.
MAX_HIGHER_SHARE = 0.95


@dataclass
class DecayingRate:
    """Units per second arriving lately: a count that decays with ``RATE_TAU_S``."""

    count: float = 0.0
    at: float = 0.0

    def add(self, units: int, now: float) -> None:
        self.count = self.count * math.exp(-(now - self.at) / RATE_TAU_S) + units
        self.at = now

    def per_second(self, now: float) -> float:
        return self.count * math.exp(-(now - self.at) / RATE_TAU_S) / RATE_TAU_S


@dataclass
class DrainEstimate:
    """Running means of a batcher's execution: seconds per unit and per batch."""

    unit_s: float = 0.0
    batch_s: float = 0.0
    batches: int = 0
    # Admitted units per second, by priority rank (0 most urgent).
    arrivals: dict[int, DecayingRate] = field(default_factory=dict)

    def admitted(self, level: int, units: int, now: float) -> None:
        """A request of ``units`` at priority rank ``level`` joined the queue at ``now``."""
        self.arrivals.setdefault(level, DecayingRate()).add(units, now)

    def higher_share(self, level: int, now: float, slots: int) -> float:
        """The fraction of the replica that work of priority ranks above ``level`` keeps busy lately."""
        rate = sum(r.per_second(now) for rank, r in self.arrivals.items() if rank < level)
        return rate * self.unit_s / slots

    def observe(self, units: int, seconds: float) -> None:
        """One batch of ``units`` executed in ``seconds``."""
        per_unit = seconds / max(1, units)
        if self.batches == 0:
            self.unit_s, self.batch_s = per_unit, seconds
        else:
            self.unit_s += EWMA_ALPHA * (per_unit - self.unit_s)
            self.batch_s += EWMA_ALPHA * (seconds - self.batch_s)
        self.batches += 1

    @property
    def ready(self) -> bool:
        return self.batches >= MIN_BATCHES

    def seconds_to_finish(
        self, units_ahead: int, units: int, running_for_s: float | None, slots: int, higher_share: float = 0.0
    ) -> float:
        """Seconds until a request of ``units`` queued behind ``units_ahead`` would be done: what is left of the
        batch executing for ``running_for_s`` (None: none executes) plus the queued work, shared by ``slots``
        concurrent batches, stretched by the higher priorities' share of the replica (inf when they take it all)."""
        if higher_share >= MAX_HIGHER_SHARE:
            return math.inf
        left = 0.0 if running_for_s is None else max(0.0, self.batch_s - running_for_s)
        return (left + (units_ahead + units) * self.unit_s / slots) / (1.0 - higher_share)

    def would_miss(self, finish_s: float, time_left_s: float) -> bool:
        """Whether work estimated to finish in ``finish_s`` would miss a deadline ``time_left_s`` away."""
        return finish_s * HEADROOM > time_left_s
