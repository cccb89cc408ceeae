"""The page at /: served with everything it needs from this origin, and working in a real headless Chromium
(upload, labels, mask, member votes, the live latency chart). The screenshot is written to the test's temporary
directory, ui.png (pytest keeps the last few runs' under its base temporary directory; `--basetemp=DIR` picks it)."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, BrowserContext, ConsoleMessage, Page, expect, sync_playwright

from app.settings import Settings
from bench.service import png_bytes
from ensemble_contract.manifest import Manifest
from ensemble_contract.modes import Mode
from tests.support import LiveServer, live_server

CHROMIUM = Path("/usr/bin/chromium")
# Headless, and quiet: the machine may have no network, and Chromium's background services would try to reach out.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT_MS = 30_000

# Counts, per legend entry, the chart's opaque pixels of that entry's colour (the lines and their points).
COUNT_CHART_PIXELS = """
canvas => {
  const { data } = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height);
  const counts = {};
  for (const item of document.querySelectorAll("#legend li")) {
    const rgb = [1, 3, 5].map((i) => parseInt(item.dataset.colour.slice(i, i + 2), 16));
    let n = 0;
    for (let i = 0; i < data.length; i += 4) {
      const distance = Math.abs(data[i] - rgb[0]) + Math.abs(data[i + 1] - rgb[1]) + Math.abs(data[i + 2] - rgb[2]);
      if (data[i + 3] > 200 && distance < 30) n++;
    }
    counts[item.dataset.mode] = n;
  }
  return counts;
}
"""
# Every URL the document refers to, resolved.
REFERENCED_URLS = """
() => [...document.querySelectorAll("[src], [href]")]
  .map((e) => new URL(e.getAttribute("src") ?? e.getAttribute("href"), location.href).href)
