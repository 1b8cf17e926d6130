"""Several hosts, for real: the mesh spread over network namespaces, a replica killed under load.

Five hosts on one private switch (tests/netns.py), each its own network stack, hostname and port space; they share
only the file system:

- ``gw``: the gateway and the scheduler (hosting the registry), the control plane of a real deployment;
- ``host-a`` and ``host-b``: a node agent and one NLP replica each, listening on (and so registering) the host's own
  address, with the registry and the scheduler found at ``gw``'s address;
- ``client``: the load, sent to the gateway across the switch by this module run as a script (``python -m
  tests.test_multihost``), which reports each request's status, timing and the replica that served it
  (``x-aimass-replica``, relayed by the gateway) and writes them as JSON.

Secured as a real deployment is: every process has its own certificate from the mesh's CA (mTLS between hosts, each
process verifying the other's role, whatever address it dialled) and the client calls the gateway with the admin key
and reads the registry and the view with the operator's certificate.

The scheduler and the node agents run so the control plane crosses hosts as it does between machines: node agents
and replicas report to the scheduler at ``gw``, and its routing view (checked here) joins each replica to the node it
runs on by hostname. The gateway routes round robin, though, not ``ours``: this test is about hosts and failover,
and round robin makes both of its preconditions certain rather than likely: both hosts get requests, and requests
are under way on the victim when it dies (``ours`` may, by its scores, send nothing to one replica for a while;
tests/test_live_routing.py measures it). Hedging is off, so calls are still under way on the victim when it is lost
(tests/test_hedging.py shows hedges answering them first). The client asks for no retries of its own, so every
answer it gets is the gateway's doing.

The test shows: requests reach both hosts; one replica frozen (SIGSTOP) and then SIGKILLed mid-load loses no
request: those cut off on it come back to the gateway UNAVAILABLE and run again on the survivor (the gateway retries
UNAVAILABLE unary calls once on another replica, gateway/forwarder.py); everything sent from the freeze on is served
by the survivor, and the registry drops the dead replica once its heartbeats stop (ttl_s).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from aimass.bootstrap import ensure_certificates, prepare_store
from aimass.client import keyed_aio_channel
from aimass.runtime.config import Settings, load_settings
from aimass.runtime.identity import ROLE_OPERATOR, ROLE_SCHEDULER, MeshCredentials, mesh_channel
from aimass.runtime.metadata import REPLICA_KEY, REQUEST_ID_KEY, metadata_value
from aimass.v1 import (
    common_pb2,
    nlp_pb2,
    nlp_pb2_grpc,
    registry_pb2,
    registry_pb2_grpc,
    scheduler_pb2,
    scheduler_pb2_grpc,
)
from tests import netns

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
NLP_SERVICE = "aimass.v1.NlpService"
GATEWAY_PORT = 50051
SCHEDULER_PORT = 50041
NLP_PORT = 50061
# Short heartbeats and TTL so the dead replica leaves the registry within seconds (defaults: 3 s and 10 s).
HEARTBEAT_S = 0.5
TTL_S = 3.0
# Every process started, models loaded, replicas registered and serving through the gateway.
READY_TIMEOUT_S = 120.0
# The load: closed-loop clients alternating Sentiment and Embed, each request with its own deadline.
CONCURRENCY = 4
DEADLINE_S = 10.0
WARM_REQUESTS = 200
# After the kill, the load goes on until the registry has dropped the dead replica and this many more were sent.
REQUESTS_AFTER_GONE = 100
# The load after the kill never runs longer than this (it takes about TTL_S + 1 s).
AFTER_KILL_MAX_S = 20.0
# The kill comes this long into the load that follows the warm phase, after freezing the victim this long.
KILL_AFTER_S = 0.3
FREEZE_S = 0.5
HOSTS = ("gw", "host-a", "host-b", "client")
REPLICA_HOSTS = ("host-a", "host-b")


# --- the client, run in the "client" namespace -------------------------------------------------------------------


@dataclass
class Record:
    index: int
    method: str
    started: float  # time.monotonic(): one clock for every process on the machine, whatever its namespace
    ended: float
    code: str
    replica: str
    details: str


def emit(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


async def serving_nlp(registry: registry_pb2_grpc.RegistryServiceAsyncStub) -> list[registry_pb2.ServiceInstance]:
    listed = await registry.ListInstances(registry_pb2.ListInstancesRequest(), timeout=2)
    return [i for i in listed.instances if i.kind == "nlp" and i.state == common_pb2.SERVING_STATE_SERVING]


async def wait_ready(
    control: grpc.aio.Channel, gateway: grpc.aio.Channel, replicas: int, timeout_s: float
) -> list[registry_pb2.ServiceInstance]:
    """Until the registry (the scheduler's) lists ``replicas`` serving NLP replicas and the scheduler, and the
    gateway's health says NlpService SERVING."""
    registry = registry_pb2_grpc.RegistryServiceStub(control)
    health = health_pb2_grpc.HealthStub(gateway)
    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(grpc.aio.AioRpcError):
            listed = (await registry.ListInstances(registry_pb2.ListInstancesRequest(), timeout=2)).instances
            serving = [i for i in listed if i.state == common_pb2.SERVING_STATE_SERVING]
            nlp = [i for i in serving if i.kind == "nlp"]
            if len(nlp) >= replicas and any(i.kind == "scheduler" for i in serving):
                check = await health.Check(health_pb2.HealthCheckRequest(service=NLP_SERVICE), timeout=2)
                if check.status == health_pb2.HealthCheckResponse.SERVING:
                    return nlp
        if time.monotonic() > deadline:
            raise TimeoutError(f"{replicas} NLP replicas not serving through the gateway after {timeout_s:.0f}s")
        await asyncio.sleep(0.2)


async def scheduler_view(control: grpc.aio.Channel, replicas: int, timeout_s: float) -> scheduler_pb2.RoutingView:
    """The scheduler's first routing view with ``replicas`` replicas reporting load and their nodes reporting."""
    stub = scheduler_pb2_grpc.SchedulerServiceStub(control)
    request = scheduler_pb2.WatchViewRequest(subscriber_id="multihost-test")
    async for response in stub.WatchView(request, timeout=timeout_s):
        view = response.view
        nodes = {node.node_id for node in view.nodes}
        reporting = [r for r in view.replicas if r.models and r.node_id in nodes]
        if len(reporting) >= replicas:
            return view
    raise TimeoutError(f"the scheduler's view never held {replicas} replicas on reporting nodes")


class Load:
    """Closed-loop clients through the gateway; every request recorded with who served it."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.stub = nlp_pb2_grpc.NlpServiceStub(channel)
        self.records: list[Record] = []
        # Requests sent so far (the next one's index).
        self.sent = 0

    async def one(self, index: int) -> Record:
        metadata = ((REQUEST_ID_KEY, f"multihost-{index}"),)
        started = time.monotonic()
        call: Any
        if index % 2:
            method = "Embed"
            call = self.stub.Embed(
                nlp_pb2.EmbedRequest(texts=[f"request {index} crosses hosts"], normalize=True),
                timeout=DEADLINE_S,
                metadata=metadata,
            )
        else:
            method = "Sentiment"
            call = self.stub.Sentiment(
                nlp_pb2.SentimentRequest(texts=[f"request {index} is great", "this is awful"]),
                timeout=DEADLINE_S,
                metadata=metadata,
            )
        try:
            await call
            code, details, trailers = "OK", "", await call.trailing_metadata()
        except grpc.aio.AioRpcError as err:
            code, details, trailers = err.code().name, err.details() or "", err.trailing_metadata()
        return Record(index, method, started, time.monotonic(), code, metadata_value(trailers, REPLICA_KEY), details)

    async def run(self, more: Callable[[], bool]) -> None:
        """CONCURRENCY clients sending requests while ``more()`` is true."""

        async def client() -> None:
            while more():
                index = self.sent
                self.sent += 1
                self.records.append(await self.one(index))

        await asyncio.gather(*(client() for _ in range(CONCURRENCY)))


async def client_main(gateway: str, scheduler: str) -> dict[str, Any]:
    """Waits for the mesh, sends the load, and returns the records (events on stdout tell the test where it is).

    It is an operator on this mesh (AIMASS_STATE_DIR): the admin key for the gateway, the operator certificate for
    the registry and the view, which the scheduler serves behind mTLS."""
    settings = load_settings()
    operator = MeshCredentials.load(settings.pki_dir, ROLE_OPERATOR)
    key = settings.admin_key_file.read_text().strip()
    # No retries in this client (not even gRPC's transparent ones): every OK is the gateway's doing.
    async with (
        keyed_aio_channel(gateway, key, options=[("grpc.enable_retries", 0)]) as channel,
        mesh_channel(scheduler, operator, server_role=ROLE_SCHEDULER) as control,
    ):
        nlp = await wait_ready(control, channel, len(REPLICA_HOSTS), READY_TIMEOUT_S)
        view = await scheduler_view(control, len(REPLICA_HOSTS), READY_TIMEOUT_S)
        emit(
            "ready",
            replicas=[{"instance_id": i.instance_id, "address": i.address, "pid": i.pid} for i in nlp],
            nodes={node.node_id: node.host for node in view.nodes},
            placed={r.instance_id: [r.node_id, *(m.device_id for m in r.models)] for r in view.replicas},
        )
        load = Load(channel)
        await load.run(lambda: load.sent < WARM_REQUESTS)
        emit("warm-done", requests=len(load.records))
        # Now the test kills a replica; the load goes on until the registry has dropped it, then a little longer.
        registry = registry_pb2_grpc.RegistryServiceStub(control)
        gone_at: float | None = None
        sent_when_gone = 0
        stop_at = time.monotonic() + AFTER_KILL_MAX_S

        def more() -> bool:
            if time.monotonic() > stop_at:
                return False
            return gone_at is None or load.sent < sent_when_gone + REQUESTS_AFTER_GONE

        async def watch_registry() -> None:
            nonlocal gone_at, sent_when_gone
            while gone_at is None and time.monotonic() < stop_at:
                with contextlib.suppress(grpc.aio.AioRpcError):
                    if len(await serving_nlp(registry)) < len(REPLICA_HOSTS):
                        gone_at, sent_when_gone = time.monotonic(), load.sent
                await asyncio.sleep(0.1)

        await asyncio.gather(load.run(more), watch_registry())
        left = [{"instance_id": i.instance_id, "address": i.address} for i in await serving_nlp(registry)]
    return {"records": [asdict(r) for r in load.records], "gone_at": gone_at, "left": left}


# --- the test, in the root namespace -----------------------------------------------------------------------------


def base_env() -> dict[str, str]:
    """This environment without any AIMASS_* setting of the caller's: the test decides every one."""
    return {key: value for key, value in os.environ.items() if not key.startswith("AIMASS_")}


class Lines:
    """A process's stdout as JSON events, read by a thread so waits can time out and notice deaths."""

    def __init__(self, stream: IO[bytes]) -> None:
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue()
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream: IO[bytes]) -> None:
        for line in stream:
            with contextlib.suppress(ValueError):
                self._queue.put(json.loads(line))
        self._queue.put(None)

    def next_event(self, timeout_s: float, alive: Callable[[], None]) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            alive()
            with contextlib.suppress(queue.Empty):
                event = self._queue.get(timeout=0.2)
                if event is not None:
                    return event
                time.sleep(1)  # the client closed its stdout: it is exiting, and alive() will say how
                alive()
                raise AssertionError("the client closed its output without a word")
        raise AssertionError(f"no word from the client in {timeout_s:.0f}s")


