//! SQLite durability in the mount layout, against real Garage, rclone, FUSE
//! and SQLite: live databases on local disk, snapshots to S3, restore.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::load::{commits, inspect, lost_seconds, now, DB, WRITER};
use common::{rclone, script, stock_config, wait_until, Appliance, Dirs, Garage, PASSWORD};

const T: Duration = Duration::from_secs(40);
/// The crash RPO this design claims at CVM_BACKUP_DEBOUNCE=1s (docs/durability.md):
/// debounce + snapshot + upload, with room for a loaded CI machine.
const RPO_BOUND: f64 = 3.0;

struct Setup {
    tmp: tempfile::TempDir,
    g: Garage,
    writer: PathBuf,
    idle: PathBuf,
}

impl Setup {
    fn new() -> Setup {
        let tmp = tempfile::tempdir().unwrap();
        let g = Garage::start(tmp.path());
        let writer = tmp.path().join("writer.py");
        fs::write(&writer, WRITER).unwrap();
        let idle = script(tmp.path(), "idle.sh", "exec sleep 100000");
        Setup {
            tmp,
            g,
            writer,
            idle,
        }
    }

    fn out_dir(&self, name: &str) -> PathBuf {
        let d = self.tmp.path().join(name);
        fs::create_dir_all(&d).unwrap();
        d
    }

    /// Boots a fresh "container" named `name` running `cmd`.
    fn boot(&self, name: &str, cmd: &str, extra: &[(&str, &str)]) -> (Appliance, Dirs) {
        let dirs = Dirs::new(self.tmp.path(), name);
        let mut app = self.start(&dirs, cmd, extra);
        app.wait_ready(T);
        (app, dirs)
    }

    /// Starts a "container" on `dirs` running `cmd` (the mount layout
    /// unless `extra` says otherwise).
    fn start(&self, dirs: &Dirs, cmd: &str, extra: &[(&str, &str)]) -> Appliance {
        let mut env = self.g.s3_env();
        env.extend(dirs.env());
        env.push(("RCLONE_CRYPT_PASSWORD".into(), PASSWORD.into()));
        env.push(("CVM_GATEWAY_CMD".into(), cmd.into()));
        env.push(("CVM_STORAGE".into(), "mount".into()));
        env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        Appliance::start(dirs, &env)
    }

    fn writer_cmd(&self) -> String {
        format!("python3 {}", self.writer.display())
    }
}

/// Opens the database the gateway sees and checks it: (max i, count).
/// Objects the database backup says it wrote to S3.
fn sqlite_puts(log: &str) -> usize {
    [
        "sqlite: snapshot uploaded",
        "sqlite: segment uploaded",
        "sqlite: manifest uploaded",
    ]
    .iter()
    .map(|m| log.matches(m).count())
    .sum()
}

fn checked(state_dir: &Path) -> (i64, i64) {
    inspect(&state_dir.join(DB)).expect("the database passes integrity_check")
}

