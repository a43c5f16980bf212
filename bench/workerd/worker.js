// The workerd side of bench/bench_http.py: the same counter app as examples/counter, written
// for Cloudflare's runtime. POST /counter/<name>/increment goes to the Counter Durable Object
// named <name>, which adds one to its stored value and answers {"value": n}.
//
// Storage is the SQLite backend on local disk (config.capnp: enableSql, localDisk). The KV API
// (storage.get/put) on that backend writes inside an implicit transaction that is committed at
// the end of the turn, and the output gate holds the response until the commit is done, so an
// answer is only sent for a write that is on disk, as the durable side does with Postgres.

import { DurableObject } from "cloudflare:workers";

export class Counter extends DurableObject {
  async fetch(request) {
    const url = new URL(request.url);
    const segments = url.pathname.split("/").filter((s) => s);
    if (segments.length === 3 && segments[2] === "increment") {
      if (request.method !== "POST") {
        return Response.json({ error: "use POST to increment" }, { status: 405, headers: { allow: "POST" } });
      }
      const value = ((await this.ctx.storage.get("value")) || 0) + 1;
      await this.ctx.storage.put("value", value);
      return Response.json({ value });
    }
    if (segments.length === 2 && request.method === "GET") {
      return Response.json({ value: (await this.ctx.storage.get("value")) || 0 });
    }
    return Response.json({ error: "not found" }, { status: 404 });
  }
}

// The workerd side of bench/bench_ws.py: a chat-room shaped object with hibernatable WebSockets
// (ctx.acceptWebSocket), broadcasting each frame it gets, unchanged, to every socket it holds,
// the sender included, as bench/ws_objects.py's BenchRoom does on the durable side.
export class Room extends DurableObject {
  async fetch(request) {
    if (request.headers.get("Upgrade") !== "websocket") {
      return new Response("expected a WebSocket upgrade", { status: 426 });
    }
    const pair = new WebSocketPair();
    this.ctx.acceptWebSocket(pair[1]);
    return new Response(null, { status: 101, webSocket: pair[0] });
  }

  async webSocketMessage(ws, message) {
    for (const other of this.ctx.getWebSockets()) {
      other.send(message);
    }
  }

  async webSocketClose(ws, code, reason, wasClean) {
    ws.close(code, reason);
  }
}

export default {
  async fetch(request, env) {
    const segments = new URL(request.url).pathname.split("/").filter((s) => s);
    if (segments.length >= 2 && segments[0] === "counter") {
      return env.COUNTER.get(env.COUNTER.idFromName(segments[1])).fetch(request);
    }
    if (segments.length === 2 && segments[0] === "room") {
      return env.ROOM.get(env.ROOM.idFromName(segments[1])).fetch(request);
    }
    return new Response("Not found", { status: 404 });
  },
};
