"""Scenarios (gateway/scenarios): the format's validation as plain unit tests (a malformed document is refused with
the line at fault), the runner's input binding and request building, and ScenarioService on a real mesh (every
shipped scenario on real inputs, steps in parallel, a failed step named, tenants' own scenarios)."""

from __future__ import annotations

import io
import json
import subprocess
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import soundfile  # type: ignore[import-untyped]
from google.protobuf.message import Message
from PIL import Image, ImageDraw, ImageFont

from aimass.client import error_info
from aimass.local_mesh import LocalMesh
from aimass.runtime.errors import InvalidArgument
from aimass.v1 import common_pb2, llm_pb2, scenarios_pb2, scenarios_pb2_grpc, speech_pb2, speech_pb2_grpc, vision_pb2
from gateway.scenarios.catalogue import load_shipped
from gateway.scenarios.format import Interpolated, Ref, Scenario, ScenarioError, parse
from gateway.scenarios.runner import bind_inputs, build_request, resolve
from tests.security import key_for
from tests.test_rest_llm import running_requests, wait_for

GOOD = """\
name: ocr-then-speak
description: A photo read aloud.
inputs:
  image: {type: bytes}
  voice: {type: text, default: ""}
steps:
  ocr:
    method: VisionService.ReadText
    request:
      images:
        - data: ${inputs.image}
  speak:
    method: aimass.v1.SpeechService/Synthesize
    timeout: 20s
    request:
      text: "Read: ${steps.ocr.results[0].text}"
      voice: ${inputs.voice}
      encoding: AUDIO_ENCODING_WAV
outputs:
  text: ${steps.ocr.results[0].text}
  audio: ${steps.speak.audio.data}
"""


def line_of(document: str, needle: str) -> int:
    """The 1-based line of ``document`` that holds ``needle`` (the line a fault must be reported at)."""
    return next(i for i, line in enumerate(document.splitlines(), 1) if needle in line)


def refused(document: str) -> ScenarioError:
    with pytest.raises(ScenarioError) as caught:
        parse(document)
    assert caught.value.message.startswith(f"line {caught.value.line}: ")
    assert caught.value.metadata["line"] == str(caught.value.line)
    return caught.value


def test_a_good_document_parses_into_steps_with_what_they_read() -> None:
    scenario = parse(GOOD)
    assert scenario.name == "ocr-then-speak"
    assert [(s.id, s.method, s.streaming, set(s.needs)) for s in scenario.steps] == [
        ("ocr", "/aimass.v1.VisionService/ReadText", False, set()),
        ("speak", "/aimass.v1.SpeechService/Synthesize", True, {"ocr"}),
    ]
    assert scenario.step("speak").timeout_s == 20.0
    assert isinstance(scenario.step("speak").request["text"], Interpolated)
    assert [(i.name, i.type, i.required) for i in scenario.inputs] == [
        ("image", "bytes", True),
        ("voice", "text", False),
    ]
    assert [(o.name, set(o.needs)) for o in scenario.outputs] == [("text", {"ocr"}), ("audio", {"speak"})]


def test_every_shipped_scenario_is_valid_and_an_operators_folder_adds_more(tmp_path: Path) -> None:
    assert {"read-aloud", "review-triage", "meeting-notes"} <= set(load_shipped())
    (tmp_path / "ocr-then-speak.yaml").write_text(GOOD)
    assert "ocr-then-speak" in load_shipped(tmp_path)
    # A malformed file stops the gateway's start with its file and line; a shipped name is refused.
    (tmp_path / "ocr-then-speak.yaml").write_text(GOOD.replace("ReadText", "ReadTxt"))
    with pytest.raises(ValueError, match=f"ocr-then-speak.yaml: line {line_of(GOOD, 'ReadText')}: "):
        load_shipped(tmp_path)
    (tmp_path / "ocr-then-speak.yaml").unlink()
    (tmp_path / "read-aloud.yaml").write_text(GOOD.replace("ocr-then-speak", "read-aloud"))
    with pytest.raises(ValueError, match="shipped scenario's name"):
        load_shipped(tmp_path)


