//! Boot-time restore of SQLite databases from the crypt remote, before the
//! gateway can open anything: only where no local copy exists, and every
//! restored file must pass `PRAGMA quick_check`. The gateway never starts on
//! an empty database while a remote one exists. A database with a line
//! (`line`) is its base plus every segment after it, in order; a missing or
//! unreadable segment ends the restore of that database there, named.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use tokio::time::Instant;

use crate::rclone::{rc, CRYPT_REMOTE};
use crate::remote::bucket::SQLITE_DIR;
use crate::sqlite::backup::{Known, Line};
use crate::sqlite::line::{self, Manifest};
use crate::sqlite::segment::Segment;
use crate::sqlite::{self, SqliteError};

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error(
        "restoring databases from {CRYPT_REMOTE}:{SQLITE_DIR} failed ({exit}); the gateway is not started \
         on empty databases while remote ones exist. rclone said:\n{stderr}"
    )]
    Fetch { exit: String, stderr: String },
    #[error(
        "restored database {db} fails its check ({source}); it was moved aside to {aside} and the gateway \
         is not started. Restore an older copy by hand (docs/operations.md, manual restore with stock rclone) or remove the remote one"
    )]
    Corrupt {
        db: PathBuf,
        aside: PathBuf,
        source: Box<SqliteError>,
    },
    #[error("cannot read {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

fn files_below(root: &Path) -> Result<BTreeSet<PathBuf>, RestoreError> {
    fn walk(root: &Path, rel: &Path, out: &mut BTreeSet<PathBuf>) -> io::Result<()> {
        let dir = root.join(rel);
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        for e in entries {
            let e = e?;
            let child = rel.join(e.file_name());
            if e.file_type()?.is_dir() {
                walk(root, &child, out)?;
            } else {
                out.insert(child);
            }
        }
        Ok(())
    }
    let mut out = BTreeSet::new();
    walk(root, Path::new(""), &mut out).map_err(|source| RestoreError::Io {
        path: root.to_owned(),
        source,
    })?;
    Ok(out)
}

/// Copies the snapshots into `root` through the rclone rc server at `socket`.
async fn fetch(socket: &Path, root: &Path) -> Result<(), RestoreError> {
    let remote = format!("{CRYPT_REMOTE}:{SQLITE_DIR}");
    let params = serde_json::json!({
        "srcFs": remote, "dstFs": root.to_string_lossy(),
        "_config": { "IgnoreExisting": true, "Transfers": 8 },
    });
    match rc::call(socket, "sync/copy", &params).await {
        Ok(_) => Ok(()),
        // A bucket prefix without snapshots yet.
        Err(rc::RcError::Status { body, .. }) if body.contains("directory not found") => Ok(()),
        Err(e) => Err(RestoreError::Fetch {
            exit: "rc sync/copy".to_owned(),
            stderr: e.to_string(),
        }),
    }
}

/// Copies every database S3 holds under `sqlite/` into `root` where no file
/// of that name exists yet, brings each up to its newest segment, and
/// checks each one. Returns the restored databases (relative to `root`).
/// `scratch` is local space for segments on their way in.
pub async fn restore_databases(
    socket: &Path,
    root: &Path,
    scratch: &Path,
) -> Result<BTreeMap<PathBuf, Known>, RestoreError> {
    let fetched = fetch_databases(socket, root).await?;
    let mut lines = BTreeMap::new();
    for rel in &fetched {
        lines.insert(rel.clone(), catch_up(socket, root, rel, scratch).await?);
    }
    let hashes = check_databases(root, &fetched).await?;
    Ok(hashes
        .into_iter()
        .map(|(rel, sha256)| {
            let line = lines.remove(&rel).flatten();
            (rel, Known { sha256, line })
        })
        .collect())
}

