"""The dashboard's data, served for real: a short replay through the pipeline, then the JSON
snapshot, the SSE stream and the reject pictures read back over HTTP from uvicorn.

Also: a trimmed frame is reported as such, the token is enforced and never printed, and the
page never joins a consumer group or acknowledges anything.
"""

from __future__ import annotations

import http.client
import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from lineguard.engines.errors import ConfigError
from lineguard.stream.bus import Bus, StreamName
from lineguard.stream.cli import app
from lineguard.stream.dashboard import (
    DashboardConfig,
    DashboardServer,
    check_binding,
    discover_prefix,
)
from lineguard.stream.dashboard.images import ImageCache, Picture
from lineguard.stream.feed import send_source
from lineguard.stream.protocol import Event, LowResMap, Scores, make_frame
from lineguard.stream.run import LocalPipeline
from lineguard.stream.settings import Settings
from lineguard.stream.sources import ArraySource
from lineguard.stream.tools.replay import replay
from tests.stream.conftest import make_bus
from tests.stream.pipeline_helpers import (
    BAD,
    GOOD,
    SIZE,
    SplitBundle,
    settings_for,
    split_bundle,
    wait_until,
    write_folder,
)

FAST = DashboardConfig(tick_s=0.1, queue_every_s=0.2, workers_every_s=0.5)
N_FRAMES = 30


def bad_frame(i: int) -> bool:
    return i % 5 == 2


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def state_of(server: DashboardServer, query: str = "") -> dict[str, Any]:
    status, _h, body = get(server.url + "api/state" + query)
    assert status == 200, body
    return json.loads(body)


@dataclass
class Replayed:
    bus: Bus
    settings: Settings
    split: SplitBundle
    server: DashboardServer
    labels: list[bool]


@pytest.fixture(scope="module")
def replayed(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replayed]:
    """30 frames (6 bad) through infer (with maps) and decide, with the dashboard watching."""
    split = split_bundle()
    folder = tmp_path_factory.mktemp("dash") / "frames"
    labels = write_folder(folder, bad_frame, N_FRAMES)
    for bus in make_bus(redis_url):
        settings = settings_for(bus, redis_url)
        with (
            LocalPipeline(settings, redis_url, split.path, runtime="onnxruntime", maps=True),
            DashboardServer(settings, url=redis_url, port=0, config=FAST) as server,
        ):
            summary = replay(settings, str(folder), size=SIZE, timeout_s=60)
            assert summary.ok, summary.to_json()
            wait_until(
                lambda: state_of(server)["counts"]["total"] == N_FRAMES, 10, "dashboard counts"
            )
            yield Replayed(bus, settings, split, server, labels)


