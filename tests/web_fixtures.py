"""A real browser for the web tests: Debian's chromium, headless, with its synthetic camera.

``chromium(tmp_path)`` starts chromium through chromedriver (selenium) with a fresh profile;
locally a missing chromium, chromedriver or selenium skips, in CI (``CI=true``) it fails.
The flags keep it off the network (nothing beyond loopback is reachable here): no background
requests, no component updates, no QUIC; the fake camera and auto-granted permission stand in
for a person allowing the camera; host candidates are not hidden behind mDNS names.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from helpers import in_ci, require

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"

CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",  # as root (CI, containers)
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--use-fake-device-for-media-stream",
    "--use-fake-ui-for-media-stream",
    "--disable-features=WebRtcHideLocalIpsWithMdns",
    "--window-size=1200,1250",
)


def _binary(path: str) -> str:
    found = path if Path(path).exists() else shutil.which(Path(path).name)
    if found is None:
        message = (
            f"{path} is not installed (scripts/install.sh installs chromium and chromium-driver)"
        )
        if in_ci():
            pytest.fail("CI: " + message, pytrace=False)
        pytest.skip(message)
    return found


@contextlib.contextmanager
def chromium(profile_parent: Path | None = None) -> Iterator[Any]:
    """A headless chromium driven by selenium; quit (and its profile deleted) on leaving."""
    require("selenium")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver_path = _binary(CHROMIUM), _binary(CHROMEDRIVER)
    profile = tempfile.mkdtemp(prefix="chromium-", dir=profile_parent)
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def page_numbers(driver: Any) -> dict[str, str]:
    """The page's numbers by element id (as text)."""
    ids = (
        "state",
        "session",
        "error",
        "frames",
        "latents",
        "latents-seen",
        "dropped-groups",
        "dropped-frames",
        "gaps",
        "resets",
        "resolution",
        "model-name",
        "fps",
        "lps",
        "outputs",
        "dtype",
        "size",
        "config",
        "decoded-count",
        "decoded-restarts",
    )
    script = "return Object.fromEntries(arguments[0].map((id) => [id, document.getElementById(id).textContent]));"
    return driver.execute_script(script, list(ids))


def layout(driver: Any) -> dict[str, dict[str, float]]:
    """Where the page's parts are (CSS pixels), and the window's height: what must not move."""
    script = """
    const box = (el) => { const r = el.getBoundingClientRect(); return {x: r.x, y: r.y, bottom: r.bottom}; };
    return {table: box(document.querySelector('table')), plot: box(document.getElementById('plot')),
            picture: box(document.getElementById('picture')), view: {x: 0, y: 0, bottom: window.innerHeight}};
    """
    return driver.execute_script(script)


def banner_shown(driver: Any) -> bool:
    return driver.execute_script(
        "return getComputedStyle(document.getElementById('banner')).display !== 'none';"
    )