/// Applies the segments of the line that describes the base at
/// `root/rel`, and leaves the database in WAL mode so it can be followed
/// before the gateway opens it. Returns the line to continue, or `None`
/// when there is none or it could not be followed to its end.
async fn catch_up(
    socket: &Path,
    root: &Path,
    rel: &Path,
    scratch: &Path,
) -> Result<Option<Line>, RestoreError> {
    let fetch_err = |e: rc::RcError| RestoreError::Fetch {
        exit: format!("reading {}", line::dir(rel)),
        stderr: e.to_string(),
    };
    let Some(manifest) = line::read_manifest(socket, rel, scratch)
        .await
        .map_err(fetch_err)?
    else {
        return Ok(None);
    };
    let path = root.join(rel);
    let hashed = {
        let path = path.clone();
        tokio::task::spawn_blocking(move || sqlite::content_hash(&path))
            .await
            .expect("hashing does not panic")
    };
    let (hash, base_bytes) = match hashed {
        Ok(h) => h,
        // Left to the check, which names the file and stops the boot.
        Err(_) => return Ok(None),
    };
    let Some(base) = manifest.entry_for(&hash).cloned() else {
        tracing::warn!(db = %rel.display(), "sqlite: the base on S3 is not the one its manifest names; restoring the base alone (written without cvm-init's segments, or by an older cvm-init)");
        return Ok(None);
    };
    let dir = scratch.join("segments");
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).map_err(|source| RestoreError::Io {
        path: dir.clone(),
        source,
    })?;
    let remote = format!("{}/{}", line::dir(rel), base.gen);
    let params = serde_json::json!({
        "srcFs": remote, "dstFs": dir.to_string_lossy(),
        "_config": { "Transfers": 16, "Checkers": 16 },
    });
    match rc::call(socket, "sync/copy", &params).await {
        Ok(_) => {}
        Err(rc::RcError::Status { body, .. }) if body.contains("directory not found") => {}
        Err(e) => return Err(fetch_err(e)),
    }
    let mut seqs: Vec<u64> = fs::read_dir(&dir)
        .map_err(|source| RestoreError::Io {
            path: dir.clone(),
            source,
        })?
        .filter_map(|e| line::parse_seq(&e.ok()?.file_name().to_string_lossy()))
        .filter(|&s| s > base.after)
        .collect();
    seqs.sort_unstable();
    let (applied, since_base, stopped) = {
        let (dir, path, after) = (dir.clone(), path.clone(), base.after);
        let seqs = seqs.clone();
        tokio::task::spawn_blocking(move || apply_segments(&dir, &path, after, &seqs))
            .await
            .expect("applying does not panic")
    };
    let _ = fs::remove_dir_all(&dir);
    let last = base.after + applied;
    if let Some(why) = &stopped {
        tracing::error!(db = %rel.display(), restored_to = last, "sqlite: restore stopped at segment {}/{}: {why}; the database is restored as of the segment before it", remote, line::segment_name(last + 1));
    }
    tracing::info!(db = %rel.display(), generation = %base.gen, segments = applied, "sqlite: restored base and segments");
    Ok(stopped.is_none().then(|| Line {
        gen: base.gen.clone(),
        seq: last,
        manifest: Manifest::clone(&manifest),
        base,
        base_bytes,
        since_base,
    }))
}

/// Applies segments `after+1, after+2, …` from `dir` to `db` while they are
/// there in order and whole; then sets WAL mode. Returns how many were
/// applied, their bytes, and why it stopped early.
fn apply_segments(dir: &Path, db: &Path, after: u64, seqs: &[u64]) -> (u64, u64, Option<String>) {
    let mut applied = 0;
    let mut bytes = 0;
    let mut stopped = None;
    for (i, &seq) in seqs.iter().enumerate() {
        if seq != after + 1 + i as u64 {
            stopped = Some("missing".to_owned());
            break;
        }
        let name = dir.join(line::segment_name(seq));
        let r = fs::read(&name)
            .map_err(|e| e.to_string())
            .and_then(|b| {
                bytes += b.len() as u64;
                Segment::decode(&b).map_err(|e| e.to_string())
            })
            .and_then(|s| s.apply(db).map_err(|e| e.to_string()));
        if let Err(e) = r {
            stopped = Some(e);
            break;
        }
        applied += 1;
    }
    if let Err(e) =
        rusqlite::Connection::open(db).and_then(|c| c.pragma_update(None, "journal_mode", "WAL"))
    {
        tracing::warn!(db = %db.display(), error = %e, "sqlite: cannot put the restored database in WAL mode");
    }
    (applied, bytes, stopped)
}

/// The fetch half of [`restore_databases`]: returns the files it added.
async fn fetch_databases(socket: &Path, root: &Path) -> Result<Vec<PathBuf>, RestoreError> {
    let before = files_below(root)?;
    fetch(socket, root).await?;
    Ok(files_below(root)?.difference(&before).cloned().collect())
}

/// The check half of [`restore_databases`]: `quick_check` and content hash of
/// each fetched file; a failing one is moved aside and stops the boot.
async fn check_databases(
    root: &Path,
    fetched: &[PathBuf],
) -> Result<BTreeMap<PathBuf, [u8; 32]>, RestoreError> {
    let started = Instant::now();
    let mut restored = BTreeMap::new();
    for rel in fetched {
        let path = root.join(rel);
        let checked = {
            let path = path.clone();
            tokio::task::spawn_blocking(move || {
                sqlite::quick_check(&path).and_then(|()| sqlite::content_hash(&path))
            })
            .await
            .expect("quick_check does not panic")
        };
        match checked {
            Ok((hash, _)) => {
                restored.insert(rel.clone(), hash);
            }
            Err(source) => {
                let aside = sqlite::sidecar(&path, ".corrupt");
                let _ = fs::rename(&path, &aside);
                return Err(RestoreError::Corrupt {
                    db: rel.clone(),
                    aside,
                    source: Box::new(source),
                });
            }
        }
    }
    tracing::info!(databases = restored.len(), took = ?started.elapsed(), "sqlite: restore done");
    Ok(restored)
}
