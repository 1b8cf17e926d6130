"""Service times, load times and footprints of models, from the measurements in calibration.json.

``benchmarks/service_times.py`` measures the real engines in-process (one ``execute`` call per batch size, the load
and its resident-memory delta) and writes the file. A scenario's model is either *measured* (its figures are read
as they are) or *derived* from a measured one by stated ratios of compute and memory (e.g. a 12-layer encoder from
the 6-layer one); every profile says which, and the report prints it.

Times are the calibration host's; a device of ``speed`` s runs a batch in time / s (SimulatedGpu.speed).

The file's "llm" section (``benchmarks/llm_calibration.py``: the real vLLM engine's prefill and decode step times,
KV cache and reference TTFT / tokens/s) becomes a ``simulator.llm.LlmProfile`` under the LLM's name.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_PATH = Path(__file__).resolve().parent / "calibration.json"


@dataclass(frozen=True)
class ModelProfile:
    name: str
    # The gRPC service whose requests name this model (routing is per service).
    service: str
    # (batch size, host seconds per batch), ascending, non-decreasing in seconds.
    batch_seconds: tuple[tuple[int, float], ...]
    load_seconds: float
    footprint_bytes: int
    measured: bool
    # Where the figures come from, for the report.
    provenance: str

    def seconds(self, batch: int, speed: float = 1.0) -> float:
        """One batch of ``batch`` units on a device of ``speed``: linear between measured sizes, and beyond the
        largest by the last measured step's cost per unit."""
        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        points = self.batch_seconds
        if batch <= points[0][0]:
            host = points[0][1]
        else:
            host = points[-1][1]
            for (n0, t0), (n1, t1) in itertools.pairwise(points):
                if batch <= n1:
                    host = t0 + (t1 - t0) * (batch - n0) / (n1 - n0)
                    break
            else:
                if len(points) > 1:
                    (n0, t0), (n1, t1) = points[-2], points[-1]
                    host = t1 + (t1 - t0) / (n1 - n0) * (batch - n1)
        return host / speed

    def derive(self, name: str, *, compute: float, memory: float, reason: str, service: str = "") -> ModelProfile:
        """A model not measured here: this one's batch times scaled by ``compute``, footprint and load time (reading
        weights) by ``memory``."""
        if compute <= 0 or memory <= 0:
            raise ValueError(f"derived model {name}: ratios must be > 0, got compute {compute}, memory {memory}")
        return ModelProfile(
            name=name,
            service=service or self.service,
            batch_seconds=tuple((n, t * compute) for n, t in self.batch_seconds),
            load_seconds=self.load_seconds * memory,
            footprint_bytes=round(self.footprint_bytes * memory),
            measured=False,
            provenance=f"derived from {self.name}: compute x{compute:g}, memory x{memory:g} ({reason})",
        )


def _monotone(points: Mapping[str, float]) -> tuple[tuple[int, float], ...]:
    # A larger batch never takes less time; a measured dip is noise, so it is raised to the smaller batch's time.
    ordered = sorted((int(n), float(t)) for n, t in points.items())
    if not ordered:
        raise ValueError("no batch sizes measured")
    result: list[tuple[int, float]] = []
    for n, t in ordered:
        result.append((n, max(t, result[-1][1]) if result else t))
    return tuple(result)


class Calibration:
    def __init__(self, document: Mapping[str, Any], source: str = "") -> None:
        self.document = document
        self.source = source
        host = document.get("host", {})
        threads = document.get("threads")
        self.host = f"{host.get('cpus', '?')} CPUs, {host.get('cpu_model', '?')}" + (
            f", {threads} engine thread{'s' if threads != 1 else ''}" if threads else ""
        )
        self.measured_at = str(document.get("measured_at", "?"))
        self.profiles: dict[str, ModelProfile] = {}
        for name, entry in document.get("models", {}).items():
            self.profiles[name] = ModelProfile(
                name=name,
                service=str(entry["service"]),
                batch_seconds=_monotone(entry["batch_seconds"]),
                load_seconds=float(entry["load_seconds"]),
                footprint_bytes=int(entry["footprint_bytes"]),
                measured=True,
                provenance=f"measured ({entry.get('method', '?')} on {self.host}, {self.measured_at})",
            )
        if "llm" in document:
            # Here, not at the top: simulator.llm builds on this module's ModelProfile.
            from simulator.llm import llm_profile

            llm = llm_profile(document["llm"], host=str(document["llm"].get("host", {}).get("cpu_model", "?")))
            self.profiles[llm.name] = llm

    @classmethod
    def load(cls, path: Path = DEFAULT_PATH) -> Calibration:
        try:
            return cls(json.loads(path.read_text()), source=str(path))
        except (OSError, ValueError, KeyError) as err:
            raise ValueError(
                f"calibration file {path}: {err}; write it with `python -m benchmarks.service_times`"
            ) from err

    def measured(self, name: str) -> ModelProfile:
        try:
            return self.profiles[name]
        except KeyError:
            raise KeyError(f"{name!r} was not measured (calibration has {', '.join(sorted(self.profiles))})") from None
