// What the collab page imports: the Yjs document types and y-websocket's provider, unmodified.
export * as Y from "yjs";
export { WebsocketProvider } from "y-websocket";
