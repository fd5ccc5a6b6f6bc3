"""The one settings tree for the line: environment, ``.env`` and CLI flags, validated once.

Every knob a worker reads lives here, so a typo or a contradictory pair of values stops the
process at start-up with a message naming the environment variable to fix, instead of
surfacing later as a Redis timeout or a silent drop. Precedence, highest first: CLI overrides
(``Settings.load(overrides)``), environment (``LINEGUARD_<SECTION>__<FIELD>``), ``.env``,
defaults.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict, SettingsError

from lineguard.engines.errors import ConfigError
from lineguard.stream.binding import binding_problem

ENV_PREFIX = "LINEGUARD_"
ENV_NESTED_DELIMITER = "__"

# Line and camera ids end up inside Redis keys ("{line}" is the Cluster hash tag) and frame keys
# ("line/camera/seq"), so braces, slashes, colons and whitespace are refused up front.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
_NAME_RE = re.compile(NAME_PATTERN)
_URL_SCHEMES = ("redis", "rediss", "unix")
_SECRET_QUERY_KEYS = frozenset({"password", "pass", "passwd"})


def env_var(*loc: str | int) -> str:
    """Name the environment variable that sets the field at ``loc`` (e.g. infer, max_batch)."""
    parts = [str(p).upper() for p in loc if str(p)]
    return ENV_PREFIX + ENV_NESTED_DELIMITER.join(parts)


def redacted_url(url: str | None) -> str | None:
    """Return ``url`` with any password replaced by ``***`` so it can be logged or shown.

    Handles ``redis://user:pass@host``, ``rediss://:pass@host``, ``unix://:pass@/path`` and
    a ``?password=`` query argument (redis-py accepts all of them). A string that cannot be
    parsed is replaced entirely: better an unhelpful log line than a leaked credential.
    """
    if url is None:
        return None
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if "@" in netloc:
            userinfo, _, hostport = netloc.rpartition("@")
            user, sep, _password = userinfo.partition(":")
            netloc = f"{user}:***@{hostport}" if sep else f"{user}@{hostport}"
        query = parts.query
        if query:
            pairs = parse_qsl(query, keep_blank_values=True)
            query = urlencode(
                [(k, "***" if k.lower() in _SECRET_QUERY_KEYS else v) for k, v in pairs],
                safe="*",
            )
        return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
    except ValueError:
        return "<unparseable url>"


def _url_has_password(url: str) -> bool:
    parts = urlsplit(url)
    if "@" in parts.netloc and ":" in parts.netloc.rpartition("@")[0]:
        return True
    return any(k.lower() in _SECRET_QUERY_KEYS for k, _ in parse_qsl(parts.query))


def _check_name(value: str, what: str) -> str:
    if not _NAME_RE.match(value):
        raise ValueError(
            f"{what} {value!r} must be 1-64 characters of letters, digits, '_', '.' or '-' "
            "(it becomes part of Redis keys and frame keys)"
        )
    return value


class _Section(BaseModel):
    """Base for sections: unknown keys are errors, so ``LINEGUARD_INFER__MAX_BACH`` is caught."""

    model_config = ConfigDict(extra="forbid", validate_default=True, frozen=True)


class RedisSettings(_Section):
    """Where the bus lives and how hard to try reaching it."""

    url: str | None = Field(
        default=None,
        description="redis://, rediss:// or unix:// URL; unset = start an embedded Valkey",
    )
    username: SecretStr | None = None
    password: SecretStr | None = None
    socket_timeout: float = Field(
        default=5.0, gt=0, le=3600, description="seconds; must exceed every BLOCK"
    )
    connect_timeout: float = Field(default=5.0, gt=0, le=600, description="seconds")
    retries: int = Field(default=5, ge=0, le=100, description="retries per command on I/O errors")
    backoff_base: float = Field(default=0.05, gt=0, le=60, description="seconds")
    backoff_cap: float = Field(default=2.0, gt=0, le=600, description="seconds")
    wait_timeout: float = Field(
        default=30.0, ge=0, le=3600, description="seconds to wait for the server at start-up"
    )
    key_prefix: str = Field(default="lineguard", min_length=1, max_length=64)
    dead_max_len: int = Field(default=10_000, ge=1, description="MAXLEN ~ of the dead stream")
    embedded_dir: Path | None = Field(
        default=None, description="data dir of the embedded Valkey; unset = a temp dir"
    )
    embedded_appendonly: bool = Field(
        default=False, description="AOF persistence for the embedded Valkey"
    )

    @field_validator("url", mode="before")
    @classmethod
    def _blank_url_is_none(cls, value: Any) -> Any:
        # "LINEGUARD_REDIS__URL=" in a .env file reads as "use the embedded server".
        if isinstance(value, str) and not value.strip():
            return None
        return value

    @field_validator("url")
    @classmethod
    def _known_scheme(cls, value: str | None) -> str | None:
        if value is None:
            return None
        scheme = urlsplit(value).scheme.lower()
        if scheme not in _URL_SCHEMES:
            raise ValueError(
                f"URL scheme {scheme!r} is not supported; use one of "
                + ", ".join(f"{s}://" for s in _URL_SCHEMES)
            )
        return value

    @field_validator("key_prefix")
    @classmethod
    def _prefix_chars(cls, value: str) -> str:
        if any(c in value for c in "{} \t\r\n"):
            raise ValueError("key prefix must not contain braces or whitespace")
        return value

    @model_validator(mode="after")
    def _one_password(self) -> RedisSettings:
        # redis-py lets credentials in the URL silently beat the keyword argument; two
        # sources for one secret is a misconfiguration waiting to happen, so refuse it.
        if self.url is not None and self.password is not None and _url_has_password(self.url):
            raise ValueError(
                "a password is set both in LINEGUARD_REDIS__URL and in "
                "LINEGUARD_REDIS__PASSWORD; keep only one of them"
            )
        if self.backoff_cap < self.backoff_base:
            raise ValueError(
                f"LINEGUARD_REDIS__BACKOFF_CAP={self.backoff_cap} is below "
                f"LINEGUARD_REDIS__BACKOFF_BASE={self.backoff_base}; raise the cap"
            )
        return self

    def __repr_args__(self) -> Any:
        # The URL may carry a password; pydantic's repr would print it verbatim.
        for name, value in super().__repr_args__():
            yield name, (redacted_url(value) if name == "url" else value)


class LineSettings(_Section):
    """Which line and camera this process speaks for."""

    id: str = "line1"
    camera: str = "cam0"

    @field_validator("id")
    @classmethod
    def _line_name(cls, value: str) -> str:
        return _check_name(value, "line id")

    @field_validator("camera")
    @classmethod
    def _camera_name(cls, value: str) -> str:
        return _check_name(value, "camera id")


class IngestSettings(_Section):
    """How frames are encoded and how many the frames stream keeps.

    Encoding and quality left unset follow the bundle (what it was trained and calibrated on;
    JPEG at 90 without a bundle); set them and ingest warns if the bundle expects other
    pixels."""

    max_len: int = Field(default=1000, ge=1, description="MAXLEN ~ of the frames stream")
    encoding: Literal["raw", "jpeg", "png"] | None = None
    jpeg_quality: int | None = Field(default=None, ge=1, le=100)
    fps: float | None = Field(
        default=None, gt=0, le=10_000, description="pace of replay; unset = as fast as possible"
    )


class InferSettings(_Section):
    """Dynamic batching and redelivery policy of the infer stage."""

    group: str = "infer"
    max_batch: int = Field(default=8, ge=1, le=4096)
    max_delay_ms: int = Field(
        default=0,
        ge=0,
        le=60_000,
        description="how long an idle worker waits after a batch's first frame for more; "
        "0: launch at once (batches still grow while a forward runs)",
    )
    batch_buckets: Annotated[tuple[int, ...], NoDecode] = (1, 2, 4, 8)
    block_ms: int = Field(default=1000, ge=1)
    reclaim_idle_ms: int = Field(default=30_000, ge=1)
    reclaim_interval_ms: int = Field(default=5_000, ge=1)
    max_deliveries: int = Field(default=3, ge=1, le=1000)
    decode_threads: int = Field(
        default=0, ge=0, le=64, description="frame decode threads; 0: one per core, at most 4"
    )
    scores_max_len: int = Field(default=10_000, ge=1, description="MAXLEN ~ of the scores stream")

    @field_validator("group")
    @classmethod
    def _group_name(cls, value: str) -> str:
        return _check_name(value, "consumer group")

    @field_validator("batch_buckets", mode="before")
    @classmethod
    def _parse_buckets(cls, value: Any) -> Any:
        # Accept "1,2,4,8" and "[1,2,4,8]" from the environment as well as real sequences.
        if isinstance(value, str):
            text = value.strip().strip("[]()")
            return tuple(part.strip() for part in text.split(",") if part.strip())
        return value

    @field_validator("batch_buckets")
    @classmethod
    def _sorted_buckets(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if not value:
            raise ValueError("at least one batch bucket is required, e.g. 1,2,4,8")
        if any(b < 1 for b in value):
            raise ValueError(f"batch buckets must be ≥ 1, got {list(value)}")
        if list(value) != sorted(set(value)):
            raise ValueError(f"batch buckets must be strictly increasing, got {list(value)}")
        return value

    @model_validator(mode="after")
    def _batch_fits(self) -> InferSettings:
        if self.max_batch > self.batch_buckets[-1]:
            raise ValueError(
                f"LINEGUARD_INFER__MAX_BATCH={self.max_batch} exceeds the largest batch bucket "
                f"{self.batch_buckets[-1]} (LINEGUARD_INFER__BATCH_BUCKETS="
                f"{','.join(map(str, self.batch_buckets))}); lower max_batch or add a bucket"
            )
        if self.reclaim_idle_ms <= self.max_delay_ms:
            raise ValueError(
                f"LINEGUARD_INFER__RECLAIM_IDLE_MS={self.reclaim_idle_ms} must exceed "
                f"LINEGUARD_INFER__MAX_DELAY_MS={self.max_delay_ms}, or peers would steal "
                "batches that are still being formed; raise it above the worst batch time"
            )
        return self


class DecideSettings(_Section):
    """Read policy of the decide stage and how long verdicts are remembered for deduplication."""

    group: str = "decide"
    count: int = Field(default=64, ge=1, le=10_000, description="entries per read")
    block_ms: int = Field(default=1000, ge=1)
    reclaim_idle_ms: int = Field(default=30_000, ge=1)
    max_deliveries: int = Field(default=3, ge=1, le=1000)
    events_max_len: int = Field(default=100_000, ge=1, description="MAXLEN ~ of events")
    dedup_ttl_s: int = Field(default=3600, ge=1, description="how long a frame key is remembered")
    deadline_ms: int = Field(
        default=5000,
        ge=0,
        le=86_400_000,
        description="verdict no later than capture + this: `uninspected` (deadline) when no "
        "score came in time; 0 = no deadline. Size it as the camera-to-gate travel time minus "
        "the gate's actuation time and a margin",
    )

    @field_validator("group")
    @classmethod
    def _group_name(cls, value: str) -> str:
        return _check_name(value, "consumer group")


_HISTORY_SCHEMES = ("postgresql", "postgres", "sqlite")
_TABLE_PREFIX_RE = re.compile(r"^[a-z_][a-z0-9_]{0,39}$")


class HistorySettings(_Section):
    """Where the verdict history is kept and how the history worker writes it.

    ``url`` unset means SQLite in ``dir/history.sqlite`` (embedded, nothing to run); a
    ``postgresql://`` URL sends it to PostgreSQL instead. Rejects' pictures always go to
    ``dir/images`` (files, not database rows), pruned to ``image_days`` and ``image_max_bytes``.
    """

    url: str | None = Field(
        default=None,
        description="postgresql://… or sqlite:///PATH; unset = SQLite in dir/history.sqlite",
    )
    dir: Path = Field(
        default=Path(".lineguard/history"),
        description="SQLite file and reject images; put it beside the bundle volume",
    )
    table_prefix: str = Field(default="lineguard", description="tables <prefix>_verdicts, _marks")
    group: str = "history"
    batch: int = Field(default=500, ge=1, le=10_000, description="events per transaction")
    max_delay_ms: int = Field(default=200, ge=0, le=60_000)
    block_ms: int = Field(default=1000, ge=1)
    reclaim_idle_ms: int = Field(default=30_000, ge=1)
    max_deliveries: int = Field(default=5, ge=1, le=1000)
    retry_max_s: float = Field(
        default=5.0, gt=0, le=300, description="longest wait between tries while the DB is down"
    )
    images: bool = Field(default=True, description="save rejects' frames (and maps) to dir/images")
    image_days: float = Field(default=30.0, gt=0, le=3650, description="keep pictures this long")
    image_max_bytes: int = Field(
        default=2 * 1024**3, ge=1024 * 1024, description="and at most this many bytes of them"
    )
    shift_starts: Annotated[tuple[str, ...], NoDecode] = ("06:00", "14:00", "22:00")

    @field_validator("url", mode="before")
    @classmethod
    def _blank_history_url(cls, value: Any) -> Any:
        if isinstance(value, str) and not value.strip():
            return None
        return value

    @field_validator("url")
    @classmethod
    def _history_scheme(cls, value: str | None) -> str | None:
        if value is None:
            return None
        scheme = urlsplit(value).scheme.lower().split("+")[0]
        if scheme not in _HISTORY_SCHEMES:
            raise ValueError(
                f"history URL scheme {scheme!r} is not supported; use postgresql://user@host/db "
                "or sqlite:///path/to/history.sqlite"
            )
        return value

    @field_validator("table_prefix")
    @classmethod
    def _table_prefix(cls, value: str) -> str:
        if not _TABLE_PREFIX_RE.match(value):
            raise ValueError(
                "the table prefix must be 1-40 lower-case letters, digits or '_' and start "
                "with a letter or '_' (it is spliced into SQL as a name)"
            )
        return value

    @field_validator("group")
    @classmethod
    def _history_group(cls, value: str) -> str:
        return _check_name(value, "consumer group")

    @field_validator("shift_starts", mode="before")
    @classmethod
    def _parse_shifts(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(p.strip() for p in value.split(",") if p.strip())
        return value

    @field_validator("shift_starts")
    @classmethod
    def _check_shifts(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("at least one shift start is needed, e.g. 06:00,14:00,22:00")
        for item in value:
            hh, _, mm = item.partition(":")
            if not (hh.isdigit() and mm.isdigit() and int(hh) < 24 and int(mm) < 60):
                raise ValueError(f"shift start {item!r} is not HH:MM (local time)")
        return value

    def __repr_args__(self) -> Any:
        for name, value in super().__repr_args__():
            yield name, (redacted_url(value) if name == "url" else value)


class LimitsSettings(_Section):
    """Upper bounds applied to every message read from the bus (hostile-input guard)."""

    max_frame_bytes: int = Field(default=32 * 1024 * 1024, ge=1024, le=1024**3)
    max_image_side: int = Field(default=8192, ge=16, le=65_535)
    max_image_pixels: int = Field(
        default=16 * 1024 * 1024,
        ge=256,
        le=1 << 31,
        description="height × width of a frame: a small PNG can decode to gigabytes",
    )
    max_string_len: int = Field(default=256, ge=8, le=65_536)
    max_text_len: int = Field(
        default=2048, ge=8, le=1_048_576, description="free text: error and reason fields"
    )
    max_entries: int = Field(
        default=64, ge=1, le=10_000, description="entries in a scores/timings dict"
    )


class MetricsSettings(_Section):
    """Prometheus endpoint; unset port = no endpoint.

    On loopback by default, like the dashboard; any other address needs ``token``, which
    Prometheus sends as ``Authorization: Bearer <token>`` (``authorization.credentials_file``
    in its scrape config)."""

    port: int | None = Field(default=None, ge=1, le=65_535)
    addr: str = "127.0.0.1"
    token: SecretStr | None = None

    @property
    def token_value(self) -> str | None:
        return None if self.token is None else self.token.get_secret_value()

    @model_validator(mode="after")
    def _token_off_loopback(self) -> MetricsSettings:
        problem = binding_problem(
            "metrics endpoint", self.addr, self.token_value, "set LINEGUARD_METRICS__TOKEN"
        )
        if problem and self.port is not None:
            raise ValueError(problem)
        return self


_TOPIC_FIELDS = frozenset({"line", "camera", "verdict"})


class SinkBaseSettings(_Section):
    """What every sink shares: its name (its consumer group is ``sink:<kind>:<name>``), how
    much it holds in memory, and how it backs off while the receiver is down.

    Only ``queue_size`` events are read from the stream and held at a time; the rest wait in
    Redis, so an outage costs stream entries (up to ``LINEGUARD_DECIDE__EVENTS_MAX_LEN``),
    never memory."""

    name: str = "default"
    queue_size: int = Field(
        default=64, ge=1, le=10_000, description="events read and held in memory at most"
    )
    block_ms: int = Field(default=1000, ge=1)
    retry_base_s: float = Field(default=0.5, gt=0, le=600, description="first retry delay")
    retry_cap_s: float = Field(default=5.0, gt=0, le=3600, description="longest retry delay")
    reclaim_idle_ms: int = Field(default=60_000, ge=1)
    start: Literal["new", "all"] = Field(
        default="new",
        description="where a sink's new consumer group starts: events from now on, or all "
        "still in the stream; a group that exists continues where it was",
    )

    @field_validator("name")
    @classmethod
    def _sink_name(cls, value: str) -> str:
        return _check_name(value, "sink name")

    @model_validator(mode="after")
    def _cap_above_base(self) -> SinkBaseSettings:
        if self.retry_cap_s < self.retry_base_s:
            raise ValueError(
                f"retry_cap_s={self.retry_cap_s} is below retry_base_s={self.retry_base_s} "
                "(LINEGUARD_SINKS__<KIND>__RETRY_CAP_S); raise the cap"
            )
        return self


class MqttSinkSettings(SinkBaseSettings):
    """An MQTT broker: one QoS-1 message per verdict on ``topic`` (``{line}``, ``{camera}``,
    ``{verdict}`` are filled in). ``retain`` keeps each topic's last verdict on the broker,
    so a subscriber that connects later reads each camera's latest at once."""

    host: str = "127.0.0.1"
    port: int = Field(default=1883, ge=1, le=65_535)
    topic: str = "lineguard/{line}/{camera}/verdict"
    # an int range, not Literal[1, 2]: a Literal of ints refuses the string "1" from the env
    qos: int = Field(default=1, ge=1, le=2, description="MQTT QoS: 1 (at least once) or 2")
    retain: bool = False
    client_id: str | None = Field(default=None, description="unset = lineguard-<line>-<name>")
    keepalive_s: int = Field(default=30, ge=5, le=3600)
    ack_timeout_s: float = Field(default=10.0, gt=0, le=600, description="wait for PUBACK")
    username: SecretStr | None = None
    password: SecretStr | None = None
    tls: bool = False
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None

    @field_validator("topic")
    @classmethod
    def _topic_template(cls, value: str) -> str:
        import string

        if not value or any(c in value for c in "+#\0"):
            raise ValueError("an MQTT topic to publish on must be non-empty, without + or #")
        try:
            names = {f for _, f, _, _ in string.Formatter().parse(value) if f is not None}
        except ValueError as exc:
            raise ValueError(f"bad topic template: {exc}") from None
        unknown = names - _TOPIC_FIELDS
        if unknown:
            raise ValueError(
                f"topic template uses {sorted(unknown)}; it may use {{line}}, {{camera}} and "
                "{verdict}"
            )
        return value

    @model_validator(mode="after")
    def _tls_files(self) -> MqttSinkSettings:
        if (self.ca_file or self.cert_file or self.key_file) and not self.tls:
            raise ValueError(
                "LINEGUARD_SINKS__MQTT__CA_FILE/CERT_FILE/KEY_FILE are set but "
                "LINEGUARD_SINKS__MQTT__TLS is off; set it to true"
            )
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError(
                "LINEGUARD_SINKS__MQTT__CERT_FILE and LINEGUARD_SINKS__MQTT__KEY_FILE go "
                "together (a client certificate needs its key)"
            )
        if self.password is not None and self.username is None:
            raise ValueError(
                "LINEGUARD_SINKS__MQTT__PASSWORD is set without LINEGUARD_SINKS__MQTT__USERNAME"
            )
        return self


