//! A database's *line* on S3: its bases (whole snapshots, the newest also
//! at `sqlite/<path>` where stock rclone reads it, each kept one at
//! `.cvm/wal/<path>/bases/<gen>-<after>` for history) and the numbered,
//! timed segments committed after them
//! (`.cvm/wal/<path>/<gen>/<seq / 256>/<seq>-<ms>`; an older cvm-init put
//! them at the generation's top) and the spans merging them (at the
//! generation's top), tied together by a manifest
//! (`.cvm/wal/<path>/manifest`). All of it goes through the crypt remote.
//!
//! A new base is uploaded to its history name first, then named in the
//! manifest, then copied (server-side) to the stock name. A restore of the
//! latest state hashes the stock base and takes the manifest entry whose
//! hash matches: after a crash before the copy, the older entry still
//! describes the base there, and its segments are deleted only later. A
//! base is taken through the tracker's pin, which is no newer than the
//! segments uploaded before it and no older than segment `after`, so
//! applying every segment after `after` onto it gives the newest state.
//! Which bases and segments are kept is [`crate::sqlite::history`]'s
//! decision.

use std::path::{Path, PathBuf};

use futures_util::{StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::rclone::{rc, CRYPT_REMOTE};
use crate::remote::bucket::{META_DIR, SQLITE_DIR, TRASH_DIR, WAL_DIR, WAL_MANIFEST};
use crate::remote::lease::Fence;
use crate::sqlite::history::{retain, Keep};

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
    /// The same in milliseconds: every commit the base holds is older.
    /// Absent from manifests written before history was kept.
    #[serde(default)]
    pub at_ms: u64,
    /// A new database's first base: its history copy is zstd-compressed
    /// and it has no stock copy (stock rclone reads it with `zstd -d`).
    /// The next base, at most [`crate::config::SqliteConfig::base_max_age`]
    /// later, is whole and at the stock name again.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub packed: bool,
    /// The database is in a rollback-journal mode (its segments are the
    /// pages that differ between snapshots): restored as it is, not
    /// switched to WAL.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub rollback: bool,
}

impl BaseRef {
    pub fn new(gen: String, after: u64, sha256: &[u8; 32], taken_ms: u64) -> BaseRef {
        BaseRef {
            gen,
            after,
            sha256: hex(sha256),
            at: taken_ms / 1000,
            at_ms: taken_ms,
            packed: false,
            rollback: false,
        }
    }

    /// When the base was taken, in Unix ms; for an entry with seconds only,
    /// the end of that second (no commit it holds is newer).
    pub fn taken_ms(&self) -> u64 {
        if self.at_ms > 0 {
            self.at_ms
        } else {
            self.at * 1000 + 999
        }
    }

    /// Its history copy, below [`path`].
    pub fn object(&self) -> String {
        format!("{BASES_DIR}/{}-{:012}", self.gen, self.after)
    }
}

