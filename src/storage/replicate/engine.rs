//! The replicate layout's engine: the state dir on local disk, every change
//! replicated through the crypt remote. inotify marks paths dirty; a dirty
//! path is replicated `debounce` after its first change; a local scan every
//! `interval` catches anything inotify missed. What S3 holds is tracked in a
//! manifest, so the scan costs no S3 request when nothing changed.
//!
//! Overwritten and deleted files are kept on the remote, one object per
//! version (`history`), never lost by accident; a pass that would delete
//! more than half the remote tree is refused.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use futures_util::StreamExt;

use notify::{RecursiveMode, Watcher};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio::time::{sleep, Instant};

use super::history;
use super::plan;
use super::scan::{scan, stamp, Excludes, Manifest, Stamp, Written};
use crate::backoff::Backoff;
use crate::rclone::rc::{self, RcError};
use crate::rclone::CRYPT_REMOTE;
use crate::remote::bucket::{local_path, LINK_SUFFIX, META_DIR, TREE_FILE, USER_DIR};
use crate::storage::replicate::treemeta::{self, Kind, TreeMeta};
use crate::storage::worker::{self, Worker};
use crate::timepoint;

/// A stamp's mtime as Unix ms (0 if before 1970).
fn mtime_ms(stamp: Stamp) -> u64 {
    u64::try_from(stamp.1).unwrap_or(0)
}

const POLL: Duration = Duration::from_millis(250);
/// Transfers that could not reach S3 at which a pass stops starting more (see `Engine::pass`).
const GIVE_UP_AFTER: u32 = 2;
/// Transfers in flight at once, as rclone's own `--transfers` would run.
const TRANSFERS: usize = 64;
/// New files at the stop from which one batch job beats one call per file.
const BATCH_MIN: usize = 64;
/// Uploads one pass takes on (the rest wait for the next, oldest first).
const PASS_LIMIT: usize = 1024;
/// Below the scratch dir: consistent copies of files on their way up.
const STAGE_DIR: &str = "stage";

#[derive(Debug, Clone)]
pub struct ReplicationSpec {
    pub root: PathBuf,
    pub rc_socket: PathBuf,
    pub excludes: Excludes,
    pub debounce: Duration,
    pub interval: Duration,
    /// Where `tree.json` is written before upload.
    pub scratch: PathBuf,
    /// Where the backlog is reported while uploads fail.
    pub lag: crate::remote::lag::Lag,
    /// Open while this instance holds the lease: no transfer starts without it.
    pub fence: crate::remote::lease::Fence,
}

#[derive(Debug, thiserror::Error)]
#[error("files not replicated to S3: {}", shortlist(.0, 20))]
pub struct Unreplicated(pub Vec<String>);

/// The first `shown` names of a long list, and how many more (a burst of
/// thousands of files must not make a log line of hundreds of kilobytes).
pub fn shortlist(names: &[String], shown: usize) -> String {
    match names.len() {
        n if n <= shown => names.join(", "),
        n => format!("{}, … and {} more", names[..shown].join(", "), n - shown),
    }
}

