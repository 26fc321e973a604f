//! SQLite handling: which files are databases, consistent snapshots of live
//! ones, and checks. Never copies a live database file (docs/facts.md §3).

pub mod backup;
pub mod differ;
pub mod held;
pub mod history;
pub mod line;
pub mod patterns;
pub mod pin;
pub mod restore;
pub mod segment;
pub mod source;
pub mod wal;

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rusqlite::backup::{Backup, StepResult};
use rusqlite::{Connection, OpenFlags};
use sha2::{Digest, Sha256};

use crate::storage::worker::Interrupt;

pub use patterns::Patterns;

const HEADER: &[u8; 16] = b"SQLite format 3\0";

/// Sidecar suffixes of a database; they are part of the live database and
/// never uploaded as files.
pub const SIDECARS: [&str; 3] = ["-wal", "-shm", "-journal"];

#[derive(Debug, thiserror::Error)]
pub enum SqliteError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path}: {source}")]
    Sqlite {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("{path}: replaced while cvm-init opened it; opened again at the next save")]
    Replaced { path: PathBuf },
    #[error("{path}: cvm-init lost its hold on the WAL; following it anew from a new base")]
    PinLost { path: PathBuf },
    #[error("{path}: interrupted by the stop")]
    Interrupted { path: PathBuf },
    #[error("{path}: most of the database was rewritten; it goes up as a new base")]
    Rewritten { path: PathBuf },
    #[error("{path}: the source stayed busy; snapshot not taken")]
    Busy { path: PathBuf },
    #[error("{path}: integrity check failed: {detail}")]
    Corrupt { path: PathBuf, detail: String },
}

impl SqliteError {
    /// Whether the app's lock kept cvm-init out (a write transaction held
    /// open, or `locking_mode=EXCLUSIVE`), not a fault of the file.
    pub fn is_locked(&self) -> bool {
        match self {
            SqliteError::Busy { .. } => true,
            SqliteError::Sqlite { source, .. } => matches!(
                source.sqlite_error_code(),
                Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
            ),
            _ => false,
        }
    }
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> SqliteError + '_ {
    move |source| SqliteError::Io {
        path: path.to_owned(),
        source,
    }
}

fn sql_err(path: &Path) -> impl FnOnce(rusqlite::Error) -> SqliteError + '_ {
    move |source| SqliteError::Sqlite {
        path: path.to_owned(),
        source,
    }
}

/// Whether `path` starts with the SQLite header. An empty file is not
/// counted: SQLite would treat it as an empty database, but so would any file.
pub fn is_sqlite(path: &Path) -> io::Result<bool> {
    let (buf, n) = head::<16>(path)?;
    Ok(n == 16 && &buf == HEADER)
}

/// Fills `buf` from `r` as far as `r` goes; returns the bytes read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// The first `N` bytes of the file at `path` (fewer when it is shorter),
/// read without dropping SQLite's locks on it ([`held`]).
fn head<const N: usize>(path: &Path) -> io::Result<([u8; N], usize)> {
    let mut buf = [0u8; N];
    let n = held::read_head(path, &mut buf)?;
    Ok((buf, n))
}

/// The page size a database file's header gives.
fn page_size(path: &Path) -> Result<u32, SqliteError> {
    let (h, n) = head::<18>(path).map_err(io_err(path))?;
    match u16::from_be_bytes([h[16], h[17]]) {
        _ if n < 18 => Err(SqliteError::Corrupt {
            path: path.to_owned(),
            detail: "shorter than a database header".into(),
        }),
        1 => Ok(65536),
        size => Ok(u32::from(size)),
    }
}

/// Whether the database file's header says WAL mode (file format 2).
fn in_wal_mode(path: &Path) -> bool {
    head::<20>(path).is_ok_and(|(h, n)| n == 20 && h[18] == 2 && h[19] == 2)
}

/// Whether `name` is a sidecar of some database rather than a database.
pub fn is_sidecar(name: &str) -> bool {
    SIDECARS.iter().any(|s| name.ends_with(s))
}

