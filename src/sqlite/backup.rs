//! SQLite backups through the crypt remote, soon after a change, and a final
//! pass at stop.
//!
//! The loop polls cheap fingerprints (two `stat`s per database). A database
//! whose fingerprint moved is saved `debounce` after its first unsaved
//! change, however busy it stays. A database is followed page by page
//! (`source`: from its WAL, or by comparing snapshots in another journal
//! mode): what is saved is a segment of the pages its new commits changed
//! (`segment`), on top of a whole snapshot taken again once it is
//! `base_max_age` old or the segments since it weigh four times as much
//! (`line`). One that cannot be followed is saved as a whole snapshot,
//! uploaded unless its content hash equals the last uploaded one. An idle
//! database costs no S3 request.

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::time::{sleep, Instant};

use crate::backoff::Backoff;
use crate::config::SqliteConfig;
use crate::rclone::rc;
use crate::remote::bucket::{META_DIR, SQLITE_DIR, WAL_DIR};
use crate::remote::lag::Lag;
use crate::remote::lease::Fence;
use crate::sqlite::line::{self, BaseRef, Manifest};
use crate::sqlite::segment::Segment;
use crate::sqlite::source::Source;
use crate::sqlite::{self, Fingerprint, Patterns, Snapshot, SqliteError};
use crate::storage::worker::{self, Interrupt, Worker};
use crate::timepoint;

/// How often fingerprints are compared.
const POLL: Duration = Duration::from_millis(250);
/// How often the database directory is searched for new databases (local disk, cheap).
const RESCAN: Duration = Duration::from_secs(1);
/// Pages read ahead of a segment held in memory at most; beyond, the pin
/// waits for the next save.
const PENDING_MAX: usize = 8 << 20;
/// A restore reads the base, then the spans and segments after it: a new
/// base is taken once it would read half as much again as the database,
/// or once what follows the base alone weighs a tenth more than the
/// database (and at least `AFTER_BASE_MIN` after the base), so a restore
/// reads at most about 1.5 times the database, however big, and a base
/// costs what the changes since it did. Spans are read more slowly than a
/// base, which is one download: they are decoded, and written over the
/// base. A database that grows by appending reads about its own size from
/// its base and what follows, and needs no base for that; one rewritten in
/// place needs one after half a base of changes.
const AFTER_BASE_MIN: u64 = 16 << 20;
/// Spans a restore reads after the base at most: past them a new base is
/// taken, so an appending database's restore downloads a bounded number of
/// objects (128 spans of 64 segments: about 2.3 hours of a save a second).
const MOST_SPANS: u64 = 128;
/// How often a line whose database changed is pruned between bases.
const PRUNE_EVERY_MS: u64 = crate::sqlite::history::HOUR_MS;
/// Segments waiting for upload, below the scratch dir.
const SPOOL_DIR: &str = ".wal-spool";
/// Uploaded segments waiting to make a span, below the scratch dir.
const SPAN_DIR: &str = ".wal-spans";
/// Page images a span holds in memory at most while it is merged.
const SPAN_MAX: usize = 64 << 20;
/// Failed saves in a row, all for the app's lock, after which that is said
/// loudly (the retries back off: about 3 s).
const LOCKED_LOUD_AFTER: u32 = 3;
/// Manifests on their way, below the scratch dir.
const META_SCRATCH: &str = ".wal-meta";
/// Rollback-journal databases as last saved, below the scratch dir.
const MIRROR_DIR: &str = ".mirror";

#[derive(Debug, Clone)]
pub struct BackupSpec {
    /// Where the live databases are; patterns are relative to it.
    pub root: PathBuf,
    /// Local scratch space for snapshots before upload.
    pub scratch: PathBuf,
    /// rclone rc socket that performs uploads.
    pub rc_socket: PathBuf,
    pub patterns: Patterns,
    pub debounce: Duration,
    /// A WAL database's base is taken again once this old.
    pub base_max_age: Duration,
    /// Uploaded segments merged into one span (`CVM_SQLITE_SPAN_SEGMENTS`):
    /// an hour of the 100 ms load is about 2,800 segments, each a few
    /// milliseconds of a restore; at 64 it is about 45 spans and at most
    /// 64 segments.
    pub span_segments: usize,
    /// Days of hourly restore points kept (`CVM_HISTORY_DAYS`).
    pub history_days: u32,
    /// Where the backlog is reported while uploads fail.
    pub lag: Lag,
    /// The trash (`s3-crypt:.cvm-trash`) that takes the snapshot of a
    /// database deleted or renamed away, so it does not come back at the
    /// next restore; `None` keeps every snapshot.
    pub trash: Option<String>,
    /// Open while this instance holds the lease: no upload without it.
    pub fence: Fence,
    /// Restored lines go on in their generations (see
    /// `Session::continues_lines`); else each starts a new one at its first
    /// change.
    pub continue_lines: bool,
}

