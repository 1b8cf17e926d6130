"""What the LLM service needs of an engine, in the service's own types (as vLLM's entrypoints depend on its
``EngineClient`` protocol, not on one engine class).

The servicer (servicer.py) checks requests, tokenises through the engine and streams ``Chunk``s; it never sees a
vLLM type. ``LlmEngine`` (engine.py, vLLM's AsyncLLM in this process) is the engine the service runs; anything with
these methods can stand in for it (another runtime, or a test's engine that fails on cue).
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Sequence
from typing import Any, Protocol


@dataclasses.dataclass
class EngineLoad:
    """The engine's latest scheduler figures and running totals, updated after each engine step."""

    running: int = 0
    waiting: int = 0
    kv_cache_usage: float = 0.0
    generated_tokens: int = 0
    prompt_tokens: int = 0
    updated_monotonic: float = 0.0


@dataclasses.dataclass(frozen=True)
class Chunk:
    """One streamed step of a request: new text, and on the last chunk why it ended."""

    text: str
    new_tokens: int
    # The engine's reason on the last chunk: "stop", "length" or "abort"; None before.
    finish_reason: str | None = None
    # With finish_reason "stop": the stop string that matched (None for the end-of-sequence token).
    stop_string: str | None = None


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How one request is sampled, already checked (sampling.py): fields left None keep the model's defaults."""

    max_tokens: int
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    stop: tuple[str, ...] = ()

    def explicit(self) -> dict[str, Any]:
        """The fields the request set, as keyword arguments (stop strings as a list)."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        fields["stop"] = list(self.stop) or None
        return {name: value for name, value in fields.items() if value is not None}


class GenerationEngine(Protocol):
    """A text-generation engine with continuous batching, streaming, abort and priorities."""

    model_name: str
    version: str
    # Longest prompt + completion, in tokens; known once loaded.
    context_length: int
    # "cpu" or "cuda", known once loaded.
    device: str
    weights_bytes: int
    load_state: EngineLoad

    @property
    def loaded(self) -> bool: ...

    def load(self) -> None:
        """Blocking; tens of seconds for a real model (called in a thread)."""

    async def encode_chat(self, messages: Sequence[dict[str, str]], *, deadline: float | None = None) -> list[int]:
        """The chat rendered with the model's template and tokenised. ``deadline`` is on the event loop's clock."""
        ...

    async def encode(self, prompt: str, *, deadline: float | None = None) -> list[int]: ...

    def stream(
        self, prompt_ids: list[int], sampling: Sampling, *, request_id: str, priority: int
    ) -> AsyncIterator[Chunk]:
        """The generation, chunk by chunk. Lower ``priority`` runs first. Closing the iterator aborts the request
        in the engine at once. A request the engine refuses raises InvalidArgument before the first chunk."""
        ...

    def shutdown(self) -> None: ...
