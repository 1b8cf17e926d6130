"""The pieces of tenancy and mesh identity on their own: keys, quotas, token windows, the request scope, the mesh
CA and role policies (the end-to-end behaviour through real servers is in test_auth.py and test_mesh_tls.py)."""

from __future__ import annotations

import datetime
import stat
from pathlib import Path

import pytest
from cryptography import x509

from aimass import pki
from aimass.runtime.errors import InvalidArgument, ResourceExhausted
from aimass.runtime.identity import ANY_REPLICA, ROLE_GATEWAY, MeshCredentials, MeshIdentity, MeshPolicy
from aimass.runtime.scope import RequestScope, priority_named, priority_rank
from aimass.tenancy import keys
from aimass.tenancy.quotas import Limits, TenantQuotas, TokenUsage, seconds_to_utc_midnight
from aimass.v1 import common_pb2, scheduler_pb2


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# -- keys ------------------------------------------------------------------------------------------------------


def test_keys_are_random_well_formed_and_only_their_hash_is_kept() -> None:
    made = {keys.new_key().key for _ in range(50)}
    assert len(made) == 50
    key = keys.new_key()
    assert keys.key_id_of(key.key) == key.key_id and len(key.key) == len("aimass_") + 12 + 1 + 43
    assert key.key_hash == keys.hash_key(key.key) and key.key not in key.key_hash
    for bad in ("", "aimass_", "Bearer x", key.key + "x", key.key.replace("aimass_", "aimaz_")):
        assert keys.key_id_of(bad) is None


def test_scopes_and_tenant_ids_are_checked() -> None:
    assert keys.check_scopes(["infer", " keys:admin "]) == {"infer", "keys:admin"}
    with pytest.raises(ValueError, match="unknown scopes root"):
        keys.check_scopes(["infer", "root"])
    with pytest.raises(ValueError, match="at least one scope"):
        keys.check_scopes([])
    assert keys.check_tenant_id("acme-eu.1") == "acme-eu.1"
    for bad in ("", "Acme", "-acme", "a" * 64, "acme corp", "x;drop"):
        with pytest.raises(ValueError, match="tenant id"):
            keys.check_tenant_id(bad)


# -- the request scope -------------------------------------------------------------------------------------------


def test_priorities_are_capped_by_the_tenant() -> None:
    capped = RequestScope(tenant="t", max_priority=common_pb2.PRIORITY_NORMAL)
    assert capped.priority(common_pb2.PRIORITY_CRITICAL) == common_pb2.PRIORITY_NORMAL
    assert capped.priority(common_pb2.PRIORITY_LOW) == common_pb2.PRIORITY_LOW
    assert capped.priority(common_pb2.PRIORITY_UNSPECIFIED) == common_pb2.PRIORITY_NORMAL
    assert RequestScope().priority(common_pb2.PRIORITY_CRITICAL) == common_pb2.PRIORITY_CRITICAL
    with pytest.raises(InvalidArgument, match=r"meta\.priority is 9"):
        capped.priority(9)
    assert priority_named("high") == common_pb2.PRIORITY_HIGH == priority_named("PRIORITY_HIGH")
    assert priority_rank(common_pb2.PRIORITY_CRITICAL) < priority_rank(common_pb2.PRIORITY_LOW)


def test_scope_round_trips_through_metadata_and_bad_values_read_as_defaults() -> None:
    scope = RequestScope(tenant="acme", weight=2.5, max_priority=common_pb2.PRIORITY_HIGH, key_id="k1")
    back = RequestScope.from_metadata((*scope.metadata(), ("x-request-id", "r1")), deadline=None)
    assert (back.tenant, back.weight, back.max_priority, back.key_id, back.request_id) == (
        "acme",
        2.5,
        common_pb2.PRIORITY_HIGH,
        "k1",
        "r1",
    )
    odd = RequestScope.from_metadata((("x-aimass-tenant-weight", "nan"), ("x-aimass-max-priority", "0")), deadline=None)
    assert odd.weight == 1.0 and odd.max_priority == common_pb2.PRIORITY_CRITICAL


# -- quotas ------------------------------------------------------------------------------------------------------


