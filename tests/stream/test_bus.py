"""Bus against real servers: every test using ``bus_each`` runs on the embedded Valkey 9 and,
when it answers, the external Redis 7."""

from __future__ import annotations

import socket
import threading
import time

import pytest
import redis
import structlog

from lineguard.engines.errors import ConfigError, LineguardError
from lineguard.stream.bus import (
    Bus,
    BusError,
    Entry,
    client_url,
    connect,
    consumer_name,
    server_version,
    wait_for_server,
)
from lineguard.stream.protocol import ENTRY_FIELD, Frame, Scores, decode_frame, decode_scores
from lineguard.stream.settings import RedisSettings, Settings

T0 = 1_795_000_000.0
G = "infer"


def raw_frame(seq: int) -> Frame:
    return Frame("line1", "cam0", seq, T0 + seq, "raw", (2, 2, 1), bytes([seq % 256]) * 4)


def scores_for(f: Frame) -> Scores:
    return Scores(f.line, f.camera, f.seq, f.t_capture, {"hist": float(f.seq)}, "m@1")


def fill(bus: Bus, n: int, start: int = 0) -> list[str]:
    return [bus.add_frame(raw_frame(start + i), max_len=1000) for i in range(n)]


def test_keys_are_hash_tagged_per_line(bus_each: Bus) -> None:
    prefix = bus_each.prefix
    assert bus_each.key("frames") == f"{prefix}:{{line1}}:frames"
    assert set(bus_each.keys()) == {"frames", "scores", "events", "dead"}
    # Redis Cluster hashes only the text inside the first {...}: one slot for the whole line
    tags = {k[k.index("{") + 1 : k.index("}")] for k in bus_each.keys().values()}
    assert tags == {"line1"}
    with pytest.raises(ConfigError):
        bus_each.key("nope")  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        Bus(bus_each.client, line="a{b}")


def test_group_creation_is_idempotent(bus_each: Bus) -> None:
    assert bus_each.ensure_group("frames", G) is True
    assert bus_each.ensure_group("frames", G) is False
    assert bus_each.length("frames") == 0  # MKSTREAM made an empty stream


def test_new_group_sees_frames_queued_before_it(bus_each: Bus) -> None:
    fill(bus_each, 2)
    bus_each.ensure_group("frames", G)
    assert len(bus_each.read_group("frames", G, "w1", count=10)) == 2


def test_add_read_ack(bus_each: Bus) -> None:
    bus_each.ensure_group("frames", G)
    ids = fill(bus_each, 3)
    entries = bus_each.read_group("frames", G, "w1", count=10, block_ms=100)
    assert [e.id for e in entries] == ids
    assert [decode_frame(e.data).seq for e in entries if e.data] == [0, 1, 2]
    assert all(not e.deleted for e in entries)
    assert len(bus_each.pending("frames", G)) == 3
    assert bus_each.ack("frames", G, ids[:2]) == 2
    assert [p.id for p in bus_each.pending("frames", G)] == ids[2:]
    assert bus_each.ack("frames", G, []) == 0


def test_empty_blocking_read_returns_empty(bus_each: Bus) -> None:
    bus_each.ensure_group("frames", G)
    start = time.monotonic()
    assert bus_each.read_group("frames", G, "w1", count=5, block_ms=50) == []
    assert time.monotonic() - start < 2.0


def test_block_longer_than_socket_timeout_is_refused(bus_each: Bus) -> None:
    bus_each.ensure_group("frames", G)
    with pytest.raises(ConfigError, match="LINEGUARD_REDIS__SOCKET_TIMEOUT"):
        bus_each.read_group("frames", G, "w1", block_ms=4000)


def test_add_frame_trims_approximately(bus_each: Bus) -> None:
    for i in range(300):
        bus_each.add_frame(raw_frame(i), max_len=10)
    # "~" trims whole macro nodes (100 entries by default), never below max_len
    assert 10 <= bus_each.length("frames") < 300


def test_batch_respects_max_batch(bus_each: Bus) -> None:
    bus_each.ensure_group("frames", G)
    fill(bus_each, 5)
    first = bus_each.read_batch("frames", G, "w1", max_batch=3, max_delay_ms=30, block_ms=100)
    second = bus_each.read_batch("frames", G, "w1", max_batch=3, max_delay_ms=30, block_ms=100)
    third = bus_each.read_batch("frames", G, "w1", max_batch=3, max_delay_ms=30, block_ms=50)
    assert (len(first), len(second), len(third)) == (3, 2, 0)