def test_state_has_counts_rates_latency_queues_and_model(replayed: Replayed) -> None:
    server = replayed.server
    n_bad = sum(replayed.labels)

    def drained() -> bool:
        queues = state_of(server)["queues"]
        return all((queues.get(q) or {}).get("pending") == 0 for q in ("frames", "scores"))

    wait_until(drained, 10, "queues seen drained")
    s = state_of(server)
    assert s["v"] == 1 and s["line"] == "line1" and s["prefix"] == replayed.bus.prefix
    assert s["error"] is None
    assert s["counts"] == {
        "pass": N_FRAMES - n_bad,
        "fail": n_bad,
        "uninspected": 0,
        "error": 0,
        "total": N_FRAMES,
    }
    assert s["share"]["fail"] == pytest.approx(n_bad / N_FRAMES, abs=1e-4)
    assert s["rates"]["per_min"]["fail"] > 0 and s["rates"]["fps"] > 0
    lat = s["latency_ms"]
    assert lat["n"] == N_FRAMES and 0 < lat["p50"] <= lat["p99"] < 60_000
    assert s["model"]["current"] == replayed.split.version
    frames_q, scores_q = s["queues"]["frames"], s["queues"]["scores"]
    assert frames_q["group"] == "infer" and frames_q["stage"] == "infer"
    assert scores_q["group"] == "decide" and scores_q["lag"] == 0
    assert frames_q["pending"] == 0 and frames_q["length"] >= N_FRAMES
    wait_until(lambda: len(state_of(server)["workers"]) >= 2, 5, "worker heartbeats")
    stages = {w["stage"] for w in state_of(server)["workers"]}
    assert {"infer", "decide"} <= stages
    series = s["series"]
    points = int(FAST.window_s // FAST.bucket_s)
    for name in ("fps", "p50_ms", "p99_ms", "fail", "lag_frames", "lag_scores"):
        assert len(series[name]) == points, name
    assert s["ignored"] == {"unreadable": 0, "duplicates": 0}
    assert len(json.dumps(s)) < 64 * 1024  # bounded, whatever the line's rate


def test_rejects_carry_score_threshold_branches_and_pictures(replayed: Replayed) -> None:
    server = replayed.server
    bad_seqs = [i for i, bad in enumerate(replayed.labels) if bad]
    wait_until(lambda: len(state_of(server)["rejects"]) == len(bad_seqs), 10, "rejects resolved")
    rejects = state_of(server)["rejects"]
    assert [r["seq"] for r in rejects] == sorted(bad_seqs, reverse=True)  # newest first
    branches = set(replayed.split.calibration.branches)
    for r in rejects:
        assert r["score"] > r["threshold"] == 0.0
        assert set(r["contributions"]) == branches
        fused = replayed.split.calibration.combined(np.array([list(r["contributions"].values())]))
        assert fused[0] == pytest.approx(r["score"], abs=1e-3)
        assert r["frame"] and r["map"] and r["seg"]  # infer --maps attaches both planes
        assert r["model"] == replayed.split.version and r["reason"]
        assert set(r["images"]) == {"thumb", "frame", "overlay", "seg"}
    first = rejects[0]
    for kind, path in first["images"].items():
        status, headers, body = get(server.url + path)
        assert status == 200, (kind, body)
        if kind == "seg":  # class colours stay exact in PNG
            assert headers["content-type"] == "image/png" and body[:4] == b"\x89PNG"
        else:
            assert headers["content-type"] == "image/jpeg" and body[:2] == b"\xff\xd8"
        assert len(body) < 200_000
    _s, _h, body = get(server.url + first["images"]["frame"])
    img = cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_COLOR)
    assert img is not None
    b, _g, r = (float(c) for c in img.reshape(-1, 3).mean(axis=0))
    assert r > 150 and b < 50, "the picture is not the red BAD frame"
    # pictures are encoded once and cached per frame key
    cached = len(server.view.cache) if server.view else 0
    get(server.url + first["images"]["overlay"])
    assert server.view is not None and len(server.view.cache) == cached


def test_the_page_reads_without_groups_and_is_read_only(replayed: Replayed) -> None:
    client, bus = replayed.bus.client, replayed.bus
    streams: tuple[StreamName, ...] = ("frames", "scores", "events")
    groups = {
        s: sorted(g["name"].decode() for g in client.xinfo_groups(bus.key(s))) for s in streams
    }
    assert groups == {"frames": ["infer"], "scores": ["decide"], "events": []}
    pairs: tuple[tuple[StreamName, str], ...] = (("frames", "infer"), ("scores", "decide"))
    for s, g in pairs:
        names = [c["name"].decode() for c in client.xinfo_consumers(bus.key(s), g)]
        assert not any("dashboard" in n for n in names), names
    url = replayed.server.url
    for method in ("POST", "PUT", "DELETE"):
        req = urllib.request.Request(url + "api/state", method=method, data=b"{}")
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req, timeout=5)
        assert err.value.code == 405
    status, headers, body = get(url)
    assert status == 200 and b"lineguard" in body
    assert "default-src 'self'" in headers["content-security-policy"]
    for asset in ("app.js", "style.css"):
        assert get(url + "static/" + asset)[0] == 200


def _sse_states(resp: http.client.HTTPResponse) -> Iterator[dict[str, Any]]:
    event = None
    while True:
        line = resp.readline()
        if not line:
            return
        text = line.decode().rstrip("\n")
        if text.startswith("event: "):
            event = text[7:]
        elif text.startswith("data: ") and event == "state":
            yield json.loads(text[6:])


