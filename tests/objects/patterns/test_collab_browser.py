"""The collab page in a real browser (tests/helpers/browser.py): two pages on one document type
into the shared text area, see each other's text and each other in the list of editors, and a
page opened later gets the whole text."""

from __future__ import annotations

from typing import Any

import pytest
from durable.client import Env
from durable.core.config import AppConfig
from durable.core.settings import Settings
from durable.objects import Worker

from tests.helpers.gateway import gateway

pytestmark = pytest.mark.slow  # a real browser


async def open_doc(browser: Any, base: str, doc: str) -> Any:
    page = await (await browser.new_context()).new_page()
    await page.goto(f"{base}/collab/{doc}")
    await page.locator("#status", has_text="synced").wait_for(timeout=15_000)
    return page


async def text_of(page: Any) -> str:
    return str(await page.eval_on_selector("#text", "el => el.value"))


async def test_two_browser_pages_edit_one_text_together(
        browser: Any, worker: Worker, settings: Settings, config: AppConfig, env: Env) -> None:
    async with gateway(settings, config) as ws_url:
        base = "http" + ws_url[2:]
        ada = await open_doc(browser, base, "browser-doc")
        bob = await open_doc(browser, base, "browser-doc")
        await ada.locator("#users li").nth(1).wait_for(timeout=10_000)  # Bob's page is editing too

        await ada.click("#text")
        await ada.keyboard.type("Hello from Ada.")
        await bob.wait_for_function("document.querySelector('#text').value === 'Hello from Ada.'", timeout=10_000)
        # Bob types at the start while Ada types at the end: both edits survive, in both pages
        await bob.click("#text")
        await bob.keyboard.press("Home")
        await bob.keyboard.type("Bob: ")
        await ada.keyboard.press("End")
        await ada.keyboard.type(" Bye.")
        expected = "Bob: Hello from Ada. Bye."
        for page in (ada, bob):
            await page.wait_for_function(f"document.querySelector('#text').value === {expected!r}",
                                         timeout=10_000)
        assert await env.DOCS.get_by_name("browser-doc").text() == expected

        late = await open_doc(browser, base, "browser-doc")
        assert await text_of(late) == expected
        assert await late.eval_on_selector("#doc", "el => el.textContent") == "browser-doc"
