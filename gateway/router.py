"""Replica choice per request, behind one interface so policies are swappable and benchmarked side by side.

- ``round_robin``: each replica in turn.
- ``p2c``: power of two choices on queue length (the gateway's own in-flight count plus the queue the replica last
  reported), the classic way to avoid herding with little information.
- ``ours``: least expected delay. A request goes where it expects to finish first:

      (requests this gateway has in flight there + 1) / the replica's capacity

  scaled up by KV-cache pressure (an LLM engine near a full cache queues and preempts), with a penalty for one
  missing from the view (just joined, or its reports stopped); a cold replica (its model must load first) only
  when every candidate is cold, and then the one whose device has the most free memory. Capacity
  (``LoadView.capacity``) is learnt from the view: requests completed per second of device busy time, and on GPUs
  the device's peak compute from NVML times what the fleet completes per unit of compute, never more than the
  replica itself has shown (a throttled or overloaded replica stays slow). So a GPU three times faster takes three
  times the work. The replica's reported queue is not added: it holds this gateway's own requests (already
  counted, live) and is up to a report interval old; ranking on it herds requests onto whichever replica looked
  idle. Other gateways' work shows in the capacity the replica achieves. Without a fresh view (scheduler down or
  not configured) it falls back to ``p2c``. benchmarks/simulator.py measures it against the other two on a
  heterogeneous fleet.

A choice reads only memory: the view is pushed to the gateway, never fetched per request.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator, Sequence
from typing import Protocol, runtime_checkable

from gateway.replicas import Replica
from gateway.view import LoadView, ReplicaLoad

# ``ours``: a nearly full KV cache doubles the expected delay (vLLM queues new sequences and preempts running ones).
KV_CACHE_WEIGHT = 1.0
# A cold replica (its model must load first) is chosen only when every candidate is cold; a replica the view lacks
# counts this many requests more than the gateway has in flight there.
COLD_PENALTY_S = 1e6
UNREPORTED_PENALTY = 1.0
# ``ours`` scores every candidate up to this many; beyond, a random sample of this size (keeps a decision O(1)).
SCORED_CANDIDATES = 16


class Router(Protocol):
    def choose(self, service: str, replicas: Sequence[Replica]) -> Replica:
        """Pick one of ``replicas`` (never empty) for the next request to ``service``."""
        ...


Explanation = dict[str, str | bool | int | float]


@runtime_checkable
class ExplainsChoice(Protocol):
    def explain(self, replica: Replica) -> Explanation:
        """What ``replica`` looked like to this router (span attributes); asked only when a trace records it."""
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

    def explain(self, replica: Replica) -> Explanation:
        return {}


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

    def explain(self, replica: Replica) -> Explanation:
        return {"aimass.route.queue_length": self.queue_length(replica), "aimass.route.view_version": self.view.version}


def expected_delay(replica: Replica, load: ReplicaLoad | None, capacity: float) -> float:
    """Lower is better: roughly the seconds until a new request would finish there (see the module docstring)."""
    if load is None:
        return (replica.inflight + 1 + UNREPORTED_PENALTY) / capacity
    delay = (replica.inflight + 1) / capacity * (1 + KV_CACHE_WEIGHT * load.kv_cache_usage)
    # Among cold replicas (only when all are cold) the one with the most free device memory: its model loads there
    # without evicting others first.
    return delay if load.warm else delay + COLD_PENALTY_S * (2.0 - load.free_memory_fraction)


class ScoreRouter:
    """``ours``: the least expected delay among the candidates, on a fresh view; power of two choices otherwise."""

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
        return min(candidates, key=self.expected_delay)

    def expected_delay(self, replica: Replica) -> float:
        instance_id = replica.instance.instance_id
        return expected_delay(replica, self.view.load_of(instance_id), self.view.capacity(instance_id))

    def explain(self, replica: Replica) -> Explanation:
        if not self.view.fresh:
            return {**self.fallback.explain(replica), "aimass.route.fallback": "p2c"}
        load = self.view.load_of(replica.instance.instance_id)
        facts: Explanation = {
            "aimass.route.expected_delay": self.expected_delay(replica),
            "aimass.route.capacity": self.view.capacity(replica.instance.instance_id),
            "aimass.route.view_version": self.view.version,
            "aimass.route.inflight": replica.inflight,
        }
        if load is not None:
            facts["aimass.route.queue_depth"] = load.queue_depth
            facts["aimass.route.utilization"] = load.utilization
        return facts


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
