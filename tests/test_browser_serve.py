"""A real browser against a real server: `imgclf serve` on a loopback port, Chromium
(driven by Playwright, no browser download) uploads an image through the page and reads
the predicted class; /docs renders Swagger UI with every non-loopback request blocked;
curl-style rejections against the same live server.

Set IMGCLF_SCREENSHOT_DIR to keep the page's screenshots."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from conftest import browser_available, launch_chromium, serve_process, watched_page
from imgclf.predict.onnx_predictor import OnnxClassifier

pytestmark = pytest.mark.skipif(not browser_available(), reason="needs Debian's chromium and the playwright package")


@pytest.fixture(scope="module")
def server(exported, tmp_path_factory):
    """`python -m imgclf serve MODEL --port 0 --max-upload-mb 1`; yields (base url, process)."""
    with serve_process(exported, tmp_path_factory.mktemp("serve-log"), "--max-upload-mb", "1") as running:
        yield running


def test_page_uploads_an_image_and_shows_the_prediction(server, exported, shapes_root, tmp_path):
    base, proc = server
    image = sorted((shapes_root / "test" / "triangle").glob("*.jpg"))[1]
    expected = OnnxClassifier(exported).predict([image])[0]
    shots = Path(os.environ.get("IMGCLF_SCREENSHOT_DIR") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    not_image = tmp_path / "notes.jpg"
    not_image.write_text("these are notes, not a picture")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = launch_chromium(p)
        try:
            page, requests, console_errors = watched_page(browser, 1200, 820)
            page.goto(base, timeout=30_000)
            page.wait_for_selector("#model-line:has-text('circle')", timeout=30_000)
            assert "3 classes" in page.text_content("#model-line")
            page.screenshot(path=str(shots / "serve-page-empty.png"), full_page=True)

            page.set_input_files("#file-input", str(image))
            page.wait_for_selector("#prediction:not([hidden])", timeout=60_000)
            assert page.text_content("#predicted").strip() == expected == "triangle"
            assert page.is_visible("#preview")
            bars = page.query_selector_all("#bars li")
            assert [b.get_attribute("data-class") for b in bars][0] == "triangle" and len(bars) == 3
            assert "%" in page.text_content("#bars li.winner .bar-value")
            if page.evaluate("fetch('/v1/model').then(r => r.json()).then(m => m.explain)"):
                page.wait_for_selector("#explain-img:not([hidden])", timeout=60_000)
                assert "Grad-CAM" in page.text_content("#explain-caption")
            page.screenshot(path=str(shots / "serve-page-prediction.png"), full_page=True)

            page.set_input_files("#file-input", str(not_image))
            page.wait_for_selector("#status.error", timeout=30_000)
            assert "not a JPEG, PNG" in page.text_content("#status")
            assert page.is_hidden("#prediction")
            page.wait_for_selector("#preview", state="hidden", timeout=10_000)  # no broken-image icon
            page.screenshot(path=str(shots / "serve-page-error.png"), full_page=True)
        finally:
            browser.close()
    expected_415 = [m for m in console_errors if "status of 415" in m]  # the browser logs the refused upload
    assert len(expected_415) == 1 and not [m for m in console_errors if m not in expected_415], console_errors
    outside = [u for u in requests if not (u.startswith(base) or u.startswith(("data:", "blob:")))]
    assert not outside, outside  # only this server: no CDN, no network
    assert proc.poll() is None


def test_live_server_answers_curl_style_requests(server, shapes_root, tmp_path):
    import httpx

    base, _ = server
    image = sorted((shapes_root / "test" / "square").glob("*.jpg"))[0]
    with httpx.Client(base_url=base, timeout=60) as c:
        r = c.post("v1/predict", files={"file": (image.name, image.read_bytes(), "image/jpeg")})
        assert r.status_code == 200 and r.json()["predictions"][0]["predicted"] == "square"
        r = c.post("v1/predict", files={"file": ("bad.jpg", b"\xff\xd8\xff\xe0" + b"\x00" * 50, "image/jpeg")})
        assert r.status_code == 422 and r.json()["error"]["code"] == "corrupt-image"
        r = c.post("v1/predict", files={"file": ("text.png", b"hello", "image/png")})
        assert r.status_code == 415 and r.json()["error"]["code"] == "not-an-image"
        big = os.urandom(1_500_000)  # over --max-upload-mb 1
        r = c.post("v1/predict", files={"file": ("big.jpg", b"\xff\xd8\xff" + big, "image/jpeg")})
        assert r.status_code == 413 and r.json()["error"]["code"] == "file-too-large"
        assert c.get("healthz").json()["status"] == "ok"
        assert c.get("docs").status_code == 200


def test_api_docs_render_with_the_network_cut_off(server):
    """/docs in a browser that may reach nothing but the server: Swagger UI (served by the
    server from the installed package) lists the operations, and the page's CSP ('self' only)
    blocks nothing it needs."""
    from urllib.parse import urlsplit

    base, proc = server
    blocked, console_errors = [], []
    from playwright.sync_api import sync_playwright

    def only_loopback(route):
        url = route.request.url
        if url.startswith(("data:", "blob:")) or urlsplit(url).hostname in ("127.0.0.1", "localhost"):
            route.continue_()
        else:
            blocked.append(url)
            route.abort()

    with sync_playwright() as p:
        browser = launch_chromium(p)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.route("**/*", only_loopback)
            page.on("console", lambda m: console_errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: console_errors.append(str(e)))
            page.goto(base + "docs", timeout=30_000)
            page.wait_for_selector(".opblock-summary-path[data-path='/v1/predict']", timeout=60_000)
            paths = [e.get_attribute("data-path") for e in page.query_selector_all(".opblock-summary-path")]
            assert {"/v1/predict", "/v1/model", "/healthz"} <= set(paths), paths
            assert "imgclf" in page.text_content(".info .title")
            page.click(".opblock-summary-path[data-path='/healthz']")  # expand, try it out, execute: answered by this server
            page.click(".opblock.is-open .try-out__btn")
            page.click(".opblock.is-open .execute")
            status_cell = ".opblock.is-open .live-responses-table tbody .response-col_status"
            page.wait_for_selector(status_cell, timeout=30_000)
            assert page.text_content(status_cell).strip() == "200"
        finally:
            browser.close()
    assert not blocked, blocked  # nothing outside was even asked for
    assert not console_errors, console_errors  # no CSP violation, no script error
    assert proc.poll() is None