@pytest.mark.parametrize(
    ("document", "at", "says"),
    [
        # YAML itself: a mapping's value indented wrongly.
        (GOOD.replace("  voice: {type: text", "   voice: {type: text"), "voice: {type: text", "not valid YAML"),
        (GOOD.replace("description: A photo", "descripton: A photo"), "descripton", "unknown key 'descripton'"),
        (GOOD.replace("VisionService.ReadText", "VisionService.ReadTxt"), "ReadTxt", "unknown method"),
        (GOOD.replace("VisionService.ReadText", "AdminService.CreateKey"), "CreateKey", "unknown method"),
        (
            GOOD.replace("VisionService.ReadText", "SpeechService.StreamTranscribe"),
            "StreamTranscribe",
            "takes a stream",
        ),
        (GOOD.replace("      images:", "      imagez:"), "imagez", "ReadTextRequest has no field 'imagez'"),
        (GOOD.replace('results[0].text}"', 'results[0].txt}"'), "Read: ", "ImageText has no field 'txt'"),
        (GOOD.replace('${steps.ocr.results[0].text}"', '${steps.orc.text}"'), "Read: ", "no step 'orc'"),
        (GOOD.replace("data: ${inputs.image}", "data: ${inputs.picture}"), "data: ${inputs", "no input 'picture'"),
        (
            GOOD.replace("voice: ${inputs.voice}", "voice: ${inputs.image}"),
            "voice: ${inputs",
            "is text; ${inputs.image} is bytes",
        ),
        (GOOD.replace("AUDIO_ENCODING_WAV", "AUDIO_ENCODING_MP5"), "AUDIO_ENCODING_MP5", "is not one of"),
        (GOOD.replace("timeout: 20s", "timeout: soon"), "timeout: soon", "timeout 'soon'"),
        (GOOD.replace('${steps.ocr.results[0].text}"', '${steps.ocr.results.text}"'), "Read: ", "not a message"),
        (GOOD.replace('${steps.ocr.results[0].text}"', '${steps.ocr.results[0}"'), "Read: ", "is not a reference"),
        (GOOD.replace('${steps.ocr.results[0].text}"', '${steps.ocr.results[0].text"'), "Read: ", "unclosed reference"),
        (GOOD.replace("name: ocr-then-speak", "name: OCR then speak"), "name: OCR", "lowercase letters"),
        (GOOD.replace("  voice: {type: text", "  voice: {type: txt"), "voice: {type: txt", "type 'txt'"),
        (
            GOOD.replace("      encoding:", "      meta: {request_id: x}\n      encoding:"),
            "meta: {request_id",
            "request.meta is the caller's",
        ),
        (
            GOOD.replace("      encoding: AUDIO", "      voice: again\n      encoding: AUDIO"),
            "voice: again",
            "given twice",
        ),
        (
            GOOD.replace("outputs:\n", "outputs: &all\n").replace(
                "  audio: ${steps", "  again: *all\n  audio: ${steps"
            ),
            "*all",
            "aliases",
        ),
    ],
    ids=[
        "yaml-syntax",
        "unknown-top-key",
        "unknown-method",
        "not-a-model-service",
        "client-streaming-method",
        "unknown-request-field",
        "unknown-response-field",
        "unknown-step",
        "unknown-input",
        "wrong-type",
        "bad-enum",
        "bad-timeout",
        "field-of-a-list",
        "not-a-reference",
        "unclosed-reference",
        "bad-name",
        "bad-input-type",
        "meta-is-the-callers",
        "duplicate-key",
        "alias",
    ],
)
def test_a_malformed_document_is_refused_with_the_line_at_fault(document: str, at: str, says: str) -> None:
    fault = refused(document)
    assert fault.line == line_of(document, at), fault.message
    assert says in fault.message, fault.message


def test_a_cycle_is_refused_naming_its_steps() -> None:
    document = textwrap.dedent("""\
        name: loop
        steps:
          first:
            method: NlpService.Sentiment
            request: {texts: "${steps.second.results[0].label}"}
          second:
            method: NlpService.Sentiment
            request: {texts: "${steps.first.results[0].label}"}
        """)
    fault = refused(document)
    assert "first -> second -> first" in fault.message and fault.line == line_of(document, "first:")


