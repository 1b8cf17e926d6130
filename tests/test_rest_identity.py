"""The REST front door's hop to the gateway keeps its HTTP clients apart: the REST process calls the gateway's adapter
listener over mesh mTLS with its "rest" certificate and passes each client's address on (x-aimass-caller-peer), so
the gateway's bad-key throttle and audit log see the HTTP client, not the REST process. Nobody else is believed:
a gRPC caller that writes that metadata itself, an HTTP client that writes X-Forwarded-For, a mesh certificate of
another role on the adapter listener, or no certificate at all.

Against `aimass up` (front_door_mesh, HTTP clients on other loopback addresses: 127.0.0.2, ...), and in-process
gateways (tests/inprocess_mesh.py) where a test floods the caller's own host, 127.0.0.1, which would hold back new
keys for every other test of the session's mesh.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Awaitable, Sequence

import grpc
import httpx
import pytest

from aimass import pki
from aimass.client import error_info
from aimass.local_mesh import LocalMesh
from aimass.runtime.identity import (
    ANY_REPLICA,
    ROLE_GATEWAY,
    ROLE_OPERATOR,
    ROLE_REST,
    MeshIdentity,
    MeshPolicy,
    mesh_channel,
    mesh_channel_options,
)
from aimass.runtime.metadata import CALLER_PEER_KEY
from aimass.store.records import now_ms
from aimass.v1 import admin_pb2, admin_pb2_grpc, models_pb2, models_pb2_grpc
from gateway.auth import FAILURES_PER_PEER
from services.nlp.engine import NlpEngine
from tests.inprocess_mesh import InProcessMesh, in_process_mesh
from tests.security import admin_key, credentials, key_for, settings

ABUSER = "127.0.0.2"
BYSTANDER = "127.0.0.3"
_serial = itertools.count()


def made_up_key() -> str:
    """A well-formed key no store knows (each one new, so each is looked up)."""
    return f"aimass_{time.time_ns() % 10**9:09d}{next(_serial) % 1000:03d}_" + "D" * 43  # 12-character key id


def from_address(source: str) -> httpx.Client:
    """An HTTP client whose connections come from ``source`` (any 127.x address is this host's loopback)."""
    return httpx.Client(transport=httpx.HTTPTransport(local_address=source), timeout=60)


def list_models(http: httpx.Client, mesh: LocalMesh, key: str, headers: dict[str, str] | None = None) -> httpx.Response:
    return http.get(f"{mesh.rest_url}/models", headers={"authorization": f"Bearer {key}", **(headers or {})})


async def refusals(
    gateway: str, since_ms: int, *, until: set[str], timeout_s: float = 15.0
) -> list[admin_pb2.AuditEvent]:
    """The auth.refused events since ``since_ms`` (read with the admin key), once peers ``until`` all show (the log
    flushes every 0.5 s; a repeat within a coalescing window is written when the window ends)."""
    deadline = time.monotonic() + timeout_s
    while True:
        async with grpc.aio.insecure_channel(gateway) as channel:
            events = (
                await admin_pb2_grpc.AdminServiceStub(channel).ListAuditEvents(
                    admin_pb2.ListAuditEventsRequest(
                        tenant_id="*", action_prefix="auth.refused", since_unix_ms=since_ms
                    ),
                    metadata=(("authorization", f"Bearer {admin_key()}"),),
                    timeout=5,
                )
            ).events
        if until <= {event.peer for event in events} or time.monotonic() > deadline:
            return list(events)
        await asyncio.sleep(0.3)


def test_one_rest_clients_bad_keys_do_not_hold_back_another_clients_new_key(front_door_mesh: LocalMesh) -> None:
    started_ms = now_ms()
    abuser_key, bystander_key = key_for("rest-abuser"), key_for("rest-bystander")
    with from_address(ABUSER) as abuser:
        codes = []
        for _ in range(FAILURES_PER_PEER + 2):
            reply = list_models(abuser, front_door_mesh, made_up_key())
            assert reply.status_code == 401, reply.text
            codes.append(reply.json()["error"]["code"])
        assert codes[:FAILURES_PER_PEER] == ["invalid_api_key"] * FAILURES_PER_PEER, codes
        assert set(codes[FAILURES_PER_PEER:]) == {"too_many_failures"}, codes
        # The throttle names the HTTP client, not the REST process (which calls from 127.0.0.1).
        assert f"from {ABUSER} presented bad API keys" in reply.json()["error"]["message"]
        # The abuser's own new key waits out the window too: only its lookups are held back.
        held = list_models(abuser, front_door_mesh, abuser_key)
        assert held.status_code == 401 and held.json()["error"]["code"] == "too_many_failures", held.text
    # Another REST client's new key works at once.
    with from_address(BYSTANDER) as bystander:
        served = list_models(bystander, front_door_mesh, bystander_key)
        assert served.status_code == 200, served.text
        assert served.json()["data"]

    events = asyncio.run(refusals(front_door_mesh.gateway, started_ms, until={ABUSER}))
    # Every refusal of this test is the abuser's, by the HTTP client's address.
    assert {event.peer for event in events} == {ABUSER}, events
    assert {event.detail.split()[0] for event in events} == {"KEY_UNKNOWN", "TOO_MANY_FAILURES"}, events


def test_a_rest_client_cannot_name_its_own_address(front_door_mesh: LocalMesh) -> None:
    """uvicorn believes X-Forwarded-For from 127.0.0.1 by default; the front door runs without proxy headers, and
    never passes a caller's x-aimass-* header on."""
    started_ms = now_ms()
    with httpx.Client(timeout=60) as http:  # from 127.0.0.1
        reply = http.post(
            f"{front_door_mesh.rest_url}/embeddings",
            json={"model": "all-MiniLM-L6-v2", "input": "hello"},
            headers={
                "authorization": f"Bearer {made_up_key()}",
                "x-forwarded-for": "127.0.0.5",
                "forwarded": "for=127.0.0.5",
                CALLER_PEER_KEY: "ipv4:127.0.0.6:1",
            },
        )
    assert reply.status_code == 401 and reply.json()["error"]["code"] == "invalid_api_key", reply.text

    events = asyncio.run(refusals(front_door_mesh.gateway, started_ms, until={"127.0.0.1"}, timeout_s=25))
    peers = {event.peer for event in events}
    assert "127.0.0.1" in peers and not peers & {"127.0.0.5", "127.0.0.6"}, peers


# -- in-process gateways: the adapter listener itself, and callers on this host's own address ---------------------


def adapter_address(mesh: InProcessMesh) -> str:
    (port,) = mesh.gateways[0].extra_ports.values()
    return f"127.0.0.1:{port}"


async def who_am_i(
    channel: grpc.aio.Channel, key: str, metadata: Sequence[tuple[str, str]] = ()
) -> admin_pb2.WhoAmIResponse:
    reply: admin_pb2.WhoAmIResponse = await admin_pb2_grpc.AdminServiceStub(channel).WhoAmI(
        admin_pb2.WhoAmIRequest(), metadata=(("authorization", f"Bearer {key}"), *metadata), timeout=10
    )
    return reply


async def refused(call: Awaitable[object]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


def reason(err: grpc.aio.AioRpcError) -> str:
    info = error_info(err)
    return info.reason if info is not None else ""


async def test_a_grpc_caller_that_names_its_own_address_is_not_believed(nlp_engine: NlpEngine) -> None:
    spoofed = ((CALLER_PEER_KEY, "ipv4:10.9.8.7:4242"),)
    async for mesh in in_process_mesh(nlp_engine):
        started_ms = now_ms()
        fresh = key_for("spoof-test")
        async with grpc.aio.insecure_channel(mesh.gateway) as public:
            await who_am_i(public, admin_key())  # proved before the flood: known keys keep working
            reasons = [
                reason(await refused(who_am_i(public, made_up_key(), spoofed))) for _ in range(FAILURES_PER_PEER + 2)
            ]
            assert reasons[:FAILURES_PER_PEER] == ["KEY_UNKNOWN"] * FAILURES_PER_PEER, reasons
            assert set(reasons[FAILURES_PER_PEER:]) == {"TOO_MANY_FAILURES"}, reasons
            # Its own address is the one held back, whatever it wrote: a new key from it waits too.
            held = await refused(who_am_i(public, fresh, spoofed))
            assert reason(held) == "TOO_MANY_FAILURES" and "from 127.0.0.1 " in (held.details() or "")
            # A verified adapter is believed: its client 10.9.8.7 is not the throttled host.
            rest = credentials(ROLE_REST)
            async with mesh_channel(adapter_address(mesh), rest, server_role=ROLE_GATEWAY) as adapter:
                assert (await who_am_i(adapter, fresh, spoofed)).tenant_id == "spoof-test"
                bad = await refused(who_am_i(adapter, made_up_key(), ((CALLER_PEER_KEY, "ipv4:10.9.8.8:1"),)))
                assert reason(bad) == "KEY_UNKNOWN"
                # Not an IP address: the adapter's own address stands (127.0.0.1, held back by now).
                bad = await refused(who_am_i(adapter, made_up_key(), ((CALLER_PEER_KEY, "unix:/tmp/x"),)))
                assert reason(bad) == "TOO_MANY_FAILURES"
        await mesh.gateway_app().audit.flush()
        events = await refusals(mesh.gateway, started_ms, until={"127.0.0.1", "10.9.8.8"})
        peers = {event.peer for event in events}
        assert peers == {"127.0.0.1", "10.9.8.8"}, events


async def test_the_adapter_listener_takes_adapter_certificates_only(nlp_engine: NlpEngine) -> None:
    async for mesh in in_process_mesh(nlp_engine):
        address = adapter_address(mesh)
        key = admin_key()
        ca = pki.ca_files(settings().pki_dir).cert.read_bytes()
        # No client certificate (TLS with the mesh's CA, or plaintext): the handshake fails, no call is made.
        no_cert = grpc.ssl_channel_credentials(root_certificates=ca)
        async with grpc.aio.secure_channel(address, no_cert, options=mesh_channel_options(ROLE_GATEWAY)) as channel:
            assert (await refused(who_am_i(channel, key))).code() == grpc.StatusCode.UNAVAILABLE
        async with grpc.aio.insecure_channel(address) as channel:
            assert (await refused(who_am_i(channel, key))).code() == grpc.StatusCode.UNAVAILABLE
        # A mesh certificate of another role: refused, even with a good key.
        for role in (ROLE_OPERATOR, ROLE_GATEWAY):
            async with mesh_channel(address, credentials(role), server_role=ROLE_GATEWAY) as channel:
                err = await refused(who_am_i(channel, key))
                assert err.code() == grpc.StatusCode.PERMISSION_DENIED and reason(err) == "ROLE_NOT_ALLOWED", role
        # The adapter's certificate, with the caller's key: served as on the public port.
        async with mesh_channel(address, credentials(ROLE_REST), server_role=ROLE_GATEWAY) as channel:
            assert (await who_am_i(channel, key)).tenant_id == "admin"
    # The adapter role is no replica: no internal listener's "any replica" rule lets it in.
    assert not MeshPolicy({"/aimass.v1.SchedulerService/": [ANY_REPLICA]}).permits(
        MeshIdentity(ROLE_REST, ROLE_REST), "/aimass.v1.SchedulerService/ReportLoad"
    )


async def test_who_am_i_is_outside_the_rate_quota(nlp_engine: NlpEngine) -> None:
    """The REST front door asks WhoAmI before reading a large upload: a tenant allowed 1 request/s still gets its
    upload's own call."""
    key = key_for("whoami-rate", requests_per_second=1)
    async for mesh in in_process_mesh(nlp_engine):
        async with grpc.aio.insecure_channel(mesh.gateway) as channel:
            for _ in range(5):
                assert (await who_am_i(channel, key)).tenant_id == "whoami-rate"
            models = models_pb2_grpc.ModelServiceStub(channel)
            auth = (("authorization", f"Bearer {key}"),)
            await models.ListModels(models_pb2.ListModelsRequest(), metadata=auth, timeout=10)
            # The quota is on: the next counted call within the second is refused.
            err = await refused(models.ListModels(models_pb2.ListModelsRequest(), metadata=auth, timeout=10))
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and reason(err) == "QUOTA_EXCEEDED"
