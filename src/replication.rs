//! The replicate layout's engine: the state dir on local disk, every change
//! replicated through the crypt remote. inotify marks paths dirty; a dirty
//! path is replicated `debounce` after its first change; a local scan every
//! `interval` catches anything inotify missed. What S3 holds is tracked in a
//! manifest, so the scan costs no S3 request when nothing changed.
//!
//! Overwritten and deleted files are moved on the remote to
//! `.cvm-trash/<UTC day>/` (rclone's backup-dir), never lost by accident;
//! a pass that would delete more than half the remote tree is refused.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use globset::GlobSet;
use notify::{RecursiveMode, Watcher};
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::{sleep, Instant};

use crate::rclone::rc::{self, RcError};
use crate::rclone::CRYPT_REMOTE;
use crate::sqlite::{Patterns, SIDECARS};
use crate::treemeta::{self, Kind, TreeMeta};

const POLL: Duration = Duration::from_millis(250);
/// Failed transfers in a row that end a pass early (see `Engine::pass`).
const GIVE_UP_AFTER: u32 = 2;
/// Remote prefixes cvm-init owns inside the crypt remote.
pub const TRASH_DIR: &str = ".cvm-trash";
pub const META_DIR: &str = ".cvm";
/// Deleting more than this share of the remote tree in one pass is refused…
const MAX_DELETE_SHARE: f64 = 0.5;
/// …unless it is only a handful of files.
const MAX_DELETE_FREE: usize = 10;
/// rclone's name for a symlink stored as an object (`--links`).
const LINK_SUFFIX: &str = ".rclonelink";

/// What is never replicated as a file: the user's excludes, live databases
/// and their sidecars (snapshots carry them), and cvm-init's own prefixes.
#[derive(Debug, Clone)]
pub struct Excludes {
    rules: Vec<String>,
    set: GlobSet,
}

impl Excludes {
    pub fn new(user: &[String], dbs: &Patterns) -> Excludes {
        let mut rules: Vec<String> = vec![
            format!("/{TRASH_DIR}/**"),
            format!("/{META_DIR}/**"),
            format!("/{}/**", crate::backup::REMOTE_DIR),
        ];
        rules.extend(user.iter().cloned());
        for p in dbs
            .as_str()
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
        {
            rules.push(format!("/{p}"));
            rules.extend(SIDECARS.iter().map(|s| format!("/{p}{s}")));
            // The mount layout keeps a link where each database was: on a bucket
            // that switches layouts it must not come back in place of the database.
            rules.push(format!("/{p}{LINK_SUFFIX}"));
        }
        let set = crate::filter::globset(&rules);
        Excludes { rules, set }
    }

    /// The rules in rclone filter syntax (`ExcludeRule`).
    pub fn rules(&self) -> &[String] {
        &self.rules
    }

    pub fn excluded(&self, rel: &Path) -> bool {
        self.set.is_match(rel)
    }
}

/// Size and mtime (ms) of a file as last replicated.
type Stamp = (u64, i64);
/// Remote name (symlinks with `.rclonelink`) → stamp.
pub type Manifest = BTreeMap<String, Stamp>;

/// Every replicated file below `root`, keyed by its remote name, and every
/// entry's type, mode and owner (`treemeta`).
pub fn scan(root: &Path, excludes: &Excludes) -> (Manifest, TreeMeta) {
    fn walk(root: &Path, rel: &Path, ex: &Excludes, files: &mut Manifest, tree: &mut TreeMeta) {
        let Ok(entries) = fs::read_dir(root.join(rel)) else {
            return;
        };
        for e in entries.flatten() {
            let child = rel.join(e.file_name());
            let Ok(meta) = e.path().symlink_metadata() else {
                continue;
            };
            if ex.excluded(&child) {
                continue;
            }
            let name = child.to_string_lossy().into_owned();
            let Some(entry) = treemeta::Entry::of(&meta) else {
                continue;
            };
            match entry.kind {
                Kind::Dir => walk(root, &child, ex, files, tree),
                Kind::Link => {
                    files.insert(format!("{name}{LINK_SUFFIX}"), stamp(&meta));
                }
                Kind::File => {
                    files.insert(name.clone(), stamp(&meta));
                }
            }
            tree.insert(name, entry);
        }
    }
    let (mut files, mut tree) = (Manifest::new(), TreeMeta::new());
    walk(root, Path::new(""), excludes, &mut files, &mut tree);
    (files, tree)
}

