//! Keeps live SQLite databases off the FUSE mount (mount layout). Each
//! database lives under `CVM_LOCAL_DIR/sqlite/<path>`; at `<path>` in the
//! state dir the gateway finds a symlink to it. SQLite resolves the symlink,
//! so its `-wal`, `-shm` and `-journal` sit beside the real file on local
//! disk. The symlinks themselves are stored on S3 (rclone `--links`).
//!
//! A database found as a regular file on the mount (created there before it
//! was redirected, or renamed over its symlink) is moved only while the
//! gateway is stopped, so no write can be lost in the move.

use std::fs;
use std::io;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

use crate::sqlite::{self, Patterns, SqliteError};

#[derive(Debug, thiserror::Error)]
pub enum RedirectError {
    #[error("cannot redirect {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("database {path} moved from the mount fails its check: {source}")]
    Corrupt { path: PathBuf, source: SqliteError },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> RedirectError + '_ {
    move |source| RedirectError::Io {
        path: path.to_owned(),
        source,
    }
}

/// What a database path on the mount currently is.
#[derive(Debug, PartialEq, Eq)]
pub enum OnMount {
    Missing,
    /// Our symlink, pointing where it should.
    Redirected,
    /// A symlink elsewhere (e.g. an old `CVM_LOCAL_DIR`).
    WrongLink,
    /// A real file on FUSE: must be moved to local disk.
    File,
}

pub fn state_of(mount_path: &Path, local_path: &Path) -> OnMount {
    match fs::symlink_metadata(mount_path) {
        Err(_) => OnMount::Missing,
        Ok(m) if m.file_type().is_symlink() => match fs::read_link(mount_path) {
            Ok(t) if t == local_path => OnMount::Redirected,
            _ => OnMount::WrongLink,
        },
        Ok(m) if m.is_file() => OnMount::File,
        Ok(_) => OnMount::Missing,
    }
}

/// Databases on the mount that are regular files and need the gateway
/// stopped to be moved. `rels` are the candidate paths to look at.
///
/// Only `lstat`s: reading a link through rclone's VFS counts as an access
/// and pushes the link's own pending upload back by the write-back delay, so
/// a check every second would keep it from ever reaching S3.
pub fn files_on_mount(mount: &Path, rels: &[PathBuf]) -> Vec<PathBuf> {
    rels.iter()
        .filter(|rel| fs::symlink_metadata(mount.join(rel)).is_ok_and(|m| m.is_file()))
        .cloned()
        .collect()
}

/// Makes every database local and linked. Call only while the gateway is
/// stopped. Returns the paths it moved off the mount.
pub fn redirect_all(
    mount: &Path,
    local_root: &Path,
    patterns: &Patterns,
) -> Result<Vec<PathBuf>, RedirectError> {
    let mut moved = Vec::new();
    let on_mount = patterns.find(mount).map_err(io_err(mount))?;
    for rel in &on_mount {
        let (m, l) = (mount.join(rel), local_root.join(rel));
        if state_of(&m, &l) == OnMount::File {
            move_off_mount(&m, &l)?;
            moved.push(rel.clone());
        }
    }
    for rel in patterns.find(local_root).map_err(io_err(local_root))? {
        let (m, l) = (mount.join(&rel), local_root.join(&rel));
        match state_of(&m, &l) {
            OnMount::Redirected => {}
            OnMount::File => unreachable!("moved above"),
            OnMount::WrongLink => {
                fs::remove_file(&m).map_err(io_err(&m))?;
                symlink(&l, &m).map_err(io_err(&m))?;
            }
            OnMount::Missing => {
                if let Some(parent) = m.parent() {
                    fs::create_dir_all(parent).map_err(io_err(parent))?;
                }
                symlink(&l, &m).map_err(io_err(&m))?;
            }
        }
    }
    Ok(moved)
}

/// Copies the database and its journal/WAL from the mount to local disk,
/// checks the copy, then removes the mount files. A local copy that was
/// there already is older (the file on the mount replaced it), so it is kept
/// aside, never deleted.
fn move_off_mount(m: &Path, l: &Path) -> Result<(), RedirectError> {
    if let Some(parent) = l.parent() {
        fs::create_dir_all(parent).map_err(io_err(parent))?;
    }
    if l.exists() {
        let aside = sqlite::sidecar(l, &format!(".replaced-{}", crate::timepoint::now_s()));
        tracing::warn!(db = %l.display(), aside = %aside.display(), "a newer copy of this database appeared on the mount; keeping the old one aside");
        fs::rename(l, &aside).map_err(io_err(l))?;
        for s in sqlite::SIDECARS {
            let _ = fs::rename(sqlite::sidecar(l, s), sqlite::sidecar(&aside, s));
        }
    }
    for suffix in ["", "-wal", "-journal"] {
        let src = sqlite::sidecar(m, suffix);
        if !src.exists() {
            continue;
        }
        let dst = sqlite::sidecar(l, suffix);
        let tmp = sqlite::sidecar(&dst, ".moving");
        fs::copy(&src, &tmp).map_err(io_err(&src))?;
        fs::File::open(&tmp)
            .and_then(|f| f.sync_all())
            .map_err(io_err(&tmp))?;
        fs::rename(&tmp, &dst).map_err(io_err(&dst))?;
    }
    // Opening the copy replays its WAL; a failure here leaves the mount copy in place.
    sqlite::quick_check(l).map_err(|source| RedirectError::Corrupt {
        path: l.to_owned(),
        source,
    })?;
    for suffix in ["-wal", "-shm", "-journal"] {
        let _ = fs::remove_file(sqlite::sidecar(m, suffix));
    }
    fs::remove_file(m).map_err(io_err(m))?;
    symlink(l, m).map_err(io_err(m))?;
    tracing::info!(db = %m.display(), local = %l.display(), "moved a database off the mount to local disk");
    Ok(())
}

