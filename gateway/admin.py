"""aimass.v1.AdminService: tenants, their API keys and limits, and the audit log, over the store every gateway shares.

The front door has already verified the caller's key and its scope for the method (gateway/auth.py); this servicer
keeps tenants apart: without ``tenants:admin`` a key sees and manages its own tenant only, and another tenant's
keys, limits and events answer NOT_FOUND, as if they did not exist. A key never grants scopes it lacks. Every
change is audited.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, TypeVar

import grpc

from aimass.runtime.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied
from aimass.runtime.scope import RequestScope, current_scope, priority_name
from aimass.store.records import TENANT_LIMIT_FIELDS, AuditEvent, KeyRecord, TenantRecord, now_ms
from aimass.store.sql import SqlStore
from aimass.tenancy import keys
from aimass.tenancy.audit import AuditLog
from aimass.tenancy.quotas import Limits
from aimass.v1 import admin_pb2, admin_pb2_grpc, common_pb2
from gateway.auth import KeyVerifier, caller_peer

Context = grpc.aio.ServicerContext[Any, Any]
T = TypeVar("T")
ALL_TENANTS = "*"
DEFAULT_AUDIT_LIMIT = 100
MAX_AUDIT_LIMIT = 10_000


def api_key(record: KeyRecord) -> admin_pb2.ApiKey:
    return admin_pb2.ApiKey(
        key_id=record.key_id,
        tenant_id=record.tenant_id,
        scopes=sorted(record.scopes),
        name=record.name,
        created_unix_ms=record.created_unix_ms,
        expires_unix_ms=record.expires_unix_ms,
        revoked_unix_ms=record.revoked_unix_ms,
        state=record.state(now_ms()),
        created_by=record.created_by,
    )


def limits_message(limits: Limits | TenantRecord) -> admin_pb2.TenantLimits:
    return admin_pb2.TenantLimits(
        requests_per_second=limits.requests_per_second,
        max_concurrent=limits.max_concurrent,
        llm_tokens_per_minute=limits.llm_tokens_per_minute,
        llm_tokens_per_day=limits.llm_tokens_per_day,
        max_priority=common_pb2.Priority.ValueType(limits.max_priority),
        weight=limits.weight,
    )


def audit_message(event: AuditEvent) -> admin_pb2.AuditEvent:
    return admin_pb2.AuditEvent(
        id=event.id,
        at_unix_ms=event.at_unix_ms,
        action=event.action,
        outcome=event.outcome,
        tenant_id=event.tenant_id,
        key_id=event.key_id,
        target=event.target,
        detail=event.detail,
        peer=event.peer,
        count=event.count,
    )


def _shown(field: str, value: float) -> str:
    if field == "max_priority":
        return priority_name(int(value)) if value else "default"
    return f"{value:g}"


class AdminServicer(admin_pb2_grpc.AdminServiceServicer):
    def __init__(self, store: SqlStore, verifier: KeyVerifier | None, audit: AuditLog) -> None:
        self.store = store
        # None: auth.mode = "off", where nobody is anybody and keys mean nothing.
        self._verifier = verifier
        self.audit = audit

    @property
    def verifier(self) -> KeyVerifier:
        if self._verifier is None:
            raise FailedPrecondition(
                'auth.mode is "off" on this gateway: there are no callers to tell apart, so keys and tenants cannot '
                "be managed here; turn auth on (the default)",
                reason="AUTH_OFF",
            )
        return self._verifier

    def _caller(self) -> RequestScope:
        """The calling key's scope (FAILED_PRECONDITION with auth off)."""
        _ = self.verifier
        return current_scope()

    async def _store(self, call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """A store call, off the event loop; a ValueError from it (a bad tenant id, field or value) is the
        caller's INVALID_ARGUMENT."""
        try:
            return await asyncio.to_thread(call, *args, **kwargs)
        except ValueError as err:
            raise InvalidArgument(str(err), reason="BAD_REQUEST") from err

    def _tenant(self, scope: RequestScope, asked: str, *, allow_all: bool = False) -> str | None:
        """The tenant a request is about: the caller's own when none is named; another (or every one, None) only
        for tenants:admin, NOT_FOUND otherwise (another tenant's data does not exist for this caller)."""
        admin = keys.SCOPE_TENANTS_ADMIN in scope.scopes
        if not asked or asked == scope.tenant:
            return scope.tenant
        if asked == ALL_TENANTS and allow_all:
            if not admin:
                raise PermissionDenied(
                    "listing every tenant's data needs the tenants:admin scope", reason="MISSING_SCOPE"
                )
            return None
        if not admin:
            raise NotFound(f"tenant {asked!r} not found", reason="TENANT_NOT_FOUND")
        return asked

    def _tenant_message(self, record: TenantRecord) -> admin_pb2.Tenant:
        return admin_pb2.Tenant(
            tenant_id=record.tenant_id,
            limits=limits_message(record),
            effective=limits_message(self.verifier.limits_of(record.tenant_id)),
            created_unix_ms=record.created_unix_ms,
            updated_unix_ms=record.updated_unix_ms,
        )

    async def WhoAmI(self, request: admin_pb2.WhoAmIRequest, context: Context) -> admin_pb2.WhoAmIResponse:
        scope = self._caller()
        record = self.verifier.tenant(scope.tenant) or TenantRecord(tenant_id=scope.tenant)
        return admin_pb2.WhoAmIResponse(
            tenant_id=scope.tenant,
            key_id=scope.key_id,
            scopes=sorted(scope.scopes),
            tenant=self._tenant_message(record),
        )

    async def CreateKey(self, request: admin_pb2.CreateKeyRequest, context: Context) -> admin_pb2.CreateKeyResponse:
        scope = self._caller()
        tenant = self._tenant(scope, request.tenant_id)
        assert tenant is not None
        try:
            keys.check_tenant_id(tenant)
            wanted = keys.check_scopes(request.scopes)
        except ValueError as err:
            raise InvalidArgument(str(err), reason="BAD_REQUEST") from err
        beyond = wanted - scope.scopes
        if beyond:
            raise PermissionDenied(
                f"a key cannot grant scopes it lacks: {', '.join(sorted(beyond))} (this key has "
                f"{', '.join(sorted(scope.scopes))})",
                reason="SCOPE_ESCALATION",
            )
        if request.expires_in_seconds < 0:
            raise InvalidArgument("expires_in_seconds is negative; send 0 (never) or more", reason="BAD_REQUEST")
        expires = now_ms() + request.expires_in_seconds * 1000 if request.expires_in_seconds else 0
        record, secret = await self._store(
            self.store.create_key,
            tenant,
            wanted,
            name=request.name,
            expires_unix_ms=expires,
            created_by=scope.key_id,
        )
        self.audit.record_action(
            scope,
            "keys.create",
            record.key_id,
            peer=caller_peer(context),
            detail=f"tenant={tenant} scopes={','.join(sorted(wanted))}",
        )
        return admin_pb2.CreateKeyResponse(key=api_key(record), secret=secret)

    async def ListKeys(self, request: admin_pb2.ListKeysRequest, context: Context) -> admin_pb2.ListKeysResponse:
        tenant = self._tenant(self._caller(), request.tenant_id, allow_all=True)
        records = await self._store(self.store.list_keys, tenant)
        return admin_pb2.ListKeysResponse(keys=[api_key(record) for record in records])

    async def RevokeKey(self, request: admin_pb2.RevokeKeyRequest, context: Context) -> admin_pb2.RevokeKeyResponse:
        scope = self._caller()
        if not request.key_id:
            raise InvalidArgument("key_id is empty; `aimass keys list` shows them", reason="BAD_REQUEST")
        only = None if keys.SCOPE_TENANTS_ADMIN in scope.scopes else scope.tenant
        record = await self._store(self.store.revoke_key, request.key_id, tenant_id=only)
        if record is None:
            raise NotFound(f"key {request.key_id!r} not found", reason="KEY_NOT_FOUND")
        self.verifier.forget_key(record.key_id)
        self.audit.record_action(
            scope, "keys.revoke", record.key_id, peer=caller_peer(context), detail=f"tenant={record.tenant_id}"
        )
        return admin_pb2.RevokeKeyResponse(key=api_key(record))

    async def SetTenant(self, request: admin_pb2.SetTenantRequest, context: Context) -> admin_pb2.SetTenantResponse:
        scope = self._caller()
        changes: dict[str, float | int] = {
            field: getattr(request, field)
            for field in TENANT_LIMIT_FIELDS
            if request.HasField(field)  # type: ignore[arg-type]
        }
        if not request.tenant_id:
            raise InvalidArgument("tenant_id is empty", reason="BAD_REQUEST")
        record = await self._store(self.store.set_tenant, request.tenant_id, **changes)
        self.verifier.tenant_changed(record)
        detail = " ".join(f"{field}={_shown(field, value)}" for field, value in changes.items()) or "no change"
        self.audit.record_action(scope, "tenants.set", record.tenant_id, peer=caller_peer(context), detail=detail)
        return admin_pb2.SetTenantResponse(tenant=self._tenant_message(record))

    async def GetTenant(self, request: admin_pb2.GetTenantRequest, context: Context) -> admin_pb2.GetTenantResponse:
        tenant = self._tenant(self._caller(), request.tenant_id)
        assert tenant is not None
        record = await self._store(self.store.get_tenant, tenant)
        if record is None:
            raise NotFound(f"tenant {tenant!r} not found", reason="TENANT_NOT_FOUND")
        return admin_pb2.GetTenantResponse(tenant=self._tenant_message(record))

    async def ListTenants(
        self, request: admin_pb2.ListTenantsRequest, context: Context
    ) -> admin_pb2.ListTenantsResponse:
        self._caller()
        records = await self._store(self.store.list_tenants)
        return admin_pb2.ListTenantsResponse(tenants=[self._tenant_message(record) for record in records])

    async def ListAuditEvents(
        self, request: admin_pb2.ListAuditEventsRequest, context: Context
    ) -> admin_pb2.ListAuditEventsResponse:
        tenant = self._tenant(self._caller(), request.tenant_id, allow_all=True)
        if not 0 <= request.limit <= MAX_AUDIT_LIMIT:
            raise InvalidArgument(f"limit is {request.limit}; send 0 (100) to {MAX_AUDIT_LIMIT}", reason="BAD_LIMIT")
        # What is still queued in this gateway is written first, so a caller reads its own actions back.
        await self.audit.flush(final=False)
        events = await self._store(
            self.store.list_audit,
            since_unix_ms=request.since_unix_ms,
            tenant_id=tenant,
            action_prefix=request.action_prefix,
            limit=request.limit or DEFAULT_AUDIT_LIMIT,
        )
        return admin_pb2.ListAuditEventsResponse(events=[audit_message(event) for event in events])
