"""The gateway's forwarder on its own: a real gateway (in this process, production listener: API keys in front, mesh
mTLS behind) in front of probe replicas, each a real replica process started from this module (``python -m
tests.test_forwarder``): a ServerRunner with the replica role, its own certificate (kind "probe"), registered with
the mesh's registry in a real scheduler, serving the NLP, LLM and speech contracts with behaviour the request
chooses, down to dying with ``os._exit`` on a poison input, so a crash is a process truly gone.

What is checked is what a caller sees: answers, statuses, messages and trailers; and what the replicas saw
(metadata, deadlines, cancellation), which they write as marks in a folder the test reads.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health
from prometheus_client import REGISTRY

from aimass.client import error_info
from aimass.local_mesh import free_port
from aimass.runtime.batcher import UNMEETABLE_REASON
from aimass.runtime.config import ServerConfig, Settings
from aimass.runtime.errors import InvalidArgument, ResourceExhausted, Unavailable
from aimass.runtime.metadata import REPLICA_KEY, TENANT_KEY
from aimass.runtime.replica import replica_runner
from aimass.runtime.server import ServerRunner, serve_process
from aimass.v1 import llm_pb2, llm_pb2_grpc, models_pb2, nlp_pb2, nlp_pb2_grpc, speech_pb2, speech_pb2_grpc

Context = grpc.aio.ServicerContext[Any, Any]
ROOT = Path(__file__).resolve().parent.parent
PROBE_KIND = "probe"
PROBE_SERVICES = ("aimass.v1.NlpService", "aimass.v1.LlmService", "aimass.v1.SpeechService")
NLP = "aimass.v1.NlpService"
# Where a probe writes what it saw: "<tag>.<pid>" when a held call starts, "<tag>.<pid>.cancelled" when it is
# cancelled.
MARKS_ENV = "AIMASS_PROBE_MARKS"
TENANT = "forwarder-test-tenant"
READY_TIMEOUT_S = 30.0
CRASH_EXIT = 70


# -- the probe replica (runs in its own process) --------------------------------------------------------------------


def marks() -> Path:
    return Path(os.environ[MARKS_ENV])


async def hold(tag: str, seconds: float) -> None:
    """Writes the mark that a held call started, and which replica holds it; the cancelled mark if it is cancelled."""
    mark = marks() / f"{tag}.{os.getpid()}"
    mark.touch()
    try:
        await asyncio.sleep(seconds)
    except asyncio.CancelledError:
        mark.with_suffix(mark.suffix + ".cancelled").touch()
        raise


def add_trailers(context: Context, **values: str) -> None:
    """The probe's own trailers next to those the server set (the replica's name, the request id)."""
    context.set_trailing_metadata((*(context.trailing_metadata() or ()), *values.items()))


class ProbeNlp(nlp_pb2_grpc.NlpServiceServicer):
    """Embed: the first text says what to do; otherwise one vector per text holding the text's length."""

    async def Embed(self, request: nlp_pb2.EmbedRequest, context: Context) -> nlp_pb2.EmbedResponse:
        command, _, argument = (request.texts[0] if request.texts else "").partition(":")
        pid = str(os.getpid())
        if command == "crash":
            os._exit(CRASH_EXIT)
        if command == "hold":  # hold:<tag>:<seconds>
            tag, _, seconds = argument.partition(":")
            await hold(tag, float(seconds or 60))
        if command == "hold-once":  # hold-once:<tag>:<seconds>: held on the first replica that gets it only
            tag, _, seconds = argument.partition(":")
            if not list(marks().glob(f"{tag}.*")):
                await hold(tag, float(seconds or 60))
        if command == "unavailable" and argument in ("", pid):  # unavailable[:<pid>]: as a draining replica answers
            raise Unavailable(f"probe {pid} is draining; retry on another replica", reason="DRAINING")
        if command == "unmeetable" and argument in ("", pid):  # as a replica whose backlog outlasts the deadline
            raise ResourceExhausted(
                f"probe {pid}: the work queued ahead would outlast this call's deadline",
                reason=UNMEETABLE_REASON,
                retry_after_ms=250,
            )
        if command == "full":
            raise ResourceExhausted(f"probe {pid}: queue is full", reason="QUEUE_FULL")
        if command == "invalid":
            raise InvalidArgument("the probe was asked to refuse this request")
        seen = dict(context.invocation_metadata() or ())
        add_trailers(
            context,
            **{
                "x-probe-pid": pid,
                "x-probe-label": str(seen.get("x-caller-label", "")),
                "x-probe-tenant": str(seen.get(TENANT_KEY, "")),
                "x-probe-deadline": f"{context.time_remaining() or 0:.1f}",
                "x-probe-authorization": "yes" if "authorization" in seen else "no",
            },
        )
        return nlp_pb2.EmbedResponse(
            embeddings=[nlp_pb2.Embedding(values=[float(len(text))]) for text in request.texts], dimensions=1
        )


