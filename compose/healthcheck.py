"""Container health probe for the aimass image (Dockerfile HEALTHCHECK and compose healthchecks).

    python healthcheck.py HOST:PORT [SERVICE]   gRPC health (grpc.health.v1) of an aimass server: exit 0 when SERVING
    python healthcheck.py http://HOST:PORT/PATH  an HTTP endpoint (the node agent's metrics): exit 0 on 200

With no argument it probes $AIMASS_HEALTHCHECK_TARGET (default 127.0.0.1:50051, the gateway). A replica reports
SERVING once its models are loaded and NOT_SERVING while it drains, so `depends_on: service_healthy` waits for the
models and a draining replica is shown unhealthy. Exit 1 with one line on stderr otherwise.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request

TIMEOUT_S = 3.0
DEFAULT_TARGET = "127.0.0.1:50051"


def probe_http(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
            return None if response.status == 200 else f"{url}: HTTP {response.status}"
    except (urllib.error.URLError, OSError) as err:
        return f"{url}: {err}"


def probe_grpc(address: str, service: str) -> str | None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as channel:
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


def main(argv: list[str]) -> int:
    if len(argv) > 2:
        print("usage: healthcheck.py [HOST:PORT [SERVICE] | http://HOST:PORT/PATH]", file=sys.stderr)
        return 2
    target = argv[0] if argv else os.environ.get("AIMASS_HEALTHCHECK_TARGET", DEFAULT_TARGET)
    if target.startswith(("http://", "https://")):
        problem = probe_http(target)
    else:
        problem = probe_grpc(target, argv[1] if len(argv) > 1 else "")
    if problem is not None:
        print(f"unhealthy: {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
