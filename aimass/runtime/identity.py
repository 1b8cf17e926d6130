"""Who is calling inside the mesh: mTLS credentials, the caller's role and name, and which roles may call what.

Every internal listener (replicas, the scheduler with the embedded registry, node agents' peers) asks for a client
certificate from the mesh's CA (aimass.pki) and serves each method only to the roles its ``MeshPolicy`` names:
replicas' methods to gateways, load reports to replicas, node readings to node agents, and so on; anything the
policy does not name is refused (PERMISSION_DENIED). Servicers that act for an identity (registering an instance,
reporting a node's readings) also check the caller speaks for its own: ``peer_identity(context)``.

Callers dial with ``mesh_channel``: their own certificate, and the role they expect the server to hold (its
certificate's ``<role>.aimass.internal``), so a process with another role's certificate cannot stand in for it.
``mesh.tls = "off"`` turns all of this off (plaintext, no checks): throwaway development only, logged loudly.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import grpc
from cryptography import x509

from aimass import pki
from aimass.runtime.config import Settings
from aimass.runtime.errors import PermissionDenied, Unauthenticated
from aimass.runtime.interceptors import AroundInterceptor, Context, abort_with, rule_for

log = logging.getLogger(__name__)

ROLE_GATEWAY: Final = "gateway"
ROLE_SCHEDULER: Final = "scheduler"
ROLE_NODE_AGENT: Final = "node-agent"
# People and their tools on a mesh host (`aimass up`, `aimass status`, grpcurl with an operator certificate): they
# may read the registry and the scheduler's view and placements, never change them.
ROLE_OPERATOR: Final = "operator"
# Front-door adapters (the OpenAI REST process): they call only the gateway's adapter listener, which believes the
# client address they pass in x-aimass-caller-peer (gateway/auth.py); no internal listener serves them.
ROLE_REST: Final = "rest"
# The web console (gateway/console): an adapter like the REST front door, with its own certificate.
ROLE_CONSOLE: Final = "console"
ADAPTER_ROLES: Final = frozenset({ROLE_REST, ROLE_CONSOLE})
CONTROL_ROLES: Final = frozenset({ROLE_GATEWAY, ROLE_SCHEDULER, ROLE_NODE_AGENT, ROLE_OPERATOR, *ADAPTER_ROLES})
# In a policy: any replica role (a replica's role is its kind: nlp, vision, speech, llm, ...).
ANY_REPLICA: Final = "<replica>"


@dataclass(frozen=True)
class MeshIdentity:
    role: str
    name: str

    @property
    def is_replica(self) -> bool:
        return self.role not in CONTROL_ROLES

    def __str__(self) -> str:
        return f"{self.role}/{self.name}"


def peer_identity(context: Context) -> MeshIdentity | None:
    """The caller's identity from its verified certificate; None on a plaintext listener."""
    for value in context.peer_identities() or ():
        text = value.decode(errors="replace") if isinstance(value, bytes) else str(value)
        found = pki.parse_spiffe_id(text)
        if found is not None:
            return MeshIdentity(*found)
    return None


def check_owner(caller: MeshIdentity | None, subject: str, owner: str | None) -> None:
    """With mesh TLS, only the identity that owns ``subject`` (an instance, a node) may speak for it; PERMISSION_DENIED
    for any other. No caller identity (mesh TLS off) or no owner yet: nothing to check."""
    if caller is not None and owner is not None and owner != caller.name:
        raise PermissionDenied(f"{subject} belongs to mesh identity {owner!r}, not {caller.name!r}", reason="NOT_OWNER")


class MeshCredentials:
    """This process's certificate and key, and the CA it trusts."""

    def __init__(self, *, ca: bytes, cert: bytes, key: bytes) -> None:
        self.ca, self.cert, self.key = ca, cert, key
        found = pki.identity_of(x509.load_pem_x509_certificate(cert))
        if found is None:
            raise ValueError("the certificate carries no mesh identity (spiffe://aimass/<role>/<name>)")
        self.identity = MeshIdentity(*found)

    @classmethod
    def load(cls, pki_dir: Path, name: str) -> MeshCredentials:
        """Reads ``<pki_dir>/ca.crt`` and ``<name>.crt/.key``; a missing file is a clear error, not a plaintext mesh."""
        files = pki.cert_files(pki_dir, name)
        ca = pki.ca_files(pki_dir).cert
        missing = [str(path) for path in (ca, files.cert, files.key) if not path.exists()]
        if missing:
            raise FileNotFoundError(
                f"mesh TLS is on but {', '.join(missing)} is missing: `aimass up` issues every process's certificate; "
                f"for a process started by hand run `aimass certs issue --role ROLE --name {name}` where the CA is "
                '(and copy the files), or set mesh.tls = "off" (AIMASS_MESH__TLS=off) for throwaway development'
            )
        return cls(ca=ca.read_bytes(), cert=files.cert.read_bytes(), key=files.key.read_bytes())

    def server_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials([(self.key, self.cert)], root_certificates=self.ca, require_client_auth=True)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca, private_key=self.key, certificate_chain=self.cert
        )


