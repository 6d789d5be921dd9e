"""The web page in a real headless Chromium (Debian's, never a downloaded browser), against
a real server started in the background the way a notebook cell starts it, on a tiny
model: log in, generate, see the image in the gallery, run a 2x2 X/Y plot, and a wrong
password refused. A screenshot is kept in tests/artifacts/."""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

import httpx
import pytest

from fastsd import session
from fastsd.webui import process, start

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
USER, PASSWORD = "artist", "a long browser password"
WAIT = 240_000  # ms: a generation on 2 shared CPU cores


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(tmp_path, monkeypatch, workspace, tiny_sd1):
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"{CHROMIUM} is missing: `make test` installs Debian's chromium.")
    monkeypatch.setenv(process.RUN_DIR_ENV, str(tmp_path / "run"))
    monkeypatch.setattr(process, "_current", None)
    session.create("dog", workspace)
    s = start.start("dog", model=str(tiny_sd1), tunnel=None, port=free_port(), user=USER,
                    password=PASSWORD, home=workspace, ready_timeout=300)
    t0 = time.monotonic()
    try:
        yield s.wait_ready(300)
        print(f"server ready in {time.monotonic() - t0:.1f}s")
    finally:
        s.stop()


def fill_number(page, elem_id: str, value: str) -> None:
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(value)
    box.press("Tab")


def test_the_page_in_a_real_browser(server, workspace):
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import expect, sync_playwright

    url = server.local_url + "/"
    assert httpx.get(url, auth=(USER, "wrong"), timeout=30).status_code == 401
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            wrong = browser.new_context(http_credentials={"username": USER,
                                                          "password": "wrong"})
            try:
                status = wrong.new_page().goto(url).status
            except PlaywrightError as e:  # Chromium's page for a 401 with no retry left
                status = 401 if "ERR_HTTP_RESPONSE_CODE_FAILURE" in str(e) or "401" in str(
                    e) else str(e)
            assert status == 401
            wrong.close()

            phone = browser.new_context(
                http_credentials={"username": USER, "password": PASSWORD},
                viewport={"width": 412, "height": 915}, device_scale_factor=1)
            page = phone.new_page()
            page.set_default_timeout(60_000)
            assert page.goto(url).status == 200
            page.locator("#prompt textarea").fill("a photo of sks dog")
            for elem_id, value in (("steps", "2"), ("width", "64"), ("height", "64")):
                fill_number(page, elem_id, value)
            page.locator("#generate").click()
            expect(page.locator("#result img")).to_have_count(1, timeout=WAIT)
            expect(page.locator("#info textarea")).to_have_value(re.compile("Steps: 2,"))
            saved = list((workspace / "sessions" / "dog" / "outputs").rglob("*.png"))
            assert len(saved) == 1

            page.get_by_role("tab", name="Gallery").click()
            page.locator("#gallery-refresh").click()
            expect(page.locator("#gallery img").first).to_be_visible(timeout=WAIT)

            page.get_by_role("tab", name="X/Y/Z plot").click()
            page.locator("#x-values textarea, #x-values input").first.fill("1, 2")
            page.locator("#y-values textarea, #y-values input").first.fill("1, 2")
            page.locator("#run-plot").click()
            expect(page.locator("#plot-result img")).to_have_count(1, timeout=WAIT)
            expect(page.locator("#plot-info textarea, #plot-info input").first).to_have_value(
                re.compile(r"\.png$"))
            ARTIFACTS.mkdir(exist_ok=True)
            shot = ARTIFACTS / "page.png"
            page.screenshot(path=str(shot), full_page=True)
            print(f"screenshot: {shot}")
            assert shot.stat().st_size > 10_000
            saved = list((workspace / "sessions" / "dog" / "outputs").rglob("*.png"))
            assert len(saved) == 1 + 5  # the first image, the grid and its four cells
        finally:
            browser.close()
    log = server.log.read_text()
    assert PASSWORD not in log and shutil.which("chromium")
