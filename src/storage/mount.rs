//! The spec's layout: `rclone mount s3-crypt: $OPENCLAW_STATE_DIR`, with an rc
//! socket so shutdown can drain rclone's upload queue (rclone itself cancels
//! queued uploads on SIGTERM: facts.md §2). Live SQLite databases stay on
//! local disk (`redirect`), restored before the mount and backed up as
//! snapshots (`backup`).

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use serde_json::{json, Value};
use tokio::task::JoinHandle;
use tokio::time::{sleep, sleep_until, Instant};

use super::redirect::{self, RedirectError};
use super::worker::{self, Worker};
use super::{prepare_err, Event, FlushError, StorageFailure};
use crate::backup::{self, BackupSpec, REMOTE_DIR};
use crate::config::{Config, S3Config, SqliteConfig};
use crate::health::Lag;
use crate::mountinfo::{self, PROC_MOUNTINFO};
use crate::notify;
use crate::process::{Exit, Reaper};
use crate::rclone::session::Session;
use crate::rclone::{self, rc, CRYPT_REMOTE};
use crate::restore::{self, RestoreError};

/// How often the flush loop asks rclone for its queue while waiting for it to drain.
const FLUSH_POLL: Duration = Duration::from_millis(100);
/// How long one `vfs/queue-set-expiry` may take at the stop.
const SET_EXPIRY_TIMEOUT: Duration = Duration::from_millis(500);
/// How often known database paths on the mount are checked for files that
/// replaced their symlinks (served from rclone's metadata, no S3 request).
const LINK_CHECK: Duration = Duration::from_secs(1);
/// How long the watchdog's `stat` of the mountpoint may take.
const STAT_TIMEOUT: Duration = Duration::from_secs(1);
/// How long the search for databases on the mount may take; a full search
/// may list directories from S3, so it gets longer than a `stat`.
const DB_LOOK_TIMEOUT: Duration = Duration::from_secs(10);
/// Unanswered looks in a row before the mount counts as hung: one slow
/// answer on a loaded machine must not cost a gateway restart.
const HUNG_AFTER: u32 = 3;

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("cannot prepare {path}: {source}")]
    Prepare { path: PathBuf, source: io::Error },
    #[error("cannot start rclone ({bin}): {source}; install rclone >= 1.75 or set RCLONE_BIN")]
    Spawn { bin: String, source: io::Error },
    #[error(
        "rclone mount exited ({exit}) before {mountpoint} was mounted. rclone said:\n{stderr}"
    )]
    Exited {
        exit: Exit,
        mountpoint: PathBuf,
        stderr: String,
    },
    #[error(
        "{mountpoint} was not mounted within {timeout:?} (CVM_MOUNT_TIMEOUT); check S3_ENDPOINT and the network. \
         rclone said:\n{stderr}"
    )]
    Timeout {
        mountpoint: PathBuf,
        timeout: Duration,
        stderr: String,
    },
    #[error(
        "{mountpoint} is not empty before it was mounted: it holds {entries:?}. They are not on S3 \
         (written while the mount was down, or shipped in the image) and the mount would hide them; \
         move them away or into the bucket, then start again"
    )]
    NotEmpty {
        mountpoint: PathBuf,
        entries: Vec<String>,
    },
    #[error("cannot unmount {mountpoint}: {source}")]
    Unmount {
        mountpoint: PathBuf,
        source: nix::Error,
    },
    #[error(transparent)]
    Killed(#[from] crate::rclone::session::Killed),
    #[error("CVM_EXCLUDE holds a pattern that is not usable: {0}")]
    Exclude(globset::Error),
    #[error(transparent)]
    Restore(#[from] RestoreError),
    #[error(transparent)]
    Redirect(#[from] RedirectError),
    #[error(transparent)]
    Replicate(#[from] super::replicate::ReplicateError),
    #[error(transparent)]
    KeyCheck(#[from] crate::keycheck::KeyCheckError),
    #[error(transparent)]
    S3(#[from] crate::s3probe::WaitError),
}

pub struct Mount {
    session: Session,
    mountpoint: PathBuf,
    /// Live databases: `CVM_LOCAL_DIR/sqlite`.
    db_root: PathBuf,
    sqlite: SqliteConfig,
    /// rclone's `NOTIFY_SOCKET`, kept bound while it runs (it reports `STOPPING=1` there).
    notify: Option<notify::Listener>,
    /// The mount was live, so the gateway may have written through it.
    served: bool,
    backup: Option<Worker>,
    restored: BTreeMap<PathBuf, [u8; 32]>,
    next_full_scan: Instant,
    /// The bare mountpoint is a read-only bind of itself (see [`guard`]).
    guarded: bool,
    /// Watchdog looks in a row that got no answer.
    unanswered: u32,
    lag: Lag,
    /// The queue watcher and the lag reporter, ended at stop.
    tasks: Vec<JoinHandle<()>>,
}

/// What the kernel answers for a FUSE mount whose daemon is gone: ENOTCONN,
/// or ECONNABORTED when the connection was aborted as the daemon died.
pub fn is_dead_mount_error(e: &io::Error) -> bool {
    use nix::errno::Errno;
    matches!(
        e.raw_os_error().map(Errno::from_raw),
        Some(Errno::ENOTCONN | Errno::ECONNABORTED)
    )
}

/// Lazily unmounts the top mount at `mountpoint`.
fn detach(mountpoint: &Path) -> Result<(), StorageError> {
    umount2(mountpoint, MntFlags::MNT_DETACH).map_err(|source| StorageError::Unmount {
        mountpoint: mountpoint.to_owned(),
        source,
    })
}

/// A mount left behind by a previous run (rclone killed with the container's
/// namespace alive, or a crashed rclone) makes every access fail; detach it
/// so the new mount can take its place.
fn detach_stale(mountpoint: &Path) -> Result<(), StorageError> {
    let listed =
        mountinfo::rclone_mounted_at(Path::new(PROC_MOUNTINFO), mountpoint).unwrap_or(false);
    let dead = matches!(std::fs::metadata(mountpoint), Err(e) if is_dead_mount_error(&e));
    if listed || dead {
        tracing::warn!(mountpoint = %mountpoint.display(), "detaching a mount left by a previous run");
        detach(mountpoint)?;
    }
    Ok(())
}

/// While rclone's mount is down, the bare mountpoint must not take writes:
/// they would land on the container's own disk, never reach S3, and vanish
/// under the mount once it is back. A read-only bind of the mountpoint onto
/// itself, under the FUSE mount, makes them fail with EROFS instead. A guard
/// left by an earlier run (the top mount already read-only) is kept.
fn guard(mountpoint: &Path) -> nix::Result<()> {
    let mounts = mountinfo::mounts_at(Path::new(PROC_MOUNTINFO), mountpoint).unwrap_or_default();
    if mounts.last().is_some_and(|m| m.read_only) {
        return Ok(());
    }
    mount(
        Some(mountpoint),
        mountpoint,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )?;
    let ro = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
    if let Err(e) = mount(None::<&str>, mountpoint, None::<&str>, ro, None::<&str>) {
        let _ = umount2(mountpoint, MntFlags::MNT_DETACH);
        return Err(e);
    }
    Ok(())
}

/// How often rclone's upload queue is looked at.
const QUEUE_WATCH: Duration = Duration::from_secs(5);
/// The longest a file waits in rclone's queue before it is made due.
const QUEUE_MAX_AGE: Duration = Duration::from_secs(30);
/// How often S3 is asked whether it answers while uploads fail but it did
/// the last time (they fail for another reason; rclone's backoff stands).
const RETRY_PROBE_EVERY: Duration = Duration::from_secs(30);

/// rclone's write-back queue has two ways of keeping a file off S3 for long:
/// a file closed again within `--vfs-write-back` (5 s) restarts its timer, so
/// one rewritten every few seconds is never uploaded while that goes on; and
/// a failed upload is retried 10 s later, doubling up to 5 min, so after an
/// outage files could wait minutes for an S3 that is back. Every
/// [`QUEUE_WATCH`] this looks at the queue (`vfs/queue`); a file's first
/// sighting dates its oldest unsaved change within one look, and a file
/// waiting longer than
/// [`QUEUE_MAX_AGE`] is made due now, and failed ones as soon as S3 answers
/// a listing again (one request a look while it does not). It also reports
/// the backlog.
async fn watch_queue(socket: PathBuf, raw: String, lag: Lag) {
    const WHAT: &str = "files in rclone's upload queue";
    // By name: (first sighting, looks in a row it was missing). A file is
    // out of the queue while it is open for writing, so one missed look does
    // not end its wait.
    let mut first_seen: HashMap<String, (Instant, u8)> = HashMap::new();
    // Whether the last listing failed: failed uploads are made due when S3
    // comes back, not on every look (a file S3 refuses for its own reasons
    // keeps rclone's backoff). While S3 answers, it is asked at most every
    // RETRY_PROBE_EVERY.
    let mut s3_down = false;
    let mut last_probe: Option<Instant> = None;
    loop {
        sleep(QUEUE_WATCH).await;
        let Ok(queue) = rc::call(&socket, "vfs/queue", &json!({})).await else {
            continue;
        };
        let items = queue["queue"].as_array().cloned().unwrap_or_default();
        let now = Instant::now();
        let name_of = |i: &Value| i["name"].as_str().map(str::to_owned);
        let names: Vec<String> = items.iter().filter_map(name_of).collect();
        for seen in first_seen.values_mut() {
            seen.1 = seen.1.saturating_add(1);
        }
        for name in &names {
            first_seen.entry(name.clone()).or_insert((now, 0)).1 = 0;
        }
        first_seen.retain(|_, (_, missed)| *missed < 2);
        let Some(oldest) = names.iter().map(|n| first_seen[n].0).min() else {
            lag.caught_up(WHAT);
            continue;
        };
        let tried = |i: &Value| i["tries"].as_u64().unwrap_or(0) > 0;
        let why = if items.iter().any(tried) {
            "uploads fail and rclone retries them"
        } else {
            "waiting for rclone's write-back"
        };
        lag.behind(WHAT, items.len(), oldest, why.into());

        // Neither uploading nor already due (waiting for a transfer slot).
        let put_off = |i: &&Value| {
            !i["uploading"].as_bool().unwrap_or(false) && i["expiry"].as_f64().unwrap_or(0.0) > 0.0
        };
        let id_of = |i: &Value| i["id"].as_i64();
        let waited_long =
            |i: &&Value| name_of(i).is_some_and(|n| now - first_seen[&n].0 >= QUEUE_MAX_AGE);
        let mut due: Vec<i64> = items
            .iter()
            .filter(put_off)
            .filter(|i| !tried(i))
            .filter(waited_long)
            .filter_map(id_of)
            .collect();
        if !due.is_empty() {
            tracing::info!(files = due.len(), "uploading files rclone kept back for over {QUEUE_MAX_AGE:?} (rewritten before their write-back came)");
        }
        let retry: Vec<i64> = items
            .iter()
            .filter(put_off)
            .filter(|i| tried(i))
            .filter_map(id_of)
            .collect();
        let probe_due = s3_down || last_probe.is_none_or(|t| now - t >= RETRY_PROBE_EVERY);
        if !retry.is_empty() && probe_due {
            last_probe = Some(now);
            let answers = crate::s3probe::answers_via_rc(&socket, &raw).await;
            if answers && s3_down {
                tracing::info!(
                    files = retry.len(),
                    "S3 answers again: uploading now what rclone had put off for a later retry"
                );
                due.extend(retry);
            }
            s3_down = !answers;
        }
        for id in due {
            let due_now = json!({ "id": id, "expiry": -1e9 });
            let _ = rc::call(&socket, "vfs/queue-set-expiry", &due_now).await;
        }
    }
}

/// What one watchdog look at a live mount found.
enum Health {
    Serving,
    Failed(StorageFailure),
    /// `stat` did not answer within [`STAT_TIMEOUT`].
    Unanswered,
}

/// Looks at the mount the way the gateway would: listed in mountinfo, and
/// `stat` answering. The `stat` runs on a blocking thread so a hung daemon
/// cannot stall the supervisor.
async fn health(mountpoint: &Path) -> Health {
    if !rclone_mounted(mountpoint) {
        return Health::Failed(StorageFailure::MountGone);
    }
    let mp = mountpoint.to_owned();
    let stat = tokio::task::spawn_blocking(move || std::fs::metadata(mp));
    match tokio::time::timeout(STAT_TIMEOUT, stat).await {
        Ok(Ok(Err(e))) if is_dead_mount_error(&e) => Health::Failed(StorageFailure::MountDead(e)),
        Err(_) => Health::Unanswered,
        _ => Health::Serving,
    }
}

fn rclone_mounted(mountpoint: &Path) -> bool {
    mountinfo::rclone_mounted_at(Path::new(PROC_MOUNTINFO), mountpoint).unwrap_or(false)
}

impl Mount {
    /// Prepares directories and the rclone config; starts nothing.
    pub fn new(cfg: &Config, s3: &S3Config) -> Result<Self, StorageError> {
        let session = Session::prepare(cfg, s3)
            .map_err(|(path, source)| StorageError::Prepare { path, source })?;
        let db_root = cfg.local_dir.join("sqlite");
        for dir in [&session.paths.cache_dir, &db_root] {
            std::fs::create_dir_all(dir).map_err(prepare_err(dir))?;
        }
        Ok(Self {
            session,
            mountpoint: cfg.state_dir.clone(),
            db_root,
            sqlite: cfg.sqlite.clone(),
            notify: None,
            served: false,
            backup: None,
            restored: BTreeMap::new(),
            next_full_scan: Instant::now(),
            guarded: false,
            unanswered: 0,
            lag: Lag::default(),
            tasks: Vec::new(),
        })
    }

    pub fn session(&self) -> &Session {
        &self.session
    }

    /// Mounts the crypt remote at the state dir (boot step "start rclone").
    pub async fn start_rclone(
        &mut self,
        reaper: &Reaper,
        timeout: Duration,
    ) -> Result<(), StorageError> {
        notify::status("mounting");
        self.mount(reaper, timeout).await
    }

    /// Fetches the database snapshots S3 holds into local disk, where no
    /// local copy exists, and checks each one.
    pub async fn restore(&mut self) -> Result<(), StorageError> {
        notify::status("restoring databases");
        self.restored = restore::restore_databases(self.session.socket(), &self.db_root).await?;
        Ok(())
    }

    /// Starts the snapshot loop, the watcher of rclone's upload queue and the
    /// lag reporter.
    pub fn start_workers(&mut self) {
        let paths = &self.session.paths;
        let spec = BackupSpec::new(
            self.db_root.clone(),
            paths.snapshots.clone(),
            paths.rc_socket.clone(),
            format!("{CRYPT_REMOTE}:{REMOTE_DIR}"),
            &self.sqlite,
            self.lag.clone(),
        );
        self.backup = Some(backup::start(spec, std::mem::take(&mut self.restored)));
        self.tasks.push(tokio::spawn(watch_queue(
            paths.rc_socket.clone(),
            self.session.s3.raw_remote(),
            self.lag.clone(),
        )));
        self.tasks.push(self.lag.spawn_reporter());

        // Reads through FUSE, so it runs beside the gateway instead of delaying it.
        let (mountpoint, patterns) = (self.mountpoint.clone(), self.sqlite.patterns.clone());
        tokio::task::spawn_blocking(move || {
            for db in redirect::unmatched_databases(&mountpoint, &patterns) {
                tracing::warn!(
                    db = %db.display(),
                    patterns = patterns.as_str(),
                    "an SQLite database on the mount is not covered by CVM_SQLITE_PATHS: it stays on FUSE \
                     (where SQLite can corrupt) and is not snapshotted; add a pattern for it"
                );
            }
        });
    }

    /// Detaches a stale mount, starts `rclone mount` and waits until it is live.
    async fn mount(&mut self, reaper: &Reaper, timeout: Duration) -> Result<(), StorageError> {
        detach_stale(&self.mountpoint)?;
        std::fs::create_dir_all(&self.mountpoint).map_err(prepare_err(&self.mountpoint))?;
        // rclone's own check would also refuse the guard below as "already
        // mounted", so it runs with --allow-non-empty and the check is here.
        let entries: Vec<String> = std::fs::read_dir(&self.mountpoint)
            .map_err(prepare_err(&self.mountpoint))?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|name| name != "lost+found")
            .take(10)
            .collect();
        if !entries.is_empty() {
            return Err(StorageError::NotEmpty {
                mountpoint: self.mountpoint.clone(),
                entries,
            });
        }
        match guard(&self.mountpoint) {
            Ok(()) => self.guarded = true,
            Err(e) => tracing::warn!(
                mountpoint = %self.mountpoint.display(),
                error = %e,
                "cannot make the bare mountpoint read-only; while the mount is down, writes there would land \
                 on local disk (give the container CAP_SYS_ADMIN, as FUSE needs anyway)"
            ),
        }
        let paths = &self.session.paths;
        let _ = std::fs::remove_file(&paths.rc_socket);
        let listener = notify::Listener::bind(&paths.notify_socket)
            .map_err(prepare_err(&paths.notify_socket))?;
        let args = rclone::mount_args(paths, &self.mountpoint);
        let spawned = rclone::spawn(
            reaper,
            &self.session.rclone_bin,
            &args,
            &[("NOTIFY_SOCKET", listener.path())],
        );
        let (child, tail) = spawned.map_err(|source| StorageError::Spawn {
            bin: self.session.rclone_bin.clone(),
            source,
        })?;
        tracing::info!(pid = child.pid().as_raw(), mountpoint = %self.mountpoint.display(), "started rclone mount");
        self.session.adopt(child, tail);
        let mounted = self.wait_mounted(&listener, timeout).await;
        self.notify = Some(listener);
        mounted?;
        self.served = true;
        Ok(())
    }

    /// Waits for rclone's `READY=1`, then confirms the mount in mountinfo.
    async fn wait_mounted(
        &mut self,
        listener: &notify::Listener,
        timeout: Duration,
    ) -> Result<(), StorageError> {
        let deadline = Instant::now() + timeout;
        let mountpoint = self.mountpoint.clone();
        let (child, tail) = self.session.running().expect("rclone was just started");
        tokio::select! {
            r = listener.ready() => {
                if let Err(e) = r {
                    tracing::warn!(error = %e, "rclone's notify socket failed; watching mountinfo instead");
                    sleep_until(deadline).await;
                }
            }
            exit = child.wait() => {
                let stderr = tail.text_when_closed(Duration::from_secs(1)).await;
                return Err(StorageError::Exited { exit, mountpoint, stderr });
            }
            _ = sleep_until(deadline) => {}
        }
        if rclone_mounted(&mountpoint) {
            return Ok(());
        }
        Err(StorageError::Timeout {
            mountpoint,
            timeout,
            stderr: tail.text(),
        })
    }

    /// Before each gateway start: every database local, every link in place.
    pub fn before_gateway(&mut self) -> Result<(), StorageError> {
        let moved = redirect::redirect_all(&self.mountpoint, &self.db_root, &self.sqlite.patterns)?;
        if !moved.is_empty() {
            tracing::info!(?moved, "databases moved off the mount");
        }
        Ok(())
    }

    /// Resolves when rclone exits or its mount dies (the watchdog: checked
    /// every [`LINK_CHECK`], so found within 2 s), or when databases sit on
    /// the mount as regular files (created there, or renamed over their link)
    /// and need the gateway stopped to be moved. Cancel-safe.
    pub async fn next_event(&mut self) -> Event {
        loop {
            let exited = self.session.exited();
            tokio::select! {
                exit = exited => return Event::Failed(StorageFailure::RcloneExited(exit)),
                f = worker::died(&mut self.backup) => return Event::Failed(f),
                _ = sleep(LINK_CHECK) => {}
            }
            match health(&self.mountpoint).await {
                Health::Serving => {}
                Health::Failed(failure) => return Event::Failed(failure),
                Health::Unanswered => {
                    if let Some(hung) = self.unanswered_look() {
                        return hung;
                    }
                    continue;
                }
            }
            match self.databases_on_mount().await {
                Some(files) => {
                    self.unanswered = 0;
                    if !files.is_empty() {
                        return Event::Pause(files);
                    }
                }
                None => {
                    if let Some(hung) = self.unanswered_look() {
                        return hung;
                    }
                }
            }
        }
    }

    /// Counts a look the mount did not answer; after [`HUNG_AFTER`] in a row
    /// rclone is SIGKILLed at once: the kernel then fails every request it
    /// held with ENOTCONN, so the gateway (which may be blocked in one,
    /// unkillable until it is answered) can be stopped, and the dead mount
    /// stays on top so nothing lands on the bare directory meanwhile.
    fn unanswered_look(&mut self) -> Option<Event> {
        self.unanswered += 1;
        tracing::warn!(mountpoint = %self.mountpoint.display(), times = self.unanswered, "the mount did not answer in time");
        if self.unanswered < HUNG_AFTER {
            return None;
        }
        self.unanswered = 0;
        if let Some((child, _)) = self.session.running() {
            let _ = child.signal(nix::sys::signal::Signal::SIGKILL);
        }
        Some(Event::Failed(StorageFailure::MountHung(HUNG_AFTER)))
    }

    /// Databases sitting on the mount as regular files; `None` when the
    /// mount did not answer within [`DB_LOOK_TIMEOUT`]. The file system work
    /// runs on a blocking thread: a hung mount must not stall the supervisor.
    async fn databases_on_mount(&mut self) -> Option<Vec<PathBuf>> {
        // A full search reads pattern directories through FUSE: at most one
        // S3 listing per directory per CVM_BACKUP_INTERVAL.
        let full = Instant::now() >= self.next_full_scan;
        if full {
            self.next_full_scan = Instant::now() + self.sqlite.interval;
        }
        let (mountpoint, db_root) = (self.mountpoint.clone(), self.db_root.clone());
        let patterns = self.sqlite.patterns.clone();
        let look = tokio::task::spawn_blocking(move || {
            let root = if full { &mountpoint } else { &db_root };
            let candidates = patterns.find(root).unwrap_or_default();
            redirect::files_on_mount(&mountpoint, &candidates)
        });
        match tokio::time::timeout(DB_LOOK_TIMEOUT, look).await {
            Ok(Ok(files)) => Some(files),
            Ok(Err(_)) => Some(Vec::new()),
            Err(_) => None,
        }
    }

    async fn rc(&self, method: &str, params: Value) -> Result<Value, rc::RcError> {
        self.session.rc(method, params).await
    }

    /// Ends rclone (after a failed boot, or before a remount); the next
    /// mount detaches what it leaves. Ended in place: if this is cancelled
    /// (a shutdown signal), `stop` still finds it.
    pub async fn end_rclone(&mut self) {
        self.session.end().await;
        self.notify = None;
    }

    /// An rc call that gives up at `deadline`: a wedged rclone must not hold
    /// the stop past its budget.
    async fn rc_by(
        &self,
        method: &str,
        params: Value,
        deadline: Instant,
    ) -> Result<Value, FlushError> {
        match tokio::time::timeout_at(deadline, self.rc(method, params)).await {
            Ok(r) => r.map_err(FlushError::Rc),
            Err(_) => Err(FlushError::Unresponsive),
        }
    }

    /// After a failure, with the gateway stopped: ends rclone if it still
    /// runs, detaches the dead mount and mounts again. Files rclone had not
    /// uploaded wait in its cache under `CVM_LOCAL_DIR`; the new rclone
    /// uploads them. The backup loop keeps its state and retries.
    pub async fn recover(
        &mut self,
        reaper: &Reaper,
        timeout: Duration,
    ) -> Result<(), StorageError> {
        self.end_rclone().await;
        self.mount(reaper, timeout).await
    }

    /// Final SQLite snapshots, then every file rclone holds in its write-back
    /// queue uploaded now; waits until nothing is queued or uploading.
    pub async fn flush(&mut self, deadline: Instant) -> Result<(), FlushError> {
        let databases = match self.backup.take() {
            Some(backup) => backup.final_pass(deadline).await,
            None => Ok(()),
        };
        let queue = self.drain_queue(deadline).await;
        FlushError::all([databases, queue])
    }

    async fn drain_queue(&mut self, deadline: Instant) -> Result<(), FlushError> {
        // rclone learns that a file was closed from an asynchronous FUSE
        // release; until it has processed it, the file is neither queued nor
        // uploading. An empty queue therefore counts only when seen twice,
        // one poll apart.
        let mut quiet_polls = 0;
        // The names rclone last gave for its queue: named in the error when a
        // later call does not answer in time (S3 gone, uploads stuck in retries).
        let mut named: Vec<String> = Vec::new();
        let unanswered = |named: &Vec<String>, e: FlushError| match e {
            FlushError::Unresponsive if !named.is_empty() => FlushError::Timeout {
                in_progress: 0,
                queued: named.len() as u64,
                files: named.clone(),
            },
            e => e,
        };
        loop {
            let exited = self.session.running().map(|(c, _)| c.try_exit());
            match exited {
                // Never mounted in this run: nothing was written through it.
                None | Some(Some(_)) if !self.served => return Ok(()),
                // A recovery that did not get rclone back: the old one's cache holds the rest.
                None => return Err(FlushError::NoRclone),
                Some(Some(exit)) => return Err(FlushError::RcloneGone(exit)),
                Some(None) => {}
            }
            let queue = self
                .rc_by("vfs/queue", json!({}), deadline)
                .await
                .map_err(|e| unanswered(&named, e))?;
            let items = queue["queue"].as_array().cloned().unwrap_or_default();
            named = items
                .iter()
                .filter_map(|i| i["name"].as_str().map(str::to_owned))
                .collect();
            for item in &items {
                let waiting = !item["uploading"].as_bool().unwrap_or(false);
                if let (true, Some(id)) = (waiting, item["id"].as_i64()) {
                    // A negative expiry makes the item due now; errors mean it just started or finished.
                    // Each call is bounded on its own: one that blocks behind an upload
                    // stuck in retries must not eat the whole budget.
                    let due_now = json!({ "id": id, "expiry": -1e9 });
                    let by = deadline.min(Instant::now() + SET_EXPIRY_TIMEOUT);
                    if let Err(e) = self.rc_by("vfs/queue-set-expiry", due_now, by).await {
                        tracing::debug!(error = %e, id, "queue-set-expiry");
                    }
                }
            }
            let stats = self
                .rc_by("vfs/stats", json!({}), deadline)
                .await
                .map_err(|e| unanswered(&named, e))?;
            let in_progress = stats["diskCache"]["uploadsInProgress"]
                .as_u64()
                .unwrap_or(0);
            let queued = stats["diskCache"]["uploadsQueued"].as_u64().unwrap_or(0);
            if in_progress + queued == 0 {
                quiet_polls += 1;
                if quiet_polls == 2 {
                    return Ok(());
                }
            } else {
                quiet_polls = 0;
            }
            if Instant::now() + FLUSH_POLL >= deadline {
                return Err(FlushError::Timeout {
                    in_progress,
                    queued,
                    files: named,
                });
            }
            tracing::debug!(in_progress, queued, "waiting for rclone uploads");
            sleep(FLUSH_POLL).await;
        }
    }

    /// Stops rclone (it unmounts on SIGTERM), kills it at `deadline`, and
    /// detaches the mount if it is still there.
    pub async fn stop(self, deadline: Instant) -> Result<(), StorageError> {
        for t in &self.tasks {
            t.abort();
        }
        let result = self
            .session
            .stop(deadline)
            .await
            .map_err(StorageError::from);
        if rclone_mounted(&self.mountpoint) {
            tracing::warn!(mountpoint = %self.mountpoint.display(), "mount still present after rclone exited; detaching");
            detach(&self.mountpoint)?;
        }
        if self.guarded {
            detach(&self.mountpoint)?;
        }
        result
    }
}
