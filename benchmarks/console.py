"""The console's cost: its JSON API hop (browser → console → gateway) vs the same call over gRPC to the gateway and
vs the REST front door, and what the pages weigh and take to show in a real browser.

    python -m benchmarks.console [--rounds 3] [--calls 200] [--duration 5] [--concurrency 16]
                                 [--write docs/benchmarks.md]

Starts its own mesh (`aimass up`: gateway, one NLP replica, the REST front door and the console), then sends the
same one-text Sentiment request three ways with the mesh's admin key, interleaving the sides each round so drift on
the machine hits all alike:

- **gRPC**: aimass.v1 NlpService/Sentiment on one grpc.aio channel to the gateway;
- **console**: ``POST /api/rpc/NlpService/Sentiment`` (proto3 JSON) on one keep-alive HTTP/1.1 connection pool;
- **REST**: ``POST /v1/aimass/sentiment`` on the REST front door, the same way.

Latency is p50/p99 of ``--calls`` calls one at a time; throughput is OK answers per second with ``--concurrency``
calls in flight for ``--duration`` seconds. Every answer is checked (label "positive"). Then Debian's Chromium
(Playwright) opens the console cold: bytes and requests of every asset, and the time from navigation to the
scenario gallery after signing in (median of ``--rounds`` fresh browser contexts).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from playwright.sync_api import Request, sync_playwright

from aimass.client import keyed_aio_channel
from aimass.v1 import nlp_pb2, nlp_pb2_grpc
from benchmarks.common import Mesh, command_line, machine, markdown_table, median, publish, utc_now, wait_quiet
from tests.console_browser import CHROMIUM, CHROMIUM_ARGS

NAME = "console"
TEXT = "The support team answered within minutes and fixed everything."
SIDES = ("grpc", "console", "rest")
LABELS = {"grpc": "gRPC to the gateway", "console": "console JSON API", "rest": "REST /v1/aimass"}

Call = Callable[[], Awaitable[str]]


@dataclass
class Side:
    latencies_ms: list[float] = field(default_factory=list)
    rps: list[float] = field(default_factory=list)


async def one_at_a_time(call: Call, calls: int) -> list[float]:
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        label = await call()
        times.append((time.perf_counter() - started) * 1000)
        assert label == "positive", label
    return times


async def throughput(call: Call, concurrency: int, duration_s: float) -> float:
    done = 0
    stop_at = time.monotonic() + duration_s

    async def worker() -> None:
        nonlocal done
        while time.monotonic() < stop_at:
            label = await call()
            assert label == "positive", label
            done += 1

    started = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return done / (time.monotonic() - started)


async def measure(mesh: Mesh, rounds: int, calls: int, duration_s: float, concurrency: int) -> dict[str, Side]:
    key = mesh.api_key
    headers = {"authorization": f"Bearer {key}"}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with (
        keyed_aio_channel(mesh.gateway, key) as channel,
        httpx.AsyncClient(base_url=mesh.console_url, headers=headers, limits=limits, timeout=30) as console,
        httpx.AsyncClient(base_url=mesh.rest_url, headers=headers, limits=limits, timeout=30) as rest,
    ):
        stub = nlp_pb2_grpc.NlpServiceStub(channel)

        async def grpc_call() -> str:
            reply = await stub.Sentiment(nlp_pb2.SentimentRequest(texts=[TEXT]), timeout=30)
            return reply.results[0].label

        async def console_call() -> str:
            reply = await console.post("/api/rpc/NlpService/Sentiment", json={"texts": [TEXT]})
            reply.raise_for_status()
            return str(reply.json()["results"][0]["label"])

        async def rest_call() -> str:
            reply = await rest.post("/aimass/sentiment", json={"input": TEXT})
            reply.raise_for_status()
            return str(reply.json()["results"][0]["label"])

        sides = {"grpc": grpc_call, "console": console_call, "rest": rest_call}
        for call in sides.values():  # warm every path (connections, the replica's first calls)
            await one_at_a_time(call, 20)
        results = {name: Side() for name in SIDES}
        for round_index in range(rounds):
            order = SIDES[round_index % len(SIDES) :] + SIDES[: round_index % len(SIDES)]
            for name in order:
                results[name].latencies_ms += await one_at_a_time(sides[name], calls)
            for name in order:
                results[name].rps.append(await throughput(sides[name], concurrency, duration_s))
    return results


@dataclass(frozen=True)
class PageLoad:
    requests: int
    bytes: int
    to_gallery_ms: float


def sizes_into(sizes: list[int]) -> Callable[[Request], None]:
    """A listener that keeps each finished request's response body size."""
    return lambda request: sizes.append(request.sizes()["responseBodySize"])


