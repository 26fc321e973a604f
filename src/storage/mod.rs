//! Where the state directory lives. Boot and shutdown ordering (in
//! `supervisor` and `shutdown`) talk only to [`Storage`], so a new layout is a
//! new variant here, not a change to the order of anything.

pub mod local;
pub mod mount;
pub mod replicate;
pub mod worker;

use std::path::PathBuf;
use std::time::Duration;

use tokio::time::Instant;

use crate::config::{Config, Layout, LeaseConfig};
use crate::rclone::session::Session;
use crate::sys::process::Reaper;

mod error;

pub use error::{FlushError, StorageError, StorageFailure};

/// The `StorageError::Prepare` for a failure at `path`.
pub(crate) fn prepare_err(
    path: &std::path::Path,
) -> impl FnOnce(std::io::Error) -> StorageError + '_ {
    move |source| StorageError::Prepare {
        path: path.to_owned(),
        source,
    }
}

/// A storage layout, started or starting.
pub enum Storage {
    /// No S3: the state dir is a plain local directory.
    Local(local::Local),
    /// The spec's layout: the crypt remote mounted at the state dir by rclone.
    Mount(Box<mount::Mount>),
    /// The default: a local state dir replicated through the crypt remote.
    Replicate(Box<replicate::Replicate>),
}

/// What storage needs from the supervisor while the gateway runs.
#[derive(Debug)]
pub enum Event {
    Failed(StorageFailure),
    /// Databases sit on the mount as regular files: stop the gateway, then
    /// the next start moves them to local disk.
    Pause(Vec<PathBuf>),
}

impl Storage {
    /// Prepares the layout (directories, config); starts nothing.
    pub fn new(cfg: &Config) -> Result<Self, StorageError> {
        match &cfg.s3 {
            None => local::Local::prepare(&cfg.state_dir)
                .map(Storage::Local)
                .map_err(prepare_err(&cfg.state_dir)),
            Some(s3) => match cfg.layout {
                Layout::Mount => Ok(Storage::Mount(Box::new(mount::Mount::new(cfg, s3)?))),
                Layout::Replicate => Ok(Storage::Replicate(Box::new(replicate::Replicate::new(
                    cfg, s3,
                )?))),
            },
        }
    }

    /// The rclone this layout runs; `None` without S3.
    fn session(&self) -> Option<&Session> {
        match self {
            Storage::Local(_) => None,
            Storage::Mount(m) => Some(m.session()),
            Storage::Replicate(r) => Some(r.session()),
        }
    }

    fn session_mut(&mut self) -> Option<&mut Session> {
        match self {
            Storage::Local(_) => None,
            Storage::Mount(m) => Some(m.session_mut()),
            Storage::Replicate(r) => Some(r.session_mut()),
        }
    }

    /// Boot: waits until S3 answers (`CVM_S3_WAIT`, counted from `since`).
    pub async fn wait_for_s3(&self, reaper: &Reaper, since: Instant) -> Result<(), StorageError> {
        let Some(session) = self.session() else {
            return Ok(());
        };
        let mut target = session.s3_target();
        target.limit = target.limit.map(|l| l.saturating_sub(since.elapsed()));
        crate::sys::sdnotify::status("reaching S3");
        Ok(crate::remote::probe::wait(reaper, &target).await?)
    }

    /// Boot: starts rclone (`rclone rcd`, or the mount).
    pub async fn start_rclone(
        &mut self,
        reaper: &Reaper,
        timeout: Duration,
    ) -> Result<(), StorageError> {
        match self {
            Storage::Local(_) => Ok(()),
            Storage::Mount(m) => m.start_rclone(reaper, timeout).await,
            Storage::Replicate(r) => r.start_rclone(reaper, timeout).await,
        }
    }

    /// Boot: checks the crypt key against the bucket prefix before anything
    /// is restored or written (see `keycheck`).
    pub async fn check_key(&mut self) -> Result<(), StorageError> {
        let Some(session) = self.session_mut() else {
            return Ok(());
        };
        let outcome = session.check_key().await?;
        tracing::info!(?outcome, "boot: crypt key checked");
        Ok(())
    }

    /// Boot: takes the bucket prefix's lease, waiting while another instance
    /// holds it (see `remote::lease`).
    pub async fn acquire_lease(&mut self, cfg: &LeaseConfig) -> Result<(), StorageError> {
        let Some(session) = self.session_mut() else {
            return Ok(());
        };
        crate::sys::sdnotify::status("taking the lease on the bucket prefix");
        Ok(session.acquire_lease(cfg).await?)
    }