fn stamp(meta: &fs::Metadata) -> Stamp {
    (
        meta.len(),
        meta.mtime() * 1000 + meta.mtime_nsec() / 1_000_000,
    )
}

/// Today's trash directory, by UTC day.
pub fn trash_day(now: SystemTime) -> String {
    let days = now
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() / 86_400)
        .unwrap_or(0) as i64;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

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
    pub lag: crate::health::Lag,
}

#[derive(Debug, thiserror::Error)]
#[error("files not replicated to S3: {}", .0.join(", "))]
pub struct Unreplicated(pub Vec<String>);

enum Command {
    Final {
        deadline: Instant,
        reply: oneshot::Sender<Result<(), Unreplicated>>,
    },
}

/// The running replication loop and its inotify watch.
pub struct Replication {
    tx: mpsc::Sender<Command>,
    task: JoinHandle<()>,
    _watcher: Option<notify::RecommendedWatcher>,
}

struct Engine {
    spec: ReplicationSpec,
    remote: Manifest,
    /// The tree as `.cvm/tree.json` on S3 last described it.
    tree: TreeMeta,
    dirty: BTreeMap<PathBuf, Instant>,
    next_full: Instant,
    retry_at: Option<Instant>,
    failures: u32,
    last_error: String,
}

impl Replication {
    /// Starts watching `spec.root`. `remote` is what S3 holds now; with
    /// `reconcile`, a full pass runs at once (local changes made while
    /// cvm-init was down have no inotify event).
    pub fn start(
        spec: ReplicationSpec,
        remote: Manifest,
        tree: TreeMeta,
        reconcile: bool,
    ) -> Replication {
        let (ev_tx, ev_rx) = mpsc::unbounded_channel();
        let root = spec.root.clone();
        let watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            let _ = ev_tx.send(res);
        })
        .and_then(|mut w| w.watch(&root, RecursiveMode::Recursive).map(|()| w));
        let watcher = match watcher {
            Ok(w) => Some(w),
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
            tree,
            dirty: BTreeMap::new(),
            retry_at: None,
            failures: 0,
            last_error: String::new(),
        };
        let (tx, rx) = mpsc::channel(1);
        let task = tokio::spawn(engine.run(rx, ev_rx));
        Replication {
            tx,
            task,
            _watcher: watcher,
        }
    }

    /// Replicates everything not yet on S3, before `deadline`; then stops.
    pub async fn final_pass(self, deadline: Instant) -> Result<(), Unreplicated> {
        let (reply, rx) = oneshot::channel();
        let result = match self.tx.send(Command::Final { deadline, reply }).await {
            Ok(()) => rx
                .await
                .unwrap_or_else(|_| Err(Unreplicated(vec!["(replication loop gone)".into()]))),
            Err(_) => Err(Unreplicated(vec!["(replication loop gone)".into()])),
        };
        self.task.abort();
        result
    }
}

