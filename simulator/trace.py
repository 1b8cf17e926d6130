"""The shared public LLM trace (../shared/traces/, Azure LLM inference trace 2023, conversation; CC BY 4.0, Patel
et al., "Splitwise", ISCA 2024) read as arrivals and token counts, for the simulator and benchmarks/trace_replay.py.

A window is ``start_s`` .. ``start_s + duration_s`` seconds of the trace (from its first arrival). Its arrivals are
replayed relative to the window's start divided by ``time_scale`` (2: twice as fast, so the same simulated seconds
carry twice the trace), and token counts divided by ``token_scale`` (rounded, at least 4 prompt and 1 output token),
so a calibrated CPU-sized model can carry the load; the scales are stated beside every figure.

Tenants and priorities come from a stated rule, not from the trace (it has neither): request ``i`` of the file (its
row index, 0-based) goes to tenant ``tenants[h % len(tenants)]`` where ``h`` is the first 8 bytes of
sha256(``"{i}"``) as an integer, so the split is fixed, even and independent of the window.
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from simulator.workload import Replayed

TRACE = Path(__file__).resolve().parents[2] / "shared" / "traces" / "AzureLLMInferenceTrace_conv.csv"
HEADER = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")


@dataclass(frozen=True)
class TraceRow:
    index: int
    # Seconds since the trace's first arrival.
    offset_s: float
    prompt_tokens: int
    output_tokens: int


def read_rows(path: Path = TRACE) -> list[TraceRow]:
    """Every row of the trace file, in order; ValueError naming the line for anything malformed."""
    rows: list[TraceRow] = []
    start: dt.datetime | None = None
    try:
        handle = path.open(newline="")
    except OSError as err:
        raise ValueError(f"trace {path}: {err.strerror or err}") from err
    with handle:
        reader = csv.reader(handle)
        header = tuple(next(reader, ()))
        if header != HEADER:
            raise ValueError(f"trace {path}: header {','.join(header)!r}, expected {','.join(HEADER)!r}")
        for line, fields in enumerate(reader, start=2):
            try:
                stamp_text, prompt_text, output_text = fields
                # Seven fractional digits; Python parses six.
                stamp = dt.datetime.fromisoformat(stamp_text[:26])
                prompt, output = int(prompt_text), int(output_text)
            except ValueError as err:
                problem = f"{fields!r} is not TIMESTAMP,ContextTokens,GeneratedTokens ({err})"
                raise ValueError(f"trace {path}, line {line}: {problem}") from err
            if prompt < 0 or output < 0:
                raise ValueError(f"trace {path}, line {line}: negative token counts {prompt}, {output}")
            start = start or stamp
            offset = (stamp - start).total_seconds()
            if rows and offset < rows[-1].offset_s:
                raise ValueError(f"trace {path}, line {line}: arrival {stamp_text} is before the previous row's")
            rows.append(TraceRow(len(rows), offset, prompt, output))
    return rows


@dataclass(frozen=True)
class Window:
    """Which part of the trace to replay and how (see the module's docstring)."""

    start_s: float = 0.0
    duration_s: float = 60.0
    time_scale: float = 1.0
    token_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.start_s < 0 or self.duration_s <= 0 or self.time_scale <= 0 or self.token_scale <= 0:
            raise ValueError(
                f"trace window: need start_s >= 0 and duration_s, time_scale, token_scale > 0; got start_s"
                f" {self.start_s:g}, duration_s {self.duration_s:g}, time_scale {self.time_scale:g}, token_scale"
                f" {self.token_scale:g}"
            )

    @property
    def replay_s(self) -> float:
        """Simulated seconds the window takes to replay."""
        return self.duration_s / self.time_scale

    def label(self) -> str:
        return (
            f"Azure conv trace {self.start_s:g}-{self.start_s + self.duration_s:g} s, time x{self.time_scale:g},"
            f" tokens /{self.token_scale:g}"
        )


def window_rows(rows: Sequence[TraceRow], window: Window) -> list[Replayed]:
    """The window's requests as replayed: arrival from the window's start over time_scale, tokens scaled."""
    if not rows:
        raise ValueError("the trace has no rows")
    end = rows[-1].offset_s
    if window.start_s >= end:
        raise ValueError(f"trace window starts at {window.start_s:g} s, after the trace's last arrival ({end:.0f} s)")
    return [
        Replayed(
            (row.offset_s - window.start_s) / window.time_scale,
            max(4, round(row.prompt_tokens / window.token_scale)),
            max(1, round(row.output_tokens / window.token_scale)),
        )
        for row in rows
        if window.start_s <= row.offset_s < window.start_s + window.duration_s
    ]


def tenant_of(index: int, tenants: Sequence[str]) -> str:
    """The stated rule: sha256 of the row index picks the tenant."""
    digest = hashlib.sha256(str(index).encode()).digest()
    return tenants[int.from_bytes(digest[:8], "big") % len(tenants)]


def split_by_tenant(rows: Sequence[TraceRow], window: Window, tenants: Sequence[str]) -> dict[str, list[Replayed]]:
    """The window's replayed requests per tenant (every tenant present, maybe with none)."""
    if not tenants:
        raise ValueError("need at least one tenant")
    split: dict[str, list[Replayed]] = {t: [] for t in tenants}
    inside = [row for row in rows if window.start_s <= row.offset_s < window.start_s + window.duration_s]
    for row, replayed in zip(inside, window_rows(rows, window), strict=True):
        split[tenant_of(row.index, tenants)].append(replayed)
    return split
