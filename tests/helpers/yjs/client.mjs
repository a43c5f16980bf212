// A Yjs client for the tests: yjs + y-websocket's WebsocketProvider, unmodified, on the Y.Text
// "text". Usage: node client.mjs <server url> <room>. Commands arrive as JSON lines on stdin
// ({"id": 1, "op": "insert", "index": 0, "text": "hi"}); each is answered by one JSON line on
// stdout with the same id and the client's state. Closes by the server are reported as
// {"event": "closed", "code": ..., "reason": ...} lines.
import * as Y from "yjs";
import { WebsocketProvider } from "y-websocket";
import WebSocket from "ws";
import { createInterface } from "node:readline";

const [server, room] = process.argv.slice(2);
const doc = new Y.Doc();
const text = doc.getText("text");
const provider = new WebsocketProvider(server, room, doc, {
  WebSocketPolyfill: WebSocket, disableBc: true, maxBackoffTime: 500,
});
const out = (value) => process.stdout.write(JSON.stringify(value) + "\n");

provider.on("connection-close", (event) => {
  if (event) out({ event: "connection-close", code: event.code, reason: event.reason });
});
provider.on("closed", ({ code, reason }) => out({ event: "closed", code, reason }));

const state = () => ({
  text: text.toString(),
  synced: provider.synced,
  connected: provider.wsconnected,
  clientID: doc.clientID,
  awareness: Object.fromEntries(provider.awareness.getStates()),
});

const ops = {
  state: () => {},
  insert: ({ index, text: chunk }) => text.insert(index, chunk),
  append: ({ text: chunk }) => text.insert(text.length, chunk),
  delete: ({ index, length }) => text.delete(index, length),
  disconnect: () => provider.disconnect(),
  connect: () => provider.connect(),
  awareness: ({ state: local }) => provider.awareness.setLocalState(local),
  exit: () => { provider.destroy(); setTimeout(() => process.exit(0), 50); },
};

createInterface({ input: process.stdin }).on("line", (line) => {
  const cmd = JSON.parse(line);
  try {
    ops[cmd.op](cmd);
    out({ id: cmd.id, ...state() });
  } catch (error) {
    out({ id: cmd.id, error: String(error) });
  }
});
process.stdin.on("end", () => process.exit(0));