impl BackupSpec {
    pub fn new(
        root: PathBuf,
        scratch: PathBuf,
        rc_socket: PathBuf,
        cfg: &SqliteConfig,
        history_days: u32,
        lag: Lag,
        fence: Fence,
    ) -> Self {
        Self {
            root,
            scratch,
            rc_socket,
            patterns: cfg.patterns.clone(),
            debounce: cfg.debounce,
            base_max_age: cfg.base_max_age,
            span_segments: cfg.span_segments,
            history_days,
            lag,
            trash: None,
            fence,
            continue_lines: false,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("snapshot of {db} failed (not uploaded): {source}")]
    Snapshot { db: PathBuf, source: SqliteError },
    #[error("upload of {db}'s snapshot failed: {source}")]
    Upload { db: PathBuf, source: rc::RcError },
    #[error("upload of {db}'s changes failed: {error}")]
    Segment { db: PathBuf, error: String },
    #[error("cannot spool {db}'s changes: {source}")]
    Spool { db: PathBuf, source: std::io::Error },
    #[error("snapshot task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
}

/// What the final pass could not save.
#[derive(Debug, thiserror::Error)]
#[error("databases not saved to S3: {}", .unsaved.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "))]
pub struct FinalPassError {
    pub unsaved: Vec<PathBuf>,
}

/// Where a restored or followed database's line stands on S3.
#[derive(Debug, Clone)]
pub struct Line {
    pub gen: String,
    /// The last segment number given out.
    pub seq: u64,
    /// The manifest as S3 holds it.
    pub manifest: Manifest,
    /// The base: segments after `after` apply to it; taken at `at` (Unix s).
    pub base: BaseRef,
    pub base_bytes: u64,
    /// Bytes a restore of the newest point reads after the base: the spans
    /// since it, then the segments since the last span.
    pub after_base: u64,
    /// When retention last ran on the line (Unix ms), and its last segment
    /// number then: it runs again an hour later if that moved.
    pub pruned: (u64, u64),
    /// Restored from a holder that did not release the lease (see
    /// `Session::continues_lines`): no segment or base goes on in its
    /// generation. The next change, or a stock copy that falls due, starts
    /// a new generation from a base; until then S3 holds the database.
    pub sealed: bool,
}

/// A WAL database followed page by page.
struct Follow {
    /// `None` only while a blocking call has it. In a mutex only so the
    /// engine is `Sync` (a connection is not); it is never contended.
    tracker: Option<std::sync::Mutex<Source>>,
    /// In a rollback-journal mode (followed by comparing snapshots).
    rollback: bool,
    /// `None` until the first base of a new line is on S3.
    line: Option<Line>,
    /// Spooled segments not yet uploaded, oldest first: number, and when
    /// their newest commit was read (Unix ms).
    queue: VecDeque<(u64, u64)>,
    /// Commits read by [`Engine::move_pins`] since the last segment.
    pending: Option<Segment>,
    /// A span spooled and not yet uploaded: its name, and the uploaded
    /// segments it merges (removed once it is up).
    span: Option<(String, Vec<PathBuf>)>,
}

#[derive(Default)]
struct DbState {
    /// Fingerprint when the last saved snapshot was taken.
    saved: Option<Fingerprint>,
    /// Content hash of what S3 holds for this database, when known.
    remote_hash: Option<[u8; 32]>,
    /// First change not yet saved.
    dirty_since: Option<Instant>,
    retry_at: Option<Instant>,
    failures: u32,
    follow: Option<Follow>,
    /// The line a restored database continues, until it is followed.
    restored_line: Option<Line>,
}

/// A WAL database's changes, spooled in this round and waiting for its upload.
struct Spooled {
    rel: PathBuf,
    fp_before: Fingerprint,
    started: Instant,
    /// The last segment number before this round's.
    before: u64,
}

/// What the restore brought back for one database.
#[derive(Debug, Clone)]
pub struct Known {
    pub sha256: [u8; 32],
    pub line: Option<Line>,
}

struct Engine {
    spec: BackupSpec,
    /// Local space for small objects on their way up (manifests).
    scratch: PathBuf,
    dbs: BTreeMap<PathBuf, DbState>,
    /// Databases gone from the state dir whose snapshots still wait to go to the trash.
    gone: Vec<PathBuf>,
    last_scan: Option<Instant>,
    last_error: String,
    /// Set by the stop: a save in progress gives up, leaving the budget to
    /// the final pass.
    interrupt: Arc<Interrupt>,
    /// In the final pass, whose budget is for the changes, not for spans.
    stopping: bool,
}

/// Starts the backup loop. `known` maps databases just restored from S3 to
/// what S3 holds of them, so they are not uploaded again unchanged and a
/// WAL database continues its line. Every WAL database is pinned before
/// this returns, so before the gateway can write.
pub fn start(spec: BackupSpec, known: BTreeMap<PathBuf, Known>) -> Worker {
    // Left by an earlier run: no line of this run continues from it.
    let _ = std::fs::remove_dir_all(spec.scratch.join(SPOOL_DIR));
    let _ = std::fs::remove_dir_all(spec.scratch.join(SPAN_DIR));
    let mut engine = Engine {
        scratch: spec.scratch.join(META_SCRATCH),
        spec,
        dbs: BTreeMap::new(),
        gone: Vec::new(),
        last_scan: None,
        last_error: String::new(),
        interrupt: Arc::default(),
        stopping: false,
    };
    let sealed = !engine.spec.continue_lines;
    for (rel, known) in known {
        let line = known.line.map(|l| Line { sealed, ..l });
        engine.dbs.insert(
            rel,
            DbState {
                remote_hash: Some(known.sha256),
                restored_line: line,
                ..DbState::default()
            },
        );
    }
    engine.rescan();
    engine.last_scan = Some(Instant::now());
    let _ = std::fs::remove_dir_all(engine.spec.scratch.join(MIRROR_DIR));
    for (rel, st) in engine.dbs.iter_mut() {
        let mirror = engine.spec.scratch.join(MIRROR_DIR).join(rel);
        let live = engine.spec.root.join(rel);
        st.follow = follow(&live, st.restored_line.take(), mirror, st.remote_hash);
        // S3 holds it as it is: nothing to save until it changes.
        if st
            .follow
            .as_ref()
            .is_some_and(|f| f.line.as_ref().is_some_and(|l| l.sealed))
        {
            st.saved = Some(Fingerprint::of(&live));
        }
    }
    Worker::spawn("the database backup loop", engine)
}

/// Follows `live` (`Source`), its snapshots mirrored at `mirror`, continuing
/// `line` when there is one; `None` when it cannot be opened now (the next
/// save tries again, or saves it whole). A rollback-journal database's line
/// continues only from the content S3 holds (`known`): its changes are
/// counted from what it holds now.
fn follow(
    live: &Path,
    line: Option<Line>,
    mirror: PathBuf,
    known: Option<[u8; 32]>,
) -> Option<Follow> {
    match Source::open(live, mirror) {
        Ok(source) => {
            let line = match source.counted_from() {
                Some(now) if known != Some(now) => None,
                _ => line,
            };
            Some(Follow {
                rollback: source.rollback(),
                tracker: Some(std::sync::Mutex::new(source)),
                line,
                queue: VecDeque::new(),
                pending: None,
                span: None,
            })
        }
        Err(e) => {
            tracing::warn!(db = %live.display(), error = %e, "sqlite: cannot follow the database yet");
            None
        }
    }
}

/// When `db` last changed (its own or its WAL's mtime), on the monotonic
/// clock; now when that cannot be told.
fn changed_at(db: &Path) -> Instant {
    let now = Instant::now();
    [db.to_owned(), sqlite::sidecar(db, "-wal")]
        .iter()
        .filter_map(|p| p.metadata().ok()?.modified().ok())
        .max()
        .and_then(|t| std::time::SystemTime::now().duration_since(t).ok())
        .and_then(|age| now.checked_sub(age))
        .unwrap_or(now)
}

/// How big a database is now and how many segments a span merges: what
/// [`base_due`] weighs a restore against.
#[derive(Clone, Copy)]
struct Reads {
    db_bytes: u64,
    span_segments: u64,
}

/// Whether `line` takes a new base now: once a restore of its newest point
/// would read 1.5 times the database, or 1.1 times it after the base (see
/// [`AFTER_BASE_MIN`]), or more than [`MOST_SPANS`] spans, or once the
/// base is `max_age` old (the stock
/// copy's bound), the database changed since each time; a packed base (no
/// stock copy) once it is `max_age` old, changed or not.
fn base_due(line: &Line, reads: Reads, now_ms: u64, max_age: Duration) -> bool {
    let age = Duration::from_millis(now_ms.saturating_sub(line.base.taken_ms()));
    let segments = line.seq.saturating_sub(line.base.after);
    let size = reads.db_bytes.max(line.base_bytes);
    let heavy = line.after_base >= AFTER_BASE_MIN
        && (line.base_bytes + line.after_base >= size / 2 * 3
            || line.after_base >= size + size / 10);
    let many = segments >= MOST_SPANS * reads.span_segments;
    (line.base.packed && age >= max_age) || (segments > 0 && (age >= max_age || heavy || many))
}

/// Whether retention runs on `line` now: an hour after it last did, and
/// only if something went up since (an idle line makes no request).
fn prune_due(line: &Line, now_ms: u64) -> bool {
    let (at, seq) = line.pruned;
    line.seq > seq && now_ms.saturating_sub(at) >= PRUNE_EVERY_MS
}

/// Whether a first base of `plain` bytes is sent packed at `packed`: only
/// when that saves a quarter or more. Otherwise packing would save little
/// and still delay the stock copy and make restores decompress it.
fn worth_packing(plain: u64, packed: u64) -> bool {
    packed * 4 <= plain * 3
}

/// Writes `from` zstd-compressed to `to`; returns the bytes written.
fn compress(from: &Path, to: &Path) -> std::io::Result<u64> {
    let mut src = std::fs::File::open(from)?;
    let mut dst = std::fs::File::create(to)?;
    zstd::stream::copy_encode(&mut src, &mut dst, crate::sqlite::segment::LEVEL)?;
    dst.sync_all()?;
    dst.metadata().map(|m| m.len())
}

/// Once `spans` (a generation's uploaded segments) holds `n` in a row, or
/// segments of an hour that has ended (UTC, by their times), merges them
/// into a span in `spool`; returns its name and the segments merged.
/// Segments before a gap never make a span and are dropped; a span never
/// crosses an hour. The page images held stay under `max` bytes: a span
/// ends early after big segments (a bulk load), and the rest make the next.
fn spool_span(
    spans: &Path,
    spool: &Path,
    n: usize,
    max: usize,
) -> std::io::Result<Option<(String, Vec<PathBuf>)>> {
    let mut segs: Vec<line::SegRef> = match std::fs::read_dir(spans) {
        Ok(d) => d
            .filter_map(|e| line::parse_segment(&e.ok()?.file_name().to_string_lossy()))
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    segs.sort_by_key(|s| s.seq);
    if let Some(gap) = segs.windows(2).rposition(|w| w[1].seq != w[0].seq + 1) {
        for s in segs.drain(..=gap) {
            let _ = std::fs::remove_file(spans.join(&s.name));
        }
    }
    // Past the recent window retention keeps spans, not segments: an
    // hour's last point outlives it as a span's end, so the segments of
    // an hour that has ended make a span of their own, however few.
    let hour = |s: &line::SegRef| s.t_ms.map(|t| t / crate::sqlite::history::HOUR_MS);
    let in_hour = segs
        .iter()
        .take_while(|s| hour(s) == segs.first().and_then(hour))
        .count();
    let hour_ended = in_hour < segs.len();
    if !hour_ended && segs.len() < n {
        return Ok(None);
    }
    let mut merged: Option<Segment> = None;
    let mut taken = 0;
    for s in &segs {
        if merged.as_ref().is_some_and(|m| m.bytes() >= max) || (hour_ended && taken == in_hour) {
            break;
        }
        let seg = Segment::decode(&std::fs::read(spans.join(&s.name))?)
            .map_err(|e| std::io::Error::other(format!("{}: {e}", s.name)))?;
        merged = Segment::join(merged, Some(seg));
        taken += 1;
    }
    let segs = &segs[..taken];
    let (Some(first), Some(last), Some(merged)) = (segs.first(), segs.last(), merged) else {
        return Ok(None);
    };
    if taken < 2 {
        // One big segment is its own span.
        let _ = std::fs::remove_file(spans.join(&first.name));
        return Ok(None);
    }
    let Some(t) = last.t_ms else {
        return Ok(None);
    };
    let name = line::span_name(first.seq, last.seq, t);
    // Renamed into the spool whole: a span cut short by a full disk must
    // never go up.
    let tmp = spans.join(".span");
    let written = merged
        .encode()
        .and_then(|b| std::fs::write(&tmp, b))
        .and_then(|()| std::fs::rename(&tmp, spool.join(&name)));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(Some((
        name,
        segs.iter().map(|s| spans.join(&s.name)).collect(),
    )))
}

/// Runs `f` on the tracker off the async threads.
async fn with_tracker<T: Send + 'static>(
    follow: &mut Follow,
    f: impl FnOnce(&mut Source) -> T + Send + 'static,
) -> T {
    let t = follow.tracker.take().expect("one call at a time");
    let (t, r) = tokio::task::spawn_blocking(move || {
        let mut t = t.into_inner().expect("never poisoned: one user at a time");
        let r = f(&mut t);
        (t, r)
    })
    .await
    .expect("tracker calls do not panic");
    follow.tracker = Some(std::sync::Mutex::new(t));
    r
}

impl worker::Engine for Engine {
    type Unsaved = FinalPassError;

