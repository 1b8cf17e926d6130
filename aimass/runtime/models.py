"""Checks every servicer makes before work reaches an engine: its models are loaded, the requested model exists."""

from __future__ import annotations

from aimass.runtime.errors import NotFound, Unavailable
from aimass.v1 import common_pb2


def require_loaded(loaded: bool, service: str, what: str = "its models") -> None:
    """UNAVAILABLE (safe to retry elsewhere) while a replica is still loading."""
    if not loaded:
        raise Unavailable(f"{service} is still loading {what}; retry in a few seconds")


def resolve_model(requested: common_pb2.ModelRef, served: str, where: str) -> common_pb2.ModelRef:
    """The model a method will use: its default when the request names none, NOT_FOUND for any other name.

    ``where`` says who refused, e.g. "NlpService.Embed", so the message reads "... is not served by NlpService.Embed".
    """
    if requested.name and requested.name != served:
        raise NotFound(
            f"model {requested.name!r} is not served by {where}; available: {served}",
            reason="MODEL_NOT_FOUND",
            metadata={"model": requested.name, "available": served},
        )
    return common_pb2.ModelRef(name=served, version=requested.version or "1")
