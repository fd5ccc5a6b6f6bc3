"""Settings: env with nested ``__``, .env, CLI overrides, readable errors, no leaked secrets."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lineguard.engines.errors import ConfigError, LineguardError
from lineguard.stream.settings import Settings, env_var, nest_overrides, redacted_url


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No LINEGUARD_* from the developer's shell and no stray .env in the working dir."""
    for name in list(os.environ):
        if name.upper().startswith("LINEGUARD_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_defaults_are_valid() -> None:
    s = Settings.load(env_file=None)
    assert s.redis.url is None
    assert s.redis.key_prefix == "lineguard"
    assert s.line.id == "line1"
    assert s.infer.max_batch <= s.infer.batch_buckets[-1]
    assert s.infer.block_ms < s.redis.socket_timeout * 1000 / 2


def test_nested_env_vars(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LINEGUARD_REDIS__URL", "redis://10.0.0.5:6380/2")
    monkeypatch.setenv("LINEGUARD_INFER__MAX_BATCH", "4")
    monkeypatch.setenv("LINEGUARD_INFER__BATCH_BUCKETS", "1,2,4")
    monkeypatch.setenv("LINEGUARD_LINE__ID", "press-7")
    monkeypatch.setenv("LINEGUARD_METRICS__PORT", "9100")
    monkeypatch.setenv("LINEGUARD_LOG__LEVEL", "DEBUG")
    s = Settings.load(env_file=None)
    assert s.redis.url == "redis://10.0.0.5:6380/2"
    assert s.infer.max_batch == 4
    assert s.infer.batch_buckets == (1, 2, 4)
    assert s.line.id == "press-7"
    assert s.metrics.port == 9100
    assert s.log.level == "debug"
    # untouched fields of a partly-set section keep their defaults
    assert s.infer.max_delay_ms == Settings.load(env_file=None).infer.max_delay_ms


def test_buckets_accept_json_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LINEGUARD_INFER__BATCH_BUCKETS", "[1, 8, 16]")
    assert Settings.load(env_file=None).infer.batch_buckets == (1, 8, 16)


def test_dotenv_file_and_precedence(monkeypatch: pytest.MonkeyPatch, clean_env: Path) -> None:
    env_file = clean_env / "line.env"
    env_file.write_text(
        "LINEGUARD_LINE__ID=line7\n"
        "LINEGUARD_INGEST__JPEG_QUALITY=70\n"
        "LINEGUARD_REDIS__URL=\n"  # blank means: embedded server
        "LINEGUARD_TEST_REDIS_URL=redis://elsewhere\n"  # other LINEGUARD_ keys are ignored
        "UNRELATED=1\n"
    )
    s = Settings.load(env_file=env_file)
    assert s.line.id == "line7"
    assert s.ingest.jpeg_quality == 70
    assert s.redis.url is None
    monkeypatch.setenv("LINEGUARD_INGEST__JPEG_QUALITY", "55")
    assert Settings.load(env_file=env_file).ingest.jpeg_quality == 55  # env beats .env


def test_default_dotenv_in_working_dir(clean_env: Path) -> None:
    (clean_env / ".env").write_text("LINEGUARD_LINE__CAMERA=top\n")
    assert Settings.load().line.camera == "top"


def test_overrides_dotted_and_nested_beat_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LINEGUARD_INFER__MAX_BATCH", "4")
    monkeypatch.setenv("LINEGUARD_INFER__MAX_DELAY_MS", "9")
    s = Settings.load(
        {
            "infer.max_batch": 2,
            "infer.block-ms": 500,
            "redis": {"socket_timeout": 3.0},
            "metrics.port": None,  # None = flag not given
        },
        env_file=None,
    )
    assert s.infer.max_batch == 2
    assert s.infer.block_ms == 500
    assert s.infer.max_delay_ms == 9  # from env, not reset by the override
    assert s.redis.socket_timeout == 3.0
    assert s.metrics.port is None


def test_nest_overrides_shapes() -> None:
    assert nest_overrides({"infer.max_batch": 2, "infer": {"block_ms": 3}, "line__id": "a"}) == {
        "infer": {"max_batch": 2, "block_ms": 3},
        "line": {"id": "a"},
    }


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"infer.max_bach": 2}, "infer.max_bach"),
        ({"gpu.max_batch": 2}, "'gpu'"),
        ({"infer..max_batch": 2}, "empty part"),
    ],
)
def test_unknown_override_is_an_error(overrides: dict[str, int], needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.load(overrides, env_file=None)
    assert needle in str(info.value)


def test_bad_value_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LINEGUARD_INFER__MAX_BATCH", "0")
    monkeypatch.setenv("LINEGUARD_INGEST__JPEG_QUALITY", "high")
    with pytest.raises(LineguardError) as info:
        Settings.load(env_file=None)
    msg = str(info.value)
    assert isinstance(info.value, ConfigError)
    assert "LINEGUARD_INFER__MAX_BATCH=0" in msg
    assert "LINEGUARD_INGEST__JPEG_QUALITY=high" in msg
    assert "2 problems" in msg
    assert "\n" not in msg


def test_typo_in_nested_env_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LINEGUARD_INFER__MAX_BACH", "3")
    with pytest.raises(ConfigError, match="LINEGUARD_INFER__MAX_BACH is not a known setting"):
        Settings.load(env_file=None)


def test_block_must_stay_below_socket_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LINEGUARD_REDIS__SOCKET_TIMEOUT", "2")
    monkeypatch.setenv("LINEGUARD_DECIDE__BLOCK_MS", "1500")
    with pytest.raises(ConfigError) as info:
        Settings.load(env_file=None)
    msg = str(info.value)
    assert "LINEGUARD_DECIDE__BLOCK_MS=1500" in msg
    assert "LINEGUARD_REDIS__SOCKET_TIMEOUT" in msg


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"LINEGUARD_INFER__MAX_BATCH": "32"}, "exceeds the largest batch bucket"),
        ({"LINEGUARD_INFER__BATCH_BUCKETS": "4,2"}, "strictly increasing"),
        (
            {"LINEGUARD_INFER__RECLAIM_IDLE_MS": "3", "LINEGUARD_INFER__MAX_DELAY_MS": "5"},
            "LINEGUARD_INFER__RECLAIM_IDLE_MS=3",
        ),
        ({"LINEGUARD_LINE__ID": "line{1}"}, "LINEGUARD_LINE__ID=line{1}"),
        ({"LINEGUARD_REDIS__KEY_PREFIX": "a b"}, "LINEGUARD_REDIS__KEY_PREFIX"),
        ({"LINEGUARD_METRICS__PORT": "70000"}, "LINEGUARD_METRICS__PORT=70000"),
        ({"LINEGUARD_LOG__FORMAT": "xml"}, "LINEGUARD_LOG__FORMAT"),
        ({"LINEGUARD_INFER": "{not json"}, "LINEGUARD_INFER__MAX_BATCH=8"),
        ({"LINEGUARD_REDIS__BACKOFF_CAP": "0.01"}, "LINEGUARD_REDIS__BACKOFF_CAP"),
    ],
)
def test_invalid_combinations(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], needle: str
) -> None:
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ConfigError) as info:
        Settings.load(env_file=None)
    assert needle in str(info.value)


