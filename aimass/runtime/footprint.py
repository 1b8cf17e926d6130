"""A model's memory footprint, measured around its load: the NVML memory delta of its GPU, or the process's resident
memory delta on the CPU. The scheduler places by these figures (a measured footprint beats an estimate).

Both are deltas of a whole (the device, the process), so a load that also imports its libraries counts them too:
the first model of a process looks larger than a second load of it would. That errs on the side of room.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable
from typing import TypeVar

import psutil
import pynvml

log = logging.getLogger(__name__)

T = TypeVar("T")

# Below this the delta is allocator noise (freed arenas reused, pages not yet touched); report this floor instead,
# so a tiny model still has a positive footprint to place by.
MIN_FOOTPRINT_BYTES = 1 << 20


def _cuda_index(device: str) -> int:
    _, _, index = device.partition(":")
    return int(index) if index else 0


def memory_in_use(device: str) -> int:
    """Bytes in use now: the GPU's used memory (NVML) for "cuda[:i]", this process's resident memory otherwise."""
    if device.startswith("cuda"):
        pynvml.nvmlInit()
        try:
            handle = pynvml.nvmlDeviceGetHandleByIndex(_cuda_index(device))
            return int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)
        finally:
            pynvml.nvmlShutdown()
    return int(psutil.Process().memory_info().rss)


def measure(device: str, load: Callable[[], T]) -> tuple[T, int]:
    """Runs ``load`` and returns its result with the memory it added on ``device`` (at least MIN_FOOTPRINT_BYTES)."""
    gc.collect()
    before = memory_in_use(device)
    result = load()
    gc.collect()
    added = memory_in_use(device) - before
    return result, max(added, MIN_FOOTPRINT_BYTES)