def test_limits_are_refused() -> None:
    with pytest.raises(ScenarioError, match="the limit is 100"):
        parse(GOOD, max_bytes=100)
    with pytest.raises(ScenarioError, match="2 steps; the limit is 1") as caught:
        parse(GOOD, max_steps=1)
    assert caught.value.line == line_of(GOOD, "steps:")
    for empty in ("", "name: x\nsteps: {}\n", "name: x\n"):
        with pytest.raises(ScenarioError):
            parse(empty)


def test_inputs_are_bound_and_checked_by_name_and_type() -> None:
    scenario = parse(GOOD)
    assert bind_inputs(scenario, {"image": ("bytes", b"\x89PNG")}) == {"image": b"\x89PNG", "voice": ""}
    for given, says in (
        ({}, "input 'image' (bytes) is required"),
        ({"image": ("text", "a photo")}, "input 'image' is bytes; it was given as text"),
        ({"image": ("bytes", b"x"), "colour": ("text", "red")}, "has no input 'colour'"),
    ):
        with pytest.raises(InvalidArgument, match=says.replace("(", r"\(").replace(")", r"\)")) as caught:
            bind_inputs(scenario, given)
        assert caught.value.metadata["input"] in ("image", "colour")


def test_a_request_is_built_from_inputs_and_earlier_results_with_the_callers_meta() -> None:
    scenario = parse(GOOD)
    values: dict[str, dict[str, Any]] = {
        "inputs": {"image": b"\x00\xffpicture", "voice": "alba"},
        "steps": {"ocr": vision_pb2.ReadTextResponse(results=[vision_pb2.ImageText(text="Hello there")])},
    }
    meta = common_pb2.RequestMeta(request_id="run-1", priority=common_pb2.PRIORITY_HIGH)
    ocr = build_request(scenario.step("ocr"), values, meta)
    assert isinstance(ocr, vision_pb2.ReadTextRequest)
    assert ocr.images[0].data == b"\x00\xffpicture" and ocr.meta == meta
    speak = build_request(scenario.step("speak"), values, meta)
    assert speak.text == "Read: Hello there" and speak.voice == "alba" and speak.meta.request_id == "run-1"  # type: ignore[attr-defined]
    # Reading past what a response holds names the step that read it.
    values["steps"]["ocr"] = vision_pb2.ReadTextResponse()
    with pytest.raises(InvalidArgument, match=r"step 'speak': .*\[0\] of a list of 0") as caught:
        build_request(scenario.step("speak"), values, meta)
    assert caught.value.metadata["step"] == "speak"


def test_a_single_value_fills_a_repeated_field_and_enums_read_as_names() -> None:
    document = textwrap.dedent("""\
        name: wrap
        inputs: {review: {type: text}}
        steps:
          chat:
            method: LlmService.Chat
            request:
              messages: [{role: CHAT_ROLE_USER, content: "${inputs.review}"}]
          feel:
            method: NlpService.Sentiment
            request: {texts: "${steps.chat.finish_reason}"}
        outputs:
          both: {reason: "${steps.chat.finish_reason}", said: "${steps.chat.delta}"}
        """)
    scenario: Scenario = parse(document)
    texts = scenario.step("feel").request["texts"]
    assert isinstance(texts, Ref) and texts.wrap
    values: dict[str, dict[str, Any]] = {
        "inputs": {"review": "hi"},
        "steps": {"chat": llm_pb2.ChatResponse(delta="Hello", finish_reason=llm_pb2.FINISH_REASON_STOP)},
    }
    feel = build_request(scenario.step("feel"), values, None)
    assert list(feel.texts) == ["FINISH_REASON_STOP"]  # type: ignore[attr-defined]
    assert resolve(scenario.outputs[0].value, values) == {"reason": "FINISH_REASON_STOP", "said": "Hello"}


# -- ScenarioService on a real mesh ------------------------------------------------------------------------------

slow = pytest.mark.slow
PRINTED = ["Hello aimass vision", "Invoice 2026 total 42"]
MEETING = (
    "Welcome to the budget meeting. We agreed to buy twelve new laptops for the design team, "
    "and the budget for them is five thousand dollars."
)
REVIEW = "The parcel from Berlin arrived two weeks late and the courier was rude. Terrible, awful service."
MOOD = """\
name: feedback-mood
description: How a customer feels, and about what.
inputs:
  feedback: {type: text}
steps:
  mood:
    method: NlpService.Sentiment
    request: {texts: "${inputs.feedback}"}
outputs:
  mood: ${steps.mood.results[0].label}
"""


