"""What a run comes to: SLO attainment, latency percentiles, device utilisation, each tenant's share of service;
markdown tables and one PNG.

- SLO attainment: finished within its class's SLO, over all requests; rejected (queue full, or no device could
  take the model) and timed-out requests are misses.
- Latency percentiles: over answered requests plus timed-out ones at their deadline (a timed-out request took at
  least that long); rejected requests have no latency and are left out.
- Utilisation: busy fraction of each GPU over the arrival window.
- Share of service: a tenant's device seconds (each batch's time split evenly over its requests) over all device
  seconds, next to its share of the requests offered.
- LLM requests (``llm_table``): SLO attainment on TTFT and TPOT together, their percentiles over the answered
  requests, output tokens per second of the arrival window, and how often the engines preempted.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from simulator.mesh import RunResult
from simulator.scenario import Scenario
from simulator.workload import Outcome, Request


@dataclass(frozen=True)
class TenantSummary:
    requests: int
    offered_share: float
    service_share: float
    slo_attainment: float


@dataclass(frozen=True)
class Summary:
    router: str
    requests: int
    slo_attainment: float
    answered: int
    late: int
    rejected: int
    timed_out: int
    p50_s: float
    p99_s: float
    # GPU label ("node0 A100-80GB") → busy fraction.
    utilization: dict[str, float]
    tenants: dict[str, TenantSummary]

    @property
    def mean_utilization(self) -> float:
        return sum(self.utilization.values()) / len(self.utilization) if self.utilization else 0.0


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..1): the smallest value with at least q of the values at or below it."""
    if not values:
        return math.nan
    if not 0 <= q <= 1:
        raise ValueError(f"q must be within 0..1, got {q}")
    ordered = sorted(values)
    rank = max(1, math.ceil(q * len(ordered)))
    return ordered[rank - 1]


def slo_attainment(requests: Iterable[Request]) -> float:
    counted = list(requests)
    return sum(r.met_slo for r in counted) / len(counted) if counted else math.nan


def latencies(requests: Iterable[Request]) -> list[float]:
    return [r.latency for r in requests if r.latency is not None and r.outcome in (Outcome.OK, Outcome.TIMED_OUT)]


def summarize(result: RunResult) -> Summary:
    requests = result.requests
    values = latencies(requests)
    total_service = sum(result.tenant_busy_s.values())
    tenants: dict[str, TenantSummary] = {}
    for tenant in sorted({r.tenant for r in requests}):
        own = [r for r in requests if r.tenant == tenant]
        tenants[tenant] = TenantSummary(
            requests=len(own),
            offered_share=len(own) / len(requests),
            service_share=result.tenant_busy_s.get(tenant, 0.0) / total_service if total_service else 0.0,
            slo_attainment=slo_attainment(own),
        )
    return Summary(
        router=result.router,
        requests=len(requests),
        slo_attainment=slo_attainment(requests),
        answered=sum(r.outcome is Outcome.OK for r in requests),
        late=sum(r.outcome is Outcome.OK and not r.met_slo for r in requests),
        rejected=sum(r.outcome is Outcome.REJECTED for r in requests),
        timed_out=sum(r.outcome is Outcome.TIMED_OUT for r in requests),
        p50_s=percentile(values, 0.50),
        p99_s=percentile(values, 0.99),
        utilization={
            f"{s.instance_id.removesuffix('-replica')} {s.gpu}": min(1.0, s.busy_s / result.duration_s)
            for s in result.replicas
        },
        tenants=tenants,
    )


def llm_table(results: Sequence[RunResult]) -> str:
    """Per router, the LLM requests' TTFT / TPOT figures; empty when the scenario has none."""
    rows = []
    for result in results:
        llm = [r for r in result.requests if r.output_tokens > 0]
        if not llm:
            continue
        answered = [r for r in llm if r.outcome is Outcome.OK]
        ttft = [r.ttft for r in answered if r.ttft is not None]
        tpot = [r.tpot for r in answered if r.tpot is not None]
        rows.append(
            [
                result.router,
                str(len(llm)),
                f"**{slo_attainment(llm):.3f}**",
                f"{percentile(ttft, 0.5) * 1000:.0f} / {percentile(ttft, 0.99) * 1000:.0f}",
                f"{percentile(tpot, 0.5) * 1000:.1f} / {percentile(tpot, 0.99) * 1000:.1f}",
                f"{sum(r.tokens_out for r in answered) / result.duration_s:.0f}",
                str(sum(r.preemptions for r in llm)),
                f"{sum(r.outcome is Outcome.TIMED_OUT for r in llm)}"
                f" / {sum(r.outcome is Outcome.REJECTED for r in llm)}",
            ]
        )
    if not rows:
        return ""
    return markdown_table(
        [
            "router",
            "LLM requests",
            "TTFT+TPOT SLO",
            "TTFT p50 / p99 ms",
            "TPOT p50 / p99 ms",
            "output tok/s",
            "preemptions",
            "timed out / rejected",
        ],
        rows,
    )


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines.extend("| " + " | ".join(row) + " |" for row in rows)
    return "\n".join(lines)


