"""Log format for every aimass process: one line per event, prefixed with the process kind."""

from __future__ import annotations

import faulthandler
import logging
import sys


def configure_logging(level: str, kind: str) -> None:
    logging.basicConfig(
        level=level,
        stream=sys.stderr,
        format=f"%(asctime)s {kind} %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )
    # A crash inside a native extension (grpc, torch) then leaves a Python traceback in the log.
    faulthandler.enable(sys.stderr)
