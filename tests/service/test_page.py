"""The web page end to end in a real browser: Debian's headless Chromium driven by Playwright, against the
real service (see conftest.py), as a radiologist and an annotator would use it."""

from __future__ import annotations

import csv
import io
import shutil

import pytest

from cbmir.irma import IrmaCode
from tests.service.conftest import TOKEN

CHROMIUM = shutil.which("chromium")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="Debian's chromium package is not installed (apt-get install chromium)"
)
# Without the background-networking flags Chromium keeps calling Google's hosts, which this network refuses.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, service):
    """A fresh page (new session storage) on the service, with errors of the page's own script collected."""
    context = browser.new_context(viewport={"width": 1920, "height": 1080}, accept_downloads=True)
    page = context.new_page()
    page.script_errors = []
    page.on("pageerror", lambda error: page.script_errors.append(str(error)))
    page.goto(service.url)
    yield page
    assert page.script_errors == []
    context.close()


def enter_token(page, token: str = TOKEN) -> None:
    page.locator("#token-dialog").wait_for()
    page.fill("#token-input", token)
    page.click("#token-submit")


def neighbour_codes(page) -> list[str]:
    return page.eval_on_selector_all("#neighbours .neighbour", "cards => cards.map(card => card.dataset.code)")


def wait_for_grid(page) -> None:
    """Until the search has answered and the grid shows neighbours whose thumbnails really loaded."""
    page.locator("#busy").wait_for(state="hidden")
    page.locator("#neighbours .neighbour img[src^='blob:']").first.wait_for()
    page.wait_for_function("() => [...document.querySelectorAll('#neighbours .neighbour img')]"
                           ".every(img => img.complete && img.naturalWidth > 0)")


def test_search_by_upload_filter_and_click_through(page, service):
    enter_token(page)
    query = sorted((service.archive / "images").glob("synthetic-hand-*.png"))[0]
    page.set_input_files("#file-input", str(query))
    wait_for_grid(page)
    predicted = page.locator("#prediction .code").inner_text().split()[0]
    IrmaCode.parse(predicted)
    assert page.locator("#prediction table.axes tr").count() == 4
    before = neighbour_codes(page)
    assert len(before) == 10

    skull = next(code for code in page.eval_on_selector_all("#anatomy-filter option", "o => o.map(x => x.value)")
                 if code == "2")
    page.select_option("#anatomy-filter", skull)
    page.wait_for_function("() => [...document.querySelectorAll('#neighbours .neighbour')]"
                           ".every(card => card.dataset.code.split('-')[2].startsWith('2'))")
    wait_for_grid(page)
    after = neighbour_codes(page)
    assert after and after != before
    assert all(IrmaCode.parse(code)["anatomical"].startswith("2") for code in after)

    page.select_option("#anatomy-filter", "")
    wait_for_grid(page)
    page.locator("#neighbours .neighbour").nth(2).click()
    page.locator("#results-title", has_text="Similar to").wait_for()
    wait_for_grid(page)


def test_a_wrong_token_is_refused_visibly_and_asked_again(page):
    enter_token(page, "not-the-token-0123456789")
    page.locator("#token-reason", has_text="not accepted").wait_for()
    assert page.locator("#token-dialog").is_visible()
    enter_token(page)
    page.locator("#status", has_text="images").wait_for()


def test_a_file_that_is_not_a_radiograph_shows_the_reason(page, tmp_path):
    enter_token(page)
    text = tmp_path / "report.png"
    text.write_text("not an image")
    page.set_input_files("#file-input", str(text))
    page.locator("#message", has_text="cannot read report.png").wait_for()


def test_annotate_a_batch_correct_one_and_export_csv(page, service, tmp_path):
    enter_token(page)
    page.click("#tab-annotate")
    skulls = sorted((service.archive / "images").glob("synthetic-skull-*.png"))[:3]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n")
    page.set_input_files("#annotate-input", [str(path) for path in skulls] + [str(broken)])
    page.locator("#annotate-count", has_text="4 / 4 done, 1 failed").wait_for()
    assert page.locator("#annotate-failed li", has_text="broken.png").count() == 1
    rows = page.locator("#annotate-table tbody tr")
    assert rows.count() == 3

    first = rows.nth(0)
    proposed = first.locator("code").inner_text()
    correction = next(code for code in ("1121-120-200-000", "1121-120-500-000") if code != proposed)
    first.locator(".code-input").fill(correction)
    first.locator("button.accept").click()
    first.locator(".status-cell", has_text="corrected").wait_for()
    second = rows.nth(1)
    second.locator(".code-input").fill("1121-12*-200-000")
    second.locator("button.accept").click()
    second.locator(".status-cell", has_text="complete").wait_for()  # '*' is refused with the reason

    with page.expect_download() as download:
        page.click("#export-csv")
    exported = list(csv.DictReader(io.StringIO(download.value.path().read_text())))
    assert list(exported[0]) == ["id", "name", "proposed", "confidence", "true_code", "status", "words"]
    assert exported[0]["true_code"] == correction and exported[0]["status"] == "corrected"


def test_the_api_docs_render_without_the_internet(page, service):
    page.goto(f"{service.url}/docs")
    page.locator(".swagger-ui .opblock-summary-path", has_text="/v1/search").first.wait_for()
