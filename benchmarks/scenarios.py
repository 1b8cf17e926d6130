"""What a scenario saves: review-triage in one RunScenario call vs a client making the same three NLP calls itself.

    python -m benchmarks.scenarios [--rounds 5] [--calls 20] [--write docs/benchmarks.md]

Starts its own mesh (`aimass up`: gateway + one NLP replica), then triages the same review three ways, one call at a
time (c=1, latency): ``chained`` (NlpService.Sentiment, then Entities, then Classify zero-shot, each awaited before
the next, as a client chaining the RPCs would), ``parallel`` (the three calls at once from the client) and
``scenario`` (ScenarioService.RunScenario "review-triage": the gateway runs the three steps at once, each through
its own forwarder, and streams them back). Every answer is checked (the sentiment label, the same entities). The
sides alternate within each round, in a rotating order, so drift on the machine hits them alike; the ratios are
medians of the per-round ratios of p50 latency, measured side by side in one run.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import grpc

from aimass.v1 import nlp_pb2, nlp_pb2_grpc, scenarios_pb2, scenarios_pb2_grpc
from benchmarks.common import Mesh, command_line, machine, markdown_table, publish, utc_now, wait_quiet

NAME = "scenarios"
SIDES = ("chained", "parallel", "scenario")
REVIEW = "The parcel from Berlin arrived two weeks late and the courier was rude. Terrible, awful service."
LABELS = ["shipping", "product quality", "customer service", "price"]
DEADLINE_S = 30.0


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class Sides:
    """One triage per side, each returning (sentiment label, entity texts) for the check."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.nlp = nlp_pb2_grpc.NlpServiceStub(channel)
        self.scenarios = scenarios_pb2_grpc.ScenarioServiceStub(channel)

    async def _sentiment(self) -> str:
        reply = await self.nlp.Sentiment(nlp_pb2.SentimentRequest(texts=[REVIEW]), timeout=DEADLINE_S)
        return str(reply.results[0].label)

    async def _entities(self) -> list[str]:
        reply = await self.nlp.Entities(nlp_pb2.EntitiesRequest(texts=[REVIEW]), timeout=DEADLINE_S)
        return [e.text for e in reply.documents[0].entities]

    async def _classify(self) -> str:
        reply = await self.nlp.Classify(nlp_pb2.ClassifyRequest(texts=[REVIEW], labels=LABELS), timeout=DEADLINE_S)
        return str(reply.results[0].scores[0].label)

    async def chained(self) -> tuple[str, list[str]]:
        label = await self._sentiment()
        entities = await self._entities()
        await self._classify()
        return label, entities

    async def parallel(self) -> tuple[str, list[str]]:
        label, entities, _ = await asyncio.gather(self._sentiment(), self._entities(), self._classify())
        return label, entities

    async def scenario(self) -> tuple[str, list[str]]:
        request = scenarios_pb2.RunScenarioRequest(
            name="review-triage", inputs={"review": scenarios_pb2.ScenarioValue(text=REVIEW)}
        )
        label, entities = "", []
        async for event in self.scenarios.RunScenario(request, timeout=DEADLINE_S):
            if event.WhichOneof("event") == "step_finished" and event.step_finished.step == "sentiment":
                sentiment = nlp_pb2.SentimentResponse()
                event.step_finished.result.Unpack(sentiment)
                label = sentiment.results[0].label
            elif event.WhichOneof("event") == "step_finished" and event.step_finished.step == "entities":
                found = nlp_pb2.EntitiesResponse()
                event.step_finished.result.Unpack(found)
                entities = [e.text for e in found.documents[0].entities]
        return label, entities


async def measure(
    side: Callable[[], Awaitable[tuple[str, list[str]]]], calls: int, expected: tuple[str, list[str]]
) -> list[float]:
    latencies = []
    for _ in range(calls):
        started = time.perf_counter()
        answer = await side()
        latencies.append((time.perf_counter() - started) * 1000.0)
        assert answer == expected, f"{side.__name__}: {answer} != {expected}"
    return latencies


async def run_all(mesh: Mesh, rounds: int, calls: int) -> dict[str, list[list[float]]]:
    samples: dict[str, list[list[float]]] = {side: [] for side in SIDES}
    async with mesh.aio_channel() as channel:
        sides = Sides(channel)
        expected = await sides.chained()
        for side in SIDES:  # warm every path (and the models) before measuring
            await measure(getattr(sides, side), 3, expected)
        for rnd in range(rounds):
            order = SIDES[rnd % len(SIDES) :] + SIDES[: rnd % len(SIDES)]
            for side in order:
                samples[side].append(await measure(getattr(sides, side), calls, expected))
    return samples


def report(samples: dict[str, list[list[float]]], rounds: int, calls: int) -> str:
    every = {side: [v for r in samples[side] for v in r] for side in SIDES}
    p50_rounds = {side: [statistics.median(r) for r in samples[side]] for side in SIDES}
    ratio = {
        side: statistics.median(a / b for a, b in zip(p50_rounds[side], p50_rounds["chained"], strict=True))
        for side in SIDES
    }
    rows = [
        [
            f"`{side}`",
            f"{statistics.median(every[side]):.1f}",
            f"{percentile(every[side], 0.9):.1f}",
            f"{ratio[side]:.2f}",
        ]
        for side in SIDES
    ]
    return "\n".join(
        [
            "## Scenarios: review-triage in one call vs the client chaining the RPCs",
            "",
            f"{utc_now()} · {machine()} · `{command_line()}` · {rounds} rounds x {calls} triages per side, one at a "
            "time (c=1), through the gateway (one NLP replica)",
            "",
            "`chained`: the client calls NlpService.Sentiment, then Entities, then Classify (zero-shot, 4 labels), "
            "each awaited; `parallel`: the client makes the three calls at once; `scenario`: one "
            'ScenarioService.RunScenario("review-triage") call, whose gateway runs the three steps at once and '
            "streams each result. Ratio: the median over rounds of the side's p50 / chained's p50, measured side by "
            "side in one run (the machine is shared and noisy: only these ratios compare).",
            "",
            markdown_table(["side", "p50 ms", "p90 ms", "p50 / chained"], rows),
        ]
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=20, help="triages per side per round (default 20)")
    parser.add_argument("--write", type=Path, help="update this markdown file's scenarios section")
    args = parser.parse_args(argv)
    if not 1 <= args.rounds <= 20 or not 1 <= args.calls <= 200:
        parser.error("rounds must be 1..20 and calls 1..200 (the run stays bounded)")
    busy = wait_quiet(30.0)
    if busy:
        print(f"warning: other processes are busy ({'; '.join(busy)}); figures may be skewed", file=sys.stderr)
    mesh = Mesh(NAME)
    mesh.start()
    try:
        mesh.wait_ready(300)
        samples = asyncio.run(run_all(mesh, args.rounds, args.calls))
    finally:
        mesh.stop()
    publish(report(samples, args.rounds, args.calls), args.write, NAME)


if __name__ == "__main__":
    main()
