"""The console end to end in a real browser: headless Chromium (Debian's) driven by Playwright.

An ADT goes in over MLLP from an independent client; in the browser the operator logs in,
watches the dashboard count it without reloading, finds the ADT by its MRN, opens it (raw
and the route's output side by side, the attempts), replays it, and sees the second
delivery, which the downstream receiver got too. Times are shown in the browser's zone.

MEDRELAY_SCREENSHOTS=1 writes docs/console-dashboard.png and docs/console-message.png.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest
from conftest import IN_CI, ROOT, need_tool
from console_support import PASSWORD, start

CHROMIUM = "/usr/bin/chromium"


@pytest.fixture
def browser():
    need_tool(CHROMIUM)
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        if IN_CI:
            pytest.fail("playwright is required (pip install -e .[test])")
        pytest.skip("playwright not installed")
    with sync_playwright() as pw:  # Debian's chromium: `playwright install` would download another
        b = pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                               args=["--no-sandbox", "--disable-dev-shm-usage"])
        yield b
        b.close()


def shot(page, name: str, tmp: Path) -> None:
    target = ROOT / "docs" / name if os.environ.get("MEDRELAY_SCREENSHOTS") else tmp / name
    page.screenshot(path=str(target), full_page=True)


def test_login_find_by_mrn_open_replay_see_second_delivery(engine_factory, browser, tmp_path):
    from playwright.sync_api import expect

    s = start(engine_factory)
    try:
        s.send_adt("ADT-0001", mrn="MRN-4711", name="MUSTERMANN^ERIKA")
        s.rx.wait_for(1)
        ctx = browser.new_context(timezone_id="America/New_York", locale="en-US",
                                  viewport={"width": 1280, "height": 900})
        page = ctx.new_page()
        page.set_default_timeout(20_000)
        page.on("dialog", lambda d: d.accept())

        # not logged in: the login form; no default user exists, the test made "operator"
        page.goto(s.base + "/")
        assert "/login" in page.url
        page.get_by_label("User name").fill("operator")
        page.get_by_label("Password").fill(PASSWORD)
        page.get_by_role("button", name="Log in").click()
        page.get_by_role("heading", name="Dashboard").wait_for()
        row = page.locator('section[data-channel="adt-in"]')
        assert row.locator('[data-field="received"]').inner_text() == "1"
        expect(row.locator('[data-field="status"]')).to_have_text("listening", timeout=30_000)

        # live: a second ADT shows up on the dashboard without a reload (polling /api/channels)
        s.send_adt("ADT-0002", mrn="MRN-0815", name="DOE^JOHN")
        s.rx.wait_for(2)
        expect(row.locator('[data-field="received"]')).to_have_text("2", timeout=30_000)  # no eval: our CSP forbids it
        if os.environ.get("MEDRELAY_SCREENSHOTS"):  # some traffic for the sparklines (sampled every 10 s)
            for i in range(16):
                s.send_adt(f"ADT-1{i:03d}", mrn=f"MRN-9{i:03d}")
                page.wait_for_timeout(2000)
            s.rx.wait_for(18)
        # times in the browser's zone (New York), the UTC value kept as the title
        updated = page.locator("#updated")
        assert updated.get_attribute("title").endswith("(UTC)") and "T" not in updated.inner_text()
        shot(page, "console-dashboard.png", tmp_path)

        # the message browser: find the ADT by its MRN (blind index), open it
        page.get_by_role("link", name="Messages").click()
        page.get_by_label("Patient ID (MRN)").fill("MRN-4711")
        page.get_by_role("button", name="Search").click()
        # expect(...) waits for what it asserts (30 s); count() and inner_text() read the page as
        # it is at that instant, which may be before the search or the navigation has finished
        links = page.locator("table.list tbody a")
        expect(links).to_have_count(1, timeout=30_000)
        expect(links.first).to_contain_text("ADT-0001")
        links.first.click()
        page.get_by_role("heading", name="Deliveries").wait_for()
        expect(page.locator("#raw")).to_contain_text("MRN-4711", timeout=30_000)
        expect(page.locator("pre.output").first).to_contain_text("MUSTERMANN^ERIKA")  # the route's output beside it
        attempts = page.locator("article[data-route=ris] tr.attempt")
        expect(attempts).to_have_count(1, timeout=30_000)
        expect(attempts.first).to_contain_text("done")
        shot(page, "console-message.png", tmp_path)

        # replay it, then see the second delivery
        n = len(s.rx.received)
        page.get_by_role("button", name="Replay").click()
        page.locator("#replayed").wait_for()
        s.rx.wait_for(n + 1)
        replay_by = time.monotonic() + 60  # the attempt history is written when the outcome settles
        while page.locator("article[data-route=ris] tr.attempt").count() != 2 and time.monotonic() < replay_by:
            page.wait_for_timeout(200)
            page.reload()
        rows = page.locator("article[data-route=ris] tr.attempt")
        assert rows.count() == 2 and all("done" in rows.nth(i).inner_text() for i in range(2))
        assert b"MRN-4711" in s.rx.received[n]

        # the dead-letter page and the audit trail render; the audit shows what the operator did
        page.get_by_role("link", name="Dead letters").click()
        page.get_by_role("heading", name="Dead letters").wait_for()
        page.get_by_role("link", name="Audit").click()
        page.get_by_label("Action").fill("message.*")
        page.get_by_role("button", name="Show").click()
        for wanted in ("message.replay", "message.read", "operator"):
            expect(page.locator("table.list")).to_contain_text(wanted, timeout=30_000)
        page.get_by_role("link", name="Dashboard").click()
        page.get_by_role("link", name="adt-in").click()
        expect(page.locator("pre").first).to_contain_text("ris", timeout=30_000)  # the channel's config as written
        page.get_by_role("button", name="Log out").click()
        expect(page).to_have_url(re.compile("/login"), timeout=30_000)
        ctx.close()
    finally:
        s.rx.stop()