/// Where bases are kept for history, below [`path`].
pub const BASES_DIR: &str = "bases";

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub bases: Vec<BaseRef>,
    /// When the database was deleted or renamed away, or a rollback left it
    /// out (Unix ms): a restore takes it only as of a moment before this
    /// (from the trash, or, left out by a rollback, where it is).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gone_ms: Option<u64>,
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
        bases.extend(self.bases.iter().cloned());
        Manifest {
            bases,
            gone_ms: None,
        }
    }

    /// Whether a database with no stock copy is restored from this
    /// manifest as of `at` (`None`: now): only one whose newest base has no
    /// stock copy yet (the stock name is what says a database exists), and
    /// not after a rollback left it out.
    pub fn restores_without_stock(&self, at: Option<u64>) -> bool {
        let young = self.bases.first().is_some_and(|b| b.packed);
        let gone = match (self.gone_ms, at) {
            (Some(gone), Some(at)) => at >= gone,
            (Some(_), None) => true,
            (None, _) => false,
        };
        young && !gone
    }
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A new generation name: time-ordered, and never the same twice, so a
/// segment name is never written by two writers.
pub fn new_gen() -> String {
    let ms = crate::timepoint::now_ms();
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

/// A segment's name in the spool.
pub fn segment_name(seq: u64) -> String {
    format!("{seq:012}")
}

/// A segment's name on S3: its number and when its newest commit was read
/// (Unix ms), so a restore to a moment needs no other index.
pub fn remote_segment_name(seq: u64, t_ms: u64) -> String {
    format!("{seq:012}-{t_ms:013}")
}

/// Segments per directory of a generation. Listing names through the crypt
/// remote costs their decryption (0.26 s for 1,600 names here): with
/// directories, a restore lists the generation's top (its spans) and only
/// the directories after the spans, not an hour's thousands of segments.
pub const SEGMENTS_PER_DIR: u64 = 256;

/// The directory of segment `seq`, below its generation.
pub fn segment_dir(seq: u64) -> String {
    format!("{:08}", seq / SEGMENTS_PER_DIR)
}

/// The number of the first segment a [`segment_dir`] holds.
pub fn parse_segment_dir(name: &str) -> Option<u64> {
    (name.len() == 8 && name.bytes().all(|b| b.is_ascii_digit()))
        .then(|| name.parse::<u64>().ok())?
        .map(|d| d * SEGMENTS_PER_DIR)
}

/// Segment `seq`'s path below its generation.
pub fn segment_path(seq: u64, t_ms: u64) -> String {
    format!("{}/{}", segment_dir(seq), remote_segment_name(seq, t_ms))
}

/// A span's name: segments `first..=last` merged (each page as the last of
/// them wrote it), timed as the last. An older cvm-init ignores it.
pub fn span_name(first: u64, last: u64, t_ms: u64) -> String {
    format!("{first:012}-{last:012}-{t_ms:013}")
}

/// A segment or a span on S3, from its name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegRef {
    /// The (last) segment number it brings the database to.
    pub seq: u64,
    /// The first segment number it holds: `seq` but for a span.
    pub first: u64,
    /// `None` for a segment uploaded before segments were timed.
    pub t_ms: Option<u64>,
    pub name: String,
}

impl SegRef {
    pub fn is_span(&self) -> bool {
        self.first != self.seq
    }
}

pub fn parse_segment(name: &str) -> Option<SegRef> {
    let num = |s: &str, len: usize| (s.len() == len).then(|| s.parse::<u64>().ok())?;
    let parts: Vec<&str> = name.split('-').collect();
    let (first, seq, t_ms) = match parts[..] {
        [seq] => (num(seq, 12)?, num(seq, 12)?, None),
        [seq, t] => (num(seq, 12)?, num(seq, 12)?, Some(num(t, 13)?)),
        [first, last, t] => (num(first, 12)?, num(last, 12)?, Some(num(t, 13)?)),
        _ => return None,
    };
    (first <= seq).then(|| SegRef {
        seq,
        first,
        t_ms,
        name: name.to_owned(),
    })
}

/// An object below [`path`], from a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Object {
    Manifest,
    Base(String),
    Segment { gen: String, seg: SegRef },
    Other,
}

pub fn classify(below: &str) -> Object {
    if below == WAL_MANIFEST {
        return Object::Manifest;
    }
    let parts: Vec<&str> = below.split('/').collect();
    let (gen, seg) = match parts[..] {
        [BASES_DIR, _] => return Object::Base(below.to_owned()),
        [gen, name] => (gen, parse_segment(name)),
        [gen, dir, name] => (gen, parse_in_dir(dir, name)),
        _ => return Object::Other,
    };
    match seg {
        Some(seg) => Object::Segment {
            gen: gen.to_owned(),
            seg,
        },
        None => Object::Other,
    }
}