#[test]
fn a_database_created_on_the_mount_is_moved_and_a_graceful_stop_keeps_every_commit() {
    let s = Setup::new();
    let out = s.out_dir("out");
    let out_s = out.display().to_string();
    let (mut app, _) = s.boot("first", &s.writer_cmd(), &[("OUT", &out_s)]);
    // The first start creates the database on the mount; cvm-init stops the
    // gateway, moves the database (with its WAL) to local disk and restarts it.
    wait_until(T, "the database to move off the mount", || {
        app.log_text().contains("moved a database off the mount")
    });
    let moved_at = commits(&out).len();
    wait_until(T, "commits after the move", || {
        commits(&out).len() >= moved_at + 100
    });
    assert_eq!(app.stop(T), 0, "{}", app.log_text());
    let log = app.log_text();
    assert!(
        log.contains("sqlite: final pass databases=1 unsaved=0"),
        "{log}"
    );

    let done = commits(&out);
    let numbers: Vec<i64> = done.iter().map(|c| c.0).collect();
    let broken = numbers.windows(2).find(|w| w[1] != w[0] + 1);
    assert!(
        broken.is_none(),
        "a commit was lost in the move (numbers repeat or skip): {broken:?}\n{log}"
    );

    // A new container: the database comes back with every commit (from
    // its first base, packed, and its segments), and while it idles the
    // whole stock copy follows.
    let (mut app, fresh) = s.boot(
        "second",
        s.idle.to_str().unwrap(),
        &[("CVM_SQLITE_BASE_MAX_AGE", "1s")],
    );
    let link = fs::read_link(fresh.state.join(DB)).unwrap();
    assert_eq!(
        link,
        fresh.local.join("sqlite").join(DB),
        "the gateway's path is a link to local disk"
    );
    let (max, count) = checked(&fresh.state);
    let last = *numbers.last().unwrap();
    assert_eq!(max, count, "no gap");
    // The writer logs a commit after it returns: a stop between the two
    // leaves one commit in the database that the log lacks.
    assert!(
        max == last || max == last + 1,
        "every logged commit is back: {max} rows, {last} logged"
    );
    // The snapshot is plain rclone crypt under sqlite/, readable by stock rclone.
    let conf = stock_config(&s.g, s.tmp.path());
    let stock = || String::from_utf8(rclone(&conf, &["lsf", "-R", "crypt:sqlite"])).unwrap();
    wait_until(T, "the stock copy", || stock().lines().any(|l| l == DB));
    assert_eq!(app.stop(T), 0, "{}", app.log_text());
    let listed = stock();
    assert!(
        !listed.contains("-wal") && !listed.contains("-shm"),
        "sidecars are never uploaded: {listed}"
    );
}

#[test]
fn crashes_lose_at_most_the_stated_rpo_over_20_rounds() {
    crash_rounds("mount", "wal", 20);
}

#[test]
fn crashes_in_the_replicate_layout_lose_at_most_the_stated_rpo() {
    crash_rounds("replicate", "wal", 20);
}

/// A rollback-journal database (followed by comparing snapshots) under the
/// same crashes.
#[test]
fn crashes_of_a_rollback_journal_database_lose_at_most_the_stated_rpo() {
    crash_rounds("replicate", "delete", 10);
}

fn crash_rounds(layout: &str, journal: &str, rounds: usize) {
    let s = Setup::new();
    let base = s.out_dir("round-0");
    let base_s = base.display().to_string();
    let layout_env = ("CVM_STORAGE", layout);
    let journal_env = ("JOURNAL", journal);
    // Round 0 creates the database and stops cleanly, so every later round
    // starts from a restored database on local disk.
    let (mut app, _) = s.boot(
        "round-0",
        &s.writer_cmd(),
        &[("OUT", &base_s), layout_env, journal_env],
    );
    wait_until(T, "the first snapshot", || {
        app.log_text().contains("sqlite: snapshot uploaded")
    });
    wait_until(T, "first commits", || commits(&base).len() >= 50);
    assert_eq!(app.stop(T), 0, "{}", app.log_text());

    let mut seed = (now() * 1e6) as u64 | 1;
    eprintln!("crash rounds seed: {seed}");
    let mut lags = Vec::new();
    let mut last_committed: Option<(i64, f64)> = None; // (last i, kill time) of the previous round
    for round in 1..=rounds {
        let out = s.out_dir(&format!("round-{round}"));
        let out_s = out.display().to_string();
        let (mut app, dirs) = s.boot(
            &format!("round-{round}"),
            &s.writer_cmd(),
            &[("OUT", &out_s), layout_env, journal_env],
        );

        // What survived the previous crash.
        wait_until(T, "the restored database", || dirs.state.join(DB).exists());
        let (max, count) = checked(&dirs.state);
        assert_eq!(max, count, "round {round}: restored rows have gaps");
        if let Some((prev_i, killed_at)) = last_committed {
            // The writer logs a commit after it returns: a SIGKILL can fall
            // between them (a log write held up by the disk, seen in CI),
            // so one commit more than its log shows may be on S3.
            assert!(
                max <= prev_i + 1,
                "round {round}: restored {max} rows, more than the {prev_i} committed"
            );
            let prev = commits(&s.tmp.path().join(format!("round-{}", round - 1)));
            // The data lost: from the oldest lost commit to the kill.
            let lost = lost_seconds(&prev, max, killed_at);
            lags.push(lost);
            assert!(
                lost <= RPO_BOUND,
                "round {round}: lost {lost:.2}s of commits (restored up to {max} of {prev_i}); bound {RPO_BOUND}s"
            );
        }
        wait_until(T, "the writer", || !commits(&out).is_empty());
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let wait = Duration::from_millis(300 + (seed >> 33) % 1700);
        let until = Instant::now() + wait;
        // An observation window, not synchronisation: the kill moment is random by design.
        wait_until(wait + T, "the random kill moment", || {
            Instant::now() >= until
        });
        let killed_at = now();
        app.kill_all();
        last_committed = Some((commits(&out).last().unwrap().0, killed_at));
    }
    lags.sort_by(|a, b| a.partial_cmp(b).unwrap());
    eprintln!(
        "{layout}, {journal}: crash RPO (seconds of commits lost) over {} rounds: median {:.2}s, worst {:.2}s (bound {RPO_BOUND}s)",
        lags.len(),
        lags[lags.len() / 2],
        lags[lags.len() - 1]
    );
    assert_eq!(lags.len(), rounds - 1);
}