class ProbeLlm(llm_pb2_grpc.LlmServiceServicer):
    """Generate: streams the prompt's words back; the word "crash" kills the process, "hold" holds the stream."""

    async def Generate(
        self, request: llm_pb2.GenerateRequest, context: Context
    ) -> AsyncIterator[llm_pb2.GenerateResponse]:
        words = request.prompt.split()
        if words and words[0] == "unavailable":
            raise Unavailable(f"probe {os.getpid()} is draining; retry on another replica", reason="DRAINING")
        for word in words:
            if word == "crash":
                os._exit(CRASH_EXIT)
            if word.startswith("hold:"):
                await hold(word.removeprefix("hold:"), 60)
            yield llm_pb2.GenerateResponse(delta=word)
        add_trailers(context, **{"x-probe-pid": str(os.getpid())})
        yield llm_pb2.GenerateResponse(finish_reason=llm_pb2.FINISH_REASON_STOP)


class ProbeSpeech(speech_pb2_grpc.SpeechServiceServicer):
    """StreamTranscribe: a partial naming each audio chunk's size; a chunk b"crash" kills the process; a first
    chunk b"refuse" is refused at once (INVALID_ARGUMENT), as the real replica refuses a stream without config."""

    async def StreamTranscribe(
        self, request_iterator: AsyncIterator[speech_pb2.StreamTranscribeRequest], context: Context
    ) -> AsyncIterator[speech_pb2.StreamTranscribeResponse]:
        first = True
        async for request in request_iterator:
            if first and request.audio == b"refuse":
                raise InvalidArgument("the probe refuses this stream")
            first = False
            if request.audio == b"crash":
                os._exit(CRASH_EXIT)
            if request.HasField("audio"):
                yield speech_pb2.StreamTranscribeResponse(
                    partial=speech_pb2.TranscriptSegment(text=f"{len(request.audio)} bytes")
                )
        yield speech_pb2.StreamTranscribeResponse(end=speech_pb2.StreamTranscribeEnd())


class ProbeApp:
    kind = PROBE_KIND
    service_names: tuple[str, ...] = PROBE_SERVICES

    def add_to_server(self, server: grpc.aio.Server, health_servicer: health.aio.HealthServicer) -> None:
        # The probes implement only the methods under test (the others answer UNIMPLEMENTED).
        nlp_pb2_grpc.add_NlpServiceServicer_to_server(ProbeNlp(), server)  # type: ignore[abstract]
        llm_pb2_grpc.add_LlmServiceServicer_to_server(ProbeLlm(), server)  # type: ignore[abstract]
        speech_pb2_grpc.add_SpeechServiceServicer_to_server(ProbeSpeech(), server)  # type: ignore[abstract]

    async def load(self) -> None:
        return None

    def model_names(self) -> tuple[str, ...]:
        return ()

    def model_infos(self) -> Sequence[models_pb2.ModelInfo]:
        return ()

    async def close(self) -> None:
        return None


def probe_runner(settings: Settings) -> ServerRunner:
    quick = ServerConfig(port=0, drain_delay_s=0, drain_grace_s=2, access_log=False)
    return replica_runner(ProbeApp(), settings, quick)


# -- the mesh under test: scheduler and gateway in this process, probes as processes ---------------------------------