/// Why one file's transfer failed.
#[derive(Debug, thiserror::Error)]
enum TransferError {
    #[error("reading {path}: {source}")]
    Local { path: PathBuf, source: io::Error },
    #[error(transparent)]
    Rc(#[from] RcError),
}

impl TransferError {
    /// Whether S3 (or rclone) could not be reached: about every file, not this one.
    fn is_unreachable(&self) -> bool {
        matches!(self, TransferError::Rc(e) if e.is_unreachable())
    }
}

/// An upload: the local file's stamp, and when S3's head is dated as
/// written (Unix ms; its mtime there).
type Uploaded = (Stamp, u64);

/// What became of one transfer of a pass; `Some` for an upload.
enum Transfer {
    Done(Result<Option<Uploaded>, TransferError>),
    /// Not started: S3 could not be reached by the ones before.
    NotTried,
}

struct PassOutcome {
    /// Names not replicated.
    failed: Vec<String>,
    /// The pass stopped early because S3 could not be reached.
    s3_down: bool,
}

#[derive(Debug)]
struct FileRetry {
    failures: u32,
    at: Instant,
    error: String,
}

impl Default for FileRetry {
    fn default() -> Self {
        FileRetry {
            failures: 0,
            at: Instant::now(),
            error: String::new(),
        }
    }
}

/// One inotify watch per directory rather than notify's recursive mode,
/// which fails as a whole when one directory cannot be read (a mode-000
/// one without `CAP_DAC_OVERRIDE`), leaving only the periodic scan.
struct Watches {
    watcher: notify::RecommendedWatcher,
    /// Watched directories, relative to the root ("" is the root).
    dirs: BTreeSet<PathBuf>,
}

impl Watches {
    /// Watches the root and every directory of `tree` not watched yet, and
    /// returns the ones newly watched: a change made in one before its watch
    /// was not seen, so the caller marks them dirty. One that cannot be
    /// watched (unreadable) is tried again next time.
    fn sync(&mut self, root: &Path, tree: &TreeMeta) -> Vec<PathBuf> {
        let want: BTreeSet<PathBuf> = std::iter::once(PathBuf::new())
            .chain(
                tree.iter()
                    .filter(|(_, e)| e.kind == Kind::Dir)
                    .map(|(p, _)| PathBuf::from(p)),
            )
            .collect();
        // inotify drops the watch of a directory that is gone.
        self.dirs.retain(|d| want.contains(d));
        let mut new = Vec::new();
        for d in want {
            // `root.join("")` would end in a slash, which notify refuses.
            let path = if d.as_os_str().is_empty() {
                root.to_owned()
            } else {
                root.join(&d)
            };
            if !self.dirs.contains(&d)
                && self
                    .watcher
                    .watch(&path, RecursiveMode::NonRecursive)
                    .map_err(|e| tracing::debug!(dir = %path.display(), error = %e, "replicate: cannot watch"))
                    .is_ok()
            {
                self.dirs.insert(d.clone());
                new.push(d);
            }
        }
        new
    }
}

struct Engine {
    spec: ReplicationSpec,
    remote: Manifest,
    /// When each head on S3 was written (its mtime there), to date the
    /// version it becomes.
    written: Written,
    /// The tree as `.cvm/tree.json` on S3 last described it.
    tree: TreeMeta,
    /// When that `tree.json` was written (Unix ms), once known: the start
    /// of the version it becomes.
    tree_written: Option<u64>,
    dirty: BTreeMap<PathBuf, Instant>,
    /// `None` when inotify is unavailable: the periodic scan finds everything.
    watches: Option<Watches>,
    /// Files that failed for a reason of their own, each with its own retry.
    retry: BTreeMap<String, FileRetry>,
    /// Unreadable directories already warned about.
    unreadable_warned: BTreeSet<String>,
    /// Refused names already warned about.
    refused_warned: BTreeSet<String>,
    next_full: Instant,
    /// While S3 cannot be reached: when the next pass may try.
    retry_at: Option<Instant>,
    failures: u32,
    last_error: String,
    /// inotify events, stamped on arrival.
    events: mpsc::UnboundedReceiver<(Instant, notify::Result<notify::Event>)>,
}

/// Starts watching `spec.root` and the replication loop. `remote` is what
/// S3 holds now; with `reconcile`, a full pass runs at once (local changes
/// made while cvm-init was down have no inotify event).
pub fn start(
    spec: ReplicationSpec,
    remote: Manifest,
    written: Written,
    tree: TreeMeta,
    reconcile: bool,
) -> Worker {
    {
        let (ev_tx, ev_rx) = mpsc::unbounded_channel();
        let watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            // Stamped on arrival: events wait in the channel while a pass
            // runs, and a change is due `debounce` after it happened.
            let _ = ev_tx.send((Instant::now(), res));
        });
        let watches = match watcher {
            Ok(watcher) => {
                // Before the gateway starts: a change made before a
                // directory's watch would not be seen until the full scan.
                let mut w = Watches {
                    watcher,
                    dirs: BTreeSet::new(),
                };
                w.sync(&spec.root, &scan(&spec.root, &spec.excludes).tree);
                Some(w)
            }
            Err(e) => {
                tracing::warn!(error = %e, "inotify unavailable; replicating on the periodic scan only");
                None
            }
        };
        let engine = Engine {
            next_full: Instant::now()
                + if reconcile {
                    Duration::ZERO
                } else {
                    spec.interval
                },
            spec,
            remote,
            written,
            tree,
            tree_written: None,
            dirty: BTreeMap::new(),
            watches,
            retry: BTreeMap::new(),
            unreadable_warned: BTreeSet::new(),
            refused_warned: BTreeSet::new(),
            retry_at: None,
            failures: 0,
            last_error: String::new(),
            events: ev_rx,
        };
        Worker::spawn("the file replication loop", engine)
    }
}

