"""Eviction through the gateway, end to end: a per-modality memory budget (scheduler.model_budgets) makes room for
a model by unloading the least-recently-used idle one on the same device, on the real replica.

The budget has to sit between the models' measured footprints, which are only known once the replica has loaded
them; so the mesh is started process by process and the scheduler is restarted with the budget. Its placements
come back from the replica's load reports, as after any scheduler restart.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from aimass.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    common_pb2,
    models_pb2,
    models_pb2_grpc,
    nlp_pb2,
    nlp_pb2_grpc,
    scheduler_pb2,
    scheduler_pb2_grpc,
)
from tests.live_mesh import LiveMesh

pytestmark = pytest.mark.slow

MINILM, SPACY, VADER = "all-MiniLM-L6-v2", "en_core_web_sm", "vader"
LOADED = scheduler_pb2.PLACEMENT_STATE_LOADED
SERVING = health_pb2.HealthCheckResponse.SERVING


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveMesh]:
    started = LiveMesh(tmp_path_factory.mktemp("model-budget"), replicas=1, node_agent=True)
    try:
        started.start()
        yield started
    finally:
        started.stop()


def ref(name: str) -> common_pb2.ModelRef:
    return common_pb2.ModelRef(name=name)


def placements_until(
    scheduler: scheduler_pb2_grpc.SchedulerServiceStub,
    test: Callable[[dict[str, scheduler_pb2.Placement]], bool],
    timeout_s: float = 20.0,
) -> dict[str, scheduler_pb2.Placement]:
    """Model name → its placement once ``test`` holds (placements follow the replica's load reports)."""
    deadline = time.monotonic() + timeout_s
    while True:
        found: dict[str, scheduler_pb2.Placement] = {}
        try:
            found = {
                p.model.name: p
                for p in scheduler.GetPlacement(scheduler_pb2.GetPlacementRequest(), timeout=5).placements
            }
            if test(found):
                return found
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.UNAVAILABLE:  # the scheduler restarting
                raise
        if time.monotonic() > deadline:
            raise AssertionError(f"placements never satisfied the test: {found}")
        time.sleep(0.1)


def serving_through(gateway: grpc.Channel, service: str, timeout_s: float = 20.0) -> None:
    """Until the gateway says ``service`` is SERVING (a replica of it is in its routing view)."""
    health = health_pb2_grpc.HealthStub(gateway)
    deadline = time.monotonic() + timeout_s
    while health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status != SERVING:
        if time.monotonic() > deadline:
            raise AssertionError(f"the gateway never served {service} again")
        time.sleep(0.1)


def loaded(placements: dict[str, scheduler_pb2.Placement]) -> set[str]:
    return {name for name, p in placements.items() if p.state == LOADED}


def test_loading_over_the_budget_evicts_the_least_recently_used_idle_model(mesh: LiveMesh) -> None:
    # The gateway with the admin key (models:admin), the scheduler as an operator.
    with mesh.channel() as gateway, mesh.scheduler_channel() as channel:
        models = models_pb2_grpc.ModelServiceStub(gateway)
        nlp = nlp_pb2_grpc.NlpServiceStub(gateway)
        scheduler = scheduler_pb2_grpc.SchedulerServiceStub(channel)

        # The replica's models, adopted at their measured footprints, in the text modality's pool.
        adopted = placements_until(scheduler, lambda found: loaded(found) >= {MINILM, SPACY, VADER})
        assert all(adopted[name].modality == models_pb2.MODALITY_TEXT for name in (MINILM, SPACY, VADER))
        size = {name: adopted[name].bytes for name in (MINILM, SPACY, VADER)}
        models.UnloadModel(models_pb2.UnloadModelRequest(model=ref(VADER)), timeout=30)

        # MiniLM and VADER fit in the budget; the three together do not.
        budget = size[MINILM] + size[VADER] + size[SPACY] // 2
        mib = {name: round(bytes / 2**20, 1) for name, bytes in size.items()}
        print(f"\nmodel-budget: footprints {mib} MiB, text budget {budget / 2**20:.1f} MiB")
        mesh.stop_process("scheduler")
        mesh.start_scheduler({"AIMASS_SCHEDULER__MODEL_BUDGETS__TEXT": str(budget)})
        placements_until(scheduler, lambda found: set(found) == loaded(found) == {MINILM, SPACY})
        # The gateway routes by the new scheduler's view, which lists the replica once it has reported again.
        serving_through(gateway, "aimass.v1.NlpService")

        # spaCy used, then MiniLM: spaCy is the least recently used once the reports carry both uses.
        nlp.Entities(nlp_pb2.EntitiesRequest(texts=["Ada Lovelace lived in London."]), timeout=30)
        time.sleep(0.05)
        nlp.Embed(nlp_pb2.EmbedRequest(texts=["a cat sat on the mat"]), timeout=30)
        placements_until(
            scheduler,
            lambda found: (
                found[SPACY].placed_unix_ms < found[SPACY].last_used_unix_ms < found[MINILM].last_used_unix_ms
            ),
        )

        answer = models.LoadModel(models_pb2.LoadModelRequest(model=ref(VADER)), timeout=60)
        assert [m.name for m in answer.evicted] == [SPACY]
        assert answer.replica.loaded and not answer.already_loaded

        # The replica really unloaded spaCy and serves VADER; the scheduler's placements follow.
        described = models.DescribeModel(models_pb2.DescribeModelRequest(model=ref(SPACY)), timeout=10).model
        assert [r.loaded for r in described.replicas] == [False]
        sentiment = nlp.Sentiment(nlp_pb2.SentimentRequest(texts=["I love this."]), timeout=30)
        assert sentiment.results[0].compound > 0
        with pytest.raises(grpc.RpcError) as evicted:
            nlp.Entities(nlp_pb2.EntitiesRequest(texts=["Ada Lovelace lived in London."]), timeout=30)
        assert evicted.value.code() == grpc.StatusCode.UNAVAILABLE
        assert f"model '{SPACY}' is not loaded" in (evicted.value.details() or "")
        after = placements_until(scheduler, lambda found: set(found) == loaded(found) == {MINILM, VADER})
        assert sum(p.bytes for p in after.values()) <= budget

        # Loading spaCy back evicts the least recently used again: MiniLM, as VADER has been used since.
        placements_until(scheduler, lambda found: found[VADER].last_used_unix_ms > found[MINILM].last_used_unix_ms)
        again = models.LoadModel(models_pb2.LoadModelRequest(model=ref(SPACY)), timeout=60)
        assert [m.name for m in again.evicted] == [MINILM]

        # Each load and unload is in the audit log, under the admin key's tenant, with its outcome.
        admin = admin_pb2_grpc.AdminServiceStub(gateway)
        request = admin_pb2.ListAuditEventsRequest(action_prefix="models.", limit=10)
        events = list(reversed(admin.ListAuditEvents(request, timeout=10).events))
        assert [(e.action, e.target, e.outcome) for e in events] == [
            ("models.unload", VADER, "ok"),
            ("models.load", VADER, "ok"),
            ("models.load", SPACY, "ok"),
        ]
        assert {e.tenant_id for e in events} == {"admin"} and all(e.key_id for e in events)
