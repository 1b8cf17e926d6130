"""The Consul registry backend and scheduler leadership, against a fake Consul agent on loopback (tests/fake_consul.py).

The real ConsulRegistry / ConsulLeader code talks HTTP to the fake through py-consul; the end-to-end test runs a
gateway and an NLP replica as processes configured with ``AIMASS_REGISTRY__BACKEND=consul``. With mesh TLS on (the
default) the agent's gRPC checks speak TLS to every process but the gateway, presenting the agent's own certificate
from the mesh CA (role consul), as compose/consul/aimass.hcl configures a real agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from aimass import pki
from aimass.local_mesh import free_port
from aimass.runtime.config import ConsulConfig, RegistryConfig, SchedulerConfig, ServerConfig, Settings
from aimass.runtime.discovery import DISCOVERY_HEALTH_SERVICE, LISTENER_LABEL, Instance, Membership, make_registry
from aimass.runtime.discovery.consul import ConsulRefused, ConsulRegistry, MalformedConsulAnswer
from aimass.runtime.discovery.leader import ConsulLeader
from aimass.runtime.identity import ROLE_SCHEDULER, MeshCredentials, MeshPolicy, mesh_channel
from aimass.runtime.server import mesh_listener
from aimass.v1 import common_pb2, nlp_pb2, nlp_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc
from scheduler.app import SchedulerApp
from scheduler.app import build_runner as build_scheduler
from tests.eventually import eventually
from tests.fake_consul import AgentTls, FakeConsul
from tests.security import credentials, keyed, self_signed_certificate, settings

NLP = "aimass.v1.NlpService"
SERVING = common_pb2.SERVING_STATE_SERVING
SERVING_STATUS = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING_STATUS = health_pb2.HealthCheckResponse.NOT_SERVING


def consul_config(fake: FakeConsul, **overrides: object) -> ConsulConfig:
    values: dict[str, object] = {
        "address": fake.address,
        "wait_s": 5.0,
        "check_interval_s": 0.3,
        "check_timeout_s": 1.0,
        "deregister_critical_after_s": 0,
        "lock_delay_s": 1,
        "session_ttl_s": 10,
    }
    return ConsulConfig.model_validate({**values, **overrides})


# Registered by a process listening with mesh mTLS (what ServerRunner labels its instance).
MESH = {LISTENER_LABEL: "mesh"}


def instance(
    name: str, kind: str = "nlp", state: common_pb2.ServingState.ValueType = SERVING, listener: str = "plaintext"
) -> Instance:
    return Instance(
        instance_id=name,
        kind=kind,
        services=(f"aimass.v1.{kind.capitalize()}Service",),
        address=f"127.0.0.1:{free_port()}",
        models=("all-MiniLM-L6-v2", "vader"),
        state=state,
        labels={"device": "cpu", "node": "n1", LISTENER_LABEL: listener},
        pid=4242,
    )


def agent_tls() -> AgentTls:
    """The Consul agent's certificate for its checks: role consul, from the session's mesh CA."""
    pki.issue(settings().pki_dir, role="consul", name="consul")
    agent = MeshCredentials.load(settings().pki_dir, "consul")
    return AgentTls(ca=agent.ca, cert=agent.cert, key=agent.key)


@pytest.fixture
def fake() -> Iterator[FakeConsul]:
    with FakeConsul(grpc_checks=False) as agent:
        yield agent


@pytest.fixture
async def registry(fake: FakeConsul) -> AsyncIterator[ConsulRegistry]:
    client = ConsulRegistry(consul_config(fake))
    yield client
    await client.close()


async def next_view(watch: AsyncIterator[list[Instance]], timeout_s: float = 5.0) -> list[Instance]:
    return await asyncio.wait_for(anext(watch), timeout_s)


async def equals(value: Awaitable[object], expected: object) -> bool:
    return await value == expected


def messages(caplog: pytest.LogCaptureFixture, text: str, level: int = logging.DEBUG) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage() and r.levelno >= level]


# -- registry ------------------------------------------------------------------------------------------------------


async def test_register_list_and_deregister(fake: FakeConsul, registry: ConsulRegistry) -> None:
    a, b = instance("nlp-a"), instance("vision-b", kind="vision")
    await registry.register(a, ttl_s=5)
    await registry.register(b, ttl_s=5)
    # What the agent holds: one Consul service per kind, the instance id as service ID, a TTL and a gRPC check.
    stored = fake.services["nlp-a"]
    assert stored.name == "aimass-nlp" and stored.address == "127.0.0.1" and f"127.0.0.1:{stored.port}" == a.address
    assert stored.tags == ["aimass", "kind=nlp", "model=all-MiniLM-L6-v2", "model=vader", "device=cpu"]
    assert stored.meta == {
        "kind": "nlp",
        "services": NLP,
        "pid": "4242",
        "label-device": "cpu",
        "label-node": "n1",
        "label-listener": "plaintext",
    }
    ttl, grpc_check = fake.checks["nlp-a:ttl"], fake.checks["nlp-a:grpc"]
    assert (ttl.kind, ttl.ttl_s, ttl.status, ttl.output) == ("ttl", 5.0, "passing", "SERVING")
    assert (grpc_check.kind, grpc_check.grpc_target, grpc_check.interval_s) == ("grpc", a.address, 0.3)

    assert await registry.list_instances() == [a, b]
    assert await registry.list_instances(NLP) == [a]
    await registry.deregister("nlp-a")
    assert await registry.list_instances() == [b]
    assert "nlp-a:ttl" not in fake.checks
    await registry.deregister("nlp-a")  # already gone: no error


async def test_heartbeat_passes_the_ttl_check_and_carries_the_state(fake: FakeConsul, registry: ConsulRegistry) -> None:
    a = instance("nlp-a")
    await registry.register(a, ttl_s=0.6)
    assert await registry.heartbeat("nlp-a", common_pb2.SERVING_STATE_DRAINING)
    check = fake.checks["nlp-a:ttl"]
    assert (check.status, check.output) == ("critical", "DRAINING")
    assert [i.state for i in await registry.list_instances()] == [common_pb2.SERVING_STATE_DRAINING]
    assert await registry.heartbeat("nlp-a", SERVING)
    assert [i.serving for i in await registry.list_instances()] == [True]
    # A process that stops heartbeating (hung) goes critical when its TTL runs out.
    await asyncio.sleep(1.0)
    assert (check.status, check.output) == ("critical", "TTL expired")
    assert [i.state for i in await registry.list_instances()] == [common_pb2.SERVING_STATE_NOT_SERVING]
    # An instance the agent does not know (it restarted, or removed it) must register again.
    assert not await registry.heartbeat("nobody", SERVING)


async def test_membership_registers_again_after_the_agent_forgot_it(fake: FakeConsul, registry: ConsulRegistry) -> None:
    membership = Membership(registry, instance("nlp-a"), heartbeat_s=0.1, ttl_s=2)
    membership.start()
    try:
        await eventually("registered", lambda: "nlp-a" in fake.services)
        with fake._cond:  # an agent restarted without its state
            fake.services.clear()
            fake.checks.clear()
        await eventually("registered again", lambda: "nlp-a" in fake.services, 5)
    finally:
        await membership.leave()
    assert "nlp-a" not in fake.services  # leave() deregisters


async def test_the_grpc_check_dials_as_each_listener_is_secured(fake: FakeConsul) -> None:
    registry = ConsulRegistry(consul_config(fake))
    try:
        await registry.register(instance("nlp-a", listener="mesh"), ttl_s=5)
        await registry.register(instance("sched-b", kind="scheduler", listener="mesh"), ttl_s=5)
        await registry.register(instance("gateway-c", kind="gateway", listener="tls"), ttl_s=5)
        await registry.register(instance("gateway-d", kind="gateway"), ttl_s=5)
    finally:
        await registry.close()
    # Mesh mTLS: the check dials TLS and verifies the process holds its kind's certificate.
    replica_check = fake.checks["nlp-a:grpc"]
    assert (replica_check.grpc_use_tls, replica_check.tls_server_name) == (True, "nlp.aimass.internal")
    scheduler_check = fake.checks["sched-b:grpc"]
    assert (scheduler_check.grpc_use_tls, scheduler_check.tls_server_name) == (True, "scheduler.aimass.internal")
    assert not replica_check.tls_skip_verify and not scheduler_check.tls_skip_verify
    # A gateway's TLS front door (any CA the operator chose): TLS, without verifying who answers a liveness check.
    front = fake.checks["gateway-c:grpc"]
    assert (front.grpc_use_tls, front.tls_skip_verify, front.tls_server_name) == (True, True, "")
    # A plaintext front door: a plain check.
    plain = fake.checks["gateway-d:grpc"]
    assert (plain.grpc_use_tls, plain.tls_skip_verify) == (False, False)


@contextlib.asynccontextmanager
async def mesh_health_server(
    servicer: health.aio.HealthServicer, roles: tuple[str, ...]
) -> AsyncIterator[dict[str, str]]:
    """One health service behind mesh listeners (mTLS, certificate of each of ``roles``): role → its address."""
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    addresses = {}
    for role in roles:
        # Health answers any certificate of the mesh's CA; the policy names nobody for anything else.
        listener = mesh_listener(credentials(role), MeshPolicy({}))
        assert listener.credentials is not None
        addresses[role] = f"127.0.0.1:{server.add_secure_port('127.0.0.1:0', listener.credentials)}"
    await server.start()
    try:
        yield addresses
    finally:
        await server.stop(0)


async def test_grpc_check_follows_the_process_health_and_removes_dead_ones() -> None:
    with FakeConsul(grpc_checks=True, tls=agent_tls()) as agent:
        checked = ConsulRegistry(consul_config(agent, deregister_critical_after_s=1))
        servicer = health.aio.HealthServicer()
        async with mesh_health_server(servicer, ("nlp", "scheduler")) as address:
            await servicer.set("", SERVING_STATUS)
            await checked.register(Instance("nlp-a", "nlp", (NLP,), address["nlp"], labels=MESH, pid=1), ttl_s=30)
            # A process that answers health but reports itself not serving (a standby scheduler).
            standby = Instance(
                "sched-b", "scheduler", ("aimass.v1.SchedulerService",), address["scheduler"], labels=MESH, pid=1
            )
            await checked.register(dataclasses.replace(standby, state=common_pb2.SERVING_STATE_NOT_SERVING), 30)

            async def states() -> dict[str, str]:
                return {i.instance_id: i.state_name for i in await checked.list_instances()}

            await eventually(
                "both gRPC checks pass over TLS",
                lambda: all(agent.checks[f"{i}:grpc"].output.endswith("success") for i in ("nlp-a", "sched-b")),
            )
            await servicer.set("", NOT_SERVING_STATUS)
            await eventually(
                "gRPC check critical", lambda: equals(states(), {"nlp-a": "NOT_SERVING", "sched-b": "NOT_SERVING"}), 5
            )
            assert "NOT_SERVING" in agent.checks["nlp-a:grpc"].output
            await servicer.set("", SERVING_STATUS)
            await eventually(
                "gRPC check passing", lambda: equals(states(), {"nlp-a": "SERVING", "sched-b": "NOT_SERVING"}), 5
            )
            await asyncio.sleep(1.5)  # longer than deregister_critical_after_s: the standby stays listed
            assert await states() == {"nlp-a": "SERVING", "sched-b": "NOT_SERVING"}
        try:
            # The process is gone: its gRPC checks go critical and Consul removes both instances.
            await eventually("dead instances removed", lambda: equals(states(), {}), 10)
        finally:
            await checked.close()


async def test_a_gateways_tls_front_door_is_checked_over_tls(tmp_path: Path) -> None:
    cert, key = self_signed_certificate(tmp_path)
    servicer = health.aio.HealthServicer()
    await servicer.set("", SERVING_STATUS)
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())]))
    await server.start()
    try:
        with FakeConsul(grpc_checks=True, tls=agent_tls()) as agent:
            registry = ConsulRegistry(consul_config(agent))
            try:
                front = Instance(
                    "gateway-t",
                    "gateway",
                    ("aimass.v1.ModelService",),
                    f"127.0.0.1:{port}",
                    labels={LISTENER_LABEL: "tls"},
                )
                await registry.register(front, ttl_s=30)
                await eventually("checked", lambda: agent.checks["gateway-t:grpc"].output != "")
                assert agent.checks["gateway-t:grpc"].status == "passing", agent.checks["gateway-t:grpc"].output
                assert [i.state_name for i in await registry.list_instances()] == ["SERVING"]
            finally:
                await registry.close()
    finally:
        await server.stop(0)


async def test_a_tls_check_fails_against_the_wrong_certificate_or_without_the_agents() -> None:
    servicer = health.aio.HealthServicer()
    await servicer.set("", SERVING_STATUS)
    async with mesh_health_server(servicer, ("nlp",)) as address:
        # A "vision" registration at a process holding an nlp certificate fails its check (the agent verifies the
        # kind's name), and so does every check of an agent without TLS for its checks: neither is listed serving.
        with FakeConsul(grpc_checks=True, tls=agent_tls()) as agent:
            registry = ConsulRegistry(consul_config(agent))
            try:
                await registry.register(
                    Instance("vision-x", "vision", ("aimass.v1.VisionService",), address["nlp"], labels=MESH), 30
                )
                await registry.register(Instance("nlp-a", "nlp", (NLP,), address["nlp"], labels=MESH, pid=1), ttl_s=30)
                checks = (agent.checks["vision-x:grpc"], agent.checks["nlp-a:grpc"])
                await eventually("both checked", lambda: all(check.output for check in checks))
                # The same server passes as the kind whose certificate it holds: only the name was wrong.
                assert checks[1].status == "passing" and checks[1].output.endswith("success")
                assert checks[0].status == "critical"
                assert "gRPC health check failed: UNAVAILABLE" in agent.checks["vision-x:grpc"].output
                listed = {i.instance_id: i.state_name for i in await registry.list_instances()}
                assert listed == {"vision-x": "NOT_SERVING", "nlp-a": "SERVING"}
            finally:
                await registry.close()
        with FakeConsul(grpc_checks=True) as bare:
            registry = ConsulRegistry(consul_config(bare))
            try:
                await registry.register(Instance("nlp-a", "nlp", (NLP,), address["nlp"], labels=MESH, pid=1), ttl_s=30)
                await eventually("checked once", lambda: bare.checks["nlp-a:grpc"].output != "")
                assert bare.checks["nlp-a:grpc"].status == "critical"
                assert [i.state_name for i in await registry.list_instances()] == ["NOT_SERVING"]
            finally:
                await registry.close()


async def test_watch_delivers_changes_through_blocking_queries(fake: FakeConsul, registry: ConsulRegistry) -> None:
    await registry.register(instance("nlp-a"), ttl_s=30)
    watch = registry.watch()
    try:
        assert [i.instance_id for i in await next_view(watch)] == ["nlp-a"]
        # Changes arrive as soon as they happen (the queries wait up to 5 s), for a known kind and for a new one.
        for change in (
            lambda: registry.register(instance("nlp-b"), 30),
            lambda: registry.register(instance("speech-c", kind="speech"), 30),
            lambda: registry.heartbeat("nlp-b", common_pb2.SERVING_STATE_DRAINING),
            lambda: registry.deregister("nlp-a"),
        ):
            started = time.monotonic()
            await change()
            view = await next_view(watch)
            assert time.monotonic() - started < 2.0  # well before the 5 s wait runs out
        assert [(i.instance_id, i.state_name) for i in view] == [("nlp-b", "DRAINING"), ("speech-c", "SERVING")]
    finally:
        await watch.aclose()
    blocking = [r for r in fake.queries("/v1/health/service/aimass-nlp") if "index" in r.query]
    assert blocking and all(r.query["wait"] == "5s" for r in blocking)
    assert any("index" in r.query for r in fake.queries("/v1/catalog/services"))
    assert len(fake.queries("/v1/health/service/aimass-nlp")) < 20, "the watch polls instead of blocking"


async def test_consul_down_keeps_the_last_view_logs_once_and_recovers(
    fake: FakeConsul, registry: ConsulRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    reachability: list[bool] = []
    registry.on_reachability(reachability.append)
    await registry.register(instance("nlp-a"), ttl_s=30)
    watch = registry.watch()
    try:
        assert [i.instance_id for i in await next_view(watch)] == ["nlp-a"]
        await asyncio.to_thread(fake.stop)
        pending = asyncio.ensure_future(anext(watch))
        await asyncio.sleep(2.0)  # several retries
        assert not pending.done(), "a view came out while Consul was down"
        assert len(messages(caplog, "is unreachable", logging.WARNING)) == 1
        assert reachability == [True, False]
        with pytest.raises(ConnectionError):
            await registry.list_instances()

        await asyncio.to_thread(fake.start)  # back, on the same port and with its state
        await registry.register(instance("nlp-b"), ttl_s=30)
        view = await asyncio.wait_for(pending, 10)
        assert [i.instance_id for i in view] == ["nlp-a", "nlp-b"]
        assert len(messages(caplog, "is reachable again", logging.INFO)) == 1
        assert len(messages(caplog, "is unreachable")) == 1
        assert reachability == [True, False, True]
    finally:
        await watch.aclose()


async def test_malformed_answers_are_rejected_with_a_logged_error(
    fake: FakeConsul, registry: ConsulRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    await registry.register(instance("nlp-a"), ttl_s=30)
    watch = registry.watch()
    health_path = "/v1/health/service/aimass-nlp"
    try:
        assert [i.instance_id for i in await next_view(watch)] == ["nlp-a"]
        pending = asyncio.ensure_future(anext(watch))
        bad_answers: list[tuple[str, str, str | None]] = [
            (health_path, "<html>502 Bad Gateway</html>", None),  # not JSON
            (health_path, json.dumps({"Service": "nlp-a"}), None),  # not a list
            (health_path, json.dumps([{"Service": {"ID": "nlp-a", "Port": "80"}, "Checks": []}]), None),  # bad fields
            (health_path, json.dumps([{"Service": {"ID": "x", "Port": 80, "Address": "h"}, "Checks": []}]), None),
            (health_path, "[]", ""),  # no X-Consul-Index
            ("/v1/catalog/services", json.dumps(["aimass-nlp"]), None),  # not an object
        ]
        for number, (path, body, index) in enumerate(bad_answers, start=1):
            fake.clear_faults()
            fake.inject(path, body, index=index)

            async def logged(n: int = number) -> bool:
                return len(messages(caplog, "rejected a malformed Consul answer", logging.ERROR)) >= n

            await eventually(f"answer {number} rejected", logged, 5)
            with pytest.raises(MalformedConsulAnswer):
                await registry.list_instances()
        await asyncio.sleep(1.0)  # the same bad answer, asked again and again, is logged once
        assert len(messages(caplog, "rejected a malformed Consul answer")) == len(bad_answers)
        assert not pending.done(), "a rejected answer changed the view"
        assert not messages(caplog, "Traceback") and not messages(caplog, "unreachable")

        fake.clear_faults()
        await registry.register(instance("nlp-b"), ttl_s=30)
        view = await asyncio.wait_for(pending, 10)
        assert [i.instance_id for i in view] == ["nlp-a", "nlp-b"]
    finally:
        await watch.aclose()


async def test_acl_token_is_sent_and_a_refusal_is_reported(caplog: pytest.LogCaptureFixture) -> None:
    with FakeConsul(token="s3cret", grpc_checks=False) as agent:
        good = ConsulRegistry(consul_config(agent, token="s3cret"))
        bad = ConsulRegistry(consul_config(agent, token="wrong"))
        try:
            await good.register(instance("nlp-a"), ttl_s=30)
            assert [i.instance_id for i in await good.list_instances()] == ["nlp-a"]
            for _ in range(3):
                with pytest.raises(ConsulRefused, match="Permission denied"):
                    await bad.list_instances()
            assert len(messages(caplog, "Consul refused catalog", logging.ERROR)) == 1
        finally:
            await good.close()
            await bad.close()


async def test_the_factory_picks_the_backend() -> None:
    # Inside an event loop, as processes make them: grpc.aio channels belong to the loop that creates them.
    made = [
        make_registry(RegistryConfig(), credentials=credentials("nlp")),
        make_registry(RegistryConfig(backend="consul"), credentials=credentials("nlp")),
        # (How its gRPC checks dial follows each instance's listener label, not the registering process's credentials.)
        make_registry(RegistryConfig(backend="consul"), credentials=None),
    ]
    try:
        assert type(made[0]).__name__ == "RemoteRegistry"
        assert isinstance(made[1], ConsulRegistry) and isinstance(made[2], ConsulRegistry)
    finally:
        for registry in made:
            await registry.close()


# -- leadership ----------------------------------------------------------------------------------------------------


class Follower:
    """A leader object and the changes it reported."""

    def __init__(self, config: ConsulConfig, identity: str) -> None:
        self.leader = ConsulLeader(config)
        self.changes: list[tuple[bool, float]] = []
        self.leader.start(identity, self._changed)

    async def _changed(self, leading: bool) -> None:
        self.changes.append((leading, time.monotonic()))

    async def until(self, leading: bool, timeout_s: float = 10.0) -> float:
        await eventually(f"leading={leading}", lambda: self.leader.leading == leading, timeout_s)
        return time.monotonic()


async def test_one_scheduler_leads_the_other_stands_by_and_takes_over(fake: FakeConsul) -> None:
    config = consul_config(fake)
    first = Follower(config, "scheduler-1")
    await first.until(True)
    second = Follower(config, "scheduler-2")
    try:
        await eventually("standby sees the holder", lambda: second.leader.holder == "scheduler-1")
        assert not second.leader.leading and second.changes == []
        entry = fake.kv["aimass/scheduler/leader"]
        assert entry.session == first.leader.session and entry.value == b"scheduler-1"

        # A clean shutdown releases the lock: the standby takes over at once (no lock delay).
        released = time.monotonic()
        await first.leader.resign()
        assert await second.until(True, 5) - released < 2.0
        assert fake.kv["aimass/scheduler/leader"].session == second.leader.session

        # The leader's session is invalidated (its TTL ran out): it steps down, and after the lock delay the other
        # one, campaigning again, takes over.
        await first.leader.close()
        first = Follower(config, "scheduler-1")
        await eventually("standing by", lambda: first.leader.holder == "scheduler-2")
        invalidated = time.monotonic()
        fake.expire_session(second.leader.session)
        await second.until(False, 5)
        took_over = await first.until(True, 10)
        assert 0.9 <= took_over - invalidated < 5.0, "the lock delay was not honoured, or the handover was slow"
        assert second.changes[-1][0] is False
        await second.until(False)  # and the old leader now stands by behind the new one
        await eventually("holder seen", lambda: second.leader.holder == "scheduler-1")
    finally:
        await first.leader.close()
        await second.leader.close()
    assert "aimass/scheduler/leader" not in fake.kv or not fake.kv["aimass/scheduler/leader"].session
    assert not fake.sessions


async def test_a_short_consul_outage_changes_no_leadership(fake: FakeConsul) -> None:
    config = consul_config(fake)
    leader = Follower(config, "scheduler-1")
    await leader.until(True)
    standby = Follower(config, "scheduler-2")
    try:
        await eventually("standing by", lambda: standby.leader.holder == "scheduler-1")
        await asyncio.to_thread(fake.stop)
        await asyncio.sleep(1.5)  # well within the session TTL (10 s): the leader keeps leading
        assert leader.leader.leading and not standby.leader.leading
        await asyncio.to_thread(fake.start)
        session = leader.leader.session
        await eventually("renewed after the outage", lambda: len(fake.queries(f"/v1/session/renew/{session}")) > 0)
        await asyncio.sleep(0.5)
        assert leader.leader.leading and not standby.leader.leading
        assert [leading for leading, _ in leader.changes] == [True] and standby.changes == []
        assert fake.kv["aimass/scheduler/leader"].session == session
    finally:
        await leader.leader.close()
        await standby.leader.close()


async def test_standby_scheduler_is_not_serving_until_the_leader_drains(fake: FakeConsul) -> None:
    settings = Settings(
        registry=RegistryConfig(backend="consul", heartbeat_s=0.2, ttl_s=5, consul=consul_config(fake)),
        scheduler=SchedulerConfig(server=ServerConfig(port=0, drain_delay_s=0.1, drain_grace_s=2, access_log=False)),
    )
    active, standby = build_scheduler(settings), build_scheduler(settings)
    await active.start()
    await eventually("first scheduler active", lambda: active.state == SERVING)
    await standby.start()
    registry = ConsulRegistry(consul_config(fake))
    try:

        async def states() -> dict[str, str]:
            return {i.address: i.state_name for i in await registry.list_instances()}

        expected = {active.address: "SERVING", standby.address: "NOT_SERVING"}
        await eventually("both registered", lambda: equals(states(), expected))
        app = standby.app
        assert isinstance(app, SchedulerApp) and app.leader is not None
        leader = app.leader
        await eventually("the standby knows the leader", lambda: leader.holder == active.instance_id)
        # As a node agent (the only role that reports nodes), over mesh mTLS.
        async with mesh_channel(standby.address, credentials("node-agent"), server_role=ROLE_SCHEDULER) as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="aimass.v1.SchedulerService"), timeout=2
            )
            assert reply.status == NOT_SERVING_STATUS
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await scheduler_pb2_grpc.SchedulerServiceStub(channel).ReportNode(
                    scheduler_pb2.ReportNodeRequest(node_id="n1"), timeout=2
                )
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            assert active.instance_id in (refused.value.details() or "")

            await active.drain()  # hands the lock over while it drains
            await eventually("standby took over", lambda: standby.state == SERVING, 5)
            await eventually("listed serving", lambda: equals(states(), {standby.address: "SERVING"}))
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="aimass.v1.SchedulerService"), timeout=2
            )
            assert reply.status == SERVING_STATUS
            await scheduler_pb2_grpc.SchedulerServiceStub(channel).ReportNode(
                scheduler_pb2.ReportNodeRequest(node_id="n1"), timeout=2
            )
    finally:
        await registry.close()
        await active.drain()
        await standby.drain()


# -- end to end ----------------------------------------------------------------------------------------------------


class Processes:
    def __init__(self, log_dir: Path, env: dict[str, str]) -> None:
        self.log_dir = log_dir
        self.env = env
        self.running: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, module: str, extra: dict[str, str]) -> subprocess.Popen[bytes]:
        with (self.log_dir / f"{name}.log").open("wb") as sink:
            process = subprocess.Popen(
                [sys.executable, "-m", module], env={**self.env, **extra}, stdout=sink, stderr=subprocess.STDOUT
            )
        self.running[name] = process
        return process

    def log(self, name: str) -> str:
        return (self.log_dir / f"{name}.log").read_text(errors="replace")

    def stop_all(self) -> None:
        for process in self.running.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.running.values():
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.mark.slow
async def test_gateway_and_nlp_replica_meet_through_consul(tmp_path: Path) -> None:
    gateway_port, nlp_port = free_port(), free_port()
    gateway = f"127.0.0.1:{gateway_port}"
    # The agent checks the replica over mesh TLS with its own certificate, as a real one set up for the mesh does.
    with FakeConsul(grpc_checks=True, tls=agent_tls()) as agent:
        # The session's state directory (inherited through AIMASS_STATE_DIR): certificates and the store.
        env = {
            **os.environ,
            "AIMASS_REGISTRY__BACKEND": "consul",
            "AIMASS_REGISTRY__CONSUL__ADDRESS": agent.address,
            "AIMASS_REGISTRY__CONSUL__CHECK_INTERVAL_S": "0.5",
            "AIMASS_REGISTRY__CONSUL__WAIT_S": "5",
            "AIMASS_REGISTRY__HEARTBEAT_S": "0.3",
            "AIMASS_SCHEDULER__ADDRESS": "",
            "AIMASS_NLP__DEVICE": "cpu",
        }
        processes = Processes(tmp_path, env)
        try:
            processes.start("gateway", "gateway", {"AIMASS_GATEWAY__SERVER__PORT": str(gateway_port)})
            nlp = processes.start("nlp", "services.nlp", {"AIMASS_NLP__SERVER__PORT": str(nlp_port)})
            # Health needs no key; the calls carry the session's admin key.
            async with keyed(gateway) as channel:
                health_stub = health_pb2_grpc.HealthStub(channel)

                async def gateway_health(service: str) -> int:
                    try:
                        reply = await health_stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
                    except grpc.aio.AioRpcError:
                        return -1
                    return int(reply.status)

                for name, process in processes.running.items():
                    assert process.poll() is None, processes.log(name)
                await eventually(
                    "the gateway sees the NLP replica in Consul",
                    lambda: equals(gateway_health(NLP), SERVING_STATUS),
                    120,
                )
                nlp_id = next(s.service_id for s in agent.services.values() if s.name == "aimass-nlp")
                nlp_check = agent.checks[f"{nlp_id}:grpc"]
                assert nlp_check.status == "passing"  # the agent's gRPC check reached it, over mesh TLS
                assert (nlp_check.grpc_use_tls, nlp_check.tls_server_name) == (True, "nlp.aimass.internal")
                assert "device=cpu" in agent.services[nlp_id].tags
                assert any(s.name == "aimass-gateway" for s in agent.services.values())
                stub = nlp_pb2_grpc.NlpServiceStub(channel)
                reply = await stub.Embed(nlp_pb2.EmbedRequest(texts=["consul found me"]), timeout=30)
                assert len(reply.embeddings) == 1

                # Consul goes away: the gateway keeps routing on its last view and says so in its health.
                await asyncio.to_thread(agent.stop)
                await eventually(
                    "discovery NOT_SERVING",
                    lambda: equals(gateway_health(DISCOVERY_HEALTH_SERVICE), NOT_SERVING_STATUS),
                )
                assert await gateway_health("") == SERVING_STATUS
                reply = await stub.Embed(nlp_pb2.EmbedRequest(texts=["still routed"]), timeout=30)
                assert len(reply.embeddings) == 1
                await asyncio.to_thread(agent.start)
                await eventually(
                    "discovery SERVING again",
                    lambda: equals(gateway_health(DISCOVERY_HEALTH_SERVICE), SERVING_STATUS),
                )
                assert "Consul at" in processes.log("gateway") and "is reachable again" in processes.log("gateway")

                # The replica drains: it deregisters first, so the gateway stops routing to it.
                nlp.send_signal(signal.SIGTERM)
                assert await asyncio.to_thread(nlp.wait, 30) == 0
                assert nlp_id not in agent.services
                assert agent.queries(f"/v1/agent/service/deregister/{nlp_id}")
                await eventually(
                    "the gateway dropped the replica",
                    lambda: equals(gateway_health(NLP), NOT_SERVING_STATUS),
                )
        finally:
            await asyncio.to_thread(processes.stop_all)