def test_requests_per_second_is_a_token_bucket_with_a_retry_delay() -> None:
    clock = Clock()
    quotas = TenantQuotas(clock=clock)
    limits = Limits(requests_per_second=2)
    for _ in range(2):
        quotas.admit("a", limits).release()
    with pytest.raises(ResourceExhausted) as refused:
        quotas.admit("a", limits)
    assert refused.value.reason == "QUOTA_EXCEEDED" and refused.value.metadata["quota"] == "requests_per_second"
    assert refused.value.retry_after_ms == 500 and refused.value.pushback_ms == 500
    quotas.admit("b", limits).release()  # another tenant is unaffected
    clock.now += 0.5
    quotas.admit("a", limits).release()


def test_concurrency_holds_until_released_and_limits_are_split_among_gateways() -> None:
    gateways = [1]
    quotas = TenantQuotas(gateways=lambda: gateways[0], clock=Clock())
    limits = Limits(max_concurrent=4)
    leases = [quotas.admit("a", limits) for _ in range(4)]
    with pytest.raises(ResourceExhausted, match="max_concurrent"):
        quotas.admit("a", limits)
    leases.pop().release()
    leases.append(quotas.admit("a", limits))
    for lease in leases:
        lease.release()
    gateways[0] = 2  # two gateways share the tenant's limit: each takes half
    half = [quotas.admit("a", limits) for _ in range(2)]
    with pytest.raises(ResourceExhausted):
        quotas.admit("a", limits)
    for lease in half:
        lease.release()


def test_llm_tokens_per_minute_and_day_refuse_with_when_they_free() -> None:
    quotas = TenantQuotas(clock=Clock())
    usage = scheduler_pb2.TenantUsage(tenant_id="a", llm_tokens_last_minute=120, llm_tokens_today=500)
    quotas.admit("a", Limits(llm_tokens_per_minute=200), llm=True, usage=usage).release()
    with pytest.raises(ResourceExhausted, match="llm_tokens_per_minute") as minute:
        quotas.admit("a", Limits(llm_tokens_per_minute=100), llm=True, usage=usage)
    assert minute.value.retry_after_ms >= 100
    with pytest.raises(ResourceExhausted, match="llm_tokens_per_day") as day:
        quotas.admit("a", Limits(llm_tokens_per_day=400), llm=True, usage=usage)
    # Hours away: reported, but no automatic retry.
    assert day.value.pushback_ms == -1 and day.value.retry_after_ms > 0
    quotas.admit("a", Limits(llm_tokens_per_day=400), llm=False, usage=usage).release()  # not an LLM call


def test_made_up_tenants_cannot_grow_quota_state() -> None:
    clock = Clock()
    quotas = TenantQuotas(max_tracked=100, idle_expiry_s=10, clock=clock)
    for index in range(5000):
        quotas.admit(f"made-up-{index}", Limits(requests_per_second=5)).release()
    assert quotas.tracked <= 100
    clock.now += 60
    quotas.admit("late", Limits(requests_per_second=5)).release()
    assert quotas.tracked == 1


def test_token_windows_slide_and_days_start_over() -> None:
    clock = Clock(datetime.datetime(2026, 12, 2, 23, 59, 0, tzinfo=datetime.UTC).timestamp())
    usage = TokenUsage(clock=clock)
    usage.load_day("2026-12-02", {"a": 1000})
    usage.add("a", 30)
    clock.now += 30
    usage.add("a", 20)
    assert usage.last_minute("a")[0] == 50 and usage.today("a") == 1050
    assert usage.take_unsaved() == [("2026-12-02", {"a": 50})]
    clock.now += 31  # the first 30 tokens leave the window; past midnight the day starts over
    assert usage.last_minute("a")[0] == 20 and usage.today("a") == 0
    usage.add("a", 5)
    assert usage.take_unsaved() == [("2026-12-03", {"a": 5})]
    assert 0 < seconds_to_utc_midnight(clock.now) <= 86400


# -- the mesh CA and role policies ---------------------------------------------------------------------------------


