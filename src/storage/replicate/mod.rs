//! The replicate layout (the default): the state dir is a plain local
//! directory, restored from the crypt remote at boot and replicated to it
//! while the gateway runs (`engine`, which plans each pass with `plan` over
//! a `scan`), databases as snapshots (`sqlite::backup`).
//! One long-lived `rclone rcd` serves every transfer. No FUSE, no privileges.

pub mod engine;
pub mod history;
mod plan;
mod rollback;
pub mod scan;
mod stage;
pub mod timeline;
pub mod treemeta;

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::time::{sleep, Instant};

use super::worker::{self, Worker};
use super::{prepare_err, Event, FlushError, StorageError};
use crate::config::{Config, S3Config, SqliteConfig};
use crate::rclone::session::Session;
use crate::rclone::{self, rc, CRYPT_REMOTE};
use crate::remote::bucket::{trash_day, LINK_SUFFIX, META_DIR, TRASH_DIR, USER_DIR};
use crate::remote::lag::Lag;
use crate::sqlite::backup::{self, BackupSpec};
use crate::sqlite::restore;
use crate::sys::process::Reaper;
use crate::sys::sdnotify;
use engine::ReplicationSpec;
use scan::{Excludes, Manifest, Written};

/// A restore with no progress for this long asks whether S3 still answers.
const RESTORE_STALL: Duration = Duration::from_secs(10);
/// How often restore progress is logged while it runs.
const PROGRESS_EVERY: Duration = Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
pub enum ReplicateError {
    #[error(transparent)]
    Rcd(#[from] rclone::RcdError),
    #[error(
        "restoring the state dir {dir} from {CRYPT_REMOTE}: failed: {detail}{}. The gateway is not started",
        missing_list(.missing)
    )]
    Restore {
        dir: PathBuf,
        detail: String,
        /// Remote files not in the state dir as they are on S3 after the attempt.
        missing: Vec<String>,
    },
    #[error("restoring the state dir stopped: no progress for {0:?} and S3 does not answer")]
    Stalled(Duration),
    #[error("cannot list what S3 holds: {0}")]
    List(rc::RcError),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

pub struct Replicate {
    session: Session,
    state_dir: PathBuf,
    local_dir: PathBuf,
    sqlite: SqliteConfig,
    excludes: Excludes,
    history_days: u32,
    /// `CVM_RESTORE_AT`: roll the bucket back before the restore.
    restore_at: Option<String>,
    /// What the restore found, for the workers it starts.
    restored: Option<Restored>,
    backup: Option<Worker>,
    replication: Option<Worker>,
    lag: Lag,
    reporter: Option<tokio::task::JoinHandle<()>>,
}

/// What boot's restore hands to the workers.
struct Restored {
    /// What S3 holds, as far as it is known.
    remote: Manifest,
    /// When each head on S3 was written, as S3 lists it.
    written: Written,
    /// The tree as S3's `tree.json` describes it.
    tree: treemeta::TreeMeta,
    /// Local changes may be unknown to S3: a full pass first.
    reconcile: bool,
    /// Databases restored from snapshots, with their content hashes.
    databases: BTreeMap<PathBuf, crate::sqlite::backup::Known>,
}

fn missing_list(missing: &[String]) -> String {
    if missing.is_empty() {
        return String::new();
    }
    format!("; not restored: {}", engine::shortlist(missing, 10))
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> ReplicateError + '_ {
    move |source| ReplicateError::Io {
        path: path.to_owned(),
        source,
    }
}

impl Replicate {
    pub fn new(cfg: &Config, s3: &S3Config) -> Result<Self, StorageError> {
        let session = Session::prepare(cfg, s3)
            .map_err(|(path, source)| StorageError::Prepare { path, source })?;
        for dir in [&cfg.state_dir, &cfg.local_dir] {
            fs::create_dir_all(dir).map_err(prepare_err(dir))?;
        }
        Ok(Self {
            session,
            state_dir: cfg.state_dir.clone(),
            local_dir: cfg.local_dir.clone(),
            sqlite: cfg.sqlite.clone(),
            excludes: Excludes::new(&cfg.exclude, &cfg.sqlite.patterns)
                .map_err(StorageError::Exclude)?,
            history_days: cfg.history_days,
            restore_at: cfg.restore_at.clone(),
            restored: None,
            backup: None,
            replication: None,
            lag: Lag::default(),
            reporter: None,
        })
    }

