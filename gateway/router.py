"""Replica choice per request, behind one interface so policies are swappable and benchmarked side by side.

- ``round_robin``: each replica in turn.
- ``p2c``: power of two choices on queue length (the gateway's own in-flight count plus the queue the replica last
  reported), the classic way to avoid herding with little information.
- ``ours``: a score from the scheduler's view — queue depth and in-flight work per batch slot, device utilisation,
  KV-cache use, free memory and whether the replica's models are warm — plus the gateway's live in-flight count.
  Without a fresh view (scheduler down or not configured) it falls back to ``p2c``.

A choice reads only memory: the view is pushed to the gateway, never fetched per request.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator, Sequence
from typing import Protocol

from gateway.replicas import Replica
from gateway.view import LoadView, ReplicaLoad

# Weights of ``ours``: one queued request per batch slot costs as much as a fully busy device; a cold replica would
# first have to load its model, which costs more than any queue.
QUEUE_WEIGHT = 1.0
UTILIZATION_WEIGHT = 0.5
KV_CACHE_WEIGHT = 0.5
MEMORY_WEIGHT = 0.25
COLD_PENALTY = 4.0
# A replica the view does not have yet (just joined) or any more (its reports stopped: stuck or gone) is a risk;
# with no figures it costs one queued request more than its live count says.
UNREPORTED_PENALTY = 1.0
# ``ours`` scores every candidate up to this many; beyond, a random sample of this size (keeps a decision O(1)).
SCORED_CANDIDATES = 16


class Router(Protocol):
    def choose(self, service: str, replicas: Sequence[Replica]) -> Replica:
        """Pick one of ``replicas`` (never empty) for the next request to ``service``."""
        ...


class RoundRobinRouter:
    """Each replica in turn, per service."""

    def __init__(self, view: LoadView | None = None, rng: random.Random | None = None) -> None:
        self._counters: dict[str, Iterator[int]] = {}

    def choose(self, service: str, replicas: Sequence[Replica]) -> Replica:
        counter = self._counters.get(service)
        if counter is None:
            counter = self._counters[service] = itertools.count()
        return replicas[next(counter) % len(replicas)]


class PowerOfTwoRouter:
    """The shorter queue of two replicas drawn at random."""

    def __init__(self, view: LoadView | None = None, rng: random.Random | None = None) -> None:
        self.view = view or LoadView()
        self.rng = rng or random.Random()

    def queue_length(self, replica: Replica) -> int:
        load = self.view.load_of(replica.instance.instance_id)
        return replica.inflight + (load.queue_depth if load is not None else 0)

    def choose(self, service: str, replicas: Sequence[Replica]) -> Replica:
        if len(replicas) == 1:
            return replicas[0]
        first, second = self.rng.sample(range(len(replicas)), 2)
        a, b = replicas[first], replicas[second]
        return a if self.queue_length(a) <= self.queue_length(b) else b


def score(replica: Replica, load: ReplicaLoad | None) -> float:
    """Lower is better. The gateway's own in-flight count is live and exact; the view's figures are as of the last
    report (up to an interval old), so the queue behind the replica's admission comes from the view but the requests
    in flight are this gateway's own count."""
    if load is None:
        return QUEUE_WEIGHT * (replica.inflight + UNREPORTED_PENALTY)
    waiting = replica.inflight + load.queue_depth
    return (
        QUEUE_WEIGHT * waiting / load.slots
        + UTILIZATION_WEIGHT * load.utilization
        + KV_CACHE_WEIGHT * load.kv_cache_usage
        + MEMORY_WEIGHT * (1.0 - load.free_memory_fraction)
        + (0.0 if load.warm else COLD_PENALTY)
    )


class ScoreRouter:
    """``ours``: the lowest score among the candidates, on a fresh view; power of two choices otherwise."""

    def __init__(self, view: LoadView | None = None, rng: random.Random | None = None) -> None:
        self.view = view or LoadView()
        self.rng = rng or random.Random()
        self.fallback = PowerOfTwoRouter(self.view, self.rng)

    def choose(self, service: str, replicas: Sequence[Replica]) -> Replica:
        if len(replicas) == 1:
            return replicas[0]
        if not self.view.fresh:
            return self.fallback.choose(service, replicas)
        # Shuffled even when all are scored: ties (an idle mesh) then spread instead of all going to the first.
        candidates = self.rng.sample(replicas, min(len(replicas), SCORED_CANDIDATES))
        load_of = self.view.load_of
        return min(candidates, key=lambda r: score(r, load_of(r.instance.instance_id)))


ROUTERS: dict[str, type[RoundRobinRouter] | type[PowerOfTwoRouter] | type[ScoreRouter]] = {
    "round_robin": RoundRobinRouter,
    "p2c": PowerOfTwoRouter,
    "ours": ScoreRouter,
}


def make_router(name: str, view: LoadView | None = None, rng: random.Random | None = None) -> Router:
    try:
        return ROUTERS[name](view, rng)
    except KeyError:
        raise ValueError(f"unknown router {name!r}; choose one of {', '.join(sorted(ROUTERS))}") from None
