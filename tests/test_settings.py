"""Settings come from the environment, refuse unsafe values, and are all documented."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from app.config_docs import configuration_table
from app.core.model import runtime_options
from app.engine.resources import usable_cores
from app.engine.runtime import session_threads
from app.errors import StartupError
from app.settings import PILLOW_MAX_IMAGE_PIXELS, Settings, Spinning
from ensemble_contract.modes import Mode, ModeChoice, intra_op_threads

CONFIGURATION = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
TABLE_START, TABLE_END = "<!-- configuration-table:start -->", "<!-- configuration-table:end -->"
REGENERATE = '.venv/bin/python -c "from app.config_docs import configuration_table; print(configuration_table())"'


def documented_table() -> str:
    """The configuration table of docs/configuration.md: what stands between its markers."""
    text = CONFIGURATION.read_text()
    assert text.count(TABLE_START) == 1 and text.count(TABLE_END) == 1, (
        f"docs/configuration.md needs one {TABLE_START} ... {TABLE_END}"
    )
    return text.split(TABLE_START, 1)[1].split(TABLE_END, 1)[0].strip()


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in Settings.model_fields:
        monkeypatch.delenv(name.upper(), raising=False)


def test_defaults_are_the_documented_ones() -> None:
    settings = Settings()
    assert settings.model_dir == Path("models/default")
    assert settings.default_mode is ModeChoice.FUSED
    assert settings.spinning is Spinning.DURING_RUNS
    assert settings.inference_slots == 1
    assert settings.probability_threshold == 0.5
    assert settings.port == 8000


def test_environment_variables_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODEL_DIR", "/srv/models")
    monkeypatch.setenv("DEFAULT_MODE", "compare")
    monkeypatch.setenv("SPINNING", "always")
    monkeypatch.setenv("MAX_QUEUE", "0")
    settings = Settings.from_env()
    assert settings.model_dir == Path("/srv/models")
    assert settings.default_mode is ModeChoice.COMPARE
    assert settings.spinning is Spinning.ALWAYS
    assert settings.max_queue == 0


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("default_mode", "fastest"),
        ("fused_intra_op_threads", 0),
        ("inter_op_threads", -1),
        ("inference_slots", 0),
        ("max_queue", -1),
        ("request_timeout_s", 0),
        ("max_upload_bytes", 10),
        ("max_image_pixels", PILLOW_MAX_IMAGE_PIXELS + 1),
        ("probability_threshold", 0),
        ("probability_threshold", 1),
        ("port", 70_000),
        ("workers", 0),
        ("workers", 257),
        ("workers", "many"),
        ("header_timeout_s", 0),
        ("max_connections", 1),
    ],
)
def test_unsafe_values_are_refused(field: str, value: object) -> None:
    with pytest.raises(ValidationError):
        Settings(**{field: value})


def test_a_bad_environment_is_one_startup_error_naming_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORKERS", "0")
    with pytest.raises(StartupError, match=r"WORKERS='0'.*must be auto or a number from 1 to 256"):
        Settings.from_env()


def test_an_empty_variable_counts_as_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    """What compose passes for a setting its .env leaves empty."""
    for name in ("API_KEY", "METRICS_PORT", "COST_PER_HOUR", "CORS_ORIGINS"):
        monkeypatch.setenv(name, "")
    settings = Settings.from_env()
    unset = (settings.api_key, settings.metrics_port, settings.cost_per_hour, settings.cors_origins)
    assert unset == (None, None, None, [])


def test_connections_leave_room_beyond_the_requests_in_flight(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every request in flight holds a connection; a probe needs one more."""
    monkeypatch.setenv("MAX_CONCURRENCY", "500")
    monkeypatch.setenv("MAX_CONNECTIONS", "500")
    with pytest.raises(StartupError, match=r"MAX_CONNECTIONS \(500\) must be more than MAX_CONCURRENCY \(500\)"):
        Settings.from_env()
    monkeypatch.setenv("MAX_CONNECTIONS", "501")
    assert Settings.from_env().max_connections == 501


