"""The one typed config: defaults that run here, a TOML file, environment overrides, and clear refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from aimass.runtime.config import CONFIG_FILE_ENV, ServerConfig, Settings
from aimass.runtime.server import advertised_host


def test_defaults_run_on_a_laptop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(CONFIG_FILE_ENV, raising=False)
    settings = Settings()
    assert settings.gateway.server.address == "127.0.0.1:50051"
    assert settings.nlp.server.address == "127.0.0.1:50061"
    # The embedded registry lives in the scheduler, behind mesh mTLS.
    assert settings.registry.address == "127.0.0.1:50041" == settings.scheduler.server.address
    assert settings.nlp.embed_batching.max_batch_size == 64
    # Secure by default.
    assert settings.auth.mode == "on" and settings.mesh.tls == "on"
    assert settings.admin_key_file == settings.state_dir / "admin.key"
    assert settings.store_url == f"sqlite:///{settings.state_dir / 'aimass.db'}"


def test_front_door_tls_needs_both_files(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(CONFIG_FILE_ENV, raising=False)
    monkeypatch.setenv("AIMASS_GATEWAY__TLS_CERT", "/etc/aimass/gateway.crt")
    with pytest.raises(ValidationError, match=r"tls_cert and gateway\.tls_key go together"):
        Settings()


def test_file_then_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "aimass.toml"
    config.write_text(
        "log_level = 'DEBUG'\n"
        "[nlp.server]\nport = 6000\nmax_inflight = 8\n"
        "[nlp.embed_batching]\nmax_batch_size = 16\nmax_queue_delay_ms = 2.5\n"
    )
    monkeypatch.setenv(CONFIG_FILE_ENV, str(config))
    monkeypatch.setenv("AIMASS_NLP__EMBED_BATCHING__MAX_BATCH_SIZE", "8")
    settings = Settings()
    assert settings.log_level == "DEBUG"
    assert settings.nlp.server.port == 6000 and settings.nlp.server.max_inflight == 8
    assert settings.nlp.embed_batching.max_queue_delay_ms == 2.5
    assert settings.nlp.embed_batching.max_batch_size == 8  # the environment wins over the file


def test_bad_values_are_refused_naming_the_field(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(CONFIG_FILE_ENV, raising=False)
    monkeypatch.setenv("AIMASS_NLP__EMBED_BATCHING__MAX_BATCH_SIZE", "0")
    with pytest.raises(ValidationError) as caught:
        Settings()
    assert "nlp.embed_batching.max_batch_size" in str(caught.value)
    assert "greater than 0" in str(caught.value)


def test_the_advertised_host_is_one_others_can_dial() -> None:
    assert advertised_host(ServerConfig(host="10.0.0.5"), "10.0.0.1:50051") == "10.0.0.5"
    assert advertised_host(ServerConfig(host="0.0.0.0", advertise_host="nlp-1.internal"), "x:1") == "nlp-1.internal"
    # Bound to every interface: the address on the route to the registry (loopback here).
    assert advertised_host(ServerConfig(host="0.0.0.0"), "127.0.0.1:50051") == "127.0.0.1"


def test_model_budgets_take_sizes_per_modality(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(CONFIG_FILE_ENV, raising=False)
    monkeypatch.setenv("AIMASS_SCHEDULER__MODEL_BUDGETS__TEXT", "2GiB")
    monkeypatch.setenv("AIMASS_SCHEDULER__MODEL_BUDGETS__LLM", "60000000000")
    assert Settings().scheduler.model_budgets == {"text": 2 * 2**30, "llm": 60_000_000_000}
    monkeypatch.setenv("AIMASS_SCHEDULER__MODEL_BUDGETS__AUDIO", "1GiB")
    with pytest.raises(ValidationError) as caught:
        Settings()
    assert "scheduler.model_budgets.audio" in str(caught.value)
    monkeypatch.delenv("AIMASS_SCHEDULER__MODEL_BUDGETS__AUDIO")
    monkeypatch.setenv("AIMASS_SCHEDULER__MODEL_BUDGETS__TEXT", "0")
    with pytest.raises(ValidationError, match="greater than 0"):
        Settings()


def test_a_partial_server_override_keeps_the_sections_own_server_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    """Setting only the gateway's port (as `aimass up` does) once dropped its 32 MiB messages and 4,096 in-flight
    calls to the generic 16 MiB and 512, so an 18 MiB recording (documented limit 25 MiB) was refused by gRPC."""
    monkeypatch.setenv("AIMASS_GATEWAY__SERVER__PORT", "6001")
    monkeypatch.setenv("AIMASS_SPEECH__SERVER__MAX_INFLIGHT", "7")
    settings = Settings()
    assert settings.gateway.server.port == 6001
    assert settings.gateway.server.max_message_bytes == 32 * 1024 * 1024
    assert settings.gateway.server.max_inflight == 4096 and settings.gateway.server.max_streams == 2048
    assert settings.speech.server.max_inflight == 7 and settings.speech.server.port == 50081
    assert settings.speech.server.max_message_bytes == 32 * 1024 * 1024