def page_loads(mesh: Mesh, rounds: int) -> PageLoad:
    """Chromium opens the console cold (a fresh context each time: nothing cached), signs in, waits for the gallery."""
    times: list[float] = []
    sizes: list[int] = []
    counts: list[int] = []
    with sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            for _ in range(rounds):
                context = browser.new_context()
                page = context.new_page()
                assets: list[int] = []
                page.on("requestfinished", sizes_into(assets))
                started = time.perf_counter()
                page.goto(mesh.console_url)
                page.get_by_label("API key").fill(mesh.api_key)
                page.get_by_role("button", name="Sign in").click()
                page.locator("a.tile").first.wait_for()
                times.append((time.perf_counter() - started) * 1000)
                page.wait_for_load_state("networkidle")
                sizes.append(sum(assets))
                counts.append(len(assets))
                context.close()
        finally:
            browser.close()
    return PageLoad(requests=round(median(counts)), bytes=round(median(sizes)), to_gallery_ms=median(times))


def percentile(values: Sequence[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def report(sides: dict[str, Side], page: PageLoad, args: argparse.Namespace) -> str:
    base = sides["grpc"]
    base_p50 = statistics.median(base.latencies_ms)
    base_rps = median(base.rps)
    rows = []
    for name in SIDES:
        side = sides[name]
        p50 = statistics.median(side.latencies_ms)
        rps = median(side.rps)
        rows.append(
            [
                LABELS[name],
                f"{p50:.2f}",
                f"{percentile(side.latencies_ms, 0.99):.2f}",
                f"+{p50 - base_p50:.2f}" if name != "grpc" else "-",
                f"{rps:.0f}",
                f"{rps / base_rps:.2f}x" if name != "grpc" else "1.00x",
            ]
        )
    table = markdown_table(
        ["path", "p50 ms (c=1)", "p99 ms (c=1)", "p50 vs gRPC", f"OK/s (c={args.concurrency})", "vs gRPC"], rows
    )
    return "\n".join(
        [
            f"## Console: its JSON API hop and page load ({utc_now()})",
            "",
            f"`{command_line()}` on {machine()}: NlpService/Sentiment of one text, {args.calls} calls one at a time"
            f" and {args.duration:g} s at c={args.concurrency} per side per round, {args.rounds} rounds with the"
            " sides in turn; medians of the rounds' throughput, latency percentiles over every call.",
            "",
            table,
            "",
            f"Page load (Chromium, a fresh context each time, median of {args.rounds}): {page.requests} requests,"
            f" {page.bytes / 1024:.0f} KiB of assets and answers, {page.to_gallery_ms:.0f} ms from navigation to the"
            " scenario gallery after signing in (WhoAmI, /api/info, /api/services, ListModels).",
        ]
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--write", type=Path, help="update this markdown file's console section")
    args = parser.parse_args(argv)
    busy = wait_quiet(30.0)
    if busy:
        print(f"warning: other processes are busy ({'; '.join(busy)}); figures may be skewed", file=sys.stderr)
    mesh = Mesh(NAME)
    mesh.start()
    try:
        mesh.wait_ready(300)
        sides = asyncio.run(measure(mesh, args.rounds, args.calls, args.duration, args.concurrency))
        page = page_loads(mesh, args.rounds)
    finally:
        mesh.stop()
    publish(report(sides, page, args), args.write, NAME)


if __name__ == "__main__":
    main()