def test_batch_fills_up_from_late_arrivals(bus_each: Bus) -> None:
    bus_each.ensure_group("frames", G)
    fill(bus_each, 1)

    def trickle() -> None:
        for i in range(1, 4):
            time.sleep(0.005)
            bus_each.add_frame(raw_frame(i), max_len=1000)

    t = threading.Thread(target=trickle)
    t.start()
    try:
        batch = bus_each.read_batch("frames", G, "w1", max_batch=4, max_delay_ms=1500, block_ms=100)
    finally:
        t.join()
    assert [decode_frame(e.data).seq for e in batch if e.data] == [0, 1, 2, 3]


def test_batch_returns_partial_batch_after_delay(bus_each: Bus) -> None:
    bus_each.ensure_group("frames", G)
    fill(bus_each, 2)
    batch = bus_each.read_batch("frames", G, "w1", max_batch=8, max_delay_ms=20, block_ms=100)
    assert len(batch) == 2
    with pytest.raises(ConfigError):
        bus_each.read_batch("frames", G, "w1", max_batch=0, max_delay_ms=1, block_ms=1)


def test_a_short_batch_window_ends_on_time_when_nothing_else_arrives(bus_each: Bus) -> None:
    """A server expires a blocked read only on its clock tick (100 ms at the default hz 10),
    so a top-up that blocked for its last few milliseconds returned ~100 ms late: here, 20
    ms. The window is the batcher's, not the server's tick."""
    bus_each.ensure_group("frames", G)
    fill(bus_each, 1)
    took = []
    for _ in range(3):
        t0 = time.perf_counter()
        batch = bus_each.read_batch("frames", G, "w1", max_batch=8, max_delay_ms=20, block_ms=100)
        took.append(time.perf_counter() - t0)
        assert len(batch) == 1
        fill(bus_each, 1)
    assert min(took) >= 0.019 and max(took) < 0.080, took


def test_ack_with_result_is_one_transaction(bus_each: Bus) -> None:
    bus_each.ensure_group("frames", G)
    fill(bus_each, 3)
    entries = bus_each.read_group("frames", G, "w1", count=3)
    frames = [decode_frame(e.data) for e in entries if e.data]
    out_ids = bus_each.ack_with_result(
        "frames", G, [e.id for e in entries], "scores", [scores_for(f) for f in frames]
    )
    assert len(out_ids) == 3
    assert bus_each.pending("frames", G) == []
    bus_each.ensure_group("scores", "decide")
    got = bus_each.read_group("scores", "decide", "d1", count=10)
    assert [e.id for e in got] == out_ids
    assert [decode_scores(e.data).seq for e in got if e.data] == [0, 1, 2]


def test_ack_with_result_sends_nothing_if_a_result_is_invalid(bus_each: Bus) -> None:
    bus_each.ensure_group("frames", G)
    fill(bus_each, 2)
    entries = bus_each.read_group("frames", G, "w1", count=2)
    good = scores_for(raw_frame(0))
    bad = Scores("line1", "cam0", 1, T0, {"hist": float("nan")}, "m@1")
    with pytest.raises(LineguardError):
        bus_each.ack_with_result("frames", G, [e.id for e in entries], "scores", [good, bad])
    assert len(bus_each.pending("frames", G)) == 2  # nothing acknowledged
    assert bus_each.length("scores") == 0  # nothing written


def test_reclaim_idle_entries_of_a_dead_peer(bus_each: Bus) -> None:
    bus_each.ensure_group("frames", G)
    ids = fill(bus_each, 3)
    bus_each.read_group("frames", G, "dead-worker", count=3)
    nothing = bus_each.reclaim("frames", G, "rescuer", min_idle_ms=60_000)
    assert nothing.entries == [] and nothing.deleted_ids == []
    time.sleep(0.05)
    got = bus_each.reclaim("frames", G, "rescuer", min_idle_ms=20)
    assert [e.id for e in got.entries] == ids
    assert got.deleted_ids == []
    assert got.cursor == "0-0"
    assert [e.deliveries for e in got.entries] == [2, 2, 2]
    assert {p.consumer for p in bus_each.pending("frames", G)} == {"rescuer"}


def test_reclaim_reports_trimmed_and_deleted_entries(bus_each: Bus) -> None:
    bus_each.ensure_group("frames", G)
    ids = fill(bus_each, 4)
    bus_each.read_group("frames", G, "dead-worker", count=4)
    key = bus_each.key("frames")
    bus_each.client.xtrim(key, maxlen=1, approximate=False)  # drops ids[0..2]
    got = bus_each.reclaim("frames", G, "rescuer", min_idle_ms=0)
    assert sorted(got.deleted_ids) == sorted(ids[:3])
    assert [e.id for e in got.entries] == [ids[3]]
    assert [p.id for p in bus_each.pending("frames", G)] == [ids[3]]  # PEL cleaned up
    bus_each.client.xdel(key, ids[3])
    time.sleep(0.002)
    again = bus_each.reclaim("frames", G, "rescuer", min_idle_ms=0)
    assert again.deleted_ids == [ids[3]] and again.entries == []
    assert bus_each.pending("frames", G) == []