impl Engine {
    async fn run(
        mut self,
        mut rx: mpsc::Receiver<Command>,
        mut events: mpsc::UnboundedReceiver<notify::Result<notify::Event>>,
    ) {
        loop {
            tokio::select! {
                cmd = rx.recv() => match cmd {
                    Some(Command::Final { deadline, reply }) => {
                        let started = Instant::now();
                        let r = match tokio::time::timeout_at(deadline, self.pass(true)).await {
                            Ok(left) if left.is_empty() => Ok(()),
                            Ok(left) => Err(Unreplicated(left)),
                            Err(_) => Err(Unreplicated(self.pending())),
                        };
                        tracing::info!(took = ?started.elapsed(), ok = r.is_ok(), "replicate: final pass");
                        let _ = reply.send(r);
                        return;
                    }
                    None => return,
                },
                ev = events.recv() => match ev {
                    Some(Ok(ev)) => self.note(ev),
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "inotify error; a full scan follows");
                        self.next_full = Instant::now();
                    }
                    None => {}
                },
                _ = sleep(POLL) => {}
            }
            let now = Instant::now();
            let due = self
                .dirty
                .values()
                .any(|&t| now.duration_since(t) >= self.spec.debounce);
            let full = now >= self.next_full;
            if (due || full) && self.retry_at.is_none_or(|t| now >= t) {
                let left = self.pass(full).await;
                if left.is_empty() {
                    self.failures = 0;
                    self.retry_at = None;
                } else {
                    self.failures += 1;
                    let delay = (Duration::from_secs(1) * 2u32.saturating_pow(self.failures - 1))
                        .min(Duration::from_secs(30));
                    self.retry_at = Some(Instant::now() + delay);
                    tracing::error!(retry_in = ?delay, pending = left.len(), "replicate: some changes did not reach S3");
                }
            }
        }
    }

    fn note(&mut self, ev: notify::Event) {
        use notify::EventKind;
        if matches!(ev.kind, EventKind::Access(_)) {
            return;
        }
        if ev.need_rescan() {
            self.next_full = Instant::now();
        }
        let now = Instant::now();
        for p in ev.paths {
            if let Ok(rel) = p.strip_prefix(&self.spec.root) {
                if !rel.as_os_str().is_empty() && !self.spec.excludes.excluded(rel) {
                    self.dirty.entry(rel.to_owned()).or_insert(now);
                }
            }
        }
    }

    /// Names not known to be on S3 as they are locally.
    fn pending(&self) -> Vec<String> {
        let (local, _) = scan(&self.spec.root, &self.spec.excludes);
        let mut out: Vec<String> = local
            .iter()
            .filter(|(k, v)| self.remote.get(*k) != Some(v))
            .map(|(k, _)| k.clone())
            .collect();
        out.extend(
            self.remote
                .keys()
                .filter(|k| !local.contains_key(*k))
                .cloned(),
        );
        out
    }

    /// One replication pass: a full comparison when `full`, else only the
    /// dirty paths. Returns the names that could not be replicated.
    async fn pass(&mut self, full: bool) -> Vec<String> {
        let started = Instant::now();
        let (local, tree) = scan(&self.spec.root, &self.spec.excludes);
        // When each path first changed, kept for paths that fail again.
        let taken = std::mem::take(&mut self.dirty);
        let scope: Option<BTreeSet<PathBuf>> = if full {
            None
        } else {
            Some(taken.keys().cloned().collect())
        };
        if full {
            self.next_full = Instant::now() + self.spec.interval;
        }
        let in_scope = |name: &str| match &scope {
            None => true,
            Some(paths) => {
                let p = Path::new(name.strip_suffix(LINK_SUFFIX).unwrap_or(name));
                paths.iter().any(|d| p.starts_with(d))
            }
        };
        let uploads: Vec<String> = local
            .iter()
            .filter(|(k, v)| in_scope(k) && self.remote.get(*k) != Some(v))
            .map(|(k, _)| k.clone())
            .collect();
        let mut deletes: Vec<String> = self
            .remote
            .keys()
            .filter(|k| in_scope(k) && !local.contains_key(*k))
            .cloned()
            .collect();
        if deletes.len() > MAX_DELETE_FREE
            && deletes.len() as f64 > self.remote.len() as f64 * MAX_DELETE_SHARE
        {
            tracing::error!(
                deletes = deletes.len(),
                remote_files = self.remote.len(),
                "replicate: refusing to delete more than half of the remote tree in one pass; was the local state \
                 wiped? Nothing is deleted on S3 (restore it, or remove the files on S3 by hand)"
            );
            deletes.clear();
        }
        let trash = format!(
            "{CRYPT_REMOTE}:{TRASH_DIR}/{}",
            trash_day(SystemTime::now())
        );
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
        let mut failed = Vec::new();
        // Two transfers in a row that could not reach S3: the rest of the
        // pass waits for the retry instead of each costing rclone's retries.
        // A failure about the file itself does not count, so a file that
        // keeps failing cannot hold back the ones after it.
        let mut in_a_row = 0;
        for name in &uploads {
            if in_a_row >= GIVE_UP_AFTER {
                failed.push(name.clone());
                continue;
            }
            match self.upload(name, &trash).await {
                Ok(()) => {
                    in_a_row = 0;
                    self.remote.insert(name.clone(), local[name]);
                }
                Err(e) => {
                    in_a_row = if e.is_unreachable() { in_a_row + 1 } else { 0 };
                    tracing::warn!(file = %name, error = %e, "replicate: upload failed");
                    self.last_error = e.to_string();
                    failed.push(name.clone());
                }
            }
        }
        for name in &deletes {
            if in_a_row >= GIVE_UP_AFTER {
                failed.push(name.clone());
                continue;
            }
            match self.trash(name, &trash).await {
                Ok(()) => {
                    in_a_row = 0;
                    self.remote.remove(name);
                }
                Err(e) => {
                    in_a_row = if e.is_unreachable() { in_a_row + 1 } else { 0 };
                    tracing::warn!(file = %name, error = %e, "replicate: delete failed");
                    self.last_error = e.to_string();
                    failed.push(name.clone());
                }
            }
        }
        // After the files it describes, so the tree on S3 is never newer than them.
        if tree != self.tree {
            match self.upload_tree(&tree).await {
                Ok(()) => {
                    tracing::debug!(entries = tree.len(), "replicate: tree uploaded");
                    self.tree = tree;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "replicate: modes, owners and directories not uploaded");
                    failed.push(format!("{META_DIR}/{}", treemeta::FILE));
                }
            }
        }
        // Failed paths stay dirty for the retry.
        for name in &failed {
            let p = PathBuf::from(name.strip_suffix(LINK_SUFFIX).unwrap_or(name));
            let first = taken.get(&p).copied().unwrap_or(started);
            self.dirty.entry(p).or_insert(first);
        }
        if !uploads.is_empty() || !deletes.is_empty() {
            let not_done: BTreeSet<&String> = failed.iter().collect();
            tracing::info!(
                uploaded = uploads.iter().filter(|u| !not_done.contains(u)).count(),
                trashed = deletes.iter().filter(|d| !not_done.contains(d)).count(),
                failed = failed.len(), full, took = ?started.elapsed(), "replicate: pass"
            );
        }
        if failed.is_empty() {
            self.last_error.clear();
            self.spec.lag.caught_up("files");
        } else {
            self.spec
                .lag
                .behind("files", failed.len(), oldest, self.last_error.clone());
        }
        failed
    }

    async fn rc(&self, method: &str, params: Value) -> Result<Value, RcError> {
        rc::call(&self.spec.rc_socket, method, &params).await
    }

    async fn upload(&self, name: &str, trash: &str) -> Result<(), RcError> {
        self.rc(
            "operations/copyfile",
            json!({
                "srcFs": self.spec.root.to_string_lossy(), "srcRemote": name,
                "dstFs": format!("{CRYPT_REMOTE}:"), "dstRemote": name,
                // No `Metadata`: modes and owners travel encrypted in tree.json,
                // not as plain S3 headers; rclone keeps the mtime itself.
                "_config": { "BackupDir": trash, "Links": true },
            }),
        )
        .await
        .map(drop)
    }

    async fn trash(&self, name: &str, trash: &str) -> Result<(), RcError> {
        let r = self
            .rc(
                "operations/movefile",
                json!({
                    "srcFs": format!("{CRYPT_REMOTE}:"), "srcRemote": name,
                    "dstFs": trash, "dstRemote": name,
                }),
            )
            .await;
        match r {
            // Already gone on the remote: nothing to keep.
            Err(RcError::Status { status: 404, .. }) => Ok(()),
            r => r.map(drop),
        }
    }

    async fn upload_tree(&self, tree: &TreeMeta) -> Result<(), RcError> {
        let path = self.spec.scratch.join(treemeta::FILE);
        let io = |source| RcError::Io {
            path: path.clone(),
            source,
        };
        fs::create_dir_all(&self.spec.scratch).map_err(io)?;
        fs::write(&path, treemeta::encode(tree)).map_err(io)?;
        self.rc(
            "operations/copyfile",
            json!({
                "srcFs": self.spec.scratch.to_string_lossy(), "srcRemote": treemeta::FILE,
                "dstFs": format!("{CRYPT_REMOTE}:{META_DIR}"), "dstRemote": treemeta::FILE,
                "_config": { "NoCheckDest": true },
            }),
        )
        .await
        .map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn excludes_follow_rclone_semantics() {
        let ex = Excludes::new(
            &crate::config::DEFAULT_EXCLUDE
                .split(',')
                .map(str::to_owned)
                .collect::<Vec<_>>(),
            &Patterns::default(),
        );
        for yes in [
            "tmp/openclaw-0/x.lock",
            "cache/a/b",
            "agents/a/x.lock",
            "state/openclaw.sqlite",
            "state/openclaw.sqlite-wal",
            "state/openclaw.sqlite-shm",
            ".cvm-trash/2026-01-01/a",
            "sqlite/state/openclaw.sqlite",
        ] {
            assert!(ex.excluded(Path::new(yes)), "{yes}");
        }
        for no in [
            "openclaw.json",
            "workspace/tmp/notes.md",
            "agents/main/agent/auth.json",
            "state/other.json",
        ] {
            assert!(!ex.excluded(Path::new(no)), "{no}");
        }
        assert!(ex.rules().contains(&"/state/*.sqlite-wal".to_owned()));
        assert!(ex.excluded(Path::new("state/openclaw.sqlite.rclonelink")));
    }

    #[test]
    fn trash_days_are_utc_dates() {
        let at = |s| UNIX_EPOCH + Duration::from_secs(s);
        assert_eq!(trash_day(at(0)), "1970-01-01");
        assert_eq!(trash_day(at(951_782_400)), "2000-02-29");
        assert_eq!(trash_day(at(1_795_564_799)), "2026-11-24");
        assert_eq!(trash_day(at(1_795_564_800)), "2026-11-25");
    }

    #[test]
    fn scan_lists_files_links_and_dir_modes() {
        let dir = tempfile::tempdir().unwrap();
        let r = dir.path();
        fs::create_dir_all(r.join("a/b")).unwrap();
        fs::set_permissions(r.join("a"), fs::Permissions::from_mode(0o700)).unwrap();
        fs::write(r.join("a/b/f"), "x").unwrap();
        std::os::unix::fs::symlink("f", r.join("a/b/l")).unwrap();
        fs::create_dir_all(r.join("tmp")).unwrap();
        fs::write(r.join("tmp/skip"), "x").unwrap();
        let ex = Excludes::new(&["/tmp/**".to_owned()], &Patterns::default());
        let (files, tree) = scan(r, &ex);
        assert_eq!(
            files.keys().collect::<Vec<_>>(),
            ["a/b/f", "a/b/l.rclonelink"]
        );
        assert_eq!(tree["a"].kind, Kind::Dir);
        assert_eq!(tree["a"].mode, 0o700);
        assert_eq!(tree["a/b/l"].kind, Kind::Link);
        assert!(!tree.contains_key("tmp/skip"));
    }
}
