"""Game: an authoritative multiplayer game object (Connect Four with a move clock).

One object per game. It is the only judge: clients send intentions (``move`` in a column), the
object checks every one (whose turn, which column, is the game on, is the sender a player, is
the frame well formed) and answers a refusal to that socket alone, changing nothing. Each change
it accepts is a *diff* with the next sequence number, stored with the state in one write and
then broadcast, so a diff a client saw is durable (the output gate holds frames until the writes
before them commit): nothing acknowledged is lost when the owning worker dies.

Nothing lives only in memory. The state, the players' seat tokens and the last diffs are in
storage; who a socket is (player of a seat, or spectator) is its attachment and tags; the move
clock and the forfeit of an absent player are the object's one alarm. The game survives
eviction and failover with every client still connected.

Players and seats: the first two clients that ask for a seat (``?name=``) get seats 1 and 2 and
a secret token each; the game starts when both are seated, seat 1 first. A client that comes
back with ``?token=`` is back in its seat (a reload, a dropped connection, another tab). Anyone
else watches (``?spectate=1``, or no seat left): spectators get the state and every diff, and
cannot move. A player with no socket open (closed, or vanished: the runtime closes the sockets
of a lost gateway or client) forfeits ``FORFEIT_AFTER_MS`` later unless it reconnects first;
the player on turn loses when ``MOVE_TIMEOUT_MS`` pass without a move (0: no clock).

Resume: a client remembers the last ``seq`` it applied and reconnects with ``?since=<seq>``: the
welcome carries the diffs after it (or the full state when those are no longer kept). A client
that sees a gap (a diff whose seq is not its seq + 1) sends ``{"type": "sync", "since": seq}``.

Client -> game (JSON text frames): ``{"type": "move", "column": 0..6}``, ``{"type": "resign"}``,
``{"type": "sync", "since": <seq>}``, ``{"type": "state"}``; ``ping`` is answered ``pong`` by the
gateway. Game -> client: ``welcome`` (you, seq, and state or diffs), ``diff`` (seq, event, and
what changed: ``set`` top-level fields, ``cell`` for a move, ``player`` for a seat), ``sync``
(the diffs asked for), ``state``, ``spectators`` (count, not sequenced), ``error`` (code and
message). A token the game does not know gets an ``unknown_token`` error and a spectator's seat.
"""

from __future__ import annotations

import enum
import json
import secrets
import time
from typing import Any

from ...core.http import Request, Response
from ..base import AlarmInfo, DurableObject
from ..sockets import WebSocket
from . import connect_four as rules

SEATS = (1, 2)
MAX_FRAME_CHARS = 1024
MAX_NAME_CHARS = 32
MAX_TOKEN_CHARS = 64
#: diffs kept for ``since``: a Connect Four game has at most 42 moves, 2 joins and an end, so
#: only a player reconnecting hundreds of times pushes the first ones out (then: the full state)
EVENT_LOG = 256
#: the state fields every diff carries as they are after it (the client merges them): all but
#: the board (a move's ``cell`` says what changed there) and seq (the diff's own)
_TOP_LEVEL = ("players", "status", "turn", "turnDeadline", "result", "moves")


class Status(enum.StrEnum):
    WAITING = "waiting"  #: fewer than two players seated
    PLAYING = "playing"
    OVER = "over"


