"""Every process of a mesh started by `aimass up` serves Prometheus metrics, and the values move with the work."""

from __future__ import annotations

import contextlib
import time

import grpc

from aimass.client import Client
from aimass.local_mesh import LocalMesh
from aimass.v1 import models_pb2, models_pb2_grpc
from tests.metrics import scrape, value
from tests.security import key_for

SENTIMENT = "/aimass.v1.NlpService/Sentiment"


def test_every_process_serves_metrics_that_move(mesh: LocalMesh) -> None:
    before = {name: scrape(mesh.metrics_address(name)) for name in ("gateway", "nlp-0", "scheduler")}
    with Client(mesh.gateway, timeout_s=30) as client:
        for _ in range(5):
            client.sentiment(["I love this"])
        client.embed(["served", "batched"])
    # Two calls the front door refuses: one without a key, one with a key whose scopes do not cover loading models.
    with grpc.insecure_channel(mesh.gateway) as channel, contextlib.suppress(grpc.RpcError):
        models_pb2_grpc.ModelServiceStub(channel).LoadModel(models_pb2.LoadModelRequest(), timeout=5)
    with mesh.channel(key_for("metrics")) as channel, contextlib.suppress(grpc.RpcError):
        models_pb2_grpc.ModelServiceStub(channel).LoadModel(models_pb2.LoadModelRequest(), timeout=5)
    time.sleep(1.5)  # a load report or two reaches the scheduler
    after = {name: scrape(mesh.metrics_address(name)) for name in ("gateway", "nlp-0", "scheduler")}

    # Requests by method and status, on the gateway and on the replica that ran them.
    for process in ("gateway", "nlp-0"):
        grown = value(after[process], "aimass_requests_total", method=SENTIMENT, code="OK") - value(
            before[process], "aimass_requests_total", method=SENTIMENT, code="OK"
        )
        assert grown >= 5, process
        assert value(after[process], "aimass_request_duration_seconds_count", method=SENTIMENT) >= 5
    assert value(after["gateway"], "aimass_requests_total", code="PERMISSION_DENIED") >= 1
    for reason in ("NO_KEY", "MISSING_SCOPE"):
        refused = "aimass_gateway_auth_refused_total"
        assert value(after["gateway"], refused, reason=reason) > value(before["gateway"], refused, reason=reason)
    # Batches and model loads (with measured footprints) on the replica.
    nlp = after["nlp-0"]
    batches = "aimass_batch_size_count"
    assert value(nlp, batches, batcher="embed") > value(before["nlp-0"], batches, batcher="embed")
    assert value(nlp, "aimass_model_load_seconds_count", model="all-MiniLM-L6-v2") >= 1
    assert value(nlp, "aimass_model_loaded", model="vader") == 1
    assert value(nlp, "aimass_model_footprint_bytes", model="all-MiniLM-L6-v2") > 2**20
    # The scheduler's reports, its watchers (the gateway) and its view.
    scheduler = after["scheduler"]
    assert value(scheduler, "aimass_scheduler_reports_total", kind="load") > value(
        before["scheduler"], "aimass_scheduler_reports_total", kind="load"
    )
    assert value(scheduler, "aimass_scheduler_view_watchers") >= 1
    assert value(scheduler, "aimass_scheduler_view_version") >= 1
    # The node agent's device readings (the CPU profile here; NVML gauges on GPU hosts).
    readings = scrape(mesh.metrics_address("node-agent"))
    assert value(readings, "aimass_device_memory_total_bytes", kind="CPU") > 2**30
    assert value(readings, "aimass_device_memory_used_bytes", kind="CPU") > 0


def test_made_up_method_names_do_not_grow_the_gateways_metrics(mesh: LocalMesh) -> None:
    """Callers choose method names: each made-up one is answered UNIMPLEMENTED and counted under one label, so a
    flood of them cannot grow /metrics (1,500 once made it 58 times larger)."""
    with mesh.channel(key_for("metrics")) as channel:
        for i in range(300):
            name = f"/aimass.v1.NlpService/Invented{i}" if i % 2 else f"/x{i}.Y/Z"
            made_up: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(name)
            with contextlib.suppress(grpc.RpcError):
                made_up(b"", timeout=5)
    metrics = scrape(mesh.metrics_address("gateway"))
    names = {dict(labels).get("method", "") for _, labels in metrics}
    assert not any("Invented" in name or name.startswith("/x") for name in names)
    assert value(metrics, "aimass_requests_total", method="(unknown method)", code="UNIMPLEMENTED") >= 300
