//! Boot-time restore of SQLite databases from the crypt remote, before the
//! gateway can open anything: only where no local copy exists, and every
//! restored file must pass `PRAGMA quick_check` and is synced to disk. The
//! gateway never starts on an empty database while a remote one exists. A
//! database with a line (`line`) is its base plus every segment after it, in
//! order; a missing or unreadable segment ends the restore of that database
//! there, named.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use futures_util::stream::{self, StreamExt};
use tokio::time::Instant;

use crate::rclone::{rc, CRYPT_REMOTE};
use crate::remote::bucket::{META_DIR, SQLITE_DIR, TRASH_DIR, WAL_DIR, WAL_MANIFEST};
use crate::sqlite::backup::{Known, Line};
use crate::sqlite::history::{self, Stop};
use crate::sqlite::line::{self, BaseRef, Manifest, SegRef};
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
    #[error(
        "cannot write the restored {path} to disk: {source}; the disk under the state dir fails"
    )]
    Sync { path: PathBuf, source: io::Error },
    #[error("restoring {db}: its history object {object} is unusable ({why}); nothing older is taken in its place")]
    History {
        db: PathBuf,
        object: String,
        why: String,
    },
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
    Ok(restore_databases_at(socket, root, scratch, None)
        .await?
        .dbs
        .into_iter()
        .map(|(rel, r)| (rel, r.known))
        .collect())
}

/// One restored database.
#[derive(Debug, Clone)]
pub struct DbRestore {
    pub known: Known,
    /// The moment it is restored to (Unix ms), when its line says.
    pub point: Option<u64>,
}

/// What a restore to a moment did.
#[derive(Debug, Default)]
pub struct Restored {
    pub dbs: BTreeMap<PathBuf, DbRestore>,
    /// Databases with no restore point at or before the moment (created
    /// later, or older than the history kept), left out; with their oldest
    /// point.
    pub not_yet: Vec<(PathBuf, Option<u64>)>,
    /// Databases without a line (not in WAL mode, or written by an older
    /// cvm-init): restored as S3 holds them now.
    pub no_history: Vec<PathBuf>,
}

/// [`restore_databases`] as of `at` (Unix ms; `None`: the newest state).
pub async fn restore_databases_at(
    socket: &Path,
    root: &Path,
    scratch: &Path,
    at: Option<u64>,
) -> Result<Restored, RestoreError> {
    let ahead_dir = scratch.join("segments");
    let _ = fs::remove_dir_all(&ahead_dir);
    let before = files_below(root)?;
    let (mut fetched, mut ahead) = match at {
        // The bases and each database's segments download at once: the
        // segments do not wait for a base as big as the database.
        None => tokio::try_join!(
            fetch_databases(socket, root, &before),
            read_ahead(socket, &before, &ahead_dir, None),
        )?,
        Some(_) => (
            Vec::new(),
            read_ahead(socket, &before, &ahead_dir, at).await?,
        ),
    };
    let mut out = Restored::default();
    // A moment's base is often an older one, and a new database's first
    // has no stock copy: those come from the history (for a moment, before
    // the stock copies, so the newest is not downloaded as well), several
    // at once.
    let mut from_history = Vec::new();
    for (rel, a) in &ahead {
        match &a.segments {
            Some((b, _, _)) if !(a.stock && a.manifest.bases.first() == Some(b)) => {
                from_history.push((rel.clone(), a.dir.clone(), b.clone()));
            }
            None if !a.stock => {
                let oldest = history::base_at(&a.manifest.bases, at.unwrap_or(u64::MAX)).err();
                out.not_yet.push((rel.clone(), oldest.flatten()));
            }
            _ => {}
        }
    }
    let hashed: Vec<Result<(PathBuf, Hashed), RestoreError>> =
        stream::iter(from_history.into_iter().map(|(rel, dir, b)| async move {
            let h = fetch_base(socket, root, &rel, &dir, &b).await?;
            Ok((rel, h))
        }))
        .buffer_unordered(READ_AHEAD)
        .collect()
        .await;
    for r in hashed {
        let (rel, h) = r?;
        if let Some(a) = ahead.get_mut(&rel) {
            a.hashed = Some(h);
        }
        fetched.push(rel);
    }
    if at.is_some() {
        fetched = fetch_databases(socket, root, &before).await?;
    }
    fetched.sort();
    fetched.dedup();
    start_writeback(root, &fetched);
    let mut lines = BTreeMap::new();
    let mut kept = Vec::new();
    for rel in &fetched {
        let ahead = ahead.remove(rel);
        let caught = catch_up(socket, root, rel, &ahead_dir, at, ahead).await;
        let caught = match caught {
            Ok(c) => c,
            Err(e) => {
                let _ = fs::remove_dir_all(&ahead_dir);
                return Err(e);
            }
        };
        match caught {
            CatchUp::Before(oldest) => {
                let _ = fs::remove_file(root.join(rel));
                out.not_yet.push((rel.clone(), oldest));
                continue;
            }
            CatchUp::NoLine => {
                out.no_history.push(rel.clone());
                lines.insert(rel.clone(), (None, None));
            }
            CatchUp::Line { line, point } => {
                lines.insert(rel.clone(), (line, Some(point)));
            }
        }
        kept.push(rel.clone());
    }
    let _ = fs::remove_dir_all(&ahead_dir);
    for (rel, sha256) in check_databases(root, &kept).await? {
        let (line, point) = lines.remove(&rel).unwrap_or_default();
        out.dbs.insert(
            rel,
            DbRestore {
                known: Known { sha256, line },
                point,
            },
        );
    }
    Ok(out)
}

