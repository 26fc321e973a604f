//! SQLite backups: consistent snapshots of every live database, uploaded
//! through the crypt remote soon after a change, and a final pass at stop.
//!
//! The loop polls cheap fingerprints (two `stat`s per database). A database
//! whose fingerprint moved is snapshotted `debounce` after its first unsaved
//! change, however busy it stays; a snapshot whose content hash equals the
//! last uploaded one is not uploaded. An idle database costs no S3 request.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::json;
use tokio::time::{sleep, Instant};

use crate::backoff::Backoff;
use crate::config::SqliteConfig;
use crate::rclone::rc;
use crate::remote::bucket::SQLITE_DIR;
use crate::remote::lag::Lag;
use crate::remote::lease::Fence;
use crate::sqlite::{self, Fingerprint, Patterns, Snapshot, SqliteError};
use crate::storage::worker::{self, Worker};

/// How often fingerprints are compared.
const POLL: Duration = Duration::from_millis(250);
/// How often the database directory is searched for new databases (local disk, cheap).
const RESCAN: Duration = Duration::from_secs(1);

#[derive(Debug, Clone)]
pub struct BackupSpec {
    /// Where the live databases are; patterns are relative to it.
    pub root: PathBuf,
    /// Local scratch space for snapshots before upload.
    pub scratch: PathBuf,
    /// rclone rc socket that performs uploads.
    pub rc_socket: PathBuf,
    /// rclone fs string of the snapshot directory, e.g. `s3-crypt:sqlite`.
    pub remote: String,
    pub patterns: Patterns,
    pub debounce: Duration,
    /// Where the backlog is reported while uploads fail.
    pub lag: Lag,
    /// The trash (`s3-crypt:.cvm-trash`) that takes the snapshot of a
    /// database deleted or renamed away, so it does not come back at the
    /// next restore; `None` keeps every snapshot.
    pub trash: Option<String>,
    /// Open while this instance holds the lease: no upload without it.
    pub fence: Fence,
}

impl BackupSpec {
    pub fn new(
        root: PathBuf,
        scratch: PathBuf,
        rc_socket: PathBuf,
        remote: String,
        cfg: &SqliteConfig,
        lag: Lag,
        fence: Fence,
    ) -> Self {
        Self {
            root,
            scratch,
            rc_socket,
            remote,
            patterns: cfg.patterns.clone(),
            debounce: cfg.debounce,
            lag,
            trash: None,
            fence,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("snapshot of {db} failed (not uploaded): {source}")]
    Snapshot { db: PathBuf, source: SqliteError },
    #[error("upload of {db}'s snapshot failed: {source}")]
    Upload { db: PathBuf, source: rc::RcError },
    #[error("snapshot task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
}

/// What the final pass could not save.
#[derive(Debug, thiserror::Error)]
#[error("databases not saved to S3: {}", .unsaved.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "))]
pub struct FinalPassError {
    pub unsaved: Vec<PathBuf>,
}

#[derive(Debug, Default)]
struct DbState {
    /// Fingerprint when the last saved snapshot was taken.
    saved: Option<Fingerprint>,
    /// Content hash of what S3 holds for this database, when known.
    remote_hash: Option<[u8; 32]>,
    /// First change not yet saved.
    dirty_since: Option<Instant>,
    retry_at: Option<Instant>,
    failures: u32,
}

struct Engine {
    spec: BackupSpec,
    dbs: BTreeMap<PathBuf, DbState>,
    /// Databases gone from the state dir whose snapshots still wait to go to the trash.
    gone: Vec<PathBuf>,
    last_scan: Option<Instant>,
    last_error: String,
}

/// Starts the snapshot loop. `known` maps databases just restored from S3
/// to the content hash S3 holds, so they are not uploaded again unchanged.
pub fn start(spec: BackupSpec, known: BTreeMap<PathBuf, [u8; 32]>) -> Worker {
    let mut engine = Engine {
        spec,
        dbs: BTreeMap::new(),
        gone: Vec::new(),
        last_scan: None,
        last_error: String::new(),
    };
    for (rel, hash) in known {
        engine.dbs.insert(
            rel,
            DbState {
                remote_hash: Some(hash),
                ..DbState::default()
            },
        );
    }
    Worker::spawn("the database snapshot loop", engine)
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
                        self.dbs.insert(rel.clone(), DbState::default());
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
        let mut unsaved = Vec::new();
        let rels: Vec<PathBuf> = self.dbs.keys().cloned().collect();
        for rel in rels {
            let fp = Fingerprint::of(&self.spec.root.join(&rel));
            let state = self.dbs.get_mut(&rel).expect("listed above");
            if !fp.exists() || state.saved == Some(fp) {
                continue;
            }
            let since = *state.dirty_since.get_or_insert(now);
            let due = force
                || (now.duration_since(since) >= self.spec.debounce
                    && state.retry_at.is_none_or(|t| now >= t));
            if !due {
                continue;
            }
            self.report_lag();
            if let Err(e) = self.save(&rel, fp).await {
                let state = self.dbs.get_mut(&rel).expect("listed above");
                state.failures += 1;
                let delay = Backoff::S3.delay(state.failures);
                state.retry_at = Some(Instant::now() + delay);
                tracing::error!(retry_in = ?delay, "sqlite: {e}");
                self.last_error = e.to_string();
                unsaved.push(rel);
            }
        }
        unsaved
    }

