"""Named scenarios. Each is built from the calibration, so the measured models keep their measured figures.

``skewed`` — the case routing exists for: a heterogeneous fleet, skewed popularity, bursts, several tenants.
  - 8 single-GPU nodes: 2 fast (A100-80GB class, speed 3), 2 middle (L4-24GB class, speed 1.5), 4 slow (T4-16GB
    class, speed 1): the slow ones are 3x slower than the fast ones and hold a fifth of their memory.
  - 8 models over two services; per tenant, Zipf(1.1) popularity over its models. Three are measured (MiniLM-L6
    embeddings, spaCy NER, EfficientNet-Lite0), five derived from them by published compute and parameter ratios.
    Popular models are deployed on every replica, the middle on half, the tail on one or none (loaded on demand).
  - 4 tenants: interactive search (embeddings, SLO 150 ms), photo tagging (SLO 300 ms), document ingestion in
    on/off bursts (NER and embeddings, SLO 1 s), and a moderation tenant bursting interactive classification.
    Their rates are scaled so the average offered work, each request costed at batch 8, is 62% of the fleet's
    capacity; bursts take it past 100% for seconds at a time.
  - 2 gateways; load reports and device readings at production's default interval (1 s), the view pushed every
    100 ms (WatchView's default).
``small`` — a quick sanity run: 3 nodes (one of them 4x slower), two models, one Poisson tenant.
``llm_mixed`` — LLM serving next to embeddings and vision on shared GPUs (simulator/llm.py steps the LLM as vLLM).
  - 4 single-GPU nodes: A100-80GB, L4-24GB, 2 x T4-16GB; speeds relative to the calibration host, T4 anchored at 1
    as in ``skewed``, the ratios between classes derived from their published memory bandwidth (decode steps are
    memory-bound): A100 2,039 GB/s (x6.4), L4 300 GB/s (x0.94), T4 320 GB/s (x1).
  - The measured LLM (smollm2-135m, the real engine's steps) on every node, MiniLM-L6 on every node,
    EfficientNet-Lite0 on two.
  - Tenants: chat (lognormal tokens around 128 in / 48 out; SLO TTFT 1 s, TPOT 150 ms; priority 0), summaries (512
    in / 32 out in bursts; SLO TTFT 8 s, TPOT 400 ms; priority 1), search (embeddings, SLO 150 ms) and photos
    (vision, SLO 300 ms).
``llm_trace`` — the shared Azure conversation trace replayed on the same fleet as ``llm_mixed`` (LLM only):
  arrivals and token counts of a window (from 600 s of the trace, time x3, tokens /8: simulator/trace.py), split
  over three tenants by the stated rule (sha256 of the row index): chat-a and chat-b (SLO TTFT 2 s, TPOT 200 ms,
  priority 0) and batch (SLO TTFT 20 s, TPOT 1 s, priority 1).
"""

from __future__ import annotations

from collections.abc import Callable

from scheduler.devices import GIB, SimulatedGpu
from simulator import trace
from simulator.calibration import Calibration
from simulator.fleet import BatchingSpec
from simulator.llm import LlmProfile
from simulator.scenario import ModelSpec, Scenario
from simulator.workload import Bursts, RequestClass, Tenant, TokenShape

NLP = "aimass.v1.NlpService"
VISION = "aimass.v1.VisionService"

# The engines' batching defaults (aimass.runtime.config): Embed 64 / 2048, Classify 32 / 512; 4 ms max delay.
EMBED_BATCHING = BatchingSpec(max_batch_size=64, max_queue_delay_s=0.004, queue_capacity=2048)
CLASSIFY_BATCHING = BatchingSpec(max_batch_size=32, max_queue_delay_s=0.004, queue_capacity=512)
NER_BATCHING = BatchingSpec(max_batch_size=64, max_queue_delay_s=0.004, queue_capacity=2048)

# The average offered work, every request costed at batch 8 on its model, as a fraction of the fleet's capacity.
# Under load the batches grow and a request costs less, so the GPUs end up ~75% busy on average; the bursts of
# the ingest and moderation tenants take the offered work past the fleet's capacity for seconds at a time.
OFFERED_AT_BATCH_8 = 0.62

INTERACTIVE = RequestClass("interactive", slo_s=0.150, deadline_s=1.0)
TAGGING = RequestClass("tagging", slo_s=0.300, deadline_s=2.0)
BULK = RequestClass("bulk", slo_s=1.0, deadline_s=5.0)


