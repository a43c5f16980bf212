"""The game app through real WebSockets: `durable_app.serve()` runs the router and its gateway.
(Only what `durable[dev]` installs: `durable new game` copies this file into an app of its own.)"""

from __future__ import annotations

import json

from durable.testing import DurableApp
from websockets.asyncio.client import connect


async def _next(ws, kind: str) -> dict:
    while True:
        frame = json.loads(await ws.recv())
        if frame["type"] == kind:
            return frame


async def test_the_page_and_its_script_are_served(durable_app: DurableApp) -> None:
    page = await durable_app.fetch("/game/friday")
    assert page.status == 200 and "/game/static/game.js" in page.text()
    script = await durable_app.fetch("/game/static/game.js")
    assert script.status == 200 and "class DurableGame" in script.text()
    for path in ("/game/static/nope.js", "/game/static/", "/game/static/a/b.js", "/game/static/../game_app.py"):
        assert (await durable_app.fetch(path)).status == 404, path
    assert (await durable_app.fetch("/elsewhere")).status == 404


async def test_two_players_play_to_a_win(durable_app: DurableApp) -> None:
    async with durable_app.serve() as base:
        ws_base = base.replace("http", "ws", 1) + "/game/friday"
        async with connect(f"{ws_base}?name=Ada") as ada, connect(f"{ws_base}?name=Bob") as bob:
            assert (await _next(ada, "welcome"))["you"]["seat"] == 1
            assert (await _next(bob, "welcome"))["state"]["status"] == "playing"
            await _next(ada, "diff")  # Bob sat down: the game is on, Ada first
            await bob.send(json.dumps({"type": "move", "column": 0}))
            assert (await _next(bob, "error"))["code"] == "not_your_turn"
            moves = [(ada, 0), (bob, 1), (ada, 0), (bob, 1), (ada, 0), (bob, 1), (ada, 0)]
            for i, (player, column) in enumerate(moves):
                if i == 3:  # evicted mid-game, as an idle object is: the sockets and the game stay
                    assert await durable_app.evict(durable_app.env.GAMES.get_by_name("friday"))
                await player.send(json.dumps({"type": "move", "column": column}))
                last = await _next(ada, "diff")
                assert last == await _next(bob, "diff")
            assert last["set"]["result"]["winner"] == 1 and last["set"]["result"]["reason"] == "four-in-a-row"
            state = json.loads((await durable_app.fetch("/game/friday/state")).body)
            assert state["status"] == "over" and state["moves"] == 7 and state["seq"] == 9
    assert (await durable_app.fetch("/game/friday/state", method="POST", body=b"{}")).status == 405
