"""The bus: Redis Streams keys, consumer groups and the few operations every stage needs.

One ``Bus`` per process wraps one redis-py client. Workers never build keys or call XADD /
XREADGROUP themselves, so the delivery contract lives in one place:

* at-least-once delivery through consumer groups; results are written and their inputs
  acknowledged in one MULTI/EXEC (``ack_with_result``), so a crash leaves either both or
  neither (a retried EXEC may duplicate a result, which is why consumers deduplicate by frame
  key);
* entries of a dead worker are taken over with XAUTOCLAIM (``reclaim``), which also reports
  entries trimmed from the stream before anyone processed them, so they can be accounted for;
* poison entries go to the ``dead`` stream with a reason, acknowledged atomically.

Keys are ``<prefix>:{<line>}:<stream>``: the braces are a Redis Cluster hash tag, so all
streams of a line share a slot and the MULTI above stays legal on a cluster.

Tested against Redis 7.0 and Valkey 9; nothing here needs Redis 8 features.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Final, Literal, TypeAlias, cast, get_args

import redis
import structlog
from redis.backoff import ExponentialWithJitterBackoff, NoBackoff
from redis.retry import Retry

from lineguard.engines.errors import ConfigError, LineguardError
from lineguard.stream.protocol import ENTRY_FIELD, Message, encode
from lineguard.stream.settings import LimitsSettings, RedisSettings, Settings, redacted_url

StreamName: TypeAlias = Literal["frames", "scores", "events", "dead"]
STREAMS: Final[tuple[StreamName, ...]] = get_args(StreamName)

# Fields the dead stream adds around the original entry's fields.
DEAD_REASON: Final = b"dead.reason"
DEAD_DETAIL: Final = b"dead.detail"
DEAD_SOURCE: Final = b"dead.stream"
DEAD_GROUP: Final = b"dead.group"
DEAD_ID: Final = b"dead.id"
DEAD_DELIVERIES: Final = b"dead.deliveries"
DEAD_TIME: Final = b"dead.t"
DEAD_TRUNCATED: Final = b"dead.truncated"
_DEAD_PREFIX: Final = b"dead."

log = structlog.get_logger("lineguard.bus")


class BusError(LineguardError):
    """The bus cannot be used as configured (server unreachable, refused credentials)."""


@dataclass(frozen=True, slots=True)
class Entry:
    """One stream entry as read from a group.

    ``fields`` is empty when the group still lists the id but the entry itself was trimmed or
    deleted (``deleted``): the frame was never seen by this stage and must be accounted for.
    ``deliveries`` is filled where the read asked for it (own-backlog reads and reclaims).
    """

    id: str
    fields: Mapping[bytes, bytes]
    deliveries: int | None = None

    @property
    def data(self) -> bytes | None:
        """The packed message, or None if the entry has no lineguard message field."""
        value = self.fields.get(ENTRY_FIELD)
        return value if isinstance(value, bytes) else None

    @property
    def deleted(self) -> bool:
        return not self.fields


@dataclass(frozen=True, slots=True)
class Reclaimed:
    """What one XAUTOCLAIM step took over, and the ids it found already gone from the stream."""

    entries: list[Entry]
    deleted_ids: list[str]
    cursor: str
    """Pass back as ``start_id``; ``"0-0"`` means the scan of the pending list wrapped around."""


@dataclass(frozen=True, slots=True)
class PendingEntry:
    id: str
    consumer: str
    idle_ms: int
    deliveries: int


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """An entry from the dead stream, split into our annotations and the original fields."""

    id: str
    reason: str
    detail: str
    source_stream: str
    group: str
    source_id: str
    deliveries: int | None
    t_dead: float
    fields: Mapping[bytes, bytes]


def parse_dead_letter(entry_id: Any, raw: Any) -> DeadLetter:
    """A dead-stream entry as written by :meth:`Bus.dead_letter` (tolerant of odd values:
    the dead stream is where odd things end up)."""
    f = _fields(raw)
    dl = f.get(DEAD_DELIVERIES)
    try:
        t_dead = float(f.get(DEAD_TIME, b"0"))
    except ValueError:
        t_dead = 0.0
    return DeadLetter(
        id=_text(entry_id),
        reason=_text(f.get(DEAD_REASON, b"")),
        detail=_text(f.get(DEAD_DETAIL, b"")),
        source_stream=_text(f.get(DEAD_SOURCE, b"")),
        group=_text(f.get(DEAD_GROUP, b"")),
        source_id=_text(f.get(DEAD_ID, b"")),
        deliveries=int(dl) if dl is not None and dl.isdigit() else None,
        t_dead=t_dead,
        fields={k: v for k, v in f.items() if not k.startswith(_DEAD_PREFIX)},
    )


@dataclass(frozen=True, slots=True)
class GroupStats:
    """Queue health of one group on one stream (for metrics and ``lineguard health``)."""

    stream: StreamName
    group: str
    length: int
    pending: int
    lag: int | None
    lag_estimated: bool
    consumers: int
    last_delivered_id: str


def consumer_name(explicit: str | None = None) -> str:
    """``explicit`` if given, else ``<hostname>-<pid>``.

    Give an explicit, restart-stable name (e.g. ``host-gpu0``) where you can: a process that
    comes back under the same name re-reads its own pending entries at once, while a new name
    leaves them to XAUTOCLAIM after ``reclaim_idle_ms`` and adds one more consumer to the group.
    """
    if explicit:
        return explicit
    return f"{socket.gethostname()}-{os.getpid()}"


def connect(
    settings: Settings | RedisSettings, url: str | None = None, *, client_name: str | None = None
) -> redis.Redis:
    """Build the process's Redis client with lineguard's timeout and retry policy.

    ``url`` (e.g. from an embedded server) wins over the configured one. Nothing is sent
    yet; call ``wait_for_server`` to find out whether the server answers.
    """
    rs = settings.redis if isinstance(settings, Settings) else settings
    target = url or rs.url
    if not target:
        raise ConfigError(
            "no Redis URL configured: set LINEGUARD_REDIS__URL (e.g. redis://127.0.0.1:6379/0) "
            "or start an embedded server with lineguard.stream.server.embedded_valkey()"
        )
    kwargs: dict[str, Any] = {
        "socket_timeout": rs.socket_timeout,
        "socket_connect_timeout": rs.connect_timeout,
        "retry": Retry(
            ExponentialWithJitterBackoff(cap=rs.backoff_cap, base=rs.backoff_base), rs.retries
        ),
        "health_check_interval": 30,
        "decode_responses": False,
    }
    if client_name:
        kwargs["client_name"] = client_name
    if rs.username is not None:
        kwargs["username"] = rs.username.get_secret_value()
    if rs.password is not None:
        kwargs["password"] = rs.password.get_secret_value()
    try:
        return redis.Redis.from_url(target, **kwargs)
    except ValueError as exc:
        raise ConfigError(
            f"LINEGUARD_REDIS__URL={redacted_url(target)} is not a usable Redis URL ({exc}); "
            "use redis://host:port/db, rediss://... or unix:///path/to/socket"
        ) from None


def client_url(client: redis.Redis) -> str:
    """Where ``client`` points, password-free, for logs and error messages."""
    pool = client.connection_pool
    kw = pool.connection_kwargs
    if "path" in kw:
        return f"unix://{kw['path']}"
    # from_url("rediss://...") selects SSLConnection; it sets no "ssl" keyword
    connection_class = getattr(pool, "connection_class", object)
    tls = kw.get("ssl") or issubclass(connection_class, redis.SSLConnection)
    scheme = "rediss" if tls else "redis"
    return f"{scheme}://{kw.get('host', '?')}:{kw.get('port', '?')}/{kw.get('db', 0)}"


def wait_for_server(
    client: redis.Redis, timeout_s: float, *, interval_s: float = 0.25, quiet: bool = False
) -> None:
    """PING until the server answers or ``timeout_s`` passes, logging every failed attempt
    (at debug level when ``quiet``: a probe reports the outcome once, as its exit status).

    The client's own retry policy is switched off meanwhile, so each attempt is one quick
    try and the log shows the real progress; it is restored before returning. Refused
    credentials fail at once (waiting will not fix them).
    """
    where = client_url(client)
    saved = client.get_retry()
    client.set_retry(Retry(NoBackoff(), 0))
    deadline = time.monotonic() + max(0.0, timeout_s)
    attempt = 0
    delay = max(0.01, interval_s)
    try:
        while True:
            attempt += 1
            try:
                client.ping()
            except redis.AuthenticationError as exc:
                raise BusError(
                    f"Redis at {where} refused the credentials ({exc}); fix "
                    "LINEGUARD_REDIS__USERNAME / LINEGUARD_REDIS__PASSWORD or the URL in "
                    "LINEGUARD_REDIS__URL"
                ) from None
            except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
                remaining = deadline - time.monotonic()
                (log.debug if quiet else log.warning)(
                    "redis.unreachable",
                    url=where,
                    attempt=attempt,
                    error=f"{type(exc).__name__}: {exc}",
                    remaining_s=round(max(0.0, remaining), 2),
                )
                if remaining <= 0:
                    raise BusError(
                        f"could not reach Redis at {where} after {attempt} attempt(s) in "
                        f"{timeout_s:g} s (last error: {type(exc).__name__}: {exc}); check that "
                        "the server is running and that LINEGUARD_REDIS__URL points at it, or "
                        "unset LINEGUARD_REDIS__URL to start an embedded Valkey"
                    ) from None
                time.sleep(min(delay, remaining))
                delay = min(delay * 2, 2.0)
            else:
                if attempt > 1:
                    log.info("redis.reachable", url=where, attempts=attempt)
                return
    finally:
        if saved is not None:
            client.set_retry(saved)


def server_version(client: redis.Redis) -> tuple[str, tuple[int, ...]]:
    """``("valkey", (9, 1, 2))`` or ``("redis", (7, 0, 15))``.

    Valkey reports ``redis_version:7.2.4`` for compatibility; its own version is in
    ``valkey_version``, so feature checks must look there first.
    """
    info = client.info("server")
    if "valkey_version" in info:
        flavour, text = "valkey", str(info["valkey_version"])
    else:
        flavour, text = "redis", str(info.get("redis_version", "0"))
    version = tuple(int(p) for p in text.split(".") if p.isdigit())
    return flavour, version


def _poll_interval_s(max_delay_ms: int) -> float:
    """How often a batch top-up looks for new entries: a sixteenth of the window, between 1
    and 10 ms (an entry that lands is taken at most that late; a long window costs a
    non-blocking read every 10 ms, not a busy loop)."""
    return min(0.010, max(0.001, max_delay_ms / 1000 / 16))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _fields(raw: Any) -> dict[bytes, bytes]:
    if raw is None:
        return {}
    if isinstance(raw, Mapping):
        return dict(raw)
    it = iter(raw)  # a flat [k, v, k, v] list (raw RESP reply)
    return dict(zip(it, it, strict=True))


def _entries(raw: Any) -> list[Entry]:
    out: list[Entry] = []
    for item in raw or ():
        if item is None:  # Redis < 7 replied nil for a deleted entry in XAUTOCLAIM
            continue
        entry_id, fields = item[0], item[1] if len(item) > 1 else None
        out.append(Entry(_text(entry_id), _fields(fields)))
    return out


def _read_reply(reply: Any) -> list[Entry]:
    """XREADGROUP reply in either shape redis-py 8 produces (list of pairs or dict)."""
    if not reply:
        return []
    if isinstance(reply, Mapping):
        out: list[Entry] = []
        for value in reply.values():  # legacy_responses=False: {stream: [entries]}
            out.extend(_entries(value))
        return out
    out = []
    for pair in reply:
        out.extend(_entries(pair[1]))
    return out


def _is_nogroup(exc: redis.ResponseError) -> bool:
    return str(exc).startswith("NOGROUP")


class Bus:
    """Streams of one line on one server; see the module docstring for the contract."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        line: str = "line1",
        prefix: str = "lineguard",
        dead_max_len: int = 10_000,
        limits: LimitsSettings | None = None,
    ) -> None:
        if any(c in line for c in "{}:/ ") or not line:
            raise ConfigError(
                f"line id {line!r} cannot be used in a stream key; set LINEGUARD_LINE__ID to "
                "letters, digits, '_', '.' or '-'"
            )
        self.client = client
        self.line = line
        self.prefix = prefix
        self.dead_max_len = dead_max_len
        self.limits = limits or LimitsSettings()
        self._keys: dict[str, str] = {s: f"{prefix}:{{{line}}}:{s}" for s in STREAMS}
        kw = client.connection_pool.connection_kwargs
        timeout = kw.get("socket_timeout")
        self._socket_timeout_ms: float | None = None if timeout is None else timeout * 1000

    @classmethod
    def from_settings(cls, client: redis.Redis, settings: Settings) -> Bus:
        return cls(
            client,
            line=settings.line.id,
            prefix=settings.redis.key_prefix,
            dead_max_len=settings.redis.dead_max_len,
            limits=settings.limits,
        )

    # keys and groups -----------------------------------------------------------------

    def key(self, stream: StreamName) -> str:
        try:
            return self._keys[stream]
        except KeyError:
            raise ConfigError(
                f"unknown stream {stream!r}; the bus has {', '.join(STREAMS)}"
            ) from None

    def keys(self) -> dict[StreamName, str]:
        return cast(dict[StreamName, str], dict(self._keys))

    # the line's epoch --------------------------------------------------------------

    @property
    def epoch_key(self) -> str:
        return f"{self.prefix}:{{{self.line}}}:epoch"

    def ensure_epoch(self) -> str:
        """The line's epoch: a random id written once, when the line's state is first made.

        A server restarted without its data (no persistence, an AOF that lost its last
        second, a failover to an empty replica, FLUSHALL) loses it with everything else, so
        a stage that remembers another epoch, or finds none, knows that the state it holds
        in memory (decide's watermarks) describes a line that no longer exists.
        """
        pipe = self.client.pipeline(transaction=True)
        pipe.set(self.epoch_key, uuid.uuid4().hex, nx=True)
        pipe.get(self.epoch_key)
        return _text(pipe.execute()[1])

    def current_epoch(self) -> str | None:
        raw = self.client.get(self.epoch_key)
        return None if raw is None else _text(raw)

    def ensure_group(self, stream: StreamName, group: str, *, start_id: str = "0") -> bool:
        """Create ``group`` (and the stream) unless it exists; True if it was created.

        ``start_id="0"`` lets a brand-new group see frames queued before it existed, which is
        what a line wants after a fresh deploy; ``"$"`` would skip them.
        """
        try:
            self.client.xgroup_create(self.key(stream), group, id=start_id, mkstream=True)
        except redis.ResponseError as exc:
            if str(exc).startswith("BUSYGROUP"):
                return False
            raise
        log.info("bus.group_created", stream=self.key(stream), group=group, start_id=start_id)
        return True

    # writing ------------------------------------------------------------------------

    def _pack(self, message: Message | bytes) -> bytes:
        return message if isinstance(message, bytes) else encode(message, self.limits)

    def add(
        self, stream: StreamName, message: Message | bytes, *, max_len: int | None = None
    ) -> str:
        """XADD one message (trimmed to about ``max_len`` entries); returns the entry id."""
        entry_id = self.client.xadd(
            self.key(stream), {ENTRY_FIELD: self._pack(message)}, maxlen=max_len, approximate=True
        )
        return _text(entry_id)

    def add_frame(self, frame: Message | bytes, *, max_len: int) -> str:
        """Append a frame, keeping the frames stream near ``max_len`` entries (MAXLEN ~).

        The bound is approximate by design: exact trimming costs far more, and frames trimmed
        before inference are reported by ``reclaim`` rather than lost silently.
        """
        return self.add("frames", frame, max_len=max_len)

    # reading ------------------------------------------------------------------------

    def read_group(
        self,
        stream: StreamName,
        group: str,
        consumer: str,
        *,
        count: int = 1,
        block_ms: int | None = None,
        start_id: str = ">",
        with_deliveries: bool = False,
    ) -> list[Entry]:
        """XREADGROUP one stream. ``start_id=">"`` gives new entries (waiting up to
        ``block_ms`` if there are none); any other id re-reads this consumer's own pending
        entries after that id (never blocks). A group that vanished (server restarted without
        persistence) is recreated once instead of crashing the worker.
        """
        timeout_ms = self._socket_timeout_ms
        if block_ms is not None and timeout_ms is not None and block_ms >= timeout_ms / 2:
            raise ConfigError(
                f"block_ms={block_ms} is not well below the client's socket timeout "
                f"({self._socket_timeout_ms:.0f} ms), so the read would fail with a "
                "TimeoutError; lower LINEGUARD_INFER__BLOCK_MS / LINEGUARD_DECIDE__BLOCK_MS "
                "or raise LINEGUARD_REDIS__SOCKET_TIMEOUT"
            )
        key = self.key(stream)
        for attempt in (1, 2):
            try:
                reply = self.client.xreadgroup(
                    group, consumer, {key: start_id}, count=count, block=block_ms
                )
                break
            except redis.ResponseError as exc:
                if attempt == 2 or not _is_nogroup(exc):
                    raise
                log.warning("bus.group_missing", stream=key, group=group, action="recreate")
                self.ensure_group(stream, group)
        entries = _read_reply(reply)
        if with_deliveries and entries:
            entries = self._with_deliveries(stream, group, entries)
        return entries

    def read_batch(
        self,
        stream: StreamName,
        group: str,
        consumer: str,
        *,
        max_batch: int,
        max_delay_ms: int,
        block_ms: int | None,
    ) -> list[Entry]:
        """Dynamic batching: wait up to ``block_ms`` for the first entry only, then top the
        batch up until it holds ``max_batch`` entries or ``max_delay_ms`` have passed since
        the first arrived (Triton's queue-delay rule). Returns ``[]`` if nothing came.

        The top-up polls (non-blocking reads, ``_poll_interval_s`` apart) rather than
        blocking on the server: a server expires a blocked read only on its own clock tick,
        every 1000/``hz`` ms (100 ms at the default ``hz 10``), so ``XREADGROUP BLOCK 5``
        with nothing arriving returns after about 100 ms, or when the next entry happens to
        land. Measured on Redis 7.0 and the embedded Valkey 9: BLOCK 1, 5 and 20 all took
        100.7 ms; at 20 frames/s that made every batch of an idle worker wait for the next
        frame (about 50 ms) instead of 5 ms. The first wait may block: it returns the moment
        an entry lands, and a late timeout there delays nothing.
        """
        if max_batch < 1:
            raise ConfigError(f"max_batch={max_batch} must be ≥ 1 (LINEGUARD_INFER__MAX_BATCH)")
        batch = self.read_group(stream, group, consumer, count=max_batch, block_ms=block_ms)
        if not batch or max_delay_ms <= 0:
            return batch
        deadline = time.monotonic() + max_delay_ms / 1000
        interval = _poll_interval_s(max_delay_ms)
        while len(batch) < max_batch:
            batch.extend(self.read_group(stream, group, consumer, count=max_batch - len(batch)))
            left = deadline - time.monotonic()
            if left <= 0 or len(batch) >= max_batch:
                break
            time.sleep(min(interval, left))
        return batch

    def reader(
        self, stream: StreamName, group: str, consumer: str, *, recover_pending: bool = True
    ) -> GroupReader:
        """A reader that first replays this consumer's own unacknowledged entries."""
        return GroupReader(self, stream, group, consumer, recover_pending=recover_pending)

    # acknowledging ------------------------------------------------------------------

    def ack(self, stream: StreamName, group: str, ids: Iterable[str]) -> int:
        ids = list(ids)
        if not ids:
            return 0
        return int(self.client.xack(self.key(stream), group, *ids))

    def ack_with_result(
        self,
        src_stream: StreamName,
        group: str,
        ids: Sequence[str],
        dst_stream: StreamName,
        messages: Sequence[Message | bytes],
        *,
        max_len: int | None = None,
    ) -> list[str]:
        """XADD every result to ``dst_stream`` and XACK ``ids`` on ``src_stream`` in one
        MULTI/EXEC, so results and acknowledgements are never out of step.

        Messages are encoded (and validated) before anything is sent. Returns the new ids.
        """
        packed = [self._pack(m) for m in messages]
        pipe = self.client.pipeline(transaction=True)
        dst = self.key(dst_stream)
        for data in packed:
            pipe.xadd(dst, {ENTRY_FIELD: data}, maxlen=max_len, approximate=True)
        if ids:
            pipe.xack(self.key(src_stream), group, *ids)
        replies = pipe.execute()
        return [_text(r) for r in replies[: len(packed)]]

    # recovery -----------------------------------------------------------------------

    def reclaim(
        self,
        stream: StreamName,
        group: str,
        consumer: str,
        *,
        min_idle_ms: int,
        count: int = 100,
        start_id: str = "0-0",
        with_deliveries: bool = True,
    ) -> Reclaimed:
        """Take over entries idle for more than ``min_idle_ms`` (a dead or stuck peer's).

        The server drops pending ids whose entries were trimmed or deleted and reports them
        in ``deleted_ids``: those frames were never processed and need an ``uninspected``
        verdict. Claimed entries carry their delivery counts so the caller can dead-letter
        poison ones (``deliveries > max_deliveries``). One call scans a bounded part of the
        pending list; loop with ``start_id=result.cursor`` until it is ``"0-0"``.
        """
        key = self.key(stream)
        try:
            reply = self.client.xautoclaim(
                key, group, consumer, min_idle_ms, start_id=start_id, count=count
            )
        except redis.ResponseError as exc:
            if not _is_nogroup(exc):
                raise
            self.ensure_group(stream, group)
            return Reclaimed([], [], "0-0")
        cursor = _text(reply[0])
        claimed = _entries(reply[1])
        deleted = [_text(i) for i in reply[2]] if len(reply) > 2 and reply[2] else []
        live = [e for e in claimed if not e.deleted]
        deleted.extend(e.id for e in claimed if e.deleted)
        if with_deliveries and live:
            live = self._with_deliveries(stream, group, live)
        if live or deleted:
            log.info(
                "bus.reclaimed",
                stream=key,
                group=group,
                consumer=consumer,
                claimed=len(live),
                deleted=len(deleted),
            )
        return Reclaimed(live, deleted, cursor)

    def pending(
        self,
        stream: StreamName,
        group: str,
        *,
        consumer: str | None = None,
        min_idle_ms: int | None = None,
        count: int = 100,
        start_id: str = "-",
        end_id: str = "+",
    ) -> list[PendingEntry]:
        """Extended XPENDING: owner, idle time and delivery count of pending entries."""
        rows = self.client.xpending_range(
            self.key(stream),
            group,
            min=start_id,
            max=end_id,
            count=count,
            consumername=consumer,
            idle=min_idle_ms,
        )
        return [
            PendingEntry(
                id=_text(r["message_id"]),
                consumer=_text(r["consumer"]),
                idle_ms=int(r["time_since_delivered"]),
                deliveries=int(r["times_delivered"]),
            )
            for r in rows
        ]

    def delivery_counts(self, stream: StreamName, group: str, ids: Iterable[str]) -> dict[str, int]:
        """How often each still-pending id has been delivered (absent ids are not pending)."""
        ids = list(ids)
        if not ids:
            return {}
        key = self.key(stream)
        pipe = self.client.pipeline(transaction=False)
        for entry_id in ids:
            pipe.xpending_range(key, group, min=entry_id, max=entry_id, count=1)
        counts: dict[str, int] = {}
        for rows in pipe.execute():
            for r in rows:
                counts[_text(r["message_id"])] = int(r["times_delivered"])
        return counts

    def _with_deliveries(self, stream: StreamName, group: str, entries: list[Entry]) -> list[Entry]:
        counts = self.delivery_counts(stream, group, [e.id for e in entries])
        return [replace(e, deliveries=counts.get(e.id)) for e in entries]

    def dead_letter(
        self,
        stream: StreamName,
        group: str,
        entry_id: str,
        raw_fields: Mapping[bytes, bytes] | None,
        reason: str,
        *,
        detail: str = "",
        deliveries: int | None = None,
    ) -> str:
        """Move a poison entry to the dead stream with its reason, and ack it, in one MULTI.

        The original fields are kept byte for byte (a field that would clash with our
        ``dead.*`` annotations is stored as ``orig.<name>``), so the message can be inspected
        or replayed later. Only their first ``limits.max_frame_bytes`` bytes are kept
        (``dead.truncated`` names the cut fields and their sizes): an oversized message is
        dead-lettered *because* it is too large, and copying it whole would give the dead
        stream no memory bound at all. Returns the dead stream's entry id.
        """
        cap = self.limits.max_frame_bytes
        fields: dict[Any, Any] = {}
        cut: list[str] = []
        for k, v in (raw_fields or {}).items():
            name = k if isinstance(k, bytes) else str(k).encode()
            if isinstance(v, bytes | bytearray | memoryview) and len(v) > cap:
                cut.append(f"{_text(name)}:{len(v)}")
                v = bytes(v[:cap])
            fields[b"orig." + name if name.startswith(_DEAD_PREFIX) else name] = v
        if cut:
            fields[DEAD_TRUNCATED] = ",".join(cut).encode()
        fields[DEAD_REASON] = reason.encode()
        fields[DEAD_DETAIL] = detail[: self.limits.max_text_len].encode()
        fields[DEAD_SOURCE] = self.key(stream).encode()
        fields[DEAD_GROUP] = group.encode()
        fields[DEAD_ID] = entry_id.encode()
        fields[DEAD_TIME] = repr(time.time()).encode()
        if deliveries is not None:
            fields[DEAD_DELIVERIES] = str(int(deliveries)).encode()
        pipe = self.client.pipeline(transaction=True)
        pipe.xadd(self.key("dead"), fields, maxlen=self.dead_max_len, approximate=True)
        pipe.xack(self.key(stream), group, entry_id)
        dead_id, _acked = pipe.execute()
        log.warning(
            "bus.dead_lettered",
            stream=self.key(stream),
            group=group,
            entry_id=entry_id,
            reason=reason,
            deliveries=deliveries,
        )
        return _text(dead_id)

    def dead_letters(self, count: int = 100) -> list[DeadLetter]:
        """The newest dead-stream entries first (for ``lineguard health`` and tests)."""
        rows = self.client.xrevrange(self.key("dead"), count=count)
        return [parse_dead_letter(entry_id, raw) for entry_id, raw in rows or ()]

    # health and metrics --------------------------------------------------------------

    def length(self, stream: StreamName) -> int:
        return int(self.client.xlen(self.key(stream)))

    def lengths(self) -> dict[StreamName, int]:
        """XLEN of every stream of the line in one round trip."""
        pipe = self.client.pipeline(transaction=False)
        for s in STREAMS:
            pipe.xlen(self.key(s))
        return {s: int(n) for s, n in zip(STREAMS, pipe.execute(), strict=True)}

    def group_stats(self, stream: StreamName, group: str) -> GroupStats | None:
        """Length, pending count and lag of ``group``; None if the group does not exist.

        Lag is the server's own (XINFO GROUPS, Redis ≥ 7). The server reports it as unknown
        after deletions or trims; we then estimate it as entries added minus entries read,
        clipped to the stream length (an upper bound: deleted entries still count), and say
        so with ``lag_estimated``.
        """
        key = self.key(stream)
        try:
            groups = self.client.xinfo_groups(key)
        except redis.ResponseError:  # no such key
            return None
        info = next((g for g in groups if _text(g.get("name")) == group), None)
        if info is None:
            return None
        length = self.length(stream)
        lag = info.get("lag")
        estimated = False
        if lag is None:
            estimated = True
            read = info.get("entries-read")
            try:
                added = self.client.xinfo_stream(key).get("entries-added")
            except redis.ResponseError:
                added = None
            if added is not None and read is not None:
                lag = max(0, min(length, int(added) - int(read)))
            else:
                lag = None
        return GroupStats(
            stream=stream,
            group=group,
            length=length,
            pending=int(info.get("pending", 0)),
            lag=None if lag is None else int(lag),
            lag_estimated=estimated,
            consumers=int(info.get("consumers", 0)),
            last_delivered_id=_text(info.get("last-delivered-id", b"0-0")),
        )

    def prune_consumers(self, stream: StreamName, group: str, *, min_idle_ms: int) -> list[str]:
        """Delete consumers idle for ``min_idle_ms`` that own no pending entries.

        Consumers are created implicitly and never expire, so restarts with fresh names pile
        them up. One that still owns entries is kept: deleting it would orphan them.
        """
        key = self.key(stream)
        removed: list[str] = []
        for c in self.client.xinfo_consumers(key, group):
            name = _text(c.get("name"))
            if int(c.get("pending", 0)) == 0 and int(c.get("idle", 0)) >= min_idle_ms:
                self.client.xgroup_delconsumer(key, group, name)
                removed.append(name)
        return removed


