//! Following a database in a rollback-journal mode (not WAL), whose
//! commits leave no frames to read. Each save takes a consistent snapshot
//! (SQLite's backup API, as a whole-database save does) and compares it
//! page by page with the previous one, kept on local disk (the *mirror*):
//! the pages that differ are the segment, as a WAL database's are. A base is
//! a copy of the mirror, so it takes no lock on the app's database.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use rusqlite::backup::Backup;
use rusqlite::{Connection, OpenFlags};

use super::held::{self, Hold};
use super::segment::Segment;
use super::{io_err, read_full, sidecar, sql_err, SqliteError, BUSY_TIMEOUT};

pub struct Differ {
    db: PathBuf,
    conn: Connection,
    /// The database as of the last segment (or the open).
    mirror: PathBuf,
    /// Content hash of the mirror at the open.
    opened: [u8; 32],
    /// The file opened; after `conn`, so it ends after the connection closes.
    file: Hold,
}

impl Differ {
    /// Snapshots `db` into `mirror`: changes are counted from this state.
    pub fn open(db: &Path, mirror: PathBuf) -> Result<Differ, SqliteError> {
        let file = Hold::new(db).map_err(io_err(db))?;
        let conn = Connection::open_with_flags(
            db,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(sql_err(db))?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(sql_err(db))?;
        // The hold is on the file the path named before the open: the
        // connection's file only while the path still names it.
        if held::file_id(db) != Some(file.id()) {
            return Err(SqliteError::Replaced {
                path: db.to_owned(),
            });
        }
        let snap = super::snapshot(db, &mirror)?;
        Ok(Differ {
            db: db.to_owned(),
            conn,
            mirror,
            opened: snap.sha256,
            file,
        })
    }

    /// Content hash of the state changes were first counted from.
    pub fn sha256(&self) -> [u8; 32] {
        self.opened
    }

    /// The pages committed since the last call (or the open), or `None`.
    /// Gives up (`Interrupted`) once `interrupt` is set.
    pub fn changes(&mut self, interrupt: &AtomicBool) -> Result<Option<Segment>, SqliteError> {
        let next = sidecar(&self.mirror, ".next");
        let _ = fs::remove_file(&next);
        let seg = copy(&self.conn, &self.db, &next, interrupt)
            .and_then(|()| diff(&self.mirror, &next, REWRITE_BYTES, interrupt));
        let seg = match seg {
            Ok(Some(seg)) if seg.pages.is_empty() => {
                let _ = fs::remove_file(&next);
                return Ok(None);
            }
            Ok(seg) => seg,
            Err(e) => {
                let _ = fs::remove_file(&next);
                return Err(e);
            }
        };
        fs::rename(&next, &self.mirror).map_err(io_err(&self.mirror))?;
        seg.map(Some).ok_or_else(|| SqliteError::Rewritten {
            path: self.db.clone(),
        })
    }

    /// A base: the mirror, copied to `dst` (not begun once `interrupt` is set).
    pub fn base(&self, dst: &Path, interrupt: &AtomicBool) -> Result<super::Snapshot, SqliteError> {
        if interrupt.load(Ordering::SeqCst) {
            return Err(SqliteError::Interrupted {
                path: self.db.clone(),
            });
        }
        if let Some(parent) = dst.parent() {
            fs::create_dir_all(parent).map_err(io_err(parent))?;
        }
        fs::copy(&self.mirror, dst).map_err(io_err(dst))?;
        let (sha256, bytes) = super::content_hash(dst)?;
        Ok(super::Snapshot {
            path: dst.to_owned(),
            sha256,
            bytes,
        })
    }

    /// Whether `db` is still the file opened and still not in WAL mode (a
    /// switch to WAL is followed from its WAL, on a new line).
    pub fn same_file(&self) -> bool {
        held::file_id(&self.db) == Some(self.file.id()) && !super::in_wal_mode(&self.db)
    }
}

/// Copies the database `conn` reads into the new file `dst`, consistent:
/// one read transaction over the whole copy (in a rollback-journal mode no
/// commit can land while it is held), in steps, giving up once `interrupt`
/// is set. No check and no fsync: the copy is compared and dropped, or
/// kept as the local mirror, which a restart rebuilds.
fn copy(
    conn: &Connection,
    src: &Path,
    dst: &Path,
    interrupt: &AtomicBool,
) -> Result<(), SqliteError> {
    conn.execute_batch("BEGIN").map_err(sql_err(src))?;
    let copied = (|| {
        conn.query_row("SELECT count(*) FROM sqlite_schema", [], |r| {
            r.get::<_, i64>(0)
        })
        .map_err(sql_err(src))?;
        let mut to = Connection::open(dst).map_err(sql_err(dst))?;
        let backup = Backup::new(conn, &mut to).map_err(sql_err(src))?;
        super::step_all(&backup, src, interrupt)
    })();
    let _ = conn.execute_batch("COMMIT");
    copied
}

/// Changed pages held in memory at most; beyond, the change (a VACUUM, a
/// bulk rewrite) goes up as a new base instead of a segment.
const REWRITE_BYTES: usize = 64 << 20;

/// The segment that turns the database `old` into `new`: every page of
/// `new` that differs from `old`'s (all of them when the page size
/// changed), and `new`'s size; `None` once more than `limit` bytes differ.
fn diff(
    old: &Path,
    new: &Path,
    limit: usize,
    interrupt: &AtomicBool,
) -> Result<Option<Segment>, SqliteError> {
    let page_size = super::page_size(new)?;
    let same_size = super::page_size(old).ok() == Some(page_size);
    let size = page_size as usize;
    let mut a = io::BufReader::with_capacity(1 << 20, fs::File::open(old).map_err(io_err(old))?);
    let mut b = io::BufReader::with_capacity(1 << 20, fs::File::open(new).map_err(io_err(new))?);
    let (mut pa, mut pb) = (vec![0u8; size], vec![0u8; size]);
    let mut pages = std::collections::BTreeMap::new();
    let mut pgno = 0u32;
    loop {
        let got = read_full(&mut b, &mut pb).map_err(io_err(new))?;
        if got == 0 {
            break;
        }
        pgno += 1;
        if pgno % super::STEP_PAGES as u32 == 0 && interrupt.load(Ordering::SeqCst) {
            return Err(SqliteError::Interrupted {
                path: new.to_owned(),
            });
        }
        let had = if same_size {
            read_full(&mut a, &mut pa).map_err(io_err(old))?
        } else {
            0
        };
        if had != size || pa[..] != pb[..] {
            if (pages.len() + 1) * size > limit {
                return Ok(None);
            }
            pages.insert(pgno, pb[..got].to_vec());
        }
    }
    Ok(Some(Segment {
        page_size,
        db_pages: pgno,
        pages,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rusqlite::Connection;

    fn rows(db: &Path) -> i64 {
        Connection::open(db)
            .unwrap()
            .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap()
    }

    #[test]
    fn changed_pages_applied_to_a_base_give_the_database() {
        let d = tempfile::tempdir().unwrap();
        let db = d.path().join("app.sqlite");
        let app = Connection::open(&db).unwrap();
        app.execute_batch("CREATE TABLE t(x); INSERT INTO t VALUES (zeroblob(100000));")
            .unwrap();
        let mut f = Differ::open(&db, d.path().join("mirror")).unwrap();
        let go = AtomicBool::new(false);
        let base = f
            .base(&d.path().join("base"), &AtomicBool::new(false))
            .unwrap();
        assert!(f.changes(&go).unwrap().is_none(), "nothing changed");

        app.execute("INSERT INTO t VALUES ('one more')", [])
            .unwrap();
        let seg = f.changes(&go).unwrap().expect("a change");
        assert!(
            seg.pages.len() < seg.db_pages as usize / 2,
            "only what changed: {} of {} pages",
            seg.pages.len(),
            seg.db_pages
        );
        seg.apply(&base.path).unwrap();
        assert_eq!(rows(&base.path), 2);

        // Shrinking: a VACUUM after a delete.
        app.execute_batch("DELETE FROM t WHERE rowid = 1; VACUUM;")
            .unwrap();
        f.changes(&go)
            .unwrap()
            .expect("a change")
            .apply(&base.path)
            .unwrap();
        assert_eq!(rows(&base.path), 1);
        // A snapshot's schema cookie is its own (the backup API sets it), so
        // the base matches a snapshot of the database, not its file.
        let now = super::super::snapshot(&db, &d.path().join("now")).unwrap();
        assert_eq!(
            super::super::content_hash(&base.path).unwrap().0,
            now.sha256
        );
        assert!(f.same_file());
        // Past the limit, no segment: the engine takes a new base.
        let old = d.path().join("old");
        fs::copy(&base.path, &old).unwrap();
        app.execute("UPDATE t SET x = zeroblob(100001)", [])
            .unwrap();
        let next = d.path().join("next");
        super::super::snapshot(&db, &next).unwrap();
        assert!(diff(&old, &next, 8 * 4096, &go).unwrap().is_none());
        assert!(diff(&old, &next, 1 << 20, &go).unwrap().is_some());
        // The stop's flag ends a save early; nothing is lost by it.
        app.execute("INSERT INTO t VALUES ('after the flag')", [])
            .unwrap();
        let stop = AtomicBool::new(true);
        assert!(matches!(
            f.changes(&stop),
            Err(SqliteError::Interrupted { .. })
        ));
        f.changes(&go).unwrap().expect("the change, next time");
        app.pragma_update(None, "journal_mode", "WAL").unwrap();
        assert!(!f.same_file(), "a switch to WAL ends the line");
    }
}
