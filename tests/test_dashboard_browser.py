"""The dashboard in a real headless Chromium (Debian's chromium and chromium-driver, through Selenium): search as
you type, open a feature, and find tinted tokens with their values, the histogram, the labels with scores and
the two snippet sets on the page; a label holding HTML shows as text. Screenshots go to the test's tmp_path."""
import re
import shutil

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.ui import Select, WebDriverWait

from tests.api_catalog import LABELS, WRITE_TOKEN, build_catalog, drop_catalog, drop_queue, server, worker

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-quic",
         "--no-first-run", "--disable-component-update", "--disable-sync", "--window-size=1200,1600"]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dash")
    cat = build_catalog(tmp)
    try:
        with server(tmp / "serve.log", INTERP_API_TOKEN=WRITE_TOKEN) as base:
            yield base, cat
    finally:
        drop_catalog(cat)
        drop_queue()


@pytest.fixture
def browser(tmp_path):
    assert shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER), "scripts/setup.sh installs chromium"
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in FLAGS + [f"--user-data-dir={tmp_path / 'profile'}"]:
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    try:
        yield driver
    finally:
        driver.quit()


def wait(driver, cond, timeout=20):
    return WebDriverWait(driver, timeout).until(cond)


def tint_alpha(token) -> float:
    """The alpha of a token's orange background as Chromium computed it (0 when untinted)."""
    m = re.fullmatch(r"rgba?\((\d+), (\d+), (\d+)(?:, ([\d.]+))?\)", token.value_of_css_property("background-color"))
    assert m, token.value_of_css_property("background-color")
    if m.group(1, 2, 3) != ("255", "128", "0"):
        return 0.0
    return float(m.group(4)) if m.group(4) is not None else 1.0


def check_feature_page(driver, label: str) -> None:
    """Tinted tokens with their value on hover, the histogram's bars, the label with scores, both sets."""
    wait(driver, EC.presence_of_element_located((By.CSS_SELECTOR, "svg.hist")))
    bars = driver.find_elements(By.CSS_SELECTOR, "svg.hist rect")
    assert len(bars) == 50 and any(float(b.get_attribute("height")) > 0 for b in bars)
    tinted = driver.find_elements(By.CSS_SELECTOR, ".snippet .tok.on")
    assert tinted and all(tint_alpha(t) > 0 for t in tinted[:20])
    assert all(float(t.get_attribute("title")) > 0 for t in tinted[:20])
    plain = driver.find_elements(By.CSS_SELECTOR, ".snippet .tok:not(.on)")
    assert plain and all(float(t.get_attribute("title")) == 0 and tint_alpha(t) == 0 for t in plain[:20])
    labels = driver.find_element(By.CSS_SELECTOR, "table.labels").text
    assert label in labels and "embedding" in labels
    for split in ("explain", "score"):
        assert driver.find_elements(By.CSS_SELECTOR, f".set-{split} .snippet")
    assert "density" in driver.find_element(By.CSS_SELECTOR, ".stats").text


def test_search_then_open_a_feature(site, browser, tmp_path):
    base, cat = site
    browser.get(base + "/")
    box = browser.find_element(By.ID, "q")
    box.send_keys("numbers dig")
    # the server's first search loads MiniLM for the semantic arm: slow on a busy 2-core machine
    hit = wait(browser, EC.presence_of_element_located(
        (By.XPATH, f"//a[@class='hit'][contains(., '{cat.name} #{cat.labelled[0]}')][contains(., '{LABELS[0]}')]")),
        timeout=120)
    hit.click()
    wait(browser, EC.url_contains(f"/features/{cat.labelled[0]}"))
    check_feature_page(browser, LABELS[0])
    assert "simulation 0.420" in browser.find_element(By.CSS_SELECTOR, "table.labels").text
    browser.save_screenshot(str(tmp_path / "feature.png"))
    assert (tmp_path / "feature.png").stat().st_size > 10_000


def test_feature_by_number_and_html_in_a_label_shows_as_text(site, browser, tmp_path):
    base, cat = site
    browser.get(base + "/")
    form = browser.find_element(By.CSS_SELECTOR, f"form.goto[data-sae='{cat.name}']")
    form.find_element(By.NAME, "idx").send_keys(str(cat.labelled[2]))
    form.find_element(By.TAG_NAME, "button").click()
    wait(browser, EC.url_contains(f"/features/{cat.labelled[2]}"))
    check_feature_page(browser, LABELS[2])
    assert not browser.find_elements(By.CSS_SELECTOR, "table.labels script")
    browser.save_screenshot(str(tmp_path / "feature-by-number.png"))


def test_jobs_page_queues_a_job_and_shows_its_progress_live(site, browser, tmp_path):
    base, cat = site
    browser.get(base + "/login")
    form = browser.find_element(By.ID, "login")
    form.find_element(By.NAME, "token").send_keys(WRITE_TOKEN)
    form.find_element(By.TAG_NAME, "button").click()
    wait(browser, EC.text_to_be_present_in_element((By.ID, "saved"), "a token is saved"))
    with worker(tmp_path / "worker.log"):
        browser.get(base + "/ui/jobs")
        browser.execute_script("window.notReloaded = true")
        form = browser.find_element(By.ID, "newjob")
        Select(form.find_element(By.NAME, "sae")).select_by_visible_text(cat.name)
        form.find_element(By.NAME, "features").send_keys("0:8")
        form.find_element(By.TAG_NAME, "button").click()
        mine = (By.XPATH, f"//div[@class='job'][contains(., '{cat.name}')]")     # the catalog is this test's own
        wait(browser, EC.presence_of_element_located(mine))
        assert browser.find_element(By.ID, "joberror").text == ""
        wait(browser, EC.text_to_be_present_in_element(mine, "· done ·"), timeout=180)
    card = browser.find_element(*mine)
    assert "8/8" in card.text and browser.execute_script("return window.notReloaded") is True
    bar = card.find_element(By.CSS_SELECTOR, ".bar > div")
    assert re.fullmatch(r"width: 100(\.0)?%;", bar.get_attribute("style"))
    browser.save_screenshot(str(tmp_path / "jobs.png"))


def test_api_docs_render_without_a_cdn(site, browser, tmp_path):
    """/docs (Swagger UI) runs from files the server itself serves: nothing is fetched from elsewhere."""
    base, _ = site
    browser.get(base + "/docs")
    paths = wait(browser, lambda d: [e.text for e in d.find_elements(By.CSS_SELECTOR, ".opblock-summary-path")])
    assert {"/saes", "/features", "/jobs/{job_id}/cancel"} <= set(paths)
    fetched = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert fetched and all(u.startswith(base) for u in fetched), fetched
    browser.save_screenshot(str(tmp_path / "docs.png"))
