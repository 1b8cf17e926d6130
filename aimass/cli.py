"""The ``aimass`` command: ``aimass up`` starts the mesh, ``aimass status`` shows what runs where; keys, tenants,
the audit log and certificates are managed by the commands of aimass.admin_cli, a tenant's own models (datasets,
training jobs, versions, deployment, export) by those of aimass.lifecycle_cli."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import signal
import socket
import sys
import time
import urllib.request
from collections.abc import Sequence
from typing import Final

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from aimass import admin_cli, autoscale, cluster_cli, lifecycle_cli, xds_cli
from aimass.bootstrap import ensure_certificates, operator_credentials, prepare_store
from aimass.runtime.config import Settings, load_settings
from aimass.runtime.discovery import CONTROL_PLANE_KINDS, Instance, make_registry
from aimass.runtime.identity import ROLE_GATEWAY, ROLE_NODE_AGENT, ROLE_SCHEDULER, MeshCredentials
from aimass.runtime.logs import configure_logging
from aimass.supervisor import ProcessSpec, Supervisor

log = logging.getLogger("aimass")

# kind → the module that runs one replica of it; each kind has a `<kind>` section in the config.
SERVICE_MODULES = {
    "nlp": "services.nlp",
    "vision": "services.vision",
    "speech": "services.speech",
    "llm": "services.llm",
}
# kind → the module of a mesh process that works for the control plane rather than serving clients (the scheduler
# runs training jobs on trainers); `aimass up` does not start these per kind, and the gateway forwards nothing to them.
WORKER_MODULES = {
    "trainer": "services.trainer",
}
# Every kind `aimass up` starts a number of (--<kind>-replicas).
PROCESS_MODULES = {**SERVICE_MODULES, **WORKER_MODULES}


# The OpenAI-compatible REST front door (gateway/rest): a client of the gateway (not in the registry) that calls the
# gateway's adapter listener with a "rest" mesh certificate; `aimass up` starts it last and waits for its /healthz.
REST_PROCESS = "rest"
REST_MODULE = "gateway.rest"
# The web console (gateway/console): like the REST front door, a client of the gateway's adapter listener with its
# own "console" certificate; started last, after the REST front door, and awaited on its /healthz.
CONSOLE_PROCESS = "console"
CONSOLE_MODULE = "gateway.console"

# The gateway's adapter listener (gateway.adapter_port) unless config or --gateway-adapter-port says otherwise.
DEFAULT_ADAPTER_PORT = 50052
# Prometheus endpoints of `aimass up`: the gateway here, then the scheduler, node agent, replicas and REST front door.
DEFAULT_METRICS_PORT = 9400


def replica_counts(args: argparse.Namespace) -> dict[str, int]:
    return {kind: getattr(args, f"{kind}_replicas") for kind in PROCESS_MODULES}


# The mesh identity (certificate) each process runs as: its process name; its role is its kind.
IDENTITY_ENV = "AIMASS_MESH__IDENTITY"


def role_of(spec: ProcessSpec) -> str:
    """A process's mesh role: gateway, scheduler, node-agent, or a replica's kind (nlp-0 → nlp)."""
    if spec.name in (ROLE_GATEWAY, ROLE_SCHEDULER, ROLE_NODE_AGENT):
        return spec.name
    return spec.name.rsplit("-", 1)[0]


def process_specs(args: argparse.Namespace) -> list[ProcessSpec]:
    settings = load_settings()
    gateway_port = args.gateway_port or settings.gateway.server.port
    scheduler_port = args.scheduler_port or settings.scheduler.server.port
    scheduler = f"{settings.scheduler.server.host}:{scheduler_port}"
    # Everyone finds the scheduler, which hosts the registry: replicas and gateways register there, replicas report
    # load, gateways watch the view.
    common = {"AIMASS_REGISTRY__ADDRESS": scheduler, "AIMASS_SCHEDULER__ADDRESS": scheduler}
    gateway_env = {**common, "AIMASS_GATEWAY__SERVER__PORT": str(gateway_port)}
    # With mesh TLS on, the REST front door calls the gateway's adapter listener (mTLS); off, its public port.
    rest_gateway = f"127.0.0.1:{gateway_port}"
    if settings.mesh.tls == "on":
        adapter_port = args.gateway_adapter_port or settings.gateway.adapter_port or DEFAULT_ADAPTER_PORT
        gateway_env["AIMASS_GATEWAY__ADAPTER_PORT"] = str(adapter_port)
        rest_gateway = f"127.0.0.1:{adapter_port}"
    specs = [
        ProcessSpec("gateway", "gateway", gateway_env),
        ProcessSpec("scheduler", "scheduler", {**common, "AIMASS_SCHEDULER__SERVER__PORT": str(scheduler_port)}),
        # One node agent per host: NVML readings where a GPU driver is present, the CPU profile otherwise.
        ProcessSpec("node-agent", "scheduler.node_agent", common),
    ]
    metrics_keys = {
        "gateway": "AIMASS_GATEWAY__SERVER__METRICS_PORT",
        "scheduler": "AIMASS_SCHEDULER__SERVER__METRICS_PORT",
        "node-agent": "AIMASS_SCHEDULER__NODE_AGENT_METRICS_PORT",
    }
    for kind, replicas in replica_counts(args).items():
        first_port = getattr(args, f"{kind}_port") or getattr(settings, kind).server.port
        for index in range(replicas):
            # Replicas of a kind take consecutive ports; 0 lets each pick a free one (the registry tells).
            port = first_port + index if first_port else 0
            env = {**common, f"AIMASS_{kind.upper()}__SERVER__PORT": str(port)}
            specs.append(ProcessSpec(f"{kind}-{index}", PROCESS_MODULES[kind], env))
            metrics_keys[f"{kind}-{index}"] = f"AIMASS_{kind.upper()}__SERVER__METRICS_PORT"
    if settings.rest.enabled:
        rest_port = args.rest_port or settings.rest.port
        rest_env = {"AIMASS_REST__PORT": str(rest_port), "AIMASS_REST__GATEWAY": rest_gateway}
        specs.append(ProcessSpec(REST_PROCESS, REST_MODULE, rest_env))
        metrics_keys[REST_PROCESS] = "AIMASS_REST__METRICS_PORT"
    if settings.console.enabled:
        console_env = {
            "AIMASS_CONSOLE__PORT": str(args.console_port or settings.console.port),
            "AIMASS_CONSOLE__GATEWAY": settings.console.gateway or rest_gateway,
            # For the pages' code samples: where users dial.
            "AIMASS_CONSOLE__PUBLIC_GATEWAY": settings.console.public_gateway or f"127.0.0.1:{gateway_port}",
            "AIMASS_CONSOLE__PUBLIC_REST": settings.console.public_rest
            or f"http://127.0.0.1:{args.rest_port or settings.rest.port}/v1",
        }
        specs.append(ProcessSpec(CONSOLE_PROCESS, CONSOLE_MODULE, console_env))
    # Every process serves Prometheus metrics on its own port (--metrics-port, then the next ones in order) and runs
    # as its own mesh identity.
    return [
        dataclasses.replace(
            spec,
            env={
                **spec.env,
                metrics_keys[spec.name]: str(args.metrics_port + offset if args.metrics_port else 0),
                IDENTITY_ENV: spec.name,
            }
            if spec.name in metrics_keys
            else dict(spec.env),
        )
        for offset, spec in enumerate(specs)
    ]


def metrics_endpoints(specs: Sequence[ProcessSpec]) -> list[str]:
    return [
        f"{spec.name} http://127.0.0.1:{value}/metrics"
        for spec in specs
        for key, value in spec.env.items()
        if key.endswith("METRICS_PORT") and value != "0"
    ]


async def wait_until_ready(
    registry_address: str, credentials: MeshCredentials | None, expected: dict[str, int], timeout_s: float
) -> list[Instance]:
    """Poll the registry until every expected kind has its replicas SERVING, reporting progress."""
    registry = make_registry(load_settings().registry, credentials=credentials, address=registry_address)
    deadline = time.monotonic() + timeout_s
    last_report = ""
    try:
        while True:
            try:
                instances = await registry.list_instances()
            except (grpc.aio.AioRpcError, ConnectionError):  # the gateway (or Consul) is not answering yet
                instances = []
            serving = [i for i in instances if i.serving]
            counts = {kind: sum(1 for i in serving if i.kind == kind) for kind in expected}
            report = ", ".join(f"{kind} {counts[kind]}/{want}" for kind, want in expected.items())
            if all(counts[kind] >= want for kind, want in expected.items()):
                return serving
            if report != last_report:
                log.info("waiting for replicas (models loading): %s ready", report)
                last_report = report
            if time.monotonic() > deadline:
                raise TimeoutError(f"mesh not ready after {timeout_s:.0f}s: {report}")
            await asyncio.sleep(0.5)
    finally:
        await registry.close()


async def wait_for_http(base_url: str, stop: asyncio.Event, timeout_s: float) -> bool:
    """Until an HTTP front door's /healthz (the REST one's, the console's) answers 200 (it does once the gateway
    behind it serves)."""
    health = base_url.removesuffix("/v1") + "/healthz"

    def answers() -> bool:
        try:
            with urllib.request.urlopen(health, timeout=2) as reply:
                return bool(reply.status == 200)
        except OSError:
            return False

    deadline = time.monotonic() + timeout_s
    while not stop.is_set() and time.monotonic() < deadline:
        if await asyncio.to_thread(answers):
            return True
        await asyncio.sleep(0.3)
    return False


def format_instances(instances: Sequence[Instance]) -> str:
    rows = [("KIND", "ADDRESS", "STATE", "PID", "SERVICES", "MODELS")]
    for i in sorted(instances, key=lambda i: (i.kind not in CONTROL_PLANE_KINDS, i.kind, i.address)):
        services = ",".join(s.removeprefix("aimass.v1.") for s in i.services)
        rows.append((i.kind, i.address, i.state_name, str(i.pid), services, ",".join(i.models) or "-"))
    return admin_cli.table(rows)


# The environment keys that name a port a process listens on.
PORT_KEYS: Final = ("__SERVER__PORT", "__ADAPTER_PORT", "METRICS_PORT", "AIMASS_REST__PORT", "AIMASS_CONSOLE__PORT")


def busy_ports(specs: Sequence[ProcessSpec]) -> list[str]:
    """Ports the mesh would listen on that something else holds already (another `aimass up`, say)."""
    taken = []
    for spec in specs:
        for key, value in spec.env.items():
            if key.endswith(PORT_KEYS) and value != "0":
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
                    # As the servers bind: connections of a mesh just stopped (TIME_WAIT) do not hold the port, a
                    # listener does.
                    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    try:
                        probe.bind(("127.0.0.1", int(value)))
                    except OSError:
                        taken.append(f"{spec.name} port {value}")
    return taken


def prepare(settings: Settings, specs: Sequence[ProcessSpec]) -> tuple[MeshCredentials | None, str]:
    """The mesh's state before anything starts: certificates for every process (and this tool), the store's
    schema, the admin key. Returns this tool's credentials and a line saying where the admin key is."""
    ensure_certificates(settings, {spec.name: role_of(spec) for spec in specs})
    credentials = operator_credentials(settings)
    key_file, created = prepare_store(settings)
    if key_file is None:
        log.warning('AUTH IS OFF (auth.mode = "off"): the gateway takes calls without API keys')
        return credentials, "Auth is off: no API key needed (throwaway development only)."
    made = "created now" if created else "kept from before"
    return credentials, f"Admin key ({made}, readable only by you): {key_file}"


