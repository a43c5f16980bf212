// The collab page: a <textarea> bound to the Y.Text "text" of the document named in the URL
// (/collab/<doc>), synced by y-websocket's WebsocketProvider through the CollabDocument object.
// The binding is a plain diff: an edit in the textarea becomes one delete + insert on the Y.Text,
// and a remote change rewrites the textarea, keeping the caret where the change puts it.
import { Y, WebsocketProvider } from "./yjs.bundle.js";

const $ = (id) => document.getElementById(id);
const name = decodeURIComponent(location.pathname.split("/")[2] || "scratch");
const server = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/collab`;
const doc = new Y.Doc();
const text = doc.getText("text");
// disableBc: every edit goes through the server, also between tabs of one browser
const provider = new WebsocketProvider(server, name, doc, { disableBc: true });
const area = $("text");
const LOCAL = "textarea";
$("doc").textContent = name;
document.title = `${name} · durable collab`;

area.addEventListener("input", () => {
  const before = text.toString();
  const after = area.value;
  let start = 0;
  while (start < before.length && start < after.length && before[start] === after[start]) start++;
  let end = 0;
  while (end < before.length - start && end < after.length - start &&
         before[before.length - 1 - end] === after[after.length - 1 - end]) end++;
  doc.transact(() => {
    if (before.length - start - end > 0) text.delete(start, before.length - start - end);
    if (after.length - start - end > 0) text.insert(start, after.slice(start, after.length - end));
  }, LOCAL);
});

function shift(pos, delta) {
  // where a caret at `pos` ends up after a remote change described by `delta`
  let index = 0;
  let moved = pos;
  for (const op of delta) {
    if (op.retain) index += op.retain;
    else if (op.insert) {
      const n = typeof op.insert === "string" ? op.insert.length : 1;
      if (index <= pos) moved += n;
      index += n;
    } else if (op.delete) {
      if (index < pos) moved -= Math.min(op.delete, pos - index);
    }
  }
  return moved;
}

text.observe((event, transaction) => {
  if (transaction.origin === LOCAL) return;
  const focused = document.activeElement === area;
  const [start, end] = [area.selectionStart, area.selectionEnd];
  area.value = text.toString();
  if (focused) area.setSelectionRange(shift(start, event.delta), shift(end, event.delta));
});

const status = (message, error = false) => {
  $("status").textContent = message;
  $("status").className = error ? "error" : "";
};
provider.on("status", ({ status: s }) => status(s === "connected" ? "connected, syncing" : s));
provider.on("sync", (synced) => {
  if (!synced) return;
  area.value = text.toString();
  area.disabled = false;
  status("synced");
});
provider.on("closed", ({ code, reason }) => {
  area.disabled = true;
  status(`closed by the server (${code}): ${reason}`, true);
});

// who is here: awareness (never stored by the server), a name and a colour per tab
const colours = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6"];
const me = sessionStorage.getItem("durable-collab-name") || `guest-${Math.floor(Math.random() * 1000)}`;
sessionStorage.setItem("durable-collab-name", me);
provider.awareness.setLocalStateField("user", { name: me, color: colours[doc.clientID % colours.length] });
provider.awareness.on("change", () => {
  const list = $("users");
  list.textContent = "";
  for (const [id, state] of provider.awareness.getStates()) {
    if (!state.user) continue;
    const li = document.createElement("li");
    const dot = document.createElement("span");
    dot.style.background = state.user.color;
    li.append(dot, state.user.name + (id === doc.clientID ? " (you)" : ""));
    list.append(li);
  }
});

window.collab = { doc, text, provider };