    /// Marks a restore in progress; a boot that finds it starts over.
    fn restore_marker(&self) -> PathBuf {
        self.local_dir.join("restore-incomplete")
    }

    /// This bucket prefix, as the evidence in a state dir names it.
    fn identity(&self) -> String {
        let s3 = &self.session.s3;
        format!("{} {}", s3.endpoint, s3.raw_remote())
    }

    async fn rc(&self, method: &str, params: Value) -> Result<Value, rc::RcError> {
        self.session.rc(method, params).await
    }

    pub fn session(&self) -> &Session {
        &self.session
    }

    pub fn session_mut(&mut self) -> &mut Session {
        &mut self.session
    }

    /// Starts `rclone rcd`, which serves every transfer (boot step "start rclone").
    pub async fn start_rclone(
        &mut self,
        reaper: &Reaper,
        timeout: Duration,
    ) -> Result<(), StorageError> {
        self.session
            .start_rcd(reaper, timeout)
            .await
            .map_err(|e| StorageError::Replicate(e.into()))
    }

    fn filter(&self) -> Value {
        self.filter_with(&[])
    }

    /// The excludes plus `extra` rules (rclone filter syntax).
    fn filter_with(&self, extra: &[String]) -> Value {
        let rules: Vec<&String> = self.excludes.rules().iter().chain(extra).collect();
        json!({ "ExcludeRule": rules })
    }

    /// Copies the whole tree from the remote, logging progress; runs as an rc
    /// job. Content, mtimes and symlinks only: modes and owners come from
    /// `tree.json` after it (see `treemeta` for why not rclone's metadata).
    async fn restore_tree(&self, skip: &[String]) -> Result<(), ReplicateError> {
        let copied = async {
            self.copy_tree("", self.filter_with(skip)).await?;
            // A user's own top-level `sqlite/` or `.cvm-trash/` (see
            // `engine::remote_name`): nothing else is stored there.
            self.copy_tree(USER_DIR, json!({})).await
        };
        match copied.await {
            Err(ReplicateError::Restore { dir, detail, .. }) => Err(ReplicateError::Restore {
                missing: self.unrestored().await,
                dir,
                detail,
            }),
            r => r,
        }
    }

    /// Remote files that are not in the state dir at their remote size,
    /// named for the error of a failed restore (empty if S3 cannot list).
    async fn unrestored(&self) -> Vec<String> {
        let Ok((remote, _)) = self.remote_manifest().await else {
            return Vec::new();
        };
        let local = scan::scan(&self.state_dir, &self.excludes).files;
        remote
            .into_iter()
            .filter(|(name, (size, _, _))| local.get(name).map(|s| s.0) != Some(*size))
            .map(|(name, _)| name)
            .collect()
    }

    /// Copies the remote's `from` (relative to the crypt remote) into the state dir.
    async fn copy_tree(&self, from: &str, filter: Value) -> Result<(), ReplicateError> {
        let fail = |detail: String| ReplicateError::Restore {
            dir: self.state_dir.clone(),
            detail,
            missing: Vec::new(),
        };
        let params = json!({
            "srcFs": format!("{CRYPT_REMOTE}:{from}"), "dstFs": self.state_dir.to_string_lossy(),
            "_filter": filter,
            // `UpdateOlder`: a file already here and newer than S3's is kept.
            "_config": { "Links": true, "Transfers": 8, "Checkers": 16, "UpdateOlder": true },
        });
        let id = rc::start_job(self.session.socket(), "sync/copy", params)
            .await
            .map_err(|e| fail(e.to_string()))?;
        let started = Instant::now();
        let mut next_log = started + PROGRESS_EVERY;
        // (bytes, when they last grew): a restore that stops moving while S3
        // does not answer is stopped, so the boot can wait for S3 instead of
        // sitting out rclone's retries of every file.
        let mut progress = (0u64, started);
        loop {
            match rc::job_outcome(self.session.socket(), id)
                .await
                .map_err(|e| fail(e.to_string()))?
            {
                Some(Ok(())) => return Ok(()),
                // A bucket prefix that holds nothing yet is a first boot, not a failure.
                Some(Err(err)) if err.contains("directory not found") => return Ok(()),
                Some(Err(err)) => return Err(fail(err)),
                None => {}
            }
            if Instant::now() >= next_log {
                next_log += PROGRESS_EVERY;
                if let Ok(stats) = self
                    .rc("core/stats", json!({ "group": format!("job/{id}") }))
                    .await
                {
                    let bytes = stats["bytes"].as_u64().unwrap_or(0);
                    tracing::info!(
                        bytes,
                        files = stats["transfers"].as_u64().unwrap_or(0),
                        elapsed = ?started.elapsed(),
                        "restore: in progress"
                    );
                    if bytes > progress.0 {
                        progress = (bytes, Instant::now());
                    } else if progress.1.elapsed() >= RESTORE_STALL
                        && !crate::remote::probe::answers_via_rc(
                            self.session.socket(),
                            &self.session.s3.raw_remote(),
                        )
                        .await
                    {
                        let _ = self.rc("job/stop", json!({ "jobid": id })).await;
                        return Err(ReplicateError::Stalled(progress.1.elapsed()));
                    }
                }
            }
            sleep(Duration::from_millis(50)).await;
        }
    }

