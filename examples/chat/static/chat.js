// durable chat client for browsers: one room over a WebSocket, reconnecting with jittered
// exponential backoff and resuming from the last message seen (?since=<seq>), so a dropped
// connection or a page that comes back loses nothing of the room's last 100 messages.
"use strict";

class DurableChat {
  /**
   * @param {string} room  room name
   * @param {{userId: string, name: string}} user
   * @param {{onMessage?, onJoin?, onLeave?, onTyping?, onUsers?, onStatus?, onError?}} handlers
   */
  constructor(room, user, handlers = {}) {
    this.room = room;
    this.user = user;
    this.on = handlers;
    this.lastSeq = 0;
    this.users = new Map();
    this.attempt = 0;
    this.closed = false;
    this.ws = null;
    this.keepalive = null;
  }

  url() {
    const proto = location.protocol === "https:" ? "wss:" : "ws:";
    const q = new URLSearchParams({user: this.user.userId, name: this.user.name, since: String(this.lastSeq)});
    return `${proto}//${location.host}/room/${encodeURIComponent(this.room)}?${q}`;
  }

  connect() {
    if (this.closed) return;
    this.status("connecting");
    const ws = new WebSocket(this.url());
    this.ws = ws;
    ws.onopen = () => {
      this.attempt = 0;
      this.status("open");
      // "ping" is answered "pong" by the gateway without waking the room
      this.keepalive = setInterval(() => ws.readyState === WebSocket.OPEN && ws.send("ping"), 25000);
    };
    ws.onmessage = (event) => this.receive(event.data);
    ws.onclose = (event) => {
      clearInterval(this.keepalive);
      if (this.ws !== ws) return;
      this.ws = null;
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
        this.users = new Map(msg.users.map((u) => [u.userId, u]));
        this.on.onUsers?.([...this.users.values()]);
        for (const m of msg.history) this.deliver(m);
        break;
      case "message":
        this.deliver(msg);
        break;
      case "join":
        this.users.set(msg.userId, msg);
        this.on.onJoin?.(msg);
        this.on.onUsers?.([...this.users.values()]);
        break;
      case "leave":
        this.users.delete(msg.userId);
        this.on.onLeave?.(msg);
        this.on.onUsers?.([...this.users.values()]);
        break;
      case "typing":
        this.on.onTyping?.(msg);
        break;
      case "error":
        this.on.onError?.(msg.error);
        break;
    }
  }

  deliver(msg) {
    if (msg.seq <= this.lastSeq) return;  // already seen (a resume overlaps)
    this.lastSeq = msg.seq;
    this.on.onMessage?.(msg);
  }

  send(content) {
    return this.frame({type: "message", content});
  }

  typing() {
    // at most one typing notice every 1.5 s
    const now = Date.now();
    if (now - (this.lastTyping || 0) < 1500) return false;
    this.lastTyping = now;
    return this.frame({type: "typing"});
  }

  frame(value) {
    if (!this.ws || this.ws.readyState !== WebSocket.OPEN) return false;
    this.ws.send(JSON.stringify(value));
    return true;
  }

  leave() {
    this.closed = true;
    this.frame({type: "leave"});
    this.ws?.close(1000, "left");
  }

  status(text) {
    this.on.onStatus?.(text);
  }
}

window.DurableChat = DurableChat;
