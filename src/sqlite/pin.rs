//! Following a live WAL database's commits without ever missing one.
//!
//! A *pin* is a read transaction cvm-init holds on the database. While it
//! holds one whose snapshot is no newer than what it has read, no checkpoint
//! can copy an unread frame into the database and no writer can restart the
//! WAL over unread frames (SQLite's wal.c: a checkpoint stops at the oldest
//! reader's mark; a restart needs every reader gone). The pin moves by a
//! handoff between two connections: take the new pin, read the WAL to its
//! end, then let go of the old one, so some pin no newer than the read
//! position is held at every instant.
//!
//! Nothing is written to the app's database, no lock beyond a reader's is
//! taken, and neither connection checkpoints or deletes the WAL on close.
//! cvm-init resets the WAL itself (a seal: a PASSIVE checkpoint, then a
//! handoff that leaves the WAL free to restart) once it is long, since the
//! app's own checkpoints can no longer complete past the pin.

use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rusqlite::config::DbConfig;
use rusqlite::{Connection, OpenFlags};

use super::held::{self, Hold};
use super::segment::Segment;
use super::wal::{self, Pos};
use super::{sidecar, sql_err, SqliteError};
use crate::storage::worker::Interrupt;

/// WAL length, in frames, from which cvm-init seals: SQLite's default
/// autocheckpoint, so the WAL peaks where it would without cvm-init.
const SEAL_FRAMES: u32 = 1000;
/// How long a seal under the write lock waits for the app's writer.
const SEAL_LOCK_WAIT: std::time::Duration = std::time::Duration::from_millis(50);

pub struct Tracker {
    db: PathBuf,
    conns: [Connection; 2],
    /// Which connection holds the pin.
    held: Option<usize>,
    pos: Option<Pos>,
    /// Frames in the current WAL incarnation, as far as read.
    wal_frames: u32,
    /// The file opened; after `conns`, so it ends after they close.
    file: Hold,
}

