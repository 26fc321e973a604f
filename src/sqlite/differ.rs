//! Following a database in a rollback-journal mode (not WAL), whose
//! commits leave no frames to read. Each save reads the database file in
//! one read transaction and compares it page by page with the previous
//! state, kept on local disk (the *mirror*, the file byte for byte): the
//! pages that differ are the segment, as a WAL database's are. A base is a
//! copy of the mirror, so it takes no lock on the app's database.
//!
//! On XFS and btrfs, whose clones (reflinks) take as long as writing back
//! the file's dirty pages and copying its extent map, the read transaction
//! lasts only while the file is cloned, and the clone is read after it.
//! Elsewhere the file itself is read in the transaction, and the app's
//! commits wait for that read: ext4 makes no clones, and ZFS refuses to
//! clone blocks written since its last transaction group, or waits for that
//! group (seconds, with `zfs_bclone_wait_dirty`), which the lock would last.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

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
    /// Whether the database's file system may make clones: until one is
    /// refused for a reason that does not pass.
    clones: bool,
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
        if let Some(parent) = mirror.parent() {
            fs::create_dir_all(parent).map_err(io_err(parent))?;
        }
        let mut clones = clones_quickly(db);
        if !clones {
            reads_under_lock(db, &"no quick clones on its file system");
        }
        at_one_moment(
            &conn,
            db,
            &mirror,
            &mut clones,
            |live, page_size, db_pages| {
                copy(live, page_size, db_pages, &mirror, &AtomicBool::new(false))
            },
        )?;
        let (opened, _) = super::content_hash(&mirror)?;
        Ok(Differ {
            db: db.to_owned(),
            conn,
            mirror,
            opened,
            file,
            clones,
        })
    }

    /// Content hash of the state changes were first counted from.
    pub fn sha256(&self) -> [u8; 32] {
        self.opened
    }

    /// The pages committed since the last call (or the open), or `None`.
    /// Gives up (`Interrupted`) once `interrupt` is set.
    pub fn changes(&mut self, interrupt: &AtomicBool) -> Result<Option<Segment>, SqliteError> {
        let mirror = &self.mirror;
        let read = at_one_moment(
            &self.conn,
            &self.db,
            mirror,
            &mut self.clones,
            |live, page_size, db_pages| {
                diff(live, mirror, page_size, db_pages, REWRITE_BYTES, interrupt)
            },
        );
        match read? {
            Some(seg) if seg.pages.is_empty() => Ok(None),
            Some(seg) => {
                seg.apply(&self.mirror).map_err(io_err(&self.mirror))?;
                Ok(Some(seg))
            }
            // Too much changed to hold: the mirror is copied afresh, to be
            // the next base.
            None => {
                let next = sidecar(&self.mirror, ".next");
                let copied = at_one_moment(
                    &self.conn,
                    &self.db,
                    &self.mirror,
                    &mut self.clones,
                    |live, page_size, db_pages| copy(live, page_size, db_pages, &next, interrupt),
                );
                if let Err(e) = copied {
                    let _ = fs::remove_file(&next);
                    return Err(e);
                }
                fs::rename(&next, &self.mirror).map_err(io_err(&self.mirror))?;
                Err(SqliteError::Rewritten {
                    path: self.db.clone(),
                })
            }
        }
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

/// Changed pages held in memory at most; beyond, the change (a VACUUM, a
/// bulk rewrite) goes up as a new base instead of a segment.
const REWRITE_BYTES: usize = 64 << 20;

/// Pages read from the database at a time.
const READ_PAGES: usize = 256;

/// Runs `read` on the database `db` as of one moment, with its page size
/// and page count: on a clone of the file made in a read transaction of
/// `conn` while `clones` holds (made beside `mirror`, on the same file
/// system as the scratch dir, and removed after), else on the file itself
/// within the transaction. A clone refused for good (no reflinks here, or
/// another file system) clears `clones`, once, with a line in the log.
fn at_one_moment<T>(
    conn: &Connection,
    db: &Path,
    mirror: &Path,
    clones: &mut bool,
    read: impl FnOnce(&fs::File, u32, u32) -> io::Result<T>,
) -> Result<T, SqliteError> {
    if *clones {
        let at = sidecar(mirror, ".clone");
        let (cloned, took, page_size, db_pages) =
            in_read_txn(conn, db, |live, page_size, db_pages| {
                let started = std::time::Instant::now();
                let cloned = clone(live, &at);
                Ok((cloned, started.elapsed(), page_size, db_pages))
            })?;
        // Most of the lock's length (the rest is reading two header fields).
        tracing::debug!(db = %db.display(), took = ?took, ok = cloned.is_ok(), "sqlite: cloned under the read lock");
        match cloned {
            Ok(file) => {
                let r = read(&file, page_size, db_pages);
                let _ = fs::remove_file(&at);
                return r.map_err(read_err(db));
            }
            Err(e) => {
                let _ = fs::remove_file(&at);
                if refused_for_good(&e) {
                    *clones = false;
                    reads_under_lock(db, &e);
                } else {
                    tracing::debug!(db = %db.display(), error = %e, "sqlite: clone refused; this save reads the file under the lock");
                }
            }
        }
    }
    in_read_txn(conn, db, read)
}

/// Whether `db` is on a file system whose clones take no longer than
/// writing back its dirty pages (XFS, btrfs).
fn clones_quickly(db: &Path) -> bool {
    const XFS: u32 = 0x5846_5342;
    const BTRFS: u32 = 0x9123_683e;
    held::with_file(db, |f| Ok(rustix::fs::fstatfs(f)?.f_type)).is_ok_and(|t| {
        [XFS, BTRFS]
            .iter()
            .any(|&m| t == rustix::fs::FsWord::from(m))
    })
}

/// Says, as a database starts being followed, that its saves lock it for
/// a whole read.
fn reads_under_lock(db: &Path, why: &dyn std::fmt::Display) {
    tracing::info!(db = %db.display(), reason = %why,
        "sqlite: each save of this rollback-journal database reads it whole under a read lock, which the app's commits wait for (WAL mode needs no lock)");
}

/// A clone of `live` at `dst` (replaced), sharing its blocks: made in the
/// time it takes to write back the file's dirty pages and copy its extent
/// map, whatever its size.
fn clone(live: &fs::File, dst: &Path) -> io::Result<fs::File> {
    let out = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(dst)?;
    rustix::fs::ioctl_ficlone(&out, live)?;
    Ok(out)
}

/// Whether a refused clone will be refused every time: the file system
/// has them switched off, or the scratch dir is on another one. Anything
/// else may pass by the next save.
fn refused_for_good(e: &io::Error) -> bool {
    use rustix::io::Errno;
    [
        Errno::OPNOTSUPP,
        Errno::XDEV,
        Errno::INVAL,
        Errno::NOTTY,
        Errno::NOSYS,
    ]
    .contains(&Errno::from_io_error(e).unwrap_or(Errno::IO))
}

/// An error reading the database: `Interrupted` (the stop's flag) is the
/// save given up.
fn read_err(db: &Path) -> impl FnOnce(io::Error) -> SqliteError + '_ {
    move |e| match e.kind() {
        io::ErrorKind::Interrupted => SqliteError::Interrupted {
            path: db.to_owned(),
        },
        _ => io_err(db)(e),
    }
}

