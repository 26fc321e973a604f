//! What rclone does not carry for the replicate layout, kept by cvm-init
//! itself: every entry's type, mode and owner, so empty directories, modes
//! and owners come back, and a mode or owner change is replicated without
//! re-uploading the content. It travels as `.cvm/tree.json` through the
//! crypt remote (encrypted like the data, unlike S3 object metadata).
//!
//! A restore copies content and mtimes only (no rclone `--metadata`: it
//! writes S3's own keys as `user.*` xattrs, which Linux refuses on symlinks
//! and some file systems refuse everywhere), then [`apply`]s this. A mode or
//! owner that cannot be set is a warning naming the path, never a failed
//! restore: the content arrived.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::rclone::rc::{self, RcError};
use crate::rclone::CRYPT_REMOTE;
use crate::remote::bucket::{LEGACY_DIR_MODES, META_DIR, TREE_FILE};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    #[serde(rename = "d")]
    Dir,
    #[serde(rename = "f")]
    File,
    #[serde(rename = "l")]
    Link,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    #[serde(rename = "k")]
    pub kind: Kind,
    /// Permission bits with setuid, setgid and sticky (`st_mode & 0o7777`).
    #[serde(rename = "m")]
    pub mode: u32,
    #[serde(rename = "u")]
    pub uid: u32,
    #[serde(rename = "g")]
    pub gid: u32,
}

impl Entry {
    /// The entry for `meta` (from `symlink_metadata`), if it is a kind kept.
    pub fn of(meta: &fs::Metadata) -> Option<Entry> {
        let ft = meta.file_type();
        let kind = if ft.is_dir() {
            Kind::Dir
        } else if ft.is_symlink() {
            Kind::Link
        } else if ft.is_file() {
            Kind::File
        } else {
            return None;
        };
        Some(Entry {
            kind,
            mode: meta.mode() & 0o7777,
            uid: meta.uid(),
            gid: meta.gid(),
        })
    }
}

/// Relative path (as the local file system names it) → entry.
pub type TreeMeta = BTreeMap<String, Entry>;

pub fn encode(tree: &TreeMeta) -> Vec<u8> {
    serde_json::to_vec(tree).expect("a map of plain values serializes")
}

/// Reads `tree.json`, or a legacy `dirs.json` (path → mode of directories,
/// owners unknown so left as they are).
pub fn decode(bytes: &[u8], legacy: bool) -> io::Result<TreeMeta> {
    let bad = |e| io::Error::new(io::ErrorKind::InvalidData, e);
    if !legacy {
        return serde_json::from_slice(bytes).map_err(bad);
    }
    let modes: BTreeMap<String, u32> = serde_json::from_slice(bytes).map_err(bad)?;
    Ok(modes
        .into_iter()
        .map(|(p, mode)| {
            let e = Entry {
                kind: Kind::Dir,
                mode,
                uid: u32::MAX,
                gid: u32::MAX,
            };
            (p, e)
        })
        .collect())
}

/// Why [`fetch`] failed, naming the object in the bucket.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("cannot fetch {name}: {source}")]
    Rc { name: String, source: RcError },
    #[error("{name}: {source}")]
    Decode { name: String, source: io::Error },
}

/// The tree's name in the crypt remote. Its versions are kept in the
/// files' history under this name, so a restore to a moment and a rollback
/// pick the tree of that moment as they pick a file's version.
pub fn object() -> String {
    format!("{META_DIR}/{TREE_FILE}")
}

/// The tree as S3 describes it, if it does: `.cvm/tree.json`, or, from an
/// older cvm-init, `.cvm/dirs.json` (directory modes only; `true` beside
/// it). Read through the local directory `scratch`.
pub async fn fetch(socket: &Path, scratch: &Path) -> Result<Option<(TreeMeta, bool)>, FetchError> {
    for (name, legacy) in [(TREE_FILE, false), (LEGACY_DIR_MODES, true)] {
        let name = format!("{META_DIR}/{name}");
        if let Some(tree) = fetch_object(socket, scratch, &name, legacy).await? {
            return Ok(Some((tree, legacy)));
        }
    }
    Ok(None)
}

/// The tree the object `name` of the crypt remote holds (a kept version
/// of it, say); `None` when there is no such object.
pub async fn fetch_object(
    socket: &Path,
    scratch: &Path,
    name: &str,
    legacy: bool,
) -> Result<Option<TreeMeta>, FetchError> {
    let read = rc::read_object(socket, &format!("{CRYPT_REMOTE}:"), name, scratch).await;
    let Some(bytes) = read.map_err(|source| FetchError::Rc {
        name: name.to_owned(),
        source,
    })?
    else {
        return Ok(None);
    };
    decode(&bytes, legacy)
        .map(Some)
        .map_err(|source| FetchError::Decode {
            name: name.to_owned(),
            source,
        })
}