/// A segment listed in directory `dir` of its generation, named by its
/// path below the generation; only a plain segment of that directory's
/// numbers (spans live at the top).
pub fn parse_in_dir(dir: &str, name: &str) -> Option<SegRef> {
    let first = parse_segment_dir(dir)?;
    let seg = parse_segment(name)
        .filter(|s| !s.is_span() && s.seq / SEGMENTS_PER_DIR == first / SEGMENTS_PER_DIR)?;
    Some(SegRef {
        name: format!("{dir}/{name}"),
        ..seg
    })
}

/// Every object below `rel`'s [`path`] with its size, by its path below it.
pub async fn list(socket: &Path, rel: &Path) -> Result<Vec<(String, u64)>, rc::RcError> {
    let listed = rc::list(
        socket,
        &json!({ "fs": root(), "remote": path(rel), "opt": { "recurse": true, "filesOnly": true } }),
    )
    .await?;
    let prefix = format!("{}/", path(rel));
    Ok(listed
        .iter()
        .filter_map(|item| {
            let below = item["Path"].as_str()?.strip_prefix(&prefix)?.to_owned();
            Some((below, item["Size"].as_u64().unwrap_or(0)))
        })
        .collect())
}

/// The entries of one directory of the crypt remote (a path from its
/// root), not below it: name, and whether a directory.
pub async fn entries(socket: &Path, remote: &str) -> Result<Vec<(String, bool)>, rc::RcError> {
    let listed = rc::list(
        socket,
        &json!({ "fs": root(), "remote": remote, "opt": { "noModTime": true, "noMimeType": true } }),
    )
    .await?;
    Ok(listed
        .iter()
        .filter_map(|i| Some((i["Name"].as_str()?.to_owned(), i["IsDir"].as_bool()?)))
        .collect())
}

/// Every database that has a line: the paths below `.cvm/wal/` that hold a
/// manifest. Walked a level at a time, never into a line's generations and
/// bases: a recursive listing would read every segment name (thousands
/// after an hour of saves) only to find a few manifests.
pub async fn with_manifests(socket: &Path) -> Result<Vec<PathBuf>, rc::RcError> {
    let wal = format!("{META_DIR}/{WAL_DIR}");
    let list_one = |rel: PathBuf| {
        let remote = if rel.as_os_str().is_empty() {
            wal.clone()
        } else {
            format!("{wal}/{}", rel.to_string_lossy())
        };
        async move { Ok::<_, rc::RcError>((rel, entries(socket, &remote).await?)) }
    };
    let (mut found, mut level) = (Vec::new(), vec![PathBuf::new()]);
    while !level.is_empty() {
        let listed: Vec<_> = futures_util::stream::iter(level.into_iter().map(list_one))
            .buffer_unordered(8)
            .try_collect()
            .await?;
        level = Vec::new();
        for (rel, entries) in listed {
            let (line, below) = walk_step(&entries);
            if line && !rel.as_os_str().is_empty() {
                found.push(rel.clone());
            }
            level.extend(below.into_iter().map(|d| rel.join(d)));
        }
    }
    found.sort();
    Ok(found)
}

/// One directory of the walk below `.cvm/wal/`, from its entries (name,
/// whether a directory): whether it is a line (holds a manifest), and the
/// directories to walk into. A line's bases and generations hold no lines;
/// anything else in it might (a database once at a path below it).
fn walk_step(entries: &[(String, bool)]) -> (bool, Vec<String>) {
    let line = entries.iter().any(|(n, dir)| !dir && n == WAL_MANIFEST);
    let below = entries
        .iter()
        .filter(|(n, dir)| *dir && !(line && (n == BASES_DIR || is_gen(n))))
        .map(|(n, _)| n.clone())
        .collect();
    (line, below)
}

/// Whether `name` has the shape of [`new_gen`]'s names.
fn is_gen(name: &str) -> bool {
    name.split_once('-').is_some_and(|(ms, r)| {
        ms.len() == 13
            && ms.bytes().all(|b| b.is_ascii_digit())
            && !r.is_empty()
            && r.bytes().all(|b| b.is_ascii_hexdigit())
    })
}

