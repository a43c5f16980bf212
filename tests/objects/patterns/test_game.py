"""The Game pattern end to end: real gateway, real worker, real WebSocket clients.

A game to a win; every kind of bad input refused to its sender alone with nothing changed;
reconnect and resume (``?token=``, ``?since=``, the ``sync`` frame); spectators; a dropped player
forfeiting by the alarm (and one who comes back in time not); the move clock; the owning worker
killed mid-game without losing an acknowledged move."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest
from durable.core.config import AppConfig
from durable.core.settings import Settings
from durable.objects.patterns.connect_four import empty_board, is_full, landing_row, winning_line
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus

from tests.helpers.gateway import gateway
from tests.helpers.waiting import assert_stays
from tests.helpers.workers import WorkerFactory, WorkerProcess


def http_url(gw: str) -> str:
    return "http" + gw[2:]


class Client:
    """One WebSocket to a game: its welcome, and the frames after it."""

    def __init__(self, ws: ClientConnection, welcome: dict[str, Any]) -> None:
        self.ws = ws
        self.welcome = welcome
        self.you = welcome["you"]

    async def next(self, kind: str = "diff", timeout: float = 10.0) -> dict[str, Any]:
        """The next frame of type ``kind``; ``spectators`` counts on the way are skipped."""
        while True:
            frame = json.loads(await asyncio.wait_for(self.ws.recv(), timeout))
            if frame["type"] == kind:
                return frame
            assert frame["type"] == "spectators", f"expected {kind}, got {frame}"

    async def next_event(self, event: str, timeout: float = 10.0) -> dict[str, Any]:
        """The next diff of ``event`` (a move, say), past the diffs before it."""
        while True:
            diff = await self.next(timeout=timeout)
            if diff["event"] == event:
                return diff

    async def send(self, frame: Any) -> None:
        await self.ws.send(frame if isinstance(frame, str | bytes) else json.dumps(frame))

    async def move(self, column: int) -> None:
        await self.send({"type": "move", "column": column})

    async def refused(self, frame: Any) -> dict[str, Any]:
        """Send a frame the game must refuse: the error frame it answers."""
        await self.send(frame)
        return await self.next("error")

    async def quiet(self) -> dict[str, Any]:
        """Nothing but spectator counts came since the last frame read: the answer to a state
        request (frames to one socket keep their order) is the next thing that arrives."""
        await self.send({"type": "state"})
        return (await self.next("state"))["state"]


async def join(gw: str, game: str, path: str = "game", **query: Any) -> Client:
    ws = await connect(f"{gw}/{path}/{game}?{urlencode(query)}")
    welcome = json.loads(await asyncio.wait_for(ws.recv(), 10))
    assert welcome["type"] == "welcome", welcome
    return Client(ws, welcome)


async def seat_two(gw: str, game: str, path: str = "game") -> tuple[Client, Client]:
    """Ada in seat 1 and Bob in seat 2; the game is on, Ada to move."""
    ada = await join(gw, game, path, name="Ada")
    bob = await join(gw, game, path, name="Bob")
    assert (ada.you["seat"], bob.you["seat"]) == (1, 2)
    started = await ada.next()
    assert started["event"] == "join" and started["set"]["status"] == "playing" and started["set"]["turn"] == 1
    return ada, bob


async def state_over_http(gw: str, game: str, path: str = "game") -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=http_url(gw)) as http:
        response = await http.get(f"/{path}/{game}/state")
        assert response.status_code == 200
        return dict(response.json())


def apply(state: dict[str, Any], diff: dict[str, Any]) -> None:
    """What a client does with a diff (the page's game.js does the same)."""
    assert diff["seq"] == state["seq"] + 1, (state["seq"], diff)
    if "cell" in diff:
        state["board"][diff["cell"]["row"]][diff["cell"]["column"]] = diff["cell"]["seat"]
    if "player" in diff:
        state["players"][diff["player"]["seat"] - 1] = diff["player"]
    state.update(diff["set"], seq=diff["seq"])


# ----- the rules alone ---------------------------------------------------------------------------

def test_connect_four_finds_lines_in_every_direction_and_a_full_board() -> None:
    board = empty_board()
    for column in range(4):
        board[0][column] = 1
    assert winning_line(board, 0, 2) == [[0, 0], [0, 1], [0, 2], [0, 3]]
    diagonal = empty_board()
    for i in range(4):
        diagonal[i][6 - i] = 2
    assert winning_line(diagonal, 1, 5) == [[0, 6], [1, 5], [2, 4], [3, 3]]
    assert winning_line(diagonal, 5, 0) is None
    column = empty_board()
    for row in range(6):
        column[row][3] = 1 + row % 2
    assert landing_row(column, 3) is None and landing_row(column, 2) == 0
    assert winning_line(column, 5, 3) is None
    assert not is_full(column) and is_full([[1] * 7 for _ in range(6)])


# ----- a whole game -----------------------------------------------------------------------------

async def test_two_players_play_to_a_win_and_both_see_every_numbered_diff(gw: str) -> None:
    ada, bob = await seat_two(gw, "win")
    assert bob.welcome["state"]["status"] == "playing" and bob.welcome["seq"] == 2
    mirror = bob.welcome["state"]  # Bob's copy, kept by applying diffs as a client does
    for i, (player, column) in enumerate([(ada, 0), (bob, 1), (ada, 0), (bob, 1), (ada, 0), (bob, 1), (ada, 0)]):
        await player.move(column)
        seen = [await ada.next(), await bob.next()]
        assert seen[0] == seen[1] and seen[0]["event"] == "move" and seen[0]["seq"] == 3 + i
        apply(mirror, seen[1])
    last = seen[0]
    assert last["cell"] == {"row": 3, "column": 0, "seat": 1}
    assert last["set"]["status"] == "over" and last["set"]["turn"] is None
    assert last["set"]["result"] == {"winner": 1, "reason": "four-in-a-row", "line": [[0, 0], [1, 0], [2, 0], [3, 0]]}
    final = await state_over_http(gw, "win")
    assert final == {**mirror, "spectators": 0}
    assert final["moves"] == 7 and final["seq"] == 9 and [p["name"] for p in final["players"]] == ["Ada", "Bob"]
    assert "token" not in json.dumps(final)  # seat tokens never leave the object but to their owner
    assert (await bob.refused({"type": "move", "column": 2}))["code"] == "game_over"
    for c in (ada, bob):
        await c.ws.close()


async def test_a_full_board_without_a_line_is_a_draw(gw: str) -> None:
    ada, bob = await seat_two(gw, "draw")
    # columns in pairs, shifted so that no four of a colour ever line up
    order = [0, 1, 0, 1, 0, 1, 1, 0, 1, 0, 1, 0, 2, 3, 2, 3, 2, 3, 3, 2, 3, 2, 3, 2,
             4, 5, 4, 5, 4, 5, 5, 4, 5, 4, 5, 4, 6, 6, 6, 6, 6, 6]
    for i, column in enumerate(order):
        await (ada if i % 2 == 0 else bob).move(column)
        last = await ada.next()
        await bob.next()
        assert last["event"] == "move", last
    assert last["set"]["result"] == {"winner": None, "reason": "draw", "line": None}


# ----- bad input --------------------------------------------------------------------------------

async def test_every_kind_of_bad_input_gets_an_error_to_its_sender_and_changes_nothing(gw: str) -> None:
    ada = await join(gw, "bad", name="Ada")
    assert (await ada.refused({"type": "move", "column": 0}))["code"] == "not_started"
    assert (await ada.refused({"type": "resign"}))["code"] == "not_started"
    bob = await join(gw, "bad", name="Bob")
    await ada.next()  # Bob's join
    watcher = await join(gw, "bad", spectate=1)
    for i in range(6):  # column 0 filled, alternating colours: no line
        await (ada if i % 2 == 0 else bob).move(0)
        for c in (ada, bob, watcher):
            await c.next()
    before = await state_over_http(gw, "bad")
    assert before["turn"] == 1 and before["seq"] == 8

    bad_frames = [
        ("not json", "malformed"), (b"\x00\x01", "malformed"), ("[1, 2]", "malformed"), ("null", "malformed"),
        ({"type": 5}, "malformed"), ({"kind": "move"}, "malformed"), ({"type": "dance"}, "unknown_type"),
        ({"type": "move"}, "malformed"), ({"type": "move", "column": 3, "extra": 1}, "malformed"),
        ({"type": "move", "column": "3"}, "bad_column"), ({"type": "move", "column": 3.0}, "bad_column"),
        ({"type": "move", "column": True}, "bad_column"), ({"type": "move", "column": None}, "bad_column"),
        ({"type": "move", "column": 7}, "bad_column"), ({"type": "move", "column": -1}, "bad_column"),
        ({"type": "move", "column": 10**30}, "bad_column"), ({"type": "move", "column": 0}, "column_full"),
        ({"type": "resign", "why": "x"}, "malformed"), ({"type": "sync"}, "malformed"),
        ({"type": "sync", "since": -1}, "malformed"), ({"type": "sync", "since": "1"}, "malformed"),
        (json.dumps({"type": "move", "column": 1, "pad": "x" * 2000}), "malformed"),
    ]
    for frame, code in bad_frames:
        error = await ada.refused(frame)
        assert error["code"] == code and error["error"], (frame, error)
    assert (await bob.refused({"type": "move", "column": 3}))["code"] == "not_your_turn"
    assert (await bob.refused({"type": "move", "column": 3, "column ": 1}))["code"] == "malformed"
    for frame in ({"type": "move", "column": 3}, {"type": "resign"}):
        assert (await watcher.refused(frame))["code"] == "not_a_player"

    # the errors went to their senders only, and nothing changed
    for c in (ada, bob, watcher):
        assert await c.quiet() == before
    assert await state_over_http(gw, "bad") == before
    await ada.move(3)  # the game goes on from exactly where it was
    assert (await bob.next())["seq"] == 9
    for c in (ada, bob, watcher):
        await c.ws.close()


async def test_bad_joins_are_refused_and_an_unknown_token_is_told_to_forget_it(gw: str) -> None:
    for query in ({"name": "x" * 33}, {"name": "  "}, {"since": "abc"}, {"since": "-1"}, {"spectate": "maybe"},
                  {"token": "t" * 65}):
        with pytest.raises(InvalidStatus) as err:
            await join(gw, "joins", **query)
        assert err.value.response.status_code == 400, query
    async with connect(f"{gw}/game/joins?token=not-a-seat&name=Eve") as ws:
        error = json.loads(await asyncio.wait_for(ws.recv(), 10))
        assert error["type"] == "error" and error["code"] == "unknown_token"
        welcome = json.loads(await asyncio.wait_for(ws.recv(), 10))
        assert welcome["you"] == {"role": "spectator", "seat": None}  # watching, not seated
    state = await state_over_http(gw, "joins")
    assert state["seq"] == 0 and state["players"] == [None, None] and state["spectators"] == 0
    async with httpx.AsyncClient(base_url=http_url(gw)) as http:
        assert (await http.post("/game/joins/state")).status_code == 405
        assert (await http.get("/game/joins/nothing")).status_code == 404


# ----- reconnect and resume ---------------------------------------------------------------------

async def test_a_player_comes_back_to_its_seat_and_gets_exactly_what_it_missed(gw: str) -> None:
    ada, bob = await seat_two(gw, "resume")
    await ada.move(3)
    seen_by_bob = (await bob.next())["seq"]
    await ada.next()
    token = bob.you["token"]
    await bob.ws.close()
    away = await ada.next()
    assert away["event"] == "presence" and away["player"]["connected"] is False
    assert away["player"]["forfeitAt"] is not None

    bob = await join(gw, "resume", token=token, since=seen_by_bob)
    assert bob.you == {"role": "player", "seat": 2, "token": token}
    assert "state" not in bob.welcome
    missed = bob.welcome["diffs"]
    assert [(d["seq"], d["event"]) for d in missed] == [(seen_by_bob + 1, "presence"), (seen_by_bob + 2, "presence")]
    assert missed[-1]["player"] == {"seat": 2, "name": "Bob", "connected": True, "forfeitAt": None}
    assert (await ada.next())["player"]["connected"] is True
    await bob.move(4)  # Bob still holds seat 2: his move is accepted
    assert (await ada.next())["cell"] == {"row": 0, "column": 4, "seat": 2}
    await bob.next()

    # a client that saw a gap asks for what it missed; one too far behind gets the state
    await ada.send({"type": "sync", "since": 2})
    sync = await ada.next("sync")
    assert [d["seq"] for d in sync["diffs"]] == list(range(3, sync["seq"] + 1))
    await ada.send({"type": "sync", "since": 10_000})
    assert (await ada.next("state"))["state"]["seq"] == sync["seq"]
    # no since: the full state; a second tab of the same seat is the same player
    tab = await join(gw, "resume", token=token)
    assert tab.welcome["state"]["seq"] == sync["seq"] and tab.you["seat"] == 2
    await tab.ws.close()
    assert (await ada.quiet())["players"][1]["connected"] is True  # Bob's first tab is still open
    for c in (ada, bob):
        await c.ws.close()


# ----- spectators -------------------------------------------------------------------------------

async def test_spectators_watch_every_diff_and_cannot_move(gw: str) -> None:
    early = await join(gw, "watch", spectate=1)
    assert early.you == {"role": "spectator", "seat": None}
    assert early.welcome["state"]["status"] == "waiting"
    ada, bob = await seat_two(gw, "watch")
    late = await join(gw, "watch", name="Cy")  # no seat left: Cy watches
    assert late.you["role"] == "spectator" and late.welcome["state"]["spectators"] == 2
    assert (await ada.next("spectators"))["count"] == 2
    assert [(await early.next())["event"] for _ in range(2)] == ["join", "join"]
    await ada.move(2)
    for watcher in (early, late):
        diff = await watcher.next()
        assert diff["cell"] == {"row": 0, "column": 2, "seat": 1} and diff["seq"] == 3
    await bob.next()
    assert (await late.refused({"type": "move", "column": 2}))["code"] == "not_a_player"
    assert (await state_over_http(gw, "watch"))["seq"] == 3
    await late.ws.close()
    assert (await bob.next("spectators"))["count"] == 1
    assert (await state_over_http(gw, "watch"))["spectators"] == 1
    for c in (ada, bob, early):
        await c.ws.close()


# ----- absent players and the move clock (alarms) -----------------------------------------------

async def test_a_player_who_vanishes_forfeits_after_the_timeout(gw: str) -> None:
    ada, bob = await seat_two(gw, "forfeit", "quickgame")
    await ada.move(0)
    await bob.next()
    await ada.next()
    bob.ws.transport.abort()  # gone without a close frame
    away = await ada.next()
    assert away["event"] == "presence" and away["player"]["seat"] == 2 and away["player"]["connected"] is False
    over = await ada.next(timeout=30)  # QuickGame: 3 s after Bob dropped
    assert over["event"] == "over" and over["set"]["result"] == {"winner": 1, "reason": "forfeit", "line": None}
    assert over["seq"] == away["seq"] + 1
    assert (await state_over_http(gw, "forfeit", "quickgame"))["status"] == "over"
    bob = await join(gw, "forfeit", "quickgame", token=bob.you["token"])  # too late: the game is over
    assert bob.welcome["state"]["result"]["reason"] == "forfeit"
    assert (await bob.refused({"type": "move", "column": 1}))["code"] == "game_over"
    for c in (ada, bob):
        await c.ws.close()


async def test_a_player_who_left_while_the_game_waited_forfeits_once_it_starts(gw: str) -> None:
    ada = await join(gw, "left-early", "quickgame", name="Ada")
    await ada.ws.close()  # waiting for an opponent costs nothing...
    watcher = await join(gw, "left-early", "quickgame", spectate=1)
    assert watcher.welcome["state"]["players"][0] == {"seat": 1, "name": "Ada", "connected": False, "forfeitAt": None}
    bob = await join(gw, "left-early", "quickgame", name="Bob")
    started = await watcher.next()  # ...but once the game is on, Ada's absence counts
    assert started["set"]["status"] == "playing" and started["set"]["players"][0]["forfeitAt"] is not None
    over = await bob.next(timeout=30)
    assert over["set"]["result"] == {"winner": 2, "reason": "forfeit", "line": None}
    for c in (bob, watcher):
        await c.ws.close()


async def test_a_player_who_comes_back_in_time_does_not_forfeit(gw: str) -> None:
    ada, bob = await seat_two(gw, "back", "quickgame")
    await bob.ws.close()
    away = (await ada.next())["player"]
    bob = await join(gw, "back", "quickgame", token=bob.you["token"])
    back = (await ada.next())["player"]
    assert back["connected"] is True and back["forfeitAt"] is None
    returned_at = int(time.time() * 1000)
    assert returned_at < away["forfeitAt"], "Bob came back after his forfeit was due: this machine is too slow"

    async def still_playing() -> bool:
        return (await state_over_http(gw, "back", "quickgame"))["status"] == "playing"

    # past the moment the forfeit was due, and then some: the alarm found Bob back
    await assert_stays(still_playing, (away["forfeitAt"] - returned_at) / 1000 + 2, "the game goes on")
    await ada.move(5)
    await bob.next()
    await ada.next()
    await bob.move(5)
    assert (await ada.next())["cell"] == {"row": 1, "column": 5, "seat": 2}
    for c in (ada, bob):
        await c.ws.close()


async def test_the_player_on_turn_loses_when_the_move_clock_runs_out(gw: str) -> None:
    ada, bob = await seat_two(gw, "clock", "clockedgame")
    assert bob.welcome["state"]["turnDeadline"] is not None
    await ada.move(1)  # Ada moves in time; Bob does not
    moved = await bob.next()
    assert moved["set"]["turn"] == 2 and moved["set"]["turnDeadline"] is not None
    over = await bob.next(timeout=30)
    assert over["event"] == "over" and over["set"]["result"]["winner"] == 1
    assert over["set"]["result"]["reason"] == "timeout"
    for c in (ada, bob):
        await c.ws.close()


# ----- the owning worker killed mid-game --------------------------------------------------------

@pytest.mark.fault
async def test_the_game_goes_on_after_the_owning_worker_is_killed(
        settings: Settings, config: AppConfig, start_worker: WorkerFactory, tmp_path: Path) -> None:
    doomed = WorkerProcess(settings, tmp_path / "doomed.log")
    await doomed.start()
    try:
        async with gateway(settings, config) as gw:
            ada, bob = await seat_two(gw, "failover")
            watcher = await join(gw, "failover", spectate=1)
            await ada.next("spectators")
            mirror = watcher.welcome["state"]
            for player, column in [(ada, 3), (bob, 3), (ada, 4), (bob, 4)]:
                await player.move(column)
                acknowledged = await player.next()  # durable once seen: the object's output gate
                assert await watcher.next() == acknowledged
                apply(mirror, acknowledged)
                await (bob if player is ada else ada).next()
            doomed.kill()  # kill -9 of the only worker: it owned the game
            assert doomed.proc is not None and doomed.proc.returncode == -9
            await start_worker()  # takes the partitions once the dead worker's lease runs out

            # every acknowledged move is there, and nothing else
            assert await state_over_http(gw, "failover") == {**mirror, "spectators": 1}
            # the sockets are the gateway's: the same connections play on through the new owner
            await ada.move(5)
            diff = await watcher.next(timeout=20)
            assert diff["seq"] == mirror["seq"] + 1 and diff["cell"] == {"row": 0, "column": 5, "seat": 1}
            apply(mirror, diff)
            await bob.next()
            await ada.next()
            assert (await bob.refused({"type": "move", "column": 9}))["code"] == "bad_column"
            # a reconnect with since resumes from the new owner's log
            token = bob.you["token"]
            await bob.ws.close()
            bob = await join(gw, "failover", token=token, since=mirror["seq"])
            assert [d["event"] for d in bob.welcome["diffs"]] == ["presence", "presence"]
            await bob.move(5)
            for c in (ada, watcher):
                assert (await c.next_event("move"))["cell"] == {"row": 1, "column": 5, "seat": 2}
            for c in (ada, bob, watcher):
                await c.ws.close()
    finally:
        doomed.close()