enum CatchUp {
    /// No manifest, or one that does not describe the base: the base alone.
    NoLine,
    /// Restored to `point`; `line` is the line to continue (newest state
    /// only, and only when it was followed to its end).
    Line { line: Option<Line>, point: u64 },
    /// No restore point at or before the moment; the oldest there is.
    Before(Option<u64>),
}

/// Databases whose lines are read at once.
const READ_AHEAD: usize = 8;

/// A database's line, read while the bases download: its manifest, and
/// the segments of the base a restore to the moment is expected to start
/// from (the newest; for a moment, the one `history::base_at` picks).
struct Ahead {
    /// Whether the database has a stock copy (`sqlite/<path>`).
    stock: bool,
    /// Where its line is in the crypt remote: [`line::path`], or a
    /// [`line::trashed_path`] for a database deleted since the moment.
    dir: String,
    manifest: Manifest,
    /// The base to restore, where its segments were fetched, and what to
    /// apply of them.
    segments: Option<(BaseRef, PathBuf, Plan)>,
    /// The content hash and size of the base already in place, when it
    /// was fetched (and checked) from the history ahead of the rest.
    hashed: Option<Hashed>,
}

/// A database file's content hash and size.
type Hashed = ([u8; 32], u64);

/// Spans passed over in one restore at most before a bad one stops it.
const SPAN_RETRIES: usize = 3;

/// The segments (and spans) to apply onto a base, in order, and why
/// applying stops before the moment asked for.
type Plan = (Vec<SegRef>, Option<Stop>);

fn fetch_err(rel: &Path) -> impl Fn(rc::RcError) -> RestoreError + '_ {
    move |e| RestoreError::Fetch {
        exit: format!("reading {}", line::dir(rel)),
        stderr: e.to_string(),
    }
}

/// The paths of the objects below `remote` of the crypt remote, relative to it.
async fn list_below(socket: &Path, remote: &str) -> Result<Vec<String>, RestoreError> {
    let listed = rc::list(
        socket,
        &serde_json::json!({
            "fs": line::root(), "remote": remote,
            "opt": { "recurse": true, "filesOnly": true, "noModTime": true, "noMimeType": true },
        }),
    )
    .await
    .map_err(|e| RestoreError::Fetch {
        exit: format!("listing {CRYPT_REMOTE}:{remote}"),
        stderr: e.to_string(),
    })?;
    let prefix = format!("{remote}/");
    Ok(listed
        .iter()
        .filter_map(|i| Some(i["Path"].as_str()?.strip_prefix(&prefix)?.to_owned()))
        .collect())
}

/// A line a restore may read: the database's path, whether it has a stock
/// copy, where the line is, and whether that is in the trash.
type Candidate = (PathBuf, bool, String, bool);

