//! Database files this process holds open through SQLite, and reading their
//! header without dropping SQLite's locks.
//!
//! POSIX record locks belong to the process: closing *any* descriptor of a
//! file drops every lock the process holds on it (sqlite.org's "How To
//! Corrupt", 2.2). SQLite's own connections work around that; a plain
//! open, read and close by cvm-init does not. The database rescan read
//! every followed database's header each second, which dropped the pin's
//! shared lock on the database file; the app's last connection, closing,
//! then took the exclusive lock, checkpointed the whole WAL past the pin
//! and deleted it, so the commits made after the last save never reached S3
//! (seen at a graceful stop).
//!
//! So a file is registered ([`Hold`]) before SQLite connections open on it,
//! and a header read of a registered file keeps its descriptor open (one per
//! file, reused by later reads) until the last hold ends.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

/// Device and inode.
pub type FileId = (u64, u64);

#[derive(Default)]
struct Entry {
    holds: usize,
    /// Descriptors opened for reads while held: closing one would drop the
    /// locks of the connections.
    kept: Vec<Arc<fs::File>>,
}

static FILES: Mutex<BTreeMap<FileId, Entry>> = Mutex::new(BTreeMap::new());

fn files() -> MutexGuard<'static, BTreeMap<FileId, Entry>> {
    // The map stays consistent whatever panicked while holding it.
    FILES.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Device and inode of the file at `path`.
pub fn file_id(path: &Path) -> Option<FileId> {
    fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// A registration of the file at a path, taken before SQLite connections
/// open on it and dropped after they close.
#[derive(Debug)]
pub struct Hold(FileId);

impl Hold {
    /// Registers the file `path` names now.
    pub fn new(path: &Path) -> io::Result<Hold> {
        let mut files = files();
        let id = file_id(path).ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        files.entry(id).or_default().holds += 1;
        Ok(Hold(id))
    }

    pub fn id(&self) -> FileId {
        self.0
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        let mut files = files();
        if let Some(e) = files.get_mut(&self.0) {
            e.holds -= 1;
            if e.holds == 0 {
                files.remove(&self.0);
            }
        }
    }
}

/// Fills `buf` from the start of the file at `path` as far as it goes;
/// returns the bytes read. A held file's descriptor is kept, not closed.
pub fn read_head(path: &Path, buf: &mut [u8]) -> io::Result<usize> {
    with_file(path, |f| read_full_at(f, buf))
}

/// Runs `use_it` on a descriptor of `path` that is not closed while SQLite
/// holds the file (one kept before, reused), else as [`with_open`]. The
/// registry is not locked while it runs: a read of a whole database takes
/// a while.
pub fn with_file<T>(path: &Path, use_it: impl FnOnce(&fs::File) -> io::Result<T>) -> io::Result<T> {
    let kept = file_id(path).and_then(|id| files().get(&id)?.kept.first().cloned());
    match kept {
        Some(f) => use_it(&f),
        None => with_open(path, use_it),
    }
}

/// Opens `path` for reading and runs `use_it` on it; then closes it, unless
/// SQLite holds the file open in this process by then: its descriptor is
/// kept instead. The lock is not held while the file is opened and used (a
/// file on the mount may stall as long as S3 does), only to decide: a hold
/// that started after the open is seen then, and one that starts later
/// finds the descriptor closed.
pub fn with_open<T>(path: &Path, use_it: impl FnOnce(&fs::File) -> io::Result<T>) -> io::Result<T> {
    let f = fs::File::open(path)?;
    let id = f.metadata().map(|m| (m.dev(), m.ino()));
    let r = use_it(&f);
    let mut files = files();
    match id.ok().and_then(|id| files.get_mut(&id)) {
        Some(e) => e.kept.push(Arc::new(f)),
        None => drop(f),
    }
    r
}

fn read_full_at(f: &fs::File, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read_at(&mut buf[n..], n as u64)? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_file_keeps_one_descriptor_until_its_last_hold_ends() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("db");
        fs::write(&p, b"SQLite format 3\0rest").unwrap();
        let mut buf = [0u8; 16];
        assert_eq!(read_head(&p, &mut buf).unwrap(), 16);
        let id = file_id(&p).unwrap();
        assert!(files().get(&id).is_none(), "an unheld file is closed");

        let (a, b) = (Hold::new(&p).unwrap(), Hold::new(&p).unwrap());
        for _ in 0..3 {
            assert_eq!(read_head(&p, &mut buf).unwrap(), 16);
        }
        assert_eq!(&buf, b"SQLite format 3\0");
        assert_eq!(files()[&id].kept.len(), 1, "one descriptor, reused");
        drop(a);
        assert_eq!(files()[&id].kept.len(), 1, "kept while a hold is left");
        drop(b);
        assert!(files().get(&id).is_none());
        assert!(Hold::new(&d.path().join("none")).is_err());
    }
}