#[test]
fn idle_databases_cost_no_uploads() {
    let s = Setup::new();
    let out = s.out_dir("out");
    let out_s = out.display().to_string();
    let (mut app, _) = s.boot(
        "box",
        &s.writer_cmd(),
        &[
            ("OUT", &out_s),
            ("LIMIT", "20"),
            ("CVM_BACKUP_DEBOUNCE", "200ms"),
            ("CVM_BACKUP_INTERVAL", "1s"),
            // A lease renewed less often than the test lasts.
            ("CVM_LEASE_TTL", "1h"),
        ],
    );
    wait_until(T, "the move and 20 commits", || {
        app.log_text().contains("moved a database off the mount") && commits(&out).len() >= 20
    });
    wait_until(T, "the snapshot of the last commit", || {
        sqlite_puts(&app.log_text()) >= 1
            && commits(&out)
                .last()
                .is_some_and(|&(_, ts)| ts + 1.5 < now())
    });
    // The key-check marker written at boot, the link the move left on the mount
    // (a file rclone uploads after its 5 s write-back), one per database
    // object (manifest, base, segments), and three for the lease at boot: the
    // probe object made, the write to it that must fail (Garage lets it
    // through), the lease taken.
    wait_until(T, "the marker, the link and the database on S3", || {
        let objects = sqlite_puts(&app.log_text()) as u64;
        objects >= 1 && s.g.s3_requests().get("PutObject").copied().unwrap_or(0) == objects + 5
    });
    let uploads_before = sqlite_puts(&app.log_text());
    let puts_before = s.g.s3_requests().get("PutObject").copied().unwrap_or(0);
    // Four backup intervals with nothing written.
    let until = Instant::now() + Duration::from_secs(4);
    wait_until(T, "the idle window", || Instant::now() >= until);
    let puts_after = s.g.s3_requests().get("PutObject").copied().unwrap_or(0);
    assert_eq!(sqlite_puts(&app.log_text()), uploads_before);
    assert_eq!(
        puts_after,
        puts_before,
        "S3 PutObject requests while idle: {:?}",
        s.g.s3_requests()
    );
    assert_eq!(app.stop(T), 0, "{}", app.log_text());
    let log = app.log_text();
    assert!(
        log.contains("sqlite: final pass databases=1 unsaved=0"),
        "{log}"
    );
    assert_eq!(
        sqlite_puts(&log),
        uploads_before,
        "an unchanged database is not uploaded at stop either"
    );
    // One write at the stop: the lease released.
    assert_eq!(
        s.g.s3_requests().get("PutObject").copied().unwrap_or(0),
        puts_before + 1,
        "{:?}",
        s.g.s3_requests()
    );
}