class OpcuaSinkSettings(SinkBaseSettings):
    """An OPC UA server with each camera's last verdict and counters, for a PLC or SCADA.

    On loopback by default; any other address needs ``username`` and ``password`` (the
    dashboard's rule, see ``lineguard.stream.binding``), and anonymous sessions are refused
    whenever a password is set."""

    host: str = "127.0.0.1"
    port: int = Field(default=4840, ge=1, le=65_535)
    path: str = Field(default="lineguard", pattern=r"^[A-Za-z0-9_.-]{0,64}$")
    namespace: str = "urn:lineguard:verdicts"
    username: str | None = None
    password: SecretStr | None = None

    @model_validator(mode="after")
    def _credentials_off_loopback(self) -> OpcuaSinkSettings:
        token = None if self.password is None else self.password.get_secret_value()
        problem = binding_problem(
            "OPC UA server",
            self.host,
            token,
            "set LINEGUARD_SINKS__OPCUA__USERNAME and LINEGUARD_SINKS__OPCUA__PASSWORD",
        )
        if problem:
            raise ValueError(problem)
        if (self.username is None) != (self.password is None):
            raise ValueError(
                "LINEGUARD_SINKS__OPCUA__USERNAME and LINEGUARD_SINKS__OPCUA__PASSWORD go together"
            )
        return self


