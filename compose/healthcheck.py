"""Container health probe for the aimass image (Dockerfile HEALTHCHECK and compose healthchecks).

    python healthcheck.py [--role ROLE] HOST:PORT [SERVICE]  gRPC health (grpc.health.v1): exit 0 when SERVING
    python healthcheck.py http://HOST:PORT/PATH               an HTTP endpoint: exit 0 on 200 (the node agent's
                                                              metrics; the REST front door's /healthz, 503 until the
                                                              gateway behind it serves)

``--role ROLE``: the server is an internal mesh listener (a replica, the scheduler), which takes only mTLS with a
certificate from the mesh CA. The probe presents this container's own certificate (mesh.pki_dir and
mesh.identity: AIMASS_MESH__PKI_DIR, AIMASS_MESH__IDENTITY, else ROLE, as for the process itself) and checks the
server's names ROLE (``<role>.aimass.internal``). Without it the probe speaks plaintext: the gateway's public port,
whose health service answers without an API key. With mesh TLS off (AIMASS_MESH__TLS=off) it is plaintext either
way, like the processes.

With no target it probes $AIMASS_HEALTHCHECK_TARGET (default 127.0.0.1:50051, the gateway) as
$AIMASS_HEALTHCHECK_ROLE (default none: plaintext). A replica reports SERVING once its models are loaded and
NOT_SERVING while it drains, so `depends_on: service_healthy` waits for the models and a draining replica is shown
unhealthy. Exit 1 with one line on stderr otherwise, 2 on a usage error.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request
from typing import Any

TIMEOUT_S = 3.0
DEFAULT_TARGET = "127.0.0.1:50051"
USAGE = "usage: healthcheck.py [--role ROLE] HOST:PORT [SERVICE] | healthcheck.py http://HOST:PORT/PATH"


class ProbeError(Exception):
    """Why the probe could not even ask (no certificate, bad settings): reported like an unhealthy answer."""


def probe_http(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
            return None if response.status == 200 else f"{url}: HTTP {response.status}"
    except (urllib.error.URLError, OSError) as err:
        return f"{url}: {err}"


def mesh_credentials(role: str) -> Any:
    """This container's mesh credentials, as its own process loads them; None when mesh TLS is off."""
    # Imported here: plaintext and HTTP probes (the gateway, the node agent, the REST front door) stay light.
    from aimass.runtime.config import load_settings
    from aimass.runtime.identity import MeshCredentials

    try:
        settings = load_settings()
        if settings.mesh.tls == "off":
            return None
        return MeshCredentials.load(settings.pki_dir, settings.mesh.identity or role)
    except (OSError, ValueError) as err:  # a missing file, an unreadable key, a bad setting (pydantic: ValueError)
        raise ProbeError(str(err)) from err


def probe_grpc(address: str, service: str, role: str | None = None) -> str | None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    if role is None:
        channel = grpc.insecure_channel(address)
    else:
        from aimass.runtime.identity import mesh_sync_channel

        try:
            credentials = mesh_credentials(role)
        except ProbeError as err:
            return f"{address}: {err}"
        channel = mesh_sync_channel(address, credentials, server_role=role)
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT_S
            )
        except grpc.RpcError as err:
            return f"{address}: {err.code().name} {err.details()}"
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        state = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        return f"{address} {service or '(server)'}: {state}"
    return None


def parse(argv: list[str]) -> tuple[str | None, list[str]] | None:
    """(role, positional arguments), or None for a usage error. By hand rather than argparse, which exits."""
    role: str | None = None
    positional: list[str] = []
    args = iter(argv)
    for arg in args:
        if arg == "--role":
            role = next(args, "")
            if not role:
                return None
        elif arg.startswith("--role="):
            role = arg.partition("=")[2]
            if not role:
                return None
        elif arg.startswith("-"):
            return None
        else:
            positional.append(arg)
    if len(positional) > 2:
        return None
    return role, positional


def main(argv: list[str]) -> int:
    parsed = parse(argv)
    if parsed is None:
        print(USAGE, file=sys.stderr)
        return 2
    role, positional = parsed
    if not positional:
        role = role or os.environ.get("AIMASS_HEALTHCHECK_ROLE") or None
    target = positional[0] if positional else os.environ.get("AIMASS_HEALTHCHECK_TARGET", DEFAULT_TARGET)
    if target.startswith(("http://", "https://")):
        if role is not None or len(positional) > 1:
            print(USAGE, file=sys.stderr)
            return 2
        problem = probe_http(target)
    else:
        problem = probe_grpc(target, positional[1] if len(positional) > 1 else "", role)
    if problem is not None:
        print(f"unhealthy: {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