    async fn wait(&mut self) {
        sleep(POLL).await;
    }

    async fn act(&mut self) {
        self.tick(false).await;
        self.report_lag();
    }

    fn interrupt(&self) -> Option<Arc<Interrupt>> {
        Some(self.interrupt.clone())
    }

    async fn finish(&mut self, deadline: Instant) -> Result<(), FinalPassError> {
        self.final_pass(deadline).await
    }
}

impl Engine {
    /// Every database with an unsaved change is behind since that change,
    /// also while its snapshot is on its way (an upload can take rclone's
    /// retries through an outage).
    fn report_lag(&self) {
        let dirty: Vec<Instant> = self.dbs.values().filter_map(|d| d.dirty_since).collect();
        match dirty.iter().min() {
            Some(&since) => {
                let error = if self.last_error.is_empty() {
                    "uploading a snapshot".to_owned()
                } else {
                    self.last_error.clone()
                };
                self.spec.lag.behind("databases", dirty.len(), since, error)
            }
            None => self.spec.lag.caught_up("databases"),
        }
    }

    fn rescan(&mut self) {
        match self.spec.patterns.find(&self.spec.root) {
            Ok(mut found) => {
                // A file a pattern matches is a database only once it has the
                // SQLite header; anything else is the replicate layout's to
                // carry as a file.
                found.retain(|rel| sqlite::is_sqlite(&self.spec.root.join(rel)).unwrap_or(false));
                for rel in &found {
                    if !self.dbs.contains_key(rel) {
                        tracing::info!(db = %rel.display(), "sqlite: watching database");
                        // Unsaved since it was written, not since it was found:
                        // the debounce runs from its first change (a kept
                        // database written long ago is simply due now).
                        let now = Instant::now();
                        let since = changed_at(&self.spec.root.join(rel))
                            .max(now.checked_sub(self.spec.debounce).unwrap_or(now));
                        self.dbs.insert(
                            rel.clone(),
                            DbState {
                                dirty_since: Some(since),
                                ..DbState::default()
                            },
                        );
                    }
                }
                // On S3, and no longer in the state dir at all (not merely
                // unreadable for a moment): deleted, or renamed away.
                let vanished: Vec<PathBuf> = self
                    .dbs
                    .iter()
                    .filter(|(rel, st)| {
                        !found.contains(rel)
                            && st.remote_hash.is_some()
                            && self.spec.root.join(rel).symlink_metadata().is_err()
                    })
                    .map(|(rel, _)| rel.clone())
                    .collect();
                if self.spec.trash.is_some() && !vanished.is_empty() {
                    if vanished.len() >= 2 && vanished.len() == self.dbs.len() {
                        tracing::error!(
                            databases = vanished.len(),
                            "sqlite: every database is gone at once; was the state dir wiped? Their snapshots \
                             stay on S3"
                        );
                    } else {
                        self.gone.extend(vanished);
                    }
                }
                self.dbs.retain(|rel, _| found.contains(rel));
            }
            Err(e) => {
                tracing::warn!(root = %self.spec.root.display(), error = %e, "sqlite: cannot search for databases")
            }
        }
    }