_warned_plaintext = False


def process_credentials(settings: Settings, kind: str) -> MeshCredentials | None:
    """This process's mesh credentials (certificate ``mesh.identity``, else its kind), or None (with one loud
    warning) when mesh TLS is off."""
    global _warned_plaintext
    if settings.mesh.tls == "off":
        if not _warned_plaintext:
            log.warning(
                'MESH TLS IS OFF (mesh.tls = "off"): internal calls are plaintext and any process that reaches a '
                "replica, the scheduler or the registry may call it. For throwaway development only."
            )
            _warned_plaintext = True
        return None
    return MeshCredentials.load(settings.pki_dir, settings.mesh.identity or kind)


def mesh_channel_options(server_role: str, options: Sequence[tuple[str, Any]] = ()) -> list[tuple[str, Any]]:
    """Channel options that make the TLS handshake verify the server holds ``server_role`` (whatever the address)."""
    return [*options, ("grpc.ssl_target_name_override", pki.server_name(server_role))]


def mesh_channel(
    address: str,
    credentials: MeshCredentials | None,
    *,
    server_role: str,
    options: Sequence[tuple[str, Any]] = (),
) -> grpc.aio.Channel:
    """An asyncio channel to a mesh process holding ``server_role`` (plaintext when mesh TLS is off)."""
    if credentials is None:
        return grpc.aio.insecure_channel(address, options=list(options))
    return grpc.aio.secure_channel(
        address, credentials.channel_credentials(), options=mesh_channel_options(server_role, options)
    )


def mesh_sync_channel(
    address: str,
    credentials: MeshCredentials | None,
    *,
    server_role: str,
    options: Sequence[tuple[str, Any]] = (),
) -> grpc.Channel:
    """``mesh_channel`` for blocking code (tools, tests)."""
    if credentials is None:
        return grpc.insecure_channel(address, options=list(options))
    return grpc.secure_channel(
        address, credentials.channel_credentials(), options=mesh_channel_options(server_role, options)
    )


class MeshPolicy:
    """Which roles may call which methods of one listener: keys are a method ("/aimass.v1.X/Y") or a whole
    service ("/aimass.v1.X/"); ``ANY_REPLICA`` stands for every replica role. Nothing else is allowed."""

    def __init__(self, rules: Mapping[str, Iterable[str]]) -> None:
        self.rules = {key: frozenset(roles) for key, roles in rules.items()}

    def allowed(self, method: str) -> frozenset[str]:
        return rule_for(self.rules, method) or frozenset()

    def permits(self, identity: MeshIdentity, method: str) -> bool:
        roles = self.allowed(method)
        return identity.role in roles or (identity.is_replica and ANY_REPLICA in roles)

    @classmethod
    def serving(cls, services: Iterable[str], roles: Iterable[str]) -> MeshPolicy:
        """Every method of ``services`` (fully-qualified names) for ``roles``."""
        allowed = tuple(roles)
        return cls({f"/{service}/": allowed for service in services})


class MeshPolicyInterceptor(AroundInterceptor):
    """Refuses a call whose caller's certificate role the listener's policy does not allow (health and reflection
    answer any mesh certificate: the TLS handshake already required one)."""

    def __init__(self, policy: MeshPolicy) -> None:
        super().__init__()
        self.policy = policy

    @contextlib.asynccontextmanager
    async def around(self, method: str, context: Context) -> AsyncIterator[None]:
        identity = peer_identity(context)
        if identity is None:
            await abort_with(
                context,
                method,
                Unauthenticated(
                    f"{method} needs a mesh certificate naming a role (spiffe://aimass/<role>/<name>)",
                    reason="NO_MESH_IDENTITY",
                ),
            )
        if not self.policy.permits(identity, method):
            allowed = sorted(self.policy.allowed(method))
            await abort_with(
                context,
                method,
                PermissionDenied(
                    f"{identity} may not call {method}"
                    + (f"; it is for {', '.join(allowed).replace(ANY_REPLICA, 'replicas')}" if allowed else ""),
                    reason="ROLE_NOT_ALLOWED",
                    metadata={"role": identity.role},
                ),
            )
        yield