/// `rel`'s line as the trash day `day` holds it (a database deleted or
/// renamed away that day): `.cvm-trash/<day>/.cvm/wal/<rel>`.
pub fn trashed_path(day: &str, rel: &Path) -> String {
    format!("{TRASH_DIR}/{day}/{}", path(rel))
}

/// Reads `rel`'s manifest through `scratch`; `None` when there is none.
pub async fn read_manifest(
    socket: &Path,
    rel: &Path,
    scratch: &Path,
) -> Result<Option<Manifest>, rc::RcError> {
    read_manifest_in(socket, &path(rel), scratch).await
}

/// Reads the manifest of the line at `line` (a [`path`] or a
/// [`trashed_path`]) through `scratch`; `None` when there is none.
pub async fn read_manifest_in(
    socket: &Path,
    line: &str,
    scratch: &Path,
) -> Result<Option<Manifest>, rc::RcError> {
    let remote = format!("{line}/{WAL_MANIFEST}");
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
    let _permit = fence.permit().await.map_err(rc::RcError::Fenced)?;
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

/// The stock name of `rel`'s newest base, as (rclone fs, remote): what
/// stock rclone restores.
pub fn stock(rel: &Path) -> (String, String) {
    (
        format!("{CRYPT_REMOTE}:{SQLITE_DIR}"),
        rel.to_string_lossy().into_owned(),
    )
}

/// What writing a line needs: the rc socket, local scratch space, the
/// lease's fence, and the days of history kept.
pub struct Writer<'a> {
    pub socket: &'a Path,
    pub scratch: &'a Path,
    pub fence: &'a Fence,
    pub history_days: u32,
}

impl Writer<'_> {
    /// Publishes `base` of `rel` from the local file `dir/name` (compressed
    /// when the base is packed): uploaded to its history name, then named
    /// in the manifest (what history keeps of `manifest` and it), then
    /// copied server-side to the stock name unless packed; last, what
    /// history no longer keeps is deleted. Returns the manifest written.
    pub async fn publish(
        &self,
        rel: &Path,
        (dir, name): (&Path, &str),
        base: &BaseRef,
        manifest: &Manifest,
    ) -> Result<Manifest, rc::RcError> {
        let history_name = format!("{}/{}", path(rel), base.object());
        self.copy((&dir.to_string_lossy(), name), (&root(), &history_name))
            .await?;
        let listed = list(self.socket, rel).await?;
        let keep = retain(
            &manifest.with(base.clone()).bases,
            &segments(&listed),
            base.taken_ms(),
            self.history_days,
        );
        let manifest = Manifest {
            bases: keep.bases.clone(),
            gone_ms: None,
        };
        write_manifest(self.socket, rel, &manifest, self.scratch, self.fence).await?;
        if !base.packed {
            let (fs, remote) = stock(rel);
            self.copy((&root(), &history_name), (&fs, &remote)).await?;
        }
        delete_unkept(self.socket, rel, &listed, &keep, self.fence).await;
        Ok(manifest)
    }

    /// Applies retention to `rel`'s line at `now` between bases (which are
    /// rare): the manifest rewritten when it drops a base, then what is not
    /// kept deleted. Returns the manifest as it now is.
    pub async fn prune(
        &self,
        rel: &Path,
        manifest: &Manifest,
        now: u64,
    ) -> Result<Manifest, rc::RcError> {
        let listed = list(self.socket, rel).await?;
        let keep = retain(&manifest.bases, &segments(&listed), now, self.history_days);
        let manifest = if keep.bases == manifest.bases {
            manifest.clone()
        } else {
            let m = Manifest {
                bases: keep.bases.clone(),
                gone_ms: manifest.gone_ms,
            };
            write_manifest(self.socket, rel, &m, self.scratch, self.fence).await?;
            m
        };
        delete_unkept(self.socket, rel, &listed, &keep, self.fence).await;
        Ok(manifest)
    }

    /// One fenced `operations/copyfile`; server-side when both are on S3.
    pub async fn copy(&self, from: (&str, &str), to: (&str, &str)) -> Result<(), rc::RcError> {
        self.transfer("operations/copyfile", from, to).await
    }

    /// One fenced `method` (`operations/copyfile` or `movefile`) from
    /// `(fs, remote)` to `(fs, remote)`.
    pub async fn transfer(
        &self,
        method: &str,
        from: (&str, &str),
        to: (&str, &str),
    ) -> Result<(), rc::RcError> {
        let _permit = self.fence.permit().await.map_err(rc::RcError::Fenced)?;
        let params = json!({
            "srcFs": from.0, "srcRemote": from.1,
            "dstFs": to.0, "dstRemote": to.1,
            // Without asking S3 first: the content is known to differ.
            "_config": { "NoCheckDest": true },
        });
        rc::call(self.socket, method, &params).await.map(drop)
    }
}