def test_model_control_is_off_by_default() -> None:
    assert Settings().model_control == "none"


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.0.0.5", "service.internal"])
def test_model_control_without_a_key_is_refused_off_loopback(monkeypatch: pytest.MonkeyPatch, host: str) -> None:
    monkeypatch.setenv("MODEL_CONTROL", "explicit")
    monkeypatch.setenv("HOST", host)
    refusal = r"MODEL_CONTROL=explicit lets any caller unload the model: set MODEL_CONTROL_KEY"
    with pytest.raises(StartupError, match=refusal):
        Settings.from_env()
    monkeypatch.setenv("API_KEY", "a-key-of-at-least-16-characters")
    with pytest.raises(StartupError, match=refusal):  # an inference key does not open model control
        Settings.from_env()
    monkeypatch.setenv("MODEL_CONTROL_KEY", "a-key-of-at-least-16-characters")
    with pytest.raises(StartupError, match="MODEL_CONTROL_KEY must differ from API_KEY"):
        Settings.from_env()
    monkeypatch.setenv("MODEL_CONTROL_KEY", "another-key-of-at-least-16-characters")
    assert Settings.from_env().model_control == "explicit"


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"])
def test_model_control_without_a_key_is_allowed_on_loopback(host: str) -> None:
    assert Settings(model_control="explicit", host=host).model_control == "explicit"


def test_unset_thread_counts_split_the_cores() -> None:
    options = runtime_options(Settings())
    cores = usable_cores().count
    assert session_threads(options, Mode.FUSED, members=2) == cores
    assert session_threads(options, Mode.SEQUENTIAL, members=2) == cores
    assert session_threads(options, Mode.PARALLEL, members=2) == max(1, cores // 2)
    assert session_threads(options, Mode.PARALLEL, members=cores * 4) == 1
    assert session_threads(runtime_options(Settings(parallel_intra_op_threads=3)), Mode.PARALLEL, members=2) == 3


@pytest.mark.parametrize(
    ("cores", "slots", "members", "fused", "parallel"),
    [(2, 1, 2, 2, 1), (2, 2, 2, 1, 1), (16, 4, 2, 4, 2), (16, 16, 3, 1, 1), (16, 3, 2, 5, 2), (1, 4, 2, 1, 1)],
)
def test_a_layout_never_gives_more_threads_than_cores(cores: int, slots: int, members: int, fused: int, parallel: int):
    assert intra_op_threads(Mode.FUSED, cores, members, slots) == fused
    assert intra_op_threads(Mode.FUSED_INT8, cores, members, slots) == fused
    assert intra_op_threads(Mode.SEQUENTIAL, cores, members, slots) == fused
    assert intra_op_threads(Mode.PARALLEL, cores, members, slots) == parallel
    if cores >= slots * members:
        assert slots * parallel * members <= cores and slots * fused <= cores


@pytest.mark.parametrize("name", list(Settings.model_fields))
def test_every_setting_is_described_and_documented(name: str) -> None:
    assert Settings.model_fields[name].description
    assert f"\n| `{name.upper()}` |" in documented_table()


def test_the_documented_configuration_table_is_the_generated_one() -> None:
    assert documented_table() == configuration_table(), (
        f"docs/configuration.md's configuration table is out of date: replace what stands between {TABLE_START} and "
        f"{TABLE_END} with the output of\n    {REGENERATE}"
    )


def test_the_configuration_table_has_one_row_per_setting() -> None:
    header, rule, *rows = configuration_table().splitlines()
    assert header == "| Variable | Default | Description |"
    assert rule == "| --- | --- | --- |"
    assert [row.split(" | ")[0] for row in rows] == [f"| `{name.upper()}`" for name in Settings.model_fields]
    assert "| `MODEL_DIR` | `models/default` |" in rows[0]
    assert "| `FUSED_INTRA_OP_THREADS` | unset |" in rows[5]
    assert any(row.startswith("| `SPINNING` | `during-runs` |") for row in rows)