#[test]
fn a_database_renamed_over_its_link_is_moved_back_without_loss() {
    let s = Setup::new();
    let out = s.out_dir("out");
    let out_s = out.display().to_string();
    let (mut app, _) = s.boot("seed", &s.writer_cmd(), &[("OUT", &out_s), ("LIMIT", "3")]);
    wait_until(T, "a local database", || {
        app.log_text().contains("moved a database off the mount")
    });
    wait_until(T, "three commits", || commits(&out).len() >= 3);
    assert_eq!(app.stop(T), 0, "{}", app.log_text());

    // The gateway rewrites its database the atomic way: a temp file renamed
    // over the old name, which replaces cvm-init's link with a file on FUSE.
    let renamer = s.tmp.path().join("renamer.py");
    fs::write(
        &renamer,
        r#"
import os, sqlite3, time
state, out = os.environ["OPENCLAW_STATE_DIR"], os.environ["OUT"]
marker = os.path.join(out, "renamed")
if not os.path.exists(marker):
    tmp = os.path.join(state, "state", "openclaw.sqlite.tmp")
    db = sqlite3.connect(tmp)
    db.execute("create table tx(i integer primary key, ts real, pad blob)")
    db.executemany("insert into tx values (?, ?, x'')", [(n, time.time()) for n in range(1, 8)])
    db.commit()
    db.close()
    os.rename(tmp, os.path.join(state, "state", "openclaw.sqlite"))
    open(marker, "w").close()
    extra = sqlite3.connect(os.path.join(state, "workspace-extra.db"))
    extra.execute("create table x(a)")
    extra.commit()
    extra.close()
time.sleep(3600)
"#,
    )
    .unwrap();
    let cmd = format!("python3 {}", renamer.display());
    let (mut app, dirs) = s.boot("rename", &cmd, &[("OUT", &out_s)]);
    wait_until(T, "the renamed database to move back", || {
        app.log_text()
            .contains("restarting the gateway to move them to local disk")
            && app
                .log_text()
                .matches("moved a database off the mount")
                .count()
                >= 1
    });
    let (max, count) = checked(&dirs.state);
    assert_eq!(
        (max, count),
        (7, 7),
        "the renamed-in database is the live one"
    );
    let kept: Vec<_> = fs::read_dir(dirs.local.join("sqlite/state"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".replaced-") && !n.ends_with("-wal") && !n.ends_with("-shm"))
        .collect();
    // With its WAL, if it had one: the replaced copy is whole.
    assert_eq!(
        kept.len(),
        1,
        "the replaced copy is kept, not deleted: {kept:?}"
    );
    assert_eq!(app.stop(T), 0, "{}", app.log_text());

    let (mut app, fresh) = s.boot("after", s.idle.to_str().unwrap(), &[]);
    assert_eq!(checked(&fresh.state).0, 7);
    wait_until(T, "the scan for uncovered databases", || {
        app.log_text().contains("not covered by CVM_SQLITE_PATHS")
    });
    assert!(
        app.log_text().contains("db=workspace-extra.db"),
        "{}",
        app.log_text()
    );
    assert_eq!(app.stop(T), 0, "{}", app.log_text());
}

#[test]
fn a_remote_snapshot_that_fails_its_check_stops_the_boot() {
    let s = Setup::new();
    let conf = stock_config(&s.g, s.tmp.path());
    let junk = s.tmp.path().join("junk");
    let mut bytes = b"SQLite format 3\0".to_vec();
    bytes.extend(std::iter::repeat_n(0xabu8, 8192));
    fs::write(&junk, &bytes).unwrap();
    rclone(
        &conf,
        &[
            "copyto",
            junk.to_str().unwrap(),
            "crypt:sqlite/state/openclaw.sqlite",
        ],
    );

    let dirs = Dirs::new(s.tmp.path(), "box");
    let started = s.tmp.path().join("gateway-started");
    let gw = script(
        s.tmp.path(),
        "gw.sh",
        &format!("touch {}\nexec sleep 100000", started.display()),
    );
    let mut app = s.start(&dirs, gw.to_str().unwrap(), &[]);
    assert_eq!(app.wait_exit(T), 65, "{}", app.log_text());
    let log = app.log_text();
    assert!(
        log.contains("restored database state/openclaw.sqlite fails its check"),
        "{log}"
    );
    assert!(!started.exists(), "the gateway must not start");
    assert!(
        dirs.local
            .join("sqlite/state/openclaw.sqlite.corrupt")
            .exists(),
        "the bad copy is kept aside"
    );
    assert!(
        !dirs.local.join("sqlite/state/openclaw.sqlite").exists(),
        "no database for a later boot to trust"
    );
}

