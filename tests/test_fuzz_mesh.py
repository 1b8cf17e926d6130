"""Property-based fuzzing of every public method through a live gateway (a mesh with every service, started by
`aimass up`): random and boundary values in every field, random bytes, truncated and padded messages, and wrong
stream orders. Every answer must be OK or a documented status with a message a person can read; afterwards every
service is still SERVING, no process crashed (the same pids), and each stayed under a memory bound.

`make test` runs a bounded number of examples per method (HYPOTHESIS_PROFILE=ci, the default); `make fuzz` runs the
long profile and writes the inputs tried and statuses seen per method into docs/reliability.md (FUZZ_REPORT).
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aimass.client import keyed_aio_channel
from aimass.local_mesh import LocalMesh
from aimass.runtime import contract
from aimass.tenancy import keys
from aimass.v1 import nlp_pb2, nlp_pb2_grpc
from tests.conftest import start_mesh
from tests.fuzz.messages import raw_request
from tests.security import key_for

pytestmark = pytest.mark.slow

settings.register_profile(
    "ci", max_examples=12, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True
)
settings.register_profile(
    "fuzz",
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", "200")),
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# The mesh's own control plane is for mesh processes (mTLS, not the public port): the gateway refuses it.
INTERNAL = (
    "aimass.v1.SchedulerService",
    "aimass.v1.RegistryService",
    "aimass.v1.BlobService",
    "aimass.v1.TrainerService",
    "aimass.v1.ModelHostService",
)
METHODS = sorted(m for m in contract.methods() if not m.lstrip("/").startswith(INTERNAL))
# What a caller may see (README "Errors you can expect"). UNAVAILABLE is not here: every service has a replica,
# so UNAVAILABLE would mean one crashed or hung up.
DOCUMENTED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.OUT_OF_RANGE,
}
# A call that runs long (an LLM generating its max_tokens) is cut here; the mesh must answer or give up cleanly.
CALL_TIMEOUT_S = 8.0
# Responses read from a stream before the test moves on (cancelling the rest, as a client that lost interest).
MAX_STREAM_READS = 20
MAX_STREAM_READ_S = 2.0
# Resident memory no process of the mesh may pass while fuzzed (the LLM replica is the largest, ~2 GiB at rest).
RSS_BOUND_BYTES = 6 * 2**30

SEEN: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)


def mesh_pids(mesh: LocalMesh) -> dict[int, str]:
    """Every process under `aimass up`: pid → its command line."""
    assert mesh.process is not None
    found: dict[int, str] = {}
    pending = [mesh.process.pid]
    while pending:
        pid = pending.pop()
        try:
            for task in Path(f"/proc/{pid}/task").iterdir():
                pending.extend(int(c) for c in (task / "children").read_text().split())
            found[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
    return found


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


@pytest.fixture(scope="module")
def full_mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMesh]:
    mesh = start_mesh(
        tmp_path_factory.mktemp("fuzz"),
        {"nlp": 1, "vision": 1, "speech": 1, "llm": 1},
        # Short generations by default, so a fuzzed Chat with max_tokens unset finishes within the call's deadline.
        {"AIMASS_LLM__DEFAULT_MAX_TOKENS": "16", "AIMASS_LLM__MAX_MODEL_LEN": "1024"},
    )
    pids = mesh_pids(mesh)
    yield mesh
    try:
        if report := os.environ.get("FUZZ_REPORT"):
            Path(report).write_text(json.dumps({m: dict(c) for m, c in sorted(SEEN.items())}, indent=1))
        # Nothing crashed: the supervisor would have restarted it under another pid.
        assert mesh_pids(mesh).keys() >= pids.keys(), "a process of the mesh exited while it was fuzzed"
    finally:
        mesh.stop()


@dataclass(frozen=True)
class Caller:
    """A tenant's own key: inference, its own keys and audit; not models:admin nor tenants:admin (so the fuzzer
    cannot unload the models it fuzzes, and every admin method is exercised on its refusal path too)."""

    address: str
    api_key: str
    channel: grpc.Channel


@pytest.fixture(scope="module")
def caller(full_mesh: LocalMesh) -> Iterator[Caller]:
    api_key = key_for("fuzzer", (keys.SCOPE_INFER, keys.SCOPE_KEYS_ADMIN, keys.SCOPE_AUDIT_READ))
    with full_mesh.channel(api_key) as opened:
        yield Caller(full_mesh.gateway, api_key, opened)


def call(caller: Caller, method: str, requests: list[bytes]) -> grpc.StatusCode:
    """One call of ``method`` with these raw request(s); the status the caller saw (checked for a message)."""
    kind = contract.methods()[method]
    channel = caller.channel
    try:
        if kind.client_streaming:
            return asyncio.run(call_stream(caller.address, caller.api_key, method, requests))
        if kind.server_streaming:
            server_stream: grpc.UnaryStreamMultiCallable[bytes, bytes] = channel.unary_stream(method)
            responses = server_stream(requests[0], timeout=CALL_TIMEOUT_S)
            stop_at = time.monotonic() + MAX_STREAM_READ_S
            for count, _ in enumerate(responses):
                # Enough of a stream to see it answer: a watch (WatchCluster) sends one message a second forever.
                if count >= MAX_STREAM_READS or time.monotonic() > stop_at:
                    responses.cancel()
                    break
        else:
            unary: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(method)
            unary(requests[0], timeout=CALL_TIMEOUT_S)
    except grpc.RpcError as err:
        return checked(method, err.code(), err.details())
    return grpc.StatusCode.OK


def checked(method: str, code: grpc.StatusCode, details: str | None) -> grpc.StatusCode:
    if code == grpc.StatusCode.CANCELLED:
        return grpc.StatusCode.OK  # we cancelled a stream that was still answering
    assert details, f"{method} answered {code.name} with no message"
    assert code in DOCUMENTED, f"{method} answered {code.name}: {details}"
    return code


async def call_stream(address: str, api_key: str, method: str, requests: list[bytes]) -> grpc.StatusCode:
    """A bidirectional stream on asyncio's API: it writes each request only while the call is open (the sync API
    reports a server that answered before reading everything as a client-side INTERNAL)."""
    async with keyed_aio_channel(address, api_key) as channel:
        bidi: grpc.aio.StreamStreamMultiCallable[bytes, bytes] = channel.stream_stream(method)
        call = bidi(timeout=CALL_TIMEOUT_S)
        try:
            for request in requests:
                if call.done():
                    break
                await call.write(request)
            if not call.done():
                await call.done_writing()
            count = 0
            async for _ in call:
                count += 1
                if count >= MAX_STREAM_READS:
                    call.cancel()
                    break
        except grpc.aio.AioRpcError as err:
            return checked(method, err.code(), err.details())
        except asyncio.InvalidStateError:
            pass  # written after the server had answered: its status is below
        return checked(method, await call.code(), await call.details() or "cancelled")


@pytest.mark.parametrize("method", METHODS)
def test_every_answer_is_ok_or_a_documented_status(caller: Caller, method: str) -> None:
    kind = contract.methods()[method]
    service, _, name = method.lstrip("/").rpartition("/")
    request_type = contract.services()[service].methods_by_name[name].input_type
    one = raw_request(request_type)
    # Client streams: any number of messages in any order (the config twice, chunks before it, nothing at all).
    requests = st.lists(one, min_size=0, max_size=6) if kind.client_streaming else one.map(lambda r: [r])

    @given(requests=requests)
    def fuzz(requests: list[bytes]) -> None:
        SEEN[method][call(caller, method, requests).name] += 1

    fuzz()


def test_the_mesh_is_serving_and_bounded_after_fuzzing(full_mesh: LocalMesh, caller: Caller) -> None:
    """Runs after the fuzz tests (pytest keeps the module's order)."""
    channel = caller.channel
    health = health_pb2_grpc.HealthStub(channel)
    for service in sorted(contract.services()):
        if service.startswith(INTERNAL) or service in ("aimass.v1.AdminService", "aimass.v1.ModelService"):
            continue
        status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
        assert status == health_pb2.HealthCheckResponse.SERVING, service
    for pid, command in mesh_pids(full_mesh).items():
        assert rss_bytes(pid) < RSS_BOUND_BYTES, f"{command} holds {rss_bytes(pid) / 2**30:.1f} GiB"
    # And it still answers real work.
    reply = nlp_pb2_grpc.NlpServiceStub(channel).Sentiment(
        nlp_pb2.SentimentRequest(texts=["still standing"]), timeout=10
    )
    assert len(reply.results) == 1