/// [`Ahead`] for every database S3 holds that `local` (the files already
/// in the restore's root) lacks: those with a stock copy, those known only
/// by a manifest that says they are restored without one, and, for a
/// moment, those deleted since it (from the trash); the segments in
/// numbered dirs below `dir`.
async fn read_ahead(
    socket: &Path,
    local: &BTreeSet<PathBuf>,
    dir: &Path,
    at: Option<u64>,
) -> Result<BTreeMap<PathBuf, Ahead>, RestoreError> {
    let lines = async {
        line::with_manifests(socket)
            .await
            .map_err(|e| RestoreError::Fetch {
                exit: format!("listing {CRYPT_REMOTE}:{META_DIR}/{WAL_DIR}"),
                stderr: e.to_string(),
            })
    };
    let (stock, lines) = tokio::try_join!(list_below(socket, SQLITE_DIR), lines)?;
    let stock: BTreeSet<PathBuf> = stock.into_iter().map(PathBuf::from).collect();
    let manifest_only = lines.into_iter().filter(|rel| !stock.contains(rel));
    let live: Vec<Candidate> = stock
        .iter()
        .map(|rel| (rel.clone(), true))
        .chain(manifest_only.map(|rel| (rel, false)))
        .filter(|(rel, _)| !local.contains(rel))
        .map(|(rel, stock)| {
            let dir = line::path(&rel);
            (rel, stock, dir, false)
        })
        .collect();
    let one = |n: usize, (rel, stock, line_dir, trashed): Candidate| async move {
        let scratch = dir.join(n.to_string());
        let Some(manifest) = line::read_manifest_in(socket, &line_dir, &scratch)
            .await
            .map_err(fetch_err(&rel))?
        else {
            return Ok(None);
        };
        let wanted = if trashed {
            // Deleted after the moment: it existed then.
            at.zip(manifest.gone_ms).is_some_and(|(at, gone)| at < gone)
        } else {
            stock || manifest.restores_without_stock(at)
        };
        if !wanted {
            return Ok(None);
        }
        let base = match at {
            None => manifest.bases.first(),
            Some(at) => history::base_at(&manifest.bases, at).ok(),
        };
        let segments = match base {
            Some(b) => {
                let plan = fetch_segments(socket, &rel, &line_dir, b, at, &scratch, &[]).await?;
                Some((b.clone(), scratch, plan))
            }
            None if trashed => return Ok(None),
            None => None,
        };
        Ok(Some((
            rel,
            Ahead {
                stock,
                dir: line_dir,
                manifest,
                segments,
                hashed: None,
            },
        )))
    };
    // Several databases at once: each is a few small requests, and a state
    // dir of hundreds of databases should not read them one by one.
    let read: Vec<Result<Option<(PathBuf, Ahead)>, RestoreError>> = stream::iter(
        live.into_iter()
            .enumerate()
            .map(|(n, candidate)| one(n, candidate)),
    )
    .buffer_unordered(READ_AHEAD)
    .collect()
    .await;
    let mut out = BTreeMap::new();
    for r in read {
        if let Some((rel, ahead)) = r? {
            out.insert(rel, ahead);
        }
    }
    let Some(at) = at else {
        return Ok(out);
    };
    // Databases with no point at the moment where they are now: a line in
    // the trash may hold one (the newest day first).
    let wal = format!("{META_DIR}/{WAL_DIR}");
    let mut trashed: Vec<(String, PathBuf)> = list_below(socket, TRASH_DIR)
        .await?
        .iter()
        .filter_map(|p| {
            let (day, below) = p
                .strip_suffix(&format!("/{WAL_MANIFEST}"))?
                .split_once('/')?;
            let rel = below.strip_prefix(&format!("{wal}/"))?;
            Some((day.to_owned(), PathBuf::from(rel)))
        })
        .filter(|(_, rel)| !local.contains(rel))
        .filter(|(_, rel)| out.get(rel).is_none_or(|a: &Ahead| a.segments.is_none()))
        .collect();
    trashed.sort_by(|a, b| b.cmp(a));
    let n = out.len() + 1_000_000;
    for (k, (day, rel)) in trashed.into_iter().enumerate() {
        if out.get(&rel).is_some_and(|a| a.dir != line::path(&rel)) {
            continue;
        }
        let line_dir = line::trashed_path(&day, &rel);
        if let Some((rel, ahead)) = one(n + k, (rel, false, line_dir, true)).await? {
            tracing::info!(db = %rel.display(), day, at, "sqlite: restoring a database deleted since the moment, from the trash");
            out.insert(rel, ahead);
        }
    }
    Ok(out)
}