def main_table(summaries: Sequence[Summary]) -> str:
    tenants = sorted({t for s in summaries for t in s.tenants})
    header = [
        "router",
        "SLO attainment",
        "p50 ms",
        "p99 ms",
        "late / timed out / rejected",
        "mean GPU util",
        *(f"{t} SLO / share" for t in tenants),
    ]
    rows = []
    for s in summaries:
        rows.append(
            [
                s.router,
                f"**{s.slo_attainment:.3f}**",
                f"{s.p50_s * 1000:.1f}",
                f"{s.p99_s * 1000:.1f}",
                f"{s.late} / {s.timed_out} / {s.rejected}",
                f"{s.mean_utilization:.2f}",
                *(
                    f"{s.tenants[t].slo_attainment:.3f} / {s.tenants[t].service_share:.2f}" if t in s.tenants else "-"
                    for t in tenants
                ),
            ]
        )
    return markdown_table(header, rows)


def utilization_table(summaries: Sequence[Summary]) -> str:
    gpus = list(summaries[0].utilization) if summaries else []
    return markdown_table(
        ["GPU", *(s.router for s in summaries)],
        [[gpu, *(f"{s.utilization.get(gpu, 0.0):.2f}" for s in summaries)] for gpu in gpus],
    )


def tenant_table(summaries: Sequence[Summary]) -> str:
    if not summaries:
        return ""
    first = summaries[0]
    return markdown_table(
        ["tenant", "requests", "offered share", *(f"service share ({s.router})" for s in summaries)],
        [
            [t, str(first.tenants[t].requests), f"{first.tenants[t].offered_share:.2f}"]
            + [f"{s.tenants[t].service_share:.2f}" for s in summaries]
            for t in first.tenants
        ],
    )


def calibration_table(scenario: Scenario) -> str:
    """Which models' figures were measured and which derived (and from what)."""
    rows = []
    for spec in scenario.models:
        p = spec.profile
        rows.append(
            [
                p.name,
                "measured" if p.measured else "derived",
                f"{p.seconds(1) * 1000:.1f}",
                f"{p.seconds(spec.batching.max_batch_size) * 1000:.0f} (b{spec.batching.max_batch_size})",
                f"{p.load_seconds:.2f}",
                f"{p.footprint_bytes / 2**20:.0f}",
                str(spec.copies),
                p.provenance,
            ]
        )
    return markdown_table(
        ["model", "figures", "host ms b1", "host ms full batch", "load s", "MiB", "copies at start", "source"], rows
    )


def plot(results: Sequence[RunResult], summaries: Sequence[Summary], path: Path, *, title: str = "") -> Path:
    """Latency CDF per router, SLO attainment per tenant and router, and per-GPU utilisation, in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (cdf, bars, util) = plt.subplots(1, 3, figsize=(17, 5.2))
    for result in results:
        values = sorted(latencies(result.requests))
        if values:
            cdf.plot(
                [v * 1000 for v in values],
                [(i + 1) / len(result.requests) for i in range(len(values))],
                label=result.router,
            )
    slos = sorted({r.slo_s for result in results for r in result.requests})
    for slo in slos:
        cdf.axvline(slo * 1000, color="grey", linestyle=":", linewidth=1)
    cdf.set_xscale("log")
    cdf.set_xlabel("latency, ms (dotted: SLOs)")
    cdf.set_ylabel("fraction of all requests answered within")
    cdf.set_title("latency CDF")
    cdf.grid(True, which="both", alpha=0.3)

    groups = ["all", *sorted({t for s in summaries for t in s.tenants})]
    width = 0.8 / max(1, len(summaries))
    for k, s in enumerate(summaries):
        heights = [s.slo_attainment] + [s.tenants[t].slo_attainment if t in s.tenants else 0.0 for t in groups[1:]]
        bars.bar([i + k * width for i in range(len(groups))], heights, width, label=s.router)
    bars.set_xticks([i + width * (len(summaries) - 1) / 2 for i in range(len(groups))], groups)
    bars.set_ylim(0, 1.05)
    bars.set_ylabel("SLO attainment")
    bars.set_title("SLO attainment (misses: late, timed out, rejected)")
    bars.grid(True, axis="y", alpha=0.3)

    gpus = list(summaries[0].utilization) if summaries else []
    for k, s in enumerate(summaries):
        util.bar([i + k * width for i in range(len(gpus))], [s.utilization[g] for g in gpus], width, label=s.router)
    util.set_xticks([i + width * (len(summaries) - 1) / 2 for i in range(len(gpus))], gpus, rotation=40, ha="right")
    util.set_ylim(0, 1.05)
    util.set_ylabel("busy fraction")
    util.set_title("GPU utilisation")
    util.grid(True, axis="y", alpha=0.3)

    if title:
        figure.suptitle(title)
    # One legend for the three panels, below them (inside, it would hide bars).
    handles, labels = bars.get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=len(labels), frameon=False)
    figure.tight_layout(rect=(0, 0.06, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
