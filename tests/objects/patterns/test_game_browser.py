"""The game page in a real browser (tests/helpers/browser.py): two pages play Connect Four to the
end by clicking the board, one of them reloading mid-game and finding its seat again, while a
third page watches every move and the result."""

from __future__ import annotations

from typing import Any

import pytest
from durable.core.config import AppConfig
from durable.core.settings import Settings
from durable.objects import Worker

from tests.helpers.gateway import gateway

pytestmark = pytest.mark.slow  # a real browser

WAIT = 10_000  # ms, for anything the page shows


async def open_game(browser: Any, base: str, game: str) -> Any:
    page = await (await browser.new_context()).new_page()
    await page.goto(f"{base}/game/{game}")
    return page


async def take_seat(page: Any, name: str) -> None:
    await page.fill("#name", name)
    await page.click("#play")
    await page.locator("#you", has_text="You play seat").wait_for(timeout=WAIT)


async def drop(page: Any, seat: int, column: int, row: int) -> None:
    """Click the column (its top cell) when the page says it is our turn; wait for the disc to
    land where the rules put it."""
    await page.locator("#turn", has_text="Your turn").wait_for(timeout=WAIT)
    await page.click(f'#board .cell[data-row="5"][data-col="{column}"]')
    await page.locator(f'#board .cell.p{seat}[data-row="{row}"][data-col="{column}"]').wait_for(timeout=WAIT)


async def test_two_pages_play_a_game_to_the_end_while_a_third_watches(
        browser: Any, worker: Worker, settings: Settings, config: AppConfig) -> None:
    async with gateway(settings, config) as ws_url:
        base = "http" + ws_url[2:]
        ada = await open_game(browser, base, "browser-game")
        bob = await open_game(browser, base, "browser-game")
        await take_seat(ada, "Ada")
        await ada.locator("#turn", has_text="Waiting for a second player").wait_for(timeout=WAIT)
        await take_seat(bob, "Bob")
        cy = await open_game(browser, base, "browser-game")
        await cy.click("#watch")
        await cy.locator("#you", has_text="You are watching").wait_for(timeout=WAIT)
        await ada.locator("#spectators", has_text="1 watching").wait_for(timeout=WAIT)
        await bob.locator("#turn", has_text="Ada's turn").wait_for(timeout=WAIT)

        await drop(ada, 1, 0, 0)
        await drop(bob, 2, 1, 0)
        await bob.click('#board .cell[data-row="5"][data-col="2"]')  # Ada's turn: the page sends nothing
        await drop(ada, 1, 0, 1)
        await bob.reload()  # Bob comes back to his seat with the token his tab kept
        await bob.locator("#you", has_text="You play seat 2").wait_for(timeout=WAIT)
        await bob.locator("#status", has_text="open").wait_for(timeout=WAIT)
        await drop(bob, 2, 1, 1)
        await drop(ada, 1, 0, 2)
        await drop(bob, 2, 1, 2)
        await drop(ada, 1, 0, 3)  # four in a row in column 0

        final = await ada.locator("#board").get_attribute("data-seq")
        for page in (ada, bob, cy):
            await page.locator("#result", has_text="Ada wins (four in a row)").wait_for(timeout=WAIT)
            assert await page.locator("#board").get_attribute("data-seq") == final
            assert await page.locator("#board .cell.p1").count() == 4
            assert await page.locator("#board .cell.p2").count() == 3
            assert await page.locator("#board .cell.win").count() == 4
            assert await page.locator("#players li").all_text_contents() == [
                "Ada" + (" (you)" if page is ada else ""), "Bob" + (" (you)" if page is bob else "")]
        assert await cy.locator("#turn").text_content() == "Game over"
