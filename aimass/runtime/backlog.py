"""How long a batcher's backlog takes to clear, learnt from the batches it ran: what deadline admission needs.

A batcher that queues a request it cannot finish before the caller's deadline makes it wait only to fail
(DEADLINE_EXCEEDED) and spends the queue slot and, often, the model's work on an answer nobody reads; past
saturation every queued request goes late that way and goodput collapses. Refusing such a request on arrival
(RESOURCE_EXHAUSTED with a retry delay) keeps the queue to work that can still succeed, answers the refused caller
at once, and lets a gateway try a replica with a shorter backlog.

The estimate is deliberately simple and conservative only where it matters: the seconds a unit of work costs when
batched (an exponentially weighted mean of each batch's execution time divided by its units, so at saturation,
when batches are full, it is the full-batch cost), times the units that run before the newcomer, plus what is
left of the batch executing now. It knows nothing until it has seen ``MIN_BATCHES`` batches, and a batcher never
refuses a request that finds nothing ahead of it.
"""

from __future__ import annotations

from dataclasses import dataclass

# Weight of the newest batch in the running means: ~the last ten batches count.
EWMA_ALPHA = 0.2
# Batches seen before the estimate is trusted (the first ones include warm-up).
MIN_BATCHES = 3
# The estimate is a mean, and a call also needs time to reach the batcher and for its answer to get back: a request
# is admitted only if it would finish this much inside its deadline (finish x HEADROOM <= time left). Under
# overload the host's other processes (gateway, clients) slow the model below the pace it learnt.
HEADROOM = 1.25


@dataclass
class DrainEstimate:
    """Running means of a batcher's execution: seconds per unit and per batch."""

    unit_s: float = 0.0
    batch_s: float = 0.0
    batches: int = 0

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

    def seconds_to_finish(self, units_ahead: int, units: int, running_for_s: float | None, slots: int) -> float:
        """Seconds until a request of ``units`` queued behind ``units_ahead`` would be done: what is left of the
        batch executing for ``running_for_s`` (None: none executes) plus the queued work, shared by ``slots``
        concurrent batches."""
        left = 0.0 if running_for_s is None else max(0.0, self.batch_s - running_for_s)
        return left + (units_ahead + units) * self.unit_s / slots

    def would_miss(self, finish_s: float, time_left_s: float) -> bool:
        """Whether work estimated to finish in ``finish_s`` would miss a deadline ``time_left_s`` away."""
        return finish_s * HEADROOM > time_left_s
