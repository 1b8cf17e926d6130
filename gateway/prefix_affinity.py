"""Prefix affinity for LLM requests: which replica likely holds a request's prompt prefix in its KV cache.

vLLM caches the KV blocks of every prompt it has computed (automatic prefix caching, on by default) and reuses them
for any later prompt that starts the same way: a chat's next turn repeats the whole conversation so far, so sent
where the previous turn ran it skips that prefill. The gateway cannot see the engines' caches, so it keeps an index
of what it sent where, as llm-d's prefix-cache scorer (and the Gateway API inference extension's prefix plugin) do:

- The prompt text (Generate's ``prompt``; Chat's messages in order, each as its role and content) is cut into
  blocks of ``BLOCK_CHARS`` characters. Characters, not tokens: the gateway has no tokenizer, and a 256-character
  block (some 64 tokens, four of vLLM's 16-token blocks) is fine enough to say "this prefix was sent there", as a
  chat turn adds far more. Only whole blocks count (the engine caches only whole token blocks), and at most
  ``MAX_BLOCKS`` leading ones (32 KiB: the start is what matters, and a request costs ~1 µs per block).
- Hashes are chained: a block's hash covers the method, the model name and every block before it, so a replica
  holding block k was sent the whole prefix up to k, and the deepest block it holds is its cached prefix (no
  per-block intersection). They are Python's own hashes (strings hash with SipHash under a key drawn per process):
  the index lives in one process, a hash is a fraction of a microsecond, and a client cannot aim a collision.
- ``PrefixIndex`` maps block hash → the replicas it was sent to and when, least recently recorded first, at most
  ``max_entries`` blocks (beyond, the least recent go: bounded memory whatever the traffic) and each for at most
  ``ttl_s`` (an engine's cache turns over; a stale entry would steer requests to a replica that forgot them). A
  prefix is recorded last block first, so its leading blocks are the more recent and a long prompt loses its tail
  before its head, as an engine's cache does.
- A request's affinity for a replica is the fraction of its blocks that replica holds from the start (0..1).

The router (gateway/router.py, ``ours``) weighs affinity against load; this module does no I/O and has no opinion
on what to do with it. Requests are read with protobuf's C parser (only LLM prompt methods; their bodies are text).
"""

from __future__ import annotations

import dataclasses
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence

from google.protobuf.message import DecodeError

from aimass.v1 import llm_pb2

# Characters per block and how many leading blocks count.
BLOCK_CHARS = 256
MAX_BLOCKS = 128
# Index bounds: 64k blocks stand for 16 MiB of prompt text (some hundreds of long conversations) in ~20 MB of
# index (measured, one replica per block); entries older than TTL_S are ignored and dropped.
MAX_ENTRIES = 65_536
TTL_S = 600.0
# A block is remembered on this many replicas at most (the most recent ones).
REPLICAS_PER_BLOCK = 4

LLM_SERVICE = "/aimass.v1.LlmService/"
# Control characters chat text hardly holds, so one message's end does not read as the next one's start (and a
# crafted collision would only misroute a request, never change its answer).
_ROLE_END = "\x1e"
_MESSAGE_END = "\x1f"


@dataclasses.dataclass(frozen=True)
class PromptPrefix:
    """A request's chained block hashes, first block first."""

    blocks: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.blocks)