def printed_picture() -> bytes:
    """PRINTED drawn by PIL on a white PNG."""
    picture = Image.new("RGB", (1000, 260), "white")
    draw = ImageDraw.Draw(picture)
    for row, line in enumerate(PRINTED):
        draw.text((40, 40 + 110 * row), line, fill="black", font=ImageFont.load_default(size=48))
    out = io.BytesIO()
    picture.save(out, "PNG")
    return out.getvalue()


@dataclass
class Run:
    """What a RunScenario call streamed back."""

    events: list[scenarios_pb2.RunScenarioResponse]

    def kinds(self) -> list[tuple[str, str]]:
        """(event, step or output) in the order they came."""
        named: list[tuple[str, str]] = []
        for e in self.events:
            kind = e.WhichOneof("event")
            assert kind is not None
            part = getattr(e, kind)
            named.append((kind, getattr(part, "step", getattr(part, "name", ""))))
        return named

    def output(self, name: str) -> scenarios_pb2.ScenarioValue:
        (value,) = [e.output.value for e in self.events if e.WhichOneof("event") == "output" and e.output.name == name]
        return value

    def result(self, step: str, message: Message) -> Any:
        (finished,) = [e.step_finished for e in self.events if e.step_finished.step == step]
        assert finished.result.Unpack(message), finished.result.type_url
        return message


def spoken(text: str) -> bytes:
    """``text`` spoken by espeak-ng, as a WAV file."""
    return subprocess.run(
        ["espeak-ng", "-v", "en-us", "--stdout", "--", text], capture_output=True, check=True, timeout=30
    ).stdout


def text_value(value: str) -> scenarios_pb2.ScenarioValue:
    return scenarios_pb2.ScenarioValue(text=value)


async def run_scenario(
    channel: grpc.aio.Channel, name: str, deadline_s: float = 180, **inputs: scenarios_pb2.ScenarioValue
) -> Run:
    stub = scenarios_pb2_grpc.ScenarioServiceStub(channel)
    request = scenarios_pb2.RunScenarioRequest(
        name=name, inputs=inputs, meta=common_pb2.RequestMeta(request_id=f"scenario-{name}-{time.time_ns()}")
    )
    events = [e async for e in stub.RunScenario(request, timeout=deadline_s)]
    assert events and events[-1].WhichOneof("event") == "end", events[-1:]
    return Run(events)


@slow
async def test_read_aloud_reads_a_photo_and_speaks_what_it_read(front_door_mesh: LocalMesh) -> None:
    async with front_door_mesh.aio_channel() as channel:
        run = await run_scenario(channel, "read-aloud", image=scenarios_pb2.ScenarioValue(data=printed_picture()))
        # Whisper hears the photo's words in the audio the scenario made.
        audio = run.output("audio").data
        samples, rate = soundfile.read(io.BytesIO(audio), dtype="float32")
        wav = io.BytesIO()
        soundfile.write(wav, samples, rate, format="WAV", subtype="PCM_16")
        speech = speech_pb2_grpc.SpeechServiceStub(channel)
        heard = await speech.Transcribe(speech_pb2.TranscribeRequest(audio=wav.getvalue(), language="en"), timeout=120)
    assert [k for k in run.kinds() if k[0].startswith("step")] == [
        ("step_started", "ocr"),
        ("step_finished", "ocr"),
        ("step_started", "speak"),
        ("step_finished", "speak"),
    ]
    read = run.output("text").text
    assert "aimass" in read.lower() and "vision" in read.lower(), read
    assert run.result("ocr", vision_pb2.ReadTextResponse()).results[0].text == read
    assert audio[:4] == b"RIFF" and audio[8:12] == b"WAVE"
    assert len(samples) / rate > 1.0, "the audio is shorter than the words it reads"
    assert "vision" in heard.text.lower() or "hello" in heard.text.lower(), heard.text


