"""A reference for the benchmark, not a policy: ``known_speeds`` ranks replicas by least expected delay with each
device's true speed, which only the simulator knows. It shows how far any router could get on a fleet by knowing
speeds; production's ``ours`` has to learn capacity from the view instead (gateway/view.py LoadView.capacity).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from gateway.replicas import Replica
from gateway.router import Router
from gateway.view import LoadView


class KnownSpeedRouter:
    """A reference, not a policy: least expected delay with each device's true speed (which only the simulator
    knows) and this gateway's live in-flight counts; how far any router could get on this fleet by knowing speeds."""

    def __init__(self, speeds: Mapping[str, float]) -> None:
        self.speeds = dict(speeds)

    def choose(self, service: str, replicas: Sequence[Replica]) -> Replica:
        return min(replicas, key=lambda r: (r.inflight + 1) / self.speeds[r.instance.instance_id])


REFERENCES = ("known_speeds",)


def make_reference(name: str, speeds: Mapping[str, float]) -> tuple[Router, LoadView]:
    """The reference router ``name`` with the view it reads (instance id → device speed in ``speeds``)."""
    if name == "known_speeds":
        return KnownSpeedRouter(speeds), LoadView()
    raise ValueError(f"unknown reference {name!r}; choose one of {', '.join(REFERENCES)}")