@dataclass
class Mesh:
    hosts: netns.Hosts
    log_dir: Path
    processes: dict[str, subprocess.Popen[bytes]]

    def start(
        self, name: str, host: str, argv: list[str], env: Mapping[str, str], *, stdout: int | None = None
    ) -> subprocess.Popen[bytes]:
        """``python argv`` on ``host``, its log (stderr, and stdout unless piped) in ``<name>.log``."""
        with (self.log_dir / f"{name}.log").open("wb") as sink:
            process = self.hosts.run_in(
                host,
                [sys.executable, *argv],
                {**base_env(), **env},
                stdout=sink if stdout is None else stdout,
                stderr=sink,
                cwd=str(ROOT),
            )
        self.processes[name] = process
        return process

    def log_tail(self, name: str, chars: int = 3000) -> str:
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def check_alive(self, *, except_: tuple[str, ...] = ()) -> None:
        for name, process in self.processes.items():
            if name not in except_ and process.poll() is not None:
                raise AssertionError(f"{name} exited with {process.returncode}:\n{self.log_tail(name)}")


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[Mesh]:
    netns.require_netns()
    # The mesh's state, as `aimass init` and `aimass certs issue` make it on the head host: a CA, a certificate per
    # process (hosts share this machine's disk, so each finds its own), the store and the admin key.
    state = tmp_path / "state"
    settings = Settings(state_dir=state)
    identities = {"gateway": "gateway", "scheduler": "scheduler", "operator": "operator"}
    for host in REPLICA_HOSTS:
        identities |= {f"node-agent-{host}": "node-agent", f"nlp-{host}": "nlp"}
    ensure_certificates(settings, identities)
    prepare_store(settings)
    with netns.hosts(HOSTS) as hosts:
        gw = hosts["gw"].ip
        common = {
            "AIMASS_LOG_LEVEL": "INFO",
            "AIMASS_STATE_DIR": str(state),
            # The embedded registry lives in the scheduler.
            "AIMASS_REGISTRY__ADDRESS": f"{gw}:{SCHEDULER_PORT}",
            "AIMASS_REGISTRY__HEARTBEAT_S": str(HEARTBEAT_S),
            "AIMASS_REGISTRY__TTL_S": str(TTL_S),
            "AIMASS_SCHEDULER__ADDRESS": f"{gw}:{SCHEDULER_PORT}",
        }
        started = Mesh(hosts, tmp_path, {})
        # The scheduler first (it hosts the registry), then the gateway; each process as its own mesh identity.
        started.start(
            "scheduler",
            "gw",
            ["-m", "scheduler"],
            {
                **common,
                "AIMASS_MESH__IDENTITY": "scheduler",
                "AIMASS_SCHEDULER__SERVER__HOST": gw,
                "AIMASS_SCHEDULER__SERVER__PORT": str(SCHEDULER_PORT),
            },
        )
        started.start(
            "gateway",
            "gw",
            ["-m", "gateway"],
            {
                **common,
                "AIMASS_MESH__IDENTITY": "gateway",
                "AIMASS_GATEWAY__SERVER__HOST": gw,
                "AIMASS_GATEWAY__SERVER__PORT": str(GATEWAY_PORT),
                # Round robin: see the module's docstring.
                "AIMASS_GATEWAY__ROUTER": "round_robin",
                # No hedging: this test is about what happens to calls cut off on a lost replica (retried once
                # elsewhere); a hedge would answer them first (tests/test_hedging.py freezes a replica with it on).
                "AIMASS_GATEWAY__HEDGING__ENABLED": "false",
            },
        )
        for host in REPLICA_HOSTS:
            ip = hosts[host].ip
            # The node id defaults to the hostname (the host's name here), as replicas' node ids do.
            started.start(
                f"node-agent-{host}",
                host,
                ["-m", "scheduler.node_agent", "--host", ip],
                {**common, "AIMASS_MESH__IDENTITY": f"node-agent-{host}"},
            )
            # Listening on the host's own address is what makes the registered address routable from the gateway.
            started.start(
                f"nlp-{host}",
                host,
                ["-m", "services.nlp"],
                {
                    **common,
                    "AIMASS_MESH__IDENTITY": f"nlp-{host}",
                    "AIMASS_NLP__SERVER__HOST": ip,
                    "AIMASS_NLP__SERVER__PORT": str(NLP_PORT),
                    "AIMASS_NLP__DEVICE": "cpu",
                    # Two replicas share this machine's cores: one torch thread each keeps them from fighting.
                    "AIMASS_NLP__TORCH_THREADS": "1",
                },
            )
        yield started
    # hosts() has killed every process left in the namespaces and deleted them.
    leftovers = [ns for ns in netns.namespace_names() if any(ns == h.namespace for h in hosts.hosts.values())]
    assert not leftovers, f"namespaces left behind: {leftovers}"


