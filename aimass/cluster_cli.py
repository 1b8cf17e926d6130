"""``aimass cluster``: ClusterService from the command line: devices, replicas, services' traffic and tenants' usage
as tables (``--json``: the snapshot as proto3 JSON with the proto's field names; ``--watch``: again every interval
until Ctrl-C).

It calls the gateway (``--gateway``, default 127.0.0.1:<gateway.server.port>) with the API key from ``--api-key``,
``$AIMASS_API_KEY`` or the admin key file `aimass up` wrote, as the admin commands do; ``--ca-file`` when the
gateway's front door has TLS. What it shows depends on the key (cluster.proto): a tenant's key sees its own usage.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Final

import grpc
from google.protobuf import json_format

from aimass.admin_cli import gateway_client, rpc_error_line, size, table
from aimass.client import Client
from aimass.v1 import cluster_pb2, common_pb2, scheduler_pb2

COMMAND: Final = "cluster"
# Clears a terminal between snapshots of --watch (only when printing to one).
CLEAR_SCREEN: Final = "\033[H\033[2J"


def add_commands(commands: Any) -> None:
    """Adds ``cluster`` to the ``aimass`` parser's subcommands."""
    parser = commands.add_parser(COMMAND, help="devices, replicas, traffic per service and tenants' usage, live")
    parser.add_argument("--gateway", default="", help="gateway address (default: 127.0.0.1:gateway.server.port)")
    parser.add_argument("--api-key", default=None, help="API key (default: $AIMASS_API_KEY, else the admin key file)")
    parser.add_argument("--ca-file", type=Path, default=None, help="CA of the gateway's TLS certificate (PEM)")
    parser.add_argument("--watch", action="store_true", help="print a new snapshot every --interval until Ctrl-C")
    parser.add_argument(
        "--interval", type=float, default=2.0, help="seconds between snapshots with --watch (0.5 to 60; default 2)"
    )
    parser.add_argument("--json", action="store_true", help="proto3 JSON (field names as in cluster.proto)")
    parser.add_argument("--model", default="", help="only the replicas holding this model")


def limit(value: float) -> str:
    return f"{value:g}" if value else "-"


def _state(state: int) -> str:
    return common_pb2.ServingState.Name(common_pb2.ServingState.ValueType(state)).removeprefix("SERVING_STATE_")


def _devices(nodes: Sequence[scheduler_pb2.NodeView]) -> str:
    rows = [["NODE", "DEVICE", "KIND", "NAME", "MEMORY USED", "MEMORY TOTAL", "UTIL %", "PROCESSES"]]
    for node in nodes:
        for device in node.devices:
            info = device.info
            processes = ", ".join(
                f"{p.instance_id or p.process_name or p.pid or '?'} {size(p.used_bytes)}" for p in device.processes
            )
            rows.append(
                [
                    node.node_id,
                    device.device_id,
                    common_pb2.DeviceKind.Name(info.kind).removeprefix("DEVICE_KIND_"),
                    info.name or "-",
                    size(info.memory_used_bytes),
                    size(info.memory_total_bytes),
                    f"{info.utilization_percent:.0f}",
                    processes or "-",
                ]
            )
    return table(rows) if len(rows) > 1 else "no devices reported"


def _replicas(replicas: Sequence[scheduler_pb2.ReplicaView]) -> str:
    rows = [
        ["REPLICA", "NODE", "STATE", "ADDRESS", "MODEL", "LOADED", "DEVICE", "MEMORY", "QUEUE", "IN FLIGHT", "REQ/S"]
    ]
    for replica in replicas:
        head = [replica.instance_id, replica.node_id or "-", _state(replica.state), replica.address or "-"]
        if not replica.models:
            rows.append([*head, "-", "-", "-", "-", "-", "-", "-"])
        for load in replica.models:
            name = f"{load.model.name}@{load.model.version}" if load.model.version else load.model.name
            rows.append(
                [
                    *head,
                    name,
                    "yes" if load.loaded else "no",
                    load.device_id or "-",
                    size(load.memory_bytes),
                    str(load.queue_depth + load.waiting_requests),
                    str(load.in_flight),
                    f"{load.requests_per_second:.2f}",
                ]
            )
    return table(rows) if len(rows) > 1 else "no replicas reported"


