"""Per-tenant fair share of a replica's service, after virtual token counters (VTC, Sheng et al., OSDI 2024).

Each tenant has a counter of the service it has received (batch units, or weighted tokens in the LLM engine)
divided by its weight (``scheduler.tenant_weights``, default 1: a tenant of weight 2 is due twice the service).
Whoever has received the least goes next. A tenant that starts waiting again is lifted to the least counter among
the tenants already waiting, so idling banks no credit. The dynamic batcher (aimass.runtime.batcher) and the LLM
servicer's ranking (services/llm/fairness.py) both keep their counters here.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping


class FairShare:
    """Service received per tenant, divided by the tenant's weight."""

    def __init__(self, tenant_weights: Mapping[str, float] | None = None) -> None:
        self.tenant_weights = dict(tenant_weights or {})
        self._served: dict[str, float] = {}

    def weight(self, tenant: str) -> float:
        return self.tenant_weights.get(tenant, 1.0)

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

    def reset(self) -> None:
        """Nobody is waiting: past service no longer matters (and counters of departed tenants are let go)."""
        self._served.clear()
