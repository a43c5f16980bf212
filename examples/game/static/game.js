// durable game client for browsers: one Game object over a WebSocket. The object is the judge;
// this keeps a copy of its state, applies its numbered diffs in order, asks for what it missed
// when it sees a gap, and reconnects with jittered backoff, resuming from the last seq it applied
// (?since=<seq>) with the seat token the game gave it, so a reload or a dropped connection puts
// the player back in its seat.
"use strict";

class DurableGame {
  /**
   * @param {string} game  the game's name
   * @param {{token?: string, name?: string, spectate?: boolean}} who  how to join
   * @param {{onState?, onYou?, onSpectators?, onStatus?, onError?, onForget?}} handlers
   */
  constructor(game, who, handlers = {}) {
    this.game = game;
    this.who = {...who};
    this.on = handlers;
    this.state = null;
    this.you = null;
    this.spectators = 0;
    this.attempt = 0;
    this.closed = false;
    this.ws = null;
    this.keepalive = null;
    this.syncing = false;
  }

  url() {
    const proto = location.protocol === "https:" ? "wss:" : "ws:";
    const q = new URLSearchParams();
    if (this.who.token) q.set("token", this.who.token);
    else if (this.who.spectate) q.set("spectate", "1");
    else q.set("name", this.who.name);
    if (this.state) q.set("since", String(this.state.seq));
    return `${proto}//${location.host}/game/${encodeURIComponent(this.game)}?${q}`;
  }

  connect() {
    if (this.closed) return;
    this.status("connecting");
    const ws = new WebSocket(this.url());
    this.ws = ws;
    ws.onopen = () => {
      this.attempt = 0;
      this.status("open");
      // "ping" is answered "pong" by the gateway without waking the game
      this.keepalive = setInterval(() => ws.readyState === WebSocket.OPEN && ws.send("ping"), 25000);
    };
    ws.onmessage = (event) => this.receive(event.data);
    ws.onclose = (event) => {
      clearInterval(this.keepalive);
      if (this.ws !== ws) return;
      this.ws = null;
      this.syncing = false;
      if (this.closed) { this.status("closed"); return; }
      this.status(`reconnecting (closed ${event.code})`);
      setTimeout(() => this.connect(), this.backoff());
    };
  }

  backoff() {
    // full jitter: a random delay up to min(10 s, 250 ms * 2^attempt)
    const cap = Math.min(10000, 250 * 2 ** this.attempt);
    this.attempt += 1;
    return Math.random() * cap;
  }

  receive(raw) {
    if (raw === "pong") return;
    let msg;
    try { msg = JSON.parse(raw); } catch { return; }
    switch (msg.type) {
      case "welcome":
        this.you = msg.you;
        if (msg.you.token) this.who = {token: msg.you.token};  // from now on, our seat
        else if (msg.you.role === "spectator") this.who = {spectate: true};
        this.on.onYou?.(msg.you);
        this.spectators = msg.spectators;
        this.on.onSpectators?.(msg.spectators);
        if (msg.state) this.replace(msg.state);
        else this.applyAll(msg.diffs);
        break;
      case "diff":
        this.apply(msg);
        break;
      case "sync":
        this.syncing = false;
        this.applyAll(msg.diffs);
        break;
      case "state":
        this.syncing = false;
        this.replace(msg.state);
        break;
      case "spectators":
        this.spectators = msg.count;
        this.on.onSpectators?.(msg.count);
        break;
      case "error":
        if (msg.code === "unknown_token") {  // the token we kept holds no seat here: we watch
          this.who = {spectate: true};
          this.on.onForget?.();
        }
        this.on.onError?.(msg.error, msg.code);
        break;
    }
  }

  replace(state) {
    this.state = state;
    this.on.onState?.(this.state);
  }

  applyAll(diffs) {
    for (const d of diffs) this.apply(d, false);
    this.on.onState?.(this.state);
  }

  apply(diff, notify = true) {
    if (!this.state || diff.seq <= this.state.seq) return;  // already applied (a resume overlaps)
    if (diff.seq !== this.state.seq + 1) {  // a gap: ask for what we missed, once
      if (!this.syncing) this.syncing = this.frame({type: "sync", since: this.state.seq});
      return;
    }
    if (diff.cell) this.state.board[diff.cell.row][diff.cell.column] = diff.cell.seat;
    if (diff.player) this.state.players[diff.player.seat - 1] = diff.player;
    Object.assign(this.state, diff.set);
    this.state.seq = diff.seq;
    if (notify) this.on.onState?.(this.state);
  }

  myTurn() {
    return Boolean(this.state && this.you?.seat && this.state.status === "playing" && this.state.turn === this.you.seat);
  }

  move(column) {
    return this.frame({type: "move", column});
  }

  resign() {
    return this.frame({type: "resign"});
  }

  frame(value) {
    if (!this.ws || this.ws.readyState !== WebSocket.OPEN) return false;
    this.ws.send(JSON.stringify(value));
    return true;
  }

  leave() {
    this.closed = true;
    this.ws?.close(1000, "left");
  }

  status(text) {
    this.on.onStatus?.(text);
  }
}

window.DurableGame = DurableGame;
