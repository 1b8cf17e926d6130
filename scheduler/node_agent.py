"""The node agent: one process per machine that reads the machine's devices (NVML, the CPU profile or a simulated
fleet) and reports them to the scheduler (SchedulerService.ReportNode) at the interval the scheduler asks for.

A scheduler that is down only delays reports (logged once); the agent keeps trying and never exits over it.
Run it as ``python -m scheduler.node_agent --scheduler HOST:PORT``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import socket
import time
from collections.abc import Sequence
from pathlib import Path

import prometheus_client

from aimass.runtime.config import load_settings
from aimass.runtime.identity import ROLE_NODE_AGENT, MeshCredentials, process_credentials
from aimass.runtime.logs import configure_logging
from aimass.runtime.reporting import PeriodicReporter
from aimass.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc
from scheduler.devices import DeviceReader, NvmlUnavailable, make_reader

log = logging.getLogger(__name__)

_DEVICE = ["node", "device", "kind"]
DEVICE_MEMORY_USED = prometheus_client.Gauge("aimass_device_memory_used_bytes", "Memory in use on a device.", _DEVICE)
DEVICE_MEMORY_TOTAL = prometheus_client.Gauge("aimass_device_memory_total_bytes", "A device's memory.", _DEVICE)
DEVICE_UTILIZATION = prometheus_client.Gauge(
    "aimass_device_utilization_ratio", "Busy fraction of the device (NVML utilisation; CPU load on the CPU).", _DEVICE
)
DEVICE_TEMPERATURE = prometheus_client.Gauge("aimass_device_temperature_celsius", "GPU temperature (NVML).", _DEVICE)
DEVICE_POWER = prometheus_client.Gauge("aimass_device_power_watts", "GPU power draw (NVML).", _DEVICE)


def export_readings(node_id: str, devices: Sequence[scheduler_pb2.NodeDevice]) -> None:
    """The latest readings as Prometheus gauges (the scheduler gets them as reports; people see them here)."""
    for device in devices:
        labels = (node_id, device.device_id, common_pb2.DeviceKind.Name(device.info.kind).removeprefix("DEVICE_KIND_"))
        info = device.info
        DEVICE_MEMORY_USED.labels(*labels).set(info.memory_used_bytes)
        DEVICE_MEMORY_TOTAL.labels(*labels).set(info.memory_total_bytes)
        DEVICE_UTILIZATION.labels(*labels).set(info.utilization_percent / 100)
        if info.kind == common_pb2.DEVICE_KIND_GPU:
            DEVICE_TEMPERATURE.labels(*labels).set(info.temperature_celsius)
            DEVICE_POWER.labels(*labels).set(info.power_watts)


class NodeAgent(PeriodicReporter):
    """Reports ``reader``'s devices to the scheduler until stopped. The reader stays open: its creator closes it."""

    def __init__(
        self,
        reader: DeviceReader,
        scheduler_address: str,
        node_id: str,
        host: str = "127.0.0.1",
        interval_s: float = 1.0,
        *,
        credentials: MeshCredentials | None,
    ) -> None:
        super().__init__(scheduler_address, interval_s, what=f"node agent {node_id}", credentials=credentials)
        self.reader = reader
        self.node_id = node_id
        self.host = host

    async def _send(
        self, stub: scheduler_pb2_grpc.SchedulerServiceAsyncStub, timeout_s: float, *, force: bool
    ) -> int | None:
        # NVML calls block (tens of ms per GPU), so they stay off the event loop.
        devices = await asyncio.to_thread(self.reader.read)
        export_readings(self.node_id, devices)
        request = scheduler_pb2.ReportNodeRequest(
            node_id=self.node_id,
            host=self.host,
            devices=devices,
            source=self.reader.source,
            observed_unix_ms=int(time.time() * 1000),
        )
        response = await stub.ReportNode(request, timeout=timeout_s)
        return response.report_interval_ms


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def build_parser(
    default_scheduler: str, default_interval_s: float, default_metrics_port: int = 0, default_node_id: str = ""
) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m scheduler.node_agent", description="Report this machine's devices to the aimass scheduler."
    )
    parser.add_argument(
        "--scheduler",
        metavar="HOST:PORT",
        default=default_scheduler,
        help="scheduler address (default: AIMASS_SCHEDULER__ADDRESS)",
    )
    parser.add_argument(
        "--node-id",
        default=default_node_id or socket.gethostname(),
        help="this node's id (default: AIMASS_SCHEDULER__NODE_ID, else the hostname)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address this node's replicas listen on")
    parser.add_argument(
        "--reader",
        choices=["auto", "nvml", "cpu", "simulated"],
        default="auto",
        help="where readings come from; auto is NVML where a driver is present, else the CPU profile",
    )
    parser.add_argument("--simulated-file", type=Path, metavar="PATH", help="fleet file (TOML or JSON) for simulated")
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=default_metrics_port,
        help="serve Prometheus metrics (device readings) on this port; 0 = off "
        "(default: AIMASS_SCHEDULER__NODE_AGENT_METRICS_PORT)",
    )
    parser.add_argument(
        "--interval-s",
        type=_positive_float,
        default=default_interval_s,
        help="first report interval; the scheduler's answers set the next ones",
    )
    return parser


async def run_until_signalled(agent: NodeAgent) -> None:
    """Reports until SIGTERM or SIGINT."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await agent.start()
    log.info(
        "node %s reporting %s readings to %s",
        agent.node_id,
        scheduler_pb2.ReadingSource.Name(agent.reader.source),
        agent.scheduler_address,
    )
    try:
        await stop.wait()
    finally:
        await agent.stop()
    log.info("node agent stopped")


def main(argv: Sequence[str] | None = None) -> None:
    settings = load_settings()
    parser = build_parser(
        settings.scheduler.address,
        settings.scheduler.report_interval_s,
        settings.scheduler.node_agent_metrics_port,
        settings.scheduler.node_id,
    )
    args = parser.parse_args(argv)
    if not args.scheduler:
        parser.error("--scheduler HOST:PORT is required (or set AIMASS_SCHEDULER__ADDRESS)")
    if args.reader == "simulated" and args.simulated_file is None:
        parser.error("--reader simulated needs --simulated-file PATH")
    configure_logging(settings.log_level, "node-agent")
    try:
        reader = make_reader(args.reader, args.node_id, args.simulated_file)
    except (NvmlUnavailable, ValueError) as err:
        raise SystemExit(f"node agent: {err}") from err
    if args.metrics_port:
        prometheus_client.start_http_server(args.metrics_port, addr=args.host)
        log.info("node agent metrics at http://%s:%d/metrics", args.host, args.metrics_port)
    try:
        credentials = process_credentials(settings, ROLE_NODE_AGENT)
        agent = NodeAgent(reader, args.scheduler, args.node_id, args.host, args.interval_s, credentials=credentials)
        asyncio.run(run_until_signalled(agent))
    finally:
        reader.close()


if __name__ == "__main__":
    main()