pub fn sidecar(db: &Path, suffix: &str) -> PathBuf {
    let mut s = db.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// What the database and its WAL look like on disk: any commit changes it
/// (a WAL commit grows or rewrites the `-wal`; a rollback-journal commit
/// rewrites the database file). Costs two `stat` calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Fingerprint {
    db: Option<(u64, SystemTime)>,
    wal: Option<(u64, SystemTime)>,
}

impl Fingerprint {
    pub fn of(db: &Path) -> Fingerprint {
        let stat = |p: &Path| {
            fs::metadata(p)
                .ok()
                .map(|m| (m.len(), m.modified().unwrap_or(SystemTime::UNIX_EPOCH)))
        };
        Fingerprint {
            db: stat(db),
            wal: stat(&sidecar(db, "-wal")),
        }
    }

    pub fn exists(&self) -> bool {
        self.db.is_some()
    }
}

/// A verified snapshot on local disk, ready to upload.
#[derive(Debug)]
pub struct Snapshot {
    pub path: PathBuf,
    pub sha256: [u8; 32],
    pub bytes: u64,
}

/// How long a snapshot waits for a writer holding an exclusive lock.
const BUSY_TIMEOUT: Duration = Duration::from_secs(2);

/// Takes a consistent snapshot of the live database `src` into `dst` with
/// SQLite's online backup API in one step, makes it a self-contained
/// rollback-journal database, fsyncs it and checks it. `dst` is replaced.
pub fn snapshot(src: &Path, dst: &Path) -> Result<Snapshot, SqliteError> {
    if let Some(parent) = dst.parent() {
        fs::create_dir_all(parent).map_err(io_err(parent))?;
    }
    let tmp = sidecar(dst, ".tmp");
    let _ = fs::remove_file(&tmp);
    {
        // Registered first, so a header read elsewhere in this process
        // cannot drop this connection's locks mid-copy (`held`).
        let _hold = held::Hold::new(src).map_err(io_err(src))?;
        // Read-write open (no create) so a WAL database can be read while
        // its writer runs; nothing is written to the source.
        let from = Connection::open_with_flags(
            src,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(sql_err(src))?;
        from.busy_timeout(BUSY_TIMEOUT).map_err(sql_err(src))?;
        copy_out(&from, src, &tmp, None)?;
    }
    finish_snapshot(&tmp, dst)
}

/// Syncs the copy `tmp`, hashes it and renames it to `dst`.
fn finish_snapshot(tmp: &Path, dst: &Path) -> Result<Snapshot, SqliteError> {
    let f = fs::File::open(tmp).map_err(io_err(tmp))?;
    f.sync_all().map_err(io_err(tmp))?;
    let (sha256, bytes) = content_hash(tmp)?;
    fs::rename(tmp, dst).map_err(io_err(dst))?;
    Ok(Snapshot {
        path: dst.to_owned(),
        sha256,
        bytes,
    })
}

/// Copies the database `from` reads (as of its open read transaction, if it
/// has one) into a new self-contained file `tmp` in rollback-journal mode,
/// page for page, and checks it. Without `interrupt`, one step copies every
/// page under a single read transaction: a consistent snapshot even while
/// the writer commits. With it, `from` must hold a read transaction (a
/// tracker's pin): the copy goes in steps, and it and the check give up once
/// `interrupt` is raised.
fn copy_out(
    from: &Connection,
    src: &Path,
    tmp: &Path,
    interrupt: Option<&Arc<Interrupt>>,
) -> Result<(), SqliteError> {
    let mut to = Connection::open(tmp).map_err(sql_err(tmp))?;
    {
        let backup = Backup::new(from, &mut to).map_err(sql_err(src))?;
        match interrupt {
            Some(i) => step_all(&backup, src, i.flag())?,
            None => match backup.step(-1).map_err(sql_err(src))? {
                StepResult::Done => {}
                _ => {
                    return Err(SqliteError::Busy {
                        path: src.to_owned(),
                    })
                }
            },
        }
    }
    to.pragma_update(None, "journal_mode", "DELETE")
        .map_err(sql_err(tmp))?;
    if let Some(i) = interrupt {
        let i = i.clone();
        to.progress_handler(10_000, Some(move || i.is_raised()));
    }
    let checked = quick_check_conn(&to, tmp);
    if interrupt.is_some_and(|i| i.is_raised()) {
        return Err(SqliteError::Interrupted {
            path: src.to_owned(),
        });
    }
    checked
}

/// Pages a stepped copy copies between looks at the stop's flag.
pub(crate) const STEP_PAGES: i32 = 1024;

/// Runs `backup` to its end in steps, giving up once `interrupt` is set.
/// Consistent only while the source connection holds one read transaction
/// over all the steps.
pub(crate) fn step_all(
    backup: &Backup,
    src: &Path,
    interrupt: &AtomicBool,
) -> Result<(), SqliteError> {
    loop {
        if interrupt.load(Ordering::SeqCst) {
            return Err(SqliteError::Interrupted {
                path: src.to_owned(),
            });
        }
        match backup.step(STEP_PAGES).map_err(sql_err(src))? {
            StepResult::Done => return Ok(()),
            StepResult::More => {}
            _ => {
                return Err(SqliteError::Busy {
                    path: src.to_owned(),
                })
            }
        }
    }
}

/// [`snapshot`] through a tracker's pin (an open read transaction), giving
/// up once `interrupt` is raised.
pub(crate) fn backup_into(
    from: &Connection,
    src: &Path,
    dst: &Path,
    interrupt: &Arc<Interrupt>,
) -> Result<Snapshot, SqliteError> {
    if let Some(parent) = dst.parent() {
        fs::create_dir_all(parent).map_err(io_err(parent))?;
    }
    let tmp = sidecar(dst, ".tmp");
    let _ = fs::remove_file(&tmp);
    copy_out(from, src, &tmp, Some(interrupt))?;
    finish_snapshot(&tmp, dst)
}

/// Header fields that change when a database is merely reopened or switched
/// between journal modes, not when its content changes: file format versions
/// (18..20, WAL or rollback), change counter (24..28), version-valid-for and
/// library version (92..100).
const VOLATILE_HEADER: [std::ops::Range<usize>; 3] = [18..20, 24..28, 92..100];

/// SHA-256 of a database file with the volatile header fields zeroed, so the
/// same pages give the same hash whether the file was restored, reopened in
/// WAL mode, or snapshotted again. Returns the hash and the file size.
pub fn content_hash(path: &Path) -> Result<([u8; 32], u64), SqliteError> {
    let len = fs::metadata(path).map_err(io_err(path))?.len();
    Ok((content_hash_before(path, len, &BTreeMap::new())?, len))
}

/// [`content_hash`] of the file at `path` as it was before pages were
/// written over: `before` holds what was at each page's offset, and `len`
/// its size then. Pages are aligned to their size, a power of two up to
/// 64 KiB, so none straddles the 1 MiB reads.
pub fn content_hash_before(
    path: &Path,
    len: u64,
    before: &BTreeMap<u64, Vec<u8>>,
) -> Result<[u8; 32], SqliteError> {
    let f = fs::File::open(path).map_err(io_err(path))?;
    let mut h = Sha256::new();
    // 1 MiB at a time: a restore hashes whole databases, on its critical path.
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0;
    while off < len {
        let n = (len - off).min(buf.len() as u64) as usize;
        let chunk = &mut buf[..n];
        f.read_exact_at(chunk, off).map_err(io_err(path))?;
        for (&at, page) in before.range(off..off + n as u64) {
            let from = (at - off) as usize;
            let k = page.len().min(n - from);
            chunk[from..from + k].copy_from_slice(&page[..k]);
        }
        if off == 0 {
            for r in VOLATILE_HEADER {
                let r = r.start.min(n)..r.end.min(n);
                chunk[r].fill(0);
            }
        }
        h.update(&*chunk);
        off += n as u64;
    }
    Ok(h.finalize().into())
}

fn quick_check_conn(conn: &Connection, path: &Path) -> Result<(), SqliteError> {
    let rows: Vec<String> = conn
        .prepare("PRAGMA quick_check")
        .and_then(|mut s| s.query_map([], |r| r.get(0))?.collect())
        .map_err(sql_err(path))?;
    if rows == ["ok"] {
        Ok(())
    } else {
        Err(SqliteError::Corrupt {
            path: path.to_owned(),
            detail: rows.join("; "),
        })
    }
}

/// `PRAGMA quick_check` on a database file that nothing else has open.
pub fn quick_check(path: &Path) -> Result<(), SqliteError> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(sql_err(path))?;
    // Pages read through a mapping, not a read call each: a restore checks
    // whole databases on its critical path (3× faster on 280 MB).
    conn.pragma_update(None, "mmap_size", MMAP_BYTES)
        .map_err(sql_err(path))?;
    quick_check_conn(&conn, path)
}

