"""Load tests for the aimass mesh: scenarios as data (``loadtest.scenarios``), a grpc.aio generator for unary and
server-streaming calls (library + ``python -m loadtest.run``), ghz configs and a k6 runner for the same scenarios,
and ``python -m loadtest.report`` (``make loadtest``): gateway vs direct, markdown + PNG."""

from loadtest.generator import LoadResult, LoadSpec, build_request, find_method, run_load, run_load_sync

__all__ = ["LoadResult", "LoadSpec", "build_request", "find_method", "run_load", "run_load_sync"]
