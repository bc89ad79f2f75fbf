"""The dashboard in a real browser: headless Chromium (Debian's chromium + chromium-driver, driven by selenium).

Offline: the page opened from disk (file://) lists the latents chat-only first by −log ν_ε, shows a latent's
examples highlighted token by token, with no console error; HTML in the corpus shows as characters and
never runs. Online: the app served by uvicorn (in a thread, on a free port) answers a prompt typed into the
page and an intervention.
"""

from __future__ import annotations

import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import uvicorn
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait
from test_dashboard_offline import IMAGE, SCRIPT, build
from test_dashboard_server import online_session

from crosscoder_pl.config import ServerSettings
from crosscoder_pl.dashboard.offline import read_data_file
from crosscoder_pl.dashboard.online import Prompt
from crosscoder_pl.dashboard.server import create_app

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None or DRIVER is None,
    reason="needs Debian's chromium and chromium-driver: apt-get install -y chromium chromium-driver "
    "(.ci/run installs them)",
)
WAIT_S = 30


@pytest.fixture(scope="module")
def driver() -> Iterator[webdriver.Chrome]:
    options = Options()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--window-size=1400,1000", "--disable-extensions"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    chrome = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield chrome
    chrome.quit()


def console_errors(chrome: webdriver.Chrome) -> list[dict]:
    return [entry for entry in chrome.get_log("browser") if entry["level"] == "SEVERE"]


def wait_ready(chrome: webdriver.Chrome) -> None:
    WebDriverWait(chrome, WAIT_S).until(lambda c: c.execute_script("return document.body.dataset.ready === 'true'"))


def highlighted(chrome: webdriver.Chrome, selector: str) -> list:
    """Token spans under ``selector`` with a positive activation and a background colour."""
    return [
        span for span in chrome.find_elements(By.CSS_SELECTOR, selector + " .tok")
        if float(span.get_attribute("data-act")) > 0 and "rgba" in (span.get_attribute("style") or "")
    ]


def test_offline_page_from_disk(driver: webdriver.Chrome, tmp_path: Path) -> None:
    facts = build(tmp_path / "artifact")
    page = tmp_path / "artifact" / "dashboard" / "index.html"
    driver.get(page.as_uri())
    wait_ready(driver)
    rows = driver.find_elements(By.CSS_SELECTOR, "#latent-table tbody tr")
    assert [int(r.get_attribute("data-latent")) for r in rows[:3]] == facts.chat_only_order
    assert "40 of 40 latents" in driver.find_element(By.ID, "table-count").text

    rows[0].click()  # the most base-useless chat-only latent
    WebDriverWait(driver, WAIT_S).until(lambda c: c.find_elements(By.CSS_SELECTOR, "#examples .example"))
    assert driver.find_element(By.ID, "latent-title").text.startswith(f"Latent {facts.chat_only_order[0]}")
    assert highlighted(driver, ".examples-web") and highlighted(driver, ".examples-chat")
    assert {e.text for e in driver.find_elements(By.CSS_SELECTOR, ".examples-chat .turn .role")} >= {"USER"}

    # A latent whose web examples hold the words that decode to HTML: shown as characters, never run.
    vocab = read_data_file(page.parent / "data" / "vocab.js")[1]
    injected = next(
        record["latent"]
        for index in range(3)
        for record in read_data_file(page.parent / "data" / f"shard-{index:05d}.js")[1]["latents"]
        if any({SCRIPT, IMAGE} <= {vocab[str(t)] for t in e["tokens"]} for e in record["examples"]["web"])
    )
    driver.execute_script(f"location.hash = '#/latent/{injected}'")
    title = f"Latent {injected} "
    WebDriverWait(driver, WAIT_S).until(lambda c: c.find_element(By.ID, "latent-title").text.startswith(title))
    text = driver.find_element(By.CSS_SELECTOR, ".examples-web").text
    assert SCRIPT in text and IMAGE in text
    time.sleep(0.2)  # let a would-be onerror fire
    assert driver.execute_script("return window.__pwned === undefined")
    assert driver.execute_script("return document.querySelector('#examples script, #examples img') === null")
    assert console_errors(driver) == []


@pytest.fixture(scope="module")
def server(tiny_run: Path) -> Iterator[SimpleNamespace]:
    """The online app on a free port of 127.0.0.1, served by uvicorn in a thread."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    session = online_session(tiny_run, ServerSettings())  # the default limits
    app = create_app(session, tiny_run / "dashboard")
    instance = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=instance.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + WAIT_S
    while not instance.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert instance.started, "uvicorn did not start"
    yield SimpleNamespace(url=f"http://127.0.0.1:{port}/", session=session)
    instance.should_exit = True
    thread.join(timeout=WAIT_S)


def test_online_prompt_and_intervention(driver: webdriver.Chrome, server: SimpleNamespace) -> None:
    driver.get(server.url)
    wait_ready(driver)
    WebDriverWait(driver, WAIT_S).until(lambda c: c.find_element(By.ID, "online-panel").is_displayed())
    prompt = "Hello <script>window.__pwned = 3</script> how are you?"
    expected = server.session.encode(Prompt(messages=[{"role": "user", "content": prompt}]))
    latent = next(j for j, _ in expected["top_latents"][-1])  # fires on the last token
    driver.find_element(By.ID, "mode-chat").click()
    driver.find_element(By.CSS_SELECTOR, ".turn-editor textarea").send_keys(prompt)
    driver.find_element(By.ID, "chosen-latents").send_keys(str(latent))
    driver.find_element(By.ID, "run-prompt").click()
    WebDriverWait(driver, WAIT_S).until(lambda c: c.find_elements(By.CSS_SELECTOR, "#prompt-tokens .tok"))
    tokens = driver.find_elements(By.CSS_SELECTOR, "#prompt-tokens .tok")
    assert len(tokens) == len(expected["tokens"])
    assert "<script>window.__pwned = 3</script>" in driver.find_element(By.ID, "prompt-tokens").text.replace("↵", "")
    assert highlighted(driver, f".chosen-latent[data-latent='{latent}']")
    tokens[-1].click()
    assert f"latent {latent}" in driver.find_element(By.ID, "token-detail").text

    driver.find_element(By.ID, "iv-latent").clear()
    driver.find_element(By.ID, "iv-latent").send_keys(str(latent))
    driver.find_element(By.ID, "run-intervention").click()
    WebDriverWait(driver, WAIT_S).until(lambda c: c.find_elements(By.CSS_SELECTOR, ".next-tokens"))
    result = driver.find_element(By.ID, "intervention-result").text
    assert f"latent {latent} ablated in both models" in result and "KL(before ‖ after)" in result
    assert driver.execute_script("return window.__pwned === undefined")
    assert console_errors(driver) == []