/// Stand-in app for [`many_databases_changed_at_once_are_all_saved_within_the_rpo`]:
/// N WAL databases with one row each; once `$OUT/go` exists, one more row
/// in each as fast as it can, then the time in `$OUT/done`.
const MANY: &str = r#"
import os, sqlite3, time
state, out, n = os.environ["OPENCLAW_STATE_DIR"], os.environ["OUT"], int(os.environ["N"])
os.makedirs(os.path.join(state, "dbs"), exist_ok=True)
conns = []
for i in range(n):
    c = sqlite3.connect(os.path.join(state, "dbs", f"db{i:03}.sqlite"), isolation_level=None)
    c.execute("pragma journal_mode=wal")
    c.execute("create table if not exists t(i integer primary key)")
    c.execute("insert or ignore into t values (1)")
    conns.append(c)
open(os.path.join(out, "created"), "w").close()
while not os.path.exists(os.path.join(out, "go")):
    time.sleep(0.05)
for c in conns:
    c.execute("insert or ignore into t values (2)")
with open(os.path.join(out, "done.tmp"), "w") as f:
    f.write(str(time.time()))
os.rename(os.path.join(out, "done.tmp"), os.path.join(out, "done"))
while True:
    time.sleep(1)
"#;

#[test]
fn many_databases_changed_at_once_are_all_saved_within_the_rpo() {
    const N: usize = 200;
    let s = Setup::new();
    let app_py = s.tmp.path().join("many.py");
    fs::write(&app_py, MANY).unwrap();
    let out = s.out_dir("out");
    let out_s = out.display().to_string();
    let n = N.to_string();
    let cmd = format!("python3 {}", app_py.display());
    let (mut app, _) = s.boot(
        "a",
        &cmd,
        &[
            ("OUT", &out_s),
            ("N", &n),
            ("CVM_STORAGE", "replicate"),
            ("CVM_SQLITE_PATHS", "dbs/*.sqlite"),
        ],
    );
    wait_until(
        Duration::from_secs(120),
        "every database's first base",
        || {
            out.join("created").exists()
                && app
                    .log_text()
                    .matches("sqlite: snapshot uploaded (base)")
                    .count()
                    >= N
        },
    );
    fs::write(out.join("go"), "").unwrap();
    wait_until(T, "a row more in each", || out.join("done").exists());
    let done: f64 = fs::read_to_string(out.join("done"))
        .unwrap()
        .parse()
        .unwrap();
    // The crash moment, by design: the RPO bound after the last commit.
    wait_until(T, "the RPO bound after the last commit", || {
        now() >= done + RPO_BOUND
    });
    app.kill_all();
    let log = app.log_text();
    let last_upload = log
        .lines()
        .filter(|l| l.contains("sqlite: segment uploaded"))
        .filter_map(|l| humantime::parse_rfc3339_weak(l.split_whitespace().next()?).ok())
        .max()
        .map(|t| {
            t.duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs_f64()
        });
    eprintln!(
        "MEASURED: {N} databases changed at once: the last segment on S3 {:.2} s after the last commit",
        last_upload.map_or(f64::NAN, |t| t - done)
    );

    let (mut app, b) = s.boot(
        "b",
        s.idle.to_str().unwrap(),
        &[
            ("CVM_STORAGE", "replicate"),
            ("CVM_SQLITE_PATHS", "dbs/*.sqlite"),
        ],
    );
    let log = app.log_text();
    eprintln!(
        "MEASURED: {N} databases restored in a new container: {}",
        log.lines()
            .find(|l| l.contains("boot: state restored"))
            .and_then(|l| l.split(" took=").nth(1))
            .unwrap_or("(not logged)")
    );
    let mut missing = Vec::new();
    for i in 0..N {
        let db = b.state.join(format!("dbs/db{i:03}.sqlite"));
        let c = rusqlite::Connection::open(&db).unwrap();
        let ok: String = c
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .unwrap();
        assert_eq!(ok, "ok", "{}", db.display());
        let rows: i64 = c
            .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap();
        if rows != 2 {
            missing.push(i);
        }
    }
    assert!(
        missing.is_empty(),
        "{} of {N} databases lost a commit made {RPO_BOUND} s before the crash: {missing:?}",
        missing.len()
    );
    assert_eq!(app.stop(T), 0, "{}", app.log_text());
}

