"""The web page end to end in a real browser: Debian's headless Chromium driven by Playwright, against the
real service (see conftest.py), as a radiologist and an annotator would use it.

Set CBMIR_SCREENSHOTS to a folder to keep screenshots of the search and annotation views (1920×1080) there.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np
import pytest

from cbmir.irma import IrmaCode
from cbmir.synthetic import phantom
from tests.conftest import read_grey
from tests.service.conftest import TOKEN, VIEWER, dicom_file

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

CHROMIUM = shutil.which("chromium")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="Debian's chromium package is not installed: apt-get install chromium"
)
# Without the background-networking flags Chromium keeps calling Google's hosts, which this network refuses.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SCREENSHOTS = os.environ.get("CBMIR_SCREENSHOTS")


def chromium() -> Iterator[Browser]:
    """Debian's Chromium, driven by Playwright (for a module-scoped fixture; the PACS page test has one too)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def fresh_page(browser: Browser, url: str) -> Iterator[Page]:
    """A fresh page (new session storage) at `url`. Errors of the page's own script and anything the
    Content-Security-Policy blocked fail the test."""
    context = browser.new_context(viewport={"width": 1920, "height": 1080}, accept_downloads=True)
    page = context.new_page()
    problems = []
    page.on("pageerror", lambda error: problems.append(f"script error: {error}"))
    page.on(
        "console", lambda message: problems.append(message.text) if "Content Security Policy" in message.text else None
    )
    page.goto(url)
    yield page
    context.close()
    assert problems == []


@pytest.fixture(scope="module")
def browser():
    yield from chromium()


@pytest.fixture
def page(browser, service):
    yield from fresh_page(browser, service.url)


def enter_token(page, token: str = TOKEN) -> None:
    page.locator("#token-dialog").wait_for()
    page.fill("#token-input", token)
    page.click("#token-submit")


def neighbours(page) -> list[dict[str, str]]:
    return page.eval_on_selector_all(
        "#neighbours .neighbour",
        "cards => cards.map(card => ({id: card.dataset.id, code: card.dataset.code, "
        "name: card.querySelector('.hit-name').textContent}))",
    )


def wait_for_grid(page) -> None:
    """Until the search has answered and the grid shows neighbours whose thumbnails really loaded."""
    page.locator("#busy").wait_for(state="hidden")
    page.locator("#neighbours .neighbour").first.wait_for()
    page.wait_for_function(
        "() => [...document.querySelectorAll('#neighbours .neighbour img.picture')]"
        ".every(img => img.complete && img.naturalWidth > 0)"
    )


def assert_no_horizontal_scrolling(page) -> None:
    width, visible = page.evaluate("[document.documentElement.scrollWidth, document.documentElement.clientWidth]")
    assert width <= visible


def screenshot(page, name: str) -> None:
    if SCREENSHOTS:
        page.screenshot(path=str(Path(SCREENSHOTS) / name))


def anatomy(code: str) -> str:
    return IrmaCode.parse(code)["anatomical"]


def test_search_by_upload_filter_and_click_through(page, service):
    enter_token(page)
    query = min((service.archive / "images").glob("synthetic-hand-*.png"))
    page.set_input_files("#file-input", str(query))
    wait_for_grid(page)
    assert page.locator("#query-image").evaluate("img => img.naturalWidth") > 0  # the local preview
    IrmaCode.parse(page.locator("#prediction .code .label").inner_text())
    assert page.locator("#prediction table.axes tr").count() == 4
    # the archive's phantoms are coded, so the nearest ones lend their codes to the prediction
    assert page.locator("#prediction .blended").inner_text() == "with the known codes of 10 similar indexed images"
    before = neighbours(page)
    assert len(before) == 10
    assert all(len(score) == 5 for score in page.locator("#neighbours .score").all_inner_texts())  # 0.123
    screenshot(page, "cbmir-page-search.png")
    assert_no_horizontal_scrolling(page)

    # A top-level region other than the first neighbour's: the grid changes, and keeps to that region.
    regions = [
        value
        for value in page.eval_on_selector_all("#anatomy-filter option", "o => o.map(x => x.value)")
        if len(value) == 1
    ]
    region = next(value for value in regions if not anatomy(before[0]["code"]).startswith(value))
    page.select_option("#anatomy-filter", region)
    page.wait_for_function(
        "first => document.querySelector('#neighbours .neighbour')?.dataset.id !== first", arg=before[0]["id"]
    )
    wait_for_grid(page)
    after = neighbours(page)
    assert after and after != before
    assert all(anatomy(hit["code"]).startswith(region) for hit in after)

    page.select_option("#anatomy-filter", "")
    wait_for_grid(page)
    clicked = neighbours(page)[2]
    page.locator("#neighbours .neighbour .open").nth(2).click()
    page.locator("#results-title", has_text=f"Similar to {clicked['name']}").wait_for()
    wait_for_grid(page)
    assert neighbours(page)[0]["id"] == clicked["id"]  # the image itself comes first
    assert page.locator("#prediction").inner_text() == ""  # nothing is predicted for an indexed image

    page.set_viewport_size({"width": 1280, "height": 800})
    assert_no_horizontal_scrolling(page)


