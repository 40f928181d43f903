"""Open a report in headless Chromium and check it the way a reader would see it.

Uses Selenium with the system's ``chromium`` and ``chromedriver`` (Debian packages
``chromium`` and ``chromium-driver``); nothing is downloaded. The check loads the page
from disk with the network and background services off, collects the browser console,
checks that the main table and every image are rendered, and saves a full-page
screenshot.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from core.errors import BenchError

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1400,1000",
)
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "chrome")

_PAGE_STATE = """
const vis = el => { if (!el) return false; const r = el.getBoundingClientRect();
  const s = getComputedStyle(el); return r.width > 0 && r.height > 0 && s.visibility !== 'hidden'
  && s.display !== 'none'; };
const table = document.querySelector(arguments[0]);
const imgs = Array.from(document.images);
return {
  title: document.title,
  table_visible: vis(table),
  table_rows: table ? table.tBodies[0].rows.length : 0,
  images: imgs.length,
  broken: imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.getAttribute('src')),
  hidden: imgs.filter(i => !vis(i)).map(i => i.getAttribute('src')),
  width: document.documentElement.scrollWidth,
  height: document.documentElement.scrollHeight,
};
"""


def find_browser() -> tuple[str, str] | None:
    """Paths of a Chromium binary and of chromedriver, or ``None`` when either is missing."""
    binary = next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)
    driver = shutil.which("chromedriver")
    return (binary, driver) if binary and driver else None


def check_report(
    html, screenshot=None, table_selector: str = "#leaderboard-table", timeout: float = 60.0
) -> dict:
    """Load ``html`` in headless Chromium; return what the page showed.

    Returns
    -------
    dict with ``console`` (console messages, each ``{"level", "message"}``),
    ``console_errors`` (the SEVERE ones), ``alert`` (text of a JavaScript dialog the page
    opened, else ``None``), ``table_visible``, ``table_rows``, ``images``,
    ``broken`` and ``hidden`` (image sources that failed to load or are invisible),
    ``screenshot`` (path) and ``ok`` (no console error, a visible table with rows, and
    every image loaded and visible).
    """
    found = find_browser()
    if found is None:
        raise BenchError(
            "headless check needs chromium and chromedriver "
            "(Debian: apt-get install chromium chromium-driver)"
        )
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        raise BenchError("headless check needs selenium (pip install selenium)") from None
    html = Path(html).resolve()
    if not html.is_file():
        raise BenchError(f"report not found: {html}")
    binary, driver_path = found
    profile = tempfile.mkdtemp(prefix="bloodbench-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    for flag in CHROMIUM_FLAGS:
        opts.add_argument(flag)
    opts.add_argument(f"--user-data-dir={profile}")
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = None
    try:
        driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=opts)
        driver.set_page_load_timeout(timeout)
        driver.get(html.as_uri())
        alert = _take_alert(driver)  # a script injected through the data would show here
        state = driver.execute_script(_PAGE_STATE, table_selector)
        alert = alert or _take_alert(driver)
        console = [
            {"level": e.get("level"), "message": e.get("message")}
            for e in driver.get_log("browser")
        ]
        shot = None
        if screenshot:
            shot = Path(screenshot)
            shot.parent.mkdir(parents=True, exist_ok=True)
            height = min(int(state["height"]), 16000)
            driver.set_window_size(1400, max(1000, height))
            driver.save_screenshot(str(shot))
            shot = str(shot)
    finally:
        if driver is not None:
            driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
    errors = [c for c in console if c["level"] == "SEVERE"]
    ok = (
        not errors
        and alert is None
        and state["table_visible"]
        and state["table_rows"] > 0
        and not state["broken"]
        and not state["hidden"]
    )
    return {
        **state,
        "console": console,
        "console_errors": errors,
        "alert": alert,
        "screenshot": shot,
        "ok": ok,
    }


def _take_alert(driver) -> str | None:
    """The text of an open JavaScript dialog (dismissed), or ``None``."""
    from selenium.common.exceptions import NoAlertPresentException

    try:
        dialog = driver.switch_to.alert
        text = dialog.text
        dialog.dismiss()
        return text
    except NoAlertPresentException:
        return None
