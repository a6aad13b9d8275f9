"""The dashboard in a real browser: headless Chromium driven by Selenium, against
`notifyq serve --web-port` (a dispatcher and the dashboard in one process).

It opens the overview, sees a job enqueued by SQL appear without a reload, retries a
dead job from its page and sees it succeed, and saves a screenshot of every page at a
desktop and a phone width in build/screenshots/ (or $NOTIFYQ_SCREENSHOTS).

Needs Debian's chromium and chromium-driver (.ci/run installs them when missing) and
selenium (the test extra); skipped, saying which is missing, without them.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import REPO, query, serve_process
from tests.test_cli_usage import free_port

webdriver = pytest.importorskip(
    "selenium.webdriver", reason="selenium is not installed (pip install -e '.[test]')"
)
from selenium.webdriver.common.by import By  # noqa: E402 - after the skip above
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402 - after the skip above

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver") or shutil.which("chromium-driver")
if CHROMIUM is None or DRIVER is None:
    pytest.skip(
        "headless Chromium is not installed (apt-get install chromium chromium-driver; "
        ".ci/run installs them)",
        allow_module_level=True,
    )

SHOTS = Path(os.environ.get("NOTIFYQ_SCREENSHOTS", REPO / "build" / "screenshots"))
WIDTHS = {"desktop": (1280, 900), "phone": (390, 844)}


@pytest.fixture
def browser() -> Iterator[Any]:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(DRIVER))
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def status(dsn: str, job: int) -> str:
    return str(query(dsn, "SELECT status FROM notifyq.jobs WHERE id = %s", job)[0][0])


def test_the_overview_updates_live_and_a_dead_job_is_retried(
    dsn: str, browser: Any, tmp_path: Path
) -> None:
    (dead,) = query(
        dsn,
        "INSERT INTO notifyq.jobs (task, payload, status, attempts, max_attempts, last_error,"
        " started_at, finished_at) VALUES ('hello.greet', '{\"name\": \"Ada\"}', 'dead', 1, 1,"
        " 'Traceback (most recent call last):\nRuntimeError: the first try failed', now(), now())"
        " RETURNING id",
    )
    job = int(dead[0])
    query(
        dsn,
        "INSERT INTO notifyq.periodic (name, task, schedule) VALUES ('nightly', 'hello.greet',"
        " '0 3 * * *')",
    )
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "serve.log"
    with serve_process(dsn, "--web-port", str(port), app="examples.hello:app", log=log) as proc:
        deadline = time.monotonic() + 20
        while True:
            try:
                if httpx.get(f"{base}/dispatchers", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        wait = WebDriverWait(browser, 20)

        browser.set_window_size(*WIDTHS["desktop"])
        browser.get(f"{base}/")
        wait.until(lambda d: "on" in d.find_element(By.ID, "status").get_attribute("class"))
        browser.execute_script("window.notReloaded = true;")
        query(dsn, "INSERT INTO notifyq.jobs (task, queue) VALUES ('report', 'browser')")
        wait.until(lambda d: "browser" in d.find_element(By.ID, "live").text)
        assert browser.execute_script("return window.notReloaded") is True

        browser.get(f"{base}/jobs/{job}")
        browser.find_element(By.XPATH, "//button[text()='Retry']").click()
        wait.until(lambda d: "done=retry" in d.current_url)

        def succeeded(d: Any) -> bool:
            d.refresh()
            return "succeeded" in d.find_element(By.CSS_SELECTOR, "dl.fields").text

        wait.until(succeeded)
        assert status(dsn, job) == "succeeded"

        SHOTS.mkdir(parents=True, exist_ok=True)
        pages = {
            "overview": "/",
            "jobs": "/jobs",
            "job": f"/jobs/{job}",
            "dispatchers": "/dispatchers",
            "schedules": "/schedules",
            "purge": "/purge",
        }
        for width, size in WIDTHS.items():
            browser.set_window_size(*size)
            for name, path in pages.items():
                browser.get(base + path)
                wait.until(lambda d: d.find_element(By.TAG_NAME, "h1").text)
                shot = SHOTS / f"{name}-{width}.png"
                assert browser.save_screenshot(str(shot)), shot
                assert shot.stat().st_size > 1000
        # Usable on a phone: the page itself never scrolls sideways (tables scroll in
        # their own box).
        browser.get(f"{base}/")
        wide = browser.execute_script(
            "return document.documentElement.scrollWidth > window.innerWidth + 1"
        )
        assert not wide