fn open(db: &Path) -> Result<Connection, SqliteError> {
    let c = Connection::open_with_flags(
        db,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(sql_err(db))?;
    // Closing must never checkpoint or delete the WAL: its unread frames
    // are what the next reader needs.
    c.set_db_config(DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, true)
        .map_err(sql_err(db))?;
    Ok(c)
}

impl Tracker {
    /// Opens `db` and pins it; `None` when it is not in WAL mode (a reader
    /// there would block the app's writes, so it is never pinned).
    pub fn open(db: &Path) -> Result<Option<Tracker>, SqliteError> {
        let file = Hold::new(db).map_err(|source| SqliteError::Io {
            path: db.to_owned(),
            source,
        })?;
        let first = open(db)?;
        let mode: String = first
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .map_err(sql_err(db))?;
        if mode != "wal" {
            return Ok(None);
        }
        let mut t = Tracker {
            file,
            db: db.to_owned(),
            conns: [first, open(db)?],
            held: None,
            pos: None,
            wal_frames: 0,
        };
        // The hold is on the file the path named before the open: the
        // connections' file only while the path still names it.
        if !t.same_file() {
            return Err(SqliteError::Replaced {
                path: db.to_owned(),
            });
        }
        t.pin(0)?;
        t.held = Some(0);
        Ok(Some(t))
    }

    fn pin(&self, i: usize) -> Result<(), SqliteError> {
        let c = &self.conns[i];
        c.execute_batch("BEGIN").map_err(sql_err(&self.db))?;
        // The read transaction (and its snapshot) begins at the first read.
        let r = c.query_row("SELECT count(*) FROM sqlite_schema", [], |r| {
            r.get::<_, i64>(0)
        });
        if let Err(e) = r {
            let _ = c.execute_batch("ROLLBACK");
            return Err(sql_err(&self.db)(e));
        }
        Ok(())
    }

    /// Moves the pin to now and returns what was committed since the last
    /// call (the first call: everything in the WAL), or `None`. Seals the
    /// WAL when it has grown long.
    pub fn changes(&mut self) -> Result<Option<Segment>, SqliteError> {
        let mut seg = self.move_pin()?;
        if self.wal_frames >= SEAL_FRAMES {
            // Without a lock first; a WAL that keeps growing because commits
            // slip into every try is sealed under the write lock.
            let more = if self.wal_frames < 2 * SEAL_FRAMES {
                match self.seal() {
                    Ok(true) => self.move_pin(),
                    Ok(false) => Ok(None),
                    Err(e) => Err(e),
                }
            } else {
                self.seal_locked()
            };
            match more {
                Ok(more) => seg = Segment::join(seg, more),
                // What was read is returned all the same; a lost pin is
                // seen by the caller (`lost`).
                Err(e) => {
                    tracing::warn!(db = %self.db.display(), error = %e, "sqlite: seal failed")
                }
            }
        }
        Ok(seg)
    }

    /// A seal no commit can slip into: the free connection takes the write
    /// lock (waiting at most [`SEAL_LOCK_WAIT`]), the WAL is read to its
    /// end, the old pin checkpoints it whole and pins again (on a WAL now
    /// fully copied, so the next writer restarts it), then the lock goes.
    /// The app's writers wait for one checkpoint, as Litestream makes them
    /// wait at each of its checkpoints.
    fn seal_locked(&mut self) -> Result<Option<Segment>, SqliteError> {
        let old = self.pinned()?;
        let lock = 1 - old;
        let c = &self.conns[lock];
        c.busy_timeout(SEAL_LOCK_WAIT).map_err(sql_err(&self.db))?;
        if let Err(e) = c.execute_batch("BEGIN IMMEDIATE") {
            tracing::debug!(db = %self.db.display(), error = %e, "sqlite: seal under lock not taken; later");
            return Ok(None);
        }
        let seg = match self.read() {
            Ok(seg) => seg,
            Err(e) => {
                let _ = self.conns[lock].execute_batch("COMMIT");
                return Err(e);
            }
        };
        // The locked transaction's read, at the WAL's end and all of it
        // read, is the pin while the old one checkpoints and pins again.
        self.held = Some(lock);
        let released = self.conns[old].execute_batch("COMMIT").is_ok();
        let sealed = released && self.checkpoint(old).unwrap_or(false);
        let repin = if released { self.pin(old) } else { Ok(()) };
        let _ = self.conns[lock].execute_batch("COMMIT");
        match repin {
            Ok(()) if released => self.held = Some(old),
            Ok(()) => self.held = None,
            Err(e) => {
                self.held = None;
                return Err(e);
            }
        }
        tracing::debug!(db = %self.db.display(), sealed, "sqlite: sealed under the write lock");
        Ok(seg)
    }

    /// The connection holding the pin, or an error once continuity is lost.
    fn pinned(&self) -> Result<usize, SqliteError> {
        self.held.ok_or_else(|| SqliteError::PinLost {
            path: self.db.clone(),
        })
    }

    /// True once no pin is held: commits may have been missed, and the
    /// database must be followed anew from a new base.
    pub fn lost(&self) -> bool {
        self.held.is_none()
    }

    /// Moves the pin to now without sealing (the handoff), and returns what
    /// it read. Run often: an app checkpoint waiting for cvm-init's reader
    /// (OpenClaw runs TRUNCATE checkpoints, at its stop too) gets through
    /// within two calls, as the new pin lands past the WAL, then off it.
    pub fn move_pin(&mut self) -> Result<Option<Segment>, SqliteError> {
        let old = self.pinned()?;
        let new = 1 - old;
        self.pin(new)?;
        let read = self.read();
        let release = self.conns[old].execute_batch("COMMIT");
        match read {
            Ok(seg) => {
                if let Err(e) = release {
                    tracing::warn!(db = %self.db.display(), error = %e, "sqlite: ending the old pin failed");
                }
                self.held = Some(new);
                Ok(seg)
            }
            Err(e) => {
                // Keep the old pin: its position is still the read position.
                let _ = self.conns[new].execute_batch("COMMIT");
                Err(e)
            }
        }
    }

    /// A PASSIVE checkpoint on the free connection: true when the whole WAL
    /// was copied into the database, so the next move of the pin lets it restart.
    fn seal(&mut self) -> Result<bool, SqliteError> {
        let free = 1 - self.pinned()?;
        self.checkpoint(free)
    }

    fn checkpoint(&self, i: usize) -> Result<bool, SqliteError> {
        let (busy, log, done): (i64, i64, i64) = self.conns[i]
            .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .map_err(sql_err(&self.db))?;
        tracing::debug!(db = %self.db.display(), busy, log, done, "sqlite: seal");
        Ok(busy == 0 && log == done)
    }

    /// Reads the WAL after the position; advances it past what it returns.
    fn read(&mut self) -> Result<Option<Segment>, SqliteError> {
        let path = sidecar(&self.db, "-wal");
        let io = |source| SqliteError::Io {
            path: path.clone(),
            source,
        };
        let mut f = match fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io(e)),
        };
        let mut head = [0u8; wal::HEADER_LEN];
        if f.read_exact(&mut head).is_err() {
            return Ok(None);
        }
        let Some(h) = wal::header(&head) else {
            return Ok(None);
        };
        let (done, seed) = h.resume(self.pos);
        if done == 0 {
            self.wal_frames = 0;
        }
        let start = wal::HEADER_LEN as u64 + u64::from(done) * h.frame_len() as u64;
        f.seek(SeekFrom::Start(start)).map_err(io)?;
        let mut frames = Vec::new();
        f.read_to_end(&mut frames).map_err(io)?;
        let (commits, pos) = h.commits(&frames, done, seed);
        let Some(pos) = pos else {
            return Ok(None);
        };
        self.pos = Some(pos);
        self.wal_frames = pos.frame;
        Ok(Some(Segment {
            page_size: h.page_size,
            db_pages: commits.db_pages,
            pages: commits.pages,
        }))
    }

    /// A consistent copy of the database as of the held pin, which is no
    /// newer than the last [`Tracker::changes`] read and no older than the one
    /// before it. The copy keeps the WAL's page images byte for byte.
    /// Gives up once `interrupt` is raised.
    pub fn base(
        &self,
        dst: &Path,
        interrupt: &Arc<Interrupt>,
    ) -> Result<super::Snapshot, SqliteError> {
        let held = &self.conns[self.pinned()?];
        super::backup_into(held, &self.db, dst, interrupt)
    }

    /// Whether `db` is still the file this tracker follows (not replaced by
    /// a rename, nor deleted).
    pub fn same_file(&self) -> bool {
        held::file_id(&self.db) == Some(self.file.id())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    fn count(db: &Path) -> i64 {
        Connection::open(db)
            .unwrap()
            .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap()
    }

    /// The app writes with autocheckpoints after every commit while another
    /// connection forces TRUNCATE checkpoints in a loop; a base plus every
    /// segment is always the app's database.
    #[test]
    fn no_commit_is_missed_while_the_app_checkpoints_hard() {
        let d = tempfile::tempdir().unwrap();
        let db = d.path().join("app.sqlite");
        let app = Connection::open(&db).unwrap();
        app.pragma_update(None, "journal_mode", "WAL").unwrap();
        app.pragma_update(None, "wal_autocheckpoint", 1).unwrap();
        app.busy_timeout(std::time::Duration::from_secs(5)).unwrap();
        app.execute_batch("CREATE TABLE t(i INTEGER PRIMARY KEY, v BLOB)")
            .unwrap();
        let mut t = Tracker::open(&db).unwrap().expect("WAL mode");
        let base = d.path().join("base.sqlite");
        t.base(&base, &Arc::default()).unwrap();
        let mut segs = Vec::new();

        let stop = Arc::new(AtomicBool::new(false));
        let forcer = {
            let (db, stop) = (db.clone(), stop.clone());
            std::thread::spawn(move || {
                let c = Connection::open(&db).unwrap();
                c.busy_timeout(std::time::Duration::from_millis(100))
                    .unwrap();
                while !stop.load(Ordering::SeqCst) {
                    let _ = c.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()));
                    // A forced checkpoint holds the write lock while it waits
                    // for readers (the pin): back to back they would starve
                    // the app's writes, with or without cvm-init's pin.
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
            })
        };
        for i in 0..3000 {
            app.execute("INSERT INTO t(v) VALUES (randomblob(?1))", [i % 700])
                .unwrap();
            if i % 7 == 0 {
                segs.extend(t.changes().unwrap());
            }
        }
        stop.store(true, Ordering::SeqCst);
        forcer.join().unwrap();
        segs.extend(t.changes().unwrap());

        for s in &segs {
            s.apply(&base).unwrap();
        }
        crate::sqlite::quick_check(&base).unwrap();
        assert_eq!(count(&base), 3000);
        assert_eq!(
            crate::sqlite::content_hash(&base).unwrap().0,
            {
                let copy = d.path().join("copy.sqlite");
                crate::sqlite::snapshot(&db, &copy).unwrap().sha256
            },
            "page for page the app's database"
        );
    }

    #[test]
    fn a_database_not_in_wal_mode_is_never_pinned() {
        let d = tempfile::tempdir().unwrap();
        let db = d.path().join("j.sqlite");
        Connection::open(&db)
            .unwrap()
            .execute_batch("CREATE TABLE t(i)")
            .unwrap();
        assert!(Tracker::open(&db).unwrap().is_none());
    }

    #[test]
    fn the_wal_is_sealed_and_restarts_under_the_pin() {
        let d = tempfile::tempdir().unwrap();
        let db = d.path().join("app.sqlite");
        let app = Connection::open(&db).unwrap();
        app.pragma_update(None, "journal_mode", "WAL").unwrap();
        app.execute_batch("CREATE TABLE t(i INTEGER PRIMARY KEY, v BLOB)")
            .unwrap();
        let mut t = Tracker::open(&db).unwrap().unwrap();
        let base = d.path().join("base.sqlite");
        t.base(&base, &Arc::default()).unwrap();
        let mut segs = Vec::new();
        let wal_len = || fs::metadata(sidecar(&db, "-wal")).unwrap().len();
        let mut peak = 0;
        for i in 0..4000 {
            app.execute("INSERT INTO t(v) VALUES (randomblob(3000))", [])
                .unwrap();
            if i % 50 == 0 {
                segs.extend(t.changes().unwrap());
            }
            peak = peak.max(wal_len());
        }
        segs.extend(t.changes().unwrap());
        assert!(
            peak < 3 * 1000 * 4120,
            "the WAL stays near the autocheckpoint size: {peak}"
        );
        for s in &segs {
            s.apply(&base).unwrap();
        }
        assert_eq!(count(&base), 4000);
    }
    /// The app of the test below, as its own process: commits once, says
    /// so, commits again when told, and closes. Without its variable (a
    /// plain `--ignored` run) it does nothing.
    #[test]
    #[ignore = "the app process of the_apps_last_close_leaves_the_unread_commits_after_a_header_read"]
    fn app_process() {
        use std::io::BufRead;
        let Some(db) = std::env::var_os("CVM_TEST_APP_DB") else {
            return;
        };
        let c = Connection::open(db).unwrap();
        c.pragma_update(None, "journal_mode", "WAL").unwrap();
        c.execute_batch(
            "CREATE TABLE t(i INTEGER PRIMARY KEY, v BLOB);
             INSERT INTO t(v) VALUES (randomblob(3000));",
        )
        .unwrap();
        // After libtest's "test … " on the same line.
        println!("committed");
        std::io::stdin()
            .lock()
            .read_line(&mut String::new())
            .unwrap();
        c.execute("INSERT INTO t(v) VALUES (randomblob(3000))", [])
            .unwrap();
        c.close().unwrap();
    }

    /// POSIX locks are per process, so the app here is another process (this
    /// test binary, running `app_process`). A header read of the followed
    /// database (the rescan's) must not drop the pin's lock: the app's last
    /// connection, closing, would take the exclusive lock, checkpoint the
    /// WAL past the pin and delete it.
    #[test]
    fn the_apps_last_close_leaves_the_unread_commits_after_a_header_read() {
        use std::io::{BufRead, Write};
        let d = tempfile::tempdir().unwrap();
        let db = d.path().join("app.sqlite");
        let mut app = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "sqlite::pin::tests::app_process"])
            .args(["--ignored", "--nocapture", "--test-threads=1"])
            .env("CVM_TEST_APP_DB", &db)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = std::io::BufReader::new(app.stdout.take().unwrap());
        let said = out
            .by_ref()
            .lines()
            .map_while(Result::ok)
            .any(|l| l.ends_with("committed"));
        assert!(said, "the app process committed");

        let mut t = Tracker::open(&db).unwrap().expect("WAL mode");
        let base = d.path().join("base.sqlite");
        t.base(&base, &Arc::default()).unwrap();
        let mut segs: Vec<_> = t.changes().unwrap().into_iter().collect();
        for _ in 0..3 {
            assert!(crate::sqlite::is_sqlite(&db).unwrap());
        }
        writeln!(app.stdin.take().unwrap()).unwrap();
        std::io::copy(&mut out, &mut std::io::sink()).unwrap();
        assert!(app.wait().unwrap().success());

        assert!(sidecar(&db, "-wal").exists(), "the WAL is left to the pin");
        segs.extend(t.changes().unwrap());
        for s in &segs {
            s.apply(&base).unwrap();
        }
        assert_eq!(count(&base), 2, "the commit made before the close is read");
    }
}