    /// One round: find databases, note changes, save those that are due
    /// (all changed ones when `force`). Returns the databases left unsaved.
    async fn tick(&mut self, force: bool) -> Vec<PathBuf> {
        let now = Instant::now();
        if force
            || self
                .last_scan
                .is_none_or(|t| now.duration_since(t) >= RESCAN)
        {
            self.rescan();
            self.last_scan = Some(now);
            self.trash_gone().await;
        }
        self.move_pins().await;
        let mut unsaved = Vec::new();
        let mut spooled = Vec::new();
        let rels: Vec<PathBuf> = self.dbs.keys().cloned().collect();
        for rel in rels {
            let fp = Fingerprint::of(&self.spec.root.join(&rel));
            let state = self.dbs.get_mut(&rel).expect("listed above");
            if !fp.exists() || state.saved == Some(fp) {
                continue;
            }
            if state.dirty_since.is_none() {
                self.spec.fence.wake();
            }
            let since = *state.dirty_since.get_or_insert(now);
            let due = force
                || (now.duration_since(since) >= self.spec.debounce
                    && state.retry_at.is_none_or(|t| now >= t));
            if !due {
                continue;
            }
            self.report_lag();
            let _busy = self.spec.fence.busy();
            match self.save(&rel, fp).await {
                Ok(Some(s)) => spooled.push(s),
                Ok(None) => {}
                Err(e) => self.failed(rel, &e, &mut unsaved),
            }
        }
        if !force {
            self.stock_bases().await;
            self.prune_lines().await;
        }
        if spooled.is_empty() {
            return unsaved;
        }
        // Every database's new segments in one rclone job, so a round
        // costs one upload's time however many databases changed.
        if let Err(e) = self.upload_spool().await {
            for s in spooled {
                let e = BackupError::Segment {
                    db: s.rel.clone(),
                    error: e.to_string(),
                };
                self.failed(s.rel, &e, &mut unsaved);
            }
            return unsaved;
        }
        for s in spooled {
            if let Err(e) = self.uploaded(&s, force).await {
                self.failed(s.rel, &e, &mut unsaved);
            }
        }
        unsaved
    }

    /// Follows a packed base (a new database's first, with no stock copy)
    /// with a whole one once it is due, also while the database is idle.
    async fn stock_bases(&mut self) {
        let (now_ms, now) = (timepoint::now_ms(), Instant::now());
        let max_age = self.spec.base_max_age;
        // Only a packed base's age counts here: an idle line reads nothing more.
        let reads = Reads {
            db_bytes: 0,
            span_segments: self.spec.span_segments as u64,
        };
        let due: Vec<PathBuf> = self
            .dbs
            .iter()
            .filter(|(_, st)| {
                let ready =
                    |f: &Follow| f.tracker.is_some() && f.queue.is_empty() && f.pending.is_none();
                st.retry_at.is_none_or(|t| now >= t)
                    && st.follow.as_ref().is_some_and(|f| {
                        ready(f)
                            && f.line.as_ref().is_some_and(|l| {
                                l.base.packed && base_due(l, reads, now_ms, max_age)
                            })
                    })
            })
            .map(|(rel, _)| rel.clone())
            .collect();
        for rel in due {
            let state = self.dbs.get_mut(&rel).expect("listed above");
            let Some(mut f) = state.follow.take() else {
                continue;
            };
            // Everything read is on S3 (nothing queued or pending): the pin
            // is at the line's last segment.
            let after = f.line.as_ref().filter(|l| !l.sealed).map(|l| l.seq);
            let _busy = self.spec.fence.busy();
            let r = self.new_base(&rel, &mut f, after).await;
            self.dbs.get_mut(&rel).expect("listed above").follow = Some(f);
            if let Err(e) = r {
                self.failed(rel, &e, &mut Vec::new());
            }
        }
    }

    /// Applies retention to every line whose hour has come ([`prune_due`]):
    /// between bases, which are rare, old segments and points go here.
    async fn prune_lines(&mut self) {
        let now = timepoint::now_ms();
        let due: Vec<(PathBuf, Manifest)> = self
            .dbs
            .iter()
            .filter_map(|(rel, st)| {
                let line = st.follow.as_ref()?.line.as_ref()?;
                prune_due(line, now).then(|| (rel.clone(), line.manifest.clone()))
            })
            .collect();
        for (rel, manifest) in due {
            let r = self.writer().prune(&rel, &manifest, now).await;
            let Some(line) = self
                .dbs
                .get_mut(&rel)
                .and_then(|st| st.follow.as_mut())
                .and_then(|f| f.line.as_mut())
            else {
                continue;
            };
            match r {
                Ok(m) => {
                    line.manifest = m;
                    line.pruned = (now, line.seq);
                }
                Err(e) => {
                    tracing::warn!(db = %rel.display(), error = %e, "sqlite: history not pruned; trying again in an hour");
                    line.pruned.0 = now;
                }
            }
        }
    }

    /// A save of `rel` failed with `e`: retried after a backoff.
    fn failed(&mut self, rel: PathBuf, e: &BackupError, unsaved: &mut Vec<PathBuf>) {
        if let BackupError::Snapshot {
            source: SqliteError::Interrupted { .. },
            ..
        } = e
        {
            // The stop's final pass saves it, with the budget this save left.
            tracing::info!(db = %rel.display(), "sqlite: save interrupted by the stop");
            unsaved.push(rel);
            return;
        }
        let state = self.dbs.get_mut(&rel).expect("saved databases are listed");
        state.failures += 1;
        let delay = Backoff::S3.delay(state.failures);
        state.retry_at = Some(Instant::now() + delay);
        tracing::error!(retry_in = ?delay, "sqlite: {e}");
        let locked = matches!(e, BackupError::Snapshot { source, .. } if source.is_locked());
        if locked && state.failures == LOCKED_LOUD_AFTER {
            tracing::error!(db = %rel.display(), tries = state.failures,
                "sqlite: the app keeps this database locked (a write transaction held open, or PRAGMA \
                 locking_mode=EXCLUSIVE): cvm-init cannot read it, so its changes are NOT on S3 until the app \
                 releases it or stops (the stop saves it). See docs/durability.md");
        }
        self.last_error = e.to_string();
        unsaved.push(rel);
    }