def test_secrets_never_in_repr_or_dump(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LINEGUARD_REDIS__URL", "rediss://ops:url-secret@redis.plant:6380/0")
    monkeypatch.setenv("LINEGUARD_REDIS__USERNAME", "ops")
    s = Settings.load(env_file=None)
    for text in (repr(s), str(s), repr(s.redis), str(s.redacted())):
        assert "url-secret" not in text
    assert s.redacted()["redis"]["url"] == "rediss://ops:***@redis.plant:6380/0"

    monkeypatch.setenv("LINEGUARD_REDIS__URL", "redis://redis.plant:6379/0")
    monkeypatch.setenv("LINEGUARD_REDIS__PASSWORD", "pw-secret")
    s = Settings.load(env_file=None)
    assert s.redis.password is not None
    assert s.redis.password.get_secret_value() == "pw-secret"
    for text in (repr(s), str(s), str(s.redacted()), str(s.model_dump())):
        assert "pw-secret" not in text


def test_secrets_never_in_error_messages(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LINEGUARD_REDIS__URL", "http://u:leak-1@host/0")
    with pytest.raises(ConfigError) as info:
        Settings.load(env_file=None)
    assert "leak-1" not in str(info.value)
    assert "LINEGUARD_REDIS__URL" in str(info.value)

    monkeypatch.setenv("LINEGUARD_REDIS__URL", "redis://:leak-2@host/0")
    monkeypatch.setenv("LINEGUARD_REDIS__PASSWORD", "leak-3")
    with pytest.raises(ConfigError, match="keep only one") as info:
        Settings.load(env_file=None)
    assert "leak-2" not in str(info.value) and "leak-3" not in str(info.value)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://user:pass@host:6379/0", "redis://user:***@host:6379/0"),
        ("rediss://:pass@host", "rediss://:***@host"),
        ("redis://host:6379", "redis://host:6379"),
        ("redis://user@host", "redis://user@host"),
        ("unix://:pw@/run/redis.sock?db=1", "unix://:***@/run/redis.sock?db=1"),
        ("redis://host/0?password=pw&db=1", "redis://host/0?password=***&db=1"),
        ("redis://u:p%40ss@host", "redis://u:***@host"),
        (None, None),
    ],
)
def test_redacted_url(url: str | None, expected: str | None) -> None:
    assert redacted_url(url) == expected


def test_env_var_names() -> None:
    assert env_var("redis", "url") == "LINEGUARD_REDIS__URL"
    assert env_var("infer", "max_batch") == "LINEGUARD_INFER__MAX_BATCH"


def test_settings_are_immutable() -> None:
    s = Settings.load(env_file=None)
    with pytest.raises(ValueError):
        s.infer.max_batch = 3  # type: ignore[misc]
