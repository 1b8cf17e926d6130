"""SIGTERM during load loses no accepted request; a crashed replica is restarted; Ctrl-C stops everything."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from aimass.local_mesh import LocalMesh, free_port
from aimass.runtime.discovery import Instance, RemoteRegistry
from aimass.v1 import nlp_pb2, nlp_pb2_grpc
from tests.conftest import start_mesh

REQUESTS = 240
CONCURRENCY = 8


@pytest.fixture(scope="module")
def two_replicas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMesh]:
    mesh = start_mesh(tmp_path_factory.mktemp("drain"), {"nlp": 2})
    yield mesh
    mesh.stop()


async def nlp_instances(mesh: LocalMesh) -> list[Instance]:
    """The mesh's serving NLP replicas, as its registry (in the scheduler) lists them to an operator."""
    registry = RemoteRegistry(mesh.scheduler, mesh.operator_credentials())
    try:
        return [i for i in await registry.list_instances() if i.kind == "nlp" and i.serving]
    finally:
        await registry.close()


async def wait_for(condition_text: str, check: object, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await check():  # type: ignore[operator]
            return
        await asyncio.sleep(0.2)
    raise TimeoutError(condition_text)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_sigterm_during_load_loses_no_request_and_the_supervisor_restarts(two_replicas: LocalMesh) -> None:
    before = await nlp_instances(two_replicas)
    assert len(before) == 2
    victim = before[0]
    codes: Counter[str] = Counter()
    served_by_victim_after_term = 0
    terminated_at: float | None = None

    async with two_replicas.aio_channel() as channel:
        stub = nlp_pb2_grpc.NlpServiceStub(channel)
        pending = iter(range(REQUESTS))
        quarter_done = asyncio.Event()

        async def worker() -> None:
            nonlocal served_by_victim_after_term
            for index in pending:
                try:
                    await stub.Embed(nlp_pb2.EmbedRequest(texts=[f"request number {index}"]), timeout=30)
                    codes["OK"] += 1
                except grpc.aio.AioRpcError as err:
                    codes[err.code().name] += 1
                if sum(codes.values()) >= REQUESTS // 4:
                    quarter_done.set()

        async def terminate_midway() -> None:
            nonlocal terminated_at
            await quarter_done.wait()
            os.kill(victim.pid, signal.SIGTERM)
            terminated_at = time.monotonic()

        await asyncio.gather(terminate_midway(), *(worker() for _ in range(CONCURRENCY)))

    assert terminated_at is not None
    assert codes == Counter({"OK": REQUESTS}), f"requests lost around SIGTERM: {dict(codes)}"
    log = two_replicas.log_text()
    assert "nlp draining: health NOT_SERVING" in log
    # The supervisor brings the stopped replica back, and it registers again under a new pid.

    async def replaced() -> bool:
        now = await nlp_instances(two_replicas)
        return len(now) == 2 and victim.pid not in {i.pid for i in now}

    await wait_for("the supervisor did not restart the terminated replica", replaced, 120)
    assert "exited with code 0; restarting" in two_replicas.log_text()
    assert not alive(victim.pid)


def test_ctrl_c_stops_every_process(tmp_path: Path) -> None:
    mesh = start_mesh(tmp_path)
    instances = asyncio.run(nlp_instances(mesh))
    pids = [i.pid for i in instances]
    assert pids and all(alive(pid) for pid in pids)
    assert mesh.stop() == 0
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(pid) for pid in pids), "a replica outlived `aimass up`"
    log = mesh.log_text()
    assert "stopping: services drain first, then the gateway" in log
    assert "nlp stopped" in log and "gateway stopped" in log


def test_sigterm_while_models_load_exits_at_once(tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "AIMASS_NLP__SERVER__PORT": str(port), "AIMASS_REGISTRY__ADDRESS": f"127.0.0.1:{free_port()}"}
    log = tmp_path / "nlp.log"
    with log.open("wb") as sink:
        replica = subprocess.Popen(
            [sys.executable, "-m", "services.nlp"], stdout=sink, stderr=subprocess.STDOUT, env=env
        )
    try:
        deadline = time.monotonic() + 60
        while "loading model 1/3" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(replica.pid, signal.SIGTERM)
        started = time.monotonic()
        assert replica.wait(timeout=30) == 0
        # The models take seconds to load; the replica must not sit through the rest of it.
        assert time.monotonic() - started < 2.0, log.read_text()
        assert "stopped while loading models" in log.read_text()
    finally:
        if replica.poll() is None:
            replica.kill()