def test_a_wrong_token_is_refused_visibly_and_asked_again(page):
    enter_token(page, "not-the-token-0123456789")
    page.locator("#token-reason", has_text="not accepted").wait_for()
    assert page.locator("#token-dialog").is_visible()
    enter_token(page)
    page.locator("#status", has_text="images").wait_for()  # the refused request went again with the new token
    assert page.locator("#anatomy-filter option").count() > 1


def test_a_file_that_is_not_a_radiograph_shows_the_reason(page, tmp_path):
    enter_token(page)
    text = tmp_path / "report.png"
    text.write_text("not an image")
    page.set_input_files("#file-input", str(text))
    page.locator("#message", has_text="cannot read report.png").wait_for()
    assert page.locator("#neighbours .neighbour").count() == 0


def test_annotate_a_batch_correct_one_and_export(page, service, tmp_path):
    # New phantoms (the archive's are indexed already, and would come back as duplicates with true codes).
    rng = np.random.default_rng(2024)
    files = []
    for number in range(3):
        files.append(tmp_path / f"new-skull-{number}.png")
        cv2.imwrite(str(files[-1]), phantom("skull", rng, 160))
    notes = tmp_path / "notes.png"
    notes.write_text("a text file, whatever its name says")

    enter_token(page)
    page.click("#tab-annotate")
    page.set_input_files("#annotate-input", [str(path) for path in files] + [str(notes)])
    page.locator("#annotate-count", has_text="4 / 4 done, 1 failed").wait_for()
    assert page.locator("#annotate-failed li", has_text="notes.png: cannot read notes.png").count() == 1
    rows = page.locator("#annotate-table tbody tr")
    assert rows.count() == 3
    for row in rows.all():
        IrmaCode.parse(row.locator(".proposed").inner_text())
        assert row.locator(".status-cell").inner_text() == "pending"
    page.wait_for_function(
        "() => [...document.querySelectorAll('#annotate-table img')].every(img => img.complete && img.naturalWidth > 0)"
    )

    first, second = rows.nth(0), rows.nth(1)
    correction, region = next(
        (code, words)
        for code, words in (("1121-120-200-000", "cranium"), ("1121-120-500-000", "chest"))
        if code != first.locator(".proposed").inner_text()
    )
    first.locator(".code-input").fill(correction)
    first.locator("button.accept").click()
    first.locator(".status-cell", has_text="corrected").wait_for()
    if service.settings.irma_tables:  # the words come from the IRMA code tables in ../shared/data, when present
        assert region in first.locator(".row-note").inner_text()  # the stored code, in words
    second.locator(".code-input").fill("1121-12*-200-000")
    second.locator("button.accept").click()
    second.locator(".row-note.error", has_text="complete").wait_for()  # '*' is refused, with the reason
    assert second.locator(".status-cell").inner_text() == "pending"
    screenshot(page, "cbmir-page-annotate.png")
    assert_no_horizontal_scrolling(page)

    with page.expect_download() as download:
        page.click("#export-csv")
    exported = list(csv.DictReader(io.StringIO(download.value.path().read_text())))
    assert list(exported[0]) == ["id", "name", "proposed", "confidence", "true_code", "status", "words"]
    ids = page.eval_on_selector_all("#annotate-table tbody tr", "rows => rows.map(row => row.dataset.id)")
    assert [row["id"] for row in exported] == ids
    assert exported[0]["true_code"] == correction and exported[0]["status"] == "corrected"
    assert [row["status"] for row in exported[1:]] == ["pending", "pending"]
    with page.expect_download() as download:
        page.click("#export-json")
    assert json.loads(download.value.path().read_text())[0]["true_code"] == correction