@slow
async def test_review_triage_runs_three_models_at_once_and_merges_them(front_door_mesh: LocalMesh) -> None:
    async with front_door_mesh.aio_channel() as channel:
        run = await run_scenario(channel, "review-triage", review=text_value(REVIEW))
    kinds = [k for k in run.kinds() if k[0].startswith("step")]
    # All three were under way together: every step started before the first one finished.
    first_finished = next(i for i, k in enumerate(kinds) if k[0] == "step_finished")
    assert sorted(step for kind, step in kinds[:first_finished]) == ["entities", "sentiment", "topic"], kinds
    assert sorted(step for kind, step in kinds[first_finished:]) == ["entities", "sentiment", "topic"], kinds
    assert run.output("sentiment").text == "negative"
    entities = json.loads(run.output("entities").json)
    assert "Berlin" in [e["text"] for e in entities], entities
    topics = json.loads(run.output("topics").json)
    assert {t["label"] for t in topics} == {"shipping", "product quality", "customer service", "price"}
    triage = json.loads(run.output("triage").json)
    assert triage["sentiment"] == "negative" and triage["compound"] < 0
    assert triage["topic"] == topics[0]["label"] and triage["entities"] == entities


@slow
async def test_meeting_notes_transcribes_and_summarises_a_recording(front_door_mesh: LocalMesh) -> None:
    recording = spoken(MEETING)
    async with front_door_mesh.aio_channel() as channel:
        run = await run_scenario(
            channel,
            "meeting-notes",
            recording=scenarios_pb2.ScenarioValue(data=recording),
            language=text_value("en"),
            max_tokens=scenarios_pb2.ScenarioValue(number=80),
        )
    transcript = run.output("transcript").text.lower()
    assert "budget" in transcript and "laptop" in transcript, transcript
    summary = run.output("summary").text
    assert summary.strip() and any(word in summary.lower() for word in ("laptop", "budget", "design")), summary
    chat = run.result("summary", llm_pb2.ChatResponse())
    assert chat.delta == summary and chat.usage.completion_tokens > 0


