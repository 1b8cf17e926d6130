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
"""

from __future__ import annotations

from collections.abc import Callable

from scheduler.devices import GIB, SimulatedGpu
from simulator.calibration import Calibration
from simulator.fleet import BatchingSpec
from simulator.scenario import ModelSpec, Scenario
from simulator.workload import Bursts, RequestClass, Tenant

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


SCENARIOS: dict[str, Callable[..., Scenario]] = {"skewed": skewed, "small": small}


def make_scenario(
    name: str, calibration: Calibration, duration_s: float | None = None, *, load: float = 1.0
) -> Scenario:
    try:
        build = SCENARIOS[name]
    except KeyError:
        raise ValueError(f"unknown scenario {name!r}; choose one of {', '.join(sorted(SCENARIOS))}") from None
    scenario = build(calibration) if duration_s is None else build(calibration, duration_s)
    return scenario.scaled(load) if load != 1.0 else scenario