    /// The tree as S3 describes it, if it does: `.cvm/tree.json`, or, from an
    /// older cvm-init, `.cvm/dirs.json` (directory modes only).
    async fn fetch_tree_meta(&self) -> Result<Option<treemeta::TreeMeta>, ReplicateError> {
        let scratch = &self.session.paths.scratch;
        match treemeta::fetch(self.session.socket(), scratch).await {
            Ok(Some((tree, legacy))) => {
                if legacy {
                    tracing::warn!("restore: the bucket has directory modes only (written by an older cvm-init); \
                        files get default modes and owners until the first pass records them");
                }
                Ok(Some(tree))
            }
            Ok(None) => Ok(None),
            Err(treemeta::FetchError::Decode { name, source }) => {
                Err(io_err(Path::new(&name))(source))
            }
            Err(ref e @ treemeta::FetchError::Rc { ref name, .. }) => {
                Err(ReplicateError::Restore {
                    dir: self.state_dir.clone(),
                    detail: e.to_string(),
                    missing: vec![name.clone()],
                })
            }
        }
    }

    /// Makes the restored state dir's empty directories, modes and owners
    /// what `tree` says. What cannot be set is a warning naming the path,
    /// never a failed restore: the content is in place.
    fn apply_tree_meta(&self, tree: &treemeta::TreeMeta) {
        let applied = treemeta::apply(&self.state_dir, tree);
        const SHOWN: usize = 20;
        for (path, why) in applied.failures.iter().take(SHOWN) {
            tracing::warn!(path = %path.display(), "restore: content restored, but {why}");
        }
        if applied.failures.len() > SHOWN {
            tracing::warn!(
                more = applied.failures.len() - SHOWN,
                "restore: more modes or owners could not be set"
            );
        }
        tracing::debug!(
            entries = tree.len(),
            changed = applied.changed,
            dirs_made = applied.dirs_made,
            "restore: modes, owners and empty directories applied"
        );
    }

    /// What the remote holds, as a manifest, for a state dir kept from a
    /// previous run, and when each head was written.
    async fn remote_manifest(&self) -> Result<(Manifest, Written), ReplicateError> {
        let listing = rc::list(
            self.session.socket(),
            &json!({
                "fs": format!("{CRYPT_REMOTE}:"), "remote": "",
                "opt": { "recurse": true, "filesOnly": true, "noMimeType": true },
                "_filter": self.filter(),
            }),
        )
        .await
        .map_err(ReplicateError::List)?;
        // Sizes only: a stamp that cannot match makes the first full pass
        // compare by uploading; after that the manifest is exact. S3's
        // mtime stays out of the stamp (same size and mtime with new
        // content would pass for a chmod) and only dates the version a
        // head becomes.
        let mut manifest = Manifest::new();
        let mut written = Written::new();
        for i in listing.iter() {
            let (Some(name), Some(size)) = (i["Path"].as_str(), i["Size"].as_u64()) else {
                continue;
            };
            manifest.insert(name.to_owned(), (size, i64::MIN, i64::MIN));
            if let Some(ms) = i["ModTime"].as_str().and_then(crate::timepoint::modtime_ms) {
                written.insert(name.to_owned(), ms);
            }
        }
        Ok((manifest, written))
    }

