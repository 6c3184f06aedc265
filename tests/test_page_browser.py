"""The page at `/` in a real headless browser (Debian's chromium driven by selenium through chromedriver), against
a `ddm serve` process on the session's trained run: fill the form, generate, see the grid decode to the images
the API gives, the routing plot, and the record's verdict after clicking Verify.

DDM_PAGE_SCREENSHOT=PATH also saves the browser's screenshot of the answered page there, and DDM_PAGE_RUN_DIR=RUN
serves that run instead (a conditional run with a router); docs/img/serve_page.png was made so, on a digits run
of `ddm run --config configs/digits.yaml`."""

import base64
import io
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
if CHROMIUM is None or CHROMEDRIVER is None:
    pytest.skip("no chromium / chromedriver on PATH (Debian: apt-get install chromium chromium-driver)",
                allow_module_level=True)
pytest.importorskip("fastapi")

import httpx
from helpers import serving
from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

from ddm.data.run import Run
from ddm.verify.signing import generate_keypair


def _png(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


@pytest.fixture(scope="module")
def run_dir(request) -> Path:
    """The run served: DDM_PAGE_RUN_DIR when set, else the session's trained run."""
    if os.environ.get("DDM_PAGE_RUN_DIR"):
        return Path(os.environ["DDM_PAGE_RUN_DIR"])
    return request.getfixturevalue("trained_run")


@pytest.fixture(scope="module")
def server(run_dir, tmp_path_factory):
    """A `ddm serve` process on 127.0.0.1 (records signed with a fresh key): its base URL."""
    key, _ = generate_keypair(tmp_path_factory.mktemp("page-key") / "key")
    with serving(run_dir, "--max-wait-ms", "0", "--key", str(key)) as base:
        yield base


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1000,1100"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def _generate(browser, form: dict[str, str], selects: dict[str, str] | None = None) -> WebDriverWait:
    """Fills the page's form (text fields `form`, drop-downs `selects`), clicks Generate and waits for the answer,
    failing on an error line; returns the wait for what follows."""
    for name, value in form.items():
        field = browser.find_element(By.ID, name)
        field.clear()
        field.send_keys(value)
    for name, value in (selects or {}).items():
        Select(browser.find_element(By.ID, name)).select_by_value(value)
    browser.find_element(By.ID, "generate").click()
    wait = WebDriverWait(browser, 120)
    wait.until(lambda d: "images in" in d.find_element(By.ID, "status").text
               or "error" in d.find_element(By.ID, "status").text)
    assert "error" not in browser.find_element(By.ID, "status").text, browser.find_element(By.ID, "status").text
    return wait


def test_the_page_generates_plots_the_routing_and_verifies_its_record(server, browser, run_dir):
    run = Run.open(run_dir)
    height, width, channels = run.image_shape
    browser.get(server + "/")
    assert "ddm serve" in browser.title

    form = {"strategy": "top1", "cfg_scale": "2", "steps": "3", "seed": "5", "n": "5"}
    wait = _generate(browser, form, {"class": "3"})

    # The grid: 5 images the browser decoded at the run's size, exactly the API's images for the same request.
    imgs = browser.find_elements(By.CSS_SELECTOR, "#images figure img")
    assert len(imgs) == 5
    wait.until(lambda d: all(d.execute_script("return arguments[0].complete", i) for i in imgs))
    decoded = [browser.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", i)
               for i in imgs]
    assert decoded == [[width, height]] * 5
    shown = np.stack([_png(i.get_attribute("src").split(",", 1)[1]) for i in imgs])
    reply = httpx.post(f"{server}/v1/images/generations", timeout=120, json={
        "strategy": "top1", "class": 3, "cfg_scale": 2.0, "steps": 3, "seed": 5, "n": 5, "arrays": True}).json()
    api = np.stack([_png(d["b64_json"]) for d in reply["data"]])
    assert shown.shape == (5, height, width) + (() if channels == 1 else (channels,))
    np.testing.assert_array_equal(shown, api)
    assert shown.std() > 0  # real pictures, not a blank placeholder

    # The routing plot: one line per expert, one point per step, the mean weights of the reply's arrays.
    lines = browser.find_elements(By.CSS_SELECTOR, "#routing polyline.expert")
    assert browser.find_element(By.ID, "routing").is_displayed()
    assert len(lines) == len(run.cluster_ids)
    weights = np.frombuffer(base64.b64decode(reply["arrays"]["weights"]["b64"]), "<f4").reshape(
        reply["arrays"]["weights"]["shape"])
    assert weights.shape[:2] == (3, 5)
    plotted = [[float(p.split(",")[1]) for p in line.get_attribute("points").split()] for line in lines]
    assert all(len(points) == 3 for points in plotted)
    # y = top + (1 - w) * (height - top - bottom) with the page's 10 and 30 px margins of a 220 px plot
    np.testing.assert_allclose(np.asarray(plotted).T, 10 + (1 - weights.mean(1)) * 180, atol=0.06)

    # The record: Verify sends it to /v1/verify and shows the verdict.
    record = browser.find_element(By.ID, "record").get_attribute("textContent")
    assert '"ddm-record/v2"' in record and '"signature"' in record
    browser.find_element(By.ID, "verify").click()
    verdict = wait.until(lambda d: d.find_element(By.ID, "verdict").get_attribute("data-honest")
                         and d.find_element(By.ID, "verdict"))
    assert verdict.get_attribute("data-honest") == "true", verdict.text
    assert verdict.text.startswith("honest (exact mode")

    if os.environ.get("DDM_PAGE_SCREENSHOT"):
        browser.save_screenshot(str(Path(os.environ["DDM_PAGE_SCREENSHOT"])))

    # A request the run refuses: its one-line reason, no images.
    browser.find_element(By.ID, "strategy").clear()
    browser.find_element(By.ID, "strategy").send_keys("bogus")
    browser.find_element(By.ID, "generate").click()
    wait.until(lambda d: d.find_element(By.ID, "status").text.startswith("error:"))
    assert "strategy" in browser.find_element(By.ID, "status").text
    assert browser.find_elements(By.CSS_SELECTOR, "#images img") == []


def test_the_page_takes_a_prompt_and_verifies_with_its_embeddings(captions_run, browser):
    """On a run conditioned on caption embeddings (with its encoder), the page's prompt field reaches the encoder:
    the grid is the API's for the same prompt, and Verify sends the record with its embeddings."""
    with serving(captions_run, "--max-wait-ms", "0") as base:
        browser.get(base + "/")
        assert browser.find_element(By.ID, "class").get_attribute("disabled") is not None
        form = {"prompt": "a thick 7 leaning right", "cfg_scale": "2", "steps": "2", "seed": "4", "n": "3"}
        wait = _generate(browser, form)
        imgs = browser.find_elements(By.CSS_SELECTOR, "#images figure img")
        shown = np.stack([_png(i.get_attribute("src").split(",", 1)[1]) for i in imgs])
        reply = httpx.post(f"{base}/v1/images/generations", timeout=120, json={
            "prompt": form["prompt"], "cfg_scale": 2.0, "steps": 2, "seed": 4, "n": 3}).json()
        np.testing.assert_array_equal(shown, np.stack([_png(d["b64_json"]) for d in reply["data"]]))

        browser.find_element(By.ID, "verify").click()
        verdict = wait.until(lambda d: d.find_element(By.ID, "verdict").get_attribute("data-honest")
                             and d.find_element(By.ID, "verdict"))
        assert verdict.get_attribute("data-honest") == "true", verdict.text