#[test]
fn a_database_the_app_keeps_locked_is_said_loudly_and_saved_at_the_stop() {
    let s = Setup::new();
    let out = s.out_dir("out");
    let out_s = out.display().to_string();
    let (mut app, _) = s.boot(
        "a",
        &s.writer_cmd(),
        &[
            ("OUT", &out_s),
            ("LIMIT", "30"),
            ("EVERY", "0.05"),
            ("LOCKING", "exclusive"),
            ("CVM_STORAGE", "replicate"),
        ],
    );
    wait_until(T, "30 commits", || commits(&out).len() >= 30);
    wait_until(T, "the lock said loudly", || {
        app.log_text()
            .contains("sqlite: the app keeps this database locked")
    });
    assert_eq!(
        sqlite_puts(&app.log_text()),
        0,
        "nothing of it could be read while locked"
    );
    // The stop ends the app first, which releases the lock: the final pass saves it.
    assert_eq!(app.stop(T), 0, "{}", app.log_text());
    let (mut app, b) = s.boot(
        "b",
        s.idle.to_str().unwrap(),
        &[("CVM_STORAGE", "replicate")],
    );
    assert_eq!(checked(&b.state), (30, 30));
    assert_eq!(app.stop(T), 0, "{}", app.log_text());
}

#[test]
fn a_database_created_on_the_mount_after_boot_is_saved_within_the_rpo() {
    let s = Setup::new();
    let (mut app, a) = s.boot("a", s.idle.to_str().unwrap(), &[]);
    // What a new agent does: its database, in a directory made just now.
    let db = a.state.join("agents/new-agent/agent/x.sqlite");
    fs::create_dir_all(db.parent().unwrap()).unwrap();
    {
        let c = rusqlite::Connection::open(&db).unwrap();
        c.pragma_update(None, "journal_mode", "WAL").unwrap();
        c.execute_batch("CREATE TABLE t(i INTEGER PRIMARY KEY); INSERT INTO t VALUES (1);")
            .unwrap();
    }
    let committed = now();
    // The crash moment, by design: the RPO bound after the commit.
    wait_until(T, "the RPO bound after the commit", || {
        now() >= committed + RPO_BOUND
    });
    app.kill_all();
    let (mut app, b) = s.boot("b", s.idle.to_str().unwrap(), &[]);
    let c = rusqlite::Connection::open(b.state.join("agents/new-agent/agent/x.sqlite")).unwrap();
    let rows: i64 = c
        .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
        .unwrap();
    assert_eq!(rows, 1, "the new database's commit survived the crash");
    assert_eq!(app.stop(T), 0, "{}", app.log_text());
}

/// A gigabyte: given longer.
const LONG: Duration = Duration::from_secs(180);

/// A 1 GB database at `state/big.sqlite` of a new state dir (rows of a
/// megabyte) below `root`, in WAL mode or not, and the app's connection.
fn big_database(root: &Path, wal: bool) -> (Dirs, rusqlite::Connection) {
    let dirs = Dirs::new(root, "big");
    let db = dirs.state.join("state/big.sqlite");
    fs::create_dir_all(db.parent().unwrap()).unwrap();
    let app_conn = rusqlite::Connection::open(&db).unwrap();
    app_conn
        .execute_batch(
            "CREATE TABLE t(i INTEGER PRIMARY KEY, b BLOB);
             WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 1000)
             INSERT INTO t(b) SELECT zeroblob(1000000) FROM c;",
        )
        .unwrap();
    if wal {
        app_conn.execute_batch("PRAGMA journal_mode=WAL").unwrap();
    }
    (dirs, app_conn)
}

