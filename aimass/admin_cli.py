"""``aimass keys``, ``aimass tenants``, ``aimass audit``, ``aimass whoami``: AdminService from the command line, and
``aimass certs`` for the mesh's CA and certificates.

The admin commands call the gateway (``--gateway``, default 127.0.0.1:<gateway.server.port>) with the API key from
``--api-key``, ``$AIMASS_API_KEY`` or the admin key file `aimass up` wrote; ``--ca-file`` when the gateway's front
door has TLS. Errors print the mesh's own message and exit 1.
"""

from __future__ import annotations

import argparse
import datetime
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import grpc

from aimass import pki
from aimass.bootstrap import ensure_certificates, operator_credentials, prepare_store
from aimass.client import Client, error_info
from aimass.runtime.config import load_settings
from aimass.runtime.scope import priority_name, priority_named
from aimass.tenancy import keys
from aimass.v1 import admin_pb2

DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw]?)$")
UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def seconds(text: str) -> float:
    """ "90", "30s", "15m", "1h", "30d", "2w" → seconds."""
    match = DURATION.match(text.strip().lower())
    if match is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration such as 90s, 15m, 1h, 30d")
    return float(match.group(1)) * UNITS[match.group(2)]


def when(unix_ms: int) -> str:
    if not unix_ms:
        return "-"
    return datetime.datetime.fromtimestamp(unix_ms / 1000, datetime.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def table(rows: Sequence[Sequence[str]]) -> str:
    """Rows as aligned columns (the first row is the header), as every ``aimass`` listing prints them."""
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows)


