"""The dashboard in a real browser: headless Debian Chromium driven by Playwright.

A replay of known good and bad frames runs while the page is open (with a token, so the
page's own URL handling is exercised); the counters must reach the expected numbers, the
rejects must appear with loaded thumbnails, a click must open the large view, and the page
must log no errors (a Content-Security-Policy violation would show up here). Screenshots are
saved under pytest's tmp dir, and copied to ``$LINEGUARD_ARTIFACTS`` when that is set.

Skips only when no Chromium is installed (``apt-get install -y chromium chromium-driver``;
``.ci/run`` does it). Playwright's own browser downloads are never used.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from lineguard.stream.bus import Bus
from lineguard.stream.dashboard import DashboardConfig, DashboardServer
from lineguard.stream.run import LocalPipeline
from lineguard.stream.tools.replay import replay
from tests.stream.pipeline_helpers import SIZE, settings_for, split_bundle, write_folder

CHROMIUM = next(
    (p for p in ("/usr/bin/chromium", "/usr/bin/chromium-browser") if os.path.exists(p)),
    shutil.which("chromium"),
)
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
N_FRAMES = 24
TOKEN = "browser-test-token-0042"

pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="no Chromium installed: apt-get install -y chromium chromium-driver "
    "(.ci/run installs it, so CI runs this test)",
)


def bad_frame(i: int) -> bool:
    return i % 4 == 1


def keep(path: Path) -> Path:
    """Copy a screenshot to $LINEGUARD_ARTIFACTS, if set."""
    target = os.environ.get("LINEGUARD_ARTIFACTS")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, Path(target) / path.name)
    return path


def test_page_shows_live_counts_and_rejects_in_chromium(
    bus: Bus, redis_url: str, tmp_path: Path
) -> None:
    from playwright.sync_api import expect, sync_playwright

    split = split_bundle()
    labels = write_folder(tmp_path / "frames", bad_frame, N_FRAMES)
    n_bad = sum(labels)
    settings = settings_for(bus, redis_url)
    config = DashboardConfig(tick_s=0.2, queue_every_s=0.5, workers_every_s=1.0)
    errors: list[str] = []
    with (
        LocalPipeline(settings, redis_url, split.path, runtime="onnxruntime", maps=True),
        DashboardServer(settings, url=redis_url, port=0, token=TOKEN, config=config) as server,
        sync_playwright() as pw,
    ):
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1366, "height": 900})
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(f"{server.url}?token={TOKEN}")
            expect(page.locator("#status")).to_have_text("live", timeout=15_000)

            summary = replay(settings, str(tmp_path / "frames"), size=SIZE, timeout_s=60)
            assert summary.ok, summary.to_json()

            expect(page.locator("#count-total")).to_have_text(str(N_FRAMES), timeout=20_000)
            assert page.text_content("#count-fail") == str(n_bad)
            assert page.text_content("#count-pass") == str(N_FRAMES - n_bad)
            assert page.text_content("#count-error") == "0"
            assert page.text_content("#count-uninspected") == "0"
            assert page.text_content("#model") == split.version

            expect(page.locator(".reject")).to_have_count(n_bad, timeout=20_000)
            page.wait_for_function(  # a function, not an expression: the page's CSP bans eval
                "() => [...document.querySelectorAll('.reject img')].every("
                "i => i.complete && i.naturalWidth > 0)",
                timeout=20_000,
            )
            assert page.locator(".reject img").count() == n_bad
            expect(page.locator("#chart-fps path").first).to_be_attached(timeout=20_000)
            keep(_shot(page, tmp_path / "dashboard-gallery.png"))

            newest = page.locator(".reject").first
            key = newest.get_attribute("data-key")
            newest.click()
            page.wait_for_selector("#detail:not([hidden])", timeout=5_000)
            assert page.text_content("#detail-title") == key
            page.wait_for_function(
                "() => ['view-frame', 'view-overlay', 'view-seg'].every(id => { const i = "
                "document.querySelector('#' + id + ' img'); "
                "return i && i.complete && i.naturalWidth > 0; })",
                timeout=10_000,
            )
            assert page.locator("#detail-score .thr").count() == 1
            branches = page.text_content("#detail-branches") or ""
            assert all(b in branches for b in split.calibration.branches)
            keep(_shot(page, tmp_path / "dashboard-detail.png"))

            page.keyboard.press("Escape")
            page.wait_for_selector("#detail", state="hidden", timeout=5_000)
        finally:
            browser.close()
    assert not errors, errors


def _shot(page: object, path: Path) -> Path:
    page.screenshot(path=str(path), full_page=True)  # type: ignore[attr-defined]
    assert path.stat().st_size > 10_000
    return path