/// The segments and spans in a listing of a line, with their generations.
fn segments(listed: &[(String, u64)]) -> Vec<(String, SegRef)> {
    listed
        .iter()
        .filter_map(|(below, _)| match classify(below) {
            Object::Segment { gen, seg } => Some((gen, seg)),
            _ => None,
        })
        .collect()
}

/// Deletes what `keep` does not keep of `listed`, `rel`'s line (old
/// segments, spans and bases, generations with nothing kept), fenced. Best
/// effort: what is left is deleted next time.
async fn delete_unkept(
    socket: &Path,
    rel: &Path,
    listed: &[(String, u64)],
    keep: &Keep,
    fence: &Fence,
) {
    for (below, _) in listed {
        let doomed = match classify(below) {
            Object::Base(name) => !keep.base_object(&name),
            Object::Segment { gen, seg } => !keep.segment(&gen, &seg),
            Object::Manifest | Object::Other => false,
        };
        if !doomed {
            continue;
        }
        let Ok(_permit) = fence.permit().await else {
            return;
        };
        let object = format!("{}/{below}", path(rel));
        let r = rc::call(
            socket,
            "operations/deletefile",
            &json!({ "fs": root(), "remote": object }),
        )
        .await;
        if let Err(e) = r {
            tracing::debug!(db = %rel.display(), %object, error = %e, "sqlite: prune left an old object");
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
            at_ms: 0,
            packed: false,
            rollback: false,
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
    }

    #[test]
    fn the_walk_for_lines_skips_a_lines_generations_and_bases_only() {
        let e = |v: &[(&str, bool)]| -> Vec<(String, bool)> {
            v.iter().map(|(n, d)| (n.to_string(), *d)).collect()
        };
        let gen = new_gen();
        for (entries, want_line, want_below) in [
            // `.cvm/wal/` itself, or a directory on the way to a database.
            (
                e(&[("agents", true), ("state", true)]),
                false,
                vec!["agents", "state"],
            ),
            // A line: its generations and bases are not walked.
            (
                e(&[("manifest", false), ("bases", true), (&gen, true)]),
                true,
                vec![],
            ),
            // A directory named like a generation that is not in a line is walked.
            (e(&[(&gen, true)]), false, vec![gen.as_str()]),
            // In a line, a directory of another shape may hold a line.
            (
                e(&[
                    ("manifest", false),
                    ("sub", true),
                    ("0000000000001-zz", true),
                ]),
                true,
                vec!["sub", "0000000000001-zz"],
            ),
            (e(&[("manifest", true)]), false, vec!["manifest"]),
            (e(&[]), false, vec![]),
        ] {
            let (line, below) = walk_step(&entries);
            assert_eq!(
                (line, below),
                (
                    want_line,
                    want_below.iter().map(|s| s.to_string()).collect::<Vec<_>>()
                ),
                "{entries:?}"
            );
        }
    }

    #[test]
    fn names() {
        assert_ne!(new_gen(), new_gen());
        let seg = parse_segment(&remote_segment_name(42, 1_796_000_000_123)).unwrap();
        assert_eq!((seg.seq, seg.t_ms), (42, Some(1_796_000_000_123)));
        assert_eq!(
            parse_segment(&segment_name(7)).unwrap().t_ms,
            None,
            "step 1's names"
        );
        let span = parse_segment(&span_name(5, 9, 1_796_000_000_123)).unwrap();
        assert_eq!(
            (span.first, span.seq, span.t_ms, span.is_span()),
            (5, 9, Some(1_796_000_000_123), true)
        );
        assert!(!seg.is_span());
        for bad in [
            "manifest",
            "42",
            "000000000042-12",
            "00000000004x",
            "000000000009-000000000005-1796000000123",
            "000000000005-000000000009-1796000000123-1",
        ] {
            assert_eq!(parse_segment(bad), None, "{bad}");
        }
        let b = BaseRef {
            after: 9,
            ..base("g", [0; 32])
        };
        assert_eq!(
            classify(&b.object()),
            Object::Base("bases/g-000000000009".into())
        );
        assert_eq!(classify("manifest"), Object::Manifest);
        assert!(
            matches!(classify("g/000000000003-1796000000123"), Object::Segment { gen, seg } if gen == "g" && seg.seq == 3)
        );
        assert_eq!(classify("g/stray"), Object::Other);
        assert_eq!(segment_path(513, 7), "00000002/000000000513-0000000000007");
        match classify(&format!("g/{}", segment_path(513, 1_796_000_000_123))) {
            Object::Segment { gen, seg } => {
                assert_eq!((gen.as_str(), seg.seq, seg.first), ("g", 513, 513));
                assert_eq!(
                    seg.name,
                    segment_path(513, 1_796_000_000_123),
                    "a path below the generation"
                );
            }
            other => panic!("{other:?}"),
        }
        for stray in [
            // In another number's directory, or a span in a directory.
            "g/00000001/000000000513-1796000000123",
            "g/00000002/000000000512-000000000513-1796000000123",
            "g/0000002/000000000513-1796000000123",
            "g/00000002/x/000000000513-1796000000123",
        ] {
            assert_eq!(classify(stray), Object::Other, "{stray}");
        }
    }

    #[test]
    fn only_a_young_database_not_rolled_away_is_restored_without_a_stock_copy() {
        let packed = BaseRef {
            packed: true,
            ..base("n", [1; 32])
        };
        let young = Manifest::default().with(packed);
        let rolled_away = Manifest {
            gone_ms: Some(1_000),
            ..young.clone()
        };
        let grown = young.with(base("n", [2; 32]));
        for (m, at, restores) in [
            (&young, None, true),
            (&young, Some(5_000), true),
            (&rolled_away, None, false),
            (&rolled_away, Some(999), true),
            (&rolled_away, Some(1_000), false),
            // Its stock copy is what says it exists from now on.
            (&grown, None, false),
            (&Manifest::default(), None, false),
        ] {
            assert_eq!(m.restores_without_stock(at), restores, "{m:?} at {at:?}");
        }
        assert_eq!(
            rolled_away.with(base("m", [3; 32])).gone_ms,
            None,
            "created again"
        );
        let json = serde_json::to_string(&grown).unwrap();
        assert!(!json.contains("gone_ms"), "{json}");
        assert_eq!(json.matches("packed").count(), 1, "{json}");
    }

    #[test]
    fn old_manifests_read_with_whole_seconds() {
        let old: BaseRef =
            serde_json::from_str(r#"{"gen":"g","after":0,"sha256":"00","at":5}"#).unwrap();
        assert_eq!(old.taken_ms(), 5_999, "no commit it holds is newer");
    }
}