/// What [`apply`] did.
#[derive(Debug, Default)]
pub struct Applied {
    /// Directories that were missing (empty on S3) and were made.
    pub dirs_made: usize,
    /// Entries whose mode or owner was changed.
    pub changed: usize,
    /// What could not be set, with the reason. The content is in place.
    pub failures: Vec<(PathBuf, String)>,
}

/// Makes `root` match `tree` in directories, modes and owners. Content is
/// never touched; an entry whose path is missing or of another kind is
/// skipped (the tree on S3 is written after the files it describes, so it
/// can only be older than them). `u32::MAX` as an owner means "unknown".
pub fn apply(root: &Path, tree: &TreeMeta) -> Applied {
    let mut out = Applied::default();
    // Parents before children for mkdir; children before parents for the
    // modes, so a read-only directory is restricted only after its contents.
    for rel in tree
        .iter()
        .filter(|(_, e)| e.kind == Kind::Dir)
        .map(|(rel, _)| rel)
    {
        let p = root.join(rel);
        if p.symlink_metadata().is_err() {
            match fs::create_dir_all(&p) {
                Ok(()) => out.dirs_made += 1,
                Err(err) => out.failures.push((p, format!("mkdir: {err}"))),
            }
        }
    }
    for (rel, e) in tree.iter().rev() {
        let p = root.join(rel);
        let Ok(meta) = p.symlink_metadata() else {
            continue;
        };
        let Some(now) = Entry::of(&meta) else {
            continue;
        };
        if now.kind != e.kind {
            continue;
        }
        let mut changed = false;
        if (e.uid != u32::MAX && e.uid != now.uid) || (e.gid != u32::MAX && e.gid != now.gid) {
            let uid = (e.uid != u32::MAX).then_some(e.uid);
            let gid = (e.gid != u32::MAX).then_some(e.gid);
            match std::os::unix::fs::lchown(&p, uid, gid) {
                Ok(()) => changed = true,
                Err(err) => out.failures.push((p.clone(), format!("chown: {err}"))),
            }
        }
        // A link's own mode is fixed on Linux; chmod would follow it.
        if e.kind != Kind::Link && e.mode != now.mode {
            match fs::set_permissions(&p, fs::Permissions::from_mode(e.mode)) {
                Ok(()) => changed = true,
                Err(err) => out.failures.push((p.clone(), format!("chmod: {err}"))),
            }
        }
        out.changed += usize::from(changed);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn entry(kind: Kind, mode: u32) -> Entry {
        let me = fs::metadata(".").unwrap();
        let (uid, gid) = (me.uid(), me.gid());
        Entry {
            kind,
            mode,
            uid,
            gid,
        }
    }

    #[test]
    fn apply_makes_empty_dirs_and_sets_modes_but_never_content() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        fs::create_dir_all(r.join("a")).unwrap();
        fs::write(r.join("a/secret"), "s").unwrap();
        fs::write(r.join("a/run.sh"), "#!/bin/sh").unwrap();
        symlink("/nowhere", r.join("a/dangling")).unwrap();
        let tree: TreeMeta = [
            ("a", entry(Kind::Dir, 0o700)),
            ("a/secret", entry(Kind::File, 0o600)),
            ("a/run.sh", entry(Kind::File, 0o755)),
            ("a/dangling", entry(Kind::Link, 0o777)),
            ("empty/deeper", entry(Kind::Dir, 0o750)),
            ("empty", entry(Kind::Dir, 0o755)),
            // Stale entries: a file the tree lists that is gone, a kind that changed.
            ("gone", entry(Kind::File, 0o600)),
            ("a/secret/x", entry(Kind::File, 0o600)),
        ]
        .into_iter()
        .map(|(p, e)| (p.to_owned(), e))
        .collect();
        let applied = apply(r, &tree);
        assert!(applied.failures.is_empty(), "{:?}", applied.failures);
        assert_eq!(applied.dirs_made, 2);
        let mode = |p: &str| fs::symlink_metadata(r.join(p)).unwrap().mode() & 0o7777;
        assert_eq!(mode("a"), 0o700);
        assert_eq!(mode("a/secret"), 0o600);
        assert_eq!(mode("a/run.sh"), 0o755);
        assert_eq!(mode("empty/deeper"), 0o750);
        assert_eq!(fs::read_to_string(r.join("a/secret")).unwrap(), "s");
        assert_eq!(
            fs::read_link(r.join("a/dangling")).unwrap(),
            Path::new("/nowhere")
        );
        assert!(!r.join("gone").exists());
    }

    #[test]
    fn legacy_dir_modes_decode_as_dirs_with_owners_left_alone() {
        let t = decode(br#"{"agents":448}"#, true).unwrap();
        assert_eq!(t["agents"].kind, Kind::Dir);
        assert_eq!(t["agents"].mode, 0o700);
        assert_eq!(t["agents"].uid, u32::MAX);
        let round = decode(&encode(&t), false).unwrap();
        assert_eq!(round, t);
        assert!(decode(b"not json", false).is_err());
    }
}
