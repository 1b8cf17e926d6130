"""Gateway workers: the front door as several processes sharing its ports, so it scales with cores.

One gateway process forwards on one core (grpc.aio runs a call's Python on one event loop). With
``gateway.workers`` N > 1 (0: one per available core, at most ``MAX_AUTO_WORKERS``), ``python -m gateway`` (the
"gateway" process of `aimass up`, or a container's command) becomes a small parent that starts N worker gateways
and serves none itself:

- **Ports.** The parent claims the public port and the adapter port first: it binds each *without* SO_REUSEPORT, so
  a port something else holds (another `aimass up`, any server) fails here with "address in use" and the gateway
  exits saying so; then it turns SO_REUSEPORT on for its bound socket, which never listens (so the kernel hands it
  no connection). Its workers bind the same ports with SO_REUSEPORT (aimass.runtime.server ``reuse_port``) and the
  kernel spreads new connections over their listeners. Every other aimass server binds without SO_REUSEPORT and
  so still gets "address in use" there, and the ports stay claimed while a worker restarts. Port 0 works: the
  parent's claim picks the port and tells the workers.
- **Workers** are ``python -m gateway`` again with ``AIMASS_GATEWAY_WORKER`` set (so they serve instead of
  forking), under aimass.supervisor's restart policy: one that dies is restarted with backoff while the others
  keep serving; their log lines say ``gateway-<i>``. Should the parent die, the kernel sends its workers SIGTERM
  (PDEATHSIG) and `aimass up` restarts the whole gateway (its claim fails "in use" until the old workers have
  drained and let go of the ports; `aimass up` retries with backoff). Starting workers from the gateway process
  rather than as N entries of `aimass up`'s table keeps the port claim, the metrics endpoint and the drain in one
  place, and a container running ``python -m gateway`` gets workers too.
- **Drain.** SIGTERM/SIGINT to the parent sends SIGTERM to every worker at once; each drains as a lone gateway
  does (health NOT_SERVING, deregister, in-flight calls finish within drain_grace_s), and the parent exits once
  all have.
- **Metrics.** The workers write their metrics into a directory of the parent's (prometheus_client's multiprocess
  mode); the parent serves ``gateway.server.metrics_port`` and its /metrics adds them up over the workers, so one
  endpoint still shows the whole gateway (in-flight gauges summed over live workers;
  ``aimass_gateway_worker_calls_total{worker}`` shows how the kernel spread the calls).

Each worker is otherwise a whole gateway: it registers with the registry as its own instance (the instance id
carries its pid, so the scheduler sees N gateways at one address, not a conflict), watches the routing view under
its own subscriber id and holds its own replica channels, key cache, poison table and admission limits. What must
hold for the gateway as a whole are tenants' quotas: each worker enforces 1/N of a tenant's rate and concurrency
(aimass.tenancy.quotas divides by the gateways registered), so a tenant never gets more than its limit, with no
per-call coordination between workers; one whose calls all ride one connection (which stays on one worker) gets
1/N of it. LLM token quotas come from the scheduler's view, which every worker reads. Per worker by design:
server.max_inflight and max_streams (each worker has its own core and memory), the poison table (a poison request
may cost poison_max_crashes replicas per worker before all refuse it) and ClusterService's traffic table (the
answering worker's calls).
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import socket
import tempfile
from typing import Final

# The parent never sets PROMETHEUS_MULTIPROC_DIR for itself: its own metrics stay in memory, its workers' in files.
from prometheus_client import CollectorRegistry, multiprocess, start_http_server

from aimass.runtime.config import Settings, load_settings
from aimass.runtime.logs import configure_logging
from aimass.supervisor import ProcessSpec, Supervisor

log = logging.getLogger("gateway.workers")

# Set (to the worker's index) in the environment of the parent's workers: serve, do not fork again.
WORKER_ENV: Final = "AIMASS_GATEWAY_WORKER"
# prometheus_client reads it at import: every metric then lives in files there, one per process.
METRICS_DIR_ENV: Final = "PROMETHEUS_MULTIPROC_DIR"
# With workers = 0: past a few workers the replicas, not the front door, bound throughput, and each worker costs
# its memory, its channels to every replica and its view subscription.
MAX_AUTO_WORKERS: Final = 4
# On top of a worker's own drain (drain_delay_s + drain_grace_s) before it is killed.
STOP_MARGIN_S: Final = 5.0


class PortTaken(RuntimeError):
    pass


def worker_count(workers: int) -> int:
    """``gateway.workers`` as processes: 0 is one per core this process may run on, at most MAX_AUTO_WORKERS."""
    if workers:
        return workers
    # The cores this process may use (a container's CPU set), where the platform says.
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(MAX_AUTO_WORKERS, cores))


def worker_index() -> int | None:
    """This process's worker index when a gateway parent started it, else None."""
    value = os.environ.get(WORKER_ENV, "")
    return int(value) if value.isdigit() else None