    /// Uploads everything spooled (every database's segments not yet on S3,
    /// named as on S3) in one fenced `sync/copy`; on success each is
    /// counted, logged and removed from the spool.
    async fn upload_spool(&mut self) -> Result<(), rc::RcError> {
        if self.dbs.values().all(|d| {
            d.follow
                .as_ref()
                .is_none_or(|f| f.queue.is_empty() && f.span.is_none())
        }) {
            return Ok(());
        }
        let _permit = self
            .spec
            .fence
            .permit()
            .await
            .map_err(rc::RcError::Fenced)?;
        let params = json!({
            "srcFs": self.spool_root().to_string_lossy(),
            "dstFs": format!("{}{META_DIR}/{WAL_DIR}", line::root()),
            "_config": { "NoCheckDest": true, "Transfers": 16 },
        });
        rc::call(&self.spec.rc_socket, "sync/copy", &params).await?;
        let spool = self.spool_root();
        for (rel, st) in self.dbs.iter_mut() {
            let Some(f) = st.follow.as_mut() else {
                continue;
            };
            let Some(line) = f.line.as_mut() else {
                continue;
            };
            let spans = self.spec.scratch.join(SPAN_DIR).join(rel).join(&line.gen);
            for (seq, t) in f.queue.drain(..) {
                let name = line::remote_segment_name(seq, t);
                let path = spool
                    .join(rel)
                    .join(&line.gen)
                    .join(line::segment_path(seq, t));
                let size = std::fs::metadata(&path).map_or(0, |m| m.len());
                // Kept to make the next span; a span is only ever an
                // addition, so one not made costs nothing but its speed-up.
                if std::fs::create_dir_all(&spans)
                    .and_then(|()| std::fs::rename(&path, spans.join(&name)))
                    .is_err()
                {
                    let _ = std::fs::remove_file(&path);
                }
                line.after_base += size;
                tracing::info!(db = %rel.display(), seq, bytes = size, "sqlite: segment uploaded");
            }
            if let Some((name, merged)) = f.span.take() {
                let path = spool.join(rel).join(&line.gen).join(&name);
                let size = std::fs::metadata(&path).map_or(0, |m| m.len());
                let _ = std::fs::remove_file(&path);
                // A restore now reads the span instead of its segments.
                let replaced: u64 = merged
                    .iter()
                    .map(|p| std::fs::metadata(p).map_or(0, |m| m.len()))
                    .sum();
                line.after_base = line.after_base.saturating_sub(replaced) + size;
                for p in merged {
                    let _ = std::fs::remove_file(p);
                }
                tracing::info!(db = %rel.display(), span = name, bytes = size, "sqlite: span uploaded");
            }
        }
        Ok(())
    }

    /// After the round's upload: `s` is saved, and its base is taken again
    /// when due (not at the stop: its budget is for the changes).
    async fn uploaded(&mut self, s: &Spooled, stopping: bool) -> Result<(), BackupError> {
        let state = self
            .dbs
            .get_mut(&s.rel)
            .expect("saved databases are listed");
        let Some(mut f) = state.follow.take() else {
            return Ok(());
        };
        let r = match f.line.as_ref() {
            Some(line) if !stopping => {
                let reads = Reads {
                    // The main file: a WAL database's may lag its WAL, which
                    // only makes the base come sooner.
                    db_bytes: std::fs::metadata(self.spec.root.join(&s.rel)).map_or(0, |m| m.len()),
                    span_segments: self.spec.span_segments as u64,
                };
                if base_due(line, reads, timepoint::now_ms(), self.spec.base_max_age) {
                    self.new_base(&s.rel, &mut f, Some(s.before)).await
                } else {
                    Ok(())
                }
            }
            _ => Ok(()),
        };
        let state = self
            .dbs
            .get_mut(&s.rel)
            .expect("saved databases are listed");
        state.follow = Some(f);
        r?;
        self.record_saved(&s.rel, s.fp_before, s.started);
        Ok(())
    }

    /// Moves every pin forward (local reads only, no S3 request), keeping
    /// what it read for the next segment, so an app's checkpoint never waits
    /// long for cvm-init's reader.
    async fn move_pins(&mut self) {
        for (rel, st) in self.dbs.iter_mut() {
            let Some(f) = st.follow.as_mut() else {
                continue;
            };
            // While uploads fail, commits wait in the WAL (and the spool), not
            // in memory.
            let held = f.pending.as_ref().map_or(0, Segment::bytes);
            if f.rollback || f.tracker.is_none() || !f.queue.is_empty() || held >= PENDING_MAX {
                continue;
            }
            match with_tracker(f, |t| t.move_pin()).await {
                Ok(seg) => f.pending = Segment::join(f.pending.take(), seg),
                Err(e) => {
                    tracing::debug!(db = %rel.display(), error = %e, "sqlite: moving the pin failed")
                }
            }
        }
    }

    /// Moves the snapshots of databases gone from the state dir to today's
    /// trash; one that fails is tried again at the next rescan.
    async fn trash_gone(&mut self) {
        let Some(trash) = self.spec.trash.clone() else {
            return;
        };
        if self.gone.is_empty() {
            return;
        }
        let day = crate::remote::bucket::trash_day(std::time::SystemTime::now());
        let Ok(_permit) = self.spec.fence.permit().await else {
            return;
        };
        for rel in std::mem::take(&mut self.gone) {
            let rel_str = rel.to_string_lossy();
            // When it went, in its manifest: a restore to a moment before
            // takes it from the trash.
            if let Err(e) = self.mark_gone(&rel).await {
                tracing::warn!(db = %rel.display(), error = %e, "sqlite: cannot move the snapshot of a deleted database to the trash; retrying");
                self.gone.push(rel);
                continue;
            }
            let (fs, remote) = line::stock(&rel);
            let params = json!({
                "srcFs": fs, "srcRemote": remote,
                "dstFs": format!("{trash}/{day}/{SQLITE_DIR}"), "dstRemote": rel_str,
            });
            let moved = match rc::call(&self.spec.rc_socket, "operations/movefile", &params).await {
                Ok(_) | Err(rc::RcError::Status { status: 404, .. }) => {
                    // Its segments and manifest follow it, so the trash holds
                    // its newest state, not only its base.
                    let params = json!({
                        "srcFs": line::dir(&rel),
                        "dstFs": format!("{trash}/{day}/{META_DIR}/{WAL_DIR}/{rel_str}"),
                    });
                    match rc::call(&self.spec.rc_socket, "sync/move", &params).await {
                        Err(rc::RcError::Status { body, .. })
                            if body.contains("directory not found") =>
                        {
                            Ok(())
                        }
                        r => r.map(drop),
                    }
                }
                Err(e) => Err(e),
            };
            match moved {
                Ok(()) => {
                    tracing::info!(db = %rel.display(), "sqlite: database gone from the state dir; its snapshot moved to the trash")
                }
                Err(e) => {
                    tracing::warn!(db = %rel.display(), error = %e, "sqlite: cannot move the snapshot of a deleted database to the trash; retrying");
                    self.gone.push(rel);
                }
            }
        }
    }

    /// Records in `rel`'s manifest (if it has one) that it is gone as of now.
    async fn mark_gone(&self, rel: &Path) -> Result<(), rc::RcError> {
        let socket = &self.spec.rc_socket;
        let Some(mut m) = line::read_manifest(socket, rel, &self.scratch).await? else {
            return Ok(());
        };
        m.gone_ms = Some(timepoint::now_ms());
        line::write_manifest(socket, rel, &m, &self.scratch, &self.spec.fence).await
    }

    /// Saves `rel`'s changes: a WAL database's are spooled as a segment for
    /// the round's upload (returned), another's are a whole snapshot,
    /// uploaded now.
    async fn save(
        &mut self,
        rel: &Path,
        fp_before: Fingerprint,
    ) -> Result<Option<Spooled>, BackupError> {
        let started = Instant::now();
        let live = self.spec.root.join(rel);
        let state = self.dbs.get_mut(rel).expect("saved databases are listed");
        if let Some(f) = &state.follow {
            let same = f
                .tracker
                .as_ref()
                .and_then(|t| t.lock().ok().map(|t| t.still_followed()));
            if same != Some(true) {
                tracing::info!(db = %rel.display(), "sqlite: the database file was replaced, or its WAL no longer followed; starting a new line");
                state.follow = None;
            }
        }
        if state.follow.is_none() {
            let line = state.restored_line.take();
            let (l, known) = (live.clone(), state.remote_hash);
            let mirror = self.spec.scratch.join(MIRROR_DIR).join(rel);
            state.follow =
                tokio::task::spawn_blocking(move || follow(&l, line, mirror, known)).await?;
        }
        let state = self.dbs.get_mut(rel).expect("saved databases are listed");
        let Some(mut f) = state.follow.take() else {
            return self.save_whole(rel, fp_before).await.map(|()| None);
        };
        let r = self.spool_changes(rel, &mut f).await;
        let state = self.dbs.get_mut(rel).expect("saved databases are listed");
        state.follow = Some(f);
        Ok(Some(Spooled {
            rel: rel.to_owned(),
            fp_before,
            started,
            before: r?,
        }))
    }