def test_the_api_docs_render_without_the_internet(page, service):
    page.goto(f"{service.url}/docs")
    page.locator(".swagger-ui .opblock-summary-path", has_text="/v1/search").first.wait_for()


# -- the refinement tools (issue 16) --------------------------------------------------------------------


def upload_and_wait(page, path: Path) -> list[dict[str, str]]:
    enter_token(page)
    page.set_input_files("#file-input", str(path))
    wait_for_grid(page)
    return neighbours(page)


def grid_changes_from(page, before: list[dict[str, str]]) -> list[dict[str, str]]:
    page.wait_for_function(
        "ids => JSON.stringify([...document.querySelectorAll('#neighbours .neighbour')].map(c => c.dataset.id))"
        " !== JSON.stringify(ids)",
        arg=[hit["id"] for hit in before],
    )
    wait_for_grid(page)
    return neighbours(page)


def test_draw_a_region_and_search_only_it(page, service, tmp_path):
    """A hand beside a skull on one large film: the box drawn around the hand makes the grid a hand's."""
    hand = read_grey(min((service.archive / "images").glob("synthetic-hand-*.png")))
    skull = read_grey(min((service.archive / "images").glob("synthetic-skull-*.png")))
    side = 2 * max(*hand.shape, *skull.shape)
    film = np.zeros((side, 2 * side), np.uint8)
    film[10 : 10 + hand.shape[0], 20 : 20 + hand.shape[1]] = hand
    film[side - skull.shape[0] - 10 : side - 10, 2 * side - skull.shape[1] - 20 : 2 * side - 20] = skull
    query = tmp_path / "film.png"
    cv2.imwrite(str(query), film)
    before = upload_and_wait(page, query)

    box = page.locator("#query-image").bounding_box()
    scale = min(box["width"] / film.shape[1], box["height"] / film.shape[0])
    left = box["x"] + (box["width"] - film.shape[1] * scale) / 2
    top = box["y"] + (box["height"] - film.shape[0] * scale) / 2
    page.mouse.move(left + 16 * scale, top + 6 * scale)
    page.mouse.down()
    page.mouse.move(left + (24 + hand.shape[1]) * scale, top + (14 + hand.shape[0]) * scale, steps=5)
    page.mouse.up()
    page.locator("#region-text", has_text="Searching the region").wait_for()
    assert page.locator("#region-box").is_visible()
    after = grid_changes_from(page, before)
    hand_code = next(
        line.split(";")[1] for line in (service.archive / "codes.csv").read_text().splitlines() if "hand" in line
    )
    assert anatomy(after[0]["code"]) == anatomy(hand_code)
    assert "(region)" in page.locator("#results-title").inner_text()

    page.click("#region-clear")  # back to the whole film
    assert grid_changes_from(page, after) == before
    assert not page.locator("#region-box").is_visible()


def test_mark_results_and_search_again(page, service):
    before = upload_and_wait(page, phantom_path(service, "chest"))
    assert page.locator("#refine").is_disabled()
    page.locator("#neighbours .neighbour .mark-positive").nth(1).click()
    page.locator("#neighbours .neighbour .mark-negative").nth(2).focus()  # keyboard-reachable
    page.keyboard.press("Enter")
    assert (
        page.locator("#neighbours .neighbour").nth(2).locator(".mark-negative").get_attribute("aria-pressed") == "true"
    )
    page.locator("#marks-text", has_text="1 marked similar, 1 not similar").wait_for()
    page.click("#refine")
    after = grid_changes_from(page, before)
    marked = {before[1]["id"], before[2]["id"]}
    assert marked.isdisjoint(hit["id"] for hit in after) and len(after) == len(before)
    # the page sent the marks: its grid is the API's answer to the same refined search
    with service.client() as client, open(phantom_path(service, "chest"), "rb") as file:
        answer = client.post(
            "/v1/search",
            files={"file": (Path(file.name).name, file)},
            data={"k": "10", "positive": before[1]["id"], "negative": before[2]["id"]},
        ).json()
    assert [str(hit["id"]) for hit in answer["neighbours"]] == [hit["id"] for hit in after]
    assert [hit["id"] for hit in after] != [hit["id"] for hit in before if hit["id"] not in marked][: len(after)]


