"""The dashboard page in headless Chromium against a live broker: a node appears, then dies.

Chromium and ChromeDriver come from Debian's packages (`chromium`, `chromium-driver`),
which `make test` installs; selenium drives them through the system ChromeDriver, so
nothing is downloaded at run time.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

from mesh.testing import free_ports, run_broker, run_node

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
HEARTBEAT_S = 1.0  # the node's default heartbeat interval
LIVENESS_S = 3 * HEARTBEAT_S  # a node silent this long is dead
PAGE_DELAY_S = 0.5 + 1.0  # the monitor's snapshot period plus the page's poll period

pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).exists() or not Path(CHROMEDRIVER).exists(),
    reason="needs Debian's chromium and chromium-driver (`make test` installs them)",
)


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[webdriver.Chrome]:
    """Headless Chromium with a fresh profile and no background network traffic."""
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--window-size=1440,1000",
                 f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()


def node_state(driver: webdriver.Chrome, name: str) -> str | None:
    """The state the page shows for node `name`, or None while it has no row."""
    try:
        rows = driver.find_elements(By.CSS_SELECTOR, f'tr[data-node="{name}"]')
        return rows[0].get_attribute("data-state") if rows else None
    except WebDriverException:
        return None  # the row was replaced between finding and reading it


def wait_for_state(driver: webdriver.Chrome, name: str, state: str, timeout: float) -> float:
    """Seconds until the page shows `name` in `state`; fails after `timeout`."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if node_state(driver, name) == state:
            return time.monotonic() - start
        time.sleep(0.05)
    raise AssertionError(f"node {name!r} not {state} on the page within {timeout} s "
                         f"(shows {node_state(driver, name)!r})")


def test_the_page_shows_a_node_appear_and_turn_dead_within_its_liveness_window(browser, tmp_path: Path):
    """A live page sees a node register, then shows it dead after SIGKILL, with no reload."""
    token_file = tmp_path / "monitor.token"
    token_file.write_text("browser-test-token\n")
    port = free_ports()[0]
    with run_broker("tcp://127.0.0.1:*", "tcp://127.0.0.1:*", "--monitor", f"127.0.0.1:{port}",
                    "--monitor-token-file", str(token_file)) as broker:
        base = broker.process.wait_for(r"monitor (http://\S+)").group(1)
        browser.get(f"{base}/#token=browser-test-token")
        browser.execute_script("window.loadedOnce = true")  # gone if the page ever reloads
        assert browser.find_elements(By.ID, "members"), "the page has no members table"

        with run_node("echo", broker) as node:
            wait_for_state(browser, "echo", "up", timeout=15.0)
            assert browser.find_element(By.ID, "health").text == "live"
            node.popen.kill()
            killed = time.monotonic()
            wait_for_state(browser, "echo", "dead", timeout=LIVENESS_S + PAGE_DELAY_S + 5.0)
            elapsed = time.monotonic() - killed

        assert elapsed <= LIVENESS_S + PAGE_DELAY_S + 1.0, f"dead shown {elapsed:.2f} s after SIGKILL"
        assert browser.execute_script("return window.loadedOnce") is True, "the page reloaded"
        assert browser.find_element(By.ID, "msg").text == "", "the page reported an error"
