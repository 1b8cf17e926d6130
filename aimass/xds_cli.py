"""``aimass xds bootstrap``: gRPC's xDS bootstrap for a caller inside the mesh that skips the gateway, for clients
in any language (Go, Java, C++, Node with grpc-js-xds, Python): point ``GRPC_XDS_BOOTSTRAP`` at the file and dial
``xds:///aimass.v1.NlpService``. aimass.runtime.xds_client explains the two connections and the certificate.

The scheduler is ``--scheduler``, else ``scheduler.address``, else 127.0.0.1:<scheduler.server.port>; the
certificate is ``--name`` in the mesh's pki directory (``--issue`` makes a gateway-role one there first, where the
CA's key is: a mesh host).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Final

from aimass import pki
from aimass.runtime.config import load_settings
from aimass.runtime.identity import ROLE_GATEWAY
from aimass.runtime.xds_client import bootstrap_config

COMMAND: Final = "xds"


def add_commands(commands: Any) -> None:
    """Adds ``xds`` to the ``aimass`` parser's subcommands."""
    parser = commands.add_parser(COMMAND, help="xDS: internal gRPC clients route straight to replicas")
    sub = parser.add_subparsers(dest="xds_command", required=True)
    boot = sub.add_parser("bootstrap", help="print (or --out) gRPC's xDS bootstrap JSON naming the scheduler")
    boot.add_argument("--name", required=True, help="the caller's certificate <name>.crt/.key in the pki directory")
    boot.add_argument("--scheduler", default="", help="the scheduler's address (its certificate must name the host)")
    boot.add_argument("--node-id", default="", help="the xDS node id (default: NAME@host)")
    boot.add_argument("--issue", action="store_true", help="issue a gateway-role certificate NAME first (needs the CA)")
    boot.add_argument("--out", type=Path, default=None, help="write the bootstrap to this file instead of printing it")


def run(args: argparse.Namespace) -> int:
    settings = load_settings()
    scheduler = args.scheduler or settings.scheduler.address or f"127.0.0.1:{settings.scheduler.server.port}"
    pki_dir = None if settings.mesh.tls == "off" else settings.pki_dir
    if pki_dir is not None:
        if args.issue:
            pki.issue(pki_dir, role=ROLE_GATEWAY, name=args.name)
        files = pki.cert_files(pki_dir, args.name)
        missing = [str(p) for p in (files.cert, files.key, pki.ca_files(pki_dir).cert) if not p.exists()]
        if missing:
            print(
                f"error: {', '.join(missing)} missing; issue the certificate with --issue on the mesh host, or "
                f"`aimass certs issue --role {ROLE_GATEWAY} --name {args.name}` and copy it here",
                file=sys.stderr,
            )
            return 2
    text = json.dumps(bootstrap_config(scheduler, pki_dir=pki_dir, name=args.name, node_id=args.node_id), indent=2)
    if args.out is None:
        print(text)
    else:
        args.out.write_text(text + "\n")
        print(f"wrote {args.out}: set GRPC_XDS_BOOTSTRAP={args.out.resolve()} and dial xds:///aimass.v1.NlpService")
    return 0