impl worker::Engine for Engine {
    type Unsaved = Unreplicated;

    async fn wait(&mut self) {
        tokio::select! {
            ev = self.events.recv() => {
                // Everything already queued, before deciding what is due:
                // one pass for a burst, not one per event.
                let mut next = ev;
                while let Some((at, ev)) = next {
                    match ev {
                        Ok(ev) => self.note(at, ev),
                        Err(e) => {
                            tracing::warn!(error = %e, "inotify error; a full scan follows");
                            self.next_full = Instant::now();
                        }
                    }
                    next = self.events.try_recv().ok();
                }
                if !self.dirty.is_empty() {
                    self.spec.fence.wake();
                }
            }
            _ = sleep(POLL) => {}
        }
    }

    /// A pass when a change, a file's retry or the full scan is due, unless
    /// S3 is being waited for.
    async fn act(&mut self) {
        let now = Instant::now();
        let due = self
            .dirty
            .values()
            .any(|&t| now.duration_since(t) >= self.spec.debounce)
            || self.retry.values().any(|r| r.at <= now);
        let full = now >= self.next_full;
        if (due || full) && self.retry_at.is_none_or(|t| now >= t) {
            let out = self.pass(full, false).await;
            if !out.s3_down {
                self.failures = 0;
                self.retry_at = None;
            } else {
                self.failures += 1;
                let delay = Backoff::S3.delay(self.failures);
                self.retry_at = Some(Instant::now() + delay);
                tracing::error!(retry_in = ?delay, pending = out.failed.len(), "replicate: S3 cannot be reached; changes wait for it");
            }
        }
    }

    /// Replicates everything not yet on S3, before `deadline`.
    async fn finish(&mut self, deadline: Instant) -> Result<(), Unreplicated> {
        let started = Instant::now();
        let r = match tokio::time::timeout_at(deadline, self.pass(true, true)).await {
            Ok(out) if out.failed.is_empty() => Ok(()),
            Ok(out) => Err(Unreplicated(out.failed)),
            Err(_) => Err(Unreplicated(self.pending())),
        };
        tracing::info!(took = ?started.elapsed(), ok = r.is_ok(), "replicate: final pass");
        r
    }
}

impl Engine {
    fn note(&mut self, at: Instant, ev: notify::Event) {
        use notify::EventKind;
        if matches!(ev.kind, EventKind::Access(_)) {
            return;
        }
        if ev.need_rescan() {
            self.next_full = Instant::now();
        }
        for p in ev.paths {
            if let Ok(rel) = p.strip_prefix(&self.spec.root) {
                if !rel.as_os_str().is_empty() && !self.spec.excludes.excluded(rel) {
                    self.dirty.entry(rel.to_owned()).or_insert(at);
                }
            }
        }
    }

    /// Names not known to be on S3 as they are locally.
    fn pending(&self) -> Vec<String> {
        let scan = scan(&self.spec.root, &self.spec.excludes);
        let local = &scan.files;
        let mut out: Vec<String> = local
            .iter()
            .filter(|(k, v)| self.remote.get(*k) != Some(v))
            .map(|(k, _)| k.clone())
            .collect();
        out.extend(
            self.remote
                .keys()
                .filter(|k| !local.contains_key(*k) && !scan.unknown(k))
                .cloned(),
        );
        out
    }