def add_commands(commands: Any) -> None:
    """Adds keys, tenants, audit, whoami and certs to the ``aimass`` parser's subcommands."""

    def connected(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        parser.add_argument("--gateway", default="", help="gateway address (default: 127.0.0.1:gateway.server.port)")
        parser.add_argument(
            "--api-key", default=None, help="API key (default: $AIMASS_API_KEY, else the admin key file)"
        )
        parser.add_argument("--ca-file", type=Path, default=None, help="CA of the gateway's TLS certificate (PEM)")
        return parser

    keys_cmd = commands.add_parser("keys", help="create, list and revoke API keys")
    keys_sub = keys_cmd.add_subparsers(dest="keys_command", required=True)
    create = connected(keys_sub.add_parser("create", help="make a key; it is printed once"))
    create.add_argument("--tenant", default="", help="the key's tenant (default: your own; another: tenants:admin)")
    create.add_argument(
        "--scopes", default=keys.SCOPE_INFER, help=f"comma-separated, of: {', '.join(sorted(keys.SCOPES))}"
    )
    create.add_argument("--name", default="", help="a label for people")
    create.add_argument("--expires-in", type=seconds, default=0, help="e.g. 30d (default: never)")
    listing = connected(keys_sub.add_parser("list", help="the keys of a tenant (never the keys themselves)"))
    listing.add_argument("--tenant", default="", help="default: your own; --all for every tenant")
    listing.add_argument("--all", action="store_true", help="every tenant (tenants:admin)")
    revoke = connected(keys_sub.add_parser("revoke", help="revoke a key; every gateway refuses it within seconds"))
    revoke.add_argument("key_id", help="the key id (`aimass keys list`)")

    tenants_cmd = commands.add_parser("tenants", help="tenants and their limits")
    tenants_sub = tenants_cmd.add_subparsers(dest="tenants_command", required=True)
    set_cmd = connected(tenants_sub.add_parser("set", help="create a tenant or change its limits (0 = unlimited)"))
    set_cmd.add_argument("tenant")
    set_cmd.add_argument("--rps", type=float, help="requests per second, for the whole mesh")
    set_cmd.add_argument("--concurrency", type=int, help="requests in flight at once")
    set_cmd.add_argument("--llm-tokens-per-min", type=int, help="LLM tokens (prompt + completion) per minute")
    set_cmd.add_argument("--llm-tokens-per-day", type=int, help="LLM tokens per UTC day")
    set_cmd.add_argument("--max-priority", type=priority_named, help="LOW, NORMAL, HIGH or CRITICAL")
    set_cmd.add_argument("--weight", type=float, help="fair-share weight (2 = twice the share of 1)")
    get_cmd = connected(tenants_sub.add_parser("get", help="one tenant's limits"))
    get_cmd.add_argument("tenant", nargs="?", default="", help="default: your own")
    connected(tenants_sub.add_parser("list", help="every tenant (tenants:admin)"))

    audit_cmd = connected(commands.add_parser("audit", help="the audit log: admin actions and refused credentials"))
    audit_cmd.add_argument("--since", type=seconds, default=3600, help="how far back, e.g. 15m, 1h, 7d (default 1h)")
    audit_cmd.add_argument("--tenant", default="", help="default: your own; --all for every tenant")
    audit_cmd.add_argument("--all", action="store_true", help="every tenant (tenants:admin)")
    audit_cmd.add_argument("--action", default="", help="only actions starting so, e.g. keys. or auth.refused")
    audit_cmd.add_argument("--limit", type=int, default=100)

    connected(commands.add_parser("whoami", help="the tenant, scopes and limits of your API key"))

    commands.add_parser(
        "init",
        help="prepare the mesh's state without starting it: CA, operator certificate, store schema, admin key "
        "(`aimass up` does this itself; containers and hand-started meshes run it once)",
    )

    certs_cmd = commands.add_parser("certs", help="the mesh's private CA and certificates (mTLS inside the mesh)")
    certs_sub = certs_cmd.add_subparsers(dest="certs_command", required=True)
    for name, help_text in (("init", "create the CA once"), ("issue", "issue a certificate for a mesh process")):
        sub = certs_sub.add_parser(name, help=help_text)
        sub.add_argument("--pki-dir", type=Path, default=None, help="default: state_dir/pki")
        if name == "issue":
            sub.add_argument("--role", required=True, help="gateway, scheduler, node-agent, operator or a replica kind")
            sub.add_argument("--name", required=True, help="the process's identity, e.g. nlp-worker2")
            sub.add_argument(
                "--host",
                action="append",
                default=[],
                help="an address or DNS name to add (repeatable), for tools that cannot be told the role name",
            )
            sub.add_argument("--days", type=int, default=pki.CERT_DAYS)
            sub.add_argument("--force", action="store_true", help="issue anew even if the current one is good")


def gateway_client(args: argparse.Namespace, *, timeout_s: float | None = 30.0) -> Client:
    """The client every key-based command calls the gateway with: --gateway (default 127.0.0.1:gateway.server.port),
    --api-key (default $AIMASS_API_KEY, else the admin key file), --ca-file; 2 tries where the retry policy allows.
    ``timeout_s``: the default deadline per call (None: none, for streams that run until Ctrl-C)."""
    settings = load_settings()
    target = args.gateway or f"127.0.0.1:{settings.gateway.server.port}"
    root = args.ca_file.read_bytes() if args.ca_file is not None else None
    return Client(target, api_key=args.api_key, root_certificates=root, max_attempts=2, timeout_s=timeout_s)


def rpc_error_line(err: grpc.RpcError, target: str = "") -> str:
    """One line for a refused or failed call: the status name, the mesh's reason and its message (and, when the
    gateway at ``target`` does not answer, where to look)."""
    info = error_info(err)
    code = err.code().name if isinstance(err, grpc.Call) else "ERROR"
    details = err.details() if isinstance(err, grpc.Call) else str(err)
    reason = f" ({info.reason})" if info is not None and info.reason and info.reason != code else ""
    where = f" (gateway {target}: is the mesh up? see `aimass status`)" if code == "UNAVAILABLE" and target else ""
    return f"{code}{reason}: {details}{where}"


def size(n: float) -> str:
    """Bytes for people: 512 B, 1.5 KiB, 3.2 MiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _limits(limits: admin_pb2.TenantLimits) -> list[str]:
    return [
        f"{limits.requests_per_second:g}" if limits.requests_per_second else "-",
        str(limits.max_concurrent or "-"),
        str(limits.llm_tokens_per_minute or "-"),
        str(limits.llm_tokens_per_day or "-"),
        priority_name(limits.max_priority) if limits.max_priority else "-",
        f"{limits.weight:g}",
    ]


def _tenants(tenants: Sequence[admin_pb2.Tenant]) -> str:
    rows = [["TENANT", "RPS", "CONCURRENCY", "LLM TOKENS/MIN", "LLM TOKENS/DAY", "MAX PRIORITY", "WEIGHT", "UPDATED"]]
    rows += [[t.tenant_id, *_limits(t.effective), when(t.updated_unix_ms)] for t in tenants]
    return table(rows)


def _keys(api_keys: Sequence[admin_pb2.ApiKey]) -> str:
    rows = [["KEY ID", "TENANT", "SCOPES", "STATE", "NAME", "CREATED", "EXPIRES"]]
    rows += [
        [
            k.key_id,
            k.tenant_id,
            ",".join(k.scopes),
            k.state,
            k.name or "-",
            when(k.created_unix_ms),
            when(k.expires_unix_ms),
        ]
        for k in api_keys
    ]
    return table(rows)


def _keys_command(client: Client, args: argparse.Namespace) -> str:
    if args.keys_command == "create":
        created = client.admin.create_key(
            tenant_id=args.tenant,
            scopes=[scope.strip() for scope in args.scopes.split(",") if scope.strip()],
            name=args.name,
            expires_in_seconds=int(args.expires_in),
        )
        key = created.key
        return (
            f"{created.secret}\n\nkey id {key.key_id}, tenant {key.tenant_id}, scopes {','.join(key.scopes)}, "
            f"expires {when(key.expires_unix_ms)}. The key is shown this once: keep it now (the mesh keeps only its "
            "hash)."
        )
    if args.keys_command == "list":
        tenant = "*" if args.all else args.tenant
        return _keys(client.admin.list_keys(tenant_id=tenant).keys)
    revoked = client.admin.revoke_key(key_id=args.key_id).key
    return f"revoked {revoked.key_id} (tenant {revoked.tenant_id}); every gateway refuses it within seconds"


def _tenants_command(client: Client, args: argparse.Namespace) -> str:
    if args.tenants_command == "set":
        request = admin_pb2.SetTenantRequest(tenant_id=args.tenant)
        for flag, field in (
            ("rps", "requests_per_second"),
            ("concurrency", "max_concurrent"),
            ("llm_tokens_per_min", "llm_tokens_per_minute"),
            ("llm_tokens_per_day", "llm_tokens_per_day"),
            ("max_priority", "max_priority"),
            ("weight", "weight"),
        ):
            value = getattr(args, flag)
            if value is not None:
                setattr(request, field, value)
        return _tenants([client.admin.set_tenant(request).tenant])
    if args.tenants_command == "get":
        return _tenants([client.admin.get_tenant(tenant_id=args.tenant).tenant])
    return _tenants(client.admin.list_tenants().tenants)


def _audit_command(client: Client, args: argparse.Namespace) -> str:
    events = client.admin.list_audit_events(
        since_unix_ms=int((time.time() - args.since) * 1000),
        tenant_id="*" if args.all else args.tenant,
        action_prefix=args.action,
        limit=args.limit,
    ).events
    rows = [["TIME", "ACTION", "OUTCOME", "TENANT", "KEY ID", "TARGET", "COUNT", "PEER", "DETAIL"]]
    rows += [
        [
            when(e.at_unix_ms),
            e.action,
            e.outcome,
            e.tenant_id or "-",
            e.key_id or "-",
            e.target or "-",
            str(e.count),
            e.peer or "-",
            e.detail or "-",
        ]
        for e in events
    ]
    return table(rows) if events else "no events"


def _whoami(client: Client, args: argparse.Namespace) -> str:
    me = client.admin.who_am_i()
    return f"tenant {me.tenant_id}, key {me.key_id}, scopes {','.join(me.scopes)}\n\n{_tenants([me.tenant])}"


def _certs(args: argparse.Namespace) -> str:
    pki_dir = args.pki_dir or load_settings().pki_dir
    if args.certs_command == "init":
        files = pki.init_ca(pki_dir)
        return f"mesh CA: {files.cert} (its key {files.key}, owner-only: keep it on this host)"
    files = pki.issue(pki_dir, role=args.role, name=args.name, hosts=args.host, days=args.days, force=args.force)
    return (
        f"{files.cert} and {files.key} (owner-only) for {pki.spiffe_id(args.role, args.name)}; run the process with "
        f"AIMASS_MESH__IDENTITY={args.name} and these files plus {pki.ca_files(pki_dir).cert} in its "
        "mesh.pki_dir"
    )


COMMANDS: dict[str, Callable[[Client, argparse.Namespace], str]] = {
    "keys": _keys_command,
    "tenants": _tenants_command,
    "audit": _audit_command,
    "whoami": _whoami,
}


def _init() -> str:
    settings = load_settings()
    ensure_certificates(settings, {})
    operator_credentials(settings)
    key_file, created = prepare_store(settings)
    lines = [f"store ready: {settings.store_url.split('@')[-1]}"]
    if settings.mesh.tls == "on":
        lines.append(f"mesh CA: {pki.ca_files(settings.pki_dir).cert}")
    if key_file is not None:
        lines.append(f"admin key ({'created now' if created else 'kept from before'}, owner-only): {key_file}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    try:
        if args.command == "certs":
            print(_certs(args))
            return 0
        if args.command == "init":
            print(_init())
            return 0
        with gateway_client(args) as client:
            print(COMMANDS[args.command](client, args))
        return 0
    except grpc.RpcError as err:
        print(rpc_error_line(err), file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
