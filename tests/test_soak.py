"""The soak (loadtest/soak.py), short: mixed traffic across every service at 70 % of the mesh's measured capacity
for a minute and a half; no call may fail and no process's resident memory may trend upwards past the bound."""

from __future__ import annotations

from pathlib import Path

import pytest

from loadtest import soak

pytestmark = pytest.mark.slow

MINUTES = 1.5
SAMPLE_S = 10.0
# A third of a short run is warm-up (first batches, caches, the allocator's arenas); the slope is over the rest.
WARMUP_FRACTION = 1 / 3


async def test_short_soak_has_no_errors_and_no_memory_trend(tmp_path: Path) -> None:
    result = await soak.run(
        tmp_path,
        minutes=MINUTES,
        sample_s=SAMPLE_S,
        capacity_s=10.0,
        load=soak.LOAD,
        warmup_fraction=WARMUP_FRACTION,
    )
    report = soak.soak_section(result)
    # Every class was served, at a rate that kept every service busy.
    assert set(result.capacity) == {s.name for s in soak.classes()}, report
    assert all(rate > 0.05 for rate in result.capacity.values()), report
    assert len(result.intervals) >= MINUTES * 60 / SAMPLE_S - 1, report
    assert result.errors() == {}, report
    assert not result.restarts, report
    # Every process of the mesh was sampled, and none grows past the stated bound.
    assert {"gateway", "scheduler", "nlp-0", "vision-0", "speech-0", "llm-0"} <= set(result.slopes()), report
    assert result.leaking() == {}, report