class Refused(Exception):
    """A frame the game does not accept; ``code`` is stable for clients, nothing changed."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def _event_key(seq: int) -> str:
    return f"e:{seq:016d}"


def _other(seat: int) -> int:
    return 2 if seat == 1 else 1


def new_state() -> dict[str, Any]:
    """A game nobody has joined yet (not stored until someone does)."""
    return {"seq": 0, "rows": rules.ROWS, "columns": rules.COLUMNS, "board": rules.empty_board(),
            "players": [None, None], "status": Status.WAITING.value, "turn": None, "turnDeadline": None,
            "result": None, "moves": 0}


class JoinParams:
    """The query of an upgrade request, checked: a bad one is refused before anything is read."""

    def __init__(self, request: Request) -> None:
        self.token = request.query_param("token")
        name = request.query_param("name")
        self.name = name.strip() if name is not None else None
        self.spectate = (request.query_param("spectate") or "0").lower()
        raw_since = request.query_param("since")
        if self.token is not None and not 0 < len(self.token) <= MAX_TOKEN_CHARS:
            raise ValueError(f"token must be 1 to {MAX_TOKEN_CHARS} characters")
        if self.name is not None and not 0 < len(self.name) <= MAX_NAME_CHARS:
            raise ValueError(f"name must be 1 to {MAX_NAME_CHARS} characters")
        if self.spectate not in ("0", "1", "true", "false"):
            raise ValueError("spectate must be 1 or 0")
        self.since: int | None = None
        if raw_since is not None:
            if not raw_since.isdigit() or len(raw_since) > 12:
                raise ValueError("since must be a sequence number (a non-negative integer)")
            self.since = int(raw_since)

    @property
    def watching(self) -> bool:
        return self.spectate in ("1", "true")


class Game(DurableObject):
    """Routes (see examples/game): ``/game/<name>`` upgrades to a WebSocket with ``?name=<display
    name>`` (a seat), ``?token=<token>`` (your seat again) or ``?spectate=1``, each with an optional
    ``&since=<seq>``; ``GET /game/<name>/state`` answers the state as JSON. RPC: ``state()``."""

    #: a player with no socket open loses this long after it dropped, unless it comes back
    FORFEIT_AFTER_MS = 30_000
    #: the player on turn loses when this passes without a move (0: no move clock)
    MOVE_TIMEOUT_MS = 120_000

    def __init__(self, ctx: Any, env: Any) -> None:
        super().__init__(ctx, env)
        ctx.set_websocket_auto_response("ping", "pong")

    def now_ms(self) -> int:
        return int(time.time() * 1000)

    # ----- state ---------------------------------------------------------------------------

    async def _load(self) -> dict[str, Any]:
        stored = await self.ctx.storage.get("game")
        return stored if isinstance(stored, dict) else new_state()

    async def state(self) -> dict[str, Any]:
        """The public state (no tokens), with how many spectators watch now."""
        return {**await self._load(), "spectators": len(await self.ctx.get_websockets("spectator"))}

    async def _diffs_after(self, since: int, seq: int) -> list[dict[str, Any]] | None:
        """The diffs after ``since`` up to ``seq``, or None when they are not all kept."""
        if since > seq:
            return None
        kept = await self.ctx.storage.list(prefix="e:", start=_event_key(since + 1))
        diffs = list(kept.values())
        return diffs if len(diffs) == seq - since else None

    async def _commit(self, state: dict[str, Any], event: str, **fields: Any) -> dict[str, Any]:
        """Store ``state`` and its diff under the next seq in one write, re-arm the alarm; the diff."""
        seq = state["seq"] + 1
        state["seq"] = seq
        diff = {"type": "diff", "seq": seq, "event": event, **fields, "set": {k: state[k] for k in _TOP_LEVEL}}
        await self.ctx.storage.put({"game": state, _event_key(seq): diff})
        if seq > EVENT_LOG:
            await self.ctx.storage.delete(_event_key(seq - EVENT_LOG))
        await self._arm(state)
        return diff

    async def _arm(self, state: dict[str, Any]) -> None:
        """The alarm at the next deadline (a forfeit or the move clock), or none."""
        deadlines = []
        if state["status"] == Status.PLAYING:
            deadlines = [p["forfeitAt"] for p in state["players"] if p and p["forfeitAt"] is not None]
            if state["turnDeadline"] is not None:
                deadlines.append(state["turnDeadline"])
        if not deadlines:
            await self.ctx.storage.delete_alarm()
        elif min(deadlines) != await self.ctx.storage.get_alarm():
            await self.ctx.storage.set_alarm(min(deadlines))

    def _start(self, state: dict[str, Any]) -> None:
        """Both seats taken: seat 1 moves first. A seated player who is away already starts
        towards its forfeit now (while the game waited, being away cost nothing)."""
        state.update(status=Status.PLAYING.value, turn=1, turnDeadline=self._clock())
        for p in state["players"]:
            if not p["connected"]:
                p["forfeitAt"] = self.now_ms() + self.FORFEIT_AFTER_MS

    def _clock(self) -> int | None:
        return self.now_ms() + self.MOVE_TIMEOUT_MS if self.MOVE_TIMEOUT_MS > 0 else None

    async def _finish(self, state: dict[str, Any], winner: int, reason: str) -> dict[str, Any]:
        """The game ends without a move (a forfeit, the clock, a resignation)."""
        state.update(status=Status.OVER.value, turn=None, turnDeadline=None,
                     result={"winner": winner, "reason": reason, "line": None})
        for p in state["players"]:
            if p:
                p["forfeitAt"] = None
        return await self._commit(state, "over")

    # ----- the rules, as the object enforces them ------------------------------------------

    async def _move(self, seat: int, frame: dict[str, Any]) -> dict[str, Any]:
        if set(frame) != {"type", "column"}:
            raise Refused("malformed", "a move is {\"type\": \"move\", \"column\": <0 to 6>} and nothing else")
        column = frame["column"]
        if not isinstance(column, int) or isinstance(column, bool):
            raise Refused("bad_column", f"column must be an integer, not {type(column).__name__}")
        if not 0 <= column < rules.COLUMNS:
            raise Refused("bad_column", f"column must be from 0 to {rules.COLUMNS - 1}, not {column}")
        state = await self._load()
        self._check_on(state, seat)
        row = rules.landing_row(state["board"], column)
        if row is None:
            raise Refused("column_full", f"column {column} is full")
        state["board"][row][column] = seat
        state["moves"] += 1
        cell = {"row": row, "column": column, "seat": seat}
        line = rules.winning_line(state["board"], row, column)
        if line is not None or rules.is_full(state["board"]):
            state.update(status=Status.OVER.value, turn=None, turnDeadline=None,
                         result={"winner": seat if line else None,
                                 "reason": "four-in-a-row" if line else "draw", "line": line})
            for p in state["players"]:
                p["forfeitAt"] = None
        else:
            state.update(turn=_other(seat), turnDeadline=self._clock())
        return await self._commit(state, "move", cell=cell)

    def _check_on(self, state: dict[str, Any], seat: int) -> None:
        if state["status"] == Status.WAITING:
            raise Refused("not_started", "the game starts when two players are seated")
        if state["status"] == Status.OVER:
            raise Refused("game_over", "the game is over")
        if state["turn"] != seat:
            raise Refused("not_your_turn", f"it is seat {state['turn']}'s turn")

    async def _resign(self, seat: int, frame: dict[str, Any]) -> dict[str, Any]:
        if set(frame) != {"type"}:
            raise Refused("malformed", "a resignation is {\"type\": \"resign\"} and nothing else")
        state = await self._load()
        if state["status"] != Status.PLAYING:
            self._check_on(state, seat)  # says why (not started / over)
        return await self._finish(state, _other(seat), "resigned")

    # ----- HTTP ----------------------------------------------------------------------------

    async def fetch(self, request: Request) -> Response:
        segments = [s for s in request.path.split("/") if s]
        action = segments[2] if len(segments) > 2 else ""
        if request.websocket is not None and not action:
            return await self._join(request)
        if request.method != "GET":
            return Response.json_response({"error": "use GET"}, 405, {"allow": "GET"})
        if action == "state" and len(segments) == 3:
            return Response.json_response(await self.state())
        if not action:
            return Response.json_response({"error": "connect with a WebSocket: /game/<name>?name=<your name>, "
                                                    "?token=<token> or ?spectate=1"}, 426, {"upgrade": "websocket"})
        return Response.json_response({"error": "not found"}, 404)

    # ----- sockets -------------------------------------------------------------------------

    async def _join(self, request: Request) -> Response:
        try:
            params = JoinParams(request)
        except ValueError as exc:
            return Response.json_response({"error": str(exc)}, 400)
        ws = request.websocket
        assert ws is not None
        state = await self._load()
        tokens: dict[str, int] = await self.ctx.storage.get("tokens") or {}
        seat = None if params.token is None else tokens.get(params.token)
        diff = None
        if seat is not None:  # a player coming back (a reload, a dropped connection, a second tab)
            you = {"role": "player", "seat": seat, "token": params.token}
            player = state["players"][seat - 1]
            if not player["connected"]:
                player.update(connected=True, forfeitAt=None)
                diff = await self._commit(state, "presence", player=player)
        elif params.token is None and params.name is not None and not params.watching and None in state["players"]:
            you, diff = await self._seat(state, tokens, params.name)
        else:
            you = {"role": "spectator", "seat": None}
        self.ctx.accept_websocket(ws, ["player", f"seat:{you['seat']}"] if you["seat"] else ["spectator"])
        ws.serialize_attachment({"role": you["role"], "seat": you["seat"]})
        if params.token is not None and seat is None:
            # a token of another game (or of this name before it was cleared): say so, and let
            # the client watch meanwhile; it can ask for a seat again without the token
            ws.send(json.dumps({"type": "error", "code": "unknown_token",
                                "error": "this token holds no seat in this game: you are watching; "
                                         "join again without it"}))
        ws.send(json.dumps(await self._welcome(you, state, params.since)))
        if diff is not None:
            await self._broadcast(diff, exclude=ws)
        if you["role"] == "spectator":
            await self._spectators_changed()
        return Response(None, 101)

    async def _seat(self, state: dict[str, Any], tokens: dict[str, int],
                    name: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """The first free seat for ``name``, with a new secret token; the game starts when both
        seats are taken. (you, the join diff)."""
        seat = state["players"].index(None) + 1
        token = secrets.token_urlsafe(18)
        player = {"seat": seat, "name": name, "connected": True, "forfeitAt": None}
        state["players"][seat - 1] = player
        if None not in state["players"]:
            self._start(state)
        await self.ctx.storage.put("tokens", {**tokens, token: seat})
        return {"role": "player", "seat": seat, "token": token}, await self._commit(state, "join", player=player)

    async def _welcome(self, you: dict[str, Any], state: dict[str, Any], since: int | None) -> dict[str, Any]:
        """The state, or only the diffs after ``since`` when they are all kept (this join's own
        diff among them, if it made one)."""
        welcome: dict[str, Any] = {"type": "welcome", "you": you, "seq": state["seq"]}
        spectators = len(await self.ctx.get_websockets("spectator"))
        diffs = None if since is None else await self._diffs_after(since, state["seq"])
        if diffs is not None:
            welcome["diffs"] = diffs
        else:
            welcome["state"] = {**state, "spectators": spectators}
        welcome["spectators"] = spectators
        return welcome

    async def websocket_message(self, ws: WebSocket, message: str | bytes) -> None:
        try:
            reply = await self._frame(ws, message)
        except Refused as exc:
            ws.send(json.dumps({"type": "error", "code": exc.code, "error": str(exc)}))
            return
        if reply is not None:
            ws.send(json.dumps(reply))

    async def _frame(self, ws: WebSocket, message: str | bytes) -> dict[str, Any] | None:
        """Handle one client frame: a reply for that socket alone, or None (a diff was broadcast)."""
        if not isinstance(message, str):
            raise Refused("malformed", "frames are JSON text, not binary")
        if len(message) > MAX_FRAME_CHARS:
            raise Refused("malformed", f"frames are at most {MAX_FRAME_CHARS} characters")
        try:
            frame = json.loads(message)
        except (ValueError, RecursionError):
            frame = None
        if not isinstance(frame, dict) or not isinstance(frame.get("type"), str):
            raise Refused("malformed", "frames are JSON objects with a 'type'")
        kind = frame["type"]
        me = ws.deserialize_attachment() or {}
        if kind in ("move", "resign"):
            if me.get("role") != "player":
                raise Refused("not_a_player", "spectators watch; only the two seated players move")
            diff = await (self._move(me["seat"], frame) if kind == "move" else self._resign(me["seat"], frame))
            await self._broadcast(diff)
            return None
        state = await self._load()
        if kind == "state":
            return {"type": "state", "seq": state["seq"], "state": await self.state()}
        if kind == "sync":
            since = frame.get("since")
            if not isinstance(since, int) or isinstance(since, bool) or since < 0:
                raise Refused("malformed", "sync needs 'since', the last seq you applied (an integer >= 0)")
            diffs = await self._diffs_after(since, state["seq"])
            if diffs is None:
                return {"type": "state", "seq": state["seq"], "state": await self.state()}
            return {"type": "sync", "seq": state["seq"], "diffs": diffs}
        raise Refused("unknown_type", f"unknown frame type {kind[:40]!r}")

    async def websocket_close(self, ws: WebSocket, code: int, reason: str, was_clean: bool) -> None:
        me = ws.deserialize_attachment() or {}
        if me.get("role") == "spectator":
            await self._spectators_changed(leaving=ws)
            return
        seat = me.get("seat")
        if me.get("role") != "player" or seat not in SEATS:
            return
        if [other for other in await self.ctx.get_websockets(f"seat:{seat}") if other is not ws]:
            return  # still here in another tab
        state = await self._load()
        player = state["players"][seat - 1]
        if not player["connected"]:
            return
        player["connected"] = False
        if state["status"] == Status.PLAYING:
            player["forfeitAt"] = self.now_ms() + self.FORFEIT_AFTER_MS
        await self._broadcast(await self._commit(state, "presence", player=player), exclude=ws)

    async def alarm(self, info: AlarmInfo) -> None:
        """A deadline passed: an absent player forfeits, or the player on turn ran out of time."""
        state = await self._load()
        if state["status"] != Status.PLAYING:
            return
        now = self.now_ms()
        gone = [p for p in state["players"] if p["forfeitAt"] is not None and p["forfeitAt"] <= now]
        if gone:
            loser = min(gone, key=lambda p: p["forfeitAt"])["seat"]
            await self._broadcast(await self._finish(state, _other(loser), "forfeit"))
        elif state["turnDeadline"] is not None and state["turnDeadline"] <= now:
            await self._broadcast(await self._finish(state, _other(state["turn"]), "timeout"))
        else:
            await self._arm(state)  # woken early (a reconnect or a move moved the deadline)

    async def _broadcast(self, message: dict[str, Any], exclude: WebSocket | None = None) -> None:
        """One payload to every player and spectator (sent as one NATS message per gateway)."""
        data = json.dumps(message)
        for ws in await self.ctx.get_websockets():
            if ws is not exclude:
                ws.send(data)

    async def _spectators_changed(self, leaving: WebSocket | None = None) -> None:
        watching = [ws for ws in await self.ctx.get_websockets("spectator") if ws is not leaving]
        await self._broadcast({"type": "spectators", "count": len(watching)}, exclude=leaving)