def test_sse_pushes_a_new_snapshot_when_events_arrive(replayed: Replayed) -> None:
    server = replayed.server
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=20)
    try:
        conn.request("GET", "/api/stream")
        resp = conn.getresponse()
        assert resp.status == 200
        assert resp.getheader("content-type", "").startswith("text/event-stream")
        states = _sse_states(resp)
        first = next(states)
        assert first["counts"]["total"] == N_FRAMES
        assert set(first) == set(state_of(server))
        sent = send_source(
            replayed.bus, replayed.settings, ArraySource([GOOD, GOOD, GOOD, BAD]), size=SIZE
        )
        assert sent.count == 4
        bad_seq = sent.seqs[3]
        deadline = time.monotonic() + 20
        latest = first
        while latest["counts"]["total"] < N_FRAMES + 4 or latest["rejects"][0]["seq"] != bad_seq:
            assert time.monotonic() < deadline, (latest["counts"], latest["rejects"][:1])
            latest = next(states)
        assert latest["counts"]["fail"] == first["counts"]["fail"] + 1
        assert latest["rejects"][0]["frame"] and latest["rejects"][0]["map"]
    finally:
        conn.close()


def _messages(bus: Bus, seq: int, *, amap: bool = True, seg: bool = True) -> str:
    """Put one frame, its scores (map and segmentation) and a fail event on the bus by hand;
    returns the frame's entry id."""
    t = time.time()
    img = np.zeros((48, 64, 3), np.uint8)
    img[:, :, 0] = 220
    frame_id = bus.add("frames", make_frame("line1", "cam0", seq, img, t_capture=t))
    t_queued = int(frame_id.split("-")[0]) / 1000
    yy, xx = np.mgrid[0:12, 0:16]
    heat = np.exp(-((yy - 6.0) ** 2 + (xx - 8.0) ** 2) / 8).astype(np.float32)
    labels = np.zeros((48, 64), np.uint8)
    labels[10:30, 10:40] = 2
    scores = Scores(
        "line1", "cam0", seq, t, {"patch_hist": 3.0, "lgst": 9.0}, "model-a",
        {"t_queued": t_queued, "t_read": t_queued, "t_scored": time.time()},
        LowResMap.from_float(heat) if amap else None,
        LowResMap.from_labels(labels) if seg else None,
    )  # fmt: skip
    bus.add("scores", scores)
    t_event = time.time()
    latency = {"ingest": t_queued - t, "decide": 0.0005, "handoff": 0.0005, "total": t_event - t}
    bus.add(
        "events",
        Event(
            "line1", "cam0", seq, "fail", 4.5, 1.5, {"patch_hist": 1.0, "lgst": 3.5}, "model-a",
            latency, "fused 4.5 > 1.5", t, t_event,
        ),
    )  # fmt: skip
    return frame_id


def test_a_trimmed_frame_is_reported_and_maps_still_show(bus: Bus, redis_url: str) -> None:
    settings = settings_for(bus, redis_url)
    _messages(bus, 0)
    gone = _messages(bus, 1)
    bus.client.xdel(bus.key("frames"), gone)  # trimmed by MAXLEN before anyone looked
    with DashboardServer(settings, url=redis_url, port=0, config=FAST) as server:
        wait_until(lambda: len(state_of(server)["rejects"]) == 2, 10, "two rejects")
        kept, trimmed = sorted(state_of(server)["rejects"], key=lambda r: r["seq"])
        assert kept["frame"] and kept["map"] and kept["seg"]
        assert set(kept["images"]) == {"thumb", "frame", "overlay", "seg"}
        assert not trimmed["frame"] and trimmed["map"] and trimmed["seg"]
        assert set(trimmed["images"]) == {"thumb", "overlay", "seg"}
        assert trimmed["contributions"] == {"patch_hist": 1.0, "lgst": 3.5}
        status, _h, body = get(server.url + "api/image/cam0/1/frame")
        assert status == 404 and json.loads(body)["error"] == "frame no longer available"
        status, headers, body = get(server.url + kept["images"]["seg"])
        assert status == 200 and headers["content-type"] == "image/png"
        seg = cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_COLOR)
        assert seg is not None and seg.shape == (48, 64, 3)
        assert get(server.url + "api/image/cam0/7/thumb")[0] == 404  # never seen
        assert get(server.url + "api/image/bad{name}/1/thumb")[0] == 404