def skewed(calibration: Calibration, duration_s: float = 60.0) -> Scenario:
    minilm = calibration.measured("all-MiniLM-L6-v2")
    ner = calibration.measured("en_core_web_sm")
    lite0 = calibration.measured("efficientnet-lite0")
    # Derived models: compute ratio from FLOPs per input, memory ratio from parameter counts, of the published
    # architectures (sentence-transformers model cards; EfficientNet-Lite and ResNet papers).
    minilm_l12 = minilm.derive(
        "all-MiniLM-L12-v2", compute=2.0, memory=1.47, reason="12 layers vs 6 at width 384; 33M vs 22.7M params"
    )
    mpnet = minilm.derive(
        "all-mpnet-base-v2", compute=8.0, memory=4.8, reason="12 layers vs 6, width 768 vs 384; 109M vs 22.7M params"
    )
    lite2 = lite0.derive(
        "efficientnet-lite2", compute=2.2, memory=1.3, reason="0.9 vs 0.41 GFLOPs at 260 vs 224 px; 6.1M vs 4.7M params"
    )
    resnet = lite0.derive("resnet-50", compute=10.0, memory=5.4, reason="4.1 vs 0.41 GFLOPs; 25.6M vs 4.7M params")
    ner_md = ner.derive(
        "en_core_web_md", compute=1.2, memory=1.8, reason="same pipeline, 20k more static vectors per token"
    )
    models = (
        ModelSpec(minilm, EMBED_BATCHING, copies=8),
        ModelSpec(lite0, CLASSIFY_BATCHING, copies=8),
        ModelSpec(ner, NER_BATCHING, copies=8),
        ModelSpec(minilm_l12, EMBED_BATCHING, copies=4),
        ModelSpec(lite2, CLASSIFY_BATCHING, copies=4),
        ModelSpec(mpnet, EMBED_BATCHING, copies=3),
        ModelSpec(resnet, CLASSIFY_BATCHING, copies=3),
        ModelSpec(ner_md, NER_BATCHING, copies=0),
    )
    # Rates relative to each other; the scenario is scaled to OFFERED_AT_BATCH_8 of the fleet below.
    tenants = (
        Tenant(
            "search",
            rate=520.0,
            request_class=INTERACTIVE,
            models=("all-MiniLM-L6-v2", "all-MiniLM-L12-v2", "all-mpnet-base-v2"),
        ),
        Tenant(
            "photos",
            rate=220.0,
            request_class=TAGGING,
            models=("efficientnet-lite0", "efficientnet-lite2", "resnet-50"),
        ),
        Tenant(
            "ingest",
            rate=120.0,
            request_class=BULK,
            models=("en_core_web_sm", "all-MiniLM-L6-v2", "en_core_web_md"),
            bursts=Bursts(burst_rate=1400.0, mean_on_s=2.0, mean_off_s=8.0),
        ),
        Tenant(
            "moderation",
            rate=80.0,
            request_class=INTERACTIVE,
            models=("efficientnet-lite0", "all-MiniLM-L6-v2"),
            bursts=Bursts(burst_rate=500.0, mean_on_s=1.0, mean_off_s=6.0),
        ),
    )
    gpus = (
        SimulatedGpu("A100-80GB", 80 * GIB, speed=3.0),
        SimulatedGpu("A100-80GB", 80 * GIB, speed=3.0),
        SimulatedGpu("L4-24GB", 24 * GIB, speed=1.5),
        SimulatedGpu("L4-24GB", 24 * GIB, speed=1.5),
        SimulatedGpu("T4-16GB", 16 * GIB, speed=1.0),
        SimulatedGpu("T4-16GB", 16 * GIB, speed=1.0),
        SimulatedGpu("T4-16GB", 16 * GIB, speed=1.0),
        SimulatedGpu("T4-16GB", 16 * GIB, speed=1.0),
    )
    scenario = Scenario(
        name="skewed",
        description=__doc__.split("``skewed``", 1)[1].split("``small``", 1)[0].strip(" —\n") if __doc__ else "",
        gpus=gpus,
        models=models,
        tenants=tenants,
        duration_s=duration_s,
        gateways=2,
    )
    return scenario.loaded_to(OFFERED_AT_BATCH_8)


def small(calibration: Calibration, duration_s: float = 20.0) -> Scenario:
    minilm = calibration.measured("all-MiniLM-L6-v2")
    lite0 = calibration.measured("efficientnet-lite0")
    return Scenario(
        name="small",
        description="3 nodes (speeds 2, 2, 0.5), MiniLM-L6 and EfficientNet-Lite0 on each, one Poisson tenant.",
        gpus=(
            SimulatedGpu("fast", 16 * GIB, speed=2.0),
            SimulatedGpu("fast", 16 * GIB, speed=2.0),
            SimulatedGpu("slow", 16 * GIB, speed=0.5),
        ),
        models=(ModelSpec(minilm, EMBED_BATCHING, copies=3), ModelSpec(lite0, CLASSIFY_BATCHING, copies=3)),
        tenants=(
            Tenant("default", rate=150.0, request_class=INTERACTIVE, models=("all-MiniLM-L6-v2", "efficientnet-lite0")),
        ),
        duration_s=duration_s,
    )


