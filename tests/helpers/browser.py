"""Headless Chromium (Debian's ``chromium``) driven by Playwright, for the tests of the pages.

Without a Chromium binary a browser test is skipped, unless ``DURABLE_REQUIRE_BROWSER=1`` (CI
sets it, after installing the package), in which case a missing browser is a failure.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from typing import Any

import pytest

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"]


def chromium_path() -> str | None:
    for candidate in (os.environ.get("CHROMIUM"), "/usr/lib/chromium/chromium", shutil.which("chromium"),
                      shutil.which("chromium-browser"), shutil.which("chromium-headless-shell")):
        if candidate and os.path.exists(candidate):
            return candidate
    return None


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    """A Playwright Browser on Debian's Chromium; each test makes its own contexts and pages."""
    path = chromium_path()
    if path is None:
        if os.environ.get("DURABLE_REQUIRE_BROWSER") == "1":
            pytest.fail("no Chromium binary found (install Debian's chromium package or set CHROMIUM)")
        pytest.skip("no Chromium binary (apt-get install chromium); CI installs it and runs this test")
    from playwright.async_api import async_playwright

    async with async_playwright() as p:
        b = await p.chromium.launch(executable_path=path, headless=True, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            await b.close()