def test_delivery_counts(bus_each: Bus) -> None:
    bus_each.ensure_group("frames", G)
    ids = fill(bus_each, 2)
    bus_each.read_group("frames", G, "a", count=2)
    bus_each.reclaim("frames", G, "b", min_idle_ms=0)
    bus_each.reclaim("frames", G, "c", min_idle_ms=0)
    assert bus_each.delivery_counts("frames", G, ids) == {ids[0]: 3, ids[1]: 3}
    bus_each.ack("frames", G, ids[:1])
    assert bus_each.delivery_counts("frames", G, ids) == {ids[1]: 3}
    assert bus_each.delivery_counts("frames", G, []) == {}


def test_own_backlog_is_replayed_first(bus_each: Bus) -> None:
    bus_each.ensure_group("frames", G)
    ids = fill(bus_each, 3)
    bus_each.read_group("frames", G, "w1", count=2)  # "crash" before acking
    bus_each.client.xdel(bus_each.key("frames"), ids[1])  # one of them gets deleted meanwhile
    reader = bus_each.reader("frames", G, "w1")
    assert reader.recovering
    backlog = reader.read(count=10, block_ms=50)
    assert [e.id for e in backlog] == ids[:2]
    assert backlog[0].deliveries == 2 and not backlog[0].deleted
    assert backlog[1].deleted and backlog[1].data is None
    fresh = reader.read(count=10, block_ms=50)
    assert not reader.recovering
    assert [e.id for e in fresh] == [ids[2]]
    # a reader that does not recover goes straight to new entries
    assert bus_each.reader("frames", G, "w1", recover_pending=False).read(block_ms=10) == []


def test_reader_batches_after_backlog(bus_each: Bus) -> None:
    bus_each.ensure_group("frames", G)
    fill(bus_each, 2)
    bus_each.read_group("frames", G, "w1", count=1)
    reader = bus_each.reader("frames", G, "w1")
    assert len(reader.read_batch(max_batch=4, max_delay_ms=10, block_ms=50)) == 1
    assert len(reader.read_batch(max_batch=4, max_delay_ms=10, block_ms=50)) == 1
    assert reader.read_batch(max_batch=4, max_delay_ms=10, block_ms=20) == []


def test_dead_letter_with_reason(bus_each: Bus) -> None:
    bus_each.ensure_group("frames", G)
    entry_id = bus_each.add("frames", b"\xc1garbage")
    (entry,) = bus_each.read_group("frames", G, "w1")
    dead_id = bus_each.dead_letter(
        "frames", G, entry.id, entry.fields, "not_msgpack", detail="FormatError", deliveries=1
    )
    assert bus_each.pending("frames", G) == []
    (dl,) = bus_each.dead_letters()
    assert dl.id == dead_id
    assert dl.reason == "not_msgpack" and dl.detail == "FormatError"
    assert dl.source_stream == bus_each.key("frames") and dl.group == G
    assert dl.source_id == entry_id and dl.deliveries == 1
    assert dl.fields == {ENTRY_FIELD: b"\xc1garbage"}
    assert dl.t_dead > T0


def test_dead_letter_keeps_clashing_fields_and_deleted_entries(bus_each: Bus) -> None:
    bus_each.ensure_group("frames", G)
    bus_each.client.xadd(bus_each.key("frames"), {b"dead.reason": b"spoof", b"x": b"1"})
    (entry,) = bus_each.read_group("frames", G, "w1")
    bus_each.dead_letter("frames", G, entry.id, entry.fields, "no_message_field")
    ghost = Entry(id="1-1", fields={})
    bus_each.dead_letter("frames", G, ghost.id, ghost.fields, "trimmed")
    newest, oldest = bus_each.dead_letters()
    assert oldest.reason == "no_message_field"
    assert oldest.fields == {b"orig.dead.reason": b"spoof", b"x": b"1"}
    assert newest.reason == "trimmed" and newest.fields == {} and newest.deliveries is None


def test_stats_and_lag(bus_each: Bus) -> None:
    assert bus_each.group_stats("frames", G) is None
    bus_each.ensure_group("frames", G)
    ids = fill(bus_each, 5)
    bus_each.read_group("frames", G, "w1", count=2)
    stats = bus_each.group_stats("frames", G)
    assert stats is not None
    assert (stats.length, stats.pending, stats.lag, stats.consumers) == (5, 2, 3, 1)
    assert not stats.lag_estimated
    assert stats.last_delivered_id == ids[1]
    bus_each.client.xdel(bus_each.key("frames"), ids[3])
    stats = bus_each.group_stats("frames", G)
    assert stats is not None and stats.lag is not None and 2 <= stats.lag <= 3
    assert bus_each.group_stats("frames", "other") is None
    assert bus_each.lengths() == {"frames": 4, "scores": 0, "events": 0, "dead": 0}


