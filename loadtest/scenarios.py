"""The load-test scenarios: one per service method worth loading, as data, and the ghz configs written from them.

A scenario names the method, the request (proto3 JSON, as ghz, k6 and ``loadtest.run`` take it), the concurrency,
how long one run lasts and each call's deadline. Requests that carry media hold a placeholder, ``{"$media": name}``,
where the bytes go; ``request_json`` puts the real payload there (base64, as proto3 JSON writes bytes), built when
asked: a real photo (scikit-image's ``coffee``, JPEG-encoded by Pillow) or real speech (flite), so no binary is
kept in the repository.

    python -m loadtest.scenarios list        # the scenarios
    python -m loadtest.scenarios ghz         # rewrite loadtest/ghz/*.json from the scenarios, and their payloads
    python -m loadtest.scenarios payloads    # only the payload and metadata files the ghz configs read
    python -m loadtest.scenarios payloads --api-key "$KEY"   # ... with a tenant's key rather than the default

ghz configs of media scenarios read their request from ``loadtest/ghz/payloads/<name>.json`` (``data-file``,
relative to the repository root, where ghz is run); ``payloads`` writes those files (git ignores them).

The gateway wants an API key on every call: each ghz config reads its metadata, ``authorization: Bearer <key>``,
from ``loadtest/ghz/payloads/metadata.json`` (``metadata-file``), which ``payloads`` writes, readable by its owner
only, with the key found as aimass.client finds it (``--api-key``, else ``$AIMASS_API_KEY``, else the admin key file
of this host's mesh)::

    python -m loadtest.scenarios payloads && ghz --config loadtest/ghz/embed.json
    # or at the command line (-M '' drops the config's metadata-file, which ghz would read instead of -m)
    ghz --config loadtest/ghz/embed.json -M '' -m '{"authorization": "Bearer '"$KEY"'"}'

Straight to a replica (gateway vs direct), ghz speaks mesh mTLS as a gateway does: the mesh's CA and a gateway
certificate (`aimass up` keeps them in its state directory's ``pki``; local processes' certificates name 127.0.0.1)::

    PKI=~/.local/state/aimass/pki; TLS="--insecure=false --cacert $PKI/ca.crt --cert $PKI/gateway.crt"
    ghz --config loadtest/ghz/embed.json $TLS --key $PKI/gateway.key 127.0.0.1:50061
"""

from __future__ import annotations

import argparse
import base64
import functools
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aimass.cli import SERVICE_MODULES
from aimass.client import resolve_api_key
from loadtest.generator import build_request, find_method, normalise_method

__all__ = [
    "GHZ_DIR",
    "MEDIA",
    "PAYLOAD_DIR",
    "SCENARIOS",
    "Scenario",
    "by_name",
    "ghz_config",
    "metadata_path",
    "request_json",
    "write_ghz",
    "write_payloads",
]

ROOT = Path(__file__).resolve().parent.parent
GHZ_DIR = Path(__file__).resolve().parent / "ghz"
PAYLOAD_DIR = GHZ_DIR / "payloads"
# The gateway's default address (config: gateway.server.port).
DEFAULT_HOST = "127.0.0.1:50051"

JPEG_QUALITY = 90
SPOKEN_TEXT = "Please call Stella and ask her to bring these things with her from the store."


def coffee_jpeg() -> bytes:
    """scikit-image's ``coffee`` photo (400x600 RGB, public domain) as a JPEG at its native size (~72 KB)."""
    from PIL import Image
    from skimage import data

    buffer = io.BytesIO()
    photo = data.coffee()  # type: ignore[no-untyped-call]  # skimage ships no annotations for it
    Image.fromarray(photo).save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def spoken_wav() -> bytes:
    """``SPOKEN_TEXT`` read by flite's ``slt`` voice: a ~4 s, 16 kHz mono WAV (~125 KB)."""
    flite = shutil.which("flite")
    if flite is None:
        raise RuntimeError("flite is not installed: the speech scenarios need it (make system-packages)")
    with tempfile.TemporaryDirectory(prefix="aimass-loadtest-") as folder:
        wav = Path(folder) / "speech.wav"
        subprocess.run([flite, "-voice", "slt", "-t", SPOKEN_TEXT, "-o", str(wav)], check=True, timeout=60)
        return wav.read_bytes()


# Placeholder name → what builds its bytes.
MEDIA: dict[str, Callable[[], bytes]] = {"coffee.jpg": coffee_jpeg, "speech.wav": spoken_wav}


@functools.cache
def media_bytes(name: str) -> bytes:
    """The bytes of a media placeholder, built once per process."""
    builder = MEDIA.get(name)
    if builder is None:
        raise ValueError(f"unknown media {name!r}; known: {', '.join(sorted(MEDIA))}")
    return builder()


def media(name: str) -> dict[str, str]:
    """The placeholder for ``name``'s bytes inside a scenario's request."""
    if name not in MEDIA:
        raise ValueError(f"unknown media {name!r}; known: {', '.join(sorted(MEDIA))}")
    return {"$media": name}