def host_of(replica: str, ips: Mapping[str, str]) -> str:
    """The host whose address the instance id ("nlp-<ip>:<port>-<pid>") names."""
    for host, ip in ips.items():
        if replica.startswith(f"nlp-{ip}:"):
            return host
    return replica or "(none)"


@pytest.mark.parametrize("loss", ["killed", "cut off"])
def test_requests_cross_hosts_and_survive_a_replica_lost_mid_load(mesh: Mesh, loss: str) -> None:
    """``killed``: the replica's process dies (its host's kernel resets the connections at once). ``cut off``: its
    host's cable is pulled (no RST, no FIN, the process runs on): the gateway's keepalive pings notice it."""
    began = time.monotonic()
    ips = {host: mesh.hosts[host].ip for host in REPLICA_HOSTS}
    out = mesh.log_dir / "client.json"
    gw = mesh.hosts["gw"].ip
    argv = ["-m", "tests.test_multihost", "--out", str(out)]
    argv += ["--gateway", f"{gw}:{GATEWAY_PORT}", "--scheduler", f"{gw}:{SCHEDULER_PORT}"]
    client = mesh.start(
        "client", "client", argv, {"AIMASS_STATE_DIR": str(mesh.log_dir / "state")}, stdout=subprocess.PIPE
    )
    assert client.stdout is not None
    events = Lines(client.stdout)

    ready = events.next_event(READY_TIMEOUT_S + 10, mesh.check_alive)
    assert ready["event"] == "ready", ready
    ready_s = time.monotonic() - began
    # Each replica registered its own host's address, and the instance's pid is the process started there.
    by_host = {host_of(r["instance_id"], ips): r for r in ready["replicas"]}
    assert sorted(by_host) == sorted(REPLICA_HOSTS), ready["replicas"]
    for host in REPLICA_HOSTS:
        assert by_host[host]["address"] == f"{ips[host]}:{NLP_PORT}"
        assert by_host[host]["pid"] == mesh.processes[f"nlp-{host}"].pid
        # The scheduler heard the host's node agent, and joined the replica's load to that node and its CPU.
        assert ready["nodes"].get(host) == ips[host], ready["nodes"]
        node, *devices = ready["placed"][by_host[host]["instance_id"]]
        assert node == host and devices and all(d == f"{host}/cpu" for d in devices), ready["placed"]

    warm = events.next_event(60, mesh.check_alive)
    assert warm["event"] == "warm-done", warm
    # Mid-load (the client went straight on sending): the victim is frozen first, so requests are certainly under
    # way on it (sent, accepted by its transport, unanswered), then SIGKILLed.
    time.sleep(KILL_AFTER_S)
    victim, survivor = REPLICA_HOSTS
    victim_pid = mesh.processes[f"nlp-{victim}"].pid
    if loss == "killed":
        os.kill(victim_pid, signal.SIGSTOP)
        frozen_at = time.monotonic()
        time.sleep(FREEZE_S)
        os.kill(victim_pid, signal.SIGKILL)
        killed_at = time.monotonic()
    else:
        mesh.hosts.unplug(victim)
        frozen_at = killed_at = time.monotonic()
    done = events.next_event(AFTER_KILL_MAX_S + 15, lambda: mesh.check_alive(except_=(f"nlp-{victim}",)))
    assert done["event"] == "done", done
    assert client.wait(timeout=10) == 0, mesh.log_tail("client")
    result = json.loads(out.read_text())
    records = [Record(**r) for r in result["records"]]

    failed = [r for r in records if r.code != "OK"]
    warm_split = Counter(host_of(r.replica, ips) for r in records if r.index < WARM_REQUESTS)
    after = Counter(host_of(r.replica, ips) for r in records if r.started > frozen_at)
    # Still under way at the loss and slow: the requests stuck on the victim (a request on the survivor takes
    # milliseconds). Those sent to it just before the loss and those routed to it after, before the gateway knew,
    # alike: at the instant of the cut none may be on the wire. The gateway saw UNAVAILABLE and ran them again.
    cut_off = [r for r in records if r.ended > killed_at and r.ended - r.started > FREEZE_S / 2]
    gateway_log = mesh.log_tail("gateway", chars=10_000_000)
    retries = gateway_log.count(f"unavailable on {ips[victim]}:{NLP_PORT}; retrying on {ips[survivor]}:{NLP_PORT}")
    gone_after_s = result["gone_at"] - killed_at if result["gone_at"] is not None else None
    summary = {
        "ready_s": round(ready_s, 1),
        "total_s": round(time.monotonic() - began, 1),
        "requests": len(records),
        "warm_split": dict(warm_split),
        "after_freeze": dict(after),
        "cut_off_on_victim_served_by": dict(Counter(host_of(r.replica, ips) for r in cut_off)),
        "gateway_retries": retries,
        "registry_dropped_after_s": None if gone_after_s is None else round(gone_after_s, 2),
        "failed": len(failed),
    }
    print(f"\nmultihost: {json.dumps(summary)}")

    # No request the gateway accepted was lost: every one completed OK, those cut off on the victim included.
    assert not failed, f"{len(failed)} of {len(records)} failed, e.g. {failed[:3]}; {summary}"
    assert cut_off, f"no request was stuck on the victim when it was lost: {summary}"
    # Requests crossed the switch to both hosts.
    assert set(warm_split) == set(REPLICA_HOSTS), summary
    assert min(warm_split.values()) >= WARM_REQUESTS * 0.4, f"round robin, yet uneven: {summary}"
    # From the freeze on, every request was served by the survivor, those sent to the victim first included.
    assert set(after) == {survivor}, summary
    # The registry dropped the dead replica once its heartbeats stopped, and only it.
    assert gone_after_s is not None, f"the registry still lists the killed replica: {summary}"
    assert gone_after_s < TTL_S + 3, summary
    assert [r["address"] for r in result["left"]] == [f"{ips[survivor]}:{NLP_PORT}"], result["left"]


def main() -> None:
    parser = argparse.ArgumentParser(description="The multi-host test's client: load through the gateway.")
    parser.add_argument("--gateway", required=True, help="HOST:PORT")
    parser.add_argument("--scheduler", required=True, help="HOST:PORT")
    parser.add_argument("--out", type=Path, required=True, help="where the records go (JSON)")
    args = parser.parse_args()
    result = asyncio.run(client_main(args.gateway, args.scheduler))
    args.out.write_text(json.dumps(result))
    emit("done", requests=len(result["records"]))


if __name__ == "__main__":
    main()
