# workerd config for bench/bench_http.py and bench/bench_ws.py: the counter app (worker.js) with
# its Counter Durable Object on SQLite-backed storage on local disk, and bench_ws's Room.
#
#   workerd serve config.capnp --directory-path do-storage=<dir> --socket-addr http=127.0.0.1:<port>
#
# The benchmark passes the storage directory (a fresh temporary one) and the address on the
# command line, so this file holds no paths.

using Workerd = import "/workerd/workerd.capnp";

const config :Workerd.Config = (
  services = [
    (name = "main", worker = .counterWorker),
    # where each object's SQLite database lives (<uniqueKey>/<object id>.sqlite, WAL mode)
    (name = "do-storage", disk = (writable = true)),
  ],
  sockets = [ (name = "http", address = "127.0.0.1:8080", http = (), service = "main") ],
);

const counterWorker :Workerd.Worker = (
  modules = [ (name = "worker", esModule = embed "worker.js") ],
  compatibilityDate = "2025-01-01",
  durableObjectNamespaces = [
    # enableSql: the SQLite storage backend (wrangler's `new_sqlite_classes`)
    (className = "Counter", uniqueKey = "durable-bench-counter", enableSql = true),
    # bench/bench_ws.py's room: hibernatable WebSockets (ctx.acceptWebSocket)
    (className = "Room", uniqueKey = "durable-bench-room", enableSql = true),
  ],
  # objects' storage on disk (not `inMemory`): survives a restart of workerd
  durableObjectStorage = (localDisk = "do-storage"),
  bindings = [ (name = "COUNTER", durableObjectNamespace = "Counter"),
               (name = "ROOM", durableObjectNamespace = "Room") ],
);