def test_group_recreated_after_server_lost_it(bus_each: Bus) -> None:
    bus_each.ensure_group("frames", G)
    bus_each.client.delete(bus_each.key("frames"))  # e.g. a restart without persistence
    assert bus_each.read_group("frames", G, "w1", block_ms=10) == []
    fill(bus_each, 1)
    assert len(bus_each.read_group("frames", G, "w1")) == 1
    bus_each.client.delete(bus_each.key("frames"))
    assert bus_each.reclaim("frames", G, "w1", min_idle_ms=0).entries == []


def test_prune_consumers_keeps_owners(bus_each: Bus) -> None:
    bus_each.ensure_group("frames", G)
    fill(bus_each, 1)
    bus_each.read_group("frames", G, "owner")
    # Redis 7.0 creates no consumer for an empty read (7.2+ and Valkey do), so be explicit
    bus_each.client.xgroup_createconsumer(bus_each.key("frames"), G, "idle")
    time.sleep(0.02)
    assert bus_each.prune_consumers("frames", G, min_idle_ms=10) == ["idle"]
    assert bus_each.prune_consumers("frames", G, min_idle_ms=10) == []


def test_server_version(bus_each: Bus) -> None:
    flavour, version = server_version(bus_each.client)
    assert flavour in ("redis", "valkey")
    assert version >= (7,) if flavour == "redis" else version >= (8,)


# --------------------------------------------------------------------------- connecting


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_wait_for_server_ok(redis_url: str) -> None:
    client = connect(RedisSettings(url=redis_url))
    retry_before = client.get_retry()
    wait_for_server(client, timeout_s=2)
    assert client.get_retry() is retry_before
    client.close()


def test_wait_for_server_gives_up_naming_the_setting() -> None:
    url = f"redis://127.0.0.1:{_closed_port()}/0"
    client = connect(RedisSettings(url=url, connect_timeout=0.5))
    with structlog.testing.capture_logs() as logs:
        start = time.monotonic()
        with pytest.raises(BusError) as info:
            wait_for_server(client, timeout_s=0.4, interval_s=0.05)
        elapsed = time.monotonic() - start
    assert "LINEGUARD_REDIS__URL" in str(info.value)
    assert client_url(client) in str(info.value)
    attempts = [e for e in logs if e["event"] == "redis.unreachable"]
    assert len(attempts) >= 2
    assert [e["attempt"] for e in attempts] == list(range(1, len(attempts) + 1))
    assert elapsed < 5


def test_wrong_password_fails_fast(redis_url: str) -> None:
    creds = {"username": "nobody", "password": "wrong"}
    client = connect(RedisSettings.model_validate({"url": redis_url, **creds}))
    try:
        with pytest.raises(BusError, match="LINEGUARD_REDIS__PASSWORD"):
            wait_for_server(client, timeout_s=5)
    finally:
        client.close()


def test_connect_policy(redis_url: str) -> None:
    s = Settings.load({"redis.url": redis_url, "redis.socket_timeout": 4}, env_file=None)
    client = connect(s, client_name="lineguard-test")
    kw = client.connection_pool.connection_kwargs
    assert kw["socket_timeout"] == 4
    assert kw["retry"].get_retries() == s.redis.retries
    assert client.client_getname() in ("lineguard-test", b"lineguard-test")
    client.close()
    with pytest.raises(ConfigError, match="LINEGUARD_REDIS__URL"):
        connect(RedisSettings())
    with pytest.raises(ConfigError, match="LINEGUARD_REDIS__URL"):
        connect(RedisSettings(url="redis://h:port/0"))


def test_consumer_name() -> None:
    assert consumer_name("gpu0") == "gpu0"
    assert consumer_name().endswith(f"-{__import__('os').getpid()}")


def test_bus_from_settings(redis_url: str) -> None:
    s = Settings.load(
        {"redis.url": redis_url, "line.id": "press-2", "redis.key_prefix": "lgt"}, env_file=None
    )
    client = connect(s)
    bus = Bus.from_settings(client, s)
    assert bus.key("events") == "lgt:{press-2}:events"
    client.close()


def test_redis_errors_are_not_swallowed(bus_each: Bus) -> None:
    bus_each.client.set(bus_each.key("frames"), "not a stream")
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        bus_each.ensure_group("frames", G)
