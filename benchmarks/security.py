"""What security costs, and how closely a tenant's limit holds with two gateways.

Cost: two meshes (`aimass up` on free ports, gateway + one NLP replica each): ``secure``, as `aimass up` starts it
(an API key checked on every call at the gateway, mTLS between the gateway and the replica, the request scope
forwarded), and ``open`` (``auth.mode = "off"``, ``mesh.tls = "off"``). Each scenario is measured on both in
interleaved rounds (the order alternating from round to round) so drift on the machine hits them alike; the report
gives the median per side, throughput secure / open and the p50 added by security.

- NlpService/Sentiment, one short text: the cheapest call, so the worst case relative to the work.
- NlpService/Embed, one short text: a call through the batcher and the model.

Quota split: on the secure mesh, a second gateway process joins (the same store and scheduler), and a tenant limited
to ``--rate`` requests per second is driven as hard as it goes for ``--duration`` seconds, spread evenly over both
gateways and then all through one. Each gateway admits half the rate (aimass/tenancy/quotas.py), so the spread
traffic should get the whole limit and the one-sided traffic half of it: the table shows what each got.

    python -m benchmarks.security [--rounds 3] [--duration 3] [--rate 40] [--write docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from aimass.bootstrap import ensure_certificates
from aimass.local_mesh import free_port
from aimass.store.sql import SqlStore
from aimass.tenancy import keys
from benchmarks.common import (
    Mesh,
    Scenario,
    ScenarioSample,
    SideMedians,
    check_bounded,
    command_line,
    machine,
    markdown_table,
    publish,
    rounds_cli,
    run_metered,
    utc_now,
    wait_quiet,
)
from loadtest.generator import LoadResult, LoadSpec, run_load

NAME = "security"
# Side → the environment of its mesh.
SIDES: dict[str, dict[str, str]] = {"open": {"AIMASS_AUTH__MODE": "off", "AIMASS_MESH__TLS": "off"}, "secure": {}}
PROCESSES = ("client", "gateway", "replica")
ROOT = Path(__file__).resolve().parent.parent
EMBED_RATIO_GOAL = 0.90  # secure / open throughput, Embed at its busiest concurrency
ADDED_P50_GOAL_MS = 0.2  # at c=1
RATE_TENANT = "bench-rate"


SCENARIOS = (
    Scenario("aimass.v1.NlpService/Sentiment", 1, {"texts": ["I love how fast this is."]}),
    Scenario("aimass.v1.NlpService/Sentiment", 64, {"texts": ["I love how fast this is."]}),
    Scenario("aimass.v1.NlpService/Embed", 1, {"texts": ["a cat sat on the mat"]}),
    Scenario("aimass.v1.NlpService/Embed", 32, {"texts": ["a cat sat on the mat"]}),
)


def spec_for(mesh: Mesh, scenario: Scenario, duration: float, *, api_key: str = "") -> LoadSpec:
    return LoadSpec(
        target=mesh.gateway,
        method=scenario.method,
        request=dict(scenario.request),
        concurrency=scenario.concurrency,
        duration_s=duration,
        warmup=max(50, scenario.concurrency * 5),
        deadline_s=10.0,
        progress=False,
        # The open mesh takes calls without a key ("": send none); the secure one gets its admin key.
        api_key=api_key,
    )


async def measure_cost(meshes: Mapping[str, Mesh], rounds: int, duration: float) -> list[ScenarioSample]:
    pids = {side: {"client": os.getpid(), **mesh.pids()} for side, mesh in meshes.items()}
    for mesh in meshes.values():  # settle: first connections, lazy initialisation
        for scenario in SCENARIOS:
            await run_load(spec_for(mesh, scenario, 1.0, api_key=mesh.api_key))
    samples: list[ScenarioSample] = []
    for scenario in SCENARIOS:
        for rnd in range(rounds):
            order = list(meshes) if rnd % 2 == 0 else list(meshes)[::-1]
            for side in order:
                mesh = meshes[side]
                spec = spec_for(mesh, scenario, duration, api_key=mesh.api_key)
                run = await run_metered(spec, pids[side], f"round {rnd + 1} {scenario.label:<16} {side:<6}")
                samples.append(ScenarioSample(scenario, side, rnd, run))
    return samples


class SecondGateway:
    """One more gateway process for a running mesh: its own certificate, the same store, scheduler and registry."""

    def __init__(self, mesh: Mesh) -> None:
        assert mesh.state_dir is not None
        ensure_certificates(mesh.settings(), {"gateway-2": "gateway"})
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        env = {
            **os.environ,
            "AIMASS_LOG_LEVEL": "WARNING",
            "AIMASS_STATE_DIR": str(mesh.state_dir),
            "AIMASS_MESH__IDENTITY": "gateway-2",
            "AIMASS_REGISTRY__ADDRESS": mesh.scheduler,
            "AIMASS_SCHEDULER__ADDRESS": mesh.scheduler,
            "AIMASS_GATEWAY__SERVER__PORT": str(self.port),
        }
        self.process = subprocess.Popen([sys.executable, "-m", "gateway"], env=env, cwd=ROOT)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()


@dataclass(frozen=True)
class SplitResult:
    layout: str
    admitted_rps: float
    refused: int
    rate: float


async def hammer(targets: Sequence[str], key: str, duration: float, *, warmup: int = 0) -> list[LoadResult]:
    """As fast as 4 callers per target go, for ``duration``: the quota is the limit, not the mesh. ``warmup`` calls
    per target first, not counted (they spend the buckets' burst, so what is measured is the steady rate)."""
    specs = [
        LoadSpec(
            target=target,
            method="aimass.v1.NlpService/Sentiment",
            request={"texts": ["quotas are fair"]},
            concurrency=4,
            duration_s=duration,
            warmup=warmup,
            deadline_s=10.0,
            progress=False,
            api_key=key,
        )
        for target in targets
    ]
    return list(await asyncio.gather(*(run_load(spec) for spec in specs)))


async def measure_split(mesh: Mesh, second: str, rate: float, duration: float) -> list[SplitResult]:
    store = SqlStore.open(mesh.settings().store_url)
    try:
        store.set_tenant(RATE_TENANT, requests_per_second=rate)
        _, key = store.create_key(RATE_TENANT, [keys.SCOPE_INFER], name="benchmark")
    finally:
        store.close()
    # Until both gateways serve (and know of each other: each then admits half).
    deadline = asyncio.get_running_loop().time() + 60
    while True:
        results = await hammer([mesh.gateway, second], key, 1.0)
        if all(r.ok for r in results):
            break
        if asyncio.get_running_loop().time() > deadline:
            raise RuntimeError(f"the second gateway never served: {[r.error_samples for r in results]}")
    out: list[SplitResult] = []
    for layout, targets in (("spread over both", [mesh.gateway, second]), ("all to one", [mesh.gateway])):
        await asyncio.sleep(1.5)  # buckets refill
        results = await hammer(targets, key, duration, warmup=int(rate))
        ok = sum(r.ok for r in results)
        refused = sum(r.status_counts.get("RESOURCE_EXHAUSTED", 0) for r in results)
        elapsed = max(r.elapsed_s for r in results)
        print(f"  quota {layout:<17} {ok / elapsed:6.1f} admitted/s of {rate:g}, {refused} refused", file=sys.stderr)
        out.append(SplitResult(layout, ok / elapsed, refused, rate))
    return out


def report(samples: Sequence[ScenarioSample], split: Sequence[SplitResult], rounds: int, duration: float) -> str:
    rows = []
    verdicts = []
    for scenario in SCENARIOS:
        medians = SideMedians.of(
            {side: [s.run for s in samples if s.scenario == scenario and s.side == side] for side in SIDES},
            PROCESSES,
        )
        ratio = medians.rps["secure"] / medians.rps["open"]
        added = medians.p50_ms["secure"] - medians.p50_ms["open"]
        rows.append(
            (
                scenario.label,
                f"{medians.rps['open']:,.0f}",
                f"{medians.rps['secure']:,.0f}",
                f"{ratio:.2f}",
                f"{medians.p50_ms['open']:.2f}",
                f"{medians.p50_ms['secure']:.2f}",
                f"{added:+.2f}",
                f"{sum(medians.cpu_ms['open'].values()):.3f} / {sum(medians.cpu_ms['secure'].values()):.3f}",
            )
        )
        if scenario.method.endswith("Embed") and scenario.concurrency > 1:
            verdicts.append(
                f"Embed c={scenario.concurrency} throughput secure/open {ratio:.2f} (goal ≥ {EMBED_RATIO_GOAL}: "
                f"{'met' if ratio >= EMBED_RATIO_GOAL else 'missed'})"
            )
        if scenario.concurrency == 1:
            verdicts.append(
                f"{scenario.label} added p50 {added:+.2f} ms (goal ≤ {ADDED_P50_GOAL_MS} ms: "
                f"{'met' if added <= ADDED_P50_GOAL_MS else 'missed'})"
            )
    cost = markdown_table(
        (
            "scenario",
            "RPS open",
            "RPS secure",
            "secure / open",
            "p50 open ms",
            "p50 secure ms",
            "added p50 ms",
            "CPU ms/call open / secure",
        ),
        rows,
    )
    quota = markdown_table(
        ("tenant's traffic", "admitted / s", "limit / s", "admitted / limit", "refused (QUOTA_EXCEEDED)"),
        [
            (s.layout, f"{s.admitted_rps:.1f}", f"{s.rate:g}", f"{s.admitted_rps / s.rate:.2f}", str(s.refused))
            for s in split
        ],
    )
    return "\n".join(
        [
            f"## Cost of auth and mTLS ({utc_now()})",
            "",
            f"`{command_line()}` on {machine()}; {rounds} interleaved rounds of {duration:g} s per scenario, medians. "
            '`open`: `auth.mode = "off"` and `mesh.tls = "off"`; `secure`: the default (an API key verified at the '
            "gateway from its in-memory cache, mTLS on the gateway's long-lived channel to the replica, the request "
            "scope forwarded as metadata). CPU per call sums the client, the gateway and the replica.",
            "",
            cost,
            "",
            *(f"- {line}" for line in verdicts),
            "",
            "### A tenant's rate limit with two gateways",
            "",
            "A second gateway joins the secure mesh (the same store and scheduler); a tenant limited to "
            f"{split[0].rate:g} requests/s is driven by 4 callers per gateway used, after calls that spend the "
            "buckets' one-second burst. Each gateway admits half the limit (no coordination per request): traffic "
            "spread over both gets the whole limit, traffic all through one gets half of it, the known error of the "
            "split, on the safe side.",
            "",
            quota,
        ]
    )


async def main_async(args: argparse.Namespace) -> str:
    meshes = {side: Mesh(f"security-{side}", env=env) for side, env in SIDES.items()}
    second: SecondGateway | None = None
    try:
        for mesh in meshes.values():
            mesh.start()
        for mesh in meshes.values():
            mesh.wait_ready()
        wait_quiet(30, exclude=[pid for mesh in meshes.values() for pid in mesh.pids().values()])
        samples = await measure_cost(meshes, args.rounds, args.duration)
        second = SecondGateway(meshes["secure"])
        split = await measure_split(meshes["secure"], second.address, args.rate, args.duration)
    finally:
        if second is not None:
            second.stop()
        for mesh in meshes.values():
            mesh.stop()
    return report(samples, split, args.rounds, args.duration)


def main(argv: Sequence[str] | None = None) -> None:
    cli = rounds_cli("security", __doc__, rounds_help="interleaved rounds per scenario", wait_quiet_s=None)
    cli.add_argument("--rate", type=float, default=40.0, help="the rate-limited tenant's requests/s (default 40)")
    args = cli.parse_args(argv)
    check_bounded(cli, args)
    if not 1 <= args.rate <= 1000:
        cli.error("rate must be 1..1000 (the whole run stays bounded)")
    publish(asyncio.run(main_async(args)), args.write, NAME)


if __name__ == "__main__":
    main()