def phantom_path(service, kind: str) -> Path:
    return min((service.archive / "images").glob(f"synthetic-{kind}-*.png"))


def test_toggle_why_they_match(page, service):
    upload_and_wait(page, phantom_path(service, "skull"))
    page.check("#why-toggle")
    page.wait_for_function(
        "() => { const maps = [...document.querySelectorAll('#neighbours .thumb img.why')];"
        " return maps.length === document.querySelectorAll('#neighbours .neighbour').length"
        " && maps.every(map => map.complete && map.naturalWidth > 0); }"
    )
    page.locator("#neighbours .neighbour").nth(1).hover()
    page.locator("#query-why").wait_for(state="visible")
    page.uncheck("#why-toggle")
    assert page.locator("#neighbours .thumb img.why").count() == 0
    assert not page.locator("#query-why").is_visible()


def test_compare_side_by_side(page, service):
    page.set_viewport_size({"width": 1280, "height": 800})
    found = upload_and_wait(page, phantom_path(service, "hand"))
    page.locator("#neighbours .neighbour .compare").nth(1).click()
    dialog = page.locator("#compare-dialog")
    dialog.wait_for(state="visible")
    page.wait_for_function(
        "() => [...document.querySelectorAll('#compare-dialog .viewport img:not(.why)')]"
        ".every(img => img.complete && img.naturalWidth > 0)"
    )
    assert found[1]["code"] in page.locator("#caption-neighbour").inner_text()

    def transforms() -> list[str]:
        return page.eval_on_selector_all(
            "#compare-dialog .viewport img:not(.why)", "imgs => imgs.map(i => i.style.transform)"
        )

    page.click("#zoom-in")
    page.click("#zoom-in")
    zoomed = transforms()
    assert zoomed[0] == zoomed[1] and "scale(1.5625)" in zoomed[0]
    pane = page.locator("#pane-neighbour").bounding_box()
    page.mouse.move(pane["x"] + 100, pane["y"] + 100)
    page.mouse.down()
    page.mouse.move(pane["x"] + 160, pane["y"] + 130, steps=3)
    page.mouse.up()
    panned = transforms()
    assert panned[0] == panned[1] and "translate(60px, 30px)" in panned[0]  # the query pane moved with it
    page.keyboard.press("ArrowLeft")
    assert "translate(100px, 30px)" in transforms()[0]

    for slider, value in (("#window-width", "64"), ("#window-level", "100")):
        page.locator(slider).evaluate(
            "(input, value) => { input.value = value; input.dispatchEvent(new Event('input')); }", value
        )
    slope = float(page.locator("#window-level-filter feFuncR").get_attribute("slope"))
    assert slope == pytest.approx(255 / 64, rel=1e-3)
    assert_no_horizontal_scrolling(page)
    page.keyboard.press("Escape")
    dialog.wait_for(state="hidden")


# -- the PACS viewer ---------------------------------------------------------------------------------------


def test_a_case_from_dicom_links_to_the_viewer(page, service, tmp_path):
    """A case indexed from DICOM keeps its UIDs: its card (and the query's caption, and the compare view) link
    to it in the viewer, in a new tab that cannot reach back to the page; cases from other files do not."""
    data, uids = dicom_file(phantom("hand", np.random.default_rng(77), 160))
    query = tmp_path / "cr.dcm"
    query.write_bytes(data)
    expected = VIEWER.format(**uids)
    with service.client() as client:
        [item] = client.post("/v1/images", files={"files": (query.name, data)}).json()["items"]
    try:
        found = upload_and_wait(page, query)
        assert found[0]["id"] == str(item["id"])  # the case is the query itself
        links = page.locator("#neighbours .neighbour .viewer-link")
        assert links.count() == 1
        assert page.locator("#neighbours .neighbour").first.locator(".viewer-link").count() == 1
        for link in (links.first, page.locator("#query-viewer")):
            assert link.is_visible() and link.inner_text() == "Open in viewer"
            assert link.get_attribute("href") == expected
            assert link.get_attribute("target") == "_blank"
            assert link.get_attribute("rel") == "noopener noreferrer"
        screenshot(page, "cbmir-page-viewer-link.png")
        page.locator("#neighbours .neighbour .compare").first.click()
        assert page.locator("#caption-neighbour .viewer-link").get_attribute("href") == expected
    finally:
        with service.client() as client:
            client.delete(f"/v1/images/{item['id']}")
