"""Internal callers straight to replicas with gRPC's own xDS client: the bootstrap, and a channel in one call.

The scheduler serves xDS (scheduler/xds.py): for ``xds:///aimass.v1.NlpService`` it answers with the replicas
that serve aimass.v1.NlpService and their weights, and gRPC balances over them itself, with no gateway on the
path (and none of its API keys, quotas or tenants: this is for processes inside the mesh).

Two connections, both mesh mTLS with the caller's certificate:

- to the scheduler (the xDS server): the bootstrap names it under ``xds_servers`` with ``channel_creds`` of type
  ``tls`` (gRFC A65: ``ca_certificate_file``, ``certificate_file``, ``private_key_file``). gRPC checks the
  scheduler's certificate against the host in ``server_uri``, so that host must be one the certificate names:
  ``aimass up`` issues local certificates for 127.0.0.1 and localhost; elsewhere issue the scheduler's with
  ``aimass certs issue --role scheduler --name scheduler --host <its DNS name>``;
- to the replicas: the channel's own credentials (``MeshCredentials``), with the TLS name the replicas' role holds
  (``nlp.aimass.internal`` for aimass.v1.NlpService), as ``mesh_channel`` does.

Replicas serve their methods to the gateway role only, so the caller's certificate has that role (``aimass certs
issue --role gateway --name my-batch-job``); the scheduler streams xDS to gateways and operators.

gRPC reads the bootstrap (``GRPC_XDS_BOOTSTRAP`` names a file, ``GRPC_XDS_BOOTSTRAP_CONFIG`` holds the JSON) when
it creates its xDS client, i.e. at the first ``xds:`` channel of a process (while one is open it is shared):
``use_bootstrap`` sets the variable, so call it (or ``xds_channel``, which does) before any other ``xds:`` channel.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import grpc

from aimass import pki
from aimass.runtime.identity import MeshCredentials, mesh_channel_options

SCHEME: Final = "xds:///"
BOOTSTRAP_ENV: Final = "GRPC_XDS_BOOTSTRAP_CONFIG"
BOOTSTRAP_FILE_ENV: Final = "GRPC_XDS_BOOTSTRAP"


def target(service: str) -> str:
    """The channel target for a fully-qualified aimass.v1 service: the listener the scheduler publishes."""
    return f"{SCHEME}{service}"


def server_role(service: str) -> str:
    """The replicas' role (their kind) for ``service``: aimass.v1.NlpService → nlp."""
    name = service.rsplit(".", 1)[-1]
    if not name.endswith("Service") or name == "Service":
        raise ValueError(f"{service!r} is not an aimass.v1 service name such as aimass.v1.NlpService")
    return name.removesuffix("Service").lower()


def bootstrap_config(
    scheduler_address: str,
    *,
    pki_dir: Path | None,
    name: str,
    node_id: str = "",
) -> dict[str, Any]:
    """gRPC's xDS bootstrap: the scheduler at ``scheduler_address`` as the one xDS server, over mesh mTLS with the
    certificate ``name`` in ``pki_dir`` (None: mesh TLS off, plaintext)."""
    if pki_dir is None:
        channel_creds: list[dict[str, Any]] = [{"type": "insecure"}]
    else:
        files = pki.cert_files(pki_dir, name)
        channel_creds = [
            {
                "type": "tls",
                "config": {
                    "ca_certificate_file": str(pki.ca_files(pki_dir).cert.resolve()),
                    "certificate_file": str(files.cert.resolve()),
                    "private_key_file": str(files.key.resolve()),
                },
            }
        ]
    return {
        "xds_servers": [
            {"server_uri": scheduler_address, "channel_creds": channel_creds, "server_features": ["xds_v3"]}
        ],
        "node": {"id": node_id or f"{name}@{socket.gethostname()}", "cluster": "aimass"},
    }


def use_bootstrap(config: dict[str, Any]) -> None:
    """Makes ``config`` this process's xDS bootstrap (read when gRPC creates its xDS client)."""
    os.environ[BOOTSTRAP_ENV] = json.dumps(config)


def xds_channel(
    service: str,
    credentials: MeshCredentials | None,
    *,
    bootstrap: dict[str, Any] | None = None,
    role: str | None = None,
    options: Sequence[tuple[str, Any]] = (),
) -> grpc.aio.Channel:
    """An asyncio channel to the replicas of ``service`` (e.g. "aimass.v1.NlpService"), routed by the scheduler's
    xDS answers; ``bootstrap`` (``bootstrap_config``) is installed first when given. Replicas are verified to hold
    ``role`` (default: ``server_role(service)``)."""
    if bootstrap is not None:
        use_bootstrap(bootstrap)
    elif not (os.environ.get(BOOTSTRAP_ENV) or os.environ.get(BOOTSTRAP_FILE_ENV)):
        raise ValueError(
            f"no xDS bootstrap: pass bootstrap=bootstrap_config(...), or set {BOOTSTRAP_FILE_ENV} to a file "
            "(`aimass xds bootstrap --out FILE` writes one)"
        )
    if credentials is None:
        return grpc.aio.insecure_channel(target(service), options=list(options))
    return grpc.aio.secure_channel(
        target(service),
        credentials.channel_credentials(),
        options=mesh_channel_options(role or server_role(service), options),
    )
