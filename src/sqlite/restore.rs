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
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use futures_util::stream::{self, StreamExt, TryStreamExt};
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
    let started = Instant::now();
    let writeback = WriteBack::start(root, &before);
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
    tracing::debug!(took = ?started.elapsed(), "sqlite: bases and segments downloaded");
    let mut out = Restored::default();
    // A moment's base is often an older one, and a new database's first
    // has no stock copy: those come from the history (for a moment, before
    // the stock copies, so the newest is not downloaded as well), several
    // at once.
    let mut from_history = Vec::new();
    for (rel, a) in &ahead {
        match &a.segments {
            Some((b, ..)) if !(a.stock && a.manifest.bases.first() == Some(b)) => {
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
    let mut hashed = BTreeMap::new();
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
            CatchUp::Line {
                line,
                point,
                stock_hash: Some(sha256),
                checked: true,
            } => {
                let point = Some(point);
                let line = line.map(|l| *l);
                let known = Known { sha256, line };
                out.dbs.insert(rel.clone(), DbRestore { known, point });
                continue;
            }
            CatchUp::Line {
                line,
                point,
                stock_hash,
                ..
            } => {
                hashed.extend(stock_hash.map(|h| (rel.clone(), h)));
                lines.insert(rel.clone(), (line.map(|l| *l), Some(point)));
            }
        }
        kept.push(rel.clone());
    }
    // Until here: the pages segments write onto a base go out to disk
    // while the next are decoded, not all in the check's sync.
    drop(writeback);
    let _ = fs::remove_dir_all(&ahead_dir);
    let checked = check_databases(root, &kept, &hashed).await?;
    tracing::info!(databases = out.dbs.len() + checked.len(), took = ?started.elapsed(), "sqlite: restore done");
    for (rel, sha256) in checked {
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
    Line {
        line: Option<Box<Line>>,
        point: u64,
        /// A WAL database's line continues from its stock copy: that
        /// copy's content hash, which the backup loop keeps as what S3
        /// holds of it (as after it uploads a base), so the restored file
        /// needs no second hash.
        stock_hash: Option<[u8; 32]>,
        /// Already checked and synced ([`catch_up_ahead`]).
        checked: bool,
    },
    /// No restore point at or before the moment; the oldest there is.
    Before(Option<u64>),
}

/// Databases whose lines are read at once.
const READ_AHEAD: usize = 8;
/// Segment directories of one generation listed at once.
const LIST_AT_ONCE: usize = 8;

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
    /// The base to restore, where its segments were fetched, what to
    /// apply of them, and the first of them already read and merged.
    segments: Option<(BaseRef, PathBuf, Plan, Option<Batch>)>,
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
    let started = Instant::now();
    let (stock, lines) = tokio::try_join!(list_below(socket, SQLITE_DIR), lines)?;
    tracing::debug!(stock = stock.len(), lines = lines.len(), took = ?started.elapsed(), "sqlite: databases and lines listed");
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
    let budget = &std::sync::Mutex::new(AHEAD_BYTES);
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
                let t = Instant::now();
                let plan = fetch_segments(socket, &rel, &line_dir, b, at, &scratch, &[]).await?;
                let downloaded = t.elapsed();
                let batch = read_ahead_batch(budget, &scratch, &plan.0).await;
                tracing::debug!(db = %rel.display(), objects = plan.0.len(), downloaded = ?downloaded,
                    took = ?t.elapsed(), "sqlite: segments and spans read ahead");
                Some((b.clone(), scratch, plan, batch))
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
    let started = Instant::now();
    let (segs, dirs) = list_generation(socket, &gen_dir, base, at, skip)
        .await
        .map_err(fetch_err(rel))?;
    let listed = segs.len();
    let plan = history::segments_to(base, &segs, at);
    tracing::debug!(db = %rel.display(), listed, dirs, to_fetch = plan.0.len(), took = ?started.elapsed(),
        "sqlite: generation listed");
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

/// The segments and spans of `base`'s generation (at `gen_dir`) a restore
/// to `at` can use, named by their paths below it, and how many segment
/// directories were listed: the generation's top (its spans but those in
/// `skip`, and the segments an older cvm-init put there), then the segment
/// directories from where those bring the base, in order, until one holds a
/// segment newer than `at`. The directories before hold only segments the
/// spans stand in for. Each generation has one writer (a new one after a
/// crash, see `backup`), so no segment number there is written twice.
async fn list_generation(
    socket: &Path,
    gen_dir: &str,
    base: &BaseRef,
    at: Option<u64>,
    skip: &[String],
) -> Result<(Vec<SegRef>, usize), rc::RcError> {
    let (mut segs, mut dirs) = (Vec::new(), Vec::new());
    for (name, is_dir) in line::entries(socket, gen_dir).await? {
        if !is_dir {
            segs.extend(line::parse_segment(&name).filter(|s| !skip.contains(&s.name)));
        } else if let Some(first) = line::parse_segment_dir(&name) {
            dirs.push((first, name));
        }
    }
    let reach = history::segments_to(base, &segs, at)
        .0
        .last()
        .map_or(base.after, |s| s.seq);
    let dirs = dirs_after(reach, dirs);
    let mut listed = 0;
    for batch in dirs.chunks(LIST_AT_ONCE) {
        let found: Vec<Vec<SegRef>> = stream::iter(batch.iter().map(|(_, dir)| async move {
            let items = line::entries(socket, &format!("{gen_dir}/{dir}")).await?;
            Ok::<_, rc::RcError>(
                items
                    .iter()
                    .filter_map(|(name, _)| line::parse_in_dir(dir, name))
                    .collect(),
            )
        }))
        .buffered(LIST_AT_ONCE)
        .try_collect()
        .await?;
        listed += batch.len();
        let past = |s: &SegRef| at.is_some_and(|at| s.t_ms.is_some_and(|t| t > at));
        let done = found.iter().flatten().any(past);
        segs.extend(found.into_iter().flatten());
        if done {
            break;
        }
    }
    Ok((segs, listed))
}

/// The segment directories (first number, name) holding numbers after
/// `reach`, in order.
fn dirs_after(reach: u64, mut dirs: Vec<(u64, String)>) -> Vec<(u64, String)> {
    dirs.retain(|(first, _)| first + line::SEGMENTS_PER_DIR > reach + 1);
    dirs.sort();
    dirs
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
    let started = Instant::now();
    let mut segments = segments;
    if at.is_none() && hashed.is_none() {
        if let Some(done) = catch_up_ahead(rel, &path, &manifest, &mut segments).await? {
            return Ok(done);
        }
    }
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
    let (mut dir, mut plan, mut batch) = match segments {
        Some((b, dir, plan, batch)) if b == base => (dir, plan, batch),
        // The stock base is not the newest the manifest names (a base
        // taken by hand, or an upload cut short): its own generation.
        _ => {
            let dir = scratch.join("other");
            let _ = fs::remove_dir_all(&dir);
            let plan = fetch_segments(socket, rel, &line_dir, &base, at, &dir, &[]).await?;
            (dir, plan, None)
        }
    };
    let hashed_in = started.elapsed();
    let (mut done, mut after_base, mut skipped) = (Vec::new(), 0, Vec::new());
    let stopped = loop {
        let (todo, stop) = plan;
        let (applied, bytes, failed) = {
            let (dir, path) = (dir.clone(), path.clone());
            let names: Vec<String> = todo.iter().map(|s| s.name.clone()).collect();
            let first = batch.take();
            tokio::task::spawn_blocking(move || apply_segments(&dir, &path, &names, first))
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
    let applied_in = started.elapsed();
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
    tracing::info!(db = %rel.display(), generation = %base.gen, segments = done.len(), hashed_in = ?hashed_in, applied_in = ?applied_in,
        took = ?started.elapsed(), "sqlite: restored base and segments");
    let continued = (stopped.is_none() && at.is_none()).then_some((base_bytes, after_base));
    Ok(caught_up(&manifest, base, &done, continued, hash, false))
}

/// What [`catch_up`] returns for `base` and the segments `done` after it;
/// `continued` (the base's bytes and theirs) when the line goes on from
/// them, `hash` the base's content hash.
fn caught_up(
    manifest: &Manifest,
    base: BaseRef,
    done: &[SegRef],
    continued: Option<(u64, u64)>,
    hash: [u8; 32],
    checked: bool,
) -> CatchUp {
    let point = done.last().and_then(|s| s.t_ms).unwrap_or(base.taken_ms());
    let seq = done.last().map_or(base.after, |s| s.seq);
    let line = continued.map(|(base_bytes, after_base)| {
        Box::new(Line {
            gen: base.gen.clone(),
            seq,
            manifest: Manifest::clone(manifest),
            base,
            base_bytes,
            after_base,
            pruned: (crate::timepoint::now_ms(), seq),
            sealed: false,
        })
    });
    let stock_hash = line
        .as_ref()
        .is_some_and(|l| !l.base.rollback)
        .then_some(hash);
    CatchUp::Line {
        line,
        point,
        stock_hash,
        checked,
    }
}

/// The usual restore, made shorter: the stock copy is the newest base its
/// manifest names (unless a base was taken by hand, or its upload was cut
/// short), and its segments were read ahead. They are written first; the
/// base's hash, taken from the file and what they wrote over, is checked
/// beside the `quick_check` and the sync, not before them. When the hash
/// is another, what they wrote over is put back and `None` returned, for
/// [`catch_up`] to go the long way.
async fn catch_up_ahead(
    rel: &Path,
    path: &Path,
    manifest: &Manifest,
    segments: &mut Option<(BaseRef, PathBuf, Plan, Option<Batch>)>,
) -> Result<Option<CatchUp>, RestoreError> {
    let Some((base, dir, (todo, None), batch)) = segments else {
        return Ok(None);
    };
    let whole = batch
        .as_ref()
        .is_some_and(|b| b.failed.is_none() && b.taken == todo.len());
    if manifest.bases.first() != Some(&*base) || base.rollback || !whole {
        return Ok(None);
    }
    let Some(Batch { merged, bytes, .. }) = batch.take() else {
        return Ok(None);
    };
    let started = Instant::now();
    let checked = {
        let (path, dir) = (path.to_owned(), dir.clone());
        tokio::task::spawn_blocking(move || -> io::Result<_> {
            let Some(undo) = Undo::take(&path, merged.as_ref())? else {
                return Ok(None);
            };
            if let Some(m) = &merged {
                m.apply(&path)?;
            }
            to_wal(&path);
            let (hashed, checked, synced) = std::thread::scope(|s| {
                // Unlinking tens of MB of segments takes a while, and
                // before the boot's sync(), or that writes them out.
                s.spawn(|| fs::remove_dir_all(&dir));
                check_beside(&path, || undo.hash(&path))
            });
            Ok(Some((undo, hashed, checked, synced)))
        })
        .await
        .expect("applying does not panic")
    };
    let io = |source| RestoreError::Io {
        path: path.to_owned(),
        source,
    };
    let Some((undo, hashed, checked, synced)) = checked.map_err(io)? else {
        return Ok(None);
    };
    match hashed {
        Ok(h) if line::hex(&h) == base.sha256 => {
            synced.map_err(|source| RestoreError::Sync {
                path: path.to_owned(),
                source,
            })?;
            checked.map_err(|source| corrupt(path, rel, source))?;
            tracing::info!(db = %rel.display(), generation = %base.gen, segments = todo.len(),
                took = ?started.elapsed(), "sqlite: restored base and segments, checked");
            let continued = Some((undo.len, bytes));
            Ok(Some(caught_up(
                manifest,
                base.clone(),
                todo,
                continued,
                h,
                true,
            )))
        }
        _ => {
            undo.put_back(path).map_err(io)?;
            // Its segments are gone with `dir`; they were not this base's.
            *segments = None;
            Ok(None)
        }
    }
}

/// What a batch of pages is about to write over in a database file, and
/// its size: enough to hash the file as it was once they are written.
struct Undo {
    len: u64,
    /// Byte offset → what was there.
    pages: BTreeMap<u64, Vec<u8>>,
}

impl Undo {
    /// Reads what `seg` would write over in `db` (and its first page, which
    /// the switch to WAL mode writes). `None` when `seg` cuts the file
    /// short: all it cuts off would have to be kept.
    fn take(db: &Path, seg: Option<&Segment>) -> io::Result<Option<Undo>> {
        let f = fs::File::open(db)?;
        let len = f.metadata()?.len();
        let size = seg.map_or(4096, |s| u64::from(s.page_size));
        if seg.is_some_and(|s| u64::from(s.db_pages) * size < len) {
            return Ok(None);
        }
        let pgnos = seg.into_iter().flat_map(|s| s.pages.keys().copied());
        let mut pages = BTreeMap::new();
        for pgno in std::iter::once(1).chain(pgnos) {
            let at = u64::from(pgno - 1) * size;
            if at >= len || pages.contains_key(&at) {
                continue;
            }
            let mut page = vec![0u8; size.min(len - at) as usize];
            f.read_exact_at(&mut page, at)?;
            pages.insert(at, page);
        }
        Ok(Some(Undo { len, pages }))
    }

    /// The content hash of `db` as it was.
    fn hash(&self, db: &Path) -> Result<[u8; 32], SqliteError> {
        sqlite::content_hash_before(db, self.len, &self.pages)
    }

    /// Writes back what was written over, and the size.
    fn put_back(&self, db: &Path) -> io::Result<()> {
        let f = fs::OpenOptions::new().write(true).open(db)?;
        for (&at, page) in &self.pages {
            f.write_all_at(page, at)?;
        }
        f.set_len(self.len)
    }
}

/// `quick_check` of the restored database at `path`, with `hash` and the
/// sync that puts it on disk each on a thread of its own: all three read
/// or write the whole file, and together they take the time of one.
fn check_beside<T: Send>(
    path: &Path,
    hash: impl FnOnce() -> Result<T, SqliteError> + Send,
) -> (
    Result<T, SqliteError>,
    Result<(), SqliteError>,
    io::Result<()>,
) {
    std::thread::scope(|s| {
        let hashed = s.spawn(hash);
        let synced = s.spawn(|| fs::File::open(path).and_then(|f| f.sync_data()));
        let checked = sqlite::quick_check(path);
        let hashed = hashed.join().expect("hashing does not panic");
        let synced = synced.join().expect("syncing does not panic");
        (hashed, checked, synced)
    })
}

/// Moves a restored database that fails its check aside; the error to stop
/// the boot with.
fn corrupt(path: &Path, rel: &Path, source: SqliteError) -> RestoreError {
    let aside = sqlite::sidecar(path, ".corrupt");
    let _ = fs::rename(path, &aside);
    RestoreError::Corrupt {
        db: rel.to_owned(),
        aside,
        source: Box::new(source),
    }
}

async fn hash(path: &Path) -> Result<([u8; 32], u64), SqliteError> {
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || sqlite::content_hash(&path))
        .await
        .expect("hashing does not panic")
}

/// Writes what the downloads put under a restore's root out to disk while
/// they run, and what segments write onto the bases after, every
/// [`WRITEBACK_EVERY`]: a restored database must be on disk before the
/// restore counts as done, and a base of hundreds of MB written out only
/// once it is downloaded made a restore wait for its disk (0.25 s for 280
/// MB here). Stops when dropped.
struct WriteBack {
    _stop: std::sync::mpsc::Sender<()>,
}

const WRITEBACK_EVERY: std::time::Duration = std::time::Duration::from_millis(100);

impl WriteBack {
    fn start(root: &Path, before: &BTreeSet<PathBuf>) -> WriteBack {
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let (root, before) = (root.to_owned(), before.clone());
        // A failure here shows again in the sync that counts.
        drop(tokio::task::spawn_blocking(move || {
            while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                stopped.recv_timeout(WRITEBACK_EVERY)
            {
                let Ok(now) = files_below(&root) else {
                    continue;
                };
                for rel in now.difference(&before) {
                    let _ = fs::File::open(root.join(rel)).and_then(|f| f.sync_data());
                }
            }
        }));
        WriteBack { _stop: stop }
    }
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

/// Bytes of pages read and merged ahead, while the bases download, over
/// all databases of a restore; each takes at most half.
const AHEAD_BYTES: usize = 256 << 20;

/// Bytes of pages merged before they are written: a history's segments
/// can weigh half a big database.
const BATCH_BYTES: usize = 128 << 20;

/// Segments read and merged in order: the newest image of each page, which
/// written at once leaves the database as writing them one by one does (a
/// span is made the same way).
#[derive(Debug, Default)]
struct Batch {
    merged: Option<Segment>,
    /// How many of the names given were merged.
    taken: usize,
    /// Their bytes as stored.
    bytes: u64,
    /// Why the next one could not be read.
    failed: Option<String>,
}

/// Segments decoded at once, each on a thread of its own: decoding (zstd,
/// SHA-256, the pages copied out) 90 MB of spans took a restore
/// 0.21–0.31 s on one thread, 0.13–0.18 s on two (2 cores).
const DECODERS: usize = 2;

/// Reads and merges the segments named `names` from `dir`, in order, until
/// one fails or the pages merged reach `cap` bytes; [`DECODERS`] decoded
/// at once.
fn read_batch(dir: &Path, names: &[String], cap: usize) -> Batch {
    let decode = |name: &String| {
        let bytes = fs::read(dir.join(name)).map_err(|e| e.to_string())?;
        let seg = Segment::decode(&bytes).map_err(|e| e.to_string())?;
        Ok::<_, String>((seg, bytes.len() as u64))
    };
    let mut b = Batch::default();
    for some in names.chunks(DECODERS) {
        if b.merged.as_ref().is_some_and(|m| m.bytes() >= cap) {
            break;
        }
        let decoded: Vec<_> = std::thread::scope(|s| {
            let running: Vec<_> = some.iter().map(|n| s.spawn(move || decode(n))).collect();
            running
                .into_iter()
                .map(|r| r.join().expect("decoding does not panic"))
                .collect()
        });
        for d in decoded {
            match d {
                Ok((seg, bytes)) => {
                    b.merged = Segment::join(b.merged.take(), Some(seg));
                    b.taken += 1;
                    b.bytes += bytes;
                }
                Err(e) => {
                    b.failed = Some(e);
                    return b;
                }
            }
        }
    }
    b
}

/// The first [`Batch`] of `names` in `dir`, read while the bases still
/// download, within what is left of `budget`; `None` when nothing is left.
async fn read_ahead_batch(
    budget: &std::sync::Mutex<usize>,
    dir: &Path,
    names: &[SegRef],
) -> Option<Batch> {
    let take = |b: &mut usize| {
        let n = (*b).min(AHEAD_BYTES / 2);
        *b -= n;
        n
    };
    let cap = take(&mut budget.lock().expect("the budget's lock is not poisoned"));
    if names.is_empty() || cap == 0 {
        return None;
    }
    let (dir, names) = (
        dir.to_owned(),
        names.iter().map(|s| s.name.clone()).collect::<Vec<_>>(),
    );
    let batch = tokio::task::spawn_blocking(move || read_batch(&dir, &names, cap))
        .await
        .expect("reading segments does not panic");
    let used = batch.merged.as_ref().map_or(0, Segment::bytes).min(cap);
    *budget.lock().expect("the budget's lock is not poisoned") += cap - used;
    Some(batch)
}

/// Applies the segments named `names`, in order, from `dir` to `db`, until
/// one fails, a batch of them at a time (`first`, when given, is the first
/// batch, already read). Returns how many were applied, their bytes, and
/// why it stopped early.
fn apply_segments(
    dir: &Path,
    db: &Path,
    names: &[String],
    mut first: Option<Batch>,
) -> (usize, u64, Option<String>) {
    let (mut applied, mut bytes) = (0, 0);
    while applied < names.len() {
        let b = first
            .take()
            .unwrap_or_else(|| read_batch(dir, &names[applied..], BATCH_BYTES));
        if let Some(m) = &b.merged {
            if let Err(e) = m.apply(db) {
                return (applied, bytes, Some(e.to_string()));
            }
        }
        applied += b.taken;
        bytes += b.bytes;
        if b.failed.is_some() {
            return (applied, bytes, b.failed);
        }
    }
    (applied, bytes, None)
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
/// each fetched file (`hashed` gives the hash to keep for some); a failing
/// one is moved aside and stops the boot.
async fn check_databases(
    root: &Path,
    fetched: &[PathBuf],
    hashed: &BTreeMap<PathBuf, [u8; 32]>,
) -> Result<BTreeMap<PathBuf, [u8; 32]>, RestoreError> {
    let mut restored = BTreeMap::new();
    for rel in fetched {
        let path = root.join(rel);
        let checked = {
            let (path, known) = (path.clone(), hashed.get(rel).copied());
            tokio::task::spawn_blocking(move || {
                let (hashed, checked, synced) = check_beside(&path, || match known {
                    Some(h) => Ok((h, 0)),
                    None => sqlite::content_hash(&path),
                });
                (checked.and(hashed), synced)
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
            Err(source) => return Err(corrupt(&path, rel, source)),
        }
    }
    Ok(restored)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A restore lists only the directories with numbers after where the
    /// spans bring the base (`reach`).
    #[test]
    fn only_directories_after_the_spans_reach_are_listed() {
        let dirs: Vec<(u64, String)> = [2u64, 0, 1]
            .iter()
            .map(|&d| (d * 256, line::segment_dir(d * 256)))
            .collect();
        for (reach, want) in [
            (0, vec![0, 1, 2]),
            (254, vec![0, 1, 2]),
            // Segment 256, the next, is the second directory's first.
            (255, vec![1, 2]),
            (511, vec![2]),
            (700, vec![2]),
            (767, vec![]),
            (5_000, vec![]),
        ] {
            let got: Vec<u64> = dirs_after(reach, dirs.clone())
                .iter()
                .map(|(first, name)| {
                    assert_eq!(line::parse_segment_dir(name), Some(*first));
                    first / 256
                })
                .collect();
            assert_eq!(got, want, "reach {reach}");
        }
    }

    /// Segments read in windows merge in order, stop at the first that
    /// cannot be read (though the one beside it in its window could), and
    /// stop once the merged pages reach the cap.
    #[test]
    fn a_batch_merges_in_order_and_stops_at_a_bad_segment_or_the_cap() {
        let d = tempfile::tempdir().unwrap();
        let seg = |n: u8| Segment {
            page_size: 512,
            db_pages: 4,
            pages: [(1, vec![n; 512]), (u32::from(n % 4) + 1, vec![n; 512])].into(),
        };
        let names: Vec<String> = (1..=5).map(|n| format!("s{n}")).collect();
        for (n, name) in (1..=5).zip(&names) {
            fs::write(d.path().join(name), seg(n).encode().unwrap()).unwrap();
        }
        let all = read_batch(d.path(), &names, usize::MAX);
        assert_eq!((all.taken, all.failed.as_deref()), (5, None));
        let want = (1..=5).fold(None, |m, n| Segment::join(m, Some(seg(n))));
        assert_eq!(all.merged, want, "the newest image of each page");

        fs::write(d.path().join("s3"), b"cut short").unwrap();
        let bad = read_batch(d.path(), &names, usize::MAX);
        assert_eq!(bad.taken, 2, "s4, read beside s3, is not taken");
        assert!(bad.failed.is_some());
        assert_eq!(bad.merged, Segment::join(Some(seg(1)), Some(seg(2))));

        let capped = read_batch(d.path(), &names, 1);
        assert_eq!((capped.taken, capped.failed), (DECODERS, None));
    }

    #[test]
    fn undo_hashes_the_file_as_it_was_and_puts_it_back() {
        let d = tempfile::tempdir().unwrap();
        let db = d.path().join("db");
        let before: Vec<u8> = (0..512 * 6).map(|i| (i % 253) as u8).collect();
        fs::write(&db, &before).unwrap();
        let (hash, _) = sqlite::content_hash(&db).unwrap();
        // Writes over page 3, adds pages 7 and 9 (a gap at 8).
        let seg = Segment {
            page_size: 512,
            db_pages: 9,
            pages: [
                (3, vec![1u8; 512]),
                (7, vec![2u8; 512]),
                (9, vec![3u8; 512]),
            ]
            .into(),
        };
        let undo = Undo::take(&db, Some(&seg))
            .unwrap()
            .expect("it does not cut the file");
        seg.apply(&db).unwrap();
        // What the switch to WAL mode writes.
        fs::OpenOptions::new()
            .write(true)
            .open(&db)
            .unwrap()
            .write_all_at(&[2, 2], 18)
            .unwrap();
        assert_ne!(sqlite::content_hash(&db).unwrap().0, hash);
        assert_eq!(undo.hash(&db).unwrap(), hash);
        undo.put_back(&db).unwrap();
        assert_eq!(fs::read(&db).unwrap(), before);

        let shorter = Segment { db_pages: 5, ..seg };
        assert!(
            Undo::take(&db, Some(&shorter)).unwrap().is_none(),
            "a cut is not undone"
        );
    }
}