/// Lists the generation of `base` in `rel`'s line at `line_dir`, plans what
/// to apply onto it up to `at`, and downloads only that into `dir`: spans
/// stand in for the segments they merge, so an hour of segments costs a
/// restore about a hundred downloads, not thousands.
async fn fetch_segments(
    socket: &Path,
    rel: &Path,
    line_dir: &str,
    base: &BaseRef,
    at: Option<u64>,
    dir: &Path,
    skip: &[String],
) -> Result<Plan, RestoreError> {
    let gen_dir = format!("{line_dir}/{}", base.gen);
    let listed = rc::list(
        socket,
        &serde_json::json!({
            "fs": line::root(), "remote": gen_dir,
            "opt": { "filesOnly": true, "noModTime": true, "noMimeType": true },
        }),
    )
    .await
    .map_err(fetch_err(rel))?;
    let segs: Vec<SegRef> = listed
        .iter()
        .filter_map(|i| line::parse_segment(i["Name"].as_str()?))
        .filter(|s| !skip.contains(&s.name))
        .collect();
    let plan = history::segments_to(base, &segs, at);
    let io = |source| RestoreError::Io {
        path: dir.to_owned(),
        source,
    };
    fs::create_dir_all(dir).map_err(io)?;
    if plan.0.is_empty() {
        return Ok(plan);
    }
    let names: String = plan.0.iter().map(|s| format!("{}\n", s.name)).collect();
    let list = dir.with_extension("files");
    fs::write(&list, names).map_err(io)?;
    let params = serde_json::json!({
        "srcFs": format!("{CRYPT_REMOTE}:{gen_dir}"), "dstFs": dir.to_string_lossy(),
        "_config": { "Transfers": 16, "Checkers": 16, "NoTraverse": true },
        "_filter": { "FilesFrom": [list.to_string_lossy()] },
    });
    let r = rc::call(socket, "sync/copy", &params).await;
    let _ = fs::remove_file(&list);
    r.map_err(fetch_err(rel))?;
    Ok(plan)
}

