//! Boot-time restore of SQLite snapshots from the crypt remote, before the
//! gateway can open anything: only where no local copy exists, and every
//! restored file must pass `PRAGMA quick_check`. The gateway never starts on
//! an empty database while a remote one exists.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use tokio::time::Instant;

use crate::rclone::{rc, CRYPT_REMOTE};
use crate::remote::bucket::SQLITE_DIR;
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

/// Copies every snapshot S3 holds under `sqlite/` into `root` where no file
/// of that name exists yet, and checks each one. Returns the restored
/// databases (relative to `root`) with their content hashes.
pub async fn restore_databases(
    socket: &Path,
    root: &Path,
) -> Result<BTreeMap<PathBuf, [u8; 32]>, RestoreError> {
    let fetched = fetch_databases(socket, root).await?;
    check_databases(root, &fetched).await
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
