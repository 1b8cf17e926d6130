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

For LLM replicas ``ours`` has three more terms (all from memory; O(candidates) per decision, after one index lookup
per prompt block):

- **KV headroom**: the delay is scaled by ``1 + kv_cache_usage`` (a nearly full cache doubles it): with little
  headroom vLLM queues new sequences and preempts running ones.
- **Waiting requests**: the delay is scaled by ``1 + waiting_requests / slots`` from the engine's stats (requests
  the engine holds but cannot start: its sequence slots or KV blocks are all taken). A pressure factor, not a count
  added to the in-flight one: those requests are mostly this gateway's own, already counted live. (Waiting *tokens*
  are not in the engine's scheduler stats, so the view has none.)
- **Prefix affinity** (LLM Chat/Generate; gateway/prefix_affinity.py): the fraction ``a`` of the request's prompt
  blocks a replica holds from the start, as this gateway last sent them, discounts that replica's delay to
  ``delay * (1 - AFFINITY_WEIGHT * a)``. A conversation's next turn thus goes where its prefix is cached (the
  prefill it skips), but only while that replica's delay is within ``1 / (1 - AFFINITY_WEIGHT * a)`` of the best
  (at most 3 times): a hot replica does not take every conversation it has seen; past that bound the turn goes to the
  least loaded replica, which then holds the prefix for the turns after. Every choice is recorded in the index.
  Without a fresh view the same discount applies to ``p2c``'s queue length (over all candidates, not two).
  The index is each gateway's own: behind several gateways, a conversation keeps its replica as long as its
  turns reach the same gateway (a client's long-lived channel does).

A choice reads only memory: the view is pushed to the gateway, never fetched per request.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator, Sequence
from typing import Protocol, runtime_checkable

from gateway.prefix_affinity import PrefixIndex, PromptPrefix
from gateway.replicas import Replica
from gateway.view import LoadView, ReplicaLoad

# ``ours``: a nearly full KV cache doubles the expected delay (vLLM queues new sequences and preempts running ones).
KV_CACHE_WEIGHT = 1.0
# ``ours``: an engine with as many requests waiting as it has sequence slots doubles the expected delay.
WAITING_WEIGHT = 1.0
# ``ours``: a replica holding a request's whole prompt prefix has its expected delay cut to a third (so it takes the
# request while its delay is under three times the best); one holding half of it, to two thirds.
AFFINITY_WEIGHT = 2.0 / 3.0
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


@runtime_checkable
class RoutesByPrefix(Protocol):
    def choose_by_prefix(self, service: str, replicas: Sequence[Replica], prefix: PromptPrefix) -> Replica:
        """``choose`` for an LLM request whose prompt starts with ``prefix`` (routers that weigh prefix affinity;
        the others take no hint and are called through ``choose``)."""
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
    delay = (
        (replica.inflight + 1)
        / capacity
        * (1 + KV_CACHE_WEIGHT * load.kv_cache_usage)
        * (1 + WAITING_WEIGHT * load.waiting_requests / load.slots)
    )
    # Among cold replicas (only when all are cold) the one with the most free device memory: its model loads there
    # without evicting others first.
    return delay if load.warm else delay + COLD_PENALTY_S * (2.0 - load.free_memory_fraction)


class ScoreRouter:
    """``ours``: the least expected delay among the candidates, on a fresh view; power of two choices otherwise."""

    def __init__(self, view: LoadView | None = None, rng: random.Random | None = None) -> None:
        self.view = view or LoadView()
        self.rng = rng or random.Random()
        self.fallback = PowerOfTwoRouter(self.view, self.rng)
        self.prefixes = PrefixIndex()
        # The last prefix decision, for ``explain`` (asked right after the choice, on the same thread): the prefix's
        # block count and the blocks each replica held.
        self._last_prefix: tuple[int, dict[str, int]] | None = None

    def choose(self, service: str, replicas: Sequence[Replica]) -> Replica:
        self._last_prefix = None
        if len(replicas) == 1:
            return replicas[0]
        if not self.view.fresh:
            return self.fallback.choose(service, replicas)
        # Shuffled even when all are scored: ties (an idle mesh) then spread instead of all going to the first.
        candidates = self.rng.sample(replicas, min(len(replicas), SCORED_CANDIDATES))
        return min(candidates, key=self.expected_delay)

    def choose_by_prefix(self, service: str, replicas: Sequence[Replica], prefix: PromptPrefix) -> Replica:
        """``choose`` with prefix affinity (see the module docstring); the choice is recorded in the index."""
        held = self.prefixes.cached_blocks(prefix) if prefix.blocks else {}
        if not held:
            choice = self.choose(service, replicas)
        elif len(replicas) == 1:
            choice = replicas[0]
        else:
            total = len(prefix)
            # Without a fresh view the delay is the fallback's queue length (+1, this request), still discounted:
            # a conversation keeps its replica while the scheduler is away.
            delay = self.expected_delay if self.view.fresh else lambda r: self.fallback.queue_length(r) + 1.0
            candidates = self.rng.sample(replicas, min(len(replicas), SCORED_CANDIDATES))
            choice = min(
                candidates,
                key=lambda r: delay(r) * (1 - AFFINITY_WEIGHT * held.get(r.instance.instance_id, 0) / total),
            )
        self._last_prefix = (len(prefix), held)
        self.prefixes.record(prefix, choice.instance.instance_id)
        return choice

    def expected_delay(self, replica: Replica) -> float:
        instance_id = replica.instance.instance_id
        return expected_delay(replica, self.view.load_of(instance_id), self.view.capacity(instance_id))

    def explain(self, replica: Replica) -> Explanation:
        if not self.view.fresh:
            return {**self.fallback.explain(replica), "aimass.route.fallback": "p2c", **self._prefix_facts(replica)}
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
            facts["aimass.route.kv_cache_usage"] = load.kv_cache_usage
            facts["aimass.route.waiting_requests"] = load.waiting_requests
        return {**facts, **self._prefix_facts(replica)}

    def _prefix_facts(self, replica: Replica) -> Explanation:
        """The last choice's prefix affinity for ``replica`` (nothing when that choice had no prompt prefix)."""
        if self._last_prefix is None:
            return {}
        blocks, held = self._last_prefix
        cached = held.get(replica.instance.instance_id, 0)
        return {
            "aimass.route.prefix_blocks": blocks,
            "aimass.route.prefix_cached_blocks": cached,
            "aimass.route.prefix_affinity": cached / blocks if blocks else 0.0,
        }


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
