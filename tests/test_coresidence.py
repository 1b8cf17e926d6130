"""What an idle mesh sends its scheduler, and what the scheduler pushes on: unchanged load reports are skipped
(with a keep-alive), reports that change nothing make no new view version, device readings' jitter is no change,
and the thread default is each process's share of the cores.

The reporter runs against the real SchedulerService on a real mesh-TLS server; the idle-CPU goal itself is measured
by benchmarks/coresidence.py.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Sequence

import grpc
import pytest

from aimass.runtime.config import model_threads
from aimass.runtime.discovery import Instance
from aimass.runtime.load_report import KEEPALIVE_INTERVALS, LoadReporter
from aimass.runtime.server import mesh_listener
from aimass.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc
from scheduler.app import SCHEDULER_POLICY
from scheduler.service import SchedulerServicer, SchedulerState, readings_changed
from tests.security import credentials

GIB = 1 << 30


class StaticLoad:
    """A replica's load that changes only when the test says so."""

    def __init__(self) -> None:
        self.in_flight = 0

    def model_loads(self, window_s: float) -> Sequence[scheduler_pb2.ModelLoad]:
        return [
            scheduler_pb2.ModelLoad(
                model=common_pb2.ModelRef(name="m", version="1"),
                device_id="cpu",
                loaded=True,
                in_flight=self.in_flight,
                last_used_unix_ms=int(time.time() * 1000),  # moves on its own: not a change worth a report
            )
        ]

    def tenant_tokens(self) -> Sequence[scheduler_pb2.TenantTokens]:
        return []


@pytest.fixture
async def scheduler() -> AsyncIterator[tuple[SchedulerState, str]]:
    """The real SchedulerService, asking for reports every 50 ms, behind the scheduler's mesh listener."""
    state = SchedulerState(report_interval_s=0.05)
    listener = mesh_listener(credentials("scheduler"), SCHEDULER_POLICY)
    assert listener.credentials is not None
    server = grpc.aio.server(interceptors=listener.interceptors)
    scheduler_pb2_grpc.add_SchedulerServiceServicer_to_server(SchedulerServicer(state), server)
    port = server.add_secure_port("127.0.0.1:0", listener.credentials)
    await server.start()
    yield state, f"127.0.0.1:{port}"
    await server.stop(0)


async def until(predicate: object, timeout_s: float = 10.0) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


async def test_an_idle_replica_skips_unchanged_reports_and_the_view_stays_put(
    scheduler: tuple[SchedulerState, str],
) -> None:
    state, address = scheduler
    load = StaticLoad()
    reporter = LoadReporter(
        load,
        scheduler_address=address,
        credentials=credentials("nlp"),
        instance_id="nlp-1",
        node_id="n",
        interval_s=0.05,
    )
    await reporter.start()
    try:
        await until(lambda: reporter.reports_sent >= 1 and reporter.interval_s == pytest.approx(0.05))
        sent, version = reporter.reports_sent, state.version
        # Fewer intervals than the keep-alive's: nothing changed, so nothing is sent and no view is made.
        await asyncio.sleep(0.05 * (KEEPALIVE_INTERVALS // 2))
        assert reporter.reports_sent == sent
        assert state.version == version

        load.in_flight = 3  # a change goes out at the next interval and makes a new view
        await until(lambda: state.loads["nlp-1"].models[0].in_flight == 3)
        assert state.version > version

        # Unchanged again: the keep-alive still arrives, and changes nothing in the view.
        sent, version = reporter.reports_sent, state.version
        await until(lambda: reporter.reports_sent > sent)
        assert state.version == version
    finally:
        await reporter.stop()
    assert state.loads["nlp-1"].state == common_pb2.SERVING_STATE_DRAINING  # stop() always reports


def cpu_device(used_gib: float, utilization: float) -> scheduler_pb2.NodeDevice:
    return scheduler_pb2.NodeDevice(
        device_id="n/cpu",
        info=common_pb2.DeviceInfo(
            kind=common_pb2.DEVICE_KIND_CPU,
            name="cpu",
            memory_total_bytes=64 * GIB,
            memory_used_bytes=int(used_gib * GIB),
            utilization_percent=utilization,
        ),
    )


def test_device_readings_change_the_view_by_steps_not_by_jitter() -> None:
    basis = [cpu_device(10, 3.0)]
    assert not readings_changed(basis, [cpu_device(10.1, 6.5)])  # jitter of an idle host
    assert readings_changed(basis, [cpu_device(10, 9.0)])  # utilisation moved 6 points
    assert readings_changed(basis, [cpu_device(11, 3.0)])  # 1 GiB of 64 is more than 1 %
    assert readings_changed(basis, [cpu_device(10, 3.0), cpu_device(10, 3.0)])  # another device

    state = SchedulerState(report_interval_s=1.0)
    report = scheduler_pb2.ReportNodeRequest(node_id="n", host="h", devices=basis)
    assert state.record_node(report)
    # Drifts add up from the readings the view last took: many small steps make a change eventually.
    for used in (10.2, 10.4, 10.6):
        assert not state.record_node(
            scheduler_pb2.ReportNodeRequest(node_id="n", host="h", devices=[cpu_device(used, 3)])
        )
    assert state.record_node(scheduler_pb2.ReportNodeRequest(node_id="n", host="h", devices=[cpu_device(10.8, 3)]))
    assert state.nodes["n"].devices[0].info.memory_used_bytes == int(10.8 * GIB)


def test_a_registered_replicas_last_report_outlives_the_silence_by_the_keepalive() -> None:
    state = SchedulerState(report_interval_s=1.0, silent_intervals=3)
    for instance_id in ("registered", "unregistered"):
        state.record_load(scheduler_pb2.ReportLoadRequest(instance_id=instance_id, node_id="n"))
    state.set_instances([Instance("registered", "nlp", ("aimass.v1.NlpService",), "127.0.0.1:1")])
    now = int(time.time() * 1000)
    state.expire(now + 4000)
    assert set(state.loads) == {"registered"}
    state.expire(now + 4000 + KEEPALIVE_INTERVALS * 1000)
    assert state.loads == {}


def test_model_threads_default_to_half_of_this_processs_cores() -> None:
    cores = len(os.sched_getaffinity(0))
    assert model_threads(0) == max(1, cores // 2)
    assert model_threads(3) == 3
