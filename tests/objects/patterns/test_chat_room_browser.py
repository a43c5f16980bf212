"""The chat page in a real browser (tests/helpers/browser.py): two pages join one room, exchange
messages, and one reloads and gets the history."""

from __future__ import annotations

from typing import Any

import pytest
from durable.core.config import AppConfig
from durable.core.settings import Settings
from durable.objects import Worker

from tests.helpers.gateway import gateway

pytestmark = pytest.mark.slow  # a real browser


async def join(page: Any, base: str, room: str, name: str) -> None:
    await page.goto(f"{base}/")
    await page.fill("#room", room)
    await page.fill("#name", name)
    await page.click("#join button")
    await page.locator("#status", has_text="open").wait_for(timeout=10_000)


async def say(page: Any, text: str) -> None:
    await page.fill("#text", text)
    await page.click("#send")


async def test_two_browser_pages_chat_and_a_reload_gets_the_history(
        browser: Any, worker: Worker, settings: Settings, config: AppConfig) -> None:
    async with gateway(settings, config) as ws_url:
        base = "http" + ws_url[2:]
        ada = await (await browser.new_context()).new_page()
        bob = await (await browser.new_context()).new_page()
        await join(ada, base, "browser-room", "Ada")
        await join(bob, base, "browser-room", "Bob")
        await ada.locator("#users li", has_text="Bob").wait_for(timeout=10_000)

        await say(ada, "hello from Ada")
        await bob.locator("#log .message", has_text="Ada: hello from Ada").wait_for(timeout=10_000)
        await say(bob, "hi Ada, Bob here")
        await ada.locator("#log .message", has_text="Bob: hi Ada, Bob here").wait_for(timeout=10_000)

        await bob.reload()  # rejoins the same room as the same person and gets the history
        await bob.locator("#status", has_text="open").wait_for(timeout=10_000)
        await bob.locator("#log .message", has_text="Bob: hi Ada, Bob here").wait_for(timeout=10_000)
        log = await bob.locator("#log .message").all_text_contents()
        assert log == ["Ada: hello from Ada", "Bob: hi Ada, Bob here"]

        await say(ada, "welcome back")
        await bob.locator("#log .message", has_text="Ada: welcome back").wait_for(timeout=10_000)
        users = await ada.locator("#users li").all_text_contents()
        assert sorted(users) == ["Ada", "Bob"]
