"""``python -m loadtest.run``: drive one aimass.v1 method (unary or server-streaming) and print RPS, latency
percentiles and status counts.

Examples::

    python -m loadtest.run aimass.v1.NlpService/Sentiment -d '{"texts": ["I love it"]}' -c 64 -z 10s
    python -m loadtest.run aimass.v1.NlpService/Embed -d @request.json -c 32 -n 5000 --warmup 200 --json
    python -m loadtest.run --scenario vision-classify            # a scenario of loadtest/scenarios.py as it is
    python -m loadtest.run --scenario chat -c 8 -z 20s           # ... with its concurrency and duration changed
    python -m loadtest.run --scenario embed --api-key "$KEY"     # a tenant's key (`aimass keys create ...`)
    python -m loadtest.run --scenario embed -t 127.0.0.1:50061 --direct   # straight to an NLP replica (mTLS)

Through the gateway every call carries an API key: ``--api-key``, else ``$AIMASS_API_KEY``, else the admin key file
of this host's mesh (as aimass.client finds it). ``--direct`` calls a replica (of the kind that serves the method, or
``--kind``) inside the mesh, as a gateway does: mesh mTLS with the gateway certificate of ``--pki-dir`` (default: this
host's mesh's, where `aimass up` keeps it), no key.

Exit status: 0 when every call ended OK, 1 when some did not or the target was unreachable, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from aimass.runtime.identity import ROLE_GATEWAY
from loadtest.generator import LoadSpec, gateway_credentials, kind_of, method_names, result_json, run_load
from loadtest.scenarios import SCENARIOS, by_name, request_json

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m)?\s*$")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0}


def parse_duration(text: str) -> float:
    """``10``, ``10s``, ``500ms`` or ``2m`` → seconds."""
    match = _DURATION.match(text)
    if match is None:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (examples: 10, 10s, 500ms, 2m)")
    return float(match.group(1)) * _UNIT_S[match.group(2) or "s"]


def parse_metadata(text: str) -> tuple[str, str]:
    key, sep, value = text.partition(":")
    if not sep:
        key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"metadata must be key:value or key=value, got {text!r}")
    return key.strip().lower(), value.strip()


def read_data(text: str) -> str:
    """JSON text, or ``@path`` to read it from a file (``@-``: stdin)."""
    if text.startswith("@"):
        source = text[1:]
        return sys.stdin.read() if source == "-" else Path(source).read_text()
    return text


def parser() -> argparse.ArgumentParser:
    cli = argparse.ArgumentParser(
        prog="python -m loadtest.run",
        description="grpc.aio load generator for unary and server-streaming aimass.v1 methods (raw pre-serialised"
        " requests)",
    )
    cli.add_argument("method", nargs="?", help="full method name, e.g. aimass.v1.NlpService/Embed")
    cli.add_argument(
        "--scenario",
        "-s",
        help="run a scenario of loadtest/scenarios.py (its method, request, concurrency, duration, deadline; flags"
        " given override them)",
    )
    cli.add_argument("--target", "-t", default="127.0.0.1:50051", help="host:port (default: the gateway's)")
    cli.add_argument("--data", "-d", default=None, help="request as JSON (proto3 JSON mapping), or @file")
    cli.add_argument("--concurrency", "-c", type=int, default=None, help="concurrent workers (default 16)")
    cli.add_argument("--total", "-n", type=int, default=None, help="requests to send (default 200 with no -z)")
    cli.add_argument(
        "--duration", "-z", type=parse_duration, default=None, help="run time, e.g. 10s (with -n: first reached)"
    )
    cli.add_argument("--warmup", type=int, default=0, help="requests sent before measuring (not counted)")
    cli.add_argument("--deadline", type=parse_duration, default=None, help="per-call deadline (default 10s)")
    cli.add_argument("--channels", type=int, default=1, help="channels (connections) shared by workers (default 1)")
    cli.add_argument("--metadata", "-H", type=parse_metadata, action="append", default=[], help="key:value, repeatable")
    cli.add_argument(
        "--api-key",
        default=None,
        help="the gateway's API key (default: $AIMASS_API_KEY, else the admin key file of this host's mesh)",
    )
    cli.add_argument(
        "--direct",
        action="store_true",
        help="the target is a replica: call it inside the mesh with mTLS, as a gateway does (no API key)",
    )
    cli.add_argument(
        "--kind", default=None, help="with --direct: the replica's kind (default: the one serving the method)"
    )
    cli.add_argument(
        "--pki-dir",
        type=Path,
        default=None,
        help="with --direct: the mesh's CA and certificates (default: this host's mesh's, mesh.pki_dir)",
    )
    cli.add_argument(
        "--identity",
        default=ROLE_GATEWAY,
        help="with --direct: the certificate to present, <pki-dir>/<identity>.crt (default: gateway)",
    )
    cli.add_argument("--max-duration", type=parse_duration, default=600.0, help="hard stop for -n runs (default 600s)")
    cli.add_argument("--json", action="store_true", help="print the result as JSON instead of text")
    cli.add_argument("--quiet", "-q", action="store_true", help="no progress lines on stderr")
    cli.add_argument("--list", action="store_true", help="list the methods of the contract and exit")
    cli.add_argument("--list-scenarios", action="store_true", help="list the scenarios and exit")
    return cli


def main(argv: Sequence[str] | None = None) -> int:
    cli = parser()
    args = cli.parse_args(argv)
    if args.list:
        print("\n".join(method_names()))
        return 0
    if args.list_scenarios:
        print("\n".join(f"{s.name:16} {s.full_method}" for s in SCENARIOS))
        return 0
    if not args.method and not args.scenario:
        cli.error("give a method (see --list) or --scenario (see --list-scenarios)")
    if args.method and args.scenario:
        cli.error("give a method or --scenario, not both")
    try:
        if args.scenario:
            (scenario,) = by_name([args.scenario])
            method = scenario.method
            request: str | dict[str, object] = request_json(scenario) if args.data is None else read_data(args.data)
            concurrency = scenario.concurrency if args.concurrency is None else args.concurrency
            duration = scenario.duration_s if args.duration is None and args.total is None else args.duration
            deadline = scenario.deadline_s if args.deadline is None else args.deadline
            metadata = (*scenario.metadata.items(), *args.metadata)
        else:
            method = args.method
            request = read_data(args.data or "{}")
            concurrency = 16 if args.concurrency is None else args.concurrency
            duration = args.duration
            deadline = 10.0 if args.deadline is None else args.deadline
            metadata = tuple(args.metadata)
        total = args.total if args.total is not None or duration is not None else 200
        server_role = ""
        credentials = None
        if args.direct:
            # The replica's certificate names its kind; the handshake checks it.
            server_role = args.kind or (scenario.kind if args.scenario else kind_of(method))
            credentials = gateway_credentials(args.pki_dir, args.identity)
        spec = LoadSpec(
            target=args.target,
            method=method,
            request=request,
            concurrency=concurrency,
            total=total,
            duration_s=duration,
            warmup=args.warmup,
            deadline_s=deadline,
            channels=args.channels,
            metadata=metadata,
            api_key=args.api_key,
            mesh_credentials=credentials,
            server_role=server_role,
            progress=not args.quiet,
            max_duration_s=args.max_duration,
        )
        result = asyncio.run(run_load(spec))
    except (ValueError, OSError, RuntimeError) as err:
        # ValueError: unknown method/scenario or bad request/limits; OSError: unreadable file, unreachable target;
        # RuntimeError: a scenario's media cannot be built (flite missing).
        print(f"loadtest: {err}", file=sys.stderr)
        return 2 if isinstance(err, ValueError) else 1
    print(result_json(result) if args.json else result.format())
    return 0 if result.errors == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
