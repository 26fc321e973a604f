# Stand-in gateway for the SQLite tests and benchmark: commits numbered
# transactions (2 KB each) into a WAL database under OPENCLAW_STATE_DIR and
# logs each commit with its time to $OUT/commits after it returns.
# LIMIT stops after that many commits; the file $OUT/pause pauses writing,
# acknowledged by the file $OUT/paused. LOCKING sets PRAGMA locking_mode,
# JOURNAL the journal mode (default wal), PAD=zeros compressible rows
# (default: random bytes), ROW_BYTES their size (default 2000).
# SIGTERM ends it between commits: a stop never falls between a commit and
# its log line, so the log numbers have no gap (SIGKILL still can).
import os, signal, sqlite3, sys, time
stopping = []
signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
state, out = os.environ["OPENCLAW_STATE_DIR"], os.environ["OUT"]
path = os.path.join(state, "state", "openclaw.sqlite")
os.makedirs(os.path.dirname(path), exist_ok=True)
db = sqlite3.connect(path, isolation_level=None)
db.execute(f"pragma journal_mode={os.environ.get('JOURNAL', 'wal')}")
if os.environ.get("LOCKING"):
    db.execute(f"pragma locking_mode={os.environ['LOCKING']}")
db.execute("create table if not exists tx(i integer primary key, ts real, pad blob)")
i = db.execute("select coalesce(max(i), 0) from tx").fetchone()[0]
limit, every = int(os.environ.get("LIMIT", "0")), float(os.environ.get("EVERY", "0.02"))
size = int(os.environ.get("ROW_BYTES", "2000"))
pad = (lambda: bytes(size)) if os.environ.get("PAD") == "zeros" else (lambda: os.urandom(size))
log = open(os.path.join(out, "commits"), "a", buffering=1)
n = 0
pause = os.path.join(out, "pause")
while True:
    if stopping:
        sys.exit(0)
    if (limit and n >= limit) or os.path.exists(pause):
        if os.path.exists(pause):
            open(pause + "d", "a").close()  # acknowledged: no commit follows
        time.sleep(0.05)
        continue
    i += 1
    db.execute("insert into tx values (?, ?, ?)", (i, time.time(), pad()))
    log.write(f"{i} {time.time()}\n")
    n += 1
    time.sleep(every)