    /// A save of `rel` that began at `started`, with `fp_before`, is on S3.
    fn record_saved(&mut self, rel: &Path, fp_before: Fingerprint, started: Instant) {
        let changed_since = Fingerprint::of(&self.spec.root.join(rel)) != fp_before;
        let state = self.dbs.get_mut(rel).expect("saved databases are listed");
        state.saved = Some(fp_before);
        // A change made while the save ran is unsaved since then at the
        // latest, not since the next poll notices it.
        state.dirty_since = changed_since.then_some(started);
        state.retry_at = None;
        state.failures = 0;
        self.last_error.clear();
    }

    /// A WAL database's round, before the upload: a new line if it has
    /// none, and its new commits spooled as the next segment. Returns the
    /// last segment number before it.
    async fn spool_changes(&mut self, rel: &Path, f: &mut Follow) -> Result<u64, BackupError> {
        if f.line.as_ref().is_none_or(|l| l.sealed) {
            self.start_line(rel, f).await?;
        }
        let before = f.line.as_ref().expect("started above").seq;
        let db = rel.to_owned();
        let interrupt = self.interrupt.clone();
        let seg = match with_tracker(f, move |t| t.changes(interrupt.flag())).await {
            Ok(seg) => seg,
            // Too much changed for one segment: the new state is a base.
            Err(SqliteError::Rewritten { .. }) => {
                self.start_line(rel, f).await?;
                return Ok(f.line.as_ref().expect("started above").seq);
            }
            Err(source) => {
                return Err(BackupError::Snapshot {
                    db: db.clone(),
                    source,
                })
            }
        };
        // Every commit in the segment was made by now: a restore to a
        // moment takes it only at or after this.
        let read_at = timepoint::now_ms();
        let Some(seg) = Segment::join(f.pending.take(), seg) else {
            return Ok(before);
        };
        let line = f.line.as_mut().expect("started above");
        let seq = line.seq + 1;
        let dir = self.spool(rel).join(&line.gen);
        let path = dir.join(line::segment_path(seq, read_at));
        let written = seg.encode().and_then(|b| {
            std::fs::create_dir_all(path.parent().expect("in its directory"))?;
            std::fs::write(&path, b)
        });
        if let Err(source) = written {
            // Those commits are read and not kept: only a new base has them.
            f.line = None;
            return Err(BackupError::Spool { db, source });
        }
        line.seq = seq;
        f.queue.push_back((seq, read_at));
        if !self.stopping && f.span.is_none() {
            let (spans, dir) = (self.spans(rel).join(&line.gen), dir.clone());
            let n = self.spec.span_segments;
            f.span = tokio::task::spawn_blocking(move || spool_span(&spans, &dir, n, SPAN_MAX))
                .await?
                .unwrap_or_else(|e| {
                    tracing::warn!(db = %rel.display(), error = %e, "sqlite: span not made; its segments stay separate");
                    None
                });
        }
        Ok(before)
    }

    /// Segments waiting for upload, as their names below `.cvm/wal/`.
    fn spool_root(&self) -> PathBuf {
        self.spec.scratch.join(SPOOL_DIR)
    }

    fn spool(&self, rel: &Path) -> PathBuf {
        self.spool_root().join(rel)
    }

    /// `rel`'s uploaded segments waiting to make a span, by generation.
    fn spans(&self, rel: &Path) -> PathBuf {
        self.spec.scratch.join(SPAN_DIR).join(rel)
    }

    /// Starts `rel`'s line: a new generation whose base is the database as
    /// of the tracker's pin (its segments start from the WAL's first frame).
    async fn start_line(&mut self, rel: &Path, f: &mut Follow) -> Result<(), BackupError> {
        let _ = std::fs::remove_dir_all(self.spool(rel));
        let _ = std::fs::remove_dir_all(self.spans(rel));
        f.queue.clear();
        f.span = None;
        self.new_base(rel, f, None).await
    }

    /// Uploads a base taken through the tracker's pin: to its history name,
    /// then the manifest naming it, then a server-side copy to the stock
    /// name; then what history no longer keeps is deleted. `after` is the
    /// last segment read before the pin was taken; `None` starts a new
    /// generation.
    async fn new_base(
        &mut self,
        rel: &Path,
        f: &mut Follow,
        after: Option<u64>,
    ) -> Result<(), BackupError> {
        let started = Instant::now();
        let dst = self.spec.scratch.join(rel);
        let db = rel.to_owned();
        tracing::info!(db = %rel.display(), "sqlite: taking a base");
        let snap = {
            let (dst, interrupt) = (dst.clone(), self.interrupt.clone());
            with_tracker(f, move |t| t.base(&dst, &interrupt)).await
        }
        .map_err(|source| BackupError::Snapshot {
            db: db.clone(),
            source,
        })?;
        let taken = timepoint::now_ms();
        let upload_err = |source| BackupError::Upload {
            db: db.clone(),
            source,
        };
        let (manifest, new_to_s3) = match &f.line {
            Some(l) => (l.manifest.clone(), false),
            None => {
                let socket = &self.spec.rc_socket;
                match line::read_manifest(socket, rel, &self.scratch)
                    .await
                    .map_err(upload_err)?
                {
                    Some(m) => (m, false),
                    None => {
                        let (fs, remote) = line::stock(rel);
                        let stock = rc::stat(socket, &fs, &remote, false).await;
                        (Manifest::default(), stock.map_err(upload_err)?.is_none())
                    }
                }
            }
        };
        let (gen, after, seq) = match (&f.line, after) {
            (Some(l), Some(after)) => (l.gen.clone(), after, l.seq),
            _ => (line::new_gen(), 0, 0),
        };
        let mut base = BaseRef::new(gen.clone(), after, &snap.sha256, taken);
        // A database new to S3 is mostly the empty pages of its schema (the
        // real gateway's agent database: 676 KB): its first base goes up
        // compressed, and the whole stock copy follows with the next base.
        base.packed = new_to_s3;
        base.rollback = f.rollback;
        let mut upload = rel.to_string_lossy().into_owned();
        let mut sent = snap.bytes;
        if base.packed {
            upload.push_str(".zst");
            let (from, to) = (snap.path.clone(), self.spec.scratch.join(&upload));
            sent = tokio::task::spawn_blocking(move || compress(&from, &to))
                .await?
                .map_err(|source| BackupError::Spool {
                    db: db.clone(),
                    source,
                })?;
            if !worth_packing(snap.bytes, sent) {
                let _ = std::fs::remove_file(self.spec.scratch.join(&upload));
                base.packed = false;
                upload = rel.to_string_lossy().into_owned();
                sent = snap.bytes;
            }
        }
        // A big base takes long to go up: the stop's final pass does not
        // wait for it. Given up, it leaves at most an object the manifest
        // does not name (pruned), or a manifest naming it before its stock
        // copy; the line goes on from the base before either way.
        let writer = self.writer();
        let manifest = tokio::select! {
            m = writer.publish(rel, (&self.spec.scratch, &upload), &base, &manifest) => {
                m.map_err(upload_err)
            }
            () = self.interrupt.raised() => Err(BackupError::Snapshot {
                db: db.clone(),
                source: SqliteError::Interrupted { path: rel.to_owned() },
            }),
        };
        let _ = std::fs::remove_file(&snap.path);
        let _ = std::fs::remove_file(self.spec.scratch.join(&upload));
        let manifest = manifest?;
        tracing::info!(db = %rel.display(), bytes = snap.bytes, sent, packed = base.packed,
            generation = %gen, after, took = ?started.elapsed(), "sqlite: snapshot uploaded (base)");
        if let Some(st) = self.dbs.get_mut(rel) {
            st.remote_hash = Some(snap.sha256);
        }
        f.line = Some(Line {
            gen,
            seq,
            manifest,
            base,
            base_bytes: snap.bytes,
            after_base: 0,
            pruned: (taken, seq),
            sealed: false,
        });
        Ok(())
    }