@slow
async def test_a_failed_step_fails_the_run_naming_the_step(front_door_mesh: LocalMesh) -> None:
    async with front_door_mesh.aio_channel() as channel:
        stub = scenarios_pb2_grpc.ScenarioServiceStub(channel)
        corrupt = scenarios_pb2.RunScenarioRequest(
            name="read-aloud", inputs={"image": scenarios_pb2.ScenarioValue(data=b"not an image, only text" * 4)}
        )
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            [e async for e in stub.RunScenario(corrupt, timeout=60)]
        assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        info = error_info(failed.value)
        assert info is not None and info.metadata["step"] == "ocr", info
        assert info.metadata["method"] == "aimass.v1.VisionService/ReadText"
        assert "step 'ocr'" in (failed.value.details() or "")
        # Inputs are checked before any step: a missing one, one of the wrong type.
        for inputs, named in (
            ({}, "image"),
            ({"image": text_value("a photo")}, "image"),
            ({"colour": text_value("red")}, "colour"),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                [
                    e
                    async for e in stub.RunScenario(
                        scenarios_pb2.RunScenarioRequest(name="read-aloud", inputs=inputs), timeout=30
                    )
                ]
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, refused.value
            refused_info = error_info(refused.value)
            assert refused_info is not None and refused_info.metadata["input"] == named
        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            [e async for e in stub.RunScenario(scenarios_pb2.RunScenarioRequest(name="no-such-scenario"), timeout=30)]
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND


@slow
async def test_a_tenants_own_scenarios_are_its_own(front_door_mesh: LocalMesh) -> None:
    tenant = f"scenarios-{time.time_ns()}"
    async with (
        front_door_mesh.aio_channel(key_for(tenant)) as channel,
        front_door_mesh.aio_channel(key_for(f"{tenant}-other")) as other_channel,
    ):
        stub = scenarios_pb2_grpc.ScenarioServiceStub(channel)
        other = scenarios_pb2_grpc.ScenarioServiceStub(other_channel)
        put = await stub.PutScenario(scenarios_pb2.PutScenarioRequest(source=MOOD))
        assert put.scenario.name == "feedback-mood" and not put.scenario.shipped
        assert list(put.scenario.steps) == ["mood: NlpService.Sentiment"] and put.scenario.updated_unix_ms > 0
        listed = {s.name: s for s in (await stub.ListScenarios(scenarios_pb2.ListScenariosRequest())).scenarios}
        assert {"read-aloud", "review-triage", "meeting-notes", "feedback-mood"} <= set(listed)
        assert listed["read-aloud"].shipped and not listed["feedback-mood"].shipped
        assert (await stub.GetScenario(scenarios_pb2.GetScenarioRequest(name="feedback-mood"))).source == MOOD
        run = await run_scenario(channel, "feedback-mood", feedback=text_value("I love this, it is wonderful!"))
        assert run.output("mood").text == "positive"
        # Another tenant: not listed, not found, not runnable, not deletable.
        assert "feedback-mood" not in [
            s.name for s in (await other.ListScenarios(scenarios_pb2.ListScenariosRequest())).scenarios
        ]
        for call in (
            other.GetScenario(scenarios_pb2.GetScenarioRequest(name="feedback-mood")),
            other.DeleteScenario(scenarios_pb2.DeleteScenarioRequest(name="feedback-mood")),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as hidden:
                await call
            assert hidden.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.aio.AioRpcError) as not_theirs:
            await run_scenario(other_channel, "feedback-mood", feedback=text_value("hi"))
        assert not_theirs.value.code() == grpc.StatusCode.NOT_FOUND
        # A shipped name is refused; a malformed document is refused with its line.
        with pytest.raises(grpc.aio.AioRpcError) as shipped_name:
            await stub.PutScenario(scenarios_pb2.PutScenarioRequest(source=MOOD.replace("feedback-mood", "read-aloud")))
        assert shipped_name.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        with pytest.raises(grpc.aio.AioRpcError) as malformed:
            await stub.PutScenario(scenarios_pb2.PutScenarioRequest(source=MOOD.replace("Sentiment", "Sentimental")))
        assert malformed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (malformed.value.details() or "").startswith(f"line {line_of(MOOD, 'Sentiment')}: "), malformed.value
        with pytest.raises(grpc.aio.AioRpcError) as shipped_delete:
            await stub.DeleteScenario(scenarios_pb2.DeleteScenarioRequest(name="read-aloud"))
        assert shipped_delete.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        await stub.DeleteScenario(scenarios_pb2.DeleteScenarioRequest(name="feedback-mood"))
        with pytest.raises(grpc.aio.AioRpcError) as gone:
            await stub.GetScenario(scenarios_pb2.GetScenarioRequest(name="feedback-mood"))
        assert gone.value.code() == grpc.StatusCode.NOT_FOUND


STORY = """\
name: long-story
inputs:
  topic: {type: text}
steps:
  story:
    method: LlmService.Chat
    request:
      messages: [{role: CHAT_ROLE_USER, content: "Tell me a very long story about ${inputs.topic}."}]
      sampling: {max_tokens: 600, temperature: 0}
outputs:
  story: ${steps.story.delta}
"""


@slow
async def test_cancelling_a_run_stops_its_steps_and_the_deadline_bounds_them(front_door_mesh: LocalMesh) -> None:
    async with front_door_mesh.aio_channel(key_for(f"scenarios-story-{time.time_ns()}")) as channel:
        stub = scenarios_pb2_grpc.ScenarioServiceStub(channel)
        await stub.PutScenario(scenarios_pb2.PutScenarioRequest(source=STORY))
        request = scenarios_pb2.RunScenarioRequest(name="long-story", inputs={"topic": text_value("a dragon")})
        call = stub.RunScenario(request, timeout=120)
        first = await anext(aiter(call))
        assert first.step_started.step == "story"
        await wait_for(lambda: running_requests(front_door_mesh) >= 1, 30)
        call.cancel()
        # The caller's cancellation reaches the engine: the story's sequence is aborted, not left to finish.
        await wait_for(lambda: running_requests(front_door_mesh) == 0, 5)
        with pytest.raises(grpc.aio.AioRpcError) as late:
            [e async for e in stub.RunScenario(request, timeout=1.5)]
        assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        await wait_for(lambda: running_requests(front_door_mesh) == 0, 5)