/// File name endings under which SQLite databases are usually found; only
/// these are opened to read their header, since on the mount every read of
/// an uncached file is an S3 request.
const DB_ENDINGS: [&str; 4] = [".sqlite", ".sqlite3", ".db", ".db3"];

/// SQLite databases below `root` (by header) that no pattern covers:
/// they are neither kept off FUSE nor snapshotted.
pub fn unmatched_databases(root: &Path, patterns: &Patterns) -> Vec<PathBuf> {
    fn walk(root: &Path, rel: &Path, patterns: &Patterns, out: &mut Vec<PathBuf>) {
        let Ok(entries) = fs::read_dir(root.join(rel)) else {
            return;
        };
        for e in entries.flatten() {
            let child = rel.join(e.file_name());
            let Ok(ft) = e.file_type() else { continue };
            let name = e.file_name().to_string_lossy().into_owned();
            if ft.is_dir() {
                walk(root, &child, patterns, out);
            } else if ft.is_file()
                && DB_ENDINGS.iter().any(|end| name.ends_with(end))
                && !patterns.matches(&child)
                && sqlite::is_sqlite(&root.join(&child)).unwrap_or(false)
            {
                out.push(child);
            }
        }
    }
    let mut out = Vec::new();
    walk(root, Path::new(""), patterns, &mut out);
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn db(path: &Path, rows: usize) {
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        let c = rusqlite::Connection::open(path).unwrap();
        c.execute_batch("CREATE TABLE IF NOT EXISTS t(v)").unwrap();
        for _ in 0..rows {
            c.execute("INSERT INTO t VALUES (1)", []).unwrap();
        }
    }

    fn rows(path: &Path) -> i64 {
        rusqlite::Connection::open(path)
            .unwrap()
            .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap()
    }

    // A plain directory stands in for the mount: the logic is the same.
    #[test]
    fn databases_move_off_the_mount_and_local_ones_get_links() {
        let dir = tempfile::tempdir().unwrap();
        let (mount, local) = (dir.path().join("mount"), dir.path().join("local"));
        db(&mount.join("state/openclaw.sqlite"), 3);
        db(&local.join("memory/main.sqlite"), 5);
        fs::create_dir_all(mount.join("workspace")).unwrap();
        fs::write(mount.join("workspace/notes.md"), "not a db").unwrap();

        let moved = redirect_all(&mount, &local, &Patterns::default()).unwrap();
        assert_eq!(moved, [PathBuf::from("state/openclaw.sqlite")]);
        for rel in ["state/openclaw.sqlite", "memory/main.sqlite"] {
            assert_eq!(
                state_of(&mount.join(rel), &local.join(rel)),
                OnMount::Redirected,
                "{rel}"
            );
        }
        assert_eq!(rows(&mount.join("state/openclaw.sqlite")), 3);
        assert_eq!(rows(&mount.join("memory/main.sqlite")), 5);
        // Idempotent.
        assert!(redirect_all(&mount, &local, &Patterns::default())
            .unwrap()
            .is_empty());
    }

    #[test]
    fn databases_outside_the_patterns_are_found_by_header() {
        let dir = tempfile::tempdir().unwrap();
        db(&dir.path().join("workspace/extra.db"), 1);
        db(&dir.path().join("state/openclaw.sqlite"), 1);
        fs::write(dir.path().join("notes.db"), "not sqlite").unwrap();
        assert_eq!(
            unmatched_databases(dir.path(), &Patterns::default()),
            [PathBuf::from("workspace/extra.db")]
        );
    }

    #[test]
    fn a_file_renamed_over_the_link_wins_and_the_old_copy_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let (mount, local) = (dir.path().join("mount"), dir.path().join("local"));
        db(&local.join("state/openclaw.sqlite"), 1);
        redirect_all(&mount, &local, &Patterns::default()).unwrap();
        let tmp = mount.join("state/openclaw.sqlite.tmp");
        db(&tmp, 7);
        fs::rename(&tmp, mount.join("state/openclaw.sqlite")).unwrap();
        let rels = [PathBuf::from("state/openclaw.sqlite")];
        assert_eq!(files_on_mount(&mount, &rels), rels);

        redirect_all(&mount, &local, &Patterns::default()).unwrap();
        assert_eq!(rows(&mount.join("state/openclaw.sqlite")), 7);
        let kept: Vec<_> = fs::read_dir(local.join("state"))
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().contains(".replaced-"))
            .collect();
        assert_eq!(kept.len(), 1);
        assert_eq!(rows(&kept[0].path()), 1);
    }
}