"""


def test_page_and_static_files_are_served_with_their_types(client: httpx.Client) -> None:
    page = client.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assert '<script src="static/app.js"' in page.text
    for name, media_type in [
        ("app.js", "text/javascript; charset=utf-8"),
        ("style.css", "text/css; charset=utf-8"),
        ("favicon.svg", "image/svg+xml"),
    ]:
        response = client.get(f"/static/{name}")
        assert response.status_code == 200, name
        assert response.headers["content-type"] == media_type
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.content
    for name in ("index.html", "missing.js", "__init__.py"):
        missing = client.get(f"/static/{name}")
        assert missing.status_code == 404
        assert missing.json()["error"]["code"] == "not_found"


def test_the_page_is_not_part_of_the_api_schema(client: httpx.Client) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert "/" not in paths
    assert not [path for path in paths if path.startswith("/static")]


@dataclass
class Visit:
    """A fresh browser page, with what it logged and requested."""

    page: Page
    console_errors: list[str] = field(default_factory=list)
    requested: list[str] = field(default_factory=list)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        pytest.skip(f"no Chromium at {CHROMIUM} to test the page with (Debian: apt-get install chromium)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


@pytest.fixture
def open_page(browser: Browser) -> Iterator[Callable[[str], Visit]]:
    """Opens a URL in a fresh browser context, recording what the page logs and requests."""
    contexts: list[BrowserContext] = []

    def open_(url: str) -> Visit:
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        contexts.append(context)
        context.set_default_timeout(TIMEOUT_MS)
        visit = Visit(context.new_page())

        def on_console(message: ConsoleMessage) -> None:
            if message.type == "error":
                visit.console_errors.append(message.text)

        visit.page.on("console", on_console)
        visit.page.on("pageerror", lambda error: visit.console_errors.append(str(error)))
        visit.page.on("request", lambda request: visit.requested.append(request.url))
        visit.page.goto(url)
        return visit

    yield open_
    for context in contexts:
        context.close()


@pytest.fixture
def visit(open_page: Callable[[str], Visit], server: LiveServer) -> Visit:
    return open_page(f"{server.url}/")


def test_upload_shows_labels_mask_and_votes_and_the_chart_follows_every_mode(
    visit: Visit, server: LiveServer, manifest: Manifest, tmp_path: Path
) -> None:
    page = visit.page
    expect(page.locator("#model")).to_contain_text(manifest.name)
    picture = tmp_path / "picture.png"
    picture.write_bytes(png_bytes(seed=3))

    page.set_input_files("#file", picture)

    labels = page.locator("#labels tbody tr")
    expect(labels).to_have_count(len(manifest.image.labels))
    assert labels.locator("th").all_inner_texts() == list(manifest.image.labels)
    for text in labels.locator("td:last-child").all_inner_texts():
        assert text in {"present", "absent"}
    expect(page.locator("#image")).to_be_visible()
    mask = page.locator("#mask")
    expect(mask).to_be_visible()
    assert mask.evaluate("c => [c.width, c.height]") == [manifest.image.width, manifest.image.height]
    assert mask.evaluate("c => getComputedStyle(c).imageRendering") == "pixelated"
    image_box, mask_box = page.locator("#image").bounding_box(), mask.bounding_box()
    assert image_box and mask_box
    assert (mask_box["width"], mask_box["height"]) == pytest.approx((image_box["width"], image_box["height"]), abs=1)
    members = page.locator("#members tbody tr")
    expect(members).to_have_count(len(manifest.members))
    assert [row.get_attribute("data-member") for row in members.all()] == [m.name for m in manifest.members]
    expect(page.locator("#timings")).to_contain_text("inference")
    expect(page.locator("#error")).to_be_hidden()

    chart = page.locator("#chart")
    for _ in range(3):  # modes whose latencies coincide hide one another's lines; more requests part them
        page.click("#burst")  # 20 requests in compare mode: the modes in turn
        expect(page.locator("#burst")).to_be_enabled(timeout=120_000)
        expect(page.locator("#progress")).to_have_text("20 requests sent")
        expect(chart).to_have_attribute("data-drawn", " ".join(Mode))
        points = chart.get_attribute("data-points")
        expect(chart).not_to_have_attribute("data-points", points or "")  # drawn again since
        drawn = chart.evaluate(COUNT_CHART_PIXELS)
        if all(drawn.values()):
            break
    assert set(drawn) == set(Mode)
    assert all(pixels > 0 for pixels in drawn.values()), f"chart pixels per mode colour: {drawn}"
    for mode in Mode:
        legend = page.locator(f'#legend li[data-mode="{mode}"]')
        expect(legend).to_contain_text(f"{mode} ")
        assert int(legend.get_attribute("data-requests") or 0) > 0
        expect(legend).to_contain_text(f"{legend.get_attribute('data-requests')} requests")
        expect(legend).to_contain_text("queue p50 ")
        # the mean batch of the window (other tests' concurrent requests on the shared server may be in it)
        expect(legend).to_contain_text(re.compile(r"batch \d+\.\d"))

    screenshot = page.screenshot(path=tmp_path / "ui.png", full_page=True)
    assert screenshot.startswith(b"\x89PNG") and (tmp_path / "ui.png").read_bytes() == screenshot

    assert visit.console_errors == []
    for url in page.evaluate(REFERENCED_URLS):
        assert url.startswith(f"{server.url}/") or url.startswith(f"blob:{server.url}/"), url
    for url in visit.requested:
        assert url.startswith((f"{server.url}/", f"blob:{server.url}/", "data:")), url


def test_api_errors_are_shown_on_the_page(visit: Visit, tmp_path: Path) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a picture at all")

    visit.page.set_input_files("#file", broken)

    error = visit.page.locator("#error")
    expect(error).to_be_visible()
    expect(error).to_contain_text("400 bad_image: the body is not a PNG, JPEG, WebP or BMP image")
    expect(visit.page.locator("#result")).to_be_hidden()
    # The browser itself logs the failed request; nothing else may fail.
    assert [text for text in visit.console_errors if "status of 400" not in text] == []


def test_the_page_asks_for_the_api_key_when_the_service_needs_one(
    open_page: Callable[[str], Visit], model_dir: Path, manifest: Manifest, tmp_path: Path
) -> None:
    key = "page-test-key-0123456789"
    picture = tmp_path / "picture.png"
    picture.write_bytes(png_bytes())
    with live_server(Settings(model_dir=model_dir, api_key=key)) as server:
        visit = open_page(f"{server.url}/")
        page = visit.page
        expect(page.locator("#key-field")).to_be_hidden()

        page.set_input_files("#file", picture)
        expect(page.locator("#error")).to_contain_text("401 unauthorized")
        expect(page.locator("#key-field")).to_be_visible()

        page.fill("#api-key", key)
        page.click("#again")
        expect(page.locator("#labels tbody tr")).to_have_count(len(manifest.image.labels))
        expect(page.locator("#error")).to_be_hidden()
        assert [text for text in visit.console_errors if "status of 401" not in text] == []


def test_a_tensor_model_gets_the_chart_and_a_pointer_to_v2_instead_of_the_image_form(
    open_page: Callable[[str], Visit], tabular_dir: Path
) -> None:
    with live_server(Settings(model_dir=tabular_dir)) as server:
        visit = open_page(f"{server.url}/")
        page = visit.page
        expect(page.locator("#tensors-only")).to_be_visible()
        expect(page.locator("#v2-path")).to_have_text("POST /v2/models/tabular/infer")
        expect(page.locator("#upload")).to_be_hidden()
        expect(page.locator("#legend li")).to_have_count(len(Mode))  # every mode, int8 included
        assert visit.console_errors == []


def test_a_classifier_ensemble_answers_its_top_labels_on_the_page(
    open_page: Callable[[str], Visit], vision_dir: Path, tmp_path: Path
) -> None:
    picture = tmp_path / "picture.png"
    picture.write_bytes(png_bytes())
    with live_server(Settings(model_dir=vision_dir)) as server:
        visit = open_page(f"{server.url}/")
        page = visit.page
        expect(page.locator("#tensors-only")).to_be_hidden()
        page.set_input_files("#file", picture)
        expect(page.locator("#labels tbody tr")).to_have_count(5)  # a classifier answers its top five
        expect(page.locator("#labels tbody tr.present")).to_have_count(1)
        expect(page.locator("#members tbody tr")).to_have_count(2)
        assert visit.console_errors == []


def test_the_page_ranks_what_auto_measured(open_page: Callable[[str], Visit], model_dir: Path) -> None:
    settings = Settings(model_dir=model_dir, default_mode="auto", auto_budget_s=3, auto_window_ms=30)
    with live_server(settings) as server:
        auto = server.dataplane.model.auto
        assert auto is not None
        visit = open_page(f"{server.url}/")
        page = visit.page
        expect(page.locator("#auto")).to_be_visible()
        rows = page.locator("#auto-ranking tbody tr")
        expect(rows).to_have_count(len(auto.candidates))
        expect(rows.first).to_have_attribute("data-mode", auto.mode)
        expect(rows.first).to_have_attribute("data-layout", auto.layout)
        expect(rows.first).to_have_attribute("data-batching", str(auto.batching_rows))
        batched = [c for c in auto.candidates if c.batching_rows > 1]
        assert batched  # the test models batch: auto timed batching too
        expect(
            page.locator(f'#auto-ranking tbody tr[data-batching="{batched[0].batching_rows}"]').first
        ).to_contain_text(f"{batched[0].batching_rows} (")
        expect(page.locator("#auto-reason")).to_contain_text(auto.reason)
        assert visit.console_errors == []