def claim_port(host: str, port: int, what: str) -> socket.socket:
    """A bound, never listening socket holding ``host:port`` for this gateway's workers (see the module docstring);
    PortTaken when something holds it already."""
    bind_host = host.strip("[]") or "0.0.0.0"
    family, kind, proto, _, address = socket.getaddrinfo(
        bind_host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    claim = socket.socket(family, kind, proto)
    try:
        # Exclusive first: fails whoever holds the port, with or without SO_REUSEPORT.
        claim.bind(address)
    except OSError as err:
        claim.close()
        raise PortTaken(
            f"the gateway's {what} {host}:{port} is already in use ({err.strerror}); is another gateway or "
            "`aimass up` running? (see `aimass status`)"
        ) from err
    # Only now may others bind it: those that ask for SO_REUSEPORT too, as our workers do.
    claim.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    return claim


def metrics_registry(directory: str) -> CollectorRegistry:
    """A registry whose collection adds up every worker's metric files in ``directory``."""
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=directory)  # type: ignore[no-untyped-call]
    return registry


async def supervise(settings: Settings, count: int) -> None:
    config = settings.gateway
    host = config.server.host
    claims = [claim_port(host, config.server.port, "port")]
    env = {"AIMASS_GATEWAY__SERVER__PORT": str(claims[0].getsockname()[1])}
    # The adapter listener exists with mesh TLS on (gateway/app.py).
    if settings.mesh.tls == "on":
        claims.append(claim_port(host, config.adapter_port, "adapter port"))
        env["AIMASS_GATEWAY__ADAPTER_PORT"] = str(claims[1].getsockname()[1])
    metrics_dir = tempfile.mkdtemp(prefix="aimass-gateway-metrics-")
    env |= {"AIMASS_GATEWAY__SERVER__METRICS_PORT": "0", METRICS_DIR_ENV: metrics_dir}

    def worker_exited(pid: int) -> None:
        # Its in-flight gauges no longer count; its counters stay in the sums.
        multiprocess.mark_process_dead(pid, metrics_dir)  # type: ignore[no-untyped-call]

    supervisor = Supervisor(
        [ProcessSpec(f"gateway-{i}", "gateway", {**env, WORKER_ENV: str(i)}) for i in range(count)],
        grace_s=config.server.drain_delay_s + config.server.drain_grace_s + STOP_MARGIN_S,
        together=True,
        on_exit=worker_exited,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    metrics_server = None
    try:
        if config.server.metrics_port:
            metrics_server, _ = start_http_server(
                config.server.metrics_port,
                addr=host,
                registry=metrics_registry(metrics_dir),
            )
            log.info("gateway metrics (all workers) at http://%s:%d/metrics", host, config.server.metrics_port)
        ports = ", ".join(str(claim.getsockname()[1]) for claim in claims)
        log.info("gateway: %d workers sharing %s port(s) %s", count, host, ports)
        supervisor.start()
        await stop.wait()
        log.info("gateway: stopping its %d workers (each drains)", count)
        await supervisor.stop()
    finally:
        if metrics_server is not None:
            metrics_server.shutdown()
        for claim in claims:
            claim.close()
        shutil.rmtree(metrics_dir, ignore_errors=True)
    log.info("gateway stopped")


def main() -> None:
    """``python -m gateway``: one gateway, a worker of a parent's, or the parent of ``gateway.workers`` workers."""
    settings = load_settings()
    index = worker_index()
    count = worker_count(settings.gateway.workers)
    if index is not None or count == 1:
        # Imported here: the parent needs none of the gateway's own modules.
        from gateway.app import main as serve

        serve(worker=index)
        return
    configure_logging(settings.log_level, "gateway")
    try:
        asyncio.run(supervise(settings, count))
    except PortTaken as err:
        log.error("gateway cannot start: %s", err)
        raise SystemExit(2) from err
