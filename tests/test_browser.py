"""The web page in a real browser: Debian's chromium driven by Playwright."""

import os
import shutil

import numpy as np
import pytest

from fmnist.photos import render_product_photo
from test_serve import start_server

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None and os.environ.get("FMNIST_REQUIRE_BROWSER"):
    # `make test` sets this: there the browser test must run, never skip quietly.
    raise RuntimeError("FMNIST_REQUIRE_BROWSER is set but Debian's chromium is not installed: "
                       "apt-get install chromium (make browser), or unset it to skip the browser tests")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (make test installs it)")
# Playwright's own browser download cannot work offline; launch the system browser. The flags
# keep chromium from reaching for the network at start-up (refused here, slow elsewhere).
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def page_url(catalogue_index):
    # With a catalogue index: the page shows "more like this" under each prediction.
    proc, url = start_server("--index", str(catalogue_index))
    yield url
    proc.terminate()
    proc.wait(10)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        yield b
        b.close()


def test_upload_photo_shows_label(browser, page_url, dataset, tmp_path):
    trouser = int(np.flatnonzero(dataset.test_labels.numpy() == 1)[0])
    photo = tmp_path / "trousers.jpg"
    photo.write_bytes(render_product_photo(dataset.test_images[trouser].numpy(), np.random.default_rng(1)))
    page = browser.new_page()
    external = []
    page.on("request", lambda r: external.append(r.url) if not r.url.startswith((page_url, "data:", "blob:")) else None)
    page.goto(page_url)
    page.set_input_files("#file", str(photo))
    page.wait_for_function("document.getElementById('label').textContent.includes('%')", timeout=15000)
    assert page.inner_text("#label").startswith("Trouser")
    assert page.locator("#bars li").count() == 3
    src = page.get_attribute("#preprocessed", "src")
    assert src.startswith("data:image/png;base64,")
    page.screenshot(path=str(tmp_path / "page.png"))
    assert external == []  # every asset came from the app itself
    page.close()


def test_more_like_this_under_a_prediction(browser, page_url, dataset, tmp_path):
    """A product photo of catalogue item i: under its prediction, 8 catalogue items with their
    thumbnails (served by the app, by id), the item itself first, the rest mostly its class."""
    trouser = int(np.flatnonzero(dataset.test_labels.numpy()[:300] == 1)[0])
    photo = tmp_path / "trousers.jpg"
    photo.write_bytes(render_product_photo(dataset.test_images[trouser].numpy(), np.random.default_rng(2)))
    page = browser.new_page()
    page.goto(page_url)
    page.set_input_files("#file", str(photo))
    page.wait_for_function("document.querySelectorAll('#neighbours figure').length === 8", timeout=15000)
    figs = page.locator("#neighbours figure")
    assert figs.first.get_attribute("data-id") == str(trouser)
    captions = [figs.nth(i).inner_text() for i in range(8)]
    assert sum(c.startswith("Trouser") for c in captions) >= 6, captions
    page.wait_for_function("[...document.querySelectorAll('#neighbours img')].every(i => i.complete && i.naturalWidth === 28)")
    assert "catalogue items" in page.inner_text("#similar-info")
    page.close()


def test_click_sample_strip(browser, page_url):
    page = browser.new_page()
    page.goto(page_url)
    page.wait_for_selector("#strip button")
    assert page.locator("#strip button").count() == 12
    first = page.locator("#strip button").first
    truth = first.get_attribute("data-label")
    first.click()
    page.wait_for_function("document.getElementById('label').textContent.includes('%')", timeout=15000)
    assert page.inner_text("#truth") == f"true label: {truth}"
    assert page.locator("#bars li").count() == 3
    # the model line names what is served: the shipped ensemble by its members
    page.wait_for_function("document.getElementById('model-info').textContent.startsWith('Model: ')")
    assert page.inner_text("#model-info").startswith("Model: ensemble of 3 fast (torch, "), page.inner_text("#model-info")
    page.close()


def test_bad_file_shows_error(browser, page_url, tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("not an image at all")
    page = browser.new_page()
    page.goto(page_url)
    page.set_input_files("#file", str(bad))
    page.wait_for_selector("#error:not([hidden])", timeout=15000)
    assert "not an image" in page.inner_text("#error")
    page.close()


def test_unsure_verdict_is_shown_with_its_reason(browser, page_url, tmp_path):
    """A photo with no item in it (a blank wall) comes back unsure, and the page says why."""
    from PIL import Image

    blank = tmp_path / "wall.jpg"
    Image.new("RGB", (400, 300), (236, 232, 225)).save(blank, "JPEG", quality=90)
    page = browser.new_page()
    page.goto(page_url)
    page.set_input_files("#file", str(blank))
    page.wait_for_function("document.getElementById('label').textContent.includes('%')", timeout=15000)
    assert page.inner_text("#label").startswith("Unsure")
    assert "no clear item" in page.inner_text("#reason") and "plain background" in page.inner_text("#reason")
    page.close()