/// Brings the base at `root/rel` to `at` (`None`: the newest state): the
/// base the manifest names for that moment (fetched from history when the
/// stock one is another), then its segments in order (those read `ahead`
/// when they follow that base), and leaves the database in WAL mode so it
/// can be followed before the gateway opens it.
async fn catch_up(
    socket: &Path,
    root: &Path,
    rel: &Path,
    scratch: &Path,
    at: Option<u64>,
    ahead: Option<Ahead>,
) -> Result<CatchUp, RestoreError> {
    let Some(Ahead {
        manifest,
        segments,
        hashed,
        dir: line_dir,
        ..
    }) = ahead
    else {
        return Ok(CatchUp::NoLine);
    };
    let path = root.join(rel);
    let hashed = match hashed {
        Some(h) => Ok(h),
        None => hash(&path).await,
    };
    let (hash, mut base_bytes) = match hashed {
        Ok(h) => h,
        // Left to the check, which names the file and stops the boot.
        Err(_) => return Ok(CatchUp::NoLine),
    };
    let base = match at {
        None => match manifest.entry_for(&hash) {
            Some(b) => b.clone(),
            None => {
                tracing::warn!(db = %rel.display(), "sqlite: the base on S3 is not the one its manifest names; restoring the base alone (written without cvm-init's segments, or by an older cvm-init)");
                return Ok(CatchUp::NoLine);
            }
        },
        Some(at) => match history::base_at(&manifest.bases, at) {
            Err(oldest) => return Ok(CatchUp::Before(oldest)),
            Ok(b) if b.sha256 == line::hex(&hash) => b.clone(),
            Ok(b) => {
                base_bytes = fetch_base(socket, root, rel, &line_dir, b).await?.1;
                b.clone()
            }
        },
    };
    let remote = format!("{CRYPT_REMOTE}:{line_dir}/{}", base.gen);
    let (mut dir, mut plan) = match segments {
        Some((b, dir, plan)) if b == base => (dir, plan),
        // The stock base is not the newest the manifest names (a base
        // taken by hand, or an upload cut short): its own generation.
        _ => {
            let dir = scratch.join("other");
            let _ = fs::remove_dir_all(&dir);
            let plan = fetch_segments(socket, rel, &line_dir, &base, at, &dir, &[]).await?;
            (dir, plan)
        }
    };
    let (mut done, mut after_base, mut skipped) = (Vec::new(), 0, Vec::new());
    let stopped = loop {
        let (todo, stop) = plan;
        let (applied, bytes, failed) = {
            let (dir, path) = (dir.clone(), path.clone());
            let names: Vec<String> = todo.iter().map(|s| s.name.clone()).collect();
            tokio::task::spawn_blocking(move || apply_segments(&dir, &path, &names))
                .await
                .expect("applying does not panic")
        };
        let _ = fs::remove_dir_all(&dir);
        after_base += bytes;
        done.extend_from_slice(&todo[..applied]);
        let Some(why) = failed else { break stop };
        let bad = &todo[applied];
        // A span only stands in for its segments: one that cannot be
        // read is passed over for them (a few times at most).
        if !bad.is_span() || skipped.len() >= SPAN_RETRIES {
            break Some(Stop::Failed(bad.name.clone(), why));
        }
        tracing::warn!(db = %rel.display(), span = bad.name, error = why, "sqlite: a span could not be applied; its segments are taken instead");
        skipped.push(bad.name.clone());
        let from = BaseRef {
            after: done.last().map_or(base.after, |s: &SegRef| s.seq),
            ..base.clone()
        };
        dir = scratch.join(format!("retry-{}", skipped.len()));
        plan = fetch_segments(socket, rel, &line_dir, &from, at, &dir, &skipped).await?;
    };
    if !base.rollback {
        let path = path.clone();
        tokio::task::spawn_blocking(move || to_wal(&path))
            .await
            .expect("switching does not panic");
    }
    if let Some(stop) = &stopped {
        let (object, why) = match stop {
            Stop::Missing(seq) => (line::segment_name(*seq), "missing".to_owned()),
            Stop::Untimed(name) => (
                name.clone(),
                "written by an older cvm-init, without its time".to_owned(),
            ),
            Stop::Failed(name, why) => (name.clone(), why.clone()),
            Stop::Twice(seq) => (
                line::segment_name(*seq),
                "two writers wrote this number (an upload in flight when the lease was taken over); \
                 neither is taken"
                    .to_owned(),
            ),
        };
        tracing::error!(db = %rel.display(), restored_to = done.last().map_or(base.after, |s| s.seq), "sqlite: restore stopped at segment {remote}/{object}: {why}; the database is restored as of the segment before it");
    }
    let point = done.last().and_then(|s| s.t_ms).unwrap_or(base.taken_ms());
    tracing::info!(db = %rel.display(), generation = %base.gen, segments = done.len(), "sqlite: restored base and segments");
    let seq = done.last().map_or(base.after, |s| s.seq);
    let line = (stopped.is_none() && at.is_none()).then(|| Line {
        gen: base.gen.clone(),
        seq,
        manifest: Manifest::clone(&manifest),
        base,
        base_bytes,
        after_base,
        pruned: (crate::timepoint::now_ms(), seq),
    });
    Ok(CatchUp::Line { line, point })
}

async fn hash(path: &Path) -> Result<([u8; 32], u64), SqliteError> {
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || sqlite::content_hash(&path))
        .await
        .expect("hashing does not panic")
}

/// Starts writing the downloaded `files` out to disk and returns at once.
/// Each is synced before the restore is trusted ([`check_databases`]), and
/// writing out a base of hundreds of MB takes about as long as hashing,
/// patching and checking it: it runs meanwhile, not after them.
fn start_writeback(root: &Path, files: &[PathBuf]) {
    for rel in files {
        let path = root.join(rel);
        // A failure here shows again in the sync that counts.
        drop(tokio::task::spawn_blocking(move || {
            fs::File::open(&path).and_then(|f| f.sync_data())
        }));
    }
}