/// Commits "the last commit", stops `app` and checks the stop was clean
/// by cvm-init's own account (exit 74 and `NotFlushed` if its budget ran
/// out); returns its log and how long it took.
fn commit_and_stop(app: &mut Appliance, conn: &rusqlite::Connection) -> (String, Duration) {
    conn.execute("INSERT INTO t(b) VALUES ('the last commit')", [])
        .unwrap();
    let stopping = Instant::now();
    assert_eq!(app.stop(LONG), 0, "{}", app.log_text());
    let took = stopping.elapsed();
    let log = app.log_text();
    assert!(log.contains("status=Clean"), "{log}");
    (log, took)
}

/// A new container with `env` restores the big database whole, its last
/// row the last commit.
fn the_last_commit_comes_back(s: &Setup, env: &[(&str, &str)]) {
    let b = Dirs::new(s.tmp.path(), "after");
    let mut app = s.start(&b, s.idle.to_str().unwrap(), env);
    app.wait_ready(LONG);
    let c = rusqlite::Connection::open(b.state.join("state/big.sqlite")).unwrap();
    let last: String = c
        .query_row("SELECT b FROM t ORDER BY i DESC LIMIT 1", [], |r| r.get(0))
        .unwrap();
    assert_eq!(last, "the last commit", "the last commit survived the stop");
    let ok: String = c
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(ok, "ok");
    assert_eq!(app.stop(LONG), 0, "{}", app.log_text());
}

fn first_base(app: &mut Appliance) {
    wait_until(LONG, "the first base", || {
        app.log_text()
            .contains("sqlite: snapshot uploaded (base) db=state/big.sqlite")
    });
}

/// A WAL database's base is a whole copy (1 GB here, bases due every
/// second): a stop that comes while one is being taken or uploaded gives
/// it up, and its last pass ships the commit as a segment within budget.
#[test]
fn a_stop_with_a_big_base_in_flight_gives_it_up_and_fits_its_budget() {
    let s = Setup::new();
    let (dirs, app_conn) = big_database(s.tmp.path(), true);
    let env = [
        ("CVM_STORAGE", "replicate"),
        ("CVM_SQLITE_BASE_MAX_AGE", "1s"),
    ];
    let mut app = s.start(&dirs, s.idle.to_str().unwrap(), &env);
    app.wait_ready(LONG);
    first_base(&mut app);
    // A commit after the base is a second old: its segment, then a new base.
    app_conn
        .execute("INSERT INTO t(b) VALUES ('a commit')", [])
        .unwrap();
    wait_until(LONG, "a base in flight", || {
        let log = app.log_text();
        log.matches("sqlite: taking a base db=state/big.sqlite")
            .count()
            > log
                .matches("sqlite: snapshot uploaded (base) db=state/big.sqlite")
                .count()
    });
    let (log, took) = commit_and_stop(&mut app, &app_conn);
    eprintln!("MEASURED: stop with a 1 GB WAL database's base in flight: {took:?}");
    assert!(
        log.contains("sqlite: save interrupted by the stop db=state/big.sqlite"),
        "{log}"
    );
    the_last_commit_comes_back(&s, &env);
}

/// The issue's case: a 1 GB rollback-journal database, a commit, a stop.
/// Its saves are segments of the pages that changed, so the stop's last
/// pass costs a snapshot and a compare, not an upload of the database.
/// Before the stop, the app commits as the issue's did (every 10 ms, no
/// busy timeout); on a file system without clones (the test dir's, ext4
/// here) each save holds the read lock while it reads the whole file,
/// which the count of refused commits shows beside the next test's.
#[test]
fn a_stop_with_a_big_rollback_journal_database_fits_its_budget() {
    let s = Setup::new();
    let (dirs, app_conn) = big_database(s.tmp.path(), false);
    let replicate = [("CVM_STORAGE", "replicate")];
    let mut app = s.start(&dirs, s.idle.to_str().unwrap(), &replicate);
    app.wait_ready(T);
    first_base(&mut app);
    let (tried, refused, saves) = busy_app(&mut app, &app_conn, Duration::from_secs(5), 0);
    let clones = !app.log_text().contains("reads it whole under a read lock");
    eprintln!(
        "MEASURED: 1 GB rollback-journal database, clones={clones}: {refused} of {tried} \
         commits refused over {saves} saves"
    );
    let (_, took) = commit_and_stop(&mut app, &app_conn);
    eprintln!("MEASURED: stop with a 1 GB rollback-journal database: {took:?}");
    the_last_commit_comes_back(&s, &replicate);
}

