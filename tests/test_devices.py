"""Device readers (CPU profile, NVML absent here, simulated fleet) and the node agent reporting them to a
SchedulerService on loopback, behind the scheduler's mesh listener (mTLS and its role policy), as in a mesh."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, NoReturn

import grpc
import psutil
import pytest

from aimass.runtime.identity import MeshIdentity, peer_identity
from aimass.runtime.server import mesh_listener
from aimass.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc
from scheduler.app import SCHEDULER_POLICY
from scheduler.devices import (
    GIB,
    CpuProfileReader,
    NvmlUnavailable,
    SimulatedFleet,
    SimulatedGpu,
    cpu_model_name,
    make_reader,
)
from scheduler.node_agent import NodeAgent
from tests.security import STATE_DIR_ENV, credentials

ROOT = Path(__file__).resolve().parent.parent

FLEET_TOML = """
[[devices]]
name = "A100-40GB"
memory_gib = 40
speed = 1.0

[[devices]]
name = "T4"
memory_gib = 15.5
speed = 0.4
"""


@pytest.fixture
def fleet(tmp_path: Path) -> SimulatedFleet:
    path = tmp_path / "fleet.toml"
    path.write_text(FLEET_TOML)
    return SimulatedFleet.from_file(path, "sim-node")


# --- readers ---------------------------------------------------------------------------------------------------


def test_auto_falls_back_to_the_cpu_profile_without_nvml(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="scheduler.devices"):
        reader = make_reader("auto", "node-a")
    try:
        assert reader.source == scheduler_pb2.READING_SOURCE_CPU_PROFILE
        devices = reader.read()
    finally:
        reader.close()
    assert len(devices) == 1
    (cpu,) = devices
    assert cpu.device_id == "node-a/cpu"
    assert cpu.info.kind == common_pb2.DEVICE_KIND_CPU
    assert cpu.info.index == 0
    assert cpu.info.name
    assert cpu.info.memory_total_bytes == psutil.virtual_memory().total
    assert 0 < cpu.info.memory_used_bytes < cpu.info.memory_total_bytes
    assert 0 <= cpu.info.utilization_percent <= 100
    assert not cpu.processes
    assert [r.getMessage() for r in caplog.records if r.name == "scheduler.devices"] == [
        "NVML not available (LibraryNotFound): reporting the CPU profile"
    ]


def test_nvml_reader_fails_loudly_without_nvml() -> None:
    with pytest.raises(NvmlUnavailable, match=r"NVML not available \(LibraryNotFound\)"):
        make_reader("nvml", "node-a")


def test_cpu_reader_reports_utilisation_after_priming() -> None:
    reader = CpuProfileReader("node-a")
    end = time.monotonic() + 0.2
    while time.monotonic() < end:  # keep a core busy so the usage since priming is above zero
        pass
    (cpu,) = reader.read()
    assert 0 < cpu.info.utilization_percent <= 100


def test_cpu_model_name_reads_cpuinfo_and_falls_back(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Gold 6338\n")
    assert cpu_model_name(cpuinfo) == "Intel(R) Xeon(R) Gold 6338"
    cpuinfo.write_text("processor\t: 0\nBogoMIPS\t: 50.00\n")
    fallback = cpu_model_name(cpuinfo)
    assert fallback and "BogoMIPS" not in fallback
    assert cpu_model_name(tmp_path / "missing") == fallback


def test_simulated_fleet_from_toml(fleet: SimulatedFleet) -> None:
    assert fleet.source == scheduler_pb2.READING_SOURCE_SIMULATED
    assert [gpu.speed for gpu in fleet.devices] == [1.0, 0.4]
    devices = fleet.read()
    assert [d.device_id for d in devices] == ["sim-node/gpu:0", "sim-node/gpu:1", "sim-node/cpu"]
    a100, t4, cpu = devices
    assert (a100.info.kind, a100.info.index, a100.info.name) == (common_pb2.DEVICE_KIND_GPU, 0, "A100-40GB")
    assert (t4.info.kind, t4.info.index, t4.info.name) == (common_pb2.DEVICE_KIND_GPU, 1, "T4")
    assert a100.info.memory_total_bytes == 40 * GIB
    # Routers compare devices by compute before they have measured them; a simulated fleet reports its speeds.
    assert (a100.info.compute_tflops, t4.info.compute_tflops, cpu.info.compute_tflops) == pytest.approx((1.0, 0.4, 0))
    assert t4.info.memory_total_bytes == int(15.5 * GIB)
    assert a100.info.memory_used_bytes == t4.info.memory_used_bytes == 0
    assert a100.info.uuid != t4.info.uuid
    # Stable across instances, like a real GPU's uuid.
    assert SimulatedFleet("sim-node", fleet.devices).read()[0].info.uuid == a100.info.uuid
    assert cpu.info.kind == common_pb2.DEVICE_KIND_CPU
    assert cpu.info.memory_total_bytes == psutil.virtual_memory().total


def test_simulated_allocations_show_as_memory_and_processes(fleet: SimulatedFleet) -> None:
    fleet.allocate(0, 10 * GIB, pid=200, instance_id="nlp-1")
    fleet.allocate(0, 5 * GIB, pid=100)
    fleet.allocate(0, 1 * GIB, pid=200)
    fleet.set_utilization(0, 75.0)
    a100, t4, _ = fleet.read()
    assert a100.info.memory_used_bytes == 16 * GIB
    assert a100.info.utilization_percent == 75.0
    assert [(p.pid, p.used_bytes, p.instance_id) for p in a100.processes] == [
        (100, 5 * GIB, ""),
        (200, 11 * GIB, "nlp-1"),
    ]
    assert t4.info.memory_used_bytes == 0 and not t4.processes
    assert fleet.free_bytes(0) == 24 * GIB

    assert fleet.release(0, 200) == 11 * GIB
    assert fleet.release(0, 200) == 0
    a100 = fleet.read()[0]
    assert a100.info.memory_used_bytes == 5 * GIB
    assert [p.pid for p in a100.processes] == [100]


def test_simulated_over_allocation_names_needed_and_free(fleet: SimulatedFleet) -> None:
    fleet.allocate(1, 10 * GIB, pid=1)
    free = int(15.5 * GIB) - 10 * GIB
    with pytest.raises(ValueError) as raised:
        fleet.allocate(1, 6 * GIB, pid=2)
    message = str(raised.value)
    assert "sim-node/gpu:1" in message
    assert f"needs {6 * GIB} bytes" in message
    assert f"only {free} bytes" in message
    # Nothing changed.
    assert fleet.read()[1].info.memory_used_bytes == 10 * GIB


def test_simulated_fleet_rejects_bad_arguments(fleet: SimulatedFleet) -> None:
    with pytest.raises(ValueError, match="no simulated GPU 2"):
        fleet.allocate(2, GIB, pid=1)
    with pytest.raises(ValueError, match="> 0 bytes"):
        fleet.allocate(0, 0, pid=1)
    with pytest.raises(ValueError, match=r"0\.\.100"):
        fleet.set_utilization(0, 101)
    with pytest.raises(ValueError, match="memory_bytes must be > 0"):
        SimulatedGpu("broken", 0)


def test_simulated_fleet_from_json(tmp_path: Path) -> None:
    path = tmp_path / "fleet.json"
    path.write_text(json.dumps({"devices": [{"name": "H100", "memory_gib": 80}]}))
    fleet = SimulatedFleet.from_file(path, "n")
    assert fleet.devices == (SimulatedGpu("H100", 80 * GIB, 1.0),)
    # make_reader builds the same from the file.
    reader = make_reader("simulated", "n", path)
    assert [d.device_id for d in reader.read()] == ["n/gpu:0", "n/cpu"]


@pytest.mark.parametrize(
    ("name", "content", "problem"),
    [
        ("missing.toml", '[[devices]]\nname = "A100"\n', "devices.0.memory_gib: Field required"),
        ("negative.toml", '[[devices]]\nname = "A100"\nmemory_gib = -4\n', "devices.0.memory_gib: Input should be"),
        ("speed.json", '{"devices": [{"name": "A100", "memory_gib": 4, "speed": 0}]}', "devices.0.speed"),
        ("unknown.toml", '[[devices]]\nname = "A100"\nmemory_gib = 4\nmemory = 5\n', "devices.0.memory: Extra"),
        ("typo.json", '{"device": [{"name": "A100", "memory_gib": 4}]}', "device: Extra"),
        ("empty.toml", "devices = []\n", "devices: List should have at least 1 item"),
        ("string.json", '{"devices": [{"name": "A100", "memory_gib": "40"}]}', "devices.0.memory_gib"),
        ("broken.toml", "[[devices]\nname =", "not valid TOML"),
        ("broken.json", '{"devices": [', "not valid JSON"),
        ("fleet.yaml", "devices:\n  - name: A100\n", "not valid TOML"),
    ],
)
def test_bad_fleet_files_are_rejected(tmp_path: Path, name: str, content: str, problem: str) -> None:
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ValueError, match="simulated fleet file") as raised:
        SimulatedFleet.from_file(path, "n")
    assert problem in str(raised.value)
    if name == "fleet.yaml":
        assert "not valid JSON" in str(raised.value)


def test_missing_fleet_file_and_simulated_without_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot read it"):
        SimulatedFleet.from_file(tmp_path / "absent.toml", "n")
    with pytest.raises(ValueError, match="needs a fleet file"):
        make_reader("simulated", "n")


# --- node agent ------------------------------------------------------------------------------------------------


class ReportNodeSink(scheduler_pb2_grpc.SchedulerServiceServicer):
    """Keeps every node report with its arrival time (and who sent it) and answers the interval the test sets."""

    def __init__(self, report_interval_ms: int) -> None:
        self.report_interval_ms = report_interval_ms
        self.reports: list[tuple[float, scheduler_pb2.ReportNodeRequest]] = []
        self.callers: list[MeshIdentity | None] = []

    async def ReportNode(
        self, request: scheduler_pb2.ReportNodeRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> scheduler_pb2.ReportNodeResponse:
        self.callers.append(peer_identity(context))
        self.reports.append((time.monotonic(), request))
        return scheduler_pb2.ReportNodeResponse(report_interval_ms=self.report_interval_ms)

    async def wait_for_reports(self, count: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.reports) < count:
            assert time.monotonic() < deadline, f"{len(self.reports)} node reports within {timeout_s}s, wanted {count}"
            await asyncio.sleep(0.01)

    async def wait_for(
        self, predicate: Callable[[scheduler_pb2.ReportNodeRequest], bool], timeout_s: float
    ) -> scheduler_pb2.ReportNodeRequest:
        deadline = time.monotonic() + timeout_s
        while True:
            for _, report in self.reports:
                if predicate(report):
                    return report
            assert time.monotonic() < deadline, f"no matching node report within {timeout_s}s: {self.reports[-1:]}"
            await asyncio.sleep(0.01)

    # The rest of the scheduler's contract is not this sink's business.
    async def _unimplemented(self, context: grpc.aio.ServicerContext[Any, Any]) -> NoReturn:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "this test sink only receives node reports")

    async def ReportLoad(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await self._unimplemented(context)

    async def WatchView(
        self, request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[scheduler_pb2.WatchViewResponse]:
        await self._unimplemented(context)
        yield scheduler_pb2.WatchViewResponse()  # never reached; makes this the async generator a stream needs

    async def PlaceModel(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await self._unimplemented(context)

    async def EvictModel(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await self._unimplemented(context)

    async def GetPlacement(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await self._unimplemented(context)


@pytest.fixture
async def sink() -> AsyncIterator[tuple[ReportNodeSink, str]]:
    servicer = ReportNodeSink(report_interval_ms=50)
    # The scheduler's own listener: the session's scheduler certificate, and only node agents may report nodes.
    listener = mesh_listener(credentials("scheduler"), SCHEDULER_POLICY)
    assert listener.credentials is not None
    server = grpc.aio.server(interceptors=listener.interceptors)
    scheduler_pb2_grpc.add_SchedulerServiceServicer_to_server(servicer, server)
    port = server.add_secure_port("127.0.0.1:0", listener.credentials)
    await server.start()
    yield servicer, f"127.0.0.1:{port}"
    await server.stop(0)


async def test_node_agent_reports_the_fleet_and_adopts_the_interval(
    sink: tuple[ReportNodeSink, str], fleet: SimulatedFleet
) -> None:
    servicer, address = sink
    fleet.allocate(1, 2 * GIB, pid=4242, instance_id="vision-1")
    agent = NodeAgent(fleet, address, "sim-node", "10.0.0.7", interval_s=0.05, credentials=credentials("node-agent"))
    await agent.start()
    try:
        await servicer.wait_for_reports(2, timeout_s=3.0)
        assert servicer.callers[0] == MeshIdentity(role="node-agent", name="node-agent")
        _, first = servicer.reports[0]
        assert first.node_id == "sim-node"
        assert first.host == "10.0.0.7"
        assert first.source == scheduler_pb2.READING_SOURCE_SIMULATED
        assert abs(first.observed_unix_ms - time.time() * 1000) < 5000
        assert [d.device_id for d in first.devices] == ["sim-node/gpu:0", "sim-node/gpu:1", "sim-node/cpu"]
        assert first.devices[1].info.memory_used_bytes == 2 * GIB
        assert [(p.pid, p.instance_id) for p in first.devices[1].processes] == [(4242, "vision-1")]

        # Later readings follow the fleet (a report already in flight may still show the allocation).
        fleet.release(1, 4242)
        await servicer.wait_for(lambda report: report.devices[1].info.memory_used_bytes == 0, timeout_s=3.0)

        # The scheduler asks for 200 ms: the next report gets that answer and the ones after it come that far apart.
        servicer.report_interval_ms = 200
        answered_from = len(servicer.reports)
        await servicer.wait_for_reports(answered_from + 3, timeout_s=3.0)
        assert agent.interval_s == pytest.approx(0.2)
        arrivals = [arrived for arrived, _ in servicer.reports[answered_from : answered_from + 3]]
        gaps = [later - earlier for earlier, later in itertools.pairwise(arrivals)]
        # 0.2 s less scheduling jitter; at the old interval they were 0.05 s apart.
        assert all(gap >= 0.15 for gap in gaps), gaps

        # An answer below the floor is clamped, so a bad scheduler cannot make the agent flood it.
        servicer.report_interval_ms = 1
        await servicer.wait_for_reports(len(servicer.reports) + 2, timeout_s=3.0)
        assert agent.interval_s == pytest.approx(0.05)
    finally:
        await agent.stop()
    # A report the server got as the agent stopped may not have been counted by it.
    assert len(servicer.reports) - 1 <= agent.reports_sent <= len(servicer.reports)
    stopped_at = len(servicer.reports)
    await asyncio.sleep(0.15)
    assert len(servicer.reports) == stopped_at


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


async def test_node_agent_survives_a_scheduler_that_is_down(
    fleet: SimulatedFleet, caplog: pytest.LogCaptureFixture
) -> None:
    agent = NodeAgent(
        fleet, f"127.0.0.1:{_closed_port()}", "sim-node", interval_s=0.05, credentials=credentials("node-agent")
    )
    with caplog.at_level(logging.INFO, logger="aimass.runtime.reporting"):
        await agent.start()
        try:
            await asyncio.sleep(0.5)
            assert agent.running
            assert agent.reports_sent == 0
        finally:
            await agent.stop()
    # The reporting loop the node agent shares with replicas' load reports logs it, once.
    records = [r for r in caplog.records if r.name == "aimass.runtime.reporting"]
    assert [r.levelno for r in records] == [logging.WARNING], [r.getMessage() for r in records]
    assert "unreachable (UNAVAILABLE" in records[0].getMessage()


async def test_node_agent_process_reports_and_stops_on_sigterm(
    sink: tuple[ReportNodeSink, str], tmp_path: Path
) -> None:
    servicer, address = sink
    fleet_file = tmp_path / "fleet.toml"
    fleet_file.write_text(FLEET_TOML)
    # No settings of this session's but where its state is: the agent finds its certificate (node-agent) there.
    env = {key: value for key, value in os.environ.items() if not key.startswith("AIMASS_") or key == STATE_DIR_ENV}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "scheduler.node_agent",
        "--scheduler",
        address,
        "--node-id",
        "proc-node",
        "--reader",
        "simulated",
        "--simulated-file",
        str(fleet_file),
        "--interval-s",
        "0.05",
        cwd=ROOT,
        env=env,
        stderr=subprocess.PIPE,
    )
    try:
        await servicer.wait_for_reports(2, timeout_s=8.0)
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(process.communicate(), timeout=5.0)
    assert process.returncode == 0, stderr.decode()
    _, report = servicer.reports[0]
    assert report.node_id == "proc-node"
    assert servicer.callers[0] == MeshIdentity(role="node-agent", name="node-agent")
    assert [d.device_id for d in report.devices] == ["proc-node/gpu:0", "proc-node/gpu:1", "proc-node/cpu"]
    assert "node agent stopped" in stderr.decode()