    /// A rollback boot's first step ([`rollback`]): the bucket's head made
    /// the state as of `to`, unless that was done before.
    async fn roll_back(&self, to: &str) -> Result<(), ReplicateError> {
        sdnotify::status("rolling back");
        let rollback = rollback::Rollback {
            socket: self.session.socket(),
            state_dir: &self.state_dir,
            scratch: &self.session.paths.scratch,
            excludes: &self.excludes,
            fence: &self.session.fence,
            history_days: self.history_days,
        };
        match rollback.run(to).await? {
            rollback::Outcome::AlreadyDone { at_ms } => tracing::warn!(
                restore_at = to,
                done_at = %crate::timepoint::format(at_ms),
                "boot: CVM_RESTORE_AT was rolled back to already; booting from the latest state (which continues \
                 from that rollback). Unset CVM_RESTORE_AT"
            ),
            rollback::Outcome::Done {
                to_ms,
                files,
                databases,
                set_aside,
            } => tracing::warn!(
                restore_at = to,
                to = %crate::timepoint::format(to_ms),
                files,
                databases,
                set_aside = ?set_aside,
                "boot: rolled the bucket back; what it held before is kept in its history (cvm-init restore --at \
                 a later time brings it back), and the state dir's previous contents were set aside"
            ),
        }
        Ok(())
    }

    /// Restores the state dir and the databases, unless the state dir is
    /// known to be newer than S3 (see [`decide_start`]).
    pub async fn restore(&mut self) -> Result<(), StorageError> {
        let t = Instant::now();
        if let Some(to) = &self.restore_at {
            self.roll_back(to).await?;
        }
        let marker = self.restore_marker();
        let evidence_path = self.state_dir.join(META_DIR).join(EVIDENCE);
        let evidence = fs::read_to_string(&evidence_path).ok();
        let this = self.identity();
        let start = decide_start(marker.exists(), evidence.as_deref(), &this);
        let mut restored_dbs = BTreeMap::new();
        let (remote, written, tree, reconcile) = if let Start::Restore { clear } = start {
            if clear {
                tracing::warn!(dir = %self.state_dir.display(), "an earlier restore was interrupted; starting it over");
                clear_dir(&self.state_dir)
                    .map_err(|e| StorageError::from(io_err(&self.state_dir)(e)))?;
            }
            // What is here already (empty directories of a new volume, files
            // baked into an image, a state dir of an older cvm-init) is
            // restored into: nothing remote is deleted, a local file newer
            // than S3's copy is kept and uploaded.
            let before = scan::scan(&self.state_dir, &self.excludes);
            if !before.files.is_empty() {
                tracing::info!(
                    dir = %self.state_dir.display(), files = before.files.len(),
                    evidence = evidence.as_deref().unwrap_or("none"),
                    "boot: the state dir holds files but no evidence it was restored from this bucket; restoring into it \
                     (S3's copy wins unless the local file is newer; nothing on S3 is deleted)"
                );
            }
            sdnotify::status("restoring state");
            let remote_tree = self.fetch_tree_meta().await?;
            let (listing, written) = self.remote_manifest().await?;
            let (skip, losers) = shape_conflicts(&listing, remote_tree.as_ref());
            if !losers.is_empty() {
                tracing::warn!(
                    left_out = ?losers,
                    "restore: S3 holds a file and a directory under the same name (a shape change cut short); \
                     restoring the one .cvm/tree.json names (else the directory), the other is moved to the trash"
                );
            }
            fs::write(&marker, b"").map_err(|e| StorageError::from(io_err(&marker)(e)))?;
            // The tree and the databases do not depend on each other: fetch both at
            // once, the databases into a staging dir so their check sees only them.
            let staging = self.local_dir.join("restore-sqlite");
            let _ = fs::remove_dir_all(&staging);
            fs::create_dir_all(&staging).map_err(|e| StorageError::from(io_err(&staging)(e)))?;
            // The first failure ends both: a stalled tree must not wait for
            // rclone's retries of the databases.
            let ((), dbs) = tokio::try_join!(
                async { self.restore_tree(&skip).await.map_err(StorageError::from) },
                async {
                    restore::restore_databases(
                        self.session.socket(),
                        &staging,
                        &self.session.paths.scratch.join("restore-sqlite"),
                    )
                    .await
                    .map_err(StorageError::from)
                },
            )?;
            restored_dbs = dbs;
            let mut kept = Vec::new();
            for rel in restored_dbs.keys() {
                let live = self.state_dir.join(rel);
                let here = before
                    .files
                    .contains_key(&rel.to_string_lossy().into_owned())
                    || live.exists();
                // A file at a database's path that is no database (truncated to
                // nothing, say) never silently replaces the database S3 holds:
                // both are kept, the database in place.
                if here && !crate::sqlite::is_sqlite(&live).unwrap_or(true) {
                    let aside = crate::sqlite::sidecar(
                        &live,
                        &format!(".not-a-database-{}", crate::timepoint::now_s()),
                    );
                    tracing::warn!(db = %rel.display(), aside = %aside.display(), "restore: the file at a database's path \
                        is not a database (empty or overwritten); S3's database is put in its place and the file kept beside it");
                    fs::rename(&live, &aside).map_err(|e| StorageError::from(io_err(&live)(e)))?;
                } else if here {
                    tracing::warn!(db = %rel.display(), "restore: a database is already in the state dir; keeping it, \
                        not S3's snapshot");
                    kept.push(rel.clone());
                    continue;
                }
                move_file(&staging.join(rel), &live)
                    .map_err(|e| StorageError::from(io_err(rel)(e)))?;
            }
            // What S3 holds of a database kept from the state dir is not what
            // is here: it starts a line of its own.
            for rel in kept {
                restored_dbs.remove(&rel);
            }
            let _ = fs::remove_dir_all(&staging);
            let remote_tree = remote_tree.unwrap_or_default();
            self.apply_tree_meta(&remote_tree);
            let synced = Instant::now();
            nix::unistd::sync();
            tracing::debug!(took = ?synced.elapsed(), "boot: restore synced");
            write_evidence(&evidence_path, &this)
                .map_err(|e| StorageError::from(io_err(&evidence_path)(e)))?;
            fs::remove_file(&marker).map_err(|e| StorageError::from(io_err(&marker)(e)))?;
            let files = scan::scan(&self.state_dir, &self.excludes).files;
            let bytes: u64 = files.values().map(|s| s.0).sum();
            tracing::info!(files = files.len(), bytes, databases = restored_dbs.len(), took = ?t.elapsed(), "boot: state restored");
            // What the restore wrote is what S3 holds; a file it left alone
            // (local only, or newer here) is not known to be on S3.
            let mut on_s3: Manifest = files
                .into_iter()
                .filter(|(name, st)| before.files.get(name) != Some(st))
                .collect();
            // Left out of the restore, so not local: the first pass trashes them.
            on_s3.extend(
                losers
                    .iter()
                    .filter_map(|n| Some((n.clone(), *listing.get(n)?))),
            );
            (
                on_s3,
                written,
                remote_tree,
                !before.files.is_empty() || !losers.is_empty(),
            )
        } else {
            tracing::info!(
                dir = %self.state_dir.display(),
                "boot: keeping the local state dir (restored from or written to this bucket prefix before, so newer \
                 than S3)"
            );
            let (remote, written) = self.remote_manifest().await?;
            (remote, written, treemeta::TreeMeta::new(), true)
        };
        self.restored = Some(Restored {
            remote,
            written,
            tree,
            reconcile,
            databases: restored_dbs,
        });
        Ok(())
    }

