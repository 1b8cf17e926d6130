"""The front door's one auth interceptor: every public call carries an API key, verified against the store.

For each call (health and reflection excepted): the key (``authorization: Bearer <key>`` or ``x-api-key``) is
checked (UNAUTHENTICATED when missing, malformed, unknown, revoked or expired, with a message saying how to get
one), its scopes against the method (PERMISSION_DENIED), then the tenant's quotas (RESOURCE_EXHAUSTED,
QUOTA_EXCEEDED, aimass.tenancy.quotas). The call then runs inside its request scope (aimass.runtime.scope): the
key's tenant, the tenant's weight and priority cap. Whatever tenant the caller wrote in metadata is ignored, and
the forwarder tells replicas the scope instead.

Keys are checked in memory: a key seen once is kept (``auth.max_cached_keys``) and checked against the store again
every ``auth.refresh_s`` in one query for all of them, with the tenants' limits, so a revocation, an expiry or a
limit change reaches every gateway within about that long while requests never wait on the store. A key the store
does not know is remembered as unknown for as long; a host that keeps presenting bad keys (``FAILURES_PER_PEER``
in ``FAILURE_WINDOW_S``) gets no more new keys looked up until its window passes (keys it already proved keep
working). Refusals are audited (coalesced, aimass.tenancy.audit).

Who "a host" is: the connection's address, except for calls from a front-door adapter (the REST process) on the
gateway's adapter listener, which carry the adapter's mesh certificate (role in ADAPTER_ROLES, verified by mTLS):
there the address of the adapter's own client, sent in ``x-aimass-caller-peer``, is throttled and audited instead,
so one abusive REST client does not lock every other out. Anyone else's ``x-aimass-caller-peer`` is ignored, and a
mesh certificate of another role is refused on that listener (the public port verifies no client certificates).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ipaddress
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from typing import Any, Final

import prometheus_client

from aimass.runtime.config import AuthConfig, TenantsConfig
from aimass.runtime.errors import AimassError, PermissionDenied, Unauthenticated
from aimass.runtime.identity import ADAPTER_ROLES, peer_identity
from aimass.runtime.interceptors import AroundInterceptor, Context, rule_for
from aimass.runtime.metadata import CALLER_PEER_KEY, metadata_value, metadata_values, tenant_of
from aimass.runtime.scope import RequestScope, current_scope, deadline_of, entered, priority_named
from aimass.runtime.tasks import cancel_and_wait
from aimass.store.records import AuditEvent, KeyRecord, TenantRecord, now_ms
from aimass.store.sql import SqlStore
from aimass.tenancy import keys
from aimass.tenancy.audit import AuditLog, peer_host
from aimass.tenancy.quotas import Limits, TenantQuotas
from aimass.v1 import scheduler_pb2

log = logging.getLogger(__name__)

AUTH_REFUSED = prometheus_client.Counter(
    "aimass_gateway_auth_refused_total", "Calls refused at the front door, by reason.", ["reason"]
)
QUOTA_REFUSED = prometheus_client.Counter(
    "aimass_gateway_quota_refused_total", "Calls refused by a tenant's quota, by quota.", ["quota"]
)
# Workers share the gateway's port and the kernel spreads connections over them (gateway/workers.py): this shows how.
WORKER_CALLS = prometheus_client.Counter(
    "aimass_gateway_worker_calls_total", "Calls admitted at the front door, by gateway worker.", ["worker"]
)

# What a key needs for each method (any one of the scopes listed); a method not named needs a valid key only.
_INFER = frozenset({keys.SCOPE_INFER})
_ADMIN = frozenset({keys.SCOPE_TENANTS_ADMIN})
METHOD_SCOPES: Final[dict[str, frozenset[str]]] = {
    "/aimass.v1.NlpService/": _INFER,
    "/aimass.v1.VisionService/": _INFER,
    "/aimass.v1.SpeechService/": _INFER,
    "/aimass.v1.LlmService/": _INFER,
    "/aimass.v1.ModelService/ListModels": _INFER,
    # The Open Inference Protocol (gateway/oip), every method: probes use grpc.health.v1, which needs no key.
    "/inference.GRPCInferenceService/": _INFER,
    "/aimass.v1.ModelService/DescribeModel": _INFER,
    # The mesh's status; what a key sees of other tenants and of addresses is the servicer's (gateway/cluster.py).
    "/aimass.v1.ClusterService/": _INFER,
    # Composite calls (gateway/composition.py); each of their stages needs its own method's scopes too.
    "/aimass.v1.AssistantService/": _INFER,
    "/aimass.v1.ScenarioService/": _INFER,
    "/aimass.v1.DatasetService/": frozenset({keys.SCOPE_MODELS_TRAIN}),
    "/aimass.v1.TrainingService/": frozenset({keys.SCOPE_MODELS_TRAIN}),
    "/aimass.v1.DeploymentService/": frozenset({keys.SCOPE_MODELS_TRAIN}),
    "/aimass.v1.ModelService/LoadModel": frozenset({keys.SCOPE_MODELS_ADMIN}),
    "/aimass.v1.ModelService/UnloadModel": frozenset({keys.SCOPE_MODELS_ADMIN}),
    "/aimass.v1.AdminService/CreateKey": frozenset({keys.SCOPE_KEYS_ADMIN, keys.SCOPE_TENANTS_ADMIN}),
    "/aimass.v1.AdminService/ListKeys": frozenset({keys.SCOPE_KEYS_ADMIN, keys.SCOPE_TENANTS_ADMIN}),
    "/aimass.v1.AdminService/RevokeKey": frozenset({keys.SCOPE_KEYS_ADMIN, keys.SCOPE_TENANTS_ADMIN}),
    "/aimass.v1.AdminService/SetTenant": _ADMIN,
    "/aimass.v1.AdminService/ListTenants": _ADMIN,
    "/aimass.v1.AdminService/ListAuditEvents": frozenset({keys.SCOPE_AUDIT_READ, keys.SCOPE_TENANTS_ADMIN}),
}
# Calls that generate LLM tokens: the tenant's token quotas apply to them.
LLM_GENERATION: Final = frozenset({"/aimass.v1.LlmService/Chat", "/aimass.v1.LlmService/Generate"})
# Calls outside the tenant's request quotas: WhoAmI only reads the verified key (the REST front door asks it before
# reading a large upload, which would otherwise cost a low-rate tenant two requests); the server's admission bounds it.
# A composite call costs nothing itself: each of its stages is metered as the call it is (ApiKeyInterceptor.stage).
QUOTA_FREE: Final = frozenset(
    {
        "/aimass.v1.AdminService/WhoAmI",
        "/aimass.v1.AssistantService/Converse",
        "/aimass.v1.ScenarioService/RunScenario",
    }
)

FAILURES_PER_PEER: Final = 20
FAILURE_WINDOW_S: Final = 10.0
MAX_TRACKED_PEERS: Final = 10_000
HOW_TO_GET_A_KEY: Final = (
    "send 'authorization: Bearer <key>'; an operator makes keys with `aimass keys create --tenant NAME` (the admin "
    "key of `aimass up` is in its state directory, admin.key)"
)


def caller_peer(context: Context) -> str:
    """The address a call comes from, for the bad-key throttle and the audit log: the client address a verified
    front-door adapter passes on in ``x-aimass-caller-peer`` (an IP, in grpc's "ipv4:HOST:PORT" form), else the
    connection's. From any other caller that metadata is ignored: nobody picks their own address."""
    identity = peer_identity(context)
    if identity is not None and identity.role in ADAPTER_ROLES:
        claimed = metadata_value(context.invocation_metadata(), CALLER_PEER_KEY)
        if claimed and _is_ip_peer(claimed):
            return claimed
    return context.peer()


def _is_ip_peer(peer: str) -> bool:
    if len(peer) > 64 or not peer.startswith(("ipv4:", "ipv6:")):
        return False
    try:
        ipaddress.ip_address(peer_host(peer))
    except ValueError:
        return False
    return True


def check_adapter(context: Context, method: str) -> None:
    """A call with a verified mesh certificate came through the adapter listener (the public port asks for none):
    only adapter roles may use it (PERMISSION_DENIED for any other mesh identity)."""
    identity = peer_identity(context)
    if identity is not None and identity.role not in ADAPTER_ROLES:
        raise PermissionDenied(
            f"{identity} may not call {method} on the gateway's adapter listener; it is for front-door adapters "
            f"({', '.join(sorted(ADAPTER_ROLES))}): call the public port with an API key",
            reason="ROLE_NOT_ALLOWED",
            metadata={"role": identity.role},
        )


def required_scopes(method: str) -> frozenset[str]:
    return rule_for(METHOD_SCOPES, method) or frozenset()


def check_scopes_allow(method: str, key_id: str, tenant: str, scopes: frozenset[str]) -> None:
    """PERMISSION_DENIED (MISSING_SCOPE) unless a key with ``scopes`` may call ``method`` (itself, or as a stage of a
    composite call it made)."""
    needed = required_scopes(method)
    if needed and not needed & scopes:
        raise PermissionDenied(
            f"key {key_id} (tenant {tenant!r}, scopes {', '.join(sorted(scopes))}) may not call {method}: it needs "
            f"one of the scopes {', '.join(sorted(needed))}",
            reason="MISSING_SCOPE",
            metadata={"key_id": key_id, "tenant": tenant, "needed": ",".join(sorted(needed))},
        )


# Read in one pass over a call's metadata.
CALL_METADATA: Final = ("x-request-id", "authorization", "x-api-key")


def presented_key(metadata: Iterable[Any] | None, found: dict[str, str] | None = None) -> str:
    """The API key a call carries: ``authorization: Bearer <key>`` or ``x-api-key: <key>`` ("" when none).
    ``found``: those entries already read (``metadata_values`` with CALL_METADATA)."""
    if found is None:
        found = metadata_values(metadata, ("authorization", "x-api-key"))
    scheme, _, credential = found["authorization"].strip().partition(" ")
    if scheme.lower() == "bearer" and credential.strip():
        return credential.strip()
    return found["x-api-key"].strip()


class KeyVerifier:
    """Verified keys and tenants' limits, in memory, kept in step with the store."""

    def __init__(self, store: SqlStore, auth: AuthConfig, tenants: TenantsConfig) -> None:
        self.store = store
        self.auth = auth
        self.tenants_config = tenants
        self.default_max_priority = priority_named(tenants.default_max_priority)
        # key hash → the key as last read from the store (recency order, bounded).
        self._keys: collections.OrderedDict[str, KeyRecord] = collections.OrderedDict()
        # key hash → until when (monotonic) the store did not know it.
        self._unknown: collections.OrderedDict[str, float] = collections.OrderedDict()
        self._lookups: dict[str, asyncio.Task[KeyRecord | None]] = {}
        self._tenants: dict[str, TenantRecord] = {}
        # tenant → its Limits, built once per change of the tenants read (every call asks for them).
        self._limits: dict[str, Limits] = {}
        self._failures: collections.OrderedDict[str, tuple[float, int]] = collections.OrderedDict()
        self._task: asyncio.Task[None] | None = None
        self._store_failing = False

    async def start(self) -> None:
        await self._refresh()
        self._task = asyncio.get_running_loop().create_task(self._keep_fresh(), name="key-refresh")

    async def close(self) -> None:
        await cancel_and_wait(self._task)

    # -- limits ------------------------------------------------------------------------------------------------

    def tenant(self, tenant_id: str) -> TenantRecord | None:
        return self._tenants.get(tenant_id)

    def known_tenants(self) -> list[str]:
        """Every tenant the store had at the last refresh (in memory: no store call)."""
        return sorted(self._tenants)

    def limits_of(self, tenant_id: str) -> Limits:
        """The tenant's limits as they apply: the store's, with the configured defaults where it says 0."""
        limits = self._limits.get(tenant_id)
        if limits is None:
            limits = self._limits[tenant_id] = self._limits_from_record(tenant_id)
        return limits

    def _limits_from_record(self, tenant_id: str) -> Limits:
        record = self._tenants.get(tenant_id)
        weight = self.tenants_config.weights.get(tenant_id, 1.0)
        if record is None:
            return Limits(max_priority=self.default_max_priority, weight=weight)
        return Limits(
            requests_per_second=record.requests_per_second,
            max_concurrent=record.max_concurrent,
            llm_tokens_per_minute=record.llm_tokens_per_minute,
            llm_tokens_per_day=record.llm_tokens_per_day,
            max_priority=record.max_priority or self.default_max_priority,
            weight=record.weight or weight,
        )

    def tenant_changed(self, record: TenantRecord) -> None:
        """This gateway changed a tenant: apply it now rather than at the next refresh."""
        self._tenants[record.tenant_id] = record
        self._limits.pop(record.tenant_id, None)

    # -- keys --------------------------------------------------------------------------------------------------

    async def verify(self, key: str, peer: Callable[[], str]) -> KeyRecord:
        """The usable key record for ``key``, or Unauthenticated saying why not. ``peer`` gives the caller's address,
        asked for only when it matters: a key to look up in the store, or a refusal."""
        if keys.key_id_of(key) is None:
            self._failed(peer)
            raise Unauthenticated(
                "the API key is not in the form aimass_<key id>_<secret>; " + HOW_TO_GET_A_KEY, reason="KEY_MALFORMED"
            )
        key_hash = keys.hash_key(key)
        record = self._keys.get(key_hash)
        if record is None:
            # Only lookups are held back from a host that keeps failing: keys it already proved keep working.
            self._check_peer(peer)
            record = await self._lookup(key_hash)
        else:
            self._keys.move_to_end(key_hash)
        if record is None:
            self._failed(peer)
            raise Unauthenticated("the API key is not known to this mesh; " + HOW_TO_GET_A_KEY, reason="KEY_UNKNOWN")
        state = record.state(now_ms())
        if state != "active":
            self._failed(peer)
            raise Unauthenticated(
                f"the API key {record.key_id} is {state}; ask for a new one ({HOW_TO_GET_A_KEY})",
                reason=f"KEY_{state.upper()}",
                metadata={"key_id": record.key_id, "tenant": record.tenant_id},
            )
        return record

    async def _lookup(self, key_hash: str) -> KeyRecord | None:
        until = self._unknown.get(key_hash)
        if until is not None and until > time.monotonic():
            return None
        # Concurrent first calls with one key share one query, which runs on its own: a caller that goes away does
        # not cancel it for the others.
        task = self._lookups.get(key_hash)
        if task is None:
            task = self._lookups[key_hash] = asyncio.get_running_loop().create_task(self._fetch(key_hash))
            task.add_done_callback(lambda done: self._lookup_done(key_hash, done))
        return await asyncio.shield(task)

    async def _fetch(self, key_hash: str) -> KeyRecord | None:
        found = (await asyncio.to_thread(self.store.keys_by_hash, [key_hash])).get(key_hash)
        if found is not None and found.tenant_id not in self._tenants:
            tenant = await asyncio.to_thread(self.store.get_tenant, found.tenant_id)
            if tenant is not None:
                self._tenants[tenant.tenant_id] = tenant
                self._limits.pop(tenant.tenant_id, None)
        self._remember(key_hash, found)
        return found

    def _lookup_done(self, key_hash: str, task: asyncio.Task[KeyRecord | None]) -> None:
        del self._lookups[key_hash]
        if not task.cancelled():
            task.exception()  # retrieved here too: its callers may all have gone

    def _remember(self, key_hash: str, record: KeyRecord | None) -> None:
        if record is None:
            self._unknown[key_hash] = time.monotonic() + self.auth.refresh_s
            while len(self._unknown) > self.auth.max_cached_keys:
                self._unknown.popitem(last=False)
            return
        self._unknown.pop(key_hash, None)
        self._keys[key_hash] = record
        while len(self._keys) > self.auth.max_cached_keys:
            self._keys.popitem(last=False)

    def forget_key(self, key_id: str) -> None:
        """This gateway revoked ``key_id``: look it up again at its next use."""
        for key_hash, record in list(self._keys.items()):
            if record.key_id == key_id:
                del self._keys[key_hash]

    def _check_peer(self, peer: Callable[[], str]) -> None:
        if not self._failures:
            return
        host = peer_host(peer())
        entry = self._failures.get(host)
        if entry is None:
            return
        started, count = entry
        if time.monotonic() - started > FAILURE_WINDOW_S:
            del self._failures[host]
        elif count >= FAILURES_PER_PEER:
            raise Unauthenticated(
                f"{count} calls from {host} presented bad API keys in the last {FAILURE_WINDOW_S:g} s; no more new "
                f"keys are looked up for it until that window passes",
                reason="TOO_MANY_FAILURES",
            )

    def _failed(self, peer: Callable[[], str]) -> None:
        host = peer_host(peer())
        now = time.monotonic()
        started, count = self._failures.pop(host, (now, 0))
        if now - started > FAILURE_WINDOW_S:
            started, count = now, 0
        self._failures[host] = (started, count + 1)
        while len(self._failures) > MAX_TRACKED_PEERS:
            self._failures.popitem(last=False)

    # -- keeping in step with the store ------------------------------------------------------------------------

    async def _keep_fresh(self) -> None:
        while True:
            await asyncio.sleep(self.auth.refresh_s)
            try:
                await self._refresh()
            except Exception as err:  # the store is away: keep the last state, say so once
                if not self._store_failing:
                    log.error("key store unreachable (%s); verifying keys on the last state read", err)
                self._store_failing = True
                continue
            if self._store_failing:
                log.info("key store reachable again")
            self._store_failing = False

    async def _refresh(self) -> None:
        hashes = list(self._keys)
        tenants, records = await asyncio.to_thread(self._read, hashes)
        self._tenants = {tenant.tenant_id: tenant for tenant in tenants}
        self._limits = {}
        for key_hash in hashes:
            record = records.get(key_hash)
            if record is None:
                self._keys.pop(key_hash, None)
            elif key_hash in self._keys:
                self._keys[key_hash] = record
        now = time.monotonic()
        for key_hash in [h for h, until in self._unknown.items() if until <= now]:
            del self._unknown[key_hash]

    def _read(self, hashes: list[str]) -> tuple[list[TenantRecord], dict[str, KeyRecord]]:
        return self.store.list_tenants(), self.store.keys_by_hash(hashes) if hashes else {}


class ApiKeyInterceptor(AroundInterceptor):
    """Authenticates, authorises and meters every public call; see the module's docstring."""

    def __init__(
        self,
        verifier: KeyVerifier | None,
        quotas: TenantQuotas,
        audit: AuditLog | None,
        *,
        usage: Callable[[str], scheduler_pb2.TenantUsage | None] = lambda tenant: None,
        tenants: TenantsConfig | None = None,
        worker: str = "0",
    ) -> None:
        super().__init__()
        # None: auth.mode = "off".
        self.verifier = verifier
        self.quotas = quotas
        self.audit = audit
        self.usage = usage
        self.tenants = tenants or TenantsConfig()
        self._admitted = WORKER_CALLS.labels(worker)

    @contextlib.asynccontextmanager
    async def around(self, method: str, context: Context) -> AsyncIterator[None]:
        try:
            check_adapter(context, method)
            scope, limits = await self._scope(method, context)
        except AimassError as err:
            AUTH_REFUSED.labels(err.reason).inc()
            self._audit_refusal(method, context, err)
            raise  # wrap_handler answers it, after reading what is left of a client stream
        lease = None
        if limits is not None and method not in QUOTA_FREE:
            try:
                lease = self.quotas.admit(
                    scope.tenant, limits, llm=method in LLM_GENERATION, usage=self.usage(scope.tenant)
                )
            except AimassError as err:
                QUOTA_REFUSED.labels(err.metadata.get("quota", "")).inc()
                raise
        self._admitted.inc()
        try:
            with entered(scope):
                yield
        finally:
            if lease is not None:
                lease.release()

    @contextlib.contextmanager
    def stage(self, method: str) -> Iterator[None]:
        """A composite call's stage (gateway/composition.py), admitted as if its caller had made it: the key's
        scopes must allow ``method``, and it holds the tenant's quotas while it runs."""
        if self.verifier is None:
            yield
            return
        scope = current_scope()
        check_scopes_allow(method, scope.key_id, scope.tenant, scope.scopes)
        try:
            lease = self.quotas.admit(
                scope.tenant,
                self.verifier.limits_of(scope.tenant),
                llm=method in LLM_GENERATION,
                usage=self.usage(scope.tenant),
            )
        except AimassError as err:
            QUOTA_REFUSED.labels(err.metadata.get("quota", "")).inc()
            raise
        try:
            yield
        finally:
            lease.release()

    async def _scope(self, method: str, context: Context) -> tuple[RequestScope, Limits | None]:
        """The call's scope from its key, and its tenant's limits (None with auth off: no quotas)."""
        metadata = context.invocation_metadata()
        found = metadata_values(metadata, CALL_METADATA)
        deadline = deadline_of(context)
        if self.verifier is None:
            # auth.mode = "off": anyone, as whichever tenant they say (throwaway development only).
            tenant = tenant_of(metadata)
            scope = RequestScope(
                tenant=tenant,
                weight=self.tenants.weights.get(tenant, 1.0),
                request_id=found["x-request-id"],
                deadline=deadline,
            )
            return scope, None
        key = presented_key(metadata, found)
        if not key:
            raise Unauthenticated(f"{method} needs an API key: {HOW_TO_GET_A_KEY}", reason="NO_KEY")
        record = await self.verifier.verify(key, lambda: caller_peer(context))
        check_scopes_allow(method, record.key_id, record.tenant_id, record.scopes)
        limits = self.verifier.limits_of(record.tenant_id)
        scope = RequestScope(
            tenant=record.tenant_id,
            weight=limits.weight,
            max_priority=limits.max_priority,
            key_id=record.key_id,
            scopes=record.scopes,
            request_id=found["x-request-id"],
            deadline=deadline,
        )
        return scope, limits

    def _audit_refusal(self, method: str, context: Context, err: AimassError) -> None:
        if self.audit is None:
            return
        self.audit.refused(
            AuditEvent(
                at_unix_ms=now_ms(),
                action="auth.refused",
                outcome=err.code.name,
                tenant_id=err.metadata.get("tenant", ""),
                key_id=err.metadata.get("key_id", ""),
                target=method,
                detail=err.reason,
                peer=caller_peer(context),
            )
        )