class Mesh:
    def __init__(self, scheduler: ServerRunner, gateway: ServerRunner, settings: Settings, marks: Path) -> None:
        self.scheduler = scheduler
        self.gateway = gateway
        self.settings = settings
        self.marks = marks
        self.probes: dict[int, asyncio.subprocess.Process] = {}

    @property
    def app(self) -> Any:
        return self.gateway.app

    def serving(self) -> set[int]:
        """The pids of the probes the gateway routes NLP calls to."""
        return {r.instance.pid for r in self.app.replicas.healthy(NLP)}

    async def start_probes(self, count: int) -> list[int]:
        """``count`` probe processes, once the gateway routes to each (and to no other)."""
        env = {
            **os.environ,
            MARKS_ENV: str(self.marks),
            "AIMASS_LOG_LEVEL": "INFO",
            "AIMASS_REGISTRY__ADDRESS": self.settings.registry.address,
            "AIMASS_REGISTRY__HEARTBEAT_S": "0.2",
            "AIMASS_REGISTRY__TTL_S": "2",
            "AIMASS_SCHEDULER__ADDRESS": "",
        }
        started = []
        for index in range(count):
            with (self.marks / f"probe-{len(self.probes) + index}.log").open("ab") as sink:
                started.append(
                    await asyncio.create_subprocess_exec(
                        sys.executable, "-m", "tests.test_forwarder", env=env, cwd=ROOT, stdout=sink, stderr=sink
                    )
                )
        for process in started:
            self.probes[process.pid] = process
        pids = {p.pid for p in started}
        await until(lambda: self.serving() == pids, "the gateway never routed to the new probes")
        return sorted(pids)

    def alive(self) -> set[int]:
        return {pid for pid, process in self.probes.items() if process.returncode is None}

    async def stop_probes(self) -> None:
        """Every probe stopped, and gone from the gateway's view."""
        for process in self.probes.values():
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.terminate()
        for process in self.probes.values():
            try:
                await asyncio.wait_for(process.wait(), 10)
            except TimeoutError:
                process.kill()
                await process.wait()
        self.probes.clear()
        await until(lambda: not self.serving(), "stopped probes stayed in the gateway's view")

    def held_by(self, tag: str) -> list[int]:
        """The pids of the probes holding a call tagged ``tag``."""
        return [int(m.suffix[1:]) for m in self.marks.glob(f"{tag}.*") if not m.name.endswith(".cancelled")]

    def cancelled(self, tag: str) -> bool:
        return any(self.marks.glob(f"{tag}.*.cancelled"))