def _media_names(value: Any) -> set[str]:
    if isinstance(value, Mapping):
        if set(value) == {"$media"}:
            return {str(value["$media"])}
        return {name for item in value.values() for name in _media_names(item)}
    if isinstance(value, list):
        return {name for item in value for name in _media_names(item)}
    return set()


def _materialise(value: Any) -> Any:
    if isinstance(value, Mapping):
        if set(value) == {"$media"}:
            return base64.b64encode(media_bytes(str(value["$media"]))).decode("ascii")
        return {key: _materialise(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_materialise(item) for item in value]
    return value


@dataclass(frozen=True)
class Scenario:
    """One method under load: what to send, how many calls in flight, for how long, with what deadline."""

    name: str
    # The service kind that serves it (aimass.cli.SERVICE_MODULES): the replica a direct run targets.
    kind: str
    method: str
    request: Mapping[str, Any]
    concurrency: int
    # One run (a ghz or k6 run, one round of ``loadtest.report`` per side).
    duration_s: float
    deadline_s: float
    description: str = ""
    metadata: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        problems: list[str] = []
        if self.kind not in SERVICE_MODULES:
            problems.append(f"kind must be one of {sorted(SERVICE_MODULES)}, got {self.kind!r}")
        try:
            descriptor = find_method(self.method)
        except ValueError as err:
            problems.append(str(err))
        else:
            if descriptor.client_streaming:
                problems.append(f"{self.method} is client-streaming; scenarios drive unary or server-streaming calls")
        if self.concurrency < 1:
            problems.append(f"concurrency must be >= 1, got {self.concurrency}")
        if self.duration_s <= 0 or self.deadline_s <= 0:
            problems.append(f"duration_s and deadline_s must be > 0, got {self.duration_s}, {self.deadline_s}")
        unknown = self.media - set(MEDIA)
        if unknown:
            problems.append(f"unknown media {sorted(unknown)}; known: {', '.join(sorted(MEDIA))}")
        if problems:
            raise ValueError(f"scenario {self.name!r}: " + "; ".join(problems))

    @property
    def full_method(self) -> str:
        """``aimass.v1.NlpService/Embed``."""
        return normalise_method(self.method)

    @property
    def streaming(self) -> bool:
        return find_method(self.method).server_streaming

    @property
    def media(self) -> set[str]:
        """The media placeholders its request holds."""
        return _media_names(self.request)

    @property
    def warmup(self) -> int:
        """Calls sent before measuring, so lazy set-up (connections, first batches) stays out of the figures."""
        return max(2, self.concurrency)


def request_json(scenario: Scenario) -> dict[str, Any]:
    """The scenario's request with every media placeholder replaced by its bytes (base64, proto3 JSON)."""
    materialised: dict[str, Any] = _materialise(scenario.request)
    return materialised


def request_bytes(scenario: Scenario) -> bytes:
    """The serialised request; ValueError if it is not a valid request of the scenario's method."""
    return build_request(scenario.method, request_json(scenario))


SCENARIOS: tuple[Scenario, ...] = (
    Scenario(
        name="embed",
        kind="nlp",
        method="aimass.v1.NlpService/Embed",
        request={"texts": ["The quick brown fox jumps over the lazy dog."], "normalize": True},
        concurrency=16,
        duration_s=3.0,
        deadline_s=10.0,
        description="one short sentence per request (all-MiniLM-L6-v2, batched on the replica)",
    ),
    Scenario(
        name="sentiment",
        kind="nlp",
        method="aimass.v1.NlpService/Sentiment",
        request={"texts": ["I love how fast this is."]},
        concurrency=32,
        duration_s=3.0,
        deadline_s=5.0,
        description="one short text per request (VADER: little model time, so mostly gRPC and gateway cost)",
    ),
    Scenario(
        name="vision-classify",
        kind="vision",
        method="aimass.v1.VisionService/Classify",
        request={"images": [{"data": media("coffee.jpg"), "mime_type": "image/jpeg"}], "top_k": 5},
        concurrency=8,
        duration_s=3.0,
        deadline_s=30.0,
        description="one real photo per request (scikit-image `coffee`, 400x600 JPEG), top 5 labels",
    ),
    Scenario(
        name="transcribe",
        kind="speech",
        method="aimass.v1.SpeechService/Transcribe",
        request={"audio": media("speech.wav"), "language": "en"},
        concurrency=2,
        duration_s=4.0,
        deadline_s=60.0,
        description="a ~4 s flite recording of one sentence per request (Whisper base)",
    ),
    Scenario(
        name="synthesize",
        kind="speech",
        method="aimass.v1.SpeechService/Synthesize",
        request={"text": SPOKEN_TEXT},
        concurrency=4,
        duration_s=3.0,
        deadline_s=30.0,
        description="server stream: one sentence read by flite, audio chunks until the end marker",
    ),
    Scenario(
        name="chat",
        kind="llm",
        method="aimass.v1.LlmService/Chat",
        request={
            "messages": [{"role": "CHAT_ROLE_USER", "content": "Write one sentence about the ocean."}],
            "sampling": {"max_tokens": 16, "temperature": 0},
        },
        concurrency=4,
        duration_s=4.0,
        deadline_s=60.0,
        description="server stream: one short greedy chat, at most 16 tokens (SmolLM2-135M on vLLM)",
    ),
)


def by_name(names: Sequence[str] | None = None) -> list[Scenario]:
    """The scenarios named (all of them for None), in registry order; ValueError naming what exists."""
    if names is None:
        return list(SCENARIOS)
    known = {s.name: s for s in SCENARIOS}
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ValueError(f"unknown scenarios {unknown}; known: {', '.join(known)}")
    return [s for s in SCENARIOS if s.name in set(names)]


def _go_duration(seconds: float) -> str:
    return f"{seconds * 1000:g}ms" if seconds < 1 else f"{seconds:g}s"


def payload_path(scenario: Scenario) -> str:
    """Where a media scenario's ghz config reads its request, relative to the repository root."""
    return f"{PAYLOAD_DIR.relative_to(ROOT).as_posix()}/{scenario.name}.json"


def metadata_path(scenario: Scenario) -> str:
    """Where the scenario's ghz config reads its metadata (the API key, and the scenario's own metadata if it has
    any: ghz reads a metadata-file instead of, not besides, a config's metadata), relative to the repository root."""
    name = f"{scenario.name}.metadata.json" if scenario.metadata else "metadata.json"
    return f"{PAYLOAD_DIR.relative_to(ROOT).as_posix()}/{name}"


def ghz_config(scenario: Scenario, host: str = DEFAULT_HOST) -> dict[str, Any]:
    """The scenario as a ghz config (https://ghz.sh/docs/options): reflection, plaintext, the same request,
    concurrency, duration and deadline, and the metadata with the API key the gateway asks for (``metadata-file``,
    written by ``write_payloads``). ``tags`` carry what ghz reports alongside and what k6's runner reads."""
    config: dict[str, Any] = {
        "name": f"aimass {scenario.name}",
        "call": scenario.full_method.replace("/", "."),
        "host": host,
        "insecure": True,
    }
    if scenario.media:
        config["data-file"] = payload_path(scenario)
    else:
        config["data"] = dict(scenario.request)
    config["metadata-file"] = metadata_path(scenario)
    config.update(
        {
            "concurrency": scenario.concurrency,
            "connections": 1,
            "duration": _go_duration(scenario.duration_s),
            # Calls still in flight when the duration ends finish and count, as in loadtest.generator.
            "duration-stop": "wait",
            "timeout": _go_duration(scenario.deadline_s),
            "tags": {
                "scenario": scenario.name,
                "kind": scenario.kind,
                "rpc": "server-streaming" if scenario.streaming else "unary",
            },
        }
    )
    return config


def ghz_text(scenario: Scenario) -> str:
    return json.dumps(ghz_config(scenario), indent=2) + "\n"


def write_ghz(folder: Path = GHZ_DIR) -> list[Path]:
    """Write ``<name>.json`` for every scenario into ``folder``; returns the files written."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for scenario in SCENARIOS:
        path = folder / f"{scenario.name}.json"
        path.write_text(ghz_text(scenario))
        written.append(path)
    return written


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` readable by its owner only (it holds an API key)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as sink:
        sink.write(text)
    tmp.replace(path)


def write_payloads(folder: Path = PAYLOAD_DIR, api_key: str | None = None) -> list[Path]:
    """Write into ``folder`` the request of every media scenario (``<name>.json``) and the metadata the ghz configs
    read (``metadata.json``, and ``<name>.metadata.json`` for a scenario with metadata of its own): the API key
    (``api_key``, else found as aimass.client finds it; none when there is none). Returns the files written."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for scenario in SCENARIOS:
        if scenario.media:
            path = folder / f"{scenario.name}.json"
            path.write_text(json.dumps(request_json(scenario)) + "\n")
            written.append(path)
    key = resolve_api_key(api_key)
    auth = {"authorization": f"Bearer {key}"} if key else {}
    for name, metadata in {Path(metadata_path(s)).name: dict(s.metadata) for s in SCENARIOS}.items():
        path = folder / name
        _write_private(path, json.dumps({**metadata, **auth}) + "\n")
        written.append(path)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    cli = argparse.ArgumentParser(prog="python -m loadtest.scenarios", description=__doc__.split("\n\n")[0])
    cli.add_argument("command", choices=["list", "ghz", "payloads"], nargs="?", default="list")
    cli.add_argument(
        "--api-key",
        default=None,
        help="the key the ghz configs send (default: $AIMASS_API_KEY, else the admin key file of this host's mesh)",
    )
    args = cli.parse_args(argv)
    if args.command == "list":
        for s in SCENARIOS:
            rpc = "stream" if s.streaming else "unary"
            print(f"{s.name:16} {s.full_method:36} {rpc:6} c={s.concurrency:<3} {s.duration_s:g}s  {s.description}")
        return 0
    written = write_ghz() if args.command == "ghz" else []
    written += write_payloads(api_key=args.api_key)
    for path in written:
        print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
