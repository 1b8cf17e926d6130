"""What every servicer checks before work reaches an engine, and the set of models an engine loads and unloads one
at a time (ModelService.LoadModel/UnloadModel, placement by the scheduler)."""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import prometheus_client

from aimass.runtime.errors import NotFound, Unavailable
from aimass.runtime.footprint import measure
from aimass.v1 import common_pb2

log = logging.getLogger(__name__)

MODEL_LOAD_SECONDS = prometheus_client.Histogram(
    "aimass_model_load_seconds",
    "Time to load one model (weights in memory and warmed up).",
    ["model"],
    buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)
MODEL_LOADED = prometheus_client.Gauge("aimass_model_loaded", "1 while the model is loaded here.", ["model"])
MODEL_FOOTPRINT = prometheus_client.Gauge(
    "aimass_model_footprint_bytes", "Memory the model took when it last loaded (measured).", ["model", "device"]
)


def serving_model(
    requested: common_pb2.ModelRef, served: str, where: str, *, loaded: bool, what: str = "its models"
) -> common_pb2.ModelRef:
    """What a handler checks first: UNAVAILABLE while the replica still loads ``what``, NOT_FOUND for a model the
    method does not serve, else the model it will use. ``where`` is "Service.Method", as messages name it."""
    require_loaded(loaded, where.partition(".")[0], what)
    return resolve_model(requested, served, where)


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


class ModelSet:
    """An engine's models by name, each loaded (with its footprint measured) and unloaded on its own.

    ``loaders`` build each model (blocking, seconds). ``get`` is what engine methods call per batch: a batch keeps the
    object it got, so unloading never pulls a model from under running work; requests that arrive after get
    UNAVAILABLE, which the gateway answers by retrying on a replica that holds the model.
    """

    def __init__(self, loaders: Mapping[str, Callable[[], Any]], *, device: str, service: str) -> None:
        self.loaders = dict(loaders)
        self.device = device
        self.service = service
        self._models: dict[str, Any] = {}
        self._footprints: dict[str, int] = {}
        # One load or unload at a time: two loads of one model would both measure each other's memory.
        self._lock = threading.Lock()

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.loaders)

    @property
    def loaded(self) -> frozenset[str]:
        return frozenset(self._models)

    def footprint_bytes(self, name: str) -> int:
        """Measured at its last load; 0 when it never loaded here."""
        return self._footprints.get(name, 0)

    def _known(self, name: str) -> None:
        if name not in self.loaders:
            raise NotFound(
                f"model {name!r} is not served by {self.service}; available: {', '.join(self.loaders)}",
                reason="MODEL_NOT_FOUND",
                metadata={"model": name, "available": ",".join(self.loaders)},
            )

    def get(self, name: str) -> Any:
        model = self._models.get(name)
        if model is None:
            self._known(name)
            raise Unavailable(
                f"model {name!r} is not loaded on this {self.service} replica; another replica may hold it, or "
                "load it here with ModelService.LoadModel"
            )
        return model

    def load(self, name: str, progress: Callable[[str], None] = log.info, *, step: str = "") -> bool:
        """Loads ``name`` unless it is loaded; True when it loaded now. ``step`` prefixes the progress line
        ("model 1/3: ")."""
        self._known(name)
        with self._lock:
            if name in self._models:
                return False
            progress(f"loading {step}{name} on {self.device}")
            started = time.perf_counter()
            model, footprint = measure(self.device, self.loaders[name])
            self._models[name] = model
            self._footprints[name] = footprint
            elapsed = time.perf_counter() - started
            MODEL_LOAD_SECONDS.labels(name).observe(elapsed)
            MODEL_LOADED.labels(name).set(1)
            MODEL_FOOTPRINT.labels(name, self.device).set(footprint)
            progress(f"loaded {name} in {elapsed:.1f}s ({footprint / 2**20:.0f} MiB)")
            return True

    def load_all(self, progress: Callable[[str], None] = log.info) -> None:
        for number, name in enumerate(self.loaders, start=1):
            self.load(name, progress, step=f"model {number}/{len(self.loaders)}: ")

    def unload(self, name: str) -> bool:
        """Drops ``name``; True when it was loaded. Batches already running keep their reference and finish."""
        self._known(name)
        with self._lock:
            if self._models.pop(name, None) is None:
                return False
            MODEL_LOADED.labels(name).set(0)
            gc.collect()
            if self.device.startswith("cuda"):
                import torch

                # Return the freed blocks to the device, so NVML (and the scheduler) see the memory come back.
                torch.cuda.empty_cache()
            log.info("unloaded %s from %s", name, self.device)
            return True