async def up(args: argparse.Namespace) -> int:
    scaling = args.autoscale or load_settings().autoscale.enabled
    unknown = autoscale.unknown_kinds(load_settings().autoscale, SERVICE_MODULES) if scaling else []
    if unknown:
        print(
            f"cannot autoscale: autoscale.services names {', '.join(unknown)}, which are no services; known: "
            f"{', '.join(SERVICE_MODULES)}",
            file=sys.stderr,
        )
        return 1
    specs = process_specs(args)
    taken = busy_ports(specs)
    if taken:
        print(
            f"cannot start: {', '.join(taken)} already in use (is another `aimass up` running? see `aimass status`); "
            "choose others with --gateway-port / --rest-port / --console-port / --<kind>-port",
            file=sys.stderr,
        )
        return 1
    settings = load_settings()
    log.info("preparing the mesh's certificates, store and admin key in %s", settings.state_dir)
    credentials, admin_key_line = await asyncio.to_thread(prepare, settings, specs)
    gateway_env = specs[0].env
    gateway = f"127.0.0.1:{gateway_env['AIMASS_GATEWAY__SERVER__PORT']}"
    registry = specs[1].env["AIMASS_REGISTRY__ADDRESS"]
    # The scheduler (with the registry) starts first and stops last: everyone registers with it and deregisters
    # from it as they drain.
    supervisor = Supervisor(sorted(specs, key=lambda spec: spec.name != ROLE_SCHEDULER))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    log.info("starting %s", ", ".join(spec.name for spec in specs))
    supervisor.start()
    scaler: autoscale.Autoscaler | None = None
    try:
        expected = {"gateway": 1, "scheduler": 1, **replica_counts(args)}
        ready = asyncio.ensure_future(wait_until_ready(registry, credentials, expected, 600))
        stopped = asyncio.ensure_future(stop.wait())
        await asyncio.wait([ready, stopped], return_when=asyncio.FIRST_COMPLETED)
        if ready.done():
            instances = ready.result()
            rest = next((spec for spec in specs if spec.name == REST_PROCESS), None)
            rest_url = f"http://127.0.0.1:{rest.env['AIMASS_REST__PORT']}/v1" if rest else ""
            if rest_url and not await wait_for_http(rest_url, stop, 120):
                log.warning("the REST front door at %s is not answering its /healthz yet", rest_url)
            console = next((spec for spec in specs if spec.name == CONSOLE_PROCESS), None)
            console_url = f"http://127.0.0.1:{console.env['AIMASS_CONSOLE__PORT']}" if console else ""
            if console_url and not await wait_for_http(console_url, stop, 120):
                log.warning("the console at %s is not answering its /healthz yet", console_url)
            print(f"\naimass is up. Gateway (the one front door): {gateway}\n", flush=True)
            if rest_url:
                print(f"OpenAI-compatible REST (same API keys): {rest_url}\n", flush=True)
            if console_url:
                print(f"Web console (sign in with an API key): {console_url}\n", flush=True)
            print(format_instances(instances), flush=True)
            print(f"\n{admin_key_line}", flush=True)
            endpoints = metrics_endpoints(specs)
            if endpoints:
                print("\nPrometheus metrics: " + ", ".join(endpoints), flush=True)
            print(
                f'\nTry: grpcurl -plaintext -H "authorization: Bearer $(cat {settings.admin_key_file})" {gateway} '
                "list    |    aimass status    |    aimass keys create --tenant NAME --scopes infer    |    "
                "Ctrl-C stops all\n",
                flush=True,
            )
            if scaling:
                # Once every replica serves: the floor is what was started, and it is all loaded.
                scaler = autoscale.for_mesh(
                    settings, supervisor=supervisor, kinds=SERVICE_MODULES, scheduler=registry, credentials=credentials
                )
                scaler.start()
                log.info("autoscaling %s", ", ".join(scaler.services))
        else:
            ready.cancel()
        await stopped
    finally:
        if scaler is not None:
            await scaler.stop()
        log.info("stopping: services drain first, then the gateway, then the scheduler")
        await supervisor.stop()
    return 0