def test_certificates_name_role_and_identity_and_keys_are_owner_only(tmp_path: Path) -> None:
    pki_dir = tmp_path / "pki"
    pki.init_ca(pki_dir)
    files = pki.issue(pki_dir, role="nlp", name="nlp-0")
    assert stat.S_IMODE(files.key.stat().st_mode) == 0o600
    assert stat.S_IMODE(pki.ca_files(pki_dir).key.stat().st_mode) == 0o600
    assert stat.S_IMODE(pki_dir.stat().st_mode) == 0o700
    credentials = MeshCredentials.load(pki_dir, "nlp-0")
    assert credentials.identity == MeshIdentity("nlp", "nlp-0") and credentials.identity.is_replica
    cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["nlp.aimass.internal"]
    # Kept while current; issued anew for another role or after the CA changed.
    assert pki.issue(pki_dir, role="nlp", name="nlp-0").cert.read_bytes() == files.cert.read_bytes()
    pki.issue(pki_dir, role="vision", name="nlp-0")
    assert MeshCredentials.load(pki_dir, "nlp-0").identity.role == "vision"
    with pytest.raises(ValueError, match="name"):
        pki.issue(pki_dir, role="nlp", name="../etc")
    with pytest.raises(FileNotFoundError, match="aimass certs issue"):
        MeshCredentials.load(pki_dir, "nobody")


def test_policies_allow_only_the_roles_they_name() -> None:
    policy = MeshPolicy(
        {"/aimass.v1.SchedulerService/ReportLoad": (ANY_REPLICA,), "/aimass.v1.NlpService/": (ROLE_GATEWAY,)}
    )
    nlp, gateway = MeshIdentity("nlp", "nlp-0"), MeshIdentity("gateway", "gateway")
    assert policy.permits(nlp, "/aimass.v1.SchedulerService/ReportLoad")
    assert not policy.permits(gateway, "/aimass.v1.SchedulerService/ReportLoad")
    assert policy.permits(gateway, "/aimass.v1.NlpService/Embed") and not policy.permits(
        nlp, "/aimass.v1.NlpService/Embed"
    )
    assert not policy.permits(gateway, "/aimass.v1.SchedulerService/PlaceModel")  # not named: nobody


async def test_the_schedulers_tenant_accounting_is_bounded_and_expires() -> None:
    from scheduler.service import SchedulerState

    state = SchedulerState(report_interval_s=1.0, max_tenants=50, tenant_idle_expiry_s=5)
    for batch in range(20):
        state.record_load(
            scheduler_pb2.ReportLoadRequest(
                instance_id="nlp-1",
                node_id="n",
                tenant_tokens=[
                    scheduler_pb2.TenantTokens(tenant_id=f"made-up-{batch}-{i}", requests=1) for i in range(100)
                ],
            )
        )
    await state.changed()
    assert len(state.view().tenants) <= 50
    state.record_load(
        scheduler_pb2.ReportLoadRequest(
            instance_id="nlp-1", node_id="n", tenant_tokens=[scheduler_pb2.TenantTokens(tenant_id="acme", requests=1)]
        )
    )
    await state.changed()
    assert "acme" in {t.tenant_id for t in state.view().tenants}
    import time

    state.expire(now=int(time.time() * 1000) + 6000)
    assert not state.tenants


async def test_the_scheduler_keeps_the_audit_log_within_its_retention() -> None:
    import time

    from aimass.runtime.config import AuthConfig, Settings
    from aimass.store.records import AuditEvent
    from aimass.store.sql import SqlStore
    from scheduler.app import SchedulerApp

    settings = Settings(auth=AuthConfig(audit_retention_days=30))
    store = SqlStore.open(settings.store_url)
    now = int(time.time() * 1000)
    day = 86_400_000
    store.add_audit(
        [
            AuditEvent(at_unix_ms=now - 31 * day, action="keys.create", outcome="ok", target="retention-old"),
            AuditEvent(at_unix_ms=now - 29 * day, action="keys.create", outcome="ok", target="retention-kept"),
        ]
    )
    app = SchedulerApp(settings)
    try:
        assert await app.prune_audit() >= 1
    finally:
        app.store.close()
    targets = {event.target for event in store.list_audit(since_unix_ms=now - 40 * day, limit=10_000)}
    store.close()
    assert "retention-kept" in targets and "retention-old" not in targets