    /// Starts the snapshot loop, the replication loop (which watches the
    /// state dir before it returns: nothing the gateway writes is missed),
    /// the lag reporter and the trash purge.
    pub fn start_workers(&mut self) {
        let Restored {
            remote,
            written,
            tree,
            reconcile,
            databases,
        } = self.restored.take().unwrap_or_else(|| Restored {
            remote: Manifest::new(),
            written: Written::new(),
            tree: treemeta::TreeMeta::new(),
            reconcile: true,
            databases: BTreeMap::new(),
        });
        tokio::spawn(prune_history(
            self.session.paths.rc_socket.clone(),
            self.history_days,
            self.session.fence.clone(),
        ));

        let scratch = self.session.paths.scratch.clone();
        let mut backup = BackupSpec::new(
            self.state_dir.clone(),
            self.session.paths.snapshots.clone(),
            self.session.paths.rc_socket.clone(),
            &self.sqlite,
            self.history_days,
            self.lag.clone(),
            self.session.fence.clone(),
        );
        backup.continue_lines = self.session.continues_lines();
        // The state dir is the databases' only home: one deleted there is gone.
        backup.trash = Some(format!("{CRYPT_REMOTE}:{TRASH_DIR}"));
        self.backup = Some(backup::start(backup, databases));
        self.replication = Some(engine::start(
            ReplicationSpec {
                root: self.state_dir.clone(),
                rc_socket: self.session.paths.rc_socket.clone(),
                excludes: self.excludes.clone(),
                debounce: self.sqlite.debounce,
                interval: self.sqlite.interval,
                scratch,
                lag: self.lag.clone(),
                fence: self.session.fence.clone(),
            },
            remote,
            written,
            tree,
            reconcile,
        ));
        self.reporter = Some(self.lag.spawn_reporter());
    }