async def status(args: argparse.Namespace) -> int:
    settings = load_settings()
    where = args.registry or settings.registry.address
    gateway = args.gateway or f"127.0.0.1:{settings.gateway.server.port}"
    try:
        credentials = operator_credentials(settings)
    except (FileNotFoundError, ValueError) as err:
        print(f"no operator certificate to read the registry with: {err}", file=sys.stderr)
        return 1
    registry = make_registry(settings.registry, credentials=credentials, address=where)
    try:
        instances = await registry.list_instances()
    except grpc.aio.AioRpcError as err:
        print(f"cannot reach the registry at {where}: {err.code().name} {err.details()}", file=sys.stderr)
        return 1
    except ConnectionError as err:
        print(f"cannot read the registry from Consul at {settings.registry.consul.address}: {err}", file=sys.stderr)
        return 1
    finally:
        await registry.close()
    print(format_instances(instances))
    async with grpc.aio.insecure_channel(gateway) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        # What clients call through the gateway: not the control plane's, nor its workers'.
        behind_gateway = [i for i in instances if i.kind not in CONTROL_PLANE_KINDS and i.kind not in WORKER_MODULES]
        services = sorted({s for i in behind_gateway for s in i.services})
        print("\nHEALTH VIA GATEWAY")
        for service in services:
            state = "UNKNOWN"
            with contextlib.suppress(grpc.aio.AioRpcError):
                reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
                state = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            print(f"{service}  {state}")
    scaling = autoscale.read_status(settings.state_dir)
    if scaling:
        print("\nAUTOSCALE")
        print(admin_cli.table(autoscale.format_status(scaling)))
    return 0


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="aimass", description="AI models as a service over one gRPC mesh")
    commands = root.add_subparsers(dest="command", required=True)
    up_cmd = commands.add_parser("up", help="start gateway and services (supervised) and print where they listen")
    up_cmd.add_argument("--gateway-port", type=int, default=0, help="default: config gateway.server.port (50051)")
    up_cmd.add_argument(
        "--gateway-adapter-port",
        type=int,
        default=0,
        help=f"the gateway's adapter listener, which the REST front door calls over mesh mTLS (default: config "
        f"gateway.adapter_port, else {DEFAULT_ADAPTER_PORT})",
    )
    up_cmd.add_argument("--scheduler-port", type=int, default=0, help="default: config scheduler.server.port (50041)")
    up_cmd.add_argument(
        "--metrics-port",
        type=int,
        default=DEFAULT_METRICS_PORT,
        help=f"first Prometheus metrics port; each process takes the next (default {DEFAULT_METRICS_PORT}; 0 = off)",
    )
    settings = load_settings()
    up_cmd.add_argument(
        "--rest-port",
        type=int,
        default=0,
        help=f"the OpenAI-compatible REST front door's port (default: config rest.port, {settings.rest.port})",
    )
    up_cmd.add_argument(
        "--console-port",
        type=int,
        default=0,
        help=f"the web console's port (default: config console.port, {settings.console.port})",
    )
    for kind in PROCESS_MODULES:
        default_port = getattr(settings, kind).server.port
        up_cmd.add_argument(
            f"--{kind}-port", type=int, default=0, help=f"first {kind} process's port (default {default_port})"
        )
        up_cmd.add_argument(
            f"--{kind}-replicas",
            type=int,
            default=1,
            help="0 leaves the service out" if kind in SERVICE_MODULES else "training jobs run there; 0: none",
        )
    up_cmd.add_argument(
        "--autoscale",
        action="store_true",
        help="grow and shrink each service's replicas with its calls in flight, from --<kind>-replicas up to "
        "autoscale.max_replicas (config autoscale.*; see docs/deployment.md)",
    )
    status_cmd = commands.add_parser("status", help="list services, replicas, models and health")
    status_cmd.add_argument(
        "--registry", default="", help="registry address, the scheduler's (default: config registry.address)"
    )
    status_cmd.add_argument("--gateway", default="", help="gateway address (default: 127.0.0.1:gateway.server.port)")
    admin_cli.add_commands(commands)
    lifecycle_cli.add_commands(commands)
    cluster_cli.add_commands(commands)
    xds_cli.add_commands(commands)
    return root


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    configure_logging(load_settings().log_level, "aimass")
    if args.command == "up":
        return asyncio.run(up(args))
    if args.command == "status":
        return asyncio.run(status(args))
    if args.command in lifecycle_cli.COMMANDS:
        return lifecycle_cli.run(args)
    if args.command == cluster_cli.COMMAND:
        return cluster_cli.run(args)
    if args.command == xds_cli.COMMAND:
        return xds_cli.run(args)
    return admin_cli.run(args)


if __name__ == "__main__":
    raise SystemExit(main())
