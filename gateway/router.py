"""Replica choice per request, behind one interface so policies are swappable and benchmarked side by side."""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from typing import Protocol

from gateway.replicas import Replica


class Router(Protocol):
    def choose(self, service: str, replicas: Sequence[Replica]) -> Replica:
        """Pick one of ``replicas`` (never empty) for the next request to ``service``."""
        ...


class RoundRobinRouter:
    """Each replica in turn, per service."""

    def __init__(self) -> None:
        self._counters: dict[str, Iterator[int]] = {}

    def choose(self, service: str, replicas: Sequence[Replica]) -> Replica:
        counter = self._counters.get(service)
        if counter is None:
            counter = self._counters[service] = itertools.count()
        return replicas[next(counter) % len(replicas)]


ROUTERS: dict[str, type[Router]] = {"round_robin": RoundRobinRouter}


def make_router(name: str) -> Router:
    try:
        return ROUTERS[name]()
    except KeyError:
        raise ValueError(f"unknown router {name!r}; choose one of {', '.join(sorted(ROUTERS))}") from None