    /// Moves the snapshots of databases gone from the state dir to today's
    /// trash; one that fails is tried again at the next rescan.
    async fn trash_gone(&mut self) {
        let Some(trash) = self.spec.trash.clone() else {
            return;
        };
        let day = crate::remote::bucket::trash_day(std::time::SystemTime::now());
        if self.spec.fence.check().is_err() {
            return;
        }
        for rel in std::mem::take(&mut self.gone) {
            let rel_str = rel.to_string_lossy();
            let params = json!({
                "srcFs": self.spec.remote, "srcRemote": rel_str,
                "dstFs": format!("{trash}/{day}/{SQLITE_DIR}"), "dstRemote": rel_str,
            });
            match rc::call(&self.spec.rc_socket, "operations/movefile", &params).await {
                Ok(_) | Err(rc::RcError::Status { status: 404, .. }) => {
                    tracing::info!(db = %rel.display(), "sqlite: database gone from the state dir; its snapshot moved to the trash")
                }
                Err(e) => {
                    tracing::warn!(db = %rel.display(), error = %e, "sqlite: cannot move the snapshot of a deleted database to the trash; retrying");
                    self.gone.push(rel);
                }
            }
        }
    }

    /// Snapshots `rel` and uploads the snapshot unless S3 already holds that content.
    async fn save(&mut self, rel: &Path, fp_before: Fingerprint) -> Result<(), BackupError> {
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
        let changed_since = Fingerprint::of(&live) != fp_before;
        let state = self.dbs.get_mut(rel).expect("saved databases are listed");
        state.saved = Some(fp_before);
        state.remote_hash = Some(snap.sha256);
        // A change made while the snapshot was taken or uploaded is unsaved
        // since then at the latest, not since the next poll notices it.
        state.dirty_since = changed_since.then_some(started);
        self.last_error.clear();
        state.retry_at = None;
        state.failures = 0;
        Ok(())
    }

    async fn upload(&self, rel: &Path, snap: &Snapshot) -> Result<(), BackupError> {
        let rel_str = rel.to_string_lossy();
        let params = json!({
            "srcFs": self.spec.scratch.to_string_lossy(),
            "srcRemote": rel_str,
            "dstFs": self.spec.remote,
            "dstRemote": rel_str,
            // Upload without asking S3 first: the snapshot is known to differ.
            "_config": { "NoCheckDest": true },
        });
        let fenced = |why| BackupError::Upload {
            db: snap.path.clone(),
            source: rc::RcError::Fenced(why),
        };
        self.spec.fence.check().map_err(fenced)?;
        rc::call(&self.spec.rc_socket, "operations/copyfile", &params)
            .await
            .map(drop)
            .map_err(|source| BackupError::Upload {
                db: snap.path.clone(),
                source,
            })
    }

    async fn final_pass(&mut self, deadline: Instant) -> Result<(), FinalPassError> {
        let started = Instant::now();
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
