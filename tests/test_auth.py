"""The front door: API keys, scopes, the tenant a call is for, priorities capped per tenant, keys managed through
AdminService and the CLI with tenants kept apart, revocations and limit changes reaching every gateway, the audit
log. Real servers on loopback (an in-process mesh over the session's store and CA), real clients."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from aimass.client import AsyncClient, error_info
from aimass.runtime.metadata import TENANT_KEY
from aimass.store.sql import SqlStore
from aimass.tenancy import keys
from aimass.v1 import admin_pb2, admin_pb2_grpc, common_pb2, models_pb2, models_pb2_grpc, nlp_pb2, nlp_pb2_grpc
from services.nlp.engine import NlpEngine
from tests.eventually import eventually
from tests.inprocess_mesh import ONE_AT_A_TIME, InProcessMesh, in_process_mesh
from tests.postgres import postgres_binaries, postgres_server
from tests.security import admin_key, settings

BIN = os.path.dirname(sys.executable)
SENTIMENT = nlp_pb2.SentimentRequest(texts=["I love this"])


@pytest.fixture(scope="module")
async def mesh(nlp_engine: NlpEngine) -> AsyncIterator[InProcessMesh]:
    async for started in in_process_mesh(nlp_engine, gateways=2):
        yield started


async def call_error(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


async def new_key(mesh: InProcessMesh, tenant: str, scopes: list[str], **extra: Any) -> str:
    async with mesh.channel() as channel:
        created = await admin_pb2_grpc.AdminServiceStub(channel).CreateKey(
            admin_pb2.CreateKeyRequest(tenant_id=tenant, scopes=scopes, **extra), timeout=10
        )
    return created.secret


async def sentiment(address: str, key: str | None, metadata: tuple[tuple[str, str], ...] = ()) -> Any:
    auth = (("authorization", f"Bearer {key}"),) if key is not None else ()
    async with grpc.aio.insecure_channel(address) as channel:
        call = nlp_pb2_grpc.NlpServiceStub(channel).Sentiment(SENTIMENT, timeout=10, metadata=(*auth, *metadata))
        await call
        return await call.trailing_metadata()


# -- who may call ------------------------------------------------------------------------------------------------


async def test_calls_without_a_usable_key_are_unauthenticated_with_a_way_out(mesh: InProcessMesh) -> None:
    expired = await new_key(mesh, "authtest", ["infer"], expires_in_seconds=1)
    revoked = await new_key(mesh, "authtest", ["infer"])
    async with mesh.channel() as channel:
        admin = admin_pb2_grpc.AdminServiceStub(channel)
        keys = (await admin.ListKeys(admin_pb2.ListKeysRequest(tenant_id="authtest"), timeout=5)).keys
        await admin.RevokeKey(admin_pb2.RevokeKeyRequest(key_id=keys[-1].key_id), timeout=5)
    await asyncio.sleep(1.1)
    made_up = "aimass_abcdefghijkl_" + "A" * 43
    cases = {
        None: "NO_KEY",
        "not-a-key": "KEY_MALFORMED",
        made_up: "KEY_UNKNOWN",
        revoked: "KEY_REVOKED",
        expired: "KEY_EXPIRED",
    }
    for key, reason in cases.items():
        error = await call_error(sentiment(mesh.gateway, key))
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED, (key, error)
        info = error_info(error)
        assert info is not None and info.reason == reason
        assert "aimass keys create" in (error.details() or "")
    # x-api-key is accepted as well as the bearer form.
    async with grpc.aio.insecure_channel(mesh.gateway) as channel:
        reply = await nlp_pb2_grpc.NlpServiceStub(channel).Sentiment(
            SENTIMENT, timeout=10, metadata=(("x-api-key", admin_key()),)
        )
    assert reply.results[0].label == "positive"


async def test_a_host_flooding_made_up_keys_gets_no_more_lookups(nlp_engine: NlpEngine) -> None:
    async for fresh in in_process_mesh(nlp_engine):  # a gateway of its own: the flood marks this host there
        good = await new_key(fresh, "flood-test", ["infer"])
        await sentiment(fresh.gateway, good)  # proved once: cached
        reasons = []
        for index in range(25):
            error = await call_error(sentiment(fresh.gateway, f"aimass_{index:012d}_" + "C" * 43))
            info = error_info(error)
            reasons.append(info.reason if info is not None else "")
        assert reasons[:20] == ["KEY_UNKNOWN"] * 20 and set(reasons[20:]) == {"TOO_MANY_FAILURES"}, reasons
        # A key the gateway already knows keeps working for the same host; only new lookups are held back.
        await sentiment(fresh.gateway, good)
        newer = await new_key(fresh, "flood-test", ["infer"])
        held = await call_error(sentiment(fresh.gateway, newer))
        assert held.code() == grpc.StatusCode.UNAUTHENTICATED and "no more new keys" in (held.details() or "")


async def test_health_and_reflection_answer_without_a_key(mesh: InProcessMesh) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    async with grpc.aio.insecure_channel(mesh.gateway) as channel:
        status = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="aimass.v1.NlpService"), timeout=5
        )
    assert status.status == health_pb2.HealthCheckResponse.SERVING


async def test_a_key_without_the_scope_is_permission_denied(mesh: InProcessMesh) -> None:
    infer_only = await new_key(mesh, "scopetest", ["infer"])
    keys_only = await new_key(mesh, "scopetest", ["keys:admin"])
    error = await call_error(sentiment(mesh.gateway, keys_only))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED and "infer" in (error.details() or "")
    async with mesh.channel(infer_only) as channel:
        error = await call_error(
            models_pb2_grpc.ModelServiceStub(channel).UnloadModel(
                models_pb2.UnloadModelRequest(model=common_pb2.ModelRef(name="vader")), timeout=5
            )
        )
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED and "models:admin" in (error.details() or "")
        error = await call_error(
            admin_pb2_grpc.AdminServiceStub(channel).CreateKey(admin_pb2.CreateKeyRequest(scopes=["infer"]), timeout=5)
        )
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    # The model catalogue is part of inference.
    async with mesh.channel(infer_only) as channel:
        listed = await models_pb2_grpc.ModelServiceStub(channel).ListModels(models_pb2.ListModelsRequest(), timeout=5)
    assert "vader" in {m.name for m in listed.models}


async def test_a_forged_tenant_header_is_ignored(mesh: InProcessMesh) -> None:
    acme = await new_key(mesh, "acme", ["infer"])
    trailers = await sentiment(mesh.gateway, acme, ((TENANT_KEY, "admin"), ("x-aimass-tenant-weight", "1000")))
    assert dict(trailers)[TENANT_KEY] == "acme"
    # Accounting follows the key too: the replica's reports to the scheduler count the call for acme.
    assert mesh.scheduler is not None
    state = mesh.scheduler.app.state  # type: ignore[attr-defined]
    deadline = time.monotonic() + 5
    while "acme" not in state.tenants:
        assert time.monotonic() < deadline, "the call was never accounted to the key's tenant"
        await asyncio.sleep(0.05)
    assert state.tenants["acme"].requests >= 1


# -- keys and tenants: tenants kept apart ------------------------------------------------------------------------


async def test_keys_are_shown_once_and_tenants_see_only_their_own(mesh: InProcessMesh) -> None:
    alpha_admin = await new_key(mesh, "alpha", ["infer", "keys:admin", "audit:read"])
    beta = await new_key(mesh, "beta", ["infer"])
    async with mesh.channel(alpha_admin) as channel:
        admin = admin_pb2_grpc.AdminServiceStub(channel)
        made = await admin.CreateKey(admin_pb2.CreateKeyRequest(scopes=["infer"], name="ci"), timeout=5)
        assert made.key.tenant_id == "alpha" and made.secret.startswith(f"aimass_{made.key.key_id}_")
        listed = await admin.ListKeys(admin_pb2.ListKeysRequest(), timeout=5)
        assert {k.tenant_id for k in listed.keys} == {"alpha"} and made.secret not in str(listed)
        beta_id = beta.split("_")[1]
        for call in (
            admin.ListKeys(admin_pb2.ListKeysRequest(tenant_id="beta"), timeout=5),
            admin.RevokeKey(admin_pb2.RevokeKeyRequest(key_id=beta_id), timeout=5),
            admin.GetTenant(admin_pb2.GetTenantRequest(tenant_id="beta"), timeout=5),
            admin.ListAuditEvents(admin_pb2.ListAuditEventsRequest(tenant_id="beta"), timeout=5),
            admin.CreateKey(admin_pb2.CreateKeyRequest(tenant_id="beta", scopes=["infer"]), timeout=5),
        ):
            assert (await call_error(call)).code() == grpc.StatusCode.NOT_FOUND
        escalation = await call_error(admin.CreateKey(admin_pb2.CreateKeyRequest(scopes=["tenants:admin"]), timeout=5))
        assert escalation.code() == grpc.StatusCode.PERMISSION_DENIED
        every = await call_error(admin.ListKeys(admin_pb2.ListKeysRequest(tenant_id="*"), timeout=5))
        assert every.code() == grpc.StatusCode.PERMISSION_DENIED
        bad = await call_error(admin.CreateKey(admin_pb2.CreateKeyRequest(scopes=["root"]), timeout=5))
        assert bad.code() == grpc.StatusCode.INVALID_ARGUMENT and "unknown scopes root" in (bad.details() or "")
    # beta's key still works: alpha could not revoke it.
    await sentiment(mesh.gateway, beta)


async def test_a_revocation_and_a_limit_change_reach_every_gateway_within_seconds(mesh: InProcessMesh) -> None:
    key = await new_key(mesh, "everywhere", ["infer"])
    second = mesh.gateways[1].address
    await sentiment(second, key)  # the second gateway has verified and cached it
    async with mesh.channel() as channel:  # revoked through the first gateway
        admin = admin_pb2_grpc.AdminServiceStub(channel)
        await admin.RevokeKey(admin_pb2.RevokeKeyRequest(key_id=key.split("_")[1]), timeout=5)
        revoked_at = time.monotonic()
        while True:
            try:
                await sentiment(second, key)
            except grpc.aio.AioRpcError as err:
                assert err.code() == grpc.StatusCode.UNAUTHENTICATED
                break
            assert time.monotonic() - revoked_at < 3 * settings().auth.refresh_s + 2
            await asyncio.sleep(0.05)
        took = time.monotonic() - revoked_at
        # A limit set through the first gateway is applied by the second.
        await admin.SetTenant(admin_pb2.SetTenantRequest(tenant_id="everywhere", max_concurrent=3), timeout=5)
    verifier = mesh.gateway_app(1).verifier
    assert verifier is not None
    deadline = time.monotonic() + 5
    while verifier.limits_of("everywhere").max_concurrent != 3:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    print(f"revocation reached the other gateway in {took:.2f} s")


@pytest.fixture
async def postgres_mesh(nlp_engine: NlpEngine, tmp_path: Path) -> AsyncIterator[tuple[InProcessMesh, str]]:
    """Two gateways over a store on a real PostgreSQL server started here, and an operator key of that store."""
    if postgres_binaries() is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) are not installed here; `make test` installs them")
    with postgres_server(tmp_path) as url:
        store = SqlStore.open(url)
        _, operator = store.create_key("admin", keys.ADMIN_SCOPES, name="test operator")
        store.close()
        async for mesh in in_process_mesh(nlp_engine, gateways=2, store_url=url):
            yield mesh, operator


async def test_gateways_sharing_a_postgresql_store_see_each_others_keys(
    postgres_mesh: tuple[InProcessMesh, str],
) -> None:
    """The store for several gateways on several hosts: a key made on one works on the other, a revocation and a
    limit change made on one apply on the other."""
    mesh, operator = postgres_mesh
    async with mesh.channel(operator) as first:
        admin = admin_pb2_grpc.AdminServiceStub(first)
        made = await admin.CreateKey(admin_pb2.CreateKeyRequest(tenant_id="pg", scopes=["infer"]), timeout=5)
        await admin.SetTenant(admin_pb2.SetTenantRequest(tenant_id="pg", max_concurrent=5), timeout=5)
    await sentiment(mesh.gateways[1].address, made.secret)
    verifier = mesh.gateway_app(1).verifier
    assert verifier is not None
    await eventually("the limit on the second gateway", lambda: verifier.limits_of("pg").max_concurrent == 5)
    async with mesh.channel(operator, index=1) as other:
        await admin_pb2_grpc.AdminServiceStub(other).RevokeKey(
            admin_pb2.RevokeKeyRequest(key_id=made.key.key_id), timeout=5
        )

    async def refused_by_the_first() -> bool:
        try:
            await sentiment(mesh.gateway, made.secret)
        except grpc.aio.AioRpcError as err:
            return err.code() == grpc.StatusCode.UNAUTHENTICATED
        return False

    await eventually("the revocation on the first gateway", refused_by_the_first)


# -- priorities are capped per tenant ------------------------------------------------------------------------------


@pytest.fixture
async def contended(nlp_engine: NlpEngine) -> AsyncIterator[InProcessMesh]:
    """A replica that runs one Embed at a time: everything sent at once queues, in priority order."""
    async for started in in_process_mesh(nlp_engine, nlp=ONE_AT_A_TIME):
        yield started


async def test_a_tenants_priority_is_capped_at_its_max(contended: InProcessMesh) -> None:
    low_cap = await new_key(contended, "lowcap", ["infer"])
    uncapped = await new_key(contended, "queue-filler", ["infer"])
    async with contended.channel() as channel:
        await admin_pb2_grpc.AdminServiceStub(channel).SetTenant(
            admin_pb2.SetTenantRequest(tenant_id="lowcap", max_priority=common_pb2.PRIORITY_LOW), timeout=5
        )
    batcher = contended.replica_app().servicer.embed_batcher
    finished: list[str] = []

    async def embed(key: str, label: str, priority: common_pb2.Priority.ValueType) -> None:
        async with contended.channel(key) as channel:
            await nlp_pb2_grpc.NlpServiceStub(channel).Embed(
                nlp_pb2.EmbedRequest(meta=common_pb2.RequestMeta(priority=priority), texts=[f"{label} text"]),
                timeout=30,
            )
        finished.append(label)

    backlog = [asyncio.create_task(embed(uncapped, f"normal-{i}", common_pb2.PRIORITY_NORMAL)) for i in range(8)]
    await eventually("the backlog queued", lambda: batcher.stats.submitted >= 8)
    # CRITICAL asked, LOW granted: it waits behind the NORMAL backlog instead of jumping it (uncapped, it would
    # finish among the first three, as tests/test_priority.py shows).
    await embed(low_cap, "capped", common_pb2.PRIORITY_CRITICAL)
    await asyncio.gather(*backlog)
    assert finished.index("capped") >= 6, finished


# -- the CLI and the audit log --------------------------------------------------------------------------------------


def aimass(mesh: InProcessMesh, *args: str, key: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "AIMASS_API_KEY": key or admin_key()}
    return subprocess.run(
        [f"{BIN}/aimass", *args, "--gateway", mesh.gateway], env=env, capture_output=True, text=True, timeout=60
    )


async def test_the_cli_manages_keys_and_tenants_and_reads_the_audit_log(mesh: InProcessMesh) -> None:
    started_ms = int(time.time() * 1000)
    created = await asyncio.to_thread(aimass, mesh, "keys", "create", "--tenant", "clitest", "--scopes", "infer")
    assert created.returncode == 0, created.stderr
    key = created.stdout.split()[0]
    assert key.startswith("aimass_") and "shown this once" in created.stdout
    await sentiment(mesh.gateway, key)
    limited = await asyncio.to_thread(
        aimass,
        mesh,
        "tenants",
        "set",
        "clitest",
        "--rps",
        "50",
        "--concurrency",
        "8",
        "--llm-tokens-per-min",
        "20000",
        "--max-priority",
        "HIGH",
        "--weight",
        "2",
    )
    assert limited.returncode == 0, limited.stderr
    assert "clitest" in limited.stdout and "20000" in limited.stdout and "HIGH" in limited.stdout
    listed = await asyncio.to_thread(aimass, mesh, "keys", "list", "--tenant", "clitest")
    key_id = key.split("_")[1]
    assert key_id in listed.stdout and key not in listed.stdout
    me = await asyncio.to_thread(aimass, mesh, "whoami", key=key)
    assert "tenant clitest" in me.stdout and "scopes infer" in me.stdout
    # An infer-only key may not manage keys: the CLI says so and fails.
    denied = await asyncio.to_thread(aimass, mesh, "keys", "create", "--scopes", "infer", key=key)
    assert denied.returncode == 1 and "PERMISSION_DENIED" in denied.stderr
    revoked = await asyncio.to_thread(aimass, mesh, "keys", "revoke", key_id)
    assert revoked.returncode == 0, revoked.stderr
    # Refused credentials are audited (coalesced), as are the admin actions, with the key's id and never the key.
    for _ in range(5):
        with pytest.raises(grpc.aio.AioRpcError):
            await sentiment(mesh.gateway, "aimass_zzzzzzzzzzzz_" + "B" * 43)
    audit = await asyncio.to_thread(aimass, mesh, "audit", "--since", "1h", "--all")
    assert audit.returncode == 0, audit.stderr
    lines = audit.stdout.splitlines()
    assert any("keys.create" in line and key_id in line for line in lines)
    assert any("tenants.set" in line and "clitest" in line for line in lines)
    assert any("keys.revoke" in line and key_id in line for line in lines)
    refused = [line for line in lines if "auth.refused" in line and "KEY_UNKNOWN" in line]
    assert refused and all("UNAUTHENTICATED" in line for line in refused)
    assert key not in audit.stdout
    # The audit log keeps one row per kind of refusal and window, counting the rest: the five refusals of this test
    # are at most two rows (the window's first, then its repeats with their count).
    async with mesh.channel() as channel:
        await mesh.gateway_app().audit.flush()
        events = (
            await admin_pb2_grpc.AdminServiceStub(channel).ListAuditEvents(
                admin_pb2.ListAuditEventsRequest(tenant_id="*", action_prefix="auth.refused", since_unix_ms=started_ms),
                timeout=5,
            )
        ).events
    unknown = [e for e in events if e.detail.startswith("KEY_UNKNOWN")]
    assert sum(e.count for e in unknown) >= 5 and len(unknown) <= 2, unknown


async def test_the_python_client_takes_its_key_from_the_environment(
    mesh: InProcessMesh, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = await new_key(mesh, "envtest", ["infer"])
    monkeypatch.setenv("AIMASS_API_KEY", key)
    async with AsyncClient(mesh.gateway) as client:
        reply = await client.sentiment(["great"])
        me = await client.admin.who_am_i()
    assert reply.results[0].label == "positive" and me.tenant_id == "envtest"
