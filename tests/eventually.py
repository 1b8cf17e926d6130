"""Waiting in tests for something that happens in the background (a view to arrive, a cache to refresh), bounded."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


async def eventually(what: str, condition: Callable[[], object], timeout_s: float = 10.0) -> None:
    """Until ``condition()`` (or what it returns, awaited) is true; TimeoutError after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = condition()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        await asyncio.sleep(0.05)


def eventually_value(what: str, value: Callable[[], T | None], timeout_s: float = 10.0) -> T:
    """For blocking tests: polls ``value()`` until it returns something other than None, and returns that;
    TimeoutError after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = value()
        if found is not None:
            return found
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.05)