def chained_hashes(
    text: str, seed: str = "", block_chars: int = BLOCK_CHARS, max_blocks: int = MAX_BLOCKS
) -> tuple[int, ...]:
    """The chained hashes of ``text``'s whole leading blocks (at most ``max_blocks``): each covers ``seed`` and
    every block before it."""
    previous = hash(seed)
    hashes: list[int] = []
    for start in range(0, min(len(text) // block_chars, max_blocks) * block_chars, block_chars):
        previous = hash((previous, text[start : start + block_chars]))
        hashes.append(previous)
    return tuple(hashes)


def _chat_text(data: bytes) -> tuple[str, str]:
    request = llm_pb2.ChatRequest.FromString(data)
    text = "".join(f"{m.role}{_ROLE_END}{m.content}{_MESSAGE_END}" for m in request.messages)
    return request.model.name, text


def _generate_text(data: bytes) -> tuple[str, str]:
    request = llm_pb2.GenerateRequest.FromString(data)
    return request.model.name, request.prompt


# The methods whose prompt lands in an engine's prefix cache, and how to read it.
_PROMPT_READERS: dict[str, Callable[[bytes], tuple[str, str]]] = {
    f"{LLM_SERVICE}Chat": _chat_text,
    f"{LLM_SERVICE}Generate": _generate_text,
}


def prompt_prefix(method: str, data: bytes) -> PromptPrefix | None:
    """The prefix of an LLM Chat/Generate request's prompt; None for any other method, a prompt shorter than one
    block, or bytes that do not parse (the replica answers those itself)."""
    reader = _PROMPT_READERS.get(method)
    if reader is None:
        return None
    try:
        model, text = reader(data)
    except (DecodeError, RuntimeError, ValueError):
        return None
    # Chat and Generate render the same text differently (templates): their prefixes never match each other.
    blocks = chained_hashes(text[: BLOCK_CHARS * MAX_BLOCKS], seed=f"{method}\n{model}")
    return PromptPrefix(blocks) if blocks else None


class PrefixIndex:
    """Block hash → replica instance id → when a request with that block was sent there; LRU-bounded, expiring."""

    def __init__(
        self,
        max_entries: int = MAX_ENTRIES,
        ttl_s: float = TTL_S,
        replicas_per_block: int = REPLICAS_PER_BLOCK,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_entries < 1 or ttl_s <= 0 or replicas_per_block < 1:
            raise ValueError("max_entries and replicas_per_block must be at least 1, ttl_s positive")
        self.max_entries = max_entries
        self.ttl_s = ttl_s
        self.replicas_per_block = replicas_per_block
        self.clock = clock
        # Least recently recorded first: eviction and expiry pop from the front.
        self._blocks: OrderedDict[int, dict[str, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._blocks)

    def record(self, prefix: PromptPrefix, replica_id: str) -> None:
        """``prefix`` was sent to ``replica_id`` now: its engine will hold those blocks."""
        now = self.clock()
        for block in reversed(prefix.blocks):
            holders = self._blocks.get(block)
            if holders is None:
                holders = self._blocks[block] = {}
            else:
                self._blocks.move_to_end(block)
            holders.pop(replica_id, None)
            holders[replica_id] = now  # dicts keep insertion order: the oldest holder is first
            if len(holders) > self.replicas_per_block:
                del holders[next(iter(holders))]
        self._expire(now)
        while len(self._blocks) > self.max_entries:
            self._blocks.popitem(last=False)

    def _expire(self, now: float) -> None:
        # The front block was recorded longest ago; once it is fresh, so are all after it.
        while self._blocks:
            block, holders = next(iter(self._blocks.items()))
            if now - max(holders.values()) <= self.ttl_s:
                return
            del self._blocks[block]

    def cached_blocks(self, prefix: PromptPrefix) -> dict[str, int]:
        """Replica instance id → how many of ``prefix``'s leading blocks it holds (only replicas holding some)."""
        now = self.clock()
        held: dict[str, int] = {}
        for depth, block in enumerate(prefix.blocks, start=1):
            holders = self._blocks.get(block)
            fresh = False
            for replica, seen in (holders or {}).items():
                if now - seen <= self.ttl_s:
                    held[replica] = depth
                    fresh = True
            # No replica holds this block: none holds a deeper one (it would have been sent this one with it).
            if not fresh:
                break
        return held

    def affinity(self, prefix: PromptPrefix, replica_ids: Sequence[str]) -> dict[str, float]:
        """The fraction (0..1) of ``prefix``'s blocks each of ``replica_ids`` holds from the start."""
        held = self.cached_blocks(prefix) if prefix.blocks else {}
        total = len(prefix.blocks) or 1
        return {replica: held.get(replica, 0) / total for replica in replica_ids}