def test_a_frame_key_again_in_a_new_epoch_is_counted_and_a_copy_is_not(
    bus: Bus, redis_url: str
) -> None:
    """After Redis lost its data, seq 3 comes again under a new epoch: a new verdict."""
    t = time.time()
    for epoch in ("e1", "e2", "e2"):  # the last one a redelivered copy
        bus.add("events", Event("line1", "cam0", 3, "pass", 0.1, 1.0, {}, "m", {}, "", t, t, epoch))
    with DashboardServer(
        settings_for(bus, redis_url), url=redis_url, port=0, config=FAST
    ) as server:
        wait_until(lambda: state_of(server)["ignored"]["duplicates"] == 1, 10, "the copy")
        assert state_of(server)["counts"]["pass"] == 2


def test_token_is_required_and_never_printed(
    bus: Bus, redis_url: str, capfd: pytest.CaptureFixture[str]
) -> None:
    token = "tok-5f3a9c1e77"
    settings = settings_for(bus, redis_url)
    with DashboardServer(settings, url=redis_url, port=0, token=token, config=FAST) as server:
        api = server.url + "api/state"
        assert get(api)[0] == 401
        assert get(api + "?token=wrong-token-1")[0] == 401
        assert get(api + "?token=" + token)[0] == 200
        assert get(api, {"Authorization": f"Bearer {token}"})[0] == 200
        assert get(api, {"X-Lineguard-Token": token})[0] == 200
        assert get(server.url + "api/stream")[0] == 401
        assert get(server.url + "static/app.js")[0] == 200  # public assets, no data
        assert get(server.url + "healthz")[0] == 200
        assert token not in server.url
    out, err = capfd.readouterr()
    assert token not in out and token not in err


def test_binding_beyond_loopback_needs_a_token() -> None:
    check_binding("127.0.0.1", None)
    check_binding("::1", None)
    check_binding("localhost", None)
    with pytest.raises(ConfigError, match="--token"):
        check_binding("0.0.0.0", None)
    with pytest.raises(ConfigError, match="at least"):
        check_binding("0.0.0.0", "short")
    check_binding("0.0.0.0", "long-enough-token")
    result = CliRunner().invoke(app, ["dashboard", "--host", "0.0.0.0"])
    assert result.exit_code == 1 and "--token" in result.output
    for cmd in ("run", "demo"):
        assert "--dashboard" in CliRunner().invoke(app, [cmd, "--help"]).output


def test_a_prefix_glob_follows_the_newest_run(bus: Bus) -> None:
    older, newer = f"{bus.prefix}:run-a", f"{bus.prefix}:run-b"
    bus.client.xadd(f"{older}:{{line1}}:events", {"m": b"x"}, id="1000-0")
    bus.client.xadd(f"{newer}:{{line1}}:frames", {"m": b"x"}, id="2000-0")
    bus.client.xadd(f"{bus.prefix}:other:{{line2}}:events", {"m": b"x"}, id="3000-0")
    assert discover_prefix(bus.client, f"{bus.prefix}:run-*", "line1") == newer
    assert discover_prefix(bus.client, f"{bus.prefix}:nothing-*", "line1") is None
    assert discover_prefix(bus.client, "plain", "line1") == "plain"


def test_image_cache_is_bounded_by_count_and_bytes() -> None:
    cache = ImageCache(max_items=3, max_bytes=100)
    for i in range(5):
        cache.put(f"k{i}", "thumb", Picture(b"x" * 10, "image/jpeg"))
    assert len(cache) == 3 and cache.get("k0", "thumb") is None
    assert cache.get("k4", "thumb") is not None
    cache.put("big", "frame", Picture(b"y" * 95, "image/jpeg"))
    assert cache.size_bytes <= 100 and cache.get("big", "frame") is not None
    cache.put("huge", "frame", Picture(b"z" * 101, "image/jpeg"))  # never fits: not kept
    assert cache.get("huge", "frame") is None


def test_dashboard_help_names_its_options() -> None:
    result = CliRunner().invoke(app, ["dashboard", "--help"])
    assert result.exit_code == 0
    assert "--token" in result.output and "--prefix" in result.output
