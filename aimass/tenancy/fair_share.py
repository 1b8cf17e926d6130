"""Per-tenant fair share of a replica's service, after virtual token counters (VTC, Sheng et al., OSDI 2024).

Each tenant has a counter of the service it has received (batch units in the dynamic batcher, weighted tokens in
the LLM engine) divided by its weight (its API key's tenant's, sent by the gateway; a tenant of weight 2 is due
twice the service). Whoever has received the least goes next. A tenant that starts waiting again is lifted to the
least counter among the tenants already waiting, so idling banks no credit. The dynamic batcher
(aimass.runtime.batcher), the LLM servicer's ranking (``VirtualTokenCounters``) and the scheduler's accounting of
tenants' tokens in the routing view all count here, with the one ``TOKEN_WEIGHTS``.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final


@dataclass(frozen=True)
class TokenWeights:
    """VTC's cost of a token: a completion token costs more than a prompt token (it takes a decode step)."""

    prompt: float = 1.0
    completion: float = 2.0

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return prompt_tokens * self.prompt + completion_tokens * self.completion


TOKEN_WEIGHTS: Final = TokenWeights()


class FairShare:
    """Service received per tenant, divided by the tenant's weight.

    Weights come with the requests (``see``); a tenant never seen with one has weight 1. Everything is let go at
    ``reset`` (nobody waiting), so the state is as large as the tenants waiting at once.
    """

    def __init__(self) -> None:
        self._served: dict[str, float] = {}
        self._weights: dict[str, float] = {}

    def see(self, tenant: str, weight: float) -> None:
        """``tenant`` has a request waiting, at ``weight`` (its latest, as the gateway sent it)."""
        self._weights[tenant] = weight

    def weight(self, tenant: str) -> float:
        return self._weights.get(tenant, 1.0)

    def served(self, tenant: str) -> float:
        return self._served.get(tenant, 0.0)

    def charge(self, tenant: str, cost: float) -> None:
        """``tenant`` received ``cost`` of service (before its weight is applied)."""
        self._served[tenant] = self.served(tenant) + cost / self.weight(tenant)

    def lift(self, tenant: str, waiting: Iterable[str]) -> None:
        """``tenant`` starts waiting beside ``waiting``: its counter rises to at least the least of theirs."""
        counters = [self.served(other) for other in waiting if other != tenant]
        if counters:
            self._served[tenant] = max(self.served(tenant), min(counters))

    @property
    def tracked(self) -> int:
        return len(self._served)

    def forget(self, tenant: str) -> None:
        self._served.pop(tenant, None)
        self._weights.pop(tenant, None)

    def reset(self) -> None:
        """Nobody is waiting: past service no longer matters (and counters of departed tenants are let go)."""
        self._served.clear()
        self._weights.clear()


class VirtualTokenCounters:
    """Fair share inside one LLM replica, in weighted tokens.

    vLLM orders waiting requests by a fixed number given at admission, so a request is ranked by its tenant's
    *projected* counter: service received plus the estimated cost of the tenant's requests still in flight ahead of
    it. A tenant that floods the replica ranks its own later requests behind a light tenant's next one instead of
    starving it. Within one tenant ranks never go down while it has requests in flight: a request that finishes
    under its estimate (an early end of sequence) lowers the projection, and a later request ranked below the
    tenant's own earlier ones would overtake them (and, in vLLM's priority policy, preempt them), so a tenant's
    requests stay first come, first served. A tenant with nothing in flight is lifted to the smallest counter among
    active tenants (VTC's lift). Counters outlive a tenant's requests (so a heavy tenant pausing keeps its debt), up
    to ``max_tracked`` tenants: beyond, a tenant whose last request finishes is let go.
    """

    def __init__(self, weights: TokenWeights = TOKEN_WEIGHTS, *, max_tracked: int = 10_000) -> None:
        self.service = FairShare()
        self.weights = weights
        # Beyond this many tenants' counters, an idle tenant's is let go (it rejoins at the least active counter).
        self.max_tracked = max_tracked
        # Estimated cost of each tenant's admitted, unfinished requests.
        self.pending: dict[str, float] = collections.defaultdict(float)
        self.in_flight: collections.Counter[str] = collections.Counter()
        # The last rank given to each tenant with requests in flight: its next rank is never lower.
        self.last_rank: dict[str, int] = {}

    def admit(self, tenant: str, weight: float, prompt_tokens: int, max_tokens: int) -> tuple[int, float]:
        """The request's rank (lower is served first) and its estimated cost, to hand back to ``finish``."""
        self.service.see(tenant, weight)
        if not self.in_flight[tenant]:
            self.service.lift(tenant, [other for other, n in self.in_flight.items() if n > 0])
        estimate = self.weights.cost(prompt_tokens, max_tokens) / weight
        rank = max(int(self.service.served(tenant) + self.pending[tenant]), self.last_rank.get(tenant, 0))
        self.last_rank[tenant] = rank
        self.pending[tenant] += estimate
        self.in_flight[tenant] += 1
        return rank, estimate

    def finish(self, tenant: str, estimate: float, prompt_tokens: int, completion_tokens: int) -> None:
        """Charges what the request really cost (cancelled ones too: the tokens were computed)."""
        self.pending[tenant] = max(0.0, self.pending[tenant] - estimate)
        self.service.charge(tenant, self.weights.cost(prompt_tokens, completion_tokens))
        self.in_flight[tenant] -= 1
        if self.in_flight[tenant] <= 0:
            del self.in_flight[tenant]
            del self.pending[tenant]
            self.last_rank.pop(tenant, None)
            if self.service.tracked > self.max_tracked:
                self.service.forget(tenant)