    fn writer(&self) -> line::Writer<'_> {
        line::Writer {
            socket: &self.spec.rc_socket,
            scratch: &self.scratch,
            fence: &self.spec.fence,
            history_days: self.spec.history_days,
        }
    }

    /// Snapshots `rel` whole and uploads the snapshot unless S3 already holds that content.
    async fn save_whole(&mut self, rel: &Path, fp_before: Fingerprint) -> Result<(), BackupError> {
        let started = Instant::now();
        let live = self.spec.root.join(rel);
        let dst = self.spec.scratch.join(rel);
        let snap: Snapshot = {
            let (live, dst) = (live.clone(), dst.clone());
            tokio::task::spawn_blocking(move || sqlite::snapshot(&live, &dst)).await?
        }
        .map_err(|source| BackupError::Snapshot {
            db: rel.to_owned(),
            source,
        })?;
        let state = self.dbs.get(rel).expect("saved databases are listed");
        let uploaded = if state.remote_hash == Some(snap.sha256) {
            false
        } else {
            self.upload(rel, &snap).await?;
            true
        };
        let _ = std::fs::remove_file(&snap.path);
        if uploaded {
            tracing::info!(db = %rel.display(), bytes = snap.bytes, took = ?started.elapsed(), "sqlite: snapshot uploaded");
        } else {
            tracing::debug!(db = %rel.display(), "sqlite: unchanged content, nothing uploaded");
        }
        let state = self.dbs.get_mut(rel).expect("saved databases are listed");
        state.remote_hash = Some(snap.sha256);
        self.record_saved(rel, fp_before, started);
        Ok(())
    }

    async fn upload(&self, rel: &Path, snap: &Snapshot) -> Result<(), BackupError> {
        let (fs, remote) = line::stock(rel);
        self.writer()
            .copy(
                (&self.spec.scratch.to_string_lossy(), &remote),
                (&fs, &remote),
            )
            .await
            .map_err(|source| BackupError::Upload {
                db: snap.path.clone(),
                source,
            })
    }