    /// One replication pass: a full comparison when `full`, else only the
    /// dirty paths and the failed files whose retry is due (all failed files
    /// when `force`, at the stop). Transfers run `TRANSFERS` at a time.
    async fn pass(&mut self, full: bool, force: bool) -> PassOutcome {
        let started = Instant::now();
        tracing::debug!(
            dirty = self.dirty.len(),
            full,
            force,
            "replicate: pass starting"
        );
        let scan = scan(&self.spec.root, &self.spec.excludes);
        let newly_watched = match self.watches.as_mut() {
            Some(w) => w.sync(&self.spec.root, &scan.tree),
            None => Vec::new(),
        };
        for dir in &scan.unreadable {
            if self.unreadable_warned.insert(dir.clone()) {
                tracing::warn!(dir = %dir, "replicate: cannot read this directory; what is below it stays on S3 as it \
                    was (nothing there is deleted) until it can be read");
            }
        }
        self.unreadable_warned
            .retain(|d| scan.unreadable.contains(d));
        for (name, why) in &scan.refused {
            if self.refused_warned.insert(name.clone()) {
                tracing::warn!(file = %name, "replicate: cannot replicate this file: {why}; it is NOT on S3. \
                    Rename it");
            }
        }
        self.refused_warned
            .retain(|n| scan.refused.iter().any(|(r, _)| r == n));
        let local = &scan.files;
        // Entries below an unreadable directory keep what the tree said of them.
        let mut tree = scan.tree.clone();
        tree.extend(
            self.tree
                .iter()
                .filter(|(p, _)| scan.unknown(p) && !scan.unreadable.contains(*p))
                .map(|(p, e)| (p.clone(), *e)),
        );
        // When each path first changed, kept for paths that fail again.
        let taken = std::mem::take(&mut self.dirty);
        // Changes made in a new directory between this scan and its watch
        // were not seen: the next pass looks again.
        for dir in newly_watched {
            self.dirty.entry(dir).or_insert(started);
        }
        let due_retries: Vec<String> = self
            .retry
            .iter()
            .filter(|(_, r)| force || r.at <= started)
            .map(|(name, _)| name.clone())
            .collect();
        let scope: Option<BTreeSet<PathBuf>> = if full {
            None
        } else {
            Some(
                taken
                    .keys()
                    .cloned()
                    .chain(due_retries.iter().map(|n| local_path(n)))
                    .collect(),
            )
        };
        if full {
            self.next_full = Instant::now() + self.spec.interval;
        }
        // A name is in scope when it or a directory above it changed; a
        // lookup per ancestor, not a comparison per dirty path (a burst of
        // thousands of files made that quadratic: seconds per pass).
        let in_scope = |name: &str| match &scope {
            None => true,
            Some(paths) => local_path(name).ancestors().any(|a| paths.contains(a)),
        };
        // A file whose own retry is not due waits for it, however often it changes.
        let waiting = |name: &str| !force && self.retry.get(name).is_some_and(|r| r.at > started);
        let view = plan::View {
            local,
            remote: &self.remote,
            tree: &scan.tree,
            tree_on_s3: &self.tree,
        };
        let planned = plan::plan(&view, in_scope, |n| scan.unknown(n), waiting);
        let mut failed = planned.held;
        let mut uploads = planned.uploads;
        // Oldest change first, and at most `PASS_LIMIT` per pass (all at the
        // stop): a file written during a long burst waits behind what was
        // written before it, not behind the whole burst, and the loop comes
        // back often enough to pick up new changes.
        for (k, v) in planned.meta_only {
            self.remote.insert(k, v);
        }
        // A file's own first change, else its nearest changed directory's.
        let first_change = |name: &str| {
            local_path(name)
                .ancestors()
                .find_map(|a| taken.get(a))
                .copied()
                .unwrap_or(started)
        };
        // Files a burst wrote before their directory was watched share that
        // directory's time: their change times order them.
        uploads
            .sort_by_cached_key(|n| (first_change(n), local.get(n).map_or(0, |s| s.2), n.clone()));
        if !force && uploads.len() > PASS_LIMIT {
            for name in uploads.split_off(PASS_LIMIT) {
                let at = first_change(&name);
                self.dirty.entry(local_path(&name)).or_insert(at);
            }
        }
        let (shape_changes, deletes) = (planned.shape_changes, planned.deletes);
        if planned.refused_deletes > 0 {
            tracing::error!(
                deletes = planned.refused_deletes,
                remote_files = self.remote.len(),
                "replicate: refusing to delete more than half of the remote tree in one pass; was the local state \
                 wiped? Nothing is deleted on S3 (restore it, or remove the files on S3 by hand)"
            );
        }
        // A file deleted in this pass was there until about now.
        let pass_ms = timepoint::now_ms();
        // Until this pass is done, what it carries is not on S3: from the
        // first change among it (`started` for what only a full pass found).
        let oldest = taken
            .values()
            .min()
            .copied()
            .unwrap_or(started)
            .min(started);
        if !uploads.is_empty() || !deletes.is_empty() {
            let error = if self.last_error.is_empty() {
                "uploading".to_owned()
            } else {
                self.last_error.clone()
            };
            self.spec
                .lag
                .behind("files", uploads.len() + deletes.len(), oldest, error);
        }
        // Two transfers that could not reach S3: the rest of the pass waits
        // for S3 instead of each costing rclone's retries. A failure about
        // the file itself does not count, so a file that keeps failing
        // cannot hold back the others.
        let unreachable = AtomicU32::new(0);
        // The old shape goes first, so S3 never holds a file and a directory
        // of the same name at once; an upload whose old shape could not be
        // removed waits for the next pass.
        let mut transfers = self
            .transfers(
                shape_changes.iter().map(|n| (n.clone(), false)).collect(),
                pass_ms,
                &unreachable,
            )
            .await;
        let stuck: Vec<PathBuf> = transfers
            .iter()
            .filter(|(_, t)| !matches!(t, Transfer::Done(Ok(_))))
            .map(|(n, _)| local_path(n))
            .collect();
        let (blocked, uploads): (Vec<String>, Vec<String>) = uploads.into_iter().partition(|u| {
            let p = local_path(u);
            stuck.iter().any(|d| p.starts_with(d) || d.starts_with(&p))
        });
        transfers.extend(blocked.into_iter().map(|n| (n, Transfer::NotTried)));
        // At the stop nothing writes any more: new files go up in one rclone
        // job (its own parallel transfers, no rc call per file), which is what
        // lets a burst of thousands of small files fit the stop budget. What
        // it could not do is tried file by file below, so failures are named.
        let mut uploads = uploads;
        if force {
            let (batch, single): (Vec<String>, Vec<String>) = uploads.into_iter().partition(|n| {
                !self.remote.contains_key(n)
                    && !n.ends_with(LINK_SUFFIX)
                    && !n.contains('\n')
                    && !n.starts_with(USER_DIR)
            });
            uploads = single;
            if batch.len() >= BATCH_MIN {
                match self.upload_batch(&batch).await {
                    Ok(()) => {
                        transfers.extend(batch.into_iter().map(|n| {
                            let st = local[&n];
                            (n, Transfer::Done(Ok(Some((st, mtime_ms(st))))))
                        }));
                    }
                    Err(e) => {
                        tracing::warn!(files = batch.len(), error = %e, "replicate: the batch upload failed; uploading \
                            its files one by one");
                        uploads.extend(batch);
                    }
                }
            } else {
                uploads.extend(batch);
            }
        }
        let rest = uploads
            .iter()
            .map(|n| (n.clone(), true))
            .chain(deletes.iter().map(|n| (n.clone(), false)))
            .collect();
        transfers.extend(self.transfers(rest, pass_ms, &unreachable).await);
        let s3_down = unreachable.load(Ordering::Relaxed) >= GIVE_UP_AFTER;
        let (mut uploaded, mut trashed) = (0, 0);
        for (name, t) in transfers {
            match t {
                Transfer::Done(Ok(Some((stamp, written)))) => {
                    uploaded += 1;
                    self.retry.remove(&name);
                    self.written.insert(name.clone(), written);
                    self.remote.insert(name, stamp);
                }
                Transfer::Done(Ok(None)) => {
                    trashed += 1;
                    self.retry.remove(&name);
                    self.written.remove(&name);
                    self.remote.remove(&name);
                }
                Transfer::Done(Err(e)) => {
                    self.last_error = e.to_string();
                    if !e.is_unreachable() {
                        let r = self.retry.entry(name.clone()).or_default();
                        r.failures += 1;
                        let delay = Backoff::FILE.delay(r.failures);
                        r.at = Instant::now() + delay;
                        tracing::warn!(file = %name, error = %e, retry_in = ?delay, failures = r.failures,
                            "replicate: this file failed; it is retried on its own schedule");
                        r.error = e.to_string();
                    } else {
                        tracing::warn!(file = %name, error = %e, "replicate: transfer failed");
                    }
                    failed.push(name);
                }
                Transfer::NotTried => failed.push(name),
            }
        }
        // After the files it describes, so the tree on S3 is never newer than them.
        if tree != self.tree && !s3_down {
            match self.replace_tree(&tree).await {
                Ok(written) => {
                    tracing::debug!(entries = tree.len(), "replicate: tree uploaded");
                    self.tree = tree;
                    self.tree_written = Some(written);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "replicate: modes, owners and directories not uploaded");
                    failed.push(format!("{META_DIR}/{}", TREE_FILE));
                }
            }
        }
        // Failed paths stay dirty for the retry, unless they wait for their own.
        for name in &failed {
            if self.retry.contains_key(name) {
                continue;
            }
            let p = local_path(name);
            let first = taken.get(&p).copied().unwrap_or(started);
            self.dirty.entry(p).or_insert(first);
        }
        if !uploads.is_empty() || !deletes.is_empty() {
            tracing::info!(uploaded, trashed, failed = failed.len(), full, took = ?started.elapsed(), "replicate: pass");
        }
        if failed.is_empty() {
            self.last_error.clear();
            self.spec.lag.caught_up("files");
        } else {
            self.spec
                .lag
                .behind("files", failed.len(), oldest, self.failing_files());
        }
        PassOutcome { failed, s3_down }
    }

    /// Uploads `names` (new regular files, none on S3 yet, nothing writing
    /// them) in one rclone `sync/copy` job with a file list.
    async fn upload_batch(&self, names: &[String]) -> Result<(), RcError> {
        let _permit = self.spec.fence.permit().await.map_err(RcError::Fenced)?;
        let list = self.spec.scratch.join("batch-files");
        let io = |source| RcError::Io {
            path: list.clone(),
            source,
        };
        fs::create_dir_all(&self.spec.scratch).map_err(io)?;
        fs::write(&list, names.join("\n") + "\n").map_err(io)?;
        let started = Instant::now();
        let params = json!({
            "srcFs": self.spec.root.to_string_lossy(), "dstFs": format!("{CRYPT_REMOTE}:"),
            "_filter": { "FilesFrom": [list.to_string_lossy()] },
            "_config": { "Transfers": TRANSFERS, "Checkers": TRANSFERS, "NoCheckDest": true, "NoTraverse": true },
        });
        let id = rc::start_job(&self.spec.rc_socket, "sync/copy", params).await?;
        loop {
            if let Some(outcome) = rc::job_outcome(&self.spec.rc_socket, id).await? {
                tracing::info!(files = names.len(), took = ?started.elapsed(), ok = outcome.is_ok(), "replicate: batch upload");
                return outcome.map_err(|body| RcError::Status {
                    method: "sync/copy".into(),
                    status: 500,
                    body,
                });
            }
            sleep(Duration::from_millis(20)).await;
        }
    }

    /// Runs `jobs` (name, upload or else delete, as of `deleted_at`),
    /// `TRANSFERS` at a time. Once `unreachable` reaches `GIVE_UP_AFTER`,
    /// the rest are not tried.
    async fn transfers(
        &self,
        jobs: Vec<(String, bool)>,
        deleted_at: u64,
        unreachable: &AtomicU32,
    ) -> Vec<(String, Transfer)> {
        // The futures are made here, not inside the stream: a closure over
        // borrowed items there would make the spawned task's type unprovable.
        let jobs: Vec<_> = jobs
            .into_iter()
            .enumerate()
            .map(|(slot, (name, upload))| async move {
                if unreachable.load(Ordering::Relaxed) >= GIVE_UP_AFTER {
                    return (name, Transfer::NotTried);
                }
                let r = if upload {
                    self.upload(&name, slot).await.map(Some)
                } else {
                    self.to_history(&name, false, deleted_at)
                        .await
                        .map_err(TransferError::from)
                        .map(|()| None)
                };
                if r.as_ref().is_err_and(TransferError::is_unreachable) {
                    unreachable.fetch_add(1, Ordering::Relaxed);
                }
                (name, Transfer::Done(r))
            })
            .collect();
        futures_util::stream::iter(jobs)
            .buffer_unordered(TRANSFERS)
            .collect()
            .await
    }

    /// The error to report while files are pending: the files that keep
    /// failing on their own by name, else the last error.
    fn failing_files(&self) -> String {
        const SHOWN: usize = 3;
        if self.retry.is_empty() {
            return self.last_error.clone();
        }
        let named: Vec<String> = self
            .retry
            .iter()
            .take(SHOWN)
            .map(|(n, r)| format!("{n}: {}", r.error))
            .collect();
        let more = self.retry.len().saturating_sub(SHOWN);
        if more > 0 {
            format!("{} (and {more} more failing files)", named.join("; "))
        } else {
            named.join("; ")
        }
    }

    async fn rc(&self, method: &str, params: Value) -> Result<Value, RcError> {
        rc::call(&self.spec.rc_socket, method, &params).await
    }

    /// Uploads `name` so that S3 always holds a complete copy: the live
    /// object is overwritten only by a finished upload (an S3 PUT replaces
    /// an object whole), after a server-side copy of it to the history. A file
    /// is uploaded from a consistent local copy (`super::stage::copy`), so one that
    /// changes while it uploads still reaches S3. Returns the stamp of what
    /// was uploaded.
    async fn upload(&self, name: &str, slot: usize) -> Result<Uploaded, TransferError> {
        let _permit = self.spec.fence.permit().await.map_err(RcError::Fenced)?;
        let replaces = self.remote.contains_key(name);
        let local = local_path(name);
        if name.ends_with(LINK_SUFFIX) {
            let path = self.spec.root.join(&local);
            let meta = path
                .symlink_metadata()
                .map_err(|source| TransferError::Local { path, source })?;
            let stamp = stamp(&meta);
            let written = mtime_ms(stamp);
            if replaces {
                self.to_history(name, true, written).await?;
            }
            self.rc(
                "operations/copyfile",
                json!({
                    "srcFs": self.spec.root.to_string_lossy(),
                    "srcRemote": format!("{}{LINK_SUFFIX}", local.to_string_lossy()),
                    "dstFs": format!("{CRYPT_REMOTE}:"), "dstRemote": name,
                    "_config": { "Links": true, "NoCheckDest": true },
                }),
            )
            .await?;
            return Ok((stamp, written));
        }
        let dir = self.spec.scratch.join(STAGE_DIR);
        let staged = dir.join(slot.to_string());
        let src = self.spec.root.join(&local);
        let stamp = {
            let (src, staged) = (src.clone(), staged.clone());
            tokio::task::spawn_blocking(move || super::stage::copy(&src, &staged))
                .await
                .expect("staging does not panic")
        }
        .map_err(|source| TransferError::Local { path: src, source })?;
        let r = async {
            let written = self.dated(name, stamp, &staged)?;
            if replaces {
                self.to_history(name, true, written).await?;
            }
            self.rc(
                "operations/copyfile",
                json!({
                    "srcFs": dir.to_string_lossy(), "srcRemote": slot.to_string(),
                    "dstFs": format!("{CRYPT_REMOTE}:"), "dstRemote": name,
                    // The content is known to differ: no need to ask S3 first.
                    "_config": { "NoCheckDest": true },
                }),
            )
            .await?;
            tracing::debug!(file = name, bytes = stamp.0, written, "replicate: uploaded");
            Ok((stamp, written))
        }
        .await;
        let _ = fs::remove_file(&staged);
        r
    }

    /// When the content staged at `staged` (with `stamp`) is dated as
    /// written: its mtime, or now when that is stale
    /// ([`history::stale_mtime`]); the staged copy then carries now as its
    /// mtime to S3, so history never has the content there first.
    fn dated(&self, name: &str, stamp: Stamp, staged: &Path) -> Result<u64, TransferError> {
        let mtime = mtime_ms(stamp);
        let head = self.written.get(name).zip(self.remote.get(name));
        if !history::stale_mtime(head.map(|(&w, r)| (w, r.0)), stamp.0, mtime) {
            return Ok(mtime);
        }
        let now = timepoint::now_ms();
        fs::File::options()
            .write(true)
            .open(staged)
            .and_then(|f| f.set_modified(std::time::UNIX_EPOCH + Duration::from_millis(now)))
            .map_err(|source| TransferError::Local {
                path: staged.to_owned(),
                source,
            })?;
        tracing::debug!(
            file = name,
            mtime,
            now,
            "replicate: new size with a stale mtime; dated now"
        );
        Ok(now)
    }

    /// Keeps the live object `name` as a version ending at `end` (Unix
    /// ms), server-side: a copy when it is about to be overwritten (`keep`),
    /// a move when it is deleted. Nothing to do when it is gone already.
    async fn to_history(&self, name: &str, keep: bool, end: u64) -> Result<(), RcError> {
        self.keep_version(name, self.written.get(name).copied(), keep, end)
            .await
    }

    /// [`Self::to_history`] for an object written at `start` (`None`: not
    /// known).
    async fn keep_version(
        &self,
        name: &str,
        start: Option<u64>,
        keep: bool,
        end: u64,
    ) -> Result<(), RcError> {
        let _permit = self.spec.fence.permit().await.map_err(RcError::Fenced)?;
        let method = if keep {
            "operations/copyfile"
        } else {
            "operations/movefile"
        };
        let version = history::superseded(name, start, end);
        tracing::debug!(file = name, version = %version.object(), keep, "replicate: keeping the version S3 holds");
        let r = self
            .rc(
                method,
                json!({
                    "srcFs": format!("{CRYPT_REMOTE}:"), "srcRemote": name,
                    "dstFs": format!("{CRYPT_REMOTE}:"), "dstRemote": version.object(),
                    "_config": { "NoCheckDest": true },
                }),
            )
            .await;
        match r {
            Err(RcError::Status { status: 404, .. }) => Ok(()),
            r => r.map(drop),
        }
    }

    /// Keeps the `tree.json` S3 holds as a version, as a file's is kept,
    /// then uploads `tree` in its place; returns when it was written.
    async fn replace_tree(&mut self, tree: &TreeMeta) -> Result<u64, RcError> {
        let name = treemeta::object();
        if self.tree_written.is_none() {
            let root = format!("{CRYPT_REMOTE}:");
            let head = rc::stat(&self.spec.rc_socket, &root, &name, false).await?;
            self.tree_written = head.and_then(|h| timepoint::modtime_ms(h["ModTime"].as_str()?));
        }
        let now = timepoint::now_ms();
        self.keep_version(&name, self.tree_written, true, now)
            .await?;
        self.upload_tree(tree).await?;
        Ok(now)
    }

    async fn upload_tree(&self, tree: &TreeMeta) -> Result<(), RcError> {
        let _permit = self.spec.fence.permit().await.map_err(RcError::Fenced)?;
        let path = self.spec.scratch.join(TREE_FILE);
        let io = |source| RcError::Io {
            path: path.clone(),
            source,
        };
        fs::create_dir_all(&self.spec.scratch).map_err(io)?;
        fs::write(&path, treemeta::encode(tree)).map_err(io)?;
        self.rc(
            "operations/copyfile",
            json!({
                "srcFs": self.spec.scratch.to_string_lossy(), "srcRemote": TREE_FILE,
                "dstFs": format!("{CRYPT_REMOTE}:{META_DIR}"), "dstRemote": TREE_FILE,
                "_config": { "NoCheckDest": true },
            }),
        )
        .await
        .map(drop)
    }
}
