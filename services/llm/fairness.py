"""Per-tenant fair share inside one LLM replica, after virtual token counters (VTC, Sheng et al., OSDI 2024).

Each tenant's counter (aimass.runtime.fair_share) holds the service it received, in weighted tokens (a completion
token costs more than a prompt token), divided by its share weight. vLLM orders waiting requests by a fixed number
given at admission, so a request is ranked by its tenant's *projected* counter: service received plus the estimated
cost of the tenant's requests still in flight ahead of it. A tenant that floods the replica therefore ranks its own
later requests behind a light tenant's next one, instead of starving it. A tenant that was idle (nothing in flight)
is lifted to the smallest counter among active tenants, so idling banks no credit (VTC's counter lift).
"""

from __future__ import annotations

import collections
from collections.abc import Mapping
from dataclasses import dataclass

from aimass.runtime.fair_share import FairShare


@dataclass(frozen=True)
class TokenWeights:
    prompt: float = 1.0
    completion: float = 2.0

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return prompt_tokens * self.prompt + completion_tokens * self.completion


class VirtualTokenCounters:
    def __init__(
        self, tenant_weights: Mapping[str, float] | None = None, weights: TokenWeights = TokenWeights()
    ) -> None:
        self.service = FairShare(tenant_weights)
        self.weights = weights
        # Estimated cost of each tenant's admitted, unfinished requests.
        self.pending: dict[str, float] = collections.defaultdict(float)
        self.in_flight: collections.Counter[str] = collections.Counter()

    def admit(self, tenant: str, prompt_tokens: int, max_tokens: int) -> tuple[int, float]:
        """The request's rank (lower is served first) and its estimated cost, to hand back to ``finish``."""
        if not self.in_flight[tenant]:
            self.service.lift(tenant, [other for other, n in self.in_flight.items() if n > 0])
        estimate = self.weights.cost(prompt_tokens, max_tokens) / self.service.weight(tenant)
        rank = self.service.served(tenant) + self.pending[tenant]
        self.pending[tenant] += estimate
        self.in_flight[tenant] += 1
        return int(rank), estimate

    def finish(self, tenant: str, estimate: float, prompt_tokens: int, completion_tokens: int) -> None:
        """Charges what the request really cost (cancelled ones too: the tokens were computed)."""
        self.pending[tenant] = max(0.0, self.pending[tenant] - estimate)
        self.service.charge(tenant, self.weights.cost(prompt_tokens, completion_tokens))
        self.in_flight[tenant] -= 1
        if self.in_flight[tenant] <= 0:
            del self.in_flight[tenant]
