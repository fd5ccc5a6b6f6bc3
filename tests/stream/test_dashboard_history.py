"""The dashboard with a verdict history: the shift's counts come from the history (not the
capped stream), and an operator's mark on a reject goes into it over ``POST /api/mark``,
behind the token when one is set. Real uvicorn, real bus, a real SQLite file."""

from __future__ import annotations

import datetime as dt
import json
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from lineguard.stream.bus import Bus
from lineguard.stream.dashboard import DashboardConfig, DashboardServer
from lineguard.stream.dashboard.data import shift_start
from lineguard.stream.history.rows import row_from_event
from lineguard.stream.history.store import HistoryStore
from lineguard.stream.protocol import Event
from lineguard.stream.settings import Settings
from tests.stream.pipeline_helpers import wait_until
from tests.stream.test_dashboard import _messages
from tests.stream.test_dashboard_browser import CHROMIUM, CHROMIUM_ARGS

FAST = DashboardConfig(tick_s=0.1, queue_every_s=0.2, workers_every_s=0.5, history_every_s=0.2)


def settings(bus: Bus, url: str, hdir: Path) -> Settings:
    return Settings.load(
        {
            "redis.url": url,
            "redis.key_prefix": bus.prefix,
            "line.id": bus.line,
            "history.dir": str(hdir),
            "history.shift_starts": "00:00",
        },
        env_file=None,
    )


def state(server: DashboardServer, headers: dict[str, str] | None = None) -> dict[str, Any]:
    req = urllib.request.Request(server.url + "api/state", headers=headers or {})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def post(
    server: DashboardServer, body: Any, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, Any]]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    hdrs = {"Content-Type": "application/json", **(headers or {})}
    req = urllib.request.Request(server.url + "api/mark", data=data, headers=hdrs, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def old_events(n: int) -> list[Event]:
    """Verdicts of this shift that the events stream no longer holds (trimmed long ago)."""
    t = time.time() - 60
    return [
        Event("line1", "cam0", 1000 + i, "fail" if i % 4 == 0 else "pass", 1.0, 0.5, {}, "m",
              {"total": 0.01}, "", t, t)
        for i in range(n)
    ]  # fmt: skip


def test_shift_counts_come_from_the_history_and_marks_go_into_it(
    bus: Bus, redis_url: str, tmp_path: Path
) -> None:
    s = settings(bus, redis_url, tmp_path / "h")
    store = HistoryStore.from_settings(s.history)
    store.insert([row_from_event(e) for e in old_events(40)])
    _messages(bus, 0)
    with DashboardServer(s, url=redis_url, port=0, config=FAST) as server:
        assert server.history  # found the SQLite file: configured
        wait_until(lambda: state(server)["rejects"] and state(server)["shift"], 10, "a reject")
        snap = state(server)
        assert snap["counts"]["total"] == 1  # the stream holds one event ...
        shift = snap["shift"]
        assert shift["source"] == "history" and shift["counts"]["total"] == 40  # ... history 40
        assert shift["reject_rate"] == pytest.approx(10 / 40)
        assert snap["marks"] is True
        key = snap["rejects"][0]["key"]
        status, body = post(server, {"key": key, "mark": "good"})
        assert status == 200 and body == {"ok": True, "key": key, "mark": "good"}
        assert store.marks([key]) == {key: "good"}
        wait_until(lambda: state(server)["rejects"][0]["mark"] == "good", 5, "mark shown")
        assert post(server, {"key": key, "mark": "defect"})[0] == 200
        assert store.marks([key]) == {key: "defect"}  # the latest mark wins
        assert post(server, {"key": key, "mark": "maybe"})[0] == 400
        assert post(server, {"key": "other/cam0/000000001", "mark": "good"})[0] == 400
        assert post(server, {"key": "../../x", "mark": "good"})[0] == 400
        assert post(server, b"not json")[0] == 400
        assert post(server, b"x" * 5000)[0] == 413
        assert post(server, {"key": key, "mark": "good"}, {"Content-Type": "text/plain"})[0] == 415
        evil = {"Origin": "http://evil.example"}
        assert post(server, {"key": key, "mark": "good"}, evil)[0] == 403
    store.close()


def test_marks_need_the_token_when_one_is_set(bus: Bus, redis_url: str, tmp_path: Path) -> None:
    s = settings(bus, redis_url, tmp_path / "h")
    store = HistoryStore.from_settings(s.history)
    store.count()  # creates the file: the history is configured
    token = "tok-history-91c2"
    with DashboardServer(s, url=redis_url, port=0, token=token, config=FAST) as server:
        body = {"key": "line1/cam0/000000003", "mark": "defect"}
        assert post(server, body)[0] == 401
        assert post(server, body, {"X-Lineguard-Token": "wrong-token-x"})[0] == 401
        assert post(server, body, {"X-Lineguard-Token": token})[0] == 200
    assert store.marks(["line1/cam0/000000003"]) == {"line1/cam0/000000003": "defect"}
    store.close()


def test_without_a_history_there_is_no_shift_and_marks_are_refused(
    bus: Bus, redis_url: str, tmp_path: Path
) -> None:
    s = settings(bus, redis_url, tmp_path / "none")
    with DashboardServer(s, url=redis_url, port=0, config=FAST) as server:
        assert not server.history
        snap = state(server)
        assert snap["shift"] is None and snap["marks"] is False
        assert post(server, {"key": "line1/cam0/000000003", "mark": "good"})[0] == 409
    assert not (tmp_path / "none").exists()


def test_shift_start_is_the_latest_start_before_now() -> None:
    day = dt.datetime(2026, 12, 3)
    at = lambda h, m=0: (day + dt.timedelta(hours=h, minutes=m)).timestamp()  # noqa: E731
    starts = ("06:00", "14:00", "22:00")
    assert shift_start(at(7), starts) == at(6)
    assert shift_start(at(14), starts) == at(14)
    assert shift_start(at(23, 59), starts) == at(22)
    assert shift_start(at(3), starts) == at(-2)  # the night shift began yesterday


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium installed: apt-get install -y chromium")
def test_an_operator_marks_a_reject_in_chromium(bus: Bus, redis_url: str, tmp_path: Path) -> None:
    """The buttons as an operator uses them: open a reject, press "good part", see it saved."""
    from playwright.sync_api import expect, sync_playwright

    s = settings(bus, redis_url, tmp_path / "h")
    store = HistoryStore.from_settings(s.history)
    store.insert([row_from_event(e) for e in old_events(8)])
    _messages(bus, 0)
    token = "browser-mark-token-77"
    errors: list[str] = []
    with (
        DashboardServer(s, url=redis_url, port=0, token=token, config=FAST) as server,
        sync_playwright() as pw,
    ):
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page()
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(f"{server.url}?token={token}")
            expect(page.locator("#shift")).to_contain_text("8 inspected", timeout=15_000)
            expect(page.locator("#shift")).to_contain_text("reject rate 25.00 %")
            card = page.locator(".reject").first
            expect(card).to_be_visible(timeout=15_000)
            key = card.get_attribute("data-key")
            card.click()
            page.click("#mark-good")
            expect(page.locator("#mark-status")).to_have_text("saved: good part", timeout=5_000)
            assert key is not None and store.marks([key]) == {key: "good"}
            expect(card.locator(".mark")).to_have_text("marked good part", timeout=5_000)
            page.click("#mark-defect")
            expect(page.locator("#mark-status")).to_have_text("saved: confirmed defect")
            assert store.marks([key]) == {key: "defect"}
        finally:
            browser.close()
    store.close()
    assert not errors, errors