    pub async fn next_event(&mut self) -> Event {
        Event::Failed(tokio::select! {
            ended = self.session.ended() => ended.into(),
            f = worker::died(&mut self.backup) => f,
            f = worker::died(&mut self.replication) => f,
        })
    }

    /// Ends `rclone rcd` (after a failed boot, or one that died). After a
    /// failed boot the restore marker stays, so the next boot empties the
    /// state dir and restores it again.
    pub async fn end_rclone(&mut self) {
        self.session.end().await;
    }

    pub async fn flush(&mut self, deadline: Instant) -> Result<(), FlushError> {
        let databases = worker::final_pass(self.backup.take(), deadline).await;
        let files = worker::final_pass(self.replication.take(), deadline).await;
        FlushError::all([databases, files])
    }

    pub async fn stop(mut self, deadline: Instant) -> Result<(), StorageError> {
        if let Some(r) = self.reporter.take() {
            r.abort();
        }
        self.session
            .stop(deadline)
            .await
            .map_err(StorageError::from)
    }
}

/// Where S3 holds a file and a directory under one name, which side to
/// leave out of a restore: the directory when `tree` says the path is a
/// file or a link, else the file. Returns the rclone exclude rules and the
/// remote names left out.
fn shape_conflicts(
    remote: &Manifest,
    tree: Option<&treemeta::TreeMeta>,
) -> (Vec<String>, Vec<String>) {
    let (mut rules, mut losers) = (Vec::new(), Vec::new());
    for name in remote.keys() {
        let path = name.strip_suffix(LINK_SUFFIX).unwrap_or(name);
        let below = format!("{path}/");
        let inside: Vec<&String> = remote
            .range(below.clone()..)
            .map(|(k, _)| k)
            .take_while(|k| k.starts_with(&below))
            .collect();
        if inside.is_empty() {
            continue;
        }
        let dir_is_current = !tree
            .and_then(|t| t.get(path))
            .is_some_and(|e| e.kind != treemeta::Kind::Dir);
        if dir_is_current {
            rules.push(format!("/{}", crate::filter::escape(name)));
            losers.push(name.clone());
        } else {
            rules.push(format!("/{}/**", crate::filter::escape(path)));
            losers.extend(inside.into_iter().cloned());
        }
    }
    (rules, losers)
}

/// The file in the state dir (below `.cvm/`, never replicated) saying which
/// bucket prefix it was restored from: what makes it "newer than S3".
const EVIDENCE: &str = "replica";

/// How boot treats the state dir it finds.
#[derive(Debug, PartialEq, Eq)]
enum Start {
    /// Restore into it, emptying it first when `clear` (the leftovers of an
    /// interrupted restore).
    Restore { clear: bool },
    /// It was restored from (or first written to) this bucket prefix by an
    /// earlier boot: it is newer than S3, kept, and reconciled.
    Keep,
}

/// Decides from evidence, never from "not empty": a state dir with empty
/// directories or unrelated files is restored into.
fn decide_start(interrupted: bool, evidence: Option<&str>, this: &str) -> Start {
    match (interrupted, evidence.map(str::trim)) {
        (true, _) => Start::Restore { clear: true },
        (false, Some(e)) if e == this => Start::Keep,
        (false, _) => Start::Restore { clear: false },
    }
}

fn write_evidence(path: &Path, this: &str) -> io::Result<()> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, format!("{this}\n"))?;
    fs::File::open(&tmp)?.sync_all()?;
    fs::rename(&tmp, path)
}

/// Renames `from` to `to`, or copies and syncs it when they are on different
/// file systems (the local and state dirs may be different volumes).
fn move_file(from: &Path, to: &Path) -> io::Result<()> {
    if let Some(parent) = to.parent() {
        fs::create_dir_all(parent)?;
    }
    match fs::rename(from, to) {
        Err(e) if e.raw_os_error() == Some(nix::errno::Errno::EXDEV as i32) => {
            fs::copy(from, to)?;
            fs::File::open(to)?.sync_all()?;
            fs::remove_file(from)
        }
        r => r,
    }
}