    async fn final_pass(&mut self, deadline: Instant) -> Result<(), FinalPassError> {
        let started = Instant::now();
        self.stopping = true;
        let save = self.tick(true);
        let unsaved = match tokio::time::timeout_at(deadline, save).await {
            Ok(unsaved) => unsaved,
            Err(_) => self
                .dbs
                .iter()
                .filter(|(rel, st)| st.saved != Some(Fingerprint::of(&self.spec.root.join(rel))))
                .map(|(rel, _)| rel.clone())
                .collect(),
        };
        tracing::info!(databases = self.dbs.len(), unsaved = unsaved.len(), took = ?started.elapsed(), "sqlite: final pass");
        if unsaved.is_empty() {
            Ok(())
        } else {
            Err(FinalPassError { unsaved })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: u64 = 1_795_910_400_000;
    const MIB: u64 = 1 << 20;

    fn line(after: u64, seq: u64, packed: bool, base_bytes: u64, after_base: u64) -> Line {
        let mut base = BaseRef::new("g".into(), after, &[0; 32], T0);
        base.packed = packed;
        Line {
            gen: "g".into(),
            seq,
            manifest: Manifest::default(),
            base,
            base_bytes,
            after_base,
            pruned: (T0, seq),
            sealed: false,
        }
    }

    /// Segments in a row make a span holding, for each page, the last
    /// image; those before a gap never do.
    #[test]
    fn a_span_merges_uploaded_segments_in_a_row() {
        let d = tempfile::tempdir().unwrap();
        let (spans, spool) = (d.path().join("spans"), d.path().join("spool"));
        std::fs::create_dir_all(&spans).unwrap();
        std::fs::create_dir_all(&spool).unwrap();
        let put = |seq: u64, pages: &[(u32, u8)], db_pages: u32| {
            let seg = Segment {
                page_size: 512,
                db_pages,
                pages: pages.iter().map(|&(p, b)| (p, vec![b; 512])).collect(),
            };
            let name = line::remote_segment_name(seq, T0 + seq);
            std::fs::write(spans.join(name), seg.encode().unwrap()).unwrap();
        };
        assert_eq!(
            spool_span(&spans, &spool, 3, MIB as usize).unwrap(),
            None,
            "none yet"
        );
        put(1, &[(1, 1)], 1);
        // A gap: 1 never makes a span.
        put(3, &[(1, 3), (2, 3), (9, 3)], 9);
        put(4, &[(2, 4)], 4);
        assert_eq!(
            spool_span(&spans, &spool, 3, MIB as usize).unwrap(),
            None,
            "two in a row"
        );
        put(5, &[(5, 5)], 5);
        let (name, merged) = spool_span(&spans, &spool, 3, MIB as usize)
            .unwrap()
            .expect("three in a row");
        assert_eq!(name, line::span_name(3, 5, T0 + 5));
        assert_eq!(merged.len(), 3);
        assert!(!spans.join(line::remote_segment_name(1, T0 + 1)).exists());
        let span = Segment::decode(&std::fs::read(spool.join(&name)).unwrap()).unwrap();
        assert_eq!(span.db_pages, 5);
        let firsts: Vec<(u32, u8)> = span.pages.iter().map(|(&p, b)| (p, b[0])).collect();
        assert_eq!(
            firsts,
            [(1, 3), (2, 4), (5, 5)],
            "the last image of each page; page 9 was cut off by segment 4"
        );

        // Big segments end a span early; one alone makes none.
        for p in merged {
            std::fs::remove_file(p).unwrap();
        }
        put(6, &[(1, 6), (2, 6)], 6);
        put(7, &[(3, 7)], 7);
        put(8, &[(4, 8)], 8);
        let (name, _) = spool_span(&spans, &spool, 3, 3 * 512).unwrap().unwrap();
        assert_eq!(name, line::span_name(6, 7, T0 + 7), "ends at 3 pages");
        for seq in [6, 7] {
            std::fs::remove_file(spans.join(line::remote_segment_name(seq, T0 + seq))).unwrap();
        }
        put(9, &[(5, 9)], 9);
        put(10, &[(6, 10)], 10);
        assert_eq!(spool_span(&spans, &spool, 3, 512).unwrap(), None);
        assert!(!spans.join(line::remote_segment_name(8, T0 + 8)).exists());
    }

    /// An hour's segments make a span once the hour has ended, however
    /// few; a span never crosses an hour; one alone makes none.
    #[test]
    fn the_segments_of_an_hour_that_ended_make_a_span_of_their_own() {
        let hour = crate::sqlite::history::HOUR_MS;
        let d = tempfile::tempdir().unwrap();
        let (spans, spool) = (d.path().join("spans"), d.path().join("spool"));
        std::fs::create_dir_all(&spans).unwrap();
        std::fs::create_dir_all(&spool).unwrap();
        let put = |seq: u64, t: u64| {
            let seg = Segment {
                page_size: 512,
                db_pages: 1,
                pages: [(1, vec![seq as u8; 512])].into_iter().collect(),
            };
            std::fs::write(
                spans.join(line::remote_segment_name(seq, t)),
                seg.encode().unwrap(),
            )
            .unwrap();
        };
        put(1, T0 + hour - 2);
        put(2, T0 + hour - 1);
        assert_eq!(
            spool_span(&spans, &spool, 64, MIB as usize).unwrap(),
            None,
            "the hour goes on"
        );
        put(3, T0 + hour);
        put(4, T0 + hour + 1);
        let (name, merged) = spool_span(&spans, &spool, 64, MIB as usize)
            .unwrap()
            .expect("hour 0 ended");
        assert_eq!(name, line::span_name(1, 2, T0 + hour - 1));
        assert_eq!(merged.len(), 2);
        for p in merged {
            std::fs::remove_file(p).unwrap();
        }
        put(5, T0 + 2 * hour);
        let (name, _) = spool_span(&spans, &spool, 64, MIB as usize)
            .unwrap()
            .expect("hour 1 ended");
        assert_eq!(name, line::span_name(3, 4, T0 + hour + 1));
        for seq in [3, 4] {
            std::fs::remove_file(spans.join(line::remote_segment_name(seq, T0 + hour + seq - 3)))
                .unwrap();
        }
        put(6, T0 + 3 * hour);
        assert_eq!(
            spool_span(&spans, &spool, 64, MIB as usize).unwrap(),
            None,
            "one segment alone in its hour"
        );
        assert!(!spans
            .join(line::remote_segment_name(5, T0 + 2 * hour))
            .exists());
    }

    #[test]
    fn a_first_base_is_packed_only_when_that_saves_a_quarter() {
        assert!(
            worth_packing(659_456, 12_215),
            "the gateway's agent database"
        );
        assert!(worth_packing(1000, 750));
        assert!(!worth_packing(1000, 751));
        assert!(!worth_packing(69_632, 60_615), "random rows");
    }

    #[test]
    fn a_base_is_due_when_a_restore_would_read_half_as_much_again_or_it_is_old_and_changed() {
        let min = 60_000;
        let day = Duration::from_secs(86_400);
        for (l, now, due, why) in [
            (
                line(0, 5, false, MIB, MIB),
                T0 + 10 * min,
                false,
                "young, light",
            ),
            (
                line(0, 5, false, 200 * MIB, 90 * MIB),
                T0 + 23 * 60 * min,
                false,
                "a day not over, under half the base",
            ),
            (
                line(0, 5, false, MIB, MIB),
                T0 + 24 * 60 * min,
                true,
                "a day old, changed: the stock copy's bound",
            ),
            (
                line(5, 5, false, MIB, 0),
                T0 + 100 * 24 * 60 * min,
                false,
                "old, unchanged: idle costs nothing",
            ),
            (
                line(0, 5, false, MIB, 16 * MIB),
                T0 + min,
                true,
                "at least 16 MiB after a small base",
            ),
            (
                line(0, 5, false, 200 * MIB, 99 * MIB),
                T0 + min,
                false,
                "under half the base",
            ),
            (
                line(0, 5, false, 200 * MIB, 100 * MIB),
                T0 + min,
                true,
                "half the base: a restore would read 1.5 times it",
            ),
            (
                line(0, 5, false, 2000 * MIB, 999 * MIB),
                T0 + 600 * min,
                false,
                "2 GB: ten hours and still under half",
            ),
            (
                line(0, 0, true, MIB, 0),
                T0 + 23 * 60 * min,
                false,
                "packed, young",
            ),
            (
                line(0, 0, true, MIB, 0),
                T0 + 24 * 60 * min,
                true,
                "packed, a day old though idle: the stock copy",
            ),
            (
                line(0, 3, true, MIB, 0),
                T0 + 24 * 60 * min,
                true,
                "packed, a day old, changed",
            ),
        ] {
            // A database rewritten in place: as big as its base.
            let reads = Reads {
                db_bytes: l.base_bytes,
                span_segments: 64,
            };
            assert_eq!(base_due(&l, reads, now, day), due, "{why}");
        }
        // A database that grows by appending: its base and what follows
        // read about its size.
        let grown = |db_bytes| Reads {
            db_bytes,
            span_segments: 64,
        };
        for (l, reads, due, why) in [
            (
                line(0, 5, false, 200 * MIB, 300 * MIB),
                grown(500 * MIB),
                false,
                "appended 300 MiB onto 200: a restore reads the database's size",
            ),
            (
                line(0, 5, false, 200 * MIB, 550 * MIB),
                grown(500 * MIB),
                true,
                "what follows rewrote much of it: 1.5 times the database",
            ),
            (
                line(0, 5, false, 200 * MIB, 300 * MIB),
                grown(100 * MIB),
                true,
                "the database shrank (a VACUUM): weighed against the base",
            ),
            (
                line(0, 5, false, MIB, 549 * MIB),
                grown(500 * MIB),
                false,
                "a tiny first base, then appends and some rewrites",
            ),
            (
                line(0, 5, false, MIB, 550 * MIB),
                grown(500 * MIB),
                true,
                "a tiny first base, then a tenth more than the database: spans are slower to restore than a base",
            ),
            (
                line(0, 128 * 64 - 1, false, 200 * MIB, 300 * MIB),
                grown(500 * MIB),
                false,
                "just under 128 spans",
            ),
            (
                line(0, 128 * 64, false, 200 * MIB, 300 * MIB),
                grown(500 * MIB),
                true,
                "128 spans: a restore's downloads are bounded",
            ),
        ] {
            assert_eq!(base_due(&l, reads, T0 + min, day), due, "{why}");
        }
    }

    #[test]
    fn retention_runs_hourly_on_a_line_that_moved_and_never_on_an_idle_one() {
        let min = 60_000;
        for (pruned, seq, now, due) in [
            ((T0, 5), 9, T0 + 60 * min, true),
            ((T0, 5), 9, T0 + 59 * min, false),
            ((T0, 9), 9, T0 + 600 * min, false),
        ] {
            let mut l = line(0, seq, false, MIB, 0);
            l.pruned = pruned;
            assert_eq!(prune_due(&l, now), due, "{pruned:?} {seq} {now}");
        }
    }
}