/// Runs `read` on the database file `db` with its page size and page
/// count, in one read transaction of `conn`: in a rollback-journal mode no
/// commit can land while it is held, so the file is the database as of one
/// moment. The lock lasts one read of the file, not a copy of it through
/// SQLite's backup API (which also writes the copy).
fn in_read_txn<T>(
    conn: &Connection,
    db: &Path,
    read: impl FnOnce(&fs::File, u32, u32) -> io::Result<T>,
) -> Result<T, SqliteError> {
    conn.execute_batch("BEGIN").map_err(sql_err(db))?;
    let r = (|| {
        // The first read takes the lock (rolling back a hot journal).
        let (page_size, db_pages): (u32, u32) = conn
            .query_row(
                "SELECT (SELECT page_size FROM pragma_page_size), \
                        (SELECT page_count FROM pragma_page_count)",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .map_err(sql_err(db))?;
        // Switched to WAL since the open: the file alone is not the
        // database; the next save starts a line from its WAL.
        if super::in_wal_mode(db) {
            return Err(SqliteError::Replaced {
                path: db.to_owned(),
            });
        }
        held::with_file(db, |live| read(live, page_size, db_pages)).map_err(read_err(db))
    })();
    let _ = conn.execute_batch("COMMIT");
    r
}

/// Copies the `db_pages` pages of `live` into a new file `dst`; an
/// `Interrupted` error once `interrupt` is set. No fsync: the copy is the
/// local mirror, which a restart rebuilds.
fn copy(
    live: &fs::File,
    page_size: u32,
    db_pages: u32,
    dst: &Path,
    interrupt: &AtomicBool,
) -> io::Result<()> {
    let mut out = io::BufWriter::with_capacity(1 << 20, fs::File::create(dst)?);
    read_pages(live, page_size, db_pages, interrupt, |chunk| {
        out.write_all(chunk)?;
        Ok(true)
    })?;
    out.flush()
}

/// Reads the `db_pages` pages of `live` in order, [`READ_PAGES`] at a time,
/// into `each` until it returns `false`; an `Interrupted` error once
/// `interrupt` is set.
fn read_pages(
    live: &fs::File,
    page_size: u32,
    db_pages: u32,
    interrupt: &AtomicBool,
    mut each: impl FnMut(&[u8]) -> io::Result<bool>,
) -> io::Result<()> {
    let size = page_size as usize;
    let mut chunk = vec![0u8; READ_PAGES * size];
    let mut pgno = 0u32;
    while pgno < db_pages {
        if interrupt.load(Ordering::SeqCst) {
            return Err(io::ErrorKind::Interrupted.into());
        }
        let n = (db_pages - pgno).min(READ_PAGES as u32);
        let chunk = &mut chunk[..n as usize * size];
        live.read_exact_at(chunk, u64::from(pgno) * size as u64)?;
        if !each(chunk)? {
            break;
        }
        pgno += n;
    }
    Ok(())
}

/// The segment that turns the file `mirror` into `live` (`db_pages` pages
/// of `page_size`): every page that differs (all of them when the mirror's
/// page size is another), and the size; `None` once more than `limit`
/// bytes differ. An `Interrupted` error once `interrupt` is set.
fn diff(
    live: &fs::File,
    mirror: &Path,
    page_size: u32,
    db_pages: u32,
    limit: usize,
    interrupt: &AtomicBool,
) -> io::Result<Option<Segment>> {
    let same_size = super::page_size(mirror).ok() == Some(page_size);
    let size = page_size as usize;
    let mut old = io::BufReader::with_capacity(1 << 20, fs::File::open(mirror)?);
    let mut pa = vec![0u8; size];
    let mut pages = std::collections::BTreeMap::new();
    let (mut pgno, mut over) = (0u32, false);
    read_pages(live, page_size, db_pages, interrupt, |chunk| {
        for page in chunk.chunks(size) {
            pgno += 1;
            let had = if same_size {
                read_full(&mut old, &mut pa)?
            } else {
                0
            };
            if had != size || pa[..] != page[..] {
                if (pages.len() + 1) * size > limit {
                    over = true;
                    return Ok(false);
                }
                pages.insert(pgno, page.to_vec());
            }
        }
        Ok(true)
    })?;
    if over {
        return Ok(None);
    }
    Ok(Some(Segment {
        page_size,
        db_pages,
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
    fn a_clone_refused_for_good_ends_the_clones() {
        use rustix::io::Errno;
        for (errno, for_good) in [
            (Errno::OPNOTSUPP, true), // no clones, or switched off
            (Errno::XDEV, true),      // the scratch dir on another file system
            (Errno::INVAL, true),
            (Errno::AGAIN, false), // blocks still being written
            (Errno::NOSPC, false),
            (Errno::IO, false),
        ] {
            let e = io::Error::from_raw_os_error(errno.raw_os_error());
            assert_eq!(refused_for_good(&e), for_good, "{e}");
        }
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
        // Pages are read from the file: the base is the file, byte for byte.
        assert_eq!(fs::read(&base.path).unwrap(), fs::read(&db).unwrap());
        assert!(f.same_file());
        // Past the limit, no segment: the engine takes a new base.
        let old = d.path().join("old");
        fs::copy(&base.path, &old).unwrap();
        app.execute("UPDATE t SET x = zeroblob(100001)", [])
            .unwrap();
        let diff_within = |limit| {
            in_read_txn(&f.conn, &db, |live, size, pages| {
                diff(live, &old, size, pages, limit, &go)
            })
            .unwrap()
        };
        assert!(diff_within(8 * 4096).is_none());
        assert!(diff_within(1 << 20).is_some());
        // A rewrite past the engine's limit leaves the mirror the database,
        // the next base.
        app.execute_batch("UPDATE t SET x = randomblob(70000000)")
            .unwrap();
        assert!(matches!(f.changes(&go), Err(SqliteError::Rewritten { .. })));
        let next = f.base(&d.path().join("next"), &go).unwrap();
        assert_eq!(rows(&next.path), 1);
        assert!(f.changes(&go).unwrap().is_none(), "nothing changed since");
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
        assert!(
            matches!(f.changes(&go), Err(SqliteError::Replaced { .. })),
            "the file alone is no longer the database"
        );
    }
}
