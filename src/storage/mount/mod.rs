//! The spec's layout: `rclone mount s3-crypt: $OPENCLAW_STATE_DIR`, with an rc
//! socket so shutdown can drain rclone's upload queue (rclone itself cancels
//! queued uploads on SIGTERM: docs/facts.md §2). Live SQLite databases stay on
//! local disk (`redirect`), restored before the mount and backed up as
//! snapshots (`backup`).

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::task::JoinHandle;
use tokio::time::{sleep, sleep_until, Instant};

mod queue;
pub mod redirect;

use super::worker::{self, Worker};
use super::{prepare_err, Event, FlushError, StorageError, StorageFailure};
use crate::config::{Config, S3Config, SqliteConfig};
use crate::rclone::session::Session;
use crate::rclone::{self, rc};
use crate::remote::lag::Lag;
use crate::sqlite::backup::{self, BackupSpec};
use crate::sqlite::restore::{self};
use crate::sys::process::Reaper;
use crate::sys::sdnotify;
use crate::sys::seam::{Linux, Mounts};

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

pub struct Mount {
    session: Session,
    mountpoint: PathBuf,
    /// Live databases: `CVM_LOCAL_DIR/sqlite`.
    db_root: PathBuf,
    sqlite: SqliteConfig,
    /// Days of hourly database restore points (`CVM_HISTORY_DAYS`).
    history_days: u32,
    /// rclone's `NOTIFY_SOCKET`, kept bound while it runs (it reports `STOPPING=1` there).
    notify: Option<sdnotify::Listener>,
    /// The mount was live, so the gateway may have written through it.
    served: bool,
    backup: Option<Worker>,
    restored: BTreeMap<PathBuf, backup::Known>,
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
fn detach(ops: &dyn Mounts, mountpoint: &Path) -> Result<(), StorageError> {
    ops.detach(mountpoint)
        .map_err(|source| StorageError::Unmount {
            mountpoint: mountpoint.to_owned(),
            source,
        })
}

/// A mount left behind by a previous run (rclone killed with the container's
/// namespace alive, or a crashed rclone) makes every access fail; detach it
/// so the new mount can take its place.
fn detach_stale(ops: &dyn Mounts, mountpoint: &Path) -> Result<(), StorageError> {
    let listed = rclone_mounted(ops, mountpoint);
    let dead = matches!(std::fs::metadata(mountpoint), Err(e) if is_dead_mount_error(&e));
    if listed || dead {
        tracing::warn!(mountpoint = %mountpoint.display(), "detaching a mount left by a previous run");
        detach(ops, mountpoint)?;
    }
    Ok(())
}

/// While rclone's mount is down, the bare mountpoint must not take writes:
/// they would land on the container's own disk, never reach S3, and vanish
/// under the mount once it is back. A read-only bind of the mountpoint onto
/// itself, under the FUSE mount, makes them fail with EROFS instead. A guard
/// left by an earlier run (the top mount already read-only) is kept.
fn guard(ops: &dyn Mounts, mountpoint: &Path) -> nix::Result<()> {
    if ops
        .mounts_at(mountpoint)
        .last()
        .is_some_and(|m| m.read_only)
    {
        return Ok(());
    }
    ops.bind(mountpoint)?;
    if let Err(e) = ops.remount_read_only(mountpoint) {
        // A writable bind is no guard: it must not stay.
        let _ = ops.detach(mountpoint);
        return Err(e);
    }
    Ok(())
}

/// After rclone has stopped: detaches its mount if it is still there, then
/// the guard under it. Every step runs whatever failed before it; the
/// errors are returned, each already logged.
fn release(ops: &dyn Mounts, mountpoint: &Path, guarded: bool) -> Vec<StorageError> {
    let mut errors = Vec::new();
    let mut step = |what: &str| {
        if let Err(e) = detach(ops, mountpoint) {
            tracing::error!(mountpoint = %mountpoint.display(), "cannot detach {what}: {e}");
            errors.push(e);
        }
    };
    if rclone_mounted(ops, mountpoint) {
        tracing::warn!(mountpoint = %mountpoint.display(), "mount still present after rclone exited; detaching");
        step("rclone's mount");
    }
    if guarded {
        step("the read-only guard");
    }
    errors
}

/// Gives back to rclone the cached files a crash left without a readable
/// record, which it would otherwise delete at start (`rclone::cache`).
fn mend_cache(paths: &rclone::RunPaths) -> Result<(), StorageError> {
    let mended = rclone::cache::mend(&paths.cache_dir, &paths.rescued)
        .map_err(|(path, source)| StorageError::Prepare { path, source })?;
    for m in mended {
        match &m.rescued {
            None => tracing::warn!(
                path = %m.path.display(),
                "rclone cache: a crash broke this file's record; it is uploaded again"
            ),
            Some(to) => tracing::warn!(
                path = %m.path.display(),
                rescued = %to.display(),
                "rclone cache: a crash broke the record of a partial copy; the bucket's version is served \
                 and the cached bytes are kept in the rescued path: compare them by hand"
            ),
        }
    }
    Ok(())
}

fn rclone_mounted(ops: &dyn Mounts, mountpoint: &Path) -> bool {
    ops.mounts_at(mountpoint)
        .iter()
        .any(|m| m.fs_type == "fuse.rclone")
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
    if !rclone_mounted(&Linux, mountpoint) {
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
            history_days: cfg.history_days,
            notify: None,
            served: false,
            backup: None,
            restored: BTreeMap::new(),
            guarded: false,
            unanswered: 0,
            lag: Lag::default(),
            tasks: Vec::new(),
        })
    }

    pub fn session(&self) -> &Session {
        &self.session
    }

    pub fn session_mut(&mut self) -> &mut Session {
        &mut self.session
    }

    /// Mounts the crypt remote at the state dir (boot step "start rclone").
    pub async fn start_rclone(
        &mut self,
        reaper: &Reaper,
        timeout: Duration,
    ) -> Result<(), StorageError> {
        sdnotify::status("mounting");
        self.mount(reaper, timeout).await
    }

    /// Fetches the database snapshots S3 holds into local disk, where no
    /// local copy exists, and checks each one.
    pub async fn restore(&mut self) -> Result<(), StorageError> {
        sdnotify::status("restoring databases");
        let scratch = self.session.paths.scratch.join("restore-sqlite");
        self.restored =
            restore::restore_databases(self.session.socket(), &self.db_root, &scratch).await?;
        Ok(())
    }

    /// Starts the snapshot loop, the watcher of rclone's upload queue and the
    /// lag reporter.
    pub fn start_workers(&mut self) {
        let paths = &self.session.paths;
        let mut spec = BackupSpec::new(
            self.db_root.clone(),
            paths.snapshots.clone(),
            paths.rc_socket.clone(),
            &self.sqlite,
            self.history_days,
            self.lag.clone(),
            self.session.fence.clone(),
        );
        spec.continue_lines = self.session.continues_lines();
        self.backup = Some(backup::start(spec, std::mem::take(&mut self.restored)));
        self.tasks.push(tokio::spawn(queue::watch(
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
        detach_stale(&Linux, &self.mountpoint)?;
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
        match guard(&Linux, &self.mountpoint) {
            Ok(()) => self.guarded = true,
            Err(e) => tracing::warn!(
                mountpoint = %self.mountpoint.display(),
                error = %e,
                "cannot make the bare mountpoint read-only; while the mount is down, writes there would land \
                 on local disk (give the container CAP_SYS_ADMIN, as FUSE needs anyway)"
            ),
        }
        let paths = &self.session.paths;
        mend_cache(paths)?;
        let _ = std::fs::remove_file(&paths.rc_socket);
        let listener = sdnotify::Listener::bind(&paths.notify_socket)
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
        listener: &sdnotify::Listener,
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
        if rclone_mounted(&Linux, &mountpoint) {
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
            tokio::select! {
                ended = self.session.ended() => return Event::Failed(ended.into()),
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
        // The pattern directories are read through FUSE every look, so a
        // database an agent creates in a new directory is found within a
        // second. rclone serves them from its directory cache
        // (`--dir-cache-time 1000h`, and what the gateway creates goes into
        // it): S3 is listed once per directory, not per look.
        let mountpoint = self.mountpoint.clone();
        let patterns = self.sqlite.patterns.clone();
        let look = tokio::task::spawn_blocking(move || {
            let candidates = patterns.find(&mountpoint).unwrap_or_default();
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

    /// Final SQLite snapshots, then every file rclone holds in its write-back
    /// queue uploaded now; waits until nothing is queued or uploading.
    pub async fn flush(&mut self, deadline: Instant) -> Result<(), FlushError> {
        let databases = worker::final_pass(self.backup.take(), deadline).await;
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
        let released = release(&Linux, &self.mountpoint, self.guarded);
        // rclone's own result first: one killed may not have flushed.
        result.and(released.into_iter().next().map_or(Ok(()), Err))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::mountinfo::Mounted;
    use crate::sys::seam::fake::Recording;

    fn mounted(fs_type: &str, read_only: bool) -> Mounted {
        Mounted {
            fs_type: fs_type.to_owned(),
            read_only,
        }
    }

    #[test]
    fn the_guard_is_a_read_only_bind_and_never_left_writable() {
        let mp = Path::new("/data/openclaw");
        let ops = Recording::default();
        guard(&ops, mp).unwrap();
        assert_eq!(*ops.calls.borrow(), ["bind", "remount_ro"]);

        let ops = Recording::default();
        ops.fail.borrow_mut().push("remount_ro");
        assert!(guard(&ops, mp).is_err());
        assert_eq!(*ops.calls.borrow(), ["bind", "remount_ro", "detach"]);

        // A guard an earlier run left is kept.
        let ops = Recording::default();
        ops.mounted.borrow_mut().push(mounted("ext4", true));
        guard(&ops, mp).unwrap();
        assert!(ops.calls.borrow().is_empty());
    }

    #[test]
    fn the_stop_releases_the_guard_even_when_the_mount_will_not_detach() {
        let mp = Path::new("/data/openclaw");
        let ops = Recording::default();
        ops.mounted.borrow_mut().push(mounted("fuse.rclone", false));
        ops.fail.borrow_mut().push("detach");
        let errors = release(&ops, mp, true);
        assert_eq!(
            *ops.calls.borrow(),
            ["detach", "detach"],
            "the guard is still detached"
        );
        assert_eq!(errors.len(), 1);
        assert!(
            errors[0]
                .to_string()
                .starts_with("cannot unmount /data/openclaw"),
            "{}",
            errors[0]
        );

        // Nothing mounted, no guard: nothing to do.
        let ops = Recording::default();
        assert!(release(&ops, mp, false).is_empty());
        assert!(ops.calls.borrow().is_empty());
    }
}