/// At boot, in the background: deletes the file versions retention no
/// longer keeps ([`history::keep`]), and the trash days older than
/// `days`. Best effort: what is left goes at the next boot.
async fn prune_history(socket: PathBuf, days: u32, fence: crate::remote::lease::Fence) {
    if let Ok(versions) = timeline::versions(&socket).await {
        let now = crate::timepoint::now_ms();
        let (mut pruned, mut kept) = (0, 0);
        for (v, _) in versions {
            if history::keep(&v, now, days) {
                kept += 1;
                continue;
            }
            let Ok(_permit) = fence.permit().await else {
                return;
            };
            let r = rc::call(
                &socket,
                "operations/deletefile",
                &json!({ "fs": format!("{CRYPT_REMOTE}:"), "remote": v.object() }),
            )
            .await;
            if r.is_ok() {
                pruned += 1;
            }
        }
        tracing::info!(
            pruned,
            kept,
            "history: pruned file versions retention no longer keeps"
        );
    }
    purge_old_trash(&socket, days, &fence).await;
}

/// Purges trash days older than `days`.
async fn purge_old_trash(socket: &Path, days: u32, fence: &crate::remote::lease::Fence) {
    let Ok(listing) = rc::list(
        socket,
        &json!({ "fs": format!("{CRYPT_REMOTE}:{TRASH_DIR}"), "remote": "", "opt": { "dirsOnly": true } }),
    )
    .await
    else {
        return;
    };
    let cutoff =
        trash_day(std::time::SystemTime::now() - Duration::from_secs(86_400 * u64::from(days)));
    for day in listing.iter().filter_map(|i| i["Path"].as_str()) {
        if day >= cutoff.as_str() {
            continue;
        }
        if let Ok(_permit) = fence.permit().await {
            let r = rc::call(
                socket,
                "operations/purge",
                &json!({ "fs": format!("{CRYPT_REMOTE}:{TRASH_DIR}"), "remote": day }),
            )
            .await;
            tracing::info!(
                day,
                ok = r.is_ok(),
                "trash: purged a day older than CVM_HISTORY_DAYS"
            );
        }
    }
}

/// Removes everything inside `dir`, keeping `dir` itself (it may be a volume mountpoint).
fn clear_dir(dir: &Path) -> io::Result<()> {
    for e in fs::read_dir(dir)? {
        let p = e?.path();
        if p.symlink_metadata()?.is_dir() {
            fs::remove_dir_all(&p)?;
        } else {
            fs::remove_file(&p)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_and_a_directory_under_one_name_restore_as_the_tree_says() {
        let remote: Manifest = ["x", "x/a", "x/b", "y.rclonelink", "y/c", "plain"]
            .into_iter()
            .map(|n| (n.to_owned(), (1, 0, 0)))
            .collect();
        let entry = |kind| treemeta::Entry {
            kind,
            mode: 0o644,
            uid: 0,
            gid: 0,
        };
        // No tree: the directories win.
        let (rules, losers) = shape_conflicts(&remote, None);
        assert_eq!(rules, ["/x", "/y.rclonelink"]);
        assert_eq!(losers, ["x", "y.rclonelink"]);
        // The tree says x is a file now and y a directory.
        let tree: treemeta::TreeMeta = [
            ("x", entry(treemeta::Kind::File)),
            ("y", entry(treemeta::Kind::Dir)),
        ]
        .into_iter()
        .map(|(p, e)| (p.to_owned(), e))
        .collect();
        let (rules, losers) = shape_conflicts(&remote, Some(&tree));
        assert_eq!(rules, ["/x/**", "/y.rclonelink"]);
        assert_eq!(losers, ["x/a", "x/b", "y.rclonelink"]);
    }

    #[test]
    fn boot_keeps_a_state_dir_only_on_evidence_from_this_bucket() {
        let this = "http://s3 s3:b/p";
        let table = [
            (false, None, Start::Restore { clear: false }),
            (false, Some("http://s3 s3:b/p\n"), Start::Keep),
            (
                false,
                Some("http://s3 s3:b/other"),
                Start::Restore { clear: false },
            ),
            (
                true,
                Some("http://s3 s3:b/p"),
                Start::Restore { clear: true },
            ),
            (true, None, Start::Restore { clear: true }),
        ];
        for (interrupted, evidence, want) in table {
            assert_eq!(
                decide_start(interrupted, evidence, this),
                want,
                "{interrupted} {evidence:?}"
            );
        }
    }
}
