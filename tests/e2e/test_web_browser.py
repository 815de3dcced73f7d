"""The dashboard in a real browser: Debian's chromium, headless, driven by
Playwright, against a real uvicorn on loopback.

The flow a release manager follows: open the matrix, click the red cell, read
why; add a waiver with a token; see the candidate's decision flip on the
overview.  Every page is saved as a screenshot under artifacts/web/, at a
laptop width and a phone width.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from advise_fixtures import kernels, modules
from conftest import REPO, missing
from kmodgate.advise.advice import advise
from kmodgate.advise.record import record_advice
from web_fixtures import BUILD_REASON, NEW, NOW, TOKEN, Scenario, live_server, make_app

pytestmark = pytest.mark.e2e

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = REPO / "artifacts" / "web"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-dev-shm-usage"]
LAPTOP = {"width": 1366, "height": 800}
PHONE = {"width": 390, "height": 844}


@pytest.fixture
def browser() -> Iterator[object]:
    if not Path(CHROMIUM).exists():
        missing("chromium is not installed (scripts/apt-packages.txt lists it)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing("the playwright Python package is not installed")
    profile = Path(tempfile.mkdtemp(prefix="kmodgate-chromium-"))
    with sync_playwright() as p:
        # A persistent context is how Playwright takes a fresh user-data-dir of our own.
        context = p.chromium.launch_persistent_context(
            str(profile), executable_path=CHROMIUM, headless=True, args=ARGS,
            viewport=LAPTOP, java_script_enabled=False)
        try:
            yield context
        finally:
            context.close()
            shutil.rmtree(profile, ignore_errors=True)


def shot(page: object, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)  # type: ignore[attr-defined]


def test_red_cell_waiver_and_the_decision_flip(scenario: Scenario, browser: object) -> None:
    context = browser
    with live_server(make_app(scenario)) as base:
        # Nothing but loopback: a request anywhere else is a test failure.
        outside: list[str] = []
        context.route("**/*", lambda route: (  # type: ignore[attr-defined]
            route.continue_() if route.request.url.startswith(base)
            else (outside.append(route.request.url), route.abort())))
        page = context.new_page()  # type: ignore[attr-defined]

        page.goto(f"{base}/")
        candidate = page.locator(f'li.candidate[data-kernel="{NEW}"]').first
        assert "blocked" in candidate.inner_text()
        shot(page, "overview-blocked")

        page.goto(f"{base}/matrix")
        shot(page, "matrix")
        page.locator("a.cell.fail").first.click()
        page.wait_for_load_state()
        assert BUILD_REASON in page.locator(".reasons").inner_text()
        assert "<script>" in page.content().replace("&lt;", "<").replace("&gt;", ">")
        assert page.locator("script").count() == 0  # the module's "<script>" stayed text
        shot(page, "result")

        page.get_by_role("link", name="Read the log").click()
        page.fill('input[name="q"]', "error")
        page.get_by_role("button", name="Find").click()
        assert page.locator("mark").count() >= 2
        shot(page, "log")

        page.goto(f"{base}/waivers")
        form = page.locator("#add-waiver")
        form.locator('input[name="module"]').fill("openrazer-driver")
        form.locator('input[name="kernel_pattern"]').fill(NEW)
        form.locator('select[name="kind"]').select_option("build")
        form.locator('textarea[name="reason"]').fill("fixed upstream in 3.5.1, not yet packaged")
        form.locator('input[name="duration"]').fill("14d")
        form.locator('input[name="token"]').fill(TOKEN)
        form.get_by_role("button", name="Add waiver").click()
        page.wait_for_load_state()
        assert "added" in page.locator(".notice").inner_text()
        assert "fixed upstream in 3.5.1" in page.locator("table.waivers").inner_text()
        shot(page, "waivers")

        page.goto(f"{base}/")
        candidate = page.locator(f'li.candidate[data-kernel="{NEW}"]').first
        assert "allowed" in candidate.inner_text()
        shot(page, "overview-allowed")

        for name, url in (("kernel", f"/kernels/{NEW}"), ("module", "/modules/openrazer-driver"),
                          ("kernels", "/kernels"), ("modules", "/modules")):
            page.goto(base + url)
            assert page.title().endswith("kmodgate")
            shot(page, name)

        record_advice(scenario.gate.store, advise(kernels(), modules(), coverage_target=0.7),
                      modules(), NOW)
        page.goto(f"{base}/advice")
        assert "0 of 3" in page.locator("table#survival").inner_text()
        # The plots are pictures the page's policy lets load: the store's SVG, drawn.
        plots = page.locator("figure.plot img").all()
        assert len(plots) == 2
        for img in plots:
            assert img.evaluate("i => i.complete && i.naturalWidth > 0"), img.get_attribute("src")
        shot(page, "advice")

        page.set_viewport_size(PHONE)
        for name, url in (("phone-overview", "/"), ("phone-matrix", "/matrix"),
                          ("phone-kernel", f"/kernels/{NEW}"), ("phone-advice", "/advice")):
            page.goto(base + url)
            # Nothing wider than the phone but the matrix, which scrolls in its own box.
            width = page.evaluate("document.documentElement.scrollWidth")
            assert width <= PHONE["width"] + 1, name
            shot(page, name)
        assert outside == []
