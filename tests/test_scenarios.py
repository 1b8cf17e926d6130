"""Scenarios (gateway/scenarios): the format's validation as plain unit tests (a malformed document is refused with
the line at fault), the runner's input binding and request building, and ScenarioService on a real mesh (every
shipped scenario on real inputs, steps in parallel, a failed step named, tenants' own scenarios)."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest

from aimass.runtime.errors import InvalidArgument
from aimass.v1 import common_pb2, llm_pb2, vision_pb2
from gateway.scenarios.catalogue import load_shipped
from gateway.scenarios.format import Interpolated, Ref, Scenario, ScenarioError, parse
from gateway.scenarios.runner import bind_inputs, build_request, resolve

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
