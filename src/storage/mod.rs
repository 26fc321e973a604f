//! Where the state directory lives. Boot and shutdown ordering (in
//! `supervisor` and `shutdown`) talk only to [`Storage`], so a new layout is a
//! new variant here, not a change to the order of anything.

pub mod local;
pub mod mount;

use std::time::Duration;

use tokio::time::Instant;

use crate::config::Config;
use crate::process::{Exit, Reaper};

pub use mount::MountError;

/// A storage layout, started or starting.
pub enum Storage {
    /// No S3: the state dir is a plain local directory.
    Local(local::Local),
    /// The spec's layout: the crypt remote mounted at the state dir by rclone.
    Mount(Box<mount::Mount>),
}

/// Why storage stopped serving while the gateway ran.
#[derive(Debug, thiserror::Error)]
pub enum StorageFailure {
    #[error("rclone mount exited unexpectedly ({0}); the state dir is no longer backed by S3")]
    RcloneExited(Exit),
}

/// What could not be made durable during shutdown.
#[derive(Debug, thiserror::Error)]
pub enum FlushError {
    #[error(
        "{in_progress} upload(s) in progress and {queued} queued when the stop budget ran out; \
         not on S3: {files:?}. They stay in rclone's cache under CVM_LOCAL_DIR and upload on the next boot"
    )]
    Timeout {
        in_progress: u64,
        queued: u64,
        files: Vec<String>,
    },
    #[error(
        "rclone exited ({0}) before its upload queue could be drained; files written since their \
         last upload stay in rclone's cache under CVM_LOCAL_DIR and upload on the next boot"
    )]
    RcloneGone(Exit),
    #[error("cannot ask rclone for its upload queue: {0}")]
    Rc(#[from] crate::rclone::rc::RcError),
    #[error("syncing the state dir failed: {0}")]
    Sync(std::io::Error),
}

impl Storage {
    /// Prepares the layout and starts whatever serves it; [`Storage::ready`] waits until it is live.
    pub fn launch(cfg: &Config, reaper: &Reaper) -> Result<Self, MountError> {
        match &cfg.s3 {
            None => Ok(Storage::Local(
                local::Local::prepare(&cfg.state_dir).map_err(|e| MountError::Prepare {
                    path: cfg.state_dir.clone(),
                    source: e,
                })?,
            )),
            Some(s3) => Ok(Storage::Mount(Box::new(mount::Mount::launch(
                cfg, s3, reaper,
            )?))),
        }
    }

    /// Waits until the state dir is served. Cancel-safe.
    pub async fn ready(&mut self, timeout: Duration) -> Result<(), MountError> {
        match self {
            Storage::Local(_) => Ok(()),
            Storage::Mount(m) => m.ready(timeout).await,
        }
    }

    /// Resolves when storage stops serving on its own; never for local storage. Cancel-safe.
    pub async fn failed(&mut self) -> StorageFailure {
        match self {
            Storage::Local(_) => std::future::pending().await,
            Storage::Mount(m) => StorageFailure::RcloneExited(m.exited().await),
        }
    }

    /// Makes everything written so far durable, before `deadline`.
    pub async fn flush(&mut self, deadline: Instant) -> Result<(), FlushError> {
        match self {
            Storage::Local(l) => l.flush().map_err(FlushError::Sync),
            Storage::Mount(m) => m.flush(deadline).await,
        }
    }

    /// Stops serving and releases the state dir; returns what went wrong, if anything.
    pub async fn stop(self, deadline: Instant) -> Result<(), MountError> {
        match self {
            Storage::Local(_) => Ok(()),
            Storage::Mount(m) => m.stop(deadline).await,
        }
    }

    pub fn describe(&self) -> &'static str {
        match self {
            Storage::Local(_) => "local directory",
            Storage::Mount(_) => "rclone crypt mount",
        }
    }
}