class WebhookSinkSettings(SinkBaseSettings):
    """An HTTP endpoint: one POST per verdict, signed with HMAC-SHA256 over the body in the
    ``X-Lineguard-Signature: sha256=<hex>`` header. Failures (connection, timeout, 408,
    429, 5xx) are retried with exponential backoff; another 4xx dead-letters that verdict."""

    url: str | None = Field(default=None, description="http:// or https:// URL to POST to")
    secret: SecretStr | None = Field(default=None, description="HMAC key, 16+ characters")
    timeout_s: float = Field(default=5.0, gt=0, le=600)

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("the webhook URL must be http://host[:port]/path or https://…")
        return value

    @field_validator("secret")
    @classmethod
    def _long_secret(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < 16:
            raise ValueError(
                "the webhook secret must be at least 16 characters (e.g. from `python -c "
                "'import secrets; print(secrets.token_urlsafe(32))'`)"
            )
        return value

    def __repr_args__(self) -> Any:
        for name, value in super().__repr_args__():
            yield name, (redacted_url(value) if name == "url" else value)


class SinksSettings(_Section):
    """Where verdicts go besides the events stream (``lineguard sink mqtt|opcua|webhook``)."""

    mqtt: MqttSinkSettings = MqttSinkSettings()
    opcua: OpcuaSinkSettings = OpcuaSinkSettings()
    webhook: WebhookSinkSettings = WebhookSinkSettings()


class LogSettings(_Section):
    """structlog output. ``format=auto`` is console on a TTY and JSON otherwise."""

    level: Literal["debug", "info", "warning", "error", "critical"] = "info"
    format: Literal["auto", "json", "console"] = "auto"

    @field_validator("level", "format", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value


class Settings(BaseSettings):
    """Everything one lineguard process needs to know, validated as a whole."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter=ENV_NESTED_DELIMITER,
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        nested_model_default_partial_update=True,
        frozen=True,
    )

    redis: RedisSettings = RedisSettings()
    line: LineSettings = LineSettings()
    ingest: IngestSettings = IngestSettings()
    infer: InferSettings = InferSettings()
    decide: DecideSettings = DecideSettings()
    history: HistorySettings = HistorySettings()
    limits: LimitsSettings = LimitsSettings()
    metrics: MetricsSettings = MetricsSettings()
    sinks: SinksSettings = SinksSettings()
    log: LogSettings = LogSettings()

    @model_validator(mode="after")
    def _blocks_below_socket_timeout(self) -> Settings:
        # redis-py 8 gives every socket a 5 s read timeout; a BLOCK at or near it turns an
        # idle line into TimeoutError storms. Demand a clear margin (at most half).
        limit_ms = self.redis.socket_timeout * 1000 / 2
        blocks: list[tuple[tuple[str, ...], int]] = [
            (("infer",), self.infer.block_ms),
            (("decide",), self.decide.block_ms),
            (("history",), self.history.block_ms),
        ]
        blocks += [
            (("sinks", kind), getattr(self.sinks, kind).block_ms)
            for kind in SinksSettings.model_fields
        ]
        for section, block_ms in blocks:
            if block_ms > limit_ms:
                raise ValueError(
                    f"{env_var(*section, 'block_ms')}={block_ms} must be at most half of "
                    f"LINEGUARD_REDIS__SOCKET_TIMEOUT={self.redis.socket_timeout} s "
                    f"({limit_ms:.0f} ms), or blocked reads time out on the client first; "
                    "lower block_ms or raise socket_timeout"
                )
        return self

    @classmethod
    def load(
        cls,
        overrides: Mapping[str, Any] | None = None,
        *,
        env_file: str | Path | None = ".env",
    ) -> Settings:
        """Build validated settings from defaults, ``.env``, environment and ``overrides``.

        ``overrides`` come from CLI flags: keys may be dotted (``"infer.max_batch"``) or nested
        dicts; a value of ``None`` means "flag not given" and is skipped. Any problem raises a
        ``ConfigError`` naming the environment variables to fix.
        """
        nested = nest_overrides(overrides or {})
        try:
            return cls(_env_file=env_file, **nested)  # type: ignore[call-arg]
        except ValidationError as exc:
            raise settings_error(exc) from None
        except SettingsError as exc:
            raise ConfigError(
                f"could not read lineguard settings: {exc}. Values of sections such as "
                "LINEGUARD_INFER must be JSON objects; prefer one variable per field, e.g. "
                "LINEGUARD_INFER__MAX_BATCH=8"
            ) from None

    def redacted(self) -> dict[str, Any]:
        """A JSON-ready dump safe to log: secrets masked, the URL's password replaced."""
        data = self.model_dump(mode="json")
        data["redis"]["url"] = redacted_url(self.redis.url)
        data["sinks"]["webhook"]["url"] = redacted_url(self.sinks.webhook.url)
        data["history"]["url"] = redacted_url(self.history.url)
        return data


def nest_overrides(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Turn ``{"infer.max_batch": 4, "redis": {"url": ...}}`` into one nested dict.

    Unknown sections or fields raise ``ConfigError`` here, because the root model ignores
    unknown keys (so unrelated ``LINEGUARD_*`` variables do not break start-up) and a mistyped
    CLI override would otherwise vanish without a trace.
    """
    result: dict[str, Any] = {}

    def put(path: list[str], value: Any) -> None:
        if value is None:
            return
        if isinstance(value, Mapping):
            for key, sub in value.items():
                put([*path, *_split_key(str(key))], sub)
            return
        node = result
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(
                    f"override {'.'.join(path)} conflicts with a value already given for "
                    f"{part}; pass each setting once"
                )
            node = child
        node[path[-1]] = value

    for key, value in overrides.items():
        put(_split_key(str(key)), value)

    sections = Settings.model_fields
    for section, fields in result.items():
        if section not in sections:
            raise ConfigError(
                f"unknown settings section {section!r} in overrides; known sections: "
                + ", ".join(sections)
            )
        model = sections[section].annotation
        if isinstance(fields, dict) and isinstance(model, type) and issubclass(model, BaseModel):
            for name in fields:
                if name not in model.model_fields:
                    raise ConfigError(
                        f"unknown setting {section}.{name} in overrides; known fields of "
                        f"{section}: " + ", ".join(model.model_fields)
                    )
    return result


def _split_key(key: str) -> list[str]:
    parts = [p.strip().lower().replace("-", "_") for p in key.replace("__", ".").split(".")]
    if not all(parts):
        raise ConfigError(f"override key {key!r} has an empty part; use e.g. 'infer.max_batch'")
    return parts


_SECRET_FIELDS = frozenset({"password", "username", "secret"})


def settings_error(exc: ValidationError) -> ConfigError:
    """Condense a pydantic ``ValidationError`` into one paragraph a plant operator can act on.

    Each problem names the environment variable, the offending value (masked for secrets) and
    pydantic's reason; the paragraph ends with where such values come from.
    """
    problems: list[str] = []
    for err in exc.errors(include_url=False):
        loc: tuple[str, ...] = ()
        for part in err.get("loc", ()):
            if isinstance(part, int):
                break  # an item of a list setting: name the whole variable
            loc = (*loc, str(part))
        kind = err.get("type", "")
        msg = str(err.get("msg", "invalid value"))
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        if not loc or (kind == "value_error" and ENV_PREFIX in msg):
            # Cross-field checks already name every variable involved.
            problems.append(msg)
            continue
        name = env_var(*loc)
        if kind == "extra_forbidden":
            problems.append(f"{name} is not a known setting")
            continue
        value = err.get("input")
        if loc[-1] in _SECRET_FIELDS:
            shown = "***"
        elif loc[-1] == "url" and isinstance(value, str):
            shown = repr(redacted_url(value))
        elif kind == "missing" or isinstance(value, dict):
            shown = ""
        elif isinstance(value, str):
            # Environment values are strings: show them as typed unless that would be ambiguous.
            simple = value and len(value) < 80 and not any(c.isspace() for c in value)
            shown = value if simple else repr(value) if len(value) < 80 else "<long value>"
        else:
            shown = repr(value)
        problems.append(f"{name}={shown}: {msg}" if shown else f"{name}: {msg}")
    count = len(problems)
    return ConfigError(
        f"invalid lineguard settings ({count} problem{'s' if count != 1 else ''}): "
        + "; ".join(problems)
        + ". Fix these environment variables (or the same names in .env, or the matching "
        "CLI flags)."
    )