LLM_MODEL = "smollm2-135m-instruct"
# Derived: T4 anchored at the calibration host (as in ``skewed``), the others by published memory bandwidth.
LLM_GPUS = (
    SimulatedGpu("A100-80GB", 80 * GIB, speed=6.4),
    SimulatedGpu("L4-24GB", 24 * GIB, speed=0.94),
    SimulatedGpu("T4-16GB", 16 * GIB, speed=1.0),
    SimulatedGpu("T4-16GB", 16 * GIB, speed=1.0),
)
# LLM classes: the SLO is on TTFT and TPOT; slo_s (the whole answer) is left at the deadline.
CHAT = RequestClass("chat", slo_s=120.0, deadline_s=120.0, slo_ttft_s=1.0, slo_tpot_s=0.150, priority=0)
SUMMARY = RequestClass("summary", slo_s=300.0, deadline_s=300.0, slo_ttft_s=8.0, slo_tpot_s=0.400, priority=1)
TRACE_CHAT = RequestClass("trace-chat", slo_s=120.0, deadline_s=120.0, slo_ttft_s=2.0, slo_tpot_s=0.200, priority=0)
TRACE_BATCH = RequestClass("trace-batch", slo_s=300.0, deadline_s=300.0, slo_ttft_s=20.0, slo_tpot_s=1.0, priority=1)
TRACE_WINDOW = trace.Window(start_s=600.0, duration_s=180.0, time_scale=3.0, token_scale=8.0)


def llm_spec(profile: LlmProfile, copies: int) -> ModelSpec:
    # The replica's engine limits: max_num_seqs running, max_waiting queued (aimass.runtime.config.LlmConfig).
    return ModelSpec(
        profile,
        BatchingSpec(max_batch_size=profile.max_num_seqs, max_queue_delay_s=0.0, queue_capacity=profile.max_waiting),
        copies=copies,
    )


def _llm(calibration: Calibration) -> LlmProfile:
    profile = calibration.measured(LLM_MODEL)
    if not isinstance(profile, LlmProfile):
        raise ValueError(f"{LLM_MODEL} in the calibration is not an LLM; run `python -m benchmarks.llm_calibration`")
    return profile


def _section(name: str) -> str:
    text = __doc__ or ""
    return text.split(f"``{name}``", 1)[1].split("\n``", 1)[0].strip(" —\n")


def llm_mixed(calibration: Calibration, duration_s: float = 60.0) -> Scenario:
    llm = _llm(calibration)
    minilm = calibration.measured("all-MiniLM-L6-v2")
    lite0 = calibration.measured("efficientnet-lite0")
    tenants = (
        Tenant("chat", rate=3.0, request_class=CHAT, models=(LLM_MODEL,), tokens=TokenShape(128, 48)),
        Tenant(
            "summaries",
            rate=0.2,
            request_class=SUMMARY,
            models=(LLM_MODEL,),
            tokens=TokenShape(512, 32, sigma=0.3),
            bursts=Bursts(burst_rate=3.0, mean_on_s=4.0, mean_off_s=16.0),
        ),
        Tenant("search", rate=150.0, request_class=INTERACTIVE, models=("all-MiniLM-L6-v2",)),
        Tenant("photos", rate=40.0, request_class=TAGGING, models=("efficientnet-lite0",)),
    )
    return Scenario(
        name="llm_mixed",
        description=_section("llm_mixed"),
        gpus=LLM_GPUS,
        models=(
            llm_spec(llm, copies=4),
            ModelSpec(minilm, EMBED_BATCHING, copies=4),
            ModelSpec(lite0, CLASSIFY_BATCHING, copies=2),
        ),
        tenants=tenants,
        duration_s=duration_s,
    )


def llm_trace(
    calibration: Calibration, duration_s: float | None = None, *, window: trace.Window = TRACE_WINDOW
) -> Scenario:
    """``duration_s``: simulated seconds of replay (the window's length is that times its time scale)."""
    if duration_s is not None:
        window = trace.Window(window.start_s, duration_s * window.time_scale, window.time_scale, window.token_scale)
    llm = _llm(calibration)
    classes = {"chat-a": TRACE_CHAT, "chat-b": TRACE_CHAT, "batch": TRACE_BATCH}
    split = trace.split_by_tenant(trace.read_rows(), window, tuple(classes))
    tenants = tuple(
        Tenant(
            name,
            rate=len(split[name]) / window.replay_s,
            request_class=request_class,
            models=(LLM_MODEL,),
            replay=tuple(split[name]),
        )
        for name, request_class in classes.items()
    )
    return Scenario(
        name="llm_trace",
        description=f"{_section('llm_trace')} Window: {window.label()}.",
        gpus=LLM_GPUS,
        models=(llm_spec(llm, copies=4),),
        tenants=tenants,
        duration_s=window.replay_s,
    )


SCENARIOS: dict[str, Callable[..., Scenario]] = {
    "skewed": skewed,
    "small": small,
    "llm_mixed": llm_mixed,
    "llm_trace": llm_trace,
}


def make_scenario(
    name: str, calibration: Calibration, duration_s: float | None = None, *, load: float = 1.0
) -> Scenario:
    try:
        build = SCENARIOS[name]
    except KeyError:
        raise ValueError(f"unknown scenario {name!r}; choose one of {', '.join(sorted(SCENARIOS))}") from None
    scenario = build(calibration) if duration_s is None else build(calibration, duration_s)
    return scenario.scaled(load) if load != 1.0 else scenario
