"""Load generation for the aimass mesh: a grpc.aio generator (library + ``python -m loadtest.run``), ghz configs
and k6 scripts for the same scenarios."""

from loadtest.generator import LoadResult, LoadSpec, build_request, find_method, run_load, run_load_sync

__all__ = ["LoadResult", "LoadSpec", "build_request", "find_method", "run_load", "run_load_sync"]