    /// Boot: restores what S3 holds (see each layout's `restore`), after
    /// writing the key-check marker if the prefix had none.
    pub async fn restore(&mut self) -> Result<(), StorageError> {
        if let Some(session) = self.session_mut() {
            session.write_key_marker().await?;
        }
        match self {
            Storage::Local(_) => Ok(()),
            Storage::Mount(m) => m.restore().await,
            Storage::Replicate(r) => r.restore().await,
        }
    }

    /// Boot: starts the loops that carry changes to S3.
    pub fn start_workers(&mut self) {
        match self {
            Storage::Local(_) => {}
            Storage::Mount(m) => m.start_workers(),
            Storage::Replicate(r) => r.start_workers(),
        }
    }

    /// After a failed boot step: whether S3 has gone away meanwhile (then
    /// the failure is an outage's, to be waited out, not the state's).
    pub async fn s3_gone(&self, reaper: &Reaper) -> Option<crate::remote::probe::ProbeError> {
        let session = self.session()?;
        let t = session.s3_target();
        match crate::remote::probe::probe(reaper, t.rclone_bin, t.config, t.s3).await {
            Err(gone @ crate::remote::probe::ProbeError::Unreachable { .. }) => Some(gone),
            _ => None,
        }
    }

    /// Ends what a failed boot started, so the next attempt starts clean.
    pub async fn undo_boot(&mut self) {
        match self {
            Storage::Local(_) => {}
            Storage::Mount(m) => m.end_rclone().await,
            Storage::Replicate(r) => r.end_rclone().await,
        }
    }

    /// Called before every gateway start, with the gateway stopped.
    pub fn before_gateway(&mut self) -> Result<(), StorageError> {
        match self {
            Storage::Local(_) => Ok(()),
            Storage::Mount(m) => m.before_gateway(),
            Storage::Replicate(_) => Ok(()),
        }
    }

    /// Resolves when storage needs attention: it failed, or it needs the
    /// gateway stopped for a moment. Never for local storage. Cancel-safe.
    pub async fn next_event(&mut self) -> Event {
        match self {
            Storage::Local(_) => std::future::pending().await,
            Storage::Mount(m) => m.next_event().await,
            Storage::Replicate(r) => r.next_event().await,
        }
    }

    /// Whether [`Storage::recover`] needs the gateway stopped: in the mount
    /// layout it writes through the failed mount; in the replicate layout it
    /// writes to local disk and only replication waits.
    pub fn recovery_stops_gateway(&self) -> bool {
        matches!(self, Storage::Mount(_))
    }

    /// Brings storage back after [`Event::Failed`]: ends rclone if it still
    /// runs and starts it again (the mount layout detaches the dead mount
    /// and mounts again). Pending uploads are kept and resume: the mount's
    /// in rclone's cache under `CVM_LOCAL_DIR`, the workers' in their state.
    pub async fn recover(
        &mut self,
        reaper: &Reaper,
        timeout: Duration,
    ) -> Result<(), StorageError> {
        self.undo_boot().await;
        self.start_rclone(reaper, timeout).await
    }

    /// Makes everything written so far durable, before `deadline`. A lease
    /// not confirmed at this moment (S3 just came back, rclone was just
    /// restarted) gets up to half the time to be verified again first.
    pub async fn flush(&mut self, deadline: Instant) -> Result<(), FlushError> {
        if let Some(session) = self.session() {
            let now = Instant::now();
            session
                .fence
                .opened(now + deadline.saturating_duration_since(now) / 2)
                .await;
        }
        match self {
            Storage::Local(l) => l.flush().map_err(FlushError::Sync),
            Storage::Mount(m) => m.flush(deadline).await,
            Storage::Replicate(r) => r.flush(deadline).await,
        }
    }

    /// Stops serving and releases the state dir; returns what went wrong, if anything.
    pub async fn stop(self, deadline: Instant) -> Result<(), StorageError> {
        match self {
            Storage::Local(_) => Ok(()),
            Storage::Mount(m) => m.stop(deadline).await,
            Storage::Replicate(r) => r.stop(deadline).await,
        }
    }

    pub fn describe(&self) -> &'static str {
        match self {
            Storage::Local(_) => "local directory",
            Storage::Mount(_) => "rclone crypt mount",
            Storage::Replicate(_) => "local dir replicated to the crypt remote",
        }
    }
}
