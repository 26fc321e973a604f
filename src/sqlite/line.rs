//! A database's *line* on S3: its base snapshot (`sqlite/<path>`, whole and
//! readable by stock rclone) and the numbered segments committed after it
//! (`.cvm/wal/<path>/<gen>/<seq>`), tied together by a manifest
//! (`.cvm/wal/<path>/manifest`). All of it goes through the crypt remote.
//!
//! The manifest is written *before* a new base, and lists the bases it
//! may find (newest first). A restore hashes the base it fetched and takes
//! the entry whose hash matches: after a crash between the manifest and the
//! base, the older entry still describes the base S3 holds, and its
//! segments are deleted only once the new base is uploaded. A base is taken
//! through the tracker's pin, which is no newer than the segments uploaded
//! before it and no older than segment `after`, so applying every segment
//! after `after` onto it gives the newest state.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::rclone::{rc, CRYPT_REMOTE};
use crate::remote::bucket::{META_DIR, WAL_DIR, WAL_MANIFEST};
use crate::remote::lease::Fence;

/// Bases a manifest remembers: enough for a few crashes in a row between
/// a manifest and its base.
const KEEP_BASES: usize = 4;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BaseRef {
    /// The generation whose segments apply to this base.
    pub gen: String,
    /// Segments after this number apply.
    pub after: u64,
    /// [`crate::sqlite::content_hash`] of the base, hex.
    pub sha256: String,
    /// When the base was taken (Unix seconds).
    pub at: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub bases: Vec<BaseRef>,
}

impl Manifest {
    /// The entry describing a base with content hash `sha256`.
    pub fn entry_for(&self, sha256: &[u8; 32]) -> Option<&BaseRef> {
        let hex = hex(sha256);
        self.bases.iter().find(|b| b.sha256 == hex)
    }

    /// This manifest with `base` as the newest entry.
    pub fn with(&self, base: BaseRef) -> Manifest {
        let mut bases = vec![base];
        bases.extend(self.bases.iter().take(KEEP_BASES - 1).cloned());
        Manifest { bases }
    }
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A new generation name: time-ordered, and never the same twice, so a
/// segment name is never written by two writers.
pub fn new_gen() -> String {
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let mut r = [0u8; 4];
    getrandom::getrandom(&mut r).expect("the kernel's random source");
    format!("{ms:013}-{}", hex(&r))
}

/// `.cvm/wal/<rel>` in the crypt remote, as an rclone fs (for whole-tree
/// copies only).
pub fn dir(rel: &Path) -> String {
    format!("{CRYPT_REMOTE}:{}", path(rel))
}

/// `.cvm/wal/<rel>`, a path inside the crypt remote. Single objects are
/// addressed from the remote's root: an rclone fs rooted at a deeper path
/// stayed "a file not a directory" in rclone's fs cache long after an S3
/// outage (seen in the S3-outage test), failing every later call.
pub fn path(rel: &Path) -> String {
    format!("{META_DIR}/{WAL_DIR}/{}", rel.to_string_lossy())
}

/// The crypt remote's root, as an rclone fs.
pub fn root() -> String {
    format!("{CRYPT_REMOTE}:")
}

pub fn segment_name(seq: u64) -> String {
    format!("{seq:012}")
}

pub fn parse_seq(name: &str) -> Option<u64> {
    (name.len() == 12).then(|| name.parse().ok()).flatten()
}

/// Reads `rel`'s manifest through `scratch`; `None` when there is none.
pub async fn read_manifest(
    socket: &Path,
    rel: &Path,
    scratch: &Path,
) -> Result<Option<Manifest>, rc::RcError> {
    let remote = format!("{}/{WAL_MANIFEST}", path(rel));
    let Some(bytes) = rc::read_object(socket, &root(), &remote, scratch).await? else {
        return Ok(None);
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| rc::RcError::Io {
            path: PathBuf::from(remote),
            source: std::io::Error::other(e),
        })
}

/// Uploads `rel`'s manifest, fenced.
pub async fn write_manifest(
    socket: &Path,
    rel: &Path,
    manifest: &Manifest,
    scratch: &Path,
    fence: &Fence,
) -> Result<(), rc::RcError> {
    let name = format!("manifest-{}", std::process::id());
    let local = scratch.join(&name);
    let io = |source| rc::RcError::Io {
        path: local.clone(),
        source,
    };
    std::fs::create_dir_all(scratch).map_err(io)?;
    std::fs::write(&local, serde_json::to_vec(manifest).expect("serializable")).map_err(io)?;
    fence.check().map_err(rc::RcError::Fenced)?;
    let r = rc::call(
        socket,
        "operations/copyfile",
        &json!({
            "srcFs": scratch.to_string_lossy(), "srcRemote": name,
            "dstFs": root(), "dstRemote": format!("{}/{WAL_MANIFEST}", path(rel)),
            "_config": { "NoCheckDest": true },
        }),
    )
    .await;
    let _ = std::fs::remove_file(&local);
    r?;
    tracing::info!(db = %rel.display(), "sqlite: manifest uploaded");
    Ok(())
}

/// Deletes `rel`'s generations other than `keep`, and `keep`'s segments up
/// to `upto`, fenced. Best effort: what is left is deleted next time.
pub async fn prune(socket: &Path, rel: &Path, keep: &str, upto: u64, fence: &Fence) {
    let listed = rc::call(
        socket,
        "operations/list",
        &json!({ "fs": root(), "remote": path(rel), "opt": { "recurse": true, "filesOnly": true } }),
    )
    .await;
    let Ok(listed) = listed else {
        return;
    };
    let mut doomed = Vec::new();
    for item in listed["list"].as_array().into_iter().flatten() {
        let Some(full) = item["Path"].as_str() else {
            continue;
        };
        let Some((gen, name)) = full
            .strip_prefix(&format!("{}/", path(rel)))
            .and_then(|p| p.split_once('/'))
        else {
            continue;
        };
        let old = gen != keep || parse_seq(name).is_some_and(|s| s <= upto);
        if old {
            doomed.push(full.to_owned());
        }
    }
    for object in doomed {
        if fence.check().is_err() {
            return;
        }
        let r = rc::call(
            socket,
            "operations/deletefile",
            &json!({ "fs": root(), "remote": object }),
        )
        .await;
        if let Err(e) = r {
            tracing::debug!(db = %rel.display(), %object, error = %e, "sqlite: prune left an old segment");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base(gen: &str, sha: [u8; 32]) -> BaseRef {
        BaseRef {
            gen: gen.into(),
            after: 1,
            sha256: hex(&sha),
            at: 0,
        }
    }

    #[test]
    fn the_entry_is_found_by_the_base_it_describes() {
        let m = Manifest::default()
            .with(base("a", [1; 32]))
            .with(base("b", [2; 32]));
        assert_eq!(m.entry_for(&[2; 32]).unwrap().gen, "b");
        assert_eq!(
            m.entry_for(&[1; 32]).unwrap().gen,
            "a",
            "a crash before base b"
        );
        assert!(m.entry_for(&[3; 32]).is_none());
        let many = (0..10).fold(Manifest::default(), |m, i| {
            m.with(base(&i.to_string(), [i; 32]))
        });
        assert_eq!(many.bases.len(), KEEP_BASES);
        assert_eq!(many.bases[0].gen, "9");
    }

    #[test]
    fn names() {
        assert_eq!(parse_seq(&segment_name(42)), Some(42));
        assert_eq!(parse_seq("manifest"), None);
        assert_ne!(new_gen(), new_gen());
    }
}