class GroupReader:
    """Reads for one consumer: its own unacknowledged backlog first, then new entries.

    After a restart under the same consumer name, entries this consumer had read but not
    acknowledged are replayed (never blocking) before anything new, each with its delivery
    count, so an entry that crashes the worker every time can be dead-lettered instead of
    looping forever. The backlog cursor moves forward, so an entry left unacknowledged is
    not replayed twice by the same reader.
    """

    def __init__(
        self,
        bus: Bus,
        stream: StreamName,
        group: str,
        consumer: str,
        *,
        recover_pending: bool = True,
    ) -> None:
        self.bus = bus
        self.stream: StreamName = stream
        self.group = group
        self.consumer = consumer
        self._cursor: str | None = "0" if recover_pending else None

    @property
    def recovering(self) -> bool:
        return self._cursor is not None

    def rewind(self) -> None:
        """Replay this consumer's own unacknowledged entries again before anything new.

        For after a Redis failure between reading a batch and acknowledging it: the batch is
        still in this consumer's pending list, and nobody else takes it over before
        ``reclaim_idle_ms``. Entries that were acknowledged after all are simply not there.
        """
        self._cursor = "0"

    def _backlog(self, count: int) -> list[Entry]:
        if self._cursor is None:
            return []
        entries = self.bus.read_group(
            self.stream,
            self.group,
            self.consumer,
            count=count,
            start_id=self._cursor,
            with_deliveries=True,
        )
        if entries:
            self._cursor = entries[-1].id
        else:
            self._cursor = None
        return entries

    def read(self, count: int = 1, block_ms: int | None = None) -> list[Entry]:
        return self._backlog(count) or self.bus.read_group(
            self.stream, self.group, self.consumer, count=count, block_ms=block_ms
        )

    def read_batch(self, max_batch: int, max_delay_ms: int, block_ms: int | None) -> list[Entry]:
        return self._backlog(max_batch) or self.bus.read_batch(
            self.stream,
            self.group,
            self.consumer,
            max_batch=max_batch,
            max_delay_ms=max_delay_ms,
            block_ms=block_ms,
        )
