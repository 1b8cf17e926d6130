"""Tenants' quotas through real gateways: requests per second and in flight, refused with QUOTA_EXCEEDED, the quota
and a retry delay that aimass.client honours, another tenant unaffected; and the limit held for the mesh as a whole
with two gateways in front (LLM token quotas are tested with a real LLM replica in test_llm.py)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from aimass.client import AsyncClient, error_info
from aimass.v1 import admin_pb2, admin_pb2_grpc, nlp_pb2, nlp_pb2_grpc
from services.nlp.engine import NlpEngine
from tests.eventually import eventually
from tests.inprocess_mesh import InProcessMesh, in_process_mesh

SENTIMENT = nlp_pb2.SentimentRequest(texts=["quotas are fair"])


@pytest.fixture(scope="module")
async def mesh(nlp_engine: NlpEngine) -> AsyncIterator[InProcessMesh]:
    async for started in in_process_mesh(nlp_engine, gateways=2):
        yield started


async def tenant_key(mesh: InProcessMesh, tenant: str, **limits: Any) -> str:
    async with mesh.channel() as channel:
        admin = admin_pb2_grpc.AdminServiceStub(channel)
        await admin.SetTenant(admin_pb2.SetTenantRequest(tenant_id=tenant, **limits), timeout=5)
        created = await admin.CreateKey(admin_pb2.CreateKeyRequest(tenant_id=tenant, scopes=["infer"]), timeout=5)
    # Every gateway applies the limits from its next refresh of the store.
    verifiers = [mesh.gateway_app(index).verifier for index in range(len(mesh.gateways))]
    await eventually(
        f"every gateway knows {tenant}", lambda: all(v is not None and v.tenant(tenant) for v in verifiers)
    )
    return created.secret


async def sentiment(channel: grpc.aio.Channel) -> grpc.StatusCode:
    try:
        await nlp_pb2_grpc.NlpServiceStub(channel).Sentiment(SENTIMENT, timeout=10)
    except grpc.aio.AioRpcError as err:
        return err.code()
    return grpc.StatusCode.OK


async def test_a_tenant_over_its_rate_is_refused_with_the_quota_and_a_delay(mesh: InProcessMesh) -> None:
    # Two gateways share the rate: this one admits 2 a second (a second's burst), the other 2 more.
    slow = await tenant_key(mesh, "rate-limited", requests_per_second=4)
    other = await tenant_key(mesh, "rate-free")
    async with mesh.channel(slow) as limited, mesh.channel(other) as free:
        stub = nlp_pb2_grpc.NlpServiceStub(limited)
        codes = [await sentiment(limited) for _ in range(2)]
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Sentiment(SENTIMENT, timeout=10)
        # Meanwhile another tenant is served as if nothing happened.
        assert [await sentiment(free) for _ in range(10)] == [grpc.StatusCode.OK] * 10
    assert codes == [grpc.StatusCode.OK] * 2
    error = refused.value
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    info = error_info(error)
    assert info is not None and info.reason == "QUOTA_EXCEEDED"
    assert info.metadata["quota"] == "requests_per_second" and info.metadata["limit"] == "4"
    assert 0 < int(info.metadata["retry_after_ms"]) <= 1000
    assert dict(error.trailing_metadata() or ())["grpc-retry-pushback-ms"] == info.metadata["retry_after_ms"]
    assert "rate-limited" in (error.details() or "") and "retry in" in (error.details() or "")


async def test_the_client_honours_the_retry_delay(mesh: InProcessMesh) -> None:
    key = await tenant_key(mesh, "patient", requests_per_second=4)
    started = time.monotonic()
    async with AsyncClient(mesh.gateway, api_key=key, max_attempts=5) as client:
        replies = [await client.sentiment(["wait for it"]) for _ in range(10)]
    elapsed = time.monotonic() - started
    assert all(r.results for r in replies)
    # A burst of 4, then 4 a second: the last of 10 cannot come before ~1.5 s; every refusal was retried after the
    # pushback by gRPC itself, none reached the caller.
    assert elapsed >= 1.2, elapsed


async def test_requests_in_flight_are_limited_per_tenant(mesh: InProcessMesh) -> None:
    key = await tenant_key(mesh, "two-at-a-time", max_concurrent=4)
    texts = [f"sentence number {i} about concurrency limits" for i in range(200)]
    async with mesh.channel(key) as channel:
        stub = nlp_pb2_grpc.NlpServiceStub(channel)

        async def embed() -> str:
            try:
                await stub.Embed(nlp_pb2.EmbedRequest(texts=texts), timeout=60)
            except grpc.aio.AioRpcError as err:
                info = error_info(err)
                return info.metadata["quota"] if info is not None else err.code().name
            return "ok"

        # Two gateways share the limit: each holds at most half.
        outcomes = await asyncio.gather(*(embed() for _ in range(8)))
    assert outcomes.count("ok") == 2 and outcomes.count("max_concurrent") == 6, outcomes


async def test_the_rate_holds_for_the_mesh_with_two_gateways(mesh: InProcessMesh) -> None:
    """Both gateways enforce half of the tenant's rate: traffic spread over both gets the whole rate, not twice it;
    traffic that all reaches one gets its half (the split's known error, on the safe side)."""
    rate, seconds = 10.0, 3.0
    key = await tenant_key(mesh, "mesh-wide", requests_per_second=rate)

    async def hammer(index: int, until: float) -> int:
        ok = 0
        async with mesh.channel(key, index=index) as channel:
            while time.monotonic() < until:
                if await sentiment(channel) == grpc.StatusCode.OK:
                    ok += 1
                await asyncio.sleep(0.005)
        return ok

    until = time.monotonic() + seconds
    spread = sum(await asyncio.gather(*(hammer(i % 2, until) for i in range(4))))
    await asyncio.sleep(1.5)  # buckets refill
    until = time.monotonic() + seconds
    one_side = sum(await asyncio.gather(*(hammer(0, until) for _ in range(4))))
    # Spread: the whole rate plus each gateway's one-second burst; never the 2x that two unaware gateways allow.
    allowed = rate * seconds + rate
    print(
        f"mesh-wide rate {rate}/s over {seconds} s: spread over 2 gateways {spread} admitted (bound {allowed:.0f}),"
        f" all to one gateway {one_side}"
    )
    assert rate * seconds * 0.8 <= spread <= allowed + 2
    assert one_side <= (rate / 2) * seconds + rate / 2 + 2