def _services(services: Sequence[cluster_pb2.ServiceTraffic]) -> str:
    rows = [["SERVICE", "REQ/S", "ERR/S", "P50 MS", "P99 MS", "IN FLIGHT", "REPLICAS"]]
    rows += [
        [
            s.service,
            f"{s.requests_per_second:.2f}",
            f"{s.errors_per_second:.2f}",
            f"{s.p50_latency_ms:.1f}",
            f"{s.p99_latency_ms:.1f}",
            str(s.in_flight),
            str(s.healthy_replicas),
        ]
        for s in services
    ]
    return table(rows)


def _tenants(tenants: Sequence[cluster_pb2.TenantQuotaUsage]) -> str:
    rows = [
        [
            "TENANT",
            "REQ/S",
            "RPS LIMIT",
            "IN FLIGHT",
            "CONCURRENCY",
            "LLM TOKENS/MIN",
            "LIMIT/MIN",
            "LLM TOKENS TODAY",
            "LIMIT/DAY",
        ]
    ]
    rows += [
        [
            t.tenant_id,
            f"{t.requests_per_second:.2f}",
            limit(t.limits.requests_per_second),
            str(t.in_flight),
            limit(t.limits.max_concurrent),
            str(t.llm_tokens_last_minute),
            limit(t.limits.llm_tokens_per_minute),
            str(t.llm_tokens_today),
            limit(t.limits.llm_tokens_per_day),
        ]
        for t in tenants
    ]
    return table(rows) if tenants else "no tenants"


def render(cluster: cluster_pb2.ClusterStatus) -> str:
    """The snapshot as the four tables, under a line saying when and from which view."""
    at = datetime.datetime.fromtimestamp(cluster.generated_unix_ms / 1000, datetime.UTC).strftime("%H:%M:%SZ")
    age = (cluster.generated_unix_ms - cluster.view_generated_unix_ms) / 1000 if cluster.view_generated_unix_ms else 0
    head = f"cluster at {at}: scheduler view v{cluster.view_version} ({age:.1f} s old), {cluster.gateways} gateway(s)"
    if cluster.stale:
        head += "\nSTALE: the gateway is not receiving the scheduler's view; devices, replicas, tokens as last seen"
    window = f"last {cluster.traffic_window_seconds:.0f} s"
    return "\n\n".join(
        [
            head,
            f"DEVICES\n{_devices(cluster.nodes)}",
            f"REPLICAS\n{_replicas(cluster.replicas)}",
            f"SERVICES ({window}, at this gateway)\n{_services(cluster.services)}",
            f"TENANTS ({window}, at this gateway; LLM tokens mesh-wide)\n{_tenants(cluster.tenants)}",
        ]
    )


def _snapshots(client: Client, args: argparse.Namespace) -> Iterator[cluster_pb2.ClusterStatus]:
    if not args.watch:
        yield client.cluster.get_cluster(model=args.model, timeout_s=30).cluster
        return
    interval_ms = round(args.interval * 1000)
    for response in client.cluster.watch_cluster(model=args.model, interval_ms=interval_ms):
        yield response.cluster


def _shown(cluster: cluster_pb2.ClusterStatus, args: argparse.Namespace) -> str:
    if args.json:
        # One object per line with --watch (a stream of JSON lines), indented otherwise.
        return json_format.MessageToJson(cluster, preserving_proto_field_name=True, indent=None if args.watch else 2)
    return render(cluster)


def run(args: argparse.Namespace) -> int:
    """Prints the snapshot (or each, with --watch); errors print one line and exit 1, Ctrl-C exits 0."""
    clear = args.watch and not args.json and sys.stdout.isatty()
    try:
        # No default deadline: --watch runs until Ctrl-C.
        with gateway_client(args, timeout_s=None) as client:
            for cluster in _snapshots(client, args):
                print((CLEAR_SCREEN if clear else "") + _shown(cluster, args), flush=True)
                if args.watch and not args.json and not clear:
                    print(flush=True)
        return 0
    except KeyboardInterrupt:
        return 0
    except grpc.RpcError as err:
        print(rpc_error_line(err), file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