/// Replaces `root/rel` with the history copy of `base` in the line at
/// `line_dir`, checked against its hash. Returns its content hash and size.
async fn fetch_base(
    socket: &Path,
    root: &Path,
    rel: &Path,
    line_dir: &str,
    base: &BaseRef,
) -> Result<Hashed, RestoreError> {
    let object = format!("{line_dir}/{}", base.object());
    let path = root.join(rel);
    let unusable = |why: String| RestoreError::History {
        db: rel.to_owned(),
        object: format!("{CRYPT_REMOTE}:{object}"),
        why,
    };
    let _ = fs::remove_file(&path);
    let parent = path.parent().unwrap_or(root);
    let mut name = path
        .file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned();
    if base.packed {
        name.push_str(".zst");
    }
    let params = serde_json::json!({
        "srcFs": line::root(), "srcRemote": object,
        "dstFs": parent.to_string_lossy(), "dstRemote": name,
    });
    rc::call(socket, "operations/copyfile", &params)
        .await
        .map_err(|e| unusable(e.to_string()))?;
    if base.packed {
        let (packed, plain) = (parent.join(&name), path.clone());
        let unpacked = tokio::task::spawn_blocking(move || {
            let r = fs::File::open(&packed).and_then(|mut src| {
                let mut dst = fs::File::create(&plain)?;
                zstd::stream::copy_decode(&mut src, &mut dst)
            });
            let _ = fs::remove_file(&packed);
            r
        })
        .await
        .expect("decompressing does not panic");
        unpacked.map_err(|e| unusable(format!("cannot decompress it: {e}")))?;
    }
    let (got, bytes) = hash(&path).await.map_err(|e| unusable(e.to_string()))?;
    if line::hex(&got) != base.sha256 {
        return Err(unusable(
            "its content is not the base the manifest names".into(),
        ));
    }
    Ok((got, bytes))
}

/// Applies the segments named `names`, in order, from `dir` to `db`, until
/// one fails; then sets WAL mode when `wal` (a rollback-journal database
/// stays as it is). Returns how many were applied, their bytes, and why it
/// stopped early.
fn apply_segments(dir: &Path, db: &Path, names: &[String]) -> (usize, u64, Option<String>) {
    let mut applied = 0;
    let mut bytes = 0;
    let mut failed = None;
    for name in names {
        let r = fs::read(dir.join(name))
            .map_err(|e| e.to_string())
            .and_then(|b| {
                bytes += b.len() as u64;
                Segment::decode(&b).map_err(|e| e.to_string())
            })
            .and_then(|s| s.apply(db).map_err(|e| e.to_string()));
        if let Err(e) = r {
            failed = Some(e);
            break;
        }
        applied += 1;
    }
    (applied, bytes, failed)
}

/// Leaves a restored WAL database in WAL mode, as its app left it.
fn to_wal(db: &Path) {
    if let Err(e) =
        rusqlite::Connection::open(db).and_then(|c| c.pragma_update(None, "journal_mode", "WAL"))
    {
        tracing::warn!(db = %db.display(), error = %e, "sqlite: cannot put the restored database in WAL mode");
    }
}

/// The fetch half of [`restore_databases`]: returns the files it added.
async fn fetch_databases(
    socket: &Path,
    root: &Path,
    before: &BTreeSet<PathBuf>,
) -> Result<Vec<PathBuf>, RestoreError> {
    fetch(socket, root).await?;
    Ok(files_below(root)?.difference(before).cloned().collect())
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
            // Both read the whole file: on two threads, the hash costs no
            // time, nor does the sync that puts what was applied on disk.
            tokio::task::spawn_blocking(move || {
                std::thread::scope(|s| {
                    let hashed = s.spawn(|| sqlite::content_hash(&path));
                    let synced = s.spawn(|| fs::File::open(&path).and_then(|f| f.sync_data()));
                    let checked = sqlite::quick_check(&path);
                    let hashed = hashed.join().expect("hashing does not panic");
                    let synced = synced.join().expect("syncing does not panic");
                    (checked.and(hashed), synced)
                })
            })
            .await
            .expect("quick_check does not panic")
        };
        let (checked, synced) = checked;
        synced.map_err(|source| RestoreError::Sync {
            path: path.clone(),
            source,
        })?;
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