/// The issue's requirement: a save never holds a lock on the app's
/// database for longer than a small bound, whatever its size. On a file
/// system with clones (XFS here), a save of a rollback-journal database
/// holds its read lock only while it clones the file and reads the clone
/// after: an app committing every 10 ms with no busy timeout almost never
/// finds its 1 GB database locked (the issue saw 392 of 1,239 commits
/// refused, where the lock lasted a copy), and every commit reaches S3.
#[test]
fn on_a_file_system_with_clones_a_save_locks_a_big_database_only_to_clone_it() {
    let s = Setup::new();
    let xfs = common::Xfs::mount(s.tmp.path(), 6 << 30);
    let (dirs, app_conn) = big_database(&xfs.dir, false);
    let replicate = [("CVM_STORAGE", "replicate")];
    let mut app = s.start(&dirs, s.idle.to_str().unwrap(), &replicate);
    app.wait_ready(T);
    first_base(&mut app);
    let (tried, refused, saves) = busy_app(&mut app, &app_conn, Duration::from_secs(10), 3);
    eprintln!(
        "MEASURED: 1 GB rollback-journal database on XFS: {refused} of {tried} commits \
         refused over {saves} saves"
    );
    let log = app.log_text();
    let held: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("sqlite: cloned under the read lock"))
        .filter_map(|l| l.split("took=").nth(1)?.split(' ').next())
        .collect();
    eprintln!(
        "MEASURED: each clone under the read lock took {}",
        held.join(", ")
    );
    assert!(!log.contains("reads it whole under a read lock"), "{log}");
    assert!(saves >= 3, "saves ran meanwhile: {saves}\n{log}");
    assert!(
        refused * 50 <= tried,
        "at most 2% of the app's commits refused: {refused} of {tried}"
    );
    commit_and_stop(&mut app, &app_conn);
    the_last_commit_comes_back(&s, &replicate);
}

/// Commits a small row every 10 ms for `window` with `busy_timeout=0`, as
/// the issue's app did, while `app` saves them, and on (up to six windows)
/// until `saves` segments went up: on a loaded machine saves are slower,
/// and the share refused is what is asserted, not the machine's speed.
/// Returns the commits tried, those refused with "database is locked",
/// and the segments uploaded meanwhile.
fn busy_app(
    app: &mut Appliance,
    conn: &rusqlite::Connection,
    window: Duration,
    saves: usize,
) -> (u32, u32, usize) {
    let segments = |app: &mut Appliance| {
        app.log_text()
            .matches("sqlite: segment uploaded db=state/big.sqlite")
            .count()
    };
    let before = segments(app);
    conn.busy_timeout(Duration::ZERO).unwrap();
    let (mut tried, mut refused) = (0, 0);
    let start = Instant::now();
    let (mut last_look, mut enough) = (start, saves == 0);
    while start.elapsed() < window || (!enough && start.elapsed() < 6 * window) {
        if last_look.elapsed() >= Duration::from_secs(1) {
            enough = segments(app) - before >= saves;
            last_look = Instant::now();
        }
        tried += 1;
        match conn.execute("INSERT INTO t(b) VALUES ('busy')", []) {
            Ok(_) => {}
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::DatabaseBusy =>
            {
                refused += 1
            }
            Err(e) => panic!("commit: {e}"),
        }
        // The app's pace, not a wait for anything.
        std::thread::sleep(Duration::from_millis(10));
    }
    conn.busy_timeout(Duration::from_secs(5)).unwrap();
    (tried, refused, segments(app) - before)
}