async def until(condition: Callable[[], bool], failure: str, timeout_s: float = READY_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, failure
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def probe_mesh(marks: Path, **gateway_config: Any) -> AsyncIterator[Mesh]:
    """A scheduler and a gateway in-process, ready for probe replicas; ``gateway_config`` updates the gateway's."""
    # Imported here, not at the top: a probe process imports this module and needs none of it.
    from aimass import pki
    from gateway.app import build_runner as gateway_runner
    from scheduler.app import build_runner as scheduler_runner
    from tests.inprocess_mesh import mesh_settings

    settings = mesh_settings(free_port())
    # Round robin: both replicas of a pair take calls, whatever the scheduler's view holds of probes.
    gateway_update = {"router": "round_robin", **gateway_config}
    settings = settings.model_copy(update={"gateway": settings.gateway.model_copy(update=gateway_update)})
    pki.issue(settings.pki_dir, role=PROBE_KIND, name=PROBE_KIND)
    scheduler = scheduler_runner(settings)
    await scheduler.start()
    gateway = gateway_runner(settings)
    await gateway.start()
    started = Mesh(scheduler, gateway, settings, marks)
    try:
        yield started
    finally:
        await started.stop_probes()
        await gateway.drain()
        await scheduler.drain()


@pytest.fixture(scope="module")
async def mesh(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Mesh]:
    async with probe_mesh(tmp_path_factory.mktemp("probe-marks")) as started:
        yield started


@pytest.fixture
async def probes(mesh: Mesh) -> AsyncIterator[Callable[[int], Any]]:
    """Starts probes for one test; they are stopped (and gone from the gateway's view) when it ends."""
    try:
        yield mesh.start_probes
    finally:
        await mesh.stop_probes()


@pytest.fixture
async def channel(mesh: Mesh) -> AsyncIterator[grpc.aio.Channel]:
    from tests.security import key_for, keyed

    async with keyed(mesh.gateway.address, key_for(TENANT)) as opened:
        yield opened


def counted(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def trailers_of(err: grpc.aio.AioRpcError) -> dict[str, str]:
    return {key: str(value) for key, value in err.trailing_metadata() or ()}


async def trailers(call: Any) -> dict[str, str]:
    """A finished call's trailers (text values)."""
    return {key: str(value) for key, value in await call.trailing_metadata() or ()}


async def rpc_error(awaitable: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await awaitable
    return caught.value


def reason(err: grpc.aio.AioRpcError) -> str:
    info = error_info(err)
    return info.reason if info is not None else ""


def embed(*texts: str) -> nlp_pb2.EmbedRequest:
    return nlp_pb2.EmbedRequest(texts=list(texts))


# -- pass-through: unary, server stream, bidirectional stream; metadata, deadlines, cancellation ----------------------


async def test_unary_call_passes_metadata_deadline_and_trailers(
    probes: Callable[[int], Any], channel: grpc.aio.Channel
) -> None:
    (pid,) = await probes(1)
    call = nlp_pb2_grpc.NlpServiceStub(channel).Embed(
        embed("hello", "mesh"),
        timeout=20,
        # A label of the caller's own, and a tenant it claims (not its key's).
        metadata=(("x-caller-label", "blue"), (TENANT_KEY, "someone-else")),
    )
    answer = await call
    assert [list(e.values) for e in answer.embeddings] == [[5.0], [4.0]]
    answered = await trailers(call)
    assert answered["x-probe-pid"] == str(pid)
    assert answered[REPLICA_KEY].startswith(f"{PROBE_KIND}-") and answered[REPLICA_KEY].endswith(f"-{pid}")
    assert answered["x-probe-label"] == "blue"
    # The replica gets the tenant of the verified key, never the caller's claim, nor the key itself.
    assert answered["x-probe-tenant"] == TENANT and answered["x-probe-authorization"] == "no"
    assert answered[TENANT_KEY] == TENANT
    assert 15 < float(answered["x-probe-deadline"]) <= 20.5  # the caller's deadline, less the trip (grpc rounds up)


async def test_replica_errors_reach_the_caller_unchanged(
    probes: Callable[[int], Any], channel: grpc.aio.Channel
) -> None:
    await probes(1)
    err = await rpc_error(nlp_pb2_grpc.NlpServiceStub(channel).Embed(embed("invalid"), timeout=10))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details() == "the probe was asked to refuse this request" and reason(err) == "INVALID_ARGUMENT"
    assert trailers_of(err)[REPLICA_KEY].startswith(f"{PROBE_KIND}-")


async def test_streams_pass_through(probes: Callable[[int], Any], channel: grpc.aio.Channel) -> None:
    (pid,) = await probes(1)
    call = llm_pb2_grpc.LlmServiceStub(channel).Generate(llm_pb2.GenerateRequest(prompt="one two three"), timeout=20)
    replies = [reply async for reply in call]
    assert [r.delta for r in replies] == ["one", "two", "three", ""]
    assert replies[-1].finish_reason == llm_pb2.FINISH_REASON_STOP
    assert (await trailers(call))["x-probe-pid"] == str(pid)

    async def chunks() -> AsyncIterator[speech_pb2.StreamTranscribeRequest]:
        yield speech_pb2.StreamTranscribeRequest(config=speech_pb2.StreamTranscribeConfig(sample_rate_hz=16000))
        for size in (3200, 1600):
            yield speech_pb2.StreamTranscribeRequest(audio=b"\0" * size)

    events = [e async for e in speech_pb2_grpc.SpeechServiceStub(channel).StreamTranscribe(chunks(), timeout=20)]
    assert [e.partial.text for e in events[:-1]] == ["3200 bytes", "1600 bytes"] and events[-1].HasField("end")


async def test_caller_cancel_and_deadline_reach_the_replica(
    mesh: Mesh, probes: Callable[[int], Any], channel: grpc.aio.Channel
) -> None:
    await probes(1)
    nlp = nlp_pb2_grpc.NlpServiceStub(channel)
    # A unary call the caller cancels: the replica's handler is cancelled too.
    call = nlp.Embed(embed("hold:unary-cancel:60"), timeout=30)
    await until(lambda: bool(mesh.held_by("unary-cancel")), "the held call never reached the replica", 10)
    call.cancel()
    await until(lambda: mesh.cancelled("unary-cancel"), "the replica never saw the caller's cancel", 5)
    # A unary call past its deadline: DEADLINE_EXCEEDED, and the replica stops too.
    err = await rpc_error(nlp.Embed(embed("hold:unary-deadline:60"), timeout=1))
    assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await until(lambda: mesh.cancelled("unary-deadline"), "the replica never saw the deadline pass", 5)
    # A server stream cancelled after its first response.
    stream = llm_pb2_grpc.LlmServiceStub(channel).Generate(
        llm_pb2.GenerateRequest(prompt="first hold:stream-cancel"), timeout=30
    )
    first = await stream.read()
    assert isinstance(first, llm_pb2.GenerateResponse) and first.delta == "first"
    await until(lambda: bool(mesh.held_by("stream-cancel")), "the stream never reached its hold", 10)
    stream.cancel()
    await until(lambda: mesh.cancelled("stream-cancel"), "the replica never saw the stream cancelled", 5)


# -- retries: a replica's own UNAVAILABLE ------------------------------------------------------------------------------


async def test_a_replicas_unavailable_is_retried_once_elsewhere(
    mesh: Mesh, probes: Callable[[int], Any], channel: grpc.aio.Channel
) -> None:
    first, second = await probes(2)
    nlp = nlp_pb2_grpc.NlpServiceStub(channel)
    retries = counted("aimass_gateway_retries_total", service=NLP, code="UNAVAILABLE")
    # The first probe answers UNAVAILABLE (as a draining replica does): every call is answered by the second.
    for _ in range(4):
        call = nlp.Embed(embed(f"unavailable:{first}"), timeout=10)
        await call
        assert (await trailers(call))["x-probe-pid"] == str(second)
    # Those the router sent to the first probe first were retried (one retry each).
    assert 1 <= counted("aimass_gateway_retries_total", service=NLP, code="UNAVAILABLE") - retries <= 4
    # Both answer UNAVAILABLE: after one retry the caller gets the replica's own answer, unchanged.
    for _ in range(3):
        err = await rpc_error(nlp.Embed(embed("unavailable"), timeout=10))
        assert err.code() == grpc.StatusCode.UNAVAILABLE and reason(err) == "DRAINING"
        assert "is draining; retry on another replica" in (err.details() or "")
    # A replica's own answer is no crash: nothing was counted against the request, nobody died.
    assert mesh.app.forwarder.crashes.get(key(embed("unavailable").SerializeToString())) is None
    assert mesh.alive() == {first, second}


async def test_a_replicas_refusal_of_a_deadline_its_backlog_would_outlast_is_retried_once_elsewhere(
    mesh: Mesh, probes: Callable[[int], Any], channel: grpc.aio.Channel
) -> None:
    first, second = await probes(2)
    nlp = nlp_pb2_grpc.NlpServiceStub(channel)
    retries = counted("aimass_gateway_retries_total", service=NLP, code="RESOURCE_EXHAUSTED")
    # The first probe's backlog cannot meet the deadline: every call is answered by the second.
    for _ in range(4):
        call = nlp.Embed(embed(f"unmeetable:{first}"), timeout=10)
        await call
        assert (await trailers(call))["x-probe-pid"] == str(second)
    assert 1 <= counted("aimass_gateway_retries_total", service=NLP, code="RESOURCE_EXHAUSTED") - retries <= 4
    # Neither can: the caller gets the refusal, with its retry delay, after one retry.
    err = await rpc_error(nlp.Embed(embed("unmeetable"), timeout=10))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and reason(err) == UNMEETABLE_REASON
    info = error_info(err)
    assert info is not None and info.metadata["retry_after_ms"] == "250"
    # A full queue is not retried elsewhere: the caller is told at once.
    before = counted("aimass_gateway_retries_total", service=NLP, code="RESOURCE_EXHAUSTED")
    for _ in range(3):
        err = await rpc_error(nlp.Embed(embed("full"), timeout=10))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and reason(err) == "QUEUE_FULL"
    assert counted("aimass_gateway_retries_total", service=NLP, code="RESOURCE_EXHAUSTED") == before


async def test_a_stream_whose_replica_is_unavailable_before_data_is_retried(
    probes: Callable[[int], Any], channel: grpc.aio.Channel
) -> None:
    await probes(2)
    err = await rpc_error(
        _drain(llm_pb2_grpc.LlmServiceStub(channel).Generate(llm_pb2.GenerateRequest(prompt="unavailable"), timeout=10))
    )
    assert err.code() == grpc.StatusCode.UNAVAILABLE and reason(err) == "DRAINING"


async def _drain(call: Any) -> list[Any]:
    return [message async for message in call]


# -- crashes: bystanders, poison requests, reports ---------------------------------------------------------------------


async def test_bystanders_of_a_killed_replica_are_answered_by_another(
    mesh: Mesh, probes: Callable[[int], Any], channel: grpc.aio.Channel
) -> None:
    await probes(2)
    nlp = nlp_pb2_grpc.NlpServiceStub(channel)
    retried = counted("aimass_gateway_replica_failures_total", service=NLP, outcome="retried")
    tags = [f"bystander-{index}" for index in range(4)]
    calls = [nlp.Embed(embed(f"hold-once:{tag}:3"), timeout=30) for tag in tags]
    await until(lambda: all(mesh.held_by(tag) for tag in tags), "the calls never reached the replicas", 10)
    victim = mesh.held_by(tags[0])[0]
    on_victim = sum(1 for tag in tags if mesh.held_by(tag) == [victim])
    os.kill(victim, signal.SIGKILL)
    # Every call is answered: those on the killed replica by the other one.
    answers = await asyncio.gather(*calls)
    assert all(len(answer.embeddings) == 1 for answer in answers)
    assert [(await trailers(call))["x-probe-pid"] for call in calls].count(str(victim)) == 0
    assert counted("aimass_gateway_replica_failures_total", service=NLP, outcome="retried") - retried == on_victim
    # Answered elsewhere, the requests are cleared of suspicion.
    crashes = mesh.app.forwarder.crashes
    assert not [tag for tag in tags if crashes.get(key(embed(f"hold-once:{tag}:3").SerializeToString()))]
    # The dead replica is left out of routing at once (before the registry drops it): new calls go to the other.
    for index in range(4):
        call = nlp.Embed(embed(f"after the kill {index}"), timeout=10)
        await call
        assert (await trailers(call))["x-probe-pid"] != str(victim)


async def test_a_poison_request_crashes_two_replicas_at_most_then_is_refused_unsent(
    mesh: Mesh, probes: Callable[[int], Any], channel: grpc.aio.Channel
) -> None:
    pids = set(await probes(3))
    nlp = nlp_pb2_grpc.NlpServiceStub(channel)
    poison = embed("crash:unary")
    err = await rpc_error(nlp.Embed(poison, timeout=20))
    assert err.code() == grpc.StatusCode.INTERNAL and reason(err) == "POISON_REQUEST"
    message = err.details() or ""
    assert "each crashed while serving this exact request" in message and "not sent again" in message
    await until(lambda: len(mesh.alive()) == 1, "the poison request did not kill exactly two probes", 10)
    (survivor,) = mesh.alive()
    dead = pids - {survivor}
    # The message names the replicas it killed, and the ErrorInfo gives the facts.
    assert all(f"-{pid}" in message for pid in dead)
    info = error_info(err)
    assert (
        info is not None and len(info.metadata["fingerprint"]) == 16 and len(info.metadata["replicas"].split(",")) == 2
    )
    # Sent again: refused at the gateway, the survivor untouched.
    refusals = counted("aimass_gateway_poison_refusals_total", service=NLP)
    again = await rpc_error(nlp.Embed(poison, timeout=20))
    assert again.code() == grpc.StatusCode.INTERNAL and reason(again) == "POISON_REQUEST"
    assert "refused without being sent" in (again.details() or "") and info.metadata["fingerprint"] in (
        again.details() or ""
    )
    assert counted("aimass_gateway_poison_refusals_total", service=NLP) - refusals == 1
    assert mesh.alive() == {survivor}
    # Other requests are served by the survivor.
    call = nlp.Embed(embed("an innocent request"), timeout=10)
    await call
    assert (await trailers(call))["x-probe-pid"] == str(survivor)


async def test_a_poison_stream_is_contained_before_its_first_response(
    mesh: Mesh, probes: Callable[[int], Any], channel: grpc.aio.Channel
) -> None:
    await probes(3)
    llm = llm_pb2_grpc.LlmServiceStub(channel)
    poison = llm_pb2.GenerateRequest(prompt="crash now")
    err = await rpc_error(_drain(llm.Generate(poison, timeout=20)))
    assert err.code() == grpc.StatusCode.INTERNAL and reason(err) == "POISON_REQUEST"
    await until(lambda: len(mesh.alive()) == 1, "the poison stream did not kill exactly two probes", 10)
    again = await rpc_error(_drain(llm.Generate(poison, timeout=20)))
    assert reason(again) == "POISON_REQUEST" and "refused without being sent" in (again.details() or "")
    assert len(mesh.alive()) == 1


async def test_a_crash_after_stream_data_is_reported_naming_the_replica(
    mesh: Mesh, probes: Callable[[int], Any], channel: grpc.aio.Channel
) -> None:
    await probes(2)
    reported = counted("aimass_gateway_replica_failures_total", service="aimass.v1.LlmService", outcome="reported")
    call = llm_pb2_grpc.LlmServiceStub(channel).Generate(llm_pb2.GenerateRequest(prompt="one two crash"), timeout=20)
    received: list[str] = []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for reply in call:
            received.append(reply.delta)
    assert received == ["one", "two"]
    err = caught.value
    assert err.code() == grpc.StatusCode.UNAVAILABLE and reason(err) == "REPLICA_CRASHED"
    await until(lambda: len(mesh.alive()) == 1, "the probe that crashed is still running", 10)
    (dead,) = set(mesh.probes) - mesh.alive()
    message = err.details() or ""
    assert message.startswith(f"replica {PROBE_KIND}-") and f"-{dead} at 127.0.0.1:" in message
    assert "2 response(s) of the stream had reached you" in message and "start it again" in message
    info = error_info(err)
    assert info is not None and info.metadata["replica"].endswith(f"-{dead}")
    # Not sent again after data flowed: one probe died, the other lives.
    await asyncio.sleep(0.5)
    assert mesh.alive() == set(mesh.probes) - {dead}
    assert (
        counted("aimass_gateway_replica_failures_total", service="aimass.v1.LlmService", outcome="reported") - reported
        == 1
    )


async def test_a_crash_under_a_bidirectional_stream_is_reported(
    mesh: Mesh, probes: Callable[[int], Any], channel: grpc.aio.Channel
) -> None:
    (pid,) = await probes(1)

    async def chunks() -> AsyncIterator[speech_pb2.StreamTranscribeRequest]:
        yield speech_pb2.StreamTranscribeRequest(audio=b"\0" * 320)
        await asyncio.sleep(0.2)
        yield speech_pb2.StreamTranscribeRequest(audio=b"crash")

    events: list[str] = []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for event in speech_pb2_grpc.SpeechServiceStub(channel).StreamTranscribe(chunks(), timeout=20):
            events.append(event.partial.text)
    assert events == ["320 bytes"]
    err = caught.value
    assert err.code() == grpc.StatusCode.UNAVAILABLE and reason(err) == "REPLICA_CRASHED"
    assert f"-{pid} at 127.0.0.1:" in (err.details() or "") and "client stream is not sent again" in (
        err.details() or ""
    )


async def test_a_crash_with_no_other_replica_is_reported(
    mesh: Mesh, probes: Callable[[int], Any], channel: grpc.aio.Channel
) -> None:
    (pid,) = await probes(1)
    err = await rpc_error(nlp_pb2_grpc.NlpServiceStub(channel).Embed(embed("crash:alone"), timeout=20))
    assert err.code() == grpc.StatusCode.UNAVAILABLE and reason(err) == "REPLICA_CRASHED"
    message = err.details() or ""
    assert (
        f"-{pid} at 127.0.0.1:" in message and "stopped answering while serving /aimass.v1.NlpService/Embed" in message
    )
    assert "no other replica of aimass.v1.NlpService could take it" in message
    # One crash is not enough to call the request poison: it is remembered, not refused.
    crashes = mesh.app.forwarder.crashes
    record = crashes.get(key(embed("crash:alone").SerializeToString()))
    assert record is not None and len(record.replicas) == 1 and not crashes.is_poison(record)


# -- the crash table on its own ----------------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def crash_table(clock: Clock, **overrides: Any) -> Any:
    from gateway.poison import CrashTable

    return CrashTable(**{"max_crashes": 2, "ttl_s": 60.0, "max_entries": 3, "clock": clock, **overrides})


def key(text: str | bytes, method: str = "/aimass.v1.NlpService/Embed") -> Any:
    """The fingerprint the gateway gives a request of ``method`` whose bytes are ``text``."""
    from gateway.poison import Fingerprint

    request = text.encode() if isinstance(text, str) else text
    return Fingerprint(method, len(request), hashlib.blake2b(request, digest_size=16).digest())


def test_crash_table_counts_distinct_replicas_and_forgets() -> None:
    clock = Clock()
    table = crash_table(clock)
    poison = key("poison")
    # The same replica twice (two calls of the same bytes on one replica that died) is one crash.
    table.record(poison, "a", "10.0.0.1:1")
    assert not table.is_poison(table.record(poison, "a", "10.0.0.1:1"))
    assert table.may_hold("/aimass.v1.NlpService/Embed", len(b"poison"))
    assert not table.may_be_poison("/aimass.v1.NlpService/Embed", len(b"poison"))
    assert table.is_poison(table.record(poison, "b", "10.0.0.2:1"))
    assert table.may_be_poison("/aimass.v1.NlpService/Embed", len(b"poison"))
    # Only requests of the same method and size are hashed to be checked.
    assert not table.may_be_poison("/aimass.v1.NlpService/Embed", len(b"poison") + 1)
    assert not table.may_be_poison("/aimass.v1.NlpService/Classify", len(b"poison"))
    # Forgotten ttl_s after the last crash.
    clock.now += 59
    assert table.get(poison) is not None and table.expires_in(table.get(poison)) == pytest.approx(1)
    clock.now += 2
    assert table.get(poison) is None and len(table) == 0
    assert not table.may_be_poison("/aimass.v1.NlpService/Embed", len(b"poison"))
    # An answer clears an entry.
    table.record(poison, "a", "10.0.0.1:1")
    table.forget(poison)
    assert len(table) == 0 and not table.may_hold("/aimass.v1.NlpService/Embed", len(b"poison"))


def test_crash_table_is_bounded_oldest_crash_first() -> None:
    clock = Clock()
    table = crash_table(clock)
    for index in range(3):
        table.record(key(f"request {index}"), "a", "10.0.0.1:1")
        clock.now += 1
    table.record(key("request 0"), "b", "10.0.0.2:1")  # crashes again: now the most recent
    table.record(key("request 3"), "a", "10.0.0.1:1")
    assert len(table) == 3
    assert table.get(key("request 1")) is None  # the oldest crash went first
    assert table.is_poison(table.get(key("request 0")))
    assert table.may_be_poison("/aimass.v1.NlpService/Embed", len(b"request 0"))


def test_one_crash_is_poison_when_max_crashes_is_one() -> None:
    table = crash_table(Clock(), max_crashes=1)
    assert table.is_poison(table.record(key("x"), "a", "10.0.0.1:1"))


if __name__ == "__main__":
    serve_process(PROBE_KIND, probe_runner)


async def test_a_stream_refused_while_the_caller_still_sends_gets_the_replicas_status(
    probes: Callable[[int], Any], channel: grpc.aio.Channel
) -> None:
    """The replica refuses a stream at its first message while the gateway is still writing the caller's next ones:
    the caller must see the replica's INVALID_ARGUMENT, not grpc.aio's INTERNAL "Internal error from Core" for the
    write that lost the race (grpc/grpc#36066; 10 to 16 calls in 40 before the runtime read the rest first)."""
    await probes(1)
    seen: collections.Counter[tuple[str, str]] = collections.Counter()
    for _ in range(40):
        call = speech_pb2_grpc.SpeechServiceStub(channel).StreamTranscribe(timeout=10)
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
            for audio in (b"refuse", *([b"\0" * 1600] * 5)):
                if call.done():
                    break
                await call.write(speech_pb2.StreamTranscribeRequest(audio=audio))
            await call.done_writing()
        seen[((await call.code()).name, await call.details() or "")] += 1
    assert seen == {("INVALID_ARGUMENT", "the probe refuses this stream"): 40}
