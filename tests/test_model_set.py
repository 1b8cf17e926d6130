"""ModelSet (aimass/runtime/models.py): models of one engine loaded and unloaded one at a time, footprints measured."""

from __future__ import annotations

import mmap
from typing import Any

import grpc
import pytest

from aimass.runtime.errors import NotFound, Unavailable
from aimass.runtime.footprint import MIN_FOOTPRINT_BYTES, measure
from aimass.runtime.models import ModelSet


def load_vader() -> Any:
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def load_buffer() -> mmap.mmap:
    # 64 MiB touched page by page: resident memory the measurement must see. Fresh pages from an anonymous mapping:
    # the allocator could hand out memory this long-lived process already holds, which adds nothing resident.
    buffer = mmap.mmap(-1, 64 << 20)
    for page in range(0, len(buffer), mmap.PAGESIZE):
        buffer[page] = 1
    return buffer


def test_footprint_is_the_resident_memory_a_load_adds() -> None:
    buffer, added = measure("cpu", load_buffer)
    assert len(buffer) == 64 << 20
    assert 60 << 20 < added < 80 << 20
    _, nothing = measure("cpu", lambda: None)
    assert nothing == MIN_FOOTPRINT_BYTES


def test_models_load_and_unload_one_at_a_time() -> None:
    progress: list[str] = []
    models = ModelSet({"vader": load_vader, "buffer": load_buffer}, device="cpu", service="TestService")
    assert models.loaded == frozenset() and models.footprint_bytes("buffer") == 0
    assert models.load("buffer", progress.append) and not models.load("buffer", progress.append)
    assert models.loaded == {"buffer"} and models.footprint_bytes("buffer") > 60 << 20
    assert any("loaded buffer in" in line and "MiB" in line for line in progress)
    with pytest.raises(Unavailable) as caught:
        models.get("vader")
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    assert "model 'vader' is not loaded on this TestService replica" in str(caught.value)
    models.load("vader")
    assert models.get("vader").polarity_scores("great")["compound"] > 0.5
    held = models.get("buffer")
    assert models.unload("buffer") and not models.unload("buffer")
    # Work that already holds the model keeps it; new work is told to go elsewhere.
    assert len(held) == 64 << 20
    with pytest.raises(Unavailable):
        models.get("buffer")
    # The footprint of the last load stays known after an unload (the scheduler places by it).
    assert models.footprint_bytes("buffer") > 60 << 20


def test_unknown_models_are_not_found() -> None:
    models = ModelSet({"vader": load_vader}, device="cpu", service="TestService")
    for action in (models.get, models.load, models.unload):
        with pytest.raises(NotFound) as caught:
            action("gpt-9")
        assert "model 'gpt-9' is not served by TestService; available: vader" in str(caught.value)