/// `mmap_size` for [`quick_check`]: SQLite caps it at its build's limit.
const MMAP_BYTES: i64 = 1 << 40;

#[cfg(test)]
mod tests {
    use super::*;

    fn wal_db(path: &Path, rows: i64) -> Connection {
        let c = Connection::open(path).unwrap();
        c.pragma_update(None, "journal_mode", "WAL").unwrap();
        c.execute_batch("CREATE TABLE IF NOT EXISTS t(i INTEGER PRIMARY KEY, v TEXT)")
            .unwrap();
        for i in 0..rows {
            c.execute("INSERT INTO t(v) VALUES (?1)", [format!("row {i}")])
                .unwrap();
        }
        c
    }

    #[test]
    fn snapshot_of_a_live_wal_database_is_self_contained() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("live.sqlite");
        let writer = wal_db(&src, 100);
        assert!(sidecar(&src, "-wal").exists(), "the writer keeps a WAL");
        let fp = Fingerprint::of(&src);
        let snap = snapshot(&src, &dir.path().join("snap/live.sqlite")).unwrap();
        // Committed rows sit in the WAL; the snapshot has them without one.
        assert!(!sidecar(&snap.path, "-wal").exists());
        let c = Connection::open(&snap.path).unwrap();
        let n: i64 = c
            .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 100);
        let mode: String = c
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "delete");
        drop(c);
        assert!(is_sqlite(&snap.path).unwrap());

        writer
            .execute("INSERT INTO t(v) VALUES ('more')", [])
            .unwrap();
        assert_ne!(
            Fingerprint::of(&src),
            fp,
            "a commit changes the fingerprint"
        );
        let again = snapshot(&src, &dir.path().join("snap/live.sqlite")).unwrap();
        assert_ne!(again.sha256, snap.sha256);
    }

    #[test]
    fn unchanged_database_gives_identical_snapshots() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("db.sqlite");
        let _w = wal_db(&src, 10);
        let a = snapshot(&src, &dir.path().join("a")).unwrap();
        let b = snapshot(&src, &dir.path().join("b")).unwrap();
        assert_eq!(a.sha256, b.sha256, "dedup by content hash relies on this");
        // A restored snapshot reopened in WAL mode by the app: same content, same hash.
        let restored = dir.path().join("restored.sqlite");
        fs::copy(&a.path, &restored).unwrap();
        assert_eq!(content_hash(&restored).unwrap().0, a.sha256);
        let _reopened = wal_db(&restored, 0);
        let c = snapshot(&restored, &dir.path().join("c")).unwrap();
        assert_eq!(c.sha256, a.sha256);
    }

    #[test]
    fn corrupt_files_fail_the_check() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("db.sqlite");
        drop(wal_db(&src, 200));
        let mut bytes = fs::read(&src).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid..mid + 512].fill(0xff);
        fs::write(&src, &bytes).unwrap();
        assert!(quick_check(&src).is_err());
        let not_db = dir.path().join("notes.txt");
        fs::write(&not_db, "hello, this is not a database at all").unwrap();
        assert!(!is_sqlite(&not_db).unwrap());
        assert!(quick_check(&not_db).is_err());
    }

    #[test]
    fn sidecar_names() {
        assert!(is_sidecar("openclaw.sqlite-wal"));
        assert!(is_sidecar("memory.db-journal"));
        assert!(!is_sidecar("openclaw.sqlite"));
        assert_eq!(
            sidecar(Path::new("/a/b.db"), "-wal"),
            PathBuf::from("/a/b.db-wal")
        );
    }
}
